"""GPTQ: round weights column by column, feeding each column's error back into the rest.

Per linear, with H = 2/n sum x x^T over its calibration inputs: dampen H (+ damp * mean
diag H), take the upper Cholesky factor U of H^-1, and for each column j (optionally in
order of decreasing diag H, "act-order") round w_j, then subtract (w_j - q_j) / U_jj * U_j,k
from the later columns k; updates are applied lazily per block of `block_size` columns.
Group scales: `static_groups: true` (default; AutoGPTQ's / GPTQModel's name) takes every
group's scale from the original weight before any column is rounded, so act-order keeps the
groups contiguous in the original columns; `static_groups: false` is GPTQ's reference code:
a group's scale is computed when the column loop reaches its first column, from the weights
updated so far (by every earlier lazy block, as the reference reads them), and with
act-order the groups are consecutive columns in the permuted order.

Layers are quantized in order: the Hessians of decoder layer i come from a forward pass
through the already quantized layers 0..i-1 (stopped after layer i), as GPTQ does. Layer 0's
come from the fp model alone, so (without rotation) the GPTQ cells of a checkpoint share them.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from transformers import PreTrainedTokenizerBase

from qbench.data.calibration import CalibrationSpec, calibration_ids, shared_statistic
from qbench.errors import QBenchError
from qbench.quant.adapters import architecture
from qbench.quant.calibrate import observe_inputs
from qbench.quant.formats import int_clip
from qbench.quant.hadamard import hadamard_versions
from qbench.quant.integer import IntGrid, int_grid
from qbench.quant.linear import QuantLinear
from qbench.quant.method import METHODS, replace_module, target_linears
from qbench.quant.rotation import rotate
from qbench.quant.rtn import RTNConfig
from qbench.quant.spec import WeightQuant


@METHODS.register("gptq")
class GPTQConfig(RTNConfig):
    """GPTQ weights (int formats), RTN activations; `rotate: true` first applies QuaRot."""

    method: Literal["gptq"] = "gptq"
    rotate: bool = False
    damp: float = Field(default=0.01, gt=0)
    block_size: int = Field(default=128, ge=1)
    act_order: bool = False
    static_groups: bool = True
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)

    @model_validator(mode="after")
    def _int_weights(self) -> GPTQConfig:
        if self.weights is None or self.weights.format != "int":
            raise ValueError("gptq rounds int weights: set weights: {bits: ...} (format int)")
        if "static_groups" in self.model_fields_set and self.weights.group is None:
            raise ValueError("static_groups applies to weights with a group: add weights.group")
        return self

    def transform(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase | None) -> None:
        if self.rotate:
            rotate(model, rotate_qk=self.kv is not None)

    @property
    def has_transform(self) -> bool:
        return self.rotate

    def versions(self) -> dict[str, str]:
        return hadamard_versions() if self.rotate else {}

    def quantize_linears(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase | None) -> None:
        if tokenizer is None:
            raise QBenchError("gptq calibrates on text: pass the checkpoint's tokenizer")
        ids = calibration_ids(tokenizer, self.calibration)
        linears = target_linears(model, self)
        prefix = architecture(model).layers
        layers = model.get_submodule(prefix)
        for i, layer in enumerate(layers):
            names = [n for n in linears if n.startswith(f"{prefix}.{i}.")]
            group = {n: linears.pop(n) for n in names}
            self._quantize_linears(model, group, ids, layer, shared=i == 0 and not self.rotate)
        self._quantize_linears(model, linears, ids, stop_at=None)  # lm_head, if asked

    def _quantize_linears(
        self,
        model: nn.Module,
        linears: dict[str, nn.Linear],
        ids: torch.Tensor,
        stop_at: nn.Module | None,
        shared: bool = False,
    ) -> None:
        """`shared`: the inputs are the fp model's, so the Hessians are shared (see above)."""
        if not linears:
            return

        def compute() -> dict[str, torch.Tensor]:
            return input_hessians(model, linears, ids, self.calibration.batch_size, stop_at)

        key = ("gptq.hessians", tuple(linears), self.calibration.model_dump_json())
        hessians = shared_statistic((*key, torch.initial_seed()), compute) if shared else compute()
        for name, linear in linears.items():
            weight = gptq_round(
                linear.weight.detach(),
                hessians[name],
                self.weights,
                self.damp,
                self.block_size,
                self.act_order,
                self.static_groups,
            )
            quantized = QuantLinear(linear, self.weights, self.activations, rounded=weight)
            replace_module(model, name, quantized)


