"""Grammar masking with the default model, against independent checkers.

For each of the 20 constraints of `cases` and 50 prompts, under greedy, sampling, contrastive and
beam search: every output ends with EOS and matches (`re.fullmatch`, `jsonschema.validate`, the
`lark` parser, membership). Then the two backends are replayed along every output of those runs
(regexes, schemas and choices: outlines-core takes no Lark) and their allowed-token sets are
compared at every step. They are equal except for two documented differences, each checked to
be exactly what it claims:

- where the grammar forces bytes, llguidance's mask keeps only the canonical tokenization of
  them: a token outlines allows and llguidance does not must be one llguidance's byte-level
  check accepts, at a step where llguidance reports forced bytes;
- outlines-core 0.2.14 drops, from an accepting state, every token that leads to a non-accepting
  one (after "5" in `-?(0|[1-9][0-9]{0,5})(\\.[0-9]{1,3})?` it allows "5", ".3" and EOS but not
  "."): a token llguidance allows and outlines does not must occur where outlines accepts, and
  lead llguidance to a non-accepting state. Where the run took such a token, outlines-core
  cannot follow it and the replay of that output stops.
"""

from __future__ import annotations

import numpy as np
import pytest

from constraints.backends import mask_words
from decoding.params import BeamSearch, Contrastive
from engine.sampling_params import SamplingParams
from tests.constraints.cases import PROMPTS, check_difference, constraints, matches
from tests.factories import make_engine_config

MAX_NEW_TOKENS = 48
STRATEGIES = {
    "greedy": dict(temperature=0.0),
    "sampling": dict(temperature=1.0, seed=7),
    "contrastive": dict(strategy=Contrastive(top_k=4, penalty_alpha=0.6)),
    "beam": dict(strategy=BeamSearch(num_beams=3)),
}
_RUNS: dict[str, dict[str, list[list[int]]]] = {}
"""strategy -> constraint id -> output token ids of its 50 prompts (for the replay)."""


@pytest.fixture(scope="module")
def engine(model_dir):
    from engine.engine import Engine

    return Engine(make_engine_config(model_dir, num_blocks=2048, max_num_seqs=256))


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_every_output_matches(engine, strategy):
    runs = _RUNS.setdefault(strategy, {})
    for cid, constraint in constraints():
        params = SamplingParams(max_new_tokens=MAX_NEW_TOKENS, transforms=(constraint,),
                                **STRATEGIES[strategy])
        outs = engine.generate(PROMPTS, params)
        bad = [(o.text, o.finish_reason) for o in outs
               if o.finish_reason != "stop" or not matches(constraint, o.text)]
        assert not bad, f"{strategy} {cid}: {len(bad)}/{len(outs)} outputs fail, e.g. {bad[:3]}"
        assert all(o.constraint.masks >= len(o.token_ids) for o in outs)
        runs[cid] = [o.token_ids for o in outs]


def _allowed(matcher, size: int) -> np.ndarray:
    row = np.zeros(mask_words(size), dtype=np.int32)
    matcher.fill_mask(row)
    return np.unpackbits(row.view(np.uint8), bitorder="little")[:size].astype(bool)


def test_backends_agree_along_every_run(engine):
    assert _RUNS, "runs after test_every_output_matches"
    compiler = engine.constraints
    llg, oc = compiler.backend("llguidance"), compiler.backend("outlines")
    size = len(compiler.vocab)
    outputs = steps = equal = canonical = after_accept = cut_short = 0
    for strategy, runs in _RUNS.items():
        for cid, constraint in constraints():
            if constraint.kind == "grammar" or cid not in runs:
                continue
            grammar = constraint.to_grammar()
            a_compiled, b_compiled = llg.compile(grammar), oc.compile(grammar)
            for tokens in runs[cid]:
                outputs += 1
                a, b = llg.matcher(a_compiled), oc.matcher(b_compiled)
                for token in tokens:
                    got_a, got_b = _allowed(a, size), _allowed(b, size)
                    where = f"{strategy} {cid} after {tokens[:tokens.index(token)]}"
                    only_b, only_a = check_difference(a, b, got_a, got_b, where)
                    canonical += only_b
                    after_accept += only_a
                    equal += not only_a and not only_b
                    steps += 1
                    assert got_a[token], f"{where}: the run's token {token} not allowed"
                    if not got_b[token]:  # outlines-core cannot follow this run any further
                        assert only_a
                        cut_short += 1
                        break
                    assert a.consume(token) and b.consume(token)
    print(f"\n{steps} steps: {equal} equal, {canonical} llguidance canonical-only, "
          f"{after_accept} outlines-core after an accepting prefix ({cut_short} runs it "
          f"could not follow)")
    assert outputs == 18 * len(PROMPTS) * len(_RUNS) and steps > 2 * outputs


def test_constrained_and_unconstrained_rows_equal_their_solo_runs(engine):
    (_, constraint), plain = constraints()[10], SamplingParams(max_new_tokens=24,
                                                               temperature=0.0)
    constrained = SamplingParams(max_new_tokens=24, temperature=0.0, transforms=(constraint,))
    solo = [engine.generate([PROMPTS[0]], constrained)[0].token_ids,
            engine.generate([PROMPTS[1]], plain)[0].token_ids]
    sampled = SamplingParams(max_new_tokens=24, temperature=1.0, seed=3, transforms=(constraint,))
    solo.append(engine.generate([PROMPTS[2]], sampled)[0].token_ids)
    together = engine.generate(PROMPTS[:3], [constrained, plain, sampled])
    assert [o.token_ids for o in together] == solo
    assert together[1].constraint is None and together[0].constraint.masks > 0
