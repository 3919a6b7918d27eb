"""The GPU check's recipe and scripts: they plan (no weights), scale down, and skip clearly."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, needs_wikitext

from qbench.checkpoints.random import random_config
from qbench.plan import plan
from qbench.recipe import load_recipe

_spec = importlib.util.spec_from_file_location("sweep_bench", REPO / "bench" / "sweep_bench.py")
sweep_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep_bench)

GPU_CHECK = REPO / "recipes" / "gpu-check.yaml"


@pytest.fixture
def in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the recipe names its config file relative to the repository


@needs_wikitext
def test_gpu_check_recipe_covers_every_method_on_the_qwen3_shape(in_repo):
    recipe = load_recipe(GPU_CHECK)
    cells = plan(recipe, GPU_CHECK)
    assert {q.method for q in recipe.quantizers} == {
        "rtn", "smoothquant", "awq", "rotation", "gptq", "bitsandbytes", "quanto"
    }  # fmt: skip
    assert any(q.kv is not None and not q.quantizes_linears for q in recipe.quantizers)
    assert recipe.eval.tasks and recipe.eval.perplexity[0].data == "wikitext2"
    config = random_config(cells[0].checkpoint.random)
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (1024, 28, 151936)
    assert {c.checkpoint.dtype for c in cells} == {"bfloat16"}  # dtype auto: the config's


@needs_wikitext
def test_the_scaled_down_copy_plans_at_cpu_size(in_repo, tmp_path):
    copy = sweep_bench.adapted(GPU_CHECK, tmp_path, scale_down=True)
    recipe = load_recipe(copy)
    cells = plan(recipe, copy)
    assert (
        recipe.name == "gpu-check-cpu" and len(cells) == len(load_recipe(GPU_CHECK).quantizers) + 1
    )
    config = random_config(cells[0].checkpoint.random)
    assert (config.hidden_size, config.num_hidden_layers) == (128, 2)
    assert cells[0].checkpoint.dtype == "float32"


def test_a_missing_library_drops_its_quantizers_with_a_line(in_repo, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        sweep_bench,
        "missing_library",
        lambda q: "bitsandbytes" if q["method"] == "bitsandbytes" else None,
    )
    recipe = load_recipe(sweep_bench.adapted(GPU_CHECK, tmp_path, scale_down=False))
    assert "bitsandbytes" not in {q.method for q in recipe.quantizers}
    assert "skipped quantizer bnb-nf4: bitsandbytes is not installed" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_the_suite_skips_cuda_only_parts_in_one_line_each(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    suite = [str(REPO / "bench" / "gpu_suite.sh"), str(tmp_path)]
    done = subprocess.run([*suite, "forward-bf16"], env=env, capture_output=True, text=True)
    assert done.returncode == 0
    lines = [line for line in done.stdout.splitlines() if line.startswith("skipped")]
    assert lines == [
        "skipped (no CUDA device): forward-bf16 (bf16 matmuls are ~30x slower than fp32 on a CPU)"
    ]
    assert (tmp_path / "skipped.txt").read_text().splitlines() == lines
    bad = subprocess.run([*suite, "warp-speed"], env=env, capture_output=True, text=True)
    assert bad.returncode == 1 and "unknown part 'warp-speed'" in bad.stdout
