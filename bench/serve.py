"""Online serving: an asyncio gRPC load generator for the polydecode server (`vllm bench serve`).

For each concurrency level c (default 1, 8, 32) it sends `--num-prompts` prompts (default
max(4, 3c)) through `GenerateStream`, at most c in flight (all start at once, a semaphore keeps
c running). Prompts are bench/shapes.py's random token ids of 16-256 tokens, sent as token-id
segments, greedy, ignore-eos, output lengths uniform in [(1 - r) max, max] (r =
`--output-range-ratio`, 0.5; equal lengths would make whole waves finish together). Every
message is timestamped on the client; the metrics follow vLLM's `calculate_metrics`:
completed / failed (by gRPC status code), duration, request and token throughput, and TTFT, TPOT
((e2e - ttft) / (n_out - 1)), ITL (gaps between consecutive token deltas, pooled) and E2E
latency, each as mean / median / p99 in ms; plus the server's own `Finished.timings.queue_ms`
and `usage.forward_tokens / completion_tokens`.

Before the server starts (never at the same time: CPUs are scarce), the offline engine runs
in-process on the prompts of the largest level with `max_num_seqs` = that concurrency, so
`server_over_offline_at_max_concurrency` measures the serving overhead, not a batch-size
difference; the prefill of the longest prompt alone (max_new_tokens=1, median of a few runs)
sets the TTFT target: TTFT p99 at concurrency 8 within 2x of it.

    python bench/serve.py [--server HOST:PORT] [--concurrency 1,8,32] [--num-prompts N]
                          [--max-new-tokens 64] [--threads 2] [--dtype float32]
                          [--skip-offline] [--plot] [--tls-ca PEM] [--api-key KEY]
    python bench/serve.py --replicas 2   # Ray Serve routing overhead and prefix affinity

Without `--server` it starts `python -m server serve` on a free local port, waits for the
readiness health check, and stops it with SIGTERM at the end. Prints one JSON line on stdout;
a human-readable summary goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

if __name__ == "__main__":  # the repo root instead of bench/: bench/profile.py would shadow
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the standard library's profile

import grpc  # noqa: E402
import numpy as np  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from bench.common import emit, machine  # noqa: E402
from bench.shapes import THROUGHPUT, random_prompts  # noqa: E402
from server.auth import client_channel  # noqa: E402
from server.cli import add_client_security_args  # noqa: E402
from server.pb.polydecode.v1 import generation_pb2 as pb  # noqa: E402
from server.pb.polydecode.v1 import generation_pb2_grpc as pb_grpc  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
READY_SERVICE = "polydecode.v1.Generation"
STDERR_TAIL = 4000


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- one request ---------------------------------------------------------------------------


@dataclass
class RequestRecord:
    """Client-side timings (seconds, from `send`) and the server's Finished fields."""
    prompt_len: int
    index: int = 0  # submission order; the first `concurrency` form the opening burst
    send: float = 0.0
    msg_times: list[float] = field(default_factory=list)  # every message, since `send`
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    n_out: int = 0
    code: str = "OK"  # gRPC status name, or NO_FINISHED for an OK stream without Finished
    error: str = ""
    finished: pb.Finished | None = None


def make_request(prompt: list[int], max_new: int, req_id: str, salt: str) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        request_id=req_id,
        prompt=pb.Prompt(segments=[pb.Segment(tokens=pb.TokenIds(ids=prompt))]),
        decoding=pb.DecodingStrategy(greedy=pb.Greedy()),
        stopping=pb.Stopping(max_new_tokens=max_new, ignore_eos=True),
        cache_salt=salt)


async def send_one(stub, request: pb.GenerateRequest, timeout: float) -> RequestRecord:
    """Streams one request, timestamping every message on the client."""
    rec = RequestRecord(prompt_len=len(request.prompt.segments[0].tokens.ids))
    last_delta = None
    rec.send = time.perf_counter()
    try:
        async for event in stub.GenerateStream(request, timeout=timeout):
            now = time.perf_counter()
            rec.msg_times.append(now - rec.send)
            kind = event.WhichOneof("event")
            if kind == "delta" and event.delta.token_ids:
                if rec.ttft is None:
                    rec.ttft = now - rec.send
                else:
                    rec.itl.append(now - last_delta)
                last_delta = now
                rec.n_out += len(event.delta.token_ids)
            elif kind == "finished":
                rec.e2e = now - rec.send
                rec.finished = event.finished
    except grpc.aio.AioRpcError as exc:
        rec.code, rec.error = exc.code().name, exc.details() or ""
        return rec
    if rec.finished is None:
        rec.code, rec.error = "NO_FINISHED", "stream ended OK without a Finished event"
    return rec


