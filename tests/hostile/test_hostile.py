"""The hostile-action corpus: every attack in ``actions/`` run on real, sandboxed workers.

Each attack is one action file. The table below says how its flow must end:
with the exact ``denial.kind`` when the supervisor has to kill the worker, or
allowed when the OS refused the attack inside the action (the action then
records the errno it got, and that errno names the layer that stopped it).
Every case also checks that the attack's effect did not happen, that no
secret reached the result or the logs, that the attacked worker ended the way
it should, that the supervisor serves a normal flow right after, and that no
descriptor leaked (no process leaks: tests/conftest.py checks that).

When the protection that stops an attack is not active on the host (see
``Runner.sandbox_report``), the case is skipped with the reason, never passed.
"""

from __future__ import annotations

import dataclasses

import asyncio
import errno
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import psutil
import pytest

from conftest import make_runner
from actionpool.runner import Action, Limits, MemoryAuditSink, Runner, RunnerConfig, SandboxConfig

ACTIONS = Path(__file__).resolve().parent / "actions"
CONFIG = RunnerConfig(pool_size=1, max_workers=4, limits=Limits(action_timeout_s=1.0, memory_mb=128),
                      sandbox=SandboxConfig(mode="degraded"))
TENANT = "victim-tenant"
FD_SLACK = 2
SIGKILLED = -signal.SIGKILL

# A normal action: it uses the builtins an attack may have poisoned, and the api.
NORMAL = Action(slug="normal", source=(
    "def on_execute(event, api):\n"
    "    print('normal', len('ab'))\n"
    "    api.state.set('ok', isinstance(event.user, object))\n"
))


# --------------------------------------------------------------------------------------------
# what the attacks aim at

@dataclass
class Targets:
    """Real things on this machine an attack would reach if a protection failed."""

    dir: Path
    tcp: socket.socket
    udp: socket.socket
    other_tenant_file: Path
    file_canary: str
    env_canary: str
    shadow_line: str | None

    def event(self) -> dict[str, Any]:
        return {"user": {"user_id": "auth0|victim"}, "attack": {
            "marker": str(self.dir / "marker"),
            "port": self.tcp.getsockname()[1],
            "udp_port": self.udp.getsockname()[1],
            "path": str(self.dir / "dropped-in-tmp"),
            "other": str(self.other_tenant_file),
            "name": "dropped-in-cwd",
        }}

    def secrets(self) -> list[str]:
        return [s for s in (self.file_canary, self.env_canary, self.shadow_line) if s]


@pytest.fixture
def targets(monkeypatch: pytest.MonkeyPatch) -> Iterator[Targets]:
    d = Path(tempfile.mkdtemp(prefix="hostile-"))
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    tcp.setblocking(False)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    file_canary = "CANARY-OTHER-TENANT-" + os.urandom(8).hex()
    other_dir = d / "tenant-other"
    other_dir.mkdir()
    other = other_dir / "their_action.py"
    other.write_text(f"SECRET = {file_canary!r}\n")
    other.chmod(0o600)
    env_canary = "CANARY-SUPERVISOR-ENV-" + os.urandom(8).hex()
    monkeypatch.setenv("ACTIONPOOL_HOSTILE_CANARY", env_canary)
    try:
        with open("/etc/shadow") as f:
            shadow_line = f.readline().strip() or None
    except OSError:
        shadow_line = None
    try:
        yield Targets(d, tcp, udp, other, file_canary, env_canary, shadow_line)
    finally:
        tcp.close()
        udp.close()
        shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# which layer stops what

def _active(report: dict[str, Any], protection: str) -> bool:
    if protection == "landlock_net":      # TCP connect rules: Landlock ABI 4
        return bool(report.get("landlock")) and report.get("landlock_abi", 0) >= 4
    if protection == "landlock_signal":   # signal scoping: Landlock ABI 6
        return bool(report.get("landlock")) and report.get("landlock_abi", 0) >= 6
    return bool(report.get(protection))


