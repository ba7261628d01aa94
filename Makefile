# Two commands do all set-up on a fresh machine: `make study` and `make test`.
# Both are idempotent: study/setup.sh (the same installer every cluster node runs, see cluster.yaml)
# reinstalls only when pyproject.toml changes, and the asset fetch only verifies what is already cached.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
TEST_WORKERS ?= 2

.PHONY: study test install assets lint gpu-check

install:
	bash study/setup.sh --extras dev --venv $(VENV)

assets:
	bash study/setup.sh --extras dev --venv $(VENV) --assets

# Re-running continues (or re-collects) the same study instead of refusing to overwrite it.
study: assets
	$(PY) -m study.scaling $$(test -d results/scaling/tune && echo --resume)
	$(PY) -m analysis.report --scaling results/scaling

# Two pytest workers: the integration tests run in order on one (tests/conftest.py makes them one
# scope), the unit tests on both; TEST_WORKERS=0 runs everything in one process.
test: assets
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope $(PYTEST_ARGS)

# One GPU, under 5 minutes: pretrained minilm-l6 and smollm2-135m; READ, LST (from a GPU-built cache), LoRA, full,
# NF4 READ and QLoRA in bf16; cuda peak (allocated, reserved) vs estimate, a ZeRO-3 forward, NVML energy.
# Without a GPU it prints "skipped: no GPU" and succeeds.
gpu-check: assets
	$(PY) -m study.gpu_check

lint: install
	$(VENV)/bin/ruff check .
