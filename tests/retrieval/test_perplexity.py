"""`eval perplexity`: without kNN (and at lambda 0) it is HF transformers' perplexity on the
same windows; a datastore holding the evaluated text cuts it sharply (memorisation); one built
from other books helps held-out text for some lambda."""

from __future__ import annotations

import json
import math

import msgspec
import pytest
import torch

from retrieval.build import build_datastore
from retrieval.corpus import read_corpus, tokenize_corpora
from retrieval.datastore import write_datastore
from retrieval.knn import mix
from retrieval.perplexity import (KnnSettings, evaluate_perplexity, mix_at_targets,
                                  open_datastore_for)
from tests.retrieval.conftest import STRIDE, WINDOW

TRAIN = ["kjv:Philemon,Titus,2 Thessalonians"]
"""Short epistles (about 2.9k keys)."""
HELD_OUT, MEMORISED = ["kjv:Jude"], ["kjv:Philemon"]
"""An epistle the store does not hold, and one it does."""
ORACLE_TOKENS = 320
pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def hf_nll(hf_model, encode, specs, max_tokens) -> tuple[float, int]:
    """Mean NLL of the scored positions of every window, from HF transformers' logits."""
    tokens = tokenize_corpora([read_corpus(s) for s in specs], encode, WINDOW, STRIDE,
                              max_tokens)
    total = 0.0
    for w in tokens.windows:
        with torch.inference_mode():
            logits = hf_model(torch.tensor([tokens.prompt(w)])).logits[0].float()
        log_probs = torch.log_softmax(logits[w.score_from - w.start:], dim=-1)
        total -= log_probs.gather(1, torch.tensor(tokens.targets(w))[:, None]).double().sum()
    return float(total) / tokens.num_scored, tokens.num_scored


