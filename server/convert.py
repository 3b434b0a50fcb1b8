"""proto <-> engine conversion: the only module that sees both protobuf and msgspec types.

`to_submission` validates a GenerateRequest field by field (INVALID_ARGUMENT names the proto
field path; reserved strategies and fields raise Unimplemented) and produces a `Submission`
the engine client runs. The other functions build response messages from engine outputs.
"""

from __future__ import annotations

import math

import msgspec

from engine.errors import InvalidArgument
from decoding.params import BeamSearch, Contrastive
from engine.messages import RequestOutput, TokenLogprob
from engine.prompt import Parallel, StructuredPrompt
from engine.prompt import layout as prompt_layout
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer
from server.config import Limits
from server.errors import Unimplemented, proto_field
from server.pb import pb

_RESERVED_STRATEGIES = ("knn_lm", "rankgen", "awrs")
_CHAT_ROLES = ("system", "user", "assistant")
DEFAULT_MAX_NEW_TOKENS = 16


class Submission(msgspec.Struct, kw_only=True):
    """A validated request, in engine terms."""

    request_id: str | None
    prompt: list[int] | StructuredPrompt
    """Token ids, or a structured prompt (parallel sets) the engine lays out."""
    params: SamplingParams
    extra_key: tuple | None = None
    """Prefix-cache isolation key (from cache_salt)."""
    time_limit_s: float | None = None
    token_ids: bool = True
    text: bool = True
    logprobs: bool = False
    candidate_scores: bool = False
    candidate_scores: bool = False


class Context(msgspec.Struct, frozen=True, kw_only=True):
    """What conversion needs to know about the loaded model and the server's limits."""

    tokenizer: Tokenizer
    vocab_size: int
    max_model_len: int
    limits: Limits

    @property
    def max_prompt_tokens(self) -> int:
        return min(self.limits.max_prompt_tokens or self.max_model_len, self.max_model_len - 1)

    @property
    def max_new_tokens(self) -> int:
        return min(self.limits.max_new_tokens or self.max_model_len, self.max_model_len)


def _require(ok: bool, field: str, reason: str) -> None:
    if not ok:
        raise InvalidArgument(field, reason)


# ---- request -----------------------------------------------------------------------------------

def to_submission(msg: pb.GenerateRequest, ctx: Context, request_id: str | None = None
                  ) -> Submission:
    """Validates `msg`; raises InvalidArgument (proto field path) or Unimplemented."""
    _check_reserved(msg)
    limits = ctx.limits
    request_id = msg.request_id or request_id or None
    _require(request_id is None or len(request_id.encode()) <= limits.max_request_id_bytes,
             "request_id", f"must be at most {limits.max_request_id_bytes} bytes")
    stopping, response = msg.stopping, msg.response
    _require(len(stopping.stop_sequences) <= limits.max_stop_sequences,
             "stopping.stop_sequences", f"at most {limits.max_stop_sequences} allowed")
    _require(all(len(s.encode()) <= limits.max_stop_bytes for s in stopping.stop_sequences),
             "stopping.stop_sequences", f"each must be at most {limits.max_stop_bytes} bytes")
    _require(stopping.max_new_tokens <= ctx.max_new_tokens, "stopping.max_new_tokens",
             f"must be at most {ctx.max_new_tokens}")
    _require(response.top_logprobs <= limits.max_top_logprobs, "response.top_logprobs",
             f"must be at most {limits.max_top_logprobs}")
    prompt, num_tokens = _prompt(msg.prompt, ctx)
    _require(num_tokens <= ctx.max_prompt_tokens, "prompt",
             f"{num_tokens} tokens; at most {ctx.max_prompt_tokens} allowed")
    want_logprobs = response.logprobs or response.top_logprobs > 0
    strategy = _strategy(msg.decoding)
    try:
        params = _sampling_params(msg, want_logprobs, strategy)
    except InvalidArgument as exc:
        raise InvalidArgument(proto_field(exc.field), exc.reason) from None
    return Submission(
        request_id=request_id, prompt=prompt, params=params,
        candidate_scores=response.candidate_scores,
        extra_key=("cache_salt", msg.cache_salt) if msg.cache_salt else None,
        time_limit_s=stopping.time_limit_ms / 1000 if stopping.time_limit_ms else None,
        token_ids=response.token_ids if response.HasField("token_ids") else True,
        text=response.text if response.HasField("text") else True, logprobs=want_logprobs)


def _check_reserved(msg: pb.GenerateRequest) -> None:
    strategy = msg.decoding.WhichOneof("strategy")
    if strategy in _RESERVED_STRATEGIES:
        raise Unimplemented(f"decoding.{strategy}", "this strategy is not available yet")
    constraint = msg.constraint.WhichOneof("kind")
    if constraint is not None:
        raise Unimplemented(f"constraint.{constraint}", "constrained decoding is not "
                            "available yet")
    if msg.priority != 0:
        raise Unimplemented("priority", "priority scheduling is not available; send 0")
    if msg.response.prompt_logprobs:
        raise Unimplemented("response.prompt_logprobs", "prompt logprobs are not available")


