"""The uptraining measurements of docs/uptrain.md: perplexity, cache bytes and samples of a teacher,
its uptrained Attamba students and two untrained controls per chunk size P:
  zero-SSM  the teacher restricted to the Attamba pattern (the student before training)
  sliding   the teacher with a sliding window whose cache, at the evaluation length, holds at least
            the student's bytes (window ring plus SSM and conv states)

    python -m training.uptrain_report --runs runs/uptrain-p8 ... --out docs/uptrain.json --plot docs/uptrain.png

With --long-windows, --passkey-trials and --chat each row also gets the long-context measurements of
training/long_eval.py (perplexity of positions 2k-4k, pass-key recall at 500/1k/2k tokens, the chat set).

A run trained with random chunk sizes (uptrain's chunk_sizes) also gets a row for its checkpoint at each of its
other sizes, to set against the runs trained at that size alone.

Rows already in --out (same evaluation settings; for a student, the same training log) are kept, so a
report can be refreshed as students train; a run without an exported student yet has only its control rows.
A student trained further is measured again and its previous row stays, named after its stage-2 steps:
--progress-plot draws every export against the steps it had seen.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from models.config import ModelConfig
from models.kv_spec import CacheSpec
from models.lm import LM
from models.loading import load_model
from models.registry import resolve_model
from models.tokenizer import Tokenizer

from server.chat import load_chat_template

from .data import encode_corpus, read_split
from .evaluate import evaluate_ppl
from .long_eval import chat_accuracy, greedy_batch, load_chat_set, long_ppl, passkey
from .uptrain import UptrainConfig, build_student, student_config

PROMPTS = (
    "The history of the Roman Empire",
    "Question: What is the capital of France?\nAnswer:",
    "In 2010, the band released their second album,",
)
LENGTHS = (1024, 4096, 8192)
PASSKEY_FILLER = (500, 1000, 2000)


def cache_bytes(cfg: ModelConfig, n: int) -> int:
    """One sequence's cache at n tokens: fp16 K/V and conv states, fp32 SSM states."""
    return CacheSpec.from_config(cfg).seq_bytes(n, torch.float16)


def equal_cache_window(teacher: ModelConfig, student: ModelConfig, n: int) -> int:
    """The smallest sliding window whose cache at n tokens holds at least the student's bytes."""
    target, w = cache_bytes(student, n), 1
    while cache_bytes(teacher.replace(kind="sliding", sliding_window=w), n) < target:
        w += 1
    return w


def with_teacher_layers(student: LM, teacher: LM, layers: list[int]) -> LM:
    """The student with the teacher's own blocks (full attention, every key kept) at `layers`: which layers
    recall needs whole (the reference paths read each layer's keys from its block's spec)."""
    for layer in layers:
        student.blocks[layer] = teacher.blocks[layer]
    return student.eval()


def sliding_control(teacher: LM, window: int) -> LM:
    """The teacher's weights with a sliding window of `window` tokens (the equal-cache control)."""
    model = LM(teacher.config.replace(kind="sliding", sliding_window=window))
    model.load_state_dict(teacher.state_dict())
    model.tie_weights()
    return model.eval()


