"""Llama / SmolLM2 on a flat, continuously batched token stream over a paged KV cache.

There is no batch axis and no padding: a step's tokens from every sequence are concatenated
into `input_ids [num_tokens]` with their `positions [num_tokens]`, and attention finds each
token's context through the step's `AttentionMetadata`.

Norm placement is a config field (`norm_scheme`), because LNS and Mix-LN checkpoints are saved
as plain Llama ones:
- "pre": standard Pre-LN, x + Attn(Norm_in(x)), then h + FFN(Norm_post(h)).
- "lns": LayerNorm-Scaling (Sun et al. 2025): both pre-norm outputs of layer l (counted from
  1) are multiplied by 1/sqrt(l); the final norm is not. Folded into the norm weights at load
  time by default, after which the model is an ordinary Llama.
- "mix_ln": Mix-LN (Li et al. 2024): the first `num_post_ln_layers` layers are Post-LN,
  h = Norm_a(x + Attn(x)), y = Norm_f(h + FFN(h)); the rest are Pre-LN.
"""

from __future__ import annotations

import math

import msgspec
import torch
import torch.nn.functional as F
from torch import nn

from engine.execution.attention_metadata import AttentionMetadata
from engine.config import NORM_SCHEMES, ModelConfig
from engine.kernels import decode_stack, layer_ops
from engine.layers.attention import PagedAttention
from engine.layers.norms import RMSNorm
from engine.layers.packed_linear import PackedLinear
from engine.layers.quantize import INT4_GROUP, Int4WeightOnlyLinear, Int8WeightOnlyLinear
from engine.layers.rotary import RotaryEmbedding, apply_rotary

# HF checkpoint name -> (our fused parameter, shard index). q/k/v and gate/up are fused so each
# layer runs two input GEMMs instead of five: fewer, larger matmuls are what decode is bound by.
PACKED_MODULES = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
DEFAULT_MIX_LN_RATIO = 0.25


class LlamaConfig(msgspec.Struct, frozen=True, kw_only=True):
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    norm_scheme: str = "pre"
    """"pre", "lns" or "mix_ln" (see the module docstring)."""
    num_post_ln_layers: int = 0
    """Mix-LN: layers [0, num_post_ln_layers) are Post-LN; 0 for the other schemes."""
    fold_lns: bool = True
    """LNS: fold 1/sqrt(l) into the norm weights at load time (False scales the norm outputs
    at run time, the paper's form; the two agree to float rounding)."""

    @property
    def family(self) -> str:
        """"llama", "llama-lns" or "llama-mix-ln" (GetModelInfo.family)."""
        return "llama" if self.norm_scheme == "pre" else f"llama-{self.norm_scheme}".replace(
            "_", "-")

    @classmethod
    def from_hf(cls, hf: dict, model_config: ModelConfig | None = None) -> "LlamaConfig":
        """The config of a HF `config.json` dict; `model_config` (a ModelConfig) may select
        the norm scheme, which otherwise comes from the dict's "polydecode" key."""
        # transformers 5 writes rope_parameters; older checkpoints have rope_theta at the top.
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise ValueError(f"rope_type={rope_type!r}: only default RoPE is supported")
        heads = hf["num_attention_heads"]
        norm_scheme, num_post_ln_layers = _resolve_norm_scheme(hf, model_config)
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            norm_scheme=norm_scheme,
            num_post_ln_layers=num_post_ln_layers,
        )


