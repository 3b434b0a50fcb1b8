"""Decoding strategies on the real model: contrastive search and beam search against greedy.

Everything runs in one process on the default model (float32 or `--dtype`, `--threads` 2,
prefix caching on as by default; the prefix cache is cleared before every timed phase, so no
phase reuses another's prefill). Prompts are 16 real English texts of 22-38 tokens (`PROMPTS`;
contrastive search's cosine penalty is meaningless on random ids), ignore-eos,
`--max-new-tokens` (64) each. Measured:

1. Greedy and contrastive search (k=4, alpha=0.6) on `--alone` prompts, each request alone
   (one `generate` call per prompt), and on all 16 prompts concurrently (one `generate` call).
   Latency per token = wall time per request / tokens per request (the prefill included).
   Ratios: contrastive / greedy latency per token alone (target <= 1.5) and contrastive /
   greedy wall time of the 16 concurrent requests (target <= 2). Each phase also records the
   seconds the decode stack spent in its GEMMs and attention kernel (`stack_gemm_s`,
   `stack_attention_s`; the LM head runs outside the stack and is not in them), and
   `contrastive_over_greedy_16_stack_gemm` compares the two 16-request phases' GEMMs.
2. The no-cache recompute reference: contrastive search written plainly here with Hugging Face
   transformers forward passes on the same weights, recomputing everything each step (every
   step runs the model on the k candidate sequences [k, t + 1] and scores
   (1 - alpha) p(v) - alpha max_j cos(h_v, h_j) with the last-layer hidden states). It is slow,
   so it generates only `--reference-tokens` (32) tokens for the first prompt; per-token rates
   are compared (its per-token cost grows with the length, so the shorter run favours it).
   The engine's first tokens on that prompt must match it (`reference_prefix_match`).
   Speedup = engine's single contrastive request tokens/s / the reference's (target >= 10x).
3. Beam search (num_beams 4) on the `--alone` prompts, each alone: tokens/s.
4. Forward tokens per emitted token for each strategy, counted by wrapping
   `engine.runner.execute`: scheduled tokens at positions past the prompt (the decode phase),
   divided by the emitted tokens. Greedy is (N - 1) / N (the last token is never run forward),
   contrastive k (every candidate runs forward), beam search B (N - 1) / N.

5. With `--hf-peer`: transformers 4.55's own contrastive search and greedy `generate` on the
   same `--alone` prompts (the engine's token ids), each alone, in its own venv
   (`make bench-peers-hf`, `bench/peers/hf_contrastive.py`), run after the engine's phases,
   in the engine's `--dtype`.
   Speedup = the engine's contrastive tokens/s alone / transformers' (target >= 2x); its
   tokens on the first prompt are compared with the engine's (`peer_prefix_match`).

    python bench/decoding.py [--max-new-tokens 64] [--alone 4] [--reference-tokens 32]
                             [--threads 2] [--repeats 1] [--quick] [--hf-peer]

Every phase and the reference run once per round; with `--repeats N` the rounds alternate,
so load from other processes falls on all of them alike, and each keeps its fastest round.
`--quick` is a smoke run (16 new tokens, 2 prompts alone, 8 reference tokens). On a machine
shared with other torch processes set `OMP_WAIT_POLICY=PASSIVE` (spin-waiting OpenMP threads on
busy cores make 2 threads several times slower than 1). Prints one JSON line on stdout
({"bench": "decoding", ...}); a human-readable summary goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":  # the repo root instead of bench/: bench/profile.py would shadow
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the standard library's profile

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import emit, machine  # noqa: E402
from decoding.params import BeamSearch, Contrastive  # noqa: E402
from engine.config import EngineConfig, ModelConfig  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.kernels import decode_stack  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402

PROMPTS = [
    "The history of the bicycle begins in the early nineteenth century, when inventors in "
    "Germany and France experimented with two-wheeled machines that riders pushed along with "
    "their feet. Over the following decades,",
    "Photosynthesis is the process by which green plants, algae and some bacteria turn light "
    "into chemical energy. Inside the chloroplasts, chlorophyll absorbs sunlight and",
    "Dear hiring manager, I am writing to apply for the position of junior software engineer "
    "advertised on your website. Over the past two years I have",
    "The small coastal town was quiet in the winter months. Most of the shops along the "
    "harbour closed in October, and the fishermen who stayed behind spent their evenings",
    "To make a simple loaf of bread you need flour, water, salt and yeast. First, mix the yeast "
    "with warm water and let it rest for ten minutes. Then",
    "Climate scientists measure the temperature of the oceans with thousands of floating "
    "robots that drift with the currents and dive to two kilometres. Their data shows that",
    "In the year 1969, the crew of Apollo 11 left the Earth on a Saturn V rocket. Four days "
    "later, Neil Armstrong and Buzz Aldrin",
    "A good night's sleep matters more than most people think. Doctors recommend between seven "
    "and nine hours for adults, because during deep sleep the body",
    "The city council met on Tuesday evening to discuss the new public library. After two "
    "hours of debate, the members agreed that",
    "Python is a popular programming language because its syntax is easy to read and it comes "
    "with a large standard library. Beginners often start by",
    "The old lighthouse keeper climbed the spiral staircase every night to light the lamp. One "
    "stormy evening in November, he noticed a small boat",
    "Honey bees live in colonies of tens of thousands of workers, a few hundred drones and a "
    "single queen. Each worker has a job that changes as she grows older:",
    "When learning to play the piano, most teachers advise students to practise slowly and "
    "regularly rather than for long hours once a week. The reason is that",
    "The museum's new exhibition brings together paintings, letters and photographs from the "
    "artist's years in Paris, where she lived from 1921 until",
    "Electric cars have become much more common over the last ten years. Batteries are cheaper, "
    "charging stations are easier to find, and",
    "The recipe for a classic tomato soup is surprisingly simple. Roast ripe tomatoes with "
    "garlic and olive oil, then",
]
WARMUP = "Once upon a time, in a village at the edge of a great forest, there lived a baker who"
TOP_K, ALPHA, NUM_BEAMS = 4, 0.6, 4
TARGETS = {"contrastive_over_greedy_alone_latency": 1.5,
           "contrastive_over_greedy_16_time": 2.0,
           "speedup_vs_recompute": 10.0}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def strategy_params(name: str, max_new: int) -> SamplingParams:
    if name == "greedy":
        return SamplingParams(max_new_tokens=max_new, temperature=0.0, ignore_eos=True)
    strategy = (Contrastive(top_k=TOP_K, penalty_alpha=ALPHA) if name == "contrastive"
                else BeamSearch(num_beams=NUM_BEAMS))
    return SamplingParams(max_new_tokens=max_new, ignore_eos=True, strategy=strategy)


# ---- the engine --------------------------------------------------------------------------------


class ForwardCounter:
    """Wraps `runner.execute` and counts every scheduled token, split by position: tokens at
    positions before the request's prompt length (prefill, recomputes of it) and after (the
    decode phase: candidate branches, beams). Prefix-cache hits are never run, so never
    counted."""

    def __init__(self, runner) -> None:
        self._execute = runner.execute
        runner.execute = self._count
        self.prompt = self.decode = 0

    def reset(self) -> None:
        self.prompt = self.decode = 0

    def _count(self, output):
        for item in output.scheduled:
            req = item.request
            start = req.num_computed_tokens  # execute runs before the scheduler advances it
            in_prompt = max(0, min(start + item.num_new_tokens, req.num_prompt_tokens) - start)
            self.prompt += in_prompt
            self.decode += item.num_new_tokens - in_prompt
        return self._execute(output)


def measure(engine: Engine, counter: ForwardCounter, prompts: list[str],
            params: SamplingParams, alone: bool) -> tuple[dict, list]:
    """Times `prompts` one `generate` call each (`alone`) or all in one call, on a cleared
    prefix cache. Returns the record and the outputs."""
    groups = [[p] for p in prompts] if alone else [prompts]
    assert engine.kv_cache.reset_prefix_cache(), "blocks still owned between phases"
    counter.reset()
    preempted = engine.scheduler.num_preemptions
    elapsed, outs = 0.0, []
    decode_stack.timings = torch.zeros(2, dtype=torch.float64)
    for group in groups:
        start = time.perf_counter()
        outs += engine.generate(group, params)
        elapsed += time.perf_counter() - start
    (gemm, attention), decode_stack.timings = decode_stack.timings.tolist(), None
    emitted = sum(len(o.token_ids) for o in outs)
    per_request = elapsed / len(groups)
    return {"requests": len(prompts), "time_s": round(elapsed, 3),
            "emitted_tokens": emitted, "tokens_per_s": round(emitted / elapsed, 2),
            "latency_per_token_ms": round(1000 * per_request / (emitted / len(prompts)), 2),
            "prompt_forward_tokens": counter.prompt, "decode_forward_tokens": counter.decode,
            "forward_per_emitted_token": round(counter.decode / emitted, 3),
            "cached_prompt_tokens": sum(o.num_cached_tokens for o in outs),
            "stack_gemm_s": round(gemm, 3), "stack_attention_s": round(attention, 3),
            "preemptions": engine.scheduler.num_preemptions - preempted}, outs


PREAMBLE = (
    "The following passage is an excerpt from a long report on the history of public "
    "libraries, their funding, the way their collections grew over the centuries, and the "
    "people who used them. Early libraries were private collections owned by monasteries, "
    "universities and wealthy families, and reading rooms were open only to scholars. In the "
    "nineteenth century, cities began to fund lending libraries from local taxes, and "
    "philanthropists paid for thousands of new buildings on the condition that towns would "
    "maintain them. Librarians developed classification schemes so that readers could find "
    "books on open shelves, and children's rooms, reference desks and travelling book vans "
    "followed. In the twentieth century, libraries added recordings, films and computers, "
    "and many became community centres offering classes, meeting rooms and help with forms. "
    "Budgets rose and fell with the economy, and every generation debated what a library is "
    "for. With that background, consider the next paragraph.\n\n")
"""Prepended to every prompt with --long-context (about 200 tokens): the recompute
reference's cost grows with the context, the engine's decode step barely does."""


def prompts_of(args) -> list[str]:
    return [PREAMBLE + p for p in PROMPTS] if args.long_context else PROMPTS


def phases(args) -> list[tuple[str, str, list[str], bool, int]]:
    """(key, strategy, prompts, alone, max_new_tokens) of every engine phase."""
    prompts = prompts_of(args)
    alone, new = prompts[:args.alone], args.max_new_tokens
    return [("greedy_alone", "greedy", alone, True, new),
            ("contrastive_alone", "contrastive", alone, True, new),
            ("beam_alone", "beam", alone, True, new),
            (f"greedy_{len(prompts)}", "greedy", prompts, False, new),
            (f"contrastive_{len(prompts)}", "contrastive", prompts, False, new),
            ("contrastive_alone_reference_length", "contrastive", prompts[:1], True,
             args.reference_tokens)]


def run_rounds(engine: Engine, reference, args) -> tuple[dict, list[int], dict]:
    """`--repeats` rounds of every engine phase and the recompute reference, interleaved so
    that load from other processes hits them alike; each keeps its fastest round. Returns
    the engine records, the engine's contrastive tokens on the reference prompt and the
    reference's record."""
    counter = ForwardCounter(engine.runner)
    for name in ("greedy", "contrastive", "beam"):  # warm-up: allocator, kernels, fork paths
        engine.generate([WARMUP], strategy_params(name, 8))
    results: dict = {}
    engine_tokens: list[int] = []
    best_ref: dict | None = None
    for _ in range(args.repeats):
        for key, name, prompts, alone, new in phases(args):
            r, outs = measure(engine, counter, prompts, strategy_params(name, new), alone)
            if key not in results or r["time_s"] < results[key]["time_s"]:
                results[key] = r
            if key == "contrastive_alone_reference_length":
                engine_tokens = outs[0].token_ids
            log(f"{key:>34}: {r['time_s']:7.2f} s {r['tokens_per_s']:7.1f} tok/s "
                f"{r['latency_per_token_ms']:7.1f} ms/token/request "
                f"{r['forward_per_emitted_token']:5.2f} forward/emitted")
        ref = reference()
        log(f"{'recompute_reference':>34}: {ref['time_s']:7.2f} s "
            f"{ref['tokens_per_s']:7.2f} tok/s")
        if best_ref is None or ref["time_s"] < best_ref["time_s"]:
            best_ref = ref
    return results, engine_tokens, best_ref


