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
from pathlib import Path

import torch

from models.config import ModelConfig
from training.data import read_split
from training.evaluate import evaluate_ppl
from models.kv_spec import CacheSpec
from models.lm import build_model
from models.loading import load_model
from models.state import state_bytes
from models.tokenizer import Tokenizer
from training.train import load_config, load_train_ids

from .paper_report import BY_NAME, CONTEXTS, NOT_RUN, ROWS, comparisons, plot, write_markdown

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "table"
RUNS = ROOT / "runs" / "table"
DOCS = ROOT / "docs"
EVAL_FILE = "eval-test.json"


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
def attn_flops(cfg: ModelConfig, n: int) -> int:
    """FLOPs of q.k and p.v for the token at position n: 2 per multiply-add, summed over layers."""
    return sum(4 * cfg.attn_dim * spec.keys_seen(n) for spec in CacheSpec.from_config(cfg).layers)


def mean_key_fraction(cfg: ModelConfig, seq_len: int) -> float:
    """Mean over a window of seq_len queries of keys seen / keys a full causal query sees."""
    fractions = [spec.keys_seen(t) / (t + 1) for spec in CacheSpec.from_config(cfg).layers for t in range(seq_len)]
    return sum(fractions) / len(fractions)


def costs(cfg: ModelConfig) -> dict:
    return {
        "cache_bytes": {str(n): state_bytes(cfg, n, torch.float16) for n in CONTEXTS},
        "attn_flops_per_token": {str(n): attn_flops(cfg, n) for n in CONTEXTS},
        "mean_key_fraction_at_train_len": mean_key_fraction(cfg, cfg.max_seq_len),
    }


# ---- train / evaluate ---------------------------------------------------------------------
def train(name: str, max_minutes: float | None) -> None:
    """Train (or resume) one row in a child process with its output in runs/table/<row>/train.out."""
    out = run_dir(name)
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "entrypoints.cli", "train", "--config", str(config_path(name)), "--out", str(out),
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
