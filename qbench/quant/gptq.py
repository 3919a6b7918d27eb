"""GPTQ: round weights column by column, feeding each column's error back into the rest.

Per weight matrix, with H = 2/n sum x x^T over its calibration inputs: dampen H (+ damp * mean
diag H), take the upper Cholesky factor U of H^-1, and for each column j (optionally in
order of decreasing diag H, "act-order") round w_j, then subtract (w_j - q_j) / U_jj * U_j,k
from the later columns k; updates are applied lazily per block of `block_size` columns.
Scales come from the original weight ("static groups"), so act-order keeps them per group.

With `rotate: true` in the `method: gptq` shorthand, QuaRot's rotation (a transform) comes
first. Decoder blocks are processed in order on cached inputs (qbench.quant.blockwise): block i's
Hessians come from its inputs as the already rounded blocks 0..i-1 produce them, as GPTQ does,
in two block passes per block. Every target of the inventory takes part: linears, routers
when asked, and each expert's slices of 3-D expert weights, whose Hessian is taken over the
tokens routed to that expert (an expert no calibration token reached is rounded to nearest,
and the cell's notes say how many). Targets outside the blocks (lm_head when asked) see a full
forward pass of the rounded model. Block 0's Hessians come from the fp model alone, so
(without rotation) the GPTQ cells of a checkpoint share them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field
from torch import nn
from transformers import PreTrainedTokenizerBase

from qbench.data.calibration import CalibrationSpec, calibration_ids, shared_statistic
from qbench.errors import QBenchError
from qbench.quant.blockwise import BlockInputs, observe
from qbench.quant.calibrate import forward_batches
from qbench.quant.experts import set_input_step
from qbench.quant.integer import IntGrid, int_grid, search_clip_int
from qbench.quant.inventory import Target, inventory
from qbench.quant.linear import round_target
from qbench.quant.notes import note
from qbench.quant.spec import WeightQuant, fake_quant
from qbench.quant.steps import Rounding, Transform, quantized_targets, transforms_key

if TYPE_CHECKING:
    from qbench.quant.quantizer import QuantizerConfig

Key = tuple[str, str]  # (target name, matrix label)


class GPTQ(Rounding):
    """GPTQ weights (int formats), RTN activations."""

    method: Literal["gptq"] = "gptq"
    damp: float = Field(default=0.01, gt=0)
    block_size: int = Field(default=128, ge=1)
    act_order: bool = False
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)

    def problem_with(self, quantizer: QuantizerConfig) -> str | None:
        if quantizer.weights is None or quantizer.weights.format != "int":
            return "gptq rounds int weights: set weights: {bits: ...} (format int)"
        return None

    def round(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase | None,
        quantizer: QuantizerConfig,
        before: tuple[Transform, ...],
    ) -> None:
        if tokenizer is None:
            raise QBenchError("gptq calibrates on text: pass the checkpoint's tokenizer")
        ids = calibration_ids(tokenizer, self.calibration)
        found = inventory(model)
        targets = quantized_targets(found, quantizer)
        inputs = BlockInputs(model, found, ids, self.calibration.batch_size)
        for i in range(len(found.blocks)):
            block = {n: t for n, t in found.in_block(i).items() if n in targets}

            def compute(block: dict[str, Target] = block) -> dict[Key, torch.Tensor]:
                return input_hessians(block, lambda: observe(inputs))

            if i == 0:  # from the model as `before` left it: shared by the cells alike
                key = ("gptq.hessians", tuple(block), self.calibration.model_dump_json())
                key += (transforms_key(before), torch.initial_seed())
                hessians = shared_statistic(key, compute)
            else:
                hessians = compute()
            self._round(model, block, hessians, quantizer)
            inputs.advance()
        rest = {n: t for n, t in targets.items() if not n.startswith(f"{found.blocks_path}.")}
        if rest:
            batch_size = self.calibration.batch_size
            hessians = input_hessians(rest, lambda: forward_batches(model, ids, batch_size))
            self._round(model, rest, hessians, quantizer)

    def _round(
        self,
        model: nn.Module,
        targets: dict[str, Target],
        hessians: dict[Key, torch.Tensor],
        quantizer: QuantizerConfig,
    ) -> None:
        weights = quantizer.weights
        unreached = 0
        for name, target in targets.items():
            rounded = {}
            for label, matrix in target.matrices():
                hessian = hessians.get((name, label))
                if hessian is None:  # no calibration token reached this expert
                    unreached += 1
                    rounded[label] = fake_quant(matrix.detach(), weights)
                    continue
                rounded[label] = gptq_round(
                    matrix.detach(), hessian, weights, self.damp, self.block_size, self.act_order
                )
            round_target(model, target, weights, quantizer.activations, rounded)
        if unreached:
            note(f"gptq: {unreached} expert matrices saw no calibration token: rounded to nearest")


@torch.no_grad()
def input_hessians(
    targets: dict[str, Target], run: Callable[[], object]
) -> dict[Key, torch.Tensor]:
    """H = 2/n sum x x^T (float64) of every matrix's inputs while `run()` runs; experts get one
    per expert slice over the tokens routed to it; slices no token reached get none."""
    sums: dict[Key, torch.Tensor] = {}
    counts: dict[Key, int] = {}

    def add(key: Key, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        sums[key] = sums.get(key, 0) + x.T @ x
        counts[key] = counts.get(key, 0) + x.shape[0]

    handles = []
    for name, target in targets.items():
        if target.experts is None:
            hook = lambda _, args, n=name: add((n, "weight"), args[0])  # noqa: E731
            handles.append(target.module.register_forward_pre_hook(hook))
            continue
        for parameter in target.experts.parameters:

            def step(x: torch.Tensor, e: int, n: str = name, p: str = parameter) -> torch.Tensor:
                add((n, f"{p}[{e}]"), x)
                return x

            set_input_step(target.module, parameter, "observe", step)
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
        for target in targets.values():
            for parameter in target.experts.parameters if target.experts else ():
                set_input_step(target.module, parameter, "observe", None)
    return {key: 2 * total / counts[key] for key, total in sums.items() if counts[key]}


def weight_grids(weight: torch.Tensor, spec: WeightQuant) -> tuple[list[IntGrid], int]:
    """(grids, columns per grid): one per group, or one for all columns."""
    width = spec.group or weight.shape[1]
    grids = []
    for start in range(0, weight.shape[1], width):
        rows = weight[:, start : start + width]
        if spec.granularity == "tensor":
            rows = rows.reshape(1, -1)
        clip = search_clip_int(rows, spec.bits, spec.symmetric) if spec.clip_search else spec.clip
        grids.append(int_grid(rows, spec.bits, spec.symmetric, clip))
    return grids, width


@torch.no_grad()
def gptq_round(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: WeightQuant,
    damp: float,
    block_size: int,
    act_order: bool,
) -> torch.Tensor:
    """The GPTQ-rounded weight [out, in] (float32) for inputs with Hessian `hessian`."""
    w = weight.double().clone()
    grids, width = weight_grids(w, spec)
    h = hessian.clone().to(w.device)
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    order = (
        torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(w.shape[1])
    ).to(w.device)
    w, h = w[:, order], h[order][:, order]
    h += damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    for i1 in range(0, w.shape[1], block_size):
        i2 = min(i1 + block_size, w.shape[1])
        block = w[:, i1:i2].clone()
        errors = torch.zeros(w.shape[0], i2 - i1, dtype=w.dtype, device=w.device)
        for i in range(i2 - i1):
            column = block[:, i]
            q[:, i1 + i] = grids[int(order[i1 + i]) // width].round(column)
            errors[:, i] = (column - q[:, i1 + i]) / u[i1 + i, i1 + i]
            block[:, i:] -= errors[:, i : i + 1] @ u[i1 + i : i1 + i + 1, i1 + i : i2]
        w[:, i2:] -= errors @ u[i1:i2, i2:]
    return q[:, torch.argsort(order)].float()
