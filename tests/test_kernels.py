"""The Triton decode kernels against their PyTorch `_ref`s, and the engine with them forced.

Without a GPU they run under Triton's interpreter (TRITON_INTERPRET=1, set here before the first
launch; kernels/_triton.py defers `triton.jit` to it), on small shapes. With a GPU the same grid
runs on CUDA, plus the paper's dimensions.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

import kernels  # noqa: E402
from kernels._triton import use_triton  # noqa: E402

attn_mod = importlib.import_module("kernels.decode_attention")  # the package's attribute is the function
ssm_mod = importlib.import_module("kernels.ssm_step")
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """Equal up to the dtype's rounding, relative to the reference's scale."""
    scale = max(1.0, want.float().abs().max().item())
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype] * scale, rtol=TOL[dtype])


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- store_kv ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Hkv,D", [(1, 4), (3, 6)])
def test_store_kv(dtype: torch.dtype, Hkv: int, D: int) -> None:
    g = gen(0)
    B, entries = 6, 10
    kv = torch.randn(B, 2 * Hkv + 1, D, generator=g).to(DEV, dtype)
    k, v = kv[:, :Hkv], kv[:, Hkv + 1 :]  # strided rows, as the model's split projections
    slots = torch.tensor([3, -1, 0, 9, -1, 5], device=DEV)  # -1: not stored (padding or not a boundary)
    want_k = torch.randn(entries, Hkv, D, generator=g).to(DEV, dtype)
    want_v = torch.randn(entries, Hkv, D, generator=g).to(DEV, dtype)
    got_k, got_v = want_k.clone(), want_v.clone()
    kernels.store_kv_ref(k, v, want_k, want_v, slots)
    kernels.store_kv_triton(k, v, got_k, got_v, slots)
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)


def test_store_kv_casts_to_the_cache_dtype() -> None:
    k, v = torch.randn(3, 2, 4, device=DEV), torch.randn(3, 2, 4, device=DEV)
    want = [torch.zeros(5, 2, 4, device=DEV, dtype=torch.bfloat16) for _ in range(2)]
    got = [t.clone() for t in want]
    slots = torch.tensor([4, 0, -1], device=DEV)
    kernels.store_kv_ref(k, v, *want, slots)
    kernels.store_kv_triton(k, v, *got, slots)
    for a, b in zip(got, want):  # the interpreter truncates fp32 -> bf16 where CUDA rounds to nearest
        torch.testing.assert_close(a, b, atol=0, rtol=0 if DEV.type == "cuda" else 2**-7)


# ---- ssm_step -----------------------------------------------------------------------------------------
def ssm_inputs(B: int, G: int, h: int, p: int, N: int, W: int, S: int, dtype: torch.dtype, seed: int) -> dict:
    g = gen(seed)
    C = h * p + 2 * N
    zxbcdt = torch.randn(B, G, 2 * C + h, generator=g).to(DEV, dtype)  # xbc and dt are views, as in the model
    return dict(
        xbc=zxbcdt[..., C : 2 * C], dt=zxbcdt[..., 2 * C :] * 2,
        conv_state=torch.randn(G, S, C, W - 1, generator=g).to(DEV, dtype),
        ssm_state=torch.randn(G, S, h, p, N, generator=g).to(DEV),
        conv_weight=(torch.randn(G, C, W, generator=g) * 0.5).to(DEV), A_log=torch.randn(G, h, generator=g).to(DEV),
        D=torch.randn(G, h, generator=g).to(DEV),
    )


def check_ssm_step(inp: dict, slots: torch.Tensor, reset: torch.Tensor, dtype: torch.dtype) -> None:
    """One step through both: equal outputs and equal pools afterwards (then continue from them)."""
    ref_pools = {k: inp[k].clone() for k in ("conv_state", "ssm_state")}
    args = {k: v for k, v in inp.items() if k not in ref_pools}
    want = kernels.ssm_step_ref(**args, **ref_pools, slots=slots, reset=reset)
    got = kernels.ssm_step_triton(**inp, slots=slots, reset=reset)
    close(got, want, dtype)
    assert not got[slots < 0].any()  # padding rows give zeros
    close(inp["conv_state"], ref_pools["conv_state"], dtype)
    close(inp["ssm_state"], ref_pools["ssm_state"], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h,p,N,W,tiles", [(2, 3, 5, 4, "one"), (1, 4, 8, 2, "one"), (3, 8, 16, 4, "many")])
def test_ssm_step(monkeypatch, dtype: torch.dtype, h: int, p: int, N: int, W: int, tiles: str) -> None:
    if tiles == "many":  # several conv channel blocks and several head-channel blocks per head
        monkeypatch.setattr(ssm_mod, "MAX_BLOCK_C", 16)
        monkeypatch.setattr(ssm_mod, "MAX_STATE_TILE", 32)
    B, S = 5, 7
    inp = ssm_inputs(B, 2, h, p, N, W, S, dtype, seed=h * 100 + N)
    slots = torch.tensor([4, -1, 0, 6, 2], device=DEV)
    check_ssm_step(inp, slots, torch.tensor([False, False, True, False, True], device=DEV), dtype)


def test_ssm_step_over_steps_with_slot_reuse() -> None:
    """Several steps on one pool: a slot freed by one sequence restarts (reset) for the next."""
    inp = ssm_inputs(3, 2, 2, 4, 8, 4, 4, torch.float32, seed=1)
    slots = torch.tensor([1, 3, 0], device=DEV)
    resets = [[True, True, True], [False, False, False], [False, True, False], [False, False, False]]
    for step, reset in enumerate(resets):
        fresh = ssm_inputs(3, 2, 2, 4, 8, 4, 4, torch.float32, seed=10 + step)
        inp.update(xbc=fresh["xbc"], dt=fresh["dt"])
        check_ssm_step(inp, slots, torch.tensor(reset, device=DEV), torch.float32)
        slots = slots.roll(1) if step == 1 else slots  # rows move between slots, as a batch reorders


# ---- decode_attention ---------------------------------------------------------------------------------
def attn_inputs(B: int, H: int, Hkv: int, D: int, block_size: int, W: int, max_ctx: int, dtype: torch.dtype,
                seed: int) -> dict:
    g = gen(seed)
    S, M = B + 2, -(-max_ctx // block_size)
    num_blocks = B * M + 1
    ctx = torch.randint(1, max_ctx + 1, (B,), generator=g)
    ctx[0] = max_ctx  # ragged, with one row at the table's capacity and one of a single entry
    ctx[-1] = 1
    tables = torch.randperm(num_blocks, generator=g)[: B * M].view(B, M)  # shuffled blocks
    slots = torch.randperm(S, generator=g)[:B]
    if B > 2:
        slots[1] = -1
    return dict(
        q=torch.randn(B, H, D, generator=g).to(DEV, dtype),
        k_cache=torch.randn(num_blocks, block_size, Hkv, D, generator=g).to(DEV, dtype),
        v_cache=torch.randn(num_blocks, block_size, Hkv, D, generator=g).to(DEV, dtype),
        block_tables=tables.to(DEV), context_lens=ctx.to(DEV),
        win_k=torch.randn(S, W, Hkv, D, generator=g).to(DEV, dtype),
        win_v=torch.randn(S, W, Hkv, D, generator=g).to(DEV, dtype),
        slots=slots.to(DEV), win_mask=(torch.rand(B, W, generator=g) < 0.6).to(DEV), scale=D**-0.5,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,Hkv,D", [(2, 2, 8), (4, 2, 8), (8, 2, 16), (3, 1, 6)])
@pytest.mark.parametrize("block_size,W,split", [(4, 3, False), (1, 0, True), (5, 3, True)])
def test_decode_attention(monkeypatch, dtype: torch.dtype, H: int, Hkv: int, D: int, block_size: int, W: int,
                          split: bool) -> None:
    if dtype == torch.bfloat16 and H > Hkv and DEV.type == "cpu":
        pytest.skip("Triton's interpreter computes tl.dot on bf16 operands wrongly (fp16 runs the same code)")
    if split:  # many key tiles, and a split per tile (flash-decoding with a merge)
        monkeypatch.setattr(attn_mod, "BLOCK_N", 4)
        monkeypatch.setattr(attn_mod, "CPU_PROGRAMS", 64)
    else:
        monkeypatch.setattr(attn_mod, "CPU_PROGRAMS", 1)
    inp = attn_inputs(4, H, Hkv, D, block_size, W, 23, dtype, seed=H + D + block_size)
    want = kernels.decode_attention_ref(**inp)
    got = kernels.decode_attention_triton(**inp)
    close(got, want, dtype)
    assert not got[inp["slots"] < 0].any()


def test_fused_products_equal_einsum() -> None:
    """The compiled step's broadcast-and-sum products (kernels/decode_attention.py) are einsum's."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 4, 16, generator=g), torch.randn(2, 11, 3, 16, generator=g)
    p = torch.randn(2, 3, 4, 11, generator=g)
    torch.testing.assert_close(attn_mod._scores(q, k, True), attn_mod._scores(q, k, False))
    torch.testing.assert_close(attn_mod._weighted(p, k, True), attn_mod._weighted(p, k, False))
    assert attn_mod._scores(q, k, True).shape == (2, 3, 4, 11) and attn_mod._weighted(p, k, True).shape == q.shape