async def run_level(stub, prompts: list[list[int]], concurrency: int, max_new: list[int],
                    salt: str, timeout: float) -> tuple[list[RequestRecord], float]:
    """All requests start at once; a semaphore keeps at most `concurrency` in flight."""
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int, prompt: list[int]) -> RequestRecord:
        async with sem:
            request = make_request(prompt, max_new[i], f"{salt}-{i}", salt)
            record = await send_one(stub, request, timeout)
            record.index = i
            return record

    start = time.perf_counter()
    records = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    return list(records), time.perf_counter() - start


# ---- metrics -------------------------------------------------------------------------------


def summarize_ms(values_s: list[float]) -> dict:
    """mean / median / p99 in milliseconds (None when there are no values)."""
    if not values_s:
        return {"mean": None, "median": None, "p99": None}
    a = np.asarray(values_s, dtype=np.float64) * 1000.0
    return {"mean": round(float(a.mean()), 2), "median": round(float(np.median(a)), 2),
            "p99": round(float(np.percentile(a, 99)), 2)}


def _count(names) -> dict:
    out: dict[str, int] = {}
    for name in names:
        out[name] = out.get(name, 0) + 1
    return out


def calculate_metrics(records: list[RequestRecord], duration: float, concurrency: int) -> dict:
    """vLLM's calculate_metrics over one level's records."""
    ok = [r for r in records if r.code == "OK"]
    n_in = sum(r.prompt_len for r in ok)
    n_out = sum(r.n_out for r in ok)
    fins = [r.finished for r in ok]
    ratios = [f.usage.forward_tokens / f.usage.completion_tokens
              for f in fins if f.usage.completion_tokens]
    return {
        "concurrency": concurrency, "num_prompts": len(records), "completed": len(ok),
        "failed": _count(r.code for r in records if r.code != "OK"),
        "duration_s": round(duration, 3),
        "request_throughput": round(len(ok) / duration, 3),
        "output_tok_s": round(n_out / duration, 1),
        "total_tok_s": round((n_in + n_out) / duration, 1),
        "total_input_tokens": n_in, "total_output_tokens": n_out,
        "ttft_ms": summarize_ms([r.ttft for r in ok if r.ttft is not None]),
        # The opening burst (c requests sent at the same instant) waits for all c prefills
        # together; later requests arrive one at a time as others finish (steady state).
        "ttft_steady_ms": summarize_ms([r.ttft for r in ok
                                        if r.ttft is not None and r.index >= concurrency]),
        "tpot_ms": summarize_ms([(r.e2e - r.ttft) / (r.n_out - 1) for r in ok
                                 if r.n_out > 1 and r.ttft is not None]),
        "itl_ms": summarize_ms([gap for r in ok for gap in r.itl]),
        "e2el_ms": summarize_ms([r.e2e for r in ok]),
        "queue_ms_mean": round(statistics.fmean(f.timings.queue_ms for f in fins), 2)
        if fins else None,
        "forward_per_output_token": round(statistics.fmean(ratios), 3) if ratios else None,
        "cached_tokens": sum(f.usage.cached_tokens for f in fins),
        "finish_reasons": _count(pb.FinishReason.Name(f.reason) for f in fins),
        "usage_token_mismatches": sum(r.n_out != r.finished.usage.completion_tokens for r in ok),
    }


def print_level(m: dict) -> None:
    def fmt(d: dict) -> str:
        return "/".join("-" if v is None else f"{v:.1f}" for v in d.values())

    log(f"[serve] c={m['concurrency']:<3} done {m['completed']}/{m['num_prompts']} "
        f"failed={m['failed'] or 0} in {m['duration_s']:.1f}s | out {m['output_tok_s']} tok/s, "
        f"{m['request_throughput']} req/s | ms mean/median/p99: TTFT {fmt(m['ttft_ms'])} "
        f"TPOT {fmt(m['tpot_ms'])} ITL {fmt(m['itl_ms'])} E2EL {fmt(m['e2el_ms'])} | "
        f"queue {m['queue_ms_mean']} ms, fwd/out {m['forward_per_output_token']} | "
        f"client CPU {m['client_cpu_s']}s")


