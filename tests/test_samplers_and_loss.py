"""Samplers in i2i mode, the training loss, and the config round trip, on tiny shapes."""
import inspect

import pytest
import torch

from DWT_IDWT import clip_in_image_space

from guided_diffusion.config import SAMPLERS, ConfigError, DiffusionConfig, ModelConfig
from guided_diffusion.diffusion import (ddim_step, ddpm_step, make_denoiser, q_sample, randn, training_losses)
from guided_diffusion.factory import build_model, build_schedule
from guided_diffusion.samplers import SAMPLER_REGISTRY, ddim_sample, ddpm_sample, get_sampler
from guided_diffusion.schedules import linear
from guided_diffusion.timesteps import uniform_timesteps

SHAPE = (2, 8, 4, 4, 4)


@pytest.fixture
def setup(tiny_model_config):
    torch.manual_seed(0)
    model = build_model(tiny_model_config).eval()
    for p in model.parameters():  # break the zero init so the output depends on the input
        torch.nn.init.normal_(p, std=0.05)
    return model, linear(), torch.rand(2, 24, 4, 4, 4)


def test_three_step_ddim_and_respaced_ddpm_in_i2i_mode(setup):
    model, schedule, cond = setup
    steps = uniform_timesteps(schedule.num_steps, 3)
    assert steps == [999, 500, 0]
    seen = []
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out_ddim = ddim_sample(make_denoiser(model, schedule, cond), schedule, x_T, steps, clip=clip_in_image_space,
                               callback=lambda info: seen.append(info["t"]))
        out_ddpm = ddpm_sample(make_denoiser(model, schedule, cond), schedule, x_T, steps,
                               generator=torch.Generator().manual_seed(2), clip=clip_in_image_space)
        other_cond = ddim_sample(make_denoiser(model, schedule, torch.rand(2, 24, 4, 4, 4)), schedule, x_T, steps,
                                 clip=clip_in_image_space)
    assert seen == steps
    assert out_ddim.shape == out_ddpm.shape == SHAPE
    assert torch.isfinite(out_ddim).all() and torch.isfinite(out_ddpm).all()
    assert not torch.allclose(out_ddim, other_cond)  # DDIM uses the conditioning (cWDM's does not)


def test_deterministic_ddim_with_a_perfect_denoiser_recovers_x0():
    schedule = linear()
    x0 = torch.rand(1, 8, 2, 2, 2)
    x_T = torch.randn(1, 8, 2, 2, 2)
    out = ddim_sample(lambda x_t, t: x0, schedule, x_T, uniform_timesteps(1000, 4))
    torch.testing.assert_close(out, x0)


def test_per_case_generators_make_samples_independent_of_the_batch(setup):
    model, schedule, cond = setup
    steps = uniform_timesteps(1000, 2)

    def run(cond, seeds):
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        x_T = randn((len(seeds), *SHAPE[1:]), generators, "cpu")
        return get_sampler("ddpm")(make_denoiser(model, schedule, cond), schedule, x_T, steps, generator=generators)

    with torch.no_grad():
        both, alone = run(cond, (10, 11)), run(cond[1:], (11,))
    torch.testing.assert_close(both[1:], alone, atol=1e-6, rtol=0)


def test_one_sampler_registry_with_one_signature():
    assert tuple(SAMPLER_REGISTRY) == SAMPLERS  # the names configs validate against
    for name, fn in SAMPLER_REGISTRY.items():
        assert get_sampler(name) is fn
        params = list(inspect.signature(fn).parameters.values())
        assert [p.name for p in params[:4]] == ["denoiser", "schedule", "x_T", "timesteps"]
        assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params[:4])
        assert all(p.kind is p.KEYWORD_ONLY for p in params[4:])
        assert {"generator", "clip", "callback"} <= {p.name for p in params[4:]}
    with pytest.raises(ValueError, match="unknown sampler 'lms'"):
        get_sampler("lms")


def test_ddim_step_with_the_true_x0_moves_along_the_forward_process():
    """Deterministic DDIM keeps the noise of x_t: from q(x_t | x0, eps) it lands on q(x_s | x0, eps)."""
    schedule = linear()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    t, s = torch.tensor([900, 400]), torch.tensor([500, 10])
    x_s = ddim_step(q_sample(schedule, x0, t, eps), x0, schedule.alpha_bar_at(t), schedule.alpha_bar_at(s))
    torch.testing.assert_close(x_s, q_sample(schedule, x0, s, eps), atol=1e-5, rtol=1e-5)


