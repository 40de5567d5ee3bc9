# Two commands set everything up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines take the CPU torch build that lies on disk (any other version pulls GBs of CUDA wheels);
# GPU machines keep whatever torch their image has.
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_PIN := $(if $(HAS_CUDA),,torch==2.13.0)
CONSTRAINTS := $(if $(HAS_CUDA),,-c requirements/ci-constraints.txt)
NPROC ?= 2

.PHONY: demo test venv clean

$(VENV)/.installed: setup.py requirements/ci-constraints.txt
	test -x $(PY) || python3 -m venv $(if $(HAS_CUDA),--system-site-packages,) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH_PIN),$(PY) -m pip install -q $(TORCH_PIN),)
	$(PY) -m pip install -q $(CONSTRAINTS) -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m megatron_gndpo.demo --nproc $(NPROC)

test: venv
	$(PY) -m pytest tests -q -p no:cacheprovider

clean:
	rm -rf $(VENV) build *.egg-info
