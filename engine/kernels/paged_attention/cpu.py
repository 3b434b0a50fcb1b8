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
// AVX-512 path for head_dim = 16 * NV and group <= 8: K/V rows are loaded once per group as NV
// float32 vectors (bfloat16 / half widened on load), the group's queries stay in registers,
// softmax runs 16 scores at a time with a vector exp, and 1/sum is applied once at the end.
// K/V rows are prefetched 8 tokens ahead: a sequence's blocks are scattered over the cache.
"""
_SOURCE += LOAD16
_SOURCE += r"""

"""
_SOURCE += EXP16
_SOURCE += r"""

template <typename T, int NV>
static void decode_one_avx512(const T* q, const T* k_cache, const T* v_cache,
                              const int64_t* table, int64_t length, int64_t block_size,
                              int64_t num_kv_heads, int64_t group, float scale, T* out) {
  constexpr int D = 16 * NV;
  thread_local std::vector<float> buffer;
  const int64_t padded = (length + 15) / 16 * 16;
  if (static_cast<int64_t>(buffer.size()) < group * padded) buffer.resize(group * padded);
  float* scores = buffer.data();
  __m512 qv[8][NV];
  for (int64_t g = 0; g < group; ++g)
    for (int v = 0; v < NV; ++v)
      qv[g][v] = _mm512_mul_ps(load16(q + g * D + 16 * v), _mm512_set1_ps(scale));
  const int64_t row = num_kv_heads * D;
  constexpr int64_t ahead = 8;  // tokens: software prefetch crosses the scattered blocks
  auto address = [&](const T* cache, int64_t t) {
    return cache + (table[t / block_size] * block_size + t % block_size) * row;
  };
  auto prefetch = [&](const T* cache, int64_t t) {
    if (t >= length) return;
    const char* next = reinterpret_cast<const char*>(address(cache, t));
    for (int64_t b = 0; b < D * static_cast<int64_t>(sizeof(T)); b += 64)
      _mm_prefetch(next + b, _MM_HINT_T0);
  };
  for (int64_t t = 0; t < length; ++t) {
    const T* kp = address(k_cache, t);
    prefetch(k_cache, t + ahead);
    __m512 kv[NV];
    for (int v = 0; v < NV; ++v) kv[v] = load16(kp + 16 * v);
    for (int64_t g = 0; g < group; ++g) {
      __m512 acc = _mm512_mul_ps(qv[g][0], kv[0]);
      for (int v = 1; v < NV; ++v) acc = _mm512_fmadd_ps(qv[g][v], kv[v], acc);
      scores[g * padded + t] = _mm512_reduce_add_ps(acc);
    }
  }
  float inv_sum[8];
  for (int64_t g = 0; g < group; ++g) {
    float* sg = scores + g * padded;
    for (int64_t t = length; t < padded; ++t) sg[t] = -INFINITY;
    __m512 m = _mm512_set1_ps(-INFINITY);
    for (int64_t t = 0; t < padded; t += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(sg + t));
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(m));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t t = 0; t < padded; t += 16) {
      const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(sg + t), mx));
      _mm512_storeu_ps(sg + t, e);
      sum = _mm512_add_ps(sum, e);
    }
    inv_sum[g] = 1.f / _mm512_reduce_add_ps(sum);
  }
  __m512 acc[8][NV];
  for (int64_t g = 0; g < group; ++g)
    for (int v = 0; v < NV; ++v) acc[g][v] = _mm512_setzero_ps();
  for (int64_t t = 0; t < length; ++t) {
    const T* vp = address(v_cache, t);
    prefetch(v_cache, t + ahead);
    __m512 vv[NV];
    for (int v = 0; v < NV; ++v) vv[v] = load16(vp + 16 * v);
    for (int64_t g = 0; g < group; ++g) {
      const __m512 p = _mm512_set1_ps(scores[g * padded + t]);
      for (int v = 0; v < NV; ++v) acc[g][v] = _mm512_fmadd_ps(p, vv[v], acc[g][v]);
    }
  }
  alignas(64) float tmp[16];
  for (int64_t g = 0; g < group; ++g)
    for (int v = 0; v < NV; ++v) {
      _mm512_store_ps(tmp, _mm512_mul_ps(acc[g][v], _mm512_set1_ps(inv_sum[g])));
      for (int i = 0; i < 16; ++i) out[g * D + 16 * v + i] = static_cast<T>(tmp[i]);
    }
}
#endif

template <typename T>
static void decode_item(const T* q, const T* k, const T* v, const int64_t* table,
                        int64_t length, int64_t block_size, int64_t num_kv_heads,
                        int64_t head_dim, int64_t group, float scale, T* out) {
#if defined(__AVX512F__)
  if constexpr (!std::is_same_v<T, double>) if (group <= 8) {
    switch (head_dim) {
      case 64: return decode_one_avx512<T, 4>(q, k, v, table, length, block_size,
                                               num_kv_heads, group, scale, out);
      case 128: return decode_one_avx512<T, 8>(q, k, v, table, length, block_size,
                                                num_kv_heads, group, scale, out);
      default: break;
    }
  }
#endif
  decode_one<T>(q, k, v, table, length, block_size, num_kv_heads, head_dim, group, scale, out);
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
        for (int64_t i = order[j] * per; i < (order[j] + 1) * per; ++i) {
          const int64_t b = i / num_kv_heads, kh = i % num_kv_heads;
          const int64_t head0 = (b * num_heads + kh * group) * head_dim;
          decode_item<scalar_t>(qp + b * q_row + kh * group * head_dim, kp + kh * head_dim,
                                vp + kh * head_dim, tables + b * max_blocks, lens[b],
                                block_size, num_kv_heads, head_dim, group,
                                static_cast<float>(scale), op + head0);
        }
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
