"""Physical KV-cache blocks: reference counts, the free queue and the prefix-hash map.

The pool knows nothing about sequences or tokens. It hands out block objects, counts how many
owners each block has, and remembers which full blocks hold which content hash so that a later
sequence with the same prefix can reuse them. Policy (which blocks a sequence needs, when a
block is full) lives in `KVCacheManager`.

Pure Python on purpose: this runs on the scheduler's critical path, once per step, and is tested
on CPU by asserting exact block ids, reference counts and free-queue order.
"""

from __future__ import annotations

from collections.abc import Iterable


class KVCacheBlock:
    """Metadata of one physical KV-cache block (the tensors live in the model runner).

    Attributes:
        block_id: Index of the block in every layer's KV tensor, in `[0, num_blocks)`.
        ref_cnt: Number of sequences whose block table holds this block. A block with
            `ref_cnt == 0` is in the free queue, and only such a block may be evicted.
        block_hash: Chained hash of the block's tokens while it is registered as a full,
            reusable block; `None` otherwise. A free block keeps its hash so that a prefix
            lookup can still hit it until it is popped for reuse.
        prev_free_block: Neighbour towards the head of the free queue, `None` at the head or
            when the block is not free.
        next_free_block: Neighbour towards the tail of the free queue, `None` at the tail or
            when the block is not free.
    """

    # Slots: there is one object per block for the life of the engine, and attribute access on
    # them sits on the per-step path.
    __slots__ = ("block_id", "ref_cnt", "block_hash", "prev_free_block", "next_free_block")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: int | None = None
        self.prev_free_block: KVCacheBlock | None = None
        self.next_free_block: KVCacheBlock | None = None

    def __repr__(self) -> str:
        return (
            f"KVCacheBlock(block_id={self.block_id}, ref_cnt={self.ref_cnt}, "
            f"block_hash={self.block_hash})"
        )


class FreeKVCacheBlockQueue:
    """The free blocks, in eviction order: least recently freed at the head.

    This is a doubly linked list threaded through the `prev_free_block`/`next_free_block`
    fields of the blocks themselves, not a `collections.deque`. A prefix-cache hit has to pull
    a free block out of the *middle* of the queue (it is free but about to be reused), which a
    deque can only do in O(n). Threading the links through the preallocated blocks makes
    `popleft`, `append` and `remove` all O(1) and allocates no Python objects on the hot path.

    Args:
        blocks: The initial free blocks, head first.
    """

    def __init__(self, blocks: list[KVCacheBlock]) -> None:
        self.num_free_blocks = len(blocks)
        self._head: KVCacheBlock | None = blocks[0] if blocks else None
        self._tail: KVCacheBlock | None = blocks[-1] if blocks else None
        for prev, nxt in zip(blocks, blocks[1:]):
            prev.next_free_block = nxt
            nxt.prev_free_block = prev

    def popleft(self) -> KVCacheBlock:
        """Removes and returns the head block (the next one to evict)."""
        assert self._head is not None, "popleft() on an empty free queue"
        block = self._head
        self.remove(block)
        return block

    def remove(self, block: KVCacheBlock) -> None:
        """Unlinks `block`, which must currently be in the queue, in O(1)."""
        prev, nxt = block.prev_free_block, block.next_free_block
        if prev is None:
            assert self._head is block, f"block {block.block_id} is not in the free queue"
            self._head = nxt
        else:
            prev.next_free_block = nxt
        if nxt is None:
            self._tail = prev
        else:
            nxt.prev_free_block = prev
        block.prev_free_block = block.next_free_block = None
        self.num_free_blocks -= 1

    def append(self, block: KVCacheBlock) -> None:
        """Adds `block`, which must not be in the queue, at the tail (evicted last)."""
        assert block.prev_free_block is None and block.next_free_block is None
        assert self._head is not block, f"block {block.block_id} is already free"
        if self._tail is None:
            self._head = block
        else:
            self._tail.next_free_block = block
            block.prev_free_block = self._tail
        self._tail = block
        self.num_free_blocks += 1

    def get_all_free_blocks(self) -> list[KVCacheBlock]:
        """Returns the free blocks head first. O(n); meant for tests and debugging."""
        blocks = []
        block = self._head
        while block is not None:
            blocks.append(block)
            block = block.next_free_block
        return blocks


