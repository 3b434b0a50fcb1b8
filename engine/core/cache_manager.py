"""The cache facade the scheduler and the engine call, whatever memory the model keeps.

Two managers implement it: `KVCacheManager` (paged per-token K/V blocks, prefix caching) and
`StateCacheManager` (one whole-sequence state slot per sequence, for linear attention). Both
speak in sequence ids, token counts and block ids, so the scheduler never asks which one it has;
the few rules that differ (a state cannot hold half a parallel set) read `state_slots`.
`create_cache_manager` picks the manager from the loaded model's memory kind. Pure Python.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

from engine.core.kv_cache_manager import KVBlocks, KVCacheManager
from engine.core.state_cache_manager import StateCacheManager

if TYPE_CHECKING:
    from engine.config import CacheConfig

MemoryKind = Literal["kv_blocks", "state_slots"]
"""What a model keeps per sequence: paged K/V rows per token, or one fixed-size state."""
MEMORY_KINDS: tuple[MemoryKind, ...] = ("kv_blocks", "state_slots")


@runtime_checkable
class CacheManager(Protocol):
    """Sequence id -> block table, and the allocation rules behind it.

    A "block" is a KV block of `block_size` tokens, or (state slots) a whole-sequence slot with
    `block_size == 1` in the facade's arithmetic and a block table of exactly one entry.
    Every method that cannot get memory returns `None` and changes no state.
    """

    num_blocks: int
    """Physical blocks (or slots): the first dimension of each layer's cache tensor."""
    block_size: int
    """Tokens per block; 1 for state slots."""
    enable_prefix_caching: bool
    state_slots: bool
    """True when sequences own one whole-sequence state each (no prefix reuse, forks only at
    the parent's computed end, a structured prompt's sets computed in one chunk)."""

    @property
    def num_free_blocks(self) -> int:
        """Blocks (slots) no sequence owns."""

    @property
    def usage(self) -> float:
        """Fraction of blocks owned by at least one sequence, in `[0, 1]`."""

    def lookup_prefix(self, token_ids: Sequence[int], extra_key: Hashable | None = None
                      ) -> tuple[KVBlocks, int]:
        """`(cached blocks, num_cached_tokens)` at the start of a new prompt; changes nothing."""

    def allocate_slots(self, seq_id: Hashable, token_ids: Sequence[int],
                       num_computed_tokens: int, num_new_tokens: int,
                       cached: KVBlocks | None = None, extra_key: Hashable | None = None
                       ) -> KVBlocks | None:
        """Makes `seq_id` own room for `num_computed_tokens + num_new_tokens` tokens; returns
        the newly allocated blocks, or None when memory is short."""

    def get_block_ids(self, seq_id: Hashable) -> list[int]:
        """The block table of an allocated sequence, in token order."""

    def fork(self, parent_id: Hashable, child_id: Hashable, num_tokens: int
             ) -> list[tuple[int, int]] | None:
        """Creates `child_id` from the first `num_tokens` tokens of `parent_id`; returns the
        `(src, dst)` block copies the runner must perform, or None when memory is short."""

    def free(self, seq_id: Hashable) -> None:
        """Releases the sequence's blocks and forgets it; unknown ids are ignored."""

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached prefix; False, changing nothing, while blocks are owned."""


def create_cache_manager(memory: MemoryKind, num_blocks: int,
                         cache_config: CacheConfig) -> CacheManager:
    """The manager for a model whose memory kind is `memory` (`LoadedModel.memory`), over
    `num_blocks` blocks or slots (the runner's cache tensors)."""
    if memory == "state_slots":
        return StateCacheManager(num_blocks)
    if memory == "kv_blocks":
        return KVCacheManager(num_blocks, cache_config.block_size,
                              cache_config.enable_prefix_caching)
    raise ValueError(f"memory={memory!r}: must be one of {MEMORY_KINDS}")
