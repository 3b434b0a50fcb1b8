"""`polydecode datastore build`: a kNN-LM datastore from corpora, computed by the engine.

The corpora are tokenized and cut into windows up front (`retrieval.corpus`), so the number of
keys and each window's slice of them are known before the first step: keys.npy (float16) and
values.npy (int32) are created at full size as memory maps and every finished window writes its
rows in place, in whatever order the engine finishes windows. Then the FAISS index is built from
the key memmap and meta.json is written last: a directory with meta.json is a complete store.

Resuming: `progress.json` records the build's arguments (`BuildPlan`) and the number of leading
windows whose rows are written and flushed. A build interrupted at any point (Ctrl-C, a crash,
`max_windows`) and rerun with the same arguments continues after those windows (windows that
had finished beyond them are recomputed); a rerun with different arguments is refused, and a
complete store is never overwritten without `force`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import msgspec
import numpy as np

from engine.loader import model_fingerprint
from retrieval.corpus import (DEFAULT_STRIDE, DEFAULT_WINDOW, Corpus, TokenizedCorpus,
                              read_corpus, tokenize_corpora)
from retrieval.datastore import (INDEX, KEYS, META, TRAIN_KEYS, VALUES, CorpusFile,
                                 DatastoreMeta, build_index, resolve_kind)
from retrieval.prefill import KEY_CAPTURE, prefill_windows, progress_bar

if TYPE_CHECKING:
    from engine.engine import Engine

PROGRESS = "progress.json"
_FLUSH_EVERY_S = 5.0


class BuildPlan(msgspec.Struct, frozen=True, kw_only=True):
    """Everything that determines a store's contents; a resumed build must match it."""

    model: str
    fingerprint: str
    dtype: str
    corpus: list[CorpusFile]
    window: int
    stride: int
    max_tokens: int | None
    index: str
    count: int
    dim: int


class _Progress(msgspec.Struct, kw_only=True):
    plan: BuildPlan
    windows_done: int = 0
    """Windows [0, windows_done) have their keys and values flushed to disk."""


def build_datastore(engine: Engine, corpus_specs: list[str], out: Path, *,
                    index: str = "auto", window: int = DEFAULT_WINDOW,
                    stride: int = DEFAULT_STRIDE, max_tokens: int | None = None,
                    force: bool = False, max_windows: int | None = None,
                    show_progress: bool = True) -> DatastoreMeta | None:
    """Builds (or resumes building) the datastore of `corpus_specs` in `out`.

    Returns its meta, or None when stopped after `max_windows` windows (an interrupt for
    tests: rerunning without it resumes). Raises FileExistsError when `out` holds a complete
    store (and not `force`) and ValueError when it holds an unfinished build with other
    arguments.
    """
    out = Path(out)
    check_target(out, force)
    if window >= engine.max_model_len:
        raise ValueError(f"window={window}: must be below the model's context length "
                         f"({engine.max_model_len})")
    corpora = [read_corpus(spec) for spec in corpus_specs]
    tokens = tokenize_corpora(corpora, engine.tokenizer.encode, window, stride, max_tokens)
    if tokens.num_scored == 0:
        raise ValueError("the corpus has no token to store (each document needs two or more)")
    plan = _plan(engine, corpora, tokens, index, window, stride, max_tokens)
    progress = _open_progress(out, plan)
    keys, values = _open_arrays(out, plan, fresh=progress.windows_done == 0)
    done = _fill(engine, tokens, keys, values, out, progress, max_windows, show_progress)
    if done < len(tokens.windows):
        return None
    return _finish(out, plan, keys, show_progress)


def check_target(out: Path, force: bool) -> None:
    """Refuses a directory holding a complete store (FileExistsError), or clears it for a new
    build when `force`."""
    out = Path(out)
    if not (out / META).exists():
        return
    if not force:
        raise FileExistsError(f"{out} already holds a complete datastore; pass --force to "
                              f"overwrite it")
    for name in (META, INDEX, KEYS, VALUES, PROGRESS):
        (out / name).unlink(missing_ok=True)


def _plan(engine, corpora: list[Corpus], tokens: TokenizedCorpus, index: str, window: int,
          stride: int, max_tokens: int | None) -> BuildPlan:
    files = [CorpusFile(c.spec, c.sha256, *tokens.counts[c.spec]) for c in corpora]
    model_dir = engine.loaded.model_dir
    return BuildPlan(model=model_dir.name, fingerprint=model_fingerprint(model_dir),
                     dtype=str(engine.loaded.dtype).removeprefix("torch."), corpus=files,
                     window=window, stride=stride, max_tokens=max_tokens, index=index,
                     count=tokens.num_scored, dim=engine.loaded.config.hidden_size)


