"""proto <-> engine conversion: the only module that sees both protobuf and msgspec types.

`to_submission` validates a GenerateRequest field by field (INVALID_ARGUMENT names the proto
field path; unregistered strategies and reserved fields raise Unimplemented) and produces a
`Submission` the engine client runs. Strategies and transforms are read from `decoding.registry`:
a built-in DecodingStrategy oneof field or `plugin` (any registered strategy by name) becomes
the strategy's params Struct through `registry.parse_params`; `knn_lm` becomes the kNN-LM
transform's params. The other functions build response messages from engine outputs.
"""

from __future__ import annotations

import math

import msgspec
from google.protobuf import json_format

from constraints.predicates import predicate_names
from decoding import registry
from decoding.constraint import BACKENDS as CONSTRAINT_BACKENDS
from decoding.constraint import KINDS as CONSTRAINT_KINDS
from decoding.scorers import scorer_names
from engine.errors import InvalidArgument
from engine.messages import RequestOutput, TokenLogprob
from engine.prompt import StructuredPrompt
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer
from retrieval import stores
from server import prompts
from server.config import Limits
from server.errors import Unimplemented, proto_field
from server.model_card import ModelCard
from server.pb import pb

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
    captures: tuple[str, ...] = ()
    """Activations the engine returns with the request's outputs (Rerank's LM-head input)."""


class Context(msgspec.Struct, frozen=True, kw_only=True):
    """What conversion needs to know about the loaded model and the server's limits."""

    tokenizer: Tokenizer
    vocab_size: int
    max_model_len: int
    limits: Limits
    max_token_bytes: int = 1
    """UTF-8 bytes of the longest vocabulary entry (`longest_token_bytes`)."""

    @property
    def max_prompt_tokens(self) -> int:
        return min(self.limits.max_prompt_tokens or self.max_model_len, self.max_model_len - 1)

    @property
    def max_prompt_bytes(self) -> int:
        """No text of more bytes can tokenize to at most `max_prompt_tokens` tokens."""
        return self.limits.max_prompt_bytes or self.max_prompt_tokens * self.max_token_bytes

    @property
    def max_new_tokens(self) -> int:
        return min(self.limits.max_new_tokens or self.max_model_len, self.max_model_len)


def _require(ok: bool, field: str, reason: str) -> None:
    if not ok:
        raise InvalidArgument(field, reason)


def longest_token_bytes(tokenizer: Tokenizer) -> int:
    """UTF-8 bytes of the longest decoded vocabulary entry (special tokens included; a partial
    UTF-8 byte decodes to U+FFFD, 3 bytes, which only loosens the bound). At least 4: one
    character of a tokenizer without byte fallback may become one unknown token."""
    texts = tokenizer.hf.batch_decode([[i] for i in range(tokenizer.vocab_size)])
    return max(4, max(len(text.encode()) for text in texts))


# ---- size checks that run before anything is tokenized (cheap: on the event loop) --------------

