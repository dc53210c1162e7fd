"""Fuzz the service's own OpenAPI schema: no generated request, valid or not, gets a 5xx."""

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from softwatch.serve.ingress import app

from .conftest import API_KEY

schema = schemathesis.openapi.from_dict(app.openapi())


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_gets_a_server_error(case, service):
    case.call_and_validate(base_url=service["url"], headers={"Authorization": f"Bearer {API_KEY}"},
                           checks=[not_a_server_error], timeout=120)


def test_the_schema_lists_every_route():
    paths = set(app.openapi()["paths"])
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/healthz"} <= paths