def _resolve_norm_scheme(hf: dict, model_config: ModelConfig | None) -> tuple[str, int]:
    """(norm_scheme, num_post_ln_layers). A ModelConfig value wins over the directory's
    `"polydecode": {"norm_scheme": ..., "mix_ln_ratio": ...}`, which wins over the defaults
    ("pre", alpha 0.25). Nothing is inferred from the weights."""
    declared = hf.get("polydecode") or {}
    scheme = (getattr(model_config, "norm_scheme", None) or declared.get("norm_scheme")
              or "pre")
    if scheme not in NORM_SCHEMES:
        raise ValueError(f"polydecode.norm_scheme={scheme!r}: must be one of {NORM_SCHEMES} "
                         f"(config.json)")
    ratio = getattr(model_config, "mix_ln_ratio", None)
    if ratio is not None and scheme != "mix_ln":
        raise ValueError(f"mix_ln_ratio={ratio!r}: only applies to norm_scheme='mix_ln' "
                         f"(the model's norm_scheme is {scheme!r})")
    if scheme != "mix_ln":
        return scheme, 0
    if ratio is None:
        ratio = declared.get("mix_ln_ratio", DEFAULT_MIX_LN_RATIO)
        if not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
            raise ValueError(f"polydecode.mix_ln_ratio={ratio!r}: must be in [0, 1] "
                             f"(config.json)")
    # floor(alpha * L), as in the Mix-LN paper and its scripts (POST_NUM 3 of 12 layers, 6 of
    # 24); Python's round() would round half to even (7.5 -> 8). The epsilon keeps products
    # like 0.29 * 100 = 28.999999999999996 from flooring one layer short.
    return scheme, math.floor(ratio * hf["num_hidden_layers"] + 1e-9)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=False)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim,
                                   scale=self.head_dim ** -0.5)

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata
                ) -> torch.Tensor:
        qkv = self.qkv_proj(x)                                  # [T, q_size + 2 * kv_size]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)           # [T, heads, d]
        k = k.view(-1, self.num_kv_heads, self.head_dim)        # [T, kv_heads, d]
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if _fused_cpu(qkv, kv_cache, meta):
            # RoPE in place on q and k inside qkv, and the cache write, in one C++ call.
            layer_ops.rotary_store(qkv, *rope, *kv_cache, meta.slot_mapping, self.num_heads,
                                   self.num_kv_heads)
            return self.o_proj(self.attn(q, k, v, kv_cache, meta, stored=True))
        q, k = apply_rotary(q, k, rope)
        return self.o_proj(self.attn(q, k, v, kv_cache, meta))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)                          # [T, 2 * intermediate]
        if gate_up.device.type == "cpu" and gate_up.is_contiguous() \
                and layer_ops.compiled() is not None:
            return self.down_proj(layer_ops.silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def _fused_cpu(qkv: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
               meta: AttentionMetadata) -> bool:
    """The C++ RoPE + cache-store kernel applies: the CPU path (not the varlen batch), all
    tensors of one dtype, contiguous."""
    k_cache = kv_cache[0]
    return (qkv.device.type == "cpu" and meta.varlen is None and qkv.is_contiguous()
            and k_cache.dtype == qkv.dtype and k_cache.is_contiguous()
            and meta.slot_mapping.dtype == torch.int64 and layer_ops.compiled() is not None)


class LlamaDecoderLayer(nn.Module):
    """Decoder layer `index` (0-based) in the placement `cfg.norm_scheme` gives it: Pre-LN
    (input_layernorm, post_attention_layernorm) or, for Mix-LN's first layers, Post-LN
    (post_attention_layernorm, post_feedforward_layernorm; no input norm).

    The checkpoint key `post_attention_layernorm` is the norm right after the attention
    residual in both placements: it normalises the FFN input in a Pre-LN layer and the
    attention block's output in a Post-LN one. The same module name receives it either way
    and the layer's placement decides what it does.
    """

    def __init__(self, cfg: LlamaConfig, index: int) -> None:
        super().__init__()
        self.is_post_ln = index < cfg.num_post_ln_layers
        if not self.is_post_ln:
            self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)
        if self.is_post_ln:
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # Unfolded LNS only: the factor the paper multiplies both pre-norm outputs by.
        self.lns_scale = (1 / math.sqrt(index + 1)
                          if cfg.norm_scheme == "lns" and not cfg.fold_lns else None)

    def forward(self, rope, x, kv_cache, meta, captures=None, index=-1):
        if self.is_post_ln:
            # h = Norm_a(x + Attn(x)); y = Norm_f(h + FFN(h))
            h = self.post_attention_layernorm(x + self.self_attn(rope, x, kv_cache, meta))
            _capture(captures, index, h)
            return self.post_feedforward_layernorm(h + self.mlp(h))
        attn = self.self_attn(rope, self._pre_norm(self.input_layernorm, x), kv_cache, meta)
        ffn_input, x = self.post_attention_layernorm.add_forward(attn, x, self.lns_scale)
        _capture(captures, index, ffn_input)
        return x + self.mlp(ffn_input)

    def _pre_norm(self, norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
        return norm(x) if self.lns_scale is None else norm(x) * self.lns_scale


def _capture(captures: dict[str, torch.Tensor] | None, index: int, ffn_input: torch.Tensor
             ) -> None:
    if captures is not None:
        captures[f"ffn_input:{index}"] = ffn_input


def _linear_kind(module) -> tuple[str, list[torch.Tensor]] | None:
    """(kind, [weight, aux]) of a linear module as the decode stack takes it, or None."""
    if getattr(module, "bias", None) is not None:
        return None
    if isinstance(module, PackedLinear):
        return module.stack_operands()
    if isinstance(module, Int8WeightOnlyLinear):
        return "int8", [module.weight_int8, module.scales]
    if isinstance(module, Int4WeightOnlyLinear):
        return "int4", [module.weight_int4, module.scales_and_zeros]
    return None


def _collect_stack_weights(layers) -> tuple[str, list[torch.Tensor]] | None:
    kinds, weights = set(), []
    for layer in layers:
        if layer.is_post_ln or layer.lns_scale is not None:
            return None
        attn, mlp = layer.self_attn, layer.mlp
        linears = [_linear_kind(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj,
                                             mlp.down_proj)]
        norms = (layer.input_layernorm.weight.detach(),
                 layer.post_attention_layernorm.weight.detach())
        if None in linears or norms[1].dtype != norms[0].dtype:
            return None
        kinds.update(kind for kind, _ in linears)
        weights += [norms[0], *linears[0][1], *linears[1][1], norms[1], *linears[2][1],
                    *linears[3][1]]
    if len(kinds) != 1:
        return None
    return kinds.pop(), weights


class LlamaForCausalLM(nn.Module):
    """Decoder stack (norms placed per `config.norm_scheme`); `forward` returns final-norm hidden states, logits come from
    `compute_logits` on the rows that are sampled only (the LM head is the largest GEMM)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Shares the embedding with the LM head when the config says so (call again after
        `to_empty`, which materialises each parameter separately)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata,
                capture_layers: frozenset[int] = frozenset()
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """input_ids, positions: [num_tokens]. Returns (hidden [num_tokens, hidden_size],
        captures {"ffn_input:<layer>": [num_tokens, hidden_size]} for `capture_layers`)."""
        captures: dict[str, torch.Tensor] = {}
        x = self.embed_tokens(input_ids)
        rope = self.rotary.lookup(positions, x.dtype)
        stack = self._stack_weights()
        if stack and decode_stack.applies(stack[1], x, kv_caches, meta, capture_layers):
            cfg, attn = self.config, self.layers[0].self_attn.attn
            return decode_stack.run(stack[1], x, rope, kv_caches, self.norm.weight, meta,
                                    cfg.num_attention_heads, cfg.num_key_value_heads,
                                    cfg.rms_norm_eps, attn.scale, stack[0],
                                    INT4_GROUP), captures
        for i, layer in enumerate(self.layers):
            sink = captures if i in capture_layers else None
            x = layer(rope, x, kv_caches[i], meta, sink, i)
        return self.norm(x), captures

    def _stack_weights(self) -> tuple[str, list[torch.Tensor]] | None:
        """The decode stack's linear kind and weights (10 per layer: input norm, qkv weight and
        aux, o weight and aux, post-attention norm, gate/up and down weights and aux), or None
        when a layer is outside its form (Post-LN, run-time LNS scaling, a plain or biased
        linear, mixed linear kinds or norm dtypes).
        Collected on first use: linears are prepacked after the model is built."""
        if not hasattr(self, "_stack"):
            self._stack = _collect_stack_weights(self.layers)
        return self._stack

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [num_rows, hidden_size] -> float32 logits [num_rows, vocab_size]."""
        return self.lm_head(hidden).float()

    def load_weights(self, weights) -> None:
        """Copies HF-named tensors into the (fused) parameters; every parameter must be set.
        Runs once: with folded LNS it then scales the pre-norm weights in place."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if self._is_unused(name):
                continue
            target, shard = name, None
            for hf_name, (fused, index) in PACKED_MODULES.items():
                if f".{hf_name}." in name:
                    target, shard = name.replace(hf_name, fused), index
                    break
            if target not in params:
                raise ValueError(f"checkpoint weight {name!r} has no place in this model"
                                 f"{self._norm_hint([name])}")
            self._copy_shard(target, params[target], tensor, shard)
            loaded.add(target)
        missing = set(params) - loaded - ({"lm_head.weight"} if self.config.tie_word_embeddings
                                          else set())
        if missing:
            raise ValueError(f"checkpoint is missing weights: {sorted(missing)[:5]}"
                             f"{self._norm_hint(missing)}")
        if self.config.norm_scheme == "lns" and self.config.fold_lns:
            self._fold_lns()

    def _is_unused(self, name: str) -> bool:
        if "rotary_emb.inv_freq" in name or (
                name == "lm_head.weight" and self.config.tie_word_embeddings):
            return True
        # A Post-LN layer has no input norm; some exports still save an (unused) one.
        parts = name.split(".")
        return (len(parts) > 2 and parts[0] == "layers" and parts[2] == "input_layernorm"
                and int(parts[1]) < self.config.num_post_ln_layers)

    def _norm_hint(self, names) -> str:
        # A Mix-LN checkpoint loaded without norm_scheme="mix_ln", or with the wrong ratio,
        # fails on its norm weights: say which placement the loader expected.
        cfg = self.config
        if cfg.norm_scheme == "mix_ln":
            return (f" (norm_scheme='mix_ln' with {cfg.num_post_ln_layers} Post-LN layers of "
                    f"{cfg.num_hidden_layers}: each needs post_attention_layernorm and "
                    f"post_feedforward_layernorm, the rest input_layernorm and "
                    f"post_attention_layernorm; check mix_ln_ratio)")
        if any("post_feedforward_layernorm" in name for name in names):
            return (f" (norm_scheme={cfg.norm_scheme!r}; a Mix-LN checkpoint needs "
                    f"norm_scheme='mix_ln')")
        return ""

    def _fold_lns(self) -> None:
        # LNS scales Norm(x) = gamma * x_hat by 1/sqrt(l); folding the factor into gamma makes
        # the model an ordinary Pre-LN Llama with no extra multiply per norm.
        with torch.no_grad():
            for i, layer in enumerate(self.layers):
                layer.input_layernorm.weight.mul_(1 / math.sqrt(i + 1))
                layer.post_attention_layernorm.weight.mul_(1 / math.sqrt(i + 1))

    def _copy_shard(self, name: str, param: nn.Parameter, tensor: torch.Tensor,
                    shard: int | None) -> None:
        with torch.no_grad():
            if shard is None:
                param.copy_(tensor)
                return
            sizes = self._shard_sizes(name)
            offset = sum(sizes[:shard])
            param[offset:offset + sizes[shard]].copy_(tensor)

    def _shard_sizes(self, fused_name: str) -> list[int]:
        cfg = self.config
        if "gate_up_proj" in fused_name:
            return [cfg.intermediate_size] * 2
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        return [q, kv, kv]
