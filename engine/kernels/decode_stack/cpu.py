"""The whole decoder stack of a Llama decode step as one C++ call (built by
`engine.kernels.cpp_build`).

An all-decode step at batch 1 is about ten small ops per layer; from Python each costs tens of
microseconds of module calls and dispatch, a third of the step at batch 1. This extension runs
the same ops in the same order from C++: the per-layer kernels of `layer_ops` and
`paged_attention` (their sources compiled into this unit, each in its own namespace) and the
linear op each linear module calls (the float32 panel kernel of `panel_linear` or oneDNN's
prepacked `mkldnn::_linear_pointwise`, the weight-only int8 kernel of `quant_linear`, both
compiled in too, or torch's int4 GEMM), so its result equals the module-by-module forward bit
for bit.
It releases the GIL for the whole stack, so a server's gRPC thread runs while the engine
computes.

`llama_decode_stack(x, cos, sin, weights, caches, final_norm, slots, block_tables,
context_lens, num_heads, num_kv_heads, eps, scale, linear_kind, group, timings)`: x [tokens,
hidden] embedded inputs, one token per sequence; weights: per layer (input norm, qkv weight,
qkv aux, o weight, o aux, post-attention norm, gate/up weight, gate/up aux, down weight, down
aux), where a linear is a oneDNN-prepacked weight (kind 0, aux unused), int8 weights and
per-channel scales (kind 1), int4 packed weights and group scales / zeros (kind 2, groups of
`group`) or float32 panels and the plain weight (kind 3); caches: per layer (k, v); timings:
None, or a float64 [2] tensor that the call adds its GEMM and attention seconds to (a
profiler's view inside the call). Returns the final-normed hidden states.

`linears_seconds(inputs, weights, auxes, linear_kind, repeats)`: the same products alone, timed
in C++ (the GEMM floor the benchmarks compare a step with).
"""

from __future__ import annotations

import functools

from engine.kernels.cpp_build import build
from engine.kernels.layer_ops.cpu import _SOURCE as LAYER_OPS_SOURCE
from engine.kernels.paged_attention.cpu import _SOURCE as ATTENTION_SOURCE
from engine.kernels.panel_linear.cpu import _SOURCE as PANEL_LINEAR_SOURCE
from engine.kernels.quant_linear.cpu import _SOURCE as QUANT_LINEAR_SOURCE

_HEADER = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
"""

_DRIVER = r"""
namespace {

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed) {
  static const auto op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                        c10::string_view, c10::List<std::optional<at::Scalar>>,
                        std::optional<c10::string_view>)>();
  return op.call(x, packed, std::nullopt, "none", c10::List<std::optional<at::Scalar>>(),
                 c10::string_view(""));
}

// The linear kinds of a stack (one per model): oneDNN-prepacked float weights, weight-only
// int8 (per-channel scales), weight-only int4 (groups of `group`) and float32 panels (aux: the
// plain weight), each the op its Python module calls.
enum LinearKind : int64_t { kPacked = 0, kInt8 = 1, kInt4 = 2, kPanels = 3 };

struct Linear {
  int64_t kind, group;
  at::Tensor operator()(const at::Tensor& x, const at::Tensor& weight,
                        const at::Tensor& aux) const {
    switch (kind) {
      case kInt8: return quant_linear::int8_linear(x, weight, aux);
      case kInt4: return at::_weight_int4pack_mm_for_cpu(x, weight, group, aux);
      case kPanels: return panel_linear::panel_linear(x, weight, aux, std::nullopt);
      default: return packed_linear(x, weight);
    }
  }
};

}  // namespace

// Wall time of one call into the `timings` slots (gemm, attention) when they are asked for.
class Split {
 public:
  explicit Split(const c10::optional<torch::Tensor>& timings)
      : slots_(timings.has_value() ? timings->data_ptr<double>() : nullptr) {}
  template <typename F> auto operator()(int slot, F&& f) {
    if (slots_ == nullptr) return f();
    const auto start = std::chrono::steady_clock::now();
    auto result = f();
    slots_[slot] += std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
                        .count();
    return result;
  }

 private:
  double* slots_;
};

