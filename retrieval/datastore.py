"""kNN-LM datastores on disk, and the batched nearest-neighbour search over them.

A datastore directory holds one entry per corpus position t (Khandelwal et al. 2020): the key is
the model's representation of the context up to t (`key_kind`, "ffn_input:-1": the last layer's
FFN input after its norm), the value is the token at t + 1.

    meta.json     DatastoreMeta: model fingerprint, key kind, dim, count, index, corpus
    keys.npy      float16 [count, dim], memory-mapped (exact distances are recomputed from it)
    values.npy    int32 [count]
    index.faiss   IndexFlatL2 (exact) or IVFPQ, opened with FAISS's mmap flag

`Datastore.open` maps everything read-only: several requests and processes share the pages, and a
store larger than RAM works. `search` is one FAISS call for a whole batch of queries.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faiss
import msgspec
import numpy as np
import torch

FORMAT_VERSION = 1
META, KEYS, VALUES, INDEX = "meta.json", "keys.npy", "values.npy", "index.faiss"
FLAT_MAX_KEYS = 200_000
"""`auto` indexes below this many keys exactly (IndexFlatL2), above with IVFPQ."""
TRAIN_KEYS = 1_000_000
"""IVFPQ trains on a seeded sample of at most this many keys (the reference's 1M)."""
RECOMPUTE_BLOCK_ELEMENTS = 1 << 19
"""Gathered key elements per block of the exact recompute (2 MB of float32: cache-sized)."""


class IndexParams(msgspec.Struct, frozen=True, kw_only=True):
    kind: str
    """"flat" (exact) or "ivfpq"."""
    ncentroids: int = 0
    code_size: int = 0
    """Bytes per PQ code (ivfpq)."""
    nbits: int = 8
    train_keys: int = 0
    """Keys the coarse quantizer and PQ were trained on (a seeded random sample)."""


class CorpusFile(msgspec.Struct, frozen=True):
    path: str
    sha256: str
    documents: int
    tokens: int


class DatastoreMeta(msgspec.Struct, frozen=True, kw_only=True):
    version: int = FORMAT_VERSION
    model: str
    """The model directory's name (for people; `fingerprint` is what is checked)."""
    fingerprint: str
    """`engine.loader.model_fingerprint` of the model that computed the keys."""
    key_kind: str = "ffn_input:-1"
    dim: int
    count: int
    index: IndexParams
    corpus: list[CorpusFile] = []
    window: int = 0
    """Tokens per scoring window of the build (0: not recorded)."""
    stride: int = 0
    """Tokens each window advances; every position after the first window's is predicted
    with at least window - stride tokens of context."""
    dtype: str = "float32"
    """The dtype the model ran in."""


def resolve_kind(count: int, kind: str) -> str:
    """The index kind `build_index` makes for `count` keys when asked for `kind`."""
    if kind == "auto":
        return "flat" if count < FLAT_MAX_KEYS else "ivfpq"
    return kind


def build_index(keys: np.ndarray, kind: str = "auto", ncentroids: int = 4096,
                code_size: int = 64, train_keys: int = TRAIN_KEYS, seed: int = 1,
                add_batch: int = 65_536, progress=None) -> tuple[faiss.Index, IndexParams]:
    """A FAISS index over `keys` ([n, d], any float dtype; rows are added in batches so a
    memory-mapped array is never loaded whole).

    `auto`: flat below FLAT_MAX_KEYS keys, else IVFPQ with `ncentroids` lists (at most n / 39,
    FAISS's minimum of training points per centroid) and `code_size`-byte codes, trained on a
    seeded sample of at most `train_keys` keys. `progress(n_added)` is called after each batch.
    """
    n, dim = keys.shape
    kind = resolve_kind(n, kind)
    if kind == "flat":
        index, params = faiss.IndexFlatL2(dim), IndexParams(kind="flat")
    elif kind == "ivfpq":
        if dim % code_size:
            raise ValueError(f"code_size {code_size} must divide the key dim {dim}")
        lists = max(1, min(ncentroids, n // 39))
        index = faiss.IndexIVFPQ(faiss.IndexFlatL2(dim), dim, lists, code_size, 8)
        sample = np.sort(np.random.default_rng(seed).choice(n, min(n, train_keys),
                                                            replace=False))
        index.train(np.ascontiguousarray(keys[sample], dtype=np.float32))
        params = IndexParams(kind="ivfpq", ncentroids=lists, code_size=code_size,
                             train_keys=len(sample))
    else:
        raise ValueError(f"index kind {kind!r}: expected auto, flat or ivfpq")
    for start in range(0, n, add_batch):
        index.add(np.ascontiguousarray(keys[start:start + add_batch], dtype=np.float32))
        if progress is not None:
            progress(min(start + add_batch, n))
    return index, params


def write_datastore(path: Path, keys: np.ndarray, values: np.ndarray, meta: DatastoreMeta,
                    index: faiss.Index | None = None) -> Path:
    """Writes a complete datastore from arrays (builds the index of `meta.index.kind` when not
    given). The builder (`retrieval.build`) streams keys instead; this is for small stores."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    np.save(path / KEYS, np.asarray(keys, dtype=np.float16))
    np.save(path / VALUES, np.asarray(values, dtype=np.int32))
    if index is None:
        index, params = build_index(keys, meta.index.kind)
        meta = msgspec.structs.replace(meta, index=params)
    faiss.write_index(index, str(path / INDEX))
    (path / META).write_bytes(msgspec.json.format(msgspec.json.encode(meta)))
    return path


def read_meta(path: Path) -> DatastoreMeta:
    try:
        meta = msgspec.json.decode((Path(path) / META).read_bytes(), type=DatastoreMeta)
    except (OSError, msgspec.DecodeError) as exc:
        raise ValueError(f"{path}: not a datastore ({exc})") from None
    if meta.version != FORMAT_VERSION:
        raise ValueError(f"{path}: datastore format {meta.version}, expected {FORMAT_VERSION}")
    return meta


class Datastore:
    """An open, read-only datastore; `search` may be called from any thread."""

    def __init__(self, path: Path, meta: DatastoreMeta, keys: np.ndarray, values: np.ndarray,
                 index: faiss.Index) -> None:
        self.path, self.meta = Path(path), meta
        self.keys, self.values, self.index = keys, values, index

    @classmethod
    def open(cls, path: Path) -> Datastore:
        """Maps the store read-only. Raises ValueError when it is incomplete or inconsistent."""
        path = Path(path)
        meta = read_meta(path)
        keys = np.load(path / KEYS, mmap_mode="r")
        values = np.load(path / VALUES, mmap_mode="r")
        index = faiss.read_index(str(path / INDEX), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        if keys.shape != (meta.count, meta.dim) or values.shape != (meta.count,) \
                or index.ntotal != meta.count or index.d != meta.dim:
            raise ValueError(f"{path}: keys {keys.shape}, values {values.shape}, index "
                             f"{index.ntotal}x{index.d} disagree with meta.json "
                             f"({meta.count}x{meta.dim})")
        return cls(path, meta, keys, values, index)

    @property
    def kind(self) -> str:
        return self.meta.index.kind

    def __len__(self) -> int:
        return self.meta.count

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None,
               recompute: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest keys of each query row: (squared L2 distances [b, k] float32, their
        values [b, k] int64). One FAISS call for the whole batch.

        `recompute` replaces FAISS's distances (approximate under PQ) by exact ones from the
        stored keys, as the reference implementation does. Slots FAISS could not fill (fewer
        than k keys in the probed lists) get distance +inf and value 0.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        params = faiss.SearchParametersIVF(nprobe=nprobe) \
            if nprobe is not None and self.kind == "ivfpq" else None
        dists, ids = self.index.search(queries, k, params=params)
        found = ids >= 0
        safe = np.where(found, ids, 0)
        if recompute:
            dists = self._exact_distances(queries, safe)
        dists = np.where(found, dists, np.inf).astype(np.float32)
        return dists, np.asarray(self.values[safe], dtype=np.int64) * found

    def _exact_distances(self, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Squared L2 from each query to the stored keys `ids` [b, k], in blocks of about
        RECOMPUTE_BLOCK_ELEMENTS gathered elements (one row at k = 1024) spread over torch's
        thread count: a block's float32 keys stay in cache between the cast and the distance
        (about 3x faster at batch 32 than one pass over the whole batch), and the gather, cast
        and einsum release the GIL. Each row's distances are computed alone, so they do not
        depend on the batch."""
        dists = np.empty(ids.shape, dtype=np.float32)
        rows = max(1, RECOMPUTE_BLOCK_ELEMENTS // (ids.shape[1] * self.meta.dim))

        def block(start: int) -> None:
            part = ids[start:start + rows]
            gathered = self.keys[part.reshape(-1)]  # one fancy-index read of the memmap
            # float16 -> float32 in torch: vectorised, about twice numpy's per-element cast.
            keys = torch.from_numpy(gathered).float().numpy().reshape(*part.shape, -1)
            diff = keys - queries[start:start + rows, None, :]
            dists[start:start + rows] = np.einsum("bkd,bkd->bk", diff, diff)

        starts = range(0, len(ids), rows)
        if len(starts) == 1:
            block(0)
        else:
            list(_recompute_pool().map(block, starts))
        return dists


@functools.cache
def _recompute_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max(1, torch.get_num_threads()),
                              thread_name_prefix="knn-recompute")
