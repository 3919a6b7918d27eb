"""Library backends: quanto's weights against qbench's RTN, bitsandbytes's options, and both
methods on every supported architecture, on CPU."""

from __future__ import annotations

import copy
import json
from importlib.metadata import version
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from conftest import refusals, write_recipe
from optimum.quanto import qint4
from optimum.quanto.tensor import MaxOptimizer
from optimum.quanto.tensor.weights import quantize_weight
from torch import nn
from transformers import AutoTokenizer

from qbench.api import quantize_
from qbench.cli import main
from qbench.errors import QBenchError
from qbench.plan import plan
from qbench.probe import quantizer_named
from qbench.quant.formats.fake import fake_quant
from qbench.quant.formats.spec import WeightQuant
from qbench.quant.quantizer import QuantizerConfig
from qbench.recipe import RecipeError, load_recipe

CALIBRATION = {"data": "embedded", "sequences": 4, "seq_len": 32, "batch_size": 4}


def _config(**fields):
    return QuantizerConfig.model_validate({"name": "q", **fields})


def _logits(model: nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids).logits


def _float_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if type(m) is nn.Linear}


# --- quanto against qbench's RTN ------------------------------------------------------------


def test_quanto_int8_weights_equal_rtn_int8_per_channel(tiny_model):
    """Same convention (scale absmax / 127, round half to even, clamp): exactly equal."""
    model = tiny_model("llama")
    weights = _float_weights(model)
    quantize_(model, _config(method="quanto", weight_qtype="qint8", lm_head=True))
    for name, weight in weights.items():
        quantized = model.get_submodule(name).weight.dequantize()
        assert torch.equal(quantized, fake_quant(weight, WeightQuant(bits=8))), name


@pytest.mark.parametrize("group", [None, 64])
def test_quanto_int4_weights_match_rtn_asymmetric_up_to_the_zero_point(tiny_model, group):
    """quanto's qint4 and qbench's asymmetric RTN share the scale (max - min) / 15 of each
    group, but quanto offsets its grid by the float min (x = q s + min) where RTN rounds the
    zero point to an integer (x = (q - z) s, z = round(-min / s)). So they differ, on every
    element, by the grid offset d = min + z s (|d| <= s / 2) modulo one step s: checked to
    1e-5 s, hence within one step everywhere. Given the integer zero point instead (quanto's
    `zeropoint=True`), quanto's quantization equals RTN exactly."""
    model = tiny_model("llama", hidden_size=128, intermediate_size=256)
    weights = _float_weights(model)
    quantize_(model, _config(method="quanto", weight_qtype="qint4", group=group, lm_head=True))
    for name, weight in weights.items():
        module = model.get_submodule(name)
        size = module.weight_group_size  # quanto's choice without `group`: 128 or per channel
        assert size == group or (group is None and size == (128 if weight.shape[1] > 128 else None))
        spec = WeightQuant(bits=4, symmetric=False, group=size) if size else None
        rtn = fake_quant(weight, spec or WeightQuant(bits=4, symmetric=False))
        rows = weight.reshape(-1, size or weight.shape[1])
        low, high = rows.amin(1, keepdim=True), rows.amax(1, keepdim=True)
        assert (low < 0).all() and (high > 0).all()  # so RTN's range [min(x, 0), max(x, 0)]
        step = (high - low) / 15  # is quanto's [min, max]: the same scale
        offset = low + torch.round(-low / step) * step
        diff = (module.weight.dequantize() - rtn).reshape(rows.shape)
        assert (diff.abs() <= step * (1 + 1e-5)).all(), name
        steps = (diff - offset) / step
        assert ((steps - steps.round()).abs() <= 1e-5).all(), name

        scale, zero = MaxOptimizer()(weight, qint4, axis=0, group_size=size, zeropoint=True)
        integer_zero = quantize_weight(weight, qint4, 0, scale, zero, group_size=size)
        assert torch.equal(integer_zero.dequantize(), rtn), name


def test_bitsandbytes_int8_weights_are_rtn_int8_of_the_fp16_weight(tiny_model):
    """LLM.int8 rounds x * (127 / absmax) where RTN rounds x / (absmax / 127) (of the fp16
    weight): one code apart on the few elements near a rounding tie, equal elsewhere."""
    model = tiny_model("llama")
    weights = _float_weights(model)
    quantize_(model, _config(method="bitsandbytes", scheme="int8"))
    for name, weight in weights.items():
        if name == "lm_head":
            assert type(model.lm_head) is nn.Linear
            continue
        module = model.get_submodule(name)
        scale = module.weight.SCB.unsqueeze(1) / 127  # (moved to module.state at its first call)
        rtn = fake_quant(weight.half().float(), WeightQuant(bits=8))
        codes_apart = ((module.weight.data * scale - rtn).abs() / scale).round()
        assert codes_apart.max() <= 1 and codes_apart.mean() < 1e-3, name


