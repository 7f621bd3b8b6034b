"""training/entry_readout.py: the forward that also returns each layer's K and V, and the read-out loss against a
naive loop over every (layer, entry, distance) pair."""
from __future__ import annotations

import torch

from models.kv_spec import chunk_start
from models.layers import apply_rope
from models.loading import load_model
from conftest import ENGINE
from engine import LLM, SamplingParams
from tests.test_engine import greedy_reference, prompts_of
from tests.test_uptrain import _teacher, _uptrain
from training.entry_readout import EntryReadout, forward_with_kv
from training.uptrain import (UptrainConfig, attention_transfer_loss, build_student, distillation_loss,
                             student_config)


def _student(tmp_path, tokenizer_file, chunk_size: int = 4):
    teacher = load_model(_teacher(tmp_path, tokenizer_file))
    uc = UptrainConfig(chunk_size=chunk_size, window=2, ssm_state=4, ssm_inner=8, ssm_heads=2)
    student = build_student(teacher, student_config(teacher.config, uc, "base"), seed=0)
    for p in student.parameters():  # SSM outputs away from zero, so the entries depend on their chunk
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.2)
    return teacher, student


def test_forward_with_kv_is_the_forward_and_its_kv(tmp_path, tokenizer_file) -> None:
    _, student = _student(tmp_path, tokenizer_file)
    ids = torch.randint(0, student.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(0))
    hidden, kv = forward_with_kv(student, ids)
    torch.testing.assert_close(student.logits(hidden), student(ids))
    assert len(kv) == student.config.n_layers
    pos = torch.arange(19)
    x = student.embed(ids)
    for blk, (k, v) in zip(student.blocks[:1], kv):
        _, k_roped, v_ref, _ = blk.project(x, pos, None, None)
        torch.testing.assert_close(k, apply_rope(k_roped, -pos, student.config.rope_theta).flatten(-2))
        torch.testing.assert_close(v, v_ref.flatten(-2))


def _naive_loss(readout: EntryReadout, student, entries, targets) -> torch.Tensor:
    """The same loss, one (entry, distance) pair at a time; targets: per layer, the parts to give back."""
    P = student.config.chunk_size
    total = torch.zeros(())
    for layer, ((ks, vs), parts, blk) in enumerate(zip(entries, targets, student.blocks)):
        T = ks.shape[1]
        pos = torch.arange(T)
        bnd, start = blk.attn.spec.is_boundary(pos), chunk_start(pos, P, blk.attn.spec.offset)
        sq = [[] for _ in parts]
        for b in range(T):
            if not bnd[b]:
                continue
            for j in range(1, P):
                if b - j < 0 or any(start[b - j + 1 : b + 1]):  # a chunk starts between b - j and b
                    continue
                pred = torch.cat([ks[:, b], vs[:, b]], -1) @ readout.maps[layer, j - 1]
                lo = 0
                for i, t in enumerate(parts):
                    want = t[:, b - j]
                    sq[i].append((pred[:, lo : lo + want.shape[-1]], want))
                    lo += want.shape[-1]
        for pairs in sq:  # each part scaled to unit mean square over every pair
            rms = torch.cat([w for _, w in pairs]).pow(2).mean().sqrt()
            total = total + torch.cat([(p - w / rms).pow(2) for p, w in pairs]).mean() / len(parts)
    return total / len(entries)


def test_the_readout_loss_equals_a_naive_loop_and_reaches_the_ssms(tmp_path, tokenizer_file) -> None:
    teacher, student = _student(tmp_path, tokenizer_file)
    ids = torch.randint(0, student.config.vocab_size, (2, 23), generator=torch.Generator().manual_seed(1))
    _, targets = forward_with_kv(teacher, ids)
    _, entries = forward_with_kv(student, ids)
    cfg = student.config
    readout = EntryReadout(cfg.n_layers, cfg.kv_dim, cfg.chunk_size)
    assert abs(readout.loss(student, entries, targets).item() - 1.0) < 1e-6  # zero maps read nothing
    torch.nn.init.normal_(readout.maps, std=0.1)
    loss = readout.loss(student, entries, targets)
    torch.testing.assert_close(loss, _naive_loss(readout, student, entries, targets))
    loss.backward()
    assert student.blocks[0].attn.ssm_k.in_proj.weight.grad.abs().sum() > 0
    assert student.blocks[-1].attn.ssm_v.out_proj.weight.grad.abs().sum() > 0


