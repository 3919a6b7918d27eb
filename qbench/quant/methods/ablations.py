"""The outlier papers' interventions on a float model (their configs and the rules:
qbench.quant.steps.ablations). Each changes the model in place: weights written into the
loaded tensors, forward hooks, attention's KV step; qbench's restore
(qbench.quant.walk.restore) undoes all of it. What each did goes to the cell's facts
(`ablations`: one entry per ablation) and notes; what it does while the model is evaluated
(the elements clipped) to a meter (qbench.quant.walk.meters).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from qbench.errors import RefusedError
from qbench.quant.methods.superweights import (
    SuperWeight,
    find_super_weights,
    mlp_writers,
    set_entry,
    spikes,
)
from qbench.quant.walk.inventory import find_blocks, set_weight
from qbench.quant.walk.kvcache import KV_ATTENTION_PREFIX, kv_sites
from qbench.quant.walk.meters import add_meter
from qbench.quant.walk.onload import onloaded

if TYPE_CHECKING:
    from qbench.quant.context import StepContext
    from qbench.quant.steps.sinks import SuperWeightSearch


def _record(context: StepContext, transform: str, **facts: Any) -> None:
    context.facts.setdefault("ablations", []).append({"transform": transform, **facts})


def _super_weights(context: StepContext, search: SuperWeightSearch, step: str) -> list:
    """The super weights found, or a RefusedError saying how far the largest spike is from
    `min_ratio` (an ablation that zeroes nothing would be the fp model under another name)."""
    found = find_super_weights(context, search, step)
    if found:
        return found
    ids = context.calibration_ids(search.calibration, step)
    model = context.model
    candidates = spikes(model, mlp_writers(model), ids, search.calibration.batch_size)
    top = max(candidates, key=lambda s: s.ratio, default=None)
    largest = f"{top.ratio:.1f} at {top.where()}" if top else "no MLP output projection"
    raise RefusedError(
        f"{step}: no super weight: no MLP output spike reaches min_ratio {search.min_ratio:g} x "
        f"the median output channel's (largest {largest}); lower min_ratio to take it"
    )


@torch.no_grad()
def zero_super_weights(
    context: StepContext, search: SuperWeightSearch, restore_activation: bool
) -> None:
    """Zero the super weights in place; with `restore_activation`, give each one's output
    channel back, where its float output peaks in each sequence, the value it had ("SW + SA",
    Yu et al.: their hook restores the super activation at the down_proj output)."""
    found = _super_weights(context, search, "zero_super_weights")
    writers = {name: context.model.get_submodule(name) for name in {w.module for w in found}}
    for weight in found:
        set_entry(context.model, weight.module, weight.row, weight.column, 0.0)
    if restore_activation:
        for name, module in writers.items():
            module.register_forward_hook(_restorer([w for w in found if w.module == name]))
    _record(
        context,
        "zero_super_weights",
        zeroed=[w.as_dict() for w in found],
        restored_activation=restore_activation,
    )
    sa = "; super activations restored at each sequence's peak" if restore_activation else ""
    context.note(f"zero_super_weights: {', '.join(w.where() for w in found)} zeroed{sa}")


def _restorer(zeroed: list[SuperWeight]):
    """A down_proj forward hook: y [b, t, out] with each zeroed weight's output channel r set,
    at the position where |y_r + w x_c| peaks in each sequence, to y_r + w x_c there."""

    def hook(_: nn.Module, args: tuple, y: torch.Tensor) -> torch.Tensor:
        x, y = args[0], y.clone()
        batch = torch.arange(y.shape[0], device=y.device)
        for weight in zeroed:
            original = y[..., weight.row] + weight.value * x[..., weight.column]  # [b, t]
            peak = original.abs().argmax(dim=-1)  # [b]
            y[batch, peak, weight.row] = original[batch, peak].to(y.dtype)
        return y

    return hook


@torch.no_grad()
def zero_large_weights(context: StepContext, search: SuperWeightSearch) -> None:
    """The control: per super weight found, zero the largest |w| of its matrix that is neither
    a super weight nor already zeroed here."""
    found = _super_weights(context, search, "zero_large_weights")
    taken = {(w.module, w.row, w.column) for w in found}
    zeroed = []
    for weight in found:
        with onloaded(context.model, weight.module):  # where the model offloads it
            matrix = context.model.get_submodule(weight.module).weight
            magnitude = matrix.detach().abs().float()
            for module, row, column in taken:
                if module == weight.module:
                    magnitude[row, column] = -1
            row, column = divmod(int(magnitude.argmax()), matrix.shape[1])
            zeroed.append({"module": weight.module, "row": row, "column": column,
                           "value": float(matrix[row, column])})  # fmt: skip
            taken.add((weight.module, row, column))
            set_weight(matrix[row, column], torch.tensor(0.0))
    _record(
        context, "zero_large_weights", zeroed=zeroed, super_weights=[w.as_dict() for w in found]
    )
    where = ", ".join(f"{z['module']}[{z['row']}, {z['column']}]" for z in zeroed)
    context.note(f"zero_large_weights: {where} zeroed (the control of {len(found)} super weights)")


class ClipMeter:
    """Counts what the residual clip cut while the model runs: elements beyond ±threshold, of
    how many, and in which channels."""

    key = "clipped"

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.reset()

    def reset(self) -> None:
        self.clipped = self.total = 0
        self.channels: dict[int, int] = {}

    def clip(self, _: nn.Module, __: tuple, output: Any) -> Any:
        """A decoder block's forward hook: its output (the residual stream) clipped."""
        h = output[0] if isinstance(output, tuple) else output
        beyond = h.detach().abs() > self.threshold  # [b, t, d]
        self.clipped += int(beyond.sum())
        self.total += beyond.numel()
        for channel, count in enumerate(beyond.flatten(0, -2).sum(0).tolist()):
            if count:
                self.channels[channel] = self.channels.get(channel, 0) + count
        h = h.clamp(-self.threshold, self.threshold)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    def report(self) -> dict[str, Any]:
        top = sorted(self.channels.items(), key=lambda item: -item[1])[:8]
        return {
            "threshold": self.threshold,
            "elements": [self.clipped, self.total],
            "channels": {str(channel): count for channel, count in top},
        }


def clip_residual(context: StepContext, threshold: float) -> None:
    """Clip every decoder block's output at ±threshold (a forward hook per block)."""
    meter = ClipMeter(threshold)
    _, blocks = find_blocks(context.model)
    for block in blocks:
        block.register_forward_hook(meter.clip)
    add_meter(context.model, meter)
    _record(context, "clip_massive_activations", threshold=threshold, blocks=len(blocks))


def remove_attention_sink(context: StepContext) -> None:
    """Hide the first key from every later query, in every attention (its KV step's mask)."""
    model = context.model
    sites = kv_sites(model)
    routed = getattr(model.config, "_attn_implementation", None) or ""
    if not routed.startswith(KV_ATTENTION_PREFIX):
        raise RefusedError(
            f"remove_attention_sink: {model.config.model_type}'s attention does not run through "
            "transformers' AttentionInterface, whose mask it changes"
        )
    for site in sites:
        site.transform.drop_first_key = True
    _record(context, "remove_attention_sink", attention_modules=len(sites))
