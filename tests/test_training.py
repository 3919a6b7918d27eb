"""Matched training: shared data order and init, loss curves, text-folder corpora, seeds."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch
from conftest import write_recipe

from qbench.checkpoints import train as training
from qbench.checkpoints.model import QBenchForCausalLM
from qbench.data.folder import folder_rows
from qbench.data.sources import load_text, text_source
from qbench.recipe import RecipeError, load_recipe

STEPS = 25


def _trained(variant: str, seed: int = 0) -> tuple[dict, list[dict]]:
    config = training.train_config("tiny", variant, "embedded", seed=seed, steps=STEPS)
    path = training.trained_checkpoint(config, progress=False)
    assert (path / "loss.png").stat().st_size > 0
    log = json.loads((path / "train_config.json").read_text())
    return log, json.loads((path / "loss.json").read_text())


def test_variants_with_one_seed_see_the_same_batches_and_both_learn():
    baseline, baseline_curve = _trained("baseline")
    gated, gated_curve = _trained("gate-headwise")
    assert baseline["data_order"] == gated["data_order"]
    assert baseline["tokens_seen"] == gated["tokens_seen"] == STEPS * 16 * 128
    assert baseline["config"]["hyper"] == gated["config"]["hyper"]  # optimizer and schedule
    assert [p["lr"] for p in baseline_curve] == [p["lr"] for p in gated_curve]
    assert baseline_curve != gated_curve  # the architecture, and only it, differs
    for curve in (baseline_curve, gated_curve):
        assert len(curve) == STEPS
        assert sum(p["loss"] for p in curve[-5:]) / 5 < curve[0]["loss"] - 0.5


def test_data_order_depends_on_the_seed_only():
    preset = training.PRESETS.get("tiny")
    order = list(training.batch_starts(10_000, preset, seed=3))
    assert order == list(training.batch_starts(10_000, preset, seed=3))
    assert order != list(training.batch_starts(10_000, preset, seed=4))
    assert len(order) == preset.steps and all(len(b) == preset.batch_size for b in order)


def test_variants_start_from_the_baselines_shared_weights():
    config = training.train_config("tiny", "gatednorm", "embedded", seed=5, steps=1)
    variant = training.initial_model(config).state_dict()
    baseline = training.initial_model(replace(config, variant="baseline")).state_dict()
    assert set(baseline) < set(variant)
    assert all(torch.equal(baseline[k], variant[k]) for k in baseline)


def _folder(tmp_path):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    book = "\n\n".join(f"Paragraph {i} of the book." for i in range(40))
    gutenberg = (
        "\ufeffThe Project Gutenberg eBook of Test\n\n*** START OF THE PROJECT GUTENBERG EBOOK\n"
        f"TEST ***\n\n{book}\n\n*** END OF THE PROJECT GUTENBERG EBOOK TEST ***\nlicense text"
    )
    (folder / "sub" / "b.txt").write_text(gutenberg, encoding="utf-8")
    (folder / "a.txt").write_bytes("Caf\xe9 one.\n\nCaf\xe9 two.".encode("cp1252"))
    (folder / "notes.md").write_text("ignored")
    return folder


def test_a_text_folder_is_a_corpus_with_a_fixed_split(tmp_path):
    folder = _folder(tmp_path)
    train, valid = folder_rows(folder, "train"), folder_rows(folder, "valid")
    assert train == ["Café one.", "\n\n".join(f"Paragraph {i} of the book." for i in range(38))]
    assert valid == ["Café two.", "Paragraph 38 of the book.\n\nParagraph 39 of the book."]
    name = f"{folder}/"
    assert text_source(name).splits == ("train", "valid")
    assert load_text(name, "valid") == "\n\n".join(valid)
    config = training.train_config("tiny", "baseline", name, seed=0, steps=1)
    assert (
        config.corpus_fingerprint
        == training.train_config("tiny", "baseline", name, seed=0, steps=1).corpus_fingerprint
    )


RECIPE = """
name: t
checkpoints:
  - {name: base, seeds: [0, 1, 2], train: &t {preset: tiny, corpus: CORPUS, steps: 2}}
  - {name: gated, train: {<<: *t, variant: gate-headwise}}
eval:
  perplexity: [{data: embedded, seq_len: 64}]
