"""The README's "Writing a strategy" example runs as written: registered by name, its draws
follow HF transformers' `TypicalLogitsWarper` distribution, and it serves requests in the engine
with the seeded, batch-invariant behaviour of a batchable strategy."""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest
import torch
from transformers import TypicalLogitsWarper

from decoding import registry
from decoding.base import SamplingBatch, SamplingRow
from engine.sampling_params import SamplingParams
from tests.factories import make_engine

README = Path(__file__).resolve().parents[1] / "README.md"
VOCAB, DRAWS = 40, 4000


@pytest.fixture(scope="module")
def example():
    section = README.read_text().split("### Writing a strategy", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    module = types.ModuleType("readme_typical")
    exec(compile(code, "README.md", "exec"), module.__dict__)
    yield module
    registry.unregister("typical")  # other tests list the built-in strategies exactly


def test_the_example_registers_by_name(example):
    entry = registry.entry("typical")
    assert entry.cls is example.TypicalSampling and entry.batchable
    with pytest.raises(Exception) as err:
        example.Typical(mass=1.5)
    assert "mass" in str(err.value)


def test_draws_follow_hf_typical_warper(example):
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(3)) * 2
    params = SamplingParams(strategy=example.Typical(mass=0.8))
    rows = [SamplingRow(params=params, prompt_token_ids=[1], output_token_ids=[], seed=s)
            for s in range(DRAWS)]
    batch = SamplingBatch.build(rows, VOCAB)
    drawn = example.TypicalSampling.select(logits.expand(DRAWS, -1), batch, None)
    warped = TypicalLogitsWarper(mass=0.8)(torch.zeros(1, 1, dtype=torch.long), logits.clone())
    want = warped.softmax(dim=-1)[0]
    got = torch.bincount(drawn, minlength=VOCAB).float() / DRAWS
    assert set(drawn.tolist()) <= set(torch.nonzero(want).flatten().tolist())
    assert (got - want).abs().max() < 0.03


def test_the_example_serves_requests_seeded_and_batch_invariant(example, model_dir):
    engine = make_engine(model_dir, num_blocks=64)
    params = SamplingParams(max_new_tokens=8, ignore_eos=True, seed=5,
                            strategy=example.Typical(mass=0.9))
    alone = engine.generate(["The weather today is"], params)[0].token_ids
    mixed = engine.generate(["Hello", "The weather today is"],
                            [SamplingParams(max_new_tokens=8, temperature=0.0), params])
    assert len(alone) == 8 and mixed[1].token_ids == alone
