"""The service under fuzzing: its own OpenAPI schema (``/docs.json``) drives schemathesis against a
real ``bentoml serve`` (the session's tiny service).

Every generated request to the six POST endpoints gets no 5xx; every 4xx names what it is about
(``detail[].loc``, ``["body"]`` for the body itself); what the schema allows is accepted unless
only the loaded model can refuse it (its beam width, layers, heads). The run is bounded (a few
examples per endpoint, derandomized so a failure reproduces), and the multipart-without-boundary
body that once answered 500 is an explicit case on each endpoint.
"""

from __future__ import annotations

from typing import Any

import hypothesis
import pytest
import requests
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.core import NOT_SET
from schemathesis.generation import GenerationMode

from support.processes import BentoProcess

pytestmark = pytest.mark.integration

ENDPOINTS = ("/translate", "/translate_batch", "/translate_stream", "/score", "/model", "/reload")
EXAMPLES = 12  # per endpoint and mode: enough to cover the schema's branches, short enough for `make test`


@pytest.fixture(scope="module")
def api_schema(tiny_service: BentoProcess) -> Any:
    """The service's published OpenAPI schema, loaded from the running service."""
    return schemathesis.openapi.from_url(f"{tiny_service.url}/docs.json")


def _names_a_field(response: requests.Response) -> bool:
    """A 4xx body that says which field (or the body itself) is wrong."""
    try:
        body = response.json()
    except ValueError:
        return False
    if not isinstance(body, dict):
        return False
    detail = body.get("detail")
    if isinstance(detail, list) and detail:
        return all(isinstance(item, dict) and item.get("loc") for item in detail)
    return False


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize("path", ENDPOINTS)
def test_no_server_errors_and_4xx_name_the_field(api_schema: Any, path: str, mode: GenerationMode) -> None:
    operation = api_schema[path]["POST"]
    statuses: list[int] = []

    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis.settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck), phases=[hypothesis.Phase.generate])
    def check(case: Any) -> None:
        response = case.call(timeout=120)
        statuses.append(response.status_code)
        case.validate_response(response, checks=[not_a_server_error])
        if 400 <= response.status_code < 500:
            assert _names_a_field(response), f"{path} {response.status_code}: {response.text[:300]}"
        # the schema allows it: the service takes it (BentoML's schema leaves the body optional, so a
        # request without one is generated as allowed: it is a 400 naming the required field instead)
        if mode is GenerationMode.POSITIVE and path != "/reload" and case.body is not NOT_SET:
            assert response.status_code < 400 or _model_dependent(response), \
                f"{path} refused what its schema allows: {response.status_code} {response.text[:300]}"

    check()
    assert statuses, "no request was sent"
    if mode is GenerationMode.POSITIVE and path != "/reload":
        assert 200 in statuses, statuses  # some generated requests were translated, not all refused


def _model_dependent(response: requests.Response) -> bool:
    """A 400 only the loaded model can decide (its top-K, layer and head counts; alignment settings),
    or ``/score``'s ``translation`` splitting into another number of sentences than ``text``."""
    fields = {str(item["loc"][-1]) for item in response.json().get("detail", [])}
    model_checked = {"beam_size", "layers", "heads", "mask_heads", "alignment_layer", "alignment_head", "model",
                     "translation"}
    return response.status_code in (400, 404) and bool(fields) and fields <= model_checked


@pytest.mark.parametrize("path", ENDPOINTS)
@pytest.mark.parametrize("content_type", ["multipart/form-data", "text/plain", "application/x-www-form-urlencoded"])
def test_a_body_that_is_not_json_is_refused_naming_the_body(tiny_service: BentoProcess, path: str,
                                                            content_type: str) -> None:
    response = requests.post(f"{tiny_service.url}{path}", data=b'{"text": "ein Haus"}',
                             headers={"Content-Type": content_type}, timeout=60)
    assert response.status_code == 415, response.text
    assert response.json()["detail"][0]["loc"] == ["body"]
    assert content_type in response.json()["error"]


@pytest.mark.parametrize("path", ENDPOINTS)
def test_malformed_json_is_a_400_naming_the_body(tiny_service: BentoProcess, path: str) -> None:
    response = requests.post(f"{tiny_service.url}{path}", data=b'{"text": "ein',
                             headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["detail"][0]["loc"] == ["body"]


def test_what_the_batch_schema_allows_is_accepted(tiny_service: BentoProcess) -> None:
    texts = ["ein Haus", "x" * 40, " \u00e9 "]
    response = tiny_service.post("/translate_batch", {"texts": texts, "layers": [0], "heads": [0],
                                                      "alignment": "soft", "alignment_layer": 0,
                                                      "mask_heads": {"cross": [[0, 1]]}})
    assert response.status_code == 200, response.text
    assert len(response.json()) == len(texts)
