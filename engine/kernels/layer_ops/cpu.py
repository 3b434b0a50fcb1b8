"""C++ kernels for the small per-layer ops of the CPU decode step (built by
`engine.kernels.cpp_build`, compiled with `-ffp-contract=off`).

At decode batch sizes each of these is microseconds of arithmetic behind tens of microseconds
of dispatch, and a Llama layer ran about thirty of them; here they are three calls:

- `add_rms_norm(x, residual, weight, eps, scale)`: h = residual + x (or x alone), then
  RMSNorm(h) * scale. Returns (normed, h).
- `rotary_store(qkv, cos, sin, k_cache, v_cache, slots, num_heads, num_kv_heads)`: rotates
  q and k inside the fused qkv projection output (rotate-half RoPE) and writes the step's k and v
  rows into their cache slots, in place.
- `silu_and_mul(gate_up)`: silu(gate) * up for the fused gate/up projection output.
- `copy_blocks(caches, src, dst, rows)`: block src[i] -> block dst[i] of every cache tensor
  (the step's copy-on-write copies, e.g. the partial blocks of forked branches; only their
  first rows[i] filled slots when rows[i] > 0), one call for all layers with the GIL released
  instead of two indexing ops per tensor.

Each op rounds where the torch formulas in `reference.py` round: float32 products and sums are
separate IEEE operations (no fused multiply-add), and in bfloat16 / float16 every intermediate
the reference stores in the model dtype is rounded to it here too. Sums of squares follow
ATen's summation order and exp() has SLEEF's form, so the results equal torch's bit for bit
(`tests/kernels/test_layer_ops.py`).
"""

from __future__ import annotations

import functools

from engine.kernels.cpp_build import EXP16, LOAD16, build

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

// ---- scalar forms: T arithmetic rounds to T after every operation, like torch's ops ----
template <typename T> static inline float f(T x) { return static_cast<float>(x); }
static inline float silu_f(float x) { return x / (1.f + std::exp(-x)); }

