"""`attamba serve --replicas / --autoscale` flags: bad values and a missing Ray are one-line errors."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from entrypoints.cli import main
from server.scale_out import ScaleOut

ENGINE_FLAGS = ["--cache-memory", "4MiB", "--port", "0"]


@pytest.mark.parametrize("argv,message", [
    (["--replicas", "0"], "--replicas"),
    (["--autoscale", "3:1"], "--autoscale"),
    (["--replicas", "2", "--target-ongoing-requests", "0"], "--target-ongoing-requests"),
    (["--replicas", "2", "--replica-cpus", "-1"], "--replica-cpus"),
])
def test_bad_scale_out_settings_are_one_line_errors(tiny_ckpt: Path, capsys, argv: list[str], message: str) -> None:
    assert main(["serve", "--model", str(tiny_ckpt), *ENGINE_FLAGS, *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_unparsable_autoscale_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--autoscale", "many"])
    assert exc.value.code == 2 and "MIN:MAX" in capsys.readouterr().err


def test_replicas_without_ray_say_how_to_install_it(tiny_ckpt: Path, capsys, monkeypatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else find_spec(name, *a))
    assert main(["serve", "--model", str(tiny_ckpt), *ENGINE_FLAGS, "--replicas", "2"]) == 1
    err = capsys.readouterr().err
    assert "attamba-serve[ray]" in err and len(err.strip().splitlines()) == 1


def test_autoscaling_config_starts_within_its_bounds() -> None:
    config = ScaleOut(replicas=1, autoscale=(2, 4), target_ongoing_requests=3).autoscaling_config()
    assert config == {"min_replicas": 2, "max_replicas": 4, "initial_replicas": 2, "target_ongoing_requests": 3}
    assert ScaleOut(autoscale=(0, 4)).num_replicas == 1 and ScaleOut(replicas=9, autoscale=(1, 4)).num_replicas == 4
    assert ScaleOut(replicas=3).most_replicas == 3 and ScaleOut(replicas=3).enabled
    assert not ScaleOut().autoscaling and not ScaleOut().enabled and ScaleOut().num_replicas == 1