def test_ddim_with_eta_one_is_the_ddpm_posterior_step():
    """DDIM eq. 16: eta = 1 gives the DDPM posterior (mean and "small" variance), also over skipped steps."""
    schedule = linear()
    g = torch.Generator().manual_seed(1)
    x_t, pred_x0, noise = torch.randn(SHAPE, generator=g), torch.rand(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    t, s = torch.tensor([700, 700]), torch.tensor([300, 300])
    ddim = ddim_step(x_t, pred_x0, schedule.alpha_bar_at(t), schedule.alpha_bar_at(s), eta=1.0, noise=noise)
    ddpm = ddpm_step(schedule, x_t, pred_x0, t, s, variance="small", noise=noise)
    torch.testing.assert_close(ddim, ddpm, atol=1e-5, rtol=1e-5)
    # the "large" variance (cWDM's) adds more noise around the same mean
    large = ddpm_step(schedule, x_t, pred_x0, t, s, variance="large", noise=noise)
    mean = ddpm_step(schedule, x_t, pred_x0, t, s, variance="small", noise=torch.zeros(SHAPE))
    assert (large - mean).norm() > (ddpm - mean).norm()
    with pytest.raises(ValueError, match="needs noise"):
        ddpm_step(schedule, x_t, pred_x0, t, s)
    with pytest.raises(ValueError, match="needs noise"):
        ddim_step(x_t, pred_x0, schedule.alpha_bar_at(t), schedule.alpha_bar_at(s), eta=0.5)


def test_the_final_ddpm_step_returns_the_x0_estimate():
    schedule = linear()
    x_t, pred_x0 = torch.randn(SHAPE), torch.rand(SHAPE)
    out = ddpm_step(schedule, x_t, pred_x0, torch.tensor([0, 0]), torch.tensor([-1, -1]))
    torch.testing.assert_close(out, pred_x0)


def test_bf16_precision_lives_in_the_denoiser(setup):
    """``precision="bf16"`` gives the same bits as autocast around the whole loss (the old call sites),
    returns float32, and ``"fp32"`` does not switch off an autocast opened outside."""
    model, schedule, cond = setup
    g = torch.Generator().manual_seed(3)
    x0, noise, t = torch.rand(SHAPE, generator=g), torch.randn(SHAPE, generator=g), torch.tensor([3, 700])
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outside = training_losses(model, schedule, x0, cond, t, noise)
        inside = training_losses(model, schedule, x0, cond, t, noise, precision="bf16")
        fp32 = training_losses(model, schedule, x0, cond, t, noise)
    assert inside["pred_x0"].dtype == torch.float32
    assert torch.equal(inside["pred_x0"], outside["pred_x0"]) and torch.equal(inside["loss"], outside["loss"])
    assert not torch.equal(inside["pred_x0"], fp32["pred_x0"])
    with pytest.raises(ValueError, match="precision"):
        make_denoiser(model, schedule, cond, precision="fp16")


def test_bad_step_lists_are_rejected(setup):
    model, schedule, cond = setup
    x_T = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="decreasing"):
        ddim_sample(make_denoiser(model, schedule, cond), schedule, x_T, [0, 10])
    with pytest.raises(ValueError, match="lie in"):
        ddim_sample(make_denoiser(model, schedule, cond), schedule, x_T, [1000, 10])


def test_training_loss_backward_reports_per_band(setup, tiny_model_config):
    model = build_model(tiny_model_config)
    schedule = linear()
    x0, cond, noise = torch.rand(SHAPE), torch.rand(2, 24, 4, 4, 4), torch.randn(SHAPE)
    out = training_losses(model, schedule, x0, cond, torch.tensor([3, 700]), noise)
    assert out["loss"].shape == (2,) and out["per_band"].shape == (2, 8)
    torch.testing.assert_close(out["loss"], out["per_band"].mean(1))
    out["loss"].mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_activation_checkpointing_gives_the_same_gradients(tiny_model_config):
    torch.manual_seed(0)
    plain = build_model(tiny_model_config)
    ckpt = build_model(ModelConfig(**{**tiny_model_config.to_dict(), "use_checkpoint": True,
                                      "channel_mult": (1, 2)}))
    ckpt.load_state_dict(plain.state_dict())
    for p in plain.parameters():
        torch.nn.init.normal_(p, std=0.05)
    ckpt.load_state_dict(plain.state_dict())
    x, t = torch.rand(1, 32, 4, 4, 4), torch.tensor([5.0])
    plain(x, t).square().sum().backward()
    ckpt(x, t).square().sum().backward()
    for a, b in zip(plain.parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


def test_modality_label_embedding_is_optional(tiny_model_config):
    base = build_model(tiny_model_config)
    labelled = build_model(ModelConfig(**{**tiny_model_config.to_dict(), "num_modality_labels": 4}))
    assert set(labelled.state_dict()) - set(base.state_dict()) == {"label_embed.weight"}
    out = labelled(torch.rand(2, 32, 4, 4, 4), torch.tensor([1.0, 2.0]), label=torch.tensor([0, 3]))
    assert out.shape == SHAPE
    with pytest.raises(ValueError, match="label"):
        labelled(torch.rand(2, 32, 4, 4, 4), torch.tensor([1.0, 2.0]))


def test_config_json_round_trip_and_validation():
    for cfg in (ModelConfig(), ModelConfig(num_channels=16, channel_mult=(1, 2, 2), num_groups=8),
                DiffusionConfig(), DiffusionConfig(kind="fast_sampled", fast_intervals=10)):
        assert type(cfg).from_json(cfg.to_json()) == cfg
    with pytest.raises(ConfigError, match="num_groups"):
        ModelConfig(num_channels=10, num_groups=4)
    with pytest.raises(ConfigError, match="kind"):
        DiffusionConfig(kind="quadratic")
    with pytest.raises(ConfigError, match="unknown keys"):
        DiffusionConfig.from_dict({"kind": "linear", "sampling_steps": 3})
    assert build_schedule(DiffusionConfig(kind="fast_direct", num_train_steps=10)).num_steps == 10


def test_model_rejects_wrong_input_shapes(tiny_model_config):
    model = build_model(tiny_model_config)
    with pytest.raises(ValueError, match="divisible"):
        model(torch.rand(1, 32, 5, 4, 4), torch.tensor([1.0]))
