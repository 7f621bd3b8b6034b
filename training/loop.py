"""The resumable training loop under `attamba train` and `attamba uptrain`.

A run directory holds `train_state.pt` (what the trainer saves, plus every RNG state: torch's, CUDA's
where there is a device, the data generator's; written to a temporary file, then renamed; our own
file, so pickle is fine) and `log.jsonl` (one JSON record per update, cut back to the checkpoint when a
run resumes). Loop.run does the updates of one warmup-cosine schedule with a tqdm bar, checkpoints
every few updates, at the end and when the deadline (--max-minutes) passes, then stops cleanly.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

STATE_FILE = "train_state.pt"
LOG_FILE = "log.jsonl"


@dataclass(frozen=True)
class WarmupCosine:
    """Each param group's LR: linear warmup to its "peak", then cosine decay to floor x peak at update `total`."""

    total: int
    warmup: int
    floor: float  # the final LR as a fraction of the peak

    def factor(self, step: int) -> float:
        """The fraction of the peak LR for update `step` (0-based)."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + 0.5 * (1 - self.floor) * (1 + math.cos(math.pi * progress))

    def apply(self, opt: torch.optim.Optimizer, step: int) -> None:
        for group in opt.param_groups:
            group["lr"] = group["peak"] * self.factor(step)


@dataclass(frozen=True)
class RunDir:
    """A run directory: the state file and the log."""

    path: Path

    @property
    def state_file(self) -> Path:
        return self.path / STATE_FILE

    @property
    def log_file(self) -> Path:
        return self.path / LOG_FILE

    def resumes(self, resume: str | None, what: str) -> bool:
        """Whether the directory holds a run to continue; a ValueError when it does and --resume auto is missing."""
        if not self.state_file.exists():
            return False
        if resume != "auto":
            raise ValueError(f"{self.path} already holds {what}; pass --resume auto or choose another --out")
        return True

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.log_file.write_text("")

    def save(self, state: dict, data_rng: torch.Generator) -> None:
        """Write `state` plus every RNG state atomically."""
        state = {**state, "torch_rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                 "data_rng": data_rng.get_state()}
        tmp = self.path / (STATE_FILE + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.state_file)

    def load(self) -> dict:
        return torch.load(self.state_file, map_location="cpu", weights_only=False)

    def trim_log(self, **at: int) -> None:
        """Drop the records logged after the checkpoint at `at` (e.g. step=120, or stage=2, step=40)."""
        if not self.log_file.exists():
            return
        records = [ln for ln in self.log_file.read_text().splitlines() if ln.strip()]
        keep = [ln for ln in records if tuple(json.loads(ln)[k] for k in at) <= tuple(at.values())]
        self.log_file.write_text("".join(ln + "\n" for ln in keep))


def restore_rngs(state: dict, data_rng: torch.Generator) -> None:
    """Set every RNG state RunDir.save recorded (CUDA's where both the file and this machine have one)."""
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    data_rng.set_state(state["data_rng"])


@dataclass(frozen=True)
class Loop:
    """The updates of one schedule, from wherever a run stands to schedule.total."""

    opt: torch.optim.Optimizer
    schedule: WarmupCosine
    run_dir: RunDir
    ckpt_interval: int
    deadline: float
    tokens_per_step: int
    desc: str | None = None

    def run(self, step: int, update: Callable[[int], dict], save: Callable[[int], None],
            evaluate: Callable[[int], dict] | None = None) -> int:
        """Updates `step`.. of the schedule; returns the number done (short of total when the deadline stopped it).

        update(i) makes update i (0-based) with the LRs set and returns its record's fields ("loss" among them);
        evaluate(n), after n updates and outside the timing, may add fields (e.g. a validation loss);
        save(n) checkpoints after n updates: every ckpt_interval, at the end and at the deadline.
        """
        total = self.schedule.total
        bar = tqdm(total=total, initial=step, desc=self.desc, unit="step", mininterval=2.0, dynamic_ncols=True)
        with bar, open(self.run_dir.log_file, "a") as log:
            while step < total:
                self.schedule.apply(self.opt, step)
                record = {"step": step + 1, "lr": self.opt.param_groups[0]["lr"]}
                t0 = time.time()
                record.update(update(step))
                record["tok_s"] = round(self.tokens_per_step / (time.time() - t0), 1)
                step += 1
                if evaluate is not None:
                    record.update(evaluate(step))
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tok_s']:.0f}", refresh=False)
                bar.update()
                out_of_time = time.time() > self.deadline
                if step % self.ckpt_interval == 0 or step == total or out_of_time:
                    save(step)
                if out_of_time:
                    break
        return step
