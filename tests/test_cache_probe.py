"""training/cache_probe.py: which cached entry each digit is read from, and the ridge probe itself."""
from __future__ import annotations

import torch

from models.layers import apply_rope
from models.loading import load_model
from training.cache_probe import cached_entries, ridge_accuracy, samples


def test_the_ridge_probe_reads_a_linear_code_and_not_noise() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (400,), generator=g)
    code = torch.randn(10, 24, generator=g)
    x = torch.nn.functional.one_hot(y, 10).float() @ code + 0.1 * torch.randn(400, 24, generator=g)
    fit, pick, test = (torch.arange(400) % 4 == r for r in (0, 1, 2))
    fit |= torch.arange(400) % 4 == 3
    assert ridge_accuracy(x, y, fit, pick, test) > 0.95
    shuffled = y[torch.randperm(400, generator=g)]
    assert ridge_accuracy(x, shuffled, fit, pick, test) < 0.35


def test_each_digit_is_read_from_the_cached_entry_of_its_chunk(tiny_ckpt) -> None:
    model = load_model(tiny_ckpt).eval()
    P = model.config.chunk_size
    ids = torch.randint(0, model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    digits = [(5, 3), (6, 7), (17, 0), (30, 9)]
    rows = samples(model, [(ids, digits)])
    entries = cached_entries(model, ids)
    pos = torch.arange(len(ids))
    assert sorted(rows) == list(range(model.config.n_layers))
    for layer, got in rows.items():
        bnd = model.blocks[layer].attn.spec.is_boundary(pos)
        assert [(s, d) for s, _, d, _ in got] == [(0, d) for _, d in digits]
        for (p, _), (_, dist, _, feat) in zip(digits, got):
            b = p + dist
            assert 0 <= dist < P and bool(bnd[b]) and not bnd[p:b].any()  # the first boundary at or after p
            k, v = entries[layer]
            torch.testing.assert_close(feat, torch.cat([k[b], v[b]]))
    x = torch.randn(1, 7, 2, 8)  # the RoPE undone: the inverse rotation
    torch.testing.assert_close(apply_rope(apply_rope(x, torch.arange(7), 1e4), -torch.arange(7), 1e4), x)
