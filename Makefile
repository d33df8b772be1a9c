# `make demo` runs the main job offline end to end; `make test` runs the test suite. Both set everything up.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel that lies on the development machines; on a GPU box use e.g. `make test TORCH_SPEC=torch`.
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= outputs/demo

.PHONY: install demo test lint clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/di-star demo --out $(DEMO_OUT)

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/pip install -q ruff
	$(BIN)/ruff check src tests examples benchmarks

clean:
	rm -rf $(VENV) outputs .pytest_cache
