"""Incremental detokenization and stop-string detection for streamed output.

Two problems make "decode each new token and append" wrong:
- a character can span several tokens (byte-level BPE splits emoji and CJK into byte tokens),
  and a token's text can depend on the one before it (SentencePiece leading spaces);
- a stop string can span token boundaries, so text that is about to be cut must not be
  streamed before the stop string is complete.

`IncrementalDetokenizer` solves the first with `tokenizers.decoders.DecodeStream` primed with
the end of the prompt, and the second with `StopChecker`, holding back the shortest tail that
could still turn into a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

PROMPT_CONTEXT_TOKENS = 8
"""Prompt tokens replayed into the decode stream: enough context for the first output token's
leading space, without decoding the whole prompt."""


class StopMatch(NamedTuple):
    stop_str: str
    """The stop string that matched."""
    text_end: int
    """Length the output text is cut to: the match's start, or its end when the stop string
    is kept in the output."""


class StopChecker:
    """Finds stop strings in a growing text and says how much of its tail to hold back.

    Pure string logic, independent of any tokenizer. Matches are searched only where new text
    could complete one, so each call costs O(len(new text) + longest stop string).
    """

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        assert all(stop), "stop strings must be non-empty (SamplingParams validates this)"
        self.stop = tuple(stop)
        self.include_stop_str_in_output = include_stop_str_in_output
        self._max_stop_len = max(map(len, self.stop), default=0)

    def find(self, text: str, num_new_chars: int) -> StopMatch | None:
        """The first stop string completed by the last `num_new_chars` characters of `text`.

        "First" means as if the characters had arrived one at a time: the match that ends
        earliest wins, then the longer one. The result therefore does not depend on how the
        text was split into tokens. Assumes earlier calls saw every shorter prefix of `text`
        and found nothing, so a match must overlap the new characters.
        """
        start = max(0, len(text) - num_new_chars - self._max_stop_len + 1)
        best: tuple[int, int, str] | None = None  # (end, -len, stop string)
        for stop_str in self.stop:
            pos = text.find(stop_str, start)
            if pos != -1:
                candidate = (pos + len(stop_str), -len(stop_str), stop_str)
                best = candidate if best is None else min(best, candidate)
        if best is None:
            return None
        end, _, stop_str = best
        return StopMatch(stop_str, end if self.include_stop_str_in_output else end - len(stop_str))

    def num_held_back(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string.

        Streaming everything but that suffix is safe: a later match can only start inside it.
        """
        longest = 0
        for stop_str in self.stop:
            for length in range(min(len(stop_str) - 1, len(text)), longest, -1):
                if text.endswith(stop_str[:length]):
                    longest = length
                    break
        return longest


def _backend_tokenizer(tokenizer) -> Tokenizer:
    """The Rust `tokenizers.Tokenizer` behind a transformers fast tokenizer (or itself)."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise TypeError(f"{type(tokenizer).__name__} has no Rust backend tokenizer; "
                        "incremental detokenization needs a fast (tokenizers) tokenizer")
    return backend


def _prompt_context(tokenizer: Tokenizer, prompt_token_ids: Sequence[int],
                    skip_special_tokens: bool) -> list[int]:
    """The last prompt tokens, minus any that end in the middle of a character.

    A context that ends mid-character never reaches a clean decode, and DecodeStream would then
    emit the context's own text along with the first output token. Dropping the partial bytes
    makes the output decode as if on its own: orphan continuation bytes become U+FFFD, as in
    `tokenizer.decode(output_token_ids)`.
    """
    context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
    while context and tokenizer.decode(context, skip_special_tokens).endswith("\ufffd"):
        context.pop()
    return context


class IncrementalDetokenizer:
    """Turns one request's output tokens into streamed text deltas.

    Call `add_token` once per generated token, in order, and stream what it returns. When the
    request finishes for any reason other than a stop string (EOS, length, abort), call `flush`
    to release text held back as a possible stop-string prefix. With no stop strings nothing is
    ever held back, and the deltas concatenate to `tokenizer.decode(output_token_ids,
    skip_special_tokens=...)` whenever that decode does not depend on the prompt.

    Args:
        tokenizer: a transformers fast tokenizer or a `tokenizers.Tokenizer`.
        prompt_token_ids: the prompt; its last tokens prime the decoder.
        skip_special_tokens: leave special tokens out of the text.
        stop: stop strings; after one appears, the text is cut there and `stop_str` is set.
        include_stop_str_in_output: keep the matched stop string at the end of the text.
    """

    def __init__(self, tokenizer, prompt_token_ids: Sequence[int],
                 skip_special_tokens: bool = True, stop: Sequence[str] = (),
                 include_stop_str_in_output: bool = False) -> None:
        self._tokenizer = _backend_tokenizer(tokenizer)
        context = _prompt_context(self._tokenizer, prompt_token_ids, skip_special_tokens)
        # DecodeStream only emits the text that new ids add to the decoded context, so the
        # prompt tail is never emitted itself but decides the output's leading space.
        self._stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
        self._stop_checker = StopChecker(stop, include_stop_str_in_output) if stop else None
        self._text = ""
        self._num_sent_chars = 0
        self.stop_str: str | None = None
        """The stop string that ended the output, once one has matched."""

    @property
    def output_text(self) -> str:
        """All output text so far, cut at a matched stop string, held-back tail included."""
        return self._text

    @property
    def is_stopped(self) -> bool:
        return self.stop_str is not None

    def add_token(self, token_id: int) -> str:
        """Decode one more token; returns the text that may be streamed now (maybe "").

        Must not be called once `is_stopped`: the engine finishes the request instead.
        """
        assert self.stop_str is None, "add_token after a stop string matched"
        new_text = self._stream.step(self._tokenizer, token_id) or ""
        self._text += new_text
        if self._stop_checker is None:
            return self._release(len(self._text))
        match = self._stop_checker.find(self._text, len(new_text)) if new_text else None
        if match is not None:
            self.stop_str = match.stop_str
            self._text = self._text[:match.text_end]
            return self._release(len(self._text))
        return self._release(len(self._text) - self._stop_checker.num_held_back(self._text))

    def flush(self) -> str:
        """Release whatever is still held back; call when the request finishes."""
        return self._release(len(self._text))

    def _release(self, end: int) -> str:
        # A stop string can only start inside the tail held back last time, so the released
        # prefix never shrinks; text once streamed is never cut.
        assert end >= self._num_sent_chars
        delta = self._text[self._num_sent_chars:end]
        self._num_sent_chars = end
        return delta
