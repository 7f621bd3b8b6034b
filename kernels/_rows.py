"""Helpers shared by the PyTorch references: padding rows and dtype casts."""
from __future__ import annotations

import torch
from torch import Tensor


def live_rows(index: Tensor) -> Tensor | None:
    """None when every row is live (index >= 0: the common case, one reduction), else the live-row
    mask. A batch padded to a captured size marks its extra rows with slot -1, and a row that stores
    nothing has entry -1.

    Inside a compiled step (torch.compile) every row counts as live, so nothing syncs with the
    host: a -1 then addresses the pool's last entry or slot, a sink the compiled step's runner
    reserves and never reads (engine/compiled_decode.py); padding rows compute garbage, never read."""
    if torch.compiler.is_compiling():
        return None
    live = index >= 0
    return None if bool(live.all()) else live


def cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    """x in dtype, without dispatching a no-op cast (the CPU path counts its ops)."""
    return x if x.dtype == dtype else x.to(dtype)
