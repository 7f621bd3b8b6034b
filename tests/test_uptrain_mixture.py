"""Uptraining's second stage: low-rank adapters merged at load, the text/chat/recall mixture with its
loss weights, the weighted distillation loss, and the long-context evaluation helpers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models import ModelConfig, build_model, load_model, save_checkpoint
from models.loading import CheckpointError
from models.tokenizer import Tokenizer
from server.chat import ChatTemplate
from tests.conftest import SAMPLE, make_checkpoint
from training.long_eval import chat_accuracy, greedy_batch, passkey_prompts, recall_row_prompts
from training.lora import LoRALinear, add_lora, load_lora_factors, lora_factors, parse_targets
from training.mixture import DRILL, Mixture, MixtureConfig
from training.uptrain import UptrainConfig, distillation_loss, is_ssm, is_trainable


def _tiny(kind: str = "transformer", **kw) -> torch.nn.Module:
    cfg = ModelConfig(**{"kind": kind, "vocab_size": 50, **kw}, d_model=32, n_layers=2, n_heads=4, chunk_size=4, window=2,
                      ssm_state=4, ssm_inner=8, ssm_heads=2)
    return build_model(cfg, seed=0)


def test_lora_starts_as_the_base_and_trains_only_its_factors() -> None:
    model = _tiny()
    ids = torch.randint(0, 50, (2, 9))
    before = model(ids)
    params = add_lora(model, parse_targets("wq,wo"), rank=4, alpha=8.0)
    assert len(params) == 2 * 2 * 2 and isinstance(model.blocks[0].attn.wq, LoRALinear)
    torch.testing.assert_close(model(ids), before)  # B starts at zero
    with pytest.raises(ValueError, match="already has an adapter"):
        add_lora(model, ("wq",), 4, 8.0)
    with pytest.raises(ValueError, match="lora targets"):
        parse_targets("wq,ffn")


def test_lora_factors_of_fewer_targets_load_and_the_rest_start_at_the_base() -> None:
    old = _tiny()
    add_lora(old, ("wq",), rank=4, alpha=8.0)
    for name, p in old.named_parameters():
        if name.endswith(".lora_b"):
            torch.nn.init.normal_(p, std=0.05)
    new = _tiny()
    add_lora(new, parse_targets("wq,w2"), rank=4, alpha=8.0)
    assert isinstance(new.blocks[0].ffn.w2, LoRALinear)
    load_lora_factors(new, lora_factors(old))
    ids = torch.randint(0, 50, (2, 9))
    torch.testing.assert_close(new(ids), old(ids))  # wq's factors carried over, w2's B still zero
    with pytest.raises(ValueError, match="do not match"):
        load_lora_factors(old, lora_factors(new))  # w2 has no adapter in `old`


def test_adapters_merge_into_the_weights_at_load(tmp_path, tokenizer_file) -> None:
    base = make_checkpoint(tmp_path, tokenizer_file, "transformer", n_kv_heads=2)
    cfg = ModelConfig.load(base).replace(kind="attamba", kv_skip="proj", ssm_state=4, ssm_inner=8, ssm_heads=2,
                                         base_model=str(base))
    student = build_model(cfg, seed=1)
    student.load_state_dict(load_model(base).state_dict(), strict=False)
    add_lora(student, ("wq", "wo", "wv", "w1", "w2"), rank=3, alpha=6.0)
    for name, p in student.named_parameters():
        if name.endswith(".lora_b"):
            torch.nn.init.normal_(p, std=0.05)
    ssm = {k for k in student.state_dict() if is_ssm(k)}
    save_checkpoint(student, tmp_path / "delta", tokenizer_file, only=ssm, extra=lora_factors(student))
    stored = load_file(str(tmp_path / "delta" / "model.safetensors"))
    assert {k for k in stored if not is_ssm(k)} == set(lora_factors(student)) and all(is_trainable(k) for k in stored)
    merged = load_model(tmp_path / "delta")
    ids = torch.randint(0, cfg.vocab_size, (2, 13))
    torch.testing.assert_close(merged(ids), student(ids), atol=1e-4, rtol=1e-4)
    assert not any(".lora_" in k for k in merged.state_dict())
    stored.pop(next(k for k in stored if k.endswith(".lora_b")))  # a factor without its pair
    from safetensors.torch import save_file
    save_file(stored, str(tmp_path / "delta" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="adapter"):
        load_model(tmp_path / "delta")


def _mixture(tokenizer_file: Path, **kw) -> tuple[Mixture, Tokenizer]:
    tok = Tokenizer.from_file(tokenizer_file)
    ids = torch.tensor(tok.encode(SAMPLE.read_text()))
    chat = ChatTemplate("", tok)
    cfg = MixtureConfig(**{"seq_len": 96, "chat_frac": 0.3, "recall_frac": 0.4, "recall_weight": 5.0, **kw})
    summaries = [("Alpha", "Alpha is the first letter."), ("Beta", "Beta comes second.")]
    mix = Mixture(cfg, tok, ids, summaries, lambda m: chat.render(m, add_generation_prompt=False),
                  torch.Generator().manual_seed(0))
    return mix, tok


def test_recall_rows_weigh_exactly_their_answers(tokenizer_file) -> None:
    mix, tok = _mixture(tokenizer_file, seq_len=192)
    styles, fillers = set(), set()
    for _ in range(16):
        ids, weights, answers = mix.recall()
        assert len(ids) == 193 and len(weights) == 192
        assert set(weights) <= {1.0, 5.0}
        assert answers == [w == 5.0 for w in weights]  # the weighted predictions are exactly the answers
        spans, j = [], 0  # runs of weighted predictions: each is one answer
        while j < len(weights):
            if weights[j] == 5.0:
                k = j
                while k < len(weights) and weights[k] == 5.0:
                    k += 1
                spans.append((j + 1, k + 1))  # weight j scores ids[j + 1]
                j = k
            else:
                j += 1
        if not spans:  # a draw with no room for the task falls back to plain text
            continue
        first_question = tok.decode(ids[: spans[0][0]]).rindex("\n")
        drill = [d for d in DRILL if d in tok.decode(ids[: spans[0][0]])[:first_question]]
        fillers.add("drill" if drill else "corpus")
        if drill:  # repeated: the same sentence occurs more than once
            assert max(tok.decode(ids).count(d) for d in drill) > 1
        for a, b in spans:
            value, before = tok.decode(ids[a:b]).strip(), tok.decode(ids[:a])
            assert value.isdigit()
            assert before.index(value) < first_question  # stated in the text before the questions
            styles.add("Answer:" if before.endswith("Answer:") else "stem")
            assert before.endswith(("Answer:", " is", " number"))
    assert styles == {"Answer:", "stem"}  # both ways of asking occur
    assert fillers == {"drill", "corpus"}


def test_mixture_batches_are_reproducible_and_mix_kinds(tokenizer_file) -> None:
    (a, tok), (b, _) = _mixture(tokenizer_file), _mixture(tokenizer_file)
    ids_a, w_a, ans_a = next(a.batches(6))
    ids_b, w_b, ans_b = next(b.batches(6))
    assert torch.equal(ids_a, ids_b) and torch.equal(w_a, w_b) and torch.equal(ans_a, ans_b)
    assert ids_a.shape == (6, 97) and w_a.shape == ans_a.shape == (6, 96) and ans_a.dtype == torch.bool
    chats = [tok.decode(mix_row.tolist()) for mix_row in next(a.batches(20))[0]]
    assert any("<|user|>" in c for c in chats) and any("<|user|>" not in c for c in chats)
    with pytest.raises(ValueError, match="sum to at most 1"):
        _mixture(tokenizer_file, chat_frac=0.7, recall_frac=0.4)


def test_weighted_distillation_loss() -> None:
    teacher, student = _tiny(), _tiny()
    with torch.no_grad():
        student.blocks[0].attn.wq.weight.add_(0.1)
    batch = torch.randint(0, 50, (2, 11))
    plain, st = distillation_loss(teacher, student, batch, 0.5)
    kl, ce = st["kl"], st["ce"]
    ones, _ = distillation_loss(teacher, student, batch, 0.5, torch.ones(2, 10))
    torch.testing.assert_close(plain, ones)
    assert kl > 0 and abs(kl + 0.5 * ce - float(plain.detach())) < 1e-4
    only_first = torch.zeros(2, 10)
    only_first[0, 0] = 1.0  # all weight on one token: its KL and CE alone
    _, st = distillation_loss(teacher, student, batch, 0.5, only_first)
    kl_one, ce_one = st["kl"], st["ce"]
    t = torch.log_softmax(teacher(batch[:1, :1]), -1)[0, 0].detach()
    s = torch.log_softmax(student(batch[:1, :1]), -1)[0, 0].detach()
    assert abs(kl_one - float((t.exp() * (t - s)).sum())) < 1e-4
    assert abs(ce_one - float(-s[batch[0, 1]])) < 1e-4


def test_greedy_batch_equals_one_prompt_at_a_time(tokenizer_file) -> None:
    tok = Tokenizer.from_file(tokenizer_file)
    model = _tiny("attamba", kv_skip="proj", n_kv_heads=2, vocab_size=tok.vocab_size).eval()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12], [13]]
    batched = greedy_batch(model, prompts, 6, batch_size=2)
    for p, out in zip(prompts, batched):
        ids = torch.tensor([p])
        ref = []
        for _ in range(6):  # argmax of the full forward, one token at a time
            ref.append(int(model(torch.cat([ids, torch.tensor([ref], dtype=torch.long)], 1))[0, -1].argmax()))
        assert out == ref


def test_passkey_prompts_state_the_key_once(tokenizer_file) -> None:
    tok = Tokenizer.from_file(tokenizer_file)
    cases = passkey_prompts(tok, 120, 5, seed=1)
    assert len({len(p) for p, _, _ in cases}) <= 2  # same filler length; keys may tokenize differently
    for prompt, key, back in cases:
        text = tok.decode(prompt)
        assert len(key) == 5 and text.count(key) == 2  # "The pass key is K. ... K is the pass key."
        assert text.endswith("The pass key is")
        assert tok.decode(prompt[-back:]).startswith(" The pass key is " + key)  # back: where the key sentence starts
    assert cases == passkey_prompts(tok, 120, 5, seed=1)


def test_recall_row_prompts_end_where_the_stated_value_is_asked_for(tokenizer_file) -> None:
    tok = Tokenizer.from_file(tokenizer_file)
    ids = torch.tensor(tok.encode(SAMPLE.read_text()))
    cases = recall_row_prompts(tok, ids, 12, 192, seed=3)
    assert len(cases) == 12 and cases == recall_row_prompts(tok, ids, 12, 192, seed=3)
    for prompt, value, back, drill in cases:
        text = tok.decode(prompt)
        assert value.isdigit() and text.endswith(("Answer:", " is", " number"))
        assert value in tok.decode(prompt[-back:]) and value not in tok.decode(prompt[-back + 1 :])  # latest statement
        assert drill == any(d in text for d in DRILL)
    assert {c[3] for c in cases} == {True, False}  # both fillers


def test_chat_accuracy_scores_replies_and_cuts_at_stop(tokenizer_file) -> None:
    model = _tiny("transformer", vocab_size=Tokenizer.from_file(tokenizer_file).vocab_size).eval()
    tok = Tokenizer.from_file(tokenizer_file)
    chat = ChatTemplate("", tok)
    first = greedy_batch(model, [tok.encode(chat.render([("user", "Where?")]))], 4)[0]
    reply = tok.decode(first[:4]).strip()
    items = [{"question": "Where?", "answers": [reply.upper()]}, {"question": "Where?", "answers": ["zzzz"]}]
    result = chat_accuracy(model, tok, chat.render, items, max_tokens=4)
    assert (result["correct"], result["questions"]) == (1, 2) and result["replies"][0]["correct"]
    cut = chat_accuracy(model, tok, chat.render, items[:1], max_tokens=4, stop_ids=(first[0],))
    assert cut["replies"][0]["reply"] == ""


def test_chat_set_is_well_formed() -> None:
    items = json.loads((Path(__file__).parents[1] / "training" / "chat_eval.json").read_text())
    assert len(items) >= 30 and all(it["question"].endswith("?") and it["answers"] for it in items)


def test_uptrain_with_adapters_and_mixture_resumes_exactly(tmp_path, tokenizer_file, monkeypatch) -> None:
    from entrypoints.cli import main

    monkeypatch.setattr("training.uptrain.summaries", lambda: [("Alpha", "Alpha is the first letter of it.")])
    monkeypatch.setattr("training.uptrain.teacher_chats", lambda teacher: [("What is chess?", "A board game.")])
    teacher = make_checkpoint(tmp_path, tokenizer_file, "transformer", n_kv_heads=2, tie_embeddings=True)

    def uptrain(out: str, *extra: str) -> int:
        return main(["uptrain", "--teacher", str(teacher), "--out", str(tmp_path / out), "--chunk-size", "4",
                     "--window", "2", "--ssm-state", "4", "--ssm-inner", "8", "--ssm-heads", "2", "--seq-len", "40",
                     "--batch-size", "2", "--stage1-steps", "1", "--stage2-steps", "3", "--warmup-steps", "1",
                     "--ckpt-interval", "1", "--train-text", str(SAMPLE), "--lora-rank", "2", "--lora-targets",
                     "wq,wo", "--chat-frac", "0.3", "--recall-frac", "0.4", "--chunk-sizes", "2,4", "--teacher-chats",
                     *extra])

    assert uptrain("whole") == 0
    assert uptrain("parts", "--stage2-steps", "1") == 0  # stops inside stage 2 (adapters already added) ...
    assert uptrain("parts", "--resume", "auto") == 0  # ... and continues it
    whole, parts = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("whole", "parts"))
    assert whole.keys() == parts.keys() and any(k.endswith(".lora_b") for k in whole)
    for k in whole:
        torch.testing.assert_close(whole[k], parts[k], atol=0, rtol=0)
    assert any(float(v.abs().max()) > 0 for k, v in whole.items() if k.endswith(".lora_b"))  # the adapters trained
    log = [json.loads(ln) for ln in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in log] == [(1, 1), (2, 1), (2, 2), (2, 3)]
    assert all(r["chunk_size"] in (2, 4) for r in log[1:])  # a chunk size drawn for every stage-2 step
    assert load_model(tmp_path / "whole").config.chunk_size == 4  # the delta with its adapters loads as a plain
    # attamba model, at its own chunk size
    # a resumed run may change its data mixture, not its model
    assert uptrain("parts", "--stage2-steps", "4", "--recall-frac", "0.5", "--recall-target", "corrected", "--resume",
                   "auto") == 0
    assert uptrain("parts", "--stage2-steps", "5", "--window", "3", "--resume", "auto") != 0
    # a run started from it (init_from, no stage 1) starts with its SSMs and its adapters
    assert uptrain("next", "--init-from", str(tmp_path / "whole"), "--stage1-steps", "0", "--stage2-steps", "0") == 0
    nxt = load_file(str(tmp_path / "next" / "model.safetensors"))
    assert nxt.keys() == whole.keys()
    for k in whole:
        torch.testing.assert_close(nxt[k], whole[k], atol=1e-2 if k.endswith(".lora_b") else 0, rtol=1e-2)


def test_one_set_of_weights_runs_at_another_chunk_size() -> None:
    model, ids = _tiny("attamba"), torch.randint(0, 50, (2, 13))  # P 4
    at4 = model(ids)
    other = build_model(model.config.replace(chunk_size=2), seed=1)
    other.load_state_dict(model.state_dict())
    model.set_chunk_size(2)
    assert model.config.chunk_size == 2 and not torch.allclose(model(ids), at4)
    torch.testing.assert_close(model(ids), other(ids))  # the same as a model built at P 2
    model.set_chunk_size(4)
    torch.testing.assert_close(model(ids), at4)
    with pytest.raises(ValueError, match="chunk_sizes"):
        UptrainConfig(chunk_size=8, chunk_sizes="4,16")


def test_corrected_target_replaces_a_wrong_teacher_only() -> None:
    teacher, student = _tiny(), _tiny()
    with torch.no_grad():
        student.blocks[0].attn.wq.weight.add_(0.1)
    batch = torch.randint(0, 50, (1, 6))
    with torch.no_grad():
        t_arg = teacher(batch[:, :-1]).argmax(-1)[0]
    batch[0, 2], batch[0, 3] = int(t_arg[1]), (int(t_arg[2]) + 1) % 50  # the teacher right at 1, wrong at 2
    with torch.no_grad():
        s = torch.log_softmax(student(batch[:, :-1]), -1)[0]
    for pos, teacher_right in ((1, True), (2, False)):
        only = torch.zeros(1, 5)
        only[0, pos] = 1.0
        truth = only.bool()
        _, plain = distillation_loss(teacher, student, batch, 0.0, only, truth)
        _, fixed = distillation_loss(teacher, student, batch, 0.0, only, truth, corrected=True)
        kl_plain, ce, kl_fixed = plain["kl"], plain["ce"], fixed["kl"]
        assert fixed["teacher_recall_acc"] == float(teacher_right)
        assert fixed["recall_acc"] == float(int(s[pos].argmax()) == int(batch[0, pos + 1]))
        if teacher_right:  # the teacher's distribution stays the target
            assert kl_fixed == pytest.approx(kl_plain)
        else:  # the stated token is the target: the term is its cross-entropy
            assert kl_fixed == pytest.approx(ce) == pytest.approx(float(-s[pos, batch[0, pos + 1]]), abs=1e-4)
            assert kl_fixed != pytest.approx(kl_plain)
