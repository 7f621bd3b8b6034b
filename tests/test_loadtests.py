"""loadtests/: one sweep point of real locust users against `attamba serve` (and llama.cpp's llama-server when one
is built), the llama.cpp slot sizing, and the sweep's table and plot."""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "loadtests"))
if importlib.util.find_spec("locust") is None:  # not imported here: its gevent patching breaks ssl in pytest
    pytest.skip("locust is not installed", allow_module_level=True)

import plot_sweep  # noqa: E402
import sweep  # noqa: E402
from servers import attamba_command, free_port, metrics, running  # noqa: E402

LLAMA_SERVER = shutil.which("llama-server") or str(sweep.LLAMA_SERVER)


def _point_args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"seconds": 4, "output_tokens": 8, "prompt_ids": "4:250", "sample_every": 0.25, **kw})


def _check_point(point: dict, users: int) -> None:
    assert point["users"] == users and point["failures"] == 0 and point["requests"] >= users
    assert point["ttft_p50_ms"] > 0 and point["tpot_p50_ms"] is not None and point["tokens_streamed"] > users
    assert point["output_tok_s"] > 0


def test_a_sweep_point_against_attamba_serve(tiny_ckpt: Path, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = ["--model", str(tiny_ckpt), "--cache-memory", "8MiB", "--max-model-len", "48", "--max-num-seqs", "4",
             "--no-enable-prefix-caching", "--log-level", "warning"]
    with running(attamba_command(port, serve), url, tmp_path / "server.log", timeout_s=120):
        point = sweep.run_point(url, sweep.ATTAMBA_METRICS, 3, 48, _point_args(), tmp_path / "point")
        sweep.wait_idle(url, sweep.ATTAMBA_METRICS, timeout_s=30)  # the users cut at the end were aborted
        assert metrics(url)["attamba_cache_bytes_used"] == 0
    _check_point(point, 3)
    assert point["preemptions"] == 0  # read from the counter (llama.cpp has none: None)


@pytest.mark.skipif(not Path(LLAMA_SERVER).is_file(), reason="no llama-server (make llama-server builds one)")
def test_a_sweep_point_against_llama_server(ckpt_factory, tokenizer_file: Path, tmp_path: Path) -> None:
    from models.gguf import write_gguf

    gguf = write_gguf(ckpt_factory("transformer"), tmp_path / "m.gguf", "f32", vocab_from=tokenizer_file,
                      context_length=64)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [LLAMA_SERVER, "--host", "127.0.0.1", "--port", str(port), "-m", str(gguf), "-np", "2", "-c", "128",
               "-t", "1", "--metrics", "--no-webui"]
    with running(command, url, tmp_path / "server.log", timeout_s=60):
        point = sweep.run_point(url, sweep.LLAMACPP_METRICS, 3, 48, _point_args(), tmp_path / "point")
    _check_point(point, 3)
    assert point["preemptions"] is None


def test_llamacpp_slots_hold_the_same_cache_bytes() -> None:
    # transformer-wt2: 6 layers x 4 heads x 64 dims, f16 K and V = 6 KiB a token
    args, slots = sweep.llamacpp_setup(Path("m.gguf"), 4096, 200 * 2**20, 64, 2)
    assert slots == 8 and args[args.index("-c") + 1] == str(8 * 4096) and args[args.index("-np") + 1] == "8"
    assert sweep.llamacpp_setup(Path("m.gguf"), 1024, 200 * 2**20, 16, 2)[1] == 16  # capped at the most users
    assert sweep.llamacpp_setup(Path("m.gguf"), 4096, 2**20, 64, 2)[1] == 1


def test_table_and_plot_of_a_sweep(tmp_path: Path, monkeypatch) -> None:
    def point(system: str, users: int, **kw) -> dict:
        return {"system": system, "context": 1024, "users": users, "cache_memory": "1MiB", "output_tokens": 8,
                "seconds": 4, "requests": 5, "failures": 0, "ttft_p50_ms": 10.0, "ttft_p99_ms": 20.0,
                "tpot_p50_ms": 1.0, "tpot_p99_ms": 2.0, "itl_p50_ms": 1.0, "itl_p99_ms": None, "output_tok_s": 50.0,
                "running_mean": 1.0, "waiting_mean": 0.0, "waiting_max": 0, "preemptions": 0, **kw}

    lines = [point("attamba", 2), point("attamba", 1), point("attamba", 2, requests=7),
             point("llamacpp", 1, slots=3, preemptions=None)]
    (tmp_path / "sweep.jsonl").write_text("".join(json.dumps(p) + "\n" for p in lines))
    series = plot_sweep.load(tmp_path / "sweep.jsonl")
    assert [p["users"] for p in series[("attamba", 1024)]] == [1, 2]
    assert series[("attamba", 1024)][1]["requests"] == 7  # a rerun point replaces the earlier one
    text = plot_sweep.table(series)
    assert "**attamba-wt2**, 1024 tokens a request (1016 prompt + 8 output)" in text and "3 slots" in text
    assert "| 2 | 7 | 0 | 10 | 20 | 1 | 2 | 1 |  | 50 |" in text
    monkeypatch.setattr(sys, "argv", ["plot_sweep.py", str(tmp_path)])
    assert plot_sweep.main() == 0
    assert (tmp_path / "sweep.png").stat().st_size > 10_000 and (tmp_path / "sweep.md").read_text() == text
