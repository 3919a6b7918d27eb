"""The README's code runs: the "Use from Python" section's examples in order, the quickstart's
recipe loads and its Python mirror runs (on a tiny local model), and every relative link of
the README and docs/ pages reaches a file (and a heading, where it names one)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import REPO
from transformers import LlamaConfig, LlamaForCausalLM

import qbench

README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]


def _section(text: str, heading: str) -> str:
    """The text under `heading` (a markdown heading line) up to the next heading of its level."""
    level = heading.split(" ")[0]
    start = text.index(f"\n{heading}\n")
    end = text.find(f"\n{level} ", start + len(heading) + 2)
    return text[start : end if end != -1 else len(text)]


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def _no_data_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No WikiText-2: calibration and text default to the embedded corpus, as on a clone."""
    monkeypatch.setenv("QBENCH_DATA_DIR", str(tmp_path / "no-data"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_the_use_from_python_examples_run(tmp_path, monkeypatch, capsys):
    """Every python block of "Use from Python", in order, in one namespace, from the
    repository root (they load recipes/default.yaml); the asserts in them hold."""
    _no_data_folder(tmp_path, monkeypatch)
    monkeypatch.chdir(REPO)
    blocks = _blocks(_section(README.read_text(), "## Use from Python"), "python")
    assert len(blocks) >= 6  # the model, quantizer, evaluate, quantized, load_recipe, quantize_
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md (Use from Python)", "exec"), namespace)
    out = capsys.readouterr().out
    # what the comments beside the prints say
    assert "rtn | rtn: int4 channel / int8 token" in out
    assert "('weights', 'bits')" in out
    assert "{'weights': [49152, 49152], 'activations': [49152, 49152]}" in out
    assert "['w8a8', 'w4a16-g32', 'w4a8', 'w4a4']" in out
    assert "[32768, 49152]" in out and "is already quantized" in out
    assert isinstance(namespace["report"], dict)


def test_the_quickstart_recipe_loads(tmp_path):
    quickstart = _section(README.read_text(), "## Quickstart")
    [recipe] = [b for b in _blocks(quickstart, "yaml") if b.startswith("name:")]
    (tmp_path / "mine.yaml").write_text(recipe)
    loaded = qbench.load_recipe(tmp_path / "mine.yaml")
    assert [c.name for c in loaded.checkpoints] == ["my-model", "smollm2"]
    assert loaded.eval.perplexity[0].column == "wikitext2"
    assert [q.label() for q in loaded.quantizers][-1] == "gptq: int4 g64 / fp"


def test_the_quickstarts_python_runs_on_a_local_checkpoint(tmp_path, monkeypatch, tokenizer_dir):
    """The quickstart's Python on a tiny Llama saved as ./my-checkpoint, with the quickstart's
    recipe at recipes/mine.yaml, its WikiText-2 entry swapped for 4 windows of the embedded
    corpus under the same column name (no data folder here)."""
    _no_data_folder(tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    quickstart = _section(README.read_text(), "## Quickstart")
    [recipe] = [b for b in _blocks(quickstart, "yaml") if b.startswith("name:")]
    entry = "{data: wikitext2, seq_len: 2048, max_windows: 40}"
    assert entry in recipe
    small = "{name: wikitext2, data: embedded, split: test, seq_len: 64, max_windows: 4}"
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "mine.yaml").write_text(recipe.replace(entry, small))
    torch.manual_seed(0)
    shape = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4)
    config = LlamaConfig(vocab_size=300, num_hidden_layers=2, num_key_value_heads=2, **shape)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "my-checkpoint")
    for file in tokenizer_dir.iterdir():
        (tmp_path / "my-checkpoint" / file.name).write_bytes(file.read_bytes())
    [code] = _blocks(_section(quickstart, "### The same from Python"), "python")
    namespace: dict = {}
    exec(compile(code, "README.md (quickstart)", "exec"), namespace)
    assert namespace["fp"] > 1 and namespace["ppl"] > 1
    assert namespace["config"].name == "gptq-w4a16-g64"  # the loop reached the last quantizer


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_reach_files_and_headings(page):
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.DOTALL | re.MULTILINE)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links or page != README
    for link in links:
        if link.startswith(("http://", "https://", "mailto:")):
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        assert path.exists(), f"{page.name}: {link} does not exist"
        if anchor and path.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", path.read_text(), flags=re.MULTILINE)
            assert anchor in {_slug(h) for h in headings}, f"{page.name}: no heading #{anchor}"
