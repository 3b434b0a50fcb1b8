"""Paged KV behind the `CacheManager` facade: prefix lookup, slot allocation, fork and free.

`KVCacheManager` maps sequence ids to block tables and decides how many blocks each sequence
needs; `BlockPool` does the bookkeeping of the blocks themselves. The manager speaks in tokens
(`num_computed_tokens`, `num_new_tokens`), so prefill, chunked prefill, decode and multi-token
steps are all the same call with different counts.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import msgspec

from engine.core.block_pool import BlockPool, KVCacheBlock
from engine.core.prefix_hash import hash_block_tokens


class KVBlocks(msgspec.Struct, frozen=True, gc=False):
    """An immutable list of physical block ids handed across the manager's boundary.

    Returned by `lookup_prefix` (the prefix-cache hits, to pass back to `allocate_slots`) and
    by `allocate_slots` (the blocks just allocated, for the model runner).
    """

    block_ids: tuple[int, ...] = ()


class _Sequence:
    """What the manager remembers about one sequence."""

    __slots__ = ("blocks", "block_hashes", "extra_key", "num_tokens")

    def __init__(
        self,
        extra_key: Hashable | None,
        blocks: list[KVCacheBlock] | None = None,
        block_hashes: list[int] | None = None,
        num_tokens: int = 0,
    ) -> None:
        # The block table, in token order.
        self.blocks: list[KVCacheBlock] = blocks if blocks is not None else []
        # Chained hashes of the leading full blocks registered so far; kept so each step only
        # hashes blocks that have just become full, instead of rehashing the whole sequence.
        self.block_hashes: list[int] = block_hashes if block_hashes is not None else []
        self.extra_key = extra_key
        # Tokens that have KV slots reserved: the blocks beyond this are not fully written.
        self.num_tokens = num_tokens


def _cdiv(a: int, b: int) -> int:
    """Ceiling division for non-negative ints."""
    return -(a // -b)


class KVCacheManager:
    """Tracks the block table of every sequence and allocates blocks for its tokens.

    A sequence id is any hashable value chosen by the caller (a request id, or a
    `(request_id, branch)` pair once a request forks). Sequences share physical blocks through
    reference counts: prefix-cache hits share full blocks between unrelated sequences, and
    `fork` shares a parent's full blocks with its child.

    Args:
        num_blocks: Number of physical KV blocks (the first dimension of each layer's cache).
        block_size: Tokens per block.
        enable_prefix_caching: Whether full blocks are hashed, kept after their sequence is
            freed, and reused by later sequences with the same prefix.
    """

    state_slots = False
    """Paged per-token KV (see `engine.state_cache_manager` for whole-sequence states)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        assert block_size > 0, f"block_size={block_size}"
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.block_pool = BlockPool(num_blocks, enable_prefix_caching)
        self._seqs: dict[Hashable, _Sequence] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence owns, including freed blocks that still serve prefix hits."""
        return self.block_pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks owned by at least one sequence, in `[0, 1]`."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def lookup_prefix(
        self, token_ids: Sequence[int], extra_key: Hashable | None = None
    ) -> tuple[KVBlocks, int]:
        """Finds the longest run of cached full blocks at the start of a new prompt.

        Changes no state: the hits are only taken when passed to `allocate_slots`, which must
        happen before any other allocation could evict them.

        Args:
            token_ids: The prompt.
            extra_key: Folded into every block hash; see `hash_block_tokens`.

        Returns:
            `(blocks, num_cached_tokens)`, with `num_cached_tokens == len(blocks) *
            block_size`. At most `(len(token_ids) - 1) // block_size` blocks are returned, so
            at least the last prompt token is computed: its logits are needed to sample.
            `(KVBlocks(()), 0)` when prefix caching is disabled.
        """
        if not self.enable_prefix_caching:
            return KVBlocks(()), 0
        bs = self.block_size
        max_blocks = max(0, (len(token_ids) - 1) // bs)
        block_ids: list[int] = []
        parent_hash = None
        # Hash lazily and stop at the first miss: a chained hash cannot hit after a miss.
        for i in range(max_blocks):
            block_tokens = token_ids[i * bs : (i + 1) * bs]
            parent_hash = hash_block_tokens(parent_hash, block_tokens, extra_key)
            block = self.block_pool.get_cached_block(parent_hash)
            if block is None:
                break
            block_ids.append(block.block_id)
        return KVBlocks(tuple(block_ids)), len(block_ids) * bs

    def allocate_slots(
        self,
        seq_id: Hashable,
        token_ids: Sequence[int],
        num_computed_tokens: int,
        num_new_tokens: int,
        cached: KVBlocks | None = None,
        extra_key: Hashable | None = None,
    ) -> KVBlocks | None:
        """Makes `seq_id` own enough blocks for `num_computed_tokens + num_new_tokens` tokens.

        On a sequence's first call, the prefix hits `cached` (from `lookup_prefix`) become the
        head of its block table, and `num_computed_tokens` must equal the tokens they cover.
        Every block that is full once the new tokens are written is registered in the prefix
        cache right away, so a sequence scheduled later can hit it.

        Args:
            seq_id: The sequence; created on its first call.
            token_ids: All tokens of the sequence known so far (prompt and outputs); at least
                `num_computed_tokens + num_new_tokens` of them.
            num_computed_tokens: Tokens whose KV is already in the sequence's blocks.
            num_new_tokens: Tokens the coming forward pass will write.
            cached: Prefix hits, only on the sequence's first call.
            extra_key: Folded into every block hash. Taken on the first call; later calls
                must pass `None` or the same key.

        Returns:
            The newly allocated blocks, in block-table order (possibly none), or `None` if
            there are too few free blocks, in which case no state has changed.
        """
        seq = self._seqs.get(seq_id)
        num_tokens = num_computed_tokens + num_new_tokens
        assert len(token_ids) >= num_tokens, f"{len(token_ids)} token ids for {num_tokens} slots"
        hit_blocks = self._get_hit_blocks(seq, cached, num_computed_tokens)
        num_owned = len(hit_blocks) + (len(seq.blocks) if seq is not None else 0)
        num_new_blocks = max(0, _cdiv(num_tokens, self.block_size) - num_owned)
        # A hit on a block that nobody owns pulls it out of the free queue, so it consumes
        # free capacity exactly like a new block does.
        num_free_needed = num_new_blocks + sum(block.ref_cnt == 0 for block in hit_blocks)
        if num_free_needed > self.num_free_blocks:
            return None

        if seq is None:
            seq = self._seqs[seq_id] = _Sequence(extra_key)
        assert extra_key is None or extra_key == seq.extra_key, "extra_key changed mid-sequence"
        # Touch before popping new blocks: a free hit block must not be evicted by this call.
        self.block_pool.touch(hit_blocks)
        new_blocks = self.block_pool.get_new_blocks(num_new_blocks)
        seq.blocks.extend(hit_blocks)
        seq.blocks.extend(new_blocks)
        seq.num_tokens = max(seq.num_tokens, num_tokens)
        if self.enable_prefix_caching:
            self._cache_full_blocks(seq, token_ids, num_tokens)
        return KVBlocks(tuple(block.block_id for block in new_blocks))

    def get_block_ids(self, seq_id: Hashable) -> list[int]:
        """Returns the block table of an allocated sequence, in token order."""
        return [block.block_id for block in self._seqs[seq_id].blocks]

    def fork(
        self, parent_id: Hashable, child_id: Hashable, num_tokens: int
    ) -> list[tuple[int, int]] | None:
        """Creates `child_id` as a copy of the first `num_tokens` tokens of `parent_id`.

        The parent's full blocks among those tokens are shared (one more owner each). A
        partially filled last block cannot be shared, because both sequences will write their
        next tokens into it; the child gets a fresh block instead, and the caller must copy the
        parent block's KV into it before the next forward pass (copy-on-write, done eagerly at
        fork time so that no later step has to check for it). Parent blocks past
        `num_tokens` are not shared.

        Returns:
            The `(src_block_id, dst_block_id)` KV copies to perform: empty when
            `num_tokens` is a multiple of `block_size`, one pair otherwise. `None` if no free
            block is left for the copy, in which case no state has changed.
        """
        parent = self._seqs[parent_id]
        assert child_id not in self._seqs, f"sequence {child_id!r} already exists"
        assert 0 <= num_tokens <= parent.num_tokens, f"fork at {num_tokens} of {parent.num_tokens}"
        num_shared, num_partial = divmod(num_tokens, self.block_size)
        if num_partial and self.num_free_blocks == 0:
            return None

        shared = parent.blocks[:num_shared]
        self.block_pool.touch(shared)
        child = _Sequence(
            parent.extra_key, list(shared), parent.block_hashes[:num_shared], num_tokens
        )
        self._seqs[child_id] = child
        if not num_partial:
            return []
        [dst_block] = self.block_pool.get_new_blocks(1)
        child.blocks.append(dst_block)
        return [(parent.blocks[num_shared].block_id, dst_block.block_id)]

    def free(self, seq_id: Hashable) -> None:
        """Releases the sequence's blocks and forgets it; unknown ids are ignored.

        Blocks are released tail first, so that among the blocks that become free, the tail
        (the block least likely to be shared with another prompt) is evicted first.
        """
        seq = self._seqs.pop(seq_id, None)
        if seq is not None:
            self.block_pool.free_blocks(reversed(seq.blocks))

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached block hash.

        Returns:
            `False`, changing nothing, while any block is still owned by a sequence.
        """
        return self.block_pool.reset_prefix_cache()

    def _get_hit_blocks(
        self, seq: _Sequence | None, cached: KVBlocks | None, num_computed_tokens: int
    ) -> list[KVCacheBlock]:
        """Validates `cached` against the sequence's state and resolves it to blocks."""
        if seq is not None:
            assert cached is None or not cached.block_ids, "prefix hits on a running sequence"
            assert num_computed_tokens <= seq.num_tokens
            return []
        hit_ids = cached.block_ids if cached is not None else ()
        assert num_computed_tokens == len(hit_ids) * self.block_size, (
            f"first allocation with {num_computed_tokens} computed tokens "
            f"but {len(hit_ids)} cached blocks"
        )
        hit_blocks = [self.block_pool.blocks[block_id] for block_id in hit_ids]
        # A hit evicted since lookup_prefix would have lost its hash; its KV is gone.
        assert all(block.block_hash is not None for block in hit_blocks), "stale prefix hit"
        return hit_blocks

    def _cache_full_blocks(
        self, seq: _Sequence, token_ids: Sequence[int], num_tokens: int
    ) -> None:
        """Registers each block that is full within `token_ids[:num_tokens]` but unregistered.

        Prefix hits are registered again under the hash they already hold, which doubles as a
        check that they still hold this sequence's tokens.
        """
        bs = self.block_size
        for i in range(len(seq.block_hashes), num_tokens // bs):
            parent_hash = seq.block_hashes[-1] if seq.block_hashes else None
            block_tokens = token_ids[i * bs : (i + 1) * bs]
            block_hash = hash_block_tokens(parent_hash, block_tokens, seq.extra_key)
            self.block_pool.cache_full_block(seq.blocks[i], block_hash)
            seq.block_hashes.append(block_hash)
