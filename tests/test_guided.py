"""Structured output: with random weights, the grammar mask alone makes every output valid."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from engine import LLM, SamplingParams
from engine.guided import GuidedDecoding
from conftest import ENGINE

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog", None]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "pet", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llm(tiny_ckpt) -> LLM:
    return LLM(str(tiny_ckpt), **ENGINE, max_num_seqs=8)


def _texts(llm: LLM, guided: GuidedDecoding, n: int = 6, max_tokens: int = 200) -> list[str]:
    out = llm.generate("The tower", SamplingParams(n=n, seed=1, temperature=1.0, max_tokens=max_tokens,
                                                   guided=guided))[0]
    assert all(o.finish_reason == "stop" for o in out.outputs), [o.text for o in out.outputs]
    return [o.text for o in out.outputs]


def test_json_schema_outputs_parse_and_validate(llm: LLM) -> None:
    for text in _texts(llm, GuidedDecoding("json", SCHEMA)):
        jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_regex_and_choice(llm: LLM) -> None:
    # any object is unbounded (random weights write long keys): every output that ended parses
    params = SamplingParams(n=8, seed=1, max_tokens=300, guided=GuidedDecoding("json_object"))
    ended = [o.text for o in llm.generate("The tower", params)[0].outputs if o.finish_reason == "stop"]
    assert ended and all(isinstance(json.loads(text), dict) for text in ended)
    assert all(re.fullmatch(r"[a-z]{2,4}-\d{3}", t) for t in _texts(llm, GuidedDecoding("regex", r"[a-z]{2,4}-\d{3}")))
    assert set(_texts(llm, GuidedDecoding("choice", ["alpha", "beta", "gamma"]))) <= {"alpha", "beta", "gamma"}


def test_guided_and_free_rows_share_a_batch(llm: LLM) -> None:
    free = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    guided = SamplingParams(temperature=0.0, max_tokens=50, guided=GuidedDecoding("choice", ["yes", "no"]))
    alone = llm.generate("The tower", free)[0].text
    mixed = llm.generate(["The tower", "The tower"], [free, guided])
    assert mixed[0].text == alone and mixed[1].text in ("yes", "no")


@pytest.mark.parametrize("kind,spec", [("json", {"type": "nonsense"}), ("regex", "[a-"), ("choice", []),
                                       ("grammar", "start: nope"), ("json", {"bad": {1, 2}})])
def test_invalid_grammars_are_value_errors(kind: str, spec: object) -> None:
    with pytest.raises(ValueError, match="response_format"):
        GuidedDecoding(kind, spec)


def test_grammar_decides_the_end() -> None:
    for extra in ({"ignore_eos": True}, {"min_tokens": 2}):
        with pytest.raises(ValueError, match="structured output"):
            SamplingParams(guided=GuidedDecoding("json_object"), **extra)
