"""GroupNorm32 against a float64 group-norm formula, in float32 and in bf16 (issue 15: the bf16
path normalises the bf16 activations natively, with float32 statistics)."""
from __future__ import annotations

import pytest
import torch

from guided_diffusion.unet import GroupNorm32


def reference_group_norm(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    """Group norm by its definition, in float64: (x - mean_g) / sqrt(var_g + eps) * w_c + b_c."""
    x = x.double()
    b, c = x.shape[:2]
    g = x.reshape(b, groups, -1)
    mean = g.mean(dim=2, keepdim=True)
    var = ((g - mean) ** 2).mean(dim=2, keepdim=True)  # biased variance, as GroupNorm
    y = ((g - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    shape = (1, c) + (1,) * (x.ndim - 2)
    return y * weight.double().reshape(shape) + bias.double().reshape(shape)


@pytest.fixture()
def norm():
    torch.manual_seed(0)
    layer = GroupNorm32(4, 16)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    return layer


def offset_input(dtype):
    # a large common offset: statistics accumulated in bf16 would lose the variance entirely
    torch.manual_seed(1)
    return (100.0 + torch.randn(2, 16, 6, 6, 6)).to(dtype)


def test_float32_matches_the_definition(norm):
    x = offset_input(torch.float32)
    out = norm(x)
    assert out.dtype == torch.float32
    ref = reference_group_norm(x, 4, norm.weight, norm.bias, norm.eps)
    assert (out.double() - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("autocast", [False, True])
def test_bf16_input_stays_bf16_with_float32_statistics(norm, autocast):
    x = offset_input(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = norm(x)
    assert out.dtype == torch.bfloat16  # not promoted to float32 (the memory traffic issue 15 removes)
    ref = reference_group_norm(x.float(), 4, norm.weight, norm.bias, norm.eps)
    err = (out.double() - ref).abs().max().item()
    # output rounding to bf16 (2**-9 relative of |y| <= ~4) plus the bf16 weight/bias rounding
    assert err < 4 * 2 ** -8 + 2 ** -7, err
    # and no worse than cWDM's round trip through a float32 copy, beyond one bf16 ulp of the output
    legacy = torch.nn.GroupNorm.forward(norm, x.float()).to(torch.bfloat16)
    assert (out.double() - legacy.double()).abs().max().item() <= 2 ** -5
