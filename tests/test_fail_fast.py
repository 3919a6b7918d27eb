"""Issue 20: refusals before any model work, a gate that checks what it reads, loads that
verify what they read, plan-time checks for every step, one line for every bad input.

Each test names the fault it reproduces (its input) and asserts the new behaviour."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import write_recipe
from safetensors.torch import load_file, save_file

from qbench import runner, store
from qbench.cli import main
from qbench.record import REFUSED

RECIPE = """
name: ff
checkpoints: [{{name: m, path: {path}}}]
quantizers:
  - {{name: w8a8, method: rtn, weights: {{bits: 8}}, activations: {{bits: 8}}}}
  - {{name: w2a16, method: rtn, weights: {{bits: 2}}}}
eval:
  perplexity: [{{data: embedded, seq_len: 64, max_windows: 2}}]
gate:
  min_recovery: {{perplexity.embedded: 0.9}}
  quantizers: {{w2a16: {{perplexity.embedded: 1.2}}}}
"""


def _run(recipe: Path, results: Path, *extra: str) -> int:
    return main(["run", str(recipe), "--results", str(results), "--no-progress", *extra])


def _gate(recipe: Path, results: Path, *extra: str) -> int:
    return main(["gate", str(recipe), "--results", str(results), *extra])


def _errors(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("qbench:")]


# ---------------------------------------------------------------- 1. refusals at plan time

REFUSED_RECIPE = """
name: refusing
checkpoints: [{{name: m, path: {path}}}]
quantizers:
  - {{name: w4-g32, method: rtn, weights: {{bits: 4, group: 32}}}}
  - {{name: w8, method: rtn, weights: {{bits: 8}}}}
eval:
  perplexity: [{{data: embedded, seq_len: 32, max_windows: 1}}]
"""


def test_a_refusal_is_listed_before_any_model_work_recorded_and_not_retried(
    tmp_path, llama_dir, capsys, monkeypatch
):
    """Fault: RTN group 32 on a 172-wide MLP computed the fp cell first, then failed the cell,
    exited 1 and retried it on every rerun. Now: listed and recorded as `refused` before any
    load, exit 0, a rerun runs nothing."""
    recipe = write_recipe(tmp_path / "r.yaml", REFUSED_RECIPE.format(path=llama_dir))
    results = tmp_path / "results"
    events = []
    real_load = runner.load_identified
    monkeypatch.setattr(
        runner, "load_identified", lambda *a: events.append("load") or real_load(*a)
    )
    real_refused = store.write_record

    def recorded(root, cell, record):
        events.append(record.status)
        return real_refused(root, cell, record)

    monkeypatch.setattr(store, "write_record", recorded)
    assert _run(recipe, results) == 0
    out = capsys.readouterr().out
    assert events[0] == REFUSED and events.index("load") > 0  # recorded before the load
    assert "refused m x w4-g32: quantizers[0] 'w4-g32'.weights.group: group 32" in out
    assert out.index("refused m x w4-g32") < out.index("[1/2]")
    assert "1 cells refused" in out
    [cell] = [c for c in store.read_plan(results, _load(recipe)) if c.refusal]
    record = store.read_record(results, cell)
    assert record.status == REFUSED and record.refused_at == "plan" and record.metrics is None
    board = (results / "refusing" / "LEADERBOARD.md").read_text()
    assert "## Refused cells" in board
    assert any("| w4-g32 " in row and "| refused " in row for row in board.splitlines())

    events.clear()
    assert _run(recipe, results) == 0  # nothing to run, nothing retried
    assert "load" not in events and "0 to run" in capsys.readouterr().out

    # the remedy the message names is a field that exists: leave the layer out
    assert "leave such layers out with the quantizer's ignore: [" in record.error.message
    text = REFUSED_RECIPE.format(path=llama_dir).replace(
        "group: 32}}", "group: 32}, ignore: ['re:.*mlp\\.down_proj']}"
    )
    fixed = write_recipe(tmp_path / "fixed.yaml", text)
    assert _run(fixed, results) == 0
    out = capsys.readouterr().out
    assert "refused" not in out and "m x w4-g32: perplexity" in out


def test_strict_makes_a_refusal_a_plan_time_error(tmp_path, llama_dir, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", REFUSED_RECIPE.format(path=llama_dir))
    assert _run(recipe, tmp_path / "results", "--strict") == 2
    [line] = _errors(capsys)
    assert line.startswith(f"qbench: error: {recipe}: quantizers[0] 'w4-g32'.weights.group")
    assert line.endswith("(--strict: refused)")
    assert not (tmp_path / "results" / "refusing").exists()  # nothing written, nothing run


def test_a_refusal_found_while_the_cell_ran_stands_until_qbench_changes(tmp_path, llama_dir):
    """A RefusedError raised inside a cell (a traced structure, an offloaded module) is a
    `refused` record that a rerun keeps while qbench's code is the same."""
    from qbench.errors import RefusedError
    from qbench.plan import plan
    from qbench.recipe import load_recipe
    from qbench.record import Record
    from qbench.versions import code_digest

    recipe_path = write_recipe(tmp_path / "r.yaml", REFUSED_RECIPE.format(path=llama_dir))
    recipe = load_recipe(recipe_path)
    cell = plan(recipe, recipe_path)[2]
    record = Record.failed(cell, recipe, RefusedError("no pre-norm"), 1.0)
    assert record.status == REFUSED and record.refused_at == "run" and record.stands
    moved = record.model_copy(update={"qbench_code": "0" * 16})  # another qbench refused it
    assert moved.qbench_code != code_digest() and not moved.stands
    at_plan = Record.refused(cell, recipe, "group 32")
    assert not at_plan.stands  # a plan-time refusal is decided again by every plan


