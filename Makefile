# Two commands a newcomer types: `make demo` and `make test`. Each builds .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test check bench chaos dev clean tools

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

# Debian packages the tests use: wrk, the load generator of `herald bench receiver` (tests/test_bench_receiver.py);
# chromium and its chromedriver (package chromium-driver), the browser of the notification
# center's test (tests/test_center_browser.py); prometheus, whose promtool checks and unit-tests the
# alert rules and whose server scrapes running herald processes in tests/test_prometheus.py.
DEB_TOOLS := wrk chromium prometheus
MISSING_TOOLS := $(foreach t,$(DEB_TOOLS),$(if $(shell command -v $(t) 2>/dev/null),,$(t)))
MISSING_TOOLS += $(if $(shell command -v chromedriver 2>/dev/null),,chromium-driver)
tools:
ifneq ($(strip $(MISSING_TOOLS)),)
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(MISSING_TOOLS) >/dev/null; } \
			|| echo "could not install $(MISSING_TOOLS): the tests that use them will say so"; \
	else echo "missing: $(MISSING_TOOLS); install them (Debian: apt-get install $(MISSING_TOOLS)) for the tests"; fi
endif

# The layers contract first: an upward import fails in seconds, naming the import. Then the
# alert rules (promtool, from Debian's prometheus package) and their unit tests.
test: $(STAMP) tools
	$(BIN)/lint-imports
	promtool check rules deploy/prometheus/alerts.yml
	promtool test rules deploy/prometheus/alerts_test.yml
	$(BIN)/pytest

check: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/herald bench ingest
	$(BIN)/herald bench receiver
	$(BIN)/herald bench deliver
	$(BIN)/herald bench deliver --channel email
	$(BIN)/herald bench digest

# The soak: 5 minutes of load with faults on the whole pipeline (tests run a 60 s version).
# `make chaos SEED=8601` (2,000/s) or `make chaos RATE=500 SEED=7801`: the README's figures; a seed reproduces a run.
RATE ?= 2000
chaos: $(STAMP)
	$(BIN)/herald chaos --duration 5m --rate $(RATE) $(if $(SEED),--seed $(SEED))

clean:
	rm -rf $(VENV) .herald chaos-report.json .pytest_cache .mypy_cache .ruff_cache .hypothesis test-artifacts
