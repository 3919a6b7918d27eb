"""Every class of bad input is one line naming the file and the field, and a non-zero exit."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from conftest import write_recipe

from qbench.cli import main

VALID = """name: bad
checkpoints:
  - {name: m, path: LLAMA}
quantizers:
  - {name: w8, method: rtn, weights: {bits: 8}}
eval:
  perplexity: [{data: embedded, seq_len: 32, max_windows: 1}]
"""


def _one_error(capsys, argv: list[str]) -> str:
    """Run the CLI; it must exit 2 with exactly one line on stderr; return that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qbench: error: "), err
    return err[0].removeprefix("qbench: error: ")


def _run(path: Path, tmp_path: Path) -> list[str]:
    return ["run", str(path), "--results", str(tmp_path / "results"), "--no-progress"]


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("method: rtn", "method: 5", "quantizers[0]: method: must be a name, not 5; known:"),
        ("method: rtn", "method: [rtn]", "quantizers[0]: method: must be a name, not ['rtn']"),
        ("method: rtn, ", "", "quantizers[0]: method: is missing; known: "),
        ("name: bad\n", "name: bad\nseed: 1180591620717411303424\n", "seed: Input should be less"),
        ("name: bad\n", "name: bad\nresources: {gpus_per_cell: .inf}\n", "gpus_per_cell: Input"),
        ("name: bad\n", "name: bad\nresources: {gpus_per_cell: .nan}\n", "finite number"),
        ("name: bad\n", 'name: "bad\\n"\n', r"name: 'bad\n' must be at most 100 letters"),
        ("name: m,", 'name: "a|b",', "checkpoints[0].name: 'a|b' must be"),
        ("name: w8,", 'name: "w8\\n",', r"quantizers[0].name: 'w8\n' must be"),
        ("max_windows: 1}", 'max_windows: 1, name: "x|y"}', "eval.perplexity[0].name: 'x|y'"),
        ("max_windows: 1}]", 'max_windows: 1}]\n  tasks: ["piqa|x"]', "eval.tasks[0].name:"),
        ("path: LLAMA}", "path: LLAMA, trust_remote_code: 'yes'}", "trust_remote_code: Input"),
        ("path: LLAMA}", "hf: a/b, revision: ../../x}", "checkpoints[0].revision: '../../x' is"),
        (
            "bits: 8}",
            "bits: 8, clip: .nan}",
            "quantizers[0].weights.clip: Input should be a finite",
        ),
        ("max_windows: 1", "max_windows: 1, batch_size: 9999999999999", "batch_size: Input"),
        ("{name: m, path: LLAMA}", "m", "checkpoints[0]: Input should be a valid dictionary"),
        ("perplexity: [", "perplexity: {x: 1}\n  p: [", "eval: unknown field 'p'"),
        ("name: bad\n", "name: bad\nname: worse\n", "not valid YAML: line 2, column 1: key 'name'"),
        ("name: bad\n", "name: bad\n? [a]\n: 1\n", "line 2, column 3: a mapping key must be"),
        ("name: bad\n", "name: bad\nx: !!python/object/apply:os.system [id]\n", "constructor"),
        (
            "name: bad\n",
            "name: [bad\n",
            "not valid YAML: line 2, column 12: while parsing a flow sequence",
        ),
    ],
)
def test_recipe_errors_are_one_line(tmp_path, llama_dir, capsys, old, new, expected):
    assert old in VALID
    text = VALID.replace(old, new).replace("LLAMA", str(llama_dir))
    path = write_recipe(tmp_path / "r.yaml", text)
    message = _one_error(capsys, _run(path, tmp_path))
    assert message.startswith(f"{path}: ") and expected in message


