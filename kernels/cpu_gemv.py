"""Matrix-vector products of fp16 or bf16 weights on an x86 CPU (AVX2, F16C, FMA): the decode's products.

Decode on a CPU is bound by reading the weights. PyTorch's own product for fp16/bf16 weights and a row or
three (`F.linear`) reads them at ~16-18 GB/s on the two cores of the AVX2 machine of docs/cpu.md, ~10 GB/s a
core, where summing them reads ~28: it is compute-bound. `gemv` (kernels/cpu_gemv.cpp) converts sixteen weights
at a time in registers (F16C for fp16, a shift for bf16) and uses them for up to four rows of x, two FMA chains a
row, walking the weight rows in L1-sized blocks: 21-30 GB/s on the decode's shapes against F.linear's 14-19, a
batch-1 decode ~20 % faster (docs/cpu.md, stop 36). PyTorch has no fast path for more rows (its product of four is
emulated), where this one takes a decode batch: one layer's products at 8 rows 0.46 ms against 3.24 by the fp32
path, at 64 rows 3.6 against 6.8 (`attamba bench gemv`, docs/cpu.md stop 37). It takes fp32 rows and returns
fp32, so the kernels around it see no fp16.

The C++ op is built on first use with torch.utils.cpp_extension (g++, which Inductor needs anyway, and ninja)
and registered as `attamba::gemv`, so a compiled graph calls it as an extern kernel. `load()` builds it (once
per machine; cached in torch's extensions directory) and says whether it is there; where it cannot build or the
CPU lacks AVX2, `READY` stays False and callers use F.linear. `gemv_ref` is its slow, obviously correct twin.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger("attamba.kernels")

SOURCE = Path(__file__).with_name("cpu_gemv.cpp")
BLOCK_K = 16  # the kernel's step along K: K must be a multiple
READY = False  # whether torch.ops.attamba.gemv is loaded (set by load)
_tried = False


def supports(w: Tensor) -> bool:
    """Whether gemv is loaded and takes this weight: fp16 or bf16 on the CPU, K a multiple of BLOCK_K."""
    return READY and w.device.type == "cpu" and w.dtype in (torch.float16, torch.bfloat16) and w.shape[-1] % BLOCK_K == 0


def load() -> bool:
    """Build (first time on this machine) and load the op; False where it cannot be (logged once)."""
    global READY, _tried
    if _tried:
        return READY
    _tried = True
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return False
    try:
        from torch.utils import cpp_extension

        try:  # the ninja wheel's binary, where the venv's bin is not on PATH
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
        # -fopenmp: at::parallel_for's OpenMP region is in the header, compiled into the op (without it, one thread)
        cpp_extension.load("attamba_cpu_gemv", [str(SOURCE)], is_python_module=False,
                           extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"])
    except Exception as e:  # no compiler, no ninja: the products stay F.linear's
        log.warning("the CPU matrix-vector kernel did not build (%s); using F.linear", str(e).splitlines()[0])
        return False
    torch.library.register_fake("attamba::gemv")(_gemv_fake)  # shapes for torch.compile's tracing
    READY = True
    return True


def gemv(x: Tensor, w: Tensor) -> Tensor:
    """x W^T: x fp32 [M, K] (a decode batch), w fp16 or bf16 [N, K] -> fp32 [M, N], accumulated in fp32."""
    return torch.ops.attamba.gemv(x, w)


def gemv_ref(x: Tensor, w: Tensor) -> Tensor:
    """gemv's twin: the same product in fp32 (the weights converted exactly)."""
    return F.linear(x, w.float())


def _gemv_fake(x: Tensor, w: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], w.shape[0])
