"""Import-graph rules (STYLE.md principle 12): engine/ and decoding/ never import grpc or the
generated stubs; decoding/ never imports engine internals; engine/ sees decoding/ only through
its interfaces and registry; server/ reaches the engine through its public API only; allocator
modules never import torch."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PURE_PYTHON = ["engine/core/block_pool.py", "engine/core/kv_cache_manager.py", "engine/core/prefix_hash.py",
               "engine/core/scheduler.py", "engine/core/request.py", "engine/core/cache_manager.py"]


DECODING_SEEN_BY_ENGINE = {"decoding", "decoding.base", "decoding.registry"}
"""The interfaces (StepView, StepDecision, Transform, SamplingBatch, Capture, InvalidArgument)
and the registry: never a strategy or transform module by name."""
ENGINE_PUBLIC = {"engine", "engine.engine", "engine.async_engine", "engine.config",
                 "engine.errors", "engine.messages", "engine.prompt", "engine.sampling_params",
                 "engine.tokenizer", "engine.loader"}
"""What the server may import from engine/ (the `engine` package's public surface, prompt
structure, tokenizer and model-directory resolution)."""
ENGINE_INTERNALS = {"runner", "scheduler", "kv_cache", "outputs", "generations", "port",
                    "sampler"}
"""Engine attributes the server must not reach through."""


def _imports(path: Path) -> set[str]:
    """Imported module names; `from pkg import mod` also yields `pkg.mod`."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module in ("decoding", "engine"):
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
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


@pytest.mark.parametrize("path", _files("engine"), ids=str)
def test_engine_sees_decoding_only_through_base_and_registry(path: Path):
    bad = {n for n in _imports(path)
           if n.split(".")[0] == "decoding" and n not in DECODING_SEEN_BY_ENGINE}
    assert not bad, f"{path} imports decoding plug-ins by name: {bad}"


@pytest.mark.parametrize("path", _files("server"), ids=str)
def test_server_uses_only_the_engine_public_api(path: Path):
    if "pb" in path.relative_to(ROOT).parts:
        return
    bad = {n for n in _imports(path) if n.split(".")[0] == "engine" and n not in ENGINE_PUBLIC}
    assert not bad, f"{path} imports engine internals {bad}"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr in ENGINE_INTERNALS:
            owner = node.value
            name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
            assert name != "engine", f"{path}:{node.lineno} reaches into engine.{node.attr}"


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