class BlockPool:
    """Owns every KV-cache block: allocation, reference counting and prefix caching.

    Invariants (checked by assertions and by the tests):
        * a block is in the free queue if and only if its `ref_cnt` is 0;
        * `cached_block_hash_to_block[h].block_hash == h` for every entry;
        * at most one block per hash is in the map. Block tables are append-only, so two
          sequences can compute the same full block independently; the later copy keeps its
          `block_hash` but is not entered in the map, and simply disappears when freed and
          reused.

    Args:
        num_blocks: Number of physical blocks; all are created up front.
        enable_prefix_caching: Whether full blocks may be registered and looked up by hash.
    """

    def __init__(self, num_blocks: int, enable_prefix_caching: bool) -> None:
        assert num_blocks > 0, f"num_blocks={num_blocks}"
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [KVCacheBlock(block_id) for block_id in range(num_blocks)]
        self.free_block_queue = FreeKVCacheBlockQueue(self.blocks)
        self.cached_block_hash_to_block: dict[int, KVCacheBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks with `ref_cnt == 0`, whether or not they still hold a cached hash."""
        return self.free_block_queue.num_free_blocks

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Takes `num_blocks` blocks from the head of the free queue, each with `ref_cnt == 1`.

        A popped block that still held a cached hash is evicted: its hash is dropped, so later
        lookups miss. The caller must have checked `num_free_blocks` first.
        """
        assert num_blocks <= self.num_free_blocks, (
            f"need {num_blocks} blocks, only {self.num_free_blocks} free"
        )
        blocks = []
        for _ in range(num_blocks):
            block = self.free_block_queue.popleft()
            assert block.ref_cnt == 0
            self._evict_cached_block(block)
            block.ref_cnt = 1
            blocks.append(block)
        return blocks

    def get_cached_block(self, block_hash: int) -> KVCacheBlock | None:
        """Returns the block registered under `block_hash`, free or not, or `None`."""
        return self.cached_block_hash_to_block.get(block_hash)

    def cache_full_block(self, block: KVCacheBlock, block_hash: int) -> None:
        """Registers `block`, which has just become full, under `block_hash`.

        If another block already holds this hash, the existing mapping is kept: it may be
        shared by other sequences already, and redirecting it would gain nothing.
        """
        if not self.enable_prefix_caching:
            return
        assert block.block_hash in (None, block_hash), (
            f"block {block.block_id} already holds hash {block.block_hash}"
        )
        block.block_hash = block_hash
        self.cached_block_hash_to_block.setdefault(block_hash, block)

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Adds one owner to each block, taking blocks that were free out of the free queue.

        Used for prefix hits and for sharing blocks with a forked sequence.
        """
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_block_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, blocks_in_eviction_order: Iterable[KVCacheBlock]) -> None:
        """Drops one owner from each block; blocks left without owners join the free tail.

        They are appended in the order given, so the first one is the first to be evicted.
        They keep their hash and can still be hit by a prefix lookup until they are reused.
        """
        for block in blocks_in_eviction_order:
            assert block.ref_cnt > 0, f"double free of block {block.block_id}"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_block_queue.append(block)

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached hash. Only possible while no block is in use.

        Returns:
            `True` if the cache was cleared, `False` if some block is still owned (the cache
            is then left untouched, because live sequences rely on their blocks' hashes).
        """
        if self.num_free_blocks != self.num_blocks:
            return False
        self.cached_block_hash_to_block.clear()
        for block in self.blocks:
            block.block_hash = None
        return True

    def _evict_cached_block(self, block: KVCacheBlock) -> None:
        """Clears `block`'s hash and its map entry, if the map points at this very block."""
        if block.block_hash is None:
            return
        if self.cached_block_hash_to_block.get(block.block_hash) is block:
            del self.cached_block_hash_to_block[block.block_hash]
        block.block_hash = None
