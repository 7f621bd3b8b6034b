"""`attamba train`: AdamW with linear warmup + cosine decay, periodic checkpoints and exact resume.

The run directory holds `train_state.pt` (model, optimizer, step and every RNG state; our own
file, so pickle is fine), `log.jsonl` (one JSON object per step) and, once training ends, the
exported checkpoint `config.json` + `model.safetensors` (bf16) + `tokenizer.json`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine.settings import add_flags, build, from_args, read_json, setting
from models.config import ModelConfig
from .data import batches, cache_dir, encode_corpus, read_split
from .evaluate import evaluate_ppl
from models.lm import LM, build_model
from models.loading import save_checkpoint
from models.tokenizer import Tokenizer
from .run_flags import RunFlags

STATE_FILE = "train_state.pt"
LOG_FILE = "log.jsonl"


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


def lr_at(step: int, tc: TrainConfig) -> float:
    """Learning rate of update `step` (0-based): linear warmup, then cosine decay to min_lr."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = min(1.0, (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps))
    return tc.min_lr + 0.5 * (tc.lr - tc.min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: LM, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW; matrices (and embeddings) decay, gains and per-head SSM scalars do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": tc.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
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
    """Encoded training corpus; WikiText-2 ids are cached per tokenizer (written under a per-process name, then renamed)."""
    if tc.train_text:
        return encode_corpus(tokenizer, _text(tc.train_text, "train"))
    cache = cache_dir() / "wikitext-2" / f"train-{tokenizer.fingerprint[:16]}-{os.getpid()}.pt"
    shared = cache.with_name(f"train-{tokenizer.fingerprint[:16]}.pt")
    if shared.exists():
        return encode_corpus(tokenizer, read_split("train"), shared)
    ids = encode_corpus(tokenizer, read_split("train"), cache)
    os.replace(cache, shared)
    return ids


def _save_state(path: Path, model: LM, opt: torch.optim.Optimizer, step: int, gen: torch.Generator,
                config: dict) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "step": step,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "data_rng": gen.get_state(),
        "config": config,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_state(path: Path, model: LM, opt: torch.optim.Optimizer, gen: torch.Generator, config: dict) -> int:
    """Restore everything _save_state wrote; returns the step to continue from."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["config"]["model"] != config["model"]:
        raise ValueError(f"{path} was written for a different model config; use another --out directory")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    gen.set_state(state["data_rng"])
    return int(state["step"])


def _trim_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint being resumed from."""
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in lines))


def configure(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, TrainFlags)
    add_flags(parser, RunFlags)


def run(args: argparse.Namespace) -> int:
    started = time.time()
    flags, run_flags = from_args(TrainFlags, args), from_args(RunFlags, args)
    model_section, tc = load_config(flags.config)
    out = Path(run_flags.out)
    state_path = out / STATE_FILE
    if state_path.exists() and run_flags.resume != "auto":
        raise ValueError(f"{out} already holds a training run; pass --resume auto or choose another --out")
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
    if state_path.exists():
        step = _load_state(state_path, model, opt, gen, config)
        _trim_log(out / LOG_FILE, step)
    else:
        out.mkdir(parents=True, exist_ok=True)
        (out / LOG_FILE).write_text("")
        (out / "train_config.json").write_text(json.dumps(config, indent=2) + "\n")

    train_ids = load_train_ids(tokenizer, tc)
    valid_text = _text(tc.valid_text, "valid")
    finished = _loop(model, opt, gen, train_ids, valid_text, tokenizer, tc, config, out, step,
                     run_flags.deadline(started))
    if not finished:
        print(f"time budget reached; state saved in {state_path} (continue with --resume auto)", file=sys.stderr)
        return 0
    save_checkpoint(model, out, tok_path, dtype=torch.bfloat16)
    print(f"done: {tc.steps} steps; checkpoint exported to {out}", file=sys.stderr)
    return 0


def _loop(model: LM, opt: torch.optim.Optimizer, gen: torch.Generator, train_ids: torch.Tensor, valid_text: str,
          tokenizer: Tokenizer, tc: TrainConfig, config: dict, out: Path, step: int, deadline: float) -> bool:
    """Train from `step` to tc.steps; returns False when stopped early by the deadline."""
    device = model.embed.weight.device
    stream = batches(train_ids, tc.batch_size, tc.seq_len, gen)
    model.train()
    bar = tqdm(total=tc.steps, initial=step, unit="step", mininterval=2.0, dynamic_ncols=True)
    with open(out / LOG_FILE, "a") as log:
        while step < tc.steps:
            lr = lr_at(step, tc)
            for group in opt.param_groups:
                group["lr"] = lr
            t0 = time.time()
            loss = train_step(model, opt, next(stream).to(device), tc.grad_clip)
            tok_s = tc.tokens_per_step / (time.time() - t0)
            step += 1
            record = {"step": step, "tokens": step * tc.tokens_per_step, "loss": loss, "lr": lr, "tok_s": round(tok_s, 1)}
            if step % tc.eval_interval == 0 or step == tc.steps:
                val = evaluate_ppl(model, tokenizer, valid_text, tc.seq_len, tc.eval_batch_size, tc.eval_tokens)
                record["val_loss"] = val["loss"]
                bar.write(f"step {step}: val_loss {val['loss']:.4f} (token ppl {val['token_ppl']:.1f})")
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:.0f}", refresh=False)
            bar.update()
            out_of_time = time.time() > deadline
            if step % tc.ckpt_interval == 0 or step == tc.steps or out_of_time:
                _save_state(out / STATE_FILE, model, opt, step, gen, config)
            if out_of_time and step < tc.steps:
                bar.close()
                return False
    bar.close()
    return True