# --- bitsandbytes options ---------------------------------------------------------------------


class _OneLinear(nn.Sequential):
    """A model of one linear layer (and no output embedding) to quantize."""

    def get_output_embeddings(self) -> None:
        return None


def _linear_with_outlier_column() -> tuple[nn.Linear, torch.Tensor, nn.Module]:
    """A linear, an input with one outlier feature (as LLM.int8 describes), a model copy."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    x = torch.randn(16, 64)
    x[:, 5] = 40.0
    model = _OneLinear(nn.Linear(64, 32)).eval()
    model[0].load_state_dict(linear.state_dict())
    return linear, x, model


def test_llm_int8_threshold_keeps_outlier_columns_in_fp16():
    errors = {}
    for threshold in (0.0, 6.0):
        linear, x, model = _linear_with_outlier_column()
        quantize_(model, _config(method="bitsandbytes", scheme="int8", threshold=threshold))
        assert isinstance(model[0], bnb.nn.Linear8bitLt) and not model[0].training
        with torch.no_grad():
            errors[threshold] = (model(x) - linear(x)).norm() / linear(x).norm()
    assert errors[6.0] < errors[0.0] / 3, errors


def test_four_bit_options_reach_bitsandbytes_and_float32_compute_stays_float32():
    linear, x, model = _linear_with_outlier_column()
    config = _config(method="bitsandbytes", scheme="nf4", blocksize=128, double_quant=True)
    quantize_(model, config)
    state = model[0].weight.quant_state
    assert (state.quant_type, state.blocksize, state.nested) == ("nf4", 128, True)
    with torch.no_grad():
        out = model(x)
        weight = bnb.functional.dequantize_4bit(model[0].weight.data, state)
        reference = nn.functional.linear(x, weight, linear.bias)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


def test_bf16_compute_uses_the_fused_cpu_kernel_where_there_is_one():
    if not bnb.functional.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes has no fused 4-bit CPU kernel")
    linear, x, model = _linear_with_outlier_column()
    quantize_(model, _config(method="bitsandbytes", scheme="fp4", compute_dtype="bfloat16"))
    with torch.no_grad():
        out = model(x)
    assert model[0].weight.quant_state.packing_format_for_cpu
    assert (out - linear(x)).norm() / linear(x).norm() < 0.3


# --- every architecture -----------------------------------------------------------------------

BACKENDS = {
    "bnb-int8": ({"method": "bitsandbytes", "scheme": "int8"}, 8),
    "bnb-nf4": ({"method": "bitsandbytes", "scheme": "nf4"}, 4),
    "bnb-fp4": ({"method": "bitsandbytes", "scheme": "fp4", "double_quant": True}, 4),
    "quanto-w8a8": (
        {
            "method": "quanto",
            "weight_qtype": "qint8",
            "activation_qtype": "qint8",
            "calibration": CALIBRATION,
        },
        8,
    ),
    "quanto-w4a8-fp8": (
        {
            "method": "quanto",
            "weight_qtype": "qint4",
            "group": 32,
            "activation_qtype": "qfloat8_e4m3fn",
            "calibration": CALIBRATION,
        },
        4,
    ),
}


# Each architecture under one scheme of each library; every scheme on two or more of them.
ARCHITECTURE_RUNS = [
    ("llama", "bnb-int8"),
    ("llama", "quanto-w8a8"),
    ("qwen2", "bnb-nf4"),
    ("qwen2", "quanto-w4a8-fp8"),
    ("qwen3", "bnb-fp4"),
    ("qwen3", "quanto-w8a8"),
    ("mistral", "bnb-int8"),
    ("mistral", "quanto-w4a8-fp8"),
    ("gate-headwise", "bnb-nf4"),
    ("gate-headwise", "quanto-w4a8-fp8"),
    ("qk-norm", "bnb-fp4"),
    ("qk-norm", "quanto-w8a8"),
]


@pytest.mark.parametrize(("kind", "backend"), ARCHITECTURE_RUNS)
def test_backend_changes_logits_by_a_plausible_amount(kind, backend, tiny_model, tokenizer_dir):
    """Random tiny models (weights 0.1 N(0, 1)): 8-bit moves the logits by 0.1-15 %,
    4-bit by 5-60 % (measured here: 3-7 % and 24-43 %); lm_head and embeddings stay float."""
    fields, bits = BACKENDS[backend]
    fp = tiny_model(kind, intermediate_size=128)
    model = copy.deepcopy(fp)
    quantize_(model, _config(**fields), AutoTokenizer.from_pretrained(tokenizer_dir))
    assert type(model.lm_head) is nn.Linear
    assert torch.equal(model.get_input_embeddings().weight, fp.get_input_embeddings().weight)
    assert type(model.model.layers[0].mlp.down_proj) is not nn.Linear
    reference = _logits(fp)
    error = ((_logits(model) - reference).norm() / reference.norm()).item()
    low, high = (1e-3, 0.15) if bits == 8 else (0.05, 0.6)
    assert low < error < high


@pytest.mark.parametrize("backend", ["bnb-int8", "quanto-w4a8-fp8"])
def test_backend_with_kv_rounds_its_linears_and_the_kv_cache(backend, tiny_model, tokenizer_dir):
    """`kv:` works with any method: a backend quantizer with it rounds the linears through the
    library and the KV cache through qbench, and its precision and label say so."""
    from qbench.quant.walk.kvcache import KVTransform

    fields, bits = BACKENDS[backend]
    config = _config(**fields, kv={"bits": 4})
    assert config.precision().endswith("KV4") and config.precision().startswith(f"W{bits}")
    assert "/ kv int4" in config.label()
    model = tiny_model("llama", intermediate_size=128)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    without_kv = copy.deepcopy(model)
    quantize_(without_kv, _config(**fields), tokenizer)
    quantize_(model, config, tokenizer)
    assert type(model.model.layers[0].mlp.down_proj) is not nn.Linear
    assert all(
        isinstance(layer.self_attn.kv_transform, KVTransform) for layer in model.model.layers
    )
    assert not torch.allclose(_logits(model), _logits(without_kv))


@pytest.mark.parametrize(
    "fields", [BACKENDS["bnb-nf4"][0], {"method": "quanto", "weight_qtype": "qint4"}]
)
def test_lm_head_true_quantizes_the_head_and_leaves_the_tied_embeddings(tiny_model, fields):
    model = tiny_model("llama", tie_word_embeddings=True)
    embeddings = model.get_input_embeddings().weight.detach().clone()
    quantize_(model, _config(**fields, lm_head=True))
    assert type(model.lm_head) is not nn.Linear
    assert torch.equal(model.get_input_embeddings().weight, embeddings)
    assert torch.isfinite(_logits(model)).all()


# --- recipes --------------------------------------------------------------------------------

RECIPE = """
name: backends
checkpoints:
  - {name: local, path: LLAMA}
