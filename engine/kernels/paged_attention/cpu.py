"""C++ paged decode attention for the CPU path, parallel over (sequence, kv head) with torch's
own thread pool, longest contexts first (built by `engine.kernels.cpp_build`).

Reads K/V straight from the blocks named by each sequence's block table: no gathered copy of
the context, no padding, one pass over K for the scores and one over V for the output.
"""

from __future__ import annotations

import functools

from engine.kernels.cpp_build import EXP16, LOAD16, build

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <numeric>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

template <typename T>
static inline float to_f(T x) { return static_cast<float>(x); }

// Portable path (any head_dim, any ISA). One work item = one (sequence, kv head): its `group`
// query heads share every K/V row read.
template <typename T>
static void decode_one(const T* q, const T* k_cache, const T* v_cache, const int64_t* table,
                       int64_t length, int64_t block_size, int64_t num_kv_heads,
                       int64_t head_dim, int64_t group, float scale, T* out) {
  std::vector<float> qf(group * head_dim), scores(group * length), acc(group * head_dim, 0.f);
  for (int64_t i = 0; i < group * head_dim; ++i) qf[i] = to_f(q[i]) * scale;
  const int64_t row = num_kv_heads * head_dim;  // stride between tokens inside a block
  for (int64_t t = 0; t < length; ++t) {
    const T* kp = k_cache + (table[t / block_size] * block_size + t % block_size) * row;
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = qf.data() + g * head_dim;
      float s = 0.f;
      #pragma omp simd reduction(+:s)
      for (int64_t d = 0; d < head_dim; ++d) s += qg[d] * to_f(kp[d]);
      scores[g * length + t] = s;
    }
  }
  for (int64_t g = 0; g < group; ++g) {  // softmax over the context, in float32
    float* sg = scores.data() + g * length;
    float m = -INFINITY, sum = 0.f;
    for (int64_t t = 0; t < length; ++t) m = std::max(m, sg[t]);
    for (int64_t t = 0; t < length; ++t) { sg[t] = std::exp(sg[t] - m); sum += sg[t]; }
    for (int64_t t = 0; t < length; ++t) sg[t] /= sum;
  }
  for (int64_t t = 0; t < length; ++t) {
    const T* vp = v_cache + (table[t / block_size] * block_size + t % block_size) * row;
    for (int64_t g = 0; g < group; ++g) {
      const float p = scores[g * length + t];
      float* ag = acc.data() + g * head_dim;
      #pragma omp simd
      for (int64_t d = 0; d < head_dim; ++d) ag[d] += p * to_f(vp[d]);
    }
  }
  for (int64_t i = 0; i < group * head_dim; ++i) out[i] = static_cast<T>(acc[i]);
}

#if defined(__AVX512F__)
// AVX-512 path for head_dim = 16 * NV and group = G <= 8. K and V are walked block by block
// (no division per token), all of the item's kv heads in one pass over each 16-token chunk (the
// heads of a token share its row: a block is read front to back once); while a block is read,
// the next block's rows are prefetched (a sequence's blocks are scattered over the cache).
// Scores are made 16 tokens at a time: each token's partial-product vector per query head, then
// one 16x16 transpose-and-add into a vector of 16 scores (no horizontal sum per token). Softmax
// runs 16 scores at a time with a vector exp; 1/sum is applied once at the end. bfloat16 K/V
// with AVX512-BF16: q.k and p.v are bfloat16 dot products accumulated in float32 (vdpbf16ps; p
// is rounded to bfloat16 as the value it weighs, V rows are interleaved in token pairs), no
// widening of the cache on load.
"""
_SOURCE += LOAD16
_SOURCE += r"""

"""
_SOURCE += EXP16
_SOURCE += r"""

// Lane i of the result is the sum of the 16 lanes of r[i].
static inline __m512 sum_16x16(const __m512* r) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]),
                         _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
    b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; ++i)
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

template <typename T>
constexpr bool bf16_dot() {
#if defined(__AVX512BF16__)
  return std::is_same_v<T, c10::BFloat16>;
#else
  return false;
#endif
}

