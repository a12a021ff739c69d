# Distillery: `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := runs/demo
# Pinned in the same pip command as the project: an unpinned torch resolves to a multi-GB CUDA build
# on CPU machines. On a GPU machine the same pin installs the CUDA wheel.
TORCH := torch==2.13.0

.PHONY: install test demo bench lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH) -e '.[dev]'
	touch $@

test: install
	$(BIN)/python -m pytest -q

demo: install
	@echo "== 1/3 tokenizer: byte-level BPE on the shipped KJV corpus =="
	@test -d $(DEMO)/tokenizer || $(BIN)/distillery tokenizer --out $(DEMO)/tokenizer --vocab-size 8192
	@echo "== 2/3 teacher: random-init Llama (2.5M params) =="
	@test -d $(DEMO)/teacher || $(BIN)/distillery init-model --tokenizer $(DEMO)/tokenizer --out $(DEMO)/teacher \
		--hidden 128 --layers 2 --heads 4
	@echo "== 3/3 cache: teacher soft targets for the corpus =="
	@dir=$$($(BIN)/distillery cache --config configs/demo_cache.yaml | tail -1) && $(BIN)/distillery inspect $$dir

bench: install
	$(BIN)/distillery bench --out bench-results

lint: install
	$(BIN)/ruff check pipeline storage tests

clean:
	rm -rf runs bench-results
