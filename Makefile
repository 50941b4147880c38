# Two entry points, each sets everything up first:
#   make demo   - the CPU demo (offline, tiny models built in code)
#   make test   - the test suite (offline)
PYTHON ?= python3
VENV ?= .venv
# The torch build to install. Override for your CUDA build, e.g. TORCH_SPEC="torch torchvision".
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test lint browser

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

# The studio's browser test drives the system's Chromium (Debian's package; Playwright downloads no browser).
# Installed quietly when missing and we are root with apt-get (a failure then stops make); otherwise that one
# test skips, saying why.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium not found and not root: the studio's browser test will skip (apt-get install chromium)"; fi

setup: $(VENV)/.installed

demo: setup
	$(BIN)/dreampainter demo

test: setup browser
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
