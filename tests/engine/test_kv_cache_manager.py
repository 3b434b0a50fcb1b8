"""Exact-state tests of `KVCacheManager`: block tables, ref counts, free-queue order, prefix
hits, fork copy-on-write, plus a stateful property test against a simulated KV store."""

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from engine.core.kv_cache_manager import KVBlocks, KVCacheManager
from engine.core.prefix_hash import hash_full_blocks

BLOCK_SIZE = 4
NUM_BLOCKS = 10


def make_kv_cache_manager(
    num_blocks: int = NUM_BLOCKS,
    block_size: int = BLOCK_SIZE,
    enable_prefix_caching: bool = True,
) -> KVCacheManager:
    return KVCacheManager(num_blocks, block_size, enable_prefix_caching)


def make_token_ids(num_tokens: int, start: int = 0) -> list[int]:
    return list(range(start, start + num_tokens))


def allocate_prompt(manager: KVCacheManager, seq_id, token_ids, extra_key=None) -> KVBlocks:
    """Looks up the prefix and allocates the rest of the prompt, as the scheduler does."""
    cached, num_cached_tokens = manager.lookup_prefix(token_ids, extra_key)
    num_new_tokens = len(token_ids) - num_cached_tokens
    return manager.allocate_slots(
        seq_id, token_ids, num_cached_tokens, num_new_tokens, cached, extra_key
    )


def free_ids(manager: KVCacheManager) -> list[int]:
    return [block.block_id for block in manager.block_pool.free_block_queue.get_all_free_blocks()]


def ref_cnts(manager: KVCacheManager) -> list[int]:
    return [block.ref_cnt for block in manager.block_pool.blocks]


def snapshot(manager: KVCacheManager, seq_ids=()) -> tuple:
    """Everything observable about the manager's state."""
    pool = manager.block_pool
    return (
        free_ids(manager),
        ref_cnts(manager),
        [block.block_hash for block in pool.blocks],
        {h: block.block_id for h, block in pool.cached_block_hash_to_block.items()},
        {seq_id: manager.get_block_ids(seq_id) for seq_id in seq_ids},
    )


# ---------------------------------------------------------------------------------------------
# Allocation and free


def test_allocate_pops_blocks_from_free_queue_head():
    manager = make_kv_cache_manager()
    new_blocks = allocate_prompt(manager, "a", make_token_ids(10))
    assert new_blocks == KVBlocks((0, 1, 2))
    assert manager.get_block_ids("a") == [0, 1, 2]
    assert ref_cnts(manager) == [1, 1, 1] + [0] * 7
    assert free_ids(manager) == [3, 4, 5, 6, 7, 8, 9]
    assert manager.num_free_blocks == 7
    assert manager.usage == pytest.approx(0.3)


# (num_computed_tokens, num_new_tokens, expected new block ids) after a 8-token prompt.
DECODE_CASES = [
    (8, 1, (2,)),
    (8, 4, (2,)),
    (8, 5, (2, 3)),
    (7, 1, ()),
]


@pytest.mark.parametrize(
    "num_computed_tokens, num_new_tokens, expected",
    DECODE_CASES,
    ids=[f"computed{c}-new{n}" for c, n, _ in DECODE_CASES],
)
def test_allocate_grows_table_only_past_block_boundary(
    num_computed_tokens, num_new_tokens, expected
):
    manager = make_kv_cache_manager()
    token_ids = make_token_ids(16)
    manager.allocate_slots("a", token_ids, 0, 8)
    new_blocks = manager.allocate_slots("a", token_ids, num_computed_tokens, num_new_tokens)
    assert new_blocks == KVBlocks(expected)
    assert manager.get_block_ids("a") == [0, 1, *expected]


def test_free_releases_blocks_in_reverse_order():
    manager = make_kv_cache_manager()
    allocate_prompt(manager, "a", make_token_ids(10))
    allocate_prompt(manager, "b", make_token_ids(5, start=100))
    manager.free("a")
    assert free_ids(manager) == [5, 6, 7, 8, 9, 2, 1, 0]
    assert ref_cnts(manager) == [0, 0, 0, 1, 1] + [0] * 5
    with pytest.raises(KeyError):
        manager.get_block_ids("a")


