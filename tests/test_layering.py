"""Import-graph rules (STYLE.md principle 12): engine/ and decoding/ never import grpc or the
generated stubs; decoding/ never imports engine internals; allocator modules never import torch."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PURE_PYTHON = ["engine/block_pool.py", "engine/kv_cache_manager.py", "engine/prefix_hash.py",
               "engine/scheduler.py", "engine/request.py"]


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", _files("engine") + _files("decoding"), ids=str)
def test_engine_and_decoding_never_import_grpc(path: Path):
    bad = {n for n in _imports(path)
           if n.split(".")[0] in ("grpc", "google") or n.startswith("server")}
    assert not bad, f"{path} imports {bad}"


@pytest.mark.parametrize("path", _files("decoding"), ids=str)
def test_decoding_sees_only_its_base(path: Path):
    bad = {n for n in _imports(path) if n.startswith("engine")}
    assert not bad, f"{path} imports engine internals {bad}"


@pytest.mark.parametrize("name", PURE_PYTHON)
def test_allocator_and_scheduler_are_pure_python(name: str):
    imports = _imports(ROOT / name)
    assert not {n for n in imports if n.split(".")[0] in ("torch", "numpy")}, name


@pytest.mark.parametrize("path", _files("server"), ids=str)
def test_only_convert_sees_both_protobuf_and_engine_types(path: Path):
    if path.name == "convert.py" or "pb" in path.relative_to(ROOT).parts:
        return
    imports = _imports(path)
    sees_proto = any(n.startswith("server.pb") for n in imports)
    sees_engine = any(n.startswith("engine") for n in imports)
    assert not (sees_proto and sees_engine), f"{path} imports both server.pb and engine"
