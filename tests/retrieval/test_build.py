"""`datastore build`: keys and values are the engine's captures and the next tokens, the flat
index returns exact neighbours, an interrupted build resumes to the same store, and a
complete store is never overwritten without force."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine.loader import model_fingerprint
from retrieval.build import PROGRESS, build_datastore
from retrieval.corpus import read_corpus, tokenize_corpora
from retrieval.datastore import META, Datastore
from retrieval.prefill import KEY_CAPTURE, prefill_windows
from tests.retrieval.conftest import STRIDE, WINDOW

CORPUS = ["kjv:2 John,3 John"]
pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def make_store(engine, out, **kwargs):
    return build_datastore(engine, CORPUS, out, window=WINDOW, stride=STRIDE,
                           show_progress=False, **kwargs)


@pytest.fixture(scope="module")
def store_dir(retrieval_engine, tmp_path_factory):
    out = tmp_path_factory.mktemp("store")
    make_store(retrieval_engine, out)
    return out


def test_keys_and_values_are_the_engines_captures(retrieval_engine, store_dir):
    engine = retrieval_engine
    store = Datastore.open(store_dir)
    tokens = tokenize_corpora([read_corpus(s) for s in CORPUS], engine.tokenizer.encode,
                              WINDOW, STRIDE)
    assert len(store) == tokens.num_scored == sum(len(t) - 1 for t in tokens.doc_tokens)
    expected_keys, expected_values = [None] * len(tokens.windows), []
    for batch in prefill_windows(engine, tokens, [KEY_CAPTURE], range(len(tokens.windows))):
        for wid, caps in batch:
            expected_keys[wid] = caps[KEY_CAPTURE.name].numpy()
    for w in tokens.windows:
        expected_values += tokens.targets(w)
    np.testing.assert_array_equal(store.values, expected_values)
    # fp16 storage; batch composition may move a float32 key by an ulp or so.
    np.testing.assert_allclose(store.keys.astype(np.float32), np.concatenate(expected_keys),
                               atol=2e-3, rtol=2e-3)
    meta = store.meta
    assert meta.fingerprint == model_fingerprint(engine.loaded.model_dir)
    assert (meta.window, meta.stride, meta.dtype, meta.index.kind) == (WINDOW, STRIDE,
                                                                       "float32", "flat")
    assert [(c.path, c.documents, c.tokens) for c in meta.corpus] == [(CORPUS[0], 2, len(store))]
    assert not (store_dir / PROGRESS).exists()


def test_flat_index_returns_exact_neighbours(store_dir):
    store = Datastore.open(store_dir)
    keys = store.keys.astype(np.float32)
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.5, (16, keys.shape[1]))
    queries = keys[rng.choice(len(keys), 16, replace=False)] + noise
    dists, values = store.search(queries, k=8)
    brute = ((queries[:, None, :] - keys[None]) ** 2).sum(-1)
    order = np.argsort(brute, axis=1, kind="stable")[:, :8]
    np.testing.assert_allclose(dists, np.take_along_axis(brute, order, 1), rtol=1e-4)
    np.testing.assert_array_equal(values, store.values[order])


def test_interrupted_build_resumes_to_the_same_store(retrieval_engine, store_dir, tmp_path):
    assert make_store(retrieval_engine, tmp_path, max_windows=3) is None
    progress = json.loads((tmp_path / PROGRESS).read_text())
    assert progress["windows_done"] >= 3 and not (tmp_path / META).exists()
    assert not retrieval_engine.has_unfinished_requests()  # the rest was aborted
    with pytest.raises(ValueError, match="other arguments"):
        build_datastore(retrieval_engine, CORPUS, tmp_path, window=WINDOW, stride=STRIDE + 1,
                        show_progress=False)
    meta = make_store(retrieval_engine, tmp_path)
    whole, resumed = Datastore.open(store_dir), Datastore.open(tmp_path)
    assert meta == whole.meta
    np.testing.assert_array_equal(resumed.values, whole.values)
    np.testing.assert_allclose(resumed.keys.astype(np.float32), whole.keys.astype(np.float32),
                               atol=2e-3, rtol=2e-3)


def test_a_complete_store_is_not_overwritten_without_force(retrieval_engine, tmp_path):
    make_store(retrieval_engine, tmp_path, max_tokens=100)
    before = (tmp_path / META).read_bytes()
    with pytest.raises(FileExistsError, match="--force"):
        make_store(retrieval_engine, tmp_path, max_tokens=50)
    assert (tmp_path / META).read_bytes() == before
    meta = make_store(retrieval_engine, tmp_path, max_tokens=50, force=True)
    assert meta.count == 50 == len(Datastore.open(tmp_path))
    from server.cli import main

    assert main(["datastore", "build", "--corpus", *CORPUS, "--out", str(tmp_path)]) == 2
