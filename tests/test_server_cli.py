"""`attamba serve` and `attamba generate` as processes: flags, streaming to stdout, draining on SIGTERM."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from engine import LLM, SamplingParams
from entrypoints.cli import main

from conftest import attamba_process, serve_process

ENGINE_FLAGS = ["--cache-memory", "4MiB", "--max-num-seqs", "4"]


@pytest.mark.parametrize("argv,message", [
    (["--model", "/no/such/dir"], "/no/such/dir"),
    (["--port", "70000"], "--port"),
    (["--grace-period", "-1"], "--grace-period"),
])
def test_serve_rejects_bad_settings_in_one_line(tiny_ckpt: Path, capsys, argv: list[str], message: str) -> None:
    assert main(["serve", "--model", str(tiny_ckpt), *ENGINE_FLAGS, *argv]) != 0
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_serve_reports_a_taken_port(tiny_ckpt: Path, capsys) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", "--model", str(tiny_ckpt), *ENGINE_FLAGS, "--port", str(taken.getsockname()[1])]) == 1
    assert "cannot listen" in capsys.readouterr().err


def test_serve_rejects_unparsable_flags(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--cache-memory", "lots"])
    assert exc.value.code != 0


def test_generate_streams_the_completion(tiny_ckpt: Path) -> None:
    proc = attamba_process("generate", "--model", str(tiny_ckpt), *ENGINE_FLAGS, "--prompt", "The tower",
                           "--max-tokens", "8", "--temperature", "0", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    want = LLM(str(tiny_ckpt), cache_memory=4 << 20).generate("The tower", SamplingParams(temperature=0, max_tokens=8))
    assert out == want[0].text + "\n"


def test_sigterm_drains_running_requests_then_exits_0(tiny_ckpt: Path) -> None:
    with serve_process("--model", str(tiny_ckpt), *ENGINE_FLAGS, "--log-level", "warning",
                       stdout=subprocess.DEVNULL) as (proc, url):
        body = {"prompt": "The tower", "max_tokens": 300, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 2
            while httpx.get(f"{url}/health").status_code != 503:
                assert time.monotonic() < deadline, "/health stayed 200 after SIGTERM"
                time.sleep(0.05)
            refused = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 1})
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "service_unavailable"
            rest = [line[6:] for line in lines if line.startswith("data: ")]
        assert rest[-1] == "[DONE]"
        assert json.loads(rest[-2])["choices"][0]["finish_reason"] == "length"  # finished, not aborted
        assert proc.wait(timeout=30) == 0


def test_grace_period_end_aborts_streams_with_a_final_chunk_and_logs_it(tiny_ckpt: Path) -> None:
    with serve_process("--model", str(tiny_ckpt), *ENGINE_FLAGS, "--grace-period", "0", stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE) as (proc, url):
        max_model_len = httpx.get(f"{url}/v1/models").json()["data"][0]["max_model_len"]
        body = {"prompt": "The tower", "max_tokens": max_model_len - 8, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))
            proc.send_signal(signal.SIGTERM)
            rest = [line[6:] for line in lines if line.startswith("data: ")]
        assert rest[-1] == "[DONE]"
        assert json.loads(rest[-2])["choices"][0]["finish_reason"] == "abort"
        assert proc.wait(timeout=30) == 0
        log = proc.stderr.read()
    assert f"on {url}" in log and "ready" in log
    assert "draining" in log and "aborting the 1 requests" in log
    assert "Traceback" not in log and "CancelledError" not in log


def test_serve_help_documents_every_flag_and_its_default(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    options = " ".join(capsys.readouterr().out.split()).split("options:", 1)[1]
    for flag, default in [("--max-num-seqs", "32"), ("--max-num-batched-tokens", "2048"), ("--block-size", "16"),
                          ("--max-waiting", "256"), ("--dtype", "auto"), ("--quantization", "none"),
                          ("--grace-period", "30.0")]:
        assert f"(default: {default})" in options.split(f" {flag} ", 1)[1].split(" --", 1)[0], flag
    assert "--allowed-origins" in options