def test_wrappers_check_shapes() -> None:
    inp = attn_inputs(2, 4, 2, 8, 4, 3, 9, torch.float32, seed=0)
    with pytest.raises(ValueError, match="group"):
        kernels.decode_attention_triton(**{**inp, "q": torch.randn(2, 3, 8, device=DEV)})
    with pytest.raises(ValueError, match="win_mask"):
        kernels.decode_attention_triton(**{**inp, "win_mask": inp["win_mask"][:, :2]})
    ssm = ssm_inputs(2, 2, 2, 3, 5, 4, 3, torch.float32, seed=0)
    with pytest.raises(ValueError, match="channels"):
        kernels.ssm_step_triton(**{**ssm, "xbc": ssm["xbc"][..., 1:]}, slots=torch.tensor([0, 1], device=DEV),
                                reset=torch.tensor([False, True], device=DEV))
    with pytest.raises(ValueError, match="caches"):
        kernels.store_kv_triton(torch.randn(2, 2, 4), torch.randn(2, 2, 4), torch.zeros(5, 2, 3), torch.zeros(5, 2, 3),
                                torch.tensor([0, 1]))


# ---- dispatch -----------------------------------------------------------------------------------------
def test_backend_choice(monkeypatch) -> None:
    cpu = torch.zeros(1)
    monkeypatch.delenv(kernels._triton.ENV, raising=False)
    assert kernels.get_backend() == "auto" and not use_triton(cpu)
    with kernels.backend("triton"):
        assert use_triton(cpu)  # under the interpreter (or on CUDA) a forced kernel runs on CPU tensors
        with kernels.backend("torch"):
            assert not use_triton(cpu)
    assert kernels.get_backend() == "auto"
    monkeypatch.setenv(kernels._triton.ENV, "triton")
    assert use_triton(cpu)
    monkeypatch.setenv(kernels._triton.ENV, "fast")
    with pytest.raises(ValueError, match="ATTAMBA_KERNELS"):
        use_triton(cpu)
    with pytest.raises(ValueError):
        kernels.set_backend("fast")


