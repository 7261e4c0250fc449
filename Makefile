# The two commands a newcomer needs:  `make demo`  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
# DeepSpeed JIT-builds its CPU comm op into $TORCH_EXTENSIONS_DIR (~1-2 min). One cache per venv: two
# venvs sharing ~/.cache/torch_extensions rebuild it back and forth.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: install demo test test-fast lint clean browser

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Creates the synthetic RefCOCO-format set, trains the tiny model with Ray Train + DeepSpeed,
# evaluates it and writes overlays to runs/demo/.
demo: install
	$(VENV)/bin/refseg demo --output-dir runs/demo

# The full suite, slow distributed tests included (what CI runs).
test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Debian's chromium + chromium-driver for the serve page test (tests/test_serve_page.py skips without
# them); skipped when both are present; apt-get as root (CI), else through sudo.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; else \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver; fi

lint: install
	$(VENV)/bin/ruff check refseg jobs tune tests bench

clean:
	rm -rf runs .pytest_cache
