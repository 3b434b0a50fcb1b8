"""GPT-2 (and LayerNorm-free GPT-2) on a flat, continuously batched token stream.

Like the Llama family there is no batch axis: a step's tokens from every sequence are
concatenated into `input_ids [num_tokens]` with their `positions [num_tokens]`, which index the
learned position embedding `wpe`. Attention finds each token's context through the step's
`AttentionMetadata`.

LayerNorm-free GPT-2 (Heimersheim 2024; Baroni et al. 2025) ships as a plain GPT-2 checkpoint
with `layer_norm_epsilon = 1e12` and LayerNorm weights multiplied by 1e6 / sigma_bar. Each norm
is then `(x - mean(x)) * a + b` with `a = w_hf / sqrt(eps) = w_hf / 1e6`, converted in float32
while loading, before the runner casts the model down: the raw weights (1e6..1e7) are `inf` in
float16 (models.md 1.3).
"""

from __future__ import annotations

import math

import msgspec
import torch
import torch.nn.functional as F
from torch import nn

from engine.execution.attention_metadata import AttentionMetadata
from engine.layers.attention import PagedAttention
from engine.layers.norms import CenteredNorm, LayerNorm

# HF GPT-2 stores its projections as Conv1D, whose weight is [in, out]; nn.Linear wants
# [out, in], so these are transposed on load. Every other name maps 1:1 once the optional
# "transformer." prefix is dropped (our module tree mirrors HF's: wte, wpe, h.<i>, ln_f).
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                  "mlp.c_proj.weight")
# Causal-mask buffers that older checkpoints saved next to the weights; we build no masks.
IGNORED_BUFFERS = (".attn.bias", ".attn.masked_bias")
NORM_WEIGHTS = ("ln_1.weight", "ln_2.weight", "ln_f.weight")

LN_FREE_MIN_EPS = 1e6
"""A `layer_norm_epsilon` this large marks the LN-free "eps hack" checkpoint format."""

# HF `activation_function` -> elementwise op. The tanh-approximate GELU family is one function
# written three ways in transformers; torch's fused kernel computes it in one pass.
ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


