"""Exact-state tests of `BlockPool` and its free queue: block ids, ref counts, queue order."""

import pytest

from engine.core.block_pool import BlockPool, FreeKVCacheBlockQueue, KVCacheBlock

NUM_BLOCKS = 8


def make_block_pool(
    num_blocks: int = NUM_BLOCKS, enable_prefix_caching: bool = True
) -> BlockPool:
    return BlockPool(num_blocks, enable_prefix_caching)


def make_free_queue(num_blocks: int = NUM_BLOCKS) -> tuple[FreeKVCacheBlockQueue, list]:
    blocks = [KVCacheBlock(block_id) for block_id in range(num_blocks)]
    return FreeKVCacheBlockQueue(blocks), blocks


def free_ids(queue: FreeKVCacheBlockQueue) -> list[int]:
    return [block.block_id for block in queue.get_all_free_blocks()]


def ref_cnts(pool: BlockPool) -> list[int]:
    return [block.ref_cnt for block in pool.blocks]


def assert_links_consistent(queue: FreeKVCacheBlockQueue) -> None:
    """Walking forward and backward through the links must agree."""
    blocks = queue.get_all_free_blocks()
    assert len(blocks) == queue.num_free_blocks
    for prev, nxt in zip(blocks, blocks[1:]):
        assert prev.next_free_block is nxt and nxt.prev_free_block is prev
    if blocks:
        assert blocks[0].prev_free_block is None and blocks[-1].next_free_block is None


# ---------------------------------------------------------------------------------------------
# FreeKVCacheBlockQueue


def test_free_queue_starts_with_all_blocks_in_order():
    queue, _ = make_free_queue()
    assert free_ids(queue) == list(range(NUM_BLOCKS))
    assert queue.num_free_blocks == NUM_BLOCKS
    assert_links_consistent(queue)


REMOVE_CASES = [(0, "head"), (3, "middle"), (NUM_BLOCKS - 1, "tail")]


@pytest.mark.parametrize("block_id", [c[0] for c in REMOVE_CASES], ids=[c[1] for c in REMOVE_CASES])
def test_free_queue_remove_then_append(block_id):
    queue, blocks = make_free_queue()
    queue.remove(blocks[block_id])
    remaining = [i for i in range(NUM_BLOCKS) if i != block_id]
    assert free_ids(queue) == remaining
    assert blocks[block_id].prev_free_block is None and blocks[block_id].next_free_block is None
    assert_links_consistent(queue)

    queue.append(blocks[block_id])
    assert free_ids(queue) == remaining + [block_id]
    assert_links_consistent(queue)


def test_free_queue_popleft_until_empty_then_append():
    queue, blocks = make_free_queue(3)
    assert [queue.popleft().block_id for _ in range(3)] == [0, 1, 2]
    assert queue.num_free_blocks == 0 and free_ids(queue) == []
    with pytest.raises(AssertionError):
        queue.popleft()

    queue.append(blocks[2])
    queue.append(blocks[0])
    assert free_ids(queue) == [2, 0]
    assert_links_consistent(queue)


def test_free_queue_rejects_double_append_of_single_block():
    queue, blocks = make_free_queue(1)
    with pytest.raises(AssertionError):
        queue.append(blocks[0])


# ---------------------------------------------------------------------------------------------
# BlockPool allocation and freeing


def test_get_new_blocks_pops_from_head():
    pool = make_block_pool()
    blocks = pool.get_new_blocks(3)
    assert [block.block_id for block in blocks] == [0, 1, 2]
    assert ref_cnts(pool) == [1, 1, 1, 0, 0, 0, 0, 0]
    assert free_ids(pool.free_block_queue) == [3, 4, 5, 6, 7]
    assert pool.num_free_blocks == 5


def test_get_new_blocks_zero_is_noop():
    pool = make_block_pool()
    assert pool.get_new_blocks(0) == []
    assert pool.num_free_blocks == NUM_BLOCKS


def test_get_new_blocks_more_than_free_asserts():
    pool = make_block_pool()
    pool.get_new_blocks(NUM_BLOCKS - 1)
    with pytest.raises(AssertionError):
        pool.get_new_blocks(2)


