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

$(VENV)/.test: $(VENV)/.runtime
	$(PIP) install -q -c constraints.txt -e ".[test]"
	touch $@

install: $(VENV)/.runtime
install-test: $(VENV)/.test

demo: $(VENV)/.runtime
	$(VENV)/bin/jaxft demo --out runs/demo

test: $(VENV)/.test
	$(PYBIN) -m pytest -q -p no:cacheprovider -n 2

clean:
	rm -rf $(VENV) runs
