"""A builder killed mid-compile leaves torch's lock file behind; the next build must not wait on
it forever (every server start and test run on that machine would hang)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]

_SCRIPT = """
import warnings
from engine.kernels.cpp_build import build
source = "int64_t twice(int64_t x) { return 2 * x; }"
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    module = build("stale_lock_probe", source, ["twice"])
print(module.twice(21), any("stale build lock" in str(w.message) for w in caught))
"""


def test_build_removes_a_stale_torch_lock(tmp_path):
    from engine.kernels.cpp_build import cpu_tag

    import torch

    abi = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__}"
    build_dir = tmp_path / abi / f"polydecode_stale_lock_probe_{cpu_tag()}"
    build_dir.mkdir(parents=True)
    (build_dir / "lock").touch()  # what a killed build leaves
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path), PYTHONPATH=str(_ROOT))
    done = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["42", "True"]
    assert not (build_dir / "lock").exists()
