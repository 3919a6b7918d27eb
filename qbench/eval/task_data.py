"""Documents for qbench's local lm-eval tasks: release files on disk, and the embedded task.

Each reader turns one benchmark's original release files (formats in
../shared/data/README.md) into the rows and split names of the Hugging Face dataset that
lm-eval's own task reads, so that lm-eval's prompts apply to them unchanged:

| task | release files (under $QBENCH_DATA_DIR) | HF dataset lm-eval reads |
|---|---|---|
| piqa | eval/piqa/valid.jsonl + valid-labels.lst | baber/piqa, validation |
| arc_easy, arc_challenge | eval/arc/ARC-*-{Test,Dev}.jsonl | allenai/ai2_arc, test (+ dev) |
| winogrande | eval/winogrande/dev.jsonl | allenai/winogrande winogrande_xl, validation |
| boolq | eval/boolq/val.jsonl | aps/super_glue boolq, validation |
| lambada_openai | eval/lambada_openai/lambada_test.jsonl | EleutherAI/lambada_openai, test |
| hellaswag | eval/hellaswag/hellaswag_val.jsonl | Rowan/hellaswag, validation |

The task YAMLs in qbench/eval/task_defs/ name these functions as `custom_dataset`.
Splits that lm-eval samples few-shot examples from when they exist (train) have no local
release file; lm-eval then samples them from the validation split.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qbench.data.sources import data_dir, embedded_rows
from qbench.errors import QBenchError


@dataclass(frozen=True)
class LocalFiles:
    """The release files of one task: required ones, and optional extra splits."""

    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    note: str = ""


LOCAL_FILES: dict[str, LocalFiles] = {
    "piqa": LocalFiles(("eval/piqa/valid.jsonl", "eval/piqa/valid-labels.lst")),
    "arc_easy": LocalFiles(("eval/arc/ARC-Easy-Test.jsonl",), ("eval/arc/ARC-Easy-Dev.jsonl",)),
    "arc_challenge": LocalFiles(
        ("eval/arc/ARC-Challenge-Test.jsonl",), ("eval/arc/ARC-Challenge-Dev.jsonl",)
    ),
    "winogrande": LocalFiles(("eval/winogrande/dev.jsonl",)),
    "boolq": LocalFiles(("eval/boolq/val.jsonl",)),
    "lambada_openai": LocalFiles(("eval/lambada_openai/lambada_test.jsonl",)),
    "hellaswag": LocalFiles(
        ("eval/hellaswag/hellaswag_val.jsonl",),
        note="HellaSwag's validation file (rowanz/hellaswag data/hellaswag_val.jsonl)",
    ),
}


def local_paths(task: str, root: Path | None = None) -> tuple[list[Path], list[Path]]:
    """(required, optional) paths of `task`'s release files under the data folder."""
    root = root if root is not None else data_dir()
    base = root if root is not None else Path("$QBENCH_DATA_DIR")
    files = LOCAL_FILES[task]
    return [base / f for f in files.required], [base / f for f in files.optional]


def missing_files(task: str, root: Path | None = None) -> list[Path]:
    """The required release files of `task` that are not on disk (all of them without a root)."""
    root = root if root is not None else data_dir()
    required, _ = local_paths(task, root)
    return required if root is None else [p for p in required if not p.is_file()]


def _jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def _labels(path: Path) -> list[int]:
    return [int(line) for line in path.read_text(encoding="utf-8").split()]


def _dataset(splits: dict[str, list[dict[str, Any]]]) -> Any:
    import datasets

    return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()})


def _paths(task: str) -> tuple[list[Path], list[Path]]:
    if missing := missing_files(task):
        raise QBenchError(
            f"task '{task}': missing release file(s) {', '.join(map(str, missing))}; "
            "set QBENCH_DATA_DIR to the folder holding them"
        )
    required, optional = local_paths(task)
    return required, [p for p in optional if p.is_file()]


