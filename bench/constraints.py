"""Constrained generation cost: grammar masking (llguidance, outlines-core) vs AWRS, and
genlm-control 0.4.1's AWRS on the same model, prompts and condition as the peer.

    python bench/constraints.py [--prompts 8] [--particles 4] [--max-new-tokens 16]
                                [--mask-rows 32] [--mask-steps 32] [--no-peer] [--plot]

1. Mask overhead: --mask-rows greedy rows, --mask-steps tokens each (EOS ignored), plain and
   with a constraint on every row (a long JSON string: llguidance's most expensive masks; a
   regex), per backend: milliseconds per engine step (best of 5, alternated with plain runs),
   of it the engine thread's mask work (`engine_share` of the plain step: what a step waits
   for), and the worker's fill time, which overlaps the forward.
2. Cheap and expensive conditions: the regex `[0-9]{3}-[a-z]{2,8}` as a grammar, and the same
   language as a Python predicate (`constraints.predicates:digits_dash_word`, the `regex`
   package's partial matching, called once per check). For each: tokens/s and condition
   evaluations per token of masking (llguidance, outlines-core; sampling at temperature 1; a
   mask decides every vocabulary entry, so its evaluations per token are the vocabulary size)
   and of AWRS with --particles particles (evaluations = single-token checks). A predicate
   cannot be masked: masking runs only for the grammar.
3. The peer: bench/peers/genlm_awrs.py under .venv-genlm (`make -f bench/peers/peers.mk
   bench-peers-genlm`) on the same prompts, particles and token budget (genlm counts EOS in
   max_tokens: it gets --max-new-tokens), for both conditions. Tokens are the non-EOS tokens
   of every returned particle in both systems. polydecode runs the prompts as one batch;
   genlm-control runs them one after another (its API samples one prompt's particles at once).

Progress on stderr; one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":  # the repo root instead of bench/: bench/profile.py would shadow
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the standard library's profile

import msgspec  # noqa: E402

from bench.common import emit, machine  # noqa: E402
from constraints.predicates import load_predicate  # noqa: E402
import decoding.constraint as dc  # noqa: E402
from decoding.awrs import Awrs  # noqa: E402
from decoding.constraint import Constraint  # noqa: E402
from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.loader import resolve_model_dir  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PEER_PYTHON = REPO / ".venv-genlm" / "bin" / "python"
REGEX = r"[0-9]{3}-[a-z]{2,8}"
PREDICATE = "constraints.predicates:digits_dash_word"
LONG_STRING = json.dumps({"type": "object", "properties": {"text": {"type": "string",
                                                                    "maxLength": 400}},
                          "required": ["text"], "additionalProperties": False})
REPEATS = 5
PROMPTS = ["Ticket code (three digits, a dash, lowercase letters):",
           "Write a product code like 123-abc:", "Order reference:", "Your locker code is",
           "Enter the code from the card:", "Room and name tag:", "Serial:", "Code word:"]


def log(message: str) -> None:
    print(f"[constraints] {message}", file=sys.stderr, flush=True)


def make_engine(threads: int | None) -> Engine:
    return Engine(EngineConfig(model=ModelConfig(num_threads=threads),
                               cache=CacheConfig(num_blocks=2048),
                               scheduler=SchedulerConfig(max_num_seqs=128)))


def timed(engine: Engine, prompts: list[str], params) -> tuple[list, float]:
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    return outs, time.perf_counter() - start


@contextlib.contextmanager
def mask_clock():
    """Per run: CPU seconds the mask transform spends on the engine thread (`prepare` +
    `apply`: what delays a step) and wall seconds of the worker's fills (overlapped with the
    forward; llguidance fills on its own threads meanwhile)."""
    clock = {"engine": 0.0, "worker": 0.0}
    saved = (dc.ConstraintMask.prepare, dc.ConstraintMask.apply, dc._fill)

    def timed_by(fn, key, now):
        def wrapper(*args, **kwargs):
            start = now()
            try:
                return fn(*args, **kwargs)
            finally:
                clock[key] += now() - start
        return wrapper

    dc.ConstraintMask.prepare = timed_by(saved[0], "engine", time.thread_time)
    dc.ConstraintMask.apply = timed_by(saved[1], "engine", time.thread_time)
    dc._fill = timed_by(saved[2], "worker", time.perf_counter)
    try:
        yield clock
    finally:
        dc.ConstraintMask.prepare, dc.ConstraintMask.apply, dc._fill = saved


def mask_overhead(engine: Engine, rows: int, steps: int) -> dict:
    prompts = [f"{p} ({i})" for i, p in enumerate(PROMPTS * (rows // len(PROMPTS) + 1))][:rows]
    base = dict(max_new_tokens=steps, temperature=0.0, ignore_eos=True)
    timed(engine, prompts[:4], SamplingParams(**base))  # warm-up
    out = {"rows": rows, "steps": steps, "repeats": REPEATS}
    plain = None
    for backend in ("llguidance", "outlines"):
        for name, constraint in (("json_string", Constraint(json_schema=LONG_STRING)),
                                 ("regex", Constraint(regex=r"[a-z ,.]+"))):
            constraint = msgspec.structs.replace(constraint, backend=backend)
            engine.constraints.compile(constraint)  # compile outside the timing
            took = float("inf")
            for _ in range(REPEATS):  # alternated with plain runs: the best of each
                plain_took = timed(engine, prompts, SamplingParams(**base))[1]
                plain = min(plain or plain_took, plain_took)
                with mask_clock() as clock:
                    took = min(took, timed(engine, prompts,
                                           SamplingParams(**base, transforms=(constraint,)))[1])
            key = f"{backend}_{name}"
            out[f"{key}_step_ms"] = round(1000 * took / steps, 2)
            out[f"{key}_engine_thread_ms"] = round(1000 * clock["engine"] / steps, 2)
            out[f"{key}_worker_ms"] = round(1000 * clock["worker"] / steps, 2)
            log(f"mask {key}: {1000 * took / steps:.1f} ms/step vs {1000 * plain / steps:.1f}")
    out["plain_step_ms"] = round(1000 * plain / steps, 2)
    for key in [k for k in out if k.endswith("_engine_thread_ms")]:
        out[key.replace("_engine_thread_ms", "_engine_share")] = round(
            out[key] / out["plain_step_ms"], 4)
    return out


def _particle_tokens(outs, eos: tuple[int, ...]) -> int:
    return sum(len(c.token_ids) - (1 if c.token_ids and c.token_ids[-1] in eos else 0)
               for o in outs for c in o.candidates)


def polydecode_runs(engine: Engine, args) -> dict:
    load_predicate(f"digits_dash_word={PREDICATE}")
    prompts, vocab = PROMPTS[:args.prompts], len(engine.constraints.vocab)
    grammar, eos = Constraint(regex=REGEX), engine.tokenizer.eos_token_ids
    out = {}
    for backend in ("llguidance", "outlines"):
        c = msgspec.structs.replace(grammar, backend=backend)
        engine.constraints.compile(c)
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0, seed=0,
                                transforms=(c,))
        outs, took = timed(engine, prompts, params)
        tokens = sum(len(o.token_ids) for o in outs)
        out[f"mask_{backend}"] = {"tokens_per_s": round(tokens / took, 2), "tokens": tokens,
                                  "checks_per_token": vocab}
        log(f"mask {backend}: {tokens / took:.1f} tokens/s")
    for name, transforms, predicate in (("regex", (grammar,), ""),
                                        ("predicate", (), "digits_dash_word")):
        params = [SamplingParams(max_new_tokens=args.max_new_tokens, transforms=transforms,
                                 strategy=Awrs(num_particles=args.particles, seed=i,
                                               predicate=predicate))
                  for i in range(len(prompts))]
        outs, took = timed(engine, prompts, params)
        tokens = _particle_tokens(outs, eos)
        checks = sum(o.constraint.checks for o in outs)
        out[f"awrs_{name}"] = {"tokens_per_s": round(tokens / took, 2), "tokens": tokens,
                               "checks_per_token": round(checks / tokens, 2),
                               "samples": [o.text for o in outs]}
        log(f"awrs {name}: {tokens / took:.1f} tokens/s, {checks / tokens:.1f} checks/token")
    return out


def peer_runs(args, model_dir: Path) -> dict:
    if not PEER_PYTHON.exists():
        log("no .venv-genlm: run `make -f bench/peers/peers.mk bench-peers-genlm`")
        return {}
    out = {}
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        f.writelines(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:args.prompts])
    for name, flag in (("regex", ["--regex", REGEX]), ("predicate", ["--predicate", PREDICATE])):
        log(f"genlm-control awrs {name} ...")
        cmd = [str(PEER_PYTHON), str(REPO / "bench/peers/genlm_awrs.py"), "--model",
               str(model_dir), "--prompts", f.name, "--particles", str(args.particles),
               "--max-tokens", str(args.max_new_tokens), *flag]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        out[f"awrs_{name}"] = json.loads(done.stdout.strip().splitlines()[-1])
        log(f"genlm awrs {name}: {out[f'awrs_{name}']['tokens_per_s']} tokens/s")
    return out


def plot(record: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours, peer = record["polydecode"], record.get("genlm_control", {})
    bars = [(k.replace("_", "\n"), v["tokens_per_s"]) for k, v in ours.items()]
    bars += [(f"genlm\n{k}", v["tokens_per_s"]) for k, v in peer.items()]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.bar([b[0] for b in bars], [b[1] for b in bars],
           color=["#4477aa"] * len(ours) + ["#cc6677"] * len(peer))
    ax.set_ylabel("tokens / s")
    ax.set_title(f"{record['prompts']} prompts, {record['particles']} AWRS particles, "
                 f"{record['max_new_tokens']} tokens, 2 CPU cores")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    log(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--particles", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--mask-rows", type=int, default=32)
    ap.add_argument("--mask-steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--plot", action="store_true", help="write docs/constraints.png")
    args = ap.parse_args()
    engine = make_engine(args.threads)
    record = {"bench": "constraints", "machine": machine(), "prompts": args.prompts,
              "particles": args.particles, "max_new_tokens": args.max_new_tokens,
              "mask_overhead": mask_overhead(engine, args.mask_rows, args.mask_steps),
              "polydecode": polydecode_runs(engine, args)}
    del engine
    if not args.no_peer:
        record["genlm_control"] = peer_runs(args, resolve_model_dir())
        for name in ("regex", "predicate"):
            peer = record["genlm_control"].get(f"awrs_{name}")
            if peer:
                record[f"awrs_{name}_vs_genlm"] = round(
                    record["polydecode"][f"awrs_{name}"]["tokens_per_s"]
                    / peer["tokens_per_s"], 2)
    if args.plot:
        plot(record, REPO / "docs" / "constraints.png")
    emit(record)


if __name__ == "__main__":
    main()