# ---------------------------------------------------------------- 2. the gate checks what it reads


@pytest.fixture
def gated(tmp_path, llama_dir):
    """A copy of the tiny Llama and a finished run of RECIPE on it: w8a8 passes, w2a16 fails."""
    checkpoint = shutil.copytree(llama_dir, tmp_path / "checkpoint")
    recipe = write_recipe(tmp_path / "ff.yaml", RECIPE.format(path=checkpoint))
    results = tmp_path / "results"
    assert _run(recipe, results) == 0
    return SimpleNamespace(recipe=recipe, results=results, checkpoint=checkpoint)


def _plan_json(gated) -> dict:
    return json.loads((gated.results / "ff" / "plan.json").read_text())


def _write_plan_json(gated, data: dict) -> None:
    (gated.results / "ff" / "plan.json").write_text(json.dumps(data))


def _forge(gated, how: str) -> None:
    data = _plan_json(gated)
    cells = {c["quantizer"]: c for c in data["cells"]}
    if how == "copy of the passing entry":
        data["cells"][2] = cells["w8a8"]
    elif how == "the passing cell's key":
        data["cells"][2] = {**cells["w2a16"], "key": cells["w8a8"]["key"]}
        data["cells"][2]["file"] = (
            cells["w2a16"]["file"][:-22] + cells["w8a8"]["key"][:16] + ".json"
        )
    elif how == "its determinants edited":  # another quantizer, the key recomputed to match
        from qbench.plan import cell_key

        edited = json.loads(json.dumps(cells["w2a16"]["determinants"]))
        edited["quantizer"]["weights"]["bits"] = 3  # what the recipe does not say
        data["cells"][2] = {**cells["w2a16"], "determinants": edited, "key": cell_key(edited)}
    elif how == "fp twice, a cell dropped":
        data["cells"] = [cells["fp"], cells["fp"], cells["w8a8"]]
    _write_plan_json(gated, data)


@pytest.mark.parametrize(
    ("how", "problem"),
    [
        ("copy of the passing entry", "cell m/w8a8 is listed twice"),
        ("the passing cell's key", "two cells share one key"),
        ("its determinants edited", "cell m/w2a16: its key is not the digest of its fields"),
        ("fp twice, a cell dropped", "cell m/fp is listed twice"),
    ],
)
def test_a_forged_plan_json_never_passes_the_gate(gated, capsys, how, problem):
    """Fault: a plan.json whose failing cell's entry became a copy of a passing one (or took
    its key), or that listed fp twice and dropped a cell, made `qbench gate` print PASSED.
    Now: the gate plans the recipe itself (FAILED), and --results-only refuses plan.json."""
    assert _gate(gated.recipe, gated.results) == 1
    assert "FAILED" in capsys.readouterr().out
    _forge(gated, how)
    assert _gate(gated.recipe, gated.results) == 1  # the current plan: w2a16 fails
    out = capsys.readouterr().out
    assert "the recipe planned now" in out and "FAILED: 1 of 2 checks passed" in out
    assert _gate(gated.recipe, gated.results, "--results-only") == 2
    [line] = _errors(capsys)
    assert "plan.json: " in line and problem in line


