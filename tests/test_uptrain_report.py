"""The uptraining report's progress plot (training/uptrain_report.py) from rows of its shape."""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from training.uptrain_report import plot_progress  # noqa: E402


def _row(name: str, ppl: float, steps: int | None = None, **extra) -> dict:
    row = {"name": name, "token_ppl": ppl, "passkey": [{"recovered": 1}] * 3, "chat": {"correct": 20}, **extra}
    return row | ({"trained": {"stage1_steps": 30, "stage2_steps": steps}} if steps else {})


def test_progress_plot_draws_a_students_exports_and_the_controls(tmp_path: Path) -> None:
    report = {"passkey_trials": 6, "chat": True, "rows": [
        _row("teacher", 29.0), _row("attamba P=8 L=64", 32.0, 171), _row("zero-SSM P=8 L=64", 41.0),
        _row("attamba P=8 L=64 after 81 stage-2 steps", 33.0, 81, earlier_export=True,
             export_of="attamba P=8 L=64")]}
    plot_progress(report, tmp_path / "progress.png")
    assert (tmp_path / "progress.png").read_bytes()[:4] == b"\x89PNG"