def _prompt(prompt: pb.Prompt, ctx: Context) -> tuple[list[int] | StructuredPrompt, int]:
    """The engine's prompt (token ids, or a structured prompt) and its token count."""
    segments, messages = prompt.segments, prompt.messages
    _require(bool(segments) != bool(messages), "prompt",
             "exactly one of segments and messages must be non-empty")
    if messages:
        for i, m in enumerate(messages):
            _require(m.role in _CHAT_ROLES, f"prompt.messages[{i}].role",
                     f"must be one of {', '.join(_CHAT_ROLES)}")
        ids = ctx.tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages])
        return ids, len(ids)
    special = prompt.add_special_tokens if prompt.HasField("add_special_tokens") else True
    parts: list = []
    for i, segment in enumerate(segments):
        kind, field = segment.WhichOneof("kind"), f"prompt.segments[{i}]"
        if kind == "text":
            parts.append(segment.text)
        elif kind == "tokens":
            _check_token_ids(segment.tokens.ids, f"{field}.tokens", ctx.vocab_size)
            parts.append(list(segment.tokens.ids))
        elif kind == "parallel":
            parts.append(_parallel(segment.parallel, f"{field}.parallel", ctx))
        else:
            raise InvalidArgument(field, "must set one of text, tokens, parallel")
    structured = StructuredPrompt(segments=parts, add_special_tokens=special)
    ids = prompt_layout(structured, ctx.tokenizer.encode).token_ids
    _require(bool(ids), "prompt", "must contain at least one token")
    if not any(isinstance(part, Parallel) for part in parts):
        return ids, len(ids)
    return structured, len(ids)


def _check_token_ids(ids, field: str, vocab_size: int) -> None:
    _require(len(ids) > 0, field, "must not be empty")
    _require(max(ids) < vocab_size, field, f"token ids must be < vocab size {vocab_size}")


def _parallel(parallel: pb.ParallelSet, field: str, ctx: Context) -> Parallel:
    members, limit = parallel.members, ctx.limits.max_parallel_members
    _require(2 <= len(members) <= limit, f"{field}.members",
             f"a parallel set needs 2 to {limit} members")
    out: list = []
    for j, member in enumerate(members):
        kind = member.WhichOneof("value")
        _require(kind is not None and bool(member.text if kind == "text" else member.tokens.ids),
                 f"{field}.members[{j}]", "must be non-empty text or tokens")
        if kind == "tokens":
            _check_token_ids(member.tokens.ids, f"{field}.members[{j}].tokens", ctx.vocab_size)
        out.append(member.text if kind == "text" else list(member.tokens.ids))
    return Parallel(members=out)


def _strategy(decoding: pb.DecodingStrategy):
    """The strategy params Struct of `decoding` (None: greedy or sampling)."""
    kind = decoding.WhichOneof("strategy")
    try:
        if kind == "contrastive":
            c = decoding.contrastive
            return Contrastive(top_k=c.top_k or 4, penalty_alpha=c.penalty_alpha
                               if c.HasField("penalty_alpha") else 0.6)
        if kind == "beam":
            b = decoding.beam
            return BeamSearch(num_beams=b.num_beams or 4, length_penalty=b.length_penalty
                              if b.HasField("length_penalty") else 1.0,
                              early_stopping=b.early_stopping, num_return=b.num_return or 1)
    except InvalidArgument as exc:
        raise InvalidArgument(f"decoding.{kind}.{exc.field}", exc.reason) from None
    return None


def _sampling_params(msg: pb.GenerateRequest, want_logprobs: bool, strategy) -> SamplingParams:
    decoding, pen, stop = msg.decoding, msg.penalties, msg.stopping
    kwargs: dict = {"temperature": 0.0}
    if decoding.WhichOneof("strategy") == "sampling":
        s = decoding.sampling
        kwargs = {"temperature": s.temperature if s.HasField("temperature") else 1.0,
                  "top_k": s.top_k, "top_p": s.top_p if s.HasField("top_p") else 1.0,
                  "min_p": s.min_p, "seed": s.seed if s.HasField("seed") else None}
    for key, value in kwargs.items():  # NaN / inf travel in floats; name the field
        _require(not isinstance(value, float) or math.isfinite(value),
                 f"decoding.sampling.{key}", "must be a finite number")
    return SamplingParams(
        **kwargs, max_new_tokens=stop.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
        min_new_tokens=stop.min_new_tokens, repetition_penalty=pen.repetition or 1.0,
        frequency_penalty=pen.frequency, presence_penalty=pen.presence,
        logit_bias=dict(pen.logit_bias), stop=tuple(stop.stop_sequences),
        stop_token_ids=tuple(stop.stop_token_ids), ignore_eos=stop.ignore_eos,
        include_stop_str_in_output=stop.include_stop_sequence,
        logprobs=msg.response.top_logprobs if want_logprobs else None, strategy=strategy)


