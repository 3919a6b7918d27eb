"""FP8 / FP4 / MXFP4 / NVFP4 formats and the INT clip search, against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from qbench.quant.formats.fake import fake_quant
from qbench.quant.formats.fp import mx_scale, nv_scales, round_e2m1, round_fp8
from qbench.quant.formats.integer import quantize_int, search_clip_int
from qbench.quant.formats.spec import ActivationQuant, WeightQuant, divides_error

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
    clip = search_clip_int(rows, bits=3, symmetric=True, norm=2.0)  # the squared error
    errors = {
        c: (quantize_int(rows, 3, True, c) - rows).pow(2).sum(1)
        for c in [x / 100 for x in range(21, 101)]
    }
    best = [min(errors, key=lambda c, r=r: errors[c][r].item()) for r in range(2)]
    assert clip.flatten().tolist() == pytest.approx(best)
    assert clip[0].item() < 1 and clip[1].item() == 1  # a Gaussian row's tails are clipped
    searched = fake_quant(rows, _w(bits=3, clip_search=True, clip_search_norm=2))
    plain = fake_quant(rows, _w(bits=3))
    assert (searched - rows).pow(2).sum() < (plain - rows).pow(2).sum()


# ---------------------------------------------------------------- conventions (scale rules)


def _ct_args(**kw):
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(**kw)


def _ct_fake_quant(x: torch.Tensor, args, blocks: int | None = None, global_scale=None):
    """compressed-tensors' own qparams and fake quantization of x [rows, k]."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    grouped = x.reshape(x.shape[0], -1, blocks) if blocks else x
    low, high = grouped.amin(-1), grouped.amax(-1)
    if not blocks:
        low, high = low[:, None], high[:, None]
    scale, zero = calculate_qparams(low, high, args, global_scale=global_scale)
    return fake_quantize(x, scale, zero, args, global_scale=global_scale)


def _torchao_symmetric(x: torch.Tensor, low: int, high: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale per row, fake-quantized x) by torchao's MappingType.SYMMETRIC on [low, high]."""
    from torchao.quantization.quant_primitives import (
        MappingType,
        choose_qparams_affine,
        dequantize_affine,
        quantize_affine,
    )

    block = (1, x.shape[1])
    scale, zero = choose_qparams_affine(
        x, MappingType.SYMMETRIC, block, torch.int32, low, high, eps=1e-30
    )
    q = quantize_affine(x, block, scale, zero, torch.int32, low, high)
    return scale[:, None], dequantize_affine(q, block, scale, zero, torch.int32, low, high)


def _equal_but_at_ties(ours: torch.Tensor, theirs: torch.Tensor, steps: torch.Tensor) -> None:
    """torchao rounds x * (1 / s) where we round x / s: they may differ by one step where x / s
    sits at a rounding tie (within float32 error), nowhere else."""
    differ = ours != theirs
    at_tie = ((steps - steps.floor()) - 0.5).abs() < 1e-5
    assert not (differ & ~at_tie).any()


