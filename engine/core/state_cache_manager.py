"""State slots for linear-attention models, behind the `CacheManager` facade.

A linear-attention sequence keeps one fixed-size recurrent state per layer instead of a K/V
row per token, so its whole cache is one slot (vLLM's `MambaSpec` design: one "block" holds a
sequence's entire state). The scheduler and the strategies call the same methods as for paged
KV — `allocate_slots`, `fork`, `free`, `get_block_ids` — and see a block table of exactly one
entry, the slot id. Pure Python; the runner owns the state tensors and zeroes a slot whenever a
sequence computes its first token into it.

What does not carry over from paged KV:
- No prefix cache: a state mixes every token seen, so no prefix of it can be shared.
- Forks only at the parent's computed end: the state holds that point and no earlier one.
- A half-computed parallel set (Set-Based Prompting) cannot be represented (members must not
  see each other, while one running state mixes them), so `state_slots` tells the scheduler
  to compute a structured prompt's sets in one chunk.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from engine.core.kv_cache_manager import KVBlocks


class StateCacheManager:
    """Hands out whole-sequence state slots `0 .. num_slots - 1`.

    Args:
        num_slots: Number of state slots (the first dimension of each layer's state pool).
    """

    state_slots = True
    """Sequences own one whole-sequence state each (see the module docstring)."""
    block_size = 1
    """Tokens per 'block' in the facade's arithmetic; a slot holds any number of tokens."""
    enable_prefix_caching = False

    def __init__(self, num_slots: int) -> None:
        assert num_slots > 0, f"num_slots={num_slots}"
        self.num_blocks = num_slots
        # Free slots as a stack: the most recently freed slot is reused first (warm in cache).
        self._free = list(range(num_slots - 1, -1, -1))
        self._slots: dict[Hashable, int] = {}
        self._num_tokens: dict[Hashable, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def lookup_prefix(self, token_ids: Sequence[int], extra_key: Hashable | None = None
                      ) -> tuple[KVBlocks, int]:
        """Never a hit: no prefix of a state can be reused."""
        return KVBlocks(()), 0

    def allocate_slots(self, seq_id: Hashable, token_ids: Sequence[int],
                       num_computed_tokens: int, num_new_tokens: int,
                       cached: KVBlocks | None = None, extra_key: Hashable | None = None
                       ) -> KVBlocks | None:
        """Gives a new sequence a slot (returned); a known sequence needs nothing more.
        Returns None, changing nothing, when no slot is free."""
        assert cached is None or not cached.block_ids, "state slots have no prefix hits"
        num_tokens = num_computed_tokens + num_new_tokens
        if seq_id in self._slots:
            self._num_tokens[seq_id] = max(self._num_tokens[seq_id], num_tokens)
            return KVBlocks(())
        assert num_computed_tokens == 0, "a new sequence starts from an empty state"
        if not self._free:
            return None
        slot = self._slots[seq_id] = self._free.pop()
        self._num_tokens[seq_id] = num_tokens
        return KVBlocks((slot,))

    def get_block_ids(self, seq_id: Hashable) -> list[int]:
        return [self._slots[seq_id]]

    def fork(self, parent_id: Hashable, child_id: Hashable, num_tokens: int
             ) -> list[tuple[int, int]] | None:
        """Creates `child_id` with a copy of the parent's state, which must cover exactly
        `num_tokens` tokens. Returns the (src_slot, dst_slot) copy for the runner, or None,
        changing nothing, when no slot is free."""
        assert child_id not in self._slots, f"sequence {child_id!r} already exists"
        assert num_tokens == self._num_tokens[parent_id], (
            f"a state holds {self._num_tokens[parent_id]} tokens, cannot fork at {num_tokens}")
        if not self._free:
            return None
        slot = self._slots[child_id] = self._free.pop()
        self._num_tokens[child_id] = num_tokens
        return [(self._slots[parent_id], slot)]

    def free(self, seq_id: Hashable) -> None:
        """Returns the sequence's slot; unknown ids are ignored."""
        slot = self._slots.pop(seq_id, None)
        if slot is not None:
            del self._num_tokens[seq_id]
            self._free.append(slot)

    def reset_prefix_cache(self) -> bool:
        return True
