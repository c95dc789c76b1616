# Two commands for a fresh machine:  make demo   |   make test
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU-only machines get the pinned CPU build of torch; machines with an NVIDIA driver get the default CUDA build.
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
PYTEST_ARGS ?=

.PHONY: install demo test test-gpu clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: install
	$(VENV)/bin/zerotune train recipes/demo.yaml
	$(VENV)/bin/zerotune generate runs/demo --prompt "Give three tips for staying healthy." --max-new-tokens 40

test: install
	$(VENV)/bin/pytest -m "not gpu" $(PYTEST_ARGS) tests

test-gpu: install
	$(VENV)/bin/pytest -m gpu $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) runs
