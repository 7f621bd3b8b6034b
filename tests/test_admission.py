"""The admission gate (engine/admission.py): each rule, its typed error (field and code), the live queue
bound, and the same errors from the offline API."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from engine import LLM, EngineArgs, LLMEngine, SamplingParams
from engine.admission import AdmissionGate
from engine.errors import ContextLengthExceeded, EngineDead, InvalidPrompt, InvalidRequest, QueueFull
from models.config import ModelConfig
from models.tokenizer import Tokenizer
from server.errors import engine_error
from conftest import ENGINE


def gate_for(ckpt: Path, max_waiting: int = 6, max_model_len: int | None = 40, fits=lambda n: True,
             **config) -> AdmissionGate:
    cfg = replace(ModelConfig.load(ckpt), **config)
    return AdmissionGate(Tokenizer.from_file(ckpt / "tokenizer.json"), cfg, max_waiting, max_model_len, fits)


def refusal(kind: type[Exception], call, *args, **kw) -> Exception:
    with pytest.raises(kind) as refused:
        call(*args, **kw)
    return refused.value


def test_the_error_types_say_what_the_server_answers() -> None:
    assert issubclass(ContextLengthExceeded, InvalidRequest) and issubclass(InvalidPrompt, InvalidRequest)
    assert issubclass(InvalidRequest, ValueError) and not issubclass(QueueFull, ValueError)
    answers = {
        InvalidRequest("bad", "top_p"): (400, "invalid_value", "top_p"),
        InvalidPrompt("empty", "messages"): (400, "invalid_prompt", "messages"),
        ContextLengthExceeded("long", "prompt"): (400, "context_length_exceeded", "prompt"),
        QueueFull("full"): (429, "rate_limit_exceeded", None),
        EngineDead("gone"): (503, "service_unavailable", None),
    }
    for exc, (status, code, param) in answers.items():
        error = engine_error(exc)
        assert (error.status, error.code, error.param) == (status, code, param)
        assert str(exc) in error.message
    assert engine_error(QueueFull("full")).headers["Retry-After"].isdigit()


def test_prompt_rule(tiny_ckpt: Path) -> None:
    gate = gate_for(tiny_ckpt)
    assert gate.encode("The tower") == gate.tokenizer.encode("The tower")
    for bad in ("", [], [gate.vocab_size], [-1], [True], [1.0], "a\ud800b"):
        error = refusal(InvalidPrompt, gate.encode, bad, "messages")
        assert error.param == "messages" and error.code == "invalid_prompt"
    assert refusal(InvalidPrompt, gate.prepare_batch, [], SamplingParams()).param == "prompt"
    assert refusal(InvalidPrompt, gate.prepare_batch, ["a", ""], SamplingParams()).param == "prompt"


def test_vocabulary_rule(tiny_ckpt: Path) -> None:
    gate = gate_for(tiny_ckpt)
    last = gate.vocab_size - 1
    gate.prepare([5], SamplingParams(logit_bias={last: 1.0}, stop_token_ids=[last]))
    for field, params in (("logit_bias", SamplingParams(logit_bias={gate.vocab_size: 1.0})),
                          ("stop_token_ids", SamplingParams(stop_token_ids=[3, gate.vocab_size]))):
        assert refusal(InvalidRequest, gate.prepare, [5], params).param == field


def test_chunk_size_rule(tiny_ckpt: Path) -> None:
    gate = gate_for(tiny_ckpt)
    assert gate.prepare([5], SamplingParams(chunk_size=gate.chunk_size)).params.chunk_size == gate.chunk_size
    assert refusal(InvalidRequest, gate.prepare, [5], SamplingParams(chunk_size=gate.chunk_size + 1)).param == "chunk_size"
    transformer = gate_for(tiny_ckpt, kind="transformer")  # its config's P means nothing: no chunk_size is served
    error = refusal(InvalidRequest, transformer.prepare, [5], SamplingParams(chunk_size=gate.chunk_size))
    assert error.param == "chunk_size" and "attamba models only" in str(error)


def test_queue_bound_counts_n_times_prompts(tiny_ckpt: Path) -> None:
    gate = gate_for(tiny_ckpt, max_waiting=6)
    assert len(gate.prepare_batch(["a", "b"], SamplingParams(n=3))) == 2  # 6 sequences: exactly the bound
    for prompts, n in ((["a", "b", "c"], 3), (["a"], 7)):
        error = refusal(InvalidRequest, gate.prepare_batch, prompts, SamplingParams(n=n))
        assert error.param == "n" and "never be admitted" in str(error) and not isinstance(error, QueueFull)


def test_context_length_rule(tiny_ckpt: Path) -> None:
    gate = gate_for(tiny_ckpt, max_model_len=40)
    assert gate.prepare([5] * 30, SamplingParams(max_tokens=10)).max_tokens == 10
    assert gate.prepare([5] * 30, SamplingParams(max_tokens=None)).max_tokens == 10  # what the length leaves
    for prompt, max_tokens in (([5] * 30, 11), ([5] * 40, None), ([5] * 41, 1)):
        error = refusal(ContextLengthExceeded, gate.prepare, prompt, SamplingParams(max_tokens=max_tokens), "messages")
        assert error.param == "messages" and error.code == "context_length_exceeded"


def test_cache_fit_is_decided_once_by_fitting_max_model_len(tiny_ckpt: Path) -> None:
    asked: list[int] = []

    def fits(n: int) -> bool:
        asked.append(n)
        return n <= 50

    gate = gate_for(tiny_ckpt, max_model_len=None, fits=fits)
    assert gate.max_model_len == 50 < ModelConfig.load(tiny_ckpt).default_max_model_len  # the default, fitted
    asked.clear()
    gate.prepare([5] * 20, SamplingParams(max_tokens=30))  # within max_model_len: fits, and nobody asks again
    assert not asked
    with pytest.raises(ContextLengthExceeded):
        gate.prepare([5] * 20, SamplingParams(max_tokens=31))
    with pytest.raises(ValueError, match="does not fit the cache"):  # an explicit length the cache cannot hold
        gate_for(tiny_ckpt, max_model_len=60, fits=fits)


def test_queue_bound_is_decided_on_the_live_queue(tiny_ckpt: Path) -> None:
    engine = LLMEngine(EngineArgs(model=str(tiny_ckpt), **ENGINE, max_num_seqs=1, max_waiting=2))
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    engine.add_request("a", "hello", SamplingParams(n=2, max_tokens=4, ignore_eos=True))
    assert not engine.has_room(1)
    with pytest.raises(QueueFull):
        engine.add_request("b", "hello", params)
    assert "b" not in engine.requests and len(engine.scheduler.waiting) == 2
    engine.step()  # one of a's sequences starts running: the queue has room at once
    assert len(engine.scheduler.waiting) == 1 and engine.has_room(1)
    with pytest.raises(QueueFull):  # prepared requests admitted together: all or none
        engine.add_requests({"c": engine.gate.prepare("hi", params), "d": engine.gate.prepare("hi", params)})
    assert not {"c", "d"} & set(engine.requests) and len(engine.scheduler.waiting) == 1
    engine.add_request("b", "hello", params)
    assert len(engine.scheduler.waiting) == 2


def test_offline_generate_raises_the_same_typed_errors_before_queuing(tiny_ckpt: Path) -> None:
    llm = LLM(str(tiny_ckpt), **ENGINE, max_model_len=40, max_waiting=2)
    ok = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    cases = ((ContextLengthExceeded, "prompt", [[5] * 30, [5] * 40], ok),
             (InvalidPrompt, "prompt", ["fine", ""], ok),
             (InvalidRequest, "n", ["fine"], SamplingParams(n=3)),
             (InvalidRequest, "chunk_size", ["fine"], SamplingParams(chunk_size=99)))
    for kind, param, prompts, params in cases:
        assert refusal(kind, llm.generate, prompts, params).param == param
        assert not llm.engine.has_unfinished() and not llm.engine.requests  # nothing was queued
    outs = llm.generate(["a", "b", "c", "d", "e"], ok)  # more than the queue holds: they join as it drains
    assert [len(o.token_ids) for o in outs] == [3] * 5 and all(o.finish_reason == "length" for o in outs)
    assert outs[2].token_ids == llm.generate("c", ok)[0].token_ids
