"""Random checkpoints from a config: transformers' own init, seeded, cached, validated."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO, TINY_SHAPE, write_recipe
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

from qbench.checkpoints import random as random_source
from qbench.checkpoints.load import checkpoint_identity, load_checkpoint
from qbench.environment import cache_dir
from qbench.eval.diagnostics import diagnose
from qbench.plan import plan
from qbench.recipe import CheckpointSpec, RecipeError, load_recipe

SHAPE = TINY_SHAPE  # vocabulary 300: the tokenizer takes all of it
QWEN3_06B = REPO / "recipes" / "configs" / "qwen3-0.6b.json"


def spec(**random: object) -> CheckpointSpec:
    return CheckpointSpec(name="r", random={"model_type": "llama", **SHAPE, **random})


def test_weights_are_transformers_from_config_after_seeding():
    model, tokenizer = load_checkpoint(spec(seed=3))
    torch.manual_seed(3)
    reference = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPE), dtype=torch.float32)
    expected = reference.state_dict()
    state = model.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k].cpu(), expected[k]) for k in expected)
    assert len(tokenizer) == 300  # min(vocab_size, 4096): every token id has an embedding
    ids = tokenizer("The quick brown fox.", return_tensors="pt").input_ids
    assert int(ids.max()) < model.config.vocab_size


def test_built_once_and_keyed_by_seed(monkeypatch):
    first = random_source.random_checkpoint(spec().random, progress=False)
    monkeypatch.setattr(random_source, "build", lambda *a, **k: pytest.fail("rebuilt"))
    assert random_source.random_checkpoint(spec().random, progress=False) == first
    assert first.parent == cache_dir() / "checkpoints" and first.name.startswith("random-llama-")
    assert (first / "config.json").is_file() and (first / "tokenizer.json").is_file()
    assert checkpoint_identity(spec(seed=1)) != checkpoint_identity(spec())
    assert checkpoint_identity(spec(hidden_size=128)) != checkpoint_identity(spec())
    assert checkpoint_identity(spec(massive_channel={"dim": 1, "scale": 2})) != checkpoint_identity(
        spec()
    )
    before = checkpoint_identity(spec())
    assert before.random is not None and before.model_dump() == {"random": before.random}
    monkeypatch.setattr(random_source, "library_versions", lambda: {"transformers": "0.0"})
    assert checkpoint_identity(spec()) != before


def test_massive_channel_scales_one_embedding_column_and_shows_as_the_top_dim():
    plain, _ = load_checkpoint(spec())
    planted, tokenizer = load_checkpoint(spec(massive_channel={"dim": 7, "scale": 50}))
    before, after = plain.get_input_embeddings().weight, planted.get_input_embeddings().weight
    assert torch.equal(after[:, 7], before[:, 7] * 50)
    others = [d for d in range(64) if d != 7]
    assert torch.equal(after[:, others], before[:, others])
    ids = tokenizer("Some text to probe the hidden states with.", return_tensors="pt").input_ids
    layers = diagnose(planted, ids).details["layers"]
    assert all(layer["top"][0]["dim"] == 7 for layer in layers)


def test_config_file_plans_without_weights_and_dtype_auto_takes_its_dtype(tmp_path):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"name: r\ncheckpoints:\n  - {{name: q, dtype: auto, random: {{config: {QWEN3_06B}}}}}\n"
        "quantizers: [{name: w4, method: rtn, weights: {bits: 4, group: 128}}]\n"
        "eval: {perplexity: [{data: embedded, seq_len: 128}]}\n",
    )
    cells = plan(load_recipe(recipe), recipe)
    config = random_source.random_config(cells[0].checkpoint.random)
    assert isinstance(config, Qwen3Config)
    shape = (config.hidden_size, config.num_hidden_layers, config.num_attention_heads)
    assert shape == (1024, 28, 16) and config.vocab_size == 151936 and config.tie_word_embeddings
    assert [c.checkpoint.dtype for c in cells] == ["bfloat16", "bfloat16"]  # config's torch_dtype
    assert not (cache_dir() / "checkpoints").exists() or not any(
        p.name.startswith("random-qwen3") for p in (cache_dir() / "checkpoints").iterdir()
    )


def test_dtype_auto_loads_the_saved_dtype():
    model, _ = load_checkpoint(spec(torch_dtype="bfloat16").model_copy(update={"dtype": "auto"}))
    assert model.dtype == torch.bfloat16


def test_seeds_expand_random_checkpoints():
    members = CheckpointSpec(
        name="r", seeds=[0, 1], random={"model_type": "llama", **SHAPE}
    ).expand()
    assert [(m.name, m.group, m.random.seed) for m in members] == [("r@0", "r", 0), ("r@1", "r", 1)]


@pytest.mark.parametrize(
    ("random", "message"),
    [
        (
            "{model_type: lama}",
            r"checkpoints\[0\]\.random: model_type 'lama' .*did you mean 'llama'",
        ),
        (
            "{model_type: llama, hiden_size: 64}",
            r"unknown config field.*did you mean 'hidden_size'",
        ),
        (
            "{model_type: llama, hidden_size: 60}",
            r"LlamaConfig rejects these fields: .*hidden size",
        ),
        ("{model_type: llama, massive_channel: {dim: 9999, scale: 2}}", r"massive_channel\.dim"),
        ("{model_type: llama, massive_channel: {dim: 1, scal: 2}}", r"did you mean 'scale'"),
        (
            "{model_type: opt, hidden_size: 64, num_attention_heads: 4, word_embed_proj_dim: 32,"
            " massive_channel: {dim: 40, scale: 50}}",
            r"massive_channel\.dim: 40 is not a channel of the input embedding \(width 32\)",
        ),
        ("{model_type: glm, vocab_size: 512}", r"set pad_token_id: null"),
        ("{model_type: llama, vocab_size: 100}", r"vocab_size: 100 is below 257"),
        ("{hidden_size: 64}", r"give model_type: or a config: file"),
        (
            "{config: no/such.json}",
            r"checkpoints\[0\]\.random: config: no such file 'no/such.json'",
        ),
    ],
)
def test_bad_random_specs_name_the_field(tmp_path, random, message):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"name: r\ncheckpoints: [{{name: r, random: {random}}}]\n"
        "eval: {perplexity: [{data: embedded, seq_len: 64}]}\n",
    )
    with pytest.raises(RecipeError, match=message):
        plan(load_recipe(recipe), recipe)


def test_dtype_auto_without_a_dtype_is_a_plan_error(tmp_path):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        "name: r\ncheckpoints: [{name: r, dtype: auto, random: {model_type: llama, "
        "hidden_size: 64, num_attention_heads: 4, num_hidden_layers: 1, vocab_size: 300}}]\n"
        "eval: {perplexity: [{data: embedded, seq_len: 64}]}\n",
    )
    with pytest.raises(RecipeError, match=r"checkpoints\[0\]\.dtype: dtype auto: .*names no dtype"):
        plan(load_recipe(recipe), recipe)
