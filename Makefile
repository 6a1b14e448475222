# Two commands for a newcomer on a fresh machine:
#   make demo   set everything up, then run ML-Mamba end to end
#   make test   set everything up, then run the test suite
# Both install the versions recorded in constraints.txt (the lock: what CI tests), so that a fresh machine gets the
# same environment today and in a year.
#   make lock   refresh the lock: resolve the newest releases the package allows in a scratch venv, record them
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
LOCK   ?= constraints.txt
# The CPU wheel of torch on this kind of machine. On a GPU machine, install your CUDA torch into the venv first,
# or run `make TORCH_SPEC= test` to keep whatever torch is already there (the lock's torch line is then not applied).
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test lock clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if [ -n "$(TORCH_SPEC)" ]; then grep -v '^#' $(LOCK) > $(VENV)/constraints.txt; \
	else grep -v -e '^#' -e '^torch==' $(LOCK) > $(VENV)/constraints.txt; fi
	@if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q -c $(VENV)/constraints.txt "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e ".[test]"
	touch $@

demo: setup
	$(PY) -m modeling_mlmamba demo

test: setup
	$(PY) -m pytest -q tests

# A scratch venv with the newest releases that pyproject.toml allows (torch: TORCH_SPEC), frozen into $(LOCK).
# Run the suite on the new lock (`make clean test`) before committing it; CI runs it on every commit.
lock:
	rm -rf $(VENV)-lock
	$(PYTHON) -m venv $(VENV)-lock
	$(VENV)-lock/bin/python -m pip install -q --upgrade pip
	$(VENV)-lock/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(VENV)-lock/bin/python -m pip install -q -e ".[test]"
	{ echo "# The lock: every package of the environment that 'make test' / 'make demo' build, at the versions CI tests."; \
	  echo "# Refreshed by 'make lock' on $$(date -u +%Y-%m-%d) with $$($(VENV)-lock/bin/python --version)."; \
	  $(VENV)-lock/bin/python -m pip freeze --exclude-editable | sed -e 's/^torch==\([0-9.]*\)+.*/torch==\1/'; \
	} > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf $(VENV)-lock

clean:
	rm -rf $(VENV) .pytest_cache
