"""Settings declared once (engine/settings.py): every flag of serve, train and uptrain is a field of its
dataclass, and the engine is built through every flag `attamba serve` accepts."""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, fields
from pathlib import Path

import pytest
import torch

from engine import EngineArgs, LLMEngine, SamplingParams
from engine.settings import add_flags, build, check_fields, from_args, read_json, setting
from server.scale_out import ScaleOut
from server.serve import ServerSettings
from training.run_flags import RunFlags
from training.train import TrainConfig, TrainFlags
from training.uptrain import UptrainConfig, UptrainFlags


def parser_of(module) -> argparse.ArgumentParser:
    """A command's parser as entrypoints/cli.py builds it."""
    parser = argparse.ArgumentParser(exit_on_error=False)
    module.configure(parser)
    return parser


def argv_of(values: dict[str, object]) -> list[str]:
    """Flags for field values: a bool is --name / --no-name, a tuple several values."""
    argv: list[str] = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else flag.replace("--", "--no-", 1))
        else:
            argv += [flag, *map(str, value if isinstance(value, tuple) else [value])]
    return argv


def non_defaults(cls: type, table: dict[str, tuple[object, object]]) -> None:
    """The table names every field of cls once, each with a value other than its default."""
    defaults = {f.name: f.default for f in fields(cls)}
    assert set(table) == set(defaults), "give every field a non-default value here"
    assert all(expected != defaults[name] for name, (_, expected) in table.items())


# ---- the helper --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Example:
    """Example settings."""

    name: str = setting(doc="a required one")
    count: int | None = setting(None, "an optional int")
    size: int = setting(1024, "bytes", parse=lambda text: int(text) * 1024, shown="1KiB")
    tags: tuple[str, ...] = setting(("a",), "one or more")
    mode: str = setting("x", "a choice", choices=("x", "y"))
    fast: bool = setting(True, "a switch")


def test_flags_types_and_help_come_from_the_fields() -> None:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_flags(parser, Example)
    ex = from_args(Example, parser.parse_args(["--name", "n", "--count", "3", "--size", "2", "--tags", "b", "c",
                                               "--mode", "y", "--no-fast"]))
    assert ex == Example(name="n", count=3, size=2048, tags=("b", "c"), mode="y", fast=False)
    assert from_args(Example, parser.parse_args(["--name", "n"])) == Example(name="n")
    for bad in (["--count", "3"], ["--name", "n", "--mode", "z"], ["--name", "n", "--count", "x"]):
        with pytest.raises((argparse.ArgumentError, SystemExit)):
            parser.parse_args(bad)
    text = parser.format_help()
    for line in ("a required one", "an optional int", "bytes (default: 1KiB)", "a switch (default: on)",
                 "--fast, --no-fast", "Example settings:"):
        assert line in " ".join(text.split()), line


def test_a_command_can_change_a_default_and_its_help_says_so() -> None:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_flags(parser, Example, defaults={"count": 7, "size": 4096})
    assert from_args(Example, parser.parse_args(["--name", "n"])) == Example(name="n", count=7, size=4096)
    assert from_args(Example, parser.parse_args(["--name", "n", "--count", "2"])).count == 2
    text = " ".join(parser.format_help().split())
    assert "an optional int (default: 7)" in text and "bytes (default: 4096)" in text
    with pytest.raises(TypeError, match="no field nope"):
        add_flags(argparse.ArgumentParser(), Example, defaults={"nope": 1})


def test_generate_runs_one_sequence_unless_told_otherwise() -> None:
    from entrypoints import generate

    parser = argparse.ArgumentParser(exit_on_error=False)
    generate.configure(parser)
    assert from_args(EngineArgs, parser.parse_args(["--prompt", "p"])).max_num_seqs == 1
    assert from_args(EngineArgs, parser.parse_args(["--prompt", "p", "--max-num-seqs", "4"])).max_num_seqs == 4
    assert "most sequences running at once (default: 1)" in " ".join(parser.format_help().split())


