"""Synthetic tasks: the Bigram-Backcopy generator, its vocabulary and held-out text, the
attention-on-BOS split by query type, and training on a task."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import pytest
import torch
from conftest import write_recipe

from qbench.checkpoints import train as training
from qbench.checkpoints.model import QBenchConfig, QBenchForCausalLM
from qbench.cli import main
from qbench.data.sources import load_text
from qbench.data.synthetic import BOS_ID, FIRST_SYMBOL, BigramBackcopy, TaskSource, build_task
from qbench.errors import QBenchError
from qbench.eval.diagnostics import _summary, diagnose, sink_mass
from qbench.recipe import RecipeError, load_recipe

SEQ = 24


@pytest.fixture(scope="module")
def task():
    return build_task(BigramBackcopy(vocab_size=40, triggers=3), "embedded")


def test_the_vocabulary_is_the_texts_most_frequent_characters_and_triggers_lead_it(task):
    counts = Counter(load_text("embedded", "train")).most_common(40)
    rendered = {" ": "Ġ", "\n": "Ċ"}
    assert task.symbols[:FIRST_SYMBOL] == ("<|endoftext|>", "<unk>")
    assert list(task.symbols[FIRST_SYMBOL:]) == [rendered.get(c, c) for c, _ in counts]
    assert task.vocab_size == 42 and task.trigger_ids == [2, 3, 4]
    assert torch.allclose(task.transition[FIRST_SYMBOL:].sum(-1), torch.ones(40))
    assert task.first[: FIRST_SYMBOL + 3].sum() == 0  # never a trigger right after BOS


def test_sequences_start_with_bos_and_copy_the_token_before_each_trigger(task):
    ids = task.sample(256, SEQ, torch.Generator().manual_seed(0))
    assert ids.shape == (256, SEQ) and (ids[:, 0] == BOS_ID).all()
    assert (ids[:, 1:] >= FIRST_SYMBOL).all()  # BOS once, never <unk>
    trigger = task.is_trigger(ids)
    assert not trigger[:, 1].any()
    assert not (trigger[:, 1:] & trigger[:, :-1]).any()  # a copy target is never a trigger
    copies = 0
    for row, marks in zip(ids.tolist(), trigger.tolist(), strict=True):
        for t in range(1, SEQ - 1):
            if marks[t]:
                assert row[t + 1] == row[t - 1]
                copies += 1
            else:  # a bigram target: a transition the text has
                assert task.transition[row[t], row[t + 1]] > 0
    assert copies > 256  # triggers are the most frequent symbols: many copy targets


def test_sequences_are_a_function_of_the_seed(task):
    def draw(seed):
        return task.sample(8, SEQ, torch.Generator().manual_seed(seed))

    assert torch.equal(draw(3), draw(3)) and not torch.equal(draw(3), draw(4))
    valid, test = task.held_out("valid", SEQ), task.held_out("test", SEQ)
    assert torch.equal(valid, task.held_out("valid", SEQ)) and not torch.equal(valid, test)
    with pytest.raises(QBenchError, match="a task has splits valid, test, not 'train'"):
        task.held_out("train", SEQ)


def test_query_types_split_queries_after_bos(task):
    ids = torch.tensor([[BOS_ID, 10, 2, 10, 11, 3, 11]])
    types = task.query_types(ids)
    assert list(types) == ["non_trigger", "trigger"]
    assert types["trigger"].tolist() == [[False, False, True, False, False, True, False]]
    assert types["non_trigger"].tolist() == [[False, True, False, True, True, False, True]]
    assert task.optimal_loss(task.held_out("valid", SEQ))["trigger"] == 0.0


def test_the_held_out_text_reads_back_as_its_sequences(task):
    source = TaskSource(task.spec, "embedded", SEQ)
    text = source.text("valid")
    ids = task.tokenizer()(text, return_tensors="pt").input_ids[0]
    assert torch.equal(ids.view(-1, SEQ), task.held_out("valid", SEQ))
    assert "2048 held-out sequences of 24 tokens" in source.describe("valid")


def test_a_token_vocabulary_is_a_bpe_of_the_text(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("\n\n".join(["the cat sat on the mat. " * 20] * 30))
    task = build_task(BigramBackcopy(vocabulary="tokens", vocab_size=300), f"{folder}/")
    assert 2 < task.vocab_size <= 302 and all(" " not in s for s in task.symbols)
    ids = task.sample(4, SEQ, torch.Generator().manual_seed(0))
    tokenizer = task.tokenizer()
    assert torch.equal(tokenizer(task.text(ids), return_tensors="pt").input_ids[0], ids.flatten())


def test_too_many_triggers_for_the_text_is_an_error(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("abab")
    with pytest.raises(QBenchError, match=r"3 triggers need at least 4 symbols; .* gives 2"):
        build_task(BigramBackcopy(triggers=3), f"{folder}/")


# ---------------------------------------------------------------- attention on BOS by type


def _pattern() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Two heads over 5 tokens; queries 2 and 4 are triggers. Head 0 is active-dormant: its
    non-trigger queries sit on BOS, its trigger queries on the token before. Head 1 is
    uniform over the keys it sees."""
    t = 5
    trigger = torch.tensor([[False, False, True, False, True]])
    probs = torch.zeros(1, 2, t, t)
    for q in range(t):
        probs[0, 0, q, q - 1 if trigger[0, q] else 0] = 1.0
        probs[0, 1, q, : q + 1] = 1.0 / (q + 1)
    other = ~trigger
    other[:, 0] = False
    return probs, {"non_trigger": other, "trigger": trigger}


