"""FP8 / FP4 / MXFP4 / NVFP4 formats and the INT clip search, against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from qbench.quant.fp import mx_scale, nv_scales, round_e2m1, round_fp8
from qbench.quant.integer import quantize_int, search_clip_int
from qbench.quant.spec import ActivationQuant, WeightQuant, divides_error, fake_quant

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def _w(**kw) -> WeightQuant:
    return WeightQuant.model_validate(kw)


def _a(**kw) -> ActivationQuant:
    return ActivationQuant.model_validate(kw)


def _all_finite_values(dtype: torch.dtype) -> torch.Tensor:
    values = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    return values[values.isfinite()]


def test_e2m1_grid_is_exact_and_rounds_ties_to_even_mantissa():
    grid = torch.tensor(E2M1 + [-v for v in E2M1])
    assert torch.equal(round_e2m1(grid), grid)
    # ties: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4; saturation
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.1, 7.0, 100.0, -0.3, -2.6])
    expected = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 6.0, -0.5, -3.0]
    assert round_e2m1(x).tolist() == expected


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_grids_round_trip_and_saturate(dtype):
    values = _all_finite_values(dtype)
    assert torch.equal(round_fp8(values, dtype), values)
    limit = torch.finfo(dtype).max
    assert round_fp8(torch.tensor([limit * 4, -limit * 4]), dtype).tolist() == [limit, -limit]
    assert (
        values.abs().max() == limit == {torch.float8_e4m3fn: 448, torch.float8_e5m2: 57344}[dtype]
    )


def test_fp8_e4m3_per_channel_scale_maps_absmax_to_448():
    # row absmax 448 -> scale 1: the E4M3 grid; 17 lies between 16 and 18 -> tie to even (16)
    x = torch.tensor([[448.0, 17.0, 1.0625, 0.3]])
    # E4M3 has 3 mantissa bits: 1.0625 ties between 1 and 1.125 -> 1; 0.3 -> 0.3125 (5/16)
    assert fake_quant(x, _w(format="fp8_e4m3")).tolist() == [[448.0, 16.0, 1.0, 0.3125]]


def test_fp4_per_group_scale_is_absmax_over_6():
    x = torch.tensor([[3.0, 1.0, -0.5, 0.2, 12.0, 5.0, 1.0, 0.0]])
    # group 1: absmax 3, scale 0.5: [6, 2, -1, 0.4] -> [6, 2, -1, 0.5] * 0.5
    # group 2: absmax 12, scale 2: [6, 2.5, 0.5, 0] -> [6, 2, 0.5, 0] * 2
    expected = [[3.0, 1.0, -0.5, 0.25, 12.0, 4.0, 1.0, 0.0]]
    assert fake_quant(x, _w(format="fp4_e2m1", group=4)).tolist() == expected


def test_mxfp4_block_scale_is_a_power_of_two_from_the_block_max():
    blocks = torch.tensor([[5.0] + [0.0] * 31, [0.1] + [0.0] * 31, [7.9] + [0.0] * 31])
    # floor(log2 5) = 2, emax(E2M1) = 2 -> 2^0; floor(log2 0.1) = -4 -> 2^-6; 7.9 -> 2^0
    assert mx_scale(blocks).flatten().tolist() == [1.0, 2.0**-6, 1.0]
    out = fake_quant(blocks.reshape(1, -1), _w(format="mxfp4")).reshape(3, 32)
    # 5 -> 4 (tie to even), 0.1 / 2^-6 = 6.4 -> 6 (saturates), 7.9 -> 6 (saturates, per spec)
    assert out[:, 0].tolist() == [4.0, 6 * 2.0**-6, 6.0] and not out[:, 1:].any()


def test_mxfp4_blocks_are_32_consecutive_elements():
    x = torch.zeros(1, 64)
    x[0, 0], x[0, 1], x[0, 32], x[0, 33] = 4.0, 0.5, 64.0, 0.5
    out = fake_quant(x, _a(format="mxfp4"))
    # block 1 scale 1: 0.5 kept; block 2 scale 16: 0.5 / 16 -> 0 (below E2M1's 0.25 midpoint)
    assert out[0, [0, 1, 32, 33]].tolist() == [4.0, 0.5, 64.0, 0.0]


def test_nvfp4_scales_as_specified():
    rows = torch.zeros(1, 32)
    rows[0, 0], rows[0, 1], rows[0, 16] = 2688.0, 300.0, 10.0
    row_scale, block_scale = nv_scales(rows)
    # FP32 scale: 2688 / (448 * 6) = 1; block scales: 2688 / 6 = 448 and 10 / 6 -> E4M3 1.625
    assert row_scale.item() == 1.0
    assert block_scale.flatten().tolist() == [448.0, 1.625]
    out = fake_quant(rows, _w(format="nvfp4"))
    # 300 / 448 = 0.67 -> 0.5 -> 224; 10 / 1.625 = 6.15 -> 6 -> 9.75
    assert out[0, [0, 1, 16]].tolist() == [2688.0, 224.0, 9.75]


def test_nvfp4_weights_scale_per_tensor_and_activations_per_token():
    assert _w(format="nvfp4").granularity == "tensor"
    assert _a(format="nvfp4").granularity == "token"
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    x[1] *= 1000  # a per-token scale keeps the small tokens' resolution
    per_token = fake_quant(x, _a(format="nvfp4"))
    per_tensor = fake_quant(x, _w(format="nvfp4"))
    small = [0, 2]
    assert (per_token[small] - x[small]).abs().max() < (per_tensor[small] - x[small]).abs().max()


def _signed_e2m1_block(scale: float, size: int) -> torch.Tensor:
    values = torch.tensor(E2M1 + [-v for v in E2M1[1:]] + [6.0] * (size - 15))
    return values[:size] * scale


REPRESENTABLE = {
    # scale 1 (absmax = the format's max): every finite value of the element format
    "fp8_e4m3": _all_finite_values(torch.float8_e4m3fn),
    "fp8_e5m2": _all_finite_values(torch.float8_e5m2),
    "fp4_e2m1": _signed_e2m1_block(1.0, 15),
    # two 32-blocks with power-of-two scales 1 and 2^-5 (block maxima 6 and 6 * 2^-5)
    "mxfp4": torch.cat([_signed_e2m1_block(1.0, 32), _signed_e2m1_block(2.0**-5, 32)]),
    # row max 2688 = 448 * 6: FP32 scale 1; E4M3 block scales 448 and 1.625
    "nvfp4": torch.cat([_signed_e2m1_block(448.0, 16), _signed_e2m1_block(1.625, 16)]),
}


@pytest.mark.parametrize("fmt", list(REPRESENTABLE))
def test_representable_values_round_trip_exactly(fmt):
    x = REPRESENTABLE[fmt].reshape(1, -1)
    spec = _w(format=fmt) if fmt == "mxfp4" else _w(format=fmt, granularity="tensor")
    assert torch.equal(fake_quant(x, spec), x)


def test_fp_formats_imply_bits_and_reject_contradictions():
    assert _w(format="nvfp4").bits == 4 and _a(format="fp8_e4m3").bits == 8
    with pytest.raises(ValueError, match="bits: 8 contradicts format nvfp4"):
        _w(format="nvfp4", bits=8)
    with pytest.raises(ValueError, match=r"unknown number format 'nvfp8'.*did you mean 'nvfp4'"):
        _w(format="nvfp8")
    with pytest.raises(ValueError, match="nvfp4 fixes its blocks at 16 elements"):
        _w(format="nvfp4", group=32)
    with pytest.raises(ValueError, match="mxfp4 has only block scales"):
        _a(format="mxfp4", granularity="tensor")
    with pytest.raises(ValueError, match="fp8_e4m3 is symmetric"):
        _w(format="fp8_e4m3", symmetric=False)
    with pytest.raises(ValueError, match="clip_search applies to int only"):
        _w(format="fp4_e2m1", clip_search=True)
    with pytest.raises(ValueError, match="Input should be False"):
        _a(bits=4, clip_search=True)


def test_block_sizes_are_checked_against_layer_widths():
    field, problem, _ = divides_error(_w(format="mxfp4"), 48)
    assert (
        field == "format"
        and "mxfp4's 32-element blocks do not divide the input width 48" in problem
    )
    assert divides_error(_w(format="nvfp4"), 48) is None


def test_clip_search_picks_the_per_row_ratio_with_least_error():
    rows = torch.randn(2, 256, generator=torch.Generator().manual_seed(0))
    rows[1] = rows[1].sign()  # two levels: nothing to gain from clipping
    clip = search_clip_int(rows, bits=3, symmetric=True)
    errors = {
        c: (quantize_int(rows, 3, True, c) - rows).pow(2).sum(1)
        for c in [x / 100 for x in range(21, 101)]
    }
    best = [min(errors, key=lambda c, r=r: errors[c][r].item()) for r in range(2)]
    assert clip.flatten().tolist() == pytest.approx(best)
    assert clip[0].item() < 1 and clip[1].item() == 1  # a Gaussian row's tails are clipped
    searched = fake_quant(rows, _w(bits=3, clip_search=True))
    plain = fake_quant(rows, _w(bits=3))
    assert (searched - rows).pow(2).sum() < (plain - rows).pow(2).sum()
