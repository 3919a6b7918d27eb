"""Rounding a target of any layout: QuantLinear, experts slices in place, routers in place.

Every rounded module says what it got through `rounding(module)`: (weights label, activations
label), None for what stays in float, or None altogether for a module qbench did not round.
The coverage count of a cell (qbench.quant.coverage) reads it, so a label can only claim what
the modules say they hold.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from qbench.quant.formats import fused
from qbench.quant.formats.fake import fake_quant
from qbench.quant.formats.spec import ActivationQuant, WeightQuant
from qbench.quant.walk.experts import set_input_step
from qbench.quant.walk.inventory import ROUNDING_ATTRIBUTE, Target, replace_module


class QuantLinear(nn.Module):
    """Quantizes its weight once, at construction (in place: it takes over the linear's
    Parameter), and its input at every call.

    The input's fake-quant and the matmul run compiled (qbench.quant.fused) on CUDA, or
    everywhere with QBENCH_FAST_QUANT=1; eagerly (the reference) otherwise.
    """

    def __init__(
        self,
        linear: nn.Linear,
        weights: WeightQuant | None,
        activations: ActivationQuant | None,
        rounded: torch.Tensor | None = None,
    ) -> None:
        """`rounded`: the weight already rounded as `weights` says (GPTQ), used as is."""
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # rounded in place: no second copy (qbench.quant.restore)
        self.weight.requires_grad_(False)
        with torch.no_grad():
            if rounded is not None:
                self.weight.copy_(rounded.to(self.weight.dtype))
            elif weights is not None:
                self.weight.copy_(fake_quant(self.weight, weights))
        self.bias = linear.bias
        self.weights, self.activations = weights, activations
        fused.fast_quant_mode()  # a bad QBENCH_FAST_QUANT fails here, before any forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activations is None:
            return F.linear(x, self.weight, self.bias)
        if fused.use_fast_path(x):
            return fused.quantized_linear(x, self.weight, self.bias, self.activations)
        return F.linear(fake_quant(x, self.activations), self.weight, self.bias)

    @property
    def qbench_rounding(self) -> tuple[str | None, str | None]:
        return _label(self.weights), _label(self.activations)

    def extra_repr(self) -> str:
        w = self.weights.label() if self.weights else "fp"
        a = self.activations.label() if self.activations else "fp"
        return f"in={self.in_features}, out={self.out_features}, weights={w}, activations={a}"


def rounding(module: nn.Module) -> tuple[str | None, str | None] | None:
    """What a target module holds: (weights label, activations label), or None if unrounded.

    A module wrapped for an online transform (rotation's HadamardInput) answers for the linear
    inside it.
    """
    inner = getattr(module, "linear", None)
    if isinstance(inner, nn.Module) and not hasattr(module, ROUNDING_ATTRIBUTE):
        module = inner
    return getattr(module, ROUNDING_ATTRIBUTE, None)


def round_target(
    model: nn.Module,
    target: Target,
    weights: WeightQuant | None,
    activations: ActivationQuant | None,
    rounded: dict[str, torch.Tensor] | None = None,
) -> None:
    """Round one target in place as the specs say.

    `rounded`: weights already rounded (GPTQ), by matrix label ('weight', 'down_proj[3]', ...);
    used as they are. Linears become QuantLinear; experts and routers keep their module, their
    weights rounded in place and their inputs fake-quantized per token before each product.
    """
    module = target.module
    if isinstance(module, nn.Linear):
        weight = rounded.get("weight") if rounded else None
        replace_module(model, target.name, QuantLinear(module, weights, activations, weight))
        return
    with torch.no_grad():
        for label, matrix in target.matrices():
            if rounded and label in rounded:
                matrix.copy_(rounded[label].to(matrix.dtype))
            elif weights is not None:
                matrix.copy_(fake_quant(matrix, weights))
    if activations is not None:
        _quantize_inputs(target, activations)
    setattr(module, ROUNDING_ATTRIBUTE, (_label(weights), _label(activations)))


def _quantize_inputs(target: Target, activations: ActivationQuant) -> None:
    def step(x: torch.Tensor, _expert: int = 0) -> torch.Tensor:
        return fake_quant(x, activations)

    if target.experts is not None:
        for parameter in target.experts.parameters:
            set_input_step(target.module, parameter, "quantize", step)
    else:  # a router applying its own weight: round its input before its forward
        target.module.register_forward_pre_hook(lambda _, args: (step(args[0]), *args[1:]))


def _label(spec: WeightQuant | ActivationQuant | None) -> str | None:
    return spec.label() if spec is not None else None
