"""Helpers shared by the PyTorch references: padding rows and dtype casts."""
from __future__ import annotations

import torch
from torch import Tensor


def live_rows(slots: Tensor) -> Tensor | None:
    """None when every row is live (the common case, one reduction), else the live-row mask.
    A batch padded to a captured size marks its extra rows with slot -1."""
    live = slots >= 0
    return None if bool(live.all()) else live


def cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    """x in dtype, without dispatching a no-op cast (the CPU path counts its ops)."""
    return x if x.dtype == dtype else x.to(dtype)
