"""Scheduling and memory: sequences (`Request`), the block pool and prefix hashes, the cache
managers behind the `CacheManager` facade, and the scheduler. Pure Python: no torch."""
