"""SmoothQuant: migrate activation outliers into the weights (its step: qbench.quant.steps).

s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) per input channel j of the targets reading a
residual norm (Xiao et al. 2023), X the norm's output over the calibration text and W the
readers' weights being rounded (routers, which stay in float, take the scaling but do not
set it). The norm's scale is divided by s (w / s, or Gemma's 1 + w -> (1 + w) / s, and a
LayerNorm's bias b / s) and the readers' input columns multiplied by s: lossless in float.
A GatedNorm gate reads the scaled norm output, so its input columns are multiplied by s too
and the gate is unchanged. The norms and their readers come from the model's own structure
(qbench.quant.structure), so every decoder it reads takes it. Targets reading the residual
stream without a norm (OLMo 2) have no norm to take 1/s: they are not smoothed, and the cell's
notes say how many; a model with no norm to smooth at all is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from qbench.errors import RefusedError
from qbench.quant.methods.folding import scale_norm_group
from qbench.quant.walk.onload import onloaded
from qbench.quant.walk.structure import NormGroup, Structure, probe_ids, trace_structure

if TYPE_CHECKING:
    from qbench.data.calibration import CalibrationSpec
    from qbench.quant.context import StepContext


def smoothquant(context: StepContext, alpha: float, calibration: CalibrationSpec) -> None:
    """Smooth every usable norm group of `context.model` in place, decoder block by decoder
    block (each onloaded meanwhile where the model is offloaded: qbench.quant.walk.onload),
    with ranges taken on `calibration`'s windows from the model as the transforms before left
    it (shared by the cells of a checkpoint alike)."""
    model = context.model
    structure = trace_structure(model, probe_ids(model))
    groups = smoothable_groups(structure, model.config.model_type, context.note)
    absmax = context.statistic(
        ("smoothquant.absmax", calibration.model_dump_json()),
        lambda: norm_output_absmax(context, groups, calibration),
    )
    ranges = {id(g.norm): x_max for g, x_max in zip(groups, absmax, strict=True)}
    for i, block in enumerate(structure.blocks):
        with onloaded(model, structure.inventory.block_path(i)):
            for group in block.norms:
                if id(group.norm) in ranges:
                    smooth(group, ranges[id(group.norm)], alpha)


def smoothable_groups(
    structure: Structure, model_type: str, note: Callable[..., None]
) -> list[NormGroup]:
    """The residual norms inside the decoder blocks that can take 1/s, with their readers
    (`note`: the cell's, told how many targets read the stream without a norm)."""
    groups = [g for block in structure.blocks for g in block.norms]
    usable = [g for g in groups if g.spec is not None and g.spec.scale is not None and g.readers]
    unsmoothed = sum(len(b.direct_readers) for b in structure.blocks)
    unsmoothed += sum(len(g.readers) for g in groups if g not in usable)
    if not usable:
        raise RefusedError(
            f"smoothquant: no norm with a per-channel scale feeds the linears of {model_type} "
            "(post-norm only, or norms without a weight): nothing to smooth; use rtn, gptq or "
            "rotation"
        )
    if unsmoothed:
        note(f"smoothquant: {unsmoothed} targets read the residual stream without a norm to "
             "take the scales: not smoothed", caveat=True)  # fmt: skip
    return usable


@torch.no_grad()
def norm_output_absmax(
    context: StepContext, groups: list[NormGroup], calibration: CalibrationSpec
) -> list[torch.Tensor]:
    """Per-channel max|x| of each group's norm output over `calibration`'s windows (float32),
    observed in the float model's capture pass of the blocks' calibration inputs
    (StepContext.block_inputs), which later steps on the same windows reuse."""
    absmax: dict[int, torch.Tensor] = {}

    def observer(i: int) -> Callable[[torch.Tensor], None]:
        def observe(output: torch.Tensor | tuple) -> None:
            x = output[0] if isinstance(output, tuple) else output
            batch_max = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
            absmax[i] = torch.maximum(absmax[i], batch_max) if i in absmax else batch_max

        return observe

    observers = {g.norm: observer(i) for i, g in enumerate(groups)}
    context.block_inputs(calibration, "smoothquant", produces=observers)
    return [absmax[i] for i in range(len(groups))]


@torch.no_grad()
def smoothing_scales(x_max: torch.Tensor, group: NormGroup, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha) over the rounded readers; 1 where a channel
    never fires."""
    columns = [
        matrix.abs().amax(dim=0).float()
        for reader in group.readers
        if reader.kind != "router"
        for _, matrix in reader.input_matrices()
    ]
    w_max = torch.stack(columns).amax(dim=0) if columns else torch.ones_like(x_max)
    scales = x_max.pow(alpha) / w_max.to(x_max.device).clamp(min=1e-5).pow(1 - alpha)
    return torch.where(x_max > 0, scales.clamp(min=1e-5), torch.ones_like(scales))


@torch.no_grad()
def smooth(group: NormGroup, x_max: torch.Tensor, alpha: float) -> None:
    """Fold the smoothing scales into the group's norm and its readers' columns."""
    scale_norm_group(group, smoothing_scales(x_max, group, alpha))
