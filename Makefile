# The two commands of the README: `make run` (the main job) and `make test` (the tests).
# Both create .venv and install into it. torch is pinned to a CPU wheel; see README "GPU".
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup agent browser run test test-fast test-integration test-browser lint bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev,corpus]"
	touch $@

# clearml-agent in a virtualenv of its own (it pins its own requests); the agent tests use it.
AGENT_VENV ?= .venv-agent
agent: $(AGENT_VENV)/bin/clearml-agent

$(AGENT_VENV)/bin/clearml-agent:
	$(PYTHON) -m venv $(AGENT_VENV)
	$(AGENT_VENV)/bin/python -m pip install --quiet "clearml-agent==3.0.3"

# Debian's Chromium for the explorer's browser tests (Playwright cannot download browsers here).
browser:
	@command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; }

run: setup
	$(BIN)/stepwise up

lint: setup
	$(BIN)/ruff check .

# The tests come in three tiers (tests/README.md): `make test` runs them all (what CI runs);
# `make test-fast` only the in-process unit tests, the one to run while editing. `make test` runs
# the modules on one worker per core (pytest-xdist; a module's tests stay on one worker; the
# longest modules first, tests/conftest.py).
test: setup agent browser lint
	$(BIN)/python -m pytest -n auto --dist loadfile --no-loadscope-reorder

test-fast: setup
	$(BIN)/python -m pytest -m unit

test-integration: setup agent
	$(BIN)/python -m pytest -m integration

test-browser: setup browser
	$(BIN)/python -m pytest -m browser

bench: setup
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python -m bench all
