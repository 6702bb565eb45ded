"""Samplers in i2i mode, the training loss, and the config round trip, on tiny shapes."""
import pytest
import torch

from DWT_IDWT import clip_in_image_space
from guided_diffusion.config import ConfigError, DiffusionConfig, ModelConfig, build_model, build_schedule
from guided_diffusion.diffusion import make_denoiser, training_losses
from guided_diffusion.samplers import ddim_sample, ddpm_sample, respaced_steps, sample
from guided_diffusion.schedules import linear

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
    steps = respaced_steps(schedule.num_steps, 3)
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
    out = ddim_sample(lambda x_t, t: x0, schedule, x_T, respaced_steps(1000, 4))
    torch.testing.assert_close(out, x0)


def test_per_case_generators_make_samples_independent_of_the_batch(setup):
    model, schedule, cond = setup
    steps = respaced_steps(1000, 2)
    with torch.no_grad():
        both = sample(make_denoiser(model, schedule, cond), schedule, SHAPE, sampler="ddpm", steps=steps,
                      generator=[torch.Generator().manual_seed(s) for s in (10, 11)])
        alone = sample(make_denoiser(model, schedule, cond[1:]), schedule, (1, *SHAPE[1:]), sampler="ddpm",
                       steps=steps, generator=[torch.Generator().manual_seed(11)])
    torch.testing.assert_close(both[1:], alone, atol=1e-6, rtol=0)


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
                DiffusionConfig(), DiffusionConfig(kind="fast_sampled", steps=10)):
        assert type(cfg).from_json(cfg.to_json()) == cfg
    with pytest.raises(ConfigError, match="num_groups"):
        ModelConfig(num_channels=10, num_groups=4)
    with pytest.raises(ConfigError, match="kind"):
        DiffusionConfig(kind="quadratic")
    with pytest.raises(ConfigError, match="unknown keys"):
        DiffusionConfig.from_dict({"kind": "linear", "sampling_steps": 3})
    assert build_schedule(DiffusionConfig(kind="fast_direct", steps=10)).num_steps == 10


def test_model_rejects_wrong_input_shapes(tiny_model_config):
    model = build_model(tiny_model_config)
    with pytest.raises(ValueError, match="divisible"):
        model(torch.rand(1, 32, 5, 4, 4), torch.tensor([1.0]))