#if defined(__AVX512F__)
// ---- 16-lane forms: float32 registers, loads widen and `round_to` narrows like a store ----
"""
_SOURCE += LOAD16
_SOURCE += r"""
static inline __m512i bf16_rne_bits(__m512 x) {  // round to nearest even, as c10 does
  const __m512i b = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  return _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
}
static inline void store16(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
static inline void store16(c10::BFloat16* p, __m512 x) {
  const __m256i r = _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_rne_bits(x), 16));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), r);
}
static inline void store16(c10::Half* p, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
template <typename T> static inline __m512 round_to(__m512 x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return _mm512_castsi512_ps(_mm512_and_si512(bf16_rne_bits(x),
                                                _mm512_set1_epi32(0xffff0000)));
  } else {
    return _mm512_cvtph_ps(_mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}
"""
_SOURCE += EXP16
_SOURCE += r"""
#endif

template <typename T> static constexpr bool vectorised() {
#if defined(__AVX512F__)
  return !std::is_same_v<T, double>;
#else
  return false;
#endif
}

#if defined(__AVX512F__)
// Sum of n floats in the order ATen's inner-dimension sum adds them (SumKernel.cpp:
// vectorized_inner_sum -> row_sum -> multi_row_sum, built for 8-lane vectors: torch runs its
// AVX2 sum kernel on AVX-512 CPUs too): four interleaved vector accumulators cascaded every
// 2^level_power rows, the leftover vectors into the first, the four combined, then the scalar
// tail and the 8 lanes one by one. The mean of squares then equals torch's
// `x.pow(2).mean(-1)` bit for bit.
static float aten_order_sum(const float* x, int64_t n) {
  const int64_t vec_size = n / 8, size_ilp = vec_size / 4;
  int64_t log2 = 0;
  while ((int64_t(1) << log2) < size_ilp) ++log2;
  const int64_t level_power = std::max<int64_t>(4, log2 / 4);
  const int64_t level_step = int64_t(1) << level_power, level_mask = level_step - 1;
  __m256 acc[4][4];
  for (auto& level : acc) for (auto& a : level) a = _mm256_setzero_ps();
  auto row = [&](int64_t i, int k) { return _mm256_loadu_ps(x + (i * 4 + k) * 8); };
  int64_t i = 0;
  while (i + level_step <= size_ilp) {
    for (int64_t j = 0; j < level_step; ++j, ++i)
      for (int k = 0; k < 4; ++k) acc[0][k] = _mm256_add_ps(acc[0][k], row(i, k));
    for (int j = 1; j < 4; ++j) {
      for (int k = 0; k < 4; ++k) {
        acc[j][k] = _mm256_add_ps(acc[j][k], acc[j - 1][k]);
        acc[j - 1][k] = _mm256_setzero_ps();
      }
      if ((i & (level_mask << (j * level_power))) != 0) break;
    }
  }
  for (; i < size_ilp; ++i)
    for (int k = 0; k < 4; ++k) acc[0][k] = _mm256_add_ps(acc[0][k], row(i, k));
  for (int j = 1; j < 4; ++j)
    for (int k = 0; k < 4; ++k) acc[0][k] = _mm256_add_ps(acc[0][k], acc[j][k]);
  __m256 total = acc[0][0];
  for (int64_t r = size_ilp * 4; r < vec_size; ++r)
    total = _mm256_add_ps(total, _mm256_loadu_ps(x + r * 8));
  for (int k = 1; k < 4; ++k) total = _mm256_add_ps(total, acc[0][k]);
  float result = 0.f;
  for (int64_t k = vec_size * 8; k < n; ++k) result += x[k];
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, total);
  for (float lane : lanes) result += lane;
  return result;
}
#endif

// ---- RMSNorm with the residual add: h = residual + x; out = (w * T(h * rsqrt(ms + eps))) * s
// Without a residual, h is x itself (read, never written).
template <typename T>
static void add_rms_row(const T* x, const T* residual, const T* w, float eps, float scale,
                        int64_t n, T* out, T* h) {
  float ss = 0.f;
  int64_t i = 0;
#if defined(__AVX512F__)
  if constexpr (vectorised<T>()) {
    thread_local std::vector<float> squares;
    if (static_cast<int64_t>(squares.size()) < n) squares.resize(n);
    for (; i + 16 <= n; i += 16) {
      __m512 hv = load16(x + i);
      if (residual) {
        hv = round_to<T>(_mm512_add_ps(load16(residual + i), hv));
        store16(h + i, hv);
      }
      _mm512_storeu_ps(squares.data() + i, _mm512_mul_ps(hv, hv));
    }
    for (; i < n; ++i) {
      const T hv = residual ? static_cast<T>(residual[i] + x[i]) : x[i];
      if (residual) h[i] = hv;
      squares[i] = f(hv) * f(hv);
    }
    if (n >= 8) {
      ss = aten_order_sum(squares.data(), n);
    } else {  // torch's scalar path: a plain running sum
      for (int64_t k = 0; k < n; ++k) ss += squares[k];
    }
  }
#endif
  for (; i < n; ++i) {
    const T hv = residual ? static_cast<T>(residual[i] + x[i]) : x[i];
    if (residual) h[i] = hv;
    ss += f(hv) * f(hv);
  }
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
  i = 0;
#if defined(__AVX512F__)
  if constexpr (vectorised<T>()) {
    const __m512 iv = _mm512_set1_ps(inv), sv = _mm512_set1_ps(scale);
    for (; i + 16 <= n; i += 16) {
      __m512 o = round_to<T>(_mm512_mul_ps(load16(w + i),
                                           round_to<T>(_mm512_mul_ps(load16(h + i), iv))));
      if (scale != 1.f) o = round_to<T>(_mm512_mul_ps(o, sv));
      store16(out + i, o);
    }
  }
#endif
  for (; i < n; ++i) {
    T o = static_cast<T>(w[i] * static_cast<T>(f(h[i]) * inv));
    if (scale != 1.f) o = static_cast<T>(o * scale);
    out[i] = o;
  }
}

std::vector<torch::Tensor> add_rms_norm(torch::Tensor x, c10::optional<torch::Tensor> residual,
                                        torch::Tensor weight, double eps, double scale) {
  const int64_t rows = x.size(0), n = x.size(1);
  auto out = torch::empty_like(x);
  auto h = residual.has_value() ? torch::empty_like(x) : x;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rms", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* rp = residual.has_value() ? residual->data_ptr<scalar_t>() : nullptr;
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    scalar_t* hp = h.data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / n), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r)
        add_rms_row<scalar_t>(xp + r * n, rp ? rp + r * n : nullptr, wp,
                              static_cast<float>(eps), static_cast<float>(scale), n,
                              op + r * n, hp + r * n);
    });
  });
  return {out, h};
}
"""

_SOURCE += r"""
// ---- rotate-half RoPE on one head in place: lo' = T(x1 c) - T(x2 s), hi' = T(x2 c) + T(x1 s)
template <typename T>
static void rotate_head(T* x, const T* c, const T* s, int64_t half) {
  int64_t i = 0;
#if defined(__AVX512F__)
  if constexpr (vectorised<T>()) {
    for (; i + 16 <= half; i += 16) {
      const __m512 x1 = load16(x + i), x2 = load16(x + half + i);
      const __m512 c1 = load16(c + i), s1 = load16(s + i);
      const __m512 c2 = load16(c + half + i), s2 = load16(s + half + i);
      store16(x + i, _mm512_sub_ps(round_to<T>(_mm512_mul_ps(x1, c1)),
                                   round_to<T>(_mm512_mul_ps(x2, s1))));
      store16(x + half + i, _mm512_add_ps(round_to<T>(_mm512_mul_ps(x2, c2)),
                                          round_to<T>(_mm512_mul_ps(x1, s2))));
    }
  }
#endif
  for (; i < half; ++i) {
    const T x1 = x[i], x2 = x[half + i];
    x[i] = static_cast<T>(static_cast<T>(x1 * c[i]) - static_cast<T>(x2 * s[i]));
    x[half + i] = static_cast<T>(static_cast<T>(x2 * c[half + i]) +
                                 static_cast<T>(x1 * s[half + i]));
  }
}

