"""The scale-out settings of `attamba serve` (Ray Serve replicas), importable without Ray installed.

`--replicas N` or `--autoscale MIN:MAX` switch `attamba serve` from one process to a Ray Serve
application (server/ray_app.py); without them nothing here is used and Ray is never imported.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from engine.settings import setting

ROUTERS = ("default", "prefix")


def _min_max(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    try:
        return int(low), int(high)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX (e.g. 1:4), got {text!r}") from None


@dataclass(frozen=True)
class ScaleOut:
    """Scale-out on Ray Serve (needs the `ray` extra): how many engine replicas, how they scale and are routed."""

    replicas: int | None = setting(None, "serve N engine replicas behind one endpoint on a local (or --ray-address) "
                                   "Ray cluster, each with its own engine and --cache-memory; with --autoscale, the "
                                   "count it starts at", shown="one process, no Ray")
    autoscale: tuple[int, int] | None = setting(None, "autoscale the replicas between MIN and MAX (starting at "
                                                "--replicas, or MIN)", parse=_min_max, metavar="MIN:MAX")
    target_ongoing_requests: float = setting(8.0, "autoscaling target of requests in flight per replica")
    replica_cpus: float = setting(1.0, "Ray CPUs per replica, also its torch threads unless --threads is set")
    router: str = setting("default", "default: Ray Serve's power of two choices; prefix: requests sharing a prompt "
                          "prefix go to the same replica while it is not overloaded", choices=ROUTERS)
    ray_address: str | None = setting(None, "address of a running Ray cluster to deploy on",
                                      shown="start a local one")

    def __post_init__(self) -> None:
        if self.replicas is not None and self.replicas < 1:
            raise ValueError(f"--replicas must be >= 1, got {self.replicas}")
        if self.autoscale is not None and not 0 <= self.autoscale[0] <= self.autoscale[1] >= 1:
            raise ValueError("--autoscale MIN:MAX needs 0 <= MIN <= MAX and MAX >= 1, got "
                             f"{self.autoscale[0]}:{self.autoscale[1]}")
        if self.target_ongoing_requests <= 0:
            raise ValueError(f"--target-ongoing-requests must be > 0, got {self.target_ongoing_requests}")
        if self.replica_cpus <= 0:
            raise ValueError(f"--replica-cpus must be > 0, got {self.replica_cpus}")
        if self.router not in ROUTERS:
            raise ValueError(f"--router must be one of {', '.join(ROUTERS)}, got {self.router!r}")

    @property
    def enabled(self) -> bool:
        """Whether the server runs on Ray Serve (--replicas or --autoscale) rather than as one process."""
        return self.replicas is not None or self.autoscale is not None

    @property
    def autoscaling(self) -> bool:
        return self.autoscale is not None

    @property
    def num_replicas(self) -> int:
        """The fixed count, or the count autoscaling starts at: --replicas within MIN..MAX, else MIN (at least 1)."""
        if self.autoscale is None:
            return self.replicas or 1
        low, high = self.autoscale
        return min(max(self.replicas or low, low, 1), high)

    @property
    def most_replicas(self) -> int:
        return self.autoscale[1] if self.autoscale is not None else self.num_replicas

    def autoscaling_config(self) -> dict[str, float | int]:
        """Ray Serve's autoscaling_config for the engine deployment (autoscaling only)."""
        low, high = self.autoscale
        return {"min_replicas": low, "max_replicas": high, "initial_replicas": self.num_replicas,
                "target_ongoing_requests": self.target_ongoing_requests}


def flags_from(args: dict[str, object]) -> list[str]:
    """`attamba serve` arguments from a mapping of flag names without their dashes (a Ray Serve application's
    `args`): a true value is a bare flag, a list several values."""
    argv: list[str] = []
    for name, value in args.items():
        argv.append(f"--{name}")
        if value is not True:
            argv.extend(str(v) for v in (value if isinstance(value, list) else [value]))
    return argv
