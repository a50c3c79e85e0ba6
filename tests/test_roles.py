"""Roles on the sidecar's routes: flow token, admin token, single-token mode, loopback-only; 401/403/404/405.

Every route comes from the table (sidecar/_routes.py), so a route added later is covered here without a
new line: the flow token gets 403 on each management route, no token 401 on each non-public route.
The serving tests run real ``actionpool serve`` processes; the router and the roles also have unit tests.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from actionpool.runner import ConfigError
from actionpool.sidecar._config import MIN_ADMIN_TOKEN_CHARS, is_loopback, load_config
from actionpool.sidecar._routes import (MAX_QUERY_FIELDS, PARAMS, ROUTES, HTTPError, Roles, Route, Router, author_of,
                                          parse_query)
from serve_fixtures import ADMIN, ADMIN_TOKEN, AUTH, TOKEN, Serve, start_serve, write_config

pytestmark = pytest.mark.timeout(120)

ACTIONS = {"tag_tier.py": """
    def on_execute_post_login(event, api):
        api.access_token.set_custom_claim("tier", "gold")
"""}
CONFIG = """
    [runner]
    pool_size = 1
    max_workers = 4
    [server]
    token_env = "AP_TOKEN"
    {admin}
    [tenants.acme]
    [tenants.acme.actions.tag-tier]
    file = "actions/tag_tier.py"
    [tenants.acme.flows]
    post-login = ["tag-tier"]
