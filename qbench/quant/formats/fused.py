"""The fast path of QuantLinear: activation fake-quant and the matmul, compiled as one graph.

The reference runs `F.linear(fake_quant(x, spec), weight, bias)` eagerly: each op of the
format (amax, divide, round, clamp, multiply, the FP8 casts, ...) is a kernel of its own that
reads and writes the whole activation. Here `torch.compile` (inductor) compiles that same
Python code - spec.py, integer.py and fp.py, not a second implementation - into one graph:
the quantization becomes one or two fused loops (Triton kernels on CUDA, C++/OpenMP on CPU)
that feed the matmul with the stored, already dequantized weight (the same cuBLAS / CPU BLAS
call as eager; inductor's default mode does not fuse into the GEMM itself).

Selected by `QBENCH_FAST_QUANT`: `auto` (default): on CUDA tensors; `1`: on every device
(CPU included: tests, benchmarks); `0`: never.

Numerics: on CPU the fast path is bit-identical to the reference (inductor keeps the same
IEEE divisions, rounding and casts; fake-quant reduces with max/min only, so no float sum is
reordered); the tests assert it. On CUDA inductor turns a division by a constant (e.g.
max|x| / qmax) into a multiplication by its reciprocal, so a scale may differ from the CPU
reference by one ulp and an element at a rounding tie may land on the neighbouring grid
point: within one quantization step.

Shapes: the token dimension is dynamic, so a perplexity or lm-eval loop compiles once per
(activation spec, weight shape, dtype), not once per batch shape; a single token (decoding)
compiles once more. A per-sequence scale (activations' granularity tensor) keeps the
sequence dimension, also dynamic (a batch of one sequence compiles once more). Compile time:
about 10 s for the first graph of a process on a 2-core CPU (inductor's start-up), 1-3 s for
each further one; inductor caches compiled graphs on disk across processes.

Speed on a CPU (bench/quant_bench.py): a compiled call costs about 70 us of guards and
wrappers; the fused kernel beats eager fake-quant for INT and FP8 and about ties for the E2M1
formats (FP4, MXFP4, NVFP4), whose per-element rounding steps (exp2) cost the same compiled
or not. Eager fake-quant on a GPU is a chain of small memory-bound kernels, which is what
fusion removes.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
from torch.nn import functional as F

from qbench.errors import QBenchError
from qbench.quant.formats.fake import fake_quant
from qbench.quant.formats.spec import ActivationQuant

MODE_VARIABLE = "QBENCH_FAST_QUANT"
MODES = ("auto", "1", "0")
RECOMPILE_LIMIT = 64  # graphs per activation spec: one per weight shape, x2 for decoding


def fast_quant_mode() -> str:
    """The value of QBENCH_FAST_QUANT: 'auto' (also when unset), '1' or '0'."""
    mode = os.environ.get(MODE_VARIABLE, "").strip().lower() or "auto"
    if mode not in MODES:
        raise QBenchError(
            f"{MODE_VARIABLE}={mode!r}: use auto (fast path on CUDA, the default), "
            "1 (fast path on every device) or 0 (the eager reference everywhere)"
        )
    return mode


def use_fast_path(x: torch.Tensor) -> bool:
    """Whether QuantLinear computes on `x` through the compiled fast path."""
    mode = fast_quant_mode()
    return mode == "1" or (mode == "auto" and x.is_cuda)


def _quantized_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: ActivationQuant
) -> torch.Tensor:
    return F.linear(fake_quant(x, spec), weight, bias)


@functools.cache
def _compiled(spec: ActivationQuant) -> Callable[..., torch.Tensor]:
    """One compiled function per activation spec, with its own recompile budget.

    dynamic=False specializes every size but the one marked dynamic (the token count). Past
    the budget (or dynamo's cap of 256 graphs for all specs together, which a long sweep
    over many models could reach) new shapes run eagerly, as the reference does, with
    dynamo's warning: slower, rather than a failed sweep.
    """
    return torch.compile(
        functools.partial(_quantized_linear, spec=spec),
        dynamic=False,
        recompile_limit=RECOMPILE_LIMIT,
        isolate_recompiles=True,
    )


def quantized_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: ActivationQuant
) -> torch.Tensor:
    """`F.linear(fake_quant(x, spec), weight, bias)`, compiled; x is [..., in_features].

    The compiled graph sees [tokens, in_features] rows, or [sequences, tokens, in_features]
    where a scale spans a sequence (granularity tensor), with those sizes dynamic.
    """
    per_sequence = spec.granularity == "tensor" and x.dim() > 2
    inputs = x.reshape(-1, *x.shape[-2:]) if per_sequence else x.reshape(-1, x.shape[-1])
    for dim in range(inputs.dim() - 1):
        torch._dynamo.maybe_mark_dynamic(inputs, dim)
    return _compiled(spec)(inputs, weight, bias).reshape(*x.shape[:-1], weight.shape[0])
