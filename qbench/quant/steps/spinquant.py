"""SpinQuant's step: rotations learned on the quantized network's loss (Liu et al. 2024)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from qbench.config import StrictModel
from qbench.data.calibration import CalibrationSpec
from qbench.quant.formats.spec import ActivationQuant, KVQuant, WeightQuant
from qbench.quant.steps.base import Transform, register_transform

if TYPE_CHECKING:
    from qbench.quant.context import StepContext
    from qbench.quant.quantizer import QuantizerConfig
    from qbench.quant.walk.inventory import Inventory

# SpinQuant's scripts/10_optimize_rotation.sh: `--max_steps 100` with a batch of 1 on each of 8
# GPUs (torchrun --nproc_per_node=8), i.e. 100 iterations of 8 windows = 800 windows of 2048
# tokens of WikiText-2 (`--model_max_length 2048`), `--learning_rate 1.5`, cosine schedule.
PAPER_ITERATIONS = 100
PAPER_WINDOWS_PER_ITERATION = 8
PAPER_CALIBRATION = {"sequences": 800, "seq_len": 2048, "batch_size": 8}


class LossFormats(StrictModel):
    """What the training loss rounds (straight-through): the quantizer's formats, or others.

    SpinQuant's README: rotations for a GPTQ quantizer are trained with the weights in float
    (W16A4KV4 before GPTQ's W4A4KV4), so GPTQ's error feedback is not trained against.
    """

    weights: WeightQuant | None = None
    activations: ActivationQuant | None = None
    kv: KVQuant | None = None


@register_transform("spinquant")
class SpinQuant(Transform):
    """SpinQuant's learned rotations (qbench.quant.methods.spinquant): R1 on the residual stream
    and one R2 per attention head on the value / o_proj path, both started from the random
    Hadamard matrices QuaRot uses, trained with Cayley SGD on the Stiefel manifold against
    the cross-entropy of the quantized network on calibration text, then folded into the
    weights as the rotation step folds its own; QuaRot's online Hadamards stay (R4 before
    every writer of the stream, R3 on queries and keys with a quantized KV cache). Lossless
    in float.

    Defaults are the paper's code (facebookresearch/SpinQuant, optimize_rotation.py and
    scripts/10_optimize_rotation.sh): `iterations` 100 of `windows_per_iteration` 8 windows
    (8 GPUs x batch 1), `learning_rate` 1.5 with a cosine decay to 0, `calibration` 800
    windows of 2048 tokens (WikiText-2; the paper reads its train split, qbench's wikitext2
    has valid and test: valid by default, as GPTQ's here). Given `calibration:` fields
    replace these one by one (`{sequences: 64}` keeps seq_len 2048); its `batch_size` is the
    windows per forward pass (gradients accumulate to `windows_per_iteration`). That is GPU
    work: on this CPU a recipe sets fewer iterations and shorter windows, and says so.

    loss: the formats the loss rounds; default the quantizer's activations and KV cache, and
    its weights unless the rounding is gptq (SpinQuant's README). A breakdown's parts keep the
    whole quantizer's (they reuse its learned rotations). The learned matrices are kept
    beside the cell's records (qbench.quant.artifacts) and reused by a rerun.
    """

    transform: Literal["spinquant"] = "spinquant"
    iterations: int = Field(default=PAPER_ITERATIONS, ge=0)
    windows_per_iteration: int = Field(default=PAPER_WINDOWS_PER_ITERATION, ge=1)
    learning_rate: float = Field(default=1.5, gt=0)
    calibration: CalibrationSpec = Field(
        default_factory=lambda: CalibrationSpec(**PAPER_CALIBRATION)
    )
    loss: LossFormats | None = None

    @field_validator("calibration", mode="before")
    @classmethod
    def _paper_calibration(cls, value: Any) -> Any:
        """Fields a recipe leaves out keep the paper's values, not CalibrationSpec's."""
        return {**PAPER_CALIBRATION, **value} if isinstance(value, dict) else value

    def problem_with(self, quantizer: QuantizerConfig) -> str | None:
        if quantizer.rounding.library:
            return "spinquant trains against qbench's own rounding: use rtn or gptq"
        formats = self.loss_formats(quantizer)
        if formats.activations is None and formats.kv is None and formats.weights is None:
            return "spinquant trains against rounded activations, weights or KV: set one"
        return None

    def calibration_text(self) -> CalibrationSpec | None:
        """None with `iterations: 0` (nothing trains, no text is read)."""
        return self.calibration if self.iterations else None

    def loss_formats(self, quantizer: QuantizerConfig) -> LossFormats:
        """What the loss rounds for this quantizer (`loss`, else its defaults)."""
        if self.loss is not None:
            return self.loss
        gptq = quantizer.rounding.method == "gptq"
        weights = None if gptq else quantizer.weights
        return LossFormats(weights=weights, activations=quantizer.activations, kv=quantizer.kv)

    def breakdown_part(self, whole: QuantizerConfig, part: str) -> SpinQuant:
        """In a part of `whole`'s breakdown: the same training, so the same learned matrices."""
        return self.model_copy(update={"loss": self.loss_formats(whole)})

    def refusal(self, found: Inventory, quantizer: QuantizerConfig) -> str | None:
        from qbench.quant.methods.spinquant import refusal

        return refusal(found)

    def versions(self) -> dict[str, str]:
        from importlib.metadata import version

        return {"compressed-tensors": version("compressed-tensors")}  # its Hadamard table

    def apply(self, context: StepContext) -> None:
        from qbench.quant.methods.spinquant import spinquant

        spinquant(context, self)
