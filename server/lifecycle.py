"""Whether the server takes new requests, and which generation requests are in flight."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.generation import Generation


class Lifecycle:
    """`draining` is set on SIGTERM; `running` holds requests from admission until their response ends."""

    def __init__(self) -> None:
        self.draining = False
        self.running: set[Generation] = set()

    @property
    def active(self) -> int:
        return len(self.running)

    def enter(self, gen: Generation) -> None:
        self.running.add(gen)

    def exit(self, gen: Generation) -> None:
        self.running.discard(gen)

    def abort_all(self) -> int:
        """Abort every request in flight (each stream then ends normally, reason "abort"); how many."""
        for gen in list(self.running):
            gen.abort()
        return len(self.running)
