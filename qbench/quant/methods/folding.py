"""Float-lossless changes the methods share: a norm's per-channel scale moved into its
readers (SmoothQuant, AWQ), and the measure of how lossless a change was."""

from __future__ import annotations

import torch

from qbench.quant.walk.inventory import set_weight
from qbench.quant.walk.structure import NormGroup

# Relative L2 difference of outputs allowed between a model and its lossless change, per dtype.
LOSSLESS_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}
HALF_TOLERANCE = 2e-2  # bfloat16 / float16 weights round the changed values


def lossless_tolerance(dtype: torch.dtype) -> float:
    """The relative L2 error a float-equivalent change may leave in `dtype` (LOSSLESS_TOLERANCE,
    HALF_TOLERANCE for half precisions)."""
    return LOSSLESS_TOLERANCE.get(dtype, HALF_TOLERANCE)


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


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """||output - reference|| / ||reference|| (L2 over every element, float64)."""
    difference = (output.double() - reference.double()).norm()
    return float(difference / reference.double().norm().clamp_min(1e-30))
