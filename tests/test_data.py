"""Text sources: the embedded corpus's splits, WikiText-2's and C4's GPTQ conventions, a user's
files, hub datasets, and the recipe fields that name them."""

from __future__ import annotations

import re

import pytest
from conftest import write_recipe

from qbench.data.sources import (
    C4_SHARD,
    TEXT_SOURCES,
    c4_rows,
    data_dir,
    embedded_rows,
    load_text,
    wikitext2_rows,
)
from qbench.errors import QBenchError
from qbench.plan import plan
from qbench.recipe import PerplexitySpec, RecipeError, load_recipe


def test_embedded_splits_are_disjoint_deterministic_and_complete():
    from pydoc_data.topics import topics

    splits = {s: embedded_rows(s) for s in ("train", "valid", "test")}
    assert all(splits.values())
    assert sum(len(rows) for rows in splits.values()) == len(topics)
    assert not set(splits["test"]) & set(splits["train"])
    assert embedded_rows("test") == splits["test"]
    assert len("".join(splits["train"])) > 8 * len("".join(splits["test"]))


def test_wikitext_rows_follow_the_gptq_convention(tmp_path, monkeypatch):
    folder = tmp_path / "wikitext-2-raw"
    folder.mkdir()
    (folder / "wiki.test.raw").write_text(" \n = Title = \n \n Body line .\n")
    monkeypatch.setenv("QBENCH_DATA_DIR", str(tmp_path))
    assert wikitext2_rows("test") == ["", " = Title = \n", "", " Body line .\n"]
    assert load_text("wikitext2", "test") == "\n\n = Title = \n\n\n\n\n Body line .\n"


def test_real_wikitext2_test_split_has_the_published_rows():
    if data_dir() is None or not (data_dir() / "wikitext-2-raw").is_dir():
        pytest.skip("../shared/data is not beside this checkout")
    rows = wikitext2_rows("test")
    assert len(rows) == 4358
    assert rows[:3] == ["", " = Robert Boulter = \n", ""]


def test_missing_wikitext_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("QBENCH_DATA_DIR", str(tmp_path))
    with pytest.raises(QBenchError, match=r"wikitext2 'valid': no local file at .*wiki.valid.raw"):
        wikitext2_rows("valid")


# ---------------------------------------------------------------- c4


def _c4_shard(folder, documents: list[str]) -> None:
    import gzip
    import json

    (folder / "c4").mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / "c4" / C4_SHARD, "wt", encoding="utf-8") as file:
        for i, text in enumerate(documents):
            file.write(json.dumps({"text": text, "timestamp": "t", "url": f"u{i}"}) + "\n")


def test_c4_follows_gptq_and_quarot_first_1100_documents_joined_with_a_space(tmp_path, monkeypatch):
    documents = [f"Document {i}.\nSecond line {i}." for i in range(1105)]
    _c4_shard(tmp_path, documents)
    monkeypatch.setenv("QBENCH_DATA_DIR", str(tmp_path))
    assert c4_rows("validation") == documents
    assert load_text("c4", "validation") == " ".join(documents[:1100])
    spec = PerplexitySpec(data="c4")
    assert (spec.split, spec.max_documents, spec.max_windows) == ("validation", 1100, 256)
    assert spec.text() == " ".join(documents[:1100])
    assert "GPTQ's and QuaRot's file" in spec.describe() and "single space" in spec.describe()
    everything = PerplexitySpec(data="c4", max_documents=None, max_windows=None)
    assert everything.text() == " ".join(documents) and everything.max_windows is None


def test_c4_sample_is_read_one_document_per_line_and_labelled_a_sample(tmp_path, monkeypatch):
    (tmp_path / "c4").mkdir()
    (tmp_path / "c4" / "c4.utf8").write_text("first doc\nsecond doc\n\nthird doc\n")
    monkeypatch.setenv("QBENCH_DATA_DIR", str(tmp_path))
    assert c4_rows("validation") == ["first doc", "second doc", "third doc"]
    described = PerplexitySpec(data="c4").describe()
    assert "3-document sample" in described and "NOT C4's validation set" in described


def test_shared_c4_sample_has_its_118_documents():
    if data_dir() is None or not (data_dir() / "c4" / "c4.utf8").is_file():
        pytest.skip("../shared/data is not beside this checkout")
    assert len(c4_rows("validation")) == 118
    assert "118-document sample" in TEXT_SOURCES.get("c4").describe("validation")


def test_c4_without_local_files_loads_gptqs_shard_from_the_hub(tmp_path, monkeypatch):
    import datasets

    calls = []

    def load_dataset(name, config, split, data_files=None):
        calls.append((name, config, split, data_files))
        return datasets.Dataset.from_dict({"text": ["a", "b"], "url": ["u", "v"]})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setenv("QBENCH_DATA_DIR", str(tmp_path))
    assert c4_rows("validation") == ["a", "b"]
    assert calls == [("allenai/c4", None, "validation", {"validation": f"en/{C4_SHARD}"})]
    assert "from the hub" in TEXT_SOURCES.get("c4").describe("validation")


def test_c4_offline_without_files_names_both_files(tmp_path, monkeypatch):
    monkeypatch.setenv("QBENCH_DATA_DIR", str(tmp_path))
    with pytest.raises(QBenchError, match=r"c4 'validation': no c4-validation\.00000-of-00008"):
        c4_rows("validation")


