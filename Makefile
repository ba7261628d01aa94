# Two commands do all set-up on a fresh machine: `make study` and `make test`.
# Both are idempotent: the venv is rebuilt only when pyproject.toml changes,
# and the asset fetch only verifies what is already in the cache.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: study test install assets lint

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel on these machines, never a CUDA download.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

assets: $(STAMP)
	$(PY) -m study.assets fetch

# Re-running continues (or re-collects) the same study instead of refusing to overwrite it.
study: assets
	$(PY) -m study.scaling $$(test -d results/scaling/tune && echo --resume)
	$(PY) -m analysis.report --scaling results/scaling

test: assets
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
