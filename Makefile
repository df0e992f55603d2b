# The two commands: `make demo` and `make test`.  Each creates .venv and
# installs what it needs (pinned by constraints.txt) on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PIP    := $(VENV)/bin/pip
PYBIN  := $(VENV)/bin/python

.PHONY: demo test install install-test lint clean

$(VENV)/.runtime: pyproject.toml constraints.txt
	test -x $(PYBIN) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e .
	touch $@

# The CUDA PJRT plugin (tests/test_plan_gpu.py: `jaxft plan --topology h100-8`) goes to a folder of its
# own, put on the path by those tests alone: in the venv it would make every jax process that does not
# set JAX_PLATFORMS print the plugin's start-up failure on a machine without a GPU.
$(VENV)/.test: $(VENV)/.runtime
	$(PIP) install -q -c constraints.txt -e ".[test]"
	$(PIP) install -q -c constraints.txt --no-deps --upgrade --target $(VENV)/gpu-plan jax-cuda12-plugin jax-cuda12-pjrt
	touch $@

install: $(VENV)/.runtime
install-test: $(VENV)/.test

demo: $(VENV)/.runtime
	$(VENV)/bin/jaxft demo --out runs/demo

# Two passes: everything in parallel, then the `serial` tests alone on a quiet machine (two
# processes training over gloo, whose communicator set-up has a fixed 30 s deadline).
test: $(VENV)/.test
	$(PYBIN) -m pytest -q -p no:cacheprovider -n 2 --dist worksteal --durations=20 -m "not serial"
	$(PYBIN) -m pytest -q -p no:cacheprovider -m serial

clean:
	rm -rf $(VENV) runs
