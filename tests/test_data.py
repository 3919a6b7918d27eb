"""Text sources: the embedded corpus's splits and WikiText-2's GPTQ row convention."""

from __future__ import annotations

import pytest

from qbench.data.sources import data_dir, embedded_rows, load_text, wikitext2_rows
from qbench.errors import QBenchError


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
