"""The bitsandbytes step: LLM.int8 (Linear8bitLt) and 4-bit NF4 / FP4 (Linear4bit) linear layers.

- int8 (LLM.int8, Dettmers et al. 2022): weights int8 per output row (absmax); at every call
  the input is cast to fp16 and quantized to int8 per token (absmax), the int8 x int8 product
  accumulates in int32. Input columns holding any |x| > `threshold` bypass the int8 product:
  they are multiplied in fp16 with the (dequantized) int8 weight columns. Labelled W8A8: the
  main product is int8 x int8; threshold 0 turns the fp16 decomposition off. bitsandbytes
  picks the outlier columns over every token of a call, so qbench calls each int8 layer on
  one sequence at a time (`per_sequence_linear8bitlt`): a sequence's result never depends on
  the others of its batch, and the cell's tasks run one request per call (no padding enters
  the choice).
- nf4 / fp4 (QLoRA): weights in 4-bit NormalFloat / FP4 codes, one absmax scale per
  `blocksize` consecutive elements of the flattened weight (blocks may span rows, so any
  layer width works); `double_quant` quantizes those scales again (8-bit, blocks of 256).
  The matmul runs in `compute_dtype` on the dequantized weight: W4A16.

On CPUs with AVX512-BF16, bitsandbytes would run 4-bit layers through a fused kernel that
casts inputs and scales to bf16 whatever the compute dtype; qbench allows that kernel only
for compute_dtype bfloat16, so float32 compute means float32 everywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, model_validator

from qbench.quant.steps.base import register_rounding
from qbench.quant.steps.library import LibraryRounding

if TYPE_CHECKING:
    from qbench.quant.context import StepContext
    from qbench.quant.quantizer import QuantizerConfig

FOUR_BIT_FIELDS = ("blocksize", "double_quant", "compute_dtype")


@register_rounding("bitsandbytes")
class BitsAndBytes(LibraryRounding):
    """Every target linear becomes a bitsandbytes Linear8bitLt (int8) or Linear4bit."""

    PACKAGE: ClassVar[str] = "bitsandbytes"
    OWN_FIELDS: ClassVar[str] = "scheme: int8 | nf4 | fp4"

    method: Literal["bitsandbytes"] = "bitsandbytes"
    scheme: Literal["int8", "nf4", "fp4"]
    threshold: float = Field(default=6.0, ge=0)  # int8: LLM.int8's outlier threshold
    blocksize: Literal[32, 64, 128, 256, 512, 1024, 2048, 4096] = 64
    double_quant: bool = False
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = None  # None: the model's

    @model_validator(mode="after")
    def _fields_of_scheme(self) -> BitsAndBytes:
        given = self.model_fields_set
        if self.scheme == "int8" and (four_bit := [f for f in FOUR_BIT_FIELDS if f in given]):
            raise ValueError(f"{', '.join(four_bit)} applies to scheme nf4 / fp4, not int8: remove")
        if self.scheme != "int8" and "threshold" in given:
            raise ValueError(f"threshold is LLM.int8's (scheme int8), not {self.scheme}'s: remove")
        return self

    def linear_bits(self, quantizer: QuantizerConfig) -> tuple[int, int]:
        return (8, 8) if self.scheme == "int8" else (4, 16)

    def formats_label(self, quantizer: QuantizerConfig) -> str:
        if self.scheme == "int8":
            outliers = f" + fp16 cols over {self.threshold:g}" if self.threshold else ""
            return f"int8 channel / int8 token{outliers}"
        extras = " double-quant" if self.double_quant else ""
        compute = f" ({self.compute_dtype})" if self.compute_dtype else ""
        return f"{self.scheme} b{self.blocksize}{extras} / fp{compute}"

    def tokens_share_scales(self) -> str | None:
        if self.scheme == "int8" and self.threshold > 0:
            return "LLM.int8 picks its fp16 outlier columns over all tokens of a sequence"
        return None

    def round(self, context: StepContext) -> None:
        from qbench.quant.backends.bitsandbytes import replace_linears

        replace_linears(context.model, self, context.quantizer)
