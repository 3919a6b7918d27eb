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
from torch import nn

from qbench.errors import RefusedError
from qbench.quant.methods.folding import scale_norm_group
from qbench.quant.walk.blockwise import forward_batches
from qbench.quant.walk.structure import NormGroup, probe_ids, trace_structure

if TYPE_CHECKING:
    from qbench.data.calibration import CalibrationSpec
    from qbench.quant.context import StepContext


def smoothquant(context: StepContext, alpha: float, calibration: CalibrationSpec) -> None:
    """Smooth every usable norm group of `context.model` in place, with ranges taken on
    `calibration`'s windows from the model as the transforms before left it (shared by the
    cells of a checkpoint alike)."""
    groups = smoothable_groups(context.model, context.note)
    ids = context.calibration_ids(calibration, "smoothquant")
    absmax = context.statistic(
        ("smoothquant.absmax", calibration.model_dump_json()),
        lambda: norm_output_absmax(context.model, groups, ids, calibration.batch_size),
    )
    for group, x_max in zip(groups, absmax, strict=True):
        smooth(group, x_max, alpha)


def smoothable_groups(model: nn.Module, note: Callable[[str], None]) -> list[NormGroup]:
    """The residual norms inside the decoder blocks that can take 1/s, with their readers
    (`note`: the cell's, told how many targets read the stream without a norm)."""
    structure = trace_structure(model, probe_ids(model))
    groups = [g for block in structure.blocks for g in block.norms]
    usable = [g for g in groups if g.spec is not None and g.spec.scale is not None and g.readers]
    unsmoothed = sum(len(b.direct_readers) for b in structure.blocks)
    unsmoothed += sum(len(g.readers) for g in groups if g not in usable)
    if not usable:
        raise RefusedError(
            f"smoothquant: no norm with a per-channel scale feeds the linears of "
            f"{model.config.model_type} (post-norm only, or norms without a weight): nothing to "
            "smooth; use rtn, gptq or rotation"
        )
    if unsmoothed:
        note(f"smoothquant: {unsmoothed} targets read the residual stream without a norm to "
             "take the scales: not smoothed")  # fmt: skip
    return usable


@torch.no_grad()
def norm_output_absmax(
    model: nn.Module, groups: list[NormGroup], ids: torch.Tensor, batch_size: int
) -> list[torch.Tensor]:
    """Per-channel max|x| of each group's norm output over `ids` (float32)."""
    absmax: dict[int, torch.Tensor] = {}

    def observer(i: int):
        def hook(_: nn.Module, __: tuple, output: torch.Tensor) -> None:
            x = output[0] if isinstance(output, tuple) else output
            batch_max = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
            absmax[i] = torch.maximum(absmax[i], batch_max) if i in absmax else batch_max

        return hook

    handles = [g.norm.register_forward_hook(observer(i)) for i, g in enumerate(groups)]
    try:
        forward_batches(model, ids, batch_size)
    finally:
        for handle in handles:
            handle.remove()
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
