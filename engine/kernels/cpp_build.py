"""Builds the CPU kernels: inline C++ compiled once per machine by torch's extension builder.

Each kernel is compiled with `-O3 -march=native` (its loops vectorise to the widest SIMD the
CPU has) and parallelised with torch's own thread pool (at::parallel_for; the extension links
libgomp.so.1 by soname, so it shares the OpenMP runtime torch already loaded).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import platform
import sys
import warnings


LOAD16 = r"""
// 16 lanes of float32 from float32, bfloat16 (widened by a shift) or float16 (vcvtph2ps).
static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load16(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
static inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
"""
"""The AVX-512 load helpers the CPU kernels share (spliced inside their `__AVX512F__` blocks)."""

EXP16 = r"""
// exp(x) in the form of SLEEF's expf_u10 (ATen's Vectorized<float>::exp): x = q ln2 + s,
// e^s = 1 + s + s^2 u(s) with a degree-5 u, times 2^q; 0 below -104, inf above 88.72.
static inline __m512 exp16(__m512 x) {
  const __m512 log2e = _mm512_set1_ps(1.442695040888963407359924681001892137f);
  const __m512 q = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 s = _mm512_fmadd_ps(q, _mm512_set1_ps(-0.693145751953125f), x);
  s = _mm512_fmadd_ps(q, _mm512_set1_ps(-1.428606765330187045e-06f), s);
  __m512 u = _mm512_set1_ps(0.000198527617612853646278381f);
  u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.00139304355252534151077271f));
  u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.00833336077630519866943359f));
  u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.0416664853692054748535156f));
  u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.166666671633720397949219f));
  u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.5f));
  u = _mm512_add_ps(_mm512_set1_ps(1.f), _mm512_fmadd_ps(_mm512_mul_ps(s, s), u, s));
  u = _mm512_scalef_ps(u, q);
  u = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-104.f), _CMP_LT_OQ), u,
                           _mm512_setzero_ps());
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(88.72283935546875f),
                                                 _CMP_GT_OQ), u, _mm512_set1_ps(INFINITY));
}
"""
"""16-lane exp shared by the CPU kernels (spliced inside their `__AVX512F__` blocks)."""


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


@contextlib.contextmanager
def _build_lock(build_dir: str):
    """Serialises builds of one extension across processes with a kernel-held lock.

    torch's own build lock is a plain file that a killed builder leaves behind, and every later
    build then waits on it forever. An flock dies with its holder, so whoever holds it knows that
    any torch lock file it finds is stale, and removes it.
    """
    os.makedirs(build_dir, exist_ok=True)
    with open(build_dir + ".flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            stale = os.path.join(build_dir, "lock")
            if os.path.exists(stale):
                warnings.warn(f"removing a stale build lock left by a killed build: {stale}")
                os.remove(stale)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build(name: str, source: str, functions: list[str], cflags: tuple[str, ...] = ()):
    """Compiles (first call on a machine) and loads an extension; None if it cannot build.
    `cflags` are added to the defaults (e.g. `-ffp-contract=off` where a kernel must round
    each product like torch's separate ops do)."""
    import torch
    from torch.utils.cpp_extension import get_default_build_root, load_inline

    # The ninja build tool comes with the Python environment (a pip dependency); make it
    # findable when that environment's bin/ is not on PATH (e.g. `.venv/bin/python -m ...`).
    env_bin = os.path.dirname(sys.executable)
    if env_bin not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = env_bin + os.pathsep + os.environ.get("PATH", "")
    full_name = f"polydecode_{name}_{cpu_tag()}"
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    # One directory per Python and torch version: a binary built against another ABI won't load.
    abi = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__}"
    build_dir = os.path.join(root, abi, full_name)
    try:
        with _build_lock(build_dir):
            return load_inline(name=full_name, cpp_sources=[source], functions=functions,
                               extra_cflags=["-O3", "-march=native", "-fopenmp", *cflags],
                               extra_ldflags=["-fopenmp"], build_directory=build_dir,
                               verbose=False)
    except Exception as exc:  # noqa: BLE001 - no compiler / headers: the torch path still works
        warnings.warn(f"{name} kernel unavailable, using the torch path: {exc}")
        return None
