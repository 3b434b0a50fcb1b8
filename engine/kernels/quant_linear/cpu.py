"""C++ weight-only int8 linear for the CPU (built by `engine.kernels.cpp_build`).

Decoding a few sequences reads every weight once per step for a handful of activation rows:
memory-bound, so what counts is streaming the weight bytes at the memory's rate. For up to
`kGemvRows` rows the AVX-512 kernel here reads each int8 weight once, widens it in registers
and multiplies it into every row's float32 accumulators (rows in passes of four over a tile of
16 output channels, which stays in L1 between passes). On the default model's int8 LM head
(49152 x 576) at one row it takes about 0.43x the time of torch's `_weight_int8pack_mm` in
bfloat16 and under 0.1x in float32 (measured with cold caches, Zen 4). Longer prefill chunks,
where the product is compute-bound, go to torch: its fused op in bfloat16, its float32 GEMM
on the codes (then the scales) in float32.

Layout: weight [N, K] int8 and scales [N] in the activation dtype, w = scale * q (the
`Int8WeightOnlyLinear` buffers as they are).
"""

from __future__ import annotations

import functools

from engine.kernels.cpp_build import build

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

// Rows up to which the streaming kernel runs: it is ahead of torch's up to here (in float32 by
// 10x and more, in bfloat16 by 1.2-2.4x); at a few hundred rows torch's catches up.
constexpr int64_t kGemvRows = 64;
constexpr int64_t kPassRows = 4;  // rows sharing one widened block of weights
constexpr int64_t kTile = 16;     // output channels per tile

// A [N, K] tensor of `options` for weights expanded for a GEMM: in this thread's buffer,
// reused by every call (fresh megabytes would be fresh pages, whose faults cost more than the
// expansion), up to kKeptBytes; a larger one (an LM head) is allocated for the call.
constexpr int64_t kKeptBytes = 16 << 20;

static at::Tensor expansion_buffer(int64_t N, int64_t K, const at::TensorOptions& options) {
  const int64_t bytes = N * K * static_cast<int64_t>(options.dtype().itemsize());
  if (bytes > kKeptBytes) return torch::empty({N, K}, options);
  thread_local at::Tensor buffer;
  if (!buffer.defined() || buffer.numel() < bytes) buffer = torch::empty({bytes}, torch::kUInt8);
  return at::from_blob(buffer.data_ptr(), {N, K}, options);
}

#if defined(__AVX512F__)
// The activations in float32: float32 ones as they are, others widened into this thread's
// scratch by a plain loop (tensor ops' dispatch would cost more than the conversion).
template <typename T>
static const float* widen(const T* x, int64_t count) {
  if constexpr (std::is_same_v<T, float>) return x;
  thread_local std::vector<float> scratch;
  scratch.resize(count);
  for (int64_t i = 0; i < count; ++i) scratch[i] = static_cast<float>(x[i]);
  return scratch.data();
}

template <int R, typename T>
static void int8_pass(const float* x, int64_t K, const int8_t* weight, const T* scales,
                      int64_t n0, int64_t n1, T* out, int64_t N) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* w = weight + n * K;
    // Two chains per row (even and odd blocks of 16) hide the FMA latency; fixed indices keep
    // every accumulator in a register.
    __m512 even[R], odd[R];
    for (int r = 0; r < R; ++r) even[r] = odd[r] = _mm512_setzero_ps();
    auto block = [&](int64_t k, __m512* acc) __attribute__((always_inline)) {
      const __m512 wv = _mm512_cvtepi32_ps(
          _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k))));
      for (int r = 0; r < R; ++r)
        acc[r] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + r * K + k), acc[r]);
    };
    int64_t k = 0;  // K is a multiple of 16
    for (; k + 16 < K; k += 32) {
      block(k, even);
      block(k + 16, odd);
    }
    if (k < K) block(k, even);
    const float scale = static_cast<float>(scales[n]);
    for (int r = 0; r < R; ++r)
      out[r * N + n] = static_cast<T>(
          _mm512_reduce_add_ps(_mm512_add_ps(even[r], odd[r])) * scale);
  }
}

// Tiles of output channels in parallel; inside a tile, passes of up to four rows.
template <typename Pass>
static void over_tiles(int64_t M, int64_t N, const Pass& pass) {
  at::parallel_for(0, (N + kTile - 1) / kTile, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n0 = t * kTile, n1 = std::min(N, n0 + kTile);
      for (int64_t m = 0; m < M; m += kPassRows) pass(m, std::min(kPassRows, M - m), n0, n1);
    }
  });
}
#endif

torch::Tensor int8_linear(torch::Tensor x, torch::Tensor weight, torch::Tensor scales) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K && scales.size(0) == N && x.scalar_type() == scales.scalar_type(),
              "int8_linear: x [M, K], weight [N, K] int8, scales [N] of x's dtype");
#if defined(__AVX512F__)
  if (M <= kGemvRows && K % 16 == 0) {
    auto out = torch::empty({M, N}, x.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "int8", [&] {
      const float* xp = widen(x.data_ptr<scalar_t>(), M * K);
      const int8_t* wp = weight.data_ptr<int8_t>();
      const scalar_t* sp = scales.data_ptr<scalar_t>();
      scalar_t* op = out.data_ptr<scalar_t>();
      over_tiles(M, N, [&](int64_t m, int64_t rows, int64_t n0, int64_t n1) {
        const float* xm = xp + m * K;
        scalar_t* om = op + m * N;
        switch (rows) {
          case 1: return int8_pass<1>(xm, K, wp, sp, n0, n1, om, N);
          case 2: return int8_pass<2>(xm, K, wp, sp, n0, n1, om, N);
          case 3: return int8_pass<3>(xm, K, wp, sp, n0, n1, om, N);
          default: return int8_pass<4>(xm, K, wp, sp, n0, n1, om, N);
        }
      });
    });
    return out;
  }
#endif
  if (x.scalar_type() == at::kFloat) {
    // Many float32 rows: torch's float32 GEMM on the codes (exact in float32), then the
    // scales; its fused int8 op has no fast float32 path (tens of times slower).
    at::Tensor w = expansion_buffer(N, K, x.options());
    w.copy_(weight);
    return at::linear(x, w).mul_(scales);
  }
  return at::_weight_int8pack_mm(x.contiguous(), weight, scales);
}
"""


@functools.cache
def load_extension():
    """Compiles (first call on a machine) and loads the extension; None if it cannot build.
    `-ffp-contract=off` as in the decode stack, which compiles this source too: both must give
    the same bits."""
    return build("quant_linear_cpu", _SOURCE, ["int8_linear"],
                 cflags=("-ffp-contract=off",))