def test_a_forged_plan_json_is_not_what_the_leaderboard_shows(gated, capsys):
    """Fault: the leaderboard showed the W2A16 row with the W8A8 cell's perplexity. Now the
    report warns, ignores plan.json and plans the recipe afresh."""
    _forge(gated, "the passing cell's key")
    assert main(["report", str(gated.recipe), "--results", str(gated.results)]) == 0
    assert "plan.json: two cells share one key; ignored" in capsys.readouterr().err
    board = (gated.results / "ff" / "LEADERBOARD.md").read_text()
    w8a8, w2a16 = (next(r for r in board.splitlines() if f"| {q} " in r) for q in ("w8a8", "w2a16"))
    assert w8a8.split("|")[6] != w2a16.split("|")[6]


def test_results_only_names_itself_and_passes_on_an_honest_plan(gated, capsys):
    assert _gate(gated.recipe, gated.results, "--results-only") == 1
    out = capsys.readouterr().out
    assert "recorded results only (--results-only)" in out and "not checked now" in out


def _break(gated, how: str) -> None:
    if how == "weights became NaN":
        path = gated.checkpoint / "model.safetensors"
        tensors = load_file(path)
        tensors = {k: torch.full_like(v, float("nan")) for k, v in tensors.items()}
        save_file(tensors, path, metadata={"format": "pt"})
    elif how == "config broke":
        (gated.checkpoint / "config.json").write_text("{not json")
    elif how == "folder deleted":
        shutil.rmtree(gated.checkpoint)


@pytest.mark.parametrize(
    ("how", "code", "said"),
    [
        ("weights became NaN", 1, "missing cell: m/fp: no record of its current key"),
        ("config broke", 2, "gate: the recipe cannot be planned now"),
        ("folder deleted", 2, "gate: the recipe cannot be planned now"),
    ],
)
def test_the_gate_fails_when_the_checkpoint_changed_after_a_passing_run(
    tmp_path, llama_dir, capsys, how, code, said
):
    """Fault: after a clean run the gate PASSED although the weights became NaN, the config
    broke (`qbench run` exits 2) or the folder was deleted. Now it plans the recipe as it is."""
    checkpoint = shutil.copytree(llama_dir, tmp_path / "checkpoint")
    text = RECIPE.format(path=checkpoint).replace(
        "  quantizers: {w2a16: {perplexity.embedded: 1.2}}\n", ""
    )
    text = text.replace("  - {name: w2a16, method: rtn, weights: {bits: 2}}\n", "")
    recipe = write_recipe(tmp_path / "ff.yaml", text)
    gated = SimpleNamespace(recipe=recipe, results=tmp_path / "results", checkpoint=checkpoint)
    assert _run(recipe, gated.results) == 0 and _gate(recipe, gated.results) == 0
    capsys.readouterr()
    _break(gated, how)
    assert _gate(recipe, gated.results) == code
    captured = capsys.readouterr()
    assert said in captured.out + captured.err
    if code == 2:  # the recorded results alone, when asked for, and said so
        assert _gate(recipe, gated.results, "--results-only") == 0
        assert "recorded results only" in capsys.readouterr().out


