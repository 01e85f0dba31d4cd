# Two commands do all set-up on a fresh machine:
#   make demo   builds .venv and runs the whole pipeline on the bundled demo world
#   make test   builds .venv and runs the test suite (which builds the docs site too)
#   make docs   writes the configuration reference and builds the docs site into site/ (make docs-serve: read it locally)
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel on machines without a GPU: on this project's machines `torch==2.13.0` is a local
# CPU wheel. Elsewhere set TORCH_SPEC / TORCH_PIP_ARGS (e.g. --index-url .../whl/cpu) as you need.
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
DEMO_ARGS ?=

.PHONY: setup demo test test-slow docs docs-serve clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(VENV)/bin/quartet demo --output runs/demo $(DEMO_ARGS)

test: setup
	$(PY) -m pytest tests -m "not slow"

test-slow: setup
	$(PY) -m pytest tests -m slow

docs: setup
	$(PY) -m quartet.config.reference docs/reference/config.md
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

docs-serve: setup
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve

clean:
	rm -rf $(VENV) runs site
