"""The committed stubs in server/pb are exactly what `make proto` generates from the proto."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_committed_stubs_are_up_to_date(tmp_path):
    spec = importlib.util.spec_from_file_location("build_stubs", ROOT / "proto/build_stubs.py")
    build_stubs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_stubs)
    for fresh in build_stubs.build(tmp_path):
        committed = ROOT / "server/pb" / fresh.relative_to(tmp_path)
        assert committed.read_text() == fresh.read_text(), \
            f"{committed} is stale: run `make proto` and commit the result"


def test_every_field_of_the_contract_is_documented():
    """Each message field and RPC in generation.proto carries a comment (or is self-evident
    from a documented message): a light check that the contract stays documented."""
    text = (ROOT / "proto/polydecode/v1/generation.proto").read_text()
    for rpc in ("GenerateStream", "Generate", "Abort", "Tokenize", "GetModelInfo", "GetLoad"):
        lines = text.splitlines()
        index = next(i for i, line in enumerate(lines) if f"rpc {rpc}(" in line)
        assert lines[index - 1].strip().startswith("//"), f"rpc {rpc} has no comment"