quantizers:
  - {name: bnb-int8, method: bitsandbytes, scheme: int8, threshold: 6.0}
  - {name: bnb-nf4, method: bitsandbytes, scheme: nf4, blocksize: 64, double_quant: true}
  - {name: quanto-w4, method: quanto, weight_qtype: qint4, group: 4}
  - {name: quanto-w8a8, method: quanto, weight_qtype: qint8, activation_qtype: qint8,
     calibration: {data: embedded, sequences: 4, seq_len: 32}}
eval:
  perplexity: [{data: embedded, seq_len: 64, max_windows: 1}]
"""


def _recipe(tmp_path: Path, llama_dir: Path, text: str = RECIPE) -> Path:
    return write_recipe(tmp_path / "r.yaml", text.replace("LLAMA", str(llama_dir)))


def _plan_error(tmp_path: Path, llama_dir: Path, old: str, new: str) -> str:
    assert old in RECIPE
    path = _recipe(tmp_path, llama_dir, RECIPE.replace(old, new))
    with pytest.raises(RecipeError) as caught:
        plan(load_recipe(path), path)
    assert str(caught.value).startswith(f"{path}: ")
    return str(caught.value)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("scheme: int8,", "scheme: int4,", "quantizers[0].scheme: Input should be 'int8', 'nf4'"),
        ("threshold: 6.0", "threshold: -1", "quantizers[0].threshold: Input should be greater"),
        ("blocksize: 64", "blocksize: 100", "quantizers[1].blocksize: Input should be 32, 64"),
        ("threshold: 6.0", "blocksize: 64", "quantizers[0]: blocksize applies to scheme nf4"),
        ("double_quant: true", "threshold: 4", "quantizers[1]: threshold is LLM.int8's"),
        (
            "scheme: nf4,",
            "scheme: nf4, weights: {bits: 4},",
            "quantizers[1]: bitsandbytes takes scheme: int8 | nf4 | fp4, not weights:",
        ),
        (
            "scheme: nf4,",
            "scheme: nf4, embeddings: true,",
            "quantizers[1]: bitsandbytes quantizes linear layers only: remove embeddings",
        ),
        (
            "scheme: int8, threshold: 6.0",
            "threshold: 6.0",
            "quantizers[0].scheme: required field is missing",
        ),
        ("weight_qtype: qint4,", "", "quantizers[2].weight_qtype: required field is missing"),
        (
            "weight_qtype: qint4, group: 4",
            "weight_qtype: qint8, group: 4",
            "quantizers[2]: group applies to qint4 / qint2",
        ),
        (
            "activation_qtype: qint8,",
            "activation_qtype: qint4,",
            "quantizers[3].activation_qtype: Input should be 'qint8', 'qfloat8_e4m3fn'",
        ),
        (
            "activation_qtype: qint8,",
            "",
            "quantizers[3]: calibration sets activation scales: add activation_qtype",
        ),
        (
            "weight_qtype: qint4,",
            "weight_qtype: qint4, activations: {bits: 8},",
            "quantizers[2]: quanto takes weight_qtype: qint8 | qint4 | qint2 and "
            "activation_qtype:, not activations:",
        ),
        ("group: 4", "group: 0", "quantizers[2].group: Input should be greater than or equal"),
    ],
)
def test_backend_fields_are_checked_at_load_time(tmp_path, llama_dir, old, new, expected):
    assert expected in _plan_error(tmp_path, llama_dir, old, new)


def test_quanto_group_that_does_not_divide_a_layer_is_refused_at_plan_time(tmp_path, llama_dir):
    message = refusals(_recipe(tmp_path, llama_dir, RECIPE.replace("group: 4", "group: 32")))[
        "quanto-w4"
    ]
    assert "quantizers[2] 'quanto-w4'.group: group 32 does not divide the input width 172" in (
        message
    )
    assert "model.layers.0.mlp.down_proj" in message and "leave group unset" in message


def test_backend_recipe_runs_end_to_end(tmp_path, llama_dir):
    path = _recipe(tmp_path, llama_dir)
    assert main(["run", str(path), "--results", str(tmp_path / "results"), "--no-progress"]) == 0
    results = {r["quantizer"]["name"]: r for r in _results(tmp_path / "results" / "backends")}
    precisions = {name: r["precision"] for name, r in results.items()}
    assert precisions == {
        "fp": "float32",
        "bnb-int8": "W8A8",
        "bnb-nf4": "W4A16",
        "quanto-w4": "W4A16",
        "quanto-w8a8": "W8A8",
    }
    fp = results["fp"]["metrics"]["perplexity"]["embedded"]
    for name, result in results.items():
        ppl = result["metrics"]["perplexity"]["embedded"]
        assert name == "fp" or (ppl != fp and abs(ppl / fp - 1) < 0.5), (name, ppl, fp)
    assert results["bnb-nf4"]["versions"]["bitsandbytes"] == version("bitsandbytes")
    board = (tmp_path / "results" / "backends" / "LEADERBOARD.md").read_text()
    assert "quanto: int4 asym g4 / fp" in board and "bitsandbytes: nf4 b64 double-quant" in board
    assert f"optimum-quanto {version('optimum-quanto')}" in board


def _results(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((folder / "runs").glob("*.json"))]


def test_diagnostics_refuse_library_backends_at_load_time(tmp_path, llama_dir):
    text = RECIPE.replace("max_windows: 1}]", "max_windows: 1}]\n  diagnostics: true")
    path = _recipe(tmp_path, llama_dir, text)
    with pytest.raises(RecipeError, match=r"eval.diagnostics: quantizers\[0\] 'bnb-int8'"):
        load_recipe(path)
    recipe = load_recipe(_recipe(tmp_path, llama_dir))
    with pytest.raises(QBenchError, match="--quantizer 'quanto-w4': quanto keeps its weights"):
        quantizer_named("quanto-w4", recipe)


def test_library_version_is_part_of_a_backend_cell_key(tmp_path, llama_dir, monkeypatch):
    path = _recipe(tmp_path, llama_dir)
    before = {c.quantizer_name: c.key for c in plan(load_recipe(path), path)}
    monkeypatch.setattr("qbench.quant.steps.library.version", lambda package: "0.0.1")
    after = {c.quantizer_name: c.key for c in plan(load_recipe(path), path)}
    assert before["fp"] == after["fp"]
    assert all(before[name] != after[name] for name in before if name != "fp")
