"""README.md, as a newcomer reads it: its commands run as printed, and its option table says what the parser does.

The commands of the README's example block (under "## Examples") are parsed
from the file and run exactly as printed, each in ``bash -c`` from the
repository root (the README says "from the repository root"), as real
subprocesses with a time bound. A command's expected exit status is the
``exit N`` its trailing comment gives, else 0. The Redis lines (a throwaway
redis-server, two runs that share a counter, its shutdown) run in order in
one test, which is skipped, saying why, only where redis-server or redis-cli
is not installed. Quick start: its ``actionpool`` commands (the install and the
suite itself are what the fresh-venv trial runs, not a test).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from actionpool.runner import cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
COMMAND_TIMEOUT_S = 50  # below pytest's 60 s per test: a hung command fails with its output
RESULT_KEYS = {"outcome", "denial", "app_metadata", "user_metadata", "user_id", "claims", "state", "logs",
               "actions", "flow_id", "tenant", "trigger", "duration_ms"}


# ------------------------------------------------------------------ reading the README


def section(heading: str) -> str:
    """The text of ``## heading`` up to the next ``## `` heading."""
    start = README.index(f"\n## {heading}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end != -1 else len(README)]


def code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def commands(block: str) -> list[str]:
    """Shell commands of a block: comment lines dropped, ``\\`` and ``|`` continuations joined as bash would."""
    out: list[str] = []
    pending = ""
    for line in block.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line + "\n"
        code = line.split(" #", 1)[0].rstrip()
        if not (code.endswith("\\") or code.endswith("|")):
            out.append(pending.rstrip("\n"))
            pending = ""
    assert not pending, f"a command in README.md continues past its block: {pending!r}"
    return out


def expected_exit(command: str) -> int:
    m = re.search(r"#[^\n']*\bexit (\d+)", command)
    return int(m.group(1)) if m else 0


EXAMPLE_BLOCKS = code_blocks(section("Examples"), "sh")
assert len(EXAMPLE_BLOCKS) == 1, "README.md's Examples section should have one sh block"
EXAMPLE_COMMANDS = commands(EXAMPLE_BLOCKS[0])
REDIS_COMMANDS = [c for c in EXAMPLE_COMMANDS if "redis" in c]
PLAIN_COMMANDS = [c for c in EXAMPLE_COMMANDS if "redis" not in c]


# ------------------------------------------------------------------ running a command as printed


@dataclass
class Ran:
    command: str
    rc: int
    stdout: str
    stderr: str

    def explain(self) -> str:
        return f"$ {self.command}\nexit {self.rc}\nstdout:\n{self.stdout[-3000:]}\nstderr:\n{self.stderr[-3000:]}"

    def result(self) -> dict[str, Any]:
        data = json.loads(self.stdout)
        assert set(data) == RESULT_KEYS, self.explain()
        return data


def shell(command: str) -> Ran:
    """``command`` in bash from the repository root, with this interpreter's ``actionpool`` first on PATH."""
    bindir = Path(sys.executable).parent
    assert (bindir / "actionpool").exists(), f"the actionpool console script is not installed in {bindir}"
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    return Ran(command, proc.returncode, proc.stdout, proc.stderr)


def check_ran(ran: Ran) -> None:
    """The documented exit status; an ``actionpool run`` prints one FlowResult that agrees with it."""
    want = expected_exit(ran.command)
    assert ran.rc == want, f"expected exit {want}\n" + ran.explain()
    if re.search(r"\bactionpool run\b", ran.command):
        data = ran.result()
        assert data["outcome"] == ("allow" if want == 0 else "deny"), ran.explain()


def test_the_example_block_was_read() -> None:
    """A parser that found nothing would make every test below vacuous."""
    assert len(PLAIN_COMMANDS) >= 5 and len(REDIS_COMMANDS) >= 4, EXAMPLE_COMMANDS
    runs = [c for c in EXAMPLE_COMMANDS if "actionpool run" in c]
    named = {m for c in runs for m in re.findall(r"examples/(\w+)\.py", c)}
    assert named >= {"disposable_email", "validate_registration", "fetch_then_deny", "signup_rate_limit"}, named


@pytest.mark.parametrize("command", PLAIN_COMMANDS, ids=[f"cmd{i}" for i in range(len(PLAIN_COMMANDS))])
def test_readme_example_command_runs_as_printed(command: str) -> None:
    check_ran(shell(command))


def test_readme_fetch_example_is_answered_by_the_bundled_stub() -> None:
    """Offline: the stub answers the risk API; the action logs the score and allows."""
    (command,) = [c for c in PLAIN_COMMANDS if "fetch_then_deny" in c]
    assert "--fetch-stub examples/" in command
    data = shell(command).result()
    assert data["outcome"] == "allow" and data["state"] == {"fetch-then-deny": {"external_risk_score": 37}}


REDIS_TOOLS = [t for t in ("redis-server", "redis-cli") if shutil.which(t) is None]


def _port_of(commands_: list[str]) -> int:
    found = [m.group(1) or m.group(2) for c in commands_
             for m in re.finditer(r"(?:--port|-p) (\d+)|127\.0\.0\.1:(\d+)", c)]
    ports = {int(p) for p in found}
    assert len(ports) == 1, f"the README's Redis lines should use one port, found {ports}"
    return ports.pop()


@pytest.mark.skipif(bool(REDIS_TOOLS), reason=f"{' and '.join(REDIS_TOOLS)} not installed: the README's Redis "
                    "lines (a throwaway redis-server) cannot run here; the memory-cache line still runs")
@pytest.mark.timeout(150)
def test_readme_redis_example_commands_run_as_printed_in_order() -> None:
    """Start a throwaway redis-server, two runs share the counter (1 then 2), shut it down: as printed."""
    port = _port_of(REDIS_COMMANDS)
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0, f"port {port} is in use: the README's Redis needs it"
    assert "redis-server" in REDIS_COMMANDS[0] and "shutdown" in REDIS_COMMANDS[-1], REDIS_COMMANDS
    counts: list[int] = []
    done = 0
    try:
        for command in REDIS_COMMANDS:
            ran = shell(command)
            done += 1
            check_ran(ran)
            if "actionpool run" in command:
                counts.append(ran.result()["state"]["signup-rate-limit"]["signups_this_hour"])
    finally:
        if done < len(REDIS_COMMANDS):  # never leave the throwaway server behind
            shell(REDIS_COMMANDS[-1])
    assert counts == [1, 2], counts
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0, "the README's shutdown line left redis-server running"


def test_quick_start_run_and_check_commands_work_as_printed() -> None:
    """Quick start: the run of command 1 (after its pip install) prints what the README shows; check is clean."""
    quick = section("Quick start")
    (block,) = code_blocks(quick, "sh")
    lines = commands(block)
    assert lines[0].startswith("pip install -e . && actionpool run "), lines
    assert lines[1] == "bash .ci/run", lines
    run = shell(lines[0].split(" && ", 1)[1])
    check_ran(run)
    shown = json.loads(code_blocks(quick, "json")[0])
    got = run.result()
    for key in ("outcome", "denial", "state", "claims", "tenant", "trigger"):
        assert got[key] == shown[key], (key, got[key], shown[key])
    check = re.search(r"`(actionpool check [^`]+)`", quick)
    assert check is not None
    ran = shell(check.group(1))
    assert ran.rc == 0 and ": ok: on_execute_post_login" in ran.stdout, ran.explain()


# ------------------------------------------------------------------ the option table against the parser


def option_rows() -> dict[str, str]:
    """``--flag`` -> the meaning column of the CLI reference's option table."""
    table = section("CLI reference")
    rows = re.findall(r"^\| `(--[a-z-]+)[^`]*` \| (.*) \|$", table, flags=re.M)
    assert rows, "no option table found in README.md's CLI reference"
    return dict(rows)


def documented_default(meaning: str) -> str | None:
    """``(default 5)``, ``(default `default`)``, or a choice marked ``\\`strict\\` (default...``."""
    m = re.search(r"`([^`]+)` \(default\b", meaning)
    if m:
        return m.group(1)
    m = re.search(r"\(default:? (?:`([^`]*)`|([^),;]+))", meaning)
    if m:
        return (m.group(1) if m.group(1) is not None else m.group(2)).strip()
    return None


def effective_defaults() -> dict[str, Any]:
    """What ``run`` uses when an option is not given: the parser's default, else the config it builds."""
    parser = cli._parser()
    run = parser._subparsers._group_actions[0].choices["run"]  # type: ignore[union-attr]
    args = parser.parse_args(["run", "a.py", "--trigger", "post-login", "--event", "e.json"])
    config = cli._config(args)
    out: dict[str, Any] = {}
    for action in run._actions:
        flag = next((o for o in action.option_strings if o.startswith("--")), None)
        if flag is None or flag == "--help":
            continue
        out[flag] = action.default
    for key, (flag, _dest) in cli._FLAG_OF_KEY.items():
        node: Any = config
        for part in key.split("."):
            node = getattr(node, part)
        out[flag] = node
    out["--denial-message"] = config.denial_message
    return out


def same(documented: str, actual: Any) -> bool:
    if isinstance(actual, (int, float)) and not isinstance(actual, bool):
        try:
            return float(documented) == float(actual)
        except ValueError:
            return False
    return documented == str(actual)


def test_the_option_table_states_every_default_the_parser_has() -> None:
    rows = option_rows()
    defaults = effective_defaults()
    assert set(rows) == set(defaults), f"options missing from README: {sorted(set(defaults) - set(rows))}; " \
                                       f"documented but not in the parser: {sorted(set(rows) - set(defaults))}"
    for flag, meaning in rows.items():
        doc, actual = documented_default(meaning), defaults[flag]
        if actual in (None, False, []):  # nothing to state (a flag, a repeatable list, a required option)
            assert doc is None, f"{flag}: README says default {doc!r}, the parser has none"
            continue
        assert doc is not None, f"{flag}: the parser's default is {actual!r}; README.md states none"
        assert same(doc, actual), f"{flag}: README.md says default {doc!r}, the parser uses {actual!r}"


def test_the_sandbox_default_agrees_everywhere() -> None:
    """The parser, the config, README (table and SandboxConfig), docs/security.md and benchmarks/README.md."""
    from actionpool.runner import SandboxConfig

    assert effective_defaults()["--sandbox"] == SandboxConfig().mode == "strict"
    assert documented_default(option_rows()["--sandbox"]) == "strict"
    assert "`mode` (`strict`, the default;" in README
    security = (ROOT / "docs" / "security.md").read_text(encoding="utf-8")
    assert "`actionpool run --sandbox` defaults to `strict`" in security
    bench = (ROOT / "benchmarks" / "README.md").read_text(encoding="utf-8")
    assert "default sandbox mode (`strict`" in bench
    for text in (README, security, bench):
        assert not re.search(r"`degraded`:? \(?default|default[^.\n]{0,30}\(`degraded`", text), text[:0]
