"""Tests for SamplingParams, Sampler and the stop-condition helpers."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import InvalidRequest
from engine.sampler import Sampler, make_generator
from engine.sampling_params import SamplingParams
from engine.stop import check_stop, stop_holdback

VOCAB = 32
sampler = Sampler()


def _logits(rows: int, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def _sample_many(logits_row: torch.Tensor, params: SamplingParams, samples: int, seed: int) -> torch.Tensor:
    """Draw ``samples`` tokens for one logits row, all from one seeded generator."""
    generator = make_generator(seed)
    batch = logits_row.expand(samples, -1)
    return sampler(batch, [params] * samples, [generator] * samples).token_ids


# ---------------------------------------------------------------- SamplingParams


def test_params_defaults_and_stop_normalisation() -> None:
    p = SamplingParams()
    assert p.stop == [] and p.stop_token_ids == [] and not p.greedy
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=1e-6).greedy


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n": 0}, "n"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.1}, "min_p"),
        ({"seed": "7"}, "seed"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"ignore_eos": 1}, "ignore_eos"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": 21}, "logprobs"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"logit_bias": {5: 101}}, "logit_bias"),
        ({"logit_bias": {-1: 1}}, "logit_bias"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"include_stop_str_in_output": "yes"}, "include_stop_str_in_output"),
    ],
)
def test_invalid_params_raise(kwargs: dict, field: str) -> None:
    with pytest.raises(InvalidRequest, match=field) as refused:
        SamplingParams(**kwargs)
    assert refused.value.param == field and isinstance(refused.value, ValueError)


def test_valid_edge_params() -> None:
    SamplingParams(top_k=0, top_p=1.0, min_p=1.0, max_tokens=None, logprobs=20, seed=-3)


# ---------------------------------------------------------------- greedy equivalents


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1e-6),
        SamplingParams(top_k=1),
        SamplingParams(top_p=1e-6),
        SamplingParams(min_p=1.0),
        SamplingParams(temperature=2.0, top_k=1, top_p=0.5),
    ],
    ids=["temp0", "temp_tiny", "top_k1", "top_p_tiny", "min_p1", "combined"],
)
def test_greedy_equivalents(params: SamplingParams) -> None:
    logits = _logits(6)
    generators = [make_generator(i) for i in range(3)] + [None] * 3
    out = sampler(logits, [params] * 6, generators)
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))


def test_greedy_ties_take_lowest_index() -> None:
    logits = torch.tensor([[0.0, 5.0, 5.0, 1.0]])
    out = sampler(logits, [SamplingParams(temperature=0)], [None])
    assert out.token_ids.tolist() == [1]


# ---------------------------------------------------------------- reproducibility


def _run_steps(
    target_row: int, batch_params: list[SamplingParams], batch_gens: list[torch.Generator | None]
) -> list[int]:
    """Sample 5 steps; the target row sees the same logits each time; returns its tokens."""
    tokens = []
    for step in range(5):
        logits = _logits(len(batch_params), seed=100 + step)
        logits[target_row] = _logits(1, seed=step)[0]
        tokens.append(int(sampler(logits, batch_params, batch_gens).token_ids[target_row]))
    return tokens


def test_seeded_row_independent_of_batch() -> None:
    target = SamplingParams(temperature=1.5, seed=1234)
    alone = _run_steps(0, [target], [make_generator(target.seed)])
    again = _run_steps(0, [target], [make_generator(target.seed)])
    assert alone == again

    others = [
        SamplingParams(temperature=0.0),
        SamplingParams(top_k=3, seed=1),
        SamplingParams(top_p=0.5, min_p=0.1),
        SamplingParams(temperature=0.7, seed=2),
    ]
    for position in (0, 2, 4):
        batch = others[:position] + [target] + others[position:]
        gens = [make_generator(p.seed) for p in batch]
        assert _run_steps(position, batch, gens) == alone

    assert _run_steps(0, [target], [make_generator(99)]) != alone


# ---------------------------------------------------------------- support restrictions


def test_top_k_restricts_support() -> None:
    logits = _logits(1, seed=3)[0]
    tokens = _sample_many(logits, SamplingParams(temperature=5.0, top_k=4), 400, seed=0)
    allowed = set(logits.topk(4).indices.tolist())
    assert set(tokens.tolist()) == allowed


def test_top_p_and_min_p_support() -> None:
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    top_p = _sample_many(logits, SamplingParams(top_p=0.7), 300, seed=1)
    assert set(top_p.tolist()) == {0, 1}
    min_p = _sample_many(logits, SamplingParams(min_p=0.5), 300, seed=2)
    assert set(min_p.tolist()) == {0, 1}


# ---------------------------------------------------------------- distribution


CHI2_DF3_P001 = 16.27


@pytest.mark.parametrize("seeded", [True, False], ids=["own_generator", "global_rng"])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_distribution_matches_softmax(seeded: bool, temperature: float) -> None:
    logits = torch.tensor([1.0, 0.5, 0.0, -1.0])
    params = SamplingParams(temperature=temperature)
    samples = 4000
    if seeded:
        tokens = _sample_many(logits, params, samples, seed=5)
    else:
        with torch.random.fork_rng():
            torch.manual_seed(5)
            tokens = sampler(logits.expand(samples, -1), [params] * samples, [None] * samples).token_ids
    observed = torch.bincount(tokens, minlength=4).double()
    expected = (logits / temperature).softmax(-1).double() * samples
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_DF3_P001


# ---------------------------------------------------------------- logprobs


def test_logprobs_use_unmodified_logits() -> None:
    logits = _logits(4, seed=7)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.5, top_k=5, seed=3),
        SamplingParams(temperature=2.0, top_p=0.9),
        SamplingParams(min_p=0.2, seed=4),
    ]
    out = sampler(logits, params, [make_generator(p.seed) for p in params])
    expected = logits.log_softmax(-1).gather(-1, out.token_ids[:, None]).squeeze(-1)
    assert out.token_ids.dtype == torch.int64 and out.logprobs.dtype == torch.float32
    torch.testing.assert_close(out.logprobs, expected)


def test_top_logprobs() -> None:
    logits = _logits(3, seed=8)
    params = [SamplingParams(logprobs=3), SamplingParams(), SamplingParams(logprobs=0)]
    out = sampler(logits, params, [None] * 3)
    assert out.top_logprobs[1] is None
    assert out.top_logprobs[2] == []
    reference = logits[0].log_softmax(-1)
    top = out.top_logprobs[0]
    assert [t for t, _ in top] == reference.topk(3).indices.tolist()
    for token, logprob in top:
        assert isinstance(token, int) and logprob == pytest.approx(float(reference[token]), abs=1e-6)


def test_no_top_logprobs_requested() -> None:
    out = sampler(_logits(2), [SamplingParams()] * 2, [None, None])
    assert out.top_logprobs == [None, None]


def test_mismatched_lengths_raise() -> None:
    with pytest.raises(ValueError):
        sampler(_logits(2), [SamplingParams()], [None, None])


def test_make_generator() -> None:
    assert make_generator(None) is None
    a, b = make_generator(42), make_generator(42)
    assert torch.equal(torch.rand(3, generator=a), torch.rand(3, generator=b))
    assert make_generator(-1) is not None


# ---------------------------------------------------------------- check_stop

EOS = 2


def test_eos_and_ignore_eos() -> None:
    assert check_stop("hi", 2, EOS, 1, SamplingParams(), EOS) == ("stop", 2)
    assert check_stop("hi", 2, EOS, 1, SamplingParams(ignore_eos=True), EOS) == (None, None)
    assert check_stop("hi", 2, EOS, 1, SamplingParams(), None) == (None, None)


def test_stop_token_ids_cut_their_text_unless_included() -> None:
    params = SamplingParams(stop_token_ids=[7, 9], ignore_eos=True)
    assert check_stop("abc", 2, 9, 3, params, EOS) == ("stop", 2)
    assert check_stop("abc", 2, 8, 3, params, EOS) == (None, None)
    included = SamplingParams(stop_token_ids=[9], include_stop_str_in_output=True)
    assert check_stop("abc", 2, 9, 3, included, EOS) == ("stop", None)


def test_include_stop_str_in_output_cuts_after_the_stop_string() -> None:
    params = SamplingParams(stop=["END", "ENDING"], include_stop_str_in_output=True)
    assert check_stop("hello ENDx", 8, 12, 4, params, EOS) == ("stop", 9)


def test_min_tokens_defers_every_stop() -> None:
    params = SamplingParams(stop=["a"], stop_token_ids=[9], min_tokens=3, max_tokens=5)
    for token in (EOS, 9, 5):
        assert check_stop("xa", 1, token, 2, params, EOS) == (None, None)
    assert check_stop("xa", 1, 9, 3, params, EOS) == ("stop", 1)
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=6, max_tokens=5)


def test_stop_string_spanning_tokens() -> None:
    params = SamplingParams(stop=["END"])
    assert check_stop("hello E", 6, 10, 2, params, EOS) == (None, None)
    assert check_stop("hello EN", 7, 11, 3, params, EOS) == (None, None)
    assert check_stop("hello ENDx", 8, 12, 4, params, EOS) == ("stop", 6)


def test_stop_string_must_overlap_new_text() -> None:
    params = SamplingParams(stop=["ab"])
    assert check_stop("ab cd", 3, 5, 2, params, EOS) == (None, None)
    assert check_stop("xab", 2, 5, 2, params, EOS) == ("stop", 1)
    assert check_stop("ab", 2, 5, 2, params, EOS) == (None, None)


def test_earliest_stop_string_wins() -> None:
    params = SamplingParams(stop=["cd", "bcde"])
    assert check_stop("abcdef", 3, 5, 1, params, EOS) == ("stop", 1)


def test_stop_is_not_length() -> None:
    """check_stop never decides "length": that rule is the output processor's alone."""
    assert check_stop("abc", 2, 5, 3, SamplingParams(max_tokens=3), EOS) == (None, None)
    assert check_stop("STOP", 0, 5, 3, SamplingParams(max_tokens=3, stop="STOP"), EOS) == ("stop", 0)


