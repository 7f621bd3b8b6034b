"""Plots and a markdown table of a concurrency sweep (loadtests/sweep.py): OUT/sweep.png and OUT/sweep.md.

    python loadtests/plot_sweep.py OUT
One row of plots per context length: time to first token, time per output token and inter-token latency (p50
solid, p99 dashed), output tokens/s, and requests running (solid) and waiting (dashed), means over the run,
against concurrent users, one colour per system. Where a system's name
appears more than once in sweep.jsonl for the same point, the last line counts (a rerun replaces a point).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LABELS = {"attamba": "attamba-wt2", "transformer": "transformer-wt2", "llamacpp": "llama.cpp (transformer-wt2 f16)"}
COLORS = {"attamba": "tab:blue", "transformer": "tab:orange", "llamacpp": "tab:green"}
COLUMNS = ("users", "requests", "failures", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "itl_p50_ms",
           "itl_p99_ms", "output_tok_s", "running_mean", "waiting_mean", "waiting_max", "preemptions")
LATENCIES = ("ttft", "tpot", "itl")


def load(path: Path) -> dict[tuple[str, int], list[dict]]:
    """{(system, context): points sorted by users}, the last line of a repeated point winning."""
    points: dict[tuple[str, int, int], dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            p = json.loads(line)
            points[(p["system"], p["context"], p["users"])] = p
    series: dict[tuple[str, int], list[dict]] = {}
    for (system, context, _), p in sorted(points.items()):
        series.setdefault((system, context), []).append(p)
    return series


def plot(series: dict[tuple[str, int], list[dict]], path: Path) -> None:
    contexts = sorted({c for _, c in series})
    fig, axes = plt.subplots(len(contexts), 5, figsize=(22, 4.2 * len(contexts)), squeeze=False)
    for row, context in zip(axes, contexts):
        for (system, c), points in series.items():
            if c != context:
                continue
            users = [p["users"] for p in points]
            color, label = COLORS.get(system), LABELS.get(system, system)
            for ax, metric in zip(row[:3], LATENCIES):
                ax.plot(users, [_s(p[f"{metric}_p50_ms"]) for p in points], "o-", color=color, label=f"{label} p50")
                ax.plot(users, [_s(p[f"{metric}_p99_ms"]) for p in points], "s--", color=color, label=f"{label} p99")
            row[3].plot(users, [p["output_tok_s"] for p in points], "o-", color=color, label=label)
            row[4].plot(users, [p["running_mean"] for p in points], "o-", color=color, label=f"{label} running")
            row[4].plot(users, [p["waiting_mean"] for p in points], "s--", color=color, label=f"{label} waiting")
        titles = ("time to first token (s)", "time per output token (s)", "inter-token latency (s)", "output tokens/s",
                  "running / waiting (mean)")
        for ax, title in zip(row, titles):
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.set_xlabel("concurrent users")
            ax.set_title(f"{title}, {context}-token context")
            ax.grid(alpha=0.3)
        for ax in row[:3]:
            ax.set_yscale("log")
        row[0].legend(fontsize=7)
        row[3].legend(fontsize=7)
        row[4].set_yscale("symlog", linthresh=1)
        row[4].set_ylim(bottom=0)
        row[4].yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def _s(ms: float | None) -> float:
    return float("nan") if ms is None else ms / 1000


def table(series: dict[tuple[str, int], list[dict]]) -> str:
    lines = []
    for (system, context), points in sorted(series.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        setup = points[0]
        extra = f", {setup['slots']} slots" if "slots" in setup else ""
        out = setup["output_tokens"]
        lines += ["", f"**{LABELS.get(system, system)}**, {context} tokens a request ({context - out} prompt + {out} "
                      f"output), {setup['seconds']} s per point, cache {setup['cache_memory']}, "
                      f"{setup.get('batch_tokens', 512)} tokens a step{extra}", "",
                  "| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
        lines += ["| " + " | ".join("" if p.get(c) is None else f"{p[c]:g}" for c in COLUMNS) + " |" for p in points]
    return "\n".join(lines).lstrip() + "\n"


def main() -> int:
    if len(sys.argv) != 2 or not (Path(sys.argv[1]) / "sweep.jsonl").is_file():
        print("usage: python loadtests/plot_sweep.py OUT  (OUT/sweep.jsonl from loadtests/sweep.py)", file=sys.stderr)
        return 2
    out = Path(sys.argv[1])
    series = load(out / "sweep.jsonl")
    plot(series, out / "sweep.png")
    (out / "sweep.md").write_text(table(series))
    print(f"wrote {out / 'sweep.png'} and {out / 'sweep.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
