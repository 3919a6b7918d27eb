"""Downstream tasks through lm-eval: local definitions, the embedded task, aggregates, resume."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import lm_eval
import pytest
import torch
from conftest import write_recipe
from lm_eval.evaluator import evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from qbench.checkpoints.spec import CheckpointIdentity
from qbench.cli import main
from qbench.data.sources import data_dir
from qbench.errors import QBenchError
from qbench.eval import task_data
from qbench.eval.task_index import TASK_DEFS
from qbench.eval.task_scores import document_scores, zero_shot_average
from qbench.eval.tasks import evaluate_tasks, request_cache_files
from qbench.plan import Cell, plan
from qbench.recipe import RecipeError, load_recipe
from qbench.record import Record, ResultsTable
from qbench.report.tasks_table import MISSING, summary, tasks_section

UPSTREAM = Path(lm_eval.__file__).parent / "tasks"
DATA = data_dir()
needs_data = pytest.mark.skipif(
    DATA is None or not (DATA / "eval" / "piqa" / "valid.jsonl").is_file(),
    reason="the shared evaluation data (../shared/data/eval) is not here",
)
LIMIT = 6


# ---------------------------------------------------------------- reference definitions
# Each task as lm-eval's own YAML defines it (prompts, choices, target, metrics copied from
# lm_eval/tasks/...), but reading a JSONL in the Hugging Face dataset's schema that this
# test writes itself from the release files.


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _hf_rows(task: str) -> tuple[str, list[dict]]:
    """(split, rows) in the schema of the HF dataset lm-eval's task reads."""
    eval_dir = DATA / "eval"
    if task == "piqa":
        labels = (eval_dir / "piqa" / "valid-labels.lst").read_text().split()
        rows = _jsonl(eval_dir / "piqa" / "valid.jsonl")
        return "validation", [{**r, "label": int(g)} for r, g in zip(rows, labels, strict=True)]
    if task in ("arc_easy", "arc_challenge"):
        name = "Easy" if task == "arc_easy" else "Challenge"
        rows = _jsonl(eval_dir / "arc" / f"ARC-{name}-Test.jsonl")
        return "test", [
            {
                "id": r["id"],
                "question": r["question"]["stem"],
                "choices": {
                    "text": [c["text"] for c in r["question"]["choices"]],
                    "label": [c["label"] for c in r["question"]["choices"]],
                },
                "answerKey": r["answerKey"],
            }
            for r in rows
        ]
    if task == "winogrande":
        return "validation", _jsonl(eval_dir / "winogrande" / "dev.jsonl")
    if task == "boolq":
        rows = _jsonl(eval_dir / "boolq" / "val.jsonl")
        as_int = {"true": 1, "false": 0}
        return "validation", [{**r, "label": as_int[str(r["label"]).lower()]} for r in rows]
    assert task == "lambada_openai"
    return "test", _jsonl(eval_dir / "lambada_openai" / "lambada_test.jsonl")


REFERENCE = {
    "piqa": """
output_type: multiple_choice
doc_to_text: "Question: {{goal}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{[sol1, sol2]}}"
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
""",
    "arc_easy": """
output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: "{{choices.label.index(answerKey)}}"
doc_to_choice: "{{choices.text}}"
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
""",
    "winogrande": """
output_type: multiple_choice
doc_to_text: !function preprocess_winogrande.doc_to_text
doc_to_target: !function preprocess_winogrande.doc_to_target
doc_to_choice: !function preprocess_winogrande.doc_to_choice
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
""",
    "boolq": """
output_type: multiple_choice
doc_to_text: "{{passage}}\\nQuestion: {{question}}?\\nAnswer:"
doc_to_target: label
doc_to_choice: ["no", "yes"]
metric_list:
  - metric: acc
""",
    "lambada_openai": """
output_type: loglikelihood
doc_to_text: "{{text.split(' ')[:-1]|join(' ')}}"
doc_to_target: "{{' '+text.split(' ')[-1]}}"
metric_list:
  - {metric: perplexity, aggregation: perplexity, higher_is_better: false}
  - {metric: acc, aggregation: mean, higher_is_better: true}
""",
}
REFERENCE["arc_challenge"] = REFERENCE["arc_easy"]
LOCAL_TASKS = sorted(REFERENCE)


