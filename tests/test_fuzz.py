"""Schemathesis fuzz of /openapi.json (`make fuzz`, or `pytest -m slow tests/test_fuzz.py`): whatever the
generated body, no 5xx, and every 4xx is the error envelope {"error": {message, type, param, code}}."""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

pytestmark = pytest.mark.slow
EXAMPLES = 60  # per operation


@pytest.fixture(scope="module")
def engine_kw() -> dict:
    return {"max_model_len": 96}


def error_envelope(ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case) -> None:
    """Every 4xx answers {"error": {"message", "type", "param", "code"}} with a non-empty message."""
    if 400 <= response.status_code < 500:
        body = response.json()
        assert isinstance(body, dict) and set(body) == {"error"}, body
        assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"], body


def test_no_5xx_and_every_4xx_in_the_envelope(url: str) -> None:
    api = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/tokenize"}
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def call(case: schemathesis.Case) -> None:
            case.call_and_validate(base_url=url, checks=[not_a_server_error, error_envelope], timeout=60)

        call()
