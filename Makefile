# Two commands a newcomer types: `make demo` and `make test`. Each builds .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test check bench dev clean tools

# core/__init__.py holds the version, which the installed metadata must match.
$(STAMP): pyproject.toml core/__init__.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,embedded]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/herald dev --demo

dev: $(STAMP)
	$(BIN)/herald dev

# kcat (Debian's) is the independent Kafka client the dev-stack test checks dev.env with.
KCAT := $(shell command -v kcat 2>/dev/null)
tools:
ifeq ($(KCAT),)
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kcat >/dev/null; } \
			|| echo "could not install kcat: tests/test_dev.py will say so"; \
	else echo "kcat is missing: install it (Debian: apt-get install kcat) for tests/test_dev.py"; fi
endif

# The layers contract first: an upward import fails in seconds, naming the import.
test: $(STAMP) tools
	$(BIN)/lint-imports
	$(BIN)/pytest

check: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/herald bench ingest

clean:
	rm -rf $(VENV) .herald .pytest_cache .mypy_cache .ruff_cache .hypothesis
