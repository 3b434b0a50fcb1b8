"""Serve's request router for engine replicas: pinned calls, prefix affinity, then load.

Every call to the deployment passes through `choose_replicas`, which returns ranks of
replicas; Serve takes the least loaded replica of the first rank that accepts the request
(its queue below `max_ongoing_requests`), probing queue lengths when its cache has none.

1. A call with `replica=<unique id>` (the front's `load` of each replica) goes to that replica
   only; when it is gone, to any (the answer names the replica that gave it).
2. A generation with `prefix_key` (the engine's chained hash of the prompt's first full KV
   blocks, computed by the front) goes to the replica that was last sent that prefix, where its
   blocks are likely still cached, unless that replica has `imbalance` more requests in flight
   than the least loaded other one; then load decides, and the prefix moves with the request.
3. Everything else: Serve's default policy, power of two choices (two random replicas, the
   shorter queue wins), first among replicas in the front's availability zone when nodes carry
   one (and on its node, if the handle asks for that), then among all.
   Not Serve's FIFO matching: a replica found for one request serves that request, never an
   older one, or pinned and affine choices would be handed to other requests.

Routers register themselves in `cluster.ROUTERS` (one per deployment handle, in the caller's
process), so the front can list live replicas for `GetLoad` without asking the controller.
"""

from __future__ import annotations

import random
from collections import OrderedDict

from ray.serve.request_router import (LocalityMixin, PendingRequest, ReplicaID, RequestRouter,
                                      RunningReplica)

import cluster


class PrefixAffinityRouter(LocalityMixin, RequestRouter):
    """See the module docstring. `request_router_kwargs`: affinity (bool), imbalance (int),
    max_prefixes (int, the LRU map's size)."""

    def initialize_state(self, affinity: bool = True, imbalance: int = 4,
                         max_prefixes: int = 1 << 16, **_) -> None:
        self.affinity = affinity
        self.imbalance = imbalance
        self.max_prefixes = max_prefixes
        self._owners: OrderedDict[int, ReplicaID] = OrderedDict()
        """prefix key -> the replica last sent that prefix (least recently used first)."""
        cluster.ROUTERS.add(self)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None,
                              ) -> list[list[RunningReplica]]:
        kwargs = pending_request.kwargs if pending_request is not None else {}
        if pending_request is not None:  # retries back off, as Serve's own policies do
            pending_request.routing_context.should_backoff = True
        pinned = kwargs.get("replica")
        if pinned:
            match = [r for r in candidate_replicas if r.replica_id.unique_id == pinned]
            return [match] if match else [candidate_replicas]
        key = kwargs.get("prefix_key")
        if self.affinity and key is not None:
            owner = self._owner_if_not_busy(key, candidate_replicas)
            if owner is not None:
                rest = [r for r in candidate_replicas if r is not owner]
                return [[owner], self._two_choices(rest, pending_request)] if rest else [[owner]]
        return [self._two_choices(candidate_replicas, pending_request)]

    def _owner_if_not_busy(self, key: int,
                           candidates: list[RunningReplica]) -> RunningReplica | None:
        owner_id = self._owners.get(key)
        owner = next((r for r in candidates if r.replica_id == owner_id), None)
        if owner is None:
            return None
        lengths = {r.replica_id: self.replica_queue_len_cache.get(r.replica_id) or 0
                   for r in candidates}
        others = [n for rid, n in lengths.items() if rid != owner_id]
        if others and lengths[owner_id] - min(others) >= self.imbalance:
            return None
        return owner

    def _two_choices(self, candidates: list[RunningReplica],
                     pending_request: PendingRequest | None) -> list[RunningReplica]:
        local = self.apply_locality_routing(pending_request)
        pool = [r for r in candidates if r.replica_id in local] or candidates
        return random.sample(pool, min(2, len(pool)))

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result) -> None:
        key = pending_request.kwargs.get("prefix_key")
        if key is None or pending_request.kwargs.get("replica"):
            return
        self._owners[key] = replica_id
        self._owners.move_to_end(key)
        while len(self._owners) > self.max_prefixes:
            self._owners.popitem(last=False)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        for key in [k for k, rid in self._owners.items() if rid == replica_id]:
            del self._owners[key]

    def replica_ids(self) -> list[str]:
        """Unique ids of the replicas this router can route to now."""
        return sorted(rid.unique_id for rid in list(self.curr_replicas))

