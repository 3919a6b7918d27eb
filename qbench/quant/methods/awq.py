"""AWQ: activation-aware per-channel scaling with a grid search, then an optional clip search
(its step: qbench.quant.steps.awq).

As the AWQ paper (Lin et al. 2024, arxiv 2306.00978), its reference code (mit-han-lab/llm-awq:
awq/quantize/auto_scale.py, auto_clip.py) and llm-compressor's AWQ modifier describe it, block
by block on cached calibration inputs (qbench.quant.blockwise):

1. Scales. For each group of targets sharing an input, with x_mean the mean |x| per input
   channel over the calibration tokens: for ratio r in {0, 1/grid, ..., (grid-1)/grid},
   s = x_mean^r (clamped at 1e-4, then divided by sqrt(max(s) min(s))) (with `duo_scaling`,
   s = x_mean^r / w_mean^(1-r), llm-compressor's option, w_mean the mean of |W| / max|W| per
   group over the readers' columns); the readers' weights become Q(W diag(s)) diag(s)^-1 with Q
   the recipe's weight quantizer, the decoder block runs on its calibration inputs, and the
   ratio with the smallest mean squared error of the block's output against the float block's
   wins. Then the input's producer takes 1/s and the readers' columns s, a float-lossless change:
   - a residual norm and its readers (attention inputs; MLP or experts' inputs, the router
     taking the scales without setting them), as every AWQ mapping starts;
   - a gated MLP's up projection (rows / s) and its down projection (columns * s), found in
     the traced structure (qbench.quant.structure's gated_pairs).
   The reference's v_proj -> o_proj scaling (which it skips under grouped-query attention) is
   not applied: attention's value path is not traced.
2. Clip (`clip: true`, the reference's auto_clip): for every linear of the block but those whose
   name holds "q_" or "k_" (the reference's rule: their error passes through QK^T), per output
   channel and weight group, the largest |w| kept in {1, 1 - 1/grid, ..., 1 - max_shrink} that
   minimizes the mean squared error of the group's contribution on up to 512 sampled tokens;
   weights are clamped to it. This changes the float model (the transformed stage shows it).
Expert weights held as 3-D tensors take the norm scaling (their gate/up slices), not the clip.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from qbench.errors import QBenchError
from qbench.quant.formats.fake import fake_quant
from qbench.quant.formats.spec import WeightQuant
from qbench.quant.methods.folding import (
    HALF_TOLERANCE,
    LOSSLESS_TOLERANCE,
    relative_error,
    scale_norm_group,
)
from qbench.quant.walk.blockwise import BlockInputs, observe
from qbench.quant.walk.inventory import Target, inventory, set_weight
from qbench.quant.walk.structure import BlockStructure, probe_ids, trace_structure

CLIP_TOKENS = 512  # tokens sampled per linear for the clip search (the reference's n_sample_token)
SKIPPED_IN_CLIP = ("q_", "k_")  # the reference's rule: queries and keys are not clipped
CLIP_CHUNK = 1 << 24  # elements of x a chunk of output channels multiplies at once


@torch.no_grad()
def awq(
    model: nn.Module,
    ids: torch.Tensor,
    batch_size: int,
    weights: WeightQuant,
    grid: int = 20,
    duo_scaling: bool = False,
    clip: bool = True,
    max_shrink: float = 0.5,
) -> None:
    """Scale (and clip) `model` in place, block by block, for rounding with `weights`.

    ids: [sequences, tokens] calibration token ids, run in batches of `batch_size`.
    """
    structure = trace_structure(model, probe_ids(model))
    inputs = BlockInputs(model, inventory(model), ids, batch_size)
    for block in structure.blocks:
        reference = list(inputs.run())
        groups = [g for g in block.norms if g.spec is not None and g.spec.scale is not None]
        means = _input_means(
            inputs, [g.norm for g in groups] + [d.module for _, d in block.gated_pairs]
        )
        for group, mean in zip(groups, means, strict=False):
            scales = search_scales(inputs, reference, _rounded(group.readers), mean, weights, grid,
                                   duo_scaling)  # fmt: skip
            scale_norm_group(group, scales)
        for (up, down), mean in zip(block.gated_pairs, means[len(groups) :], strict=True):
            scales = search_scales(inputs, reference, [down], mean, weights, grid, duo_scaling)
            scale_pair(up, down, scales)
        check_scaling(inputs, reference)
        if clip:
            clip_block(inputs, block, weights, grid, max_shrink)
        inputs.advance()


def check_scaling(inputs: BlockInputs, reference: list[torch.Tensor]) -> None:
    """QBenchError when the scaled block's float output moved from `reference` (its output
    before scaling) beyond the rotation's LOSSLESS_TOLERANCE (relative L2): the scaling must be
    lossless, so a clipped AWQ cell's transformed stage still vouches for it."""
    pairs = zip(inputs.run(), reference, strict=True)
    error = max(relative_error(out, ref) for out, ref in pairs)
    dtype = reference[0].dtype
    tolerance = LOSSLESS_TOLERANCE.get(dtype, HALF_TOLERANCE)
    if not error <= tolerance:
        raise QBenchError(
            f"awq: scaling decoder block {inputs.index} changed its float output by {error:.2e} "
            f"(relative L2, allowed {tolerance:g} in {dtype}): the scaling is not lossless here"
        )


