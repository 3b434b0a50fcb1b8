"""The decoding plug-in interfaces: distribution transforms and selection strategies.

Every step, the logits of every sampled row go through one pipeline (see the README's "How the
engine works"): an ordered chain of *transforms* (`Transform`: logit bias, min-new-tokens,
penalties, temperature, top-k / top-p, min-p, and registered plug-ins such as kNN-LM or grammar
masks), each applied in one tensor op to every row that uses it; then one *selection strategy*
per generation decides. Batchable strategies (greedy, sampling) choose for all their rows in one
vectorised `select` call; the others (contrastive, beam) see a `StepView` of their own rows
and answer a `StepDecision`.

A generation (one client request) owns one or more branches: sequences of tokens with KV state
that the engine schedules, batches with all other traffic and keeps in paged KV blocks. A
strategy never touches memory. Each step, for every generation whose branches produced logits,
the engine hands the strategy those rows (processed logits, and the hidden states it asked for)
and applies the strategy's decision: new branches forked from existing ones with one token
appended (they share the parent's KV blocks), branches that continue with a token, branches
freed, tokens emitted to the client's stream, and the end of the generation.

Classes register themselves in `decoding.registry` under the tag of their params Struct; the
engine, the server and the command line read names and params types from there. This module
also defines what crosses the engine/decoding boundary: `InvalidArgument`, `NotFound`,
`Capture`, the per-step row settings (`SamplingRow`, `SamplingBatch`).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any, ClassVar, NamedTuple, Self

import msgspec
import torch


class _FieldError(Exception):
    """An error about one request field: `field` (its path) and `reason`, printed
    "field: reason", picklable, and re-rooted under a parent path by `under`."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason

    def __reduce__(self):
        # The default reduce replays `args` (the joined message) into `__init__`, which takes
        # two arguments; without this the error cannot cross a process boundary.
        return (type(self), (self.field, self.reason))

    def __str__(self) -> str:  # LookupError's str would quote the message like a KeyError
        return f"{self.field}: {self.reason}"

    def under(self, prefix: str) -> Self:
        """The same error with its field path nested under `prefix`."""
        return type(self)(f"{prefix}.{self.field}" if prefix else self.field, self.reason)


class InvalidArgument(_FieldError, ValueError):
    """A request field has a value the engine will not accept: the one error type of engine
    and decoding validation (the server maps it to INVALID_ARGUMENT).

    Attributes:
        field: Path of the offending field, as spelled in the request (e.g. "top_p",
            "strategy.num_beams").
        reason: Human-readable rule that the value broke (e.g. "must be in (0, 1]").
    """


class NotFound(_FieldError, LookupError):
    """A request names something this process has not loaded (a kNN-LM datastore); the
    server maps it to NOT_FOUND. Checked when the engine admits the request, not when its
    params are built: params are plain values, and a client builds them for a remote server.

    Attributes:
        field: Path of the naming field (e.g. "knn_lm.datastore").
        reason: What is missing and what is loaded instead.
    """


class Capture(msgspec.Struct, frozen=True):
    """An activation a request or a plug-in asks the model runner to return.

    `Capture("final_hidden")` is the LM-head input of each sampled row;
    `Capture("ffn_input", layer=-1)` the last layer's FFN input after its norm (the kNN-LM key);
    `Capture("final_hidden", all_positions=True)` / `Capture("ffn_input", -1,
    all_positions=True)` the activation at every prompt position: a request's final output
    carries it as one `[num_prompt_tokens, hidden]` float32 tensor (chunked prefill and
    recomputes included), and such a request bypasses the prefix cache.
    """

    kind: str
    layer: int | None = None
    all_positions: bool = False

    KINDS: ClassVar[tuple[str, ...]] = ("final_hidden", "ffn_input")

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise InvalidArgument("captures", f"unknown capture kind {self.kind!r}")
        if (self.kind == "ffn_input") != (self.layer is not None):
            raise InvalidArgument("captures", "ffn_input takes a layer index; nothing else does")

    @property
    def name(self) -> str:
        """The key of this capture in `RequestOutput.captures` ("final_hidden",
        "ffn_input:-1"; all-position captures end in "@all": "ffn_input:-1@all")."""
        name = self.kind if self.layer is None else f"{self.kind}:{self.layer}"
        return f"{name}@all" if self.all_positions else name

    @classmethod
    def parse(cls, name: str) -> Capture:
        """The Capture of a name as `name` spells it (a boundary helper for string APIs)."""
        base, at, where = name.partition("@")
        kind, sep, layer = base.partition(":")
        try:
            if at and where != "all":
                raise ValueError(where)
            return cls(kind, int(layer) if sep else None, all_positions=bool(at))
        except ValueError:
            raise InvalidArgument("captures", f"unknown capture {name!r}") from None


