# Two entry points for newcomers (see README): `make demo` and `make test`.
# Both set everything up themselves: a virtualenv, the Python packages, and the few apt packages tests need.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export HF_HUB_OFFLINE := 1

.PHONY: setup system-deps demo test ui clean

setup: $(VENV)/.installed

# torch is pinned first so the CPU build is used where it is available; pip then keeps it.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

# ffmpeg/espeak-ng/sox are needed only to (re)build sample media; tests check that script too.
system-deps:
	@command -v ffmpeg >/dev/null && command -v espeak-ng >/dev/null && command -v sox >/dev/null || \
	  ($(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg espeak-ng sox >/dev/null)

test: setup system-deps
	$(PY) -m pytest -q

# Prefect for demo/ui: local and offline, its database under the repo's git-ignored .prefect/ (so `make ui`
# shows the demo's runs); the venv first on PATH so dvc's `python -m tasks.<stage>` commands use it.
UI_PORT ?= 4200
export UI_PORT
PREFECT_LOCAL := export PREFECT_HOME="$(CURDIR)/.prefect" PATH="$(CURDIR)/$(VENV)/bin:$$PATH" \
	PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=180;

# The whole pipeline on the shipped samples through the Prefect flow (CPU, offline); a second run is a no-op.
demo: setup
	@mkdir -p .prefect
	@$(PREFECT_LOCAL) $(PY) -m flows.demo

# Prefect server + UI on 127.0.0.1:$(UI_PORT), serving the pipeline (manual) and refresh (scheduled) deployments.
ui: setup
	@mkdir -p .prefect
	@$(PREFECT_LOCAL) export PREFECT_API_URL="http://127.0.0.1:$(UI_PORT)/api"; \
	$(VENV)/bin/prefect server start --host 127.0.0.1 --port $(UI_PORT) > .prefect/server.log 2>&1 & server=$$!; \
	trap 'kill $$server 2>/dev/null' EXIT; \
	echo "Prefect UI: http://127.0.0.1:$(UI_PORT)  (server log: .prefect/server.log; Ctrl-C stops both)"; \
	$(PY) -m flows.serve --wait-for-api 180

clean:
	rm -rf $(VENV) .pytest_cache
