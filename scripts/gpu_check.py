"""Everything that needs a GPU, in one run: `python scripts/gpu_check.py --out DIR` (or `make gpu-check OUT=DIR`).

Made for a bare CUDA machine with torch, triton, numpy, safetensors, tokenizers and pytest (no
fastapi, uvicorn or pydantic; no network; the project not installed), run from the repository
root in under 8 minutes. Parts, each recorded in DIR/gpu_check.json with its status and time:
  imports        which optional packages importing engine/models/kernels pulls in (no server deps)
  kernel_tests   tests/test_kernels.py on CUDA (junit XML and log in DIR)
  engine_parity  greedy generation on CUDA with the kernels == with the PyTorch path
  prefill_path   which SSD whole-sequence prefill uses (mamba-ssm's Triton SSD or PyTorch), and
                 its logits against the PyTorch path when they differ
  bench_kernels  `attamba bench kernels` (DIR/bench-kernels.json)
  decode_bench   engine decode tokens/s, kernels vs PyTorch path
Without CUDA (or with --dry-run) every part runs what needs no device, on CPU at tiny dims: the
imports; the kernel tests named here exist; the engine-parity
generation with the same LLM(...) calls on the PyTorch path; the prefill model and the path it
would take; the bench command line parsed; the decode benchmark's engine built and stepped.
tests/test_gpu_check.py runs that dry run in CI. The exit status is 0 when nothing failed.
"""
from __future__ import annotations

import argparse
import ast
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SERVER_DEPS = ("fastapi", "uvicorn", "pydantic", "starlette", "prometheus_client")
KERNEL_TESTS = ["tests/test_kernels.py", "tests/test_decode_ops.py::test_cuda_graph_decode_equals_eager"]
BENCH_KERNELS = ["bench", "kernels", "--decode-batches", ""]  # `attamba bench kernels`, plus --out DIR
TINY = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, ssm_state=16, ssm_inner=32, ssm_heads=2)  # dry run


def _run(cmd: list[str], log: Path, timeout: int) -> None:
    """A subprocess from the repository root, its output in log; raises when it fails."""
    with log.open("w") as fh:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode:
        tail = log.read_text()[-2000:]
        raise RuntimeError(f"{' '.join(cmd[1:4])} exited {proc.returncode}; end of {log.name}:\n{tail}")


def part_imports(out: Path, dry: bool) -> dict:
    """Import the serving core in a fresh process and list the server-only packages it loaded."""
    code = ("import sys, engine, models, kernels, benchmarks.kernel_bench\n"
            f"print(','.join(sorted({{m.split('.')[0] for m in sys.modules}} & {set(SERVER_DEPS)!r})))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    if proc.returncode:
        raise RuntimeError(f"importing the serving core failed:\n{proc.stderr[-2000:]}")
    pulled = [m for m in proc.stdout.strip().split(",") if m]
    if pulled:
        raise RuntimeError(f"importing engine pulls in server packages: {pulled}")
    from kernels._triton import load_triton

    triton = load_triton()
    return {"server_packages_imported": pulled, "torch": torch.__version__, "triton": triton and triton.__version__,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def part_kernel_tests(out: Path, dry: bool) -> dict:
    """The kernel tests on CUDA; a dry run checks that every test named here exists (CI runs them on CPU)."""
    if dry:
        for name in KERNEL_TESTS:
            path, _, test = name.partition("::")
            tree = ast.parse((ROOT / path).read_text())
            if test and test not in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}:
                raise RuntimeError(f"{name} is not a test in {path}")
        return {"tests": KERNEL_TESTS}
    _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *KERNEL_TESTS,
          f"--junitxml={out / 'kernel-tests.xml'}"], out / "kernel-tests.log", timeout=240)
    return {"log": "kernel-tests.log", "junit": "kernel-tests.xml",
            "summary": (out / "kernel-tests.log").read_text().strip().splitlines()[-1]}


def _checkpoint(root: Path, kind: str, dry: bool, **overrides) -> Path:
    """A random checkpoint at the paper's dims (tiny ones in a dry run; optionally changed) with a
    throwaway tokenizer."""
    from benchmarks.model_bench import paper_config
    from models import build_model, save_checkpoint
    from models.tokenizer import Tokenizer, train_tokenizer

    tok = root / "tokenizer.json"
    if not tok.exists():
        Tokenizer(train_tokenizer(" ".join(f"word{i % 997}" for i in range(5000)), vocab_size=512)).save(tok)
    path = root / kind
    save_checkpoint(build_model(paper_config(kind, **(TINY if dry else {}), **overrides), seed=0), path, tok)
    return path