def test_overrides_go_over_a_json_file(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_flags(parser, Example, overrides=True)
    path = tmp_path / "ex.json"
    path.write_text(json.dumps({"name": "file", "count": 1, "tags": ["p", "q"]}))
    base = check_fields(Example, read_json(path), str(path))
    got = from_args(Example, parser.parse_args(["--count", "2"]), base)
    assert got == Example(name="file", count=2, tags=("p", "q"))
    assert from_args(Example, parser.parse_args([]), {"name": "n"}) == Example(name="n")


def test_unknown_keys_and_bad_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"here: unknown Example fields \['typo'\]"):
        build(Example, {"name": "n", "typo": 1}, "here")
    with pytest.raises(ValueError, match="expected an object"):
        check_fields(Example, [1], "here")
    with pytest.raises(ValueError, match="here: .*name"):
        build(Example, {}, "here")
    with pytest.raises(FileNotFoundError, match="config file not found"):
        read_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_json(tmp_path / "bad.json")


def test_a_field_without_help_or_parser_is_refused() -> None:
    @dataclass(frozen=True)
    class Undocumented:
        """Settings."""

        x: int = 1

    with pytest.raises(TypeError, match="Undocumented.x has no help text"):
        add_flags(argparse.ArgumentParser(), Undocumented)

    @dataclass(frozen=True)
    class Pair:
        """Settings."""

        x: tuple[int, int] = setting((1, 2), "a pair")

    with pytest.raises(TypeError, match="needs parse="):
        add_flags(argparse.ArgumentParser(), Pair)


# ---- no flag without a field -------------------------------------------------------------------------------------
@pytest.mark.parametrize("command,settings", [
    ("server.serve", (EngineArgs, ServerSettings, ScaleOut)),
    ("training.train", (TrainFlags, RunFlags)),
    ("training.uptrain", (RunFlags, UptrainFlags, UptrainConfig)),
])
def test_every_flag_is_a_field(command: str, settings: tuple[type, ...]) -> None:
    import importlib

    parser = parser_of(importlib.import_module(command))
    dests = [a.dest for a in parser._actions if a.dest != "help"]
    assert sorted(dests) == sorted(f.name for cls in settings for f in fields(cls))
    for action in parser._actions[1:]:
        assert action.option_strings[0] == "--" + action.dest.replace("_", "-")


# ---- the engine through every flag of `attamba serve` ------------------------------------------------------------
def test_engine_is_built_through_every_serve_flag(tiny_ckpt: Path) -> None:
    """Each engine flag set to a valid non-default value reaches EngineArgs and the engine built from it."""
    from server import serve

    table = {  # field: (flag value, the value EngineArgs gets)
        "model": (tiny_ckpt, str(tiny_ckpt)), "max_num_seqs": (3, 3), "max_num_batched_tokens": (24, 24),
        "cache_memory": ("8MiB", 8 << 20), "max_model_len": (48, 48), "block_size": (4, 4),
        "device": ("cuda", "cuda"), "dtype": ("bfloat16", "bfloat16"), "enforce_eager": (True, True),
        "max_waiting": (5, 5), "chunk_size": (2, 2), "threads": (1, 1), "enable_prefix_caching": (False, False),
        "prefix_snapshot_interval": (2, 2), "quantization": ("int8", "int8"),
    }
    non_defaults(EngineArgs, table)
    ns = parser_of(serve).parse_args(argv_of({name: flag for name, (flag, _) in table.items()}))
    expected = {name: value for name, (_, value) in table.items()}
    assert {f.name: getattr(ns, f.name) for f in fields(EngineArgs)} == expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            from_args(EngineArgs, ns)
        ns.device = expected["device"] = "cpu"
    args = from_args(EngineArgs, ns)
    threads = torch.get_num_threads()
    try:
        engine = LLMEngine(args)
        assert engine.args == EngineArgs(**expected)
        assert engine.model_name == tiny_ckpt.name and engine.device.type == expected["device"]
        assert engine.max_model_len == 48 and engine.config.chunk_size == 2 and torch.get_num_threads() == 1
        assert next(engine.model.parameters()).dtype == torch.bfloat16
        assert 0 < engine.stats().cache_bytes_total <= 8 << 20
        assert (engine.scheduler.max_num_seqs, engine.scheduler.max_num_batched_tokens) == (3, 24)
        assert type(engine.model.blocks[0].attn.wo).__name__ == "Int8Linear"  # --quantization int8
        assert engine.runner.graphs is None  # --enforce-eager (on CPU there is nothing to capture anyway)
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        for i in range(2):
            engine.add_request(f"r{i}", list(range(3, 30)), params)
        while engine.has_unfinished():
            engine.step()
        stats = engine.stats()
        assert stats.generation_tokens == 8 and stats.prefix_cache_queries == 0  # --no-enable-prefix-caching
    finally:
        torch.set_num_threads(threads)


