"""qbench as a library: the public API's docstring examples, quantize_ on any module tree,
twice is an error, quantized() restores bit for bit, patterns, seeded calibration."""

from __future__ import annotations

import doctest
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import qbench
from qbench import api
from qbench.errors import QBenchError
from qbench.quant.walk.inventory import inventory
from qbench.quant.walk.linear import QuantLinear

CALIBRATION = {"data": "embedded", "sequences": 4, "seq_len": 32, "batch_size": 2}


def test_the_public_api_docstring_examples_run():
    """Every example in qbench.api's docstrings runs and prints what it shows."""
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    failed, attempted = doctest.testmod(api, optionflags=flags, raise_on_error=False)
    assert attempted >= 8 and failed == 0


def test_import_qbench_is_cheap_and_exports_the_api():
    code = (
        "import sys, qbench; assert 'torch' not in sys.modules, 'torch imported';"
        "print(sorted(qbench.__all__))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "quantize_" in out.stdout and "quantized" in out.stdout and "evaluate" in out.stdout


def test_quantizer_validation_imports_no_torch():
    code = (
        "import sys; from qbench.quant.quantizer import QuantizerConfig;"
        "QuantizerConfig.model_validate({'method': 'gptq', 'weights': {'bits': 4}});"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:5]"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config)


def test_quantize_works_on_a_plain_module_tree():
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
    x = torch.randn(3, 32)
    before = model(x)
    report = qbench.quantize_(
        model, qbench.quantizer(method="rtn", weights={"bits": 4}, activations={"bits": 8})
    )
    assert isinstance(model[0], QuantLinear) and isinstance(model[2], QuantLinear)
    assert report["kinds"]["other"]["weights"] == [32 * 64 + 64 * 16] * 2
    assert not torch.equal(model(x), before)


def test_quantizing_twice_is_an_error_and_changes_nothing():
    model = _llama()
    qbench.quantize_(model, qbench.quantizer(method="rtn", weights={"bits": 4}))
    ids = torch.randint(0, 300, (1, 12))
    logits = model(ids).logits
    w8a8 = qbench.quantizer(method="rtn", weights={"bits": 8}, activations={"bits": 8})
    with pytest.raises(QBenchError, match="already quantized"):
        qbench.quantize_(model, w8a8)
    assert torch.equal(model(ids).logits, logits)
    kv = qbench.quantizer(method="rtn", kv={"bits": 4})
    fresh = _llama()
    qbench.quantize_(fresh, kv)
    with pytest.raises(QBenchError, match=r"kv_transform"):
        qbench.quantize_(fresh, kv)


def test_the_inventory_reads_a_quantized_model_as_the_float_one():
    model = _llama()
    before = {name: t.kind for name, t in inventory(model).targets.items()}
    qbench.quantize_(model, qbench.quantizer(method="rtn", weights={"bits": 4}))
    after = inventory(model)
    assert {name: t.kind for name, t in after.targets.items()} == before
    assert not after.unsupported


def test_nothing_to_round_is_an_error():
    model = torch.nn.Sequential(torch.nn.ReLU())
    with pytest.raises(QBenchError, match="nothing to quantize"):
        qbench.quantize_(model, qbench.quantizer(method="rtn", weights={"bits": 4}))


def test_quantize_runs_the_planners_refusals_before_any_change():
    model = _llama()  # MLP width 128: group 48 divides nothing
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(QBenchError, match=r"weights.group: group 48 does not divide"):
        qbench.quantize_(model, qbench.quantizer(method="rtn", weights={"bits": 4, "group": 48}))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_quantized_restores_the_exact_float_model():
    model = _llama()
    ids = torch.randint(0, 300, (2, 16))
    logits = model(ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rotation = qbench.quantizer(method="rotation", weights={"bits": 4}, activations={"bits": 4},
                                kv={"bits": 4})  # fmt: skip
    with qbench.quantized(model, rotation) as report:
        assert report["kinds"]["attention"]["weights"][0] > 0
        assert not torch.equal(model(ids).logits, logits)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(model(ids).logits, logits)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    qbench.quantize_(model, rotation)  # quantizable again: nothing of the first run is left


def test_ignore_and_targets_leave_layers_in_float_and_say_so():
    model = _llama()
    down = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    w4 = qbench.quantizer(method="rtn", weights={"bits": 4}, ignore=["re:.*down_proj$"])
    report = qbench.quantize_(model, w4)
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, down)
    assert report["ignored"]["modules"] == 2 and report["ignored"]["mlp"] == 2 * 128 * 64
    assert w4.label().endswith("; ignore: re:.*down_proj$")
    from qbench.quant.walk.coverage import coverage_label

    assert "left out by ignore: re:.*down_proj$: 2" in coverage_label(report)
    only = qbench.quantize_(_llama(), qbench.quantizer(method="rtn", weights={"bits": 4}),
                            targets=["model.layers.1.self_attn.*"])  # fmt: skip
    assert only["kinds"]["attention"]["weights"][0] == 64 * 64 * 2 + 64 * 32 * 2
    assert only["ignored"]["modules"] == 4 + 3 + 3  # block 0's 7 targets, block 1's MLP


def test_ignored_layers_are_not_checked_for_group_widths():
    """The remedy a width refusal names exists: leave the misfit layer out."""
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=172,
                         num_hidden_layers=1, num_attention_heads=4)  # fmt: skip
    model = LlamaForCausalLM(config)
    nvfp4 = {"format": "nvfp4"}
    with pytest.raises(QBenchError, match=r"ignore: \["):
        qbench.quantize_(model, qbench.quantizer(method="rtn", weights=nvfp4, activations=nvfp4))
    report = qbench.quantize_(
        model,
        qbench.quantizer(method="rtn", weights=nvfp4, activations=nvfp4, ignore=["*.down_proj"]),
    )
    assert report["ignored"]["modules"] == 1


