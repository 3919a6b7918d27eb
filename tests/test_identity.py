"""Content identity: result keys follow every weight, tokenizer and config byte, and hub commits."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import write_recipe
from huggingface_hub import constants
from safetensors.torch import load_file, save_file

from qbench.checkpoints import load
from qbench.checkpoints.load import checkpoint_identity, hub_commit
from qbench.checkpoints.spec import CheckpointIdentity
from qbench.errors import QBenchError
from qbench.plan import plan
from qbench.recipe import CheckpointSpec, load_recipe
from qbench.runner import Worker

RECIPE = """
name: ident
checkpoints:
{checkpoints}
quantizers:
  - {{name: w8, method: rtn, weights: {{bits: 8}}}}
eval:
  perplexity: [{{data: embedded, seq_len: 32, max_windows: 1}}]
"""


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _keys(tmp_path: Path, **directories: Path) -> dict[str, list[str]]:
    """{checkpoint name: [fp key, w8 key]} of a recipe naming `directories`."""
    lines = "\n".join(f"  - {{name: {n}, path: {d}}}" for n, d in directories.items())
    path = write_recipe(tmp_path / "ident.yaml", RECIPE.format(checkpoints=lines))
    keys: dict[str, list[str]] = {}
    for cell in plan(load_recipe(path), path):
        keys.setdefault(cell.checkpoint.name, []).append(cell.key)
    return keys


def test_same_weights_with_another_tokenizer_get_other_keys(tmp_path, llama_dir):
    same = _copy(llama_dir, tmp_path / "same")
    other = _copy(llama_dir, tmp_path / "other")
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    tokenizer["added_tokens"].append(
        {"id": 299, "content": "<extra>", "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": False, "special": True}
    )  # fmt: skip
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    keys = _keys(tmp_path, original=llama_dir, same=same, other=other)
    assert keys["original"] == keys["same"]  # content, not the path, makes the key
    assert set(keys["other"]).isdisjoint(keys["original"])
    for name in ("generation_config.json", "special_tokens_map.json"):
        changed = _copy(llama_dir, tmp_path / name)
        (changed / name).write_text('{"bos_token_id": 7}')
        assert set(_keys(tmp_path, c=changed)["c"]).isdisjoint(keys["original"]), name


def test_a_tensor_edited_in_the_middle_of_a_weight_file_changes_the_key(tmp_path, llama_dir):
    directory = _copy(llama_dir, tmp_path / "big")
    weights = directory / "model.safetensors"
    generator = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(512, 512, generator=generator) for i in range(3)}  # 3 MiB
    save_file(tensors, weights)
    before = weights.read_bytes()
    key = _keys(tmp_path, big=directory)["big"]

    tensors = load_file(weights)
    tensors["t1"][256, 256] += 1  # the middle tensor
    save_file(tensors, weights)
    after = weights.read_bytes()
    changed = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    mib = 1 << 20
    assert changed and all(mib <= i < len(after) - mib for i in changed)  # not in the ends
    assert set(_keys(tmp_path, big=directory)["big"]).isdisjoint(key)


def test_file_digests_are_remembered_by_stat_in_a_json_cache(tmp_path, llama_dir, monkeypatch):
    directory = _copy(llama_dir, tmp_path / "m")
    monkeypatch.setenv("QBENCH_CACHE_DIR", str(tmp_path / "cache"))
    real, hashed = load._sha256, []
    monkeypatch.setattr(load, "_sha256", lambda path: hashed.append(path.name) or real(path))
    spec = CheckpointSpec(name="m", path=str(directory))

    first = checkpoint_identity(spec)
    assert sorted(hashed) == sorted(first.files) and "model.safetensors" in first.files
    for name, digest in first.files.items():  # the whole file's sha256
        assert digest == hashlib.sha256((directory / name).read_bytes()).hexdigest()
    cache = json.loads((tmp_path / "cache" / "file-digests.json").read_text())
    assert str((directory / "config.json").resolve()) in cache

    hashed.clear()
    assert checkpoint_identity(spec) == first and hashed == []  # a rerun reads the cache
    (directory / "tokenizer_config.json").write_text("{}")
    assert checkpoint_identity(spec) != first and hashed == ["tokenizer_config.json"]

    hashed.clear()
    (tmp_path / "cache" / "file-digests.json").write_text("not json")
    assert checkpoint_identity(spec).files == checkpoint_identity(spec).files
    assert len(hashed) == len(first.files)  # recomputed once, then remembered again


def test_train_checkpoints_keep_their_config_digest():
    spec = CheckpointSpec(name="t", train={"preset": "tiny", "steps": 3})
    identity = checkpoint_identity(spec)
    assert identity.model_dump() == {"train": load.spec_train_config(spec).digest()}


def _hub_cache(root: Path, repo: str, refs: dict[str, str], source: Path) -> None:
    folder = root / f"models--{repo.replace('/', '--')}"
    for ref, commit in refs.items():
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / ref).write_text(commit)
        if not (folder / "snapshots" / commit).exists():
            shutil.copytree(source, folder / "snapshots" / commit)


def test_hub_revisions_resolve_to_commits_offline_from_the_local_cache(
    tmp_path, llama_dir, monkeypatch
):
    main, tag = "a" * 40, "b" * 40
    _hub_cache(tmp_path / "hub", "org/tiny", {"main": main, "v1": tag}, llama_dir)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert hub_commit("org/tiny", "main") == main and hub_commit("org/tiny", "v1") == tag
    assert hub_commit("org/tiny", "c" * 40) == "c" * 40  # a commit is its own
    with pytest.raises(QBenchError, match=r"cannot resolve revision 'v2' of 'org/tiny'.*cache"):
        hub_commit("org/tiny", "v2")

    path = write_recipe(
        tmp_path / "hub.yaml", RECIPE.format(checkpoints="  - {name: t, hf: org/tiny}")
    )
    recipe = load_recipe(path)
    fp = plan(recipe, path)[0]
    assert fp.identity == CheckpointIdentity(hf="org/tiny", revision="main", commit=main)
    (tmp_path / "hub" / "models--org--tiny" / "refs" / "main").write_text(tag)
    assert plan(recipe, path)[0].key != fp.key  # main moved: another model
    shutil.rmtree(tmp_path / "hub" / "models--org--tiny" / "snapshots" / tag)
    record = Worker(progress=False).execute(fp, recipe, tmp_path / "results")
    assert record.finished and record.checkpoint.identity.commit == main  # loaded as planned


def test_online_the_hub_says_which_commit(monkeypatch):
    monkeypatch.setattr(load, "offline", lambda: False)
    calls = []

    def model_info(self, repo, revision, timeout):
        calls.append((repo, revision))
        return SimpleNamespace(sha="d" * 40)

    monkeypatch.setattr("huggingface_hub.HfApi.model_info", model_info)
    assert hub_commit("org/tiny", "main") == "d" * 40 and calls == [("org/tiny", "main")]


def test_a_checkpoint_changed_after_planning_fails_its_cells(tmp_path, llama_dir):
    directory = _copy(llama_dir, tmp_path / "m")
    path = write_recipe(
        tmp_path / "r.yaml", RECIPE.format(checkpoints=f"  - {{name: m, path: {directory}}}")
    )
    recipe = load_recipe(path)
    fp = plan(recipe, path)[0]
    (directory / "tokenizer_config.json").write_text("{}")
    record = Worker(progress=False).execute(fp, recipe, tmp_path / "results")
    assert record.status == "failed" and record.error.type == "QBenchError"
    assert "tokenizer_config.json changed" in record.error.message
    assert record.checkpoint.identity == fp.identity  # the record says what was planned
