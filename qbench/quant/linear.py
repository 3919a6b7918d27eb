"""QuantLinear: a linear layer with a fake-quantized weight and fake-quantized inputs."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from qbench.quant.spec import ActivationQuant, WeightQuant, fake_quant


class QuantLinear(nn.Module):
    """Quantizes its weight once, at construction, and its input at every call."""

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activations is not None:
            x = fake_quant(x, self.activations)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        w = self.weights.label() if self.weights else "fp"
        a = self.activations.label() if self.activations else "fp"
        return f"in={self.in_features}, out={self.out_features}, weights={w}, activations={a}"
