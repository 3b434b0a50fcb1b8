"""Runs corpus windows through the engine's batched prefill and returns their activations.

Each window is one request of max_new_tokens=1 with all-position captures: the scheduler packs
many windows (and chunks of long ones) into every step, exactly as it batches serving traffic,
and each window's captures arrive whole with its final output. Both the datastore build and the
perplexity evaluation read their keys and hidden states this way, so they see the same numbers.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from decoding.base import Capture
from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from engine.engine import Engine
    from retrieval.corpus import TokenizedCorpus

KEY_CAPTURE = Capture("ffn_input", -1, all_positions=True)
"""The kNN-LM key: the last layer's FFN input after its norm, at every position."""
HIDDEN_CAPTURE = Capture("final_hidden", all_positions=True)
"""The LM-head input at every position (the model's logits come from it)."""
_PARAMS = SamplingParams(max_new_tokens=1, temperature=0.0)


def prefill_windows(engine: Engine, corpus: TokenizedCorpus, captures: Sequence[Capture],
                    window_ids: Sequence[int], max_in_flight: int | None = None
                    ) -> Iterator[list[tuple[int, dict[str, torch.Tensor]]]]:
    """Yields, after every engine step, the windows that finished in it: (window id, capture
    name -> [num_scored, hidden] float32 rows of its scored positions).

    At most `max_in_flight` windows (default: the scheduler's max_num_seqs) are queued at a
    time, in `window_ids` order. Closing the iterator early (an interrupt, or the consumer
    stopping) aborts the windows still running, so the engine is left empty.
    """
    limit = max_in_flight or engine.config.scheduler.max_num_seqs
    pending = list(reversed(window_ids))
    in_flight: set[str] = set()
    try:
        while pending or in_flight:
            while pending and len(in_flight) < limit:
                wid = pending.pop()
                in_flight.add(engine.add_request(corpus.prompt(corpus.windows[wid]), _PARAMS,
                                                 req_id=f"window-{wid}", captures=captures))
            finished = [out for out in engine.step() if out.finished]
            for out in finished:
                in_flight.discard(out.req_id)
            if finished:
                yield [_scored_rows(corpus, out, captures) for out in finished]
    finally:
        for req_id in in_flight:
            engine.abort(req_id)


def _scored_rows(corpus: TokenizedCorpus, out, captures: Sequence[Capture]):
    wid = int(out.req_id.removeprefix("window-"))
    w = corpus.windows[wid]
    if out.finish_reason == "abort" or not out.captures:
        raise RuntimeError(f"window {wid} ended without its captures ({out.finish_reason})")
    skip = w.score_from - w.start  # context-only positions of a later window
    return wid, {c.name: out.captures[c.name][skip:] for c in captures}


def progress_bar(enabled: bool, **kwargs):
    """A tqdm bar on stderr (tokens/s with `unit="tok"`); a no-op when not `enabled`."""
    from tqdm import tqdm

    return tqdm(disable=not enabled, file=sys.stderr, unit_scale=True, dynamic_ncols=True,
                **kwargs)