def test_the_gate_can_gate_an_interval_bound(gated, capsys):
    """`gate: {bound: lower}` fails a recovery whose interval reaches below the threshold
    even where the estimate passes; `upper` passes one whose interval reaches above it."""
    from qbench.recipe import load_recipe
    from qbench.report.gate import checks, gate_cells

    recipe = load_recipe(gated.recipe)
    cells, _ = gate_cells(recipe, gated.recipe, gated.results)
    table = store.load_table(gated.results, cells)
    [w8a8, _] = checks(recipe, table)
    low, high = w8a8.interval
    assert low < w8a8.recovery < high
    for bound, threshold, passed in [
        ("point", (w8a8.recovery + low) / 2, True),
        ("lower", (w8a8.recovery + low) / 2, False),
        ("upper", (w8a8.recovery + high) / 2, True),
        ("point", (w8a8.recovery + high) / 2, False),
    ]:
        gate = recipe.gate.model_copy(
            update={
                "bound": bound,
                "min_recovery": {"perplexity.embedded": threshold},
                "quantizers": {},
            }
        )
        found = checks(recipe.model_copy(update={"gate": gate}), table)
        assert found[0].passed is passed, (bound, threshold)


# ---------------------------------------------------------------- 3. loads verify what they read


def test_weights_swapped_while_the_model_loads_fail_the_cell(tmp_path, llama_dir, monkeypatch):
    """Fault: weights swapped while the model loaded were measured and filed under the old
    identity. Now the stamps taken after the load differ: the cell fails, nothing is filed
    under the old key, and the rerun plans (keys) the new files."""
    from qbench.checkpoints import load

    checkpoint = shutil.copytree(llama_dir, tmp_path / "checkpoint")
    recipe = write_recipe(tmp_path / "ff.yaml", RECIPE.format(path=checkpoint))
    real = load.load_checkpoint

    def swapping(spec, *args, **kwargs):
        loaded = real(spec, *args, **kwargs)
        path = checkpoint / "model.safetensors"
        tensors = {k: v * 2 for k, v in load_file(path).items()}
        save_file(tensors, path, metadata={"format": "pt"})  # a new file, as a swap is
        monkeypatch.setattr(load, "load_checkpoint", real)
        return loaded

    monkeypatch.setattr(load, "load_checkpoint", swapping)
    results = tmp_path / "results"
    assert _run(recipe, results) == 1
    failed = [r for r in (results / "ff" / "runs").glob("*.json")]
    messages = [json.loads(p.read_text()).get("error", {}).get("message", "") for p in failed]
    assert any("model.safetensors changed in" in m and "while it loaded" in m for m in messages)
    assert _run(recipe, results) == 0  # replanned: new keys, every cell computed again


def test_weights_changed_in_place_while_a_cell_runs_fail_it(tmp_path, llama_dir, monkeypatch):
    """Weights may be memory-mapped: a file rewritten while a cell runs fails that cell."""
    checkpoint = shutil.copytree(llama_dir, tmp_path / "checkpoint")
    recipe = write_recipe(tmp_path / "ff.yaml", RECIPE.format(path=checkpoint))
    real = runner.run_cell

    def touching(cell, *args, **kwargs):
        record = real(cell, *args, **kwargs)
        if cell.quantizer is None:
            os.utime(checkpoint / "model.safetensors")  # mtime changes, as any write does
        return record

    monkeypatch.setattr(runner, "run_cell", touching)
    assert _run(recipe, tmp_path / "results") == 1
    runs = tmp_path / "results" / "ff" / "runs"
    [fp] = [json.loads(p.read_text()) for p in runs.glob("m--fp--*.json")]
    assert fp["status"] == "failed" and "while the cell ran" in fp["error"]["message"]


def _plant(cache: Path, checkpoint: Path, digest: str) -> None:
    entries = json.loads(cache.read_text())
    for name, entry in entries.items():
        if name.startswith(str(checkpoint.resolve())) and name.endswith(".safetensors"):
            entry["sha256"] = digest
    cache.write_text(json.dumps(entries))


@pytest.mark.parametrize("writable", ["the cache", "the weights"])
def test_a_planted_digest_is_not_trusted_where_others_may_write(
    tmp_path, llama_dir, capsys, writable
):
    """Fault: a planted entry in $QBENCH_CACHE_DIR/file-digests.json made changed weights keep
    old results. Now a digest cache that others may write is ignored (with a warning), and a
    weight file that others may write is hashed at every plan."""
    from qbench.checkpoints.load import _digest_cache_path, directory_digests

    checkpoint = shutil.copytree(llama_dir, tmp_path / "checkpoint")
    true = directory_digests(checkpoint)["model.safetensors"]
    cache = _digest_cache_path()
    assert oct(cache.stat().st_mode & 0o777) == "0o600"  # written for this user alone
    _plant(cache, checkpoint, "0" * 64)
    assert directory_digests(checkpoint)["model.safetensors"] == "0" * 64  # trusted: ours
    if writable == "the cache":
        cache.chmod(0o666)
    else:
        (checkpoint / "model.safetensors").chmod(0o664)
    assert directory_digests(checkpoint)["model.safetensors"] == true
    if writable == "the cache":
        assert "writable by others, so not trusted" in capsys.readouterr().err
    cache.unlink()


