"""`attamba serve`: the OpenAI-compatible HTTP server, with a graceful drain on SIGTERM.

On SIGTERM (or Ctrl+C) the server stops admitting requests (503, /health 503) but keeps its port
open, lets the requests in flight finish for up to --grace-period seconds, then exits with status
0. A second signal stops at once, aborting what is left.
"""
from __future__ import annotations

import argparse
import os
import socket
import time
from types import FrameType

import uvicorn

from engine.async_engine import AsyncEngine
from engine.config import add_engine_args, engine_args_from, parse_bytes
from server.app import create_app
from server.lifecycle import Lifecycle

SHUTDOWN_TIMEOUT_S = 1  # after the drain: how long uvicorn waits before cancelling leftover responses


def configure(parser: argparse.ArgumentParser) -> None:
    add_engine_args(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("ATTAMBA_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 (default: $ATTAMBA_API_KEY)")
    parser.add_argument("--served-model-name", default=None,
                        help="model id clients use (default: the checkpoint directory's name)")
    parser.add_argument("--max-body-bytes", type=parse_bytes, default=1 << 20, help="larger request bodies get 413")
    parser.add_argument("--grace-period", type=float, default=30.0, help="seconds running requests get after SIGTERM")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


class DrainingServer(uvicorn.Server):
    """uvicorn, except that a signal first drains instead of stopping, and does not re-raise itself."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, grace_period_s: float) -> None:
        super().__init__(config)
        self.lifecycle, self.grace_period_s = lifecycle, grace_period_s
        self.drain_deadline: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_deadline is None:
            self.lifecycle.draining = True
            self.drain_deadline = time.monotonic() + self.grace_period_s
        else:
            self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None and (self.lifecycle.active == 0 or time.monotonic() >= self.drain_deadline):
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
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if args.grace_period < 0:
        raise ValueError(f"--grace-period must be >= 0, got {args.grace_period}")
    engine = AsyncEngine(engine_args_from(args))
    app = create_app(engine, args.api_key, args.max_body_bytes, args.served_model_name)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, lifespan="off",
                            timeout_graceful_shutdown=SHUTDOWN_TIMEOUT_S)
    server = DrainingServer(config, app.state.serving.lifecycle, args.grace_period)
    with _listen(args.host, args.port) as sock:
        engine.start()
        try:
            server.run(sockets=[sock])
        finally:
            engine.shutdown()
    return 0
