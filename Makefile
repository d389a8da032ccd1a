# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create the virtual environment on first use and are no-ops for set-up afterwards.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.entgan-installed
DEMO_CONFIG ?= configs/demo.yaml
DEMO_RUN_DIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: install demo test test-fast bench bench-edge clean

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

# The figures quoted in the README's Results: the level headline (every method with its tuned
# settings over six reporting seeds, on the training clock and two edge clocks), server and worker
# memory of every method at 2/4/8/16 workers, the DCGAN memory sweep and the ablations under IID
# and Dirichlet data, one report per config in $(BENCH_OUT)/<config name>/bench.md. About 90
# minutes on 2 CPU cores (benchmarks/README.md). Tuning is its own step, not part of this target:
#   entgan tune benchmarks/level-mnist-2tasks-4workers.yaml --write benchmarks/tuned-level.yaml
# Every config runs even if one has a failed run; the target fails at the end if any did.
BENCH_CONFIGS ?= benchmarks/level-mnist-2tasks-4workers.yaml benchmarks/level-server-memory.yaml benchmarks/server-memory-dcgan.yaml benchmarks/ablations-iid.yaml benchmarks/ablations-dirichlet.yaml
BENCH_OUT ?= runs/bench
bench: $(STAMP)
	@status=0; for config in $(BENCH_CONFIGS); do \
	  $(BIN)/entgan bench $$config --out $(BENCH_OUT)/$$(basename $$config .yaml) --overwrite || status=1; \
	done; exit $$status

# EntGAN at the edge (README Results, "EntGAN at the edge"): the edge bench (4 methods and 2
# ablations over six seeds, replayed on edge-lan, edge-uneven and edge-uneven with equal devices),
# the same with every lever for every method that can take it (straggler-aware participation; FL-GAN with the coded transfers),
# every method tuned for the edge (edge-tuned.yaml, whose choices tuned-edge.yaml holds:
#   entgan tune benchmarks/edge-tuned.yaml --write benchmarks/tuned-edge.yaml), EntGAN with G_k steps at
# the edge against FL-GAN tuned for it (edge-generator.yaml), and server memory at 2-16 workers (MLP and DCGAN).
# About 180 minutes on 2 CPU cores. The real-link checks need root and run on their own:
#   entgan bench benchmarks/edge-20mbit.yaml
#   entgan bench benchmarks/per-node-edge-generator.yaml
EDGE_BENCH_CONFIGS ?= benchmarks/edge-mnist-2tasks-8workers.yaml benchmarks/edge-every-lever.yaml benchmarks/edge-tuned.yaml benchmarks/edge-generator.yaml benchmarks/edge-server-memory.yaml
bench-edge: $(STAMP)
	@status=0; for config in $(EDGE_BENCH_CONFIGS); do \
	  $(BIN)/entgan bench $$config --out $(BENCH_OUT)/$$(basename $$config .yaml) --overwrite || status=1; \
	done; exit $$status

clean:
	rm -rf $(VENV) runs .pytest_cache
