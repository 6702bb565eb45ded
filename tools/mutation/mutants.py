"""The mutants of tools/mutation/harness.py: one plausible single-line bug each.

Each mutant names its file, the exact original snippet (it must occur exactly once in that file,
else the mutant is reported stale), the replacement, what bug it stands for, and the tests that
cover the module (pytest file or node ids, run with ``-x``). ``equivalent`` explains why a mutant
cannot change behaviour (it is then left out of the score); ``quick`` puts it in the fast subset
that tests/test_mutation.py runs in every test run.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    original: str
    replacement: str
    description: str
    tests: tuple[str, ...]
    equivalent: str = ""
    quick: bool = False


DWT = ("tests/test_dwt.py", "tests/test_golden_cwdm.py")
SCHEDULES = ("tests/test_schedules.py", "tests/test_golden_cwdm.py", "tests/test_oracles.py")
DIFFUSION = ("tests/test_oracles.py", "tests/test_samplers_and_loss.py", "tests/test_golden_cwdm.py")
FATS = ("tests/test_fats.py", "tests/test_contracts.py")
STEPS = ("tests/test_contracts.py",)
TRAIN = ("tests/test_contracts.py", "tests/test_oracles.py")
VARIANTS = ("tests/test_variants_v2.py",)
BRATS = ("tests/test_bratsloader.py", "tests/test_contracts.py")
SYNTHESIS = ("tests/test_oracles.py", "tests/test_contracts.py")
SAMPLE_COMMAND = ("tests/test_contracts.py",)
CHECKPOINTS = ("tests/test_contracts.py", "tests/test_safe_weights.py")
RUN_SH = ("tests/test_run_sh.py", "tests/test_cli.py")
ORACLES = ("tests/test_oracles.py",)  # the quick subset: one fast file

MUTANTS: list[Mutant] = [
    # ------------------------------------------------------------------ wavelet transform
    Mutant("dwt_parity_drops_a_bit", "DWT_IDWT/haar.py",
           "parity = (kv ^ (kv >> 1) ^ (kv >> 2)) & 1", "parity = (kv ^ (kv >> 1)) & 1",
           "Haar sign pattern ignores the third axis", DWT),
    Mutant("dwt_not_orthonormal", "DWT_IDWT/haar.py",
           "* (_INV_SQRT2 ** 3)", "* (_INV_SQRT2 ** 2)", "filter bank scaled by 1/2 instead of 1/(2 sqrt 2)", DWT),
    Mutant("idwt_bank_not_transposed", "DWT_IDWT/haar.py",
           "torch.matmul(bank.T, bands.reshape", "torch.matmul(bank, bands.reshape",
           "inverse uses the bank instead of its transpose", DWT,
           equivalent="the Haar bank is symmetric (weight (-1)^popcount(k & v) is symmetric in band k and voxel v), "
                      "so bank.T == bank exactly"),
    Mutant("idwt_axes_swapped", "DWT_IDWT/haar.py",
           "blocks.permute(0, 4, 1, 5, 2, 6, 3)", "blocks.permute(0, 4, 3, 5, 2, 6, 1)",
           "inverse puts the first and last axis offsets in each other's place", DWT),
    Mutant("lll_scale_changed", "DWT_IDWT/subbands.py",
           "LLL_SCALE = 3.0", "LLL_SCALE = 2.0", "cWDM's LLL divisor changed", DWT),
    Mutant("lll_scale_on_wrong_band", "DWT_IDWT/subbands.py",
           "scale[::N_BANDS] = LLL_SCALE", "scale[1::N_BANDS] = LLL_SCALE", "the LLH band is scaled instead of LLL",
           DWT),
    Mutant("clip_range_wrong", "DWT_IDWT/subbands.py",
           "to_subbands(from_subbands(bands).clamp(0.0, 1.0))", "to_subbands(from_subbands(bands).clamp(-1.0, 1.0))",
           "x0 clipping to [-1, 1] instead of [0, 1]", DWT),
    # ------------------------------------------------------------------ schedules and posterior
    Mutant("posterior_coef_xt_wrong", "guided_diffusion/schedules.py",
           "coef_xt = torch.sqrt(ab_t / ab_s) * (1.0 - ab_s) / (1.0 - ab_t)",
           "coef_xt = torch.sqrt(ab_t / ab_s) * (1.0 - ab_t) / (1.0 - ab_t)",
           "posterior mean weight of x_t uses sigma_t^2 for sigma_s^2", SCHEDULES),
    Mutant("posterior_coef_x0_no_sqrt", "guided_diffusion/schedules.py",
           "coef_x0 = torch.sqrt(ab_s) * step_beta", "coef_x0 = ab_s * step_beta",
           "posterior mean weight of x0 without the square root", SCHEDULES),
    Mutant("posterior_variance_is_beta", "guided_diffusion/schedules.py",
           "variance = step_beta * (1.0 - ab_s) / (1.0 - ab_t)", "variance = step_beta",
           "posterior variance equals the step's beta", SCHEDULES),
    Mutant("alpha_bar_at_off_by_one", "guided_diffusion/schedules.py",
           "+ 1].T.contiguous()", "].T.contiguous()", "alpha_bar of step t - 1 returned for t",
           ORACLES, quick=True),
    Mutant("fast_direct_beta_end_not_rescaled", "guided_diffusion/schedules.py",
           "min(beta_end * scale, 0.999)", "min(beta_end, 0.999)",
           "the rescaled linear schedule forgets to rescale beta_end", SCHEDULES),
    Mutant("band_shift_sign", "guided_diffusion/schedules.py",
           "torch.sigmoid(log_snr + delta)", "torch.sigmoid(log_snr - delta)", "per-band log-SNR shift applied with "
           "the wrong sign", SCHEDULES + FATS),
    # ------------------------------------------------------------------ diffusion loss and forward process
    Mutant("loss_mse_to_l1", "guided_diffusion/diffusion.py",
           "((pred_x0.float() - x0.float()) ** 2).mean(dim=(2, 3, 4))",
           "(pred_x0.float() - x0.float()).abs().mean(dim=(2, 3, 4))", "training loss L1 instead of MSE", ORACLES,
           quick=True),
    Mutant("loss_band_weights_not_normalised", "guided_diffusion/diffusion.py",
           "(weighted * w).sum(dim=1) / w.sum()", "(weighted * w).sum(dim=1)",
           "band-weighted loss not divided by the weight sum", DIFFUSION),
    Mutant("q_sample_noise_scaled_by_variance", "guided_diffusion/diffusion.py",
           "append_dims((1.0 - ab).sqrt(), x0) * noise", "append_dims(1.0 - ab, x0) * noise",
           "forward process noise scaled by the variance instead of the standard deviation", DIFFUSION),
    Mutant("q_sample_signal_without_sqrt", "guided_diffusion/diffusion.py",
           "append_dims(ab.sqrt(), x0) * x0", "append_dims(ab, x0) * x0",
           "forward process scales x0 by alpha_bar instead of its square root", DIFFUSION),
    Mutant("batch_noise_from_the_first_generator", "guided_diffusion/diffusion.py",
           "torch.randn(tuple(shape[1:]), generator=g, device=g.device",
           "torch.randn(tuple(shape[1:]), generator=generator[0], device=g.device",
           "with one generator per case, every case draws from the first one", DIFFUSION),
    Mutant("network_input_order", "guided_diffusion/diffusion.py",
           "torch.cat([x_in, cond.to(x_in.dtype)], dim=1)", "torch.cat([cond.to(x_in.dtype), x_in], dim=1)",
           "network sees the conditioning before the noisy target", DIFFUSION),
    Mutant("model_time_is_step_index", "guided_diffusion/diffusion.py",
           "network(x_t, model_times[t.to(cond.device).long()])", "network(x_t, t.to(cond.device).float())",
           "network gets the step index instead of the schedule's model time (differs for respaced schedules)",
           DIFFUSION),
    Mutant("preconditioning_skip_not_rooted", "guided_diffusion/schedules.py",
           "return denom.rsqrt(), a.sqrt() * s2 / denom,", "return denom.rsqrt(), a * s2 / denom,",
           "v prediction's skip coefficient uses alpha_bar instead of its square root", ("tests/test_prediction.py",)),
    Mutant("v_loss_unweighted", "guided_diffusion/diffusion.py",
           "weighted = per_band / schedule.preconditioning(t)[2].to(per_band.device).float() ** 2",
           "weighted = per_band", "a preconditioned network trained on plain x0 MSE (EDM's 1 / c_out^2 dropped)",
           ("tests/test_prediction.py",)),
    Mutant("large_variance_is_small", "guided_diffusion/diffusion.py",
           'var = post_var if variance == "small" else', 'var = post_var if variance != "nope" else',
           "cWDM's fixed-large variance replaced by the posterior variance", DIFFUSION),
    # ------------------------------------------------------------------ samplers
    Mutant("ddpm_noise_scaled_by_variance", "guided_diffusion/diffusion.py",
           "append_dims(var, x_t).sqrt() * noise", "append_dims(var, x_t) * noise",
           "DDPM step noise scaled by the variance instead of its square root", ORACLES, quick=True),
    Mutant("ddim_eta_sign", "guided_diffusion/diffusion.py",
           "(1 - ab_s - sigma ** 2).clamp_min(0)", "(1 - ab_s + sigma ** 2).clamp_min(0)",
           "DDIM direction term with the wrong sign of sigma^2 (eq. 12)", ORACLES, quick=True),
    Mutant("ddim_noise_sign", "guided_diffusion/diffusion.py",
           "x_s = x_s + sigma * noise", "x_s = x_s - sigma * noise",
           "DDIM adds -sigma * noise (same distribution, other samples for a seed)", DIFFUSION),
    Mutant("ddim_eps_wrong_denominator", "guided_diffusion/diffusion.py",
           "/ (1.0 - ab_t).sqrt()", "/ (1.0 - ab_t)", "DDIM noise estimate divided by the variance", DIFFUSION),
    Mutant("ddim_sigma_no_sqrt", "guided_diffusion/diffusion.py",
           "sigma = eta * ((1 - ab_s) / (1 - ab_t)).sqrt()", "sigma = eta * ((1 - ab_s) / (1 - ab_t))",
           "DDIM sigma without the first square root", DIFFUSION),
    Mutant("ddim_sample_target_step_wrong", "guided_diffusion/samplers.py",
           "torch.tensor(steps[1:] + [-1], dtype=torch.long), t_table.to(x.device)",
           "torch.tensor(steps[2:] + [-1, -1], dtype=torch.long), t_table.to(x.device)",
           "the sampler loops step to the step after the next one", DIFFUSION),
    Mutant("ddpm_sample_ignores_clip", "guided_diffusion/samplers.py",
           "    return clip(pred_x0) if clip is not None else pred_x0",
           "    return pred_x0",
           "the sampler loops ignore the clip function", DIFFUSION),
    # ------------------------------------------------------------------ step choice and FATS state
    Mutant("fats_default_budget_wrong_place", "guided_diffusion/timesteps.py",
           "default = None if fats_state is None else fats_state.default_nfe",
           'default = None if fats_state is None else fats_state.extra.get("default_nfe")',
           "the default budget is read from the state's free-form notes instead of its default_nfe", STEPS),
    Mutant("learned_steps_ignored_for_a_budget", "guided_diffusion/timesteps.py",
           "learned = None if fats_state is None else fats_state.learned_timesteps(nfe)", "learned = None",
           "a budget with stored learned timesteps samples uniform ones", STEPS),
    Mutant("uniform_timesteps_miss_step_zero", "guided_diffusion/timesteps.py",
           "torch.linspace(num_steps - 1, 0, nfe", "torch.linspace(num_steps - 1, 1, nfe",
           "evenly spaced timesteps end at step 1, never at the clean end's step 0", STEPS),
    Mutant("default_budget_fallback_largest", "guided_diffusion/fats.py",
           "else int(min(int(k) for k in results))", "else int(max(int(k) for k in results))",
           "without learned steps for the default budget, the largest fitted budget becomes the default", STEPS),
    Mutant("old_default_budget_dropped", "guided_diffusion/fats.py",
           '"default_nfe": state.get("default_k")', '"default_nfe": None',
           "a version-1 checkpoint's default budget (default_k beside the state) is lost", STEPS),
    Mutant("fats_shift_sign", "guided_diffusion/fats.py",
           "-kappa * math.log(e / ref)", "kappa * math.log(e / ref)",
           "energy-equalising shifts with the wrong sign", FATS),
    Mutant("ramp_off_by_one", "guided_diffusion/fats.py",
           "max(0, step) / ramp_steps", "max(0, step + 1) / ramp_steps", "shift ramp starts one step late", FATS),
    Mutant("band_energy_of_masked_square", "guided_diffusion/fats.py",
           "sq = (x * bands[i]).sum(dim=(1, 2, 3))", "sq = (x * x).sum(dim=(1, 2, 3))",
           "energy from the masked value squared", FATS,
           equivalent="the mask weights are 0 or 1, so (b w) (b w) == (b w) b exactly"),
    # ------------------------------------------------------------------ EMA and training step
    Mutant("ema_rate_inverted", "guided_diffusion/train_util.py",
           "1.0 - rate)", "rate)", "EMA moves by the rate instead of 1 - rate",
           ORACLES, quick=True),
    Mutant("ema_before_optimizer_step", "guided_diffusion/train_util.py",
           "        self.optimizer.step()\n        self._update_ema()",
           "        self._update_ema()\n        self.optimizer.step()", "EMA averages the weights of the step before",
           TRAIN),
    Mutant("train_timestep_never_last", "guided_diffusion/timesteps.py",
           "torch.randint(0, num_steps, (batch,), generator=generator, device=device)",
           "torch.randint(0, num_steps - 1, (batch,), generator=generator, device=device)",
           "training never sees the last (pure-noise) step", TRAIN + VARIANTS),
    Mutant("last_mass_halved", "guided_diffusion/timesteps.py",
           "generator=generator, device=device) < p", "generator=generator, device=device) < p / 2",
           "Ctrl's extra training mass at the last step is half what was asked", VARIANTS),
    Mutant("warm_start_reuses_the_start_noise", "guided_diffusion/samplers.py",
           "t_star, randn(x_T.shape, generator, x_T.device, x_T.dtype))", "t_star, x_T)",
           "the warm start re-noises the regression estimate with x_T instead of fresh noise", VARIANTS),
    Mutant("zero_residual_shift_wrong_way", "guided_diffusion/fats.py",
           "return kappa * max_shift if e == 0", "return -kappa * max_shift if e == 0",
           "a band with nothing left to generate gets the most noise instead of the least", VARIANTS),
    Mutant("min_snr_weights_without_floor", "guided_diffusion/diffusion.py",
           ".clamp(1.0, gamma)", ".clamp(max=gamma)",
           "min-SNR weights drop the floor at 1: the last (regression) step is barely trained", VARIANTS),
    Mutant("train_noise_same_every_step", "guided_diffusion/train_util.py",
           "derive_seed(self.cfg.seed, self.step, self.dist.rank, 1)", "derive_seed(self.cfg.seed, 0, self.dist.rank, 1)",
           "every training step draws the same timesteps and noise", TRAIN),
    Mutant("grad_clip_ignored", "guided_diffusion/train_util.py",
           "self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf", "math.inf",
           "the gradient norm is never clipped", TRAIN),
    Mutant("validation_on_raw_weights", "guided_diffusion/train_util.py",
           "out = self.loss_terms(self.ema, schedule", "out = self.loss_terms(self.model, schedule",
           "validation (and the best checkpoint) scores the raw weights instead of the EMA", TRAIN),
    Mutant("init_from_skips_ema", "guided_diffusion/train_util.py",
           "        self.ema.load_state_dict(loaded.model.state_dict())\n", "",
           "--init_from loads the weights but leaves the EMA at the random initialisation", TRAIN),
    # ------------------------------------------------------------------ preprocessing and its inverse
    Mutant("percentiles_changed", "guided_diffusion/bratsloader.py",
           "CLIP_QUANTILES = (0.001, 0.999)", "CLIP_QUANTILES = (0.01, 0.99)",
           "intensity clipping at 1 / 99 % instead of 0.1 / 99.9 %", BRATS),
    Mutant("normalise_without_offset", "guided_diffusion/bratsloader.py",
           "((clipped - low) / (high - low))", "(clipped / high)", "min-max scaling forgets the minimum", BRATS),
    Mutant("inverse_grid_takes_the_padding", "guided_diffusion/bratsloader.py",
           "= vol[..., :z]", "= vol[..., -z:]", "inverse grid keeps the end of the depth axis (the padding)", BRATS),
    Mutant("crop_shifted_in_y", "guided_diffusion/bratsloader.py",
           "return padded[..., c : x - c, c : y - c, :]", "return padded[..., c : x - c, c + 1 : y - c + 1, :]",
           "the network grid's crop is off by one voxel in y", BRATS),
    Mutant("written_without_the_input_affine", "guided_diffusion/bratsloader.py",
           "np.asarray(vol, dtype=dtype), reference.affine, header=header",
           "np.asarray(vol, dtype=dtype), np.eye(4), header=header",
           "outputs are written with an identity affine instead of the input's", BRATS),
    Mutant("brain_mask_includes_background", "guided_diffusion/bratsloader.py",
           "brain |= data > 0", "brain |= data >= 0", "the brain mask counts zero voxels as brain", BRATS),
    # ------------------------------------------------------------------ synthesis seeding and writing
    Mutant("case_seed_ignores_case_id", "guided_diffusion/synthesis.py",
           "case_generator(cfg.seed, cid", 'case_generator(cfg.seed, "case"',
           "every case gets the same noise", SYNTHESIS),
    Mutant("synthesis_not_clamped", "guided_diffusion/synthesis.py",
           "from_subbands(x0).clamp(0.0, 1.0)[:, 0]", "from_subbands(x0)[:, 0]",
           "the synthesised volume is not clamped to [0, 1]", SYNTHESIS),
    Mutant("synthesis_drops_eta", "guided_diffusion/synthesis.py",
           'options = {"eta": cfg.eta} if cfg.sampler == "ddim" else {}', "options = {}",
           "DDIM eta of the sample config is ignored", SYNTHESIS),
    Mutant("synthesis_always_clips", "guided_diffusion/synthesis.py",
           "clip=clip_in_image_space if cfg.clip_denoised else None", "clip=clip_in_image_space",
           "--no_clip is ignored", SYNTHESIS),
    Mutant("written_synthesis_flipped_in_x", "guided_diffusion/commands/sample.py",
           "to_original_grid(pred.numpy(), geometry)", "to_original_grid(pred.numpy()[::-1], geometry)",
           "sample.py writes the volume flipped along x", SAMPLE_COMMAND),
    Mutant("auto_written_flipped_in_x", "guided_diffusion/commands/sample_auto.py",
           "to_original_grid(pred.numpy(), geometry)", "to_original_grid(pred.numpy()[::-1], geometry)",
           "sample_auto.py writes the completed modality flipped along x", SAMPLE_COMMAND),
    # ------------------------------------------------------------------ checkpoints
    Mutant("safetensors_export_ignores_ema", "guided_diffusion/checkpoints.py",
           'weights = checkpoint["ema"] if use_ema and checkpoint.get("ema") else checkpoint["model"]\n    tensors',
           'weights = checkpoint["model"]\n    tensors',
           "the exported inference weights are the raw weights, not the EMA", CHECKPOINTS),
    Mutant("load_model_ignores_ema", "guided_diffusion/checkpoints.py",
           'weights = data["ema"] if use_ema and data.get("ema") else data["model"]', 'weights = data["model"]',
           "sampling loads the raw weights instead of the EMA", CHECKPOINTS),
    # ------------------------------------------------------------------ run.sh
    Mutant("run_sh_gpus_0_not_cpu", "run.sh",
           '"$PYTHON" "$@" --cpu', '"$PYTHON" "$@"', "--gpus 0 trains without --cpu (on a GPU if one is visible)",
           RUN_SH),
    Mutant("run_sh_all_misses_a_modality", "run.sh",
           "targets=(t1n t1c t2w t2f)", "targets=(t1n t1c t2w)", "--target all samples only three modalities",
           RUN_SH),
    Mutant("run_sh_pass_through_dropped", "run.sh",
           '--) shift; EXTRA=("$@"); break ;;', '--) shift; break ;;', "flags after -- are dropped", RUN_SH),
]
