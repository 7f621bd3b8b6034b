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


def _passkey_report(tmp_path: Path, tokenizer_file: Path, monkeypatch, *flags: str) -> tuple[list[dict], list]:
    """training.passkey_report on a tiny teacher and student: its rows, and (model, the passkey call's arguments)
    for every row it measured."""
    import json

    import training.passkey_report as report

    from conftest import SAMPLE, make_checkpoint

    teacher = make_checkpoint(tmp_path, tokenizer_file, "transformer", max_seq_len=256)
    student = make_checkpoint(tmp_path, tokenizer_file, "attamba", max_seq_len=256)
    asked = []
    real = report.passkey
    monkeypatch.setattr(report, "passkey", lambda model, *a: asked.append((model, a)) or real(model, *a))
    monkeypatch.setattr(report, "read_split", lambda split: SAMPLE.read_text())
    out = tmp_path / "pk.json"
    assert report.main(["--teacher", str(teacher), "--student", str(student), "--filler", "40", "--seq-len", "64",
                        "--threads", "1", "--out", str(out), *flags]) == 0
    return json.loads(out.read_text())["rows"], asked


def test_passkey_report_asks_teacher_student_and_window_the_same_prompts(tmp_path: Path, tokenizer_file: Path,
                                                                          monkeypatch) -> None:
    from models.config import ModelConfig
    from training.uptrain_report import equal_cache_window

    rows, asked = _passkey_report(tmp_path, tokenizer_file, monkeypatch, "--trials", "3", "--recall-rows", "2",
                                  "--full-layers", "1")
    assert rows[-1]["name"] == "attamba + the teacher's layers [1]"
    rows = rows[:-1]
    assert all(r["recall_rows"]["rows"] == 2 == len(r["recall_rows"]["cases"]) for r in rows)
    w = equal_cache_window(ModelConfig.load(tmp_path / "transformer"), ModelConfig.load(tmp_path / "attamba"), 64)
    assert [r["name"] for r in rows] == ["teacher", "attamba", f"sliding W={w}"]
    assert all(r["trials"] == 3 and 0 <= r["recovered"] <= 3 for r in rows)
    assert len({a for _, a in asked}) == 1  # one filler length, trial count and seed for all of them


def test_layer_lists_and_the_student_with_teacher_layers(tmp_path: Path, tokenizer_file: Path) -> None:
    import argparse

    from models.loading import load_model
    from training.passkey_report import layer_list
    from training.uptrain_report import with_teacher_layers

    from conftest import make_checkpoint

    assert layer_list("15-17") == [15, 16, 17] and layer_list("3,1-2,3") == [1, 2, 3]
    for bad in ("", "a", "2-x", "-1"):
        with pytest.raises(argparse.ArgumentTypeError, match="not a layer list"):
            layer_list(bad)
    teacher = load_model(make_checkpoint(tmp_path, tokenizer_file, "transformer"))
    student = load_model(make_checkpoint(tmp_path, tokenizer_file, "attamba"))
    own = student.blocks[0]
    hybrid = with_teacher_layers(student, teacher, [1])
    assert hybrid.blocks[0] is own and hybrid.blocks[1] is teacher.blocks[1]
    assert hybrid.blocks[1].attn.spec.boundaries == "all"  # every key kept at that layer


def test_passkey_report_runs_a_random_p_student_at_each_chunk_size(tmp_path: Path, tokenizer_file: Path,
                                                                   monkeypatch) -> None:
    import argparse

    from training.passkey_report import size_list

    rows, asked = _passkey_report(tmp_path, tokenizer_file, monkeypatch, "--trials", "2", "--chunk-sizes", "2,8")
    names = [r["name"] for r in rows]
    assert names[:3] == ["teacher", "attamba P=2", "attamba P=8"] and names[3].startswith("sliding W=")
    assert [model.config.chunk_size for model, _ in asked[1:3]] == [2, 8]
    assert size_list("4, 8,16") == [4, 8, 16]
    for bad in ("", "x", "0,4"):
        with pytest.raises(argparse.ArgumentTypeError, match="not a list of chunk sizes"):
            size_list(bad)