def expected_errno(report: dict[str, Any], layers: tuple[tuple[str, int], ...]) -> int:
    """The errno the first active layer answers with; skip when none of them is active."""
    for protection, err in layers:
        if _active(report, protection):
            return err
    pytest.skip(f"none of the protections that stop this attack is active on this host "
                f"({', '.join(p for p, _ in layers)}): sandbox errors {report.get('errors')}")


# --------------------------------------------------------------------------------------------
# the table

@dataclass
class Seen:
    """What one attack run produced, handed to the case's effect check."""

    result: dict[str, Any]
    state: dict[str, Any]
    targets: Targets
    runner: Runner
    worker: Any            # the runner's WorkerHandle that ran the attack
    errno: int | None      # the errno the OS must have answered with (refused-inside-the-action cases)


@dataclass(frozen=True)
class Attack:
    file: str
    kind: str | None                             # exact denial.kind; None: the flow is allowed
    reason: str = ""                             # substring of denial.reason
    exit: int | None = SIGKILLED                 # how the attacked worker ends; None: it stays alive
    layers: tuple[tuple[str, int], ...] = ()     # (protection, errno) in order; skip when none is active
    check: Callable[[Seen], None] | None = None  # the attack's effect did not happen
    limits: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.file


def errno_recorded(seen: Seen) -> None:
    assert seen.state.get("errno") == seen.errno, seen.state


def no_children(seen: Seen) -> None:
    assert psutil.Process(seen.worker.pid).children(recursive=True) == []


def check_fork(seen: Seen) -> None:
    assert seen.state == {"forked": 0, "errnos": [seen.errno]}
    no_children(seen)


def check_marker(seen: Seen) -> None:
    assert not (seen.targets.dir / "marker").exists(), "the shell ran"
    no_children(seen)


def check_spawn(seen: Seen) -> None:
    errno_recorded(seen)
    check_marker(seen)


def check_os_system(seen: Seen) -> None:
    # glibc's system() answers 127 when it could not run the shell at all
    assert os.waitstatus_to_exitcode(seen.state["rc"]) == 127, seen.state
    check_marker(seen)


def check_tcp(seen: Seen) -> None:
    errno_recorded(seen)
    assert "connected" not in seen.state
    with pytest.raises(BlockingIOError):
        seen.targets.tcp.accept()[0].close()


def check_udp(seen: Seen) -> None:
    errno_recorded(seen)
    assert "sent" not in seen.state
    with pytest.raises(BlockingIOError):
        seen.targets.udp.recvfrom(4096)


def check_dns(seen: Seen) -> None:
    assert seen.state == {"errno": seen.errno, "error": "gaierror"}


def check_write_tmp(seen: Seen) -> None:
    errno_recorded(seen)
    assert not (seen.targets.dir / "dropped-in-tmp").exists()


def check_write_cwd(seen: Seen) -> None:
    errno_recorded(seen)
    cwd = seen.state["cwd"]
    workdir = seen.runner._launcher.workdir  # noqa: SLF001 - the sandbox's working directory
    # in the minimal filesystem view the host workdir does not exist: the worker sits in the view's empty "/"
    assert cwd == ("/" if seen.runner.sandbox_report.get("fs_view") else workdir)
    assert not os.path.exists(os.path.join(workdir, "dropped-in-cwd"))


def check_read(seen: Seen) -> None:
    errno_recorded(seen)
    assert "read" not in seen.state


def check_proc(seen: Seen) -> None:
    st = seen.state
    assert st["ppid"] == os.getpid()
    assert {k: st[k] for k in ("environ", "cmdline", "mem")} == dict.fromkeys(("environ", "cmdline", "mem"), seen.errno)
    # the worker's own environment is the scrubbed one: nothing of the supervisor's
    own = [e["message"] for e in seen.result["logs"] if e["message"].startswith("own environment: ")]
    assert own and "ACTIONPOOL_HOSTILE_CANARY" not in own[0]


