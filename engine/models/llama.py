"""Llama / SmolLM2 on a flat, continuously batched token stream over a paged KV cache.

There is no batch axis and no padding: a step's tokens from every sequence are concatenated
into `input_ids [num_tokens]` with their `positions [num_tokens]`, and attention finds each
token's context through the step's `AttentionMetadata`.
"""

from __future__ import annotations

import msgspec
import torch
import torch.nn.functional as F
from torch import nn

from engine.attention_metadata import AttentionMetadata
from engine.layers.attention import PagedAttention
from engine.layers.norms import RMSNorm
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

    @classmethod
    def from_hf(cls, hf: dict) -> "LlamaConfig":
        # transformers 5 writes rope_parameters; older checkpoints have rope_theta at the top.
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise ValueError(f"rope_type={rope_type!r}: only default RoPE is supported")
        heads = hf["num_attention_heads"]
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
        )


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
        q, k = apply_rotary(q, k, rope)
        return self.o_proj(self.attn(q, k, v, kv_cache, meta))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)       # 2 x [T, intermediate]
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, rope, x, kv_cache, meta, captures=None, index=-1):
        x = x + self.self_attn(rope, self.input_layernorm(x), kv_cache, meta)
        ffn_input = self.post_attention_layernorm(x)
        if captures is not None:
            captures[f"ffn_input:{index}"] = ffn_input
        return x + self.mlp(ffn_input)


class LlamaForCausalLM(nn.Module):
    """Pre-norm decoder stack; `forward` returns final-norm hidden states, logits come from
    `compute_logits` on the rows that are sampled only (the LM head is the largest GEMM)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
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
        for i, layer in enumerate(self.layers):
            sink = captures if i in capture_layers else None
            x = layer(rope, x, kv_caches[i], meta, sink, i)
        return self.norm(x), captures

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [num_rows, hidden_size] -> float32 logits [num_rows, vocab_size]."""
        return self.lm_head(hidden).float()

    def load_weights(self, weights) -> None:
        """Copies HF-named tensors into the (fused) parameters; every parameter must be set."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb.inv_freq" in name or (
                    name == "lm_head.weight" and self.config.tie_word_embeddings):
                continue
            target, shard = name, None
            for hf_name, (fused, index) in PACKED_MODULES.items():
                if f".{hf_name}." in name:
                    target, shard = name.replace(hf_name, fused), index
                    break
            self._copy_shard(target, params[target], tensor, shard)
            loaded.add(target)
        missing = set(params) - loaded - ({"lm_head.weight"} if self.config.tie_word_embeddings
                                          else set())
        if missing:
            raise ValueError(f"checkpoint is missing weights: {sorted(missing)[:5]}")

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
