"""C++ decode step of decayed linear attention, in place on the state pool.

One work item = one (sequence, head): its state `[d_k, d_v]` is read and written once, row by
row, as `S = lambda * S + k^T v` and `o = q S` are computed together. The torch reference
(gather the slots, update, scatter back) passes over every state about six times; decode of a
linear-attention model is bound by exactly that traffic next to the weights.
"""

from __future__ import annotations

import functools

from engine.kernels.cpp_build import build

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <vector>

template <typename T>
static void step_one(const T* q, const T* k, const T* v, float lambda, float* state,
                     int64_t d_k, int64_t d_v, float* out) {
  std::vector<float> vf(d_v), acc(d_v, 0.f);
  for (int64_t j = 0; j < d_v; ++j) vf[j] = static_cast<float>(v[j]);
  for (int64_t i = 0; i < d_k; ++i) {
    const float ki = static_cast<float>(k[i]), qi = static_cast<float>(q[i]);
    float* row = state + i * d_v;
    #pragma omp simd
    for (int64_t j = 0; j < d_v; ++j) {
      const float s = lambda * row[j] + ki * vf[j];  // decay first, then add k_i v_j
      row[j] = s;
      acc[j] += qi * s;
    }
  }
  for (int64_t j = 0; j < d_v; ++j) out[j] = acc[j];
}

torch::Tensor linear_decode(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                            torch::Tensor lambdas, torch::Tensor pool, torch::Tensor slots) {
  const int64_t num_seqs = q.size(0), num_heads = q.size(1), d_k = q.size(2);
  const int64_t d_v = v.size(2);
  auto out = torch::empty({num_seqs, num_heads, d_v}, q.options().dtype(torch::kFloat32));
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t b = 0; b < num_seqs; ++b)
    TORCH_CHECK(-1 <= sp[b] && sp[b] < pool.size(0), "slot ", sp[b], " out of range");
  const float* lp = lambdas.data_ptr<float>();
  float* pp = pool.data_ptr<float>();
  float* op = out.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "linear_decode", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    at::parallel_for(0, num_seqs * num_heads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / num_heads, h = i % num_heads;
        if (sp[b] < 0) {  // a padding row: no state, zero output
          std::fill(op + i * d_v, op + (i + 1) * d_v, 0.f);
          continue;
        }
        step_one<scalar_t>(qp + i * d_k, kp + i * d_k, vp + i * d_v, lp[h],
                           pp + (sp[b] * num_heads + h) * d_k * d_v, d_k, d_v,
                           op + i * d_v);
      }
    });
  });
  return out;
}
"""


@functools.cache
def load_extension():
    """Compiles (first call on a machine) and loads the extension; None if it cannot build."""
    return build("linear_attention_cpu", _SOURCE, ["linear_decode"])


def linear_decode_torch(q, k, v, s, pool, slots):
    """Vectorised torch decode step (the CPU path when the extension cannot build)."""
    import torch

    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=torch.float32, device=q.device)
    rows = (slots >= 0).nonzero().flatten()
    ids = slots[rows]
    decay = torch.exp(-s.float())[None, :, None, None]
    states = decay * pool[ids] + k[rows].float()[..., :, None] * v[rows].float()[..., None, :]
    out[rows] = (q[rows].float()[..., None, :] @ states).squeeze(-2)
    pool[ids] = states
    return out