def test_int_scale_rules_by_hand():
    # 4 bits, absmax 7.5. qmax: s = 7.5 / 7, so +-7.5 -> +-7 steps; half-range: s = 7.5 / 7.5
    # = 1, so 7.5 -> round(7.5) = 8 (ties to even) -> clamped to 7, and -7.5 -> -8
    x = torch.tensor([[7.5, -1.0, 3.0, -7.5]])
    s = 7.5 / 7
    qmax = fake_quant(x, _w(bits=4, scale_rule="qmax"))
    torch.testing.assert_close(qmax, torch.tensor([[7 * s, -1 * s, 3 * s, -7 * s]]))
    assert fake_quant(x, _w(bits=4, scale_rule="half-range")).tolist() == [[7.0, -1.0, 3.0, -8.0]]
    assert _w(bits=4).scale_rule == "qmax" and _w(format="mxfp4").scale_rule == "floor"
    assert _w(bits=4, symmetric=False).scale_rule is None
    assert _w(format="fp8_e4m3").scale_rule is None


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_half_range_rule_is_compressed_tensors_and_torchao_arithmetic(bits):
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(bits))
    x[0, 0] = 7.5  # a positive absmax: lands on 2^(b-1) - 1/2
    ours = fake_quant(x, _w(bits=bits, scale_rule="half-range"))
    args = _ct_args(num_bits=bits, type="int", symmetric=True, strategy="channel")
    assert torch.equal(ours, _ct_fake_quant(x, args))
    scale, theirs = _torchao_symmetric(x, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert torch.equal(scale, x.abs().amax(1, keepdim=True) / ((2**bits - 1) / 2))
    _equal_but_at_ties(ours, theirs, x / scale)


def test_qmax_rule_is_torchaos_symmetric_grid_on_the_restricted_range():
    """qmax: absmax / (2^(b-1) - 1), the grid torchao gives on [-(2^(b-1) - 1), 2^(b-1) - 1]."""
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    scale, theirs = _torchao_symmetric(x, -7, 7)
    assert torch.equal(scale, x.abs().amax(1, keepdim=True) / 7)
    _equal_but_at_ties(fake_quant(x, _w(bits=4)), theirs, x / scale)


def _gptq_clip_search(rows: torch.Tensor, bits: int, sym: bool, norm: float) -> torch.Tensor:
    """GPTQ's quant.py `find_params(mse=True)`, transcribed: shrink min/max by p, recompute the
    scale (and the zero point when asymmetric), keep the first p with the least sum |err|^norm.
    Symmetric: the qmax rule (QuaRot's WeightQuantizer)."""
    maxq = 2 ** (bits - 1) - 1 if sym else 2**bits - 1
    xmin, xmax = rows.amin(1).clamp(max=0), rows.amax(1).clamp(min=0)
    best = torch.full([rows.shape[0]], float("inf"))
    out = torch.zeros_like(rows)
    for i in range(int(0.8 * 100)):
        p = 1 - i / 100
        if sym:
            scale = p * torch.maximum(-xmin, xmax) / maxq
            q = torch.clamp(torch.round(rows / scale[:, None]), -maxq - 1, maxq) * scale[:, None]
        else:
            scale = (p * xmax - p * xmin) / maxq
            zero = torch.round(-p * xmin / scale)
            q = torch.clamp(torch.round(rows / scale[:, None]) + zero[:, None], 0, maxq)
            q = scale[:, None] * (q - zero[:, None])
        err = (q - rows).abs().pow(norm).sum(1)
        better = err < best
        best[better], out[better] = err[better], q[better]
    return out


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("norm", [2.4, 2.0])
def test_clip_search_minimises_gptqs_error_norm(norm, symmetric):
    rows = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)) ** 3
    spec = _w(bits=3, symmetric=symmetric, clip_search=True, clip_search_norm=norm)
    expected = _gptq_clip_search(rows, 3, symmetric, norm)
    torch.testing.assert_close(fake_quant(rows, spec), expected, rtol=1e-6, atol=1e-6)


def _loop_clip_search(rows, bits, symmetric, rule="qmax", norm=2.4) -> torch.Tensor:
    """The clip search as qbench computed it before the batched, screened one: one pass over
    every row per ratio, the first best kept (the reference the fast search must equal)."""
    best_clip = torch.ones(rows.shape[0], 1)
    best_error = torch.full_like(best_clip, float("inf"))
    for step in range(80):
        clip = 1 - step / 100
        error = (quantize_int(rows, bits, symmetric, clip, rule) - rows).abs().pow(norm)
        error = error.sum(1, keepdim=True)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_clip = torch.where(better, torch.full_like(best_clip, clip), best_clip)
    return best_clip


def _rows(kind: str, shape: tuple[int, int]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    if kind == "gaussian":
        return torch.randn(*shape, generator=generator)
    if kind == "heavy":  # Student-t with 3 degrees of freedom: a few large values per row
        normal = torch.randn(*shape, generator=generator)
        chi2 = torch.randn(3, *shape, generator=generator).pow(2).sum(0)
        return normal / (chi2 / 3).sqrt()
    if kind == "outlier":  # one value a row 100x the rest (a super weight's row)
        rows = torch.randn(*shape, generator=generator)
        at = torch.randint(0, shape[1], (shape[0],), generator=generator)
        rows[torch.arange(shape[0]), at] *= 100
        return rows
    if kind == "on-grid":  # already on a 4-bit grid, with a zero row
        rows = torch.randint(-8, 8, shape, generator=generator).float() * 0.05
        rows[0] = 0
        return rows
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["gaussian", "heavy", "outlier", "on-grid"])
@pytest.mark.parametrize(
    ("bits", "symmetric", "rule", "norm", "width"),
    [
        (4, True, "qmax", 2.4, 4096),  # screened: rows of SCREEN_WIDTH or more
        (4, True, "half-range", 2.4, 2048),
        (3, True, "qmax", 2.0, 1024),
        (8, True, "qmax", 2.4, 1536),
        (4, True, "qmax", 1.5, 2048),
        (4, True, "qmax", 2.4, 128),  # short rows: batched, not screened
        (4, False, "qmax", 2.4, 2048),  # asymmetric: batched, not screened
    ],
)
def test_fast_clip_search_equals_the_loop(kind, bits, symmetric, rule, norm, width):
    rows = _rows(kind, (48, width))
    found = search_clip_int(rows, bits, symmetric, rule, norm)
    expected = _loop_clip_search(rows, bits, symmetric, rule, norm)
    assert torch.equal(found, expected)