def _write_reference(task: str, folder: Path) -> None:
    split, rows = _hf_rows(task)
    data = folder / f"{task}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[: LIMIT * 2]))
    if task == "winogrande":  # upstream's own prompt functions, next to the YAML
        shutil.copy(UPSTREAM / "winogrande" / "preprocess_winogrande.py", folder)
    (folder / f"ref_{task}.yaml").write_text(
        f"task: ref_{task}\ndataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{{split}: '{data}'}}, cache_dir: '{folder / 'hf'}'}}\n"
        f"{split}_split: {split}\n" + REFERENCE[task]
    )


@pytest.fixture(scope="module")
def tiny_lm(llama_dir: Path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    return model, AutoTokenizer.from_pretrained(llama_dir)


def _comparable(sample: dict) -> dict:
    """What must agree per document: the requests lm-eval sent, the answers, the scores."""
    sample = json.loads(json.dumps(sample, default=str))
    keep = ("doc_id", "target", "arguments", "filtered_resps", "acc", "acc_norm", "perplexity")
    return {k: sample[k] for k in keep if k in sample}


@needs_data
@pytest.mark.parametrize("task", LOCAL_TASKS)
def test_local_definition_matches_lm_evals_task_on_the_same_rows(task, tiny_lm, tmp_path):
    model, tokenizer = tiny_lm
    _write_reference(task, tmp_path)
    reference_tasks = TaskManager(include_path=str(tmp_path), include_defaults=False)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)
    expected = evaluate(
        lm=lm,
        task_dict=reference_tasks.load([f"ref_{task}"]),
        limit=LIMIT,
        bootstrap_iters=0,
        log_samples=True,
    )["samples"][f"ref_{task}"]

    options = SimpleNamespace(
        batch_size=4, limit=LIMIT, num_fewshot=0, bootstrap_iters=0, log_samples=True
    )
    spec = SimpleNamespace(name=task, limit=None, num_fewshot=None)
    (run,) = evaluate_tasks(
        model, tokenizer, [spec], options, samples_dir=tmp_path / "s", progress=False
    )
    assert run.source == "local" and run.samples == LIMIT
    got = _jsonl(tmp_path / "s" / f"{task}.jsonl")
    assert [_comparable(s) for s in got] == [_comparable(s) for s in expected]
    assert run.metric == ("acc_norm" if task in ("piqa", "arc_easy", "arc_challenge") else "acc")
    # Per-document scores, as lm-eval's own per-sample records give them, average to the value.
    by_doc = sorted(expected, key=lambda sample: sample["doc_id"])
    assert run.doc_scores == [sample[run.metric] for sample in by_doc]
    assert sum(run.doc_scores) / LIMIT == pytest.approx(run.value)


PROMPT_FIELDS = ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "metric_list")


@pytest.mark.parametrize(
    ("task", "upstream"),
    [
        ("piqa", "piqa/piqa.yaml"),
        ("arc_easy", "arc/arc_easy.yaml"),
        ("arc_challenge", "arc/arc_challenge.yaml"),
        ("winogrande", "winogrande/default.yaml"),
        ("boolq", "super_glue/boolq/default.yaml"),
        ("lambada_openai", "lambada/lambada_openai.yaml"),
        ("hellaswag", "hellaswag/hellaswag.yaml"),
    ],
)
def test_local_yaml_keeps_the_installed_lm_eval_prompts(task, upstream):
    """A new lm-eval release that changes a prompt shows up here, not as drifted numbers."""
    ours = load_yaml(TASK_DEFS / f"{task}.yaml", resolve_func=False)
    theirs = load_yaml(UPSTREAM / upstream, resolve_func=False)
    for field in PROMPT_FIELDS:
        a, b = ours.get(field), theirs.get(field)
        if task == "winogrande" and field.startswith("doc_to"):  # functions: compared below
            assert str(b).endswith(f"preprocess_winogrande.{field}")
            assert str(a).endswith(f"task_data.winogrande_{field}")
        else:
            assert a == b, f"{task}.{field}: {a!r} != upstream {b!r}"
    assert ours["metadata"]["version"] == theirs["metadata"]["version"]


def test_winogrande_and_hellaswag_helpers_equal_upstream():
    import importlib.util

    def module(path: Path):
        spec = importlib.util.spec_from_file_location(path.stem + "_upstream", path)
        loaded = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded)
        return loaded

    wino = module(UPSTREAM / "winogrande" / "preprocess_winogrande.py")
    doc = {"sentence": "Sarah helped Maria so _ was thanked.", "option1": "Sarah",
           "option2": "Maria", "answer": "2"}  # fmt: skip
    for name in ("doc_to_text", "doc_to_target", "doc_to_choice"):
        assert getattr(task_data, f"winogrande_{name}")(doc) == getattr(wino, name)(doc)
    hella = module(UPSTREAM / "hellaswag" / "utils.py")
    for text in ("A man [title] is seen [step] talking.", "  Plain  text "):
        assert task_data._hellaswag_preprocess(text) == hella.preprocess(text)