def test_the_token_target_reads_back_embeddings_in_every_layer(tmp_path, tokenizer_file) -> None:
    teacher, student = _student(tmp_path, tokenizer_file)
    ids = torch.randint(0, student.config.vocab_size, (2, 23), generator=torch.Generator().manual_seed(6))
    _, entries = forward_with_kv(student, ids)
    cfg = student.config
    readout = EntryReadout(cfg.n_layers, cfg.kv_dim, cfg.chunk_size, "tokens", cfg.d_model)
    assert readout.maps.shape[-1] == cfg.d_model and not readout.reads_teacher_kv
    targets = readout.wanted(teacher, ids, [])
    assert len(targets) == cfg.n_layers and all(torch.equal(t[0], teacher.embed(ids).float()) for t in targets)
    torch.nn.init.normal_(readout.maps, std=0.1)
    loss = readout.loss(student, entries, targets)
    torch.testing.assert_close(loss, _naive_loss(readout, student, entries, targets))
    loss.backward()
    assert student.blocks[-1].attn.ssm_v.in_proj.weight.grad.abs().sum() > 0
    # both stages take it (stage 2 then runs the teacher without keeping its K and V)
    batch = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(7))
    _, stats1 = attention_transfer_loss(teacher, student, batch[:, :-1], readout, 1.0)
    _, stats2 = distillation_loss(teacher, student, batch, 0.1, readout=readout, readout_weight=1.0)
    assert stats1["readout"] > 0 and stats2["readout"] > 0


def test_distillation_adds_the_weighted_readout(tmp_path, tokenizer_file) -> None:
    teacher, student = _student(tmp_path, tokenizer_file)
    batch = torch.randint(0, student.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(2))
    readout = EntryReadout(student.config.n_layers, student.config.kv_dim, 8)  # reaches further than P 4 needs
    torch.nn.init.normal_(readout.maps, std=0.1)
    plain, stats = distillation_loss(teacher, student, batch, 0.1)
    both, with_readout = distillation_loss(teacher, student, batch, 0.1, readout=readout, readout_weight=0.5)
    assert "readout" not in stats and with_readout["readout"] > 0
    torch.testing.assert_close(both, plain + 0.5 * torch.tensor(with_readout["readout"]))


def test_stage_one_adds_the_weighted_readout_layer_locally(tmp_path, tokenizer_file) -> None:
    teacher, student = _student(tmp_path, tokenizer_file)
    ids = torch.randint(0, student.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(4))
    readout = EntryReadout(student.config.n_layers, student.config.kv_dim, 4)
    torch.nn.init.normal_(readout.maps, std=0.1)
    plain, stats = attention_transfer_loss(teacher, student, ids)
    both, with_readout = attention_transfer_loss(teacher, student, ids, readout, 0.5)
    assert "readout" not in stats and with_readout["readout"] > 0
    torch.testing.assert_close(both, plain + 0.5 * torch.tensor(with_readout["readout"]))
    # the read-out's own value: the same loss on the layer-local K and V (teacher's hidden states in every layer)
    x, pos, entries, targets = teacher.embed(ids), torch.arange(17), [], []
    for t_blk, s_blk in zip(teacher.blocks, student.blocks):
        u = t_blk.attn_norm(x)
        q, k, v, _ = t_blk.attn.project(u, pos, None, None)
        _, ks, vs, _ = s_blk.attn.project(u, pos, None, None)
        entries.append((apply_rope(ks, -pos, student.config.rope_theta).flatten(-2), vs.flatten(-2)))
        targets.append((apply_rope(k, -pos, teacher.config.rope_theta).flatten(-2), v.flatten(-2)))
        x = t_blk.finish(x, t_blk.attn.attend(q, k, v, pos))  # the teacher's own layer
    torch.testing.assert_close(torch.tensor(with_readout["readout"]), _naive_loss(readout, student, entries, targets))
    both.backward()
    assert readout.maps.grad.abs().sum() > 0 and student.blocks[-1].attn.ssm_k.in_proj.weight.grad.abs().sum() > 0


