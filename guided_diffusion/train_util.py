"""The training loop: AdamW, EMA, bf16 (through the denoiser), DDP (torchrun), checkpoints, TensorBoard.

Randomness is a pure function of (seed, step, rank): the batch order, the timesteps and the
noise of step s are drawn from generators seeded with those, so a run resumed from the
checkpoint of step s continues exactly as the uninterrupted run would (on the CPU).
"""
from __future__ import annotations

import copy
import datetime
import logging
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from DWT_IDWT import BAND_NAMES, from_subbands, to_subbands

from .checkpoints import (all_modality_extra, check_resume, load_model, read_checkpoint, resolve_model_source,
                          save_checkpoint)
from .conditioning import model_inputs
from .config import ConfigError, DiffusionConfig, ModelConfig, TrainConfig
from .constants import ALL_TARGET, MODALITIES
from .diffusion import training_losses
from .flow import flow_training_losses
from .factory import build_model, build_schedule
from .fats import FatsState, ramped_shifts
from .schedules import NoiseSchedule
from .seeding import derive_seed
from .timesteps import draw_training_timesteps

logger = logging.getLogger(__name__)

LATEST = "latest.pt"
BEST = "best.pt"
LAST_GOOD = "last_good.pt"


# Collectives wait this long before the watchdog stops the job. Longer than PyTorch's default (10 min
# for NCCL) on purpose: after training, rank 0 alone fits the FATS sampling timesteps (minutes per
# budget at full size) while the other ranks wait at a barrier for it (commands/train.py).
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)


