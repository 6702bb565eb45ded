"""The 3D UNet of cWDM (a guided-diffusion UNet without attention), with cWDM's parameter names.

The module tree mirrors cWDM's so that its published checkpoints load with
``load_state_dict`` directly: ``time_embed``, ``input_blocks``, ``middle_block``,
``output_blocks``, ``out`` and, inside residual blocks, ``in_layers``, ``emb_layers``,
``out_layers``, ``skip_connection``. The model never sees a noise schedule: it takes the
network input (noisy target subbands concatenated with the conditioning subbands) and a
time value per batch element.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with float32 statistics, returned in the input dtype.

    float32 input: plain GroupNorm (cWDM's computation, bit for bit). Low-precision input (bf16
    activations under autocast): normalised in that dtype by the native kernel, which accumulates
    the mean and variance in float32, instead of cWDM's round trip through a float32 copy (under
    autocast, ``group_norm`` would otherwise be promoted to float32 too). That round trip wrote and
    read every activation twice more and made bf16 slower than it should be
    (``benchmarks/gpu_suite.py``: ``bf16`` vs ``bf16_fp32_groupnorm``). The only extra rounding is
    of the affine weight and bias to the input dtype (relative 2**-9 in bf16, the same as the
    output's own rounding); ``tests/test_unet_precision.py`` bounds the difference.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        with torch.autocast(x.device.type, enabled=False):
            return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim): cosines then sines, as guided-diffusion."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Residual block with time embedding; optionally resamples (``"down"`` / ``"up"``) by 2.

    x: (B, in_ch, D, H, W), emb: (B, emb_ch) -> (B, out_ch, D', H', W').
    """

    def __init__(self, in_ch: int, emb_ch: int, out_ch: int, groups: int, dropout: float,
                 resample: str | None = None, use_checkpoint: bool = False):
        super().__init__()
        self.resample = resample
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(GroupNorm32(groups, in_ch), nn.SiLU(), nn.Conv3d(in_ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, out_ch))
        self.out_layers = nn.Sequential(
            GroupNorm32(groups, out_ch), nn.SiLU(), nn.Dropout(dropout),
            _zero(nn.Conv3d(out_ch, out_ch, 3, padding=1)),
        )
        self.skip_connection = nn.Identity() if in_ch == out_ch else nn.Conv3d(in_ch, out_ch, 1)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool3d(x, kernel_size=2, stride=2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return x

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.resample:
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self._resample(h))
            x = self._resample(x)
        else:
            h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[:, :, None, None, None]
        return self.skip_connection(x) + self.out_layers(h)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)


class _Stage(nn.ModuleList):
    """A list of layers applied in order; ResBlocks also receive the embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class UNet3D(nn.Module):
    """cWDM's 3D UNet.

    forward(x, t, label=None):
        x: (B, in_channels, D, H, W) with D, H, W divisible by 2 ** (len(channel_mult) - 1);
        t: (B,) time values (the schedule's ``model_times``);
        label: (B,) int target-modality index, only when ``num_modality_labels > 0``.
        returns (B, out_channels, D, H, W).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.num_channels
        emb_ch = 4 * ch
        self.time_embed = nn.Sequential(nn.Linear(ch, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        # Off by default; when off, no parameter is created, so the checkpoint layout is cWDM's.
        self.label_embed = nn.Embedding(cfg.num_modality_labels, emb_ch) if cfg.num_modality_labels else None

        def block(cin, cout, resample=None):
            return ResBlock(cin, emb_ch, cout, cfg.num_groups, cfg.dropout, resample, cfg.use_checkpoint)

        self.input_blocks = nn.ModuleList([_Stage([nn.Conv3d(cfg.in_channels, ch, 3, padding=1)])])
        skip_channels = [ch]
        cur = ch
        n_levels = len(cfg.channel_mult)
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.input_blocks.append(_Stage([block(cur, mult * ch)]))
                cur = mult * ch
                skip_channels.append(cur)
            if level != n_levels - 1:
                self.input_blocks.append(_Stage([block(cur, cur, "down")]))
                skip_channels.append(cur)

        self.middle_block = _Stage([block(cur, cur), block(cur, cur)])

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [block(cur + skip_channels.pop(), mult * ch)]
                cur = mult * ch
                if level and i == cfg.num_res_blocks:
                    layers.append(block(cur, cur, "up"))
                self.output_blocks.append(_Stage(layers))

        self.out = nn.Sequential(GroupNorm32(cfg.num_groups, cur), nn.SiLU(),
                                 _zero(nn.Conv3d(cur, cfg.out_channels, 3, padding=1)))

    def forward(self, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        factor = 2 ** (len(self.cfg.channel_mult) - 1)
        if x.ndim != 5 or x.shape[1] != self.cfg.in_channels or any(s % factor for s in x.shape[2:]):
            raise ValueError(
                f"UNet3D: expected input (B, {self.cfg.in_channels}, D, H, W) with D, H, W divisible by "
                f"{factor}, got {tuple(x.shape)}"
            )
        return self.body(x, self.embed(t, label))

    def embed(self, t: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        """The embedding every residual block receives: time (B,) (and label (B,)) -> (B, 4 * num_channels)."""
        emb = self.time_embed(timestep_embedding(t, self.cfg.num_channels))
        if self.label_embed is not None:
            if label is None:
                raise ValueError("UNet3D: this model is label-conditioned; pass the target-modality label")
            emb = emb + self.label_embed(label)
        elif label is not None:
            raise ValueError("UNet3D: got a label but the model has num_modality_labels=0")
        return emb

    def body(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """The network after :meth:`embed`: x (B, in_channels, D, H, W), emb -> (B, out_channels, D, H, W).
        ``guided_diffusion.backends`` exports this part alone, so the sinusoidal time embedding stays
        float32 PyTorch code (a bf16 backend would round t x frequency, e.g. 500 to the nearest 2)."""
        skips = []
        h = x
        for stage in self.input_blocks:
            h = stage(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for stage in self.output_blocks:
            h = stage(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)