@settings(max_examples=60, deadline=None)
@given(
    chunks=st.lists(st.text(alphabet="ab", max_size=3), min_size=1, max_size=8),
    stops=st.lists(st.text(alphabet="ab", min_size=1, max_size=3), min_size=1, max_size=3),
)
def test_incremental_stop_matches_brute_force(chunks: list[str], stops: list[str]) -> None:
    params = SamplingParams(stop=stops, max_tokens=None)
    text = ""
    for step, chunk in enumerate(chunks, start=1):
        start, text = len(text), text + chunk
        reason, cut = check_stop(text, start, 5, step, params, EOS)
        found = [i for s in stops if (i := text.find(s)) != -1]
        if found:
            assert (reason, cut) == ("stop", min(found))
            return
        assert (reason, cut) == (None, None)


# ---------------------------------------------------------------- stop_holdback


@pytest.mark.parametrize(
    ("text", "stop", "expected"),
    [
        ("hello", None, 0),
        ("hello E", ["END"], 1),
        ("hello EN", ["END"], 2),
        ("hello END", ["END"], 0),
        ("xab", ["abc", "bz"], 2),
        ("aa", ["aaa"], 2),
        ("", ["abc"], 0),
        ("zzz", ["abc"], 0),
    ],
)
def test_stop_holdback(text: str, stop: list[str] | None, expected: int) -> None:
    assert stop_holdback(text, SamplingParams(stop=stop)) == expected