def test_a_request_cache_of_another_cell_is_discarded(tmp_path, llama_dir, capsys):
    """Fault: a forged JSON request cache changed task scores without a warning. Now each
    entry is bound to its cell's key (another cell's cache is discarded with a warning) and
    answers read from the cache are announced."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qbench.eval.tasks import evaluate_tasks

    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    options = SimpleNamespace(
        batch_size=4, limit=3, num_fewshot=0, bootstrap_iters=0, log_samples=False
    )
    specs = [SimpleNamespace(name="embedded_mc", limit=None, num_fewshot=None)]
    cache = tmp_path / "cache" / "lm-eval-x"
    run = lambda key: evaluate_tasks(  # noqa: E731
        model, tokenizer, specs, options, cache=cache, progress=False, cell_key=key
    )[0]
    fresh = run("a" * 64)
    again = run("a" * 64)
    assert again.cached_requests == again.requests
    assert "requests answered from the request cache" in capsys.readouterr().err
    other = run("b" * 64)  # the same file, read as another cell's
    assert other.cached_requests == 0 and other.metrics == fresh.metrics
    assert "an answer of another cell" in capsys.readouterr().err


# ---------------------------------------------------------------- 4. plan-time checks per step


CONTEXT_RECIPE = """
name: context
checkpoints: [{{name: m, path: {path}}}]
quantizers:
  - {{name: sq, method: smoothquant, weights: {{bits: 8}}, activations: {{bits: 8}},
     calibration: {{data: embedded, sequences: 2, seq_len: {seq_len}}}}}
  - name: sq-gptq
    transforms: [{{transform: smoothquant, calibration: {{data: embedded, seq_len: 64}}}}]
    rounding: {{method: gptq, calibration: {{data: embedded, seq_len: {seq_len}}}}}
    weights: {{bits: 8}}
eval:
  perplexity: [{{data: embedded, seq_len: 32, max_windows: 1}}]
"""


@pytest.mark.parametrize("seq_len", [100000, 1024])
def test_calibration_windows_longer_than_the_context_are_refused_per_step(
    tmp_path, llama_dir, seq_len
):
    """Fault: the check read `quantizer.calibration`, which pipelines no longer have, so
    SmoothQuant with seq_len 100000 on a 256-context model hung and 1024 ran silently. Now
    each step's calibration is checked at plan time and named by its field path."""
    from conftest import refusals

    text = CONTEXT_RECIPE.format(path=llama_dir, seq_len=seq_len)
    found = refusals(write_recipe(tmp_path / "r.yaml", text))
    assert found["sq"] == (
        f"quantizers[0] 'sq'.calibration.seq_len: {seq_len} exceeds checkpoint 'm''s "
        "max_position_embeddings 256; use seq_len <= 256"
    )
    assert found["sq-gptq"].startswith(
        f"quantizers[1] 'sq-gptq'.rounding.calibration.seq_len: {seq_len} exceeds"
    )


def test_learned_positions_bound_calibration_and_eval_windows(tmp_path, tokenizer_dir):
    """Fault: on GPT-2 (learned positions) a calibration longer than its positions failed the
    cell with an IndexError. Now it is refused at plan time; a position table shorter than
    the config says bounds the windows too."""
    from conftest import refusals
    from transformers import GPT2Config, GPT2LMHeadModel

    from qbench.plan import context_length

    config = GPT2Config(vocab_size=300, n_embd=32, n_layer=1, n_head=2, n_positions=48)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(tmp_path / "gpt2")
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, tmp_path / "gpt2" / file.name)
    text = CONTEXT_RECIPE.format(path=tmp_path / "gpt2", seq_len=64)
    found = refusals(write_recipe(tmp_path / "r.yaml", text))
    assert (
        "calibration.seq_len: 64 exceeds checkpoint 'm''s max_position_embeddings 48" in found["sq"]
    )
    model.transformer.wpe = torch.nn.Embedding(40, 32)  # fewer rows than n_positions says
    assert context_length(config, model) == (40, "learned position table (transformer.wpe)")


