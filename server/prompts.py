"""The one representation of a prompt shared by the server, the command line and its client.

`Prompt` mirrors the proto `Prompt` message and the command line's JSON prompt objects:

    {"segments": [{"text": ...} | {"tokens": [...]} | {"parallel": [text or ids, ...]}],
     "add_special_tokens": false}              # optional; default true
    {"messages": [{"role": "user", "content": ...}, ...]}

either with an optional `"allow_special_tokens": true`. Without it, text that spells a special
token (e.g. "<|im_end|>") in a text segment, a set member or a chat message is tokenized as plain
text, so a client cannot forge conversation turns; control tokens then come only from token-id
parts and from the chat template's own markup.

plus the short forms `from_json` accepts: a plain string (one text segment, or one user turn
with `chat`) and a list of token ids. The proto halves live with the modules that see protobuf
(`server.convert`: proto -> Prompt, `server.client`: Prompt -> proto); `to_engine` turns a
Prompt into what the engine takes (token ids only: the engine never tokenizes its text again),
validating it with errors that name the proto field path.
"""

from __future__ import annotations

from typing import Any, Union

import msgspec

from engine.errors import InvalidArgument
from engine.prompt import Parallel, StructuredPrompt
from engine.prompt import layout as prompt_layout
from engine.tokenizer import Tokenizer

CHAT_ROLES = ("system", "user", "assistant")

Part = Union[str, list[int]]
"""A text or token-id piece (a parallel set member); "" stands for an unset member."""


class Segment(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True):
    """Exactly one field set (none set is an error `to_engine` reports)."""

    text: str | None = None
    tokens: list[int] | None = None
    parallel: list[Part] | None = None


class ChatMessage(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    role: str
    content: str


class Prompt(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True,
             forbid_unknown_fields=True):
    """Exactly one of `segments` and `messages` non-empty (checked by `to_engine`)."""

    segments: list[Segment] = []
    add_special_tokens: bool | None = None
    """None: the default, true (the first segment, when it is text, gets special tokens)."""
    messages: list[ChatMessage] = []
    allow_special_tokens: bool | None = None
    """None: the default, false (special token text is tokenized as plain text)."""


def from_json(value: Any, chat: bool = False) -> Prompt:
    """The Prompt of a decoded JSON value: a string (a user turn when `chat`), a list of token
    ids, or a prompt object (see the module docstring).

    Raises:
        InvalidArgument: the value has none of these shapes (field "prompt...").
    """
    if isinstance(value, str):
        if chat:
            return Prompt(messages=[ChatMessage(role="user", content=value)])
        return Prompt(segments=[Segment(text=value)])
    if isinstance(value, list):
        value = {"segments": [{"tokens": value}]}
    try:
        return msgspec.convert(value, Prompt)
    except msgspec.ValidationError as exc:
        reason, _, at = str(exc).partition(" - at `$")
        raise InvalidArgument("prompt" + at.rstrip("`"), reason.replace("`", "")) from None


def to_engine(prompt: Prompt, tokenizer: Tokenizer, vocab_size: int,
              max_parallel_members: int | None = None
              ) -> tuple[list[int] | StructuredPrompt, int]:
    """The engine's prompt (token ids, or a structured prompt when it has parallel sets) and
    its number of tokens.

    Raises:
        InvalidArgument: empty or ill-formed parts, unknown chat roles, token ids >= vocab_size,
            parallel sets outside [2, max_parallel_members] (no limit when None).
    """
    segments, messages = prompt.segments, prompt.messages
    allow = bool(prompt.allow_special_tokens)
    _require(bool(segments) != bool(messages), "prompt",
             "exactly one of segments and messages must be non-empty")
    if messages:
        for i, m in enumerate(messages):
            _require(m.role in CHAT_ROLES, f"prompt.messages[{i}].role",
                     f"must be one of {', '.join(CHAT_ROLES)}")
        ids = tokenizer.apply_chat_template([{"role": m.role, "content": m.content}
                                             for m in messages], split_special_tokens=not allow)
        return ids, len(ids)

    def encode(text: str, add_special_tokens: bool) -> list[int]:
        return tokenizer.encode(text, add_special_tokens, split_special_tokens=not allow)

    special = True if prompt.add_special_tokens is None else prompt.add_special_tokens
    # Text is tokenized here, as `prompt_layout` would (the first segment with special tokens,
    # everything else without), so that the engine, which would tokenize it with the default
    # (special tokens matched), only ever sees token ids.
    parts = [_tokenized(_part(segment, f"prompt.segments[{i}]", vocab_size,
                              max_parallel_members), encode, i == 0 and special)
             for i, segment in enumerate(segments)]
    structured = StructuredPrompt(segments=parts, add_special_tokens=special)
    ids = prompt_layout(structured, encode).token_ids
    _require(bool(ids), "prompt", "must contain at least one token")
    if not any(isinstance(part, Parallel) for part in parts):
        return ids, len(ids)
    return structured, len(ids)


def _require(ok: bool, field: str, reason: str) -> None:
    if not ok:
        raise InvalidArgument(field, reason)


def _part(segment: Segment, field: str, vocab_size: int, max_members: int | None):
    if segment.text is not None:
        return segment.text
    if segment.tokens is not None:
        _check_token_ids(segment.tokens, f"{field}.tokens", vocab_size)
        return list(segment.tokens)
    if segment.parallel is not None:
        return _parallel(segment.parallel, f"{field}.parallel", vocab_size, max_members)
    raise InvalidArgument(field, "must set one of text, tokens, parallel")


def _tokenized(part, encode, add_special_tokens: bool):
    """`part` with its text (the part's or its members') replaced by token ids."""
    if isinstance(part, str):
        return encode(part, add_special_tokens)
    if isinstance(part, Parallel):
        return Parallel(members=[_tokenized(m, encode, False) for m in part.members])
    return part


def _check_token_ids(ids: list[int], field: str, vocab_size: int) -> None:
    _require(len(ids) > 0, field, "must not be empty")
    _require(max(ids) < vocab_size, field, f"token ids must be < vocab size {vocab_size}")


def _parallel(members: list[Part], field: str, vocab_size: int,
              limit: int | None) -> Parallel:
    if limit is not None:
        _require(2 <= len(members) <= limit, f"{field}.members",
                 f"a parallel set needs 2 to {limit} members")
    for j, member in enumerate(members):
        _require(bool(member), f"{field}.members[{j}]", "must be non-empty text or tokens")
        if not isinstance(member, str):
            _check_token_ids(member, f"{field}.members[{j}].tokens", vocab_size)
    return Parallel(members=[m if isinstance(m, str) else list(m) for m in members])