def check_kill(seen: Seen) -> None:
    errno_recorded(seen)
    assert "killed" not in seen.state
    assert psutil.Process().status() != psutil.STATUS_ZOMBIE


def check_ptrace(seen: Seen) -> None:
    assert seen.state == {"rc": -1, "errno": seen.errno}
    status = Path(f"/proc/{os.getpid()}/status").read_text()
    assert "\nTracerPid:\t0\n" in status


def check_bounded_logs(seen: Seen) -> None:
    assert len(seen.result["logs"]) <= Limits().max_log_entries


def check_threads(seen: Seen) -> None:
    assert seen.state["error"] == "RuntimeError" and seen.state["message"] == "can't start new thread"
    assert "started" not in seen.state and seen.state["threads"] == 1
    assert psutil.Process(seen.worker.pid).num_threads() == 1  # nothing outlived the handler


def check_not_hijacked(seen: Seen) -> None:
    assert seen.result["user_id"] is None


def nothing_after_forgery(seen: Seen) -> None:
    assert seen.result["actions"][0]["status"] == "failed"


SECCOMP_EPERM = (("seccomp", errno.EPERM),)
# The minimal filesystem view answers first: a host path is not even a name there.
FILE_READ = (("fs_view", errno.ENOENT), ("landlock", errno.EACCES), ("uid_drop", errno.EACCES))

ATTACKS = [
    # CPU: only the wall-clock timer ends them, and only SIGKILL is certain
    Attack("infinite_loop", "timeout", "1s time limit"),
    Attack("busy_loop_catch_all", "timeout", "1s time limit"),
    Attack("sigterm_ignored", "timeout", "1s time limit"),
    # memory
    Attack("memory_list", "memory_limit"),
    Attack("memory_bytes", "memory_limit", "MemoryError"),
    Attack("memory_string_doubling", "memory_limit"),
    Attack("memory_catch", "memory_limit"),
    Attack("deep_recursion", "uncaught_error", "RecursionError: maximum recursion depth exceeded"),
    Attack("deep_recursion_unlimited", "memory_limit"),
    # processes
    Attack("fork_bomb", None, exit=None, layers=SECCOMP_EPERM + (("uid_drop", errno.EAGAIN),), check=check_fork),
    Attack("subprocess_popen", None, exit=None, layers=SECCOMP_EPERM, check=check_spawn),
    # either layer leaves system() unable to run the shell; it then answers exit status 127, not an errno
    Attack("os_system", None, exit=None, layers=SECCOMP_EPERM + (("landlock", errno.EACCES),), check=check_os_system),
    Attack("os_execv", None, exit=None, layers=SECCOMP_EPERM + (("landlock", errno.EACCES),), check=check_spawn),
    Attack("threads", None, exit=None, layers=SECCOMP_EPERM, check=check_threads),
    # network
    Attack("tcp_connect", None, exit=None, check=check_tcp,
           layers=SECCOMP_EPERM + (("netns", errno.ENETUNREACH), ("landlock_net", errno.EACCES))),
    Attack("udp_send", None, exit=None, check=check_udp, layers=SECCOMP_EPERM + (("netns", errno.ENETUNREACH),)),
    Attack("dns_lookup", None, exit=None, check=check_dns, layers=(("landlock", socket.EAI_AGAIN),)),
    # files
    Attack("write_tmp", None, exit=None, check=check_write_tmp, layers=SECCOMP_EPERM + (("landlock", errno.EACCES),)),
    Attack("write_cwd", None, exit=None, check=check_write_cwd,
           layers=SECCOMP_EPERM + (("landlock", errno.EACCES), ("caps", errno.EACCES))),
    Attack("read_shadow", None, exit=None, check=check_read, layers=FILE_READ),
    Attack("read_other_tenant", None, exit=None, check=check_read, layers=FILE_READ),
    Attack("read_supervisor_proc", None, exit=None, check=check_proc, layers=FILE_READ + (("caps", errno.EACCES),)),
    # the supervisor process
    Attack("kill_supervisor", None, exit=None, check=check_kill,
           layers=SECCOMP_EPERM + (("landlock_signal", errno.EPERM), ("uid_drop", errno.EPERM))),
    Attack("ptrace_supervisor", None, exit=None, check=check_ptrace,
           layers=SECCOMP_EPERM + (("landlock", errno.EPERM), ("uid_drop", errno.EPERM))),
    # the reply pipe (fd 4)
    Attack("close_reply_pipe", "worker_crash", "worker died: exit code 71", exit=71),
    Attack("close_reply_pipe_hang", "protocol_error", "worker closed its pipe mid-execution",
           limits={"action_timeout_s": 5.0}),
    Attack("garbage_reply_pipe", "protocol_error", "MalformedFrame"),
    Attack("huge_length_prefix", "protocol_error", "FrameTooLarge: frame of 4294967295 bytes"),
    Attack("forged_answers", "protocol_error", "response to unknown message id 1", check=nothing_after_forgery),
    Attack("second_answer", "protocol_error", "Response after the execution's answer", check=nothing_after_forgery),
    Attack("forged_answer_then_deny", "protocol_error", check=nothing_after_forgery),
    # output
    Attack("log_flood", "output_limit", "more than 100 log entries", check=check_bounded_logs),
    Attack("stdout_flood", "output_limit", "more than 100 log entries", check=check_bounded_logs),
    # leaving
    Attack("sys_exit", "worker_crash", "worker died: exit code 0", exit=0),
    Attack("os_exit", "worker_crash", "worker died: exit code 0", exit=0),
    # the runtime and the api proxy
    Attack("replace_builtins", None, exit=None),  # builtins are restored after every execution
    Attack("poison_builtins", None, exit=None),
    Attack("api_offered_tamper", "protocol_error", "worker called api.user.setUserId, which post-login does not offer",
           check=check_not_hijacked),
    Attack("api_channel_forge", "protocol_error", "worker called api.validation.error, which post-login does not offer"),
]