def test_a_checkpoint_larger_than_memory_is_refused_with_the_estimate(
    tmp_path, monkeypatch, capsys
):
    """Fault: a `random:` config of about 13B parameters planned fine, then every cell failed
    on allocation. Now every cell of it is refused at plan time with the estimate, and
    nothing is built."""
    from qbench.checkpoints import limits

    monkeypatch.setattr(limits, "cpu_memory", lambda: (8 << 30, "CPU memory available (test)"))
    recipe = write_recipe(
        tmp_path / "r.yaml",
        """
name: big
checkpoints:
  - {name: big, random: {model_type: llama, hidden_size: 5120, intermediate_size: 13824,
     num_hidden_layers: 40, num_attention_heads: 40, num_key_value_heads: 40, vocab_size: 32000}}
quantizers: [{name: w8, method: rtn, weights: {bits: 8}}]
eval: {perplexity: [{data: embedded, seq_len: 32, max_windows: 1}]}
""",
    )
    assert _run(recipe, tmp_path / "results") == 0
    out = capsys.readouterr().out
    assert out.count("refused big x") == 2  # fp and w8
    assert (
        "needs about 48.5 GiB for its weights alone (13.02B parameters x 4 bytes), more "
        "than the 8.0 GiB of CPU memory available (test)" in out
    )
    assert not list((Path(os.environ["QBENCH_CACHE_DIR"]) / "checkpoints").glob("random-llama-*"))


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


TEXT_RECIPE = """
name: data
checkpoints: [{{name: m, path: {path}}}]
eval:
  perplexity: [{{data: text, path: {text}, seq_len: 32, max_windows: 1}}]
"""


@pytest.mark.parametrize("kind", ["a FIFO", "a symlink to /dev/zero", "a broken symlink"])
def test_special_files_in_a_text_folder_are_one_line(tmp_path, llama_dir, capsys, kind):
    """Fault: a FIFO named a.txt in a `data: text` folder hung planning; a.txt -> /dev/zero
    exhausted memory. Now: one line naming the file, exit 2, nothing blocks."""
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "good.txt").write_text("Some text to score.\n")
    bad = folder / "a.txt"
    if kind == "a FIFO":
        _fifo(bad)
    elif kind == "a symlink to /dev/zero":
        bad.symlink_to("/dev/zero")
    else:
        bad.symlink_to(tmp_path / "nowhere")
    recipe = write_recipe(tmp_path / "r.yaml", TEXT_RECIPE.format(path=llama_dir, text=folder))
    assert _run(recipe, tmp_path / "results") == 2
    [line] = _errors(capsys)
    assert f"eval.perplexity[0].path: '{bad}' in folder '{folder}'" in line
    expected = {
        "a FIFO": "a FIFO, not a regular file",
        "a symlink to /dev/zero": "a character device, not a regular file",
        "a broken symlink": "no such file",
    }
    assert expected[kind] in line


def test_a_directory_named_like_a_text_file_is_walked_and_a_large_file_refused(
    tmp_path, llama_dir, capsys, monkeypatch
):
    """Fault: a directory named d.txt gave a traceback. Now it is walked like any folder;
    a file beyond the size limit is one line."""
    from qbench.data import folder as folder_module
    from qbench.data.external import path_documents

    root = tmp_path / "texts"
    (root / "d.txt").mkdir(parents=True)
    (root / "d.txt" / "inner.txt").write_text("inner text\n")
    (root / "top.txt").write_text("top text\n")
    assert path_documents(str(root)) == ["inner text\n", "top text\n"]
    monkeypatch.setattr(folder_module, "TEXT_FILE_LIMIT", 4)
    recipe = write_recipe(tmp_path / "r.yaml", TEXT_RECIPE.format(path=llama_dir, text=root))
    assert _run(recipe, tmp_path / "results") == 2
    [line] = _errors(capsys)
    assert "inner.txt' in folder" in line and "larger than the" in line