def upright_pair(target: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """The middle axial slices of two (X, Y, Z) volumes side by side, upright as in ``slice.png``
    (the slice rotated by 90 degrees, anterior up): a (1, Y, 2 X) image for TensorBoard."""
    z = target.shape[-1] // 2
    return torch.cat([torch.rot90(v[..., z], 1, dims=(0, 1)) for v in (target, pred)], dim=1)[None]


class TrainingDiverged(RuntimeError):
    """The loss became NaN/Inf; the last good state was saved."""


class StepBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices for steps [start_step, max_steps): a fresh seeded permutation
    per epoch, each rank taking its slice of the global batch. Deterministic given the step."""

    def __init__(self, n: int, batch_size: int, world: int, rank: int, seed: int, start_step: int, max_steps: int):
        self.n, self.batch, self.world, self.rank = n, batch_size, world, rank
        self.seed, self.start, self.stop = seed, start_step, max_steps

    def indices_for_step(self, step: int) -> list[int]:
        per_step = self.batch * self.world
        out = []
        for j in range(self.batch):
            pos = step * per_step + self.rank * self.batch + j
            epoch, k = divmod(pos, self.n)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(derive_seed(self.seed, epoch)))
            out.append(int(perm[k]))
        return out

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.stop):
            yield self.indices_for_step(step)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


@dataclass
class DistInfo:
    world: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(prefer_cuda: bool = True) -> DistInfo:
    """Initialise torch.distributed when launched by torchrun (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = prefer_cuda and torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return DistInfo(world, rank, local_rank, device)


def _collate(items: list[dict]) -> dict:
    out = {}
    for key in items[0]:
        values = [it[key] for it in items]
        out[key] = torch.stack(values) if torch.is_tensor(values[0]) else values
    return out


@dataclass
class StepResult:
    step: int
    loss: float
    per_band: list[float]
    lr: float
    steps_per_s: float
    val_loss: float | None = None


class Trainer:
    """Trains one target modality. ``run(callback)`` calls ``callback(StepResult)`` every log step."""

    def __init__(self, model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig, train_cfg: TrainConfig,
                 train_set: Dataset, val_set: Dataset | None = None, dist_info: DistInfo | None = None,
                 schedule: NoiseSchedule | None = None, extra: dict | None = None):
        self.model_cfg, self.diffusion_cfg, self.cfg = model_cfg, diffusion_cfg, train_cfg
        self.dist = dist_info or DistInfo()
        self.device = self.dist.device
        self.train_set, self.val_set = train_set, val_set
        self.extra = dict(extra or {})
        # an all-modality model (one network, the target a label per batch element): docs/all_modality.md
        self.all_modality = model_cfg.num_modality_labels > 0
        if self.all_modality != (train_cfg.target_modality == ALL_TARGET):
            raise ConfigError(f"Trainer: target_modality {train_cfg.target_modality!r} needs "
                              f"{'an all-modality' if train_cfg.target_modality == ALL_TARGET else 'a single-modality'}"
                              f" model (num_modality_labels={model_cfg.num_modality_labels})")
        if self.all_modality:
            self.extra.update(all_modality_extra())
        torch.manual_seed(derive_seed(train_cfg.seed, 0))  # identical initial weights on every rank
        self.model = build_model(model_cfg).to(self.device)
        self.target_schedule = schedule or build_schedule(diffusion_cfg)
        # the one objective switch: the schedule kind's loss (flow matching for kind "flow", flow.py;
        # else the diffusion x0 loss); both take the same arguments
        self.loss_terms = flow_training_losses if diffusion_cfg.kind == "flow" else training_losses
        # the fused CUDA kernel on a GPU; on the CPU the default implementation, as ever
        fused = True if self.device.type == "cuda" else None
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay,
                                           fused=fused)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.step = 0
        self.best_val = math.inf
        self.run_dir = Path(train_cfg.run_dir)
        if train_cfg.init_from:
            self._init_weights(train_cfg.init_from)
        # what the loss calls: the model, wrapped for DDP with several processes and compiled on request
        self.forward_model = self.model
        if self.dist.world > 1:
            self.forward_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if train_cfg.compile:
            self.forward_model = torch.compile(self.forward_model)
        self._writer = None

    # ------------------------------------------------------------------ state
    def _init_weights(self, path: str) -> None:
        """Initial weights from a checkpoint: a local path or ``hf://`` source, as for sampling."""
        loaded = load_model(resolve_model_source(path), expected_model_config=self.model_cfg)
        self.model.load_state_dict(loaded.model.state_dict())
        self.ema.load_state_dict(loaded.model.state_dict())
        self.extra["init_from"] = {"path": path, "step": loaded.step}

    def checkpoint_dict(self) -> dict:
        return {
            "model": self.model.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.optimizer.state_dict(),
            "step": self.step, "best_val": self.best_val,
            "config": {"model": self.model_cfg.to_dict(), "diffusion": self.diffusion_cfg.to_dict(),
                       "train": self.cfg.to_dict()},
            "schedule": self.target_schedule.state_dict(), "extra": self.extra,
        }

    def save(self, name: str = LATEST) -> Path | None:
        if not self.dist.is_main:
            return None
        return save_checkpoint(self.run_dir / name, self.checkpoint_dict())

    def resume(self, path: str | Path) -> None:
        """Restore model, EMA, optimizer, step and best validation loss from a checkpoint."""
        data = read_checkpoint(path, map_location=self.device)
        check_resume(path, data, self.model_cfg, self.diffusion_cfg, self.cfg.target_modality)  # same meaning
        self.model.load_state_dict(data["model"])
        self.ema.load_state_dict(data["ema"])
        if data.get("optimizer"):
            self.optimizer.load_state_dict(data["optimizer"])
        self.step = int(data["step"])
        self.best_val = float(data.get("best_val", math.inf))
        self.extra.update(data.get("extra", {}))
        logger.info("resumed from %s at step %d", path, self.step)

    # ------------------------------------------------------------------ pieces
    def _schedule_at(self, step: int) -> NoiseSchedule:
        """The training schedule; FATS shifts ramped in from zero when fine-tuning."""
        ramp = self.cfg.shift_ramp_steps
        if not ramp or self.diffusion_cfg.kind != "fats" or step >= ramp:
            return self.target_schedule
        shifts = ramped_shifts(torch.tensor(self.diffusion_cfg.band_shifts), step, ramp)
        return build_schedule(replace(self.diffusion_cfg, band_shifts=tuple(float(s) for s in shifts)))

    def _batch_to_subbands(self, batch: dict, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, cond) subbands of a batch: the run's target, or each case's ``labels`` (B,) for an
        all-modality model (``conditioning.model_inputs``: its target slot is a placeholder)."""
        volumes = batch["volumes"].to(self.device, non_blocking=True)
        target, cond, _ = model_inputs(volumes, self.cfg.target_modality if labels is None else labels,
                                       self.all_modality)
        return to_subbands(target), to_subbands(cond)

    def _labels_for_step(self, batch_size: int) -> torch.Tensor | None:
        """An all-modality model's targets of this step: one uniform draw from ``MODALITIES`` per
        batch element (B,) from the step's own stream (seed, step, rank, 3), so a resumed run draws
        the same and the t / noise stream is the one a single-modality run uses. None otherwise."""
        if not self.all_modality:
            return None
        gen = torch.Generator().manual_seed(derive_seed(self.cfg.seed, self.step, self.dist.rank, 3))
        return torch.randint(0, len(MODALITIES), (batch_size,), generator=gen).to(self.device)

    def _validation_timesteps(self, num_steps: int, n_timesteps: int) -> torch.Tensor:
        """Where validation scores the x0 loss: ``n_timesteps`` evenly spaced steps, or the steps a
        run trained only on (``train_timesteps`` ``last``: T - 1; ``sampled``: the planned steps)."""
        kind = self.cfg.train_timesteps
        if kind == "last":
            return torch.tensor([num_steps - 1])
        if kind == "sampled" and self._sampled_train_steps():
            return torch.tensor(list(self._sampled_train_steps()))
        return torch.linspace(0, num_steps - 1, n_timesteps).round().long()

    def _sampled_train_steps(self) -> tuple[int, ...] | None:
        """FATS v2 (``train_timesteps="sampled"``): the planned sampling steps stored in the FATS state."""
        if self.cfg.train_timesteps != "sampled":
            return None
        state = FatsState.from_extra(self.extra)
        return None if state is None else state.train_timesteps

    def _update_ema(self) -> None:
        rate = self.cfg.ema_rate
        with torch.no_grad():  # one multi-tensor kernel on CUDA instead of one launch per tensor
            torch._foreach_lerp_(list(self.ema.parameters()), list(self.model.parameters()), 1.0 - rate)

    def train_step(self, batch: dict) -> dict:
        labels = self._labels_for_step(batch["volumes"].shape[0])
        x0, cond = self._batch_to_subbands(batch, labels)
        schedule = self._schedule_at(self.step)
        # t and the noise are drawn on the training device (no 32 MB host-to-device copy per full-size
        # step on a GPU); on the CPU this is the same stream as ever, so CPU runs are unchanged.
        gen = torch.Generator(self.device).manual_seed(derive_seed(self.cfg.seed, self.step, self.dist.rank, 1))
        t = draw_training_timesteps(self.cfg.train_timesteps, schedule.num_steps, x0.shape[0], gen, self.device,
                                    self._sampled_train_steps())
        noise = torch.randn(x0.shape, generator=gen, device=self.device)
        weights = torch.tensor(self.cfg.band_weights) if self.cfg.band_weights else None
        self.model.train()
        out = self.loss_terms(self.forward_model, schedule, x0, cond, t, noise, label=labels, band_weights=weights,
                              precision=self.cfg.precision, snr_gamma=self.cfg.min_snr_gamma)
        loss = out["loss"].mean()
        self._stop_unless_finite(loss.detach(), "loss")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # the gradient norm is checked too: a non-finite gradient would poison the weights in step()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                   self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf)
        self._stop_unless_finite(grad_norm, "gradient norm")
        self.optimizer.step()
        self._update_ema()
        self.step += 1
        return {"loss": loss.detach(), "per_band": out["per_band"].detach().mean(0), "x0": x0, "pred_x0": out["pred_x0"]}

    def _stop_unless_finite(self, value: torch.Tensor, what: str) -> None:
        """Raise TrainingDiverged (every rank alike) when ``value`` is NaN/Inf on any rank, after
        saving the state from before this step, which no update has touched yet, as last_good.pt."""
        finite = torch.isfinite(value).to(torch.float32)
        if self.dist.world > 1:  # a rank must not stop alone: the others would wait for it forever
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item():
            return
        path = self.save(LAST_GOOD)
        where = path if path is not None else self.run_dir / LAST_GOOD
        raise TrainingDiverged(f"{what} became {value.item()} at step {self.step}; training stopped, the last good "
                               f"state (step {self.step}) is saved to {where}")

    @torch.no_grad()
    def validation_loss(self, n_timesteps: int = 4) -> float:
        """EMA model's x0 loss on the validation cases at fixed timesteps and noise."""
        assert self.val_set is not None
        self.ema.eval()
        losses = []
        schedule = self.target_schedule
        ts = self._validation_timesteps(schedule.num_steps, n_timesteps)
        # an all-modality model is scored on every target of every case (the same noise for each)
        targets = [torch.tensor([k], device=self.device) for k in range(len(MODALITIES))] if self.all_modality \
            else [None]
        for i in range(len(self.val_set)):
            batch = _collate([self.val_set[i]])
            for labels in targets:
                x0, cond = self._batch_to_subbands(batch, labels)
                gen = torch.Generator().manual_seed(derive_seed(self.cfg.seed, i, 2))
                for t in ts:
                    noise = torch.randn(x0.shape, generator=gen).to(self.device)
                    out = self.loss_terms(self.ema, schedule, x0, cond, t.view(1).to(self.device), noise, label=labels,
                                          precision=self.cfg.precision)
                    losses.append(out["loss"].float().mean().item())
        return sum(losses) / len(losses)

    def _tb(self):
        if self._writer is None and self.dist.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        return self._writer

    def _log_images(self, x0: torch.Tensor, pred_x0: torch.Tensor) -> None:
        with torch.no_grad():
            target = from_subbands(x0[:1].float())[0, 0]
            pred = from_subbands(pred_x0[:1].float().detach())[0, 0].clamp(0, 1)
        self._tb().add_image(f"slices/{self.cfg.target_modality}: truth (left), prediction (right), middle axial",
                             upright_pair(target, pred), self.step)

    # ------------------------------------------------------------------ loop
    def run(self, callback: Callable[[StepResult], None] | None = None) -> dict:
        """Train until ``max_steps``; returns a summary dict. Checkpoints land in run_dir."""
        cfg = self.cfg
        sampler = StepBatchSampler(len(self.train_set), cfg.batch_size, self.dist.world, self.dist.rank, cfg.seed,
                                   self.step, cfg.max_steps)
        loader = DataLoader(self.train_set, batch_sampler=sampler, num_workers=cfg.num_workers, collate_fn=_collate,
                            persistent_workers=False)
        last_time, last_step = time.perf_counter(), self.step
        history = []
        for batch in loader:
            out = self.train_step(batch)
            log_now = self.step % cfg.log_interval == 0 or self.step == cfg.max_steps
            val_loss = None
            if self.val_set is not None and cfg.val_interval and (self.step % cfg.val_interval == 0
                                                                   or self.step == cfg.max_steps):
                val_loss = self.validation_loss()
                if val_loss < self.best_val:
                    self.best_val = val_loss
                    self.save(BEST)
            if self.step % cfg.save_interval == 0 or self.step == cfg.max_steps:
                self.save(LATEST)
            if log_now:
                now = time.perf_counter()
                result = StepResult(self.step, out["loss"].item(), out["per_band"].tolist(),
                                    self.optimizer.param_groups[0]["lr"],
                                    (self.step - last_step) / max(now - last_time, 1e-9), val_loss)
                last_time, last_step = now, self.step
                history.append(result.loss)
                if self.dist.is_main:
                    writer = self._tb()
                    writer.add_scalar("loss/total", result.loss, self.step)
                    for name, value in zip(BAND_NAMES, result.per_band):
                        writer.add_scalar(f"loss/band_{name}", value, self.step)
                    writer.add_scalar("lr", result.lr, self.step)
                    writer.add_scalar("steps_per_s", result.steps_per_s, self.step)
                    if val_loss is not None:
                        writer.add_scalar("loss/validation", val_loss, self.step)
                if callback is not None:
                    callback(result)
            if self.dist.is_main and cfg.image_interval and self.step % cfg.image_interval == 0:
                self._log_images(out["x0"], out["pred_x0"])
        if self._writer is not None:
            self._writer.flush()
        return {"step": self.step, "best_val": self.best_val, "run_dir": str(self.run_dir)}