void rotary_store(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin,
                  torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots,
                  int64_t num_heads, int64_t num_kv_heads) {
  const int64_t tokens = qkv.size(0), width = qkv.size(1);
  const int64_t d = cos.size(-1), kv_row = num_kv_heads * d;
  const int64_t num_slots = k_cache.numel() / kv_row;
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK(sp[t] >= 0 && sp[t] < num_slots, "slot ", sp[t], " outside the cache");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "rotary", [&] {
    scalar_t* base = qkv.data_ptr<scalar_t>();
    const scalar_t* cp = cos.data_ptr<scalar_t>();
    const scalar_t* snp = sin.data_ptr<scalar_t>();
    scalar_t* kc = k_cache.data_ptr<scalar_t>();
    scalar_t* vc = v_cache.data_ptr<scalar_t>();
    at::parallel_for(0, tokens, 64, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        scalar_t* row = base + t * width;
        for (int64_t head = 0; head < num_heads + num_kv_heads; ++head)
          rotate_head<scalar_t>(row + head * d, cp + t * d, snp + t * d, d / 2);
        const scalar_t* k = row + num_heads * d;
        std::memcpy(kc + sp[t] * kv_row, k, kv_row * sizeof(scalar_t));
        std::memcpy(vc + sp[t] * kv_row, k + kv_row, kv_row * sizeof(scalar_t));
      }
    });
  });
}

// ---- silu(gate) * up: T(T(silu(g)) * u), silu in float32 as torch computes it ----
template <typename T>
static void silu_row(const T* g, const T* u, int64_t n, T* o) {
  int64_t i = 0;
#if defined(__AVX512F__)
  if constexpr (vectorised<T>()) {
    const __m512 one = _mm512_set1_ps(1.f);
    for (; i + 16 <= n; i += 16) {
      const __m512 gv = load16(g + i);
      const __m512 den = _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv)));
      const __m512 sv = round_to<T>(_mm512_div_ps(gv, den));
      store16(o + i, _mm512_mul_ps(sv, load16(u + i)));
    }
  }
#endif
  for (; i < n; ++i) o[i] = static_cast<T>(static_cast<T>(silu_f(f(g[i]))) * u[i]);
}

torch::Tensor silu_and_mul(torch::Tensor gate_up) {
  const int64_t rows = gate_up.size(0), n = gate_up.size(1) / 2;
  auto out = torch::empty({rows, n}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "silu", [&] {
    const scalar_t* in = gate_up.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / n), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r)
        silu_row<scalar_t>(in + r * 2 * n, in + r * 2 * n + n, n, op + r * n);
    });
  });
  return out;
}