class _Stop(Exception):
    """Raised after the last watched layer ran: the rest of the forward pass is not needed."""


def input_hessians(
    model: nn.Module,
    linears: dict[str, nn.Linear],
    ids: torch.Tensor,
    batch_size: int,
    stop_at: nn.Module | None,
) -> dict[str, torch.Tensor]:
    """H = 2/n sum x x^T (float64) of each linear's inputs over the calibration tokens."""
    sums = {
        n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64)
        for n, m in linears.items()
    }
    counts = dict.fromkeys(linears, 0)

    def observe(name: str, x: torch.Tensor) -> None:
        x = x.detach().double().cpu()
        sums[name] += x.T @ x
        counts[name] += x.shape[0]

    def stop(*_: object) -> None:
        raise _Stop

    hook = stop_at.register_forward_hook(stop) if stop_at is not None else None
    try:
        for batch in ids.split(batch_size):
            with contextlib.suppress(_Stop):
                observe_inputs(model, linears, batch, batch_size, observe)
    finally:
        if hook is not None:
            hook.remove()
    return {n: 2 * sums[n] / max(counts[n], 1) for n in linears}


def column_grid(columns: torch.Tensor, spec: WeightQuant) -> IntGrid:
    """The grid of a [out, k] slice of a weight: one per row, or one for all (granularity
    tensor), with the spec's clip (searched when `clip_search`) and scale rule."""
    rows = columns.reshape(1, -1) if spec.granularity == "tensor" else columns
    return int_grid(rows, spec.bits, spec.symmetric, int_clip(rows, spec), spec.scale_rule)


def weight_grids(weight: torch.Tensor, spec: WeightQuant) -> tuple[list[IntGrid], int]:
    """(grids, columns per grid): one per group, or one for all columns."""
    width = spec.group or weight.shape[1]
    grids = [column_grid(weight[:, i : i + width], spec) for i in range(0, weight.shape[1], width)]
    return grids, width


@torch.no_grad()
def gptq_round(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: WeightQuant,
    damp: float,
    block_size: int,
    act_order: bool,
    static_groups: bool = True,
) -> torch.Tensor:
    """The GPTQ-rounded weight [out, in] (float32) for inputs with Hessian `hessian` [in, in].

    `static_groups` (with spec.group): see the module docstring.
    """
    w = weight.double().clone()
    dynamic = spec.group is not None and not static_groups
    grids, width = ([], spec.group) if dynamic else weight_grids(w, spec)
    h = hessian.clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    order = (
        torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(w.shape[1])
    )
    w, h = w[:, order], h[order][:, order]
    h += damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    for i1 in range(0, w.shape[1], block_size):
        i2 = min(i1 + block_size, w.shape[1])
        block, errors = w[:, i1:i2].clone(), torch.zeros(w.shape[0], i2 - i1, dtype=w.dtype)
        for i in range(i2 - i1):
            column = block[:, i]
            if dynamic and (i1 + i) % width == 0:  # GPTQ's reference reads W, not the block
                grid = column_grid(w[:, i1 + i : i1 + i + width], spec)
            elif not dynamic:
                grid = grids[int(order[i1 + i]) // width]
            q[:, i1 + i] = grid.round(column)
            errors[:, i] = (column - q[:, i1 + i]) / u[i1 + i, i1 + i]
            block[:, i:] -= errors[:, i : i + 1] @ u[i1 + i : i1 + i + 1, i1 + i : i2]
        w[:, i2:] -= errors @ u[i1:i2, i2:]
    return q[:, torch.argsort(order)].float()
