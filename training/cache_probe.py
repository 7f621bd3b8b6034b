"""What the compressed cache keeps: linear probes on the boundary entries an Attamba layer caches (issue 19).

Beyond the window, a layer keeps one K and one V per chunk: the entry at the chunk's last token, whose SSM part
summarises the chunk's P tokens (the SSMs restart at every chunk). Five-digit numbers are placed in WikiText-2
test text; each digit token is a sample whose features are the cached entry (K with its RoPE undone, and V) of
the chunk that holds it, in one layer, labelled with the digit and its distance to that entry (0 .. P-1). A
ridge probe per layer and distance (one-hot targets; fitted on half the sequences, its penalty chosen on a
quarter, scored on the rest) says how well a linear read-out finds the digit in the entry: 0.1 is chance, and
distance 0 is the entry's own token, there through the skip (Wk u, Wv u). The same for the student with its
SSMs at zero (the teacher restricted to the pattern): what an entry carries of its chunk through the residual
stream alone.

    python -m training.cache_probe --student checkpoints/attamba-smollm2-p8-l64 --out docs/cache-probe.json \
        --plot docs/cache-probe.png
"""
from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from models.lm import LM
from models.loading import load_model
from models.registry import resolve_model
from models.tokenizer import Tokenizer

from .data import encode_corpus, read_split
from .entry_readout import forward_with_kv
from .uptrain import build_student

PENALTIES = (1e-2, 1e-1, 1.0, 10.0, 100.0)  # ridge penalties tried, times the mean of diag(X^T X)
Sequences = list[tuple[list[int], list[tuple[int, int]]]]  # (ids, [(position, digit)]) per sequence


def probe_sequences(tokenizer: Tokenizer, text_ids: Tensor, n: int, length: int, numbers: int,
                    seed: int) -> Sequences:
    """n sequences of `length` tokens: WikiText-2 text with `numbers` five-digit numbers at random places;
    each with its (position, digit) for every digit token."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        start = rng.randrange(len(text_ids) - length)
        filler = text_ids[start : start + length].tolist()
        cuts = sorted(rng.sample(range(16, length - 64), numbers))  # not at the very start, room at the end
        ids: list[int] = []
        digits: list[tuple[int, int]] = []
        prev = 0
        for cut in cuts:
            ids += filler[prev:cut]
            prev = cut
            for tok in tokenizer.encode(f" {rng.randint(10000, 99999)}"):
                text = tokenizer.decode([tok]).strip()
                if len(text) == 1 and text.isdigit():
                    digits.append((len(ids), int(text)))
                ids.append(tok)
        ids = (ids + filler[prev:])[:length]
        out.append((ids, [(p, d) for p, d in digits if p < length]))
    return out


@torch.no_grad()
def cached_entries(model: LM, ids: list[int]) -> list[tuple[Tensor, Tensor]]:
    """Per layer: the K (RoPE undone) and V [T, kv_dim] of every position (the boundary ones are what is cached),
    from the model's own forward (its Attamba attention)."""
    return [(k[0], v[0]) for k, v in forward_with_kv(model, torch.tensor([ids]))[1]]


EntriesOf = Callable[[list[int]], dict[int, tuple[Tensor, Tensor]]]  # ids -> {layer: (K, V) [T, kv_dim]}


def samples(model: LM, seqs: Sequences, entries_of: EntriesOf | None = None) -> dict[int, list[tuple[int, int, int, Tensor]]]:
    """Per layer: (sequence, distance, digit, the entry's features) for every digit token. entries_of: where the
    entries come from (default: every layer's, from the model's own forward)."""
    entries_of = entries_of or (lambda ids: dict(enumerate(cached_entries(model, ids))))
    out: dict[int, list] = {}
    for s, (ids, digits) in enumerate(seqs):
        entries = entries_of(ids)
        pos = torch.arange(len(ids))
        for layer, (k, v) in entries.items():
            bnd = model.blocks[layer].attn.spec.is_boundary(pos).nonzero().flatten()
            for p, d in digits:
                b = int(bnd[torch.searchsorted(bnd, p)]) if p <= int(bnd[-1]) else None  # the entry of p's chunk
                if b is not None and b - p < model.config.chunk_size:
                    out.setdefault(layer, []).append((s, b - p, d, torch.cat([k[b], v[b]]).float()))
    return out


