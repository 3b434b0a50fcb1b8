"""The whole server as one Ray Serve application, for clusters whose Serve applications are
declared in config: a KubeRay `RayService` (`deploy/rayservice.yaml`) or `serve deploy`.

    applications:
      - name: polydecode
        import_path: cluster.app:build
        args:
          argv: ["--replicas", "4", "--host", "0.0.0.0", "--model", "/models/..."]

`argv` is the `polydecode serve` command line. The application has two deployments:
`EngineReplica` (`--replicas` engine replicas, as `serve --replicas` deploys them) and
`Front`, one replica running polydecode's gRPC server (the same service, health, auth, limits
and drain) on `--host:--port` of its node, routing to those replicas through a deployment
handle. `Front` is placed on the Ray head node (KubeRay's head Service reaches it); Serve's
HTTP proxy is not used for requests. When Serve stops `Front` (a config update, deletion) it
drains: health NOT_SERVING, in-flight requests run up to `--drain-timeout`, the rest end with
FINISH_CANCELLED. Serve starts the new version of `Front` while the old one drains; it waits
for the port (up to `--drain-timeout` + 60 s). Pods that Kubernetes deletes (KubeRay replacing
the whole Ray cluster) end their streams with UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec
from ray import serve
from ray.serve import Application

from cluster.replica import ReplicaSetup, register
from cluster.replica_set import engine_deployment

BIND_WAIT_S = 60.0
"""How long past the drain timeout a new Front waits for the old one to free the port."""
HEAD_NODE_RESOURCE = "node:__internal_head__"
"""A resource only the Ray head node has: asking for a sliver of it places an actor there."""


class Front:
    """polydecode's gRPC server in a Serve replica; see the module docstring."""

    async def __init__(self, engine_config, config, setup: ReplicaSetup, engines) -> None:
        from server.app import GenerationServer

        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(message)s")
        register(msgspec.structs.replace(setup, datastores={}))  # the server opens those
        deadline = time.monotonic() + BIND_WAIT_S + config.drain_timeout_s
        while True:  # on an upgrade, the old Front holds the port until its drain ends
            try:
                self.server = GenerationServer(engine_config, config, replica_handle=engines)
                break
            except RuntimeError as exc:
                if "bind" not in str(exc) or time.monotonic() > deadline:
                    raise
                logging.getLogger("polydecode.server").info("port busy; retrying: %s", exc)
                await asyncio.sleep(1.0)
        await self.server.start()

    def check_health(self) -> None:
        if self.server.stopped.is_set():
            raise RuntimeError("the gRPC server has stopped")

    async def __del__(self) -> None:
        if not self.server.stopped.is_set():
            await self.server.drain()


def build(args: dict) -> Application:
    """Serve's application builder: `args["argv"]` is a `polydecode serve` command line, which
    must ask for replicas (`--replicas N`); `--ray-address` does not apply."""
    from server.cli import build_parser, import_plugins
    from server.serve_command import serve_configs

    argv = [str(a) for a in args.get("argv", [])]
    import_plugins(argv)
    parsed = build_parser().parse_args(["serve", *argv])
    engine_config, config = serve_configs(parsed)
    cluster = config.cluster
    if cluster.replicas < 1:
        raise ValueError("argv: give --replicas N (N >= 1)")
    setup = ReplicaSetup.of(engine_config, config.datastores, cluster)
    # Engine replicas outlive the front's drain, which ends or aborts their requests.
    engines = engine_deployment(setup, cluster, config.drain_timeout_s + 40.0).bind(setup)
    front = serve.deployment(Front).options(
        name="Front", num_replicas=1, max_ongoing_requests=1,
        ray_actor_options={"num_cpus": 1, "resources": {HEAD_NODE_RESOURCE: 0.001}},
        graceful_shutdown_timeout_s=config.drain_timeout_s + 30.0,
        health_check_period_s=5.0)
    return front.bind(engine_config, config, setup, engines)
