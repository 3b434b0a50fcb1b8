"""Corpus reading and windowing: every token after a document's first is predicted exactly
once, with the context the docstring promises; the KJV split by book."""

from __future__ import annotations

import json

import pytest

from retrieval.corpus import (KJV_HELDOUT_BOOKS, kjv_books, kjv_split, plan_windows,
                              read_corpus, tokenize_corpora)

WINDOW_CASES = [(1, 4, 4), (2, 4, 2), (5, 4, 2), (10, 4, 2), (10, 4, 4), (11, 4, 3),
                (100, 16, 5), (17, 16, 8)]


@pytest.mark.parametrize("num_tokens,window,stride", WINDOW_CASES,
                         ids=[f"n{n}-W{w}-S{s}" for n, w, s in WINDOW_CASES])
def test_windows_score_every_prediction_once_with_context(num_tokens, window, stride):
    windows = plan_windows(num_tokens, window, stride)
    scored = [t for w in windows for t in range(w.score_from, w.end)]
    assert scored == list(range(num_tokens - 1))  # key t predicts token t + 1
    for i, w in enumerate(windows):
        assert w.end - w.start <= window and w.start <= w.score_from < w.end
        if i == 0:
            assert w.start == w.score_from == 0
        else:  # later windows: at least window - stride tokens of context, at most stride
            assert w.score_from - w.start >= window - stride
            assert w.num_scored <= stride


def test_windows_reject_a_stride_beyond_the_window():
    with pytest.raises(ValueError, match="stride"):
        plan_windows(10, 4, 5)


def test_text_and_jsonl_documents(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("one document\nover two lines")
    lines = tmp_path / "b.jsonl"
    lines.write_text(json.dumps({"text": "first"}) + "\n\n" + json.dumps({"text": "second"}))
    assert [d.text for d in read_corpus(str(text)).documents] == ["one document\nover two lines"]
    assert [d.text for d in read_corpus(str(lines)).documents] == ["first", "second"]
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"body": 1}\n')
    with pytest.raises(ValueError, match="c.jsonl:1"):
        read_corpus(str(bad))


def test_kjv_split_is_by_book_and_disjoint():
    books = kjv_books()
    assert len(books) == 66 and books["Genesis"].startswith("In the beginning God created")
    train, heldout = kjv_split("train"), kjv_split("heldout")
    assert set(heldout) == set(KJV_HELDOUT_BOOKS) and not set(train) & set(heldout)
    assert len(train) + len(heldout) == 66
    corpus = read_corpus("kjv:Jude,3 John")
    assert [d.name for d in corpus.documents] == ["Jude", "3 John"]
    with pytest.raises(ValueError, match="unknown books"):
        read_corpus("kjv:Genesys")


def test_pydoc_topics_are_cpythons_help_topics():
    from pydoc_data.topics import topics

    corpus = read_corpus("pydoc:topics")
    assert {d.name: d.text for d in corpus.documents} == topics
    assert [d.name for d in corpus.documents] == sorted(topics)
    assert len(corpus.sha256) == 64


def test_max_tokens_cuts_the_plan_exactly():
    corpora = [read_corpus("kjv:3 John,2 John")]
    encode = lambda text: list(range(len(text.split())))  # noqa: E731 (a word "tokenizer")
    full = tokenize_corpora(corpora, encode, 64, 32)
    cut = tokenize_corpora(corpora, encode, 64, 32, max_tokens=300)
    assert full.num_scored > 300 and cut.num_scored == 300
    assert cut.windows[:-1] == full.windows[:len(cut.windows) - 1]  # only the last is cut
    assert cut.counts["kjv:3 John,2 John"][1] == 300
