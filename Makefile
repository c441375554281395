# speakerflow — `make demo` runs the system on the embedded defaults, `make test` runs the suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The install is redone only when the lock file or the project metadata change.
STAMP  := $(VENV)/.installed-$(shell cat requirements.lock requirements-nodeps.lock pyproject.toml | sha1sum | cut -c1-12)

.PHONY: setup browser screenshots demo test test-fast lint format readme models clean help

help:
	@echo "make demo   - install if needed, run broker + PostgreSQL + worker, enroll, stream a call live"
	@echo "make test   - install if needed and run the whole test suite"
	@echo "make lint   - ruff check + format check"
	@echo "make browser - install Debian's chromium for the console's browser tests (root, apt)"

setup: $(STAMP)

$(STAMP): requirements.lock requirements-nodeps.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -r requirements.lock
	$(BIN)/pip install --disable-pip-version-check -q --no-deps -r requirements-nodeps.lock
	$(BIN)/pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	@rm -f $(VENV)/.installed-*
	@touch $@

# The console's tests drive Debian's chromium through Playwright (no browser download). Installed
# here when missing and we are root; otherwise those tests skip and say why.
browser:
	@if [ -x /usr/bin/chromium ]; then echo "chromium: $$(/usr/bin/chromium --version 2>/dev/null)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } \
		|| echo "apt-get could not install chromium: the console's browser tests will be skipped"; \
	else echo "chromium missing and not root: the console's browser tests will be skipped"; fi

# Refresh the README's screenshots of the console (docs/console-*.png).
screenshots: setup browser
	SPEAKERFLOW_SCREENSHOT_DIR=docs $(BIN)/python -m pytest -q tests/test_console.py

demo: setup
	$(BIN)/speakerflow demo

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not integration"

# Downloads SpeechBrain's ECAPA-TDNN into .data/models/ecapa (needs internet; set EMBEDDING_MODEL_PATH to use it).
models: setup
	$(BIN)/speakerflow models download

# Rewrites the README's generated blocks (configuration table, defaults quoted in the text) from the code.
readme: setup
	$(BIN)/python -m speakerflow.streams.readme

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf .data .pytest_cache .ruff_cache
