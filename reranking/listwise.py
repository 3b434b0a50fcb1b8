"""Single-token listwise reranking (FIRST, Reddy et al. 2024), optionally order-invariant.

A query and n passages labelled [A], [B], ... go into one prompt that ends where the model is
to write the best passage's label; one prefill gives the logits of that position, and the
log-probabilities of the label tokens rank every passage at once (no ranking is generated).

The prompt (our template): a user turn, in the model's chat template when it has one,

    Rank the {n} passages below by how well they answer the query.
    Query: {query}

    [A] {passage 0}
    [B] {passage 1}
    ...
    Answer with the label of the most relevant passage.

followed by the assistant's turn opened with "[". With `order_invariant` the labelled
passages are the members of one parallel set (set-based prompting): every member starts at the
same position and no member sees another; and the labels follow the passages' sorted order, not
their input order, so a passage keeps its label under any permutation and the scores cannot
depend on the order. Without it the passages are sequential segments, labelled in input order,
with the same tokenization.

Each label must be one token of the model's vocabulary after "[" (checked; 20 labels).
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import torch

from decoding.base import InvalidArgument

LABELS = "ABCDEFGHIJKLMNOPQRST"
MAX_PASSAGES = len(LABELS)
INTRO = "Rank the {n} passages below by how well they answer the query.\nQuery: {query}\n\n"
OUTRO = "Answer with the label of the most relevant passage."
_MARKER = "\x00passages\x00"


class Ranking(msgspec.Struct, frozen=True):
    ranking: list[int]
    """Passage indices, best first (ties: lower index first)."""
    scores: list[float]
    """One per passage, in input order: the log-probability of its label."""


def label_token_ids(tokenizer, count: int) -> list[int]:
    """The token id of each of the first `count` labels; InvalidArgument when a label is not
    one token."""
    ids = []
    for label in LABELS[:count]:
        tokens = tokenizer.encode(label, add_special_tokens=False)
        if len(tokens) != 1:
            raise InvalidArgument("passages", f"label {label!r} is {len(tokens)} tokens for "
                                              f"this model; listwise reranking needs one")
        ids.append(tokens[0])
    return ids


def _template_parts(tokenizer, query: str, n: int) -> tuple[str, str]:
    """The prompt's text before and after the passages (chat template applied if any)."""
    content = INTRO.format(n=n, query=query) + _MARKER + OUTRO
    hf = tokenizer.hf
    if getattr(hf, "chat_template", None):
        text = hf.apply_chat_template([{"role": "user", "content": content}],
                                      add_generation_prompt=True, tokenize=False)
    else:
        text = content + "\n"
    before, _, after = text.partition(_MARKER)
    return before, after + "["


def listwise_prompt(tokenizer, query: str, passages: Sequence[str], order_invariant: bool):
    """(the `engine.prompt.StructuredPrompt` of a rerank request, the label index of each
    passage in input order)."""
    from engine.prompt import Parallel, StructuredPrompt

    if not 1 <= len(passages) <= MAX_PASSAGES:
        raise InvalidArgument("passages", f"needs 1 to {MAX_PASSAGES} passages")
    if not all(isinstance(p, str) and p.strip() for p in passages):
        raise InvalidArgument("passages", "passages must be non-empty text")
    before, after = _template_parts(tokenizer, query, len(passages))
    order = sorted(range(len(passages)), key=lambda i: passages[i].strip()) \
        if order_invariant else list(range(len(passages)))
    label_of = [0] * len(passages)
    for label, i in enumerate(order):
        label_of[i] = label
    members = [f"[{LABELS[label_of[i]]}] {passages[i].strip()}\n" for i in order]
    middle = [Parallel(members=members)] if order_invariant else members
    return StructuredPrompt(segments=[before, *middle, after], add_special_tokens=False), label_of


def prepare(tokenizer, query: str, passages: Sequence[str], order_invariant: bool):
    """(prompt, the label token id of each passage in input order), validated."""
    if not query.strip():
        raise InvalidArgument("query", "must not be empty")
    prompt, label_of = listwise_prompt(tokenizer, query, passages, order_invariant)
    ids = label_token_ids(tokenizer, len(passages))
    return prompt, [ids[label] for label in label_of]


def score_hidden(engine, hidden: torch.Tensor, labels: Sequence[int]) -> Ranking:
    """The Ranking of the first generated position's LM-head input `hidden` [hidden_size]."""
    logits = engine.compute_logits(hidden[None])[0].float()
    scores = (logits[list(labels)] - torch.logsumexp(logits, dim=-1)).tolist()
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return Ranking(ranking=order, scores=scores)


def rerank(engine, requests: Sequence[tuple[str, Sequence[str], bool]]) -> list[Ranking]:
    """Ranks each (query, passages, order_invariant) with one prefill, all requests batched in
    the engine's steps: the first generated position's LM-head input is captured and scored at
    the label tokens."""
    from engine.sampling_params import SamplingParams

    params = SamplingParams(max_new_tokens=1, temperature=0.0)
    pending: dict[str, tuple[int, list[int]]] = {}
    for i, (query, passages, invariant) in enumerate(requests):
        prompt, labels = prepare(engine.tokenizer, query, passages, invariant)
        gen = engine.make_request(prompt, params, captures=["final_hidden"])
        engine.add_request(gen)
        pending[gen.req_id] = (i, labels)
    hidden: dict[int, torch.Tensor] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.captures and "final_hidden" in out.captures and out.req_id in pending:
                hidden[pending[out.req_id][0]] = out.captures["final_hidden"]
    return [score_hidden(engine, hidden[i], labels)
            for i, labels in sorted(pending.values(), key=lambda v: v[0])]
