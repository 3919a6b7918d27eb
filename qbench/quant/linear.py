"""QuantLinear: a linear layer with a fake-quantized weight and fake-quantized inputs."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from qbench.quant import fused
from qbench.quant.spec import ActivationQuant, WeightQuant, fake_quant


class QuantLinear(nn.Module):
    """Quantizes its weight once, at construction, and its input at every call.

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
        weight = linear.weight.detach()
        if rounded is not None:
            weight = rounded.to(weight.dtype)
        elif weights is not None:
            weight = fake_quant(weight, weights)
        self.weight = nn.Parameter(weight, False)
        self.bias = linear.bias
        self.weights, self.activations = weights, activations
        fused.fast_quant_mode()  # a bad QBENCH_FAST_QUANT fails here, before any forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activations is None:
            return F.linear(x, self.weight, self.bias)
        if fused.use_fast_path(x):
            return fused.quantized_linear(x, self.weight, self.bias, self.activations)
        return F.linear(fake_quant(x, self.activations), self.weight, self.bias)

    def extra_repr(self) -> str:
        w = self.weights.label() if self.weights else "fp"
        a = self.activations.label() if self.activations else "fp"
        return f"in={self.in_features}, out={self.out_features}, weights={w}, activations={a}"