def ridge_accuracy(x: Tensor, y: Tensor, fit: Tensor, pick: Tensor, test: Tensor) -> float:
    """Held-out accuracy of a ridge probe x -> one-hot(y) (10 classes), its penalty chosen on `pick`."""
    mean, std = x[fit].mean(0), x[fit].std(0).clamp(min=1e-6)
    z = torch.cat([(x - mean) / std, torch.ones(len(x), 1)], 1).double()
    target = torch.nn.functional.one_hot(y, 10).double()
    gram, rhs = z[fit].T @ z[fit], z[fit].T @ target[fit]
    scale = float(gram.diagonal().mean())
    eye = torch.eye(len(gram), dtype=gram.dtype)
    best = max(PENALTIES, key=lambda lam: _acc(z, y, torch.linalg.solve(gram + lam * scale * eye, rhs), pick))
    return _acc(z, y, torch.linalg.solve(gram + best * scale * eye, rhs), test)


def _acc(z: Tensor, y: Tensor, w: Tensor, rows: Tensor) -> float:
    return float(((z[rows] @ w).argmax(1) == y[rows]).double().mean())


def probe(model: LM, seqs: Sequences, entries_of: EntriesOf | None = None) -> dict:
    """Per layer, the held-out probe accuracy at each distance (sequences split 1/2 fit, 1/4 pick, 1/4 test)."""
    n = len(seqs)
    per_layer = {}
    for layer, rows in sorted(samples(model, seqs, entries_of).items()):
        seq = torch.tensor([r[0] for r in rows])
        dist, y = torch.tensor([r[1] for r in rows]), torch.tensor([r[2] for r in rows])
        x = torch.stack([r[3] for r in rows])
        acc = {}
        for j in range(model.config.chunk_size):
            at = dist == j
            fit, pick, test = at & (seq < n // 2), at & (seq >= n // 2) & (seq < 3 * n // 4), at & (seq >= 3 * n // 4)
            if min(int(fit.sum()), int(pick.sum()), int(test.sum())) >= 10:
                acc[j] = round(ridge_accuracy(x, y, fit, pick, test), 3)
        per_layer[layer] = acc
    return per_layer


def plot(result: dict, path: Path) -> None:
    """Probe accuracy by distance to the entry (mean over layers) and by layer (mean over distances >= 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_dist, by_layer) = plt.subplots(1, 2, figsize=(11, 4))
    for name, style in (("student", "o-"), ("zero-SSM", "x--")):
        if name not in result["probe"]:
            continue
        layers = result["probe"][name]["per_layer"]
        dists = sorted({int(j) for acc in layers.values() for j in acc})
        by_dist.plot(dists, [sum(acc.get(j, acc.get(str(j), 0)) for acc in layers.values()) / len(layers)
                             for j in dists], style, label=name)
        far = [[a for j, a in acc.items() if int(j) > 0] for acc in layers.values()]
        by_layer.plot([int(k) for k in layers], [sum(f) / max(1, len(f)) for f in far], style, label=name)
    for ax, xlabel in ((by_dist, "distance of the digit to its chunk's cached entry (tokens)"), (by_layer, "layer")):
        ax.axhline(result["chance"], color="gray", lw=0.8, ls=":")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out probe accuracy (chance 0.1)")
        ax.legend()
    by_dist.set_title("by distance (mean over layers)")
    by_layer.set_title("by layer (mean over distances >= 1)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", type=Path, required=True, help="an Attamba checkpoint (a delta over its teacher)")
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--sequences", type=int, default=48)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--numbers", type=int, default=24, help="five-digit numbers per sequence")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-control", action="store_true",
                        help="probe the student only (the zero-SSM control depends only on the teacher and P)")
    parser.add_argument("--out", type=Path, help="write the JSON here too")
    parser.add_argument("--plot", type=Path, help="and a plot here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    student = load_model(resolve_model(str(args.student))).eval()
    teacher = load_model(resolve_model(args.teacher)).eval()
    tokenizer = Tokenizer.from_file(resolve_model(args.teacher) / "tokenizer.json")
    seqs = probe_sequences(tokenizer, encode_corpus(tokenizer, read_split("test")), args.sequences, args.length,
                           args.numbers, args.seed)
    result = {"student": str(args.student), "chunk_size": student.config.chunk_size, "sequences": args.sequences,
              "numbers_per_sequence": args.numbers, "chance": 0.1, "probe": {}}
    models = [("student", student)]
    if not args.no_control:
        models.append(("zero-SSM", build_student(teacher, student.config, 0).eval()))
    for name, model in models:
        layers = probe(model, seqs)
        far = [a for acc in layers.values() for j, a in acc.items() if j > 0]
        result["probe"][name] = {"per_layer": layers, "mean_beyond_own_token": round(sum(far) / max(1, len(far)), 3)}
        print(name, result["probe"][name]["mean_beyond_own_token"], flush=True)
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    if args.plot:
        plot(result, args.plot)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