def test_clip_search_exponent_changes_the_chosen_clip():
    rows = torch.randn(256, 128, generator=torch.Generator().manual_seed(0)) ** 3
    p24 = search_clip_int(rows, 3, True)
    p2 = search_clip_int(rows, 3, True, norm=2.0)
    assert (p24 != p2).any()  # the exponent matters...
    assert (p24 >= p2).float().mean() > 0.5  # ...and 2.4 weighs large errors more: clips less
    assert _w(bits=3, clip_search=True).clip_search_norm == 2.4
    assert _w(bits=3, clip_search=True, clip_search_norm=2).label() == "int3 channel clip-search p2"


# ---------------------------------------------------------------- MXFP4


def _just_below(power: float) -> float:
    return torch.tensor(power).nextafter(torch.tensor(0.0)).item()


def test_mx_scale_reads_the_exponent_bits_not_float_log2():
    # float32 log2(8 (1 - 2^-24)) rounds to 3.0: the max would get 2^1 instead of 2^0
    maxima = [_just_below(2.0**k) for k in (0, 3, 8, 20)] + [4.0, 6.0, 7.0, 7.5, 0.0]
    blocks = torch.zeros(len(maxima), 32)
    blocks[:, 5] = torch.tensor(maxima)
    floor = mx_scale(blocks).flatten().tolist()
    assert floor == [2.0**-3, 2.0**0, 2.0**5, 2.0**17, 1.0, 1.0, 1.0, 1.0, 2.0**-127]
    # even: the max rounded to E2M1's one mantissa bit first: [7, 8) * 2^k goes up a binade
    even = mx_scale(blocks, "even").flatten().tolist()
    assert even == [2.0**-2, 2.0**1, 2.0**6, 2.0**18, 1.0, 1.0, 2.0, 2.0, 2.0**-127]
    out = fake_quant(blocks.reshape(1, -1), _w(format="mxfp4")).reshape(-1, 32)[:, 5]
    assert out[1].item() == 6.0  # OCP floor: 8 (1 - 2^-24) saturates at 6 * 2^0
    out = fake_quant(blocks.reshape(1, -1), _w(format="mxfp4", scale_rule="even"))
    assert out.reshape(-1, 32)[1, 5].item() == 8.0  # even: 4 * 2^1


