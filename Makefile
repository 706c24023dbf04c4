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

demo: setup
	@echo "demo: pipeline not wired yet"

clean:
	rm -rf $(VENV) .pytest_cache
