"""Whether the server takes new requests, and how many generation requests are in flight."""
from __future__ import annotations


class Lifecycle:
    """`draining` is set on SIGTERM; `active` counts requests from admission until their response ends."""

    def __init__(self) -> None:
        self.draining = False
        self.active = 0

    def enter(self) -> None:
        self.active += 1

    def exit(self) -> None:
        self.active -= 1
