"""TransNormerLLM (OpenNLPLab, 2024 Hugging Face checkpoint format): linear attention with a
per-head, per-layer exponential decay instead of softmax attention.

Block, per layer l (Qin et al., "TransNormerLLM"; the 2024 `modeling_transnormer.py`):

    x += out_proj( SRMSNorm(o) * u ),   o = DecayedLinearAttention(phi(q), phi(k), v)
    x += l3( l1(z) * l2(z) ),           z = SRMSNorm(x)          (SGLU: no activation)
    [q, k, v, u] = qkvu_proj(SRMSNorm(x))                        (u: no sigmoid)

SRMSNorm has no weight. Layer 0 applies LRPE (learned per-channel angles `theta`, loaded from
the checkpoint) to q and k, which doubles their width (cos || sin). There is no KV cache: each
sequence keeps one fixed-size float32 state per layer, `[H, d_k, d_v]`, in a state slot owned
through the engine's cache manager like a (single, whole-sequence) block. The decay rates are
in `engine.layers.linear_attention`.
"""

from __future__ import annotations

import math

import msgspec
import torch
import torch.nn.functional as F
from torch import nn

from engine.execution.attention_metadata import AttentionMetadata
from engine.kernels.linear_attention import linear_decode, linear_prefill
from engine.layers import linear_attention as la

_ACTIVATIONS = {
    "swish": F.silu, "silu": F.silu, "relu": F.relu, "sigmoid": torch.sigmoid,
    "elu": F.elu, "1+elu": lambda x: 1 + F.elu(x), "none": lambda x: x,
}
# HF checkpoint name -> (fused parameter, shard): l1 and l2 read the same input, so they run
# as one GEMM (decode is bound by the number and size of weight reads).
PACKED_MODULES = {"channel_mixer.l1": ("channel_mixer.l12", 0),
                  "channel_mixer.l2": ("channel_mixer.l12", 1)}
DEFAULT_MAX_POSITIONS = 1 << 16
"""Linear attention has no position table; this only bounds a request's length."""


class TransnormerConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Read from the checkpoint's `config.json` (OpenNLPLab's key names in brackets)."""

    vocab_size: int
    hidden_size: int
    """The residual width (decoder_embed_dim)."""
    attention_dim: int
    """Width of q, k, v and u, split over the heads (hidden_dim)."""
    glu_dim: int
    """SGLU inner width (glu_dim; -1 means hidden_size)."""
    num_hidden_layers: int
    """(decoder_layers) also sets the decay schedule's depth factor."""
    num_attention_heads: int
    """(decoder_attention_heads) each with its own ALiBi-slope decay."""
    activation: str
    """phi applied to q and k (linear_act_fun: "swish" for the released models)."""
    lrpe_layers: tuple[int, ...]
    """Layers that apply LRPE (linear_use_lrpe_list: layer 0 only when released)."""
    scale_embedding: bool
    """Embeddings x sqrt(hidden_size) (not no_scale_embedding)."""
    bias: bool
    """Biases on every projection (bias; false when released)."""
    tie_word_embeddings: bool
    """LM head shares the embedding (transformers' default: true)."""
    max_position_embeddings: int
    """A bound on request length only: linear attention has no position table."""
    norm_eps: float = 1e-6

    family = "transnormer"

    @property
    def head_dim(self) -> int:
        return self.attention_dim // self.num_attention_heads

    @classmethod
    def from_hf(cls, hf: dict, model_config=None) -> "TransnormerConfig":
        if hf.get("norm_type", "simplermsnorm") != "simplermsnorm":
            raise ValueError(f"norm_type={hf['norm_type']!r}: only 'simplermsnorm' is supported")
        act = hf.get("linear_act_fun", "swish")
        if act not in _ACTIVATIONS:
            raise ValueError(f"linear_act_fun={act!r}: must be one of {sorted(_ACTIVATIONS)}")
        layers, heads = hf["decoder_layers"], hf["decoder_attention_heads"]
        lrpe = hf.get("linear_use_lrpe_list") or [0] * layers
        if len(lrpe) != layers:
            raise ValueError(f"linear_use_lrpe_list={lrpe!r}: needs one entry per layer")
        embed = hf["decoder_embed_dim"]
        attention_dim = hf.get("hidden_dim", embed)
        if attention_dim % heads:
            raise ValueError(f"hidden_dim={attention_dim}: not divisible by {heads} heads")
        glu = hf.get("glu_dim", embed)
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=embed, attention_dim=attention_dim,
            glu_dim=embed if glu == -1 else glu, num_hidden_layers=layers,
            num_attention_heads=heads, activation=act,
            lrpe_layers=tuple(i for i, on in enumerate(lrpe) if on),
            scale_embedding=not hf.get("no_scale_embedding", False), bias=hf.get("bias", False),
            tie_word_embeddings=hf.get("tie_word_embeddings", True),
            max_position_embeddings=hf.get("max_position_embeddings", DEFAULT_MAX_POSITIONS))

    def state_shape(self, layer: int) -> tuple[int, int, int]:
        """[heads, d_k, d_v] of one layer's recurrent state (LRPE doubles d_k)."""
        d = self.head_dim
        return (self.num_attention_heads, 2 * d if layer in self.lrpe_layers else d, d)