@pytest.mark.parametrize(
    ("write", "expected"),
    [
        (lambda p: p.mkdir(), "a directory, not a recipe file"),
        (lambda p: p.write_bytes(b"name: x\n\xff\n"), "not UTF-8 text (byte 0xff at offset 8)"),
        (lambda p: p.write_text(""), "a recipe is a mapping with name:, checkpoints:, eval:"),
        (lambda p: p.write_text("- a\n"), "a recipe is a mapping"),
        (lambda p: os.mkfifo(p), "not a regular file"),
        (lambda p: p.write_text("#" * (300 << 10)), "larger than 262144 bytes"),
        (lambda p: p.write_text("a: " + "[" * 100_000 + "]" * 100_000), "nesting depth exceeds"),
        (lambda p: p.write_text("- " * 100_000 + "x"), "line 1: the nesting depth exceeds 32"),
    ],
)
def test_unreadable_recipe_files_are_one_line(tmp_path, capsys, write, expected):
    path = tmp_path / "r.yaml"
    write(path)
    start = time.perf_counter()
    message = _one_error(capsys, _run(path, tmp_path))
    assert message.startswith(f"{path}: ") and expected in message
    assert time.perf_counter() - start < 5  # no parse of 100,000 levels, no hang on a FIFO


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file; cannot test here")
def test_an_unreadable_recipe_is_one_line(tmp_path, capsys):
    path = write_recipe(tmp_path / "r.yaml", VALID)
    path.chmod(0)
    assert _one_error(capsys, _run(path, tmp_path)) == f"{path}: cannot read: Permission denied"


def _merge_bomb() -> str:
    """Nested `<<: [*a, *a, ...]` anchors: twelve levels of nine merges of an 11-key mapping,
    838 bytes that expand to 11 * 9**12 (3e12) keys."""
    lines = ["#bomb", "a0: &a0 {" + ", ".join(f"k{i}: {i}" for i in range(11)) + "}"]
    for level in range(1, 13):
        lines.append(f"a{level}: &a{level}")
        lines.append("  <<: [" + ", ".join([f"*a{level - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_alias_and_merge_key_bombs_fail_fast(tmp_path, capsys):
    bomb = _merge_bomb()
    assert len(bomb.encode()) == 838
    laughs = "a0: &a0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]\n" for i in range(1, 10)
    )
    for text in (bomb, laughs):
        path = write_recipe(tmp_path / "bomb.yaml", text)
        start = time.perf_counter()
        message = _one_error(capsys, _run(path, tmp_path))
        assert time.perf_counter() - start < 1
        assert "the number of nodes (aliases and merges expanded) exceeds 20000" in message


def test_forty_thousand_keys_fail_in_well_under_a_second(tmp_path, capsys):
    path = write_recipe(tmp_path / "keys.yaml", "".join(f"k{i}: {i}\n" for i in range(40_000)))
    start = time.perf_counter()
    message = _one_error(capsys, _run(path, tmp_path))
    assert time.perf_counter() - start < 1 and "larger than" in message
    # within the limits, a duplicate among thousands of keys is found (a set, not a scan)
    keys = [f"k{i}: {i}" for i in range(5_000)]
    path.write_text("{" + ", ".join([*keys, "k42: 0"]) + "}\n")
    assert "key 'k42' appears twice in one mapping" in _one_error(capsys, _run(path, tmp_path))


def test_results_naming_a_file_is_one_line(tmp_path, llama_dir, capsys):
    path = write_recipe(tmp_path / "r.yaml", VALID.replace("LLAMA", str(llama_dir)))
    (tmp_path / "file").write_text("")
    for command in ("run", "report", "gate"):
        argv = [command, str(path), "--results", str(tmp_path / "file")]
        expected = f"--results: '{tmp_path / 'file'}' is not a directory; give the results folder"
        assert _one_error(capsys, argv) == expected


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("hidden_size", "64", "hidden_size': TypeError: Field 'hidden_size' expected int, got str"),
        ("num_hidden_layers", -1, "num_hidden_layers: must be a positive integer, got -1"),
        ("vocab_size", 0, "vocab_size: must be a positive integer, got 0"),
        ("model_type", 5, "model type `5`"),
    ],
)
def test_bad_config_json_is_one_line(tmp_path, llama_dir, capsys, field, value, expected):
    checkpoint = shutil.copytree(llama_dir, tmp_path / "m")
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps(config | {field: value}))
    path = write_recipe(tmp_path / "r.yaml", VALID.replace("LLAMA", str(checkpoint)))
    message = _one_error(capsys, _run(path, tmp_path))
    assert message.startswith(f"{path}: checkpoints[0].path: ") and expected in message
    assert f"{checkpoint / 'config.json'}" in message
