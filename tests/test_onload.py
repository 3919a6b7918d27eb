"""Quantizing what does not fit: every method on a model with half its decoder blocks (and its
embedding) on disk equals the whole model's, block by block onloaded and put back offloaded
(qbench.quant.walk.onload); the original offloaded weights are never written; the restore
between cells puts the offloaded model back; weights offloaded to CPU memory (as beside a GPU)
take the same path."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from accelerate import cpu_offload
from test_dispatch import HALF_ON_DISK, LAYERS, RELATIVE_TOLERANCE, _map_text, _recipe
from torch import nn

from qbench.api import quantize_, quantized, quantizer
from qbench.checkpoints.dispatch import input_device
from qbench.checkpoints.load import load_checkpoint
from qbench.checkpoints.random import random_checkpoint
from qbench.quant.walk.inventory import inventory
from qbench.quant.walk.onload import STORES_ATTRIBUTE, offload_hook, offloaded_modules
from qbench.record import OK
from qbench.runner import Worker

CALIBRATION = {"data": "embedded", "sequences": 4, "seq_len": 32, "batch_size": 2}
W4A4 = {"weights": {"bits": 4}, "activations": {"bits": 4}}
# a ratio a random model's largest down_proj output reaches: super weights are found
SUPER_WEIGHTS = {"max_count": 2, "min_ratio": 1.5, "calibration": CALIBRATION}
# Every step of main's quantizers that qbench computes itself, alone and composed.
METHODS = {
    "rtn": {"method": "rtn", **W4A4},
    "rtn-clip-search": {"method": "rtn", "weights": {"bits": 4, "clip_search": True}},
    "gptq": {"method": "gptq", "act_order": True, "calibration": CALIBRATION,
             "weights": {"bits": 4}},
    "awq": {"method": "awq", "calibration": CALIBRATION, "weights": {"bits": 3, "group": 4}},
    "smoothquant": {"method": "smoothquant", "alpha": 0.8, "calibration": CALIBRATION,
                    "weights": {"bits": 8}, "activations": {"bits": 8}},
    "rotation-kv": {"method": "rotation", **W4A4, "kv": {"bits": 4}},
    "smoothquant+gptq": {"transforms": [{"transform": "smoothquant", "calibration": CALIBRATION}],
                         "rounding": {"method": "gptq", "calibration": CALIBRATION},
                         "weights": {"bits": 4}, "activations": {"bits": 8}},
    "rotation+gptq-kv": {"method": "gptq", "rotate": True, "calibration": CALIBRATION,
                         "weights": {"bits": 4}, "activations": {"bits": 8}, "kv": {"bits": 8}},
    "awq+rotation": {"transforms": [{"transform": "awq", "clip": False, "calibration": CALIBRATION},
                                    "rotation"],
                     "rounding": "rtn", "weights": {"bits": 4, "group": 4}},
    "embeddings-lm_head": {"method": "rtn", "weights": {"bits": 4}, "embeddings": True,
                           "lm_head": True},
    "kv-only": {"method": "rtn", "kv": {"bits": 4, "group": 8}},
    # the sink-aware steps: tokens kept in float, super weights found and held out
    "rtn-keep-float": {"method": "rtn", **W4A4, "kv": {"bits": 4},
                       "keep_float": {"first_tokens": 1, "outlier_tokens": {"ratio": 2},
                                      "super_weights": SUPER_WEIGHTS}},
    "gptq-super-weights": {"method": "gptq", "calibration": CALIBRATION, "weights": {"bits": 4},
                           "keep_float": {"super_weights": SUPER_WEIGHTS}},
    # the papers' interventions (ablations: a changed float model)
    "zero-sw-sa": {"method": "zero_super_weights", "restore_activation": True, **SUPER_WEIGHTS},
    "zero-control": {"method": "zero_large_weights", **SUPER_WEIGHTS},
    "clip-massive": {"method": "clip_massive_activations", "threshold": 2.0},
    "no-sink": {"method": "remove_attention_sink"},
}  # fmt: skip
CHANGE_NO_WEIGHT = ("kv-only", "clip-massive", "no-sink")  # a KV step or hooks only
IDS = torch.randint(0, 600, (2, 24), generator=torch.Generator().manual_seed(2))


def _models(tmp_path: Path):
    """(whole model, tokenizer), (the same checkpoint dispatched by HALF_ON_DISK, tokenizer),
    and the checkpoint's safetensors file."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    _, cells = _recipe(tmp_path, _map_text(HALF_ON_DISK))
    whole, dispatched = (load_checkpoint(c.checkpoint, progress=False) for c in cells)
    weights = random_checkpoint(cells[1].checkpoint.random, progress=False) / "model.safetensors"
    return whole, dispatched, weights


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS.to(input_device(model))).logits.double()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_equal(found: torch.Tensor, expected: torch.Tensor) -> None:
    scale = float(expected.abs().max())
    torch.testing.assert_close(found, expected, rtol=RELATIVE_TOLERANCE, atol=1e-7 * scale)


