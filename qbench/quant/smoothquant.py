"""SmoothQuant: migrate activation outliers into the weights, then round as RTN does.

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

from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field
from torch import nn
from transformers import PreTrainedTokenizerBase

from qbench.data.calibration import CalibrationSpec, calibration_ids, shared_statistic
from qbench.errors import QBenchError
from qbench.quant.calibrate import forward_batches
from qbench.quant.inventory import set_weight
from qbench.quant.notes import note
from qbench.quant.steps import Transform, transforms_key
from qbench.quant.structure import NormGroup, probe_ids, trace_structure

if TYPE_CHECKING:
    from qbench.quant.quantizer import QuantizerConfig


class SmoothQuant(Transform):
    """SmoothQuant on the inputs of every residual norm's readers."""

    transform: Literal["smoothquant"] = "smoothquant"
    alpha: float = Field(default=0.5, ge=0, le=1)
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)

    def apply(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase | None,
        quantizer: QuantizerConfig,
        before: tuple[Transform, ...],
    ) -> None:
        groups = smoothable_groups(model)
        ids = calibration_ids(tokenizer, self.calibration, "smoothquant")
        key = ("smoothquant.absmax", self.calibration.model_dump_json(), transforms_key(before))
        absmax = shared_statistic(  # of the model as `before` left it: shared by cells alike
            (*key, torch.initial_seed()),
            lambda: norm_output_absmax(model, groups, ids, self.calibration.batch_size),
        )
        for group, x_max in zip(groups, absmax, strict=True):
            smooth(group, x_max, self.alpha)


def smoothable_groups(model: nn.Module) -> list[NormGroup]:
    """The residual norms inside the decoder blocks that can take 1/s, with their readers."""
    structure = trace_structure(model, probe_ids(model))
    groups = [g for block in structure.blocks for g in block.norms]
    usable = [g for g in groups if g.spec is not None and g.spec.scale is not None and g.readers]
    unsmoothed = sum(len(b.direct_readers) for b in structure.blocks)
    unsmoothed += sum(len(g.readers) for g in groups if g not in usable)
    if not usable:
        raise QBenchError(
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


@torch.no_grad()
def scale_norm_group(group: NormGroup, scales: torch.Tensor) -> None:
    """The norm takes 1/s (w / s; Gemma's 1 + w -> (1 + w) / s - 1; a bias b / s), every
    reader's (and inner reader's) input columns s: a float-lossless change (SmoothQuant's and
    AWQ's scaling). scales: [hidden]."""
    norm, spec = group.norm, group.spec
    s = scales.double().to(norm.weight.device)
    if spec.scale == "one_plus_weight":
        set_weight(norm.weight, (1 + norm.weight.double()) / s - 1)
    else:
        set_weight(norm.weight, norm.weight.double() / s)
    if spec.bias:
        set_weight(norm.bias, norm.bias.double() / s)
    for reader in [*group.readers, *group.inner]:
        for _, matrix in reader.input_matrices():
            set_weight(matrix, matrix.double() * s.to(matrix.device))