template <typename T, int NV, int G>
static void decode_heads_avx512(const T* q, const T* k_cache, const T* v_cache,
                                const int64_t* table, int64_t length, int64_t block_size,
                                int64_t num_kv_heads, int64_t nh, float scale, T* out) {
  constexpr int D = 16 * NV;
  constexpr bool dot = bf16_dot<T>();
  const int64_t padded = (length + 15) / 16 * 16, rows = nh * G;
  thread_local std::vector<float> score_buffer, query_buffer, acc_buffer;
  thread_local std::vector<uint16_t> half_buffer;
  auto fit = [](auto& buffer, int64_t size) {
    if (static_cast<int64_t>(buffer.size()) < size) buffer.resize(size);
    return buffer.data();
  };
  float* scores = fit(score_buffer, rows * padded);
  float* qf = fit(query_buffer, rows * D);
  float* accs = fit(acc_buffer, rows * D);
  for (int64_t i = 0; i < rows * D; ++i) {
    qf[i] = static_cast<float>(q[i]);
    accs[i] = 0.f;
  }
  const int64_t row = num_kv_heads * D, blocks = (length + block_size - 1) / block_size;
  auto block = [&](const T* cache, int64_t b) { return cache + table[b] * block_size * row; };
  auto prefetch = [&](const T* p) {  // one kv head's part of a row
    for (int64_t b = 0; b < D * static_cast<int64_t>(sizeof(T)); b += 64)
      _mm_prefetch(reinterpret_cast<const char*>(p) + b, _MM_HINT_T0);
  };
  // One query head's partial products with one K row: a vector whose lanes sum to q.k.
  auto partial = [&](int64_t r, const T* kp) -> __m512 {
#if defined(__AVX512BF16__)
    if constexpr (dot) {
      const T* qr = q + r * D;
      __m512 acc = _mm512_setzero_ps();
      for (int v = 0; v < NV / 2; ++v)
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(qr + 32 * v),
                               (__m512bh)_mm512_loadu_si512(kp + 32 * v));
      return acc;
    }
#endif
    const float* qr = qf + r * D;
    __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(qr), load16(kp));
    for (int v = 1; v < NV; ++v)
      acc = _mm512_fmadd_ps(_mm512_loadu_ps(qr + 16 * v), load16(kp + 16 * v), acc);
    return acc;
  };
  const __m512 scale16 = _mm512_set1_ps(scale);
  for (int64_t b = 0; b < blocks; ++b) {
    const T* kb = block(k_cache, b);
    const T* next = b + 1 < blocks ? block(k_cache, b + 1) : nullptr;
    const int64_t t0 = b * block_size, n = std::min(block_size, length - t0);
    for (int64_t c = 0; c < n; c += 16) {
      const int m = static_cast<int>(std::min<int64_t>(16, n - c));
      for (int64_t r = 0; r < rows; ++r) {
        const T* kc = kb + c * row + r / G * D;
        if (next != nullptr && r % G == 0)  // the same rows of the next block, this kv head
          for (int i = 0; i < m; ++i) prefetch(next + (c + i) * row + r / G * D);
        __m512 s[16];
        for (int i = 0; i < 16; ++i) s[i] = i < m ? partial(r, kc + i * row) : _mm512_setzero_ps();
        _mm512_mask_storeu_ps(scores + r * padded + t0 + c, static_cast<__mmask16>((1u << m) - 1),
                              _mm512_mul_ps(sum_16x16(s), scale16));
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* sr = scores + r * padded;
    for (int64_t t = length; t < padded; ++t) sr[t] = -INFINITY;
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t t = 0; t < padded; t += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(sr + t));
    mx = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t t = 0; t < padded; t += 16) {
      const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(sr + t), mx));
      _mm512_storeu_ps(sr + t, e);
      sum = _mm512_add_ps(sum, e);
    }
    qf[r] = 1.f / _mm512_reduce_add_ps(sum);  // the queries are spent: qf keeps 1 / sum
  }
  // p.v over 16-token chunks, one kv head at a time, its G x NV accumulators in registers.
  __m512 acc[G][NV];
#if defined(__AVX512BF16__)
  uint16_t* ph = nullptr;
  if constexpr (dot) {  // p as bfloat16, token pairs adjacent: one broadcast per V pair
    ph = fit(half_buffer, rows * padded);
    for (int64_t i = 0; i < rows * padded; i += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(ph + i),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(scores + i)));
  }
