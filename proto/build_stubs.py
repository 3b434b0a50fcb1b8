"""Generates the Python gRPC stubs of `proto/polydecode/v1/generation.proto` into `server/pb/`.

Run through `make proto`. The stubs are committed so that an installed package needs no
protoc; `tests/server/test_stubs.py` regenerates them into a temporary directory and fails when
the committed ones differ (pinned grpcio-tools, so the output is reproducible).

protoc writes `from polydecode.v1 import generation_pb2` into the service module; the stubs live
in the `server.pb` package, so that import is rewritten to its package path.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILE = "polydecode/v1/generation.proto"
OUTPUTS = ("generation_pb2.py", "generation_pb2.pyi", "generation_pb2_grpc.py")
PACKAGE = "server.pb"


def build(out_dir: Path) -> list[Path]:
    """Writes the stubs under `out_dir/polydecode/v1/` and returns their paths."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"  # google/protobuf/*
    out_dir.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", str(PROTO_ROOT / PROTO_FILE)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO_FILE}")
    paths = [out_dir / "polydecode" / "v1" / name for name in OUTPUTS]
    grpc_module = paths[2]
    grpc_module.write_text(grpc_module.read_text().replace(
        "from polydecode.v1 import", f"from {PACKAGE}.polydecode.v1 import"))
    return paths


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT.parent / "server" / "pb"
    for path in build(out):
        print(path)
