"""C++ float32 linear on weights packed in 32-channel panels (built by
`engine.kernels.cpp_build`).

A decode step multiplies a few dozen activation rows by every weight once: the weights stream
from memory while the FMAs run, and the two only overlap if the stream keeps going while the
cores compute. oneDNN's prepacked GEMM at SmolLM2's batch-32 decode shapes takes about as
long as its memory time (its one-row time) plus its compute time (at its many-row FLOP rate)
added up. Here each thread walks its own run
of panels, a panel in chunks of `kChunk` inputs (16 KB, resident in L1 while every tile of
rows passes over it), and while a chunk is multiplied its successor is prefetched into L2, a
share of it per row tile, spread evenly over the tile's steps: memory keeps streaming while the
FMAs run. On the default model's linears (all 121, each its own weights, AMX Xeon VM) a batch-32
step took 37.6 ms against oneDNN's 46.5 (`python bench/cpu_kernels.py`, before the even
spread); at 64 rows, the even spread took 0.93x the time of prefetches bunched at the start of
each tile (an ad-hoc A/B timing in one process).

Every output is summed in one fixed order: along the input axis in chunks of `kChunk`, each
chunk a chain of FMAs, the chunks added in turn. Row tiling and threads only decide who
computes which outputs, so a row's result does not depend on the batch it is in. Past
`kPanelRows` rows the product is compute-bound and torch's GEMM (MKL) on the plain weight is
as fast or faster: the op hands those to `at::linear`.

Layout: panels [P, K, 32] float32, P = ceil(N / 32); panels[p, k, j] = weight[32 p + j, k]
(zero past N).
"""

from __future__ import annotations

import functools

from engine.kernels.cpp_build import build

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

constexpr int64_t kPanel = 32;       // output channels per panel: two vectors
constexpr int64_t kPanelRows = 256;  // above this many rows torch's GEMM is as fast
#if defined(__AVX512F__)
constexpr int64_t kChunk = 128;      // inputs per L1-resident chunk of a panel (16 KB)
constexpr int64_t kTileRows = 12;    // rows per register tile: 24 accumulators
constexpr int64_t kBlockRows = 120;  // rows whose activations stay in L2 across panels

