# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create the virtual environment on first use and are no-ops for set-up afterwards.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.entgan-installed
DEMO_CONFIG ?= configs/demo.yaml
DEMO_RUN_DIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: install demo test test-fast bench clean

install: $(STAMP)

# torch is installed on its own line with an exact pin: an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/entgan run $(DEMO_CONFIG) --run-dir $(DEMO_RUN_DIR) --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