def _string_bytes(field_size: int) -> int:
    """The payload n of a string field (one-byte tag) that serializes to `field_size` bytes:
    field_size = 1 + len(varint(n)) + n. Lets a size be read without copying the string."""
    n = max(field_size - 2, 0)
    while n > 0 and n + 1 + max(1, (n.bit_length() + 6) // 7) > field_size:
        n -= 1
    return n


def _text_bytes(prompt: pb.Prompt) -> int:
    """UTF-8 bytes of all the text of `prompt`, from serialized sizes: a hostile prompt is
    measured without being copied."""
    total = 0
    for segment in prompt.segments:
        kind = segment.WhichOneof("kind")
        if kind == "text":
            total += _string_bytes(segment.ByteSize())
        elif kind == "parallel":
            total += sum(_string_bytes(m.ByteSize()) for m in segment.parallel.members
                         if m.WhichOneof("value") == "text")
    for message in prompt.messages:
        role = len(message.role.encode()) if message.role else 0
        role_field = 1 + max(1, (role.bit_length() + 6) // 7) + role if role else 0
        total += role + _string_bytes(message.ByteSize() - role_field)
    return total


def check_prompt_bytes(prompt: pb.Prompt, ctx: Context) -> None:
    """Raises InvalidArgument ("prompt") when the prompt's text is over `max_prompt_bytes`."""
    check_size(_text_bytes(prompt), "prompt", ctx)


def check_text_bytes(text: str, field: str, ctx: Context) -> None:
    check_size(len(text.encode()), field, ctx)


def check_size(num_bytes: int, field: str, ctx: Context) -> None:
    _require(num_bytes <= ctx.max_prompt_bytes, field,
             f"{num_bytes} bytes of text; at most {ctx.max_prompt_bytes} allowed")


def tokenize(msg: pb.TokenizeRequest, tokenizer: Tokenizer) -> pb.TokenizeResponse:
    """The Tokenize RPC's answer: the text tokenized as a prompt's first text segment."""
    special = msg.add_special_tokens if msg.HasField("add_special_tokens") else True
    ids = tokenizer.encode(msg.text, add_special_tokens=special,
                           split_special_tokens=not msg.allow_special_tokens)
    return pb.TokenizeResponse(token_ids=ids, tokens=tokenizer.hf.convert_ids_to_tokens(ids))


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
    _require(len(stopping.stop_token_ids) <= limits.max_stop_token_ids,
             "stopping.stop_token_ids", f"at most {limits.max_stop_token_ids} allowed")
    _require(len(msg.penalties.logit_bias) <= limits.max_logit_bias, "penalties.logit_bias",
             f"at most {limits.max_logit_bias} entries allowed")
    _require(len(msg.transforms) <= limits.max_transforms, "transforms",
             f"at most {limits.max_transforms} allowed")
    prompt, num_tokens = prompts.to_engine(prompt_form(msg.prompt), ctx.tokenizer,
                                           ctx.vocab_size, limits.max_parallel_members)
    _require(num_tokens <= ctx.max_prompt_tokens, "prompt",
             f"{num_tokens} tokens; at most {ctx.max_prompt_tokens} allowed")
    want_logprobs = response.logprobs or response.top_logprobs > 0
    strategy = _strategy(msg.decoding)
    transforms = _transforms(msg.transforms) + _knn_lm(msg) + _constraint(msg)
    try:
        params = _sampling_params(msg, want_logprobs, strategy, transforms)
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
    if strategy not in (None, "plugin") and strategy not in registry.strategy_names():
        raise Unimplemented(f"decoding.{strategy}", "this strategy is not available yet")
    if msg.priority != 0:
        raise Unimplemented("priority", "priority scheduling is not available; send 0")
    if msg.response.prompt_logprobs:
        raise Unimplemented("response.prompt_logprobs", "prompt logprobs are not available")


def rerank_submission(msg: pb.RerankRequest, ctx: Context) -> tuple[Submission, list[int]]:
    """The one-token request of a Rerank call and the label token id of each passage."""
    from reranking.listwise import prepare

    _require(len(msg.query.encode()) + sum(len(p.encode()) for p in msg.passages)
             <= ctx.max_prompt_bytes, "passages", f"query and passages exceed "
             f"{ctx.max_prompt_bytes} bytes")
    prompt, labels = prepare(ctx.tokenizer, msg.query, list(msg.passages), msg.order_invariant)
    params = SamplingParams(max_new_tokens=1, temperature=0.0)
    return Submission(request_id=msg.request_id or None, prompt=prompt, params=params,
                      token_ids=False, text=False, captures=("final_hidden",)), labels


def prompt_form(prompt: pb.Prompt) -> prompts.Prompt:
    """The shared Prompt form of a proto Prompt (validated later, by `prompts.to_engine`)."""
    return prompts.Prompt(
        segments=[_segment_form(s) for s in prompt.segments],
        add_special_tokens=prompt.add_special_tokens
        if prompt.HasField("add_special_tokens") else None,
        messages=[prompts.ChatMessage(role=m.role, content=m.content) for m in prompt.messages],
        allow_special_tokens=prompt.allow_special_tokens
        if prompt.HasField("allow_special_tokens") else None)


def _segment_form(segment: pb.Segment) -> prompts.Segment:
    kind = segment.WhichOneof("kind")
    if kind == "text":
        return prompts.Segment(text=segment.text)
    if kind == "tokens":
        return prompts.Segment(tokens=list(segment.tokens.ids))
    if kind == "parallel":
        return prompts.Segment(parallel=[
            list(m.tokens.ids) if m.WhichOneof("value") == "tokens" else m.text
            for m in segment.parallel.members])
    return prompts.Segment()


def _fields(msg) -> dict:
    """The set fields of a proto message as plain values: unset and zero scalars are left out,
    so the params Struct's defaults apply; floats exactly as the message holds them."""
    out = {}
    for field, value in msg.ListFields():
        if field.is_repeated:
            value = list(value)
        elif field.message_type is not None:
            value = _fields(value)
        out[field.name] = value
    return out


def _strategy(decoding: pb.DecodingStrategy):
    """The registered strategy's params Struct of `decoding` (unset: greedy)."""
    kind = decoding.WhichOneof("strategy")
    if kind is None:
        return registry.parse_params("greedy", {}, "strategy", "decoding.greedy")
    if kind == "plugin":
        plugin = decoding.plugin
        _require(plugin.name in registry.strategy_names(), "decoding.plugin.name",
                 f"unknown strategy {plugin.name!r}; registered: "
                 f"{', '.join(registry.strategy_names())}")
        name, path = plugin.name, "decoding.plugin.params"
        fields = json_format.MessageToDict(plugin.params)
    else:
        name, path, fields = kind, f"decoding.{kind}", _fields(getattr(decoding, kind))
    if name == "sampling":  # the proto's rule; SamplingParams reads 0 as greedy
        _require(fields.get("temperature", 1.0) > 0, f"{path}.temperature",
                 "must be > 0 (use decoding.greedy for argmax)")
    params = registry.parse_params(name, fields, "strategy", path)
    if name == "sampling":  # NaN / inf travel in floats; name the field
        for key, value in msgspec.structs.asdict(params).items():
            _require(not isinstance(value, float) or math.isfinite(value), f"{path}.{key}",
                     "must be a finite number")
    return params


def _transforms(transforms) -> tuple:
    """The params Structs of a request's plug-in transforms."""
    names, out = registry.transform_names(plugins_only=True), []
    for i, t in enumerate(transforms):
        _require(t.name in names, f"transforms[{i}].name", f"unknown transform {t.name!r}; "
                 f"registered: {', '.join(names) or 'none'}")
        out.append(registry.parse_params(t.name, json_format.MessageToDict(t.params),
                                         "transform", f"transforms[{i}].params"))
    return tuple(out)


def _knn_lm(msg: pb.GenerateRequest) -> tuple:
    """The kNN-LM transform's params of `knn_lm` (proto `lambda` is the Struct's `lmbda`);
    whether the datastore is loaded is the engine's check at admission (NOT_FOUND)."""
    if not msg.HasField("knn_lm"):
        return ()
    _require(all(t.name != "knn_lm" for t in msg.transforms), "knn_lm",
             "given twice: here and in transforms")
    fields = {"datastore": msg.knn_lm.datastore, **_fields(msg.knn_lm)}  # "" names no store
    if "lambda" in fields:
        fields["lmbda"] = fields.pop("lambda")
    try:
        return (registry.parse_params("knn_lm", fields, "transform", "knn_lm"),)
    except InvalidArgument as exc:
        raise InvalidArgument(exc.field.replace("knn_lm.lmbda", "knn_lm.lambda"),
                              exc.reason) from None


def _constraint(msg: pb.GenerateRequest) -> tuple:
    """The constraint transform's params of `constraint` (compiled later, at admission)."""
    if not msg.HasField("constraint"):
        return ()
    _require(all(t.name != "constraint" for t in msg.transforms), "constraint",
             "given twice: here and in transforms")
    kind = msg.constraint.WhichOneof("kind")
    _require(kind is not None, "constraint", "set one of regex, json_schema, grammar, choice")
    value = getattr(msg.constraint, kind)
    fields = {kind: list(value.options) if kind == "choice" else value}
    if msg.constraint.backend:
        fields["backend"] = msg.constraint.backend
    return (registry.parse_params("constraint", fields, "transform", "constraint"),)


def _sampling_params(msg: pb.GenerateRequest, want_logprobs: bool, strategy,
                     transforms: tuple) -> SamplingParams:
    pen, stop = msg.penalties, msg.stopping
    return SamplingParams(
        max_new_tokens=stop.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
        min_new_tokens=stop.min_new_tokens, repetition_penalty=pen.repetition or 1.0,
        frequency_penalty=pen.frequency, presence_penalty=pen.presence,
        logit_bias=dict(pen.logit_bias), stop=tuple(stop.stop_sequences),
        stop_token_ids=tuple(stop.stop_token_ids), ignore_eos=stop.ignore_eos,
        include_stop_str_in_output=stop.include_stop_sequence,
        logprobs=msg.response.top_logprobs if want_logprobs else None, strategy=strategy,
        transforms=transforms)


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
    if sub.candidate_scores:
        for number, kept in enumerate(out.rounds or (), 1):
            events += [pb.GenerateEvent(candidate=pb.Candidate(
                candidate=i, score=c.score, round=number, text=c.text if sub.text else ""))
                for i, c in enumerate(kept)]
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
    if out.constraint is not None:
        f.constraint.CopyFrom(pb.ConstraintStats(
            masks=out.constraint.masks, masked_tokens=out.constraint.masked_tokens,
            checks=out.constraint.checks, rejected_tokens=out.constraint.rejected_tokens))
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


def model_info(card: ModelCard, ctx: Context) -> pb.ModelInfo:
    """What the server runs: registered strategies, plug-in transforms and the kNN-LM
    datastores it opened included."""
    limits = ctx.limits
    return pb.ModelInfo(
        model=card.model, family=card.family,
        max_context=ctx.max_model_len, vocab_size=ctx.vocab_size,
        eos_token_ids=card.eos_token_ids,
        strategies=registry.strategy_names(),
        transforms=registry.transform_names(plugins_only=True),
        constraints=list(CONSTRAINT_KINDS),
        constraint_backends=[card.default_constraint_backend] + [
            b for b in CONSTRAINT_BACKENDS if b != card.default_constraint_backend],
        predicates=predicate_names(), scorers=scorer_names(),
        datastores=[pb.DatastoreInfo(name=name, keys=len(store), dim=store.meta.dim,
                                     index=store.kind)
                    for name, store in stores.open_datastores().items()],
        dtype=card.dtype, kv_block_size=card.block_size,
        limits=pb.Limits(
            max_prompt_tokens=ctx.max_prompt_tokens, max_new_tokens=ctx.max_new_tokens,
            max_stop_sequences=limits.max_stop_sequences, max_stop_bytes=limits.max_stop_bytes,
            max_top_logprobs=limits.max_top_logprobs,
            max_parallel_members=limits.max_parallel_members,
            max_queued_requests=card.max_queued_requests,
            max_queued_prompt_tokens=card.max_queued_prompt_tokens,
            max_prompt_bytes=ctx.max_prompt_bytes, max_logit_bias=limits.max_logit_bias,
            max_stop_token_ids=limits.max_stop_token_ids,
            max_transforms=limits.max_transforms))
