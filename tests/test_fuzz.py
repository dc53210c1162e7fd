"""Fuzz the service's own OpenAPI schema: no generated request, valid or not, gets a 5xx, and
every request answered with a 2xx has exactly one record in the dataset (a 200 whose record a
later flush loses is as wrong as a 500)."""

import json
import time

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from softwatch.serve.ingress import app
from softwatch.store import Store

from .conftest import API_KEY

schema = schemathesis.openapi.from_dict(app.openapi())
ANSWERED: list[str] = []  # the request ids of every 2xx completion the fuzzer got


def _request_ids(response) -> list[str]:
    if response.text.startswith("data: "):  # a stream
        events = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: {")]
        return [choice["softwatch"]["request_id"] for event in map(json.loads, events)
                for choice in event.get("choices", []) if choice.get("finish_reason")]
    return response.json()["softwatch"]["request_ids"]


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_gets_a_server_error(case, service):
    response = case.call_and_validate(base_url=service["url"], headers={"Authorization": f"Bearer {API_KEY}"},
                                      checks=[not_a_server_error], timeout=120)
    if 200 <= response.status_code < 300 and case.path.endswith("completions"):
        ANSWERED.extend(_request_ids(response))


OUT_OF_RANGE = [{"seed": 2**63}, {"seed": -(2**63) - 1}, {"top_k": 2**31}, {"top_k": 2**63}, {"n": 17},
                {"max_tokens": 2**31}, {"temperature": 1e308}, {"stop": ["s"] * 5}, {"logprobs": 6}]


def test_out_of_range_fields_are_refused_naming_them(service):
    import httpx

    for fields in OUT_OF_RANGE:
        for path, base in (("/v1/completions", {"prompt": "x"}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
            if path.endswith("chat/completions") and "logprobs" in fields:
                continue  # chat's logprobs is a boolean
            r = httpx.post(f"{service['url']}{path}", json={**base, **fields}, timeout=60,
                           headers={"Authorization": f"Bearer {API_KEY}"})
            assert r.status_code == 400 and r.json()["error"]["param"] == next(iter(fields)), (path, fields, r.text)


def test_every_answered_fuzz_request_has_exactly_one_record(service):
    assert ANSWERED, "the fuzzer got no 2xx completion: it tested nothing (run the whole module)"
    store, deadline = Store(service["data"]), time.time() + 30  # the sink flushes within 10 s
    ids = "', '".join(ANSWERED)
    while True:
        counts = {r["request_id"]: r["n"] for r in store.rows(
            f"SELECT request_id, count(*) AS n FROM sequences WHERE request_id IN ('{ids}') GROUP BY request_id")}
        if len(counts) == len(set(ANSWERED)) or time.time() > deadline:
            break
        time.sleep(0.5)
    assert counts == {rid: 1 for rid in ANSWERED}


def test_the_schema_lists_every_route():
    paths = set(app.openapi()["paths"])
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/healthz"} <= paths