@pytest.mark.parametrize("name", METHODS)
def test_every_method_on_half_the_blocks_on_disk_equals_the_whole_model(tmp_path, name):
    (whole, tokenizer), (dispatched, _), weights = _models(tmp_path)
    digest = _digest(weights)
    config = quantizer(name=name, **METHODS[name])
    expected = quantize_(whole, config, tokenizer)
    found = quantize_(dispatched, config, tokenizer)
    assert found == expected  # the coverage report: every targeted weight rounded alike
    _assert_equal(_logits(dispatched), _logits(whole))
    # still offloaded, from a store of its own under the offload folder; the checkpoint's file
    # (which accelerate's disk index reads in place) never written
    offloaded = offloaded_modules(dispatched)
    assert f"model.layers.{LAYERS - 1}.self_attn" in {n.rsplit(".", 1)[0] for n in offloaded}
    assert not any(p.device.type != "meta" for p in dispatched.model.layers[-1].parameters())
    assert all(p.device.type != "meta" for p in dispatched.model.layers[0].parameters())
    stores = vars(dispatched).get(STORES_ATTRIBUTE, [])
    if name in CHANGE_NO_WEIGHT:
        assert not stores
    else:
        (store,) = stores
        if config.quantizes_linears:  # every block rewritten, those on disk to .dat files
            assert Path(store.folder).parent == tmp_path / "offload" and store.index
    assert _digest(weights) == digest


def test_quantized_cells_on_a_disk_map_match_the_whole_models_and_restore(tmp_path):
    """Through the runner: the dispatched checkpoint's cells, one after another on one loaded
    model (restored after each), give the whole checkpoint's numbers, transformed stages
    included; the fp cell after them too, and each cell's store is gone."""
    quantizers = (
        "[{name: sq-gptq, transforms: [{transform: smoothquant, calibration: {data: embedded, "
        "sequences: 4, seq_len: 32}}], rounding: {method: gptq, calibration: {data: embedded, "
        "sequences: 4, seq_len: 32}}, weights: {bits: 4}, activations: {bits: 8}}, "
        "{name: rot, method: rotation, weights: {bits: 4}, activations: {bits: 4}, kv: {bits: 4}}]"
    )
    recipe, cells = _recipe(tmp_path, _map_text(HALF_ON_DISK), quantizers)
    worker = Worker(progress=False)
    records = {
        (c.checkpoint.name, c.quantizer_name): worker.execute(c, recipe, tmp_path / "r")
        for c in [*cells, cells[-3]]  # the dispatched fp cell again, after its quantized ones
    }
    assert all(r.status == OK for r in records.values()) and worker.loads == 2
    for name in ("fp", "sq-gptq", "rot"):
        whole, dispatched = records["whole", name], records["dispatched", name]
        ppl, ppl_dispatched = (r.metrics.perplexity["embedded"] for r in (whole, dispatched))
        assert ppl_dispatched == pytest.approx(ppl, rel=RELATIVE_TOLERANCE)
        assert dispatched.stages.keys() == whole.stages.keys()
        for stage in whole.stages:
            found = dispatched.stages[stage]["perplexity"]["embedded"]
            assert found == pytest.approx(whole.stages[stage]["perplexity"]["embedded"], rel=1e-6)
        assert dispatched.coverage == whole.coverage and dispatched.device != whole.device
    assert not list((tmp_path / "offload").glob("qbench-offload-*"))  # restores dropped them


