"""The paper's WikiText-2 table at small scale: train every row alike, evaluate, write docs/results.*.

    .venv/bin/python -m benchmarks.paper_table [--run] [--eval] [--report] [--rows A,B] [--jobs N]

--run trains the rows of configs/table/ that have not finished (runs/table/<row>, resumed with
--resume auto), --eval computes token- and word-level perplexity on the full WikiText-2 test
split (non-overlapping windows of the training length), --report writes docs/results.json,
docs/results.md and docs/results.png. Without any of the three flags, all three run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from models.config import ModelConfig
from models.data import read_split
from models.evaluate import evaluate_ppl
from models.layers import num_boundaries
from models.lm import build_model
from models.loading import load_model
from models.state import state_bytes
from models.tokenizer import Tokenizer
from models.train import load_train_ids, load_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "table"
RUNS = ROOT / "runs" / "table"
DOCS = ROOT / "docs"
CONTEXTS = (1024, 4096)
EVAL_FILE = "eval-test.json"
MIB = 2**20
NOT_RUN = "not yet run"


@dataclass(frozen=True)
class Row:
    """One line of the table: a config in configs/table/ and the paper's number for its counterpart."""

    name: str
    label: str
    paper_ppl: float  # WikiText-2 test token ppl in the paper
    paper_ref: float  # the paper's full transformer trained alike (same token count)
    paper_note: str


ROWS = (
    Row("transformer", "Transformer (full KV)", 29.40, 29.40, "~1B tokens"),
    Row("attamba-p4-l8", "Attamba P=4, L=8", 33.54, 29.40, "~1B tokens, N=32"),
    Row("attamba-p8-l8", "Attamba P=8, L=8", 34.30, 29.40, "~1B tokens, N=32"),
    Row("attamba-p16-l8", "Attamba P=16, L=8", 38.20, 29.40, "~1B tokens, N=32"),
    Row("attamba-p4-l32", "Attamba P=4, L=32", 21.74, 20.72, "~8B tokens; transformer 20.72"),
    Row("reduced-p4", "Reduced-KV transformer, width d/4", 33.49, 29.40, "~1B tokens"),
    Row("reduced-p8", "Reduced-KV transformer, width d/8", 36.73, 29.40, "~1B tokens"),
    Row("sliding-w41", "Sliding-window transformer, cache as P=8", 43.91, 29.40, "~1B tokens"),
    Row("pseudo-p8", "Pseudo-chunk (full causal over SSM keys), P=8", 28.73, 29.40, "~1B tokens"),
)
BY_NAME = {row.name: row for row in ROWS}

# comparisons the paper draws: (label, row, baseline row); differences are row / baseline - 1
COMPARISONS = {
    "Attamba vs full transformer": [
        ("Attamba P=4, L=8 vs transformer", "attamba-p4-l8", "transformer"),
        ("Attamba P=8, L=8 vs transformer", "attamba-p8-l8", "transformer"),
        ("Attamba P=16, L=8 vs transformer", "attamba-p16-l8", "transformer"),
        ("Attamba P=4, L=32 vs transformer", "attamba-p4-l32", "transformer"),
    ],
    "Attamba vs transformers of equal cache": [
        ("Attamba P=4 vs reduced-KV d/4", "attamba-p4-l8", "reduced-p4"),
        ("Attamba P=8 vs reduced-KV d/8", "attamba-p8-l8", "reduced-p8"),
        ("Attamba P=8 vs sliding window (cache as P=8)", "attamba-p8-l8", "sliding-w41"),
    ],
    "Pseudo-chunk vs Attamba": [
        ("Pseudo-chunk P=8 vs Attamba P=8", "pseudo-p8", "attamba-p8-l8"),
        ("Pseudo-chunk P=8 vs transformer", "pseudo-p8", "transformer"),
    ],
}
SAME = 0.01  # relative differences below 1 % count as "about equal"


def config_path(name: str) -> Path:
    return CONFIGS / f"{name}.json"