#endif
  for (int64_t b = 0; b < blocks; ++b) {
    const T* vb = block(v_cache, b);
    const T* next = b + 1 < blocks ? block(v_cache, b + 1) : nullptr;
    const int64_t t0 = b * block_size, n = std::min(block_size, length - t0);
    for (int64_t c = 0; c < n; c += 16) {
      const int64_t m = std::min<int64_t>(16, n - c);
      for (int64_t h = 0; h < nh; ++h) {
        const T* vc = vb + c * row + h * D;
        if (next != nullptr)
          for (int64_t i = 0; i < m; ++i) prefetch(next + (c + i) * row + h * D);
        float* ah = accs + h * G * D;
        for (int g = 0; g < G; ++g)
          for (int v = 0; v < NV; ++v) acc[g][v] = _mm512_loadu_ps(ah + g * D + 16 * v);
#if defined(__AVX512BF16__)
        if constexpr (dot) {
          const uint16_t* pc = ph + h * G * padded + t0 + c;
          for (int64_t i = 0; i < m; i += 2) {
            const bool pair = i + 1 < m;
            __m512i w[G];
            for (int g = 0; g < G; ++g)
              w[g] = _mm512_set1_epi32(static_cast<int32_t>(
                  pc[g * padded + i] | (pair ? uint32_t(pc[g * padded + i + 1]) << 16 : 0u)));
            for (int v = 0; v < NV / 2; ++v) {
              const __m512i x = _mm512_loadu_si512(vc + i * row + 32 * v);
              const __m512i y = pair ? _mm512_loadu_si512(vc + (i + 1) * row + 32 * v)
                                     : _mm512_setzero_si512();
              const __m512bh lo = (__m512bh)_mm512_unpacklo_epi16(x, y);
              const __m512bh hi = (__m512bh)_mm512_unpackhi_epi16(x, y);
              for (int g = 0; g < G; ++g) {
                acc[g][2 * v] = _mm512_dpbf16_ps(acc[g][2 * v], (__m512bh)w[g], lo);
                acc[g][2 * v + 1] = _mm512_dpbf16_ps(acc[g][2 * v + 1], (__m512bh)w[g], hi);
              }
            }
          }
        } else
#endif
        {
          const float* pc = scores + h * G * padded + t0 + c;
          for (int64_t i = 0; i < m; ++i) {
            __m512 vv[NV];
            for (int v = 0; v < NV; ++v) vv[v] = load16(vc + i * row + 16 * v);
            for (int g = 0; g < G; ++g) {
              const __m512 p = _mm512_set1_ps(pc[g * padded + i]);
              for (int v = 0; v < NV; ++v) acc[g][v] = _mm512_fmadd_ps(p, vv[v], acc[g][v]);
            }
          }
        }
        for (int g = 0; g < G; ++g)
          for (int v = 0; v < NV; ++v) _mm512_storeu_ps(ah + g * D + 16 * v, acc[g][v]);
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float* a = accs + r * D;
    T* o = out + r * D;
    if (dot) {  // a[32v + 16s + 4l + j] holds dim 32v + 8l + 4s + j (pairs interleaved per lane)
      for (int v = 0; v < NV / 2; ++v)
        for (int s = 0; s < 2; ++s)
          for (int l = 0; l < 4; ++l)
            for (int j = 0; j < 4; ++j)
              o[32 * v + 8 * l + 4 * s + j] =
                  static_cast<T>(a[32 * v + 16 * s + 4 * l + j] * qf[r]);
    } else {
      for (int d = 0; d < D; ++d) o[d] = static_cast<T>(a[d] * qf[r]);
    }
  }
}

template <typename T, int NV>
static bool decode_avx512(const T* q, const T* k, const T* v, const int64_t* table,
                          int64_t length, int64_t block_size, int64_t num_kv_heads, int64_t nh,
                          int64_t group, float scale, T* out) {
  switch (group) {
#define POLYDECODE_GROUP(G) \
    case G: decode_heads_avx512<T, NV, G>(q, k, v, table, length, block_size, num_kv_heads, \
                                          nh, scale, out); return true;
    POLYDECODE_GROUP(1) POLYDECODE_GROUP(2) POLYDECODE_GROUP(3) POLYDECODE_GROUP(4)
    POLYDECODE_GROUP(5) POLYDECODE_GROUP(6) POLYDECODE_GROUP(7) POLYDECODE_GROUP(8)
#undef POLYDECODE_GROUP
    default: return false;
  }
}
#endif

// `nh` consecutive kv heads of one sequence (q, out: their nh * group query heads, dense; k, v:
// the first one's column of the cache).
template <typename T>
static void decode_item(const T* q, const T* k, const T* v, const int64_t* table,
                        int64_t length, int64_t block_size, int64_t num_kv_heads, int64_t nh,
                        int64_t head_dim, int64_t group, float scale, T* out) {
#if defined(__AVX512F__)
  if constexpr (!std::is_same_v<T, double>) {
    if (head_dim == 64 && decode_avx512<T, 4>(q, k, v, table, length, block_size, num_kv_heads,
                                              nh, group, scale, out)) return;
    if (head_dim == 128 && decode_avx512<T, 8>(q, k, v, table, length, block_size, num_kv_heads,
                                               nh, group, scale, out)) return;
  }
#endif
  for (int64_t h = 0; h < nh; ++h)
    decode_one<T>(q + h * group * head_dim, k + h * head_dim, v + h * head_dim, table, length,
                  block_size, num_kv_heads, head_dim, group, scale, out + h * group * head_dim);
}

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache,
                                     torch::Tensor v_cache, torch::Tensor block_tables,
                                     torch::Tensor context_lens, double scale) {
  const int64_t num_seqs = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  const int64_t group = num_heads / num_kv_heads, max_blocks = block_tables.size(1);
  // q may be a view into the fused qkv projection output: rows q.stride(0) apart, heads dense.
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == head_dim, "q heads must be dense");
  const int64_t q_row = q.stride(0);
  auto out = torch::empty({num_seqs, num_heads, head_dim}, q.options());
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k_cache.data_ptr<scalar_t>();
    const scalar_t* vp = v_cache.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    // Sequences longest context first, handed out one at a time (contexts in a batch differ by
    // 10x and more: a static split leaves a thread waiting), each with all its kv heads (they
    // share the cache lines of its blocks); with fewer sequences than twice the threads, one
    // (sequence, kv head) at a time.
    const int64_t per = num_seqs >= 2 * at::get_num_threads() ? num_kv_heads : 1;
    const int64_t units = num_seqs * num_kv_heads / per;
    std::vector<int64_t> order(units);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
      return lens[a * per / num_kv_heads] > lens[b * per / num_kv_heads];
    });
    std::atomic<int64_t> next{0};
    at::parallel_for(0, std::min<int64_t>(units, at::get_num_threads()), 1, [&](int64_t, int64_t) {
      for (int64_t j; (j = next.fetch_add(1, std::memory_order_relaxed)) < units;) {
        const int64_t b = order[j] * per / num_kv_heads, kh = order[j] * per % num_kv_heads;
        decode_item<scalar_t>(qp + b * q_row + kh * group * head_dim, kp + kh * head_dim,
                              vp + kh * head_dim, tables + b * max_blocks, lens[b], block_size,
                              num_kv_heads, per, head_dim, group, static_cast<float>(scale),
                              op + (b * num_heads + kh * group) * head_dim);
      }
    });
  });
  return out;
}
"""


@functools.cache
def load_extension():
    """Compiles (first call on a machine) and loads the extension; None if it cannot build."""
    return build("paged_attention_cpu", _SOURCE, ["paged_decode_attention"])


def dense_heads(q):
    """q itself when its heads are dense (rows may be strided views of a wider tensor)."""
    return q if q.stride(2) == 1 and q.stride(1) == q.shape[2] else q.contiguous()


def paged_attention_cpu(q, k_cache, v_cache, block_tables, seq_lens, q_starts, scale,
                        max_q_len, set_start=None, member_start=None):
    """The varlen op on CPU: the C++ decode kernel when every sequence has one unmasked query
    token, else per-sequence torch SDPA on the gathered context with the same mask rule."""
    import torch
    import torch.nn.functional as F

    ext = load_extension()
    if max_q_len == 1 and set_start is None and ext is not None:
        return ext.paged_decode_attention(dense_heads(q), k_cache, v_cache,
                                          block_tables.long().contiguous(),
                                          seq_lens.long().contiguous(), scale)
    block_size, num_kv_heads, head_dim = k_cache.shape[1:]
    flat_k = k_cache.view(-1, num_kv_heads, head_dim)
    flat_v = v_cache.view(-1, num_kv_heads, head_dim)
    out = torch.zeros_like(q)
    starts, lens = q_starts.tolist(), seq_lens.tolist()
    for b, length in enumerate(lens):
        first, last = starts[b], starts[b + 1]
        if first == last:
            continue
        keys = torch.arange(length)
        slots = block_tables[b, keys // block_size].long() * block_size + keys % block_size
        positions = torch.arange(length - (last - first), length)
        visible = keys[None, :] <= positions[:, None]
        if set_start is not None:
            visible &= (keys[None, :] < set_start[first:last, None]) | \
                (keys[None, :] >= member_start[first:last, None])
        q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (
            q[first:last], flat_k[slots], flat_v[slots]))
        rows = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=visible[None, None],
                                              scale=scale, enable_gqa=True)
        rows = rows.squeeze(0).transpose(0, 1)
        out[first:last] = torch.where(visible.any(1)[:, None, None], rows, 0)
    return out