def output_lengths(args, prompts: list[list[int]]) -> list[int]:
    """Per-request max_new_tokens, uniform in [(1 - r) * max_new_tokens, max_new_tokens]
    (vLLM's --random-range-ratio). Equal lengths would make every wave of `concurrency`
    requests finish, and the next wave arrive, in the same step: a burst each time."""
    rng = random.Random(len(prompts))
    low = max(1, round(args.max_new_tokens * (1 - args.output_range_ratio)))
    return [rng.randint(low, args.max_new_tokens) for _ in prompts]


# ---- offline reference ---------------------------------------------------------------------


def run_offline(args, prompts: list[list[int]], max_num_seqs: int) -> tuple[dict, float]:
    """Offline output tokens/s on `prompts` and the median prefill time of the longest one (ms).

    Prefix caching is off so the repeated prefills are not cache hits."""
    import torch

    from bench.throughput import run_engine
    from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from engine.engine import Engine
    from engine.loader import resolve_model_dir

    torch.set_num_threads(args.threads)
    engine = Engine(EngineConfig(
        model=ModelConfig(model=str(resolve_model_dir(args.model)), dtype=args.dtype,
                          quantization=args.quantization, num_threads=args.threads),
        cache=CacheConfig(enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs)))
    try:
        run_engine(engine, prompts[:4], 8)  # warm-up: allocator, oneDNN kernel selection
        elapsed, n_out = run_engine(engine, prompts, output_lengths(args, prompts))
        longest = max(prompts, key=len)
        prefill = [run_engine(engine, [longest], 1)[0] for _ in range(args.prefill_repeats)]
    finally:
        del engine
        gc.collect()
    offline = {"output_tok_s": round(n_out / elapsed, 1), "max_num_seqs": max_num_seqs,
               "num_prompts": len(prompts), "duration_s": round(elapsed, 3)}
    prefill_ms = statistics.median(prefill) * 1000.0
    log(f"[offline] {offline['output_tok_s']} tok/s ({len(prompts)} prompts, max_num_seqs="
        f"{max_num_seqs}); prefill of the longest prompt ({len(longest)} tokens): "
        f"{prefill_ms:.1f} ms")
    return offline, round(prefill_ms, 2)


# ---- server process ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(args, port: int, max_num_seqs: int) -> list[str]:
    cmd = [sys.executable, "-m", "server", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--threads", str(args.threads), "--dtype", args.dtype,
           "--quantization", args.quantization, "--max-num-seqs", str(max_num_seqs)]
    cmd += ["--api-key", args.api_key] if args.api_key else []  # measured with the key check
    return cmd + (["--model", args.model] if args.model else [])


