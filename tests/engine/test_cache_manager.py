"""The CacheManager facade: both managers implement every member, and the factory picks the
manager from the memory kind."""

from __future__ import annotations

import inspect
import typing

import pytest

from engine.core.cache_manager import MEMORY_KINDS, CacheManager, MemoryKind, create_cache_manager
from engine.config import CacheConfig
from engine.core.kv_cache_manager import KVCacheManager
from engine.core.state_cache_manager import StateCacheManager

MANAGERS = [KVCacheManager(8, 4), StateCacheManager(8)]
METHODS = ["lookup_prefix", "allocate_slots", "get_block_ids", "fork", "free",
           "reset_prefix_cache"]


def _protocol_members() -> set[str]:
    return {name for name in vars(CacheManager) if not name.startswith("_")} | set(
        typing.get_type_hints(CacheManager))


def test_protocol_lists_the_facade():
    assert _protocol_members() == {
        *METHODS, "num_blocks", "block_size", "enable_prefix_caching", "state_slots",
        "num_free_blocks", "usage"}


@pytest.mark.parametrize("manager", MANAGERS, ids=lambda m: type(m).__name__)
def test_manager_implements_every_member(manager):
    assert isinstance(manager, CacheManager)
    for name in _protocol_members():
        assert hasattr(manager, name), name
    for name in METHODS:
        # Same parameter names and order, so callers may pass any of them by keyword.
        expected = inspect.signature(getattr(CacheManager, name)).parameters
        actual = inspect.signature(getattr(type(manager), name)).parameters
        assert list(actual) == list(expected), name


def test_memory_kinds_match_the_literal():
    assert MEMORY_KINDS == typing.get_args(MemoryKind)


def test_factory_builds_paged_kv_from_cache_config():
    config = CacheConfig(block_size=8, enable_prefix_caching=False)
    manager = create_cache_manager("kv_blocks", 32, config)
    assert isinstance(manager, KVCacheManager)
    assert (manager.num_blocks, manager.block_size, manager.enable_prefix_caching) == (
        32, 8, False)
    assert not manager.state_slots


def test_factory_builds_state_slots_ignoring_block_size():
    manager = create_cache_manager("state_slots", 5, CacheConfig(block_size=8))
    assert isinstance(manager, StateCacheManager)
    assert (manager.num_blocks, manager.block_size, manager.num_free_blocks) == (5, 1, 5)
    assert manager.state_slots


def test_factory_rejects_unknown_memory_kind():
    with pytest.raises(ValueError, match="memory='pages'"):
        create_cache_manager("pages", 4, CacheConfig())
