"""`attamba bench cpu` (issue 21): CPU decode and prefill, the same weights everywhere, in one run.

Stacks:
- this engine serving the teacher (smollm2-135m) and an Attamba student (--student, a delta over it), at every
  combination of --dtypes, --quantizations (weight-only int8) and --modes (the compiled decode step, the
  engine's default on a CPU, and the eager one), with each compiled size's compile time;
- Hugging Face transformers' LlamaForCausalLM, fp32, the teacher's weights (benchmarks/smollm2_bench.py);
- llama.cpp: `llama-bench` (batch 1: decode after a context of N tokens, `-d N`; prompt tokens/s) and
  `llama-batched-bench` (batch > 1, one shared prompt, `-pps`) on an F16 GGUF of the teacher's weights and its
  Q8_0 requantization (`llama-quantize`), all built by `make llama-bench` from the pinned sdist.
Decode tokens/s (total over the batch) at each context x batch: contexts are filled synthetically in this
engine and in transformers (a decode step costs the same whatever the cached values), really in llama.cpp.
Prefill tokens/s: one real prefill of --prefill-tokens random ids at batch 1. Every value is the mean of --rounds
rounds, each measuring every stack once. Ratios are against llama.cpp F16 and transformers in the same run; the
machine is shared and noisy, so compare only within one run.
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from engine.compiled_decode import CompiledDecode
from models import load_model
from models.registry import named_model_gguf, resolve_model

from .engine_bench import decode_step_ops, filled_engine, timed_decode
from .smollm2_bench import MODEL, _machine, engine_ttft, hf_decode, hf_model

LLAMA_DIR = Path("build/llama.cpp")
# Rounds per measurement, averaged. Each round measures every stack once, one after another, so a drift in the
# machine's speed within the run (20-30 % over minutes here at times, docs/cpu.md) lands on
# every stack rather than on the ones measured while it lasted.
ROUNDS = 3


def engine_decode(model_dir: Path, batch: int, ctx: int, steps: int, engine_kw: dict) -> tuple[float, float | None]:
    """This engine's decode tokens/s over `steps` steps at a batch and (synthetic) context, and the seconds its
    compiled decode step took to compile at start-up for that batch size (None: eager, or loaded from a saved
    step, engine/compiled_decode.py)."""
    engine = filled_engine(model_dir, batch, ctx, steps, **engine_kw)
    rate = timed_decode(engine, steps)
    graphs = engine.runner.graphs
    compiled = isinstance(graphs, CompiledDecode) and not graphs.loaded.get(batch, True)
    return rate, (round(graphs.compile_s[batch], 1) if compiled else None)


def _run_json(cmd: list[str]) -> list[dict]:
    """A llama.cpp tool's JSON (one array) or JSON-lines output."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    text = proc.stdout.strip()
    return json.loads(text) if text.startswith("[") else [json.loads(ln) for ln in text.splitlines() if ln.startswith("{")]


def llama_bench(tools: Path, gguf: Path, contexts: list[int], steps: int, prefill: int, threads: int) -> dict:
    """One run of batch-1 decode tokens/s after each context (llama-bench -d), and of prompt tokens/s for
    `prefill` tokens."""
    depth = ",".join(map(str, contexts))
    decode = _run_json([str(tools / "llama-bench"), "-m", str(gguf), "-p", "0", "-n", str(steps), "-d", depth,
                        "-t", str(threads), "-r", "1", "-o", "json"])
    prompt = _run_json([str(tools / "llama-bench"), "-m", str(gguf), "-p", str(prefill), "-n", "0",
                        "-t", str(threads), "-r", "1", "-o", "json"])
    out = {int(r["n_depth"]): float(r["avg_ts"]) for r in decode}
    return {"decode": out, "prefill_tokens_per_s": float(prompt[0]["avg_ts"])}


def llama_batched(tools: Path, gguf: Path, ctx: int, batch: int, steps: int, threads: int) -> float:
    """Decode tokens/s of `batch` sequences sharing one `ctx`-token prompt (llama-batched-bench -pps)."""
    rows = _run_json([str(tools / "llama-batched-bench"), "-m", str(gguf), "-c", str(batch * (ctx + steps) + 256),
                      "-b", "2048", "-ub", "512", "-npp", str(ctx), "-ntg", str(steps), "-npl", str(batch), "-pps",
                      "-t", str(threads), "--output-format", "jsonl"])
    return float(rows[0]["speed_tg"])


