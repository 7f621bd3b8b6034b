"""The scale-out settings of `attamba serve` (Ray Serve replicas), importable without Ray installed.

`--replicas N` or `--autoscale MIN:MAX` switch `attamba serve` from one process to a Ray Serve
application (server/ray_app.py); without them nothing here is used and Ray is never imported.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

ROUTERS = ("default", "prefix")


@dataclass(frozen=True)
class ScaleOut:
    """How many engine replicas, how they scale and how requests are routed to them."""

    replicas: int = 1  # fixed count, or the initial count when autoscaling
    min_replicas: int | None = None  # autoscaling bounds (both or neither)
    max_replicas: int | None = None
    target_ongoing_requests: float = 8.0  # autoscaling target per replica
    replica_cpus: float = 1.0  # Ray CPUs each replica reserves (and its torch threads unless --threads)
    router: str = "default"  # Ray Serve's power-of-two-choices, or prompt-prefix affinity
    ray_address: str | None = None  # join a running cluster instead of starting a local one

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"--replicas must be >= 1, got {self.replicas}")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("--autoscale needs both MIN and MAX")
        if self.min_replicas is not None and not 0 <= self.min_replicas <= self.max_replicas >= 1:
            raise ValueError(f"--autoscale MIN:MAX needs 0 <= MIN <= MAX and MAX >= 1, got "
                             f"{self.min_replicas}:{self.max_replicas}")
        if self.target_ongoing_requests <= 0:
            raise ValueError(f"--target-ongoing-requests must be > 0, got {self.target_ongoing_requests}")
        if self.replica_cpus <= 0:
            raise ValueError(f"--replica-cpus must be > 0, got {self.replica_cpus}")
        if self.router not in ROUTERS:
            raise ValueError(f"--router must be one of {', '.join(ROUTERS)}, got {self.router!r}")

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None

    @property
    def most_replicas(self) -> int:
        return self.max_replicas if self.max_replicas is not None else self.replicas

    def autoscaling_config(self) -> dict[str, float | int]:
        """Ray Serve's autoscaling_config for the engine deployment (autoscaling only)."""
        return {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "initial_replicas": min(max(self.replicas, self.min_replicas), self.max_replicas),
                "target_ongoing_requests": self.target_ongoing_requests}


def _min_max(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    try:
        return int(low), int(high)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX (e.g. 1:4), got {text!r}") from None


def add_scale_out_args(parser: argparse.ArgumentParser) -> None:
    """The `attamba serve` flags that select and size the Ray Serve application."""
    group = parser.add_argument_group("scale-out on Ray Serve (needs the `ray` extra)")
    group.add_argument("--replicas", type=int, default=None,
                       help="serve N engine replicas behind one endpoint on a local (or --ray-address) Ray "
                            "cluster; each replica has its own engine and --cache-memory (default: one process, "
                            "no Ray)")
    group.add_argument("--autoscale", type=_min_max, default=None, metavar="MIN:MAX",
                       help="autoscale the replicas between MIN and MAX (starting at --replicas, or MIN)")
    group.add_argument("--target-ongoing-requests", type=float, default=ScaleOut.target_ongoing_requests,
                       help="autoscaling target of requests in flight per replica (default: %(default)s)")
    group.add_argument("--replica-cpus", type=float, default=ScaleOut.replica_cpus,
                       help="Ray CPUs per replica, also its torch threads unless --threads is set "
                            "(default: %(default)s)")
    group.add_argument("--router", choices=ROUTERS, default=ScaleOut.router,
                       help="default: Ray Serve's power of two choices; prefix: requests sharing a prompt prefix "
                            "go to the same replica while it is not overloaded (default: %(default)s)")
    group.add_argument("--ray-address", default=None,
                       help="address of a running Ray cluster to deploy on (default: start a local one)")


def flags_from(args: dict[str, object]) -> list[str]:
    """`attamba serve` arguments from a mapping of flag names without their dashes (a Ray Serve application's
    `args`): a true value is a bare flag, a list several values."""
    argv: list[str] = []
    for name, value in args.items():
        argv.append(f"--{name}")
        if value is not True:
            argv.extend(str(v) for v in (value if isinstance(value, list) else [value]))
    return argv


def scale_out_from(ns: argparse.Namespace) -> ScaleOut | None:
    """The scale-out settings, or None when the server stays one process (no --replicas, no --autoscale)."""
    if ns.replicas is None and ns.autoscale is None:
        return None
    low, high = ns.autoscale if ns.autoscale is not None else (None, None)
    replicas = ns.replicas if ns.replicas is not None else max(low or 1, 1)
    return ScaleOut(replicas=replicas, min_replicas=low, max_replicas=high,
                    target_ongoing_requests=ns.target_ongoing_requests, replica_cpus=ns.replica_cpus,
                    router=ns.router, ray_address=ns.ray_address)
