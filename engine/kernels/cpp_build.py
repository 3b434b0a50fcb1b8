"""Builds the CPU kernels: inline C++ compiled once per machine by torch's extension builder.

Each kernel is compiled with `-O3 -march=native` (its loops vectorise to the widest SIMD the
CPU has) and parallelised with torch's own thread pool (at::parallel_for; the extension links
libgomp.so.1 by soname, so it shares the OpenMP runtime torch already loaded).
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import warnings


def cpu_tag() -> str:
    """Names a build after the CPU's instruction sets: a `-march=native` binary cached for one
    CPU must never be loaded on another (it would die with SIGILL)."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    return hashlib.sha1(f"{platform.machine()} {flags}".encode()).hexdigest()[:10]


def build(name: str, source: str, functions: list[str]):
    """Compiles (first call on a machine) and loads an extension; None if it cannot build."""
    from torch.utils.cpp_extension import load_inline

    # The ninja build tool comes with the Python environment (a pip dependency); make it
    # findable when that environment's bin/ is not on PATH (e.g. `.venv/bin/python -m ...`).
    env_bin = os.path.dirname(sys.executable)
    if env_bin not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = env_bin + os.pathsep + os.environ.get("PATH", "")
    try:
        return load_inline(name=f"polydecode_{name}_{cpu_tag()}", cpp_sources=[source],
                           functions=functions,
                           extra_cflags=["-O3", "-march=native", "-fopenmp"],
                           extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # noqa: BLE001 - no compiler / headers: the torch path still works
        warnings.warn(f"{name} kernel unavailable, using the torch path: {exc}")
        return None