"""
ADMIN_LINE = 'admin_token_env = "AP_ADMIN"'
FLOW = "/v1/tenants/acme/flows/post-login"
VALUES = {"tenant": "acme", "slug": "tag-tier", "trigger": "post-login", "name": "API_KEY",
          "a": "0123456789abcdef", "b": "fedcba9876543210", "flow_id": "f" * 32}
BODIES: dict[str, Any] = {"tenant_put": {"denial_message": "no"}, "secret_put": {"value": "0123456789abcdef"},
                          "flow_put": ["tag-tier"], "action_test": {"trigger": "post-login", "event": {}},
                          "action_put": {"source": "def on_execute(event, api):\n    pass\n", "language": "python"}}


def url_of(route: Route) -> str:
    return route.path.format(**VALUES)


def send(c: httpx.Client, route: Route, headers: dict[str, str] | None = None) -> httpx.Response:
    body = BODIES.get(route.handler)
    kw: dict[str, Any] = {"json": body} if body is not None else {}
    return c.request(route.method, url_of(route), headers=headers, **kw)


@pytest.fixture
def two_roles(tmp_path: Path) -> Iterator[Serve]:
    s = start_serve(write_config(tmp_path, CONFIG.format(admin=ADMIN_LINE), ACTIONS))
    try:
        yield s
    finally:
        assert s.stop() == 0, s.output()[-2000:]


def test_flow_token_gets_403_on_every_admin_route_and_changes_nothing(two_roles: Serve) -> None:
    admin_routes = [r for r in ROUTES if r.role == "admin"]
    assert len(admin_routes) >= 15
    with httpx.Client(base_url=two_roles.url, headers=AUTH, timeout=30) as c:
        for route in admin_routes:
            r = send(c, route)
            assert r.status_code == 403, (route.method, route.path, r.status_code, r.text)
            assert r.json() == {"error": f"this token may not manage: {route.method} {route.path} needs the admin "
                                         "token (server.admin_token_env)"}
        # DELETE tenant, PUT flow, PUT action were all refused: the flow still runs the configured action.
        r = c.post(FLOW, json={"user": {}})
        assert r.status_code == 200 and r.json()["claims"]["access_token"] == {"tier": "gold"}, r.text


def test_no_token_or_a_bad_one_gets_401_on_every_non_public_route(two_roles: Serve) -> None:
    guarded = [r for r in ROUTES if r.role != "public"]
    with httpx.Client(base_url=two_roles.url, timeout=30) as c:
        for route in guarded:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                            {"Authorization": f"Bearer {ADMIN_TOKEN}x"}):
                r = send(c, route, headers)
                assert r.status_code == 401, (route.method, route.path, headers, r.status_code, r.text)
                assert r.json()["error"] == "missing or bad bearer token"
                assert r.headers["www-authenticate"] == "Bearer"
        # a stranger learns nothing about which paths exist
        assert c.get("/v1/nothing-here").status_code == 401
        assert c.delete("/healthz").status_code == 405   # public paths answer without a token
        for route in [r for r in ROUTES if r.role == "public"]:
            assert c.request(route.method, route.path).status_code == 200, route.path


def test_admin_token_runs_flows_manages_and_reads_metrics(two_roles: Serve) -> None:
    with httpx.Client(base_url=two_roles.url, headers=ADMIN, timeout=30) as c:
        r = c.post(FLOW, json={"user": {}})
        assert r.status_code == 200 and r.json()["outcome"] == "allow", r.text
        assert c.get("/metrics").status_code == 200
        r = c.get("/v1/tenants/acme")
        assert r.status_code == 200 and r.json()["allow_hosts"] == [], r.text
        assert c.get("/v1/tenants/nobody").status_code == 404
    with httpx.Client(base_url=two_roles.url, headers=AUTH, timeout=30) as c:
        assert c.get("/metrics").status_code == 200   # role "any"


def test_author_header_is_validated_and_recorded(two_roles: Serve) -> None:
    with httpx.Client(base_url=two_roles.url, headers=ADMIN, timeout=30) as c:
        for bad in (b"", b"a" * 65, "ü-name".encode()):   # (an HTTP client sends no control characters)
            r = c.put("/v1/tenants/authored", json={}, headers=[(b"X-Actionpool-Author", bad)])
            assert r.status_code == 400 and r.json()["field"] == "X-Actionpool-Author", (bad, r.text)
        assert c.get("/v1/tenants/authored").status_code == 404   # nothing was written
        r = c.put("/v1/tenants/authored", json={}, headers={"X-Actionpool-Author": "alice@example.com"})
        assert r.status_code == 201, r.text
        assert c.put("/v1/tenants/authored", json={"denial_message": "Closed."}).status_code == 200
        audit = c.get("/v1/tenants/authored/audit").json()["entries"]
        assert {e["who"] for e in audit} == {"admin:alice@example.com", "admin"}, audit


def test_405_names_the_methods_and_404_the_unknown(two_roles: Serve) -> None:
    with httpx.Client(base_url=two_roles.url, headers=ADMIN, timeout=30) as c:
        r = c.delete(FLOW)
        assert r.status_code == 405 and r.headers["allow"] == "GET, POST, PUT", r.headers
        assert r.json() == {"error": "DELETE is not served here; use GET, POST, PUT"}
        r = c.post("/healthz")
        assert r.status_code == 405 and r.headers["allow"] == "GET"
        for path in ("/nope", "/v1/tenants/acme/flows/post-login/", "/v1/tenants//flows/post-login",
                     "/v1/tenants/acme/nothing", "/" + "a/" * 40, "/v1/tenants/acme/actions/x/rollback/more"):
            r = c.get(path)
            assert r.status_code == 404 and r.json() == {"error": "no such route"}, (path, r.text)
        r = c.post("/v1/tenants/Bad%20Name/flows/post-login", json={})
        assert r.status_code == 400 and r.json()["field"] == "tenant", r.text
        r = c.post("/v1/tenants/acme/flows/post-logon", json={})
        assert r.status_code == 400 and r.json()["field"] == "trigger", r.text
        r = c.get("/v1/tenants/acme/actions/tag-tier/versions/XYZ/diff/0123456789abcdef")
        assert r.status_code == 400 and r.json()["field"] == "a", r.text


def test_401_goes_out_before_the_body_is_read(two_roles: Serve) -> None:
    """A stranger announces a large body and sends none of it: the 401 comes at once, not after body_timeout_s."""
    host, port = two_roles.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"PUT /v1/tenants/acme/actions/tag-tier HTTP/1.1\r\nHost: x\r\nContent-Length: 60000\r\n"
                     b"Content-Type: application/json\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 401 ")
    with socket.create_connection((host, int(port)), timeout=5) as sock:   # and 403 for the flow token
        sock.sendall(b"PUT /v1/tenants/acme/actions/tag-tier HTTP/1.1\r\nHost: x\r\nContent-Length: 60000\r\n"
                     b"Authorization: Bearer " + TOKEN.encode() + b"\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 403 ")


def test_single_token_mode_lets_the_flow_token_manage_and_warns(tmp_path: Path) -> None:
    s = start_serve(write_config(tmp_path, CONFIG.format(admin=""), ACTIONS))
    try:
        with httpx.Client(base_url=s.url, headers=AUTH, timeout=30) as c:
            assert c.get("/v1/tenants/acme").status_code == 200
            assert c.put("/v1/tenants/newco", json={}).status_code == 201
            assert c.post(FLOW, json={"user": {}}).json()["outcome"] == "allow"
        with httpx.Client(base_url=s.url, headers=ADMIN, timeout=30) as c:   # no admin token configured
            assert c.get("/v1/tenants/acme").status_code == 401
    finally:
        assert s.stop() == 0, s.output()[-2000:]
    assert "single-token mode" in s.output()


# ------------------------------------------------------------------ config


def test_admin_token_config_is_validated(tmp_path: Path) -> None:
    path = write_config(tmp_path, CONFIG.format(admin=ADMIN_LINE), ACTIONS)
    cfg = load_config(path, env={"AP_TOKEN": TOKEN, "AP_ADMIN": ADMIN_TOKEN})
    assert cfg.server.admin_token == ADMIN_TOKEN and cfg.server.token == TOKEN
    assert load_config(write_config(tmp_path, CONFIG.format(admin=""), ACTIONS, "single.toml"),
                       env={"AP_TOKEN": TOKEN}).server.admin_token is None
    cases = [({"AP_TOKEN": TOKEN}, "environment variable AP_ADMIN is not set or empty"),
             ({"AP_TOKEN": TOKEN, "AP_ADMIN": ""}, "environment variable AP_ADMIN is not set or empty"),
             ({"AP_TOKEN": TOKEN, "AP_ADMIN": "x" * (MIN_ADMIN_TOKEN_CHARS - 1)}, "at least 16"),
             ({"AP_TOKEN": ADMIN_TOKEN, "AP_ADMIN": ADMIN_TOKEN}, "equals the flow token")]
    for env, message in cases:
        with pytest.raises(ConfigError, match=f"server.admin_token_env: .*{message}"):
            load_config(path, env=env)
    no_flow = write_config(tmp_path, CONFIG.format(admin=ADMIN_LINE).replace('token_env = "AP_TOKEN"\n', ""),
                           ACTIONS, "noflow.toml")
    with pytest.raises(ConfigError, match="server.admin_token_env: needs server.token_env"):
        load_config(no_flow, env={"AP_ADMIN": ADMIN_TOKEN})


# ------------------------------------------------------------------ units: router and roles


def _scope(token: str | None = None, client: str = "127.0.0.1", **headers: str) -> dict[str, Any]:
    raw = [(k.lower().replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
    if token is not None:
        raw.append((b"authorization", f"Bearer {token}".encode()))
    return {"headers": raw, "client": (client, 5555)}


def test_every_route_matches_its_own_template_and_no_other() -> None:
    router = Router()
    for route in ROUTES:
        got, params = router.match(route.method, url_of(route))
        assert got is route and params == {p: VALUES[p] for p in route.params}
        router.check_params(params)


def test_ambiguous_or_duplicate_tables_are_refused() -> None:
    a = Route("GET", "/v1/x/{tenant}", "healthz", "public", "")
    for other in (Route("GET", "/v1/x/literal", "healthz", "public", ""),
                  Route("GET", "/v1/x/{slug}", "healthz", "public", ""),
                  Route("GET", "/v1/x/{tenant}", "readyz", "public", "")):
        with pytest.raises(ValueError):
            Router((a, other))
    with pytest.raises(ValueError, match="no schema"):
        Router((Route("GET", "/v1/{nope}", "healthz", "public", ""),))
    with pytest.raises(ValueError, match="unknown role"):
        Router((Route("GET", "/v1", "healthz", "root", ""),))


def test_params_are_checked_against_their_schemas() -> None:
    router = Router()
    for name, schema in PARAMS.items():
        router.check_params({name: schema["example"]})
    for name, bad in (("tenant", "acme\n"), ("tenant", "a" * 65), ("slug", "Upper"), ("trigger", "login"),
                      ("name", "9lives"), ("a", "0123456789abcde"), ("flow_id", "x" * 201), ("flow_id", "a b")):
        with pytest.raises(HTTPError) as e:
            router.check_params({name: bad})
        assert e.value.status == 400 and e.value.field == name


def test_roles_identify_and_permit() -> None:
    roles = Roles(TOKEN, ADMIN_TOKEN, is_loopback)
    admin_route = next(r for r in ROUTES if r.role == "admin")
    flow_route = next(r for r in ROUTES if r.role == "flow")
    assert roles.identify(_scope(ADMIN_TOKEN)) == "admin" and roles.identify(_scope(TOKEN)) == "flow"
    roles.permit(admin_route, "admin")
    roles.permit(flow_route, "admin")
    roles.permit(flow_route, "flow")
    with pytest.raises(HTTPError) as e:
        roles.permit(admin_route, "flow")
    assert e.value.status == 403
    for scope in (_scope(), _scope("nope"), _scope(TOKEN + "x"), {"headers": [(b"authorization", b"Bearer")]}):
        with pytest.raises(HTTPError) as e:
            roles.identify(scope)
        assert e.value.status == 401
    single = Roles(TOKEN, None, is_loopback)
    assert single.single_token and single.identify(_scope(TOKEN)) == "flow"
    single.permit(admin_route, "flow")   # single-token mode: the flow token manages
    open_ = Roles(None, None, is_loopback)
    assert open_.identify(_scope(client="127.0.0.1")) == "loopback"
    with pytest.raises(HTTPError) as e:
        open_.identify(_scope(client="10.0.0.8"))
    assert e.value.status == 401
    with pytest.raises(ValueError):
        Roles(None, ADMIN_TOKEN, is_loopback)


def test_author_of() -> None:
    assert author_of(_scope(), "admin") == "admin"
    assert author_of(_scope(x_actionpool_author="ci bot"), "admin") == "admin:ci bot"
    for bad in ("", " x", "x ", "a" * 65, "é"):
        with pytest.raises(HTTPError) as e:
            author_of({"headers": [(b"x-actionpool-author", bad.encode())]}, "admin")
        assert e.value.field == "X-Actionpool-Author"


def test_matching_is_linear_in_the_path() -> None:
    """Long hostile paths end in 404 after one dict step per segment (at most MAX_SEGMENTS are looked at)."""
    router = Router()
    for path in ("/" * 10000, "/v1/tenants/" + "a" * 100000 + "/nothing", "/v1" * 5000,
                 "/v1/tenants/acme/actions/" + "x/" * 5000):
        with pytest.raises(HTTPError) as e:
            router.match("GET", path)
        assert e.value.status == 404


def test_query_strings_are_bounded() -> None:
    assert parse_query({"query_string": b"shadow=0&shadow=1&limit=5"}) == {"shadow": "1", "limit": "5"}
    with pytest.raises(HTTPError) as e:
        parse_query({"query_string": b"&".join(b"x%d=1" % i for i in range(MAX_QUERY_FIELDS + 1))})
    assert e.value.status == 400 and e.value.field == "query"
