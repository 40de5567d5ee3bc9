# Two commands set everything up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines take the CPU torch build that lies on disk (any other version pulls GBs of CUDA wheels);
# GPU machines keep whatever torch their image has.
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_PIN := $(if $(HAS_CUDA),,torch==2.13.0)
CONSTRAINTS := $(if $(HAS_CUDA),,-c requirements/ci-constraints.txt)
NPROC ?= 2

# megatron-core's newest release, which GPU machines run (Python 3.12), tested on CI's Python 3.11 too:
# its sdist builds there with --ignore-requires-python, after torch, triton and pybind11.
MCORE_LATEST ?= 0.19.2
VENV_LATEST ?= .venv-mcore-latest
PY_LATEST := $(VENV_LATEST)/bin/python

.PHONY: demo demo-vlm test test-mcore-latest venv clean

$(VENV)/.installed: setup.py requirements/ci-constraints.txt
	test -x $(PY) || python3 -m venv $(if $(HAS_CUDA),--system-site-packages,) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH_PIN),$(PY) -m pip install -q $(TORCH_PIN),)
	$(PY) -m pip install -q $(CONSTRAINTS) -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m megatron_gndpo.demo --nproc $(NPROC)

# the vision-language counterpart: tiny InternVL teacher and student counting shapes in pictures
demo-vlm: venv
	$(PY) -m megatron_gndpo.demo_vlm --nproc $(NPROC)

test: venv
	$(VENV)/bin/ruff check .
	$(PY) -m pytest tests -q -p no:cacheprovider

$(VENV_LATEST)/.installed: setup.py requirements/mcore-latest-constraints.txt
	test -x $(PY_LATEST) || python3 -m venv $(VENV_LATEST)
	$(PY_LATEST) -m pip install -q --upgrade pip
	$(PY_LATEST) -m pip install -q -c requirements/mcore-latest-constraints.txt torch triton pybind11 numpy setuptools wheel
	$(PY_LATEST) -m pip install -q --no-build-isolation --ignore-requires-python --no-binary megatron-core \
		megatron-core==$(MCORE_LATEST)
	$(PY_LATEST) -m pip install -q -c requirements/mcore-latest-constraints.txt -e ".[dev]"
	touch $@

# Every test that reaches megatron-core (unit + spawned worlds), against its newest release.
test-mcore-latest: $(VENV_LATEST)/.installed
	$(PY_LATEST) -c "import megatron.core as m; assert m.__version__.startswith('$(MCORE_LATEST)'), m.__version__"
	$(PY_LATEST) -m pytest tests/unit tests/distributed -q -p no:cacheprovider

clean:
	rm -rf $(VENV) $(VENV_LATEST) build *.egg-info