def read_piqa() -> dict[str, list[dict[str, Any]]]:
    (questions, labels), _ = _paths("piqa")
    rows, gold = _jsonl(questions), _labels(labels)
    if len(rows) != len(gold):
        raise QBenchError(f"{questions} has {len(rows)} rows but {labels} {len(gold)} labels")
    return {
        "validation": [
            {"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": g}
            for r, g in zip(rows, gold, strict=True)
        ]
    }


def _arc_row(row: dict[str, Any]) -> dict[str, Any]:
    choices = row["question"]["choices"]
    return {
        "id": row["id"],
        "question": row["question"]["stem"],
        "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
        "answerKey": row["answerKey"],
    }


def _read_arc(task: str) -> dict[str, list[dict[str, Any]]]:
    (test,), optional = _paths(task)
    splits = {"test": [_arc_row(r) for r in _jsonl(test)]}
    for path in optional:  # the Dev file
        splits["validation"] = [_arc_row(r) for r in _jsonl(path)]
    return splits


def read_arc_easy() -> dict[str, list[dict[str, Any]]]:
    return _read_arc("arc_easy")


def read_arc_challenge() -> dict[str, list[dict[str, Any]]]:
    return _read_arc("arc_challenge")


def read_winogrande() -> dict[str, list[dict[str, Any]]]:
    (dev,), _ = _paths("winogrande")
    keep = ("sentence", "option1", "option2", "answer")
    return {"validation": [{k: str(r[k]) for k in keep} for r in _jsonl(dev)]}


def _boolq_label(label: Any) -> int:
    """SuperGLUE's "true"/"false" (strings in the release file, or JSON booleans) -> HF's 1/0."""
    text = str(label).strip().lower()
    if text not in {"true", "false", "1", "0"}:
        raise QBenchError(f"boolq: label {label!r} is not true/false")
    return int(text in {"true", "1"})


def read_boolq() -> dict[str, list[dict[str, Any]]]:
    (val,), _ = _paths("boolq")
    return {
        "validation": [
            {
                "question": r["question"],
                "passage": r["passage"],
                "idx": r["idx"],
                "label": _boolq_label(r["label"]),
            }
            for r in _jsonl(val)
        ]
    }


def read_lambada_openai() -> dict[str, list[dict[str, Any]]]:
    (test,), _ = _paths("lambada_openai")
    return {"test": [{"text": r["text"]} for r in _jsonl(test)]}


def read_hellaswag() -> dict[str, list[dict[str, Any]]]:
    (val,), _ = _paths("hellaswag")
    keep = ("ind", "activity_label", "ctx_a", "ctx_b", "ctx", "endings", "source_id", "split")
    return {
        "validation": [
            {**{k: r[k] for k in keep if k in r}, "label": str(r["label"])} for r in _jsonl(val)
        ]
    }


READERS = {
    "piqa": read_piqa,
    "arc_easy": read_arc_easy,
    "arc_challenge": read_arc_challenge,
    "winogrande": read_winogrande,
    "boolq": read_boolq,
    "lambada_openai": read_lambada_openai,
    "hellaswag": read_hellaswag,
}
assert set(READERS) == set(LOCAL_FILES)


# ---------------------------------------------------------------- lm-eval custom_dataset hooks


def piqa(**_: Any) -> Any:
    return _dataset(read_piqa())


def arc_easy(**_: Any) -> Any:
    return _dataset(read_arc_easy())


def arc_challenge(**_: Any) -> Any:
    return _dataset(read_arc_challenge())


def winogrande(**_: Any) -> Any:
    return _dataset(read_winogrande())


def boolq(**_: Any) -> Any:
    return _dataset(read_boolq())


def lambada_openai(**_: Any) -> Any:
    return _dataset(read_lambada_openai())


def hellaswag(**_: Any) -> Any:
    return _dataset(read_hellaswag())


def embedded_mc(**_: Any) -> Any:
    return _dataset({"test": embedded_mc_docs()})


