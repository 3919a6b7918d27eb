"""Diagnostics find planted outliers, match their formulas, and reach results and leaderboards."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import write_recipe
from torch.nn import functional as F

from qbench.checkpoints.load import load_checkpoint
from qbench.checkpoints.model import QBenchConfig, QBenchForCausalLM
from qbench.cli import main
from qbench.data.sources import wikitext_articles
from qbench.errors import QBenchError
from qbench.eval.diagnostics import (
    DiagnosticsSpec,
    diagnose,
    diagnostic_walk,
    kurtosis,
    layer_sqnr,
    probe_ids,
    sqnr_db,
)
from qbench.eval.perplexity import windows_of
from qbench.quant.formats.fake import fake_quant
from qbench.quant.quantizer import QuantizerConfig
from qbench.recipe import CheckpointSpec, PerplexitySpec

SINK_DIM, TRIGGER_DIM, MASSIVE_DIM, UNIT = 10, 30, 20, 3  # hidden dims; an MLP channel
SINK_TOKEN, TRIGGER_TOKEN, TRIGGER_POSITION = 299, 298, 5
W8A8 = QuantizerConfig(name="w8a8", method="rtn", weights={"bits": 8}, activations={"bits": 8})


def _probe(samples: int = 2, seq_len: int = 32) -> torch.Tensor:
    ids = torch.randint(1, 290, (samples, seq_len), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = SINK_TOKEN
    ids[:, TRIGGER_POSITION] = TRIGGER_TOKEN
    return ids


@torch.no_grad()
def _plant(model: torch.nn.Module) -> None:
    """Layer 0, heads 0-1: a sink on the first token, whose key alone has a large component
    along the slowest RoPE pair (q is a constant there, from q_proj's bias). Layer 1: an MLP
    channel that fires only for the trigger token and writes a huge value into one dim."""
    embed = model.model.embed_tokens.weight
    embed[:, [SINK_DIM, TRIGGER_DIM]] = 0
    embed[SINK_TOKEN, SINK_DIM] = embed[TRIGGER_TOKEN, TRIGGER_DIM] = 1.0
    attention = model.model.layers[0].self_attn
    d = model.config.hidden_size // model.config.num_attention_heads
    slow = d // 2 - 1  # the RoPE pair with the lowest frequency barely rotates over 32 tokens
    attention.q_proj.weight[: 2 * d] = 0
    attention.q_proj.bias[: 2 * d] = 0
    attention.q_proj.bias[[slow, d + slow]] = 10.0  # heads 0 and 1 share KV head 0
    attention.k_proj.weight[:d] = 0
    attention.k_proj.bias[:d] = 0
    attention.k_proj.weight[slow, SINK_DIM] = 10.0
    mlp = model.model.layers[1].mlp
    for linear in (mlp.gate_proj, mlp.up_proj):
        linear.weight[UNIT] = 0
        linear.weight[UNIT, TRIGGER_DIM] = 5.0
    mlp.down_proj.weight[:, UNIT] = 0
    mlp.down_proj.weight[MASSIVE_DIM, UNIT] = 1.0


def test_planted_massive_activation_sink_and_super_weight_are_found(qwen2_dir):
    model, _ = load_checkpoint(CheckpointSpec(name="q", path=str(qwen2_dir)))
    _plant(model)
    result = diagnose(model, _probe())
    layers = result.details["layers"]

    first, second = layers
    assert first["ratio"] < 1000 and first["max"] < 10  # nothing massive before layer 1
    assert second["ratio"] > 1000 and second["max"] > 100
    assert (second["top"][0]["position"], second["top"][0]["dim"]) == (
        TRIGGER_POSITION,
        MASSIVE_DIM,
    )
    assert result.summary["max_activation_layer"] == 1

    sinks = {
        (i, h): m for i, layer in enumerate(layers) for h, m in enumerate(layer["first_token_mass"])
    }
    planted = {(0, 0), (0, 1)}
    assert all(sinks[key] > 0.99 for key in planted)
    assert all(mass < 0.5 for key, mass in sinks.items() if key not in planted)
    assert "bias_slot_mass" not in first

    best = result.details["super_weights"][0]
    assert (best["layer"], best["row"], best["column"]) == (1, MASSIVE_DIM, UNIT)
    assert best["position"] == TRIGGER_POSITION and best["weight"] == 1.0
    assert best["module"] == "model.layers.1.mlp.down_proj"
    assert result.summary["super_weight"] == [1, MASSIVE_DIM, UNIT]
    assert result.summary["max_activation_at"] == [1, TRIGGER_POSITION, MASSIVE_DIM]
    largest = result.details["largest_activations"][0]
    assert (largest["layer"], largest["position"], largest["channel"]) == (
        1,
        TRIGGER_POSITION,
        MASSIVE_DIM,
    )
    assert model.config._attn_implementation == "sdpa"  # eager only while probing


def test_the_walk_comes_from_the_inventory_and_the_traced_writers(qwen2_dir):
    model, _ = load_checkpoint(CheckpointSpec(name="q", path=str(qwen2_dir)))
    walk = diagnostic_walk(model, _probe())
    assert walk.source == "inventory and structure trace" and walk.depth == 2
    assert walk.mlp_writers == {i: [f"model.layers.{i}.mlp.down_proj"] for i in range(2)}
    assert len(walk.linears) == 14 and "lm_head" not in walk.linears
    assert walk.linears["model.layers.0.self_attn.o_proj"] == "attention"


@torch.no_grad()
def test_planted_first_token_attention_gives_exact_sink_shares(qwen2_dir):
    """Heads 0-1 of layer 0 park their attention on the first token; every other head has
    zero queries, so it attends uniformly (query t gives 1 / (t + 1) to each key up to t):
    its sink score is (1/T) sum_t 1/(t+1), its first-token mass the same over t = 1..T-1."""
    model, _ = load_checkpoint(CheckpointSpec(name="q", path=str(qwen2_dir)))
    _plant(model)
    d = model.config.hidden_size // model.config.num_attention_heads
    for i, layer in enumerate(model.model.layers):
        start = 2 * d if i == 0 else 0  # the planted heads keep their queries
        layer.self_attn.q_proj.weight[start:] = 0
        layer.self_attn.q_proj.bias[start:] = 0
    ids = _probe(seq_len=32)
    result = diagnose(model, ids)
    uniform_score = sum(1 / (t + 1) for t in range(32)) / 32
    uniform_mass = sum(1 / (t + 1) for t in range(1, 32)) / 31
    for i, layer in enumerate(result.details["layers"]):
        for head, (score, mass) in enumerate(
            zip(layer["sink_score"], layer["first_token_mass"], strict=True)
        ):
            if i == 0 and head < 2:
                assert score > 0.99 and mass > 0.99
            else:
                assert score == pytest.approx(uniform_score, abs=1e-6)
                assert mass == pytest.approx(uniform_mass, abs=1e-6)
    heads = 2 * model.config.num_attention_heads
    assert result.summary["sink_share_0.3"] == result.summary["sink_share_0.5"] == 2 / heads
    assert uniform_score < 0.3  # the uniform heads are below both thresholds


def test_document_windows_start_each_document_with_bos(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    folder = tmp_path / "docs"
    folder.mkdir()
    texts = ["Too short.", *(f"Document {i}: " + "the quick brown fox " * 20 for i in range(3))]
    for i, text in enumerate(texts):
        (folder / f"{i}.txt").write_text(text)
    spec = PerplexitySpec(data="text", path=str(folder))
    ids = probe_ids(tokenizer, spec, DiagnosticsSpec(samples=2, seq_len=16, windows="document"))
    for row, text in zip(ids.tolist(), texts[1:3], strict=True):  # the short one is skipped
        own = tokenizer(text, add_special_tokens=False).input_ids
        assert row == [tokenizer.bos_token_id, *own[:15]]
    plain = DiagnosticsSpec(samples=2, seq_len=16, windows="document", bos=False)
    assert probe_ids(tokenizer, spec, plain)[0].tolist() == tokenizer(texts[1]).input_ids[:16]
    with pytest.raises(QBenchError, match="only 3 of the text's 4 documents have 16 tokens"):
        probe_ids(tokenizer, spec, DiagnosticsSpec(samples=4, seq_len=16, windows="document"))
    stream = probe_ids(tokenizer, spec, DiagnosticsSpec(samples=2, seq_len=16))
    expected = windows_of(torch.tensor(tokenizer(spec.text()).input_ids), 16, 2)
    assert stream.tolist() == expected.tolist()
    assert DiagnosticsSpec(samples=8).identity() == {"samples": 8, "seq_len": 128}
    assert DiagnosticsSpec(windows="document").identity()["windows"] == "document"


def test_wikitext_rows_group_into_articles():
    rows = [" \n", " = A = \n", " \n", " text a\n", " = = Section = = \n", " more\n", " = B = \n"]
    rows += [" text b\n"]
    assert wikitext_articles(rows) == [[" \n"], rows[1:6], rows[6:]]


def test_bias_slot_is_reported_apart_from_the_first_token():
    torch.manual_seed(0)
    config = QBenchConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_kv_bias=True,
    )
    model = QBenchForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_bias.normal_(0, 3.0)
    ids = torch.randint(64, (2, 16))
    maps = model(input_ids=ids, output_attentions=True).attentions
    layers = diagnose(model, ids).details["layers"]
    for probs, layer in zip(maps, layers, strict=True):
        expected_first = probs[:, :, 1:, 1].mean(dim=(0, 2))
        expected_slot = probs[:, :, 1:, 0].mean(dim=(0, 2))
        assert torch.allclose(torch.tensor(layer["first_token_mass"]), expected_first, atol=1e-6)
        assert torch.allclose(torch.tensor(layer["bias_slot_mass"]), expected_slot, atol=1e-6)


def test_kurtosis_matches_its_formula():
    values = [0.5, -1.0, 2.0, 3.5, -0.25, 0.0, 7.0]
    mean = sum(values) / len(values)
    m2 = sum((v - mean) ** 2 for v in values) / len(values)
    m4 = sum((v - mean) ** 4 for v in values) / len(values)
    assert kurtosis(torch.tensor(values).view(7, 1)) == pytest.approx(m4 / m2**2, rel=1e-9)
    gaussian = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    assert kurtosis(gaussian) == pytest.approx(3.0, abs=0.05)


def test_sqnr_matches_its_formula(llama_dir):
    assert sqnr_db(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 2.0])) == pytest.approx(
        10 * math.log10(14 / 1)
    )
    assert sqnr_db(torch.ones(3), torch.ones(3)) is None

    model, _ = load_checkpoint(CheckpointSpec(name="l", path=str(llama_dir)))
    ids = _probe()
    name = "model.layers.0.mlp.down_proj"
    linear = model.get_submodule(name)
    seen = []
    handle = linear.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    x, weight = seen[0], linear.weight.detach()
    exact = F.linear(x, weight)
    rounded = F.linear(fake_quant(x, W8A8.activations), fake_quant(weight, W8A8.weights))
    noise = ((exact - rounded) ** 2).sum()
    expected = 10 * math.log10((exact**2).sum() / noise)
    assert layer_sqnr(model, ids, W8A8)[name] == pytest.approx(expected, rel=1e-6)


RECIPE = """
name: diag
checkpoints:
  - {name: llama, path: LLAMA}
quantizers:
  - {name: w4a4, method: rtn, weights: {bits: 4}, activations: {bits: 4}}
  - {name: rot-w4a4, method: rotation, weights: {bits: 4}, activations: {bits: 4}}
eval:
  perplexity: [{data: embedded, seq_len: 32, max_windows: 2}]
  diagnostics: {samples: 2, seq_len: 32}
"""


def test_recipe_diagnostics_reach_results_leaderboard_and_plots(tmp_path, llama_dir):
    recipe = write_recipe(tmp_path / "r.yaml", RECIPE.replace("LLAMA", str(llama_dir)))
    results = tmp_path / "results"
    assert main(["run", str(recipe), "--results", str(results), "--no-progress"]) == 0
    cells = {}
    for path in (results / "diag" / "runs").glob("*.json"):
        data = json.loads(path.read_text())
        cells[data["quantizer"]["name"]] = data
    assert set(cells) == {"fp", "w4a4", "rot-w4a4"}
    assert cells["fp"]["metrics"]["diagnostics"]["min_sqnr_db"] is None
    assert cells["w4a4"]["metrics"]["diagnostics"]["min_sqnr_db"] > 0
    per_layer = cells["w4a4"]["details"]["diagnostics"]["layers"]
    assert len(per_layer) == 2 and len(per_layer[0]["first_token_mass"]) == 4
    for name in ("w4a4", "rot-w4a4"):  # the float model's walk, on the rounded modules
        details = cells[name]["details"]["diagnostics"]
        assert len(details["linears"]) == 14 and len(details["super_weights"]) == 2
        assert all(v["input_kurtosis"] is not None for v in details["linears"].values())
    board = (results / "diag" / "LEADERBOARD.md").read_text()
    assert "## Outlier diagnostics" in board and "min SQNR dB w4a4" in board
    assert "sink heads > 0.3" in board and "super weight (layer, row, col)" in board
    fp = cells["fp"]["metrics"]["diagnostics"]
    assert "({}, {}, {})".format(*fp["super_weight"]) in board
    plots = results / "diag" / "plots"
    assert (plots / "outliers.png").stat().st_size > 0
    assert (plots / "outliers-llama.png").stat().st_size > 0


def test_probe_command_prints_and_writes_json(tmp_path, llama_dir, capsys):
    out = tmp_path / "probe.json"
    code = main(
        ["probe", "--path", str(llama_dir), "--samples", "2", "--seq-len", "32", "--out", str(out)]
    )
    assert code == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["quantizer"]["name"] == "w4a4" and data["summary"]["min_sqnr_db"] is not None
    layer, row, column = data["summary"]["super_weight"]  # the sections hold the JSON's figures
    heading = "super-weight candidates at the MLP output projections (layer, row, column):"
    assert f"{heading}\n  ({layer}, {row}, {column}) " in printed
    top = data["details"]["largest_activations"][0]
    assert (
        f"at layer {top['layer']}, position {top['position']}, channel {top['channel']}" in printed
    )
    for key in ("max_activation", "sink_share_0.3", "sink_share_0.5", "min_sqnr_db"):
        value = data["summary"][key]
        assert f"  {key}: {value:.4g}\n" in printed + "\n"
    assert main(["probe", "--path", str(llama_dir), "--quantizer", "w4x"]) == 2
    assert "give 'none', wXaY" in capsys.readouterr().err
