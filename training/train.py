"""`attamba train`: AdamW with linear warmup + cosine decay, periodic checkpoints and exact resume.

The run directory (training/loop.py) holds `train_state.pt` (model, optimizer, step, every RNG state),
`log.jsonl` (one JSON object per step, with the validation loss every eval_interval steps) and, once
training ends, the exported checkpoint `config.json` + `model.safetensors` (bf16) + `tokenizer.json`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine.settings import add_flags, build, from_args, read_json, setting
from models.config import ModelConfig
from models.lm import LM, build_model
from models.loading import save_checkpoint
from models.tokenizer import Tokenizer
from .run_flags import RunFlags

from .corpus import training_ids
from .data import batches, read_split
from .evaluate import evaluate_ppl
from .loop import Loop, RunDir, WarmupCosine, restore_rngs


@dataclass(frozen=True)
class TrainConfig:
    """The "train" section of a config file."""

    tokenizer: str
    seed: int = 0
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 1.5e-3
    min_lr: float = 1.5e-4
    warmup_steps: int = 50
    total_tokens: int = 0  # the budget; max_steps wins when both are given
    max_steps: int = 0
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_interval: int = 100
    eval_tokens: int = 16384
    eval_batch_size: int = 8
    ckpt_interval: int = 50
    threads: int = 1
    train_text: str | None = None  # a plain-text file instead of the WikiText-2 train split
    valid_text: str | None = None  # a plain-text file instead of the WikiText-2 valid split

    def __post_init__(self) -> None:
        if self.max_steps <= 0 and self.total_tokens <= 0:
            raise ValueError("train config needs total_tokens or max_steps")
        positive = ("batch_size", "seq_len", "eval_interval", "eval_tokens", "eval_batch_size", "ckpt_interval", "threads")
        bad = [name for name in positive if getattr(self, name) < 1]
        if bad or self.lr <= 0 or self.min_lr < 0 or self.warmup_steps < 0:
            raise ValueError(f"train config: invalid values for {bad or ['lr/min_lr/warmup_steps']}")

    @property
    def steps(self) -> int:
        return self.max_steps or max(1, self.total_tokens // (self.batch_size * self.seq_len))

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


@dataclass(frozen=True)
class TrainFlags:
    """Training: the config file and the device (the run directory's flags are RunFlags)."""

    config: str = setting(doc="JSON file with 'model' and 'train' sections")
    device: str = setting(doc="where the model trains", factory=lambda: "cuda" if torch.cuda.is_available() else "cpu",
                          shown="cuda when available, else cpu")


def load_config(path: str | Path) -> tuple[dict, TrainConfig]:
    """Read a config file -> (model section, TrainConfig); ValueError on malformed content."""
    raw = read_json(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict) or not isinstance(raw.get("train"), dict):
        raise ValueError(f"{path} needs a 'model' and a 'train' object")
    return raw["model"], build(TrainConfig, raw["train"], f"{path}: train")


def lr_schedule(tc: TrainConfig) -> WarmupCosine:
    """Linear warmup to tc.lr, then cosine decay to tc.min_lr."""
    return WarmupCosine(tc.steps, tc.warmup_steps, tc.min_lr / tc.lr)


def make_optimizer(model: LM, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW; matrices (and embeddings) decay, gains and per-head SSM scalars do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": tc.weight_decay, "peak": tc.lr},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "peak": tc.lr},
    ]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(0.9, 0.95), eps=1e-8)


def train_step(model: LM, opt: torch.optim.Optimizer, batch: torch.Tensor, grad_clip: float) -> float:
    """One update on a [B, T+1] batch; returns the loss."""
    with torch.autocast("cuda", torch.bfloat16, enabled=batch.device.type == "cuda"):
        logits = model(batch[:, :-1])  # [B, T, V] float32
    loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def _text(file: str | None, split: str) -> str:
    return Path(file).read_text(encoding="utf-8") if file else read_split(split)


def load_train_ids(tokenizer: Tokenizer, tc: TrainConfig) -> torch.Tensor:
    """The encoded training text: train_text, or the WikiText-2 train split (cached per tokenizer)."""
    return training_ids(tokenizer, ["wikitext2"], tc.train_text)


