"""Padding rows: a batch padded to a captured size marks its extra rows with slot -1."""
from __future__ import annotations

from torch import Tensor


def live_rows(slots: Tensor) -> Tensor | None:
    """None when every row is live (the common case, one reduction), else the live-row mask."""
    live = slots >= 0
    return None if bool(live.all()) else live
