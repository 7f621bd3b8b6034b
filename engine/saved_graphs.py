"""Graphs compiled ahead of time, saved beside Inductor's cache and loaded at the next start: the decode step's
batch sizes (engine/compiled_decode.py) and the prefill's layer halves (engine/compiled_prefill.py).

Inductor's own cache skips the C++ build of a graph it has seen, not dynamo's tracing and AOTAutograd (~8-16 s a
graph here). A graph compiled with `aot_compile` (as vLLM does) is saved with its guards and loaded instead (~0.1
s); whoever loads one checks its guards before running it. A saved graph's name holds a key over what the graph
was traced from that its guards do not check: the code (models/, kernels/, the compiling module), torch, whether
kernels/cpu_gemv.py's op is loaded, the Inductor options and settings the caller names, the model's configuration
(constants such as P, L or RoPE's base are baked into the graph) and a layer's weights (names, dtypes, shapes,
module types).
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kernels import cpu_gemv

# torch._dynamo.aot_compile and torch._inductor import triton, which reads TRITON_INTERPRET once, when imported: they
# are imported where used, so a process may still set it after importing the engine (tests/test_kernels.py does)
if TYPE_CHECKING:
    from torch._dynamo.aot_compile import AOTCompiledFunction

log = logging.getLogger("attamba.engine")


def artifact_dir() -> Path:
    """Where compiled graphs are saved: beside Inductor's own cache (TORCHINDUCTOR_CACHE_DIR)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / "attamba-graphs"


def artifact_key(block: nn.Module, config: object, module_file: str, *settings: object) -> str:
    """The key of the graphs a module (`module_file`) traces from a model's layers (the module docstring)."""
    # whether kernels/cpu_gemv.py's op is loaded decides what a bf16 model's products trace to
    h = hashlib.sha256(f"{torch.__version__} {cpu_gemv.READY} {settings!r} {config!r}".encode())
    root = Path(__file__).resolve().parent.parent
    for src in sorted([*(root / "models").glob("*.py"), *(root / "kernels").glob("*.py"), Path(module_file).resolve()]):
        h.update(src.read_bytes())
    h.update(repr([(n, type(m).__name__) for n, m in block.named_modules()]).encode())
    h.update(repr([(n, t.dtype, tuple(t.shape)) for n, t in [*block.named_parameters(), *block.named_buffers()]]).encode())
    return h.hexdigest()[:32]


def load(name: str, fn: Callable[..., Any]) -> AOTCompiledFunction | None:
    """The graph of fn saved as `name`, or None when none is saved or it does not load (the caller checks its
    guards before running it)."""
    path = artifact_dir() / f"{name}.bin"
    if not path.exists():
        return None
    try:
        with path.open("rb") as f:
            return torch.compiler.load_compiled_function(f, f_globals=fn.__globals__)
    except Exception as e:  # a file cut short or written by another build of torch: compile instead
        log.warning("could not load the compiled graph %s (%s); compiling it", path, e)
        return None


def compile_and_save(fn: Callable[..., Any], args: tuple[Any, ...], name: str, dynamic: bool,
                     options: dict[str, Any]) -> AOTCompiledFunction:
    """torch.compile(fn, fullgraph=True, dynamic=dynamic, options=options) compiled now for inputs like `args`,
    and saved as `name`."""
    # with dynamic shapes dynamo restarts its analysis when the graph turns a Python float into a tensor, which
    # aot_compile cannot do: floats are constants of the graph instead, guarded as the rest
    with torch._dynamo.config.patch(specialize_float=True):
        graph = torch.compile(fn, fullgraph=True, dynamic=dynamic, options=options).aot_compile((args, {}))
    path = artifact_dir() / f"{name}.bin"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        graph.save_compiled_function(str(path))  # written to a temporary file, then renamed
    except Exception as e:  # e.g. a guard torch cannot serialise: the next start compiles again
        log.warning("could not save the compiled graph %s (%s)", path, e)
    return graph
