"""Triton as an optional dependency, and the choice between each op's kernel and its `_ref`.

The backend is "auto" (the Triton kernel for CUDA tensors when triton imports, else the PyTorch
`_ref`), "triton" (always the kernel: on CPU tensors that needs TRITON_INTERPRET=1) or "torch"
(always the `_ref`); it comes from `set_backend` or else the ATTAMBA_KERNELS environment variable.

triton is imported at the first use, and kernels and their helpers are decorated with `jit`, which
defers `triton.jit` to the first launch: whether kernels are interpreted is decided then, so a test
can set TRITON_INTERPRET=1 after the package imports (but before any kernel runs).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from functools import lru_cache
from types import ModuleType
from typing import Any, Callable, Iterator

from torch import Tensor

# triton.language, bound in each kernel module at its first launch (kernels refer to it as `tl`)
tl: Any = None


@lru_cache(maxsize=1)
def load_triton() -> ModuleType | None:
    """triton, imported at first use: its standard library (tl.sum, ...) is built for the interpreter
    or for compilation when it is imported, so TRITON_INTERPRET must be set by then."""
    try:
        import triton
    except ImportError:  # the `_ref`s serve every device
        return None
    return triton


BACKENDS = ("auto", "triton", "torch")
ENV = "ATTAMBA_KERNELS"
_forced: str | None = None


def set_backend(name: str | None) -> None:
    """Force "triton" or "torch" (or "auto"); None returns to the ATTAMBA_KERNELS setting."""
    global _forced
    if name is not None and name not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {name!r}")
    _forced = name


def get_backend() -> str:
    name = _forced or os.environ.get(ENV, "auto") or "auto"
    if name not in BACKENDS:
        raise ValueError(f"{ENV} must be one of {BACKENDS}, got {name!r}")
    return name


@contextmanager
def backend(name: str) -> Iterator[None]:
    """Run a block under one backend, then restore the previous choice."""
    previous = _forced
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: Tensor) -> bool:
    """Whether an op on tensor t runs its Triton kernel."""
    name = get_backend()
    if name == "torch" or (name == "auto" and not (t.is_cuda and load_triton() is not None)):
        return False
    if load_triton() is None:
        raise RuntimeError(f"{ENV}=triton but triton is not installed")
    if not t.is_cuda and not interpreting():
        raise RuntimeError("Triton kernels on CPU tensors need TRITON_INTERPRET=1, set before triton is imported")
    return True


class _Deferred:
    """A kernel or kernel helper whose `triton.jit` runs at the first launch from its module."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.jitted: Any = None

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        if self.jitted is None:
            _jit_module(self.fn.__globals__)
        return self.jitted[grid]


def _jit_module(namespace: dict[str, Any]) -> None:
    """jit every deferred function of a module at once and put the results in its namespace, where
    kernels look up `tl` and the helpers they call."""
    triton = load_triton()
    namespace["tl"] = triton.language
    for name, obj in list(namespace.items()):
        if isinstance(obj, _Deferred):
            obj.jitted = namespace[name] = triton.jit(obj.fn)


def jit(fn: Callable[..., Any]) -> _Deferred:
    return _Deferred(fn)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def check(cond: bool, message: str) -> None:
    """The wrappers' shape and dtype checks (a ValueError, not an assert that -O removes)."""
    if not cond:
        raise ValueError(message)