def simple_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """`x * rsqrt(mean(x^2) + eps)` in float32, no weight (TransNormerLLM's SimpleRMSNorm,
    torch and Triton versions alike, eps 1e-6)."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class Lrpe(nn.Module):
    """Linearised relative positional encoding: [x cos(theta n), x sin(theta n)], so that
    q_t . k_i depends on t - i only; applied with absolute positions before the state update."""

    def __init__(self, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.empty(num_heads, 1, head_dim))
        self._theta32: torch.Tensor | None = None

    def keep_float32(self) -> None:
        """Keeps a float32 copy of the loaded angles (call before the model is cast): in
        bfloat16, theta * position would be off by radians after a few hundred tokens."""
        self._theta32 = self.theta.detach()[:, 0].float().clone()

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [T, H, d]; positions: [T] -> [T, H, 2d]."""
        if self._theta32 is None or self._theta32.device != x.device:
            self._theta32 = (self.theta.detach()[:, 0] if self._theta32 is None
                             else self._theta32).float().to(x.device)
        angle = self._theta32 * positions.float()[:, None, None]              # [T, H, d]
        x32 = x.float()
        return torch.cat([x32 * torch.cos(angle), x32 * torch.sin(angle)], dim=-1).to(x.dtype)


class NormLinearAttention(nn.Module):
    """Token mixer: decayed linear attention reading and updating the sequences' state slots."""

    def __init__(self, cfg: TransnormerConfig, layer: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.layer, self.num_layers = layer, cfg.num_hidden_layers
        self.eps = cfg.norm_eps
        self.act = _ACTIVATIONS[cfg.activation]
        self.qkvu_proj = nn.Linear(cfg.hidden_size, 4 * cfg.attention_dim, bias=cfg.bias)
        self.out_proj = nn.Linear(cfg.attention_dim, cfg.hidden_size, bias=cfg.bias)
        self.lrpe = Lrpe(self.num_heads, self.head_dim) if layer in cfg.lrpe_layers else None
        self._decay: torch.Tensor | None = None

    def decay(self, device: torch.device) -> torch.Tensor:
        """[H] float32 decay rates. Not a buffer: `model.to(bfloat16)` would round them."""
        if self._decay is None or self._decay.device != device:
            with torch.device(device):
                self._decay = la.decay_rates(self.num_heads, self.layer, self.num_layers)
        return self._decay

    def forward(self, x: torch.Tensor, positions: torch.Tensor, state: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """x: [T, hidden]; state: [num_slots, H, d_k, d_v] float32, updated in place."""
        T, H = x.shape[0], self.num_heads
        q, k, v, u = self.qkvu_proj(x).chunk(4, dim=-1)                 # 4 x [T, H * d]
        q = self.act(q).view(T, H, -1)
        k = self.act(k).view(T, H, -1)
        v = v.view(T, H, -1)
        if self.lrpe is not None:
            q, k = self.lrpe(q, positions), self.lrpe(k, positions)    # [T, H, 2d]
        out = torch.empty(T, H, self.head_dim, dtype=torch.float32, device=x.device)
        decay = self.decay(x.device)
        n = meta.num_decode_tokens
        if n:  # decode rows: one token each, state updated in its slot
            out[:n] = linear_decode(q[:n], k[:n], v[:n], decay, state, meta.state_slots)
        batched = meta.linear_prefill
        if batched is not None:  # every plain chunk in one lightning-kernel launch
            rows = batched.rows
            out[rows] = linear_prefill(q[rows], k[rows], v[rows], decay, state, batched.q_starts,
                                       batched.slots)
        for chunk in meta.prefills:
            rows = slice(chunk.q_start, chunk.q_start + chunk.q_len)
            qh, kh, vh = (t[rows].transpose(0, 1) for t in (q, k, v))   # [H, m, d]
            o, state[chunk.state_slot] = self._prefill(qh, kh, vh, decay, positions[rows],
                                                       chunk, state)
            out[rows] = o.transpose(0, 1)
        # SRMSNorm over all heads together, then the raw (ungated) u as output gate.
        mixed = simple_rms_norm(out.view(T, -1), self.eps).to(x.dtype) * u
        return self.out_proj(mixed)

    @staticmethod
    def _prefill(q, k, v, decay, positions, chunk, state):
        """One sequence's prompt chunk ([H, m, d] inputs) -> (o [H, m, d_v], final state)."""
        if chunk.mask is None:
            return la.chunked_prefill(q, k, v, decay, state[chunk.state_slot])
        # A structured prompt, always from its first token: its sets need the masked quadratic
        # form (`mask` covers them); what follows the last member is sequential and continues
        # with the chunked form from the state the masked form hands over.
        n = chunk.mask.shape[-1]
        o, final = la.masked_parallel(q[:, :n], k[:, :n], v[:, :n], decay, positions[:n],
                                      chunk.mask[0, 0])
        if n == q.shape[1]:
            return o, final
        rest, final = la.chunked_prefill(q[:, n:], k[:, n:], v[:, n:], decay, final)
        return torch.cat([o, rest], dim=1), final


class SGLU(nn.Module):
    """Channel mixer `l3(l1(x) * l2(x))`: a GLU without activation (l1 and l2 fused)."""
    def __init__(self, cfg: TransnormerConfig) -> None:
        super().__init__()
        self.l12 = nn.Linear(cfg.hidden_size, 2 * cfg.glu_dim, bias=cfg.bias)
        self.l3 = nn.Linear(cfg.glu_dim, cfg.hidden_size, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.l12(x).chunk(2, dim=-1)
        return self.l3(a * b)


class TransnormerDecoderLayer(nn.Module):
    def __init__(self, cfg: TransnormerConfig, layer: int) -> None:
        super().__init__()
        self.eps = cfg.norm_eps
        self.token_mixer = NormLinearAttention(cfg, layer)
        self.channel_mixer = SGLU(cfg)

    def forward(self, x, positions, state, meta, captures=None, index=-1):
        x = x + self.token_mixer(simple_rms_norm(x, self.eps), positions, state, meta)
        ffn_input = simple_rms_norm(x, self.eps)
        if captures is not None:
            captures[f"ffn_input:{index}"] = ffn_input
        return x + self.channel_mixer(ffn_input)


class TransnormerForCausalLM(nn.Module):
    """Flat token stream like the attention families; `kv_caches` are the per-layer state
    pools `[num_slots, H, d_k, d_v]` float32."""

    uses_state_slots = True

    def __init__(self, cfg: TransnormerConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_scale = math.sqrt(cfg.hidden_size) if cfg.scale_embedding else 1.0
        self.layers = nn.ModuleList(TransnormerDecoderLayer(cfg, i)
                                    for i in range(cfg.num_hidden_layers))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def state_shapes(self) -> list[tuple[int, int, int]]:
        return [self.config.state_shape(i) for i in range(self.config.num_hidden_layers)]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], meta: AttentionMetadata,
                capture_layers: frozenset[int] = frozenset()
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """input_ids, positions: [num_tokens]. Returns (final-norm hidden [num_tokens,
        hidden_size], captures {"ffn_input:<layer>": [num_tokens, hidden_size]})."""
        captures: dict[str, torch.Tensor] = {}
        x = self.embed_tokens(input_ids) * self.embed_scale
        for i, layer in enumerate(self.layers):
            sink = captures if i in capture_layers else None
            x = layer(x, positions, kv_caches[i], meta, sink, i)
        return simple_rms_norm(x, self.config.norm_eps), captures

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def load_weights(self, weights) -> None:
        """Copies HF-named tensors (`model.layers.N.token_mixer.qkvu_proj.weight`, ...) into
        the parameters (l1/l2 fused); every parameter must be set."""
        params = dict(self.named_parameters())
        loaded: set[tuple[str, int | None]] = set()
        tied = self.config.tie_word_embeddings
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if (name == "lm_head.weight" and tied) or name.endswith(".version"):
                continue
            target, shard = name, None
            for hf_name, (fused, index) in PACKED_MODULES.items():
                if f".{hf_name}." in name:
                    target, shard = name.replace(hf_name, fused), index
            if target not in params:
                raise ValueError(f"unexpected weight {name!r} in the checkpoint")
            param = params[target]
            if shard is not None:  # l1 / l2: one half of the fused rows each
                rows = param.shape[0] // 2
                param = param[shard * rows:(shard + 1) * rows]
            if tuple(tensor.shape) != tuple(param.shape):
                raise ValueError(f"{name}: shape {tuple(tensor.shape)}, expected "
                                 f"{tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(tensor)
            loaded.add((target, shard))
        expected = {(name, shard) for name in params
                    for shard in ((0, 1) if name.endswith(".l12.weight") else (None,))}
        missing = expected - loaded - ({("lm_head.weight", None)} if tied else set())
        if missing:
            raise ValueError(f"checkpoint is missing weights: {sorted(missing, key=str)[:5]}")
        for module in self.modules():
            if isinstance(module, Lrpe):
                module.keep_float32()