# Cases that fail today; strict, so a fix turns them into a failure that asks for the marker's removal.
KNOWN_FAILURES: dict[str, Callable[[Runner], str | None]] = {
    "deep_recursion_unlimited": lambda r: None if r._launcher.cgroups is not None else (  # noqa: SLF001
        "without a memory cgroup RLIMIT_AS raises MemoryError a million frames deep and the worker is still "
        "unwinding it when the 1s timer fires: the flow ends as timeout"),
    "memory_catch": lambda r: None if r._launcher.cgroups is not None else (  # noqa: SLF001
        "without a memory cgroup only RLIMIT_AS caps memory, and a MemoryError the action catches is invisible "
        "to the supervisor: the flow is allowed"),
    "forged_answer_then_deny": lambda r: (
        "design limit: the first well-formed Response carrying the execute msgid ends the execution as allowed; "
        "the action can read that msgid off its own stack, forge the answer, and keep running (its later "
        "deny arrives after the flow was allowed). No privilege is gained: the action could have returned"),
}


# --------------------------------------------------------------------------------------------
# running one attack

def served_workers(r: Runner) -> list[Any]:
    """Record every worker the pool hands out (the attacked one is the first)."""
    pool = r._pool  # noqa: SLF001 - the test needs the handle to see how the worker ended
    assert pool is not None
    acquire, served = pool.acquire, []

    async def recording(*args: Any, **kwargs: Any) -> Any:
        w = await acquire(*args, **kwargs)
        served.append(w)
        return w

    pool.acquire = recording  # type: ignore[method-assign]
    return served


async def fds_settle(limit: int, timeout: float = 5.0) -> int:
    """Open descriptors of this (supervisor) process once they dropped to ``limit`` (or the deadline passed)."""
    me = psutil.Process()
    deadline = time.monotonic() + timeout
    while me.num_fds() > limit and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return me.num_fds()


async def flow(r: Runner, action: Action, event: dict[str, Any], tenant: str = TENANT) -> dict[str, Any]:
    res = await r.run_flow(trigger="post-login", actions=[action], event=event, tenant=tenant)
    return res.to_dict()


