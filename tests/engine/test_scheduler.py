"""Scheduler unit tests: token budget, chunked prefill, preemption, admission caps.

Pure Python (no model): a step is simulated by `update_from_output` plus appending one token
to every request whose prompt is complete.
"""

from __future__ import annotations

import pytest

from engine.config import SchedulerConfig
from engine.errors import ResourceExhausted
from engine.core.kv_cache_manager import KVCacheManager
from engine.core.request import Request, RequestStatus
from engine.core.scheduler import Scheduler

BLOCK_SIZE = 4


def make_scheduler(num_blocks=64, prefix=False, **cfg) -> Scheduler:
    kv = KVCacheManager(num_blocks, BLOCK_SIZE, enable_prefix_caching=prefix)
    return Scheduler(SchedulerConfig(**cfg), kv)


def make_request(req_id: str, num_prompt_tokens: int, first_token: int = 1) -> Request:
    return Request(req_id, list(range(first_token, first_token + num_prompt_tokens)),
                   generation=req_id)


def run_step(sched: Scheduler) -> dict[str, int]:
    out = sched.schedule()
    sampled = [s.request for s in out.scheduled if s.samples]
    sched.update_from_output(out)
    for req in sampled:
        req.append_token(7)
    return {s.request.req_id: s.num_new_tokens for s in out.scheduled}


def test_token_budget_and_chunked_prefill():
    sched = make_scheduler(max_num_batched_tokens=10)
    a, b = make_request("a", 6), make_request("b", 9)
    sched.add_request(a)
    sched.add_request(b)
    assert run_step(sched) == {"a": 6, "b": 4}        # b's prompt is chunked
    assert run_step(sched) == {"a": 1, "b": 5}        # running first: a decodes, b finishes
    assert run_step(sched) == {"a": 1, "b": 1}
    assert a.num_computed_tokens == 8 and b.num_computed_tokens == 10


def test_chunked_prefill_disabled_waits_for_budget():
    sched = make_scheduler(max_num_batched_tokens=8, enable_chunked_prefill=False)
    sched.add_request(make_request("a", 6))
    sched.add_request(make_request("b", 5))
    assert run_step(sched) == {"a": 6}
    assert run_step(sched) == {"a": 1, "b": 5}


def test_max_num_seqs_caps_running():
    sched = make_scheduler(max_num_seqs=2)
    for i in range(3):
        sched.add_request(make_request(f"r{i}", 3))
    assert set(run_step(sched)) == {"r0", "r1"}
    assert [r.req_id for r in sched.waiting] == ["r2"]


def test_preemption_by_recompute_evicts_latest_and_resumes_first():
    # 4 blocks of 4 tokens: two 7-token prompts fit (2 blocks each) until both need a third.
    sched = make_scheduler(num_blocks=4)
    a, b = make_request("a", 7), make_request("b", 7, first_token=100)
    sched.add_request(a)
    sched.add_request(b)
    assert run_step(sched) == {"a": 7, "b": 7}
    assert run_step(sched) == {"a": 1, "b": 1}  # both now hold 8 tokens = 2 full blocks
    assert run_step(sched) == {"a": 1}          # a needs block 3; b (latest) is preempted
    assert b.status == RequestStatus.WAITING and b.num_computed_tokens == 0
    assert sched.num_preemptions == 1 and list(sched.waiting) == [b]
    sched.finish(a, RequestStatus.FINISHED_STOPPED)
    assert run_step(sched) == {"b": 9}          # recompute prompt + generated tokens
    assert sched.kv.num_free_blocks == 4 - 3


def test_preempting_self_when_alone_is_not_needed_for_fitting_request():
    sched = make_scheduler(num_blocks=3)
    a = make_request("a", 5)
    sched.add_request(a)
    for _ in range(7):
        run_step(sched)
    assert a.num_tokens == 12 and sched.num_preemptions == 0


def test_waiting_queue_caps_raise_resource_exhausted():
    sched = make_scheduler(max_waiting_requests=2, max_waiting_tokens=100)
    sched.add_request(make_request("a", 3))
    sched.add_request(make_request("b", 3))
    with pytest.raises(ResourceExhausted):
        sched.add_request(make_request("c", 3))
    sched = make_scheduler(max_waiting_tokens=10)
    sched.add_request(make_request("a", 6))
    with pytest.raises(ResourceExhausted):
        sched.add_request(make_request("b", 6))


def test_finish_and_abort_free_all_blocks():
    sched = make_scheduler(num_blocks=16)
    reqs = [make_request(f"r{i}", 5 + i, first_token=10 * i) for i in range(4)]
    for req in reqs:
        sched.add_request(req)
    run_step(sched)
    run_step(sched)
    waiting = make_request("w", 3)
    sched.add_request(waiting)
    for req in reqs + [waiting]:
        sched.finish(req, RequestStatus.FINISHED_ABORTED)
    assert sched.kv.num_free_blocks == 16
    assert not sched.running and not sched.waiting and not sched.requests


def test_prefix_hit_skips_cached_tokens():
    sched = make_scheduler(prefix=True)
    a = make_request("a", 10)
    sched.add_request(a)
    run_step(sched)
    b = make_request("b", 10)
    sched.add_request(b)
    # 10 tokens: the two full blocks (8 tokens) hit, the remaining 2 are computed.
    assert run_step(sched) == {"a": 1, "b": 2}
    assert b.num_cached_tokens == 8


def test_set_prompt_on_state_slots_gets_its_whole_first_chunk_reserved():
    """On a state-slot model a structured prompt's sets run in one chunk. When running decodes
    leave too little budget, the next step holds that budget back for it instead of letting
    the prompt wait until the batch drains."""
    from engine.prompt import Parallel, StructuredPrompt, layout
    from engine.core.state_cache_manager import StateCacheManager

    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=8), StateCacheManager(8))
    decoders = [make_request(f"d{i}", 1) for i in range(3)]
    for req in decoders:
        sched.add_request(req)
    assert run_step(sched) == {"d0": 1, "d1": 1, "d2": 1}
    prompt = StructuredPrompt(segments=[[5], Parallel(members=[[6, 7], [8, 9, 10]]), [11]])
    lay = layout(prompt, lambda text, special: [])
    structured = Request("s", lay.token_ids, generation="s", layout=lay)
    assert lay.member_span[1] == 6
    sched.add_request(structured)
    sched.add_request(make_request("late", 1))
    # 3 decodes leave 5 tokens: the sets (6 tokens) do not fit, nothing behind them jumps in.
    assert run_step(sched) == {"d0": 1, "d1": 1, "d2": 1}
    # The next step reserves 6 tokens for them: two decodes wait one step.
    assert run_step(sched) == {"d0": 1, "d1": 1, "s": 6}
    assert structured.num_computed_tokens == 6
