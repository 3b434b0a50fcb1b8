"""The one-call C++ decoder stack against the model's own module-by-module forward (which the
HF-parity oracle tests hold to transformers): the same tokens and the same logprobs, bit for
bit, in float32 and bfloat16, at batch 1 and over a mixed batch whose contexts cross block
boundaries, with prepacked, int8 and int4 linears. A model outside its form runs the eager
forward (the Post-LN layers of Mix-LN too, which `tests/models/test_norm_schemes.py` holds to
HF)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from engine.kernels import decode_stack
from engine.sampling_params import SamplingParams
from tests.factories import make_engine

PROMPTS = ["Hello", "The capital of France is",
           "Paged attention stores keys and values in fixed-size blocks. " * 9 + "In short,",
           "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"]


def _generate(engine, prompts, stack: bool, monkeypatch, max_new=20):
    monkeypatch.setenv("POLYDECODE_DECODE_STACK", "1" if stack else "0")
    params = SamplingParams(max_new_tokens=max_new, temperature=0.0, ignore_eos=True,
                            logprobs=3)
    return [(o.token_ids, repr(o.logprobs)) for o in engine.generate(prompts, params)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_stack_equals_eager_forward(model_dir, dtype, monkeypatch):
    engine = make_engine(model_dir, dtype=dtype, enable_prefix_caching=False)
    calls = []
    run = decode_stack.run
    monkeypatch.setattr(decode_stack, "run", lambda *a, **k: calls.append(1) or run(*a, **k))
    for prompts in (PROMPTS[:1], PROMPTS):
        eager = _generate(engine, prompts, False, monkeypatch)
        assert not calls
        stacked = _generate(engine, prompts, True, monkeypatch)
        assert len(calls) >= 19, "the decode steps did not run the stack"
        assert stacked == eager
        calls.clear()
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


@pytest.mark.parametrize("quantization,dtype", [("int8", "float32"), ("int4", "bfloat16")])
def test_quantized_stack_equals_eager_forward(model_dir, quantization, dtype, monkeypatch):
    engine = make_engine(model_dir, quantization=quantization, dtype=dtype,
                         enable_prefix_caching=False)
    assert engine.runner.model._stack_weights()[0] == quantization
    eager = _generate(engine, PROMPTS, False, monkeypatch)
    assert _generate(engine, PROMPTS, True, monkeypatch) == eager


def test_unpacked_linears_run_eagerly(model_dir, monkeypatch):
    engine = make_engine(model_dir, num_blocks=64)
    model = engine.runner.model
    layer = model.layers[3].mlp
    layer.down_proj = torch.nn.Linear(layer.down_proj.in_features, layer.down_proj.out_features,
                                      bias=False)
    model.__dict__.pop("_stack", None)  # collected again on the next call
    assert model._stack_weights() is None
    out = engine.generate(PROMPTS[:2], SamplingParams(max_new_tokens=4, temperature=0.0))
    assert all(len(o.token_ids) == 4 for o in out)


def test_stack_releases_the_gil(model_dir, monkeypatch):
    # While a stack call runs in one thread, another Python thread keeps running: its longest
    # pause inside a call must be far below the call's length (a held GIL would stall it for
    # the whole call).
    engine = make_engine(model_dir, num_blocks=256, enable_prefix_caching=False)
    calls: list[tuple[float, float]] = []
    run = decode_stack.run

    def timed_run(*args, **kwargs):
        start = time.perf_counter()
        out = run(*args, **kwargs)
        calls.append((start, time.perf_counter()))
        return out

    monkeypatch.setattr(decode_stack, "run", timed_run)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the other core is the Python thread's
    done, stamps = threading.Event(), []

    def steps():
        engine.generate([PROMPTS[2]] * 16, SamplingParams(max_new_tokens=8, temperature=0.0,
                                                          ignore_eos=True))
        done.set()

    try:
        worker = threading.Thread(target=steps)
        worker.start()
        while not done.is_set():
            stamps.append(time.perf_counter())
            time.sleep(0.0005)
        worker.join()
    finally:
        torch.set_num_threads(threads)
    assert len(calls) >= 7
    pauses, lengths = [], []
    for start, end in calls:
        inside = [start] + [t for t in stamps if start < t < end] + [end]
        pauses.append(max(b - a for a, b in zip(inside, inside[1:])))
        lengths.append(end - start)
    step = sorted(lengths)[len(lengths) // 2]
    assert step > 0.01, f"a stack call took {step * 1e3:.1f} ms: too short to tell"
    assert max(pauses) < step / 2, (f"the other thread paused {max(pauses) * 1e3:.1f} ms "
                                    f"during {step * 1e3:.1f} ms stack calls")


def test_timings_split_the_call_without_changing_it(model_dir, monkeypatch):
    engine = make_engine(model_dir, num_blocks=64, enable_prefix_caching=False)
    plain = _generate(engine, PROMPTS[:2], True, monkeypatch, max_new=6)
    monkeypatch.setattr(decode_stack, "timings", torch.zeros(2, dtype=torch.float64))
    calls = []
    run = decode_stack.run

    def timed_run(*args, **kwargs):
        start = time.perf_counter()
        out = run(*args, **kwargs)
        calls.append(time.perf_counter() - start)
        return out

    monkeypatch.setattr(decode_stack, "run", timed_run)
    assert _generate(engine, PROMPTS[:2], True, monkeypatch, max_new=6) == plain
    gemm, attention = decode_stack.timings.tolist()
    # One call for the prompts' step (plain chunks run in the stack too) and one per decode
    # step after it.
    assert len(calls) == 6 and 0 < attention < gemm < sum(calls)
