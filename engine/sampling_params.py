"""Per-request sampling parameters, validated once when the request enters the engine."""

from __future__ import annotations

import math

import msgspec

from decoding import registry
from decoding.base import InvalidArgument, NotFound

MAX_LOGPROBS = 20
"""Most alternatives a request may ask for per token (the OpenAI API's limit)."""
MAX_LOGIT_BIAS = 100.0
"""Largest |bias| accepted; as in the OpenAI API, +-100 already bans or forces a token."""
_PENALTY_RANGE = (-2.0, 2.0)
_GREEDY = registry.entry("greedy").params_type()


def _require(ok: bool, field: str, reason: str) -> None:
    if not ok:
        raise InvalidArgument(field, reason)


def _registered_name(params, kind: str, field: str) -> str | None:
    """The registry name of a strategy / transform params value (None for None)."""
    if params is None:
        return None
    try:
        found = registry.entry(params)
    except KeyError:
        raise InvalidArgument(field, f"{type(params).__name__} is not a registered "
                              f"{kind}") from None
    _require(found.kind == kind, field, f"{found.name!r} is a {found.kind}, not a {kind}")
    return found.name


def _is_finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    """How to choose each next token and when to stop.

    Logits are processed in a fixed order (see `engine.sampler.Sampler`): logit_bias ->
    min_new_tokens masking -> repetition / frequency / presence penalties -> (greedy argmax) ->
    temperature -> top_k -> top_p -> min_p -> sample.
    """

    max_new_tokens: int = 16
    """Most tokens to generate, stop tokens included."""
    min_new_tokens: int = 0
    """EOS and `stop_token_ids` are masked out until this many tokens have been generated."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (argmax, ties to the lowest token id)."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 turns the filter off."""
    top_p: float = 1.0
    """Keep the smallest set of most likely tokens whose probability mass reaches top_p."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely token's."""
    repetition_penalty: float = 1.0
    """CTRL / HF rule over prompt AND output tokens: a seen token's positive logit is divided
    by this, a negative one multiplied. 1 turns it off."""
    frequency_penalty: float = 0.0
    """OpenAI rule: subtract penalty * (times the token occurs in the output so far)."""
    presence_penalty: float = 0.0
    """OpenAI rule: subtract penalty once if the token occurs in the output so far."""
    logit_bias: dict[int, float] = {}
    """Token id -> value added to its logit before anything else."""
    stop: tuple[str, ...] = ()
    """Generation stops when the output text contains one of these strings."""
    stop_token_ids: tuple[int, ...] = ()
    """Generation stops after one of these tokens is sampled (in addition to EOS)."""
    ignore_eos: bool = False
    """Keep generating after EOS (benchmarks); stops only at max_new_tokens or stop criteria."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the output text."""
    seed: int | None = None
    """Fixes the random stream: the same seed and logits give the same tokens whatever else
    shares the batch. None lets the engine draw one."""
    logprobs: int | None = None
    """None: no logprobs. N >= 0: return the sampled token's logprob plus the top-N
    alternatives, all from the raw (unprocessed) model distribution; with kNN-LM, the raw
    distribution interpolated with the datastore's (`decoding.knn`)."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the detokenized text."""
    strategy: object | None = None
    """The params Struct of a registered selection strategy (`decoding.registry`), e.g.
    `decoding.params.BeamSearch(...)`, instead of greedy / sampling (temperature, top_k, top_p,
    min_p and seed are then unused and must keep their defaults). `Greedy()` and
    `Sampling(...)` are accepted and folded into the flat fields above."""
    transforms: tuple = ()
    """Params Structs of registered plug-in transforms (kNN-LM, constraint masks, ...), applied
    after the penalties in the chain order their classes declare; at most one per kind."""

    def __post_init__(self) -> None:
        self._fold_strategy()
        self._validate_lengths()
        self._validate_filters()
        self._validate_penalties()
        self._validate_token_lists()
        _require(self.seed is None or 0 <= self.seed < 2**63, "seed", "must be in [0, 2**63)")
        _require(self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, "logprobs",
                 f"must be in [0, {MAX_LOGPROBS}]")
        if self.strategy is not None:
            self._validate_strategy()
        self._validate_transforms()

    @property
    def constraint(self):
        """The request's `decoding.constraint.Constraint`, if it lists one."""
        for params in self.transforms:
            if registry.entry(params).name == "constraint":
                return params
        return None

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    @property
    def selection(self):
        """The selection strategy's params: `strategy`, else `Greedy()` / `Sampling(...)`."""
        if self.strategy is not None:
            return self.strategy
        if self.temperature == 0:
            return _GREEDY
        return registry.entry("sampling").params_type(
            temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
            min_p=self.min_p, seed=self.seed)

    def _fold_strategy(self) -> None:
        """`strategy=Greedy()` / `Sampling(...)` become the flat fields (one canonical form)."""
        name = _registered_name(self.strategy, "strategy", "strategy")
        if name not in ("greedy", "sampling"):
            return
        flat = {"temperature": 0.0} if name == "greedy" else msgspec.structs.asdict(self.strategy)
        for field, value in flat.items():
            msgspec.structs.force_setattr(self, field, value)
        msgspec.structs.force_setattr(self, "strategy", None)

    def validate_for_vocab(self, vocab_size: int) -> None:
        """Check token ids against the model's vocabulary (unknown at construction).

        Raises:
            InvalidArgument: a `logit_bias` key or `stop_token_ids` entry is >= vocab_size.
        """
        rule = f"token ids must be in [0, {vocab_size})"
        _require(all(t < vocab_size for t in self.logit_bias), "logit_bias", rule)
        _require(all(t < vocab_size for t in self.stop_token_ids), "stop_token_ids", rule)

    def check_loaded(self) -> None:
        """Check what the transforms name against what this process loaded (a kNN-LM
        datastore), at admission.

        Raises:
            NotFound: field "<transform name>.<field>", e.g. "knn_lm.datastore".
        """
        strategy = registry.entry(self.selection)
        try:
            strategy.cls.check_loaded(self.selection)
        except NotFound as exc:
            raise exc.under("strategy") from None
        for params in self.transforms:
            entry = registry.entry(params)
            try:
                entry.cls.check_loaded(params)
            except NotFound as exc:
                raise exc.under(entry.name) from None

    def _validate_strategy(self) -> None:
        name = registry.entry(self.strategy).name
        batchable = registry.entry(self.strategy).cls.batchable  # seeded per-row choice
        fields = (("top_k", 0), ("top_p", 1.0), ("min_p", 0.0)) + (
            () if batchable else (("seed", None),))
        for field, default in fields:
            _require(getattr(self, field) == default, field, f"is a sampling setting; the "
                     f"{name} strategy does not use it")
        _require(self.logprobs is None or batchable, "logprobs",
                 f"not available with the {name} strategy")
        if not registry.entry(self.strategy).cls.streams_output:
            _require(not self.stop, "stop", f"stop strings are not available with the {name} "
                     f"strategy (it returns whole candidates)")

    def _validate_transforms(self) -> None:
        kinds = [_registered_name(t, "transform", "transforms") for t in self.transforms]
        _require(len(set(kinds)) == len(kinds), "transforms", "each transform at most once")
        builtin = [k for k in kinds if getattr(registry.entry(k).cls, "builtin", False)]
        _require(not builtin, "transforms", f"{builtin[:1]} is set by its own fields")

    def _validate_lengths(self) -> None:
        _require(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        _require(0 <= self.min_new_tokens <= self.max_new_tokens, "min_new_tokens",
                 "must be in [0, max_new_tokens]")

    def _validate_filters(self) -> None:
        _require(_is_finite(self.temperature) and self.temperature >= 0, "temperature",
                 "must be a finite number >= 0")
        _require(self.top_k >= 0, "top_k", "must be >= 0 (0 disables it)")
        # Range checks are chained comparisons, which are False for NaN, so NaN fails too.
        _require(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        _require(0 <= self.min_p <= 1, "min_p", "must be in [0, 1]")

    def _validate_penalties(self) -> None:
        _require(_is_finite(self.repetition_penalty) and self.repetition_penalty > 0,
                 "repetition_penalty", "must be a finite number > 0")
        low, high = _PENALTY_RANGE
        for field in ("frequency_penalty", "presence_penalty"):
            _require(low <= getattr(self, field) <= high, field, f"must be in [{low}, {high}]")

    def _validate_token_lists(self) -> None:
        _require(all(t >= 0 for t in self.logit_bias), "logit_bias", "token ids must be >= 0")
        _require(all(_is_finite(b) and abs(b) <= MAX_LOGIT_BIAS
                     for b in self.logit_bias.values()),
                 "logit_bias", f"biases must be in [-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}]")
        _require(all(t >= 0 for t in self.stop_token_ids), "stop_token_ids", "must be >= 0")
        _require(all(isinstance(s, str) and s for s in self.stop), "stop",
                 "must be non-empty strings")