def test_bos_mass_splits_by_query_type_on_a_hand_built_pattern():
    probs, types = _pattern()
    mass = sink_mass(probs, 5, types)
    uniform = [1 / 2, 1 / 3, 1 / 4, 1 / 5]  # head 1, queries 1..4
    assert mass["first_token_mass"] == pytest.approx([0.5, sum(uniform) / 4])
    assert mass["first_token_mass_non_trigger"] == pytest.approx([1.0, (1 / 2 + 1 / 4) / 2])
    assert mass["first_token_mass_trigger"] == pytest.approx([0.0, (1 / 3 + 1 / 5) / 2])
    # with a bias slot in column 0 the first token is column 1
    slotted = torch.cat((torch.zeros(1, 2, 5, 1), probs), dim=-1)
    assert sink_mass(slotted, 5, types)["first_token_mass_trigger"] == pytest.approx(
        [0.0, (1 / 3 + 1 / 5) / 2]
    )


def test_the_sink_head_is_the_one_parking_non_trigger_queries():
    probs, types = _pattern()
    swapped = probs[:, [1, 0]]  # the active-dormant head is head 1 of layer 1
    layers = [
        {
            "layer": i,
            "max": 1.0,
            "ratio": 2.0,
            "top": [{"position": 0, "dim": 0}],
            **sink_mass(p, 5, types),
        }
        for i, p in enumerate((probs[:, [1, 1]], swapped))
    ]
    summary = _summary(layers, {}, [])
    assert summary["sink_head"] == [1, 1]
    assert summary["sink_mass_non_trigger"] == pytest.approx(1.0)
    assert summary["sink_mass_trigger"] == pytest.approx(0.0)


def test_a_tiny_model_with_uniform_attention_gives_the_known_split(task):
    """Zero query weights: every query spreads evenly over the tokens it sees, so query q puts
    1/(q+1) on BOS, in every head and layer."""
    config = QBenchConfig(
        vocab_size=task.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
    )
    model = QBenchForCausalLM(config).eval()
    for layer in model.model.layers:
        torch.nn.init.zeros_(layer.self_attn.q_proj.weight)
    ids = task.held_out("valid", SEQ)[:16]
    types = task.query_types(ids)
    summary = diagnose(model, ids, query_types=types).summary
    share = 1.0 / torch.arange(1, SEQ + 1).float()  # [t]: on BOS from query q
    for name in ("non_trigger", "trigger"):
        expected = share.expand_as(ids)[types[name]].mean().item()
        assert summary[f"sink_mass_{name}"] == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- training on a task


