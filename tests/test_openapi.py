"""``GET /openapi.json``: a valid OpenAPI 3.1 document of every route, and a live sidecar that keeps to it.

The document and the router are both built from sidecar/_routes.py. Here it is validated with
openapi-spec-validator, compared with the table, and used by schemathesis to fuzz a real ``actionpool
serve`` process (admin token): every operation gets a bounded, derandomized number of generated requests
(valid ones inside an existing tenant and anywhere, and invalid ones), and every answer must be documented (status,
content type, body schema), never a 500.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from actionpool.sidecar._openapi import document, document_bytes
from actionpool.sidecar._routes import HANDLERS, ROUTES
from serve_fixtures import ADMIN, Serve, start_serve, write_config

pytestmark = pytest.mark.timeout(180)

ACTIONS = {
    "tag_tier.py": """
        def on_execute_post_login(event, api):
            api.access_token.set_custom_claim("tier", "gold")
    """,
    "any.py": """
        def on_execute(event, api):
            api.state.set("seen", True)
    """,
}
CONFIG = """
    [runner]
    pool_size = 1
    max_workers = 4
    [runner.limits]
    action_timeout_s = 2.0
    [server]
    token_env = "AP_TOKEN"
    admin_token_env = "AP_ADMIN"
    max_body_bytes = 65536
    [tenants.acme]
    [tenants.acme.actions.tag-tier]
    file = "actions/tag_tier.py"
    [tenants.acme.actions.any]
    file = "actions/any.py"
    [tenants.acme.flows]
    post-login = ["tag-tier", "any"]
    pre-login = ["any"]
"""
FUZZ_EXAMPLES = 15        # generated requests per operation inside the tenant (and a third of that outside)


@pytest.fixture
def sidecar(tmp_path: Path) -> Iterator[Serve]:
    s = start_serve(write_config(tmp_path, CONFIG, ACTIONS))
    try:
        yield s
    finally:
        assert s.stop() == 0, s.output()[-3000:]


def test_document_is_valid_openapi_31() -> None:
    from openapi_spec_validator import validate

    doc = document()
    assert doc["openapi"] == "3.1.0"
    validate(doc)


def test_document_lists_every_route_with_its_security_and_errors() -> None:
    doc = document()
    listed = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert listed == {(r.method, r.path) for r in ROUTES}
    schemes = doc["components"]["securitySchemes"]
    assert schemes["flowToken"] == {**schemes["flowToken"], "type": "http", "scheme": "bearer"}
    assert schemes["adminToken"]["scheme"] == "bearer"
    for r in ROUTES:
        op = doc["paths"][r.path][r.method.lower()]
        assert op["operationId"] == r.handler and op["summary"] == r.summary
        names = {p["name"] for p in op.get("parameters", ()) if p["in"] == "path"}
        assert names == set(r.params)
        codes = set(op["responses"])
        if r.role == "public":
            assert op["security"] == [] and "401" not in codes
        else:
            assert "401" in codes and "503" in codes
        if r.role == "admin":
            assert op["security"] == [{"adminToken": []}] and "403" in codes
        if r.role in ("flow", "any"):
            assert op["security"] == [{"flowToken": []}, {"adminToken": []}]
        assert any(c.startswith("2") for c in codes), r
    contract = {("PUT", "/v1/tenants/{tenant}"): {"200", "201"}, ("DELETE", "/v1/tenants/{tenant}"): {"204"},
                ("PUT", "/v1/tenants/{tenant}/actions/{slug}"): {"201", "422"},
                ("PUT", "/v1/tenants/{tenant}/flows/{trigger}"): {"200", "422"},
                ("PUT", "/v1/tenants/{tenant}/secrets/{name}"): {"204"},
                ("DELETE", "/v1/tenants/{tenant}/secrets/{name}"): {"204"}}
    for (method, path), codes in contract.items():
        assert codes <= set(doc["paths"][path][method.lower()]["responses"]), (method, path)
    deploy = doc["paths"]["/v1/tenants/{tenant}/actions/{slug}"]["put"]["requestBody"]["content"]
    assert set(deploy) == {"application/json", "text/x-python", "application/javascript"}
    assert "content" not in doc["paths"]["/v1/tenants/{tenant}"]["delete"]["responses"]["204"]


def test_every_route_has_a_handler() -> None:
    import actionpool.sidecar._server  # noqa: F401  (registers its handlers and the management API's)

    missing = sorted({r.handler for r in ROUTES} - set(HANDLERS))
    assert missing == [], f"routes without a handler (they answer 501): {missing}"


def test_served_document_is_the_table_and_public(sidecar: Serve) -> None:
    r = httpx.get(sidecar.url + "/openapi.json", timeout=30)   # no token
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.content == document_bytes() and r.json() == document()
    assert httpx.get(sidecar.url + "/openapi.json", timeout=30).content == r.content


def test_schemathesis_fuzz_finds_no_500_and_no_undocumented_answer(sidecar: Serve) -> None:
    import hypothesis
    import schemathesis
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (content_type_conformance, response_headers_conformance,
                                                   response_schema_conformance, status_code_conformance)

    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
              response_schema_conformance]
    schema = schemathesis.openapi.from_url(sidecar.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    # schemathesis leaves out the schema's own URL; every other route is fuzzed
    assert {op.label for op in operations} == {f"{r.method} {r.path}" for r in ROUTES} - {"GET /openapi.json"}
    # Deleting the tenant last, so the other operations run inside it.
    operations.sort(key=lambda op: (op.method.upper() == "DELETE" and op.path == "/v1/tenants/{tenant}", op.path))
    inside = {"tenant": "acme", "slug": "tag-tier", "trigger": "post-login"}
    positive, negative = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE
    calls = [0]
    with httpx.Client(timeout=30) as probe:
        for op in operations:
            fixed = {k: v for k, v in inside.items() if f"{{{k}}}" in op.path}
            # Valid requests inside the tenant, valid ones anywhere, then invalid ones (bad parameters, bodies,
            # headers): each answer documented, none a 500.
            passes = [(positive, fixed, FUZZ_EXAMPLES), (negative, fixed, FUZZ_EXAMPLES // 3)]
            if fixed:
                passes.append((positive, {}, FUZZ_EXAMPLES // 3))
            for mode, params, examples in passes:

                @hypothesis.settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                                     suppress_health_check=list(hypothesis.HealthCheck),
                                     phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])
                @hypothesis.given(case=op.as_strategy(mode, path_parameters=params or None))
                def run(case: Any) -> None:
                    calls[0] += 1
                    case.call_and_validate(base_url=sidecar.url, headers=dict(ADMIN), checks=checks)

                try:
                    run()
                except hypothesis.errors.Unsatisfiable:   # nothing of this operation can be made invalid
                    assert mode is negative and not params, op.label
        assert probe.get(sidecar.url + "/healthz").status_code == 200   # still alive
    assert calls[0] >= len(ROUTES) * 5
    assert "unhandled error" not in sidecar.output(), sidecar.output()[-3000:]
