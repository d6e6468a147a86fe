# genguard — two commands on a fresh machine:
#   make serve   set up, build the tiny models, serve configs/local.yaml on :8000
#   make test    set up, build the tiny models, run the whole suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_VERSION ?= 2.13.0
CONFIG ?= configs/local.yaml
TINY_DIR ?= .models/tiny
PYTEST_ARGS ?=
STAMP := $(VENV)/.genguard-installed

.PHONY: install serve test test-unit test-integration lint tiny bench chaos clean

install: $(STAMP)

# Re-install only when the dependency list changes; torch goes first so pip
# takes the local CPU wheel instead of pulling a multi-GB CUDA build.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PIP) install -q --upgrade pip
	@$(PY) -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$(TORCH_VERSION)' else 1)" 2>/dev/null \
		|| $(PIP) install -q "torch==$(TORCH_VERSION)"
	@$(PIP) install -q -e '.[test]'
	@touch $(STAMP)

tiny: install
	@$(PY) -m serve_app.tiny build --out $(TINY_DIR)

serve: tiny
	$(VENV)/bin/serve run $(CONFIG)

chaos: tiny
	$(VENV)/bin/serve run configs/chaos.yaml

test: tiny
	@GENGUARD_TINY_DIR=$(abspath $(TINY_DIR)) $(VENV)/bin/pytest $(PYTEST_ARGS)

test-unit: install
	@$(VENV)/bin/pytest -m unit $(PYTEST_ARGS)

lint: install
	@$(VENV)/bin/ruff check resilience actors serve_app tests
	@$(VENV)/bin/mypy --strict resilience actors

bench: tiny
	@GENGUARD_TINY_DIR=$(abspath $(TINY_DIR)) $(PY) -m bench.run

clean:
	rm -rf $(VENV) .models .pytest_cache
