"""The import structure: no cycle among qbench's modules, and the commands that need no model
library (--help, list, a recipe's validation) import none."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "qbench"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The qbench modules `module` imports anywhere (functions included), outside
    `if TYPE_CHECKING:` blocks; `from package import name` counts as importing the submodule
    `package.name` where there is one, else the package."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "qbench")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative
                parts = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join([*parts, *([base] if base else [])])
            if base.split(".")[0] == "qbench":
                for alias in node.names:
                    child = f"{base}.{alias.name}"
                    found.add(child if child in known else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m in known and m != module}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    known = {_module_name(p) for p in paths}
    return {
        _module_name(p): _imports(
            ast.parse(p.read_text()), _module_name(p), p.name == "__init__.py", known
        )
        for p in paths
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, ()):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_the_import_graph_has_no_cycle_outside_type_checking():
    graph = import_graph()
    assert len(graph) > 50 and "qbench.plan" in graph["qbench.sweep"]  # the parser sees edges
    assert cycles(graph) == []


def test_the_packages_import_each_other_without_a_cycle():
    """The same graph with each sub-package (qbench.checkpoints, qbench.eval, ...) as one node:
    no package imports one that imports it back (recipe <-> checkpoints, eval <->
    checkpoints, sweep <-> executors were such cycles). Models are walked by qbench.quant;
    eval measures them and the trainer logs eval's diagnostics while a task trains."""
    graph: dict[str, set[str]] = {}
    for module, targets in import_graph().items():
        unit = ".".join(module.split(".")[:2])
        others = {".".join(t.split(".")[:2]) for t in targets}
        graph.setdefault(unit, set()).update(others - {unit})
    assert "qbench.eval" in graph["qbench.checkpoints"]  # the parser sees the trainer's edge
    assert cycles(graph) == []


def test_cycles_are_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


LIGHT = ("torch", "transformers", "lm_eval", "accelerate", "datasets")


def _loaded_after(code: str) -> dict[str, bool]:
    """Which heavy libraries a fresh interpreter holds after running `code`."""
    probe = (
        f"{code}\nimport json, sys\nprint(json.dumps({{m: m in sys.modules for m in {LIGHT!r}}}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_help_list_and_a_recipe_error_import_no_model_library(tmp_path):
    """`qbench --help`, `qbench list` and validating a recipe with a typo import neither torch
    nor transformers, lm-eval, accelerate or datasets (they cost seconds of CPU)."""
    recipe = tmp_path / "typo.yaml"
    recipe.write_text(
        "name: typo\ncheckpoints: [{name: m, path: x}]\n"
        "quantizers: [{name: w8, method: rtn, weights: {bitz: 8}}]\n"
        "eval: {perplexity: [{data: embedded, seq_len: 32}], tasks: [piqa]}\n"
    )
    validate = (
        "from qbench.recipe import RecipeError, load_recipe\n"
        f"try:\n    load_recipe({str(recipe)!r})\nexcept RecipeError as error:\n"
        "    assert 'bitz' in str(error), error\nelse:\n    raise AssertionError('no error')"
    )
    run = f"from qbench.cli import main\nassert main(['run', {str(recipe)!r}]) == 2"
    commands = {
        "validation": validate,
        "run with a typo": run,
        "list": "from qbench.cli import main\nassert main(['list']) == 0",
        "help": "from qbench.cli import main\ntry:\n    main(['-h'])\nexcept SystemExit:\n    0",
    }
    for what, code in commands.items():
        loaded = _loaded_after(code)
        assert not any(loaded.values()), (what, loaded)


def test_a_task_name_is_checked_against_the_cached_index_without_lm_eval(tmp_path):
    """Fault: an unknown task name cost lm-eval's whole index (about 10 s of CPU) at every
    validation. Now the names come from the index saved once in the cache."""
    from qbench.environment import cache_dir
    from qbench.eval.task_index import lm_eval_version

    cache_dir().mkdir(parents=True, exist_ok=True)
    index = cache_dir() / f"lm-eval-tasks-{lm_eval_version()}.json"
    index.write_text(json.dumps(["mmlu", "some_cached_task"]))
    recipe = tmp_path / "tasks.yaml"
    recipe.write_text(
        "name: t\ncheckpoints: [{name: m, path: x}]\n"
        "eval: {perplexity: [{data: embedded}], tasks: [some_cached_task, some_cahced_task]}\n"
    )
    code = (
        "from qbench.recipe import RecipeError, load_recipe\n"
        f"try:\n    load_recipe({str(recipe)!r})\nexcept RecipeError as error:\n"
        "    message = str(error)\n"
        "assert 'eval.tasks[1].name: unknown task' in message, message\n"
        "assert \"did you mean 'some_cached_task'\" in message, message"
    )
    assert not _loaded_after(code)["lm_eval"]
    index.unlink()