def assert_normal(res: dict[str, Any]) -> None:
    assert res["outcome"] == "allow", res["denial"]
    assert res["state"] == {"normal": {"ok": True}}
    assert [e["message"] for e in res["logs"]] == ["normal 2"]


def assert_no_secret(targets: Targets, r: Runner, caplog: pytest.LogCaptureFixture, *results: dict[str, Any]) -> None:
    audit = r.audit
    assert isinstance(audit, MemoryAuditSink)
    blobs = [json.dumps(res) for res in results] + [json.dumps(audit.events), caplog.text]
    for secret in targets.secrets():
        for blob in blobs:
            assert secret not in blob


@pytest.mark.parametrize("attack", ATTACKS, ids=str)
async def test_hostile_action(attack: Attack, targets: Targets, caplog: pytest.LogCaptureFixture,
                              request: pytest.FixtureRequest) -> None:
    caplog.set_level(logging.DEBUG)
    fds_before = psutil.Process().num_fds()
    source = (ACTIONS / f"{attack.file}.py").read_text()
    action = Action(slug=attack.file.replace("_", "-"), source=source, filename=f"{attack.file}.py",
                    limits=attack.limits)
    async with make_runner(CONFIG) as r:
        expected_errno_ = expected_errno(r.sandbox_report, attack.layers) if attack.layers else None
        known = KNOWN_FAILURES.get(attack.file)
        why = known(r) if known else None
        if why:
            request.applymarker(pytest.mark.xfail(strict=True, raises=AssertionError, reason=why))
        served = served_workers(r)
        res = await flow(r, action, targets.event())
        worker = served[0]
        seen = Seen(res, res["state"].get(action.slug, {}), targets, r, worker, expected_errno_)

        if attack.kind is None:
            assert res["outcome"] == "allow", res["denial"]
            assert res["actions"][0]["status"] == "ok"
        else:
            assert res["outcome"] == "deny"
            assert res["denial"]["kind"] == attack.kind, res["denial"]
            assert attack.reason in res["denial"]["reason"], res["denial"]
            assert res["actions"][0]["status"] == "failed"
        if attack.check is not None:
            attack.check(seen)

        if attack.exit is None:
            assert worker.alive, worker.death_reason
        else:
            assert await worker.wait_exit(5.0) == attack.exit, worker.death_reason

        after = await flow(r, NORMAL, {"user": {}})
        assert_normal(after)
        fresh = await flow(r, NORMAL, {"user": {}}, tenant="another-tenant")
        assert_normal(fresh)
        assert_no_secret(targets, r, caplog, res, after, fresh)
    assert await fds_settle(fds_before + FD_SLACK) <= fds_before + FD_SLACK


@pytest.mark.parametrize("binding", [
    "action",
    pytest.param("tenant", marks=pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
        "design limit of worker_binding='tenant': after a forged answer the supervisor thinks the worker idle and "
        "reuses it for another action of the tenant; the still-running action waits for that execute request "
        "(it could read it, secrets included) and its notifications are charged to the next flow"))),
])
async def test_a_forged_answer_cannot_act_in_the_next_flow(targets: Targets, binding: str) -> None:
    """With the default worker_binding='action', a hijacker can only ever meet its own later executions."""
    fds_before = psutil.Process().num_fds()
    source = (ACTIONS / "forged_answer_hijacks_next_flow.py").read_text()
    attacker = Action(slug="hijacker", source=source, filename="forged_answer_hijacks_next_flow.py")
    async with make_runner(dataclasses.replace(CONFIG, worker_binding=binding)) as r:
        await flow(r, attacker, targets.event())   # it forges its answer and keeps running
        nxt = await flow(r, NORMAL, {"user": {}})
        later = await flow(r, NORMAL, {"user": {}})
    assert await fds_settle(fds_before + FD_SLACK) <= fds_before + FD_SLACK
    assert_normal(later)
    assert_normal(nxt)  # today: denied, "denied by the previous flow's action"
