# Distillery: `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := runs/demo
# Pinned in the same pip command as the project: an unpinned torch resolves to a multi-GB CUDA build
# on CPU machines. On a GPU machine the same pin installs the CUDA wheel.
TORCH := torch==2.13.0

.PHONY: install test demo demo-teacher bench bench-smoke chaos lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH) -e '.[dev]'
	touch $@

test: install
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

# The demo teacher is kept: a second `make demo` (and `make bench`) reuses it.
demo-teacher: install
	@echo "== 1/4 tokenizer: byte-level BPE (8k) on the shipped KJV corpus =="
	@test -d $(DEMO)/tokenizer || $(BIN)/distillery tokenizer --out $(DEMO)/tokenizer --vocab-size 8192
	@echo "== 2/4 teacher: pretrain a 7.6M-parameter Llama on the corpus (kept for later demos) =="
	@test -d $(DEMO)/teacher/final || $(BIN)/distillery pretrain --config configs/demo_teacher.yaml

demo: demo-teacher
	@echo "== 3/4 run: round 1 teacher -> student A, round 2 A -> smaller student B on chat data =="
	$(BIN)/distillery run --config configs/demo_run.yaml
	@echo "== 4/4 report: $(DEMO)/run/report.md =="

bench: demo-teacher
	$(BIN)/distillery bench --out bench-results --teacher $(DEMO)/teacher/final

# The slow runs of benchmark code that `make test` skips: `distillery bench --quick` end to end (a smoke test of
# every section, never a timing) and the stage-1 peak-RSS check: about 3 min on 2 cores.
bench-smoke: install
	BENCH_SMOKE=1 $(BIN)/python -m pytest -q -m bench_smoke tests

# Random kills and preemption signals for every stage, disk full and concurrent jobs: 10 min on 2 cores.
# `make test` runs a fast subset of the same sweeps.
chaos: install
	CHAOS_SCALE=full CHAOS_RESULTS=chaos-results $(BIN)/python -m pytest -q tests/chaos

lint: install
	$(BIN)/ruff check pipeline storage tests
	$(BIN)/lint-imports

clean:
	rm -rf runs bench-results
