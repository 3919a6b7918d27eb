"""One calibration pass per block for a whole pipeline, with the numbers of separate passes:
SmoothQuant's ranges observed in the capture of the blocks' inputs that GPTQ then reuses, and
AWQ's grid replaying what runs before each group's readers."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import family_model
from torch import nn
from transformers import AutoTokenizer

from qbench.api import quantize_, quantizer
from qbench.data.calibration import CalibrationSpec
from qbench.quant.context import StepContext, sample_windows
from qbench.quant.formats.spec import WeightQuant
from qbench.quant.methods import awq as awq_module
from qbench.quant.methods.gptq import gptq
from qbench.quant.methods.smoothquant import smooth, smoothable_groups
from qbench.quant.walk.blockwise import BlockInputs
from qbench.quant.walk.inventory import inventory, linear_conv1d
from qbench.quant.walk.structure import probe_ids, trace_structure

CALIBRATION = {"data": "embedded", "sequences": 4, "seq_len": 32, "batch_size": 2}
SQ_GPTQ = {
    "transforms": [{"transform": "smoothquant", "alpha": 0.8, "calibration": CALIBRATION}],
    "rounding": {"method": "gptq", "calibration": CALIBRATION},
    "weights": {"bits": 4},
    "activations": {"bits": 8},
}
IDS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _separate_passes(model: nn.Module, tokenizer) -> None:
    """smoothquant+gptq as qbench ran it before one capture served both: SmoothQuant's ranges
    from a forward of the whole fp model, then GPTQ's own capture of the smoothed blocks."""
    spec = CalibrationSpec.model_validate(CALIBRATION)
    ids = sample_windows(tokenizer, spec, seed=0)
    structure = trace_structure(model, probe_ids(model))
    groups = smoothable_groups(structure, "llama", lambda _: None)
    ranges: dict[int, torch.Tensor] = {}

    def keep(i: int):
        def hook(_: nn.Module, __: tuple, y: torch.Tensor) -> None:
            batch = y.detach().abs().reshape(-1, y.shape[-1]).amax(0)
            ranges[i] = torch.maximum(ranges[i], batch) if i in ranges else batch

        return hook

    handles = [g.norm.register_forward_hook(keep(i)) for i, g in enumerate(groups)]
    with torch.no_grad():
        for batch in ids.split(spec.batch_size):
            model(input_ids=batch, use_cache=False)
    for handle in handles:
        handle.remove()
    for i, group in enumerate(groups):
        smooth(group, ranges[i], 0.8)
    config = quantizer(**SQ_GPTQ)
    gptq(StepContext(model, config, tokenizer), config.rounding)


def test_smoothquant_gptq_calibrates_once_and_equals_separate_passes(tmp_path, tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = family_model("llama")
    separate = copy.deepcopy(model)
    forwards = []
    hooks = [b.register_forward_pre_hook(lambda *_: forwards.append(1)) for b in model.model.layers]
    quantize_(model, quantizer(**SQ_GPTQ), tokenizer)
    for hook in hooks:
        hook.remove()
    _separate_passes(separate, tokenizer)
    torch.testing.assert_close(_logits(model), _logits(separate), rtol=0, atol=0)
    # per calibration batch: one capture through every block (SmoothQuant's ranges), GPTQ's
    # restart at block 0 (stopped as block 0 starts), then two passes of each block (GPTQ's
    # Hessians, after the smoothing, and its outputs); plus two probes: the one finding
    # linears applied outside their forward (activations:) and the one tracing the structure
    layers, batches = len(model.model.layers), 2
    assert len(forwards) == batches * (layers + 1 + 2 * layers) + 2 * layers


@pytest.mark.parametrize(
    ("family", "replays"),
    [("llama", True), ("gemma2", True), ("qwen2_moe", True), ("gpt2", True), ("phi", False)],
)
def test_awq_grid_with_replayed_upstream_modules_equals_the_whole_block(
    family, replays, monkeypatch
):
    """The grid runs only what a scaling group's readers feed (what runs before them replays
    its recorded outputs): the scales and clips equal those of running the whole block for
    every grid point, bit for bit. (Phi's parallel block has one norm before attention and
    MLP alike: nothing runs before its one group's readers.)"""
    weights = WeightQuant(bits=3, group=16)
    fast, whole = family_model(family), family_model(family)
    for model in (fast, whole):
        linear_conv1d(model)
    ids = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(5))
    replayed = []
    record = awq_module._Replay.record

    def counted(*args):
        replay = record(*args)
        replayed.append(replay is not None)
        return replay

    monkeypatch.setattr(awq_module._Replay, "record", counted)
    awq_module.awq(fast, BlockInputs(fast, inventory(fast), ids, 2), weights)
    monkeypatch.setattr(awq_module._Replay, "record", lambda *_: None)
    awq_module.awq(whole, BlockInputs(whole, inventory(whole), ids, 2), weights)
    assert any(replayed) == replays  # a group with modules before its readers
    for (name, a), b in zip(fast.state_dict().items(), whole.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_awq_grid_runs_only_up_to_the_inspected_module():
    """q/k/v's grid points stop at self_attn's output (the MLP after it does not run); gate/up's
    and down's run the MLP (attention, and gate/up for down, replayed). Completed calls of block
    0's down_proj, per batch: the reference pass, grid x 2 points, the lossless check and the
    pass giving block 1 its inputs (grid x 3 + 3 when every point ran the whole block); of its
    q_proj: q/k/v's grid, the same passes and the two replay recordings. Plus once each in the
    probe tracing the structure."""
    grid, batches = 5, 2
    model = family_model("llama")
    ids = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(5))
    inputs = BlockInputs(model, inventory(model), ids, 2)
    calls = {"mlp.down_proj": 0, "self_attn.q_proj": 0}
    block = model.model.layers[0]
    for name in calls:
        block.get_submodule(name).register_forward_hook(
            lambda *_, name=name: calls.__setitem__(name, calls[name] + 1)
        )
    awq_module.awq(model, inputs, WeightQuant(bits=3, group=16), grid, clip=False)
    assert calls["mlp.down_proj"] == 1 + batches * (2 * grid + 3)
    assert calls["self_attn.q_proj"] == 1 + batches * (grid + 5)
