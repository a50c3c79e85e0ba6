"""Where a newcomer stopped, guessed or was misled (issue 19): one test per message, on the real command.

Each test runs ``python -m actionpool.runner.cli`` (or ``serve``) as a
subprocess, as a new user would type it, and checks the exit status and that
the message names what went wrong and what to do: a directory or a ``.json``
file given as an action (refused by ``run`` and ``check`` alike), an action
and an event swapped, a bad ``--memory-mb`` named by its flag, a near-miss
trigger, a third-party import, running out of memory, and ``serve`` on a port
in use or with its Redis down at start.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from actionpool.runner._errors import ConfigError
from actionpool.runner._hints import STDLIB_ONLY, failure_reason
from actionpool.sidecar._config import load_config
from net_fixtures import free_port

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
CLI_TIMEOUT_S = 50
EXIT_USAGE, EXIT_DENY, EXIT_START_FAILED = 2, 3, 3
ACTION = EXAMPLES / "tag_account_tier.py"
EVENT = EXAMPLES / "tag_account_tier.event.json"


@dataclass
class Cli:
    rc: int
    stdout: str
    stderr: str

    def explain(self) -> str:
        return f"exit {self.rc}\nstdout:\n{self.stdout[-2000:]}\nstderr:\n{self.stderr[-2000:]}"

    def denial(self) -> dict[str, Any]:
        assert self.rc == EXIT_DENY, self.explain()
        denial = json.loads(self.stdout)["denial"]
        assert denial is not None, self.explain()
        return denial


def cli(*args: str | os.PathLike[str], cwd: Path = ROOT) -> Cli:
    proc = subprocess.run([sys.executable, "-m", "actionpool.runner.cli", *map(str, args)], cwd=cwd,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    return Cli(proc.returncode, proc.stdout, proc.stderr)


def usage_error(res: Cli, *fragments: str) -> str:
    """Exit 2, nothing on stdout, one ``actionpool...: error:`` line that holds every fragment; that line."""
    assert res.rc == EXIT_USAGE, res.explain()
    assert res.stdout == "" and "Traceback" not in res.stderr, res.explain()
    line = res.stderr.strip().splitlines()[-1]
    assert "error:" in line, res.explain()
    for f in fragments:
        assert f in line, f"{f!r} not in {line!r}"
    return line


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text), encoding="utf-8")
    return p


# ------------------------------------------------------------------ files given in the wrong place


def test_check_on_a_directory_says_it_is_a_directory_as_run_does() -> None:
    checked = usage_error(cli("check", "examples"), "examples is a directory", "examples/*.py")
    ran = usage_error(cli("run", "examples", "--trigger", "post-login", "--event", EVENT))
    assert checked.split("error: ", 1)[1] == ran.split("error: ", 1)[1]


@pytest.mark.parametrize("action,event", [("x.event.json", "x.py"), ("examples/tag_account_tier.event.json",
                                                                      "examples/tag_account_tier.py")])
def test_an_action_and_an_event_swapped_are_named_as_swapped(action: str, event: str) -> None:
    line = usage_error(cli("run", action, "--trigger", "post-login", "--event", event), "look swapped")
    assert f"(actionpool run {event} --trigger post-login --event {action})" in line
    assert "must match" not in line  # not the slug rule the file name happened to break


def test_an_action_file_as_the_event_alone_is_named() -> None:
    usage_error(cli("run", ACTION, "--trigger", "post-login", "--event", ACTION),
                f"--event {ACTION} looks like an action file", "did you swap")


def test_a_json_file_as_the_action_is_refused_by_run_and_check_alike(tmp_path: Path) -> None:
    """It used to run as Python (HandlerNotFound); now neither command runs or checks it."""
    marker = tmp_path / "ran"
    action = write(tmp_path, "action.json", f'open({str(marker)!r}, "w")\n')
    ran = usage_error(cli("run", action, "--trigger", "post-login", "--event", EVENT),
                      "not an action file", "no checker for .json", "give it with --event")
    checked = usage_error(cli("check", action), "not an action file", "no checker for .json")
    assert ran.split("error: ", 1)[1].startswith(checked.split("error: ", 1)[1])
    assert not marker.exists()


# ------------------------------------------------------------------ options


@pytest.mark.parametrize("value", ["8", "31"])
def test_memory_mb_too_small_names_the_flag_not_the_config_key(value: str) -> None:
    line = usage_error(cli("run", ACTION, "--trigger", "post-login", "--event", EVENT, "--memory-mb", value),
                       f"--memory-mb {value}: must be at least 32")
    assert "limits.memory_mb" not in line


def test_a_config_file_names_the_key(tmp_path: Path) -> None:
    """The key, not the flag, where the value came from a config file."""
    path = write(tmp_path, "serve.toml", "[runner.limits]\nmemory_mb = 8\n[tenants.acme]\n")
    with pytest.raises(ConfigError, match=r"limits\.memory_mb must be at least 32") as info:
        load_config(str(path))
    assert "--memory-mb" not in str(info.value)


@pytest.mark.parametrize("command", ["run", "check"])
@pytest.mark.parametrize("given", ["postlogin", "post_login", "PostLogin", "post-logn"])
def test_a_near_miss_trigger_gets_did_you_mean(command: str, given: str) -> None:
    args = ["run", ACTION, "--trigger", given, "--event", EVENT] if command == "run" else \
        ["check", ACTION, "--trigger", given]
    usage_error(cli(*args), f"invalid choice: {given!r}", "did you mean post-login?")


def test_a_trigger_nothing_like_any_gets_the_list_only() -> None:
    line = usage_error(cli("check", ACTION, "--trigger", "zzz"), "invalid choice: 'zzz'", "pre-user-registration")
    assert "did you mean" not in line


# ------------------------------------------------------------------ what a failed action's denial says


def test_a_third_party_import_says_actions_have_the_standard_library_only(tmp_path: Path) -> None:
    """``import requests`` in a fresh venv; here a package that is surely not installed anywhere."""
    action = write(tmp_path, "risk.py", """\
        import acme_risk_sdk_not_installed

        def on_execute_post_login(event, api):
            pass
        """)
    d = cli("run", action, "--trigger", "post-login", "--event", EVENT).denial()
    assert d["kind"] == "uncaught_error" and d["error_code"] == "ModuleNotFoundError", d
    assert d["reason"] == f"ModuleNotFoundError: No module named 'acme_risk_sdk_not_installed' ({STDLIB_ONLY})"
    assert "api.fetch" in d["reason"]


@pytest.mark.parametrize("message,hinted", [
    ("No module named 'requests'", True),
    ("No module named 'requests.adapters'", True),
    ("No module named 'xml.nope'", False),          # a standard-library package: no claim about third parties
    ("cannot import name 'x' from 'json'", False),
])
def test_the_import_hint_is_for_third_party_modules_only(message: str, hinted: bool) -> None:
    reason = failure_reason({"type": "ModuleNotFoundError", "message": message}, "uncaught_error", 128)
    assert reason.startswith(f"ModuleNotFoundError: {message}")
    assert (STDLIB_ONLY in reason) is hinted


@pytest.mark.parametrize("memory_mb", [None, "64"])
def test_a_huge_allocation_names_the_limit_and_how_to_raise_it(tmp_path: Path, memory_mb: str | None) -> None:
    """A 2 GB bytearray: MemoryError with an empty message of its own; the reason says which limit and where."""
    action = write(tmp_path, "big.py", """\
        def on_execute_post_login(event, api):
            data = bytearray(2 * 1024 ** 3)
        """)
    extra = ["--memory-mb", memory_mb] if memory_mb else []
    d = cli("run", action, "--trigger", "post-login", "--event", EVENT, *extra).denial()
    assert d["kind"] == "memory_limit", d
    assert f"the limit is {memory_mb or 128} MB" in d["reason"], d
    assert "--memory-mb" in d["reason"] and "limits.memory_mb" in d["reason"], d
    assert d["reason"] != "MemoryError: "


def test_a_memory_kill_names_the_limit_too() -> None:
    reason = failure_reason({"kind": "memory_limit", "message": "worker killed for exceeding its memory limit "
                             "(SIGKILL(-9))"}, "memory_limit", 96)
    assert reason.startswith("worker killed for exceeding its memory limit (SIGKILL(-9)); the limit is 96 MB")
    assert "--memory-mb" in reason and "limits.memory_mb" in reason


def test_other_failures_keep_their_reason() -> None:
    assert failure_reason({"type": "KeyError", "message": "'x'"}, "uncaught_error", 128) == "KeyError: 'x'"
    assert failure_reason({"message": "action exceeded its 5s time limit"}, "timeout", 128) == \
        "action exceeded its 5s time limit"
    assert failure_reason({}, "worker_crash", 128) == "worker_crash"


# ------------------------------------------------------------------ serve at start


SERVE_CONFIG = "[runner]\npool_size = 1\n[tenants.acme]\n"


def serve(config: Path, port: int, *extra: str) -> Cli:
    proc = subprocess.run([sys.executable, "-m", "actionpool.runner.cli", "serve", "--config", str(config),
                           "--port", str(port), *extra], cwd=config.parent, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    return Cli(proc.returncode, proc.stdout, proc.stderr)


def one_error_line(res: Cli, rc: int) -> str:
    assert res.rc == rc, res.explain()
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("actionpool serve: error: "), res.explain()
    return lines[0]


def test_serve_on_a_port_in_use_says_so_in_one_line(tmp_path: Path) -> None:
    config = write(tmp_path, "serve.toml", SERVE_CONFIG)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = one_error_line(serve(config, port), EXIT_START_FAILED)
    assert f"port {port} on 127.0.0.1: address already in use" in line and "--port" in line


def test_serve_with_its_redis_down_at_start_names_the_url_in_one_line(tmp_path: Path) -> None:
    """A closed loopback port stands for a Redis that is down; the password in the URL is never printed."""
    with socket.socket() as closed:  # bound, never listening: connections to it are refused
        closed.bind(("127.0.0.1", 0))
        dead = closed.getsockname()[1]
        config = write(tmp_path, "serve.toml",
                       SERVE_CONFIG + f'[store]\nurl = "redis://:s3cret-pw@127.0.0.1:{dead}/0"\n')
        line = one_error_line(serve(config, free_port()), EXIT_START_FAILED)
    assert f"the store at redis://:***@127.0.0.1:{dead}/0 ([store] url in {config})" in line
    assert "cannot be reached" in line and "start Redis there, or fix the URL" in line
    assert "s3cret-pw" not in line


@pytest.mark.parametrize("args,fragment", [(("--port", "70000"), "--port 70000 is not a TCP port"),
                                           (("--host", "no-such-host.invalid"),
                                            "--host no-such-host.invalid: not an address of this machine")])
def test_serve_with_a_port_or_host_that_can_never_work_is_a_usage_error(tmp_path: Path, args: tuple[str, ...],
                                                                         fragment: str) -> None:
    """With a token, so a non-loopback --host passes that rule and reaches the address check."""
    config = write(tmp_path, "serve.toml", SERVE_CONFIG + '[server]\ntoken_env = "AP_NEWCOMER_TOKEN"\n')
    proc = subprocess.run([sys.executable, "-m", "actionpool.runner.cli", "serve", "--config", str(config), *args],
                          cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S, env={**os.environ, "AP_NEWCOMER_TOKEN": "newcomer-token-1234"})
    assert fragment in one_error_line(Cli(proc.returncode, proc.stdout, proc.stderr), EXIT_USAGE)


def test_serve_exit_codes_are_documented() -> None:
    gateway = (ROOT / "docs" / "gateway.md").read_text(encoding="utf-8")
    section = gateway[gateway.index("## Exit codes of `serve`"):]
    section = section[:section.index("\n## ", 4)]
    for code in ("| 0 |", "| 2 |", "| 3 |", "| 130 |"):
        assert code in section, code
    assert "address already in use" in section and "cannot be reached" in section
    assert "`serve`'s exit codes" in (ROOT / "README.md").read_text(encoding="utf-8")
