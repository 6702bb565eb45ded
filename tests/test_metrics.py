"""Tests for guided_diffusion.metrics (CPU, small volumes, a few seconds).

SSIM cross-checks and their tolerances
--------------------------------------
torchmetrics (used by ``ssim3d``) reflect-pads each side by 5 voxels
(torch ``mode='reflect'`` == scipy ``mode='mirror'``: ``d c b | a b c d``),
filters with a valid 11-tap Gaussian convolution and averages the SSIM map
over the *whole* volume (torchmetrics 1.9 does not crop the map).
scikit-image filters with scipy ``mode='reflect'`` (``c b a | a b c``) and
averages only the interior (it crops ``(11 - 1) // 2 = 5`` voxels per side).
Like is compared with like:

* an independent numpy/scipy implementation with the *same* boundary rule
  (``gaussian_filter(mode='mirror', radius=5)``, i.e. exactly 11 taps,
  no crop) must match the whole-volume value and the full map;
* scikit-image must match the torchmetrics map on the interior voxels
  (whose 11^3 window never touches the boundary, so the padding mode is
  irrelevant) and skimage's mean must equal the mean of that interior,
  which is ``ssim3d(..., crop_border=True)`` (the torchmetrics <= 1.4.1
  scalar used on the BraSyn leaderboards).

Both are run in float64, where the only differences are summation order in
the convolutions (separable scipy filter vs. dense 11^3 torch conv3d):
observed differences are ~1e-14, so ``atol=1e-10`` is a tight bound that still
leaves 4 orders of magnitude for platform/BLAS differences. The float32 path
(what ``evaluate_case`` uses) is checked against the float64 reference at
``atol=1e-5``: float32 has eps ~6e-8, the variance terms ``E[x^2]-E[x]^2``
lose a few digits to cancellation and are divided by ``C2 = 9e-4``; observed
~1e-8.
"""

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from skimage.metrics import structural_similarity as sk_ssim

from guided_diffusion.metrics import (
    METRIC_KEYS,
    evaluate_case,
    masked_mse,
    masked_psnr,
    normalize_percentile,
    psnr_from_mse,
    ssim3d,
    ssim_tumor_rest,
    summarize,
)

TIGHT = 1e-10  # float64 vs float64 (see module docstring)
F32 = 1e-5  # float32 path vs float64 reference


