"""Soak test: does the server stay correct and bounded through N minutes of mixed, hostile
traffic and one drain-and-restart?

Starts `python -m server serve` (the `polydecode serve` CLI) with a small KV cache
(`--num-blocks` 64: preemption under load); `--concurrency` asyncio clients then loop over
random scenarios for `--minutes`: stream / unary (greedy, seeded sampling, contrastive, beam or
`plugin`; text, token-id and chat prompts of 2-320 tokens, 1-48 new tokens, stops, time limits,
logprobs, cache salts); cancel (by the client, mid-stream); abort (`Abort` of the client's own
`request_id`: the stream still ends with one Finished); deadline (0.05-1.5 s timeouts); bad
(invalid values, unknown plugin, too many stops, prompts over the limit or the KV cache,
reserved fields); raw (corrupt wire format, invalid UTF-8 in a string field, truncated bytes);
repeat (fixed greedy and seeded requests: each full-length answer must equal the first).

Calls not meant to expire carry `--request-timeout`: one that reaches it is `hung`; one still
open when the clients stop is `lost`. A probe calls the readiness check every 50 ms. Halfway,
the server gets SIGTERM: the probe must see NOT_SERVING, a new call UNAVAILABLE, streams
admitted before it must end OK (done, or FINISH_CANCELLED after `--drain-timeout`), the process
must exit 0; it is started again on the same port (fresh channels). After the traffic, GetLoad
must show no running or waiting request and no KV block in use. `--health-p99-ms` 250: the
check runs on the server's event loop, never behind a model step (README's serve ITL p99 is
~700 ms); 250 ms is a quarter of Kubernetes' default 1 s probe timeout.

    python bench/soak.py [--minutes 10] [--num-blocks 64] [--concurrency 8] [--seed 0]
        [--port P] [--api-key KEY] [--server-arg=--metrics-port=9100 ...]

`--server-arg` is split like a shell line and appended to the serve command (later options
win). `--api-key KEY` starts the server with that key and sends `authorization: Bearer KEY` on
every call; `--tls-ca` etc. connect to a server given TLS flags through `--server-arg`.
Progress on stderr every 10 s, one JSON line on stdout; exit status 1 when not `ok`.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import shlex
import signal
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__":  # the repo root instead of bench/: bench/profile.py would shadow
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the standard library's profile

import grpc  # noqa: E402
from google.protobuf import struct_pb2  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from bench.common import emit  # noqa: E402
from bench.serve import READY_SERVICE, ServerProcess, free_port, log  # noqa: E402
from server.auth import client_channel  # noqa: E402
from server.cli import add_client_security_args  # noqa: E402
from server.pb import pb, pb_grpc  # noqa: E402

GENERATE, GENERATE_STREAM = f"/{READY_SERVICE}/Generate", f"/{READY_SERVICE}/GenerateStream"
# A restarted server must be found at once, not after the channel's default back-off (which
# grows to tens of seconds while the port is closed).
CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100),
                   ("grpc.min_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000)]
SCENARIOS = {"stream": 28, "unary": 14, "cancel": 10, "abort": 10, "deadline": 10, "bad": 14,
             "raw": 8, "repeat": 6}
"""Scenario -> weight of each client's random choice."""
TEXTS = ("The quick brown fox jumps over the lazy dog.",
         "Paged attention stores the KV cache in fixed-size blocks.",
         "Once upon a time, in a small village by the sea, there lived an old fisherman.",
         "Explain why the sky is blue in two sentences.",
         "def fibonacci(n):\n    ",
         "In 1905, Albert Einstein published four papers that")


def percentile(xs: list[float], q: float) -> float | None:
    """Nearest-rank percentile, rounded to 0.01 (None without values)."""
    return round(sorted(xs)[max(0, math.ceil(q / 100 * len(xs)) - 1)], 2) if xs else None


