"""Shared fixtures and helpers: a tiny tokenizer, tiny random checkpoints of each kind, a started engine served over
HTTP in this process (its settings overridable per module through the `engine_kw` and `app_kw` fixtures),
`attamba` processes, SSE."""
from __future__ import annotations

import os

# Engines in the suite (and the `attamba` processes it starts) run the CPU decode step's compiled path
# (engine/compiled_decode.py: padding, sinks) with torch.compile off, so no test waits for Inductor;
# tests/test_compiled_decode.py turns it on to compare the compiled step with the eager one.
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from engine import EngineArgs, EngineStats
from engine.async_engine import AsyncEngine
from models import ModelConfig, build_model, save_checkpoint
from models.tokenizer import Tokenizer, train_tokenizer
from server.app import create_app
from server.background import serve_in_thread

SAMPLE = Path(__file__).parent / "data" / "wikitext_sample.txt"
# EngineArgs of the suite's engines: fp32, as the references they are compared with (--dtype auto is bf16 on most
# CPUs), and a small cache (the tiny checkpoints need a few KiB a sequence; zeroing, copying and comparing the
# 1 GiB default costs seconds per engine)
ENGINE = {"cache_memory": 4 << 20, "dtype": "float32"}


@pytest.fixture(scope="session")
def sample() -> str:
    """The shipped WikiText-style sample text."""
    return SAMPLE.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def tok(sample: str) -> Tokenizer:
    """A 512-token BPE trained on the sample."""
    return Tokenizer(train_tokenizer(sample, vocab_size=512))


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    Tokenizer(train_tokenizer(SAMPLE.read_text(), vocab_size=300)).save(path)
    return path


def make_checkpoint(root: Path, tokenizer_file: Path, kind: str, **kw) -> Path:
    """A randomly initialised checkpoint directory of the given kind."""
    vocab = Tokenizer.from_file(tokenizer_file).vocab_size
    cfg = dict(kind=kind, vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, chunk_size=4, window=3, ssm_state=8,
               ssm_inner=16, ssm_heads=2, max_seq_len=64, sliding_window=8, reduced_head_dim=4)
    cfg.update(kw)
    path = root / kind
    save_checkpoint(build_model(ModelConfig(**cfg), seed=0), path, tokenizer_file)
    return path


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tokenizer_file) -> Path:
    """A tiny random Attamba checkpoint (P = 4, L = 3)."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), tokenizer_file, "attamba")


@pytest.fixture(scope="session")
def ckpt_factory(tmp_path_factory, tokenizer_file):
    root = tmp_path_factory.mktemp("ckpts")
    cache: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in cache:
            cache[kind] = make_checkpoint(root, tokenizer_file, kind)
        return cache[kind]

    return get


# ---- an engine in this process, served on a loopback port ---------------------------------------------------------
@contextmanager
def running_engine(model: str | Path, **engine_kw) -> Iterator[AsyncEngine]:
    """A started AsyncEngine (ENGINE's settings unless engine_kw says otherwise), shut down when the block ends."""
    engine = AsyncEngine(EngineArgs(model=str(model), **{**ENGINE, **engine_kw}))
    engine.start()
    try:
        yield engine
    finally:
        engine.shutdown()


@contextmanager
def serve_engine(model: str | Path, app_kw: dict | None = None, **engine_kw) -> Iterator[str]:
    """The base URL of create_app(**app_kw) over running_engine(model, **engine_kw)."""
    with running_engine(model, **engine_kw) as engine, serve_in_thread(create_app(engine, **(app_kw or {}))) as url:
        yield url


@pytest.fixture(scope="module")
def engine_kw() -> dict:
    """EngineArgs fields of the module's `engine` beyond the model (override in a module)."""
    return {}


@pytest.fixture(scope="module")
def app_kw() -> dict:
    """create_app arguments of the module's `url` (override in a module)."""
    return {}


@pytest.fixture(scope="module")
def engine(tiny_ckpt: Path, engine_kw: dict) -> Iterator[AsyncEngine]:
    with running_engine(tiny_ckpt, **engine_kw) as eng:
        yield eng


@pytest.fixture(scope="module")
def url(engine: AsyncEngine, app_kw: dict) -> Iterator[str]:
    with serve_in_thread(create_app(engine, **app_kw)) as base:
        yield base


def eventually(predicate: Callable[[EngineStats], bool], engine: AsyncEngine, timeout_s: float = 1.0) -> EngineStats:
    """The first engine stats snapshot satisfying `predicate`; fails after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not predicate(stats := engine.stats()):
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {stats}"
        time.sleep(0.01)
    return stats


def idle(stats: EngineStats) -> bool:
    return stats.num_running + stats.num_waiting == 0


def sse(response: httpx.Response) -> list[dict | str]:
    """The `data:` payloads of an SSE response, JSON-decoded except the final [DONE]."""
    payloads = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    return [p if p == "[DONE]" else json.loads(p) for p in payloads]


# ---- server processes -----------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def attamba_process(*args: str, **popen_kw) -> subprocess.Popen:
    """`attamba ARGS...` from this checkout as a child process (text mode)."""
    return subprocess.Popen([sys.executable, "-m", "entrypoints.cli", *args], text=True, **popen_kw)


def wait_healthy(proc: subprocess.Popen, url: str, timeout_s: float = 60.0,
                 ready: Callable[[str], bool] = lambda url: True, log: Path | None = None) -> None:
    """Poll url/health until 200 and ready(url); fails (with the tail of `log`) if the process exits or time runs
    out."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, log.read_text()[-3000:] if log else f"the server exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"the server was not ready within {timeout_s:g} s"
        try:
            if httpx.get(f"{url}/health").status_code == 200 and ready(url):
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)



@contextmanager
def serve_process(*flags: str, timeout_s: float = 60.0, ready: Callable[[str], bool] = lambda url: True,
                  log: Path | None = None, **popen_kw) -> Iterator[tuple[subprocess.Popen, str]]:
    """`attamba serve FLAGS` on a free loopback port: (the process, its URL) once ready (wait_healthy) until the
    block ends; then SIGTERM (the server drains), SIGKILL if it is still running after a minute."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = attamba_process("serve", *flags, "--port", str(port), **popen_kw)
    try:
        wait_healthy(proc, url, timeout_s, ready, log)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
