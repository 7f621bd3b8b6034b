"""The flags every resumable trainer takes: its run directory, --resume and a time budget."""
from __future__ import annotations

import math
from dataclasses import dataclass

from engine.settings import setting


@dataclass(frozen=True)
class RunFlags:
    """Run directory: where a resumable run keeps its state, and how long this invocation may train."""

    out: str = setting(doc="run directory (train_state.pt, log.jsonl, the exported checkpoint)")
    resume: str | None = setting(None, "auto: continue from OUT/train_state.pt if it exists", choices=("auto",))
    max_minutes: float | None = setting(None, "save the state (and export) and exit after this much wall-clock "
                                        "time; 0: after one step", shown="no limit")

    def __post_init__(self) -> None:
        if self.max_minutes is not None and self.max_minutes < 0:
            raise ValueError(f"--max-minutes must be >= 0, got {self.max_minutes}")

    def deadline(self, started: float) -> float:
        """The wall-clock time (time.time()) this invocation stops at, for a run started at `started`."""
        return math.inf if self.max_minutes is None else started + self.max_minutes * 60
