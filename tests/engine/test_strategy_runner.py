"""The strategy runner driven through a fake port, with no model: a bigram table stands in for
the forward pass, and every strategy's result is checked against a brute-force computation
over that table."""

from __future__ import annotations

import itertools

import pytest
import torch

from decoding.base import SamplingBatch, Transform
from decoding.params import BeamSearch
from engine.pipeline.generation import Generation
from engine.core.request import Request, RequestStatus
from engine.pipeline.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.pipeline.strategy_runner import StrategyRunner

VOCAB = 5
PROMPT = [1, 2]


def make_table(seed: int = 0) -> torch.Tensor:
    """[VOCAB, VOCAB] logits of the next token given the last one."""
    return torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(seed)) * 2


class FakePort:
    """Records every effect; sequences are "computed" by `forward`."""

    def decode(self, token_ids) -> str:
        return " ".join(map(str, token_ids))

    def __init__(self) -> None:
        self.live: dict[str, Request] = {}
        self.events: list[tuple] = []
        self.outputs: list[tuple[str, list[int], bool]] = []

    def add(self, gen, seq):
        self.events.append(("add", gen.req_id))
        if seq is not None:
            seq.status = RequestStatus.RUNNING
            self.live[seq.req_id] = seq

    def fork(self, parent, child_id, branch, seed, keep, generation=None):
        child = parent.fork(child_id, branch, seed, generation)
        child.status = RequestStatus.RUNNING
        self.live[child_id] = child
        self.events.append(("fork", parent.req_id, child_id))
        return child

    def free(self, seq):
        seq.status = RequestStatus.FINISHED_ABORTED
        del self.live[seq.req_id]
        self.events.append(("free", seq.req_id))

    def check_stop(self, gen):
        if gen.num_output_tokens >= gen.params.max_new_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None

    def emit(self, gen, token_ids, logprob, captures):
        out = (gen.req_id, list(token_ids), gen.is_finished)
        self.outputs.append(out)
        return out

    def abort_output(self, gen):
        return self.emit(gen, [], None, None)

    def forward(self, table: torch.Tensor) -> tuple[list[Request], torch.Tensor]:
        """Computes every live sequence's pending tokens; logits of its last token."""
        rows = sorted((s for s in self.live.values() if s.num_computed_tokens < s.num_tokens),
                      key=lambda s: s.req_id)
        for seq in rows:
            seq.num_computed_tokens = seq.num_tokens
        return rows, table[[s.all_token_ids[-1] for s in rows]]


def run(runner: StrategyRunner, port: FakePort, table: torch.Tensor, max_steps: int = 50):
    for _ in range(max_steps):
        if not runner.by_id:
            return
        rows, logits = port.forward(table)
        runner.step(rows, logits, {})
    raise AssertionError("the runner did not finish")


def make_generation(req_id: str, params: SamplingParams) -> Generation:
    return Generation(req_id, PROMPT, params, seed=7, eos_token_ids=())


def test_greedy_and_sampling_rows_share_one_step_and_follow_the_table():
    table, port = make_table(), FakePort()
    runner = StrategyRunner(port, VOCAB)
    runner.add(make_generation("g", SamplingParams(max_new_tokens=4, temperature=0.0)))
    runner.add(make_generation("s", SamplingParams(max_new_tokens=4, temperature=0.8)))
    run(runner, port, table)
    greedy = [t for rid, toks, _ in port.outputs if rid == "g" for t in toks]
    expected, last = [], PROMPT[-1]
    for _ in range(4):  # brute force: follow the table's argmax
        last = int(table[last].argmax())
        expected.append(last)
    assert greedy == expected
    assert sum(1 for rid, _, done in port.outputs if done) == 2
    assert port.live == {}  # both prompt branches were freed through the port


def test_beam_search_through_the_port_equals_exhaustive_search():
    # With as many beams as there are first tokens, two-token beam search keeps every prefix:
    # its best hypotheses must be the exhaustive top sequences under the table.
    table, port = make_table(1), FakePort()
    runner = StrategyRunner(port, VOCAB)
    params = SamplingParams(max_new_tokens=2, ignore_eos=True,
                            strategy=BeamSearch(num_beams=VOCAB, num_return=3))
    gen = make_generation("b", params)
    runner.add(gen)
    run(runner, port, table)
    logprobs = table.log_softmax(dim=-1)
    scored = []
    for seq in itertools.product(range(VOCAB), repeat=2):
        path = [PROMPT[-1], *seq]
        scored.append((sum(float(logprobs[a, b]) for a, b in zip(path, path[1:])), list(seq)))
    scored.sort(key=lambda x: -x[0])
    assert [c[0] for c in gen.candidates] == [s[1] for s in scored[:3]]
    for (tokens, score), (want, _) in zip(gen.candidates, scored):
        assert score == pytest.approx(want / 2, abs=1e-5)  # length-normalised
    assert any(e[0] == "fork" for e in port.events)
    assert port.live == {} and not runner.by_id


class CountingBan(Transform):
    """Bans token 0 on every row, counting its calls (not registered: passed in directly)."""

    order = 50

    def __init__(self) -> None:
        self.calls = 0

    def apply(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        self.calls += 1
        return logits.index_fill_(1, torch.tensor([0]), float("-inf"))


def test_a_transform_runs_once_per_step_for_all_rows():
    table = torch.zeros(VOCAB, VOCAB)
    table[:, 0] = 10.0  # token 0 always wins unless banned
    port, ban = FakePort(), CountingBan()
    runner = StrategyRunner(port, VOCAB, sampler=Sampler([ban]))
    for i in range(3):
        runner.add(make_generation(f"r{i}", SamplingParams(max_new_tokens=2, temperature=0.0)))
    run(runner, port, table)
    assert ban.calls == 2  # two steps, three rows each
    assert all(0 not in toks for _, toks, _ in port.outputs)


def test_abort_frees_every_branch_through_the_port():
    table, port = make_table(2), FakePort()
    runner = StrategyRunner(port, VOCAB)
    runner.add(make_generation("b", SamplingParams(
        max_new_tokens=6, ignore_eos=True, strategy=BeamSearch(num_beams=3))))
    for _ in range(2):
        rows, logits = port.forward(table)
        runner.step(rows, logits, {})
    assert len(port.live) == 3
    out = runner.abort("b")
    assert out == ("b", [], True) and port.live == {} and runner.abort("b") is None