torch::Tensor llama_decode_stack(torch::Tensor x, torch::Tensor cos, torch::Tensor sin,
                                 std::vector<torch::Tensor> weights,
                                 std::vector<torch::Tensor> caches, torch::Tensor final_norm,
                                 torch::Tensor slots, torch::Tensor block_tables,
                                 torch::Tensor context_lens, int64_t num_heads,
                                 int64_t num_kv_heads, double eps, double scale,
                                 int64_t linear_kind, int64_t group,
                                 c10::optional<torch::Tensor> timings) {
  constexpr size_t kPerLayer = 10;
  TORCH_CHECK(weights.size() % kPerLayer == 0 && caches.size() * 5 == weights.size(),
              "weights: 10 per layer, caches: 2 per layer");
  TORCH_CHECK(linear_kind >= kPacked && linear_kind <= kPanels, "unknown linear kind");
  const Linear linear{linear_kind, group};
  TORCH_CHECK(!timings.has_value() || (timings->dtype() == torch::kFloat64 &&
                                      timings->numel() >= 2 && timings->is_contiguous()),
              "timings: float64 [2] (gemm, attention seconds)");
  pybind11::gil_scoped_release no_gil;
  Split split(timings);
  const int64_t layers = static_cast<int64_t>(caches.size() / 2);
  const int64_t tokens = x.size(0), head_dim = cos.size(-1);
  at::Tensor hidden = x, pending;
  at::Tensor normed = layer_ops::add_rms_norm(x, std::nullopt, weights[0], eps, 1.0)[0];
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor* w = weights.data() + l * kPerLayer;
    const at::Tensor& k_cache = caches[2 * l];
    const at::Tensor& v_cache = caches[2 * l + 1];
    if (l > 0) {  // the previous layer's MLP residual, added by this layer's input norm
      auto nh = layer_ops::add_rms_norm(pending, hidden, w[0], eps, 1.0);
      normed = nh[0];
      hidden = nh[1];
    }
    at::Tensor qkv = split(0, [&] { return linear(normed, w[1], w[2]); });
    layer_ops::rotary_store(qkv, cos, sin, k_cache, v_cache, slots, num_heads, num_kv_heads);
    at::Tensor q = qkv.narrow(1, 0, num_heads * head_dim).view({tokens, num_heads, head_dim});
    at::Tensor attn = split(1, [&] {
      return attention::paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens,
                                               scale);
    });
    at::Tensor o = split(0, [&] {
      return linear(attn.view({tokens, num_heads * head_dim}), w[3], w[4]);
    });
    auto nh = layer_ops::add_rms_norm(o, hidden, w[5], eps, 1.0);
    hidden = nh[1];
    at::Tensor gate_up = split(0, [&] { return linear(nh[0], w[6], w[7]); });
    at::Tensor act = layer_ops::silu_and_mul(gate_up);
    pending = split(0, [&] { return linear(act, w[8], w[9]); });
  }
  return layer_ops::add_rms_norm(pending, hidden, final_norm, eps, 1.0)[0];
}

// Seconds per pass over the linear of `weights[i]`, `auxes[i]` on `inputs[i]` for every i, best
// of `repeats` passes after one warm-up: the GEMM floor of a step, timed without any Python
// between the products.
double linears_seconds(std::vector<torch::Tensor> inputs, std::vector<torch::Tensor> weights,
                       std::vector<torch::Tensor> auxes, int64_t linear_kind,
                       int64_t repeats) {
  TORCH_CHECK(inputs.size() == weights.size() && auxes.size() == weights.size() &&
                  repeats >= 1, "one input and one aux per weight");
  TORCH_CHECK(linear_kind >= kPacked && linear_kind <= kPanels, "unknown linear kind");
  const Linear linear{linear_kind, 0};
  pybind11::gil_scoped_release no_gil;
  double best = INFINITY;
  for (int64_t r = 0; r <= repeats; ++r) {
    const auto start = std::chrono::steady_clock::now();
    for (size_t i = 0; i < inputs.size(); ++i) linear(inputs[i], weights[i], auxes[i]);
    const double elapsed =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (r > 0) best = std::min(best, elapsed);
  }
  return best;
}
"""


def _body(source: str) -> str:
    """A kernel source without its includes (they go once at the top of this unit)."""
    return "\n".join(line for line in source.splitlines()
                     if not line.lstrip().startswith("#include"))


_SOURCE = (_HEADER
           + "namespace layer_ops {\n" + _body(LAYER_OPS_SOURCE) + "\n}  // namespace layer_ops\n"
           # The attention kernel is built with contraction on, as in its own extension.
           + "#pragma GCC push_options\n#pragma GCC optimize(\"fp-contract=fast\")\n"
           + "namespace attention {\n" + _body(ATTENTION_SOURCE) + "\n}  // namespace attention\n"
           + "#pragma GCC pop_options\n"
           + "namespace quant_linear {\n" + _body(QUANT_LINEAR_SOURCE)
           + "\n}  // namespace quant_linear\n"
           + "namespace panel_linear {\n" + _body(PANEL_LINEAR_SOURCE)
           + "\n}  // namespace panel_linear\n"
           + _DRIVER)


@functools.cache
def load_extension():
    """Compiles (first call on a machine) and loads the extension; None if it cannot build.
    `-ffp-contract=off` as for `layer_ops`: its ops must round like torch's."""
    return build("decode_stack_cpu", _SOURCE, ["llama_decode_stack", "linears_seconds"],
                 cflags=("-ffp-contract=off",))