def test_a_fifo_config_or_tokenizer_is_one_line(tmp_path, llama_dir, capsys):
    """Fault: `random: {config: FIFO}` and a FIFO tokenizer hung planning / loading."""
    _fifo(tmp_path / "config.json")
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"""
name: fifo
checkpoints: [{{name: m, random: {{config: {tmp_path / "config.json"}}}}}]
eval: {{perplexity: [{{data: embedded, seq_len: 32, max_windows: 1}}]}}
""",
    )
    assert _run(recipe, tmp_path / "results") == 2
    [line] = _errors(capsys)
    assert "checkpoints[0].random: config: " in line and "a FIFO, not a regular file" in line

    checkpoint = shutil.copytree(llama_dir, tmp_path / "checkpoint")
    (checkpoint / "tokenizer.json").unlink()
    _fifo(checkpoint / "tokenizer.json")
    recipe = write_recipe(tmp_path / "r2.yaml", REFUSED_RECIPE.format(path=checkpoint))
    assert _run(recipe, tmp_path / "results") == 2
    [line] = _errors(capsys)
    assert f"checkpoints[0].path: '{checkpoint / 'tokenizer.json'}': a FIFO" in line


# ---------------------------------------------------------------- 5. one line per bad input


BAD = """
name: bad
checkpoints:
  - {name: m, random: {model_type: llama, hidden_size: 64, intermediate_size: 128,
     num_hidden_layers: 2, num_attention_heads: 4, vocab_size: 300}}
quantizers: [{name: w8, method: rtn, weights: {bits: 8}}]
eval: {perplexity: [{data: embedded, seq_len: 32, max_windows: 1}]}
"""


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "{bits: 8}",
            "{format: [int]}",
            "quantizers[0].weights.format: Input should be a valid string",
        ),
        (
            "random: {model_type: llama,",
            'hf: "bad id!!", random: {model_type: llama,',
            "checkpoints[0].hf: 'bad id!!' is not a hub model id",
        ),
        (
            "num_hidden_layers: 2",
            "num_hidden_layers: -1",
            "checkpoints[0].random: num_hidden_layers: must be a positive integer, got -1",
        ),
        (
            "vocab_size: 300}}",
            "vocab_size: 300}, device_map: {'': 0}}",
            "checkpoints[0].device_map: '(the whole model)' goes to GPU 0, but this machine has",
        ),
    ],
)
def test_bad_inputs_are_one_line(tmp_path, capsys, old, new, expected):
    """Faults: tracebacks for `weights: {format: [int]}`, an hf: id the hub refuses (offline),
    `num_hidden_layers: -1`; an unclear failure for device_map {'': 0} without a GPU."""
    if "device_map" in new and torch.cuda.is_available():
        pytest.skip("a CUDA device is present: device_map {'': 0} is valid here")
    assert old in BAD
    recipe = write_recipe(tmp_path / "r.yaml", BAD.replace(old, new))
    assert _run(recipe, tmp_path / "results") == 2
    [line] = _errors(capsys)
    assert line.startswith(f"qbench: error: {recipe}: ") and expected in line, line


def test_a_full_disk_names_the_path(tmp_path, capsys, monkeypatch):
    """Fault: a full disk failed every cell with `SafetensorError: Error while serializing: I/O
    error: No space left on device (os error 28)`, naming no path. Now the line names the
    folder qbench was writing (here the random checkpoint's, in QBENCH_CACHE_DIR)."""
    from qbench.checkpoints import random

    def full(*_):
        raise RuntimeError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    monkeypatch.setattr(random, "build", full)
    recipe = write_recipe(tmp_path / "r.yaml", BAD)
    assert _run(recipe, tmp_path / "results") == 1
    out = capsys.readouterr().out
    cache = Path(os.environ["QBENCH_CACHE_DIR"]) / "checkpoints"
    assert f"FAILED QBenchError: {cache}/random-llama-" in out
    assert "cannot write the checkpoint: RuntimeError: Error while serializing" in out
    assert f"free space in {cache} (QBENCH_CACHE_DIR)" in out


def _load(path: Path):
    from qbench.recipe import load_recipe

    return load_recipe(path)