Cells = dict[tuple[int, int], float]  # (context, batch) -> decode tokens/s


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 2)


def bench_cpu(student: Path, contexts: list[int], batches: list[int], steps: int, prefill: int, threads: int,
              dtypes: list[str], quantizations: list[str], modes: list[str], tools: Path | None, hf: bool,
              rounds: int = ROUNDS) -> dict:
    teacher_dir = resolve_model(MODEL)
    result: dict = {"benchmark": "cpu", "teacher": MODEL, "student": str(student), "machine": _machine(threads),
                    "steps": steps, "prefill_tokens": prefill, "rounds": rounds,
                    "note": "compare only within this run (shared, noisy machine); each value is the mean of the "
                            "rounds, every round measuring every stack once"}
    engines: dict[str, tuple[Path, dict]] = {}
    for model_name, model_dir in (("teacher", teacher_dir), ("student", student)):
        for dtype in dtypes:
            for quant in quantizations:
                for mode in modes:
                    kw = {"dtype": dtype, "quantization": None if quant == "none" else quant,
                          "enforce_eager": mode == "eager"}
                    engines[f"ours_{model_name}_{dtype}_{quant}_{mode}"] = (model_dir, kw)
    cells = [(c, b) for c in contexts for b in batches]
    decode: dict[str, list[Cells]] = {}  # stack -> one Cells per round
    prefills: dict[str, list[float]] = {}
    stacks: dict[str, dict] = {}
    hf_lm = hf_model(load_model(teacher_dir)) if hf else None
    with tempfile.TemporaryDirectory() as tmp:
        ggufs: dict[str, Path] = {}
        if tools is not None:
            from models.gguf import write_gguf

            ggufs["llamacpp_f16"] = write_gguf(teacher_dir, Path(tmp) / "f16.gguf", "f16",
                                               vocab_from=named_model_gguf(MODEL))
            ggufs["llamacpp_q8_0"] = Path(tmp) / "q8_0.gguf"
            subprocess.run([str(tools / "llama-quantize"), str(ggufs["llamacpp_f16"]), str(ggufs["llamacpp_q8_0"]),
                            "Q8_0"], check=True, capture_output=True)
        for _ in range(rounds):
            for name, (model_dir, kw) in engines.items():
                gc.collect()
                ttft = engine_ttft(model_dir, kw["dtype"], prefill, threads, kw["quantization"])
                prefills.setdefault(name, []).append(prefill / ttft)
                measured: Cells = {}
                for c, b in cells:
                    gc.collect()
                    measured[c, b], compile_s = engine_decode(model_dir, b, c, steps, kw)
                    if compile_s is not None:  # the first engine of a batch size compiles; later ones load its saved step
                        stacks.setdefault(name, {}).setdefault("compile_s", {}).setdefault(b, compile_s)
                decode.setdefault(name, []).append(measured)
                print(name, round(prefills[name][-1], 1), file=sys.stderr, flush=True)
            if hf_lm is not None:
                decode.setdefault("hf_float32", []).append({(c, b): hf_decode(hf_lm, b, c, steps) for c, b in cells})
            for name, gguf in ggufs.items():
                single = llama_bench(tools, gguf, contexts, steps, prefill, threads)
                prefills.setdefault(name, []).append(single["prefill_tokens_per_s"])
                decode.setdefault(name, []).append({(c, b): single["decode"][c] if b == 1 else
                                                    llama_batched(tools, gguf, c, b, steps, threads) for c, b in cells})
                print(name, single, file=sys.stderr, flush=True)
    rows = []
    for c, b in cells:
        row: dict = {"context": c, "batch": b}
        row.update({name: _mean([r[c, b] for r in per_round]) for name, per_round in decode.items()})
        row["per_round"] = {name: [round(r[c, b], 2) for r in per_round] for name, per_round in decode.items()}
        for ref in ("llamacpp_f16", "hf_float32"):  # ratios to the references, within this run
            if ref in row:
                row[f"vs_{ref}"] = {k: round(row[k] / row[ref], 2) for k in decode if k.startswith("ours_")}
        rows.append(row)
    for name in decode:
        stacks.setdefault(name, {})
        if name in prefills:
            stacks[name]["prefill_tokens_per_s"] = round(_mean(prefills[name]), 1)
            stacks[name]["prefill_per_round"] = [round(v, 1) for v in prefills[name]]
    result["student_decode_step_aten_ops_1x1k"] = {mode: decode_step_ops(student, 1024, mode == "eager")
                                                    for mode in modes}
    result["stacks"] = stacks
    result["decode_tokens_per_s"] = rows
    return result