# ---- the no-cache recompute reference ------------------------------------------------------


@torch.inference_mode()
def recompute_contrastive(model, prompt_ids: list[int], k: int, alpha: float,
                          max_new: int) -> list[int]:
    """Contrastive search with no KV cache: every step runs the model on the k candidate
    sequences in full and scores (1 - alpha) p(v) - alpha max_j cos(h_v, h_j) over the
    last-layer hidden states h_j of every previous position (HF semantics, ignore-eos)."""
    ids = list(prompt_ids)
    out = model(torch.tensor([ids]), output_hidden_states=True)
    context = F.normalize(out.hidden_states[-1][0].float(), dim=-1)       # [t, d]
    logits = out.logits[0, -1]
    for _ in range(max_new):
        top_probs, top_ids = torch.softmax(logits.float(), dim=-1).topk(k)
        candidates = torch.tensor([ids + [int(v)] for v in top_ids])      # [k, t + 1]
        step = model(candidates, output_hidden_states=True)
        cand = F.normalize(step.hidden_states[-1][:, -1].float(), dim=-1)  # [k, d]
        scores = (1 - alpha) * top_probs - alpha * (cand @ context.T).max(dim=-1).values
        best = int(torch.argmax(scores))
        ids.append(int(top_ids[best]))
        context = torch.cat([context, cand[best:best + 1]])
        logits = step.logits[best, -1]
    return ids[len(prompt_ids):]


