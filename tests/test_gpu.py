"""CUDA: every method, the libraries and dispatched checkpoints on a GPU against the CPU.

Skipped without a CUDA device (bench/gpu_suite.sh and `make gpu-check` say so in one line);
tests/test_fused.py compares the compiled fast path with the reference on CUDA.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_recipe

from qbench.checkpoints import load
from qbench.sweep import plan_recipes, sweep

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

RANDOM = (
    "{model_type: llama, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, "
    "num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 600}"
)
QBENCH_METHODS = """
  - {name: rtn-w4a4, method: rtn, weights: {bits: 4}, activations: {bits: 4, clip: 0.9}}
  - {name: sq-nvfp4, method: smoothquant, weights: {format: nvfp4}, activations: {format: nvfp4},
     calibration: {data: embedded, sequences: 8, seq_len: 128}}
  - {name: rotation-kv4, method: rotation, weights: {bits: 4}, activations: {bits: 4},
     kv: {bits: 4}}
  - {name: gptq-w4, method: gptq, weights: {bits: 4}, calibration: {data: embedded, sequences: 8,
     seq_len: 128}}
  - {name: awq-w4, method: awq, weights: {bits: 4, group: 32}, calibration: {data: embedded,
     sequences: 8, seq_len: 128}}
  - {name: kv4, method: rtn, kv: {bits: 4}}
"""
LIBRARY_METHODS = """
  - {name: bnb-int8, method: bitsandbytes, scheme: int8}
  - {name: bnb-nf4, method: bitsandbytes, scheme: nf4}
  - {name: quanto-w8a8, method: quanto, weight_qtype: qint8, activation_qtype: qint8,
     calibration: {data: embedded, sequences: 8, seq_len: 128}}
"""
METHODS = QBENCH_METHODS + LIBRARY_METHODS.lstrip("\n")
# CUDA against CPU, same fp32 weights: the fast path may move an element at a rounding tie to
# the next grid point, and the kernels sum in other orders (bitsandbytes' int8 product among
# them), so perplexities agree closely, not bit for bit.
RELATIVE_TOLERANCE = 0.02


def _perplexities(tmp_path, name: str, checkpoint: str, quantizers: str) -> dict[str, dict]:
    recipe = write_recipe(
        tmp_path / f"{name}.yaml",
        f"name: {name}\ncheckpoints: [{checkpoint}]\nquantizers: {quantizers}\n"
        "eval: {perplexity: [{data: embedded, seq_len: 128, max_windows: 8}]}\n",
    )
    tally = sweep(plan_recipes([recipe]), tmp_path / name, progress=False)
    assert not tally.failed, [job.label for job in tally.failed]
    records = [json.loads(p.read_text()) for p in (tmp_path / name / name / "runs").glob("*.json")]
    return {r["quantizer"]["name"]: r for r in records}


def test_every_method_runs_on_cuda_as_on_the_cpu(tmp_path, monkeypatch):
    checkpoint = f"{{name: m, random: {RANDOM}}}"
    cuda = _perplexities(tmp_path, "cuda", checkpoint, METHODS)
    monkeypatch.setattr(load, "device", lambda: torch.device("cpu"))
    cpu = _perplexities(tmp_path, "cpu", checkpoint, METHODS)
    assert set(cuda) == set(cpu) and len(cuda) == 10
    for name, record in cuda.items():
        assert record["device"].startswith("cuda") and cpu[name]["device"] == "cpu"
        on_gpu, on_cpu = (r["metrics"]["perplexity"]["embedded"] for r in (record, cpu[name]))
        assert on_gpu == pytest.approx(on_cpu, rel=RELATIVE_TOLERANCE), name


def test_cpu_offload_on_cuda_gives_the_whole_models_numbers(tmp_path):
    device_map = (
        "{model.embed_tokens: 0, model.layers.0: 0, model.layers.1: cpu, model.norm: 0, "
        "model.rotary_emb: 0, lm_head: 0}"
    )
    whole = _perplexities(tmp_path, "whole", f"{{name: m, random: {RANDOM}}}", "[]")["fp"]
    offloaded = _perplexities(
        tmp_path, "offloaded", f"{{name: m, random: {RANDOM}, device_map: {device_map}}}", "[]"
    )["fp"]
    assert offloaded["device"] == "device_map: 0, cpu"
    on_gpu, dispatched = (r["metrics"]["perplexity"]["embedded"] for r in (whole, offloaded))
    assert dispatched == pytest.approx(on_gpu, rel=1e-5)  # same kernels, weights streamed in


def test_device_map_auto_quantizes_like_the_undispatched_model(tmp_path):
    rtn = "[{name: w4a4, method: rtn, weights: {bits: 4}, activations: {bits: 4}}]"
    whole = _perplexities(tmp_path, "whole", f"{{name: m, random: {RANDOM}}}", rtn)
    auto = _perplexities(tmp_path, "auto", f"{{name: m, random: {RANDOM}, device_map: auto}}", rtn)
    for name in ("fp", "w4a4"):
        expected, found = (r[name]["metrics"]["perplexity"]["embedded"] for r in (whole, auto))
        assert found == pytest.approx(expected, rel=1e-5), name


def test_every_method_on_a_cpu_offloaded_map_on_cuda_equals_the_whole_model(tmp_path):
    """Half the blocks offloaded to CPU memory beside the GPU: qbench's own steps onload one
    block at a time to the GPU (qbench.quant.walk.onload) and give the whole model's numbers."""
    device_map = (
        "{model.embed_tokens: 0, model.layers.0: 0, model.layers.1: cpu, model.norm: 0, "
        "model.rotary_emb: 0, lm_head: cpu}"
    )
    _assert_methods_match_the_whole_model(tmp_path, device_map, "device_map: 0, cpu")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpus_quantize_like_one(tmp_path):
    """A map over two GPUs: every block is changed on its own GPU, activations follow."""
    device_map = (
        "{model.embed_tokens: 0, model.layers.0: 0, model.layers.1: 1, model.norm: 1, "
        "model.rotary_emb: 0, lm_head: 1}"
    )
    _assert_methods_match_the_whole_model(tmp_path, device_map, "device_map: 0, 1")


def _assert_methods_match_the_whole_model(tmp_path, device_map: str, device: str) -> None:
    """Every qbench method's cell on `device_map` (its record's device `device`) has the
    whole model's perplexity."""
    whole = _perplexities(tmp_path, "whole", f"{{name: m, random: {RANDOM}}}", QBENCH_METHODS)
    checkpoint = f"{{name: m, random: {RANDOM}, device_map: {device_map}}}"
    mapped = _perplexities(tmp_path, "mapped", checkpoint, QBENCH_METHODS)
    assert set(mapped) == set(whole) and len(whole) == 7
    for name, record in mapped.items():
        assert record["device"] == device
        expected, found = (r["metrics"]["perplexity"]["embedded"] for r in (whole[name], record))
        assert found == pytest.approx(expected, rel=1e-5), name
