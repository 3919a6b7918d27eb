"""Every step a quantizer can be made of, registered as its module is imported (see base)."""

from qbench.quant.steps import (  # noqa: F401  (each registers its steps)
    awq,
    bitsandbytes,
    gptq,
    quanto,
    rotation,
    rtn,
    smoothquant,
)
from qbench.quant.steps.base import (
    ROUNDINGS,
    SHORTHANDS,
    TRANSFORMS,
    Rounding,
    Transform,
    register_rounding,
    register_transform,
)

__all__ = [
    "ROUNDINGS",
    "SHORTHANDS",
    "TRANSFORMS",
    "Rounding",
    "Transform",
    "register_rounding",
    "register_transform",
]
