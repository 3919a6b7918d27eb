"""Experts held as 3-D tensors: per-expert input steps (rotate, observe, fake-quantize).

transformers' experts modules (`@use_experts_implementation`: Qwen3-MoE, Mixtral, DeepSeek-V3,
GPT-OSS, ...) keep every expert's gate/up and down projections in 3-D parameters and multiply
each expert's tokens by one slice: `F.linear(x, W[e])`, or `x @ W[e]` when transposed; Llama 4's
experts multiply all experts at once, `torch.bmm(x, W)` with x [experts, tokens, in] (every
token reaches every expert, scaled by its router score: zero where not routed). qbench rounds
the weights slice by slice in place, and reaches the activations by running the module's own
eager forward (the loop over experts, `type(module).forward.__wrapped__`, or the forward
itself where it is not wrapped) under a torch function mode that, for every product with a
slice W[e] of a parameter that has input steps, first applies them to x (for a batched product
with the whole W, to each x[e]): the rows of x are exactly the tokens expert e receives. So
per-token fake quantization of expert inputs is per token of the tokens each expert receives,
GPTQ sees each expert's own Hessian, and rotation's online Hadamard reaches each expert's
down_proj input. A forward that multiplies a parameter with steps in another way (einsum, a
fused kernel) never reaches them: QBenchError, rather than a label its numbers do not have.

Steps run in a fixed order (STEP_ORDER): "rotate" (online Hadamard), "observe" (calibration
statistics), "quantize" (fake quantization).
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from qbench.errors import QBenchError

Step = Callable[[torch.Tensor, int], torch.Tensor]  # (x [tokens, in], expert) -> x'
STEP_ORDER = ("rotate", "observe", "quantize")
_PRODUCTS = {"linear", "matmul", "__matmul__", "bmm"}
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
    # under an accelerate hook (a dispatched model) the hook's wrapper calls `_old_forward`
    slot = "_old_forward" if "_hf_hook" in module.__dict__ else "forward"
    if any(steps.values()):
        module.__dict__[slot] = functools.partial(_forward_with_steps, module)
        return
    module.__dict__.pop(STEPS_ATTRIBUTE, None)
    if slot == "forward":
        module.__dict__.pop("forward", None)
    else:
        module.__dict__[slot] = types.MethodType(type(module).forward, module)


def _forward_with_steps(module: nn.Module, *args: object, **kwargs: object) -> torch.Tensor:
    forward = type(module).forward
    eager = getattr(forward, "__wrapped__", forward)  # the class's own loop over experts
    with _ExpertProducts(module) as products:
        out = eager(module, *args, **kwargs)
    reached = {id(p) for p in products.reached}
    if missed := {id(p) for p, _ in products.parameters} - reached:
        names = [n for n, p in module.named_parameters(recurse=False) if id(p) in missed]
        raise QBenchError(
            f"{type(module).__name__} multiplies {', '.join(names)} in a way qbench cannot "
            "follow (not F.linear, matmul or bmm with a slice or the whole parameter): its "
            "input steps (quantization, calibration, rotation) would not run"
        )
    return out


class _ExpertProducts(TorchFunctionMode):
    """Applies a module's input steps to x in F.linear(x, W[e]) and x @ W[e]."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        steps = input_steps(module)
        self.parameters = [(getattr(module, p), s) for p, s in steps.items() if s]
        self.reached: list[nn.Parameter] = []  # the parameters whose products got their steps

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in _PRODUCTS and len(args) >= 2:
            found = self._slice_of(args[1])
            if found is not None:
                parameter, steps, expert = found
                x = args[0]  # [tokens, in]; the whole W: [experts, tokens, in]
                if expert is None:
                    x = torch.stack([_run(steps, x[e], e) for e in range(x.shape[0])])
                else:
                    x = _run(steps, x, expert)
                args = (x, *args[1:])
                self.reached.append(parameter)
        return func(*args, **kwargs)

    def _slice_of(self, weight: object) -> tuple[nn.Parameter, dict[str, Step], int | None] | None:
        """(parameter, its steps, expert) when `weight` is a slice W[e] of a parameter with
        steps; expert None when it is the whole parameter."""
        if not isinstance(weight, torch.Tensor):
            return None
        pointer = weight.untyped_storage().data_ptr()
        for parameter, steps in self.parameters:
            if parameter.untyped_storage().data_ptr() == pointer:
                if weight.dim() == parameter.dim():
                    return parameter, steps, None
                offset = weight.storage_offset() - parameter.storage_offset()
                return parameter, steps, offset // parameter.stride(0)
        return None


def _run(steps: dict[str, Step], x: torch.Tensor, expert: int) -> torch.Tensor:
    """x [tokens, in] after the steps, in STEP_ORDER."""
    for kind in STEP_ORDER:
        if kind in steps:
            x = steps[kind](x, expert)
    return x