"""


def test_recipe_accepts_a_folder_corpus_and_expands_seeds(tmp_path):
    folder = _folder(tmp_path)
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", RECIPE.replace("CORPUS", f"{folder}/")))
    names = [(c.name, c.group, c.train.seed) for c in recipe.checkpoints]
    assert names == [
        ("base@0", "base", 0),
        ("base@1", "base", 1),
        ("base@2", "base", 2),
        ("gated", None, 0),
    ]
    assert recipe.checkpoints[3].train.variant == "gate-headwise"
    assert recipe.checkpoints[3].train.corpus == f"{folder}/"


@pytest.mark.parametrize(
    ("corpus", "expected"),
    [
        ("MISSING/", "checkpoints[0].train.corpus: no such folder"),
        ("$QBENCH_NO_SUCH_VARIABLE/corpus/", "checkpoints[0].train.corpus: '$QBENCH_NO_SUCH"),
        ("embeded", "checkpoints[0].train.corpus: unknown text source 'embeded' (did you mean"),
    ],
)
def test_a_missing_corpus_is_a_recipe_error_naming_the_field(tmp_path, corpus, expected):
    corpus = corpus.replace("MISSING", str(tmp_path / "nowhere"))
    path = write_recipe(tmp_path / "r.yaml", RECIPE.replace("CORPUS", corpus))
    with pytest.raises(RecipeError, match=re.escape(expected)):
        load_recipe(path)


def test_an_empty_folder_corpus_is_rejected(tmp_path):
    (tmp_path / "empty").mkdir()
    path = write_recipe(tmp_path / "r.yaml", RECIPE.replace("CORPUS", f"{tmp_path}/empty"))
    with pytest.raises(RecipeError, match=r"checkpoints\[0\].train.corpus: .* holds no .txt"):
        load_recipe(path)


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("{name: h, seeds: [0, 1], path: somewhere}", "seeds: applies to train: and random:"),
        ("{name: h, seeds: [0, 1], train: {seed: 3}}", "give seeds: or train.seed, not both"),
        ("{name: h, seeds: [1, 1], train: {}}", "lists a seed twice"),
    ],
)
def test_bad_seeds_are_recipe_errors(tmp_path, entry, expected):
    text = f"name: t\ncheckpoints: [{entry}]\neval: {{perplexity: [{{data: embedded}}]}}\n"
    with pytest.raises(RecipeError, match=rf"checkpoints\[0\]: .*{expected}"):
        load_recipe(write_recipe(tmp_path / "r.yaml", text))


def test_shared_corpus_falls_back_to_embedded_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("QBENCH_DATA_DIR", str(tmp_path))
    with pytest.warns(UserWarning, match="no shared corpus at .*; using the embedded corpus"):
        rows = text_source("corpus").rows("train")
    assert rows == text_source("embedded").rows("train")


def test_the_gpu_preset_reaches_1b_tokens_and_trains_on_the_cpu_for_two_steps(tmp_path):
    """gpu-1b is sized for an hour on one H100 (README); here two steps of one 128-token
    sequence check that the preset's model builds, trains, saves and loads (one of its steps,
    64 x 1024 tokens, would take about an hour on two CPU cores)."""
    preset = training.PRESETS.get("gpu-1b")
    assert preset.steps * preset.batch_size * preset.seq_len >= 1_000_000_000
    config = training.train_config("gpu-1b", "baseline", "embedded", seed=0, steps=2)
    config = replace(config, hyper=replace(config.hyper, batch_size=1, seq_len=128))
    model = training.initial_model(config)
    # 88.08M in matrices (the README's count), 19,200 in norm weights
    assert sum(p.numel() for p in model.parameters()) == 88_099_584
    training.train(config, tmp_path, progress=False)
    log = json.loads((tmp_path / "train_config.json").read_text())
    assert log["tokens_seen"] == 2 * 128 and log["device"] == "cpu"
    losses = [p["loss"] for p in json.loads((tmp_path / "loss.json").read_text())]
    assert len(losses) == 2 and all(8 < loss < 10 for loss in losses)  # ln 8192 = 9.01
    trained = QBenchForCausalLM.from_pretrained(tmp_path)
    assert trained.config.num_hidden_layers == 12 and trained.config.vocab_size == 8192
