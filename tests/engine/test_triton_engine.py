"""The engine on the Triton backend (the GPU path, run here by the interpreter on CPU tensors):
one varlen paged-attention launch per layer for the whole step, fused residual add + norm, and
lightning attention for TransNormerLLM. Greedy tokens equal HF transformers (Llama with GQA,
GPT-2) and the TransNormerLLM parallel-form oracle; set-structured prompts equal the HF
explicit-mask oracle; chunked prefill, prefix caching and mixed decode/prefill steps included."""

from __future__ import annotations

import pytest
import torch

from engine.sampling_params import SamplingParams
from tests.decoding.test_set_prompting import MEMBERS, QUESTION, SUFFIX, oracle_greedy, structured
from tests.factories import make_engine
from tests.models import test_gpt2_oracle as gpt2_tests
from tests.models import test_norm_schemes as llama_tests
from tests.models import test_transnormer as tnl_tests

GREEDY = gpt2_tests.GREEDY  # 16 new tokens, as the oracle helper generates
hf_greedy = gpt2_tests.hf_greedy


pytestmark = pytest.mark.usefixtures("triton_backend")


@pytest.fixture(scope="module")
def llama(tmp_path_factory, model_dir):
    hf = llama_tests.make_hf_llama(seed=5)
    path = llama_tests.save_model_dir(hf, tmp_path_factory.mktemp("llama"), model_dir)
    return hf, path


def test_triton_llama_greedy_equals_hf(llama, hf_tokenizer):
    hf, path = llama
    prompts = llama_tests.PROMPTS[:4]
    expected = hf_greedy(hf, hf_tokenizer, prompts)
    engine = make_engine(path, num_blocks=64, block_size=8, max_num_batched_tokens=24)
    assert engine.runner.use_varlen
    # 24-token steps: the longer prompts are chunked while the others decode beside them.
    outs = engine.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == expected
    # Again: the prompts now hit the prefix cache (a chunk starts after cached blocks).
    assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == expected


def test_triton_set_prompt_equals_the_hf_mask_oracle(llama, hf_tokenizer):
    hf, path = llama
    prompt = structured(QUESTION, MEMBERS[:3], SUFFIX)
    expected, _ = oracle_greedy(hf, hf_tokenizer, prompt.segments, max_new_tokens=6)
    engine = make_engine(path, num_blocks=64, block_size=8)
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    assert engine.generate([prompt], params)[0].token_ids == expected


def test_triton_gpt2_greedy_equals_hf(tmp_path, model_dir, hf_tokenizer):
    hf = gpt2_tests.make_hf_gpt2(seed=3)
    path = gpt2_tests.save_model_dir(hf, tmp_path, model_dir)
    prompts = gpt2_tests.PROMPTS[:3]
    engine = make_engine(path, num_blocks=32, block_size=16)
    assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == \
        hf_greedy(hf, hf_tokenizer, prompts)


def test_triton_transnormer_greedy_equals_the_oracle(tmp_path, model_dir):
    from engine.tokenizer import Tokenizer

    sd = tnl_tests.write_checkpoint(tmp_path, model_dir, heads=2, seed=4)
    oracle = tnl_tests.ParallelOracle(sd, heads=2, layers=3)
    tok = Tokenizer(tmp_path)
    ids = [tok.encode(p) for p in tnl_tests.PROMPTS[:3]]
    engine = make_engine(tmp_path, num_blocks=8, max_num_batched_tokens=16)
    outs = engine.generate(ids, SamplingParams(max_new_tokens=6, temperature=0.0))
    assert [o.token_ids for o in outs] == [oracle.greedy(i, max_new=6) for i in ids]


def count_graph_steps(runner) -> list[int]:
    """Wraps the decode graphs' `run`; returns the list of batch sizes it was called with."""
    calls, run = [], runner.graphs.run
    runner.graphs.run = lambda ids, *rest: calls.append(len(ids)) or run(ids, *rest)
    return calls


def test_triton_decode_graph_buffers_pad_the_batch(llama, hf_tokenizer):
    # The CUDA-graph path's static buffers, run eagerly: 3 sequences padded to the batch of 4
    # (padding rows write the null slot and read one key), then 2 and 1 as requests finish.
    hf, path = llama
    prompts = llama_tests.PROMPTS[:3]
    lengths = [16, 12, 9]
    expected = [out[:n] for out, n in zip(hf_greedy(hf, hf_tokenizer, prompts), lengths)]
    engine = make_engine(path, num_blocks=64, block_size=8)
    assert engine.runner.enable_decode_graphs(max_batch=4, max_model_len=512, capture=False)
    assert engine.runner.graphs.sizes == [1, 2, 4]
    calls = count_graph_steps(engine.runner)
    params = [SamplingParams(max_new_tokens=n, temperature=0.0) for n in lengths]
    assert [o.token_ids for o in engine.generate(prompts, params)] == expected
    assert {3, 2, 1} <= set(calls)


def test_triton_decode_graph_buffers_skip_padding_state_slots(tmp_path, model_dir):
    from engine.tokenizer import Tokenizer

    sd = tnl_tests.write_checkpoint(tmp_path, model_dir, heads=2, seed=6)
    oracle = tnl_tests.ParallelOracle(sd, heads=2, layers=3)
    ids = [Tokenizer(tmp_path).encode(p) for p in tnl_tests.PROMPTS[:3]]
    engine = make_engine(tmp_path, num_blocks=8)
    assert engine.runner.enable_decode_graphs(max_batch=4, max_model_len=512, capture=False)
    calls = count_graph_steps(engine.runner)
    outs = engine.generate(ids, SamplingParams(max_new_tokens=6, temperature=0.0))
    assert [o.token_ids for o in outs] == [oracle.greedy(i, max_new=6) for i in ids]
    assert 3 in calls


def test_device_and_dtype_flags(monkeypatch):
    from engine.config import ModelConfig
    from server.cli import build_parser, make_engine_config

    import engine.config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    auto = make_engine_config(build_parser().parse_args(["generate"])).model
    monkeypatch.setattr(engine.config, "cpu_has_native_bf16", lambda: False)
    assert (auto.resolved_device, auto.resolved_dtype) == ("cpu", "float32")
    monkeypatch.setattr(engine.config, "cpu_has_native_bf16", lambda: True)
    assert (auto.resolved_device, auto.resolved_dtype) == ("cpu", "bfloat16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert (auto.resolved_device, auto.resolved_dtype) == ("cuda", "bfloat16")
    assert auto.cuda_graphs
    forced = make_engine_config(build_parser().parse_args(
        ["generate", "--device", "cpu", "--dtype", "float16", "--no-cuda-graphs"])).model
    assert (forced.resolved_device, forced.resolved_dtype) == ("cpu", "float16")
    assert not forced.cuda_graphs
    with pytest.raises(ValueError, match="device='tpu'"):
        ModelConfig(device="tpu")
