# Two commands for a fresh machine:  make demo   |   make test
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU-only machines get the pinned CPU build of torch; machines with an NVIDIA driver get the default CUDA build.
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
PYTEST_ARGS ?=

.PHONY: install demo test test-gpu wheel-check clean

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

# Every gpu test in one process, on the GPU machine's own CUDA build of torch: a venv over the packages
# of GPU_PYTHON (the interpreter that holds torch; itself often a venv, whose packages a nested venv's
# --system-site-packages would not see: a .pth file names them), zerotune editable with its gpu extra
# (liger-kernel, torchao). The kernel tests need liger: a machine without it fails here instead of
# skipping them. Offline (the lent GPU machine): put the wheels on PYTHONPATH first and pass
# GPU_PIP_ARGS="--no-deps --no-build-isolation".
GPU_PYTHON ?= python3
GPU_VENV ?= .venv-gpu
GPU_PIP_ARGS ?=
test-gpu:
	$(GPU_PYTHON) -m venv --system-site-packages $(GPU_VENV)
	$(GPU_PYTHON) -c "import site, sys; print(*[p for p in sys.path if p.endswith('-packages')], sep='\n')" \
		> "$$($(GPU_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zerotune-gpu-python.pth"
	$(GPU_VENV)/bin/python -m pip install -q $(GPU_PIP_ARGS) -e '.[gpu,test]'
	$(GPU_VENV)/bin/python -c "import torch, liger_kernel; assert torch.cuda.is_available(), 'test-gpu: no CUDA GPU visible'"
	$(GPU_VENV)/bin/python -m pytest -m gpu $(PYTEST_ARGS) tests

# The installed package as users get it: a built wheel (not editable) in its own venv, running
# the demo recipe from another directory (templates, package data and recipe paths must all work).
WHEEL_VENV ?= .venv-wheel
wheel-check: install
	rm -rf dist $(WHEEL_VENV)
	$(PY) -m pip wheel -q --no-deps -w dist .
	python3 -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip install -q "$(TORCH)"
	$(WHEEL_VENV)/bin/python -m pip install -q dist/zerotune-*.whl
	d=$$(mktemp -d) && cd $$d && ! $(CURDIR)/$(WHEEL_VENV)/bin/python -c "import training" 2>/dev/null \
	  && $(CURDIR)/$(WHEEL_VENV)/bin/zerotune train $(CURDIR)/recipes/demo.yaml \
	  --set train.max_steps=4 --set train.eval_every=2 --set output_dir=$$d/runs && test -f $$d/runs/demo/final/config.json \
	  && rm -rf $$d

clean:
	rm -rf $(VENV) $(WHEEL_VENV) $(GPU_VENV) dist runs
