"""The text measures of `bench quality` on fixed texts: rep-n and diversity on hand-counted
strings, coherence and MAUVE against sentence-transformers and `mauve-text` called directly,
and the no-repeated-4-gram predicate AWRS is conditioned on."""

from __future__ import annotations

import math

import numpy as np
import pytest

from constraints.predicates import no_repeated_4gram
from quality import metrics


def test_rep_n_counts_repeats_inside_a_text():
    # "a b a b a b": bigrams ab ba ab ba ab (5, 2 unique), trigrams aba bab aba bab (4, 2),
    # 4-grams abab baba abab (3, 2)
    text = "a b a b a b"
    assert metrics.rep_n([text], 2) == pytest.approx(100 * (1 - 2 / 5))
    assert metrics.rep_n([text], 3) == pytest.approx(100 * (1 - 2 / 4))
    assert metrics.rep_n([text], 4) == pytest.approx(100 * (1 - 2 / 3))
    assert metrics.diversity([text]) == pytest.approx((2 / 5) * (2 / 4) * (2 / 3))


def test_rep_n_pools_counts_and_ignores_repeats_across_texts():
    # the same text twice: no n-gram repeats inside either, so nothing counts
    assert metrics.rep_n(["in the beginning God", "in the beginning God"], 2) == 0.0
    # text 1: "x y x y" bigrams xy yx xy (3, 2); text 2: "p q r" pq qr (2, 2) -> 1 - 4/5
    assert metrics.rep_n(["x y x y", "p q r"], 2) == pytest.approx(20.0)
    # whitespace words: newlines and runs of spaces split alike, punctuation sticks
    assert metrics.ngram_counts("the Lord,\n the  Lord, the Lord", 2) == (3, 5)
    assert metrics.diversity(["one two three four five"]) == 1.0
    assert metrics.rep_n(["too short"], 4) == 0.0


def test_greedy_loop_has_low_diversity():
    loop = " ".join(["and the king said unto him"] * 8)
    assert metrics.rep_n([loop], 4) > 80
    assert metrics.diversity([loop]) < 0.01


@pytest.fixture(scope="module")
def texts():
    from quality.samples import held_out_samples
    from transformers import AutoTokenizer

    from engine.loader import resolve_model_dir

    tok = AutoTokenizer.from_pretrained(resolve_model_dir())
    samples = held_out_samples(["kjv:Ruth,Jonah", "pydoc:topics"], tok.encode, tok.decode,
                               num=60, prefix_tokens=24, continuation_tokens=48)
    return samples


def test_coherence_and_mauve_equal_the_reference_libraries(texts):
    from mauve import compute_mauve
    from sentence_transformers import SentenceTransformer

    from decoding.scorers.minilm import MiniLmScorer, bundled_model_dir

    ours = MiniLmScorer()
    st = SentenceTransformer(str(bundled_model_dir()), device="cpu")
    prefixes, refs = [s.prefix for s in texts], [s.reference for s in texts]
    p_texts = refs[30:] + refs[:30]  # continuations of other prefixes: a different set
    ours_p, ours_q = ours.embed(p_texts).numpy(), ours.embed(refs).numpy()
    st_p, st_q = (st.encode(t, convert_to_numpy=True) for t in (p_texts, refs))
    direct = compute_mauve(p_features=st_p, q_features=st_q)  # mauve-text's own defaults
    assert metrics.mauve(ours_p, ours_q) == pytest.approx(direct.mauve, abs=1e-4)
    # the same set against itself is indistinguishable
    assert metrics.mauve(ours_q, ours_q) == pytest.approx(1.0, abs=1e-6)
    cos = np.mean([a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
                   for a, b in zip(st.encode(prefixes), st_q)])
    assert metrics.coherence(ours.embed(prefixes).numpy(), ours_q) == pytest.approx(cos,
                                                                                   abs=1e-5)
    mean, std = metrics.mauve_spread(ours_p, ours_q, seeds=(25, 26))
    assert 0 < mean <= 1 and std >= 0 and math.isfinite(std)


def test_samples_are_contiguous_held_out_segments(texts):
    from transformers import AutoTokenizer

    from engine.loader import resolve_model_dir
    from retrieval.corpus import read_corpus

    tok = AutoTokenizer.from_pretrained(resolve_model_dir())
    docs = {f"{c.spec} {d.name}": tok.encode(d.text)
            for c in map(read_corpus, ["kjv:Ruth,Jonah", "pydoc:topics"]) for d in c.documents}
    assert len(texts) == 60 and len({s.source for s in texts}) == 60
    assert any(s.source.startswith("pydoc") for s in texts)
    for s in texts:
        name, _, start = s.source.rpartition(" @")
        start = int(start)
        assert start % 72 == 0
        assert docs[name][start:start + 72] == s.prefix_ids + s.reference_ids
        assert len(s.prefix_ids) == 24 and len(s.reference_ids) == 48


def test_no_repeated_4gram_predicate():
    said = "and the king said and the king said"
    assert not no_repeated_4gram(said + " ")          # the second "king said" is complete
    assert no_repeated_4gram("and the king said and the king sai")  # may become "saith"
    assert no_repeated_4gram(said[:-1] + "th ")
    assert not no_repeated_4gram(said, complete=True)
    assert no_repeated_4gram("and the king said and the king", complete=True)
    assert no_repeated_4gram("")


def test_polydecode_bench_quality_is_the_bench_script(capsys):
    from server.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["bench", "quality", "--help"])
    assert exit_.value.code == 0
    usage = capsys.readouterr().out
    for flag in ("--strategies", "--prompts", "--max-new-tokens", "--out", "--datastore"):
        assert flag in usage


def test_unknown_strategy_and_knn_without_a_store_are_refused():
    from quality.strategies import preset

    with pytest.raises(ValueError, match="unknown strategy 'typical'"):
        preset("typical", 8)
    with pytest.raises(ValueError, match="needs a datastore"):
        preset("knn", 8)
    params = preset("contrastive", 16)
    assert params.min_new_tokens == params.max_new_tokens == 16