def test_hellaswag_reads_its_release_file_when_one_is_there(tiny_lm, tmp_path, monkeypatch):
    """No HellaSwag here, so a two-row file in the release format stands in for it."""
    folder = tmp_path / "eval" / "hellaswag"
    folder.mkdir(parents=True)
    row = {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes.",
           "ctx_b": "then", "ctx": "", "endings": [", the man [title] drives.", " a", " b", " c"],
           "source_id": "x", "split": "val", "split_type": "indomain", "label": 3}  # fmt: skip
    folder.joinpath("hellaswag_val.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(row))
    monkeypatch.setenv("QBENCH_DATA_DIR", str(tmp_path))
    model, tokenizer = tiny_lm
    options = SimpleNamespace(
        batch_size=4, limit=None, num_fewshot=0, bootstrap_iters=0, log_samples=True
    )
    spec = SimpleNamespace(name="hellaswag", limit=None, num_fewshot=None)
    (run,) = evaluate_tasks(
        model, tokenizer, [spec], options, samples_dir=tmp_path / "s", progress=False
    )
    assert (run.source, run.samples, run.requests, run.metric) == ("local", 2, 8, "acc_norm")
    sample = _jsonl(tmp_path / "s" / "hellaswag.jsonl")[0]
    context, choice = sample["arguments"][0]
    assert context == "Removing ice from car: Then, the man writes. Then"
    assert choice == " , the man. drives."  # upstream's preprocess: " [title]" -> ". "
    assert sample["target"] == 3


def test_without_local_files_online_a_task_falls_back_to_lm_evals_own(tmp_path, monkeypatch):
    from qbench.eval.task_index import resolve_task

    monkeypatch.setenv("QBENCH_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    assert resolve_task("piqa").source == "lm-eval"
    assert resolve_task("embedded_mc").source == "embedded"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(QBenchError, match=r"piqa.*no data here"):
        resolve_task("piqa")


# ---------------------------------------------------------------- the embedded task


def test_embedded_task_is_deterministic_and_its_answer_is_never_a_distractor():
    docs = task_data.embedded_mc_docs()
    assert docs == task_data.embedded_mc_docs()
    assert len(docs) >= 100
    from qbench.data.sources import embedded_rows

    texts = [" ".join(row.split()) for row in embedded_rows("test")]
    for doc in docs:
        choices = doc["choices"]
        assert len(choices) == task_data.EMBEDDED_MC_CHOICES == len(set(choices))
        answer = choices[doc["label"]]
        distractors = choices[: doc["label"]] + choices[doc["label"] + 1 :]
        assert answer not in distractors
        assert f"{doc['context']} {answer}" in texts[doc["document"]]  # the true next sentence
        for d in distractors:  # drawn from elsewhere in the split
            assert any(d in t for i, t in enumerate(texts) if i != doc["document"])
    labels = [d["label"] for d in docs]
    assert min(labels.count(k) for k in range(task_data.EMBEDDED_MC_CHOICES)) > 10


# ---------------------------------------------------------------- errors


def _recipe(tmp_path: Path, llama_dir: Path, tasks: str, quantizers: str = "[]") -> Path:
    return write_recipe(
        tmp_path / "r.yaml",
        f"""
name: t
checkpoints: [{{name: a, path: {llama_dir}}}]
quantizers: {quantizers}
eval:
  perplexity: [{{data: embedded, seq_len: 64, max_windows: 2}}]
  tasks: {tasks}
  task_options: {{limit: 4, batch_size: 4}}
""",
    )


def test_missing_local_data_is_one_clear_error_at_plan_time(tmp_path, llama_dir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("QBENCH_DATA_DIR", str(tmp_path / "nothing"))
    source = _recipe(tmp_path, llama_dir, "[embedded_mc, {name: piqa, limit: 2}]")
    recipe = load_recipe(source)
    with pytest.raises(RecipeError) as error:
        plan(recipe, source)
    message = str(error.value)
    assert "eval.tasks[1]" in message and "task 'piqa' has no data here" in message
    assert str(tmp_path / "nothing" / "eval" / "piqa" / "valid.jsonl") in message
    assert "valid-labels.lst" in message


@needs_data
def test_hellaswag_offline_names_the_file_it_needs(tmp_path, llama_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = _recipe(tmp_path, llama_dir, "[piqa, hellaswag]")
    with pytest.raises(RecipeError, match=r"eval\.tasks\[1\]: task 'hellaswag'.*hellaswag_val"):
        plan(load_recipe(source), source)


def test_unknown_task_fails_at_load_listing_local_tasks(tmp_path, llama_dir):
    source = _recipe(tmp_path, llama_dir, "[embeded_mc]")
    with pytest.raises(RecipeError) as error:
        load_recipe(source)
    message = str(error.value)
    assert "eval.tasks[0].name: unknown task 'embeded_mc'" in message
    assert "did you mean 'embedded_mc'" in message
    assert "arc_challenge, arc_easy, boolq, embedded_mc, hellaswag" in message


def test_task_options_are_validated(tmp_path, llama_dir):
    source = _recipe(tmp_path, llama_dir, "[piqa, {name: boolq, limit: 0}]")
    with pytest.raises(RecipeError, match=r"eval\.tasks\[1\]\.limit: .*greater than or equal"):
        load_recipe(source)
    source = _recipe(tmp_path, llama_dir, "[piqa, {name: piqa, num_fewshot: 5}]")
    with pytest.raises(RecipeError, match=r"duplicate.*\['piqa'\]"):
        load_recipe(source)


# ---------------------------------------------------------------- aggregates


def _fake_table(recipe, cells, values):
    """values: {(checkpoint, quantizer): {task: value} | None}."""
    records = {}
    for cell in cells:
        tasks = values.get((cell.checkpoint.name, cell.quantizer_name))
        if tasks is not None:
            scores = {
                t: {"metric": "acc", "value": v, "stderr": 0.01, "higher_is_better": True}
                for t, v in tasks.items()
            }
            metrics = {"perplexity": {"embedded": 10.0}, "tasks": scores}
            records[cell.key] = Record.ok(cell, recipe, 0.0, metrics=metrics)
    return ResultsTable(cells, records)


def test_recovery_and_average_use_the_same_checkpoints_fp_and_missing_stays_missing(
    tmp_path, llama_dir
):
    source = write_recipe(
        tmp_path / "r.yaml",
        f"""
name: agg
checkpoints: [{{name: a, path: {llama_dir}}}, {{name: b, path: {llama_dir}}}]
quantizers:
  - {{name: w8a8, method: rtn, weights: {{bits: 8}}, activations: {{bits: 8}}}}
  - {{name: w4a4, method: rtn, weights: {{bits: 4}}, activations: {{bits: 4}}}}
eval:
  perplexity: [{{data: embedded, seq_len: 64}}]
  tasks: [piqa, boolq]
""",
    )
    recipe = load_recipe(source)
    cells = [  # planned by hand: piqa and boolq need their data files to plan
        Cell(
            "agg", c, q, hashlib.sha256(f"{c.name}-{q}".encode()).hexdigest(), CheckpointIdentity()
        )
        for c in recipe.checkpoints
        for q in [None, *recipe.quantizers]
    ]
    values = {
        ("a", "fp"): {"piqa": 0.6, "boolq": 0.4},  # avg 0.5
        ("a", "w8a8"): {"piqa": 0.5, "boolq": 0.3},  # avg 0.4 -> 0.8 of a's fp
        ("a", "w4a4"): {"piqa": 0.5},  # boolq missing -> avg missing
        ("b", "fp"): {"piqa": 0.9, "boolq": 0.7},  # avg 0.8
        ("b", "w8a8"): {"piqa": 0.8, "boolq": 0.8},  # avg 0.8 -> 1.0 of b's fp
        ("b", "w4a4"): None,  # no result
    }
    records = {
        (r["checkpoint"], r["quantizer"]): r
        for r in summary(recipe, _fake_table(recipe, cells, values))
    }
    assert records[("a", "fp")]["average"] == pytest.approx(0.5)
    assert records[("a", "w8a8")]["recovery"] == pytest.approx(0.8)
    assert records[("a", "w8a8")]["delta"] == pytest.approx(-0.1)
    assert records[("b", "w8a8")]["recovery"] == pytest.approx(1.0)
    assert records[("a", "w8a8")]["tasks"]["boolq"]["recovery"] == pytest.approx(0.75)
    for missing in (("a", "w4a4"), ("b", "w4a4")):
        assert records[missing]["average"] is None and records[missing]["recovery"] is None
    assert records[("a", "w4a4")]["tasks"]["piqa"]["value"] == 0.5
    assert records[("a", "w4a4")]["tasks"]["boolq"]["value"] is None

    text = "\n".join(tasks_section(recipe, _fake_table(recipe, cells, values)))
    rows = {line.split("|")[2].strip(): line for line in text.splitlines() if line.count("|") > 8}
    assert "80.0%" in rows["w8a8"] and "100.0%" in rows["w8a8"]  # a: 0.8, b: 1.0
    assert rows["w4a4"].count(MISSING) == 5  # a: avg, recovery; b (no result): those and ppl
    assert not re.search(r"\|\s*\**0\.0%?\**\s*\|", text)  # no missing value shown as 0

    # without b's fp, b's quantized cells have no recovery, rather than one against a's fp
    values[("b", "fp")] = None
    records = {
        (r["checkpoint"], r["quantizer"]): r
        for r in summary(recipe, _fake_table(recipe, cells, values))
    }
    assert records[("b", "w8a8")]["average"] == pytest.approx(0.8)
    assert records[("b", "w8a8")]["recovery"] is None


def test_document_scores_only_where_the_value_is_their_mean():
    samples = [{"doc_id": 2, "acc": 1.0}, {"doc_id": 0, "acc": 0.0}, {"doc_id": 1, "acc": 1.0}]
    assert document_scores(samples, "acc", 2 / 3) == [0, 1, 1]
    assert document_scores(samples, "acc", 0.5) is None  # not a mean of these scores
    rolling = [{"doc_id": 0, "perplexity": [-3.0, 4]}]
    assert document_scores(rolling, "perplexity", 2.1) is None
    assert document_scores(None, "acc", 0.5) is None


def test_average_is_missing_when_a_task_is():
    entries = {"x": {"value": 0.5}, "y": {"value": None}}
    assert zero_shot_average(entries, ["x"]) == 0.5
    assert zero_shot_average(entries, ["x", "y"]) is None
    assert zero_shot_average(entries, ["x", "z"]) is None


# ---------------------------------------------------------------- resume


def test_interrupted_task_run_resumes_from_the_request_cache(tiny_lm, tmp_path):
    model, tokenizer = tiny_lm
    options = SimpleNamespace(
        batch_size=2, limit=5, num_fewshot=0, bootstrap_iters=0, log_samples=False
    )
    specs = [SimpleNamespace(name="embedded_mc", limit=None, num_fewshot=None)]
    (fresh,) = evaluate_tasks(model, tokenizer, specs, options, progress=False)

    calls = {"n": 0}

    def interrupt(*_):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt

    cache = tmp_path / "cache" / "lm-eval-cellkey"
    handle = model.register_forward_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            evaluate_tasks(model, tokenizer, specs, options, cache=cache, progress=False)
    finally:
        handle.remove()
    assert request_cache_files(cache)

    (resumed,) = evaluate_tasks(model, tokenizer, specs, options, cache=cache, progress=False)
    assert resumed.requests == fresh.requests == 20
    assert 0 < resumed.cached_requests < resumed.requests  # the batches finished before
    assert resumed.metrics == pytest.approx(fresh.metrics)
    (again,) = evaluate_tasks(model, tokenizer, specs, options, cache=cache, progress=False)
    assert again.cached_requests == again.requests


# ---------------------------------------------------------------- end to end


@needs_data
def test_recipe_with_tasks_runs_to_a_task_leaderboard(tmp_path, llama_dir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    source = _recipe(
        tmp_path,
        llama_dir,
        "[embedded_mc, {name: piqa, limit: 3}]",
        "[{name: w4a4, method: rtn, weights: {bits: 4}, activations: {bits: 4}}]",
    )
    results = tmp_path / "results"
    assert main(["run", str(source), "--results", str(results), "--no-progress"]) == 0
    runs = sorted((results / "t" / "runs").glob("*.json"))
    assert len(runs) == 2
    for path in runs:
        data = json.loads(path.read_text())
        assert set(data["metrics"]["tasks"]) == {"embedded_mc", "piqa"}
        assert data["metrics"]["tasks"]["piqa"]["metric"] == "acc_norm"
        assert data["details"]["tasks"]["piqa"]["samples"] == 3
        assert data["details"]["tasks"]["embedded_mc"]["samples"] == 4
        assert data["metrics"]["zero_shot_average"] is not None
    board = (results / "t" / "LEADERBOARD.md").read_text()
    assert "## Zero-shot tasks" in board and "### a: per task" in board
    assert (results / "t" / "plots" / "recovery.png").stat().st_size > 0
    cells = json.loads((results / "t" / "tasks.json").read_text())["cells"]
    assert cells[0]["recovery"] is None and cells[1]["recovery"] is not None
    assert not list((results / "t" / "cache").glob("*.db"))  # discarded once written
