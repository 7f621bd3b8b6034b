"""`make gpu-check` without a device: scripts/gpu_check.py dry-runs every part on CPU and reports each as ok."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_runs_every_part(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--out", str(tmp_path), "--dry-run"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] is True
    parts = report["parts"]
    assert list(parts) == ["imports", "kernel_tests", "engine_parity", "prefill_path", "bench_kernels", "decode_bench"]
    assert {name: part["status"] for name, part in parts.items()} == dict.fromkeys(parts, "ok"), proc.stdout
    assert parts["imports"]["server_packages_imported"] == []
    parity = {k: v for k, v in parts["engine_parity"].items() if isinstance(v, dict)}
    assert len(parity) == 6 and all(v["identical"] for v in parity.values())
    assert parts["decode_bench"]["tokens"] == 4 and "--decode-batches" in parts["bench_kernels"]["command"]
