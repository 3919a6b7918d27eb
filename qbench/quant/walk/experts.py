"""Experts held as 3-D tensors: per-expert input steps (rotate, observe, fake-quantize).

transformers' experts modules (`@use_experts_implementation`: Qwen3-MoE, Mixtral, DeepSeek-V3,
GPT-OSS, ...) keep every expert's gate/up and down projections in 3-D parameters and multiply
each expert's tokens by one slice: `F.linear(x, W[e])`, or `x @ W[e]` when transposed. qbench
rounds the weights slice by slice in place, and reaches the activations by running the module's
own eager forward (the loop over experts, `type(module).forward.__wrapped__`) under a torch
function mode that, for every product with a slice W[e] of a parameter that has input steps,
first applies them to x: the rows of x are exactly the tokens routed to expert e. So per-token
fake quantization of expert inputs is per token of the tokens each expert receives, GPTQ sees
each expert's own Hessian, and rotation's online Hadamard reaches each expert's down_proj input.

Steps run in a fixed order (STEP_ORDER): "rotate" (online Hadamard), "observe" (calibration
statistics), "quantize" (fake quantization).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

Step = Callable[[torch.Tensor, int], torch.Tensor]  # (x [tokens, in], expert) -> x'
STEP_ORDER = ("rotate", "observe", "quantize")
_PRODUCTS = {"linear", "matmul", "__matmul__"}
STEPS_ATTRIBUTE = "qbench_input_steps"


def input_steps(module: nn.Module) -> dict[str, dict[str, Step]]:
    """{parameter: {step kind: step}} of an experts module (empty if none is set)."""
    return module.__dict__.get(STEPS_ATTRIBUTE, {})


def set_input_step(module: nn.Module, parameter: str, kind: str, step: Step | None) -> None:
    """Set (or with None remove) the `kind` step on the inputs multiplied by `parameter`'s
    slices; the module runs its eager per-expert forward while it has any step."""
    if kind not in STEP_ORDER:
        raise ValueError(f"step kind must be one of {STEP_ORDER}, not {kind!r}")
    steps = module.__dict__.setdefault(STEPS_ATTRIBUTE, {})
    if step is None:
        steps.get(parameter, {}).pop(kind, None)
    else:
        steps.setdefault(parameter, {})[kind] = step
    if any(steps.values()):
        module.forward = functools.partial(_forward_with_steps, module)
    else:
        module.__dict__.pop("forward", None)
        module.__dict__.pop(STEPS_ATTRIBUTE, None)


def _forward_with_steps(module: nn.Module, *args: object, **kwargs: object) -> torch.Tensor:
    eager = type(module).forward.__wrapped__  # the class's own loop over experts
    with _ExpertProducts(module):
        return eager(module, *args, **kwargs)


class _ExpertProducts(TorchFunctionMode):
    """Applies a module's input steps to x in F.linear(x, W[e]) and x @ W[e]."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        steps = input_steps(module)
        self.parameters = [(getattr(module, p), s) for p, s in steps.items() if s]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in _PRODUCTS and len(args) >= 2:
            found = self._slice_of(args[1])
            if found is not None:
                steps, expert = found
                x = args[0]
                for kind in STEP_ORDER:
                    if kind in steps:
                        x = steps[kind](x, expert)
                args = (x, *args[1:])
        return func(*args, **kwargs)

    def _slice_of(self, weight: object) -> tuple[dict[str, Step], int] | None:
        if not isinstance(weight, torch.Tensor):
            return None
        pointer = weight.untyped_storage().data_ptr()
        for parameter, steps in self.parameters:
            if parameter.untyped_storage().data_ptr() == pointer:
                offset = weight.storage_offset() - parameter.storage_offset()
                return steps, offset // parameter.stride(0)
        return None