# ---------------------------------------------------------------- upstream prompt functions
# Copied from lm-eval 0.4 (MIT): lm_eval/tasks/winogrande/preprocess_winogrande.py and
# lm_eval/tasks/hellaswag/utils.py, so the local definitions do not import task folders.


def winogrande_doc_to_text(doc: dict[str, Any]) -> int:
    answer_to_num = {"1": 0, "2": 1}
    return answer_to_num[doc["answer"]]


def winogrande_doc_to_target(doc: dict[str, Any]) -> str:
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc: dict[str, Any]) -> list[str]:
    idx = doc["sentence"].index("_")
    options = [doc["option1"], doc["option2"]]
    return [doc["sentence"][:idx] + opt for opt in options]


def _hellaswag_preprocess(text: str) -> str:
    text = text.strip()
    # NOTE: Brackets are artifacts of the WikiHow dataset portion of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def hellaswag_process_docs(dataset: Any) -> Any:
    def _process_doc(doc: dict[str, Any]) -> dict[str, Any]:
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {
            "query": _hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
            "choices": [_hellaswag_preprocess(ending) for ending in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(_process_doc)


# ---------------------------------------------------------------- the embedded task

EMBEDDED_MC_CHOICES = 4
EMBEDDED_MC_CONTEXT = 2  # sentences of context before the one to pick
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _prose_paragraph(paragraph: str) -> str | None:
    """A paragraph as one line of prose, or None for headings, grammar and code."""
    text = textwrap.dedent(paragraph).strip()
    if not text or text.startswith((">>>", "...")) or "::=" in text:
        return None
    if sum(c.isalpha() for c in text) < 0.6 * len(text):  # code, tables, rules
        return None
    return " ".join(text.split())


def _sentences(document: str) -> list[list[str]]:
    """Every sentence of every prose paragraph, grouped by paragraph."""
    paragraphs = (_prose_paragraph(p) for p in re.split(r"\n\s*\n", document))
    return [_SENTENCE_END.split(p) for p in paragraphs if p]


def _usable(sentence: str) -> bool:
    return 20 <= len(sentence) <= 300


def _rng(*parts: object) -> random.Random:
    seed = hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()
    return random.Random(int(seed[:16], 16))


def embedded_mc_docs(rows: list[str] | None = None) -> list[dict[str, Any]]:
    """Pick the true next sentence among distractors from other documents of the split.

    From every prose paragraph of the embedded corpus's held-out (test) split, each sentence
    after the first becomes one item: the (up to two) sentences right before it are the
    context (sentences outside 20-300 characters are neither context nor answer), and
    three distractors are drawn, with a generator seeded by the item, from sentences of
    the *other* documents of the split whose text differs from the answer. The answer's
    position is drawn the same way. Same corpus, same items.
    """
    rows = embedded_rows("test") if rows is None else rows
    per_document = [[s for p in _sentences(row) for s in p if _usable(s)] for row in rows]
    docs = []
    for d, row in enumerate(rows):
        others = sorted({s for e, sents in enumerate(per_document) if e != d for s in sents})
        for paragraph in _sentences(row):
            for i in range(1, len(paragraph)):
                answer, context = paragraph[i], []
                for before in reversed(paragraph[max(0, i - EMBEDDED_MC_CONTEXT) : i]):
                    if not _usable(before):  # the context is what immediately precedes
                        break
                    context.insert(0, before)
                if not _usable(answer) or not context:
                    continue
                rng = _rng("embedded_mc", d, len(docs), answer)
                pool = [s for s in others if s != answer]
                choices = rng.sample(pool, EMBEDDED_MC_CHOICES - 1)
                label = rng.randrange(EMBEDDED_MC_CHOICES)
                choices.insert(label, answer)
                docs.append(
                    {
                        "id": len(docs),
                        "document": d,
                        "context": " ".join(context),
                        "choices": choices,
                        "label": label,
                    }
                )
    return docs
