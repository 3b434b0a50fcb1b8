"""Turns sampled tokens into per-request deltas: detokenization, stop criteria, logprobs."""

from __future__ import annotations

from engine.pipeline.detokenizer import IncrementalDetokenizer
from engine.messages import Candidate, CompletionOutput, RequestOutput, TokenLogprob
from engine.pipeline.generation import Generation
from engine.core.request import RequestStatus
from engine.tokenizer import Tokenizer


class _RequestState:
    __slots__ = ("detokenizer", "logprobs", "pending_text")

    def __init__(self, detokenizer: IncrementalDetokenizer) -> None:
        self.detokenizer = detokenizer
        self.logprobs: list[TokenLogprob] = []
        self.pending_text = ""


class OutputProcessor:
    """Per-request output state, from `add` until the request's final delta."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._states: dict[str, _RequestState] = {}

    def add(self, req: Generation) -> None:
        params = req.params
        detok = IncrementalDetokenizer(
            self.tokenizer.hf, req.prompt_token_ids, skip_special_tokens=params.skip_special_tokens,
            stop=params.stop, include_stop_str_in_output=params.include_stop_str_in_output)
        for token_id in req.output_token_ids:  # a fork starts with its parent's output
            detok.add_token(token_id)
        self._states[req.req_id] = _RequestState(detok)

    def check_stop(self, req: Generation, max_model_len: int) -> RequestStatus | None:
        """Decides whether the token just appended ends `req` (and detokenizes it)."""
        state = self._states[req.req_id]
        token_id = req.all_token_ids[-1]
        params = req.params
        state.pending_text += state.detokenizer.add_token(token_id)
        n_out = req.num_output_tokens
        if n_out >= params.min_new_tokens:
            if not params.ignore_eos and token_id in req.eos_token_ids:
                req.stop_reason = None
                return RequestStatus.FINISHED_STOPPED
            if token_id in params.stop_token_ids:
                req.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
        if state.detokenizer.stop_str is not None:
            req.stop_reason = state.detokenizer.stop_str
            return RequestStatus.FINISHED_STOPPED
        if n_out >= params.max_new_tokens or req.num_tokens >= max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def emit(self, req: Generation, new_token_ids: list[int], logprob: TokenLogprob | None,
             captures: dict | None) -> RequestOutput:
        state = self._states[req.req_id]
        if logprob is not None:
            state.logprobs.append(logprob)
        finished = req.is_finished
        text, state.pending_text = state.pending_text, ""
        if finished:
            text += state.detokenizer.flush()
        if finished:
            # All-position captures arrive once, whole, with the final output.
            captures = {**(captures or {}), **req.final_captures()} or captures
            req.output_text = state.detokenizer.output_text
            req.logprobs = state.logprobs if req.params.logprobs is not None else None
            del self._states[req.req_id]
        return RequestOutput(
            req_id=req.req_id, new_token_ids=new_token_ids, new_text=text,
            num_output_tokens=req.num_output_tokens, finished=finished,
            finish_reason=req.status.value if finished else None, stop_reason=req.stop_reason,
            logprobs=[logprob] if logprob is not None else None, captures=captures,
            num_prompt_tokens=req.num_prompt_tokens, num_cached_tokens=req.num_cached_tokens,
            num_forward_tokens=req.num_forward_tokens,
            queue_time=None if req.first_scheduled_time is None
            else req.first_scheduled_time - req.arrival_time,
            candidates=self._candidates(req) if finished else None,
            constraint=_report(req) if finished else None,
            rounds=self._rounds(req) if finished else None)

    def finish(self, req: Generation) -> RequestOutput:
        """The final delta of a request that ended outside a step (abort)."""
        return self.emit(req, [], None, None)

    def completion(self, index: int, req: Generation) -> CompletionOutput:
        """The whole output of a finished request (offline API)."""
        return CompletionOutput(
            index=index, req_id=req.req_id, prompt_token_ids=req.prompt_token_ids,
            token_ids=req.output_token_ids, text=req.output_text,
            finish_reason=req.status.value, logprobs=req.logprobs,
            num_cached_tokens=req.num_cached_tokens,
            num_forward_tokens=req.num_forward_tokens, candidates=self._candidates(req),
            constraint=_report(req))

    def _rounds(self, req: Generation) -> list[list[Candidate]] | None:
        if req.rounds is None:
            return None
        return [[Candidate(token_ids=list(t), text=self.tokenizer.decode(t), score=score)
                 for t, score in kept] for kept in req.rounds]

    def _candidates(self, req: Generation) -> list[Candidate] | None:
        if req.candidates is None:
            return None
        return [Candidate(token_ids=list(t), text=self.tokenizer.decode(t), score=score)
                for t, score in req.candidates]


def _report(req: Generation):
    return req.constraint_stats.report() if req.constraint_stats is not None else None