// One chunk of one panel times `R` rows: out[r, 0:32] (+)= a[r, k0:k0+kc] . panel[k0:k0+kc].
// The chunk's sum starts from zero and is added to what earlier chunks stored, so the order
// of the sums is fixed. While it runs, `lines` cache lines from `prefetch` go to L2.
template <int R>
static void tile(const float* a, int64_t lda, const float* chunk, int64_t kc, float* out,
                 int64_t ldo, bool first, __mmask16 low, __mmask16 high, const char* prefetch,
                 int64_t lines) {
  __m512 acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
  // The `lines` prefetches of the next chunk over the kc steps: up to one a step (many row
  // tiles share the chunk) spread evenly, since a burst of them waits for fill buffers and
  // stalls the FMAs behind it; more (one or two tiles) as two streams, lines k and kc + k.
  int64_t fetched = 0, due = 0;
  for (int64_t k = 0; k < kc; ++k) {
    if (lines >= kc) {
      _mm_prefetch(prefetch + k * 64, _MM_HINT_T1);
      if (k + kc < lines) _mm_prefetch(prefetch + (k + kc) * 64, _MM_HINT_T1);
    } else if ((due += lines) >= kc) {
      due -= kc;
      _mm_prefetch(prefetch + 64 * fetched++, _MM_HINT_T1);
    }
    const __m512 b0 = _mm512_loadu_ps(chunk + k * kPanel);
    const __m512 b1 = _mm512_loadu_ps(chunk + k * kPanel + 16);
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_set1_ps(a[r * lda + k]);
      acc0[r] = _mm512_fmadd_ps(av, b0, acc0[r]);
      acc1[r] = _mm512_fmadd_ps(av, b1, acc1[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float* o = out + r * ldo;
    if (!first) {
      acc0[r] = _mm512_add_ps(acc0[r], _mm512_maskz_loadu_ps(low, o));
      acc1[r] = _mm512_add_ps(acc1[r], _mm512_maskz_loadu_ps(high, o + 16));
    }
    _mm512_mask_storeu_ps(o, low, acc0[r]);
    _mm512_mask_storeu_ps(o + 16, high, acc1[r]);
  }
}

using TileFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, bool,
                        __mmask16, __mmask16, const char*, int64_t);
static constexpr TileFn kTiles[kTileRows + 1] = {
    nullptr, tile<1>, tile<2>, tile<3>, tile<4>, tile<5>, tile<6>, tile<7>, tile<8>, tile<9>,
    tile<10>, tile<11>, tile<12>};

static __mmask16 lanes(int64_t count) {
  return count >= 16 ? __mmask16(0xFFFF) : count <= 0 ? __mmask16(0)
                                                       : __mmask16((1u << count) - 1);
}

// Rows [0, M) of a (M <= kBlockRows) times panels [begin, end): per panel, per chunk, the rows
// in balanced tiles of at most kTileRows; the chunk after this one (next in memory) is
// prefetched a share per tile.
static void panel_rows(const float* a, int64_t lda, int64_t M, const float* panels, int64_t K,
                       int64_t N, int64_t begin, int64_t end, float* out) {
  const int64_t tiles = (M + kTileRows - 1) / kTileRows;
  for (int64_t p = begin; p < end; ++p) {
    const int64_t n0 = p * kPanel;
    const __mmask16 low = lanes(N - n0), high = lanes(N - n0 - 16);
    const float* panel = panels + p * K * kPanel;
    for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
      const int64_t kc = std::min(kChunk, K - k0);
      const float* chunk = panel + k0 * kPanel;
      const char* next = reinterpret_cast<const char*>(chunk + kc * kPanel);
      const int64_t lines = kc * kPanel * static_cast<int64_t>(sizeof(float)) / 64;
      int64_t r0 = 0, fetched = 0;
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t rows = (M - r0) / (tiles - t);
        const int64_t share = (lines - fetched) / (tiles - t);
        kTiles[rows](a + r0 * lda + k0, lda, chunk, kc, out + r0 * N + n0, N, k0 == 0, low,
                     high, next + fetched * 64, share);
        r0 += rows;
        fetched += share;
      }
    }
  }
}
#endif

bool panel_kernel_available() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

// x [M, K] float32 (rows contiguous) times the packed weight: [M, N], plus bias if given.
// `weight` is the plain [N, K] weight, for rows past kPanelRows (and CPUs without AVX-512).
torch::Tensor panel_linear(torch::Tensor x, torch::Tensor panels, torch::Tensor weight,
                           c10::optional<torch::Tensor> bias) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && weight.size(1) == K &&
                  panels.dim() == 3 && panels.size(0) * kPanel >= N && panels.size(1) == K &&
                  panels.size(2) == kPanel && panels.is_contiguous() &&
                  panels.scalar_type() == at::kFloat,
              "panel_linear: x [M, K] float32, panels [ceil(N / 32), K, 32], weight [N, K]");
#if defined(__AVX512F__)
  if (M <= kPanelRows) {
    if (x.stride(1) != 1) x = x.contiguous();
    auto out = torch::empty({M, N}, x.options());
    const float* a = x.data_ptr<float>();
    const float* w = panels.data_ptr<float>();
    float* o = out.data_ptr<float>();
    const int64_t lda = x.stride(0), P = (N + kPanel - 1) / kPanel;
    for (int64_t m = 0; m < M; m += kBlockRows) {
      const int64_t rows = std::min(kBlockRows, M - m);
      at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
        panel_rows(a + m * lda, lda, rows, w, K, N, begin, end, o + m * N);
      });
    }
    if (bias.has_value()) out.add_(*bias);
    return out;
  }
#endif
  return at::linear(x, weight, bias);
}
"""


@functools.cache
def load_extension():
    """Compiles (first call on a machine) and loads the extension; None if it cannot build."""
    return build("panel_linear_cpu", _SOURCE, ["panel_linear", "panel_kernel_available"])