def test_quantized_restores_an_offloaded_model_bit_for_bit(tmp_path):
    _, (model, tokenizer), _ = _models(tmp_path)
    before = _logits(model)
    hooks = {name: m._hf_hook for name, m in model.named_modules() if offload_hook(m)}
    config = quantizer(**METHODS["rotation+gptq-kv"])
    with quantized(model, config, tokenizer):
        assert not torch.equal(_logits(model), before)
        (store,) = vars(model)[STORES_ATTRIBUTE]
        assert Path(store.folder).is_dir()
    assert torch.equal(_logits(model), before)
    assert {n: m._hf_hook for n, m in model.named_modules() if offload_hook(m)} == hooks
    assert not Path(store.folder).exists() and STORES_ATTRIBUTE not in vars(model)
    again = quantizer(**METHODS["awq"])  # and the restored model quantizes as the whole one
    (whole, _), _, _ = _models(tmp_path / "again")
    quantize_(whole, again, tokenizer)
    quantize_(model, again, tokenizer)
    _assert_equal(_logits(model), _logits(whole))


@pytest.mark.parametrize("name", ["rtn", "rotation+gptq-kv", "awq"])
def test_weights_offloaded_to_cpu_memory_take_the_same_path(tmp_path, name):
    """Beside a GPU, accelerate offloads "cpu" modules to CPU memory; here every module's
    weights live in a CPU state dict (accelerate's cpu_offload, executing on the CPU): the
    store keeps them in CPU memory, the original state dict is not written, the restore puts
    it back."""
    (whole, tokenizer), _, _ = _models(tmp_path)
    (model, _), _, _ = _models(tmp_path / "cpu")
    cpu_offload(model, execution_device="cpu")
    originals = {n: t.clone() for n, t in model.lm_head._hf_hook.weights_map.dataset.items()}
    assert model.model.layers[0].mlp.down_proj.weight.device.type == "meta"
    before = _logits(model)
    config = quantizer(**METHODS[name])
    with quantized(model, config, tokenizer):
        quantize_(whole, config, tokenizer)
        _assert_equal(_logits(model), _logits(whole))
        (store,) = vars(model)[STORES_ATTRIBUTE]
        assert store.folder is None and store.cpu
    assert torch.equal(_logits(model), before)
    state = model.lm_head._hf_hook.weights_map.dataset
    assert all(torch.equal(state[n], t) for n, t in originals.items())


def test_an_offloaded_gpt2_gets_its_linears_and_quantizes_as_the_whole_model(tmp_path):
    """GPT-2's Conv1D ([in, out]) become nn.Linear at load, the offloaded ones onloaded for
    it: every method then finds the same targets on the dispatched model."""
    from qbench.checkpoints.spec import CheckpointSpec

    gpt2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 4, "n_head": 4, "vocab_size": 600}
    device_map = {
        "transformer.wte": "disk",
        "transformer.wpe": "cpu",
        **{f"transformer.h.{i}": "cpu" if i < 2 else "disk" for i in range(4)},
        "transformer.ln_f": "cpu",
        "lm_head": "disk",
    }
    specs = [
        CheckpointSpec(name="whole", random=gpt2),
        CheckpointSpec(name="half", random=gpt2, device_map=device_map,
                       offload_folder=str(tmp_path / "offload")),
    ]  # fmt: skip
    (whole, tokenizer), (dispatched, _) = (load_checkpoint(s, progress=False) for s in specs)
    assert type(dispatched.transformer.h[3].mlp.c_fc).__name__ == "Linear"
    assert offload_hook(dispatched.transformer.h[3].mlp.c_fc) is not None
    _assert_equal(_logits(dispatched), _logits(whole))
    for name in ("rotation-kv", "gptq"):
        with quantized(whole, quantizer(**METHODS[name]), tokenizer) as expected:
            expected_logits = _logits(whole)
        with quantized(dispatched, quantizer(**METHODS[name]), tokenizer) as found:
            assert found == expected
            _assert_equal(_logits(dispatched), expected_logits)


@pytest.mark.parametrize("name", ["gptq", "rotation-kv"])
def test_onloaded_copies_do_not_outlive_their_block(tmp_path, name):
    """A module a method took out of an onloaded block (a linear whose Parameter QuantLinear
    took over, a writer HadamardInput wraps) gets its meta placeholders back as the block is
    offloaded again: what still refers to it (an inventory taken before) keeps no onloaded copy,
    so memory does not grow by a block for every offloaded block quantized."""
    _, (model, tokenizer), _ = _models(tmp_path)
    last = inventory(model).in_block(LAYERS - 1)  # offloaded to disk
    quantize_(model, quantizer(**METHODS[name]), tokenizer)
    kept = [n for n, t in last.items() for p in t.module.parameters() if p.device.type != "meta"]
    assert last and not kept
