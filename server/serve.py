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
from types import FrameType

import uvicorn

from engine.async_engine import AsyncEngine
from engine.config import add_engine_args, engine_args_from, parse_bytes
from server.app import create_app
from server.lifecycle import Lifecycle
from server.scale_out import add_scale_out_args, scale_out_from

SHUTDOWN_TIMEOUT_S = 1  # after the drain: how long uvicorn waits before cancelling leftover responses
ABORT_WAIT_S = 2.0  # after aborting what is left: how long its streams get to send their last chunks

log = logging.getLogger("attamba.serve")


def configure(parser: argparse.ArgumentParser) -> None:
    add_engine_args(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    parser.add_argument("--api-key", default=os.environ.get("ATTAMBA_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1, /tokenize and /detokenize "
                             "(default: $ATTAMBA_API_KEY)")
    parser.add_argument("--served-model-name", default=None,
                        help="model id clients use (default: the checkpoint directory's name)")
    parser.add_argument("--allowed-origins", nargs="+", default=None, metavar="ORIGIN",
                        help="enable CORS for these origins, '*' for any (default: CORS off)")
    parser.add_argument("--no-ui", action="store_true", help="do not serve the playground page at /")
    parser.add_argument("--max-body-bytes", type=parse_bytes, default=1 << 20,
                        help="larger request bodies get 413 (default: %(default)s)")
    parser.add_argument("--grace-period", type=float, default=30.0,
                        help="seconds running requests get after SIGTERM before they are aborted (default: %(default)s)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                        help="(default: %(default)s)")
    add_scale_out_args(parser)


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
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if args.grace_period < 0:
        raise ValueError(f"--grace-period must be >= 0, got {args.grace_period}")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    # ---- scale-out: --replicas / --autoscale serve through Ray Serve (server/ray_app.py) ----
    scale = scale_out_from(args)
    if scale is not None:
        engine_args_from(args)  # bad engine flags fail here, before a cluster starts
        if scale.ray_address is None:
            _listen(args.host, args.port).close()  # a taken port too
        if importlib.util.find_spec("ray") is None:
            raise RuntimeError("--replicas and --autoscale need Ray Serve: pip install 'attamba-serve[ray]'")
        from server import ray_app
        return ray_app.run(args, scale)
    # ---- end scale-out ----
    engine = AsyncEngine(engine_args_from(args))
    app = create_app(engine, args.api_key, args.max_body_bytes, args.served_model_name, args.allowed_origins,
                     ui=not args.no_ui)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, lifespan="off",
                            timeout_graceful_shutdown=SHUTDOWN_TIMEOUT_S)
    server = DrainingServer(config, app.state.serving.lifecycle, args.grace_period)
    with _listen(args.host, args.port) as sock:
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