@pytest.fixture(scope="module")
def train_store(retrieval_engine, tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    build_datastore(retrieval_engine, TRAIN, out, window=WINDOW, stride=STRIDE,
                    show_progress=False)
    return open_datastore_for(retrieval_engine, out)


def evaluate(engine, specs, store=None, max_tokens=None, **knn):
    return evaluate_perplexity(engine, specs, store, KnnSettings(**knn), window=WINDOW,
                               stride=STRIDE, max_tokens=max_tokens, show_progress=False)


MIX_CASES = [(0.0, 1.0), (0.25, 1.0), (0.7, 5.0), (1.0, 0.5)]


@pytest.mark.parametrize("lmbda,temperature", MIX_CASES,
                         ids=[f"lambda{lam}-T{t}" for lam, t in MIX_CASES])
def test_mix_at_targets_is_the_full_mix_at_the_targets(lmbda, temperature):
    gen = torch.Generator().manual_seed(0)
    rows, vocab, k = 6, 50, 8
    lm = torch.log_softmax(torch.randn(rows, vocab, generator=gen) * 3, dim=-1)
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    values = torch.randint(0, vocab, (rows, k), generator=gen)
    values[:, :3] = targets[:, None]  # some neighbours vote for the target
    values[4] = (targets[4] + 1) % vocab  # a row where none does
    dists = torch.rand(rows, k, generator=gen) * 10
    dists[2, 5:] = float("inf")  # missing neighbours
    dists[5] = float("inf")  # a row without any
    full = mix(lm, dists, values, temperature, lmbda).gather(1, targets[:, None])[:, 0]
    torch.testing.assert_close(mix_at_targets(lm, dists, values, targets, temperature, lmbda),
                               full, atol=1e-6, rtol=1e-6)


def test_base_and_lambda_zero_perplexity_equal_hf(retrieval_engine, hf_model, train_store):
    nll, n = hf_nll(hf_model, retrieval_engine.tokenizer.encode, HELD_OUT, ORACLE_TOKENS)
    [base] = evaluate(retrieval_engine, HELD_OUT, max_tokens=ORACLE_TOKENS)
    [zero] = evaluate(retrieval_engine, HELD_OUT, train_store, ORACLE_TOKENS, lambdas=(0.0,))
    assert base["tokens"] == zero["tokens"] == n == ORACLE_TOKENS
    assert base["nll"] == pytest.approx(nll, rel=1e-5)
    assert zero["nll"] == base["nll"] == zero["base_nll"]
    assert base["ppl"] == pytest.approx(math.exp(nll), rel=1e-5)


def test_a_store_holding_the_text_cuts_perplexity(retrieval_engine, train_store):
    results = evaluate(retrieval_engine, MEMORISED, train_store, k=64, lambdas=(0.25, 0.5))
    assert results[0]["tokens"] == 551  # every token of Philemon (552) after the first
    for r in results:
        assert r["ppl"] < 0.5 * r["base_ppl"], r
    assert results[1]["ppl"] < results[0]["ppl"]


def test_a_store_of_other_books_helps_held_out_text(retrieval_engine, train_store):
    sweep = evaluate(retrieval_engine, HELD_OUT, train_store, k=256, lambdas=(0.05, 0.1, 0.25))
    print(json.dumps([{k: r[k] for k in ("lambda", "ppl", "base_ppl")} for r in sweep]))
    assert sweep[0]["tokens"] == 776  # Jude: 777 tokens
    assert min(r["ppl"] for r in sweep) < sweep[0]["base_ppl"]


def test_adaptive_retrieval_scores_low_entropy_positions_by_the_model(retrieval_engine,
                                                                      hf_model, train_store):
    """At threshold h, exactly the positions whose model entropy (computed here from HF's
    logits) is at least h use the datastore: h = 0 is plain kNN-LM, a huge h the model."""
    tokens = tokenize_corpora([read_corpus(s) for s in HELD_OUT],
                              retrieval_engine.tokenizer.encode, WINDOW, STRIDE, ORACLE_TOKENS)
    entropy = []
    for w in tokens.windows:
        with torch.inference_mode():
            logits = hf_model(torch.tensor([tokens.prompt(w)])).logits[0].double()
        log_p = torch.log_softmax(logits[w.score_from - w.start:], dim=-1)
        entropy.append(-(log_p.exp() * log_p).sum(-1))
    entropy = torch.cat(entropy)
    thresholds = (0.0, float(entropy.median()), 1e6)
    lines = evaluate(retrieval_engine, HELD_OUT, train_store, ORACLE_TOKENS, k=64,
                     lambdas=(0.5,), entropy_thresholds=thresholds)
    [plain] = evaluate(retrieval_engine, HELD_OUT, train_store, ORACLE_TOKENS, k=64,
                       lambdas=(0.5,))
    assert [line["entropy_threshold"] for line in lines] == list(thresholds)
    assert lines[0]["nll"] == plain["nll"] and lines[0]["searched"] == 1.0
    assert lines[2]["nll"] == pytest.approx(plain["base_nll"]) and lines[2]["searched"] == 0.0
    want = float((entropy >= thresholds[1]).double().mean())
    assert abs(lines[1]["searched"] - want) <= 2 / ORACLE_TOKENS  # ties at the median
    lo, hi = sorted((plain["nll"], plain["base_nll"]))
    assert lo < lines[1]["nll"] < hi


def test_a_store_of_another_model_is_refused(retrieval_engine, train_store, tmp_path):
    meta = msgspec.structs.replace(train_store.meta, fingerprint="0" * 64, count=10)
    write_datastore(tmp_path, train_store.keys[:10], train_store.values[:10], meta)
    with pytest.raises(ValueError, match="built with model"):
        open_datastore_for(retrieval_engine, tmp_path)


def test_cli_prints_one_json_line_per_setting(model_dir, train_store, capsys):
    from server.cli import main

    code = main(["eval", "perplexity", "--model", str(model_dir), "--text", *MEMORISED,
                 "--datastore", str(train_store.path), "--lambda", "0,0.5", "--k", "16",
                 "--knn-temperature", "1,20", "--max-tokens", "200",
                 "--max-num-batched-tokens", "256", "--threads", "1", "--quiet"])
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(line["knn_temperature"], line["lambda"]) for line in lines] == [
        (1.0, 0.0), (1.0, 0.5), (20.0, 0.0), (20.0, 0.5)]
    assert all(line["tokens"] == 200 and line["window"] == WINDOW for line in lines)
    assert lines[1]["ppl"] < lines[0]["ppl"] == pytest.approx(lines[0]["base_ppl"])
    assert main(["eval", "perplexity", "--model", str(model_dir), "--text", *MEMORISED,
                 "--datastore", str(train_store.path), "--lambda", "1.5"]) == 2
    assert main(["eval", "perplexity", "--model", str(model_dir), "--text", *MEMORISED,
                 "--datastore", str(train_store.path), "--entropy-threshold", "-1"]) == 2