@pytest.mark.parametrize("pattern", ["", "re:", "re:(unclosed"])
def test_bad_patterns_are_refused_at_validation(pattern):
    with pytest.raises(ValueError, match="ignore"):
        qbench.quantizer(method="rtn", weights={"bits": 4}, ignore=[pattern])


_WINDOWS = """
import sys, torch
from transformers import AutoTokenizer
from qbench.data.calibration import CalibrationSpec
from qbench.quant.context import StepContext
torch.manual_seed(int(sys.argv[2]))  # global RNG state must not matter
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
spec = CalibrationSpec(data="embedded", sequences=4, seq_len=32)
context = StepContext(torch.nn.Linear(2, 2), None, tokenizer, seed=7)
print(context.calibration_ids(spec, "test")[:, 0].tolist())
"""


def test_two_processes_with_the_same_seed_calibrate_on_the_same_windows(tokenizer_dir):
    runs = [
        subprocess.run(
            [sys.executable, "-c", _WINDOWS, str(tokenizer_dir), str(state)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for state in (1, 2)
    ]
    assert runs[0] == runs[1] and runs[0].startswith("[")


def test_the_seed_fixes_gptq_and_rotation_whatever_the_global_rng(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = qbench.quantizer(method="gptq", rotate=True, weights={"bits": 4},
                              calibration=CALIBRATION)  # fmt: skip
    weights = []
    for state in (1, 2):
        model = _llama()
        torch.manual_seed(state)
        qbench.quantize_(model, config, tokenizer, seed=3)
        weights.append(model.model.layers[1].mlp.down_proj.linear.weight.detach().clone())
    assert torch.equal(weights[0], weights[1])
    other = _llama()
    qbench.quantize_(other, config, tokenizer, seed=4)
    assert not torch.equal(other.model.layers[1].mlp.down_proj.linear.weight, weights[0])


def test_evaluate_returns_the_records_metrics(tokenizer_dir):
    from qbench.record import Metrics

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    metrics = qbench.evaluate(
        _llama(), tokenizer, perplexity=[{"data": "embedded", "seq_len": 32, "max_windows": 3}]
    )
    assert isinstance(metrics, Metrics) and metrics.perplexity["embedded"] > 1
