"""One engine replica: the Ray Serve deployment class behind `serve --replicas N`.

Each replica is a Serve replica actor, so its own process: it registers the same plug-ins,
predicates, scorers and datastores the front was started with (datastores are memory-mapped
read-only, so replicas on one machine share their pages; on several machines every node needs
the same paths, see README "Serving on several machines"), builds its Engine on a thread of its
own and steps it there (`AsyncEngine.run_forever`, one torch thread for the process's life).

`generate` is a streaming method: its first item is `Accepted` (the engine's request id, the
prompt's token count and this replica's id, which the front uses to pin later calls), then
lists of `RequestOutput`, all that were ready each time (one Ray object per list, not per
token). A request the engine refuses (InvalidArgument, NotFound, ResourceExhausted: the
client's doing, not the replica's) streams one `Rejected` instead, which the front re-raises;
raising it here would log it as a replica failure. When the front cancels the call (its
client left, or `Abort`), the generator is closed and the request aborted, which frees its KV
blocks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import secrets
import threading
from collections.abc import Sequence

import msgspec
from ray import serve

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.engine import Engine
from engine.errors import InvalidArgument, NotFound, ResourceExhausted
from engine.sampling_params import SamplingParams

WARMUP_PROMPT = "Hello"


class ReplicaSetup(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a replica process needs to serve what the front serves."""

    engine: EngineConfig
    datastores: dict[str, str] = {}
    """kNN-LM datastores, name -> directory (the same paths on every node)."""
    scorers: list[str] = []
    """RankGen-format scorers, `NAME=DIR` as `serve --scorer` takes them."""
    predicates: list[str] = []
    """`NAME=module:function`, as `serve --predicate` takes them."""
    plugins: list[str] = []
    """Modules that register strategies and transforms (`--plugin`)."""

    @classmethod
    def of(cls, engine: EngineConfig, datastores: dict[str, str], cluster) -> ReplicaSetup:
        """What a server with `datastores` and `cluster` (a `server.config.Cluster`) serves."""
        return cls(engine=engine, datastores=datastores, scorers=cluster.scorers,
                   predicates=cluster.predicates, plugins=cluster.plugins)


class Accepted(msgspec.Struct, frozen=True, gc=False):
    """The first item of a replica's stream: the request was admitted."""

    req_id: str
    num_prompt_tokens: int
    replica: str


class Rejected(msgspec.Struct, frozen=True):
    """The only item of a replica's stream when its engine refused the request."""

    error: Exception


def register(setup: ReplicaSetup) -> None:
    """Loads the setup's plug-ins, predicates, scorers and datastores into this process
    (ValueError / OSError / ImportError name the one that failed)."""
    from constraints.predicates import load_predicate
    from engine.loader import model_fingerprint, resolve_model_dir
    from retrieval import stores
    from server.cli import load_scorer

    for module in setup.plugins:
        importlib.import_module(module)
    for spec in setup.predicates:
        load_predicate(spec)
    for spec in setup.scorers:
        load_scorer(spec)
    if setup.datastores:
        fingerprint = model_fingerprint(resolve_model_dir(setup.engine.model.model))
        for name, path in setup.datastores.items():
            if name not in stores.open_datastores():
                stores.open_datastore(name, path, fingerprint)


def _run_engine(config: EngineConfig, ready: concurrent.futures.Future) -> None:
    """The engine thread: builds and warms the engine, then steps it until shut down."""
    try:
        engine = Engine(config)
        engine.generate([WARMUP_PROMPT], SamplingParams(max_new_tokens=2, temperature=0.0))
        front = AsyncEngine(engine, start_thread=False)
    except BaseException as exc:  # noqa: BLE001 - the constructor re-raises it
        ready.set_exception(exc)
        return
    ready.set_result(front)
    front.run_forever()


class EngineReplica:
    """The deployment class (options are set by `ReplicaSet` when it deploys)."""

    def __init__(self, setup: ReplicaSetup) -> None:
        register(setup)
        self.replica = serve.get_replica_context().replica_id.unique_id
        ready: concurrent.futures.Future = concurrent.futures.Future()
        threading.Thread(target=_run_engine, args=(setup.engine, ready),
                         name="polydecode-engine", daemon=True).start()
        self.front: AsyncEngine = ready.result()

    def describe(self):
        """(this replica's id, the ModelCard of what it serves)."""
        from server.model_card import ModelCard

        return self.replica, ModelCard.of(self.front.engine)

    async def generate(self, prompt, params: SamplingParams, captures: Sequence[str] = (),
                       extra_key=None, prefix_key: int | None = None):
        """Streams `Accepted`, then lists of outputs; `prefix_key` is the router's."""
        try:
            compiled = None
            if params.constraint is not None:
                compiled = await self.front.engine.constraints.compile_async(params.constraint)
            stream = self.front.submit(prompt, params, secrets.token_hex(16), captures=captures,
                                       extra_key=extra_key, compiled=compiled)
        except (InvalidArgument, NotFound, ResourceExhausted) as exc:
            yield Rejected(exc)
            return
        try:
            yield Accepted(stream.req_id, stream.num_prompt_tokens, self.replica)
            async for out in stream:
                batch = [out]
                while not batch[-1].finished and stream.has_ready():
                    batch.append(await stream.__anext__())
                yield batch
        finally:
            await stream.aclose()

    def load(self, replica: str | None = None) -> dict:
        return {"replica": self.replica, **self.front.load()}

    async def score(self, hidden, labels: list[int], replica: str | None = None):
        """Listwise rerank scores of a request's captured LM-head input (the front has no
        LM head)."""
        from reranking.listwise import score_hidden

        return await asyncio.to_thread(score_hidden, self.front.engine, hidden, labels)

    def check_health(self) -> None:
        """Serve calls this periodically; a failed engine loop restarts the replica."""
        if self.front.error is not None:
            raise RuntimeError(f"engine failed: {self.front.error!r}")

    def __del__(self) -> None:
        front = getattr(self, "front", None)
        if front is not None:
            front.shutdown()
