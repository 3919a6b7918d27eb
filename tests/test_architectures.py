"""Every method on every decoder family: fp equals transformers, transforms are lossless, every
targeted weight is rounded (counted apart from qbench's inventory), KV quantization and W4A4
move the result, and what cannot be done is refused with its reason."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import FAMILIES, MOE_FAMILIES, family_model
from torch import nn
from transformers import AutoTokenizer

from qbench.api import quantize_
from qbench.checkpoints.load import load_checkpoint
from qbench.errors import QBenchError
from qbench.eval.perplexity import perplexity, windows_of
from qbench.quant.context import StepContext
from qbench.quant.methods.rotation import rotate
from qbench.quant.pipeline import transform
from qbench.quant.quantizer import QuantizerConfig
from qbench.quant.walk.inventory import inventory, linear_conv1d
from qbench.recipe import CheckpointSpec

CALIBRATION = {"data": "embedded", "sequences": 4, "seq_len": 32, "batch_size": 2}
IDS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(3))
ROUTER_NAMES = ("gate.weight", "router.weight", "shared_expert_gate.weight")


def _config(**fields):
    return QuantizerConfig.model_validate({"name": "q", **fields})


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.double()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _model(family: str) -> nn.Module:
    model = family_model(family)
    linear_conv1d(model)
    return model


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.mark.parametrize("family", FAMILIES)
def test_fp_perplexity_equals_a_direct_transformers_computation(family, tokenizer, tmp_path):
    """qbench loads the saved checkpoint (GPT-2's Conv1D becomes nn.Linear) and its windowed
    perplexity equals exp(mean loss) that transformers computes on the same windows."""
    family_model(family).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, tok = load_checkpoint(CheckpointSpec(name="m", path=str(tmp_path)), progress=False)
    text = "\n\n".join(["The quick brown fox jumps over the lazy dog."] * 40)
    ours = perplexity(model, tok, text, seq_len=32, batch_size=3, progress=False)
    reference = family_model(family)
    windows = windows_of(tok(text, return_tensors="pt").input_ids[0], 32, None)
    with torch.no_grad():
        losses = [reference(input_ids=w[None], labels=w[None]).loss for w in windows]
    expected = math.exp(float(torch.stack(losses).mean()))
    assert ours.perplexity == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("rotate_qk", [False, True], ids=["rotation", "rotation+qk"])
@pytest.mark.parametrize("family", FAMILIES)
def test_rotation_is_lossless(family, rotate_qk):
    model = _model(family)
    before = _logits(model)
    torch.manual_seed(0)
    rotate(model, rotate_qk=rotate_qk)
    assert _relative(_logits(model), before) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_smoothquant_is_lossless_or_refused(family, tokenizer):
    model = _model(family)
    before = _logits(model)
    config = _config(method="smoothquant", alpha=0.8, weights={"bits": 8}, calibration=CALIBRATION)
    if family == "olmo2":  # post-norms only: no norm feeds a linear
        with pytest.raises(QBenchError, match="nothing to smooth"):
            transform(StepContext(model, config, tokenizer))
        return
    transform(StepContext(model, config, tokenizer))
    assert _relative(_logits(model), before) < 1e-5


def _rounded_rows(param: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Distinct values per output row of a 2-D weight or of each slice of a 3-D one."""
    rows = param.detach()
    if rows.dim() == 3:
        rows = rows.transpose(1, 2) if transposed else rows
        rows = rows.reshape(-1, rows.shape[-1])
    return torch.tensor([row.unique().numel() for row in rows])


def _linear_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Independently of qbench's inventory: every weight of 2 or more dimensions but the
    embedding tables, lm_head and the MoE routers (float by default)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return {
        name: p
        for name, p in model.named_parameters()
        if p.dim() >= 2
        and id(p) not in embeddings
        and not name.startswith("lm_head")
        and not name.endswith(ROUTER_NAMES)
        and "bias" not in name.rsplit(".", 1)[-1]
    }


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_targeted_weight_is_rounded(family, method, tokenizer):
    """W4 per channel: every output row of every targeted matrix holds at most 16 values, and
    the coverage report counts the same weights as rounded."""
    model = _model(family)
    expected = _linear_weights(copy.deepcopy(model))
    fields = {"calibration": CALIBRATION} if method == "gptq" else {}
    config = _config(method=method, weights={"bits": 4}, activations={"bits": 8}, **fields)
    report = config.apply(model, tokenizer)
    params = dict(model.named_parameters())
    transposed = {n for n, m in model.named_modules() if getattr(m, "is_transposed", False)}
    total = 0
    for name, original in expected.items():
        now = params[name] if name in params else params[name.replace(".weight", ".linear.weight")]
        assert not torch.equal(now, original), f"{name} was not rounded"
        distinct = _rounded_rows(now, name.rsplit(".", 1)[0] in transposed)
        assert distinct.max() <= 16, f"{name} has rows with {distinct.max()} values"
        total += original.numel()
    kinds = report["kinds"]
    rounded = sum(kinds[k]["weights"][0] for k in report["targeted"])
    assert rounded == sum(kinds[k]["weights"][1] for k in report["targeted"]) == total
    activations = sum(kinds[k]["activations"][0] for k in report["targeted"])
    assert activations == total
    if family in MOE_FAMILIES:
        assert "router" in report["float"] and "experts" in report["targeted"]


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_quantizer_and_w4a4_change_the_logits(family):
    fp = _logits(_model(family))
    for fields in ({"kv": {"bits": 4}}, {"weights": {"bits": 4}, "activations": {"bits": 4}}):
        model = _model(family)
        quantize_(model, _config(method="rtn", **fields))
        assert _relative(_logits(model), fp) > 1e-4, fields


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3_moe", "gemma2", "falcon", "phi"])
def test_quarot_w4a4kv4_rounds_inside_the_rotation(family, tokenizer):
    model = _model(family)
    fp = _logits(model)
    torch.manual_seed(0)
    config = _config(
        method="gptq", rotate=True, weights={"bits": 4}, activations={"bits": 4, "clip": 0.9},
        kv={"bits": 4, "clip": 0.95}, calibration=CALIBRATION,
    )  # fmt: skip
    report = config.apply(model, tokenizer)
    assert all(report["kinds"][k]["weights"][0] == report["kinds"][k]["weights"][1]
               for k in report["targeted"])  # fmt: skip
    assert 1e-4 < _relative(_logits(model), fp) < 1


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_expert_inputs_are_rounded_per_token_of_each_expert(family):
    """W16A4 on the experts only changes the MoE output: the experts' inputs are rounded."""
    model = _model(family)
    fp = _logits(model)
    config = _config(method="rtn", activations={"bits": 4})
    quantize_(model, config)
    assert _relative(_logits(model), fp) > 1e-3


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_library_backends_refuse_experts_they_cannot_hold(family):
    found = inventory(_model(family))
    for config in (
        _config(method="bitsandbytes", scheme="nf4"),
        _config(method="quanto", weight_qtype="qint8"),
    ):
        assert "replaces nn.Linear layers only" in config.refusal(found)


def test_library_backends_round_gpt2s_conv1d_layers():
    fp = _logits(_model("gpt2"))
    model = _model("gpt2")
    quantize_(model, _config(method="bitsandbytes", scheme="nf4"))
    assert _relative(_logits(model), fp) > 1e-4


def test_routers_are_rounded_on_request():
    model = _model("qwen3_moe")
    router = model.model.layers[0].mlp.gate.weight.detach().clone()
    report = _config(method="rtn", weights={"bits": 4}, routers=True).apply(model)
    assert not torch.equal(model.model.layers[0].mlp.gate.weight, router)
    assert "router" in report["targeted"] and "router" not in report["float"]


def test_tensor_granularity_on_expert_inputs_is_refused():
    found = inventory(_model("mixtral"))
    config = _config(method="rtn", activations={"bits": 8, "granularity": "tensor"})
    assert "granularity tensor on expert inputs" in config.refusal(found)


def test_a_refused_quantizer_is_one_refused_cell_and_the_others_run(tmp_path, tokenizer):
    """bitsandbytes on a MoE checkpoint and a KV group that does not divide head_dim: refused
    at plan time, recorded as refused cells with their reasons, without loading the model; the
    recipe's other cells (fp, rtn) run, the leaderboard lists the refusals, and the run exits
    0 (every cell ok or refused)."""
    from conftest import write_recipe

    from qbench.cli import main

    for family in ("mixtral", "gpt2"):
        family_model(family).save_pretrained(tmp_path / family)
        tokenizer.save_pretrained(tmp_path / family)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"""
name: refusals
checkpoints:
  - {{name: moe, path: {tmp_path / "mixtral"}}}
  - {{name: gpt2, path: {tmp_path / "gpt2"}}}
quantizers:
  - {{name: w4a8, method: rtn, weights: {{bits: 4}}, activations: {{bits: 8}}}}
  - {{name: nf4, method: bitsandbytes, scheme: nf4}}
  - {{name: kv-g12, method: rtn, kv: {{bits: 4, group: 12}}}}
eval: {{perplexity: [{{data: embedded, seq_len: 32, max_windows: 2}}]}}
""",
    )
    results = tmp_path / "results"
    assert main(["run", str(recipe), "--results", str(results), "--no-progress"]) == 0
    board = (results / "refusals" / "LEADERBOARD.md").read_text()
    assert "## Refused cells" in board and "## Failed cells" not in board
    assert "| nf4         | quantizers[1] 'nf4' (bitsandbytes) on checkpoint 'moe'" in board
    assert "replaces nn.Linear layers only" in board
    assert "quantizers[2] 'kv-g12'.kv.group: group 12 does not divide head_dim 16" in board
    cells = [line.split("|")[1:3] for line in board.splitlines() if line.startswith("| ")]
    rows = {f"{a.strip()}/{b.strip()}" for a, b in cells}
    assert {"moe/fp", "moe/w4a8", "gpt2/fp", "gpt2/w4a8", "gpt2/nf4"} <= rows


@pytest.mark.parametrize("family", ["gpt2", "qwen3_moe", "gemma2", "falcon", "olmo2"])
def test_diagnostics_read_every_family(family):
    from qbench.eval.diagnostics import diagnose, layer_sqnr

    model = _model(family)
    sqnr = layer_sqnr(model, IDS, _config(method="rtn", weights={"bits": 4}))
    result = diagnose(model, IDS, sqnr)
    layers = result.details["layers"]
    assert len(layers) == 2 and all(layer["max"] > 0 for layer in layers)
    assert result.summary["max_input_kurtosis"] is not None and result.summary["min_sqnr_db"]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_is_causal_and_an_encoder_is_refused(family):
    """The load-time causality probe passes every decoder family; BERT loaded as a causal LM
    without is_decoder (bidirectional attention) is refused."""
    from transformers import BertConfig, BertLMHeadModel

    from qbench.checkpoints.load import check_causal

    check_causal(_model(family))
    if family == "llama":
        torch.manual_seed(0)
        config = BertConfig(
            vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4
        )
        encoder = BertLMHeadModel(config)
        with pytest.raises(QBenchError, match="not a causal language model"):
            check_causal(encoder.eval())