# ---------------------------------------------------------------- logit adjustments


@dataclass
class Seq:
    prompt_ids: list[int]
    output_ids: list[int]
    guide: object = None


def test_logit_bias_forces_and_bans_tokens() -> None:
    logits = _logits(2)
    forced = SamplingParams(temperature=1.0, logit_bias={7: 100.0}, seed=0)
    banned_top = int(logits[1].argmax())
    banned = SamplingParams(temperature=0.0, logit_bias={banned_top: -100.0})
    out = sampler(logits, [forced, banned], [make_generator(0), None])
    assert int(out.token_ids[0]) == 7
    assert int(out.token_ids[1]) != banned_top
    assert torch.allclose(out.logprobs, torch.log_softmax(logits, -1).gather(-1, out.token_ids[:, None])[:, 0])


def test_penalties_follow_vllm() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    seq = Seq(prompt_ids=[0], output_ids=[1, 2, 2])
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    adjusted = Sampler()._adjust(logits.clone(), [params], [seq])
    # token 0: prompt only (repetition); 1: once (repetition, frequency, presence); 2: twice; 3: unseen
    assert adjusted.tolist() == [[1.0, -4.0 - 0.5 - 0.25, 0.5 - 1.0 - 0.25, 0.5]]


def test_penalties_change_repetition_counts() -> None:
    """Sampling a fixed distribution for 40 steps: a frequency penalty spreads the tokens out."""
    def distinct(params: SamplingParams) -> int:
        seq, generator = Seq([0], []), make_generator(3)
        for _ in range(40):
            out = sampler(_logits(1, seed=5), [params], [generator], [seq])
            seq.output_ids.append(int(out.token_ids[0]))
        return max(seq.output_ids.count(t) for t in set(seq.output_ids))

    assert distinct(SamplingParams(frequency_penalty=2.0, seed=3)) < distinct(SamplingParams(seed=3))


def test_min_tokens_bans_eos_and_stop_tokens() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, EOS], logits[0, 9] = 10.0, 9.0
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[9])
    eos_sampler = Sampler(eos_token_id=EOS)
    assert int(eos_sampler(logits, [params], [None], [Seq([1], [4])]).token_ids[0]) not in (EOS, 9)
    assert int(eos_sampler(logits, [params], [None], [Seq([1], [4, 4])]).token_ids[0]) == EOS


def test_adjustments_need_the_sequences() -> None:
    with pytest.raises(ValueError, match="sequences"):
        sampler(_logits(1), [SamplingParams(presence_penalty=1.0)], [None])
