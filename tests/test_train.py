"""Training, exact resume and perplexity evaluation on a tiny model and the shipped text sample."""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from models import ModelConfig, build_model, load_model
from training.evaluate import evaluate_ppl
from models.tokenizer import Tokenizer, train_tokenizer
from training.loop import RunDir, WarmupCosine, restore_rngs
from training.run_flags import RunFlags
from training.train import TrainConfig, lr_schedule
from entrypoints.cli import main

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "tests" / "data" / "wikitext_sample.txt"


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    Tokenizer(train_tokenizer(SAMPLE.read_text(encoding="utf-8"), vocab_size=512)).save(path)
    return path


@pytest.fixture
def tiny_config(tmp_path: Path, tokenizer_file: Path) -> Callable[..., Path]:
    """Write configs/tiny.json with the sample tokenizer and text, plus overrides; returns its path."""

    def write(**train_overrides) -> Path:
        raw = json.loads((ROOT / "configs" / "tiny.json").read_text())
        raw["train"].update(tokenizer=str(tokenizer_file), train_text=str(SAMPLE), valid_text=str(SAMPLE), **train_overrides)
        path = tmp_path / "tiny.json"
        path.write_text(json.dumps(raw))
        return path

    return write


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_training_reduces_loss(tiny_config, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["train", "--config", str(tiny_config(max_steps=16)), "--out", str(out)]) == 0
    log = _log(out)
    assert [r["step"] for r in log] == list(range(1, 17))
    first, last = log[0]["loss"], sum(r["loss"] for r in log[-4:]) / 4
    assert last < first - 0.3
    assert "val_loss" in log[-1] and math.isfinite(log[-1]["val_loss"])
    model = load_model(out)
    assert model.embed.weight.dtype == torch.float32
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    assert torch.isfinite(model(ids)).all()


def test_resume_gives_identical_losses(tiny_config, tmp_path: Path) -> None:
    cfg = str(tiny_config(max_steps=6))
    full, split = tmp_path / "full", tmp_path / "split"
    assert main(["train", "--config", cfg, "--out", str(full)]) == 0
    # --max-minutes 0 stops (and checkpoints) after one step; resume twice, then to the end
    assert main(["train", "--config", cfg, "--out", str(split), "--max-minutes", "0"]) == 0
    assert main(["train", "--config", cfg, "--out", str(split), "--max-minutes", "0", "--resume", "auto"]) == 0
    assert [r["step"] for r in _log(split)] == [1, 2]
    assert main(["train", "--config", cfg, "--out", str(split), "--resume", "auto"]) == 0
    strip = [{k: v for k, v in r.items() if k != "tok_s"} for r in _log(full)]
    assert strip == [{k: v for k, v in r.items() if k != "tok_s"} for r in _log(split)]
    assert (full / "model.safetensors").read_bytes() == (split / "model.safetensors").read_bytes()


def test_existing_run_needs_resume_flag(tiny_config, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = str(tiny_config(max_steps=1))
    assert main(["train", "--config", cfg, "--out", str(tmp_path / "r")]) == 0
    capsys.readouterr()
    assert main(["train", "--config", cfg, "--out", str(tmp_path / "r")]) == 1
    assert "--resume auto" in capsys.readouterr().err


def test_lr_schedule() -> None:
    schedule = lr_schedule(TrainConfig(tokenizer="t", lr=2.0, min_lr=0.2, warmup_steps=10, max_steps=110))
    assert schedule == WarmupCosine(total=110, warmup=10, floor=0.1)
    assert [schedule.factor(s) for s in (0, 9, 60, 110, 200)] == pytest.approx([0.1, 1.0, 0.55, 0.1, 0.1])
    opt = torch.optim.SGD([{"params": [torch.zeros(1)], "peak": 2.0}, {"params": [torch.zeros(1)], "peak": 0.5}])
    schedule.apply(opt, 60)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1.1, 0.275])