def ref_ssim(x, y, sigma=1.5, radius=5, data_range=1.0):
    """Independent 3D SSIM: scipy Gaussian (2*radius+1 taps), mirror padding, no crop.

    Returns (whole-volume mean, SSIM map).
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)

    def f(a):
        return gaussian_filter(a, sigma, mode="mirror", radius=radius)

    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    mx, my = f(x), f(y)
    vx = f(x * x) - mx * mx
    vy = f(y * y) - my * my
    cxy = f(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean()), s


def _pair(shape, seed=0, noise=0.15):
    rng = np.random.default_rng(seed)
    gt = rng.random(shape)
    pred = np.clip(gt + noise * rng.standard_normal(shape), 0.0, 1.0)
    return pred, gt


# --------------------------------------------------------------------------- #
# SSIM cross-checks
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("shape,seed", [((16, 16, 16), 0), ((20, 18, 16), 1)])
def test_ssim_matches_numpy_reference_whole_volume(shape, seed):
    pred, gt = _pair(shape, seed)
    val, full = ssim3d(pred, gt, return_full_image=True)
    ref_val, ref_map = ref_ssim(pred, gt)
    assert full.shape == shape
    assert abs(val - ref_val) < TIGHT
    np.testing.assert_allclose(full.numpy(), ref_map, rtol=0, atol=TIGHT)
    assert 0.0 < val < 1.0


@pytest.mark.parametrize("shape,seed", [((16, 16, 16), 2), ((20, 18, 16), 3)])
def test_ssim_matches_skimage_on_interior(shape, seed):
    pred, gt = _pair(shape, seed)
    val, full = ssim3d(pred, gt, return_full_image=True)
    sk_mean, sk_map = sk_ssim(
        pred, gt, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0, full=True
    )
    inner = (slice(5, -5),) * 3
    tm_inner = full.numpy()[inner]
    np.testing.assert_allclose(tm_inner, sk_map[inner], rtol=0, atol=TIGHT)
    assert abs(sk_mean - tm_inner.mean()) < TIGHT
    # crop_border=True is exactly skimage's (and torchmetrics<=1.4.1's) value
    assert abs(ssim3d(pred, gt, crop_border=True) - sk_mean) < TIGHT
    # whole-volume value differs from skimage's cropped mean on small volumes
    # (boundary voxels are included); this is expected, not an error.
    assert abs(val - sk_mean) > 1e-6


def test_ssim_float32_and_torch_inputs():
    pred, gt = _pair((16, 17, 18), 4)
    ref_val, _ = ref_ssim(pred, gt)
    v32 = ssim3d(pred.astype(np.float32), gt.astype(np.float32))
    vt = ssim3d(torch.from_numpy(pred).float(), torch.from_numpy(gt).float())
    assert abs(v32 - ref_val) < F32
    assert abs(vt - ref_val) < F32
    assert isinstance(v32, float)


def test_ssim_batched_shape_and_values():
    p1, g1 = _pair((16, 16, 16), 5)
    p2, g2 = _pair((16, 16, 16), 6, noise=0.3)
    p = torch.from_numpy(np.stack([p1, p2])[:, None])
    g = torch.from_numpy(np.stack([g1, g2])[:, None])
    out = ssim3d(p, g)
    assert out.shape == (2,)
    cropped, full = ssim3d(p, g, crop_border=True, return_full_image=True)
    assert full.shape == (2, 1, 16, 16, 16)
    assert torch.allclose(cropped, full[..., 5:-5, 5:-5, 5:-5].mean(dim=(1, 2, 3, 4)), atol=TIGHT)
    assert abs(float(out[0]) - ref_ssim(p1, g1)[0]) < TIGHT
    assert abs(float(out[1]) - ref_ssim(p2, g2)[0]) < TIGHT
    assert out[1] < out[0]


def test_ssim_identical_is_one():
    _, gt = _pair((12, 13, 14), 7)
    assert ssim3d(gt, gt) == pytest.approx(1.0, abs=1e-12)
    assert ssim3d(gt.astype(np.float32), gt.astype(np.float32)) == pytest.approx(1.0, abs=1e-6)


def test_ssim_data_range_none_infers_range():
    pred, gt = _pair((16, 16, 16), 8)
    pred, gt = 0.5 * pred, 0.5 * gt  # range ~0.5
    rng_ = max(np.ptp(pred), np.ptp(gt))
    assert abs(ssim3d(pred, gt, data_range=None) - ref_ssim(pred, gt, data_range=rng_)[0]) < TIGHT
    assert abs(ssim3d(pred, gt) - ref_ssim(pred, gt, data_range=1.0)[0]) < TIGHT


def test_small_volume_raises_and_reduced_kernel():
    pred, gt = _pair((8, 9, 10), 9)
    with pytest.raises(ValueError, match="kernel_size"):
        ssim3d(pred, gt)
    with pytest.raises(ValueError, match="kernel_size"):
        evaluate_case(pred, gt, None)
    # reduced 7-tap window: sigma = 1.5 * 7 / 11, radius 3
    val = ssim3d(pred, gt, kernel_size=7)
    assert abs(val - ref_ssim(pred, gt, sigma=1.5 * 7 / 11, radius=3)[0]) < TIGHT
    res = evaluate_case(pred, gt, None, normalize=False, kernel_size=7)
    assert res["ssim"] == pytest.approx(val, abs=F32)
    with pytest.raises(ValueError, match="sigma"):
        ssim3d(pred, gt, kernel_size=7, sigma=1.5)  # 11-tap sigma with 7-voxel padding
    with pytest.raises(ValueError):
        ssim3d(pred, gt, kernel_size=6)


def test_shape_errors():
    a = np.zeros((12, 12, 12))
    with pytest.raises(ValueError):
        ssim3d(a, np.zeros((12, 12, 13)))
    with pytest.raises(ValueError):
        masked_mse(a, np.zeros((12, 12, 13)))
    with pytest.raises(ValueError):
        evaluate_case(a, a, np.ones((12, 12, 11)))
    with pytest.raises(ValueError):
        ssim3d(np.zeros((12, 12)), np.zeros((12, 12)))


# --------------------------------------------------------------------------- #
# MSE / PSNR by hand
# --------------------------------------------------------------------------- #
def test_identical_volumes():
    _, gt = _pair((12, 12, 12), 10)
    res = evaluate_case(gt, gt, np.ones_like(gt), seg=(gt > 0.7), normalize=False)
    assert set(res) == set(METRIC_KEYS)
    assert res["mse"] == 0.0 and res["mse_tumor"] == 0.0
    assert math.isinf(res["psnr"]) and res["psnr"] > 0
    assert math.isinf(res["psnr_tumor"])
    for k in ("ssim", "ssim_tumor", "ssim_rest"):
        assert res[k] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("c", [0.1, 0.05, 0.3])
def test_constant_offset(c):
    rng = np.random.default_rng(11)
    gt = 0.5 * rng.random((12, 12, 12))
    pred = gt + c
    assert masked_mse(pred, gt) == pytest.approx(c * c, rel=1e-12)
    assert masked_psnr(pred, gt) == pytest.approx(-10 * math.log10(c * c), rel=1e-12)
    res = evaluate_case(pred, gt, np.ones_like(gt), normalize=False)
    assert res["mse"] == pytest.approx(c * c, rel=1e-12)
    assert res["psnr"] == pytest.approx(-20 * math.log10(c), rel=1e-12)


def test_masked_mse_counts_only_mask():
    rng = np.random.default_rng(12)
    gt = rng.random((10, 10, 10))
    mask = np.zeros(gt.shape, bool)
    mask[2:5, 3:8, 1:9] = True
    pred = gt + 5.0  # big error everywhere ...
    pred[mask] = gt[mask] + 0.2  # ... but 0.2 inside the mask
    assert masked_mse(pred, gt, mask) == pytest.approx(0.04, rel=1e-12)
    assert masked_mse(pred, gt, mask.astype(np.uint8) * 3) == pytest.approx(0.04, rel=1e-12)  # labels > 0
    assert masked_mse(pred, gt) == pytest.approx((0.04 * mask.sum() + 25.0 * (~mask).sum()) / mask.size)
    assert masked_psnr(pred, gt, torch.from_numpy(mask)) == pytest.approx(-10 * math.log10(0.04))


def test_psnr_from_mse_edge_cases():
    assert psnr_from_mse(0.01) == pytest.approx(20.0)
    assert psnr_from_mse(0.0) == float("inf")
    assert math.isnan(psnr_from_mse(float("nan")))
    assert psnr_from_mse(4.0, data_range=2.0) == pytest.approx(0.0)


# --------------------------------------------------------------------------- #
# percentile normalisation
# --------------------------------------------------------------------------- #
def test_normalize_percentile_ramp():
    x = np.arange(1000, dtype=np.float64).reshape(10, 10, 10)
    lo, hi = 0.005 * 999, 0.995 * 999  # numpy linear interpolation: 4.995, 994.005
    out = normalize_percentile(x)
    expected = (np.clip(x, lo, hi) - lo) / (hi - lo)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)
    assert out.min() == 0.0 and out.max() == 1.0
    assert out.flat[0] == 0.0 and out.flat[4] == 0.0 and out.flat[999] == 1.0
    assert out.flat[500] == pytest.approx((500 - lo) / (hi - lo))


def test_normalize_percentile_negative_lower_bound_clamped_to_zero():
    x = np.arange(-100, 900, dtype=np.float64)
    hi = -100 + 0.995 * 999  # 894.005; low percentile is -95.005 -> raised to 0
    out = normalize_percentile(x)
    np.testing.assert_allclose(out, np.clip(x, 0, hi) / hi, rtol=0, atol=1e-12)
    assert np.all(out[:101] == 0.0)


def test_normalize_percentile_constant_and_torch():
    assert np.all(normalize_percentile(np.full((4, 5, 6), 7.0)) == 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.all(normalize_percentile(np.zeros((3, 3, 3))) == 0.0)
        assert np.all(normalize_percentile(-np.ones((3, 3, 3))) == 0.0)
    t = torch.arange(1000, dtype=torch.float32).reshape(10, 10, 10)
    out = normalize_percentile(t)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == t.shape
    np.testing.assert_allclose(out.numpy(), normalize_percentile(t.numpy().astype(np.float64)), atol=1e-6)
    out_int = normalize_percentile(torch.arange(1000).reshape(10, 10, 10))
    assert out_int.dtype == torch.float32


def test_evaluate_case_is_scale_invariant_via_normalisation():
    rng = np.random.default_rng(13)
    gt = 1000.0 * rng.random((12, 12, 12))
    res = evaluate_case(3.0 * gt, gt, gt > 100, seg=gt > 800)  # normalize=True
    assert res["mse"] == pytest.approx(0.0, abs=1e-20)
    assert res["psnr"] > 200 or math.isinf(res["psnr"])
    assert res["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert res["ssim_tumor"] == pytest.approx(1.0, abs=1e-6)


# --------------------------------------------------------------------------- #
# tumour / rest split and NaN conventions
# --------------------------------------------------------------------------- #
def _tumour_case():
    rng = np.random.default_rng(14)
    gt = rng.random((16, 16, 16))
    seg = np.zeros(gt.shape, np.int64)
    seg[4:10, 5:11, 6:12] = 2
    seg[6:8, 7:9, 8:10] = 1  # several labels, all count as tumour
    m = seg > 0
    pred = gt.copy()
    pred[m] = gt[m] + 0.1
    return pred, gt, seg, m


def test_tumour_rest_split():
    pred, gt, seg, m = _tumour_case()
    res = evaluate_case(pred, gt, np.ones_like(gt), seg=seg, normalize=False)
    mf = m.astype(np.float64)
    # errors only inside the tumour
    assert res["mse_tumor"] == pytest.approx(0.01, rel=1e-12)
    assert res["psnr_tumor"] == pytest.approx(20.0, rel=1e-12)
    assert res["mse"] == pytest.approx(0.01 * m.sum() / m.size, rel=1e-12)
    assert res["ssim_rest"] == pytest.approx(1.0, abs=1e-6)
    # BraSyn definition: whole-volume SSIM of the masked volumes
    exp_tumor = ref_ssim(pred * mf, gt * mf)[0]
    exp_rest = ref_ssim(pred * (1 - mf), gt * (1 - mf))[0]
    assert res["ssim_tumor"] == pytest.approx(exp_tumor, abs=F32)
    assert res["ssim_rest"] == pytest.approx(exp_rest, abs=F32)
    assert res["ssim_tumor"] < 1.0 - 1e-3
    t, r = ssim_tumor_rest(pred, gt, seg)
    assert t == pytest.approx(res["ssim_tumor"], abs=1e-7)
    assert r == pytest.approx(res["ssim_rest"], abs=1e-7)
    # challenge-era (cropped) variant
    res_c = evaluate_case(pred, gt, np.ones_like(gt), seg=seg, normalize=False, crop_border=True)
    inner = (slice(5, -5),) * 3
    assert res_c["ssim_tumor"] == pytest.approx(ref_ssim(pred * mf, gt * mf)[1][inner].mean(), abs=F32)
    assert ssim_tumor_rest(pred, gt, seg, crop_border=True)[0] == pytest.approx(res_c["ssim_tumor"], abs=1e-7)
    assert res_c["mse_tumor"] == res["mse_tumor"]

    # an error outside the tumour changes only the "rest" / brain metrics
    pred2 = pred.copy()
    pred2[~m] = np.clip(pred2[~m] + 0.2 * np.random.default_rng(0).standard_normal((~m).sum()), 0, 1)
    res2 = evaluate_case(pred2, gt, np.ones_like(gt), seg=seg, normalize=False)
    assert res2["ssim_tumor"] == res["ssim_tumor"]
    assert res2["mse_tumor"] == res["mse_tumor"]
    assert res2["ssim_rest"] < res["ssim_rest"] - 1e-2
    assert res2["mse"] > res["mse"]


def test_brain_ssim_is_masked_whole_volume():
    pred, gt = _pair((16, 16, 16), 15)
    brain = np.zeros(gt.shape, bool)
    brain[2:14, 3:13, 1:15] = True
    res = evaluate_case(pred, gt, brain, normalize=False)
    bf = brain.astype(np.float64)
    assert res["ssim"] == pytest.approx(ref_ssim(pred * bf, gt * bf)[0], abs=F32)
    assert res["mse"] == pytest.approx(np.mean((pred - gt)[brain] ** 2), rel=1e-12)


def test_nan_conventions_without_exceptions_or_warnings():
    pred, gt = _pair((12, 12, 12), 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        no_seg = evaluate_case(pred, gt, np.ones_like(gt))
        empty_seg = evaluate_case(pred, gt, np.ones_like(gt), seg=np.zeros(gt.shape, np.uint8), normalize=False)
        empty_brain = evaluate_case(pred, gt, np.zeros_like(gt), seg=np.ones(gt.shape), normalize=False)
        assert math.isnan(masked_mse(pred, gt, np.zeros_like(gt)))
        assert math.isnan(masked_psnr(pred, gt, np.zeros_like(gt)))
    for k in ("psnr_tumor", "ssim_tumor", "mse_tumor", "ssim_rest"):
        assert math.isnan(no_seg[k])
    for k in ("psnr", "ssim", "mse"):
        assert math.isfinite(no_seg[k])
    for k in ("psnr_tumor", "ssim_tumor", "mse_tumor"):
        assert math.isnan(empty_seg[k])
    # no tumour: "rest" is the whole volume
    assert empty_seg["ssim_rest"] == pytest.approx(ssim3d(pred, gt), abs=F32)
    for k in ("psnr", "ssim", "mse"):
        assert math.isnan(empty_brain[k])
    # tumour everywhere: nothing left for the "rest"
    assert math.isnan(empty_brain["ssim_rest"])
    assert math.isfinite(empty_brain["ssim_tumor"])


def test_numpy_and_torch_inputs_agree():
    rng = np.random.default_rng(17)
    gt = 500 * rng.random((12, 13, 14))
    pred = gt + 40 * rng.standard_normal(gt.shape)
    brain, seg = gt > 50, (gt > 400).astype(np.int16)
    a = evaluate_case(pred, gt, brain, seg)
    b = evaluate_case(torch.from_numpy(pred), torch.from_numpy(gt), torch.from_numpy(brain), torch.from_numpy(seg))
    c = evaluate_case(
        torch.from_numpy(pred).float(), torch.from_numpy(gt).float(), torch.from_numpy(brain), torch.from_numpy(seg)
    )
    for k in METRIC_KEYS:
        assert a[k] == pytest.approx(b[k], rel=1e-12)
        assert a[k] == pytest.approx(c[k], rel=1e-4, abs=1e-5)  # float32 input rounding


# --------------------------------------------------------------------------- #
# summarize
# --------------------------------------------------------------------------- #
def test_summarize_nan_aware():
    records = [
        {"case": "a", "psnr": 20.0, "ssim": 0.9, "ssim_tumor": float("nan")},
        {"case": "b", "psnr": 30.0, "ssim": 0.7, "ssim_tumor": 0.5},
        {"case": "c", "psnr": 25.0, "ssim": 0.8},  # missing key counts as NaN
        {"case": "d", "psnr": float("nan"), "ssim": np.float32(0.6), "ssim_tumor": torch.tensor(0.7)},
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = summarize(records)
        all_nan = summarize([{"x": float("nan")}, {"x": float("nan")}])
    assert list(s) == ["psnr", "ssim", "ssim_tumor"]  # strings ignored, first-seen order
    assert s["psnr"]["mean"] == pytest.approx(25.0)
    assert s["psnr"]["median"] == pytest.approx(25.0)
    assert s["psnr"]["std"] == pytest.approx(np.std([20.0, 30.0, 25.0]))
    assert s["psnr"]["n"] == 3 and s["psnr"]["n_nan"] == 1
    assert s["ssim"]["mean"] == pytest.approx(0.75)
    assert s["ssim"]["median"] == pytest.approx(0.75)
    assert s["ssim_tumor"]["mean"] == pytest.approx(0.6)
    assert s["ssim_tumor"]["n"] == 2 and s["ssim_tumor"]["n_nan"] == 2
    assert math.isnan(all_nan["x"]["mean"]) and all_nan["x"]["n"] == 0
    assert summarize([]) == {}
    s_inf = summarize([{"psnr": float("inf")}, {"psnr": 10.0}])
    assert math.isinf(s_inf["psnr"]["mean"])


def test_summarize_of_evaluate_case_records():
    recs = []
    for seed in range(3):
        pred, gt = _pair((12, 12, 12), 20 + seed)
        recs.append(evaluate_case(pred, gt, gt > 0.05, seg=gt > 0.9))
    s = summarize(recs)
    assert set(s) == set(METRIC_KEYS)
    for k in METRIC_KEYS:
        assert s[k]["n"] == 3
        assert s[k]["mean"] == pytest.approx(np.mean([r[k] for r in recs]))