def test_free_blocks_appends_in_given_order():
    pool = make_block_pool()
    blocks = pool.get_new_blocks(4)
    pool.free_blocks(reversed(blocks))
    assert free_ids(pool.free_block_queue) == [4, 5, 6, 7, 3, 2, 1, 0]
    assert ref_cnts(pool) == [0] * NUM_BLOCKS


def test_free_blocks_shared_block_stays_owned():
    pool = make_block_pool()
    [block] = pool.get_new_blocks(1)
    pool.touch([block])
    assert block.ref_cnt == 2

    pool.free_blocks([block])
    assert block.ref_cnt == 1
    assert 0 not in free_ids(pool.free_block_queue)

    pool.free_blocks([block])
    assert block.ref_cnt == 0
    assert free_ids(pool.free_block_queue)[-1] == 0


def test_double_free_asserts():
    pool = make_block_pool()
    [block] = pool.get_new_blocks(1)
    pool.free_blocks([block])
    with pytest.raises(AssertionError):
        pool.free_blocks([block])


# ---------------------------------------------------------------------------------------------
# Prefix-hash map


def test_cache_full_block_registers_hash():
    pool = make_block_pool()
    [block] = pool.get_new_blocks(1)
    pool.cache_full_block(block, 123)
    assert block.block_hash == 123
    assert pool.get_cached_block(123) is block
    assert pool.get_cached_block(456) is None


def test_duplicate_hash_keeps_existing_mapping():
    pool = make_block_pool()
    first, second = pool.get_new_blocks(2)
    pool.cache_full_block(first, 123)
    pool.cache_full_block(second, 123)
    assert pool.get_cached_block(123) is first
    assert second.block_hash == 123

    # Evicting the unmapped duplicate must not drop the original's entry.
    pool.free_blocks([second])
    pool.get_new_blocks(NUM_BLOCKS - 1)
    assert second.block_hash is None
    assert pool.get_cached_block(123) is first


def test_freed_block_keeps_hash_and_touch_takes_it_from_middle():
    pool = make_block_pool()
    blocks = pool.get_new_blocks(3)
    pool.cache_full_block(blocks[1], 11)
    pool.free_blocks(reversed(blocks))
    assert free_ids(pool.free_block_queue) == [3, 4, 5, 6, 7, 2, 1, 0]
    assert pool.get_cached_block(11) is blocks[1]

    pool.touch([blocks[1]])
    assert blocks[1].ref_cnt == 1
    assert free_ids(pool.free_block_queue) == [3, 4, 5, 6, 7, 2, 0]
    assert_links_consistent(pool.free_block_queue)


def test_get_new_blocks_evicts_lru_cached_block():
    pool = make_block_pool(4)
    first, second = pool.get_new_blocks(2)
    pool.cache_full_block(first, 10)
    pool.cache_full_block(second, 20)
    pool.free_blocks([first, second])
    assert free_ids(pool.free_block_queue) == [2, 3, 0, 1]

    assert [block.block_id for block in pool.get_new_blocks(3)] == [2, 3, 0]
    assert first.block_hash is None
    assert pool.get_cached_block(10) is None
    assert pool.get_cached_block(20) is second
    assert pool.cached_block_hash_to_block == {20: second}


def test_reset_prefix_cache_only_when_all_blocks_free():
    pool = make_block_pool()
    [block] = pool.get_new_blocks(1)
    pool.cache_full_block(block, 7)
    assert pool.reset_prefix_cache() is False
    assert pool.get_cached_block(7) is block

    pool.free_blocks([block])
    assert pool.reset_prefix_cache() is True
    assert pool.get_cached_block(7) is None
    assert block.block_hash is None


def test_prefix_caching_disabled_registers_nothing():
    pool = make_block_pool(enable_prefix_caching=False)
    [block] = pool.get_new_blocks(1)
    pool.cache_full_block(block, 7)
    assert block.block_hash is None
    assert pool.get_cached_block(7) is None
