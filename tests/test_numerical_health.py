"""Numerical health: training stops with a clear message and a finite last_good.pt when the loss
(or the gradient) becomes NaN/Inf, and the bf16 paths stay within a stated distance of fp32."""
from __future__ import annotations

import math
import sys

import pytest
import torch

from bad_input_corpus import SCRIPTS, run_in_process, write_case, write_tiny_checkpoint
from fixtures_data import one_thread  # noqa: F401 (a fixture)
from guided_diffusion.bratsloader import BratsDataset
from guided_diffusion.checkpoints import load_model, read_checkpoint
from guided_diffusion.config import SampleConfig, TrainConfig
from guided_diffusion.factory import build_model
from guided_diffusion.presets import get_preset
from guided_diffusion.synthesis import synthesize
from guided_diffusion.train_util import LAST_GOOD, LATEST, Trainer, TrainingDiverged

pytestmark = pytest.mark.usefixtures("one_thread")
NETWORK_SHAPE = (16, 16, 12)
# bf16 keeps 8 significant bits: rounding an operand costs at most 2**-9 relative, a product of two
# rounded operands at most 2 * 2**-9. Autocast rounds the inputs and weights of every convolution
# and linear layer (sums accumulate in fp32), and the tiny UNet has 12 of them on its longest path
# (input conv, 2 res blocks x 2 convs x 2 levels, up/down convs, output conv; time-embedding MLP).
# First-order worst case, errors adding up layer by layer: 12 * 2 * 2**-9 = 0.047. Measured on
# random weights: 0.014-0.018 (tiny), 0.018-0.020 (demo preset).
BF16_REL_L2_BOUND = 12 * 2 * 2.0**-9


def _tiny_train_cfg(run_dir, **kw) -> TrainConfig:
    settings = dict(max_steps=10, save_interval=1, batch_size=1, num_workers=0, val_interval=0, image_interval=0,
                    log_interval=1)
    return TrainConfig(run_dir=str(run_dir), **{**settings, **kw})


class _PoisonedAfter(torch.utils.data.Dataset):
    """Finite random volumes for the first ``good_items`` reads, then NaN ones."""

    def __init__(self, good_items: int):
        self.good_items, self.reads = good_items, 0

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index):
        self.reads += 1
        g = torch.Generator().manual_seed(index)
        volumes = torch.rand((4, *NETWORK_SHAPE), generator=g)
        if self.reads > self.good_items:
            volumes[0, 3, 3, 3] = float("nan")
        return {"volumes": volumes, "available": torch.ones(4, dtype=torch.bool),
                "brain_mask": torch.ones(NETWORK_SHAPE, dtype=torch.bool), "case_id": f"c{index}"}


def _assert_finite_state(checkpoint: dict) -> None:
    for part in ("model", "ema"):
        for key, value in checkpoint[part].items():
            assert torch.isfinite(value).all(), f"{part}.{key}"
    for state in checkpoint["optimizer"]["state"].values():
        for value in state.values():
            assert torch.isfinite(torch.as_tensor(value)).all()


def test_nan_loss_stops_training_with_a_clear_message_and_a_finite_last_good_state(tmp_path):
    preset = get_preset("tiny")
    trainer = Trainer(preset.model, preset.diffusion, _tiny_train_cfg(tmp_path), _PoisonedAfter(good_items=3))
    with pytest.raises(TrainingDiverged) as info:
        trainer.run()
    message = str(info.value)
    assert message == (f"loss became nan at step 3; training stopped, the last good state (step 3) is saved to "
                       f"{tmp_path / LAST_GOOD}")
    last_good, latest = read_checkpoint(tmp_path / LAST_GOOD), read_checkpoint(tmp_path / LATEST)
    assert last_good["step"] == latest["step"] == 3
    _assert_finite_state(last_good)
    for key, value in latest["model"].items():  # the state after the last finite step, untouched
        assert torch.equal(last_good["model"][key], value), key


