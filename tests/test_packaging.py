"""Packaging and command-line defaults that users trip over (issue 11, item 8)."""
from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

from benchmarks import cli as bench_cli

ROOT = Path(__file__).parent.parent


def _requirements(group: str | None = None) -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] if group is None else project["optional-dependencies"][group]
    return {(r := Requirement(spec)).name: r for spec in specs}


def test_torch_pin_accepts_the_gpu_and_cpu_builds() -> None:
    torch = _requirements()["torch"]
    for version in ("2.11.0", "2.11.0+cu128", "2.13.0", "2.13.0+cpu"):
        assert torch.specifier.contains(version), version


def test_triton_is_only_needed_for_cuda() -> None:
    assert "triton" not in _requirements() and "triton" in _requirements("cuda")


def test_bench_does_not_overwrite_tracked_results_by_default() -> None:
    parser = argparse.ArgumentParser()
    bench_cli.configure(parser)
    for suite in ("model", "engine"):
        assert parser.parse_args([suite]).out == Path("bench-results")


def test_docs_show_no_path_of_a_machine() -> None:
    """Commands in the docs run from a clone: no absolute paths of the machine they were measured on."""
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "docs").rglob("*.json"))]
    found = [f"{p.relative_to(ROOT)}: {m.group()}" for p in docs
             for m in re.finditer(r"(?<![\w.])/(root|work|home|tmp|Users)/[^\s`\"']*", p.read_text(encoding="utf-8"))]
    assert not found, found
