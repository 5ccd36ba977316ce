# The README's two commands are `make demo` and `make test`; both bootstrap .venv themselves.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
STORE ?= demo_store

.PHONY: demo demo-fresh up down test lint protos clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m loadtest.stack.demo --store $(STORE)

demo-fresh: $(STAMP)
	$(PY) -m loadtest.stack.demo --store $(STORE) --scenario fresh

up: $(STAMP)
	$(PY) -m loadtest.stack up --store $(STORE)

down:
	$(PY) -m loadtest.stack down

test: $(STAMP)
	bash k8s/tools/ensure-kustomize.sh $(VENV)
	$(PY) -m pytest -q tests
	$(MAKE) lint

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy modelpack protos embedding_server ranker_server deploy_controller loadtest

protos: $(STAMP)
	$(PY) -m protos.generate

clean:
	-$(PY) -m loadtest.stack down
	rm -rf $(VENV) $(STORE) build .pytest_cache .mypy_cache .ruff_cache
