# Two commands for a new machine: `make demo` and `make test`. Each sets up its
# own virtualenv first. torch is installed before the project so the rest of the
# dependencies resolve against it (a plain `torch` requirement would otherwise
# pull a multi-GB CUDA build on a CPU-only machine).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
RUN_DIR ?= runs/demo
PROFILE ?= small

.PHONY: setup demo test test-fast ui bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip || echo "warning: could not upgrade pip in $(VENV); continuing with the one it has"
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q "$(TORCH_SPEC)" -e '.[dev,deploy]'
	$(PY) -m pip install -q --no-deps "torch-fidelity>=0.3"  # see the fid extra in pyproject.toml
	touch $@

demo: setup
	$(VENV)/bin/dalle demo --profile $(PROFILE) --run-dir $(RUN_DIR)

test: setup
	sh scripts/install-chromium.sh
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

ui: setup
	$(VENV)/bin/dalle ui --run-dir $(RUN_DIR)

bench: setup
	$(PY) bench/crawl.py

clean:
	rm -rf runs .pytest_cache