def test_server_and_scale_out_settings_through_their_flags() -> None:
    from server import serve

    server = {"host": ("0.0.0.0", "0.0.0.0"), "port": (0, 0), "api_key": ("k", "k"), "served_model_name": ("m", "m"),
              "allowed_origins": (("http://a", "http://b"), ("http://a", "http://b")),
              "ui": (False, False), "max_body_bytes": ("2KiB", 2048), "grace_period": (0.5, 0.5),
              "log_level": ("debug", "debug")}
    scale = {"replicas": (2, 2), "autoscale": ("1:4", (1, 4)), "target_ongoing_requests": (3.0, 3.0),
             "replica_cpus": (2.0, 2.0), "router": ("prefix", "prefix"), "ray_address": ("auto", "auto")}
    non_defaults(ScaleOut, scale)
    assert set(server) == {f.name for f in fields(ServerSettings)}
    ns = parser_of(serve).parse_args(argv_of({k: flag for k, (flag, _) in {**server, **scale}.items()}))
    assert from_args(ServerSettings, ns) == ServerSettings(**{k: v for k, (_, v) in server.items()})
    assert from_args(ScaleOut, ns) == ScaleOut(**{k: v for k, (_, v) in scale.items()})
    with pytest.raises(ValueError, match="--port"):
        from_args(ServerSettings, parser_of(serve).parse_args(["--port", "70000"]))


def test_uptrain_settings_through_their_flags_over_a_config_file(tmp_path: Path) -> None:
    from training import uptrain

    table = {"teacher": "t", "chunk_size": 4, "window": 64, "ssm_state": 8, "ssm_inner": 32, "ssm_heads": 2,
             "seq_len": 1024, "batch_size": 2, "stage1_steps": 30, "stage2_steps": 1000, "lr1": 2e-3, "lr2": 5e-4,
             "warmup_steps": 5, "ce_weight": 0.2, "weight_decay": 0.01, "grad_clip": 0.5, "ckpt_interval": 10,
             "threads": 2, "seed": 3, "corpus": "wikitext2,shakespeare", "train_text": "a.txt", "init_from": "ckpt",
             "lora_rank": 16, "lora_alpha": 8.0, "lora_targets": "wq", "lr_lora": 1e-4, "chat_frac": 0.25,
             "recall_frac": 0.25, "recall_weight": 5.0, "recall_target": "corrected", "chunk_sizes": "4,8", "teacher_chats": True,
             "autocast": True, "readout_weight": 0.5, "conv_width": 8, "readout_target": "tokens"}
    non_defaults(UptrainConfig, {k: (v, v) for k, v in table.items()})
    parser = parser_of(uptrain)
    assert uptrain.load_uptrain_config(parser.parse_args(["--out", "o", *argv_of(table)])) == UptrainConfig(**table)
    config = tmp_path / "uptrain.json"
    config.write_text(json.dumps({"window": 16, "autocast": True, "init_from": "from-file"}))
    got = uptrain.load_uptrain_config(parser.parse_args(["--out", "o", "--config", str(config), "--no-autocast",
                                                         "--init-from", "DIR"]))
    assert got == UptrainConfig(window=16, autocast=False, init_from="DIR")
    config.write_text(json.dumps({"windw": 16}))
    with pytest.raises(ValueError, match="windw"):
        uptrain.load_uptrain_config(parser.parse_args(["--out", "o", "--config", str(config)]))


def test_shipped_training_configs_load() -> None:
    from training import uptrain
    from training.train import load_config

    root = Path(__file__).resolve().parents[1] / "configs"
    for path in root.glob("uptrain-*.json"):
        args = parser_of(uptrain).parse_args(["--out", "o", "--config", str(path)])
        assert uptrain.load_uptrain_config(args) == UptrainConfig(**json.loads(path.read_text()))
    for name in ("tiny", "attamba-wt2", "transformer-wt2"):
        assert isinstance(load_config(root / f"{name}.json")[1], TrainConfig)