class SamplingRow(msgspec.Struct, frozen=True, kw_only=True):
    """What transforms and batchable strategies know about one row for one step."""

    params: Any
    """The request's `engine.sampling_params.SamplingParams` (read by attribute)."""
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    """Tokens generated so far; its length is the step index used to draw random numbers."""
    seed: int
    """The request's seed, or one the engine drew at admission; in [0, 2**63)."""
    eos_token_ids: tuple[int, ...] = ()
    """Masked together with `params.stop_token_ids` while below `params.min_new_tokens`."""
    captures: dict | None = None
    """Capture name -> [hidden] tensor of this row, for the captures its plug-ins declared."""
    constraint: Any = None
    """The branch's `constraints.compiler.ConstraintState` when the request is constrained."""


def torch_argmax(x: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax (the first maximum), the default `SamplingBatch.argmax`."""
    return x.argmax(dim=-1)


class SparseLogitEdit(NamedTuple):
    """A list of `(row, token_id)` logits to change, as three flat tensors of one length."""

    row_ids: torch.Tensor  # [num_edits] int64
    token_ids: torch.Tensor  # [num_edits] int64
    values: torch.Tensor  # [num_edits] float32


@dataclass(frozen=True)
class SamplingBatch:
    """Per-step settings of a batch of rows, as tensors on the logits' device.

    Built once per step by `SamplingBatch.build` over every sampled row, whatever its strategy.
    Per-row tensors have shape `[num_rows]`. The boolean flags let transforms skip themselves: an
    all-greedy batch with no penalties, bias or min_new_tokens masking costs exactly one argmax.
    """

    rows: Sequence[SamplingRow]
    num_rows: int
    vocab_size: int
    temperature: torch.Tensor  # float32; 1.0 on all but sampling rows: dividing is harmless
    is_greedy: torch.Tensor  # bool
    top_k: torch.Tensor  # int64 in [1, vocab_size]; vocab_size where the filter is off
    top_p: torch.Tensor  # float32 in (0, 1]
    min_p: torch.Tensor  # float32 in [0, 1]
    repetition_penalty: torch.Tensor  # float32
    frequency_penalty: torch.Tensor  # float32
    presence_penalty: torch.Tensor  # float32
    seeds: torch.Tensor  # int64
    steps: torch.Tensor  # int64, number of output tokens so far
    prompt_token_ids: torch.Tensor | None  # [num_rows, max_prompt_len], padded with vocab_size
    output_token_ids: torch.Tensor | None  # [num_rows, max_output_len], padded with vocab_size
    logit_bias: SparseLogitEdit | None
    min_tokens_mask: SparseLogitEdit | None  # values are -inf
    top_k_top_p_rows: torch.Tensor | None  # [num_filtered] int64 rows that use top-k or top-p
    all_greedy: bool
    all_random: bool
    needs_temperature: bool  # a sampling row has a temperature other than 1
    needs_repetition_penalty: bool
    needs_frequency_presence: bool
    needs_min_p: bool
    max_num_logprobs: int | None  # None when no row asked for logprobs
    argmax: Callable[[torch.Tensor], torch.Tensor] = torch_argmax
    """Row-wise argmax of a `[rows, vocab]` float32 tensor (the first maximum); the engine
    passes its kernel (torch's reduction is several times slower than memory allows on CPU)."""

    @property
    def needs_penalties(self) -> bool:
        return self.needs_repetition_penalty or self.needs_frequency_presence

    def rows_using(self, params_type: type) -> tuple[list[int], list]:
        """(row indices, params) of the rows whose request lists a transform of `params_type`."""
        index, found = [], []
        for i, row in enumerate(self.rows):
            for p in row.params.transforms:
                if type(p) is params_type:
                    index.append(i)
                    found.append(p)
                    break
        return index, found

    @classmethod
    def build(cls, rows: Sequence[SamplingRow], vocab_size: int,
              device: torch.device | str = "cpu",
              argmax: Callable[[torch.Tensor], torch.Tensor] = torch_argmax) -> SamplingBatch:
        """Gather per-row settings into tensors. Row i of the batch is `rows[i]`.

        Token ids in the rows must already be checked against `vocab_size`
        (`SamplingParams.validate_for_vocab`).
        """
        params = [row.params for row in rows]
        greedy = [p.is_greedy for p in params]
        top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
        filtered = [i for i, p in enumerate(params)
                    if not greedy[i] and (top_k[i] < vocab_size or p.top_p < 1)]
        needs_rep = any(p.repetition_penalty != 1 for p in params)
        needs_freq = any(p.frequency_penalty != 0 or p.presence_penalty != 0 for p in params)
        num_logprobs = [p.logprobs for p in params if p.logprobs is not None]
        temperature = [p.temperature if not g and p.strategy is None else 1.0
                       for g, p in zip(greedy, params)]

        def f32(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        def i64(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        return cls(
            rows=rows,
            num_rows=len(rows),
            vocab_size=vocab_size,
            temperature=f32(temperature),
            is_greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            top_k=i64(top_k),
            top_p=f32([p.top_p for p in params]),
            min_p=f32([p.min_p for p in params]),
            repetition_penalty=f32([p.repetition_penalty for p in params]),
            frequency_penalty=f32([p.frequency_penalty for p in params]),
            presence_penalty=f32([p.presence_penalty for p in params]),
            seeds=i64([row.seed for row in rows]),
            steps=i64([len(row.output_token_ids) for row in rows]),
            prompt_token_ids=(_pad([r.prompt_token_ids for r in rows], vocab_size, device)
                              if needs_rep else None),
            output_token_ids=(_pad([r.output_token_ids for r in rows], vocab_size, device)
                              if needs_rep or needs_freq else None),
            logit_bias=_gather_logit_bias(rows, device),
            min_tokens_mask=_gather_min_tokens_mask(rows, device),
            top_k_top_p_rows=i64(filtered) if filtered else None,
            all_greedy=all(greedy),
            all_random=not any(greedy),
            needs_temperature=any(t != 1.0 for t in temperature),
            needs_repetition_penalty=needs_rep,
            needs_frequency_presence=needs_freq,
            needs_min_p=any(p.min_p > 0 and not g for g, p in zip(greedy, params)),
            max_num_logprobs=max(num_logprobs) if num_logprobs else None,
            argmax=argmax,
        )


# NOTE: the two gatherers and `_pad` walk token lists, never the vocabulary. A persistent
# batch (updating rows in place between steps) would save rebuilding them; not yet profiled.
def _pad(token_ids: list[Sequence[int]], pad_id: int, device) -> torch.Tensor:
    """Right-pad to `[num_rows, max_len]`. The pad id is vocab_size so that scatters into a
    `vocab_size + 1`-wide buffer land padding in a spare last column."""
    max_len = max(map(len, token_ids), default=0)
    padded = [list(ids) + [pad_id] * (max_len - len(ids)) for ids in token_ids]
    return torch.tensor(padded, dtype=torch.int64, device=device).view(len(token_ids), max_len)


def _make_edit(edits: list[tuple[int, int, float]], device) -> SparseLogitEdit | None:
    if not edits:
        return None
    row_ids, token_ids, values = zip(*edits)
    return SparseLogitEdit(torch.tensor(row_ids, dtype=torch.int64, device=device),
                           torch.tensor(token_ids, dtype=torch.int64, device=device),
                           torch.tensor(values, dtype=torch.float32, device=device))


def _gather_logit_bias(rows: Sequence[SamplingRow], device) -> SparseLogitEdit | None:
    """Every row's bias as one edit, built without a Python loop over the entries."""
    biased = [(i, row.params.logit_bias) for i, row in enumerate(rows) if row.params.logit_bias]
    if not biased:
        return None
    counts = torch.tensor([len(bias) for _, bias in biased])
    row_ids = torch.tensor([i for i, _ in biased]).repeat_interleave(counts)
    token_ids = list(chain.from_iterable(bias.keys() for _, bias in biased))
    values = list(chain.from_iterable(bias.values() for _, bias in biased))
    return SparseLogitEdit(row_ids.to(device),
                           torch.tensor(token_ids, dtype=torch.int64, device=device),
                           torch.tensor(values, dtype=torch.float32, device=device))


def _gather_min_tokens_mask(rows: Sequence[SamplingRow], device) -> SparseLogitEdit | None:
    edits = [(i, token_id, float("-inf")) for i, row in enumerate(rows)
             if len(row.output_token_ids) < row.params.min_new_tokens
             for token_id in sorted(set(row.eos_token_ids) | set(row.params.stop_token_ids))]
    return _make_edit(edits, device)


class StepView(msgspec.Struct, kw_only=True):
    """One generation's rows in one step."""

    branch_ids: list[int]
    """The branches that produced logits this step; row i of `logits` belongs to
    branch_ids[i]."""
    logits: torch.Tensor | None
    """[rows, vocab] float32. Processed by the request's logits processors (logit bias,
    min_new_tokens, repetition / frequency / presence penalties); no temperature. If the
    strategy sets `log_softmax_first`, these are the processed log-probabilities instead.
    Strategies that set `logits_of_choice`: None in `choose`; in `step`, the one row of the
    branch `chosen`."""
    chosen: int | None = None
    """`logits_of_choice` strategies, in `step`: the branch `choose` named."""
    hidden: torch.Tensor | None = None
    """[rows, hidden_size] float32 LM-head input of each row's last token, when the strategy
    sets `needs_hidden`."""
    prompt_hidden: torch.Tensor | None = None
    """[prompt_len, hidden_size] LM-head inputs of every prompt position: given once, on the
    step that finishes the prompt, to strategies that set `needs_prompt_hidden`."""
    output_token_ids: list[list[int]]
    """Per row: the tokens the branch generated so far (its last token included)."""
    eos_token_ids: tuple[int, ...] = ()
    max_new_tokens: int = 16
    min_new_tokens: int = 0
    ignore_eos: bool = False
    seed: int = 0
    """The request's seed (or the one the engine drew for it)."""
    condition: Any = None
    """Strategies that set `checks_constraint`: the generation's `constraints.condition.
    Condition` (its constraint and / or predicate)."""
    prompt_token_ids: list[int] = []
    decode: Any = None
    """token ids -> text, as the client's text is detokenized."""
    prepared: Any = None
    """What the strategy's class computed for this view in `prepare_steps` (None outside a
    batched step)."""


class Fork(msgspec.Struct, frozen=True):
    """Create branch `child` = branch `parent` + [token] (KV blocks shared with the parent)."""

    parent: int
    child: int
    token: int


class Candidate(msgspec.Struct, frozen=True):
    """A finished sequence a strategy returns (e.g. a beam hypothesis)."""

    token_ids: list[int]
    score: float


class StepDecision(msgspec.Struct, kw_only=True):
    """What to do after a step. Applied in order: finish (with candidates; nothing else
    applies), emit (when an emitted token stops the request, nothing else applies), frees of
    branches no fork reads, forks, appends, the other frees."""

    forks: list[Fork] = []
    appends: list[tuple[int, int]] = []
    """(branch, token): the branch continues with `token` appended."""
    frees: list[int] = []
    """Branches to drop; their KV blocks return to the pool once no other branch shares them."""
    emit: list[int] = []
    """Tokens appended to the generation's streamed output (EOS, stop strings and
    max_new_tokens are then checked by the engine, as for sampling)."""
    finished: bool = False
    """The strategy is done (e.g. beam search): the engine frees every branch."""
    candidates: list[Candidate] | None = None
    """With `finished`: the n best sequences, best first; the first becomes the output."""
    rounds: list[list[Candidate]] | None = None
    """With `finished`: what the strategy kept along the way (RankGen: each round's survivors,
    best first), reported to clients that ask for candidate scores."""


class Transform(abc.ABC):
    """A distribution transform: `[num_rows, vocab]` logits in, logits out, batched.

    One instance per engine, created by `decoding.registry.create_transforms()`, applied every
    step to the whole batch in `order` (lower first). A transform finds the rows that use it
    from the batch (built-ins from per-row settings, plug-ins with `batch.rows_using(params)`)
    and changes only those, in one tensor op: never a Python loop over rows.
    """

    order: ClassVar[int] = 50
    """Place in the chain: logit bias 10, min-new-tokens 20, penalties 30, plug-ins 50 by
    default (kNN-LM, constraint masks), temperature 60, top-k / top-p 70, min-p 80."""
    captures: ClassVar[tuple[Capture, ...]] = ()
    """Activations the transform reads from `SamplingRow.captures` (e.g. kNN-LM keys); the
    engine captures them for the requests that list the transform."""
    changes_model: ClassVar[bool] = False
    """The transform changes the model's distribution itself (kNN-LM), not only how it is
    sampled: the logprobs reported to clients go through `apply_to_logprobs` too."""

    @classmethod
    def check_loaded(cls, params) -> None:
        """Raises `NotFound` (field relative to the params, e.g. "datastore") when `params`
        name a resource this process has not loaded. Called when the engine admits a request;
        value checks belong in the params Struct."""

    def is_active(self, batch: SamplingBatch) -> bool:
        """Whether any row of the batch uses this transform (the chain skips it otherwise)."""
        return True

    def prepare(self, sequences: Sequence) -> None:
        """Called with the step's scheduled sequences (`engine.core.request.Request`) before
        the forward: work that needs no logits (a constraint's masks) can start here, on a
        thread that releases the GIL, and overlap the forward."""

    def apply_to_logprobs(self, log_probs: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """`changes_model` transforms: the change of `apply` on the raw model log-probabilities
        `[num_rows, vocab]` (bias, penalties and temperature not applied), returning
        log-probabilities. Called, when a row asks for logprobs, in the same step as `apply`
        and with the same batch."""
        return log_probs

    @abc.abstractmethod
    def apply(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Returns the transformed `[num_rows, vocab]` logits; may write `logits` in place only
        when the chain handed it a tensor it owns (it always does after the first edit)."""


class SelectionStrategy(abc.ABC):
    """Decides the next token(s) of a generation. One instance per generation.

    Batchable strategies (`batchable = True`: greedy, sampling) implement the classmethod
    `select`, called once per step with every row of every generation that uses them; the
    engine appends and emits the chosen token. The others implement `step`.
    """

    batchable: ClassVar[bool] = False
    needs_hidden: ClassVar[bool] = False
    needs_prompt_hidden: ClassVar[bool] = False
    log_softmax_first: ClassVar[bool] = False
    """The transforms see log-probabilities instead of raw logits (beam search sums them)."""
    checks_constraint: ClassVar[bool] = False
    """The strategy checks the request's constraint itself (AWRS): its rows are not masked."""
    streams_output: ClassVar[bool] = True
    """True: tokens are emitted as they are decided (the engine applies stop criteria).
    False: the strategy finishes by itself and returns candidates (e.g. beam search)."""
    logits_of_choice: ClassVar[bool] = False
    """The strategy needs the logits of one branch per step, which it names from the hidden
    states alone (`choose`): the engine runs the LM head on that branch's row only, after
    `choose`, and hands it to `step` (contrastive search scores its k candidates by their
    hidden states; only the winner's next-token distribution is used). Requires
    `needs_hidden`."""

    def __init__(self, params) -> None:
        self.params = params

    @staticmethod
    def max_branches(params) -> int:
        """Most branches a request with `params` keeps alive (KV budget check at admission)."""
        return 1

    @classmethod
    def check_loaded(cls, params) -> None:
        """Raises `NotFound` (field relative to the params, e.g. "scorer") when `params` name
        a resource this process has not loaded; called when the engine admits a request."""

    @classmethod
    def select(cls, logits: torch.Tensor, batch: SamplingBatch,
               rows: torch.Tensor | None) -> torch.Tensor:
        """Batchable strategies: `[n]` int64 token ids for the rows `rows` of `batch` (None: all
        rows), whose processed logits are `logits` `[n, vocab]`."""
        raise NotImplementedError(f"{cls.__name__} is not batchable")

    @classmethod
    def prepare_steps(cls, strategies: list[SelectionStrategy], views: list[StepView]) -> None:
        """Called once per step, before their `step`s, with every generation of this class
        that steps now (`views[i]` is `strategies[i]`'s): work that one tensor op can do for
        all of them (contrastive search's softmax and top-k over every winner's logits) goes
        here, each view's share in `view.prepared`. Must change nothing else: a generation may
        not step after all (a branch preempted meanwhile) and then prepares again."""

    def choose(self, view: StepView) -> int:
        """`logits_of_choice` strategies: the branch whose logits `step` gets, from a view
        without logits (`view.logits` is None); called once per step, before `step`."""
        raise NotImplementedError(f"{type(self).__name__} does not set logits_of_choice")

    def step(self, view: StepView) -> StepDecision:
        """Decides what happens after this step. Branch 0 is the prompt."""
        raise NotImplementedError(f"{type(self).__name__} is batchable: it has no step")