def _label(stack: str) -> str:
    """A stack's short name: ours_student_bfloat16_none_compiled -> student bfloat16."""
    return stack.removeprefix("ours_").replace("_none", "").replace("_compiled", "").replace("_", " ")


def plot_cpu(result: dict, path: Path) -> None:
    """Decode tokens/s against context, one panel per batch size, a line per stack; prefill tokens/s as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    rows = result["decode_tokens_per_s"]
    batches = sorted({r["batch"] for r in rows})
    stacks = [k for k in result["stacks"] if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, len(batches) + 1, figsize=(5 * (len(batches) + 1), 4.2))
    for ax, b in zip(axes, batches):
        cells = sorted((r for r in rows if r["batch"] == b), key=lambda r: r["context"])
        for name in stacks:
            style = "--" if name.startswith(("llamacpp", "hf")) else "-"
            ax.plot([r["context"] for r in cells], [r.get(name) for r in cells], style, marker="o", label=_label(name))
        ax.set(xscale="log", xlabel="context (tokens)", ylabel="decode tokens/s (whole batch)", title=f"batch {b}")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks([r["context"] for r in cells], [f"{r['context'] // 1024}k" for r in cells])
    prefill = {k: v["prefill_tokens_per_s"] for k, v in result["stacks"].items() if "prefill_tokens_per_s" in v}
    axes[-1].barh([_label(k) for k in prefill], list(prefill.values()))
    axes[-1].set(xlabel=f"prefill tokens/s ({result['prefill_tokens']}-token prompt)", title="prefill")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"CPU decode, {result['machine']['threads']} threads, {result['machine']['cpu']} (one run)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def configure(parser: argparse.ArgumentParser, ints) -> None:
    parser.add_argument("--student", type=Path, default=Path("checkpoints/attamba-smollm2-p8-l64"),
                        help="the Attamba student checkpoint (default: %(default)s)")
    parser.add_argument("--contexts", type=ints, default=[1024, 4096, 8192])
    parser.add_argument("--batches", type=ints, default=[1, 8])
    parser.add_argument("--steps", type=int, default=16,
                        help="timed decode steps per run of a cell (after one warm-up; the rounds' runs averaged)")
    parser.add_argument("--prefill-tokens", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="rounds, each measuring every stack once; "
                        "every value is their mean (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtypes", default="float32,bfloat16", help="engine dtypes, comma-separated")
    parser.add_argument("--quantizations", default="none,int8", help="engine weight quantizations, comma-separated")
    parser.add_argument("--modes", default="compiled,eager",
                        help="engine decode steps, comma-separated: compiled (the default engine) and/or eager "
                             "(--enforce-eager)")
    parser.add_argument("--llama-dir", type=Path, default=LLAMA_DIR,
                        help="where `make llama-bench` put llama-bench, llama-batched-bench and llama-quantize")
    parser.add_argument("--skip-llamacpp", action="store_true")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench-results"),
                        help="directory for bench-cpu.json and its plot, bench-cpu.png")
    parser.add_argument("--no-plot", action="store_true", help="write no bench-cpu.png")


def run(args: argparse.Namespace) -> int:
    tools = None if args.skip_llamacpp else args.llama_dir
    if tools is not None:
        missing = [t for t in ("llama-bench", "llama-batched-bench", "llama-quantize") if not (tools / t).exists()]
        if missing:
            raise RuntimeError(f"{', '.join(missing)} not found in {tools}: run `make llama-bench` or pass --skip-llamacpp")
    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - {"compiled", "eager"}:
        raise ValueError("--modes takes compiled and/or eager")
    if min(args.steps, args.prefill_tokens, args.threads, args.rounds) < 1:
        raise ValueError("--steps, --prefill-tokens, --threads and --rounds must be positive")
    torch.set_num_threads(args.threads)
    result = bench_cpu(args.student, args.contexts, args.batches, args.steps, args.prefill_tokens, args.threads,
                       [d for d in args.dtypes.split(",") if d], [q for q in args.quantizations.split(",") if q],
                       modes, tools, not args.skip_hf, args.rounds)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench-cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    if not args.no_plot:
        plot_cpu(result, args.out / "bench-cpu.png")
    print(json.dumps(result, indent=2))
    return 0
