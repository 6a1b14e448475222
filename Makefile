# Two commands for a newcomer on a fresh machine:
#   make demo   set everything up, then run ML-Mamba end to end
#   make test   set everything up, then run the test suite
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
# The CPU wheel of torch on this kind of machine. On a GPU machine, install your CUDA torch into the venv first,
# or run `make TORCH_SPEC= test` to keep whatever torch is already there.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: setup
	$(PY) -m modeling_mlmamba demo

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) .pytest_cache
