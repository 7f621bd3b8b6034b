"""`attamba serve`: the OpenAI-compatible HTTP server, with a graceful drain on SIGTERM.

On SIGTERM (or Ctrl+C) the server stops admitting requests (503, /health 503) but keeps its port
open, lets the requests in flight finish for up to --grace-period seconds, then exits with status
0. When the grace period ends, or on a second signal, what is left is aborted: every stream still
gets its final chunk (finish_reason "abort") and `data: [DONE]` before the server exits.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import socket
import time
from dataclasses import dataclass
from types import FrameType

import uvicorn

from engine.async_engine import AsyncEngine
from engine.config import EngineArgs, parse_bytes
from engine.settings import add_flags, from_args, setting
from server.app import create_app
from server.lifecycle import Lifecycle
from server.scale_out import ScaleOut

SHUTDOWN_TIMEOUT_S = 1  # after the drain: how long uvicorn waits before cancelling leftover responses
ABORT_WAIT_S = 2.0  # after aborting what is left: how long its streams get to send their last chunks

log = logging.getLogger("attamba.serve")


@dataclass(frozen=True)
class ServerSettings:
    """HTTP server settings (the engine's are EngineArgs, the replicas' ScaleOut)."""

    host: str = setting("127.0.0.1", "address to listen on")
    port: int = setting(8000, "port to listen on (0: any free one)")
    api_key: str | None = setting(doc="require 'Authorization: Bearer KEY' on /v1, /tokenize and /detokenize",
                                  factory=lambda: os.environ.get("ATTAMBA_API_KEY"), shown="$ATTAMBA_API_KEY")
    served_model_name: str | None = setting(None, "model id clients use", shown="the checkpoint directory's name")
    allowed_origins: tuple[str, ...] | None = setting(None, "enable CORS for these origins, '*' for any",
                                                      metavar="ORIGIN", shown="CORS off")
    ui: bool = setting(True, "serve the playground page at /")
    max_body_bytes: int = setting(1 << 20, "larger request bodies get 413", parse=parse_bytes, shown="1MiB")
    grace_period: float = setting(30.0, "seconds running requests get after SIGTERM before they are aborted")
    log_level: str = setting("info", "server log level", choices=("critical", "error", "warning", "info", "debug"))

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in 0..65535, got {self.port}")
        if self.grace_period < 0:
            raise ValueError(f"--grace-period must be >= 0, got {self.grace_period}")


def configure(parser: argparse.ArgumentParser) -> None:
    for settings in (EngineArgs, ServerSettings, ScaleOut):
        add_flags(parser, settings)


class DrainingServer(uvicorn.Server):
    """uvicorn, except that a signal first drains instead of stopping, and does not re-raise itself.

    Phases: serving -> draining (first signal: no new requests, running ones continue) -> aborting
    (grace period over, or a second signal: running ones are aborted and end their streams) -> exit
    (nothing left, or ABORT_WAIT_S later)."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, grace_period_s: float) -> None:
        super().__init__(config)
        self.lifecycle, self.grace_period_s = lifecycle, grace_period_s
        self.drain_deadline: float | None = None
        self.abort_deadline: float | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            log.info("ready: accepting requests")

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_deadline is None:
            self.lifecycle.draining = True
            self.drain_deadline = time.monotonic() + self.grace_period_s
            log.info("draining: refusing new requests, %d running get up to %g s to finish",
                     self.lifecycle.active, self.grace_period_s)
        else:
            self._abort("second signal")

    def _abort(self, why: str) -> None:
        if self.abort_deadline is None:
            self.abort_deadline = time.monotonic() + ABORT_WAIT_S
            log.warning("%s: aborting the %d requests still running", why, self.lifecycle.abort_all())

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None:
            now = time.monotonic()
            if self.lifecycle.active and now >= self.drain_deadline:
                self._abort("grace period over")
            if self.lifecycle.active == 0 or (self.abort_deadline is not None and now >= self.abort_deadline):
                self.should_exit = True
        return await super().on_tick(counter)


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket; a taken port is a one-line error rather than a uvicorn log and exit 3."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise RuntimeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return sock


def run(args: argparse.Namespace) -> int:
    settings = from_args(ServerSettings, args)
    engine_args = from_args(EngineArgs, args)  # bad flags fail here, before a cluster or an engine starts
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    # ---- scale-out: --replicas / --autoscale serve through Ray Serve (server/ray_app.py) ----
    scale = from_args(ScaleOut, args)
    if scale.enabled:
        if scale.ray_address is None:
            _listen(settings.host, settings.port).close()  # a taken port too
        if importlib.util.find_spec("ray") is None:
            raise RuntimeError("--replicas and --autoscale need Ray Serve: pip install 'attamba-serve[ray]'")
        from server import ray_app
        return ray_app.run(engine_args, settings, scale)
    # ---- end scale-out ----
    engine = AsyncEngine(engine_args)
    app = create_app(engine, settings.api_key, settings.max_body_bytes, settings.served_model_name,
                     settings.allowed_origins, ui=settings.ui)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level, lifespan="off",
                            timeout_graceful_shutdown=SHUTDOWN_TIMEOUT_S)
    server = DrainingServer(config, app.state.serving.lifecycle, settings.grace_period)
    with _listen(settings.host, settings.port) as sock:
        engine.start()
        host, port = sock.getsockname()[:2]
        log.info("serving %s (max_model_len %d, cache %d bytes) on http://%s:%d",
                 app.state.serving.model_name, engine.max_model_len, engine.stats().cache_bytes_total,
                 f"[{host}]" if ":" in host else host, port)
        try:
            server.run(sockets=[sock])
        finally:
            engine.shutdown()
    log.info("stopped")
    return 0