# ---------------------------------------------------------------- a user's text


def test_text_path_reads_a_file_or_a_folders_txt_files_in_order(tmp_path):
    (tmp_path / "one.txt").write_bytes("\ufeffLine one.\r\nLine two.\r\n".encode())
    folder = tmp_path / "docs"
    (folder / "b").mkdir(parents=True)
    (folder / "b" / "z.txt").write_text("Zed.")
    (folder / "a.txt").write_text("Ay.")
    (folder / "notes.md").write_text("not read")
    assert PerplexitySpec(data="text", path=str(tmp_path / "one.txt")).text() == (
        "Line one.\nLine two.\n"
    )
    assert PerplexitySpec(data="text", path=str(folder)).text() == "Ay.\n\nZed."
    first = PerplexitySpec(data="text", path=f"{folder}/", max_documents=1)
    assert first.text() == "Ay." and "the first 1 documents" in first.describe()
    assert "(a folder: each *.txt below it, sorted, one document)" in first.describe()


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: p / "absent.txt", r"eval.perplexity\[0\].path: no such file or folder"),
        (lambda p: (p / "empty").mkdir() or p / "empty", r"\.path: folder .* holds no .txt"),
        (lambda p: (p / "blank.txt").write_text(" \n") and p / "blank.txt", r"holds no text"),
        (
            lambda p: (p / "latin.txt").write_bytes(b"caf\xe9") and p / "latin.txt",
            r"\.path: '.*latin.txt' is not UTF-8 \(byte 0xe9 at offset 3\); convert it",
        ),
    ],
)
def test_bad_text_path_is_one_error_at_plan_time(tmp_path, llama_dir, make, expected):
    target = make(tmp_path)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"name: r\ncheckpoints: [{{name: a, path: {llama_dir}}}]\n"
        f"eval: {{perplexity: [{{data: text, path: '{target}', seq_len: 16}}]}}\n",
    )
    with pytest.raises(RecipeError, match=expected) as error:
        plan(load_recipe(recipe), recipe)
    assert str(error.value).count("\n") == 0


# ---------------------------------------------------------------- a hub dataset


def test_hub_dataset_reads_a_column_once_per_process(tmp_path, monkeypatch):
    import datasets

    calls = []

    def load_dataset(name, config, split, data_files=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"body": ["first", "second", "third"], "n": [1, 2, 3]})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    spec = PerplexitySpec(
        data="hub", dataset="someone/texts", config="en", split="validation",
        text_column="body", max_documents=2,
    )  # fmt: skip
    assert spec.text() == "first\n\nsecond"
    assert spec.text() == "first\n\nsecond" and calls == [("someone/texts", "en", "validation")]
    assert spec.describe().startswith("hub dataset someone/texts, config en, split validation")
    wrong = PerplexitySpec(data="hub", dataset="someone/texts", split="validation")
    with pytest.raises(QBenchError, match=r"has no column 'text'; its columns: body, n"):
        wrong.text()


def test_hub_dataset_offline_is_one_line_naming_the_fields(tmp_path):
    spec = PerplexitySpec(data="hub", dataset="qbench-test/absent", config="x", split="test")
    with pytest.raises(QBenchError) as error:
        spec.text()
    message = str(error.value)
    assert "dataset 'qbench-test/absent', config 'x', split 'test' could not be loaded" in message
    assert "use `data: text, path: FILE`" in message and "\n" not in message


# ---------------------------------------------------------------- the recipe fields


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("{data: text}", "path: required with data: text (a UTF-8 file"),
        ("{data: hub, dataset: a/b}", "split: required with data: hub"),
        ("{data: hub, split: test}", "dataset: required with data: hub"),
        ("{data: text, path: x, split: test}", "split: does not apply to data: text"),
        ("{data: wikitext2, path: x}", "path: does not apply to data: wikitext2"),
        ("{data: c4, text_column: body}", "text_column: does not apply to data: c4"),
        ("{data: corpus}", "split: required with data: corpus (one of train, valid)"),
        ("{data: c4, split: test}", "split 'test' is not one of c4's splits: validation"),
        (
            "{data: c5}",
            "unknown text source 'c5'; known: c4, corpus, embedded, wikitext2; or `text`",
        ),
        ("{data: c4, max_documents: 0}", "max_documents: Input should be greater than"),
    ],
)
def test_perplexity_fields_are_checked_at_load_time(tmp_path, entry, expected):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"name: r\ncheckpoints: [{{name: a, path: x}}]\neval: {{perplexity: [{entry}]}}\n",
    )
    with pytest.raises(RecipeError, match=re.escape(expected)) as error:
        load_recipe(recipe)
    assert "eval.perplexity[0]" in str(error.value)


def test_identity_of_a_spec_without_the_new_fields_is_what_it_was():
    """Keys of recipes written before path / dataset / max_documents existed stay the same."""
    identity = PerplexitySpec(data="embedded", seq_len=64).identity()
    assert identity == {
        "data": "embedded",
        "split": "test",
        "seq_len": 64,
        "batch_size": 8,
        "max_windows": None,
        "name": None,
    }
    assert PerplexitySpec(data="c4").identity()["max_documents"] == 1100
