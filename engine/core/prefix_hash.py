"""Chained content hashes of full KV-cache blocks, the keys of the prefix cache.

A block's KV depends on every token before it, not only on its own tokens, so block `i`'s hash
covers block `i - 1`'s hash plus its own token ids. Equal hashes at the same index then mean
equal prefixes, and a prefix lookup can walk the chain and stop at the first miss.

The builtin `hash` of a tuple is used: it is fast (C code, no bytes encoding) and 64-bit, so
accidental collisions are negligible at cache sizes of millions of blocks. It is stable within
one process, which is all an in-memory cache needs; int hashes do not depend on
PYTHONHASHSEED, though a `str` extra key does.
TODO: offer SHA-256 when the cache is shared between tenants, where a crafted collision or a
timing probe could leak another tenant's prompt.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence


def hash_block_tokens(
    parent_hash: int | None,
    token_ids: Sequence[int],
    extra_key: Hashable | None = None,
) -> int:
    """Hashes one full block given the hash of the block before it.

    Args:
        parent_hash: Hash of the previous block, or `None` for the first block.
        token_ids: The block's token ids (exactly `block_size` of them).
        extra_key: Anything besides the token ids that changes the KV, e.g. the position
            structure of a structured prompt. It is folded into every block, so two prompts
            with the same tokens but different extra keys never share a block.

    Returns:
        The block's chained hash.
    """
    return hash((parent_hash, tuple(token_ids), extra_key))


def hash_full_blocks(
    token_ids: Sequence[int],
    block_size: int,
    extra_key: Hashable | None = None,
    num_blocks: int | None = None,
) -> list[int]:
    """Returns the chained hash of every full block of `token_ids`, first block first.

    Args:
        token_ids: The sequence's tokens; a trailing partial block is ignored.
        block_size: Tokens per block.
        extra_key: See `hash_block_tokens`.
        num_blocks: Hash at most this many leading blocks.
    """
    num_full_blocks = len(token_ids) // block_size
    if num_blocks is not None:
        num_full_blocks = min(num_full_blocks, num_blocks)
    hashes: list[int] = []
    parent_hash = None
    for i in range(num_full_blocks):
        block_tokens = token_ids[i * block_size : (i + 1) * block_size]
        parent_hash = hash_block_tokens(parent_hash, block_tokens, extra_key)
        hashes.append(parent_hash)
    return hashes
