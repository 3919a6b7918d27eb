"""Checkpoints dispatched by a device_map: evaluation equals the whole model's, quantizers that
would meet offloaded weights refuse, and bad maps fail at plan time."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import write_recipe

from qbench.api import quantizer
from qbench.checkpoints.dispatch import (
    CANNOT_QUANTIZE_OFFLOADED,
    input_device,
    offload_refusal,
    offloaded_modules,
)
from qbench.checkpoints.load import load_checkpoint
from qbench.eval.diagnostics import layer_sqnr
from qbench.plan import plan
from qbench.recipe import RecipeError, load_recipe
from qbench.record import OK, REFUSED
from qbench.runner import Worker

LAYERS = 4
RANDOM = (
    "{model_type: llama, hidden_size: 64, intermediate_size: 172, num_hidden_layers: 4, "
    "num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 600, seed: 1}"
)
# The embedding and the second half of the decoder blocks on disk, the rest on the CPU.
HALF_ON_DISK = {
    "model.embed_tokens": "disk",
    **{f"model.layers.{i}": "cpu" if i < LAYERS // 2 else "disk" for i in range(LAYERS)},
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}
# Float tolerance of a dispatched model's metrics against the whole model's: the same kernels
# run on the same weights (loaded by the hooks from the same safetensors file), so they agree
# to float32 rounding of the final sum; measured here: identical.
RELATIVE_TOLERANCE = 1e-6


def _recipe(tmp_path, device_map: str, quantizers: str = "[]"):
    text = (
        "name: d\ncheckpoints:\n"
        f"  - {{name: whole, random: {RANDOM}}}\n"
        f"  - {{name: dispatched, random: {RANDOM}, device_map: {device_map}, "
        f"offload_folder: {tmp_path / 'offload'}}}\n"
        f"quantizers: {quantizers}\n"
        "eval:\n  perplexity: [{data: embedded, seq_len: 128, max_windows: 6}]\n"
        "  tasks: [{name: embedded_mc, limit: 12}]\n"
        "  task_options: {batch_size: 4, bootstrap_iters: 0}\n"
        "  diagnostics: {samples: 2, seq_len: 64}\n"
    )
    path = write_recipe(tmp_path / "d.yaml", text)
    return load_recipe(path), plan(load_recipe(path), path)


def _map_text(device_map: dict[str, str]) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in device_map.items()) + "}"


def test_half_the_blocks_on_disk_give_the_whole_models_numbers(tmp_path):
    recipe, cells = _recipe(tmp_path, _map_text(HALF_ON_DISK))
    assert cells[0].identity == cells[1].identity and cells[0].key != cells[1].key  # device_map
    worker = Worker(progress=False)
    whole, dispatched = (worker.execute(c, recipe, tmp_path / "results") for c in cells)
    assert worker.loads == 2
    assert whole.status == dispatched.status == OK
    ppl, ppl_dispatched = (r.metrics.perplexity["embedded"] for r in (whole, dispatched))
    assert ppl_dispatched == pytest.approx(ppl, rel=RELATIVE_TOLERANCE)
    tasks, tasks_dispatched = (r.details.tasks["embedded_mc"] for r in (whole, dispatched))
    assert tasks["samples"] == tasks_dispatched["samples"] == 12
    for metric in ("acc", "acc_norm"):
        assert tasks_dispatched["metrics"][metric] == tasks["metrics"][metric]
    assert whole.device == "cpu" and dispatched.device == "device_map: cpu, disk"
    figures = whole.metrics.diagnostics  # offloaded weights' kurtosis read through their hooks
    assert figures["max_weight_kurtosis"] is not None
    for name, value in dispatched.metrics.diagnostics.items():
        expected = figures[name]
        assert value == (pytest.approx(expected, rel=RELATIVE_TOLERANCE) if expected else expected)


def test_offloaded_modules_hold_no_weights_and_inputs_go_to_the_execution_device(tmp_path):
    _, cells = _recipe(tmp_path, _map_text(HALF_ON_DISK))
    model, _ = load_checkpoint(cells[1].checkpoint, progress=False)
    offloaded = offloaded_modules(model)
    assert "model.embed_tokens" in offloaded and "model.layers.3.mlp.down_proj" in offloaded
    assert not any(name.startswith("model.layers.0.") for name in offloaded)
    assert model.model.layers[3].mlp.down_proj.weight.device.type == "meta"
    assert model.model.layers[0].mlp.down_proj.weight.device.type == "cpu"
    assert model.device.type == "meta" and input_device(model) == torch.device("cpu")


def test_sqnr_of_offloaded_linears_equals_the_whole_models(tmp_path):
    """qbench probe --quantizer on a dispatched checkpoint: each offloaded linear's weight is
    loaded by its hook while its rounded output is computed."""
    _, cells = _recipe(tmp_path, _map_text(HALF_ON_DISK))
    (whole, _), (dispatched, _) = (load_checkpoint(c.checkpoint, progress=False) for c in cells)
    w4a8 = quantizer(name="w4a8", method="rtn", weights={"bits": 4}, activations={"bits": 8})
    ids = torch.randint(0, 600, (2, 32), generator=torch.Generator().manual_seed(0))
    expected, found = (layer_sqnr(m, ids, w4a8) for m in (whole, dispatched))
    assert len(found) == 7 * LAYERS and "model.layers.3.mlp.down_proj" in found
    assert found == pytest.approx(expected, rel=RELATIVE_TOLERANCE)


def test_a_quantized_cell_on_an_offloading_map_is_refused_at_plan_time(tmp_path):
    quantizers = "[{name: w4a4, method: rtn, weights: {bits: 4}, activations: {bits: 4}}]"
    recipe, cells = _recipe(tmp_path, _map_text(HALF_ON_DISK), quantizers)
    refusals = {(c.checkpoint.name, c.quantizer_name): c.refusal for c in cells}
    assert refusals["whole", "w4a4"] is None and refusals["dispatched", "fp"] is None
    assert refusals["dispatched", "w4a4"] == (
        "quantizers[0] 'w4a4' on checkpoint 'dispatched': checkpoints[1].device_map offloads "
        f"3 modules to disk (e.g. model.embed_tokens), {CANNOT_QUANTIZE_OFFLOADED}"
    )
    worker = Worker(progress=False)
    records = {
        c.quantizer_name: worker.execute(c, recipe, tmp_path / "r")
        for c in cells
        if c.checkpoint.name == "dispatched"
    }
    assert records["fp"].status == OK
    assert records["w4a4"].status == REFUSED and records["w4a4"].error.type == "RefusedError"
    assert worker.loads == 1  # the refused cell loaded nothing


def test_weights_offloaded_at_load_refuse_the_quantized_cell_at_run_time(tmp_path):
    """What a strategy (device_map: auto) offloads shows only once loaded: the quantized cell
    is refused (refused_at run) before anything is written or quantized, the model unchanged."""
    quantizers = "[{name: w4a4, method: rtn, weights: {bits: 4}, activations: {bits: 4}}]"
    recipe, cells = _recipe(tmp_path, _map_text(HALF_ON_DISK), quantizers)
    fp, quantized = (replace(c, refusal=None) for c in cells if c.checkpoint.name == "dispatched")
    worker = Worker(progress=False)
    before = worker.execute(fp, recipe, tmp_path / "r")
    failed = worker.execute(quantized, recipe, tmp_path / "r")
    assert failed.status == REFUSED and failed.error.type == "RefusedError"
    assert failed.refused_at == "run" and failed.stands  # not retried by the same qbench
    assert "device_map offloads 19 modules to cpu/disk" in failed.error.message
    assert failed.error.message.endswith(CANNOT_QUANTIZE_OFFLOADED)
    assert worker._context.pristine is None  # no pristine copy of meta placeholders
    again = worker.execute(fp, recipe, tmp_path / "again")
    assert again.metrics.perplexity == before.metrics.perplexity and worker.loads == 1


@pytest.mark.parametrize(
    ("device_map", "offloaded"),
    [
        ({"model.layers.0": 0, "model.layers.1": "cpu", "lm_head": "cuda:1"}, "1 modules to cpu"),
        ({"model.layers.0": 0, "model.norm": "cpu", "lm_head": "disk"}, "2 modules to cpu/disk"),
        ({"model.layers.0": "cpu", "lm_head": "disk"}, "1 modules to disk (e.g. lm_head)"),
        ({"": "cpu"}, None),  # executes on the CPU: nothing offloaded
        ({"model.layers.0": 0, "lm_head": 1}, None),
        ("auto", None),  # only loading shows what a strategy offloads
        (None, None),
    ],
)
def test_what_a_map_offloads_is_known_before_loading(device_map, offloaded):
    reason = offload_refusal(device_map)
    if offloaded is None:
        assert reason is None
    else:
        assert reason.startswith(f"offloads {offloaded}")


@pytest.mark.parametrize(
    ("device_map", "message"),
    [
        (
            "{model.embed_tokens: cpu, model.layer.0: cpu}",
            r"checkpoints\[1\]\.device_map: 'model.layer.0' is no module .*"
            r"did you mean 'model.layers.0'",
        ),
        (
            "{model.embed_tokens: cpu, lm_head: cpu}",
            r"checkpoints\[1\]\.device_map: The device_map provided does not give any device "
            r"for the following parameters: model.layers.0",
        ),
        ("{model: gpu}", r"checkpoints\[1\]\.device_map: 'model': 'gpu' is not a device"),
        ("fastest", r"checkpoints\[1\]\.device_map: .fastest. is no device_map strategy; use auto"),
    ],
)
def test_bad_device_maps_fail_at_plan_time(tmp_path, device_map, message):
    with pytest.raises(RecipeError, match=message):
        _recipe(tmp_path, device_map)


def test_offload_folder_goes_with_a_disk_map(tmp_path):
    base = "name: d\neval: {perplexity: [{data: embedded, seq_len: 64}]}\ncheckpoints: "
    no_folder = write_recipe(
        tmp_path / "a.yaml", base + f"[{{name: m, random: {RANDOM}, device_map: {{'': disk}}}}]"
    )
    with pytest.raises(RecipeError, match=r"checkpoints\[0\]: device_map offloads to disk: give"):
        load_recipe(no_folder)
    no_map = write_recipe(
        tmp_path / "b.yaml", base + f"[{{name: m, random: {RANDOM}, offload_folder: x}}]"
    )
    with pytest.raises(RecipeError, match=r"offload_folder: applies with a device_map only"):
        load_recipe(no_map)
