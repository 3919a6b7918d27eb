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
from qbench.eval.diagnostics import diagnose, kurtosis, layer_sqnr, sqnr_db
from qbench.quant.formats.fake import fake_quant
from qbench.quant.quantizer import QuantizerConfig
from qbench.recipe import CheckpointSpec

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
    assert best["position"] == TRIGGER_POSITION
    assert result.summary["super_weight"] == [1, MASSIVE_DIM, UNIT]
    assert model.config._attn_implementation == "sdpa"  # eager only while probing


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
    assert set(cells) == {"fp", "w4a4"}
    assert cells["fp"]["metrics"]["diagnostics"]["min_sqnr_db"] is None
    assert cells["w4a4"]["metrics"]["diagnostics"]["min_sqnr_db"] > 0
    per_layer = cells["w4a4"]["details"]["diagnostics"]["layers"]
    assert len(per_layer) == 2 and len(per_layer[0]["first_token_mass"]) == 4
    board = (results / "diag" / "LEADERBOARD.md").read_text()
    assert "## Outlier diagnostics" in board and "min SQNR dB w4a4" in board
    assert (results / "diag" / "plots" / "outliers.png").stat().st_size > 0


def test_probe_command_prints_and_writes_json(tmp_path, llama_dir, capsys):
    out = tmp_path / "probe.json"
    code = main(
        ["probe", "--path", str(llama_dir), "--samples", "2", "--seq-len", "32", "--out", str(out)]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "super-weight candidates" in printed and "first-token" in printed
    data = json.loads(out.read_text())
    assert data["quantizer"]["name"] == "w4a4" and data["summary"]["min_sqnr_db"] is not None
    assert main(["probe", "--path", str(llama_dir), "--quantizer", "w4x"]) == 2
    assert "give 'none', wXaY" in capsys.readouterr().err