def test_run_dir_state_restores_every_rng_and_trims_the_log(tmp_path: Path) -> None:
    run_dir = RunDir(tmp_path / "run")
    assert not run_dir.resumes(None, "a run")
    run_dir.create()
    gen = torch.Generator().manual_seed(1)
    run_dir.save({"step": 2}, gen)
    assert run_dir.resumes("auto", "a run")
    with pytest.raises(ValueError, match="--resume auto"):
        run_dir.resumes(None, "a run")

    def draws() -> list[torch.Tensor]:
        cuda = [torch.rand(3, device="cuda").cpu()] if torch.cuda.is_available() else []
        return [torch.rand(3), torch.rand(3, generator=gen), *cuda]

    expected = draws()
    state = run_dir.load()
    assert state["step"] == 2 and (state["cuda_rng"] is None) == (not torch.cuda.is_available())
    restore_rngs(state, gen)
    assert all(torch.equal(a, b) for a, b in zip(expected, draws(), strict=True))
    del state["cuda_rng"]  # a state written before the CUDA RNG was saved still resumes
    restore_rngs(state, gen)
    records = [{"stage": 1, "step": 2}, {"stage": 1, "step": 3}, {"stage": 2, "step": 1}, {"stage": 2, "step": 2}]
    run_dir.log_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    run_dir.trim_log(stage=2, step=1)
    assert [json.loads(ln) for ln in run_dir.log_file.read_text().splitlines()] == records[:3]
    assert (RunFlags("o").deadline(100.0), RunFlags("o", max_minutes=0.5).deadline(100.0)) == (math.inf, 130.0)
    with pytest.raises(ValueError, match="--max-minutes"):
        RunFlags("o", max_minutes=-1)


@pytest.mark.parametrize("argv", [
    ["train", "--config", "no/such/config.json", "--out", "unused"],
    ["eval-ppl", "--model", "no/such/model"],
])
def test_cli_bad_input_is_one_line(argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = [a if a != "unused" else str(tmp_path / "out") for a in argv]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and "not found" in err


def test_malformed_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": {}, "train": {"tokenizer": "t", "max_steps": 1, "lr_typo": 1}}')
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "o")]) == 1
    assert "lr_typo" in capsys.readouterr().err


def test_evaluate_ppl_consistent(tokenizer_file: Path) -> None:
    tok = Tokenizer.from_file(tokenizer_file)
    cfg = ModelConfig.from_dict({**json.loads((ROOT / "configs" / "tiny.json").read_text())["model"],
                                 "vocab_size": tok.vocab_size})
    model = build_model(cfg, seed=0)
    text = SAMPLE.read_text(encoding="utf-8")
    res = evaluate_ppl(model, tok, text, seq_len=32, batch_size=4)
    assert res["windows"] == "non-overlapping" and res["seq_len"] == 32
    assert res["tokens"] == len(tok.encode(text)) - 1 and res["words"] == len(text.split())
    assert math.isfinite(res["token_ppl"]) and math.isfinite(res["word_ppl"])
    # one total NLL behind both perplexities
    assert res["tokens"] * math.log(res["token_ppl"]) == pytest.approx(res["nll"], rel=1e-9)
    assert res["words"] * math.log(res["word_ppl"]) == pytest.approx(res["nll"], rel=1e-9)
    # batching does not change the result
    assert evaluate_ppl(model, tok, text, seq_len=32, batch_size=1)["nll"] == pytest.approx(res["nll"], rel=1e-5)
    part = evaluate_ppl(model, tok, text, seq_len=32, batch_size=4, max_tokens=100)
    assert part["tokens"] == 100 and 0 < part["words"] < res["words"]


def test_eval_ppl_cli(tiny_config, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert main(["train", "--config", str(tiny_config(max_steps=2)), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval-ppl", "--model", str(out), "--text", str(SAMPLE), "--seq-len", "32", "--max-tokens", "200"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["tokens"] == 200 and res["windows"] == "non-overlapping"
    assert math.isfinite(res["token_ppl"]) and math.isfinite(res["word_ppl"])


@pytest.mark.parametrize("name", ["attamba-wt2", "transformer-wt2"])
def test_shipped_checkpoint_loads(name: str) -> None:
    path = ROOT / "checkpoints" / name
    if not (path / "model.safetensors").exists():
        pytest.skip(f"{path} not exported yet")
    model = load_model(path)
    assert (path / "tokenizer.json").is_file()
    ids = torch.randint(0, model.config.vocab_size, (1, 40))
    logits = model(ids)
    assert logits.shape == (1, 40, model.config.vocab_size) and torch.isfinite(logits).all()