def _edge_blocks() -> torch.Tensor:
    """Random blocks, blocks whose max sits just below / at / between powers of two, zeros."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=generator) * torch.logspace(-6, 6, 64)[:, None]
    for i, k in enumerate(range(-8, 8)):
        x[i, 0] = _just_below(2.0**k)
        x[16 + i, 0] = 2.0**k * 1.75  # ties of the "even" rounding
        x[32 + i, 0] = 2.0**k * 1.5
    x[48] = 0
    return x.reshape(2, -1)


@pytest.mark.parametrize("rule", ["floor", "even"])
def test_mxfp4_is_torchaos_mx_arithmetic(rule):
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.prototype.mx_formats.mx_tensor import to_dtype, to_mx

    x = _edge_blocks()
    mode = {"floor": ScaleCalculationMode.FLOOR, "even": ScaleCalculationMode.EVEN}[rule]
    scale, packed = to_mx(x, torch.float4_e2m1fn_x2, 32, mode)
    theirs = to_dtype(packed, scale, torch.float4_e2m1fn_x2, 32, torch.float32)
    assert torch.equal(fake_quant(x, _w(format="mxfp4", scale_rule=rule)), theirs)


def test_mxfp4_even_is_compressed_tensors_mx_arithmetic():
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    x = _edge_blocks()
    theirs = _ct_fake_quant(x, PRESET_SCHEMES["MXFP4"]["weights"], blocks=32)
    assert torch.equal(fake_quant(x, _w(format="mxfp4", scale_rule="even")), theirs)


# ---------------------------------------------------------------- NVFP4


def test_nvfp4_block_whose_e4m3_scale_underflows_decodes_to_zero():
    x = torch.zeros(1, 48)
    x[0, 0] = 1e6  # global scale 2688 / 1e6: a block max below 2^-10 * 6 * 1e6 / 2688 = 2.18e-3
    x[0, 16:32] = 2.0  # ...would have got scale 1 (and kept 2.0); its E4M3 scale is 0
    x[0, 32] = (
        3.0  # block scale 3 / 6 * 2.688e-3 = 1.344e-3 > 2^-10: E4M3 1.3428e-3 (2^-10 * 1.375)
    )
    _, block_scale = nv_scales(x)
    assert block_scale.flatten()[1].item() == 0.0 and block_scale.flatten()[2].item() > 0
    out = fake_quant(x, _w(format="nvfp4"))
    assert not out[0, 16:32].any() and out[0, 0].item() == 1e6 and out[0, 32].item() > 0


def _nvfp4_rows() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(12, 64, generator=generator) * torch.logspace(-4, 4, 12)[:, None]
    x[0, :16] *= 1e-7  # E4M3 block scale underflows
    x[1, 16:32] *= 1e-4
    x[2] = 0
    x[3, 0] = 1e30  # everything else underflows
    x[4, :16] = 2.0**-20  # a subnormal E4M3 scale
    return x


def test_nvfp4_is_compressed_tensors_arithmetic():
    """Global scale per tensor (weights) or token (activations), E4M3 scale per 16-block."""
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
    from compressed_tensors.quantization.utils import generate_gparam

    args = PRESET_SCHEMES["NVFP4"]["weights"]
    for row in _nvfp4_rows().split(1):
        low, high = row.aminmax()
        global_scale = generate_gparam(low.reshape(1), high.reshape(1))
        theirs = _ct_fake_quant(row, args, blocks=16, global_scale=global_scale)
        assert torch.equal(fake_quant(row, _w(format="nvfp4")), theirs)


def _torchao_nvfp4(row: torch.Tensor) -> torch.Tensor:
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale

    tensor_scale = per_tensor_amax_to_scale(row.abs().amax())
    return NVFP4Tensor.to_nvfp4(row, per_tensor_scale=tensor_scale).dequantize(torch.float32)


def test_nvfp4_against_torchao_which_clamps_block_scales_at_the_smallest_normal():
    """torchao: the same grid, reciprocal scales (an ulp apart), and E4M3 block scales clamped
    at 2^-6 (finfo.tiny), so blocks whose scale is subnormal or 0 here differ."""
    rows = _nvfp4_rows()
    for i in range(5, len(rows)):
        row = rows[i : i + 1]
        torch.testing.assert_close(fake_quant(row, _w(format="nvfp4")), _torchao_nvfp4(row),
                                   rtol=2e-7, atol=0, msg=f"row {i}")  # fmt: skip
    row = torch.zeros(1, 32)
    row[0, 0], row[0, 16] = 2688.0, 0.004  # global scale 1; block scale 0.004 / 6 < 2^-10
    ours, theirs = fake_quant(row, _w(format="nvfp4")), _torchao_nvfp4(row)
    assert ours[0, 16].item() == 0 and theirs[0, 16].item() == 2.0**-7  # 0.5 * 2^-6 there
    _, block_scale = nv_scales(rows[4:5])
    assert block_scale.flatten()[0].item() == 2.0**-9  # subnormal here, 2^-6 in torchao


def test_scale_rule_and_norm_are_checked_at_load():
    with pytest.raises(ValueError, match="scale_rule applies to symmetric int"):
        _w(bits=4, symmetric=False, scale_rule="half-range")
    with pytest.raises(ValueError, match="fp8_e4m3 has one scale rule"):
        _w(format="fp8_e4m3", scale_rule="floor")
    with pytest.raises(ValueError, match="unknown scale_rule 'even' for int: use qmax or half-r"):
        _w(bits=4, scale_rule="even")
    with pytest.raises(ValueError, match="unknown scale_rule 'half-range' for mxfp4: use floor"):
        _a(format="mxfp4", scale_rule="half-range")
    with pytest.raises(ValueError, match="clip_search_norm applies with clip_search: true"):
        _w(bits=4, clip_search_norm=2)
    with pytest.raises(ValueError, match="clip_search_norm applies with clip_search"):
        _a(bits=4, clip_search_norm=2)
    with pytest.raises(ValueError, match=r"must be in \(0, 16\]"):
        _w(bits=4, clip_search=True, clip_search_norm=0)
    assert _w(bits=4, scale_rule="half-range").label() == "int4 channel half-range"
    assert _a(format="mxfp4", scale_rule="even").label() == "mxfp4 even"
    labels = [_w(bits=4), _w(format="mxfp4"), _a(format="nvfp4"), _w(bits=4, symmetric=False)]
    assert [s.label() for s in labels] == [
        "int4 channel",
        "mxfp4",
        "nvfp4 token",
        "int4 channel asym",
    ]


def test_nan_stays_nan_in_block_formats():
    """A NaN must reach the perplexity (which then fails the cell), not vanish in a block."""
    x = torch.ones(1, 32)
    x[0, 3] = float("nan")
    for fmt in ("nvfp4", "mxfp4"):
        out = fake_quant(x, _w(format=fmt))
        assert out[0, :16].isnan().any(), fmt