def test_a_run_from_a_narrower_conv_keeps_its_taps_as_the_newest(tmp_path, tokenizer_file) -> None:
    """init_from with a wider conv_width: the newest taps are init_from's, the older ones a fresh student's."""
    teacher = _teacher(tmp_path, tokenizer_file)
    assert _uptrain(teacher, tmp_path / "narrow", "--conv-width", "3") == 0
    wide_flags = ("--conv-width", "6", "--stage1-steps", "0", "--stage2-steps", "0")
    assert _uptrain(teacher, tmp_path / "fresh", *wide_flags) == 0
    assert _uptrain(teacher, tmp_path / "wide", *wide_flags, "--init-from", str(tmp_path / "narrow")) == 0
    narrow, fresh, wide = (load_model(tmp_path / d).state_dict() for d in ("narrow", "fresh", "wide"))
    convs = [k for k in wide if k.endswith("conv_weight")]
    assert convs and all(wide[k].shape[1] == 6 and narrow[k].shape[1] == 3 for k in convs)
    for k in convs:
        torch.testing.assert_close(wide[k][:, 3:], narrow[k], atol=0, rtol=0)
        torch.testing.assert_close(wide[k][:, :3], fresh[k][:, :3], atol=0, rtol=0)
        assert wide[k][:, :3].abs().mean() > 0.1
    assert _uptrain(teacher, tmp_path / "wider", "--conv-width", "2", "--init-from", str(tmp_path / "narrow"),
                    "--stage1-steps", "0", "--stage2-steps", "0") != 0  # a narrower conv would drop taps


def test_uptrain_with_the_readout_resumes_exactly(tmp_path, tokenizer_file) -> None:
    teacher = _teacher(tmp_path, tokenizer_file)
    flags = ("--readout-weight", "1", "--stage1-steps", "1", "--conv-width", "3", "--readout-target", "tokens")
    assert _uptrain(teacher, tmp_path / "whole", *flags) == 0
    assert _uptrain(teacher, tmp_path / "parts", *flags, "--max-minutes", "1e-9") == 0
    assert _uptrain(teacher, tmp_path / "parts", *flags, "--resume", "auto") == 0
    from safetensors.torch import load_file

    whole, parts = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("whole", "parts"))
    assert whole.keys() == parts.keys()
    for k in whole:
        torch.testing.assert_close(whole[k], parts[k], atol=0, rtol=0)
    state = torch.load(tmp_path / "parts" / "train_state.pt", weights_only=False)
    assert state["readout"]["maps"].abs().sum() > 0  # the maps trained and are kept with the run
    # the student's conv width is the run's, and the engine serves it as the full forward decodes
    student = load_model(tmp_path / "whole")
    assert student.config.conv_width == 3
    prompts = prompts_of([5, 9], student.config.vocab_size)
    outs = LLM(str(tmp_path / "whole"), **ENGINE).generate(
        prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert [o.token_ids for o in outs] == [greedy_reference(student, p, 6) for p in prompts]


def test_the_layer_local_capacity_test_trains_one_layer(tmp_path, tokenizer_file) -> None:
    from training.entry_capacity import fresh_ssms, layer_entries, teacher_views, train_layer

    teacher, student = _student(tmp_path, tokenizer_file)
    for p in student.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(3)
    train = [(torch.randint(0, student.config.vocab_size, (24,), generator=g).tolist(), []) for _ in range(4)]
    fresh_ssms(student, 1, d_state=8, d_inner=16, conv_width=3, seed=0)
    ssm = student.blocks[1].attn.ssm_k
    assert (ssm.d_state, ssm.d_inner, ssm.conv_width) == (8, 16, 3)
    u, kt, vt = teacher_views(teacher, torch.tensor([train[0][0]]), 1)
    k, v = layer_entries(student, 1, u)
    assert k.shape == kt.shape and v.shape == vt.shape
    others = {n: p.clone() for n, p in student.named_parameters() if ".1.attn.ssm_" not in n}
    log = train_layer(student, teacher, 1, train, steps=40, batch=2, lr=1e-2, log_every=10)
    assert log[-1]["readout_loss"] < log[0]["readout_loss"]
    assert all(torch.equal(p, others[n]) for n, p in student.named_parameters() if n in others)  # one layer only
