"""`bench quality` on the real model: the perplexity and features of continuations equal HF
transformers' on the same tokens; the command writes its JSON, table and plot; contrastive
search repeats itself less than greedy and beam search, as SimCTG reports."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from quality.samples import held_out_samples
from quality.scoring import perplexity, score_continuations
from tests.factories import make_engine

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.fixture(scope="module")
def engine(model_dir):
    # a small step budget: scoring prompts are split across steps (chunked prefill)
    return make_engine(model_dir, max_num_batched_tokens=96, max_num_seqs=4)


def test_perplexity_and_features_equal_hf(engine, hf_model):
    samples = held_out_samples(["kjv:Jonah"], engine.tokenizer.encode,
                               engine.tokenizer.decode, num=5, prefix_tokens=20,
                               continuation_tokens=40)
    prefixes = [s.prefix_ids for s in samples]
    # a generated-looking continuation too: the reference cut short, and another sample's
    continuations = [s.reference_ids for s in samples[:3]] + [
        samples[3].reference_ids[:7], samples[0].reference_ids]
    seen = []
    scored = score_continuations(engine, prefixes, continuations, progress=seen.append)
    assert sum(seen) == 5 and not engine.has_unfinished_requests()
    total_nll, total = 0.0, 0
    for prefix, cont, got in zip(prefixes, continuations, scored):
        ids = torch.tensor([prefix + cont])
        labels = ids.clone()
        labels[0, :len(prefix)] = -100  # HF's loss over the continuation's tokens only
        with torch.inference_mode():
            out = hf_model(ids, labels=labels, output_hidden_states=True)
        assert got.num_tokens == len(cont)
        assert got.nll / len(cont) == pytest.approx(out.loss.item(), abs=2e-4)
        # the last hidden state HF returns is the final norm's output: the LM-head input
        pooled = out.hidden_states[-1][0, len(prefix):].mean(dim=0).numpy()
        np.testing.assert_allclose(got.features, pooled, atol=2e-3, rtol=1e-3)
        total_nll += out.loss.item() * len(cont)
        total += len(cont)
    assert perplexity(scored) == pytest.approx(np.exp(total_nll / total), rel=1e-4)


def test_completion_counts_forward_tokens(engine):
    from decoding.params import Contrastive
    from engine.sampling_params import SamplingParams

    prompt = engine.tokenizer.encode("And the LORD spake unto Jonah the second time, saying,")
    greedy, = engine.generate([prompt], SamplingParams(max_new_tokens=9, min_new_tokens=9,
                                                       temperature=0.0))
    assert len(greedy.token_ids) == 9
    # the prompt once, then every token but the last (it is never run forward)
    assert greedy.num_forward_tokens == len(prompt) - greedy.num_cached_tokens + 8
    contrastive, = engine.generate([prompt], SamplingParams(
        max_new_tokens=9, min_new_tokens=9, strategy=Contrastive(top_k=3)))
    assert contrastive.num_forward_tokens - (len(prompt) - contrastive.num_cached_tokens) \
        == pytest.approx(3 * 8, abs=3)


def test_bench_quality_writes_results_and_reproduces_simctg_direction(tmp_path):
    import bench.quality

    out = tmp_path / "q"
    assert bench.quality.main(["--strategies", "greedy,contrastive,beam,nucleus",
                               "--prompts", "6", "--max-new-tokens", "64", "--out", str(out),
                               "--quiet", "--max-num-seqs", "16", "--threads", "1"]) == 0
    result = json.loads((out / "quality.json").read_text())
    rows = {r["strategy"]: r for r in result["rows"]}
    assert list(rows) == ["greedy", "contrastive", "beam", "nucleus", "human"]
    assert (out / "quality.png").stat().st_size > 10_000
    table = (out / "quality.md").read_text()
    assert table.count("\n") == 2 + 5 and "| contrastive |" in table
    for name in ("greedy", "contrastive", "beam", "nucleus"):
        row = rows[name]
        assert row["emitted_tokens"] == 6 * 64
        assert 0 <= row["mauve"] <= 1 and row["ppl"] > 1 and row["ms_per_token"] > 0
    assert rows["greedy"]["forward_per_token"] == pytest.approx(63 / 64, abs=1e-3)
    # contrastive search runs its k = 4 candidates forward for every token, the last included
    # (a candidate's hidden state is part of its score)
    assert rows["contrastive"]["forward_per_token"] == 4.0
    # SimCTG's direction: contrastive search repeats less than greedy and beam search
    for n in (2, 3, 4):
        assert rows["contrastive"][f"rep_{n}"] < rows["greedy"][f"rep_{n}"]
        assert rows["contrastive"][f"rep_{n}"] < rows["beam"][f"rep_{n}"]
    assert rows["contrastive"]["diversity"] > max(rows["greedy"]["diversity"],
                                                  rows["beam"]["diversity"])
    # the likelihood-maximising searches sit far below human perplexity
    assert rows["greedy"]["ppl"] < rows["human"]["ppl"] and "mauve" not in rows["human"]
    assert len(result["samples"]) == 6 and result["samples"][0]["greedy"]
    redrawn = tmp_path / "redrawn"
    assert bench.quality.main(["--from-json", str(out / "quality.json"),
                               "--out", str(redrawn)]) == 0
    assert (redrawn / "quality.md").read_text() == table
