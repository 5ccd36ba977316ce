# The README's two commands are `make demo` and `make test`; both bootstrap .venv themselves.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
STORE ?= demo_store

.PHONY: demo test lint protos bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m modelpack demo --store $(STORE)

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
	rm -rf $(VENV) $(STORE) .pytest_cache .mypy_cache .ruff_cache