// ---- greedy selection: torch.argmax(x, dim=1) of float32 rows (the first maximum; a NaN wins)
static int64_t argmax_row(const float* x, int64_t n) {
  int64_t i = 0, at = 0;
  float best = -INFINITY;
#if defined(__AVX512F__)
  if (n >= 16) {  // per lane: the first strict maximum and its index; then the lowest tied index
    __m512 mv = _mm512_set1_ps(-INFINITY);
    __m512i iv = _mm512_setzero_si512();
    __m512i cur = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i step = _mm512_set1_epi32(16);
    for (; i + 16 <= n; i += 16, cur = _mm512_add_epi32(cur, step)) {
      const __m512 v = _mm512_loadu_ps(x + i);
      if (_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q)) break;  // the scalar loop finds the NaN
      const __mmask16 gt = _mm512_cmp_ps_mask(v, mv, _CMP_GT_OQ);
      mv = _mm512_mask_mov_ps(mv, gt, v);
      iv = _mm512_mask_mov_epi32(iv, gt, cur);
    }
    best = _mm512_reduce_max_ps(mv);
    at = _mm512_mask_reduce_min_epi32(_mm512_cmp_ps_mask(mv, _mm512_set1_ps(best), _CMP_EQ_OQ),
                                      iv);
  }
#endif
  for (; i < n; ++i) {
    if (std::isnan(x[i])) return i;
    if (x[i] > best) {
      best = x[i];
      at = i;
    }
  }
  return at;
}

torch::Tensor row_argmax(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1 &&
              x.size(1) > 0 && x.size(1) < (int64_t(1) << 31), "row_argmax: float32 [rows, n]");
  const int64_t rows = x.size(0), n = x.size(1), stride = x.stride(0);
  auto out = torch::empty({rows}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / n), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) op[r] = argmax_row(xp + r * stride, n);
  });
  return out;
}

// ---- copy-on-write block copies: row src[i] -> row dst[i] of every (contiguous) cache tensor,
// its first rows[i] entries along dim 1 when 0 < rows[i] < size(1), else all of it
void copy_blocks(std::vector<torch::Tensor> caches, torch::Tensor src, torch::Tensor dst,
                 torch::Tensor rows) {
  TORCH_CHECK(rows.numel() == src.numel() && dst.numel() == src.numel(),
              "src, dst, rows: one entry per copy");
  pybind11::gil_scoped_release no_gil;
  const int64_t pairs = src.numel(), num_caches = static_cast<int64_t>(caches.size());
  const int64_t* sp = src.data_ptr<int64_t>();
  const int64_t* dp = dst.data_ptr<int64_t>();
  const int64_t* rp = rows.data_ptr<int64_t>();
  for (const auto& cache : caches) {
    TORCH_CHECK(cache.is_contiguous() && cache.device().is_cpu(), "caches: contiguous CPU");
    for (int64_t i = 0; i < pairs; ++i)
      TORCH_CHECK(sp[i] >= 0 && sp[i] < cache.size(0) && dp[i] >= 0 && dp[i] < cache.size(0),
                  "block ", sp[i], " -> ", dp[i], " outside the cache");
  }
  at::parallel_for(0, num_caches * pairs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const auto& cache = caches[job / pairs];
      const int64_t i = job % pairs;
      const int64_t row = cache.stride(0) * static_cast<int64_t>(cache.element_size());
      const bool part = cache.dim() > 1 && rp[i] > 0 && rp[i] < cache.size(1);
      const int64_t bytes =
          part ? rp[i] * cache.stride(1) * static_cast<int64_t>(cache.element_size()) : row;
      auto* base = static_cast<char*>(cache.data_ptr());
      std::memcpy(base + dp[i] * row, base + sp[i] * row, bytes);
    }
  });
}
"""


@functools.cache
def load_extension():
    """Compiles (first call on a machine) and loads the extension; None if it cannot build."""
    return build("layer_ops_cpu", _SOURCE, ["add_rms_norm", "rotary_store", "silu_and_mul",
                                          "copy_blocks", "row_argmax"],
                 cflags=("-ffp-contract=off",))
