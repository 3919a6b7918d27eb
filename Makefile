# qbench: `make bench` installs (if needed) and runs a recipe; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
RECIPE ?= recipes/default.yaml
BIN := $(VENV)/bin

.PHONY: install bench report smoke test lint gpu-check clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
# optimum-quanto compiles its CPU kernels (int4/int2 weights) on first use: do it here, once
	$(BIN)/python -c "from optimum.quanto.library.extensions import get_extension; get_extension('quanto_cpp').lib"
	touch $@

bench: install
	$(BIN)/qbench run $(RECIPE)

report: install
	$(BIN)/qbench report $(RECIPE)

smoke: install
	$(BIN)/qbench run recipes/ci-smoke.yaml --no-progress
	$(BIN)/qbench gate recipes/ci-smoke.yaml

test: install
	$(BIN)/ruff check qbench tests bench
	$(BIN)/ruff format --check qbench tests bench
	$(BIN)/pytest

# The GPU check (bench/gpu_check.sh): tests on CUDA, fast-path comparisons, bench/gpu_suite.sh;
# on a machine without CUDA, the CPU parts and one "skipped" line per CUDA-only part.
GPU_OUT ?= .gpu-check
gpu-check: install
	PYTHON=$(BIN)/python bench/gpu_check.sh $(GPU_OUT)

lint: install
	$(BIN)/ruff check qbench tests bench
	$(BIN)/ruff format --check qbench tests bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .gpu-check