def _open_progress(out: Path, plan: BuildPlan) -> _Progress:
    path = out / PROGRESS
    if not path.exists():
        out.mkdir(parents=True, exist_ok=True)
        progress = _Progress(plan=plan)
        _write_json(path, progress)
        return progress
    progress = msgspec.json.decode(path.read_bytes(), type=_Progress)
    if progress.plan != plan:
        diff = {f: (getattr(progress.plan, f), getattr(plan, f))
                for f in plan.__struct_fields__
                if getattr(progress.plan, f) != getattr(plan, f)}
        raise ValueError(f"{out} holds an unfinished build with other arguments "
                         f"(was, now: {diff}); rerun it as before to resume, or pass --force "
                         f"to start over")
    return progress


def _open_arrays(out: Path, plan: BuildPlan, fresh: bool) -> tuple[np.ndarray, np.ndarray]:
    """keys [count, dim] float16 and values [count] int32 as writable memory maps."""
    if fresh:
        keys = np.lib.format.open_memmap(out / KEYS, mode="w+", dtype=np.float16,
                                         shape=(plan.count, plan.dim))
        values = np.lib.format.open_memmap(out / VALUES, mode="w+", dtype=np.int32,
                                           shape=(plan.count,))
        return keys, values
    return (np.lib.format.open_memmap(out / KEYS, mode="r+"),
            np.lib.format.open_memmap(out / VALUES, mode="r+"))


def _fill(engine, tokens: TokenizedCorpus, keys: np.ndarray, values: np.ndarray, out: Path,
          progress: _Progress, max_windows: int | None, show_progress: bool) -> int:
    """Computes the windows from `progress.windows_done` on; returns how many leading windows
    are written and flushed when it stops."""
    offsets = np.cumsum([0] + [w.num_scored for w in tokens.windows])
    first = progress.windows_done
    finished = set()
    bar = progress_bar(show_progress, total=int(offsets[-1]), initial=int(offsets[first]),
                       desc="datastore build", unit="tok")
    last_flush = time.monotonic()
    stream = prefill_windows(engine, tokens, [KEY_CAPTURE], range(first, len(tokens.windows)))
    try:
        for batch in stream:
            for wid, caps in batch:
                w, at = tokens.windows[wid], int(offsets[wid])
                keys[at:at + w.num_scored] = caps[KEY_CAPTURE.name].numpy()
                values[at:at + w.num_scored] = tokens.targets(w)
                finished.add(wid)
                bar.update(w.num_scored)
            while progress.windows_done in finished:
                finished.discard(progress.windows_done)
                progress.windows_done += 1
            if max_windows is not None and progress.windows_done - first >= max_windows:
                break
            if time.monotonic() - last_flush > _FLUSH_EVERY_S:
                _flush(out, keys, values, progress)
                last_flush = time.monotonic()
    finally:
        stream.close()  # aborts the windows still in the engine
        bar.close()
        _flush(out, keys, values, progress)
    return progress.windows_done


def _flush(out: Path, keys: np.ndarray, values: np.ndarray, progress: _Progress) -> None:
    # Data first, then the record that it is there: a crash in between only loses work.
    keys.flush()
    values.flush()
    _write_json(out / PROGRESS, progress)


def _finish(out: Path, plan: BuildPlan, keys: np.ndarray, show_progress: bool) -> DatastoreMeta:
    desc = "faiss index"
    if resolve_kind(plan.count, plan.index) == "ivfpq":  # training shows no progress of its own
        desc += f" (IVFPQ: training on {min(plan.count, TRAIN_KEYS):,} keys first)"
    bar = progress_bar(show_progress, total=plan.count, desc=desc, unit="key")
    index, params = build_index(keys, plan.index, progress=lambda n: bar.update(n - bar.n))
    bar.close()
    tmp = out / f"{INDEX}.tmp"
    faiss.write_index(index, str(tmp))
    os.replace(tmp, out / INDEX)
    meta = DatastoreMeta(model=plan.model, fingerprint=plan.fingerprint, dim=plan.dim,
                         count=plan.count, index=params, corpus=plan.corpus,
                         window=plan.window, stride=plan.stride, dtype=plan.dtype)
    _write_json(out / META, meta)
    (out / PROGRESS).unlink()
    return meta


def _write_json(path: Path, value) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(msgspec.json.format(msgspec.json.encode(value)))
    os.replace(tmp, path)