def _load_state(run_dir: RunDir, model: LM, opt: torch.optim.Optimizer, gen: torch.Generator, config: dict) -> int:
    """Restore what _run saved; returns the step to continue from."""
    state = run_dir.load()
    if state["config"]["model"] != config["model"]:
        raise ValueError(f"{run_dir.state_file} was written for a different model config; use another --out directory")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    restore_rngs(state, gen)
    return int(state["step"])


def configure(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, TrainFlags)
    add_flags(parser, RunFlags)


def run(args: argparse.Namespace) -> int:
    started = time.time()
    flags, run_flags = from_args(TrainFlags, args), from_args(RunFlags, args)
    model_section, tc = load_config(flags.config)
    run_dir = RunDir(Path(run_flags.out))
    resuming = run_dir.resumes(run_flags.resume, "a training run")
    deadline = run_flags.deadline(started)
    tok_path = Path(tc.tokenizer)
    if not tok_path.is_file():
        raise FileNotFoundError(f"tokenizer not found: {tok_path}")
    tokenizer = Tokenizer.from_file(tok_path)
    cfg = ModelConfig.from_dict({**model_section, "vocab_size": tokenizer.vocab_size,
                                 "eos_token_id": tokenizer.eos_token_id})
    if tc.seq_len > cfg.max_seq_len:
        raise ValueError(f"train.seq_len {tc.seq_len} exceeds model.max_seq_len {cfg.max_seq_len}")
    config = {"model": cfg.to_dict(), "train": dataclasses.asdict(tc)}

    torch.set_num_threads(tc.threads)
    device = torch.device(flags.device)
    model = build_model(cfg, tc.seed).to(device)
    opt = make_optimizer(model, tc)
    gen = torch.Generator().manual_seed(tc.seed)
    step = 0
    if resuming:
        step = _load_state(run_dir, model, opt, gen, config)
        run_dir.trim_log(step=step)
    else:
        run_dir.create()
        (run_dir.path / "train_config.json").write_text(json.dumps(config, indent=2) + "\n")

    train_ids = load_train_ids(tokenizer, tc)
    valid_text = _text(tc.valid_text, "valid")
    step = _run(model, opt, gen, train_ids, valid_text, tokenizer, tc, config, run_dir, step, deadline)
    if step < tc.steps:
        print(f"time budget reached; state saved in {run_dir.state_file} (continue with --resume auto)", file=sys.stderr)
        return 0
    save_checkpoint(model, run_dir.path, tok_path, dtype=torch.bfloat16)
    print(f"done: {tc.steps} steps; checkpoint exported to {run_dir.path}", file=sys.stderr)
    return 0


def _run(model: LM, opt: torch.optim.Optimizer, gen: torch.Generator, train_ids: torch.Tensor, valid_text: str,
         tokenizer: Tokenizer, tc: TrainConfig, config: dict, run_dir: RunDir, step: int, deadline: float) -> int:
    """Train from `step` towards tc.steps; returns the step reached (short of it when the deadline stopped it)."""
    device = model.embed.weight.device
    stream = batches(train_ids, tc.batch_size, tc.seq_len, gen)

    def update(i: int) -> dict:
        loss = train_step(model, opt, next(stream).to(device), tc.grad_clip)
        return {"tokens": (i + 1) * tc.tokens_per_step, "loss": loss}

    def evaluate(n: int) -> dict:
        if n % tc.eval_interval and n != tc.steps:
            return {}
        val = evaluate_ppl(model, tokenizer, valid_text, tc.seq_len, tc.eval_batch_size, tc.eval_tokens)
        tqdm.write(f"step {n}: val_loss {val['loss']:.4f} (token ppl {val['token_ppl']:.1f})")
        return {"val_loss": val["loss"]}

    def save(n: int) -> None:
        run_dir.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": n, "config": config}, gen)

    model.train()
    loop = Loop(opt, lr_schedule(tc), run_dir, tc.ckpt_interval, deadline, tc.tokens_per_step)
    return loop.run(step, update, save, evaluate)
