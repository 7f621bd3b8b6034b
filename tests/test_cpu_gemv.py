"""kernels/cpu_gemv.py: the C++ matrix-vector product against its fp32 twin, eagerly and inside a compiled graph,
and the bf16 linears (models/upcast.py) that use it."""
from __future__ import annotations

import json

import pytest
import torch

from kernels import cpu_gemv
from models.upcast import GEMV_ROWS, NATIVE_ROWS, UpcastLinear, matvec_rows, upcast_linears

pytestmark = pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                                reason="the kernel needs AVX2")


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    assert cpu_gemv.load()  # g++ and ninja are there wherever Inductor compiles


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k,n", [(1, 576, 1288), (2, 1536, 576), (3, 16, 5), (1, 64, 1), (4, 64, 9), (11, 576, 70),
                                   (32, 48, 130)])  # groups of four rows and what is left
def test_gemv_is_its_fp32_twin(dtype, m, k, n) -> None:
    g = torch.Generator().manual_seed(m * k + n)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g).to(dtype)
    got, want = cpu_gemv.gemv(x, w), cpu_gemv.gemv_ref(x, w)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_what_gemv_takes() -> None:
    assert cpu_gemv.supports(torch.zeros(4, 32, dtype=torch.float16))
    assert not cpu_gemv.supports(torch.zeros(4, 24, dtype=torch.bfloat16))  # K not a multiple of BLOCK_K
    assert not cpu_gemv.supports(torch.zeros(4, 32))  # fp32 weights: F.linear
    with pytest.raises(RuntimeError, match="multiple of 16"):
        cpu_gemv.gemv(torch.zeros(1, 24), torch.zeros(2, 24, dtype=torch.float16))


def test_a_compiled_graph_calls_it() -> None:
    x, w = torch.randn(2, 64), torch.randn(40, 64).to(torch.float16)
    f = torch.compile(lambda x, w: torch.relu(cpu_gemv.gemv(x * 2, w)), fullgraph=True)
    with torch._dynamo.config.patch(disable=False):
        torch.testing.assert_close(f(x, w), torch.relu(cpu_gemv.gemv_ref(x * 2, w)), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_bf16_linear_uses_it_for_a_decode_batch(dtype, monkeypatch) -> None:
    calls = []
    real = cpu_gemv.gemv
    monkeypatch.setattr(cpu_gemv, "gemv", lambda x, w: calls.append(len(x)) or real(x, w))
    g = torch.Generator().manual_seed(0)
    lin = UpcastLinear(torch.nn.Parameter(torch.randn(48, 32, generator=g).to(dtype), requires_grad=False))
    for rows in (1, NATIVE_ROWS + 1, GEMV_ROWS, GEMV_ROWS + 1):  # the last: the fp32 matrix-matrix path
        x = torch.randn(rows, 32, generator=g).to(torch.bfloat16)
        want = cpu_gemv.gemv_ref(x.float(), lin.weight)  # fp32 accumulation, one rounding to bf16
        torch.testing.assert_close(lin(x).float(), want, rtol=1e-2, atol=1e-2)
    assert calls == [1, NATIVE_ROWS + 1, GEMV_ROWS]


def test_matvec_rows_follows_the_model_and_the_kernel(monkeypatch) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(32, 16, bias=False))
    assert matvec_rows(model) == 0  # fp32: no UpcastLinear, one path whatever the rows
    upcast_linears(model.to(torch.bfloat16))
    assert matvec_rows(model) == GEMV_ROWS
    monkeypatch.setattr(cpu_gemv, "READY", False)  # where the op did not build: PyTorch's products
    assert matvec_rows(model) == NATIVE_ROWS


def test_bench_gemv_writes_both_paths_for_every_batch(tmp_path) -> None:
    from entrypoints.cli import main

    assert main(["bench", "gemv", "--rows", "1,5", "--repeat", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench-gemv.json").read_text())["results"]
    assert [r["rows"] for r in rows] == [1, 5]
    assert all(r[f"{part}_{path}_ms"] > 0 for r in rows for part in ("layer", "head") for path in ("kernel", "fp32"))