def measure(name: str, model: LM, tokenizer: Tokenizer, text: str, args: argparse.Namespace, **extra) -> dict:
    t0 = time.time()
    ppl = evaluate_ppl(model, tokenizer, text, args.seq_len, args.batch_size, args.eval_tokens)
    row = {"name": name, "kind": model.config.kind, "token_ppl": ppl["token_ppl"], "word_ppl": ppl["word_ppl"],
           "tokens": ppl["tokens"], **extra,
           "cache_bytes": {str(n): cache_bytes(model.config, n) for n in (args.seq_len, *LENGTHS)},
           "samples": [tokenizer.decode(r) for r in
                       greedy_batch(model, [tokenizer.encode(p) for p in PROMPTS], args.sample_tokens, batch_size=1)]}
    if args.long_windows:
        row["long_ppl"] = long_ppl(model, encode_corpus(tokenizer, text), 4096, 2048, args.long_windows)
    if args.passkey_trials:
        row["passkey"] = [passkey(model, tokenizer, n, args.passkey_trials) for n in PASSKEY_FILLER]
    if args.chat:
        chat = load_chat_template(model.config, tokenizer)
        row["chat"] = chat_accuracy(model, tokenizer, chat.render, load_chat_set(), stop_ids=tuple(chat.stop_token_ids))
    print(f"{name}: token ppl {row['token_ppl']:.2f} ({time.time() - t0:.0f} s)", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, help="uptrain run directories (exported students)")
    parser.add_argument("--students", nargs="*", default=[], help="more student checkpoints (rows named by directory)")
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--seq-len", type=int, default=512, help="evaluation windows (non-overlapping)")
    parser.add_argument("--eval-tokens", type=int, default=8192, help="predicted tokens: a prefix of the test split")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--sample-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--long-windows", type=int, default=0, help="4k-token windows for positions 2k-4k (0: off)")
    parser.add_argument("--passkey-trials", type=int, default=0, help="pass-key trials per filler length (0: off)")
    parser.add_argument("--chat", action="store_true", help="score the chat set (training/chat_eval.json)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--plot", type=Path, help="perplexity against cache bytes, a marker per row")
    parser.add_argument("--progress-plot", type=Path,
                        help="each student's exports (this one and the earlier rows) against its stage-2 steps")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    teacher_dir = resolve_model(args.teacher)
    teacher = load_model(teacher_dir)
    tokenizer = Tokenizer.from_file(teacher_dir / "tokenizer.json")
    text = read_split("test")
    report = {"teacher": args.teacher, "split": "test", "eval_tokens": args.eval_tokens, "seq_len": args.seq_len,
              "windows": "non-overlapping, a prefix of the test split", "prompts": list(PROMPTS),
              "long_windows": args.long_windows, "passkey_trials": args.passkey_trials, "chat": args.chat, "rows": []}
    kept = {}
    if args.out.is_file():
        old = json.loads(args.out.read_text())
        if all(old.get(k) == v for k, v in report.items() if k != "rows"):
            kept = {r["name"]: r for r in old["rows"]}

    earlier = [r for r in kept.values() if r.get("earlier_export")]  # rows of a student's earlier exports stay

    def add(name: str, build, **extra) -> None:
        row = kept.get(name)
        if row is not None and row.get("trained") != extra.get("trained"):  # a student trained further: measured
            earlier.append({**row, "name": f"{name} after {row['trained']['stage2_steps']} stage-2 steps",
                            "earlier_export": True, "export_of": name})  # again, its previous row kept
            row = None
        if row is None:
            row = measure(name, build(), tokenizer, text, args, **extra)
        report["rows"].append(row)
        args.out.write_text(json.dumps(report, indent=2) + "\n")

    add("teacher", lambda: teacher, P=None)
    for path in map(Path, args.students):
        add(path.name, lambda: load_model(path), P=ModelConfig.load(path).chunk_size)
    for run in map(Path, args.runs):
        uc = UptrainConfig(**json.loads((run / "uptrain_config.json").read_text()))
        cfg = student_config(teacher.config, uc, args.teacher)
        if (run / "model.safetensors").is_file():
            log = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]
            trained = {f"stage{s}_steps": sum(r["stage"] == s for r in log) for s in (1, 2)}
            trained["tokens"] = len(log) * uc.batch_size * uc.seq_len
            add(f"attamba P={uc.chunk_size} L={uc.window}", lambda: load_model(run), P=uc.chunk_size, trained=trained)
            for p in sorted(set(uc.random_chunk_sizes) - {uc.chunk_size}):  # a random-P run's checkpoint at its other P
                add(f"attamba P={p} L={uc.window} (the P={uc.chunk_size} checkpoint of {run.name})",
                    lambda p=p: load_model(run, chunk_size=p), P=p, trained=trained)
        add(f"zero-SSM P={uc.chunk_size} L={uc.window}", lambda: build_student(teacher, cfg, uc.seed).eval(), P=uc.chunk_size)
        w = equal_cache_window(teacher.config, cfg, args.seq_len)
        add(f"sliding W={w} (= P={uc.chunk_size} L={uc.window} cache)",
            lambda: sliding_control(teacher, w),
            P=uc.chunk_size, window=w)
    report["rows"] += sorted(earlier, key=lambda r: r["trained"]["stage2_steps"])
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(report, args.plot)
    if args.progress_plot:
        plot_progress(report, args.progress_plot)
    return 0


def plot(report: dict, path: Path) -> None:
    """Perplexity against cache bytes at the evaluation length, one marker per row type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    n = str(report["seq_len"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"teacher": ("k", "*"), "attamba": ("tab:blue", "o"), "zero-SSM": ("tab:gray", "x"),
              "sliding": ("tab:red", "s")}
    for key, (color, marker) in styles.items():
        rows = [r for r in report["rows"] if r["name"].startswith(key)]
        if rows:
            ax.scatter([r["cache_bytes"][n] / 2**20 for r in rows], [r["token_ppl"] for r in rows], c=color,
                       marker=marker, label=key, s=60)
            for r in rows:
                if r["P"]:
                    ax.annotate(f"P={r['P']}", (r["cache_bytes"][n] / 2**20, r["token_ppl"]), fontsize=8,
                                textcoords="offset points", xytext=(4, 4))
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(FormatStrFormatter("%g"))
        axis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.set_xlabel(f"cache per sequence at {n} tokens (MiB, fp16 K/V, fp32 SSM state)")
    ax.set_ylabel("WikiText-2 test token perplexity")
    ax.set_title(f"SmolLM2-135M uptrained to Attamba: first {report['eval_tokens']} test tokens")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_progress(report: dict, path: Path) -> None:
    """Perplexity, pass-key recall and the chat set against stage-2 steps, one line per student (its exports),
    the teacher and the untrained controls as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    students: dict[str, list[dict]] = {}
    for r in report["rows"]:
        if r.get("trained"):
            students.setdefault(r.get("export_of", r["name"]), []).append(r)
    controls = [r for r in report["rows"] if not r.get("trained")]
    panels = [("WikiText-2 test token perplexity", lambda r: r["token_ppl"])]
    if report.get("passkey_trials"):
        k = PASSKEY_FILLER.index(1000)
        panels.append((f"pass key from 1k tokens back (of {report['passkey_trials']})",
                       lambda r: r["passkey"][k]["recovered"] if "passkey" in r else None))
    if report.get("chat"):
        panels.append(("chat set answered", lambda r: r["chat"]["correct"] if "chat" in r else None))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (label, value) in zip(axes[0], panels):
        for name, rows in students.items():
            rows = sorted(rows, key=lambda r: r["trained"]["stage2_steps"])
            ax.plot([r["trained"]["stage2_steps"] for r in rows], [value(r) for r in rows], marker="o", label=name)
        for i, r in enumerate(controls):
            if value(r) is not None:
                ax.axhline(value(r), ls="--", color=f"C{i + len(students)}", label=r["name"])
        ax.set(xlabel="stage-2 steps", title=label)
        if ax is not axes[0][0]:
            ax.set_ylim(bottom=0)  # counts
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
