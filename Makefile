# Two commands matter: `make run` and `make test`. Both install what they need first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SHARED := $(abspath ../shared)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export PYTHONPATH := $(CURDIR)

# Point the model service at ../shared when it is there and nothing else was configured.
ifeq ($(origin MODELS_DIR)$(shell grep -s '^MODELS_DIR=' .env),undefined)
ifneq ($(wildcard $(SHARED)/models),)
export MODELS_DIR := $(SHARED)/models
endif
endif
ifeq ($(origin QUICKDRAW_DIR)$(shell grep -s '^QUICKDRAW_DIR=' .env),undefined)
ifneq ($(wildcard $(SHARED)/data/quickdraw),)
export QUICKDRAW_DIR := $(SHARED)/data/quickdraw
endif
endif
ifeq ($(origin CALIBRATION_DIR)$(shell grep -s '^CALIBRATION_DIR=' .env),undefined)
ifneq ($(wildcard $(SHARED)/data/photos),)
export CALIBRATION_DIR := $(SHARED)/data/photos
endif
endif

.PHONY: install browser nginx run test lint fmt bench clean

$(VENV)/.installed: requirements/*.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements/dev.txt
	# OpenVINO reports every model conversion to Google Analytics from a forked process unless
	# opted out; the portal does not phone home (offline, that fork hangs and outlives its worker).
	$(VENV)/bin/opt_in_out --opt_out >/dev/null
	touch $@

install: $(VENV)/.installed

# Debian's Chromium and its driver, for the browser test (no browser download of its own).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium chromium-driver; }

# Debian's nginx, for the front-door test (tests/deploy/test_nginx.py runs the project's config).
nginx:
	@command -v nginx >/dev/null || \
		{ $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq nginx; }

# scripts/run.py starts a private PostgreSQL or Redis where the default one is missing, then
# prepares the database (api.prestart) and supervises the portal.
run: install
	$(PY) -m model.prepare --defer-training
	$(PY) scripts/run.py

# Two test processes at once by default (pytest-xdist; a file's tests stay in one process, each
# process has its own database, Redis index and model worker), then the tests marked `serial`,
# which measure latency, alone. Both halves run even when the first fails; the exit status says if
# either did. TEST_PROCESSES=1 runs everything in one process.
TEST_PROCESSES ?= 2
test: install browser nginx
	$(PY) -m model.prepare
ifeq ($(TEST_PROCESSES),1)
	$(PY) -m pytest
else
	status=0; \
	$(PY) -m pytest -n $(TEST_PROCESSES) --dist loadfile -m "not serial" || status=$$?; \
	$(PY) -m pytest -m serial || status=$$?; \
	exit $$status
endif

# Raw and end-to-end benchmarks; writes docs/benchmarks/ and the tables of the stress report.
bench: install
	BENCHMARK_MODE=true $(PY) -m model.prepare
	$(PY) -m bench $(BENCH_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/black --check .
	$(VENV)/bin/isort --check-only .
	$(VENV)/bin/mypy

fmt: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/isort .
	$(VENV)/bin/black .

clean:
	rm -rf $(VENV) var .pytest_cache .hypothesis test-artifacts
