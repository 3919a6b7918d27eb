"""QuaRot's rotation step (Ashkboos et al. 2024): outliers spread by orthogonal transforms."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from qbench.quant.steps.base import Transform, register_transform

if TYPE_CHECKING:
    from qbench.quant.context import StepContext


@register_transform("rotation")
class Rotation(Transform):
    """QuaRot's rotations (random Hadamard on the residual stream, online Hadamard before the
    writers); with a quantized KV cache, queries and keys too (qbench.quant.methods.rotation).
    Lossless in float. The random signs come from the context's generator (the cell's seed)."""

    transform: Literal["rotation"] = "rotation"

    def versions(self) -> dict[str, str]:
        from importlib.metadata import version

        return {"compressed-tensors": version("compressed-tensors")}  # its Hadamard table

    def apply(self, context: StepContext) -> None:
        from qbench.quant.methods.rotation import rotate

        rotate(context.model, context.quantizer.kv is not None, context.generator, context.note)