def test_free_unknown_sequence_is_noop():
    manager = make_kv_cache_manager()
    allocate_prompt(manager, "a", make_token_ids(10))
    before = snapshot(manager, ["a"])
    manager.free("missing")
    assert snapshot(manager, ["a"]) == before


# ---------------------------------------------------------------------------------------------
# Prefix caching


def test_prefix_hit_shares_full_blocks():
    manager = make_kv_cache_manager()
    token_ids = make_token_ids(10)
    allocate_prompt(manager, "a", token_ids)

    cached, num_cached_tokens = manager.lookup_prefix(token_ids)
    assert (cached, num_cached_tokens) == (KVBlocks((0, 1)), 8)
    new_blocks = manager.allocate_slots("b", token_ids, 8, 2, cached)
    assert new_blocks == KVBlocks((3,))
    assert manager.get_block_ids("b") == [0, 1, 3]
    assert ref_cnts(manager)[:4] == [2, 2, 1, 1]
    assert free_ids(manager) == [4, 5, 6, 7, 8, 9]


# (prompt length, expected num_cached_tokens) against a cached 12-token sequence.
HIT_CAP_CASES = [(12, 8), (10, 8), (9, 8), (8, 4), (5, 4), (4, 0), (1, 0)]


@pytest.mark.parametrize(
    "prompt_len, expected_cached",
    HIT_CAP_CASES,
    ids=[f"prompt{p}-cached{c}" for p, c in HIT_CAP_CASES],
)
def test_prefix_hit_leaves_last_token_to_compute(prompt_len, expected_cached):
    manager = make_kv_cache_manager()
    token_ids = make_token_ids(12)
    allocate_prompt(manager, "a", token_ids)
    before = snapshot(manager, ["a"])

    cached, num_cached_tokens = manager.lookup_prefix(token_ids[:prompt_len])
    assert num_cached_tokens == expected_cached
    assert cached == KVBlocks(tuple(range(expected_cached // BLOCK_SIZE)))
    assert snapshot(manager, ["a"]) == before  # lookup changes nothing


def test_prefix_hit_stops_at_first_mismatching_block():
    manager = make_kv_cache_manager()
    allocate_prompt(manager, "a", make_token_ids(12))
    token_ids = make_token_ids(12)
    token_ids[5] = 999  # second block differs; the third is equal but chained after a miss
    assert manager.lookup_prefix(token_ids + [0]) == (KVBlocks((0,)), 4)


def test_prefix_hit_on_freed_block_takes_it_from_middle_of_free_queue():
    manager = make_kv_cache_manager()
    token_ids = make_token_ids(10)
    allocate_prompt(manager, "a", token_ids)
    manager.free("a")
    assert free_ids(manager) == [3, 4, 5, 6, 7, 8, 9, 2, 1, 0]

    new_blocks = allocate_prompt(manager, "b", token_ids)
    assert new_blocks == KVBlocks((3,))
    assert manager.get_block_ids("b") == [0, 1, 3]
    assert ref_cnts(manager)[:4] == [1, 1, 0, 1]
    # Block 2 (partial, never hashed) stays free; 1 and 0 were pulled out around it.
    assert free_ids(manager) == [4, 5, 6, 7, 8, 9, 2]


def test_lru_cached_block_is_evicted_first():
    manager = make_kv_cache_manager(num_blocks=4)
    token_ids = make_token_ids(8)
    allocate_prompt(manager, "a", token_ids)
    manager.free("a")
    assert free_ids(manager) == [2, 3, 1, 0]

    allocate_prompt(manager, "b", make_token_ids(12, start=100))
    assert manager.get_block_ids("b") == [2, 3, 1]
    # The tail block of "a" was freed first, so it was evicted; the head block still hits.
    assert manager.lookup_prefix(token_ids + [0]) == (KVBlocks((0,)), 4)


def test_extra_key_changes_hashes():
    manager = make_kv_cache_manager()
    token_ids = make_token_ids(10)
    allocate_prompt(manager, "a", token_ids)
    assert manager.lookup_prefix(token_ids, extra_key="sets:2") == (KVBlocks(()), 0)

    allocate_prompt(manager, "b", token_ids, extra_key="sets:2")
    assert manager.get_block_ids("b") == [3, 4, 5]
    assert manager.lookup_prefix(token_ids, extra_key="sets:2") == (KVBlocks((3, 4)), 8)
    assert manager.lookup_prefix(token_ids) == (KVBlocks((0, 1)), 8)


def test_blocks_filled_by_decode_are_cached():
    manager = make_kv_cache_manager()
    token_ids = make_token_ids(6)
    manager.allocate_slots("a", token_ids, 0, 6)
    assert manager.lookup_prefix(make_token_ids(9))[1] == 4

    token_ids += [6, 7]
    manager.allocate_slots("a", token_ids, 6, 2)
    assert manager.lookup_prefix(make_token_ids(9)) == (KVBlocks((0, 1)), 8)
    expected_hashes = hash_full_blocks(token_ids, BLOCK_SIZE)
    assert [manager.block_pool.blocks[i].block_hash for i in (0, 1)] == expected_hashes


def test_prefix_caching_disabled():
    manager = make_kv_cache_manager(enable_prefix_caching=False)
    token_ids = make_token_ids(10)
    allocate_prompt(manager, "a", token_ids)
    assert manager.lookup_prefix(token_ids) == (KVBlocks(()), 0)
    assert allocate_prompt(manager, "b", token_ids) == KVBlocks((3, 4, 5))
    assert ref_cnts(manager)[:6] == [1] * 6
    assert manager.block_pool.cached_block_hash_to_block == {}
    assert all(block.block_hash is None for block in manager.block_pool.blocks)


def test_reset_prefix_cache():
    manager = make_kv_cache_manager()
    token_ids = make_token_ids(10)
    allocate_prompt(manager, "a", token_ids)
    assert manager.reset_prefix_cache() is False
    manager.free("a")
    assert manager.reset_prefix_cache() is True
    assert manager.lookup_prefix(token_ids) == (KVBlocks(()), 0)


# ---------------------------------------------------------------------------------------------
# Allocation failure


def _fail_new_prompt_too_long(manager):
    return manager.allocate_slots("c", make_token_ids(40, start=200), 0, 40)


def _fail_free_hits_consume_capacity(manager):
    # 2 new blocks would fit in the 3 free ones, but the 2 hits also sit in the free queue.
    token_ids = make_token_ids(8) + make_token_ids(8, start=300)
    cached, num_cached_tokens = manager.lookup_prefix(token_ids)
    assert (cached, num_cached_tokens) == (KVBlocks((0, 1)), 8)
    return manager.allocate_slots("c", token_ids, 8, 8, cached)


def _fail_running_sequence_grows(manager):
    return manager.allocate_slots("b", make_token_ids(28, start=100), 12, 16)


FAILURE_CASES = [
    _fail_new_prompt_too_long,
    _fail_free_hits_consume_capacity,
    _fail_running_sequence_grows,
]


@pytest.mark.parametrize("attempt", FAILURE_CASES, ids=lambda f: f.__name__.removeprefix("_fail_"))
def test_allocation_failure_leaves_state_unchanged(attempt):
    manager = make_kv_cache_manager(num_blocks=6)
    allocate_prompt(manager, "a", make_token_ids(9))
    manager.free("a")
    manager.allocate_slots("b", make_token_ids(12, start=100), 0, 12)
    # Blocks 0 and 1 hold the cached prefix of "a"; only 3 blocks are free.
    assert free_ids(manager) == [2, 1, 0]
    before = snapshot(manager, ["b"])

    assert attempt(manager) is None
    assert snapshot(manager, ["b"]) == before
    with pytest.raises(KeyError):
        manager.get_block_ids("c")


def test_allocation_with_free_hits_succeeds_at_exact_capacity():
    manager = make_kv_cache_manager(num_blocks=4)
    allocate_prompt(manager, "a", make_token_ids(9))
    manager.free("a")
    assert free_ids(manager) == [3, 2, 1, 0]
    # Two hits (blocks 0, 1) and two new blocks (3, then the partial tail 2 of "a") use all
    # four free blocks.
    token_ids = make_token_ids(8) + make_token_ids(8, start=300)
    assert allocate_prompt(manager, "b", token_ids) == KVBlocks((3, 2))
    assert manager.get_block_ids("b") == [0, 1, 3, 2]
    assert manager.num_free_blocks == 0


# ---------------------------------------------------------------------------------------------
# Fork


def test_fork_full_last_block_shares_without_copy():
    manager = make_kv_cache_manager()
    allocate_prompt(manager, "parent", make_token_ids(8))
    assert manager.fork("parent", "child", 8) == []
    assert manager.get_block_ids("child") == [0, 1]
    assert ref_cnts(manager)[:3] == [2, 2, 0]
    assert manager.num_free_blocks == 8


def test_fork_partial_last_block_copies_it():
    manager = make_kv_cache_manager()
    allocate_prompt(manager, "parent", make_token_ids(10))
    assert manager.fork("parent", "child", 10) == [(2, 3)]
    assert manager.get_block_ids("parent") == [0, 1, 2]
    assert manager.get_block_ids("child") == [0, 1, 3]
    assert ref_cnts(manager)[:5] == [2, 2, 1, 1, 0]
    assert free_ids(manager) == [4, 5, 6, 7, 8, 9]


def test_fork_at_earlier_token_shares_only_that_prefix():
    manager = make_kv_cache_manager()
    allocate_prompt(manager, "parent", make_token_ids(12))
    assert manager.fork("parent", "child", 5) == [(1, 3)]
    assert manager.get_block_ids("child") == [0, 3]
    assert ref_cnts(manager)[:4] == [2, 1, 1, 1]


def test_fork_without_free_block_for_copy_fails_cleanly():
    manager = make_kv_cache_manager(num_blocks=3)
    allocate_prompt(manager, "parent", make_token_ids(10))
    before = snapshot(manager, ["parent"])
    assert manager.fork("parent", "child", 10) is None
    assert snapshot(manager, ["parent"]) == before
    # Sharing only full blocks needs no free block.
    assert manager.fork("parent", "child", 8) == []


def test_forked_child_extends_its_own_blocks():
    manager = make_kv_cache_manager()
    token_ids = make_token_ids(10)
    allocate_prompt(manager, "parent", token_ids)
    manager.fork("parent", "child", 10)
    child_token_ids = token_ids + [50, 51, 52]
    assert manager.allocate_slots("child", child_token_ids, 10, 3) == KVBlocks((4,))
    assert manager.get_block_ids("child") == [0, 1, 3, 4]
    # The child's copied block became full and is cached under the child's tokens.
    expected_hashes = hash_full_blocks(child_token_ids, BLOCK_SIZE)
    assert manager.block_pool.blocks[3].block_hash == expected_hashes[2]
    assert manager.block_pool.blocks[2].block_hash is None


FREE_ORDER_CASES = [
    (8, ["parent", "child"], [2, 3, 4, 5, 6, 7, 8, 9, 1, 0]),
    (8, ["child", "parent"], [2, 3, 4, 5, 6, 7, 8, 9, 1, 0]),
    (10, ["parent", "child"], [4, 5, 6, 7, 8, 9, 2, 3, 1, 0]),
    (10, ["child", "parent"], [4, 5, 6, 7, 8, 9, 3, 2, 1, 0]),
]


@pytest.mark.parametrize(
    "fork_tokens, free_order, expected_free_ids",
    FREE_ORDER_CASES,
    ids=[f"fork{n}-free_{'_then_'.join(order)}" for n, order, _ in FREE_ORDER_CASES],
)
def test_freeing_parent_and_child_returns_all_blocks(fork_tokens, free_order, expected_free_ids):
    manager = make_kv_cache_manager()
    allocate_prompt(manager, "parent", make_token_ids(fork_tokens))
    manager.fork("parent", "child", fork_tokens)
    for seq_id in free_order:
        manager.free(seq_id)
    assert free_ids(manager) == expected_free_ids
    assert ref_cnts(manager) == [0] * NUM_BLOCKS
    assert manager.num_free_blocks == NUM_BLOCKS
    assert manager.usage == 0.0


# ---------------------------------------------------------------------------------------------
# Property test: random allocate / fork / free against a simulated KV store

# A two-token vocabulary, so that random prompts often share prefixes and hit the cache.
TOKEN = st.integers(0, 1)


class SimSequence:
    """The test's own record of a sequence: its tokens and how many of them have KV."""

    def __init__(self, token_ids: list[int], num_computed_tokens: int, extra_key) -> None:
        self.token_ids = token_ids
        self.num_computed_tokens = num_computed_tokens
        self.extra_key = extra_key


class KVCacheManagerMachine(RuleBasedStateMachine):
    """Drives the manager as the scheduler and model runner would.

    Each computed token is written into a simulated KV store (`kv[block_id][offset]`) at the
    slot its block table gives it, and fork copies are performed on that store. After every
    step each sequence must read its own tokens back through its block table, which catches a
    wrong prefix hit, a missing copy-on-write or two sequences writing one block.
    """

    @initialize(
        num_blocks=st.integers(1, 12),
        block_size=st.integers(1, 4),
        enable_prefix_caching=st.booleans(),
    )
    def init_manager(self, num_blocks, block_size, enable_prefix_caching):
        self.manager = KVCacheManager(num_blocks, block_size, enable_prefix_caching)
        self.block_size = block_size
        self.kv: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.seqs: dict[int, SimSequence] = {}
        self.next_seq_id = 0

    @rule(
        prompt=st.lists(TOKEN, min_size=1, max_size=12),
        extra_key=st.sampled_from([None, "sets:1"]),
        data=st.data(),
    )
    def add_sequence(self, prompt, extra_key, data):
        cached, num_cached_tokens = self.manager.lookup_prefix(prompt, extra_key)
        assert num_cached_tokens == len(cached.block_ids) * self.block_size < len(prompt)
        self._assert_kv_holds(list(cached.block_ids), prompt[:num_cached_tokens])
        num_new_tokens = data.draw(st.integers(1, len(prompt) - num_cached_tokens))
        seq_id = self._new_seq_id()
        seq = SimSequence(list(prompt), num_cached_tokens, extra_key)
        if self._allocate(seq_id, seq, num_new_tokens, cached):
            self.seqs[seq_id] = seq

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def step(self, data):
        seq_id = data.draw(st.sampled_from(sorted(self.seqs)))
        seq = self.seqs[seq_id]
        if seq.num_computed_tokens == len(seq.token_ids):  # decode: sample 1-3 tokens first
            seq.token_ids += data.draw(st.lists(TOKEN, min_size=1, max_size=3))
        num_uncomputed = len(seq.token_ids) - seq.num_computed_tokens
        self._allocate(seq_id, seq, data.draw(st.integers(1, num_uncomputed)), None)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def fork(self, data):
        parent_id = data.draw(st.sampled_from(sorted(self.seqs)))
        parent = self.seqs[parent_id]
        num_tokens = data.draw(st.integers(0, parent.num_computed_tokens))
        child_id = self._new_seq_id()
        before = self._snapshot()
        copies = self.manager.fork(parent_id, child_id, num_tokens)
        if copies is None:
            assert self._snapshot() == before
            return
        assert len(copies) == (num_tokens % self.block_size != 0)
        for src_block_id, dst_block_id in copies:
            self.kv[dst_block_id] = list(self.kv[src_block_id])
        child_token_ids = parent.token_ids[:num_tokens]
        self.seqs[child_id] = SimSequence(child_token_ids, num_tokens, parent.extra_key)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def free(self, data):
        seq_id = data.draw(st.sampled_from(sorted(self.seqs)))
        self.manager.free(seq_id)
        del self.seqs[seq_id]

    @rule()
    def reset_prefix_cache(self):
        all_free = self.manager.num_free_blocks == self.manager.num_blocks
        assert self.manager.reset_prefix_cache() is all_free

    @invariant()
    def ref_cnts_match_ownership(self):
        pool = self.manager.block_pool
        tables = [self.manager.get_block_ids(seq_id) for seq_id in self.seqs]
        num_owners = [0] * self.manager.num_blocks
        for table in tables:
            assert len(set(table)) == len(table)
            for block_id in table:
                num_owners[block_id] += 1
        assert ref_cnts(self.manager) == num_owners
        assert sum(ref_cnts(self.manager)) == sum(len(table) for table in tables)
        assert self.manager.usage == 1 - self.manager.num_free_blocks / self.manager.num_blocks
        for block_hash, block in pool.cached_block_hash_to_block.items():
            assert block.block_hash == block_hash

    @invariant()
    def free_queue_holds_exactly_unowned_blocks(self):
        queue = free_ids(self.manager)
        unowned = [i for i, ref_cnt in enumerate(ref_cnts(self.manager)) if ref_cnt == 0]
        assert sorted(queue) == unowned
        assert self.manager.num_free_blocks == len(queue)

    @invariant()
    def sequences_read_back_their_tokens(self):
        bs = self.block_size
        for seq_id, seq in self.seqs.items():
            table = self.manager.get_block_ids(seq_id)
            computed = seq.token_ids[: seq.num_computed_tokens]
            assert len(table) == -(-len(computed) // bs)
            self._assert_kv_holds(table, computed)
            hashes = []
            if self.manager.enable_prefix_caching:
                hashes = hash_full_blocks(computed, bs, seq.extra_key)
            blocks = [self.manager.block_pool.blocks[i] for i in table[: len(hashes)]]
            assert [block.block_hash for block in blocks] == hashes

    def teardown(self):
        if not hasattr(self, "manager"):
            return
        for seq_id in list(self.seqs):
            self.manager.free(seq_id)
        assert ref_cnts(self.manager) == [0] * self.manager.num_blocks
        assert self.manager.num_free_blocks == self.manager.num_blocks

    def _new_seq_id(self) -> int:
        self.next_seq_id += 1
        return self.next_seq_id

    def _snapshot(self) -> tuple:
        return snapshot(self.manager, sorted(self.seqs))

    def _allocate(self, seq_id, seq: SimSequence, num_new_tokens: int, cached) -> bool:
        """Allocates and, on success, writes the new tokens into the simulated KV store."""
        before = self._snapshot()
        new_blocks = self.manager.allocate_slots(
            seq_id, seq.token_ids, seq.num_computed_tokens, num_new_tokens, cached, seq.extra_key
        )
        if new_blocks is None:
            assert self._snapshot() == before
            return False
        table = self.manager.get_block_ids(seq_id)
        assert list(new_blocks.block_ids) == table[len(table) - len(new_blocks.block_ids) :]
        for block_id in new_blocks.block_ids:  # poison reused blocks, like NaN-filled KV
            self.kv[block_id] = [None] * self.block_size
        start = seq.num_computed_tokens
        for pos in range(start, start + num_new_tokens):
            block_id = table[pos // self.block_size]
            # A sequence only ever writes into a block nobody else owns.
            assert self.manager.block_pool.blocks[block_id].ref_cnt == 1
            self.kv[block_id][pos % self.block_size] = seq.token_ids[pos]
        seq.num_computed_tokens += num_new_tokens
        return True

    def _assert_kv_holds(self, block_ids: list[int], token_ids: list[int]) -> None:
        for pos, token_id in enumerate(token_ids):
            block_id = block_ids[pos // self.block_size]
            assert self.kv[block_id][pos % self.block_size] == token_id


TestKVCacheManagerMachine = KVCacheManagerMachine.TestCase
TestKVCacheManagerMachine.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None
)