def part_engine_parity(out: Path, dry: bool) -> dict:
    """Greedy tokens of the Triton kernels (eager, and replayed from CUDA graphs) against the PyTorch
    path: fp32 must match exactly; bf16 reports the share of matching tokens. A dry run makes the
    same LLM(...) calls on CPU with the PyTorch path only (no graphs are captured there)."""
    import kernels
    from engine import LLM, SamplingParams

    g = torch.Generator().manual_seed(0)
    lengths = (1, 9, 40) if dry else (1, 9, 40, 200, 700)
    prompts = [torch.randint(4, 500, (n,), generator=g).tolist() for n in lengths]
    params = SamplingParams(temperature=0.0, max_tokens=8 if dry else 24, ignore_eos=True)
    variants = ((("torch", "torch", True), ("torch, enforce_eager=False", "torch", False)) if dry else
                (("torch", "torch", True), ("triton", "triton", True), ("triton+graphs", "triton", False)))
    result, failures = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        cases = [("attamba", {}), ("transformer", {"n_kv_heads": 2}), ("sliding", {"sliding_window": 64})]
        for kind, overrides in cases:
            path = _checkpoint(Path(tmp), kind, dry, **overrides)
            for dtype in ("float32", "bfloat16"):
                tokens = {}
                for name, backend, eager in variants:
                    with kernels.backend(backend):
                        llm = LLM(str(path), device="cpu" if dry else "cuda", dtype=dtype, max_num_seqs=8,
                                  cache_memory=(8 << 20) if dry else (1 << 28), threads=1 if dry else 0,
                                  enforce_eager=eager)
                        tokens[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
                        del llm
                key = f"{kind}{'-gqa' if overrides.get('n_kv_heads') else ''}/{dtype}"
                total = sum(len(x) for x in tokens["torch"])
                for name in list(tokens)[1:]:
                    same = sum(a == b for x, y in zip(tokens["torch"], tokens[name]) for a, b in zip(x, y))
                    result[f"{key}/{name}"] = {"identical": tokens["torch"] == tokens[name],
                                               "matching_tokens": f"{same}/{total}"}
                    if dtype == "float32" and tokens["torch"] != tokens[name]:
                        failures.append(f"{key}/{name}")
    if failures:
        raise RuntimeError(f"fp32 greedy tokens differ between kernels and PyTorch for {failures}: {result}")
    return result


def part_prefill_path(out: Path, dry: bool) -> dict:
    """Which path whole-sequence prefill takes; mamba-ssm's logits against PyTorch's where it runs."""
    from benchmarks.model_bench import paper_config
    from models import build_model, mamba_cuda

    model = build_model(paper_config("attamba", **(TINY if dry else {})), seed=0).to("cpu" if dry else "cuda").eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 300), device=model.embed.weight.device)
    result = {"path": mamba_cuda.describe()}
    with torch.no_grad():
        slow = model(ids)
    if not torch.isfinite(slow).all():
        raise RuntimeError("the PyTorch prefill gives non-finite logits")
    if mamba_cuda.available(ids):
        with torch.no_grad():
            fast = model(ids, mamba=True)
        diff = (fast - slow).abs().max().item()
        result["max_logit_diff_vs_pytorch"] = diff
        if diff > 1e-2 * max(1.0, slow.abs().max().item()):
            raise RuntimeError(f"mamba-ssm prefill logits differ from PyTorch by {diff}")
    return result


def part_bench_kernels(out: Path, dry: bool) -> dict:
    """`attamba bench kernels` on CUDA; a dry run parses its command line with the bench parser."""
    argv = [*BENCH_KERNELS, "--out", str(out)]
    if dry:
        from benchmarks import cli

        parser = argparse.ArgumentParser(exit_on_error=False)
        cli.configure(parser)
        args = vars(parser.parse_args(argv[1:]))
        return {"command": shlex.join(["attamba", *argv]), "args": {k: str(v) for k, v in args.items()}}
    _run([sys.executable, "-m", "entrypoints.cli", *argv], out / "bench-kernels.log", timeout=240)
    data = json.loads((out / "bench-kernels.json").read_text())
    return {"json": "bench-kernels.json", "device": data["device"], "peak": data["peak"], "rows": len(data["rows"])}


def part_decode_bench(out: Path, dry: bool) -> dict:
    """Engine decode tokens/s, kernels vs PyTorch; a dry run builds the benchmark's engine on CPU and
    decodes with it."""
    if not dry:
        from benchmarks.kernel_bench import decode_steps

        return {"bfloat16": decode_steps([1, 32, 128], 1024, 16, "bfloat16")}
    from benchmarks.engine_bench import filled_engine

    with tempfile.TemporaryDirectory() as tmp:
        engine = filled_engine(_checkpoint(Path(tmp), "attamba", dry), 2, 64, 2, "bfloat16")
        tokens = sum(len(delta.token_ids) for _ in range(2) for delta in engine.step())
    if tokens != 4:
        raise RuntimeError(f"2 decode steps of 2 sequences gave {tokens} tokens")
    return {"batch": 2, "context": 64, "tokens": tokens}


PARTS: list[tuple[str, Callable[[Path, bool], dict]]] = [
    ("imports", part_imports), ("kernel_tests", part_kernel_tests), ("engine_parity", part_engine_parity),
    ("prefill_path", part_prefill_path), ("bench_kernels", part_bench_kernels), ("decode_bench", part_decode_bench),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the JSON results")
    parser.add_argument("--only", default="", help="comma-separated parts to run (default: all)")
    parser.add_argument("--dry-run", action=argparse.BooleanOptionalAction, default=not torch.cuda.is_available(),
                        help="run what needs no device, on CPU (default: on without CUDA)")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("--no-dry-run needs a CUDA device")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        torch.set_num_threads(1)  # the fastest at tiny dims, and CI shares its cores
    only = {p for p in args.only.split(",") if p}
    unknown = only - {name for name, _ in PARTS}
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; the parts are {', '.join(name for name, _ in PARTS)}")
    report: dict = {"cuda": torch.cuda.is_available(), "dry_run": args.dry_run, "parts": {}}
    start = time.perf_counter()
    for name, fn in PARTS:
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        try:
            entry = {"status": "ok", **fn(args.out, args.dry_run)}
        except Exception as exc:  # noqa: BLE001 - recorded, and the next part still runs
            entry = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        report["parts"][name] = entry
        print(f"{name:14s} {entry['status']:8s} {entry['seconds']:6.1f}s  {entry.get('error', '')}", flush=True)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    report["seconds"] = round(time.perf_counter() - start, 1)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    failed = [n for n, e in report["parts"].items() if e["status"] == "failed"]
    print(f"gpu check{' (dry run)' if args.dry_run else ''}: {len(report['parts']) - len(failed)} ok, failed "
          f"{failed or 'none'} ({report['seconds']}s; {args.out / 'gpu_check.json'})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