# ---------------------------------------------------------------- 6. guard rails

GUARDED = """
name: guarded
checkpoints: [{{name: m, path: {path}}}]
quantizers:
  - {{name: rtn-w4a8, method: rtn, weights: {{bits: 4}}, activations: {{bits: 8}}}}
  - {{name: rtn-w4a8-clip, method: rtn, weights: {{bits: 4, clip: 0.9}}, activations: {{bits: 8}}}}
  - {{name: w2a16, method: rtn, weights: {{bits: 2}}}}
eval:
  perplexity: [{{data: embedded, seq_len: 64, max_windows: 4}}]
  tasks: [embedded_mc]
  task_options: {{limit: 12, bootstrap_iters: 0}}
"""


def test_chance_levels_verdicts_and_interval_bars(tmp_path, llama_dir, monkeypatch):
    """Fault: zero-shot scores at or below chance (a random model) said nothing; recovery.png
    had no error bars and an axis starting at 85. Now each task's chance level is recorded
    and shown, an fp score within reach of it is flagged, the plot starts at 0 with interval
    bars, and each precision gets a one-line verdict."""
    from matplotlib.axes import Axes

    drawn = []
    real_bar = Axes.bar

    def bar(self, *args, **kwargs):
        drawn.append(kwargs.get("yerr"))
        return real_bar(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "bar", bar)
    recipe = write_recipe(tmp_path / "g.yaml", GUARDED.format(path=llama_dir))
    results = tmp_path / "results"
    assert _run(recipe, results) == 0
    tasks = json.loads((results / "guarded" / "tasks.json").read_text())
    fp = next(c for c in tasks["cells"] if c["quantizer"] == "fp")
    assert fp["tasks"]["embedded_mc"]["chance"] == pytest.approx(0.25)  # 4 choices each
    assert fp["tasks"]["embedded_mc"]["at_chance"] is True  # random weights guess
    board = (results / "guarded" / "LEADERBOARD.md").read_text()
    assert "embedded_mc (acc_norm; chance 25.0)" in board and "(at chance)" in board
    assert "**embedded_mc** on `m`: fp" in board and "this task says nothing" in board
    assert "## Verdict per precision" in board
    [w4a8] = [line for line in board.splitlines() if line.startswith("- **W4A8** on `m`")]
    assert "best `rtn-w4a8" in w4a8 and "next / best" in w4a8
    assert "distinguishable" in w4a8
    assert "- **W2A16** on `m`: `w2a16` (×fp" in board  # alone in its precision
    assert len(drawn) == 3 and all(len(e) == 2 for e in drawn)  # (below, above) per bar
    from qbench.report.tasks_table import write_recovery_plot

    figures, drawn[:] = [], []
    monkeypatch.setattr("qbench.report.tasks_table.save_figure", lambda f, p: figures.append(f))
    cell = {"checkpoint": "m", "quantizer": "w2a16", "recovery": 0.9, "fp_average": 0.5,
            "delta_interval": {"estimate": -0.05, "low": -0.08, "high": -0.01}}  # fmt: skip
    write_recovery_plot(_load(recipe), [cell], tmp_path)
    assert drawn[2] == [[pytest.approx(6.0)], [pytest.approx(8.0)]]  # 90 - 84, 98 - 90
    assert figures[0].axes[0].get_ylim()[0] == 0  # the axis starts at 0


# ---------------------------------------------------------------- 7. progress


def test_block_passes_count_without_changing_the_model(tiny_model, capsys):
    """Fault: AWQ ran 696 s with no output. Now a counter of decoder-block passes runs while a
    quantizer's steps run (with progress); the hooks leave every output as it was."""
    from qbench.runner import block_passes

    model = tiny_model("llama")
    ids = torch.randint(0, 300, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        with block_passes(model, "m x q: quantizing", True) as passes:
            during = model(ids).logits
            with passes.paused():  # an evaluation inside the quantization is not counted
                model(ids)
            model(ids)
    assert torch.equal(before, during)
    assert passes.bar.n == 4  # two blocks, two counted forwards
    assert "m x q: quantizing:" in capsys.readouterr().err
    assert not any(block._forward_hooks for block in model.model.layers)  # removed after
