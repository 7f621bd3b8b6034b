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
Without CUDA every part that needs it is reported as skipped, and the exit status is 0 when
nothing failed.
"""
from __future__ import annotations

import argparse
import json
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


class Skipped(Exception):
    """A part that cannot run here (the message says why)."""


def _run(cmd: list[str], log: Path, timeout: int) -> None:
    """A subprocess from the repository root, its output in log; raises when it fails."""
    with log.open("w") as fh:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode:
        tail = log.read_text()[-2000:]
        raise RuntimeError(f"{' '.join(cmd[1:4])} exited {proc.returncode}; end of {log.name}:\n{tail}")


def need_cuda() -> None:
    if not torch.cuda.is_available():
        raise Skipped("no CUDA device")


def part_imports(out: Path) -> dict:
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


def part_kernel_tests(out: Path) -> dict:
    need_cuda()
    _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels.py",
          "tests/test_decode_ops.py::test_cuda_graph_decode_equals_eager",
          f"--junitxml={out / 'kernel-tests.xml'}"], out / "kernel-tests.log", timeout=240)
    return {"log": "kernel-tests.log", "junit": "kernel-tests.xml",
            "summary": (out / "kernel-tests.log").read_text().strip().splitlines()[-1]}


def _checkpoint(root: Path, kind: str, **overrides) -> Path:
    """A random checkpoint at the paper's dims (optionally changed) with a throwaway tokenizer."""
    from benchmarks.model_bench import paper_config
    from models import build_model, save_checkpoint
    from models.tokenizer import Tokenizer, train_tokenizer

    tok = root / "tokenizer.json"
    if not tok.exists():
        Tokenizer(train_tokenizer(" ".join(f"word{i % 997}" for i in range(5000)), vocab_size=512)).save(tok)
    path = root / kind
    save_checkpoint(build_model(paper_config(kind, **overrides), seed=0), path, tok)
    return path


def part_engine_parity(out: Path) -> dict:
    """Greedy tokens of the Triton kernels (eager, and replayed from CUDA graphs) against the PyTorch
    path: fp32 must match exactly; bf16 reports the share of matching tokens."""
    need_cuda()
    import kernels
    from engine import LLM, SamplingParams

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 500, (n,), generator=g).tolist() for n in (1, 9, 40, 200, 700)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    result, failures = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        cases = [("attamba", {}), ("transformer", {"n_kv_heads": 2}), ("sliding", {"sliding_window": 64})]
        for kind, overrides in cases:
            path = _checkpoint(Path(tmp), kind, **overrides)
            for dtype in ("float32", "bfloat16"):
                tokens = {}
                for backend, eager in (("torch", True), ("triton", True), ("triton", False)):
                    with kernels.backend(backend):
                        llm = LLM(str(path), device="cuda", dtype=dtype, max_num_seqs=8, cache_memory=1 << 28,
                                  enforce_eager=eager)
                        name = backend + ("" if eager else "+graphs")
                        tokens[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
                        del llm
                key = f"{kind}{'-gqa' if overrides.get('n_kv_heads') else ''}/{dtype}"
                total = sum(len(x) for x in tokens["torch"])
                for name in ("triton", "triton+graphs"):
                    same = sum(a == b for x, y in zip(tokens["torch"], tokens[name]) for a, b in zip(x, y))
                    result[f"{key}/{name}"] = {"identical": tokens["torch"] == tokens[name],
                                               "matching_tokens": f"{same}/{total}"}
                    if dtype == "float32" and tokens["torch"] != tokens[name]:
                        failures.append(f"{key}/{name}")
    if failures:
        raise RuntimeError(f"fp32 greedy tokens differ between kernels and PyTorch for {failures}: {result}")
    return result


def part_prefill_path(out: Path) -> dict:
    need_cuda()
    from benchmarks.model_bench import paper_config
    from models import build_model, mamba_cuda

    model = build_model(paper_config("attamba"), seed=0).cuda().eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 300), device="cuda")
    result = {"path": mamba_cuda.describe()}
    if mamba_cuda.available(ids):
        with torch.no_grad():
            fast, slow = model(ids, mamba=True), model(ids)
        diff = (fast - slow).abs().max().item()
        result["max_logit_diff_vs_pytorch"] = diff
        if diff > 1e-2 * max(1.0, slow.abs().max().item()):
            raise RuntimeError(f"mamba-ssm prefill logits differ from PyTorch by {diff}")
    return result


def part_bench_kernels(out: Path) -> dict:
    need_cuda()
    _run([sys.executable, "-m", "entrypoints.cli", "bench", "kernels", "--out", str(out), "--decode-batches", ""],
         out / "bench-kernels.log", timeout=240)
    data = json.loads((out / "bench-kernels.json").read_text())
    return {"json": "bench-kernels.json", "device": data["device"], "peak": data["peak"], "rows": len(data["rows"])}


def part_decode_bench(out: Path) -> dict:
    need_cuda()
    from benchmarks.kernel_bench import decode_steps

    return {"bfloat16": decode_steps([1, 32, 128], 1024, 16, "bfloat16")}


PARTS: list[tuple[str, Callable[[Path], dict]]] = [
    ("imports", part_imports), ("kernel_tests", part_kernel_tests), ("engine_parity", part_engine_parity),
    ("prefill_path", part_prefill_path), ("bench_kernels", part_bench_kernels), ("decode_bench", part_decode_bench),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the JSON results")
    parser.add_argument("--only", default="", help="comma-separated parts to run (default: all)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    only = {p for p in args.only.split(",") if p}
    report: dict = {"cuda": torch.cuda.is_available(), "parts": {}}
    start = time.perf_counter()
    for name, fn in PARTS:
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        try:
            entry = {"status": "ok", **fn(args.out)}
        except Skipped as exc:
            entry = {"status": "skipped", "reason": str(exc)}
        except Exception as exc:  # noqa: BLE001 - recorded, and the next part still runs
            entry = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        report["parts"][name] = entry
        print(f"{name:14s} {entry['status']:8s} {entry['seconds']:6.1f}s  {entry.get('reason', entry.get('error', ''))}",
              flush=True)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    report["seconds"] = round(time.perf_counter() - start, 1)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    failed = [n for n, e in report["parts"].items() if e["status"] == "failed"]
    skipped = [n for n, e in report["parts"].items() if e["status"] == "skipped"]
    print(f"gpu check: {len(report['parts']) - len(failed) - len(skipped)} ok, failed {failed or 'none'}, "
          f"skipped {skipped or 'none'} ({report['seconds']}s; {args.out / 'gpu_check.json'})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