def test_project_runs_without_triton(tiny_ckpt) -> None:
    """triton stays optional: with its import failing, the engine generates through the refs."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import kernels, engine\n"
            "assert kernels._triton.load_triton() is None\n"
            f"llm = engine.LLM({str(tiny_ckpt)!r}, cache_memory=1 << 22)\n"
            "out = llm.generate([[5, 6, 7]], engine.SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))\n"
            "assert len(out[0].outputs[0].token_ids) == 3\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", kernels._triton.ENV)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr


# ---- end to end ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,extra", [("attamba", {}), ("transformer", {"n_kv_heads": 2})])
def test_engine_generation_with_kernels_equals_torch_path(tmp_path, tokenizer_file, kind: str, extra: dict) -> None:
    """Greedy generation with every decode op forced through its kernel == the PyTorch path."""
    from engine import LLM, SamplingParams
    from tests.conftest import make_checkpoint

    path = make_checkpoint(tmp_path, tokenizer_file, kind, **extra)
    g = gen(3)
    prompts = [torch.randint(4, 300, (n,), generator=g).tolist() for n in (1, 6, 13, 29)]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    outputs = {}
    for name in ("torch", "triton"):
        with kernels.backend(name):
            llm = LLM(str(path), device=DEV.type, block_size=4, max_num_seqs=4, max_num_batched_tokens=16,
                      cache_memory=1 << 22, dtype="float32")
            outputs[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert outputs["triton"] == outputs["torch"]


# ---- CUDA only: the paper's dimensions ----------------------------------------------------------------
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paper_dims_on_cuda(dtype: torch.dtype) -> None:
    B = 64
    inp = ssm_inputs(B, 2, 8, 32, 128, 4, B + 3, dtype, seed=5)
    slots = torch.randperm(B + 3, generator=gen(0))[:B].to(DEV)
    slots[::7] = -1
    check_ssm_step(inp, slots, torch.rand(B, generator=gen(1)).to(DEV) < 0.125, dtype)
    for block_size, max_ctx in ((16, 64), (16, 4096), (64, 32768 // 8)):
        inp = attn_inputs(8, 8, 8, 64, block_size, 9, max_ctx, dtype, seed=max_ctx)
        close(kernels.decode_attention_triton(**inp), kernels.decode_attention_ref(**inp), dtype)
    inp = attn_inputs(4, 32, 8, 128, 16, 0, 2048, dtype, seed=9)  # grouped-query heads at Llama sizes
    close(kernels.decode_attention_triton(**inp), kernels.decode_attention_ref(**inp), dtype)


# ---- prefill through mamba-ssm (models/mamba_cuda.py) -------------------------------------------------
def test_mamba_ssd_imports_without_the_package_init(tmp_path, monkeypatch) -> None:
    """The SSD's modules load while the package __init__ (which needs the CUDA extension) never runs."""
    from models import mamba_cuda

    pkg = tmp_path / "mamba_ssm"
    (pkg / "ops" / "triton").mkdir(parents=True)
    (pkg / "__init__.py").write_text("import selective_scan_cuda\n")
    (pkg / "ops" / "__init__.py").write_text("")
    (pkg / "ops" / "triton" / "__init__.py").write_text("")
    (pkg / "ops" / "triton" / "ssd_bmm.py").write_text("def bmm(): return 'bmm'\n")
    (pkg / "ops" / "triton" / "ssd_combined.py").write_text(
        "from mamba_ssm.ops.triton.ssd_bmm import bmm\ndef mamba_chunk_scan_combined(): return bmm()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.split(".")[0] == "mamba_ssm"]:
        monkeypatch.delitem(sys.modules, name)
    scan, why = mamba_cuda._import_ssd()
    assert scan is not None and scan() == "bmm" and why == ""
    assert "mamba_ssm" not in sys.modules  # a later real import runs the package __init__
    for name in [m for m in sys.modules if m.startswith("mamba_ssm.")]:
        del sys.modules[name]


def test_mamba_conv_fallback_equals_the_chunked_conv() -> None:
    from models import mamba_cuda
    from models.ssm import causal_conv_reset, chunk_ids

    g = gen(4)
    T, C, W = 19, 5, 4
    xbc, weight = torch.randn(2, T, C, generator=g), torch.randn(C, W, generator=g)
    pos = torch.arange(T)
    cid = chunk_ids(torch.arange(-(W - 1), T), 4, 1)
    want = torch.nn.functional.silu(causal_conv_reset(torch.cat([xbc.new_zeros(2, W - 1, C), xbc], 1), weight, cid))
    seq_idx = chunk_ids(pos, 4, 1).to(torch.int32).expand(2, T)
    torch.testing.assert_close(mamba_cuda._conv_silu_torch(xbc, weight, seq_idx), want)
