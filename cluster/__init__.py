"""Engine replicas on Ray Serve behind the gRPC front (`polydecode serve --replicas N`).

- `replica.EngineReplica`: the Serve deployment; each replica is one Engine in its own process,
  streaming its outputs back through a streaming deployment handle.
- `router.PrefixAffinityRouter`: Serve's request router for it: a pinned call (load) reaches
  the replica it names; prompts sharing their first KV blocks go to the replica that served
  that prefix last, unless it is busier than the rest.
- `replica_set.ReplicaSet`: the front's side, with the submit / abort / load surface the
  in-process `AsyncEngine` has, so the server's request path is the same in both modes.

Ray is imported only here, and this package only when `--replicas` is given.
"""

import weakref

ROUTERS: weakref.WeakSet = weakref.WeakSet()
"""Every `router.PrefixAffinityRouter` alive in this process. It lives here, not in
`router`: Serve ships a router class by value, with copies of its module's globals."""


def live_replica_ids(app_name: str) -> list[str]:
    """Unique ids of the live replicas of `app_name`'s deployment, as its routers see them."""
    for router in list(ROUTERS):
        if router.app_name == app_name:
            return router.replica_ids()
    return []
