"""Super weights (Yu et al. 2024, "The Super Weight in Large Language Models"): found from the
MLP output projections' activation spikes, kept in float by a quantizer or zeroed by an
ablation (qbench.quant.methods.ablations).

The search (`SuperWeightSearch`, qbench.quant.steps.sinks, has the rule): every MLP output
projection (the MLP targets that write the residual stream, as the traced structure finds them:
down_proj, fc2, dense_4h_to_h, a shared expert's down_proj) is watched over the calibration
windows: per input channel c the largest |x_c|, per output channel r the largest |y_r|. Its
candidate is W[r*, c*] at the largest of each, with ratio max|y_r*| / median_r max|y_r|; the
largest max|x_c*| x max|y_r*| among candidates of ratio >= min_ratio is a super weight, zeroed
for the next round (Yu et al. remove each one found and look again), up to max_count. The model
is unchanged afterwards. Diagnostics rank the same candidates (qbench.eval.diagnostics).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from qbench.quant.steps.sinks import SuperWeightSearch
from qbench.quant.walk.blockwise import forward_batches
from qbench.quant.walk.onload import onloaded
from qbench.quant.walk.structure import probe_ids, trace_structure

if TYPE_CHECKING:
    from qbench.quant.context import StepContext


@dataclass(frozen=True)
class SuperWeight:
    """W[row, column] of the linear at `module`; `input` max|x_column| and `output` max|y_row|
    over the windows when it was found, `ratio` the output spike over the median output
    channel's, `position` where |x_column| peaks within a window."""

    module: str
    row: int
    column: int
    value: float
    input: float
    output: float
    ratio: float
    position: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def where(self) -> str:
        return f"{self.module}[{self.row}, {self.column}]"


def find_super_weights(
    context: StepContext, search: SuperWeightSearch, step: str
) -> list[SuperWeight]:
    """The super weights of `context.model` as the transforms before left it (shared by the
    cells of a checkpoint alike), found on `search.calibration`'s windows; `step` names the
    step in errors."""
    ids = context.calibration_ids(search.calibration, step)
    fields = search.model_dump(mode="json", include=set(SuperWeightSearch.model_fields))
    return context.statistic(
        ("super_weights", json.dumps(fields, sort_keys=True)),
        lambda: search_super_weights(context.model, ids, search),
    )


def mlp_writers(model: nn.Module) -> dict[str, nn.Linear]:
    """{name: linear} of every MLP output projection (an MLP linear target writing the
    residual stream, before a post-norm or not), in block order."""
    structure = trace_structure(model, probe_ids(model))
    return {
        t.name: t.module
        for block in structure.blocks
        for t in [*block.writers, *block.post_normed]
        if t.kind == "mlp" and isinstance(t.module, nn.Linear)
    }


@torch.no_grad()
def search_super_weights(
    model: nn.Module, ids: torch.Tensor, search: SuperWeightSearch
) -> list[SuperWeight]:
    """The search of the module docstring on token windows `ids` [n, seq_len]."""
    writers = mlp_writers(model)
    found: list[SuperWeight] = []
    try:
        while len(found) < search.max_count:
            taken = {(f.module, f.row, f.column) for f in found}
            candidates = [
                s
                for s in spikes(model, writers, ids, search.calibration.batch_size)
                if s.ratio >= search.min_ratio and (s.module, s.row, s.column) not in taken
            ]
            if not candidates:
                break
            best = max(candidates, key=lambda s: s.input * s.output)
            found.append(best)
            set_entry(model, best.module, best.row, best.column, 0.0)
    finally:
        for weight in found:
            set_entry(model, weight.module, weight.row, weight.column, weight.value)
    return found


def _entry(model: nn.Module, name: str, row: int, column: int) -> float:
    """W[row, column] of the linear at `name` (onloaded where the model offloads it)."""
    with onloaded(model, name):
        return float(model.get_submodule(name).weight[row, column])


@torch.no_grad()
def set_entry(model: nn.Module, name: str, row: int, column: int, value: float) -> None:
    """W[row, column] <- value in the linear at `name` (written to the offload store where
    the model offloads it; the original offloaded weights are never written)."""
    with onloaded(model, name):
        model.get_submodule(name).weight[row, column] = value


@torch.no_grad()
def spikes(
    model: nn.Module, writers: dict[str, nn.Linear], ids: torch.Tensor, batch_size: int
) -> list[SuperWeight]:
    """Each writer's candidate on windows `ids` (one forward pass, hooks on the writers)."""
    peaks: dict[str, dict[str, torch.Tensor]] = {}

    def watch(name: str):
        def hook(_: nn.Module, args: tuple, y: torch.Tensor) -> None:
            x = args[0].detach().abs().flatten(0, -3).amax(0).float()  # [t, in]
            y = y.detach().abs().flatten(0, -2).amax(0).float()  # [out]
            at, position = x.amax(0), x.argmax(0)  # [in]
            seen = peaks.setdefault(name, {"x": at, "position": position, "y": y})
            higher = at > seen["x"]
            seen["position"] = torch.where(higher, position, seen["position"])
            seen["x"], seen["y"] = torch.maximum(seen["x"], at), torch.maximum(seen["y"], y)

        return hook

    handles = [m.register_forward_hook(watch(name)) for name, m in writers.items()]
    try:
        forward_batches(model, ids, batch_size)
    finally:
        for handle in handles:
            handle.remove()
    found = []
    for name, seen in peaks.items():
        column, row = int(seen["x"].argmax()), int(seen["y"].argmax())
        median = float(seen["y"].median())
        output = float(seen["y"][row])
        found.append(
            SuperWeight(
                name,
                row,
                column,
                _entry(model, name, row, column),
                float(seen["x"][column]),
                output,
                output / median if median > 0 else float("inf"),
                int(seen["position"][column]),
            )
        )
    return found


def keep_super_weights(context: StepContext, search: SuperWeightSearch) -> None:
    """Mark the super weights of the model the rounding receives to be kept in float
    (`context.float_weights`), with the facts of the record (`super_weights`) and a note."""
    found = find_super_weights(context, search, "keep_float.super_weights")
    for weight in found:
        context.float_weights.setdefault(weight.module, []).append((weight.row, weight.column))
    context.facts["super_weights"] = [w.as_dict() for w in found]
    where = ", ".join(w.where() for w in found) or "none found"
    context.note(f"keep_float.super_weights: {len(found)} kept in float ({where})")
