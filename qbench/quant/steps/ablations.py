"""The outlier papers' interventions, as float steps that are ablations, not quantizers.

Each answers, on a loaded checkpoint, whether an outlier acts as a rescaling factor or as a
contributor. They change the float model (none is lossless), so a cell made of them is labelled
"fp (ablation)" and reported in its own block of the leaderboard, never as a quantizer:

    - {name: zero-sw, method: zero_super_weights}                      # Yu et al.: "Prune SW"
    - {name: zero-sw-sa, method: zero_super_weights, restore_activation: true}  # "SW + SA"
    - {name: zero-control, method: zero_large_weights}                 # the control
    - {name: clip-1000, method: clip_massive_activations, threshold: 1000}  # Sun et al.
    - {name: no-sink, method: remove_attention_sink}
    - name: clip-1000-w4a4                       # an ablation, then a quantizer
      transforms: [{transform: clip_massive_activations, threshold: 1000}]
      rounding: rtn
      weights: {bits: 4}
      activations: {bits: 4}

`method: <ablation>` is the ablation alone (then `rounding: none`, which rounds nothing);
with `transforms:` it comes first and a quantizer's steps follow (a W4A4 of the clipped model).
The arithmetic: qbench.quant.methods.ablations. This module imports no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from qbench.quant.steps.base import Rounding, Transform, register_rounding, register_transform
from qbench.quant.steps.sinks import SuperWeightSearch

if TYPE_CHECKING:
    from qbench.quant.context import StepContext
    from qbench.quant.quantizer import QuantizerConfig
    from qbench.quant.walk.inventory import Inventory


class Ablation(Transform):
    """A transform that changes the float model on purpose (an intervention, not a quantizer
    step)."""

    ablation: ClassVar[bool] = True

    def is_lossless(self) -> bool:
        return False

    def acts_on_residual(self) -> bool:
        """Whether it acts on the residual stream's channels as the model computes them (which
        a rotation would mix)."""
        return False

    def problem_with(self, quantizer: QuantizerConfig) -> str | None:
        if self.acts_on_residual() and "rotation" in [t.transform for t in quantizer.transforms]:
            return (
                f"transforms: {self.transform} acts on the residual stream's channels, which a "
                "rotation mixes: drop the rotation, or the ablation"
            )
        return None


@register_transform("zero_super_weights", rounding="none")
class ZeroSuperWeights(Ablation, SuperWeightSearch):
    """Zero the super weights (Yu et al. 2024, "Prune SW"), found by `SuperWeightSearch`.

    restore_activation: keep the super activation they cause ("SW + SA"): at each one's MLP
    output projection, the output channel r at the position where its float output |y_r| peaks
    in each sequence gets back the value the super weight gave it (y_r + w x_c there).
    """

    transform: Literal["zero_super_weights"] = "zero_super_weights"
    restore_activation: bool = False

    def acts_on_residual(self) -> bool:
        return self.restore_activation

    def problem_with(self, quantizer: QuantizerConfig) -> str | None:
        if self.restore_activation and not quantizer.rounding.float_only:
            return (
                "zero_super_weights with restore_activation recomputes the super activation from "
                "the float output projection: use it alone (rounding: none)"
            )
        return super().problem_with(quantizer)

    def label(self) -> str:
        sa = " + restore the super activation (SW + SA)" if self.restore_activation else ""
        return f"zero super weights ({self.search_label()}){sa}"

    def apply(self, context: StepContext) -> None:
        from qbench.quant.methods.ablations import zero_super_weights

        zero_super_weights(context, self, self.restore_activation)


@register_transform("zero_large_weights", rounding="none")
class ZeroLargeWeights(Ablation, SuperWeightSearch):
    """The control of zero_super_weights: as many weights as there are super weights (found as
    it finds them), each the largest |w| of a super weight's matrix other than the super
    weights and the weights already chosen."""

    transform: Literal["zero_large_weights"] = "zero_large_weights"

    def label(self) -> str:
        return f"zero as many other largest weights as super weights ({self.search_label()})"

    def apply(self, context: StepContext) -> None:
        from qbench.quant.methods.ablations import zero_large_weights

        zero_large_weights(context, self)


@register_transform("clip_massive_activations", rounding="none")
class ClipMassiveActivations(Ablation):
    """Clip the residual stream at ±threshold after every decoder block (Sun et al. 2024,
    "Massive Activations": only the massive channels reach such a threshold)."""

    transform: Literal["clip_massive_activations"] = "clip_massive_activations"
    threshold: float = Field(gt=0)

    def acts_on_residual(self) -> bool:
        return True

    def label(self) -> str:
        return f"clip the residual stream at ±{self.threshold:g} after every block"

    def apply(self, context: StepContext) -> None:
        from qbench.quant.methods.ablations import clip_residual

        clip_residual(context, self.threshold)


@register_transform("remove_attention_sink", rounding="none")
class RemoveAttentionSink(Ablation):
    """Remove the attention sink: every query after the first attends without the first key
    (its weight 0, the others renormalised: softmax over the remaining keys), in every layer and
    head. Needs attention that runs through transformers' AttentionInterface."""

    transform: Literal["remove_attention_sink"] = "remove_attention_sink"

    def label(self) -> str:
        return "remove the attention sink: key 0 masked for queries 1.. (renormalised)"

    def refusal(self, found: Inventory, quantizer: QuantizerConfig) -> str | None:
        modules = found.blocks[0].modules() if len(found.blocks) else ()
        own = [m for m in modules if type(m).__module__.startswith("qbench.")]
        if own:
            return (
                "remove_attention_sink masks the first key in transformers' attention functions; "
                f"{type(own[0]).__name__} computes attention itself"
            )
        return None

    def apply(self, context: StepContext) -> None:
        from qbench.quant.methods.ablations import remove_attention_sink

        remove_attention_sink(context)


@register_rounding("none")
class NoRounding(Rounding):
    """Rounds nothing: the rounding of a quantizer made of ablations alone ("fp (ablation)")."""

    method: Literal["none"] = "none"
    float_only: ClassVar[bool] = True

    def round(self, context: StepContext) -> None:
        return None

    def formats_label(self, quantizer: QuantizerConfig) -> str:
        return "no rounding"

    def problem_with(self, quantizer: QuantizerConfig) -> str | None:
        if not any(t.ablation for t in quantizer.transforms):
            return "rounding: none rounds nothing: it takes ablation transforms (or round them)"
        given = [f for f in ("weights", "activations", "kv", "keep_float") if getattr(quantizer, f)]
        given += [f for f in ("lm_head", "embeddings", "routers") if getattr(quantizer, f)]
        if given:
            return f"rounding: none rounds nothing: remove {', '.join(given)}"
        return None
