"""kNN-LM (decoding/knn.py) against its oracles: a brute-force numpy kNN-LM over every key of a
flat store, FAISS's exact index for IVFPQ recall, and the same requests run alone (batch
invariance across greedy, seeded sampling, contrastive and beam search).

Real-model stores hold keys that HF transformers computes for a few KJV verses (the last
layer's FFN input, through a hook: the activation the engine captures as `ffn_input:-1`), with
the next tokens as values.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import faiss
import msgspec
import numpy as np
import pytest
import torch

from decoding.base import SamplingBatch, SamplingRow
from decoding.knn import KnnLm, KnnLmTransform
from decoding.params import BeamSearch, Contrastive
from engine.errors import InvalidArgument, NotFound
from engine.sampling_params import SamplingParams
from retrieval import stores
from retrieval.corpus import kjv_path
from retrieval.datastore import Datastore, DatastoreMeta, IndexParams, build_index, \
    write_datastore
from tests.factories import make_engine

NUM_VERSES = 25
PROMPTS = ["And God said, Let there be", "In the beginning God created the",
           "And the evening and the morning were"]
MAX_NEW = 6


# ---- factories ------------------------------------------------------------------------------

def make_meta(count: int, dim: int, kind: str = "flat", fingerprint: str = "test",
              index: IndexParams | None = None) -> DatastoreMeta:
    return DatastoreMeta(model="test", fingerprint=fingerprint, dim=dim, count=count,
                         index=index or IndexParams(kind=kind))


def make_store(path: Path, keys: np.ndarray, values: np.ndarray, kind: str = "flat",
               fingerprint: str = "test") -> Path:
    return write_datastore(path, keys, values, make_meta(len(keys), keys.shape[1], kind,
                                                         fingerprint))


def kjv_text(num_verses: int = NUM_VERSES) -> str:
    with kjv_path().open() as f:
        return " ".join(json.loads(next(f))["text"] for _ in range(num_verses))


def make_kjv_store(path: Path, hf_model, hf_tokenizer, fingerprint: str = "test") -> Path:
    """A flat store of the first KJV verses: the last layer's FFN input (post-attention norm
    output) at every position as the key, the next token as the value."""
    ids = hf_tokenizer(kjv_text()).input_ids
    grabbed = {}
    norm = hf_model.model.layers[-1].post_attention_layernorm
    handle = norm.register_forward_hook(lambda m, i, o: grabbed.setdefault("keys", o))
    try:
        with torch.inference_mode():
            hf_model(torch.tensor([ids]))
    finally:
        handle.remove()
    keys = grabbed["keys"][0, :-1].float().numpy()
    return make_store(path, keys, np.array(ids[1:]), fingerprint=fingerprint)


def brute_force(queries, keys, values, lm_logits, k, temperature, lmbda) -> np.ndarray:
    """log((1 - lambda) p_LM + lambda p_kNN) in float64 from exact distances to every key."""
    lm = torch.log_softmax(torch.as_tensor(lm_logits, dtype=torch.float64), -1).numpy()
    out = np.empty_like(lm)
    keys = np.asarray(keys, dtype=np.float64)
    for i, q in enumerate(np.asarray(queries, dtype=np.float64)):
        d = ((keys - q) ** 2).sum(-1)
        nearest = np.argsort(d, kind="stable")[:k[i]]
        w = np.exp(-(d[nearest] - d[nearest].min()) / temperature[i])
        p_knn = np.zeros(lm.shape[1])
        np.add.at(p_knn, values[nearest], w / w.sum())
        with np.errstate(divide="ignore"):
            out[i] = np.log((1 - lmbda[i]) * np.exp(lm[i]) + lmbda[i] * p_knn)
    return out


def make_batch(queries: torch.Tensor, params: list[KnnLm | None], vocab: int) -> SamplingBatch:
    rows = [SamplingRow(params=SamplingParams(transforms=(p,) if p else ()),
                        prompt_token_ids=[1], output_token_ids=[], seed=0,
                        captures={"ffn_input:-1": q}) for q, p in zip(queries, params)]
    return SamplingBatch.build(rows, vocab)


@pytest.fixture(autouse=True)
def _no_open_stores():
    yield
    stores.close_all()  # other modules' servers list every open store in GetModelInfo


@pytest.fixture
def search_calls(monkeypatch) -> list[tuple[str, int, int]]:
    """(store directory name, queries, k) of every Datastore.search call."""
    calls, search = [], Datastore.search

    def counted(self, queries, k, nprobe=None, recompute=True):
        calls.append((self.path.name, len(queries), k))
        return search(self, queries, k, nprobe, recompute)

    monkeypatch.setattr(Datastore, "search", counted)
    return calls


# ---- params ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, field", [
    (dict(k=0), "k"), (dict(k=4097), "k"), (dict(lmbda=-0.1), "lmbda"),
    (dict(lmbda=float("nan")), "lmbda"), (dict(temperature=0.0), "temperature"),
    (dict(temperature=float("inf")), "temperature"), (dict(nprobe=0), "nprobe"),
    (dict(datastore=""), "datastore"), (dict(entropy_threshold=-0.5), "entropy_threshold"),
    (dict(entropy_threshold=float("inf")), "entropy_threshold"),
])
def test_bad_values_name_the_field(fields, field):
    with pytest.raises(InvalidArgument) as err:
        KnnLm(**{"datastore": "kjv", **fields})
    assert err.value.field == field


def test_unknown_datastore_is_not_found_at_admission(model_dir, tmp_path):
    stores.open_datastore("a", make_store(tmp_path / "a", np.ones((4, 8)), np.arange(4)))
    params = SamplingParams(transforms=(KnnLm(datastore="nope"),))  # values only: fine
    with pytest.raises(NotFound) as err:
        params.check_loaded()
    assert str(err.value) == "knn_lm.datastore: unknown datastore 'nope'; loaded: a"


# ---- the transform against brute force -------------------------------------------------------

VOCAB, DIM = 50, 16


def test_transform_equals_brute_force_and_each_row_alone(tmp_path, search_calls):
    rng = np.random.default_rng(0)
    keys = {n: rng.normal(size=(300, DIM)).astype(np.float16) for n in ("a", "b")}
    values = {n: rng.integers(0, VOCAB, 300) for n in ("a", "b")}
    for n in ("a", "b"):
        stores.open_datastore(n, make_store(tmp_path / n, keys[n], values[n]))
    params = [KnnLm(datastore="a", k=5, temperature=2.0, lmbda=0.3), None,
              KnnLm(datastore="a", k=40, temperature=8.0, lmbda=0.7),
              KnnLm(datastore="b", k=300, temperature=1.0, lmbda=1.0),
              KnnLm(datastore="a", k=1, lmbda=0.5), None,
              KnnLm(datastore="b", k=17, temperature=20.0, lmbda=0.0),
              KnnLm(datastore="a", k=40, temperature=8.0, lmbda=0.7, nprobe=3)]
    queries = torch.randn(len(params), DIM, generator=torch.Generator().manual_seed(1))
    logits = torch.randn(len(params), VOCAB, generator=torch.Generator().manual_seed(2)) * 3
    transform = KnnLmTransform()
    batch = make_batch(queries, params, VOCAB)
    out = transform.apply(logits.clone(), batch)
    # One search per (datastore, nprobe, recompute) group, for the group's largest k; the
    # logprobs path of the same step reuses its neighbours.
    lp = transform.apply_to_logprobs(torch.log_softmax(logits, -1), batch)
    assert sorted(search_calls) == [("a", 1, 40), ("a", 3, 40), ("b", 2, 300)]
    knn_rows = [i for i, p in enumerate(params) if p is not None]
    torch.testing.assert_close(lp[knn_rows], out[knn_rows], atol=1e-5, rtol=0)
    for i, p in enumerate(params):
        if p is None:
            assert torch.equal(out[i], logits[i])  # rows without kNN-LM: bit for bit
            continue
        want = brute_force(queries[i:i + 1].numpy(), keys[p.datastore], values[p.datastore],
                           logits[i:i + 1].numpy(), [p.k], [p.temperature], [p.lmbda])[0]
        assert np.array_equal(np.isinf(want), torch.isinf(out[i]).numpy())
        finite = np.isfinite(want)
        np.testing.assert_allclose(out[i].numpy()[finite], want[finite], atol=2e-5)
        alone = transform.apply(logits[i:i + 1].clone(),
                                make_batch(queries[i:i + 1], [p], VOCAB))
        assert torch.equal(alone[0], out[i]), f"row {i} depends on its batch"


def test_lambda_zero_and_missing_neighbours_keep_the_model(tmp_path):
    stores.open_datastore("tiny", make_store(tmp_path / "t", np.eye(3, DIM), np.arange(3)))
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(3))
    log_probs = torch.log_softmax(logits, -1)
    params = [KnnLm(datastore="tiny", k=8, lmbda=0.0), KnnLm(datastore="tiny", k=8)]
    batch = make_batch(torch.randn(2, DIM), params, VOCAB)
    out = KnnLmTransform().apply_to_logprobs(log_probs.clone(), batch)
    assert torch.equal(out[0], log_probs[0])  # lambda 0: exactly the model
    assert torch.isfinite(out[1]).all()  # 3 of 8 neighbours found; the rest ignored


def test_adaptive_rows_below_their_entropy_threshold_skip_the_search(tmp_path, search_calls):
    rng = np.random.default_rng(4)
    keys, values = rng.normal(size=(200, DIM)).astype(np.float16), rng.integers(0, VOCAB, 200)
    stores.open_datastore("s", make_store(tmp_path / "s", keys, values))
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(5))
    logits[1] *= 30  # nearly one-hot: entropy near 0
    log_p = torch.log_softmax(logits.double(), -1)
    entropy = -(log_p.exp() * log_p).sum(-1)  # the oracle: H = -sum p log p
    threshold = float(entropy[[0, 2, 3]].min()) / 2
    assert entropy[1] < threshold
    params = [KnnLm(datastore="s", k=8, entropy_threshold=threshold),
              KnnLm(datastore="s", k=8, entropy_threshold=threshold),
              KnnLm(datastore="s", k=8, entropy_threshold=1e3),  # above any entropy here
              KnnLm(datastore="s", k=8)]
    queries = torch.randn(4, DIM, generator=torch.Generator().manual_seed(6))
    transform = KnnLmTransform()
    batch = make_batch(queries, params, VOCAB)
    out = transform.apply(logits.clone(), batch)
    lp = transform.apply_to_logprobs(torch.log_softmax(logits, -1), batch)
    assert search_calls == [("s", 2, 8)]  # rows 0 and 3; the logprobs path reuses it
    for i in (1, 2):  # skipped: the model's own distribution, sampled and reported
        assert torch.equal(out[i], logits[i])
        assert torch.equal(lp[i], torch.log_softmax(logits, -1)[i])
    for i in (0, 3):
        want = brute_force(queries[i:i + 1].numpy(), keys, values, logits[i:i + 1].numpy(),
                           [8], [1.0], [0.25])[0]
        finite = np.isfinite(want)
        np.testing.assert_allclose(out[i].numpy()[finite], want[finite], atol=2e-5)


# ---- IVFPQ recall ----------------------------------------------------------------------------

RECALL_DIM, RECALL_KEYS, RECALL_QUERIES = 64, 20_000, 200
RECALL_CASES = [(8, 32, 0.6), (64, 32, 0.7), (256, 32, 0.75), (64, 8, 0.65)]
"""(k, nprobe, lowest mean recall@k accepted; measured 0.72, 0.81, 0.85, 0.76)."""


@pytest.fixture(scope="module")
def recall_stores(tmp_path_factory):
    """The same keys behind a flat and an IVFPQ index (128 lists, 8-byte codes: 8 dims per
    sub-quantizer, about what 64-byte codes give SmolLM2's 576-dim keys). Keys lie near a
    random 8-dimensional subspace, as LM activations lie near a low-dimensional manifold:
    isotropic noise in 64 dims would make every key almost equidistant from a query, and the
    neighbour order meaningless."""
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(8, RECALL_DIM))

    def draw(n):
        return rng.normal(size=(n, 8)) @ basis + 0.05 * rng.normal(size=(n, RECALL_DIM))
    keys = draw(RECALL_KEYS).astype(np.float16)
    values = rng.integers(0, 1000, RECALL_KEYS)
    root = tmp_path_factory.mktemp("recall")
    flat = Datastore.open(make_store(root / "flat", keys, values))
    index, params = build_index(keys, "ivfpq", ncentroids=128, code_size=8)
    ivfpq = Datastore.open(write_datastore(root / "ivfpq", keys, values, make_meta(
        len(keys), RECALL_DIM, index=params), index))
    return flat, ivfpq, draw(RECALL_QUERIES).astype(np.float32)


@pytest.mark.parametrize("k, nprobe, least", RECALL_CASES,
                         ids=[f"k{k}-nprobe{n}" for k, n, _ in RECALL_CASES])
def test_ivfpq_with_recompute_finds_most_of_the_flat_top_k(recall_stores, k, nprobe, least):
    flat, ivfpq, queries = recall_stores
    exact_ids = flat.index.search(queries, k)[1]
    found_ids = ivfpq.index.search(queries, k, params=faiss.SearchParametersIVF(nprobe=nprobe))[1]
    recall = np.mean([len(set(f) & set(e)) / k for f, e in zip(found_ids, exact_ids)])
    nearest = np.mean([e[0] in set(f) for f, e in zip(found_ids, exact_ids)])
    print(f"\nrecall@{k} nprobe={nprobe}: {recall:.3f} (exact nearest found: {nearest:.2f})")
    assert recall >= least
    # recompute: the distances of what IVFPQ found are the exact ones of those keys.
    dists, values = ivfpq.search(queries, k, nprobe=nprobe, recompute=True)
    exact = ((flat.keys[found_ids].astype(np.float32) - queries[:, None]) ** 2).sum(-1)
    np.testing.assert_allclose(dists, exact, rtol=1e-5)
    assert np.array_equal(values, flat.values[found_ids])


# ---- the engine: real model, KJV keys --------------------------------------------------------

KNN_TEMPERATURE = 10.0


@pytest.fixture(scope="module")
def kjv_dir(tmp_path_factory, hf_model, hf_tokenizer) -> Path:
    return make_kjv_store(tmp_path_factory.mktemp("kjv") / "kjv", hf_model, hf_tokenizer)


@pytest.fixture
def kjv(kjv_dir) -> Datastore:
    return stores.open_datastore("kjv", kjv_dir)


@pytest.fixture(scope="module")
def engine(model_dir):
    return make_engine(model_dir, num_blocks=128)


def _knn(**fields) -> KnnLm:
    return KnnLm(**{"datastore": "kjv", "k": 32, "temperature": KNN_TEMPERATURE,
                    "lmbda": 0.5, **fields})


def _with(params: SamplingParams, **fields) -> SamplingParams:
    return msgspec.structs.replace(params, **fields)


GREEDY = SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0, ignore_eos=True, logprobs=5)


def test_lambda_zero_gives_the_models_logprobs(engine, kjv):
    plain, knn = engine.generate([PROMPTS[0]] * 2,
                                 [GREEDY, _with(GREEDY, transforms=(_knn(lmbda=0.0),))])
    assert knn.token_ids == plain.token_ids
    assert knn.logprobs == plain.logprobs  # bit for bit


def test_logprobs_are_the_interpolated_distribution(engine, kjv, hf_model, hf_tokenizer):
    ids = hf_tokenizer(PROMPTS[0]).input_ids
    knn = _knn(k=16)
    engine.add_request(ids, _with(GREEDY, max_new_tokens=1, transforms=(knn,)),
                       captures=("ffn_input:-1",))
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    out = next(o for o in outs if o.logprobs)
    with torch.inference_mode():
        logits = hf_model(torch.tensor([ids])).logits[0, -1:].float().numpy()
    want = brute_force(out.captures["ffn_input:-1"][None].numpy(), kjv.keys, kjv.values,
                       logits, [knn.k], [knn.temperature], [knn.lmbda])[0]
    got = out.logprobs[0]
    assert got.token_id == int(np.argmax(want))
    assert [t for t, _ in got.top] == np.argsort(-want)[:5].tolist()
    np.testing.assert_allclose([v for _, v in got.top], np.sort(want)[::-1][:5], atol=2e-4)
    plain = torch.log_softmax(torch.as_tensor(logits[0]), -1)
    assert abs(got.logprob - float(plain[got.token_id])) > 1e-3  # the datastore did count


def _assert_same(batched, alone) -> None:
    assert batched.token_ids == alone.token_ids
    if alone.candidates:
        assert [c.token_ids for c in batched.candidates] == \
            [c.token_ids for c in alone.candidates]
        np.testing.assert_allclose([c.score for c in batched.candidates],
                                   [c.score for c in alone.candidates], atol=1e-5)
    if alone.logprobs:
        # rtol too: oneDNN picks its GEMM kernel by the number of rows, so a row's float32
        # logits depend on the batch it ran in by a few 1e-6 relative (1.1e-5 at logprob -4.2).
        np.testing.assert_allclose([lp.logprob for lp in batched.logprobs],
                                   [lp.logprob for lp in alone.logprobs], atol=1e-5, rtol=1e-5)


def test_composes_with_every_strategy_in_one_batch(engine, kjv, search_calls, monkeypatch):
    """greedy, seeded sampling, contrastive and beam with kNN-LM, in one batch with plain
    requests: each equals the same request run alone, and each step searches once."""
    base = dict(max_new_tokens=MAX_NEW, ignore_eos=True)
    sampled = SamplingParams(temperature=0.9, top_p=0.95, seed=11, logprobs=2, **base)
    requests = [
        (PROMPTS[0], GREEDY),
        (PROMPTS[0], _with(GREEDY, transforms=(_knn(),))),
        (PROMPTS[1], sampled),
        (PROMPTS[1], _with(sampled, transforms=(_knn(k=64),))),
        (PROMPTS[2], SamplingParams(strategy=Contrastive(top_k=4), transforms=(_knn(),),
                                    **base)),
        (PROMPTS[2], SamplingParams(strategy=BeamSearch(num_beams=3, num_return=2),
                                    transforms=(_knn(k=8),), **base)),
    ]
    calls_before_step, step = [], engine.step

    def counted_step():
        calls_before_step.append(len(search_calls))
        return step()

    monkeypatch.setattr(engine, "step", counted_step)
    batched = engine.generate([p for p, _ in requests], [sp for _, sp in requests])
    calls_before_step.append(len(search_calls))
    per_step = np.diff(calls_before_step)
    assert per_step.max() == 1, "one search per datastore per step, not per row"
    assert max(num_queries for _, num_queries, _ in search_calls) >= 6  # rows of 4 requests
    monkeypatch.undo()
    for (prompt, params), out in zip(requests, batched):
        _assert_same(out, engine.generate([prompt], [params])[0])
    assert batched[1].token_ids != batched[0].token_ids  # kNN-LM changed the greedy text


def test_awrs_draws_from_the_interpolated_distribution(engine, kjv):
    """AWRS checks tokens drawn from the transformed distribution: with kNN-LM it draws from
    the interpolated one (other particles than without, every one still valid), and a request
    equals its solo run when batched with a plain one."""
    from decoding.awrs import Awrs
    from decoding.constraint import Constraint

    constraint = Constraint(regex=r" [A-Z][a-z]+ [a-z]+( [a-z]+){0,3}")
    awrs = dict(max_new_tokens=12, transforms=(constraint,),
                strategy=Awrs(num_particles=4, seed=4))
    with_knn = SamplingParams(**{**awrs, "transforms": (constraint, _knn(lmbda=0.8))})
    plain, knn = engine.generate([PROMPTS[0]] * 2, [SamplingParams(**awrs), with_knn])
    assert [c.token_ids for c in plain.candidates] != [c.token_ids for c in knn.candidates]
    for out in (plain, knn):
        for c in out.candidates:
            if c.score > float("-inf"):
                assert re.fullmatch(r" [A-Z][a-z]+ [a-z]+( [a-z]+){0,3}", c.text), c.text
    alone = engine.generate([PROMPTS[0]], [with_knn])[0]
    assert [c.token_ids for c in alone.candidates] == [c.token_ids for c in knn.candidates]
    assert [c.score for c in alone.candidates] == pytest.approx(  # float order of the batch
        [c.score for c in knn.candidates], rel=1e-6)