def _task_config(variant: str, steps: int = 6) -> training.TrainConfig:
    spec = BigramBackcopy(vocab_size=40)
    return training.train_config("synthetic-sink", variant, "embedded", 0, steps, spec)


def test_training_on_a_task_logs_its_figures_and_saves_its_tokenizer():
    config = _task_config("baseline")
    path = training.trained_checkpoint(config, progress=False)
    log = json.loads((path / "train_config.json").read_text())
    points = json.loads((path / "task_log.json").read_text())
    assert log["config"]["task"]["triggers"] == 3 and log["cpu_seconds"] > 0
    assert [p["step"] for p in points][-1] == 5 and (path / "task.png").stat().st_size > 0
    for key in ("copy_loss", "bigram_loss", "sink_mass_non_trigger", "sink_mass_trigger"):
        assert 0 <= points[-1][key] < 10
    model = QBenchForCausalLM.from_pretrained(path)
    assert model.config.vocab_size == 42
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    task = build_task(config.task_spec(), "embedded")
    ids = task.held_out("valid", 8)[:2]
    assert torch.equal(tokenizer(task.text(ids), return_tensors="pt").input_ids[0], ids.flatten())


def test_variants_on_a_task_see_the_same_sequences_and_text_digests_stay():
    logs = [
        json.loads(
            (training.trained_checkpoint(_task_config(v), False) / "train_config.json").read_text()
        )
        for v in ("baseline", "gate-headwise")
    ]
    assert logs[0]["data_order"] == logs[1]["data_order"]
    assert _task_config("baseline").digest() != _task_config("baseline", 7).digest()


def test_text_checkpoints_keep_the_digests_they_had_before_tasks():
    """The fields added with tasks (task, beta2, min_lr) are left out of the hash while unset,
    so checkpoints trained (and results keyed) before them are found again."""
    config = training.train_config("tiny", "baseline", "embedded", 0, 25)
    before = {
        "preset": "tiny",
        "variant": "baseline",
        "corpus": "embedded",
        "corpus_fingerprint": config.corpus_fingerprint,
        "seed": 0,
        "hyper": {
            k: v for k, v in training.asdict(config.hyper).items() if k not in ("beta2", "min_lr")
        },
        "versions": config.versions,
    }
    blob = json.dumps(before, sort_keys=True).encode()
    assert config.digest() == hashlib.sha256(blob).hexdigest()[:16]


# ---------------------------------------------------------------- recipes


RECIPE = """
name: syn
checkpoints:
  - {name: base, seeds: [0, 1], train: &t {preset: synthetic-sink, steps: 8, corpus: embedded,
     task: {name: bigram-backcopy, vocab_size: 40}}}
  - {name: gated, seeds: [0, 1], train: {<<: *t, variant: gate-headwise}}
quantizers:
  - {name: w4a4, method: rtn, weights: {bits: 4}, activations: {bits: 4}}
eval:
  perplexity: [{data: task, checkpoint: base, max_windows: 64}]
  diagnostics: {samples: 8}
report: {baseline: base}
"""


