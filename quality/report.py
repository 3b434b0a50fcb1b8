"""What `bench quality` writes: quality.json, quality.md (the table) and quality.png."""

from __future__ import annotations

import json
from pathlib import Path

COLUMNS = [("strategy", "strategy", "{}"), ("rep_2", "rep-2", "{:.2f}"),
           ("rep_3", "rep-3", "{:.2f}"), ("rep_4", "rep-4", "{:.2f}"),
           ("diversity", "diversity", "{:.3f}"), ("mauve", "MAUVE", "{:.3f}"),
           ("coherence", "coherence", "{:.3f}"), ("ppl", "ppl", "{:.2f}"),
           ("ms_per_token", "ms / token", "{:.1f}"), ("ms_vs_greedy", "x greedy", "{:.2f}x"),
           ("forward_per_token", "forward / token", "{:.2f}")]


def markdown_table(rows: list[dict]) -> str:
    """One line per strategy (the human continuation last); MAUVE as value +- its spread over
    k-means seeds."""
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = ["" if row.get(key) is None else fmt.format(row[key])
                 for key, _, fmt in COLUMNS]
        if row.get("mauve") is not None:
            cells[[key for key, _, _ in COLUMNS].index("mauve")] += f" ± {row['mauve_std']:.3f}"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Quality against cost: MAUVE and diversity against ms per token, one point per
    strategy; the human continuation's diversity as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    runs = [r for r in rows if "ms_per_token" in r]
    human = next((r for r in rows if r["strategy"] == "human"), None)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3), constrained_layout=True)
    for ax, key, label in ((axes[0], "mauve", "MAUVE vs human text (higher is better)"),
                           (axes[1], "diversity", "diversity = prod (1 - rep-n)")):
        for r in runs:
            ax.scatter(r["ms_per_token"], r[key], s=36)
            ax.annotate(r["strategy"], (r["ms_per_token"], r[key]), fontsize=8,
                        xytext=(4, 3), textcoords="offset points")
        if key == "mauve":  # the spread over k-means seeds
            ax.errorbar([r["ms_per_token"] for r in runs], [r[key] for r in runs],
                        yerr=[r["mauve_std"] for r in runs], fmt="none", ecolor="0.7",
                        elinewidth=1)
        if key == "diversity" and human is not None:
            ax.axhline(human["diversity"], color="0.5", ls="--", lw=1)
            ax.annotate("human", (ax.get_xlim()[0], human["diversity"]), fontsize=8,
                        xytext=(3, 3), textcoords="offset points", color="0.4")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(ScalarFormatter())
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_ylim(top=1.02)
        ax.set_xlabel("ms per emitted token (batched, log scale)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(out_dir: Path, result: dict) -> dict[str, Path]:
    """Writes the three files; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "quality.json", "table": out_dir / "quality.md",
             "plot": out_dir / "quality.png"}
    paths["json"].write_text(json.dumps(result, indent=1) + "\n")
    paths["table"].write_text(markdown_table(result["rows"]))
    cfg = result["config"]
    plot(result["rows"], paths["plot"],
         f"{cfg['model']}: {cfg['prompts']} prefixes of {cfg['corpus']} "
         f"({cfg['prefix_tokens']} tokens) + {cfg['max_new_tokens']} new tokens; "
         f"MAUVE on {cfg['features']} features")
    return paths