def run_dir(name: str) -> Path:
    return RUNS / name


def model_config(name: str) -> ModelConfig:
    model_section, _ = load_config(config_path(name))
    return ModelConfig.from_dict(model_section)


def finished(name: str) -> bool:
    return (run_dir(name) / "model.safetensors").is_file()


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def step_seconds(name: str) -> float | None:
    """Summed wall time of the logged training steps (survives resumes; excludes validation and checkpoints)."""
    log = run_dir(name) / "log.jsonl"
    if not log.is_file():
        return None
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return sum(r["tokens"] / r["step"] / r["tok_s"] for r in records)


# ---- cost model ---------------------------------------------------------------------------
def keys_seen(cfg: ModelConfig, layer: int, n: int) -> int:
    """Keys the query at 0-based position n attends to in `layer`."""
    if cfg.kind == "attamba":
        old = num_boundaries(max(n - cfg.window, 0), cfg.chunk_size, cfg.layer_offset(layer))
        return int(old) + min(cfg.window + 1, n + 1)
    if cfg.kind == "sliding":
        return min(cfg.sliding_window, n + 1)
    return n + 1


def attn_flops(cfg: ModelConfig, n: int) -> int:
    """FLOPs of q.k and p.v for the token at position n: 2 per multiply-add, summed over layers."""
    return sum(4 * cfg.attn_dim * keys_seen(cfg, layer, n) for layer in range(cfg.n_layers))


def mean_key_fraction(cfg: ModelConfig, seq_len: int) -> float:
    """Mean over a window of seq_len queries of keys seen / keys a full causal query sees."""
    fractions = [keys_seen(cfg, layer, t) / (t + 1) for layer in range(cfg.n_layers) for t in range(seq_len)]
    return sum(fractions) / len(fractions)


def costs(cfg: ModelConfig) -> dict:
    return {
        "cache_bytes": {str(n): state_bytes(cfg, n, torch.float16, torch.float32) for n in CONTEXTS},
        "attn_flops_per_token": {str(n): attn_flops(cfg, n) for n in CONTEXTS},
        "mean_key_fraction_at_train_len": mean_key_fraction(cfg, cfg.max_seq_len),
    }


# ---- train / evaluate ---------------------------------------------------------------------
def train(name: str, max_minutes: float | None) -> None:
    """Train (or resume) one row in a child process with its output in runs/table/<row>/train.out."""
    out = run_dir(name)
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "server.cli", "train", "--config", str(config_path(name)), "--out", str(out),
           "--resume", "auto", "--device", "cpu"]
    if max_minutes is not None:
        cmd += ["--max-minutes", str(max_minutes)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(out / "train.out", "a") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"training {name} failed (exit {proc.returncode}); see {out / 'train.out'}")