class ServerProcess:
    """`python -m server serve` as a child; its stdout+stderr go to a temp file (no pipe to
    fill up), whose tail is shown if it dies."""

    def __init__(self, cmd: list[str]) -> None:
        self.log_file = tempfile.NamedTemporaryFile("w+", prefix="polydecode-serve-",
                                                    suffix=".log", delete=False)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
        log(f"[server] {' '.join(cmd)}  (log: {self.log_file.name})")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.log_file,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def tail(self) -> str:
        self.log_file.flush()
        text = Path(self.log_file.name).read_text(errors="replace")
        return text[-STDERR_TAIL:]

    def check_alive(self) -> None:
        rc = self.proc.poll()
        if rc is not None:
            raise RuntimeError(f"server exited with code {rc}; its output ends with:\n"
                               f"{self.tail()}")

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`. The log is kept (and its tail shown) after an
        unclean exit; a server that had died before was already reported by check_alive."""
        clean = False
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            start = time.perf_counter()
            try:
                self.proc.wait(timeout)
                log(f"[server] stopped by SIGTERM in {time.perf_counter() - start:.1f}s, "
                    f"exit code {self.proc.returncode}")
            except subprocess.TimeoutExpired:
                log(f"[server] did not stop {timeout:.0f}s after SIGTERM; killing it")
                self.proc.kill()
                self.proc.wait()
            clean = self.proc.returncode in (0, -signal.SIGTERM)
            if not clean:
                log(f"[server] exit code {self.proc.returncode}; output tail:\n{self.tail()}")
        self.log_file.close()
        if clean:
            os.unlink(self.log_file.name)


async def wait_ready(channel, server: ServerProcess | None, timeout: float) -> float:
    """Polls the readiness health check until SERVING; returns the seconds it took."""
    stub = health_pb2_grpc.HealthStub(channel)
    start = time.perf_counter()
    status = "no answer"
    while time.perf_counter() - start < timeout:
        if server is not None:
            server.check_alive()
        try:
            resp = await stub.Check(health_pb2.HealthCheckRequest(service=READY_SERVICE),
                                    timeout=2.0)
            if resp.status == health_pb2.HealthCheckResponse.SERVING:
                return time.perf_counter() - start
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
        except grpc.aio.AioRpcError as exc:
            status = f"{exc.code().name}: {exc.details()}"
        await asyncio.sleep(0.5)
    tail = f"\nserver output ends with:\n{server.tail()}" if server else ""
    raise TimeoutError(f"server not SERVING after {timeout:.0f}s (last: {status}){tail}")


# ---- the load test -------------------------------------------------------------------------


async def model_info(stub) -> dict:
    try:
        info = await stub.GetModelInfo(pb.ModelInfoRequest(), timeout=10.0)
    except grpc.aio.AioRpcError as exc:
        log(f"[serve] GetModelInfo failed: {exc.code().name}: {exc.details()}")
        return {}
    return {"model": info.model, "dtype": info.dtype,
            "max_new_tokens_limit": info.limits.max_new_tokens}


async def load_test(args, address: str, levels: list[tuple[int, list[list[int]]]],
                    server: ServerProcess | None) -> tuple[dict, list[dict]]:
    run_id = uuid.uuid4().hex[:8]
    async with client_channel(address, args) as channel:
        ready_s = await wait_ready(channel, server, args.startup_timeout)
        log(f"[server] SERVING at {address} after {ready_s:.1f}s of polling")
        stub = pb_grpc.GenerationStub(channel)
        info = await model_info(stub)
        warm = await send_one(stub, make_request(levels[0][1][0], 2, f"warmup-{run_id}",
                                                 f"warmup-{run_id}"), args.request_timeout)
        if warm.code != "OK":
            raise RuntimeError(f"warm-up request failed: {warm.code}: {warm.error}")
        results = []
        for i, (c, prompts) in enumerate(levels):
            salt = f"bench-{run_id}-{i}-c{c}"  # no prefix-cache hits across levels
            cpu = time.process_time()
            records, duration = await run_level(stub, prompts, c, output_lengths(args, prompts),
                                                salt, args.request_timeout)
            metrics = calculate_metrics(records, duration, c)
            metrics["client_cpu_s"] = round(time.process_time() - cpu, 2)  # client's own CPU
            print_level(metrics)
            for code in metrics["failed"]:
                first = next(r for r in records if r.code == code)
                log(f"[serve]   {code} x{metrics['failed'][code]}, e.g.: {first.error}")
            results.append(metrics)
            if server is not None:
                server.check_alive()
    return info, results


def build_record(args, info: dict, levels: list[dict], offline: dict | None,
                 prefill_ms: float | None) -> dict:
    record = {"bench": "serve", "model": info.get("model") or _local_model_name(args),
              "dtype": args.dtype, "quantization": args.quantization, "threads": args.threads,
              "max_new_tokens": args.max_new_tokens,
              "output_range_ratio": args.output_range_ratio, "levels": levels, "offline": offline,
              "prefill_longest_ms": prefill_ms}
    top = max(levels, key=lambda m: m["concurrency"])
    record["server_over_offline_at_max_concurrency"] = (
        round(top["output_tok_s"] / offline["output_tok_s"], 3) if offline else None)
    c8 = next((m for m in levels if m["concurrency"] == 8), None)
    ttft_p99 = c8["ttft_ms"]["p99"] if c8 else None
    ratio = round(ttft_p99 / prefill_ms, 2) if ttft_p99 and prefill_ms else None
    record["ttft_p99_c8_over_prefill_longest"] = ratio
    steady_p99 = c8["ttft_steady_ms"]["p99"] if c8 else None
    steady = round(steady_p99 / prefill_ms, 2) if steady_p99 and prefill_ms else None
    record["ttft_steady_p99_c8_over_prefill_longest"] = steady
    record["ttft_target_met"] = None if ratio is None else ratio <= 2.0
    record["ttft_steady_target_met"] = None if steady is None else steady <= 2.0
    record["machine"] = machine()
    return record


def _local_model_name(args) -> str:
    from engine.loader import resolve_model_dir

    return resolve_model_dir(args.model).name


def plot(record: dict, path: Path) -> None:
    """Latency and throughput vs concurrency (needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("[plot] matplotlib is not installed; skipping the plot")
        return
    levels = record["levels"]
    cs = [m["concurrency"] for m in levels]
    fig, (lat, thr) = plt.subplots(1, 2, figsize=(11, 4))
    for key, stat in (("ttft_ms", "median"), ("ttft_ms", "p99"), ("tpot_ms", "median"),
                      ("itl_ms", "p99"), ("e2el_ms", "median")):
        lat.plot(cs, [m[key][stat] for m in levels], marker="o", label=f"{key[:-3]} {stat}")
    if record["prefill_longest_ms"]:
        lat.axhline(2 * record["prefill_longest_ms"], ls="--", c="gray",
                    label="2x prefill of longest prompt")
    lat.set(xscale="log", yscale="log", xlabel="concurrency", ylabel="ms", title="latency")
    lat.legend(fontsize=7)
    thr.plot(cs, [m["output_tok_s"] for m in levels], marker="o", label="server output tok/s")
    if record["offline"]:
        thr.axhline(record["offline"]["output_tok_s"], ls="--", c="gray",
                    label=f"offline, max_num_seqs={record['offline']['max_num_seqs']}")
    thr.set(xscale="log", xlabel="concurrency", ylabel="tokens/s", title="throughput")
    thr.legend(fontsize=7)
    fig.suptitle(f"polydecode serve: {record['model']} {record['dtype']}, "
                 f"{record['max_new_tokens']} new tokens")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    log(f"[plot] wrote {path}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--server", default=None, help="HOST:PORT of a running server "
                    "(default: start one on a free local port)")
    ap.add_argument("--concurrency", default=None,
                    help="comma-separated levels (default 1,8,32; with --replicas 1,8)")
    ap.add_argument("--num-prompts", type=int, default=None,
                    help="prompts per level (default: max(4, 3 x concurrency))")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--output-range-ratio", type=float, default=0.5,
                    help="output lengths uniform in [(1-r) x max, max]; 0 = all equal")
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--quantization", default="none", choices=["none", "int8", "int4"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-num-seqs", type=int, default=None,
                    help="server and offline max_num_seqs (default: the largest concurrency)")
    ap.add_argument("--skip-offline", action="store_true", help="no offline reference")
    ap.add_argument("--prefill-repeats", type=int, default=5)
    ap.add_argument("--startup-timeout", type=float, default=300.0, help="seconds")
    ap.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    ap.add_argument("--plot", action="store_true", help="write bench/results/serve.png")
    ap.add_argument("--replicas", type=int, default=0,
                    help="compare `serve --replicas N` (Ray Serve) with the direct server; "
                         "see bench/serve_replicas.py")
    ap.add_argument("--affinity-prefixes", type=int, default=16,
                    help="with --replicas: distinct 512-token prefixes in the affinity probe")
    ap.add_argument("--affinity-rounds", type=int, default=3,
                    help="with --replicas: visits of each prefix")
    add_client_security_args(ap)  # for --server: a secured server's TLS and API key
    args = ap.parse_args(argv)
    if args.concurrency is None:
        args.concurrency = "1,8" if args.replicas else "1,8,32"
    args.levels = sorted({int(c) for c in args.concurrency.split(",") if c.strip()})
    if not args.levels or min(args.levels) < 1:
        ap.error("--concurrency: give positive integers, e.g. 1,8,32")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.replicas:
        from bench.serve_replicas import run

        return run(args)
    levels = [(c, random_prompts(args.num_prompts or max(4, 3 * c), THROUGHPUT["min_len"],
                                 THROUGHPUT["max_len"])) for c in args.levels]
    max_num_seqs = args.max_num_seqs or max(args.levels)
    offline, prefill_ms = None, None
    if not args.skip_offline:  # before the server exists: never both on the CPUs at once
        offline, prefill_ms = run_offline(args, levels[-1][1], max_num_seqs)
    server = None
    try:
        if args.server is None:
            port = free_port()
            server = ServerProcess(server_command(args, port, max_num_seqs))
            address = f"127.0.0.1:{port}"
        else:
            address = args.server
        info, results = asyncio.run(load_test(args, address, levels, server))
    except (RuntimeError, TimeoutError) as exc:
        log(f"bench/serve.py: {exc}")
        sys.exit(1)
    finally:
        if server is not None:
            server.stop()
    record = build_record(args, info, results, offline, prefill_ms)
    emit(record)
    if args.plot:
        plot(record, REPO / "bench" / "results" / "serve.png")


if __name__ == "__main__":
    main()