def _rounded(readers: list[Target]) -> list[Target]:
    """The readers the recipe rounds and the search measures (routers stay in float)."""
    return [r for r in readers if r.kind != "router"]


def _input_means(inputs: BlockInputs, modules: list[nn.Module]) -> list[torch.Tensor]:
    """Mean |x| per channel of what each module outputs (norms) or receives (down linears)
    over the block's calibration inputs."""
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}

    def adder(index: int) -> Callable[[torch.Tensor], None]:
        def add(x: torch.Tensor) -> None:
            x = x.detach().reshape(-1, x.shape[-1]).abs().double()
            sums[index] = sums.get(index, 0) + x.sum(0)
            counts[index] = counts.get(index, 0) + x.shape[0]

        return add

    linear = {m: adder(i) for i, m in enumerate(modules) if isinstance(m, nn.Linear)}
    norms = {m: adder(i) for i, m in enumerate(modules) if not isinstance(m, nn.Linear)}
    observe(inputs, receives=linear, produces=norms)
    return [(sums[i] / counts[i]).float() for i in range(len(modules))]


def search_scales(
    inputs: BlockInputs,
    reference: list[torch.Tensor],
    readers: list[Target],
    x_mean: torch.Tensor,
    weights: WeightQuant,
    grid: int,
    duo_scaling: bool = False,
) -> torch.Tensor:
    """The scales s [in] whose Q(W diag(s)) diag(s)^-1 readers give the block output closest
    to `reference` (mean squared error), over the grid of ratios (see the module docstring)."""
    matrices = [m for reader in readers for _, m in reader.input_matrices()]
    saved = [m.detach().clone() for m in matrices]
    w_mean = _weight_mean(saved, weights) if duo_scaling else None
    best, best_error = torch.ones_like(x_mean), float("inf")
    for step in range(grid):
        ratio = step / grid
        scales = x_mean.pow(ratio).clamp(min=1e-4)
        if w_mean is not None:
            scales = scales / w_mean.pow(1 - ratio).clamp(min=1e-4)
        scales = scales / (scales.max() * scales.min()).sqrt()
        for matrix, original in zip(matrices, saved, strict=True):
            s = scales.to(matrix.device, matrix.dtype)
            matrix.copy_(fake_quant(original * s, weights) / s)
        error = _block_error(inputs, reference)
        if error < best_error:
            best, best_error = scales, error
    for matrix, original in zip(matrices, saved, strict=True):
        matrix.copy_(original)
    return best


def _weight_mean(matrices: list[torch.Tensor], weights: WeightQuant) -> torch.Tensor:
    """Mean over output rows of |W| / max|W| per quantization group, per input column."""
    rows = torch.cat([m.float() for m in matrices])
    width = weights.group or rows.shape[1]
    groups = rows.abs().reshape(rows.shape[0], -1, width)
    return (groups / groups.amax(dim=-1, keepdim=True).clamp(min=1e-8)).reshape(rows.shape).mean(0)


def _block_error(inputs: BlockInputs, reference: list[torch.Tensor]) -> float:
    total, count = 0.0, 0
    for output, expected in zip(inputs.run(), reference, strict=True):
        total += (output.float() - expected.float()).pow(2).sum().item()
        count += expected.numel()
    return total / count