class GPT2Config(msgspec.Struct, frozen=True, kw_only=True):
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    """Always num_attention_heads: GPT-2 has plain multi-head attention."""
    head_dim: int
    max_position_embeddings: int
    """Rows of the learned position table (HF n_positions); longer contexts cannot run."""
    tie_word_embeddings: bool
    layer_norm_epsilon: float
    layer_norm_free: bool
    """True for the LN-free checkpoints (eps >= 1e6): every norm is a CenteredNorm."""
    activation_function: str
    scale_attn_weights: bool
    """Divide attention scores by sqrt(head_dim)."""
    scale_attn_by_inverse_layer_idx: bool
    """Also divide layer i's attention scores by i + 1 (Stanford CRFM's Mistral GPT-2 runs)."""

    @property
    def family(self) -> str:
        """"gpt2" or "gpt2-ln-free" (GetModelInfo.family)."""
        return "gpt2-ln-free" if self.layer_norm_free else "gpt2"

    @classmethod
    def from_hf(cls, hf: dict, model_config=None) -> "GPT2Config":
        """Reads a HF GPT-2 config.json dict; raises ValueError(field=value: rule) for
        variants this file does not implement.

        `reorder_and_upcast_attn` is accepted and ignored: in HF it only changes how the eager
        path computes Q K^T (scale folded into Q, scores in float32). Both of our attention
        paths already accumulate scores and softmax in float32, so the maths is the same.
        """
        hidden = hf.get("n_embd", hf.get("hidden_size"))
        heads = hf.get("n_head", hf.get("num_attention_heads"))
        _check_supported(hf, hidden, heads, getattr(model_config, "norm_scheme", None))
        eps = float(hf.get("layer_norm_epsilon", 1e-5))
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf.get("n_inner") or 4 * hidden,
            num_hidden_layers=hf.get("n_layer", hf.get("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=heads,
            head_dim=hidden // heads,
            max_position_embeddings=hf.get("n_positions", hf.get("max_position_embeddings",
                                                                  1024)),
            tie_word_embeddings=hf.get("tie_word_embeddings", True),
            layer_norm_epsilon=eps,
            layer_norm_free=eps >= LN_FREE_MIN_EPS,
            activation_function=hf.get("activation_function", "gelu_new"),
            scale_attn_weights=hf.get("scale_attn_weights", True),
            scale_attn_by_inverse_layer_idx=hf.get("scale_attn_by_inverse_layer_idx", False),
        )


def _check_supported(hf: dict, hidden: int, heads: int, norm_scheme: str | None) -> None:
    act = hf.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise ValueError(f"activation_function={act!r}: must be one of {sorted(ACTIVATIONS)}")
    if hf.get("add_cross_attention"):
        raise ValueError("add_cross_attention=True: encoder-decoder GPT-2 is not supported")
    if hidden % heads:
        raise ValueError(f"n_embd={hidden!r}: must be a multiple of n_head={heads}")
    # The Llama-family norm placements (LNS, Mix-LN) are not GPT-2 variants: refuse rather than
    # silently run pre-norm. LN-free mode is read from the checkpoint, never chosen.
    if norm_scheme not in (None, "pre"):
        raise ValueError(f"norm_scheme={norm_scheme!r}: GPT-2 supports only 'pre'")


def attention_scale(cfg: GPT2Config, layer_idx: int) -> float:
    """Softmax scale of layer `layer_idx`, as HF GPT2Attention computes it."""
    scale = cfg.head_dim ** -0.5 if cfg.scale_attn_weights else 1.0
    if cfg.scale_attn_by_inverse_layer_idx:
        scale /= float(layer_idx + 1)
    return scale


def make_norm(cfg: GPT2Config) -> nn.Module:
    """The model's norm: a float32 LayerNorm, or the fixed-scale CenteredNorm when LN-free."""
    if cfg.layer_norm_free:
        return CenteredNorm(cfg.hidden_size)
    return LayerNorm(cfg.hidden_size, cfg.layer_norm_epsilon)


class GPT2Attention(nn.Module):
    def __init__(self, cfg: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.c_attn = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)   # q | k | v
        self.c_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.attn = PagedAttention(self.num_heads, self.num_heads, self.head_dim,
                                   scale=attention_scale(cfg, layer_idx))

    def forward(self, x: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.c_attn(x).chunk(3, dim=-1)                  # 3 x [T, hidden]
        q = q.view(-1, self.num_heads, self.head_dim)              # [T, heads, d]
        k = k.view(-1, self.num_heads, self.head_dim)
        v = v.view(-1, self.num_heads, self.head_dim)
        return self.c_proj(self.attn(q, k, v, kv_cache, meta))     # [T, hidden]


class GPT2MLP(nn.Module):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.c_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.activation_function]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, cfg: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = GPT2Attention(cfg, layer_idx)
        self.ln_2 = make_norm(cfg)
        self.mlp = GPT2MLP(cfg)

    def forward(self, x, kv_cache, meta, captures=None, index=-1):
        ffn_input, x = self.ln_2.add_forward(self.attn(self.ln_1(x), kv_cache, meta), x)
        if captures is not None:
            captures[f"ffn_input:{index}"] = ffn_input
        return x + self.mlp(ffn_input)


class GPT2LMHeadModel(nn.Module):
    """Pre-norm GPT-2 decoder with learned positions and an LM head tied to `wte`.

    The residual stream is kept in float32 whatever the model dtype: sublayer outputs are
    added to it in float32 and the norms (computed in float32) hand the model dtype to the
    linears. An LN-free model's residual is never renormalised and grows large (models.md
    1.3), and a float32 stream costs one [num_tokens, hidden_size] buffer per step.
    """

    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.wpe = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.h = nn.ModuleList(GPT2Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.ln_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Shares `wte` with the LM head when the config says so (call again after
        `to_empty`, which materialises each parameter separately)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.wte.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata,
                capture_layers: frozenset[int] = frozenset()
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """input_ids, positions: [num_tokens]. Returns (final-norm hidden [num_tokens,
        hidden_size] in the model dtype, captures {"ffn_input:<layer>": [num_tokens,
        hidden_size]} for `capture_layers`)."""
        captures: dict[str, torch.Tensor] = {}
        x = self.wte(input_ids).float() + self.wpe(positions).float()   # [T, hidden] fp32
        for i, block in enumerate(self.h):
            sink = captures if i in capture_layers else None
            x = block(x, kv_caches[i], meta, sink, i)
        return self.ln_f(x), captures

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [num_rows, hidden_size] -> float32 logits [num_rows, vocab_size]."""
        return self.lm_head(hidden).float()

    def load_weights(self, weights) -> None:
        """Copies HF-named tensors (with or without the "transformer." prefix) into the
        parameters; raises ValueError on an unknown name or a parameter left unset.

        Must run while the parameters are still float32 (the runner casts afterwards): in
        LN-free mode the norm weights are divided by sqrt(eps) (1e6) here, keeping them finite.
        """
        params = dict(self.named_parameters())
        tied = {"lm_head.weight"} if self.config.tie_word_embeddings else set()
        loaded: set[str] = set()
        for hf_name, tensor in weights:
            name = hf_name.removeprefix("transformer.")
            if name.endswith(IGNORED_BUFFERS) or name in tied:
                continue
            if name not in params:
                raise ValueError(f"checkpoint weight {hf_name!r}: no such GPT-2 parameter")
            with torch.no_grad():
                params[name].copy_(self._convert(name, tensor))
            loaded.add(name)
        missing = set(params) - loaded - tied
        if missing:
            raise ValueError(f"checkpoint is missing weights: {sorted(missing)[:5]}")

    def _convert(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name.endswith(CONV1D_WEIGHTS):
            return tensor.t()                                          # [in, out] -> [out, in]
        if self.config.layer_norm_free and name.endswith(NORM_WEIGHTS):
            if not torch.isfinite(tensor).all():
                raise ValueError(f"{name}: non-finite LN-free norm weight (was the checkpoint "
                                 f"saved in float16? the 1e6-scaled weights overflow it)")
            # HF divides by sqrt(var + eps) == sqrt(eps) (var is rounded away), i.e. by 1e6 for
            # the released eps = 1e12. float64 division, rounded once by copy_ into float32.
            return tensor.double() / math.sqrt(self.config.layer_norm_epsilon)
        return tensor

