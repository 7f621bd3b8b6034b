"""The CPU benchmark's plot (benchmarks/cpu_bench.py) from a result of its shape."""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from benchmarks.cpu_bench import _label, plot_cpu  # noqa: E402


def test_plot_cpu_draws_every_batch_and_the_prefill(tmp_path: Path) -> None:
    stacks = {"ours_student_bfloat16_none_compiled": {"prefill_tokens_per_s": 300.0}, "hf_float32": {},
              "llamacpp_f16": {"prefill_tokens_per_s": 500.0}}
    rows = [{"context": c, "batch": b, "ours_student_bfloat16_none_compiled": 20.0 * b, "hf_float32": 10.0,
             "llamacpp_f16": 40.0 / (c // 1024)} for c in (1024, 4096) for b in (1, 8)]
    result = {"stacks": stacks, "decode_tokens_per_s": rows, "prefill_tokens": 1024,
              "machine": {"threads": 2, "cpu": "test"}}
    plot_cpu(result, tmp_path / "cpu.png")
    assert (tmp_path / "cpu.png").read_bytes()[:4] == b"\x89PNG"
    assert _label("ours_student_bfloat16_none_compiled") == "student bfloat16"
    assert _label("ours_teacher_float32_int8_eager") == "teacher float32 int8 eager"