def evaluate(name: str, test_text: str, batch_size: int) -> dict:
    """Token- and word-level perplexity of a finished row on the full test split."""
    started = time.time()
    model = load_model(run_dir(name), device="cpu")
    tokenizer = Tokenizer.from_file(run_dir(name) / "tokenizer.json")
    result = evaluate_ppl(model, tokenizer, test_text, model.config.max_seq_len, batch_size)
    result["eval_s"] = time.time() - started
    (run_dir(name) / EVAL_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return result


def process(name: str, args: argparse.Namespace, test_text: str) -> None:
    if args.run and not finished(name):
        print(f"[{time.strftime('%H:%M:%S')}] training {name}", flush=True)
        train(name, args.max_minutes)
    if args.eval and finished(name) and not (run_dir(name) / EVAL_FILE).is_file():
        print(f"[{time.strftime('%H:%M:%S')}] evaluating {name}", flush=True)
        result = evaluate(name, test_text, args.batch_size)
        print(f"[{time.strftime('%H:%M:%S')}] {name}: token ppl {result['token_ppl']:.2f}", flush=True)


# ---- report -------------------------------------------------------------------------------
def collect() -> dict:
    """Everything the report shows, as JSON."""
    _, tc = load_config(config_path(ROWS[0].name))
    rows = []
    for row in ROWS:
        cfg = model_config(row.name)
        ev = _read_json(run_dir(row.name) / EVAL_FILE)
        rows.append({
            "name": row.name, "label": row.label, "config": str(config_path(row.name).relative_to(ROOT)),
            "kind": cfg.kind, "chunk_size": cfg.chunk_size, "window": cfg.window, "sliding_window": cfg.sliding_window,
            "attn_dim": cfg.attn_dim, "attn_heads": cfg.num_attn_heads, "non_embedding_params": _params(cfg),
            "status": "done" if ev else NOT_RUN,
            "token_ppl": ev.get("token_ppl"), "word_ppl": ev.get("word_ppl"),
            "test_tokens": ev.get("tokens"), "test_words": ev.get("words"),
            "train_step_s": step_seconds(row.name) if ev else None, "eval_s": ev.get("eval_s"),
            "paper": {"token_ppl": row.paper_ppl, "transformer_ppl": row.paper_ref, "note": row.paper_note},
            **costs(cfg),
        })
    tokenizer = Tokenizer.from_file(ROOT / tc.tokenizer)
    return {
        "setup": {
            "model": {k: v for k, v in load_config(config_path(ROWS[0].name))[0].items()
                      if k in ("d_model", "n_layers", "n_heads", "ssm_state", "ssm_inner", "ssm_heads", "max_seq_len")},
            "vocab_size": tokenizer.vocab_size,
            "train": {"total_tokens": tc.total_tokens, "steps": tc.steps, "batch_size": tc.batch_size,
                      "seq_len": tc.seq_len, "lr": tc.lr, "min_lr": tc.min_lr, "warmup_steps": tc.warmup_steps,
                      "weight_decay": tc.weight_decay, "seed": tc.seed, "threads": tc.threads},
            "train_corpus_tokens": int(load_train_ids(tokenizer, tc).numel()),
            "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, one thread per run",
            "kv_dtype": "float16", "ssm_state_dtype": "float32", "conv_state_dtype": "float16",
        },
        "rows": rows,
    }


def _params(cfg: ModelConfig) -> int:
    """Parameters outside the embedding and the output head."""
    model = build_model(cfg, 0)
    return sum(p.numel() for p in model.parameters()) - model.embed.weight.numel() - model.head.weight.numel()


def _rel(a: float, b: float) -> float:
    return a / b - 1


def _direction(x: float) -> str:
    return "about equal" if abs(x) < SAME else ("higher" if x > 0 else "lower")


def _pct(x: float) -> str:
    return f"{100 * x:+.1f} %"


def _mib(n: int) -> str:
    return f"{n / MIB:.3f}" if n < 10 * MIB else f"{n / MIB:.1f}"


def _flops(n: int) -> str:
    return f"{n / 1e6:.2f} M"


def _verdict(ours: float, paper: float) -> str:
    if _direction(ours) != _direction(paper):
        return "disagrees"
    return "agrees" if _direction(paper) == "about equal" else f"agrees (gap {ours / paper:.1f}x the paper's)"


def comparisons(data: dict) -> dict:
    """Relative perplexity differences, ours and the paper's, for every pair in COMPARISONS."""
    by = {r["name"]: r for r in data["rows"]}
    out = {}
    for section, pairs in COMPARISONS.items():
        out[section] = []
        for label, a, b in pairs:
            pa, pb = BY_NAME[a], BY_NAME[b]
            # the 8B-token row is compared with the paper's transformer at 8B tokens
            paper_b = pa.paper_ref if b == "transformer" else pb.paper_ppl
            paper = _rel(pa.paper_ppl, paper_b)
            ours = None if by[a]["token_ppl"] is None or by[b]["token_ppl"] is None else _rel(by[a]["token_ppl"], by[b]["token_ppl"])
            verdict = NOT_RUN if ours is None else _verdict(ours, paper)
            out[section].append({"label": label, "row": a, "baseline": b, "ours": ours, "paper": paper,
                                 "paper_values": [pa.paper_ppl, paper_b], "verdict": verdict})
    return out


def write_markdown(data: dict, comps: dict, path: Path) -> None:
    setup, rows = data["setup"], data["rows"]
    m, t = setup["model"], setup["train"]
    epochs = t["total_tokens"] / setup["train_corpus_tokens"]
    lines = [
        "# The paper's table at small scale (WikiText-2)",
        "",
        "Every row below is trained by the same script (`attamba train`) with the same size, data, token budget,",
        "seed and learning-rate schedule, then evaluated on the full WikiText-2 test split. Generated by",
        "`benchmarks/paper_table.py`; rerun with",
        "",
        "    .venv/bin/python -m benchmarks.paper_table --run --eval --report --jobs 2",
        "",
        "(rows already trained or evaluated are skipped; an interrupted row resumes from its checkpoint).",
        "",
        "## What was run",
        "",
        f"- Size (all rows): d_model {m['d_model']}, {m['n_layers']} layers, {m['n_heads']} heads of "
        f"{m['d_model'] // m['n_heads']} (reduced-KV rows: attention width d/P in heads of 16), SSM N = {m['ssm_state']}, "
        f"E = {m['ssm_inner']}, {m['ssm_heads']} SSM heads, training length {m['max_seq_len']}, "
        f"vocabulary {setup['vocab_size']} (`checkpoints/tokenizer-wt2.json`).",
        f"- Training: WikiText-2 train split, {t['total_tokens']:,} tokens = {t['steps']} steps of "
        f"{t['batch_size']} x {t['seq_len']} ({epochs:.2f} epoch of the {setup['train_corpus_tokens']:,}-token corpus), "
        f"AdamW lr {t['lr']} with {t['warmup_steps']} warmup steps and cosine decay to {t['min_lr']}, weight decay "
        f"{t['weight_decay']}, seed {t['seed']}. Configs: `configs/table/<row>.json`; runs: `runs/table/<row>`.",
        f"- Machine: {setup['machine']}, two runs at a time at most, alongside other jobs on the same machine that "
        "slowed some rows several-fold: wall times are indicative only.",
        "- Evaluation: full WikiText-2 test split, non-overlapping windows of 256 tokens, every token but the first "
        "predicted once. Token-level perplexity is the paper's metric; word-level perplexity divides the same total "
        "NLL by the whitespace-separated words of the split.",
        "",
        "## Perplexity",
        "",
        "| row | token ppl | word ppl | vs transformer | paper token ppl | paper vs transformer | train time | eval time |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    ref = next(r for r in rows if r["name"] == "transformer")["token_ppl"]
    for r in rows:
        paper = r["paper"]
        paper_cell = f"{paper['token_ppl']:.2f} ({paper['note']})"
        paper_rel = _pct(_rel(paper["token_ppl"], paper["transformer_ppl"]))
        if r["token_ppl"] is None:
            lines.append(f"| {r['label']} | {NOT_RUN} | {NOT_RUN} | | {paper_cell} | {paper_rel} | | |")
            continue
        ours_rel = "" if ref is None else _pct(_rel(r["token_ppl"], ref))
        lines.append(f"| {r['label']} | {r['token_ppl']:.2f} | {r['word_ppl']:.2f} | {ours_rel} | {paper_cell} | "
                     f"{paper_rel} | {r['train_step_s'] / 60:.1f} min | {r['eval_s'] / 60:.1f} min |")
    done = [r for r in rows if r["token_ppl"] is not None]
    if done:
        lines += ["", f"Test split: {done[0]['test_tokens']:,} predicted tokens, {done[0]['test_words']:,} words. "
                  "Train time is the summed wall time of the logged training steps (`tokens per step / tok_s` in "
                  "`log.jsonl`, so it survives resumes; periodic validation and checkpoints excluded), eval time the "
                  "wall time of the test-split evaluation."]
    lines += [
        "",
        "## Cache and attention cost",
        "",
        "Cache: bytes one sequence keeps for decoding (`models.state.state_bytes`): K/V in fp16, SSM states in fp32, "
        "conv histories in fp16. Attamba keeps its layer's chunk boundaries plus a ring of L+1 recent K/V; the sliding "
        "row a ring of W_len; full-attention rows every position (reduced-KV rows at width d/P).",
        "",
        "Attention FLOPs per token: for the token at 0-based position n (n = 1024 or 4096, i.e. the token that follows "
        "a 1k or 4k context), 2 FLOPs per multiply-add for q.k and p.v over the keys it attends to, "
        "`4 * attn_dim * keys(n)` summed over layers, with keys(n) = (boundaries b < n - L of that layer's offset, "
        "`num_boundaries`) + L + 1 for Attamba, n + 1 for the transformer, pseudo-chunk and reduced-KV rows, and "
        "W_len for the sliding row. Projections, SSMs and FFNs are not counted. The last column is the mean, over "
        "the 256 queries of a training / evaluation window and over layers, of the keys a query sees as a fraction "
        "of full causal attention.",
        "",
        "| row | params (non-emb.) | attn width | cache @1k (MiB) | cache @4k (MiB) | attn FLOPs/token @1k | @4k "
        "| keys seen @256 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        cb, fl = r["cache_bytes"], r["attn_flops_per_token"]
        lines.append(f"| {r['label']} | {r['non_embedding_params'] / 1e6:.2f} M | {r['attn_dim']} | {_mib(cb['1024'])} | {_mib(cb['4096'])} | "
                     f"{_flops(fl['1024'])} | {_flops(fl['4096'])} | {100 * r['mean_key_fraction_at_train_len']:.0f} % |")
    lines += ["", "![token-level perplexity against cache per sequence at 4k tokens](results.png)", "",
              "## Against the paper", "",
              "Relative token-level perplexity (row / baseline - 1; negative = row is better). A comparison "
              f"agrees when both sides point the same way (differences under {100 * SAME:.0f} % count as equal).", ""]
    for section, items in comps.items():
        lines += [f"### {section}", "", "| comparison | ours | paper | verdict |", "| --- | ---: | ---: | --- |"]
        for c in items:
            ours = NOT_RUN if c["ours"] is None else _pct(c["ours"])
            pv = c["paper_values"]
            lines.append(f"| {c['label']} | {ours} | {_pct(c['paper'])} ({pv[0]:.2f} vs {pv[1]:.2f}) | {c['verdict']} |")
        lines.append("")
    lines += discussion(data, comps)
    path.write_text("\n".join(lines) + "\n")


def discussion(data: dict, comps: dict) -> list[str]:
    """Plain statements of where the small-scale numbers agree with the paper and why they may not."""
    t = data["setup"]["train"]
    epochs = t["total_tokens"] / data["setup"]["train_corpus_tokens"]
    flat = [c for items in comps.values() for c in items]
    agree = [c["label"] for c in flat if c["verdict"].startswith("agrees")]
    disagree = [c["label"] for c in flat if c["verdict"] == "disagrees"]
    missing = [c["label"] for c in flat if c["verdict"] == NOT_RUN]
    by = {r["name"]: r for r in data["rows"]}
    params = [r["non_embedding_params"] for r in data["rows"]]
    lines = ["### Summary", ""]
    if agree:
        lines.append(f"- Same direction as the paper: {'; '.join(agree)}.")
    if disagree:
        lines.append(f"- Opposite direction (or equal where the paper has a gap, or vice versa): {'; '.join(disagree)}.")
    if missing:
        lines.append(f"- Not comparable yet (a row is {NOT_RUN}): {'; '.join(missing)}.")
    order = [by[n]["token_ppl"] for n in ("attamba-p4-l8", "attamba-p8-l8", "attamba-p16-l8")]
    if None not in order:
        monotone = order[0] <= order[1] <= order[2]
        lines.append(f"- Attamba perplexity {'rises' if monotone else 'does not rise monotonically'} with P "
                     f"(P=4/8/16: {order[0]:.2f} / {order[1]:.2f} / {order[2]:.2f}; paper 33.54 / 34.30 / 38.20).")
    lines += findings(by, params)
    lines += [
        "",
        "### Why small-scale numbers can differ",
        "",
        f"- Scale: {min(params) / 1e6:.2f}-{max(params) / 1e6:.2f} M parameters outside the embeddings and head "
        f"(the paper: ~60 M in all), and {t['total_tokens']:,} "
        f"training tokens ({epochs:.2f} epoch of WikiText-2) against ~1 B (and ~8 B for the L=32 row) of DCLM. All "
        "rows are far from converged (validation loss still falling at the last step), so differences partly "
        "measure how fast each variant learns early on; with one seed per row and no measured seed variance, "
        "differences of a few percent are not established.",
        "- Short context: training and evaluation windows are 256 tokens. With L=8 a query sees its last 9 tokens "
        "in full plus every P-th summary; at 256 tokens that is a large share of the keys (column 'keys seen @256'), "
        "and with L=32 most of a window. The cost of the chunked attention pattern itself, and the benefit of a "
        "larger window, are therefore expected to be smaller here than at the paper's 1024-token training length.",
        "- 'Equal cache' is approximate: the sliding row's W_len = 256/8 + 8 + 1 = 41 matches Attamba P=8's K/V "
        "entries only at the 256-token evaluation length (beyond it Attamba's boundaries grow as n/P while the ring "
        "stays at 41), and the reduced-KV width d/P matches Attamba's one d-wide entry per P tokens only "
        "asymptotically; Attamba also keeps two fixed fp32 SSM states per layer, so at 1k and 4k tokens its cache is "
        "larger than the reduced-KV rows' (table above).",
        "- Equal tokens, not equal parameters or compute: the rows with SSM keys/values have more parameters and "
        "cost more per step than the transformers (tables above).",
        "- In-domain evaluation: training and test are both WikiText-2 here, whereas the paper trains on DCLM and "
        "tests zero-shot on WikiText-2, so absolute perplexities are not comparable; only the ratios are.",
    ]
    return lines


def findings(by: dict, params: list[int]) -> list[str]:
    """Statements that follow from the finished rows (each only when its rows have run)."""
    ppl = {name: r["token_ppl"] for name, r in by.items()}
    lines = []
    if None not in (ppl["transformer"], ppl["pseudo-p8"], ppl["attamba-p8-l8"]):
        ssm = _rel(ppl["pseudo-p8"], ppl["transformer"])
        pattern = _rel(ppl["attamba-p8-l8"], ppl["pseudo-p8"])
        lines.append(
            f"- Where Attamba P=8's gap to the transformer comes from: the SSM keys/values with full causal attention "
            f"(pseudo-chunk vs transformer) {_pct(ssm)}, the chunked attention pattern (Attamba vs pseudo-chunk) "
            f"{_pct(pattern)}; in the paper {_pct(_rel(28.73, 29.40))} and {_pct(_rel(34.30, 28.73))}."
            + (f" Here the SSM K/V are a handicap rather than a gain, likely because they add parameters ({max(params) / 1e6:.2f} M "
               f"against {by['transformer']['non_embedding_params'] / 1e6:.2f} M) that must learn to summarise "
               "chunks from scratch, which this budget is too small for." if ssm > SAME else ""))
    reduced = [n for n in ("reduced-p4", "reduced-p8") if ppl[n] is not None and ppl["transformer"] is not None
               and ppl[n] < ppl["transformer"]]
    if reduced:
        cells = ", ".join(f"{by[n]['label']} {ppl[n]:.2f}" for n in reduced)
        lines.append(
            f"- Narrower attention beats the full-width transformer here ({cells} vs {ppl['transformer']:.2f}), the "
            "reverse of the paper and of what capacity predicts, likely because early in training fewer attention "
            "parameters learn faster; the equal-cache comparisons with the reduced-KV rows then measure early "
            "learning speed, not what the cache can hold.")
    if ppl["sliding-w41"] is not None and ppl["transformer"] is not None:
        gap = _rel(ppl["sliding-w41"], ppl["transformer"])
        if gap < _rel(43.91, 29.40) / 2:
            lines.append(
                f"- The 41-token sliding window costs only {_pct(gap)} against full attention (paper "
                f"{_pct(_rel(43.91, 29.40))}): likely because at 256-token contexts an early-trained model relies mostly "
                "on nearby tokens, which the window covers, while the paper evaluates trained models at 1024 tokens.")
    if ppl["attamba-p4-l8"] is not None and ppl["attamba-p4-l32"] is not None:
        gain = _rel(ppl["attamba-p4-l32"], ppl["attamba-p4-l8"])
        lines.append(f"- Window size at P=4: L=32 vs L=8 {_pct(gain)} (the paper's window ablation at P=8: L=64 vs "
                     f"L=1 {_pct(_rel(32.31, 37.25))}).")
    return ["", "### Reading our numbers", "", *lines] if lines else []


def plot(data: dict, path: Path) -> None:
    """Token-level perplexity against cache MiB per sequence at 4k tokens, one labelled point per finished row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    colors = {"transformer": "black", "attamba": "tab:blue", "pseudo": "tab:purple", "reduced": "tab:orange",
              "sliding": "tab:red"}
    for r in data["rows"]:
        if r["token_ppl"] is None:
            continue
        x = r["cache_bytes"]["4096"] / MIB
        ax.scatter(x, r["token_ppl"], color=colors[r["kind"]], zorder=3)
        ax.annotate(r["name"], (x, r["token_ppl"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.margins(x=0.2, y=0.08)
    ax.set_xlabel("cache per sequence at 4k tokens (MiB, fp16 K/V, fp32 SSM state)")
    ax.set_ylabel("WikiText-2 test token-level perplexity")
    ax.set_title("Small-scale table: perplexity vs cache")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def report() -> None:
    data = collect()
    comps = comparisons(data)
    DOCS.mkdir(exist_ok=True)
    (DOCS / "results.json").write_text(json.dumps({**data, "comparisons": comps}, indent=2) + "\n")
    write_markdown(data, comps, DOCS / "results.md")
    plot(data, DOCS / "results.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.paper_table", description=__doc__.split("\n")[0])
    parser.add_argument("--run", action="store_true", help="train the rows that have not finished")
    parser.add_argument("--eval", action="store_true", help="evaluate finished rows on the test split")
    parser.add_argument("--report", action="store_true", help="write docs/results.{json,md,png}")
    parser.add_argument("--rows", help=f"comma-separated subset of: {','.join(r.name for r in ROWS)}")
    parser.add_argument("--jobs", type=int, default=1, help="rows trained/evaluated in parallel (one thread each)")
    parser.add_argument("--max-minutes", type=float, help="per training invocation; the row stays resumable")
    parser.add_argument("--batch-size", type=int, default=8, help="evaluation windows per forward pass")
    args = parser.parse_args(argv)
    if not (args.run or args.eval or args.report):
        args.run = args.eval = args.report = True
    names = [r.name for r in ROWS] if not args.rows else args.rows.split(",")
    unknown = [n for n in names if n not in BY_NAME]
    if unknown or args.jobs < 1:
        parser.error(f"unknown rows {unknown}" if unknown else "--jobs must be >= 1")
    failed = []
    if args.run or args.eval:
        torch.set_num_threads(1)
        test_text = read_split("test")
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = {name: pool.submit(process, name, args, test_text) for name in names}
        for name, future in futures.items():
            if future.exception() is not None:
                failed.append(name)
                print(f"{name}: {future.exception()}", file=sys.stderr)
    if args.report:
        report()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