# ---- responses ---------------------------------------------------------------------------------

def delta(out: RequestOutput, sub: Submission, tokenizer: Tokenizer) -> pb.Delta | None:
    """The Delta event of one engine output; None when it carries nothing."""
    if not out.new_token_ids and not out.new_text:
        return None
    d = pb.Delta()
    if sub.token_ids:
        d.token_ids.extend(out.new_token_ids)
    if sub.text:
        d.text = out.new_text
    if sub.logprobs and out.logprobs:
        d.logprobs.extend(token_logprobs(lp, tokenizer) for lp in out.logprobs)
    return d


def candidate_events(out: RequestOutput, sub: Submission) -> list[pb.GenerateEvent]:
    """Deltas of candidates 1.. (candidate 0 is the ordinary stream) and, when asked, one
    Candidate event per returned sequence with its score."""
    events = []
    for i, cand in enumerate(out.candidates or ()):
        if i > 0:
            events.append(pb.GenerateEvent(delta=pb.Delta(
                candidate=i, token_ids=cand.token_ids if sub.token_ids else [],
                text=cand.text if sub.text else "")))
        if sub.candidate_scores:
            events.append(pb.GenerateEvent(candidate=pb.Candidate(
                candidate=i, score=cand.score, selected=i == 0)))
    return events


def candidate_results(out: RequestOutput | None) -> list[pb.CandidateResult]:
    if out is None or not out.candidates:
        return []
    return [pb.CandidateResult(token_ids=c.token_ids, text=c.text, score=c.score)
            for c in out.candidates]


def token_logprobs(lp: TokenLogprob, tokenizer: Tokenizer) -> pb.TokenLogprobs:
    top = [pb.TopLogprob(id=i, logprob=v, text=tokenizer.decode([i], skip_special_tokens=False))
           for i, v in lp.top]
    return pb.TokenLogprobs(id=lp.token_id, logprob=lp.logprob, top=top)


def finished(out: RequestOutput, sub: Submission, max_model_len: int, time_limited: bool,
             timings: pb.Timings) -> pb.Finished:
    """The Finished event of a request's final output."""
    f = pb.Finished(reason=_finish_reason(out, sub, max_model_len, time_limited),
                    timings=timings, usage=pb.Usage(
                        prompt_tokens=out.num_prompt_tokens,
                        completion_tokens=out.num_output_tokens,
                        cached_tokens=out.num_cached_tokens,
                        forward_tokens=out.num_forward_tokens))
    if out.finish_reason == "stop" and isinstance(out.stop_reason, str):
        f.stop_sequence = out.stop_reason
    elif out.finish_reason == "stop" and isinstance(out.stop_reason, int):
        f.stop_token_id = out.stop_reason
    return f


def _finish_reason(out: RequestOutput, sub: Submission, max_model_len: int,
                   time_limited: bool) -> int:
    if out.finish_reason == "stop":
        return pb.FINISH_EOS if out.stop_reason is None else pb.FINISH_STOP_SEQUENCE
    if out.finish_reason == "length":
        if (out.num_output_tokens < sub.params.max_new_tokens
                and out.num_prompt_tokens + out.num_output_tokens >= max_model_len):
            return pb.FINISH_CONTEXT_LIMIT
        return pb.FINISH_LENGTH
    return pb.FINISH_TIME_LIMIT if time_limited else pb.FINISH_CANCELLED


def model_info(engine, ctx: Context, strategies) -> pb.ModelInfo:
    cfg, limits = engine.config, ctx.limits
    return pb.ModelInfo(
        model=cfg.model.model, family=engine.runner.config.family,
        max_context=ctx.max_model_len, vocab_size=ctx.vocab_size,
        eos_token_ids=list(engine.tokenizer.eos_token_ids), strategies=list(strategies),
        constraints=[], dtype=cfg.model.dtype,
        kv_block_size=0 if engine.runner.uses_state_slots else cfg.cache.block_size,
        limits=pb.Limits(
            max_prompt_tokens=ctx.max_prompt_tokens, max_new_tokens=ctx.max_new_tokens,
            max_stop_sequences=limits.max_stop_sequences, max_stop_bytes=limits.max_stop_bytes,
            max_top_logprobs=limits.max_top_logprobs,
            max_parallel_members=limits.max_parallel_members,
            max_queued_requests=cfg.scheduler.max_waiting_requests,
            max_queued_prompt_tokens=cfg.scheduler.max_waiting_tokens))
