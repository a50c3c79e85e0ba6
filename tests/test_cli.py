"""The ``actionpool`` command, run as a real subprocess, against every example in ``examples/``.

Each test starts ``python -m actionpool.runner.cli`` (not the console script,
so the suite does not depend on the script being on PATH), parses the FlowResult JSON it
prints and checks the exit status: 0 allow, 3 deny, 2 bad input. The
fetch example talks to a real HTTP server on 127.0.0.1 started by the test;
the cache example's cross-run test uses the suite's real redis-server.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest

from actionpool.benchmarks.stress import _survivors

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
CLI_TIMEOUT_S = 50  # below pytest's 60 s per test: a hung CLI fails with its output, not a bare timeout

EXIT_ALLOW, EXIT_USAGE, EXIT_DENY = 0, 2, 3
RESULT_KEYS = {"outcome", "denial", "app_metadata", "user_metadata", "user_id", "claims", "state", "logs",
               "actions", "flow_id", "tenant", "trigger", "duration_ms"}


@dataclass
class Cli:
    rc: int
    stdout: str
    stderr: str

    @property
    def result(self) -> dict[str, Any]:
        """The FlowResult printed on stdout (asserts that stdout is exactly one JSON object)."""
        try:
            data = json.loads(self.stdout)
        except json.JSONDecodeError as exc:  # pragma: no cover - shows the output on failure
            raise AssertionError(f"stdout is not JSON ({exc}):\n{self.stdout}\nstderr:\n{self.stderr}") from None
        assert set(data) == RESULT_KEYS, data
        return data


def cli(*args: str | os.PathLike[str], stdin: str | None = None) -> Cli:
    proc = subprocess.run(
        [sys.executable, "-m", "actionpool.runner.cli", *map(str, args)],
        cwd=ROOT, input=stdin if stdin is not None else "", capture_output=True, text=True, encoding="utf-8",
        timeout=CLI_TIMEOUT_S,
    )
    return Cli(proc.returncode, proc.stdout, proc.stderr)


def run_example(name: str, trigger: str, *extra: str | os.PathLike[str], event: Any = None) -> Cli:
    """Run ``examples/NAME.py``: with its own event file, or ``event`` (a dict) fed on stdin."""
    if event is None:
        return cli("run", EXAMPLES / f"{name}.py", "--trigger", trigger, "--event", EXAMPLES / f"{name}.event.json",
                   *extra)
    return cli("run", EXAMPLES / f"{name}.py", "--trigger", trigger, "--event", "-", *extra, stdin=json.dumps(event))


def expect(res: Cli, rc: int) -> dict[str, Any]:
    assert res.rc == rc, f"exit {res.rc}, expected {rc}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    data = res.result
    assert data["outcome"] == ("allow" if rc == EXIT_ALLOW else "deny")
    return data


def statuses(data: dict[str, Any]) -> list[tuple[str, str]]:
    return [(a["slug"], a["status"]) for a in data["actions"]]


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


# ------------------------------------------------------------------ every example ships an event file


def test_every_example_has_an_event_file() -> None:
    actions = sorted(p.stem for p in EXAMPLES.glob("*.py"))
    assert actions, "no examples found"
    for stem in actions:
        event = json.loads((EXAMPLES / f"{stem}.event.json").read_text(encoding="utf-8"))
        assert type(event) is dict, stem


# ------------------------------------------------------------------ disposable e-mail (api.deny)


def test_disposable_email_denies() -> None:
    data = expect(run_example("disposable_email", "post-login"), EXIT_DENY)
    assert data["denial"] == {"action": "disposable-email", "kind": "denied", "reason": "disposable-email-blocked",
                              "user_message": "Access denied.", "error_code": None}
    assert statuses(data) == [("disposable-email", "denied")]
    assert data["trigger"] == "post-login" and data["tenant"] == "default"
    assert data["state"] == {} and data["logs"] == [] and data["app_metadata"] == {}


def test_disposable_email_allows_a_real_domain_and_a_missing_email() -> None:
    ok = expect(run_example("disposable_email", "post-login", event={"user": {"email": "ada@cymmetri.io"}}), EXIT_ALLOW)
    assert ok["denial"] is None
    assert statuses(ok) == [("disposable-email", "ok")]
    # event.user.email is None when absent: "or ''" keeps the action from failing.
    no_email = expect(run_example("disposable_email", "post-login", event={"user": {}}), EXIT_ALLOW)
    assert statuses(no_email) == [("disposable-email", "ok")]


def test_denial_message_and_tenant_options() -> None:
    data = expect(run_example("disposable_email", "post-login", "--denial-message", "Use your work e-mail.",
                              "--tenant", "acme"), EXIT_DENY)
    assert data["denial"]["user_message"] == "Use your work e-mail."
    assert data["tenant"] == "acme"


# ------------------------------------------------------------------ tag account tier (api.state.set)


def test_tag_account_tier_enterprise() -> None:
    data = expect(run_example("tag_account_tier", "post-login"), EXIT_ALLOW)
    assert data["state"] == {"tag-account-tier": {"tier": "enterprise"}}
    assert data["denial"] is None and data["logs"] == [] and data["claims"] == {"access_token": {}, "id_token": {}}
    assert statuses(data) == [("tag-account-tier", "ok")]


@pytest.mark.parametrize("user", [{"email": "bob@example.org"}, {"email": "no-at-sign"}, {}])
def test_tag_account_tier_self_serve(user: dict[str, Any]) -> None:
    data = expect(run_example("tag_account_tier", "post-login", event={"user": user}), EXIT_ALLOW)
    assert data["state"] == {"tag-account-tier": {"tier": "self-serve"}}


# ------------------------------------------------------------------ tag then claim (setAppMetadata + setCustomClaim)


def test_tag_then_claim_keeps_tier_and_sets_claims() -> None:
    data = expect(run_example("tag_then_claim", "post-login"), EXIT_ALLOW)
    assert data["app_metadata"] == {"tier": "enterprise"}
    assert data["claims"] == {"access_token": {"tier": "enterprise", "geo_country": "IN"}, "id_token": {}}
    assert data["logs"] == []


def test_tag_then_claim_defaults_to_free_without_app_metadata() -> None:
    event = {"user": {"email": "new@example.org"}, "request": {"geo": {"country": "DE"}}}
    data = expect(run_example("tag_then_claim", "post-login", event=event), EXIT_ALLOW)
    assert data["app_metadata"] == {"tier": "free"}
    assert data["claims"]["access_token"] == {"tier": "free", "geo_country": "DE"}


# ------------------------------------------------------------------ log then state (country blocked)


def test_check_country_blocked() -> None:
    data = expect(run_example("check_country", "post-login"), EXIT_ALLOW)
    assert data["state"] == {"check-country": {"country_blocked": True}}
    assert data["logs"] == [{"action": "check-country", "level": "warn", "message": "Login from XX — blocked: True"}]


def test_check_country_not_blocked() -> None:
    event = {"user": {}, "request": {"geo": {"country": "IN"}}}
    data = expect(run_example("check_country", "post-login", event=event), EXIT_ALLOW)
    assert data["state"] == {"check-country": {"country_blocked": False}}
    assert data["logs"] == [{"action": "check-country", "level": "info", "message": "Login from IN — blocked: False"}]


def test_check_country_without_request_fails_closed() -> None:
    """The reference reads event.request.geo.country unguarded: no request is an uncaught error, i.e. a deny."""
    data = expect(run_example("check_country", "post-login", event={"user": {}}), EXIT_DENY)
    assert data["denial"]["kind"] == "uncaught_error"
    assert data["denial"]["error_code"] == "AttributeError"
    assert "check_country.py" in data["denial"]["traceback"]
    assert statuses(data) == [("check-country", "failed")]


# ------------------------------------------------------------------ pre-user-registration validation


def test_validate_registration_accepts_and_sets_metadata_and_user_id() -> None:
    data = expect(run_example("validate_registration", "pre-user-registration"), EXIT_ALLOW)
    assert data["user_metadata"] == {"signup_source": "newsletter", "locale": "en-IN"}
    assert data["user_id"] == "cym|" + hashlib.sha256(b"grace@cymmetri.io").hexdigest()[:24]
    assert data["app_metadata"] == {} and data["denial"] is None


def test_validate_registration_invalid_phone_is_a_validation_error() -> None:
    event = {"user": {"email": "grace@cymmetri.io", "phone_number": "98123 45678"}, "request": {}}
    data = expect(run_example("validate_registration", "pre-user-registration", event=event), EXIT_DENY)
    assert data["denial"]["kind"] == "validation_error"
    assert data["denial"]["error_code"] == "invalid_phone_number"
    assert data["denial"]["user_message"].startswith("Enter the phone number in international format")
    assert statuses(data) == [("validate-registration", "denied")]
    assert data["user_id"] is None and data["user_metadata"] == {}


def test_validate_registration_blocked_domain_is_access_deny() -> None:
    event = {"user": {"email": "eve@SPAM.example", "phone_number": "+15550100"}, "request": {}}
    data = expect(run_example("validate_registration", "pre-user-registration", event=event), EXIT_DENY)
    assert data["denial"] == {"action": "validate-registration", "kind": "denied",
                              "reason": "blocked-domain:spam.example",
                              "user_message": "Sign-ups from this e-mail domain are not accepted.", "error_code": None}


def test_validate_registration_has_no_handler_for_post_login() -> None:
    """Only on_execute_pre_user_registration is defined: another trigger fails closed."""
    data = expect(run_example("validate_registration", "post-login"), EXIT_DENY)
    assert data["denial"]["kind"] == "uncaught_error"
    assert data["denial"]["error_code"] == "HandlerNotFound"


# ------------------------------------------------------------------ cache: sign-up rate counter


def test_signup_rate_limit_counts_first_signup() -> None:
    data = expect(run_example("signup_rate_limit", "pre-user-registration"), EXIT_ALLOW)
    assert data["state"] == {"signup-rate-limit": {"signups_this_hour": 1}}
    assert data["logs"] == []


def test_signup_rate_limit_denies_at_the_limit() -> None:
    data = expect(run_example("signup_rate_limit", "pre-user-registration", "--secret", "MAX_SIGNUPS_PER_HOUR=0"),
                  EXIT_DENY)
    assert data["denial"]["reason"] == "signup-rate-limit"
    assert data["denial"]["user_message"] == "Too many sign-ups from your network. Try again later."
    assert data["logs"] == [{"action": "signup-rate-limit", "level": "warn",
                             "message": "sign-up rate limit reached (0/0 this hour)"}]


@pytest.mark.redis
def test_signup_rate_limit_counter_survives_across_cli_runs_in_redis(redis_url: str) -> None:
    args = ("--cache", redis_url, "--secret", "MAX_SIGNUPS_PER_HOUR=2")
    first = expect(run_example("signup_rate_limit", "pre-user-registration", *args), EXIT_ALLOW)
    second = expect(run_example("signup_rate_limit", "pre-user-registration", *args), EXIT_ALLOW)
    third = expect(run_example("signup_rate_limit", "pre-user-registration", *args), EXIT_DENY)
    assert first["state"]["signup-rate-limit"]["signups_this_hour"] == 1
    assert second["state"]["signup-rate-limit"]["signups_this_hour"] == 2
    assert third["denial"]["reason"] == "signup-rate-limit"
    # Scoped per tenant: another tenant's counter starts from zero.
    other = expect(run_example("signup_rate_limit", "pre-user-registration", *args, "--tenant", "other"), EXIT_ALLOW)
    assert other["state"]["signup-rate-limit"]["signups_this_hour"] == 1


# ------------------------------------------------------------------ fetch then deny (real HTTP on 127.0.0.1)


@dataclass
class RiskApi:
    url: str
    score: Any = 10
    status: int = 200
    seen: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)


class _RiskHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_RiskServer"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        api = self.server.api
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        api.seen.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        payload = json.dumps({"score": api.score}).encode()
        self.send_response(api.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST


class _RiskServer(ThreadingHTTPServer):
    daemon_threads = True
    api: RiskApi


@pytest.fixture
def risk_api() -> Iterator[RiskApi]:
    """A stand-in for the external risk-scoring API: answers ``{"score": api.score}`` with ``api.status``."""
    srv = _RiskServer(("127.0.0.1", 0), _RiskHandler)
    srv.api = RiskApi(url=f"http://127.0.0.1:{srv.server_address[1]}/v1/score")
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv.api
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


def run_fetch(risk_api: RiskApi, *extra: str) -> Cli:
    return run_example("fetch_then_deny", "post-login", "--secret", f"RISK_API_URL={risk_api.url}", *extra)


def test_fetch_then_deny_low_score_allows_and_records_state(risk_api: RiskApi) -> None:
    risk_api.score = 10
    data = expect(run_fetch(risk_api, "--allow-host", "127.0.0.1"), EXIT_ALLOW)
    assert data["state"] == {"fetch-then-deny": {"external_risk_score": 10}}
    assert data["logs"] == [{"action": "fetch-then-deny", "level": "info", "message": "Risk score from external API: 10"}]
    [(method, path, headers, body)] = risk_api.seen
    assert (method, path) == ("POST", "/v1/score")
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {"ip": "203.0.113.7"}


def test_fetch_then_deny_high_score_denies(risk_api: RiskApi) -> None:
    risk_api.score = 95
    data = expect(run_fetch(risk_api, "--allow-host", "127.0.0.1"), EXIT_DENY)
    assert data["denial"]["kind"] == "denied"
    assert data["denial"]["reason"] == "external-risk-score-too-high"
    assert data["logs"] == [{"action": "fetch-then-deny", "level": "info", "message": "Risk score from external API: 95"}]
    assert data["state"] == {}


def test_fetch_then_deny_missing_score_reads_as_zero(risk_api: RiskApi) -> None:
    risk_api.score = None
    data = expect(run_fetch(risk_api, "--allow-host", "127.0.0.1"), EXIT_ALLOW)
    assert data["state"] == {"fetch-then-deny": {"external_risk_score": 0}}


def test_fetch_then_deny_upstream_error_fails_closed(risk_api: RiskApi) -> None:
    risk_api.status = 503
    data = expect(run_fetch(risk_api, "--allow-host", "127.0.0.1"), EXIT_DENY)
    assert data["denial"]["reason"] == "risk-api-status-503"


def test_fetch_to_a_host_off_the_allowlist_is_denied_without_a_packet(risk_api: RiskApi) -> None:
    data = expect(run_fetch(risk_api), EXIT_DENY)
    assert data["denial"]["kind"] == "http_fetch_denied"
    assert statuses(data) == [("fetch-then-deny", "failed")]
    assert risk_api.seen == []


# ------------------------------------------------------------------ flows of several actions


def test_several_actions_share_state_in_order() -> None:
    res = cli("run", EXAMPLES / "tag_account_tier.py", EXAMPLES / "check_country.py", EXAMPLES / "tag_then_claim.py",
              "--trigger", "post-login", "--event", EXAMPLES / "tag_then_claim.event.json")
    data = expect(res, EXIT_ALLOW)
    assert data["state"] == {"tag-account-tier": {"tier": "enterprise"}, "check-country": {"country_blocked": False}}
    assert statuses(data) == [("tag-account-tier", "ok"), ("check-country", "ok"), ("tag-then-claim", "ok")]


def test_a_deny_skips_later_actions() -> None:
    res = cli("run", EXAMPLES / "disposable_email.py", EXAMPLES / "tag_account_tier.py",
              "--trigger", "post-login", "--event", EXAMPLES / "disposable_email.event.json")
    data = expect(res, EXIT_DENY)
    assert statuses(data) == [("disposable-email", "denied"), ("tag-account-tier", "skipped")]
    assert data["state"] == {}


# ------------------------------------------------------------------ options


def test_event_from_stdin() -> None:
    res = cli("run", EXAMPLES / "tag_account_tier.py", "--trigger", "post-login", "--event", "-",
              stdin='{"user": {"email": "x@cymmetri.io"}}')
    assert expect(res, EXIT_ALLOW)["state"] == {"tag-account-tier": {"tier": "enterprise"}}


def test_secrets_reach_event_secrets(tmp_path: Path) -> None:
    action = write(tmp_path, "show_secrets.py",
                   "def on_execute(event, api):\n    api.state.set('secrets', event.secrets.to_dict())\n")
    res = cli("run", action, "--trigger", "post-login", "--event", "-", "--secret", "API_KEY=s3cr=t",
              "--secret", "EMPTY=", "--secret", "API_KEY2=two", stdin="{}")
    data = expect(res, EXIT_ALLOW)
    assert data["state"] == {"show-secrets": {"secrets": {"API_KEY": "s3cr=t", "EMPTY": "", "API_KEY2": "two"}}}


def test_timeout_kills_an_infinite_loop(tmp_path: Path) -> None:
    action = write(tmp_path, "spin.py", "def on_execute(event, api):\n    while True:\n        pass\n")
    data = expect(cli("run", action, "--trigger", "post-login", "--event", "-", "--timeout", "0.5", stdin="{}"),
                  EXIT_DENY)
    assert data["denial"]["kind"] == "timeout"
    assert data["denial"]["action"] == "spin"
    assert statuses(data) == [("spin", "failed")]


def test_memory_mb_is_accepted() -> None:
    data = expect(run_example("tag_account_tier", "post-login", "--memory-mb", "96"), EXIT_ALLOW)
    assert data["state"] == {"tag-account-tier": {"tier": "enterprise"}}


def test_compact_prints_one_line() -> None:
    res = run_example("tag_account_tier", "post-login", "--compact")
    expect(res, EXIT_ALLOW)
    assert res.stdout.count("\n") == 1


# ------------------------------------------------------------------ bad input: exit 2, a clear message, no JSON


def _usage_error(res: Cli, *fragments: str) -> None:
    assert res.rc == EXIT_USAGE, f"exit {res.rc}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    assert res.stdout == ""
    assert "Traceback" not in res.stderr, res.stderr
    for f in fragments:
        assert f in res.stderr, f"{f!r} not in stderr:\n{res.stderr}"


def test_missing_action_file() -> None:
    res = cli("run", EXAMPLES / "no_such_action.py", "--trigger", "post-login",
              "--event", EXAMPLES / "tag_account_tier.event.json")
    _usage_error(res, "actionpool: error:", "action file not found", "no_such_action.py")


def test_missing_event_file(tmp_path: Path) -> None:
    res = cli("run", EXAMPLES / "tag_account_tier.py", "--trigger", "post-login", "--event", tmp_path / "nope.json")
    _usage_error(res, "actionpool: error:", "cannot read event", "nope.json")


@pytest.mark.parametrize("text", ["{not json", "", '{"user": {}} trailing', "\xff"])
def test_event_not_json(tmp_path: Path, text: str) -> None:
    event = tmp_path / "bad.json"
    event.write_bytes(text.encode("latin-1"))
    res = cli("run", EXAMPLES / "tag_account_tier.py", "--trigger", "post-login", "--event", event)
    _usage_error(res, "actionpool: error:", "is not valid JSON")


def test_event_not_json_on_stdin() -> None:
    res = cli("run", EXAMPLES / "tag_account_tier.py", "--trigger", "post-login", "--event", "-", stdin="[1,")
    _usage_error(res, "event - is not valid JSON")


@pytest.mark.parametrize("text,kind", [("[1, 2]", "list"), ('"user"', "str"), ("42", "int"), ("null", "NoneType")])
def test_event_not_an_object(text: str, kind: str) -> None:
    res = cli("run", EXAMPLES / "tag_account_tier.py", "--trigger", "post-login", "--event", "-", stdin=text)
    _usage_error(res, "must be a JSON object", f"got {kind}")


def test_unknown_trigger() -> None:
    res = cli("run", EXAMPLES / "tag_account_tier.py", "--trigger", "post-logout",
              "--event", EXAMPLES / "tag_account_tier.event.json")
    _usage_error(res, "--trigger", "invalid choice: 'post-logout'", "post-login")


def test_trigger_is_required() -> None:
    res = cli("run", EXAMPLES / "tag_account_tier.py", "--event", EXAMPLES / "tag_account_tier.event.json")
    _usage_error(res, "--trigger")


@pytest.mark.parametrize("secret", ["NO_EQUALS_SIGN", "=value", ""])
def test_bad_secret(secret: str) -> None:
    res = run_example("tag_account_tier", "post-login", "--secret", secret)
    _usage_error(res, "--secret expects KEY=VALUE")


@pytest.mark.parametrize("value,fragment", [("0", "must be positive"), ("-1", "must be positive"),
                                            ("abc", "expected a float"), ("nan", "must be positive"),
                                            ("inf", "--timeout inf: must be a positive number")])
def test_bad_timeout(value: str, fragment: str) -> None:
    res = run_example("tag_account_tier", "post-login", "--timeout", value)
    _usage_error(res, fragment)


@pytest.mark.parametrize("value,fragment", [("0", "--memory-mb"), ("abc", "--memory-mb"), ("1.5", "--memory-mb"),
                                            ("16", "--memory-mb 16: must be at least 32")])
def test_bad_memory_mb(value: str, fragment: str) -> None:
    _usage_error(run_example("tag_account_tier", "post-login", "--memory-mb", value), fragment)


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/", "127.0.0.1:6379", "redis://127.0.0.1:notaport/0",
                                 "redis://127.0.0.1:6379/not-a-db"])
def test_bad_cache_url(url: str) -> None:
    res = run_example("tag_account_tier", "post-login", "--cache", url)
    _usage_error(res, "actionpool: error:", f"--cache {url}: ")


def test_no_command_is_a_usage_error() -> None:
    res = cli()
    assert res.rc == EXIT_USAGE
    assert "usage: actionpool" in res.stderr


def test_help_exits_zero() -> None:
    res = cli("run", "--help")
    assert res.rc == 0
    assert "--allow-host" in res.stdout and "--secret" in res.stdout


def test_readme_names_only_existing_example_files() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    named = set(re.findall(r"examples/[a-z_]+(?:\.event\.json|\.py)", readme))
    assert "examples/tag_account_tier.py" in named
    missing = sorted(n for n in named if not (ROOT / n).is_file())
    assert not missing, f"README.md names example files that do not exist: {missing}"


# ------------------------------------------------------------------ signals: SIGTERM / SIGINT close the runner


SPIN_ACTION = "def on_execute(event, api):\n    api.log('info', 'about to spin')\n    while True:\n        pass\n"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_closes_the_runner_and_denies_the_flow_as_shutdown(tmp_path: Path, sig: signal.Signals) -> None:
    """A spinning flow, then the signal: prompt exit 128+N, the flow denied ``shutdown``, no worker left."""
    action = write(tmp_path, "spin.py", SPIN_ACTION)
    event = write(tmp_path, "event.json", "{}")
    proc = subprocess.Popen([sys.executable, "-m", "actionpool.runner.cli", "run", str(action), "--trigger",
                             "post-login", "--event", str(event), "--timeout", "60"], cwd=ROOT,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        me = psutil.Process(proc.pid)
        deadline = time.monotonic() + 30
        spinning: list[psutil.Process] = []
        while not spinning:  # the worker is running the action once it has burnt some CPU
            assert time.monotonic() < deadline and proc.poll() is None, proc.poll()
            time.sleep(0.05)
            for p in me.children(recursive=True):
                try:
                    if p.cpu_times().user > 0.3:
                        spinning.append(p)
                except psutil.NoSuchProcess:
                    pass
        descendants = {p.pid for p in me.children(recursive=True)}
        t0 = time.monotonic()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=15)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + sig, (proc.returncode, err)
    assert elapsed < 10, elapsed  # "promptly": the action had 60 s left
    data = json.loads(out)
    assert data["denial"]["kind"] == "shutdown", data["denial"]
    assert data["actions"] == [{"slug": "spin", "status": "failed", "duration_ms": data["actions"][0]["duration_ms"]}]
    assert f"{sig.name}: closing the runner" in err
    alive, _zombies = _survivors(descendants, 5.0)
    assert alive == [], f"processes outlived actionpool run: {alive}"


# ------------------------------------------------------------------ run: invalid events and allowlist entries are usage errors


@pytest.mark.parametrize("event,fragment", [
    ({"blob": "x" * (2 << 20)}, "exceeds the 524288-byte limit"),
    ({"a": functools.reduce(lambda inner, _: [inner], range(100), 0)}, "deep"),
])
def test_an_event_the_runner_would_refuse_is_a_usage_error(tmp_path: Path, event: dict[str, Any], fragment: str) -> None:
    """Too large or too deep: exit 2 with the reason, before any worker starts (not exit 3 ``invalid_event``)."""
    path = tmp_path / "event.json"
    path.write_text(json.dumps(event), encoding="utf-8")
    res = cli("run", EXAMPLES / "tag_account_tier.py", "--trigger", "post-login", "--event", path)
    _usage_error(res, "actionpool: error: event", fragment)


@pytest.mark.parametrize("value,suggestion", [("http://x/", "x"), ("https://api.example.com:8443/v1/score",
                                                                       "api.example.com"), ("127.0.0.1/", "127.0.0.1")])
def test_allow_host_given_a_url_is_a_usage_error_with_a_hint(value: str, suggestion: str) -> None:
    res = run_example("tag_account_tier", "post-login", "--allow-host", value)
    _usage_error(res, "--allow-host", "expects a host name, not a URL", f"did you mean --allow-host {suggestion}?")


# ------------------------------------------------------------------ run --format pretty: the test pane


def test_pretty_format_shows_the_decision_logs_state_claims_and_timings() -> None:
    res = cli("run", EXAMPLES / "check_country.py", EXAMPLES / "tag_then_claim.py", "--trigger", "post-login",
              "--event", EXAMPLES / "tag_then_claim.event.json", "--format", "pretty")
    assert res.rc == EXIT_ALLOW, res.stderr
    out = res.stdout
    assert "ALLOW" in out and "DENY" not in out
    assert "Login from IN — blocked: False" in out and "info" in out        # logs with their levels
    assert '"country_blocked": false' in out                               # state, as JSON
    assert '"geo_country": "IN"' in out and '"access_token"' in out        # claims
    assert "metadata patch" in out and '"tier": "enterprise"' in out       # the metadata patch
    assert "check-country" in out and "tag-then-claim" in out and "ms" in out  # per-action timings
    assert "\x1b[" not in out  # not a terminal: no colour codes


def test_pretty_format_shows_the_denial_and_the_users_message() -> None:
    event = {"user": {"email": "grace@cymmetri.io", "phone_number": "98123 45678"}, "request": {}}
    res = run_example("validate_registration", "pre-user-registration", "--format", "pretty", event=event)
    assert res.rc == EXIT_DENY, res.stderr
    out = res.stdout
    assert "DENY" in out and "validation_error" in out and "validate-registration" in out
    assert "user sees:" in out and "Enter the phone number in international format" in out
    assert "invalid_phone_number" in out


def test_pretty_format_shows_a_traceback_and_warn_logs(tmp_path: Path) -> None:
    action = write(tmp_path, "boom.py", "def on_execute(event, api):\n    api.log('warn', 'careful')\n"
                                        "    raise ValueError('bad input')\n")
    res = cli("run", action, "--trigger", "post-login", "--event", "-", "--format", "pretty", stdin="{}")
    assert res.rc == EXIT_DENY
    assert "uncaught_error" in res.stdout and "ValueError: bad input" in res.stdout
    assert "careful" in res.stdout and "warn" in res.stdout


def test_json_stays_the_default_format() -> None:
    assert json.loads(run_example("tag_account_tier", "post-login").stdout)["outcome"] == "allow"


# ------------------------------------------------------------------ check: compile, find the handler, did you mean


def test_check_accepts_every_example() -> None:
    res = cli("check", *sorted(EXAMPLES.glob("*.py")))
    assert res.rc == 0, res.stdout + res.stderr
    assert "examples/tag_account_tier.py: ok: on_execute_post_login" in res.stdout
    assert res.stdout.count(": ok: ") == len(list(EXAMPLES.glob("*.py")))


def test_check_with_a_trigger_finds_the_specific_or_the_catch_all_handler(tmp_path: Path) -> None:
    both = write(tmp_path, "both.py", "def on_execute(event, api): pass\ndef on_execute_post_login(event, api): pass\n")
    catch_all = write(tmp_path, "any.py", "async def on_execute(event, api, *rest): pass\n")
    res = cli("check", both, catch_all, "--trigger", "post-login")
    assert res.rc == 0, res.stdout
    assert f"{both}: ok: on_execute_post_login for post-login" in res.stdout
    assert f"{catch_all}: ok: on_execute for post-login" in res.stdout


@pytest.mark.parametrize("name,guess", [
    ("on_execute_postlogin", "on_execute_post_login"),
    ("onExecutePostLogin", "on_execute_post_login"),
    ("on_execute_post_logn", "on_execute_post_login"),
    ("OnExecute", "on_execute"),
    ("on_exec", "on_execute"),
])
def test_check_suggests_the_handler_name_a_near_miss_meant(tmp_path: Path, name: str, guess: str) -> None:
    action = write(tmp_path, "typo.py", f"import json\n\ndef {name}(event, api):\n    pass\n")
    res = cli("check", action, "--trigger", "post-login")
    assert res.rc == 1, res.stdout
    assert f"{action}:3: {name} is not a handler name; did you mean {guess}?" in res.stdout
    assert f"{action}: no handler for post-login: define on_execute_post_login(event, api) or on_execute(event, api)" \
        in res.stdout


def test_check_reports_a_syntax_error_with_its_line(tmp_path: Path) -> None:
    action = write(tmp_path, "broken.py", "x = 1\ndef on_execute(event, api)\n    pass\n")
    res = cli("check", action)
    assert res.rc == 1
    assert f"{action}:2:" in res.stdout and "SyntaxError" in res.stdout


def test_check_reports_a_handler_for_another_trigger_and_a_bad_signature(tmp_path: Path) -> None:
    res = cli("check", EXAMPLES / "validate_registration.py", "--trigger", "post-login")
    assert res.rc == 1
    assert "found on_execute_pre_user_registration, for other triggers" in res.stdout
    one_arg = write(tmp_path, "one.py", "def on_execute_post_login(event):\n    pass\n")
    res = cli("check", one_arg)
    assert res.rc == 1
    assert f"{one_arg}:1: on_execute_post_login takes 1 argument(s)" in res.stdout


def test_check_never_runs_the_action(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    action = write(tmp_path, "side_effect.py", f"open({str(marker)!r}, 'w').close()\n"
                                               "def on_execute(event, api): pass\n")
    assert cli("check", action).rc == 0
    assert not marker.exists()


@pytest.mark.parametrize("args,fragment", [
    (("nope.py",), "nope.py: no such file"),
    (("README.md",), "no checker for .md"),
    (("examples/tag_account_tier.py", "--trigger", "post-logout"), "invalid choice: 'post-logout'"),
    ((), "the following arguments are required"),
])
def test_check_usage_errors_exit_2(args: tuple[str, ...], fragment: str) -> None:
    res = cli("check", *args)
    assert res.rc == EXIT_USAGE, (res.rc, res.stdout, res.stderr)
    assert fragment in res.stderr


# ------------------------------------------------------------------ bench from the CLI: every error on stderr


def test_bench_usage_error_is_printed() -> None:
    res = cli("bench", "--only", "nonsense")
    assert res.rc == EXIT_USAGE
    assert "actionpool bench: error: --only: unknown phase(s) nonsense" in res.stderr
