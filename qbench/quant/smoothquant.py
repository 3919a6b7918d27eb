"""SmoothQuant: migrate activation outliers into the weights, then round as RTN does.

s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) per input channel j of the linears reading a
norm; the norm's weight is divided by s and the readers' input columns multiplied by s.
A GatedNorm gate reads the scaled norm output, so its input columns are multiplied by s
too and the gate is unchanged. Lossless in float; calibrated on `calibration` text.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn
from transformers import PreTrainedTokenizerBase

from qbench.data.calibration import CalibrationSpec, calibration_ids, shared_statistic
from qbench.errors import QBenchError
from qbench.quant.adapters import NormGroup, decoder_view
from qbench.quant.calibrate import observe_inputs
from qbench.quant.method import METHODS
from qbench.quant.rtn import RTNConfig


@METHODS.register("smoothquant")
class SmoothQuantConfig(RTNConfig):
    """SmoothQuant on the attention and MLP inputs, then RTN in any format."""

    method: Literal["smoothquant"] = "smoothquant"
    alpha: float = Field(default=0.5, ge=0, le=1)
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)

    def transform(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase | None) -> None:
        if tokenizer is None:
            raise QBenchError("smoothquant calibrates on text: pass the checkpoint's tokenizer")
        groups = [g for layer in decoder_view(model).layers for g in (layer.attn, layer.mlp)]
        ids = calibration_ids(tokenizer, self.calibration)
        absmax = shared_statistic(  # of the fp model: shared by the checkpoint's smoothquant cells
            ("smoothquant.absmax", self.calibration.model_dump_json(), torch.initial_seed()),
            lambda: activation_absmax(model, groups, ids, self.calibration.batch_size),
        )
        for group, x_max in zip(groups, absmax, strict=True):
            smooth(group, x_max, self.alpha)


def activation_absmax(
    model: nn.Module, groups: list[NormGroup], ids: torch.Tensor, batch_size: int
) -> list[torch.Tensor]:
    """Per-channel max|x| of each group's input (its first reader's input) over `ids`."""
    watched = {str(i): g.readers[0] for i, g in enumerate(groups)}
    absmax: dict[str, torch.Tensor] = {}

    def observe(name: str, x: torch.Tensor) -> None:
        batch_max = x.detach().abs().amax(dim=0).float()
        absmax[name] = torch.maximum(absmax[name], batch_max) if name in absmax else batch_max

    observe_inputs(model, watched, ids, batch_size, observe)
    return [absmax[str(i)] for i in range(len(groups))]


@torch.no_grad()
def smoothing_scales(x_max: torch.Tensor, readers: list[nn.Linear], alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha); 1 where a channel never fires."""
    w_max = torch.stack([r.weight.abs().amax(dim=0).float() for r in readers]).amax(dim=0)
    scales = x_max.pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
    return torch.where(x_max > 0, scales.clamp(min=1e-5), torch.ones_like(scales))


@torch.no_grad()
def smooth(group: NormGroup, x_max: torch.Tensor, alpha: float) -> None:
    """Fold the smoothing scales into the group's norm weight and its readers' columns."""
    scales = smoothing_scales(x_max, group.readers, alpha)
    weight = group.norm.weight
    weight.copy_((weight.float() / scales).to(weight.dtype))
    for linear in [*group.readers, *group.inner_readers]:
        linear.weight.copy_((linear.weight.float() * scales).to(linear.weight.dtype))
