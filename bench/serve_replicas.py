"""`bench/serve.py --replicas N`: what routing through Ray Serve costs, and what prefix
affinity buys.

Three servers run one after another (never two at once: the CPUs are shared):

1. direct: `serve --threads T` (T = `--threads` // N), one engine the size of one replica, in
   the server's own process, at every load level plus c / N for each level c;
2. `serve --replicas N --threads T --routing prefix`: the same levels through Ray Serve, then
   the affinity probe;
3. `serve --replicas N --threads T --routing load`: the affinity probe only.

Routing overhead = the Ray path against the direct path at equal engine work: at concurrency 1
one replica serves the one stream exactly as the direct engine does (TTFT added, ITL ratio).
The affinity probe sends `--affinity-prefixes` disjoint 512-token runs of the King James Bible,
each `--affinity-rounds` times (two requests in flight, one new token each), and reports the
share of repeat visits with `Usage.cached_tokens` > 0 under each policy.

On one machine the replicas share its cores, so throughput cannot grow with N here. The record's
`scaling_model` gives what N machines would do: min(N, c) busy replicas x the direct engine's
output tok/s at c / min(N, c) streams, less the Ray path's measured overhead at concurrency 1.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

from bench.common import emit, machine
from bench.serve import (ServerProcess, free_port, load_test, log, server_command, wait_ready)
from bench.shapes import THROUGHPUT, random_prompts
from server.auth import client_channel
from server.pb.polydecode.v1 import generation_pb2 as pb
from server.pb.polydecode.v1 import generation_pb2_grpc as pb_grpc

PREFIX_TOKENS = 512


def _run_server(args, extra: list[str], levels, probe: bool) -> tuple[dict, list[dict], dict]:
    """Starts `serve` with `extra` flags, runs the load `levels` and, if `probe`, the affinity
    probe; stops it with SIGTERM. Returns (model info, level metrics, probe result)."""
    port = free_port()
    cmd = server_command(args, port, args.max_num_seqs or max((c for c, _ in levels), default=8))
    server = ServerProcess(cmd + extra)
    address = f"127.0.0.1:{port}"
    try:
        info, results = asyncio.run(load_test(args, address, levels, server)) if levels \
            else ({}, [])
        found = asyncio.run(_affinity_probe(args, address, server)) if probe else None
    finally:
        server.stop(timeout=60)
    return info, results, found


async def _affinity_probe(args, address: str, server: ServerProcess) -> dict:
    from retrieval.corpus import kjv_path

    async with client_channel(address, args) as channel:
        await wait_ready(channel, server, args.startup_timeout)
        stub = pb_grpc.GenerationStub(channel)
        with open(kjv_path(), encoding="utf-8") as f:
            text = " ".join(json.loads(line)["text"] for _, line in zip(range(4000), f))
        ids = list((await stub.Tokenize(pb.TokenizeRequest(text=text))).token_ids)
        prefixes = [ids[i * PREFIX_TOKENS:(i + 1) * PREFIX_TOKENS]
                    for i in range(args.affinity_prefixes)]
        assert len(prefixes[-1]) == PREFIX_TOKENS, "not enough KJV text for the prefixes"

        async def visit(prefix: list[int], n: int) -> int:
            request = pb.GenerateRequest(prompt=pb.Prompt(segments=[
                pb.Segment(tokens=pb.TokenIds(ids=prefix)), pb.Segment(text=f" Visit {n}.")]),
                stopping=pb.Stopping(max_new_tokens=1))
            result = await stub.Generate(request, timeout=args.request_timeout)
            return result.finished.usage.cached_tokens

        repeats, round_s = [], []
        for n in range(args.affinity_rounds):
            start = time.perf_counter()
            for i in range(0, len(prefixes), 2):
                cached = await asyncio.gather(*(visit(p, n) for p in prefixes[i:i + 2]))
                if n:
                    repeats.extend(c > 0 for c in cached)
            round_s.append(round(time.perf_counter() - start, 2))
            log(f"[affinity] round {n + 1}/{args.affinity_rounds}: {round_s[-1]}s")
        return {"repeat_visit_hit_rate": round(sum(repeats) / len(repeats), 3),
                "round_s": round_s}


def _at(levels: list[dict], c: int) -> dict:
    return next(m for m in levels if m["concurrency"] == c)


def _overhead(direct: list[dict], ray: list[dict]) -> list[dict]:
    rows = []
    for r in ray:
        d = _at(direct, r["concurrency"])
        rows.append({
            "concurrency": r["concurrency"],
            "ttft_median_ms": {"direct": d["ttft_ms"]["median"], "ray": r["ttft_ms"]["median"]},
            "ttft_added_ms": round(r["ttft_ms"]["median"] - d["ttft_ms"]["median"], 2),
            "itl_median_ms": {"direct": d["itl_ms"]["median"], "ray": r["itl_ms"]["median"]},
            "itl_ratio": round(r["itl_ms"]["median"] / d["itl_ms"]["median"], 3),
            "output_tok_s": {"direct": d["output_tok_s"], "ray": r["output_tok_s"]},
        })
    return rows


def _scaling_model(n: int, direct: list[dict], overhead: list[dict]) -> list[dict]:
    """c streams on n replicas of their own machines keep min(n, c) replicas busy with
    c / min(n, c) streams each, each as fast as the direct engine at that load less the Ray
    path's overhead: 1 - its output tok/s over direct's at concurrency 1 (the same engine
    work), counted as 0 when the Ray path was faster."""
    c1 = next(o for o in overhead if o["concurrency"] == 1)
    ratio = c1["output_tok_s"]["ray"] / c1["output_tok_s"]["direct"]
    cost = max(0.0, 1.0 - ratio)
    rows = []
    for o in overhead:
        busy = min(n, o["concurrency"])
        per_replica = _at(direct, max(1, o["concurrency"] // busy))["output_tok_s"]
        rows.append({"concurrency": o["concurrency"], "busy_replicas": busy,
                     "single_replica_tok_s": per_replica,
                     "ray_over_direct_at_c1": round(ratio, 3),
                     "predicted_cluster_tok_s": round(busy * per_replica * (1 - cost), 1),
                     "measured_on_this_machine_tok_s": o["output_tok_s"]["ray"]})
    return rows


def run(args) -> None:
    n = args.replicas
    threads = max(1, args.threads // n)
    args.threads = threads  # server_command passes it: each replica's, and the direct engine's
    ray_cs = args.levels
    direct_cs = sorted(set(ray_cs) | {max(1, c // n) for c in ray_cs})
    if 1 not in ray_cs:
        sys.exit("bench/serve.py --replicas: --concurrency must include 1 (the overhead baseline)")

    def prompts_for(cs):
        return [(c, random_prompts(args.num_prompts or max(4, 3 * c), THROUGHPUT["min_len"],
                                   THROUGHPUT["max_len"], seed=c)) for c in cs]

    log(f"[replicas] direct engine, {threads} thread(s), levels {direct_cs}")
    info, direct, _ = _run_server(args, [], prompts_for(direct_cs), probe=False)
    log(f"[replicas] {n} replicas, prefix routing, levels {ray_cs}")
    _, ray, prefix_probe = _run_server(args, ["--replicas", str(n), "--routing", "prefix"],
                                      prompts_for(ray_cs), probe=True)
    log(f"[replicas] {n} replicas, load routing: affinity probe")
    _, _, load_probe = _run_server(args, ["--replicas", str(n), "--routing", "load"], [],
                                  probe=True)
    overhead = _overhead(direct, ray)
    record = {"bench": "serve_replicas", "model": info.get("model"), "dtype": args.dtype,
              "replicas": n, "threads_per_replica": threads,
              "max_new_tokens": args.max_new_tokens, "direct": direct, "ray": ray,
              "overhead": overhead, "scaling_model": _scaling_model(n, direct, overhead),
              "affinity": {"prefix_tokens": PREFIX_TOKENS, "prefixes": args.affinity_prefixes,
                           "rounds": args.affinity_rounds,
                           "routing": {"prefix": prefix_probe, "load": load_probe}},
              "machine": machine()}
    for o in overhead:
        log(f"[replicas] c={o['concurrency']}: TTFT +{o['ttft_added_ms']} ms, "
            f"ITL x{o['itl_ratio']}, tok/s {o['output_tok_s']}")
    log(f"[replicas] repeat-visit cached-prefix rate: prefix routing "
        f"{prefix_probe['repeat_visit_hit_rate']}, load routing "
        f"{load_probe['repeat_visit_hit_rate']}")
    emit(record)
    if args.plot:
        plot(record, Path(__file__).resolve().parent / "results" / "serve_replicas.png")


def plot(record: dict, path: Path) -> None:
    """Median TTFT and ITL, direct vs through Ray, and the affinity probe's rounds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lat, rounds) = plt.subplots(1, 2, figsize=(11, 4))
    rows = record["overhead"]
    labels = [f"c={o['concurrency']}" for o in rows]
    x = range(len(rows))
    for i, (key, name) in enumerate((("ttft_median_ms", "TTFT"), ("itl_median_ms", "ITL"))):
        for j, side in enumerate(("direct", "ray")):
            lat.bar([k + 0.2 * (2 * i + j) for k in x], [o[key][side] for o in rows], 0.2,
                    label=f"{name} {side}")
    lat.set(xticks=[k + 0.3 for k in x], xticklabels=labels, yscale="log", ylabel="ms (median)",
            title=f"direct engine vs {record['replicas']} replicas on Ray Serve")
    lat.legend(fontsize=7)
    for policy, probe in record["affinity"]["routing"].items():
        rounds.plot(range(1, len(probe["round_s"]) + 1), probe["round_s"], marker="o",
                    label=f"{policy} routing: repeat hit rate {probe['repeat_visit_hit_rate']}")
    rounds.set(xticks=range(1, record["affinity"]["rounds"] + 1),
               xlabel="visit of each prefix", ylabel="seconds per round",
               title=f"{record['affinity']['prefixes']} prefixes of "
                     f"{record['affinity']['prefix_tokens']} tokens")
    rounds.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    log(f"[plot] wrote {path}")