def rss_mb(pid: int) -> float | None:
    """VmRSS of a process from /proc, in MiB (None once it has exited)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        return round(int(next(x for x in lines if x.startswith("VmRSS:")).split()[1]) / 1024, 1)
    except (OSError, StopIteration):
        return None


class Conn:
    """A channel, its stubs and raw (bytes in) methods; `reopen()` swaps in a fresh channel."""

    def __init__(self, address: str, args: argparse.Namespace) -> None:
        self.address, self.args, self.old = address, args, []  # args: --api-key, --tls*
        self.reopen()

    def reopen(self) -> None:
        if hasattr(self, "channel"):
            self.old.append(self.channel)
        self.channel = ch = client_channel(self.address, self.args, CHANNEL_OPTIONS)
        self.stub, self.health = pb_grpc.GenerationStub(ch), health_pb2_grpc.HealthStub(ch)
        # request_serializer=None: the bytes go out as they are.
        self.raw_unary = ch.unary_unary(GENERATE, request_serializer=None,
                                        response_deserializer=pb.GenerateResult.FromString)
        self.raw_stream = ch.unary_stream(GENERATE_STREAM, request_serializer=None,
                                          response_deserializer=pb.GenerateEvent.FromString)

    async def readiness(self, timeout: float = 2.0) -> str:
        """The readiness status name, or the status code name of a failed check."""
        try:
            resp = await self.health.Check(health_pb2.HealthCheckRequest(service=READY_SERVICE),
                                           timeout=timeout)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name


class Traffic:
    """Random requests of every scenario, within the limits `info` reports."""

    def __init__(self, rng: random.Random, info: pb.ModelInfo, num_blocks: int) -> None:
        self.rng, self.info, self.limits = rng, info, info.limits
        self.kv_tokens = num_blocks * info.kv_block_size  # 0: state slots, no token capacity
        # Valid prompts stay well inside the cache even with 6 contrastive or 4 beam branches.
        self.max_prompt = min(320, self.kv_tokens // 4) if self.kv_tokens else 320

    def prompt(self) -> pb.Prompt:
        r, kind = self.rng, self.rng.random()
        if kind < 0.4:
            text = " ".join(r.choice(TEXTS) for _ in range(r.randint(1, 6)))
            return pb.Prompt(segments=[pb.Segment(text=text)])
        if kind < 0.75:
            ids = [r.randrange(100, self.info.vocab_size)
                   for _ in range(r.randint(2, self.max_prompt))]
            return pb.Prompt(segments=[pb.Segment(tokens=pb.TokenIds(ids=ids))])
        messages = [pb.ChatMessage(role="user", content=" ".join(r.sample(TEXTS, r.randint(1, 3))))]
        if r.random() < 0.5:
            messages.insert(0, pb.ChatMessage(role="system", content="You are concise."))
        return pb.Prompt(messages=messages)

    def strategy(self) -> tuple[str, pb.DecodingStrategy]:
        r = self.rng
        name = r.choices("greedy sampling contrastive beam plugin".split(), (3, 3, 2, 1, 1))[0]
        beams, params = r.randint(2, 4), struct_pb2.Struct()
        params.update({"temperature": 0.8, "top_p": 0.95, "seed": r.randrange(1000)})
        if name == "plugin" and "sampling" not in self.info.strategies:
            name = "greedy"
        return name, pb.DecodingStrategy(**{
            "greedy": {"greedy": pb.Greedy()},
            "sampling": {"sampling": pb.Sampling(
                temperature=r.uniform(0.5, 1.3), top_k=r.choice([0, 20, 50]),
                top_p=r.choice([0.9, 1.0]), seed=r.randrange(1 << 31))},
            "contrastive": {"contrastive": pb.ContrastiveSearch(top_k=r.randint(2, 6),
                                                                penalty_alpha=0.6)},
            "beam": {"beam": pb.BeamSearch(num_beams=beams, num_return=r.randint(1, beams),
                                           early_stopping=r.random() < 0.5)},
            "plugin": {"plugin": pb.Plugin(name="sampling", params=params)}}[name])

    def request(self, max_new: int = 48) -> tuple[str, pb.GenerateRequest]:
        """A valid request and its strategy name."""
        r = self.rng
        name, decoding = self.strategy()
        stopping = pb.Stopping(max_new_tokens=r.randint(1, max_new), ignore_eos=r.random() < 0.3,
                               time_limit_ms=r.randint(50, 2000) if r.random() < 0.1 else 0)
        if name != "beam" and r.random() < 0.3:  # beam returns whole candidates: no stops
            stopping.stop_sequences.extend(r.sample([".", "\n", " the", "!"], r.randint(1, 2)))
        if r.random() < 0.2:
            stopping.min_new_tokens = min(4, stopping.max_new_tokens)
        req = pb.GenerateRequest(prompt=self.prompt(), decoding=decoding, stopping=stopping,
                                 cache_salt=f"salt-{r.randrange(4)}" if r.random() < 0.3 else "")
        if name in ("greedy", "sampling", "plugin") and r.random() < 0.2:
            req.response.top_logprobs = r.randint(1, 3)
        req.response.candidate_scores = name == "beam" and r.random() < 0.5
        return name, req

    def bad(self) -> tuple[str, pb.GenerateRequest, str]:
        """An invalid request, its case name and the status code it must get."""
        lim, vocab, kv = self.limits, self.info.vocab_size, self.kv_tokens
        req = pb.GenerateRequest(prompt=pb.Prompt(segments=[pb.Segment(text=TEXTS[0])]),
                                 stopping=pb.Stopping(max_new_tokens=8))
        d, s, p = req.decoding, req.stopping, req.prompt.segments[0]
        cases = {
            "top_p_2": lambda: setattr(d.sampling, "top_p", 2.0),
            "nan_temperature": lambda: setattr(d.sampling, "temperature", math.nan),
            "unknown_plugin": lambda: setattr(d.plugin, "name", "no-such-strategy"),
            "too_many_stops": lambda: s.stop_sequences.extend(["."] * (lim.max_stop_sequences + 1)),
            "long_stop": lambda: s.stop_sequences.append("x" * (lim.max_stop_bytes + 1)),
            "beam_with_stop": lambda: (d.beam.SetInParent(), s.stop_sequences.append(".")),
            "max_new_over_limit": lambda: setattr(s, "max_new_tokens", lim.max_new_tokens + 1),
            "prompt_over_limit": lambda: p.tokens.ids.extend([100] * (lim.max_prompt_tokens + 1)),
            "huge_text": lambda: setattr(p, "text", " ".join(TEXTS) * 400),  # ~50k tokens
            "token_over_vocab": lambda: p.tokens.ids.extend([vocab]),
            "priority": lambda: setattr(req, "priority", 1),
            "knn_lm": lambda: setattr(req.knn_lm, "datastore", "no-such-datastore"),
            "constraint": lambda: setattr(req.constraint, "regex", "[a-z]+"),
        }
        if kv:  # within the prompt limit, not the KV cache: it could never be scheduled
            cases["prompt_over_kv"] = lambda: p.tokens.ids.extend([100] * (kv + 16))
        case = self.rng.choice(sorted(cases))
        cases[case]()
        if case == "knn_lm":
            return case, req, "NOT_FOUND"
        unimplemented = case in ("priority", "constraint")
        return case, req, "UNIMPLEMENTED" if unimplemented else "INVALID_ARGUMENT"

    def raw(self) -> tuple[str, bytes]:
        """Bytes that do not parse as a GenerateRequest, and the case name."""
        def field(tag: int, payload: bytes) -> bytes:  # a length-delimited field, < 128 bytes
            return bytes([tag, len(payload)]) + payload
        bad = bytes([0xff, 0xfe, 0xc3])  # not UTF-8
        cases = {  # tags: 0x0a field 1, 0x12 field 2, 0x1a field 3 (wire type 2)
            "corrupt_wire": b"\x0f" + self.rng.randbytes(self.rng.randint(0, 64)),  # type 7
            "utf8_request_id": field(0x0a, bad),
            "utf8_prompt_text": field(0x12, field(0x0a, field(0x0a, bad))),
            "utf8_chat_content": field(0x12, field(0x1a, field(0x12, bad))),
            "truncated": REPEATS[0].SerializeToString()[:-5],
        }
        case = self.rng.choice(sorted(cases))
        return case, cases[case]


REPEATS = tuple(pb.GenerateRequest(
    prompt=pb.Prompt(segments=[pb.Segment(text=TEXTS[i])]), decoding=decoding,
    stopping=pb.Stopping(max_new_tokens=12, ignore_eos=True)) for i, decoding in (
        (2, pb.DecodingStrategy(greedy=pb.Greedy())),
        (5, pb.DecodingStrategy(sampling=pb.Sampling(temperature=1.0, seed=7)))))
"""Requests whose tokens must not depend on what else is batched (greedy, seeded sampling)."""


@dataclass(eq=False)
class Call:
    """One RPC: its scenario, the codes it may end with, and how it ended."""
    scenario: str
    detail: str  # strategy, bad-request or raw case
    expected: frozenset[str]  # status code names; "OK" covers every finish reason
    start: float
    end: float | None = None
    outcome: str | None = None  # "OK:<FinishReason>" or a status code name
    admitted: float | None = None  # when a stream's Started event arrived
    num_finished: int | None = None  # Finished events of a stream that ended OK


class Soak:
    """Everything one run shares: servers, channel, every call, health samples, clocks."""

    def __init__(self, args: argparse.Namespace, cmd: list[str]) -> None:
        self.args, self.cmd = args, cmd
        self.servers: list[ServerProcess] = []
        self.conn, self.info = None, None  # Conn, ModelInfo: made in `run`, on the loop
        self.calls: list[Call] = []
        self.violations, self.examples = [], {}  # examples: unexpected outcome -> a message
        self.aborts, self.first_tokens, self.repeat_mismatches = Counter(), {}, 0
        self.health_ms, self.health = [], {"serving": Counter(), "draining": Counter()}
        self.phase, self.up = "serving", asyncio.Event()  # up: a server process runs
        self.window: list | None = None  # [SIGTERM, SERVING again]: UNAVAILABLE is expected
        self.drain, self.drain_inflight = {"sigterm_drains": 0, "restarts": 0}, []
        self.rss, self.crashed, self.t0, self.end_time = [], None, 0.0, 0.0  # rss: per process

    @property
    def server(self) -> ServerProcess:
        return self.servers[-1]

    async def start_server(self) -> float:
        """Starts a server process and waits until it is SERVING; returns the seconds taken."""
        start = time.monotonic()
        self.servers.append(ServerProcess(self.cmd))
        if len(self.servers) > 1:
            self.conn.reopen()
        while (status := await self.conn.readiness()) != "SERVING":
            self.server.check_alive()  # raises with the log tail if it died
            if time.monotonic() - start > self.args.startup_timeout:
                raise TimeoutError(f"server not SERVING after {self.args.startup_timeout:.0f}s "
                                   f"(last: {status})")
            await asyncio.sleep(0.2)
        self.rss.append({"pid": self.server.proc.pid, "ready": rss_mb(self.server.proc.pid)})
        return time.monotonic() - start

    def begin(self, scenario: str, detail: str, *expected: str) -> Call:
        self.calls.append(Call(scenario, detail, frozenset(expected), time.monotonic()))
        return self.calls[-1]

    def end(self, call: Call, outcome: str, error: str = "") -> None:
        call.end, call.outcome = time.monotonic(), outcome
        if not self.is_expected(call):  # + seconds from the start: sent, Started, ended
            when = [t and round(t - self.t0, 2) for t in (call.start, call.admitted, call.end)]
            self.examples.setdefault(f"{call.scenario}:{call.detail}:{outcome}",
                                     f"{error[:300]} {when} while {self.phase}")

    def is_expected(self, call: Call) -> bool:
        code = call.outcome.split(":")[0]
        if code == "UNAVAILABLE" and self.window is not None:  # refused while draining/down
            return call.end >= self.window[0] and (self.window[1] is None
                                                   or call.start <= self.window[1])
        return code in call.expected and call.outcome != "OK:NO_FINISHED"


async def send(soak: Soak, call: Call, req: pb.GenerateRequest | bytes, timeout: float,
               streamed: bool, cancel_after: int | None = None, on_started=lambda: None
               ) -> pb.GenerateResult | None:
    """Makes the call (raw when `req` is bytes) and records how it ended; returns an OK unary
    call's result. A stream is cancelled by the client after `cancel_after` deltas (0: right
    after Started); `on_started()` runs when its Started event arrives."""
    conn, raw = soak.conn, isinstance(req, bytes)
    try:
        if not streamed:
            result = await (conn.raw_unary if raw else conn.stub.Generate)(
                req, timeout=timeout)
            if result.finished.reason == pb.FINISH_UNSPECIFIED:
                soak.violations.append(f"{call.scenario}/{call.detail}: no finish reason")
            soak.end(call, f"OK:{pb.FinishReason.Name(result.finished.reason)}")
            return result
        rpc = (conn.raw_stream if raw else conn.stub.GenerateStream)(
            req, timeout=timeout)
        kinds, finished = [], None
        async for event in rpc:
            kinds.append(kind := event.WhichOneof("event"))
            if kind == "started":
                call.admitted = time.monotonic()
                on_started()
            finished = event.finished if kind == "finished" else finished
            if cancel_after is not None and kind != "finished" \
                    and kinds.count("delta") >= cancel_after:
                rpc.cancel()
                return soak.end(call, (await rpc.code()).name)
    except grpc.aio.AioRpcError as exc:
        return soak.end(call, exc.code().name, exc.details() or "")
    call.num_finished = kinds.count("finished")
    if call.num_finished != 1 or kinds[0] != "started" or kinds[-1] != "finished":
        soak.violations.append(f"{call.scenario}/{call.detail}: events {kinds[:3]}..{kinds[-3:]}")
    soak.end(call, f"OK:{pb.FinishReason.Name(finished.reason) if finished else 'NO_FINISHED'}")


async def do_single(soak: Soak, traffic: Traffic, scenario: str) -> Call:
    """Every scenario but abort: one call, streamed or not."""
    r, timeout, cancel_after = traffic.rng, soak.args.request_timeout, None
    streamed = {"stream": True, "cancel": True, "unary": False,
                "repeat": False}.get(scenario, r.random() < 0.5)
    expected = {"cancel": ("OK", "CANCELLED"), "deadline": ("OK", "DEADLINE_EXCEEDED"),
                "raw": ("INVALID_ARGUMENT",)}.get(scenario, ("OK",))
    if scenario in ("stream", "unary", "cancel", "deadline"):
        detail, req = traffic.request(max_new=64 if scenario == "deadline" else 48)
    if scenario == "cancel":
        cancel_after = r.randint(0, 4)
        req.stopping.max_new_tokens = max(req.stopping.max_new_tokens, 16)
    elif scenario == "deadline":
        req.stopping.ignore_eos, timeout = True, r.uniform(0.05, 1.5)
    elif scenario == "bad":
        (detail, req, code), timeout = traffic.bad(), 30.0
        expected = (code,)
    elif scenario == "raw":
        (detail, req), timeout = traffic.raw(), 30.0
        detail += "/stream" if streamed else "/unary"
    elif scenario == "repeat":
        index = r.randrange(len(REPEATS))
        detail, req = ("greedy", "seeded_sampling")[index], REPEATS[index]
    call = soak.begin(scenario, detail, *expected)
    result = await send(soak, call, req, timeout, streamed, cancel_after)
    if scenario == "repeat" and result is not None and result.finished.reason == pb.FINISH_LENGTH:
        first, tokens = soak.first_tokens.setdefault(index, result.token_ids), result.token_ids
        if first != tokens:
            soak.repeat_mismatches += 1
            soak.examples.setdefault(f"repeat:{detail}:MISMATCH", f"first {first}, now {tokens}")
    return call


async def do_abort(soak: Soak, traffic: Traffic, scenario: str = "abort") -> Call:
    """A stream with its own request id, aborted 0-1 s after Started (racing its end)."""
    name, req = traffic.request()
    req.request_id = f"soak-{uuid.uuid4().hex[:12]}"
    delay, tasks = traffic.rng.uniform(0.0, 1.0), []

    async def abort() -> None:
        await asyncio.sleep(delay)
        try:
            resp = await soak.conn.stub.Abort(pb.AbortRequest(request_ids=[req.request_id]),
                                              timeout=10.0)
            soak.aborts["aborted" if resp.aborted == 1 else f"aborted={resp.aborted}"] += 1
        except grpc.aio.AioRpcError as exc:
            soak.aborts[exc.code().name] += 1
    call = soak.begin(scenario, name, "OK")
    await send(soak, call, req, soak.args.request_timeout, True,
               on_started=lambda: tasks.append(asyncio.create_task(abort())))
    await asyncio.gather(*tasks)
    return call


async def client(soak: Soak, index: int) -> None:
    """Random scenarios until the end time; waits while no server runs, backs off when draining."""
    rng = random.Random(f"{soak.args.seed}-{index}")
    traffic = Traffic(rng, soak.info, soak.args.num_blocks)
    while time.monotonic() < soak.end_time:
        await soak.up.wait()
        scenario = rng.choices(list(SCENARIOS), list(SCENARIOS.values()))[0]
        call = await (do_abort if scenario == "abort" else do_single)(soak, traffic, scenario)
        if call.outcome == "UNAVAILABLE":
            await asyncio.sleep(0.5)


async def probe_health(soak: Soak) -> None:
    """The readiness check every 50 ms while a server process runs."""
    while time.monotonic() < soak.end_time:
        await soak.up.wait()
        start = time.perf_counter()
        status = await soak.conn.readiness()
        elapsed = time.perf_counter() - start
        if soak.up.is_set():  # the phase when the answer came: SIGTERM may fall in the call
            soak.health_ms.append(elapsed * 1000.0)
            soak.health.setdefault(soak.phase, Counter())[status] += 1
        await asyncio.sleep(max(0.0, 0.05 - elapsed))


async def drain_and_restart(soak: Soak) -> None:
    """SIGTERM halfway through: checks the drain, then starts the server again."""
    await asyncio.sleep(max(0.0, soak.t0 + (soak.end_time - soak.t0) / 2 - time.monotonic()))
    if soak.crashed is not None:
        return
    server, d, sigterm = soak.server, soak.drain, time.monotonic()
    soak.rss[-1]["before_sigterm"] = rss_mb(server.proc.pid)
    soak.drain_inflight = [c for c in soak.calls if c.end is None and c.admitted is not None
                           and c.scenario in ("stream", "abort")]  # run to their end
    soak.phase, soak.window = "draining", [sigterm, None]
    log(f"[soak] SIGTERM to pid {server.proc.pid}; {len(soak.drain_inflight)} streams in flight")
    # stop(): SIGTERM, wait (SIGKILL after the timeout); it keeps the log of an unclean exit.
    stopping = asyncio.create_task(asyncio.to_thread(server.stop, soak.args.drain_timeout + 30))
    d.update(sigterm_drains=1, sigterm_at_s=round(sigterm - soak.t0, 1), not_serving_after_s=None)
    while time.monotonic() - sigterm < 10 and not stopping.done():
        if await soak.conn.readiness() == "NOT_SERVING":
            d["not_serving_after_s"] = round(time.monotonic() - sigterm, 3)
            break
        await asyncio.sleep(0.02)
    new = soak.begin("drain_new_call", "greedy", "UNAVAILABLE")
    await send(soak, new, REPEATS[0], 10.0, False)
    d["new_call"] = new.outcome
    await stopping
    d["exit_code"] = server.proc.returncode
    soak.up.clear()
    soak.phase, d["drain_s"] = "restarting", round(time.monotonic() - sigterm, 2)
    d["restart_s"] = round(await soak.start_server(), 2)
    d["restarts"], soak.window[1], soak.phase = 1, time.monotonic(), "serving"
    log(f"[soak] drained in {d['drain_s']}s (exit {d['exit_code']}); SERVING again after "
        f"{d['restart_s']}s")
    soak.up.set()


async def watch(soak: Soak, clients: list[asyncio.Task]) -> None:
    """Progress every 10 s; a server that dies outside the drain ends the traffic."""
    tick = 0
    while not all(t.done() for t in clients):
        await asyncio.sleep(1.0)
        tick += 1
        if soak.phase == "serving" and soak.up.is_set() and soak.server.proc.poll() is not None:
            soak.crashed = soak.server.proc.returncode
            log(f"[soak] server died (exit {soak.crashed}):\n{soak.server.tail()}")
            soak.end_time, soak.phase = time.monotonic(), "crashed"
        if tick % 10 == 0:
            done = [c for c in soak.calls if c.end is not None]
            codes = Counter(c.outcome.split(":")[0] for c in done)
            log(f"[soak] {time.monotonic() - soak.t0:5.0f}s {soak.phase}: {len(soak.calls)} "
                f"calls, {len(soak.calls) - len(done)} open, {dict(codes.most_common(6))}; "
                f"health p99 {percentile(soak.health_ms, 99)} ms; server RSS "
                f"{rss_mb(soak.server.proc.pid)} MiB")


async def wait_idle(soak: Soak, timeout: float = 15.0) -> dict:
    """GetLoad until nothing runs, waits or holds KV blocks (or `timeout`); the last answer."""
    deadline = time.monotonic() + timeout
    try:
        while True:
            load = await soak.conn.stub.GetLoad(pb.LoadRequest(), timeout=5)
            if load.running == load.waiting == load.kv_blocks_used == 0 \
                    or time.monotonic() > deadline:
                return {f.name: getattr(load, f.name) for f in load.DESCRIPTOR.fields}
            await asyncio.sleep(0.1)
    except grpc.aio.AioRpcError as exc:
        return {"error": exc.code().name}


async def run(soak: Soak) -> dict:
    args = soak.args
    soak.conn = Conn(f"127.0.0.1:{args.port}", args)
    log(f"[soak] SERVING after {await soak.start_server():.1f}s")
    soak.info = await soak.conn.stub.GetModelInfo(pb.ModelInfoRequest(), timeout=10.0)
    soak.t0 = time.monotonic()
    soak.end_time = soak.t0 + args.minutes * 60.0
    soak.up.set()
    clients = [asyncio.create_task(client(soak, i)) for i in range(args.concurrency)]
    helpers = [asyncio.create_task(probe_health(soak)), asyncio.create_task(watch(soak, clients))]
    await drain_and_restart(soak)
    grace = args.minutes * 60.0 + args.request_timeout + 60.0  # every call has a deadline
    await asyncio.wait(clients, timeout=max(0.0, soak.t0 + grace - time.monotonic()))
    for task in clients + helpers:
        task.cancel()  # a client still waiting holds a lost call
    await asyncio.gather(*clients, *helpers, return_exceptions=True)
    elapsed = time.monotonic() - soak.t0
    load = await wait_idle(soak)
    soak.rss[-1]["end"] = rss_mb(soak.server.proc.pid)
    for channel in (*soak.conn.old, soak.conn.channel):
        await channel.close()
    return summarize(soak, elapsed, load)


def summarize(soak: Soak, elapsed: float, load: dict) -> dict:
    calls, args, d, h = soak.calls, soak.args, soak.drain, soak.health_ms
    outcomes = [c.outcome or "LOST" for c in calls]
    lost = outcomes.count("LOST")
    hung = sum(c.outcome == "DEADLINE_EXCEEDED" and "DEADLINE_EXCEEDED" not in c.expected
               for c in calls)  # ran into the guard deadline
    unexpected = Counter(f"{c.scenario}:{c.outcome}" for c in calls
                         if c.end is not None and not soak.is_expected(c))
    streams = [c for c in calls if c.num_finished is not None]  # ended OK
    inflight = Counter(c.outcome or "LOST" for c in soak.drain_inflight)
    p99 = percentile(h, 99)
    checks = {
        "nothing_lost": lost == hung == 0,
        "no_stream_violations": not soak.violations,
        "kv_idle_after": [load.get(k) for k in ("kv_blocks_used", "running", "waiting")] == [0] * 3,
        "health_p99_ok": p99 is not None and p99 <= args.health_p99_ms,
        "bad_requests_rejected": not any(c.scenario in ("bad", "raw") and c.outcome
                                         and c.outcome.startswith("OK") for c in calls),
        "valid_requests_as_expected": all(k.split(":")[0] in ("bad", "raw") for k in unexpected),
        "drain_clean": d.get("exit_code") == 0 and d.get("not_serving_after_s") is not None
        and d.get("new_call") == "UNAVAILABLE" and all(o.startswith("OK") for o in inflight),
        "restarted": d["restarts"] == 1 and soak.crashed is None,
        "repeats_match": soak.repeat_mismatches == 0,
    }
    by_scenario = {s: dict(sorted(Counter(o for c, o in zip(calls, outcomes)
                                          if c.scenario == s).items())) for s in SCENARIOS}
    return {
        "bench": "soak", "model": soak.info.model, "minutes": args.minutes,
        "elapsed_s": round(elapsed, 1), "concurrency": args.concurrency,
        "num_blocks": args.num_blocks, "seed": args.seed, "server_cmd": soak.cmd[2:],
        "requests": {"submitted": len(calls), "accounted": len(calls) - lost, "lost": lost,
                     "hung": hung},
        "outcomes": dict(sorted(Counter(outcomes).items())), "by_scenario": by_scenario,
        "streams": {"ended_ok": len(streams),
                    "exactly_one_finished": sum(c.num_finished == 1 for c in streams),
                    "violations": len(soak.violations), "violation_examples": soak.violations[:3]},
        "unexpected": dict(unexpected), "unexpected_examples": soak.examples,
        "aborts": dict(soak.aborts), "repeat_mismatches": soak.repeat_mismatches,
        "load_after": load, "rss_mib": soak.rss,
        "health_ms": {"n": len(h), "p50": percentile(h, 50), "p99": p99,
                      "max": percentile(h, 100), "p99_threshold": args.health_p99_ms,
                      "statuses": {phase: dict(c) for phase, c in soak.health.items()}},
        "drain": {**d, "inflight_at_sigterm": len(soak.drain_inflight),
                  "inflight_outcomes": dict(inflight), "crash_exit_code": soak.crashed},
        "checks": checks, "ok": all(checks.values()),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="traffic duration")
    ap.add_argument("--num-blocks", type=int, default=64, help="the server's KV cache blocks")
    ap.add_argument("--port", type=int, default=None, help="server port (default: a free one)")
    ap.add_argument("--concurrency", type=int, default=8, help="concurrent client tasks")
    ap.add_argument("--seed", type=int, default=0, help="seeds the clients' random choices")
    ap.add_argument("--server-arg", action="append", default=[], metavar="ARGS",
                    help="more serve options, e.g. --server-arg=--metrics-port=9100")
    ap.add_argument("--drain-timeout", type=float, default=5.0, help="the server's, seconds")
    ap.add_argument("--request-timeout", type=float, default=120.0,
                    help="deadline of calls not meant to expire; reaching it counts as hung")
    ap.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to SERVING")
    ap.add_argument("--health-p99-ms", type=float, default=250.0, help="see the docstring")
    add_client_security_args(ap)  # --api-key (the server gets it too), --tls-ca, ...
    args = ap.parse_args(argv)
    args.port = args.port or free_port()
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    soak = Soak(args, [sys.executable, "-m", "server", "serve", "--host", "127.0.0.1",
                       "--port", str(args.port), "--num-blocks", str(args.num_blocks),
                       "--drain-timeout", str(args.drain_timeout),
                       *(["--api-key", args.api_key] if args.api_key else []),
                       *[word for spec in args.server_arg for word in shlex.split(spec)]])
    signal.signal(signal.SIGTERM, lambda signum, _: sys.exit(128 + signum))  # runs `finally`
    try:
        record = asyncio.run(run(soak))
        soak.server.stop(timeout=args.drain_timeout + 30.0)
        record["final_exit_code"] = soak.server.proc.returncode
    except (RuntimeError, TimeoutError) as exc:
        log(f"bench/soak.py: {exc}")
        sys.exit(1)
    finally:
        for server in soak.servers:  # whatever went wrong, no server outlives the script
            if server.proc.poll() is None:
                server.proc.kill()
                server.proc.wait()
    emit(record)
    sys.exit(0 if record["ok"] else 1)


if __name__ == "__main__":
    main()