def test_a_task_recipe_fills_the_windows_from_the_checkpoint(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", RECIPE))
    spec = recipe.eval.perplexity[0]
    assert (spec.split, spec.seq_len, recipe.eval.diagnostics.seq_len) == ("valid", 32, 32)
    assert spec.task_source == TaskSource(BigramBackcopy(vocab_size=40), "embedded", 32)
    assert recipe.checkpoints[0].train.task == BigramBackcopy(vocab_size=40)
    short = RECIPE.replace("task: {name: bigram-backcopy, vocab_size: 40}", "task: bigram-backcopy")
    assert load_recipe(write_recipe(tmp_path / "s.yaml", short)).checkpoints[0].train.task == (
        BigramBackcopy()
    )


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "name: bigram-backcopy,",
            "name: bigram-copy,",
            "checkpoints[0].train.task.name: Input should be 'bigram-backcopy'",
        ),
        (
            "vocab_size: 40}",
            "vocab_size: 40, triggers: 0}",
            "checkpoints[0].train.task.triggers: Input should be greater than or equal to 1",
        ),
        (
            "vocab_size: 40}",
            "vocabulary: words}",
            "checkpoints[0].train.task.vocabulary: Input should be 'characters' or 'tokens'",
        ),
        (
            "vocab_size: 40}",
            "vocab_size: 40, trigers: 2}",
            "checkpoints[0].train.task: unknown field 'trigers' (did you mean 'triggers'?)",
        ),
        ("checkpoint: base,", "", "eval.perplexity[0]: checkpoint: required with data: task"),
        (
            "checkpoint: base,",
            "checkpoint: bse,",
            "eval.perplexity[0].checkpoint: no checkpoint or group 'bse' (did you mean 'base'?)",
        ),
        (
            "max_windows: 64}",
            "max_windows: 64, split: train}",
            "eval.perplexity[0]: split 'train': a task's splits are valid, test",
        ),
        (
            "max_windows: 64}",
            "max_windows: 64, seq_len: 64}",
            "eval.perplexity[0].seq_len: 64, but the task's sequences are 32 tokens",
        ),
        (
            "max_windows: 64}",
            "max_windows: 64, max_documents: 3}",
            "max_documents: does not apply to data: task",
        ),
        (
            "max_windows: 64}",
            "max_windows: 64, path: x}",
            "eval.perplexity[0]: path: does not apply to data: task",
        ),
        (
            "{samples: 8}",
            "{samples: 8, seq_len: 16}",
            "eval.diagnostics.seq_len: 16, but they probe the task data",
        ),
        (
            "variant: gate-headwise}",
            "variant: gate-headwise, corpus: corpus}",
            "checkpoints[2] 'gated@0': eval.perplexity[0] scores the task data of 'base'",
        ),
        (
            "{<<: *t, variant: gate-headwise}",
            "{preset: tiny, steps: 8}",
            "checkpoints[2] 'gated@0': eval.perplexity[0] scores",
        ),
    ],
)
def test_task_recipe_errors_name_the_file_and_field(tmp_path, old, new, expected):
    assert old in RECIPE
    path = write_recipe(tmp_path / "r.yaml", RECIPE.replace(old, new, 1))
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    assert str(error.value).startswith(f"{path}: ")
    assert expected in str(error.value)


def test_perplexity_on_a_text_checkpoint_is_refused(tmp_path):
    text = RECIPE.replace("task: {name: bigram-backcopy, vocab_size: 40}", "variant: baseline")
    with pytest.raises(RecipeError, match=r"checkpoint: 'base' is not trained on a task"):
        load_recipe(write_recipe(tmp_path / "r.yaml", text))


def test_a_task_recipe_runs_to_a_leaderboard_with_the_bos_split(tmp_path):
    path = write_recipe(tmp_path / "syn.yaml", RECIPE)
    assert main(["run", str(path), "--results", str(tmp_path), "--no-progress"]) == 0
    records = [json.loads(p.read_text()) for p in (tmp_path / "syn" / "runs").glob("*.json")]
    assert len(records) == 8 and all(r["status"] == "ok" for r in records)
    fp = next(r for r in records if r["checkpoint"]["name"] == "base@0" and r["stage"] == "fp")
    figures = fp["metrics"]["diagnostics"]
    for key in ("sink_mass_non_trigger", "sink_mass_trigger", "max_head_first_token_mass"):
        assert 0 <= figures[key] <= 1
    assert fp["details"]["perplexity"]["task"]["windows"] == 64
    board = (tmp_path / "syn" / "LEADERBOARD.md").read_text()
    assert "## Outliers and degradation against base" in board
    assert "BOS mass from non-trigger queries at the sink head" in board
    assert "- base: an attention sink (sink mass ≥ 0.9) in" in board
    assert "- Under w4a4, " in board and "sink head BOS mass non-trigger" in board
    assert "checkpoint base's task: the valid split of bigram-backcopy" in board
