# Everything a fresh machine needs: `make demo` (the method end to end on CPU) and `make test`.
PYTHON ?= python3
VENV := .venv
VENV_REF := .venv-ref
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: test test-all demo venv venv-ref bench clean

venv: $(VENV)/.installed
venv-ref: $(VENV_REF)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV_REF)/.installed: requirements-ref.txt
	test -x $(VENV_REF)/bin/python || $(PYTHON) -m venv $(VENV_REF)
	$(VENV_REF)/bin/python -m pip install -q -r requirements-ref.txt
	touch $@

# The CI suite: everything but tests marked slow (those run with `make test-all`).
test: venv venv-ref
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-all: venv venv-ref
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: venv
	$(PY) tools/demo.py

clean:
	rm -rf output .pytest_cache
