"""bitsandbytes' modules in place of the target linears (what each scheme does: the step's
docstring, qbench.quant.steps.bitsandbytes)."""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

import torch
from torch import nn

from qbench.quant.backends.library import library_linears
from qbench.quant.walk.inventory import replace_module

if TYPE_CHECKING:
    from qbench.quant.quantizer import QuantizerConfig
    from qbench.quant.steps.bitsandbytes import BitsAndBytes


def _drop_messages(logger: str, prefix: str) -> None:
    logging.getLogger(logger).addFilter(lambda record: not record.getMessage().startswith(prefix))


# bitsandbytes logs the fp16 cast of LLM.int8 at every call (documented above), and, on
# AVX512-BF16 CPUs, that an optional package for its fused 4-bit kernel is missing.
_drop_messages("bitsandbytes.autograd._functions", "MatMul8bitLt: inputs will be cast")
_drop_messages("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward")


@functools.cache
def per_sequence_linear8bitlt() -> type[nn.Module]:
    """bitsandbytes' Linear8bitLt, called on one sequence of a [..., tokens, features] input
    at a time, so that LLM.int8's outlier columns are chosen per sequence."""
    import bitsandbytes as bnb

    class PerSequenceLinear8bitLt(bnb.nn.Linear8bitLt):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.dim() < 3:
                return super().forward(x)
            sequences = [super(PerSequenceLinear8bitLt, self).forward(s) for s in x.flatten(0, -3)]
            return torch.stack(sequences).reshape(*x.shape[:-1], -1)

    return PerSequenceLinear8bitLt


def replace_linears(model: nn.Module, step: BitsAndBytes, quantizer: QuantizerConfig) -> None:
    """Every target linear becomes a bitsandbytes Linear8bitLt (int8) or Linear4bit."""
    label = step.formats_label(quantizer).split(" / ")
    for name, linear in library_linears(model, step, quantizer).items():
        module = (
            int8_linear(linear, step) if step.scheme == "int8" else four_bit_linear(linear, step)
        )
        # The weight is quantized when it moves from the CPU to its device.
        module = module.to(linear.weight.device).train(linear.training)
        module.qbench_rounding = (label[0], label[1] if step.scheme == "int8" else None)
        replace_module(model, name, module)


def int8_linear(linear: nn.Linear, step: BitsAndBytes) -> nn.Module:
    import bitsandbytes as bnb

    kind = per_sequence_linear8bitlt() if step.threshold > 0 else bnb.nn.Linear8bitLt
    module = kind(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        has_fp16_weights=False,
        threshold=step.threshold,
        device="meta",
    )
    module.weight = bnb.nn.Int8Params(
        linear.weight.detach().cpu(), requires_grad=False, has_fp16_weights=False
    )
    module.bias = linear.bias
    return module


def four_bit_linear(linear: nn.Linear, step: BitsAndBytes) -> nn.Module:
    import bitsandbytes as bnb

    compute = getattr(torch, step.compute_dtype) if step.compute_dtype else linear.weight.dtype
    module = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute,
        compress_statistics=step.double_quant,
        quant_type=step.scheme,
        device="meta",
    )
    module.weight = bnb.nn.Params4bit(
        linear.weight.detach().cpu(),
        requires_grad=False,
        blocksize=step.blocksize,
        compress_statistics=step.double_quant,
        quant_type=step.scheme,
        module=module,
    )
    module.bias = linear.bias
    module.support_avx512bf16_for_cpu &= compute == torch.bfloat16
    return module
