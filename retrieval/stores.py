"""The process-wide registry of open kNN-LM datastores, by name.

A server opens its datastores once, at start (`polydecode serve --datastore NAME=DIR`); the
offline command line opens the one it is given. Requests name a store, and every request that
names it shares the one read-only, memory-mapped `Datastore`. Opening happens before any
request can use the name, and the engine thread only reads the registry (a dict lookup, atomic
under the GIL), so there is no lock on the read path.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # faiss is imported when a store is first opened, not with `decoding`
    from retrieval.datastore import Datastore

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_OPEN: dict[str, Datastore] = {}
_OPENING = threading.Lock()


def open_datastore(name: str, path: Path | str, fingerprint: str | None = None) -> Datastore:
    """Opens the store at `path` under `name` and returns it; the same name and directory again
    return the store already open.

    Args:
        name: 1-64 characters of letters, digits, `_`, `.` and `-` (starting with a letter or
            digit): what requests send.
        path: The datastore directory (`retrieval.datastore` format).
        fingerprint: The served model's `engine.loader.model_fingerprint`; a store whose keys
            another model computed is refused. None skips the check.

    Raises:
        ValueError: a bad name, a name taken by another directory, a directory that is not a
            complete datastore, or a fingerprint mismatch (the message says which).
    """
    if not _NAME.fullmatch(name):
        raise ValueError(f"datastore name {name!r}: use 1-64 letters, digits, '_', '.', '-'")
    from retrieval.datastore import Datastore, read_meta

    path = Path(path).resolve()
    with _OPENING:
        found = _OPEN.get(name)
        if found is not None:
            if found.path.resolve() != path:
                raise ValueError(f"datastore name {name!r} is already open for {found.path}")
            return found
        meta = read_meta(path)
        if fingerprint is not None and meta.fingerprint != fingerprint:
            raise ValueError(
                f"datastore {name!r} ({path}) was built with model {meta.model!r} (fingerprint "
                f"{meta.fingerprint[:16]}), not the served model (fingerprint "
                f"{fingerprint[:16]}): its keys are another model's activations; rebuild it "
                f"with `polydecode datastore build --model ...`")
        store = _OPEN[name] = Datastore.open(path)
        return store


def get_datastore(name: str) -> Datastore | None:
    return _OPEN.get(name)


def datastore_names() -> list[str]:
    """Names of the open stores, in the order they were opened."""
    return list(_OPEN)


def open_datastores() -> dict[str, Datastore]:
    """A snapshot of name -> open store, in the order they were opened."""
    return dict(_OPEN)


def close_datastore(name: str) -> None:
    """Forgets a store (its maps are released once no running request holds it)."""
    with _OPENING:
        _OPEN.pop(name, None)


def close_all() -> None:
    """Forgets every store (tests; a server closes the ones it opened when it stops)."""
    with _OPENING:
        _OPEN.clear()