def test_non_finite_gradient_stops_before_the_weights_are_touched(tmp_path, monkeypatch):
    preset = get_preset("tiny")
    trainer = Trainer(preset.model, preset.diffusion, _tiny_train_cfg(tmp_path, max_steps=3), _PoisonedAfter(99))
    trainer.run()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    original = torch.Tensor.backward

    def inf_gradient(self, *args, **kwargs):
        original(self, *args, **kwargs)
        next(trainer.model.parameters()).grad.fill_(math.inf)

    monkeypatch.setattr(torch.Tensor, "backward", inf_gradient)
    trainer.cfg = _tiny_train_cfg(tmp_path, max_steps=5)
    with pytest.raises(TrainingDiverged, match=r"gradient norm became (inf|nan) at step 3"):
        trainer.run()
    last_good = read_checkpoint(tmp_path / LAST_GOOD)
    _assert_finite_state(last_good)
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, before[key]) and torch.equal(last_good["model"][key], before[key]), key


def test_train_script_reports_divergence_without_traceback(tmp_path, monkeypatch):
    for i in range(2):
        write_case(tmp_path / "data", f"good-{i}", seed=i)
    original, reads = BratsDataset.__getitem__, []

    def nan_from_the_third_read(self, index):
        item = original(self, index)
        reads.append(index)
        if len(reads) > 2:
            item["volumes"][1] = float("nan")
        return item

    monkeypatch.setattr(BratsDataset, "__getitem__", nan_from_the_third_read)
    code, records = run_in_process([sys.executable, str(SCRIPTS / "train.py"), "--preset", "tiny", "--data_dir",
                                    str(tmp_path / "data"), "--run_dir", str(tmp_path / "run"), "--max_steps", "5",
                                    "--cpu"])
    errors = [r.getMessage() for r in records if r.levelname == "ERROR"]
    assert code == 1
    last_good = tmp_path / "run" / "t2f" / LAST_GOOD
    assert errors[0] == f"t2f: loss became nan at step 2; training stopped, the last good state (step 2) is saved " \
                        f"to {last_good}"
    assert errors[-1].strip() == errors[0]  # and in the summary
    _assert_finite_state(read_checkpoint(last_good))


def _random_tiny_model(seed: int):
    """The tiny preset's UNet with every weight random (its output conv starts at zero)."""
    torch.manual_seed(seed)
    model = build_model(get_preset("tiny").model).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                torch.nn.init.kaiming_normal_(p)
    return model


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bf16_forward_is_within_the_stated_bound_of_fp32(seed):
    model = _random_tiny_model(seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((2, 32, 8, 8, 6), generator=g)
    times = torch.tensor([3.0, 700.0])
    with torch.no_grad():
        reference = model(x, times)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, times).float()
    rel = ((low - reference).norm() / reference.norm()).item()
    assert 0 < rel < BF16_REL_L2_BOUND, rel  # > 0: bf16 really was used


def test_bf16_synthesis_and_training_loss_stay_close_to_fp32(tmp_path):
    loaded = load_model(write_tiny_checkpoint(tmp_path / "tiny.pt"))
    loaded.model.load_state_dict(_random_tiny_model(3).state_dict())
    volumes = torch.rand((1, 4, *NETWORK_SHAPE), generator=torch.Generator().manual_seed(0))
    out = {p: synthesize(loaded, volumes, "t2f", SampleConfig(sampler="ddim", nfe=2, precision=p), ["c"])
           for p in ("fp32", "bf16")}
    assert not torch.equal(out["fp32"], out["bf16"])
    # outputs in [0, 1] after clipping; bf16 moves a voxel by well under the network's relative bound
    assert (out["fp32"] - out["bf16"]).abs().mean() < BF16_REL_L2_BOUND / 4
    losses = {}
    for precision in ("fp32", "bf16"):
        preset = get_preset("tiny")
        trainer = Trainer(preset.model, preset.diffusion, _tiny_train_cfg(tmp_path / precision, precision=precision),
                          _PoisonedAfter(99))
        trainer.model.load_state_dict(_random_tiny_model(3).state_dict())
        losses[precision] = trainer.train_step({k: v[None] if torch.is_tensor(v) else [v]
                                                for k, v in _PoisonedAfter(99)[0].items()})["loss"].item()
    assert losses["fp32"] != losses["bf16"]
    assert abs(losses["bf16"] - losses["fp32"]) / losses["fp32"] < 2 * BF16_REL_L2_BOUND