def load_reference(model_dir: Path, prompt_ids: list[int], max_new: int):
    """Loads the HF model and returns a function that times one reference generation."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    recompute_contrastive(model, prompt_ids, TOP_K, ALPHA, 2)  # warm-up

    def run() -> dict:
        start = time.perf_counter()
        tokens = recompute_contrastive(model, prompt_ids, TOP_K, ALPHA, max_new)
        elapsed = time.perf_counter() - start
        return {"tokens": max_new, "time_s": round(elapsed, 3),
                "tokens_per_s": round(max_new / elapsed, 3), "token_ids": tokens}

    return run


# ---- transformers 4.55's contrastive search (its own venv) -----------------------------------


def run_hf_peer(model_dir: Path, prompt_ids: list[list[int]], args) -> dict:
    repo = Path(__file__).resolve().parents[1]
    python = repo / ".venv-hf455" / "bin" / "python"
    if not python.exists():
        return {"error": "no .venv-hf455: run make bench-peers-hf"}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"prompt_ids": prompt_ids, "max_new_tokens": args.max_new_tokens,
                   "top_k": TOP_K, "penalty_alpha": ALPHA, "threads": args.threads,
                   "dtype": args.dtype}, f)
    proc = subprocess.run([str(python), str(repo / "bench" / "peers" / "hf_contrastive.py"),
                           "--model", str(model_dir), "--job", f.name],
                          capture_output=True, text=True, timeout=3600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": proc.stderr[-2000:]}


def peer_fields(results: dict, peer: dict, engine_tokens: list[int]) -> dict:
    if "error" in peer:
        return {"transformers_contrastive": peer}
    tokens = peer.pop("contrastive_token_ids")
    peer.pop("greedy_token_ids", None)
    n = min(len(tokens), len(engine_tokens))
    match = next((i for i in range(n) if tokens[i] != engine_tokens[i]), n)
    ratio = round(results["contrastive_alone"]["tokens_per_s"]
                  / peer["contrastive_alone"]["tokens_per_s"], 2)
    return {"transformers_contrastive": peer, "peer_prefix_match": match,
            "contrastive_vs_transformers": ratio, "contrastive_vs_transformers_met": ratio >= 2,
            "greedy_vs_transformers": round(results["greedy_alone"]["tokens_per_s"]
                                            / peer["greedy_alone"]["tokens_per_s"], 2)}


# ---- the record --------------------------------------------------------------------------------


def ratios(results: dict, ref_rate: float) -> dict:
    g1, c1 = results["greedy_alone"], results["contrastive_alone"]
    g16, c16 = results["greedy_16"], results["contrastive_16"]
    same = results["contrastive_alone_reference_length"]
    values = {
        "contrastive_over_greedy_alone_latency": round(
            c1["latency_per_token_ms"] / g1["latency_per_token_ms"], 3),
        "contrastive_over_greedy_16_time": round(c16["time_s"] / g16["time_s"], 3),
        "speedup_vs_recompute": round(c1["tokens_per_s"] / ref_rate, 2),
    }
    if g16["stack_gemm_s"]:
        values["contrastive_over_greedy_16_stack_gemm"] = round(
            c16["stack_gemm_s"] / g16["stack_gemm_s"], 3)
    met = {f"{name}_met": (values[name] >= target if name.startswith("speedup")
                           else values[name] <= target) for name, target in TARGETS.items()}
    values["speedup_vs_recompute_same_length"] = round(same["tokens_per_s"] / ref_rate, 2)
    return {**values, "targets": TARGETS, **met}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the engine's and the transformers peer's dtype (the recompute "
                         "reference stays float32: its token match is exact in float32 only)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--alone", type=int, default=4, help="prompts run one at a time")
    ap.add_argument("--reference-tokens", type=int, default=32,
                    help="tokens the no-cache recompute reference generates")
    ap.add_argument("--repeats", type=int, default=1, help="rounds; each phase keeps its best")
    ap.add_argument("--quick", action="store_true", help="smoke run: 16 / 2 / 8")
    ap.add_argument("--long-context", action="store_true",
                    help="prepend a ~200-token passage to every prompt")
    ap.add_argument("--hf-peer", action="store_true",
                    help="also run transformers 4.55's contrastive search (make bench-peers-hf)")
    args = ap.parse_args()
    if args.quick:
        args.max_new_tokens, args.alone, args.reference_tokens = 16, 2, 8
    args.alone = max(1, min(args.alone, len(PROMPTS)))
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine(EngineConfig(model=ModelConfig(
        **({"model": args.model} if args.model else {}), dtype=args.dtype,
        num_threads=args.threads)))
    model_dir = engine.runner.model_dir
    reference = load_reference(model_dir, engine.tokenizer.encode(prompts_of(args)[0]),
                               args.reference_tokens)
    results, engine_tokens, ref = run_rounds(engine, reference, args)
    ref_tokens = ref.pop("token_ids")
    match = next((i for i, (a, b) in enumerate(zip(engine_tokens, ref_tokens)) if a != b),
                 min(len(engine_tokens), len(ref_tokens)))
    log(f"the engine's contrastive tokens match the reference's first {match}")
    record = {"bench": "decoding", "model": model_dir.name, "dtype": args.dtype,
              "top_k": TOP_K, "penalty_alpha": ALPHA, "num_beams": NUM_BEAMS,
              "max_new_tokens": args.max_new_tokens, "alone_prompts": args.alone,
              "long_context": args.long_context,
              "concurrent_prompts": len(PROMPTS), "repeats": args.repeats, **results,
              "recompute_reference": {
                  **ref, "note": f"HF forward on [k, t+1] every step, no KV cache; first "
                  f"prompt, {args.reference_tokens} tokens (engine: {args.max_new_tokens}); "
                  f"per-token rates compared"},
              "reference_prefix_match": match,
              "reference_prefix_match_all": match == args.reference_tokens,
              **ratios(results, ref["tokens_per_s"]), "machine": machine()}
    if args.hf_peer:  # after the engine's phases: never both on the CPUs at once
        alone = [engine.tokenizer.encode(p) for p in prompts_of(args)[:args.alone]]
        record.update(peer_fields(results, run_hf_peer(model_dir, alone, args), engine_tokens))
        log(f"transformers {record['transformers_contrastive'].get('version')}: "
            f"contrastive x{record.get('contrastive_vs_transformers')}, greedy "
            f"x{record.get('greedy_vs_transformers')}, first "
            f"{record.get('peer_prefix_match')} tokens equal")
    log("  ".join(f"{k}={record[k]}" for k in TARGETS)
        + "  all met: " + str(all(record[f"{k}_met"] for k in TARGETS)))
    emit(record)


if __name__ == "__main__":
    main()