def scale_pair(up: Target, down: Target, scales: torch.Tensor) -> None:
    """up's output rows (and bias) / s, down's input columns * s (a gated MLP)."""
    s = scales.double()
    set_weight(up.module.weight, up.module.weight.double() / s.to(up.module.weight.device)[:, None])
    if up.module.bias is not None:
        set_weight(up.module.bias, up.module.bias.double() / s.to(up.module.bias.device))
    set_weight(down.module.weight, down.module.weight.double() * s.to(down.module.weight.device))


def clip_block(
    inputs: BlockInputs, block: BlockStructure, weights: WeightQuant, grid: int, max_shrink: float
) -> None:
    """Clamp each clippable linear of the block to its searched per-group maxima."""
    linears = {t.name: t.module for t in _block_linears(block)}
    samples = _sample_inputs(inputs, linears)
    for name, linear in linears.items():
        maxima = search_clip(linear.weight.detach(), samples[name], weights, grid, max_shrink)
        rows = linear.weight.detach().reshape(*maxima.shape[:2], -1)
        set_weight(linear.weight, torch.clamp(rows, -maxima, maxima).reshape(linear.weight.shape))


def _block_linears(block: BlockStructure) -> list[Target]:
    """Every nn.Linear the block's structure names, but queries and keys."""
    targets = [t for g in block.norms for t in g.readers] + block.direct_readers
    targets += block.writers + block.post_normed + [d for _, d in block.gated_pairs]
    unique = {t.name: t for t in targets if isinstance(t.module, nn.Linear)}
    return [
        t for n, t in unique.items() if not any(k in n.rsplit(".", 1)[-1] for k in SKIPPED_IN_CLIP)
    ]


def _sample_inputs(inputs: BlockInputs, linears: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Up to CLIP_TOKENS evenly spaced input rows [tokens, in] of each linear."""
    tokens = sum(h.shape[:-1].numel() for h in inputs.hidden)
    stride = max(1, tokens // CLIP_TOKENS)
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in linears}

    def keeper(name: str) -> Callable[[torch.Tensor], None]:
        return lambda x: seen[name].append(x.reshape(-1, x.shape[-1])[::stride])

    observe(inputs, receives={m: keeper(n) for n, m in linears.items()})
    return {name: torch.cat(rows)[:CLIP_TOKENS] for name, rows in seen.items()}


def search_clip(
    weight: torch.Tensor, x: torch.Tensor, weights: WeightQuant, grid: int, max_shrink: float
) -> torch.Tensor:
    """Per (output channel, group) the kept maximum |w| [out, groups, 1] minimizing the mean
    squared error of that group's partial products on the sampled inputs x [tokens, in];
    output channels in chunks of about CLIP_CHUNK products."""
    width = weights.group or weight.shape[1]
    x = x.float().reshape(1, x.shape[0], -1, width)  # [1, tokens, groups, width]
    chunk = max(1, CLIP_CHUNK // x.numel())
    return torch.cat(
        [_clip_rows(weight[i : i + chunk], x, weights, grid, max_shrink)
         for i in range(0, weight.shape[0], chunk)]
    )  # fmt: skip


def _clip_rows(
    rows: torch.Tensor, x: torch.Tensor, weights: WeightQuant, grid: int, max_shrink: float
) -> torch.Tensor:
    w = rows.float().reshape(rows.shape[0], 1, x.shape[2], x.shape[3])  # [out, 1, groups, width]
    original = w.abs().amax(dim=-1, keepdim=True)  # [out, 1, groups, 1]
    reference = (x * w).sum(dim=-1)  # [out, tokens, groups]
    best, best_error = original.clone(), torch.full_like(original, float("inf"))
    for step in range(int(max_shrink * grid)):
        maxima = original * (1 - step / grid)
        clipped = torch.clamp(w, -maxima, maxima)
        rounded = fake_quant(clipped.reshape(rows.shape), weights).reshape(w.shape)
        error = ((x * rounded).sum(dim=-1) - reference).pow(2).mean(dim=1, keepdim=True)
        better = error[..., None] < best_error  # [out, 1, groups, 1]
        best_error = torch.where(better, error[..., None], best_error)
        best = torch.where(better, maxima, best)
    return best.squeeze(1)
