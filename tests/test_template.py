"""The fork template and the elastic pool, on real processes."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import psutil
import pytest

from conftest import make_runner, run
from actionpool.runner import Action, Limits, RunnerConfig
from actionpool.worker._sandbox import host_capabilities

PIDS = '''
import os, resource
def on_execute(event, api):
    api.state.set("pid", os.getpid())
    api.state.set("ppid", os.getppid())
    api.state.set("as", resource.getrlimit(resource.RLIMIT_AS)[0])
    api.state.set("env", sorted(os.environ))
'''
SLOW = "import time\ndef on_execute(event, api):\n    time.sleep(event.s or 0.3)\n"


async def test_workers_are_supervisor_children_forked_from_the_template() -> None:
    async with make_runner() as r:
        res = await run(r, PIDS)
        stats = r.stats()
        template = psutil.Process(stats["template_pid"])
        state = res["state"]["a"]
        assert state["ppid"] == os.getpid()  # CLONE_PARENT: waited for and killed like a spawned worker
        assert state["pid"] != stats["template_pid"]
        assert template.ppid() == os.getpid()
        assert stats["template_forks"] >= 1
        # Nothing of the supervisor's environment reaches the worker: the template was spawned scrubbed.
        assert set(state["env"]) <= {"PATH", "LANG", "LC_ALL"}


async def test_template_respawned_after_kill_and_no_flow_lost() -> None:
    async with make_runner(RunnerConfig(pool_size=0, max_workers=4)) as r:
        first = r.stats()["template_pid"]
        os.kill(first, signal.SIGKILL)
        psutil.Process(first).wait(5) if psutil.pid_exists(first) else None
        results = await asyncio.gather(*(run(r, PIDS, tenant=f"t{i}") for i in range(3)))
        stats = r.stats()
    assert all(res["outcome"] == "allow" for res in results), [res["denial"] for res in results]
    assert stats["template_pid"] != first
    assert stats["template_respawns"] >= 1


async def test_workers_forked_after_a_limit_change_get_the_new_limits() -> None:
    async with make_runner(RunnerConfig(pool_size=1, max_workers=4, limits=Limits(memory_mb=64))) as r:
        small = await run(r, PIDS)
        big = await run(r, [Action(slug="a", source=PIDS, limits={"memory_mb": 256})])
    assert big["state"]["a"]["as"] > small["state"]["a"]["as"]
    assert big["state"]["a"]["pid"] != small["state"]["a"]["pid"]


async def test_spawn_without_template_still_works() -> None:
    async with make_runner(RunnerConfig(pool_size=1, max_workers=2, fork_template=False)) as r:
        res = await run(r, PIDS)
        assert "template_pid" not in r.stats()
    assert res["outcome"] == "allow" and res["state"]["a"]["ppid"] == os.getpid()


async def test_pool_grows_for_slow_flows_up_to_max_workers() -> None:
    cfg = RunnerConfig(pool_size=1, max_workers=6, max_queue=100, queue_timeout_s=20)
    async with make_runner(cfg) as r:
        results = await asyncio.gather(*(run(r, SLOW, event={"s": 0.3}) for _ in range(12)))
        stats = r.stats()
    assert all(res["outcome"] == "allow" for res in results)
    assert 2 <= stats["peak_workers"] <= 6


async def test_pool_shrinks_idle_workers_after_idle_timeout() -> None:
    cfg = RunnerConfig(pool_size=1, max_workers=6, idle_timeout_s=0.2)
    async with make_runner(cfg) as r:
        await asyncio.gather(*(run(r, SLOW, event={"s": 0.3}, tenant=f"t{i}") for i in range(4)))
        grown = r.stats()["live"]
        deadline = asyncio.get_running_loop().time() + 10
        # The sweep runs on acquire; keep serving one tenant until the others' idle workers retire.
        while r.stats()["live"] >= grown:
            assert asyncio.get_running_loop().time() < deadline, r.stats()
            await run(r, "def on_execute(event, api): pass", tenant="t0")
            await asyncio.sleep(0.05)
    assert grown >= 4


async def test_global_max_respected_and_tenants_kept_apart() -> None:
    cfg = RunnerConfig(pool_size=0, max_workers=3, max_queue=100, queue_timeout_s=20)
    async with make_runner(cfg) as r:
        results = await asyncio.gather(*(run(r, PIDS.replace("def on_execute(event, api):",
                                                             "import time\ndef on_execute(event, api):\n    time.sleep(0.1)"),
                                             tenant=f"t{i % 4}") for i in range(16)))
        stats = r.stats()
    assert stats["peak_workers"] <= 3
    by_tenant: dict[str, set[int]] = {}
    for res in results:
        assert res["outcome"] == "allow", res["denial"]
        by_tenant.setdefault(res["tenant"], set()).add(res["state"]["a"]["pid"])
    tenants = list(by_tenant)
    for i, a in enumerate(tenants):
        for b in tenants[i + 1:]:
            assert not (by_tenant[a] & by_tenant[b])


async def test_min_idle_per_tenant_keeps_warm_workers_bound_to_the_tenant() -> None:
    cfg = RunnerConfig(pool_size=0, max_workers=6, min_idle_per_tenant=2, worker_binding="tenant")
    async with make_runner(cfg) as r:
        await run(r, "def on_execute(event, api): pass", tenant="acme")
        await run(r, "def on_execute(event, api): pass", tenant="acme")  # binds via idle, triggers warm-up
        deadline = asyncio.get_running_loop().time() + 10
        pool = r._pool  # noqa: SLF001 - the test inspects the idle lists
        while len(pool.idle.get(("acme", pool.default_profile), ())) < 2:
            assert asyncio.get_running_loop().time() < deadline, r.stats()
            await asyncio.sleep(0.02)
        assert all(w.tenant == "acme" for w in pool.idle[("acme", pool.default_profile)])
        assert r.stats()["live"] <= 6


async def test_worker_binding_keeps_actions_of_one_tenant_apart() -> None:
    pid = "import os\ndef on_execute(event, api):\n    api.state.set('pid', os.getpid())\n"
    a = Action(slug="a", source=pid)
    b = Action(slug="b", source=pid + "# another action\n")
    for binding, shared in (("action", False), ("tenant", True)):
        async with make_runner(RunnerConfig(pool_size=0, max_workers=4, worker_binding=binding)) as r:
            first = (await r.run_flow(trigger="post-login", actions=[a], event={}, tenant="t")).state["a"]["pid"]
            second = (await r.run_flow(trigger="post-login", actions=[b], event={}, tenant="t")).state["b"]["pid"]
        assert (first == second) is shared, binding


# --------------------------------------------------------------------------------------------
# issue 12: the template does once what is the same for every worker; every protection still applies

SANDBOXED = ("fds", "caps", "no_new_privs", "landlock", "rlimits", "seccomp", "pdeathsig")


async def _worker_status(r: Any) -> tuple[dict[str, Any], dict[str, str], int]:
    res = await run(r, "import os\ndef on_execute(event, api):\n    api.state.set('pid', os.getpid())\n")
    pid = res["state"]["a"]["pid"]
    with open(f"/proc/{pid}/status") as f:
        status = dict(line.split(":", 1) for line in f.read().splitlines())
    return res, status, pid


async def test_forked_workers_reuse_what_the_template_prepared_and_apply_every_protection() -> None:
    async with make_runner(RunnerConfig(pool_size=0, max_workers=4)) as r:
        report = r.sandbox_report
        prepared = set(report["prepared"])
        caps = host_capabilities()
        if caps["seccomp"]:
            assert "seccomp" in prepared
        if caps["landlock_abi"] >= 1:
            assert "landlock" in prepared
        if caps["net_namespaces"]:
            assert "netns" in prepared and report["netns"] is True
        for name in SANDBOXED:
            if name in ("landlock", "seccomp") and name not in prepared:
                continue
            assert report[name] is True, (name, report)
        res, status, pid = await _worker_status(r)
        # the kernel's view of a forked worker: the prepared filter and ruleset are really in force
        assert status["Seccomp"].strip() == ("2" if "seccomp" in prepared else "0")
        assert status["NoNewPrivs"].strip() == "1"
        assert int(status["CapEff"], 16) == 0
        template_netns = os.stat(f"/proc/{r.stats()['template_pid']}/ns/net").st_ino
        worker_netns = os.stat(f"/proc/{pid}/ns/net").st_ino
        if "netns" in prepared:
            # one empty namespace entered once by the template, shared by its children, not the host's
            assert worker_netns == template_netns != os.stat("/proc/self/ns/net").st_ino


async def test_prepared_seccomp_program_signals_only_the_worker_itself() -> None:
    """The compiled program carries a placeholder pid; each worker patches in its own."""
    src = ("import os, signal\n"
           "def on_execute(event, api):\n"
           "    os.kill(os.getpid(), 0)\n"
           "    try:\n"
           "        os.kill(os.getppid(), 0)\n"
           "        api.state.set('parent', 'reachable')\n"
           "    except PermissionError as exc:\n"
           "        api.state.set('parent', exc.errno)\n")
    async with make_runner(RunnerConfig(pool_size=0, max_workers=4)) as r:
        if "seccomp" not in r.sandbox_report["prepared"]:
            pytest.skip("no prepared seccomp program on this host")
        results = [await run(r, src, tenant=f"t{i}") for i in range(2)]
    for res in results:
        assert res["outcome"] == "allow", res["denial"]
        assert res["state"]["a"]["parent"] == 1  # EPERM


def test_bpf_pid_slots_are_found_and_patched() -> None:
    from actionpool.worker import _bpf, _sandbox

    if not host_capabilities()["seccomp"]:
        pytest.skip("no libseccomp")
    prog, slots = _bpf.with_pid_slots(lambda pid: _bpf.export(_sandbox._build_seccomp(pid)[0]))
    assert slots
    direct = _bpf.export(_sandbox._build_seccomp(4242)[0])
    assert _bpf.patch(prog, slots, 4242) == direct  # patching is exactly compiling for that pid
    with pytest.raises(ValueError):
        _bpf.patch(prog, slots, 0)
    with pytest.raises(ValueError):  # a layout that depends on the value is refused, never guessed
        _bpf.with_pid_slots(lambda pid: direct + (b"\0" * 8 if pid == _bpf.PLACEHOLDERS[0] else b""))


async def test_spawned_workers_apply_everything_themselves() -> None:
    async with make_runner(RunnerConfig(pool_size=0, max_workers=2, fork_template=False)) as r:
        report = r.sandbox_report
        _, status, _ = await _worker_status(r)
    assert report["prepared"] == []
    assert report["pdeathsig"] is True and report["no_new_privs"] is True
    if host_capabilities()["seccomp"]:
        assert report["seccomp"] is True and status["Seccomp"].strip() == "2"


# --------------------------------------------------------------------------------------------
# issue 9: no orphans, however the supervisor dies

EMBEDDER = '''
import asyncio, json, sys
from actionpool import Action, Limits, Runner, RunnerConfig

SPIN = "def on_execute(event, api):\\n    while True:\\n        pass\\n"

async def main():
    cfg = RunnerConfig(pool_size=1, max_workers=4, fork_template=sys.argv[1] == "template",
                       limits=Limits(action_timeout_s=120, flow_timeout_s=120))
    async with Runner(cfg) as r:
        flows = [asyncio.ensure_future(r.run_flow(trigger="post-login", event={}, tenant=f"t{i}",
                                                   actions=[Action(slug="spin", source=SPIN)])) for i in range(2)]
        while len(r.worker_pids) < 3:   # two busy spinners and one warm idle worker
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)        # the spinners are past their sandbox and spinning
        print(json.dumps({"template": r.stats().get("template_pid"), "workers": r.worker_pids}), flush=True)
        await asyncio.gather(*flows)

asyncio.run(main())
'''


def _dead(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
@pytest.mark.parametrize("start", ["template", "spawn"])
def test_no_worker_or_template_outlives_its_supervisor(how: signal.Signals, start: str) -> None:
    import json
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-c", EMBEDDER, start], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    pids: list[int] = []
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read().decode() if proc.stderr else "no output"
        info = json.loads(line)
        pids = list(info["workers"]) + ([info["template"]] if info["template"] else [])
        assert (info["template"] is not None) is (start == "template")
        busy = [p for p in info["workers"] if psutil.Process(p).cpu_times().user > 0.05]
        assert busy, "no spinning worker to orphan"
        proc.send_signal(how)
        proc.wait(10)
        deadline = time.monotonic() + 5.0   # an orphan used to spin until its 30 s CPU limit
        while not all(_dead(p) for p in pids):
            assert time.monotonic() < deadline, [p for p in pids if not _dead(p)]
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in pids:
            try:
                psutil.Process(p).kill()
            except psutil.NoSuchProcess:
                pass
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


# --------------------------------------------------------------------------------------------
# issue 13 item 7: a minimal filesystem view, entered once by the template

VIEW_PROBE = '''
import os
def on_execute(event, api):
    out = {}
    for path in event.paths:
        for name, fn in (("stat", os.stat), ("lstat", os.lstat), ("readlink", os.readlink), ("listdir", os.listdir)):
            try:
                fn(path)
                out[name + " " + path] = "ok"
            except OSError as exc:
                out[name + " " + path] = type(exc).__name__
    import decimal, zoneinfo   # lazy imports from the bound stdlib still work
    out["works"] = [str(decimal.Decimal("1.5") * 2), str(zoneinfo.ZoneInfo("Europe/Paris"))]
    out["cwd"] = os.getcwd()
    api.state.set("view", out)
'''


def _not_on_the_way(path: str) -> bool:
    """A host path that is neither a granted path nor an ancestor of one (those exist in the view, empty)."""
    import sys

    from actionpool.runner._spawn import PKG_DIR

    # What the worker's view holds: the interpreter's prefixes and the package (its own sys.path is the stdlib's,
    # under -I -S). Not this process's sys.path: pytest prepends the parent of the repository (a package), which
    # for a clone in /tmp is /tmp itself.
    prefixes = (os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix))
    stdlib = [p for p in sys.path if p and os.path.realpath(p).startswith(prefixes)]
    granted = [os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, PKG_DIR, *stdlib)]
    return not any(g == path or g.startswith(path.rstrip("/") + "/") or path.startswith(g + "/") for g in granted)


async def test_the_minimal_filesystem_view_hides_every_host_path_and_proc(tmp_path: Any) -> None:
    secret = tmp_path / "host-secret.txt"
    secret.write_text("HOST-SECRET")
    candidates = ["/etc/shadow", "/etc/passwd", "/etc/hostname", "/home", "/root/.bashrc", "/var/log", "/tmp",
                  "/proc", "/proc/1", "/proc/self", "/sys", str(secret), f"/proc/{os.getpid()}/environ"]
    paths = [p for p in candidates if os.path.lexists(p) and _not_on_the_way(p)]
    async with make_runner(RunnerConfig(pool_size=0, max_workers=2)) as r:
        report = r.sandbox_report
        if not report.get("fs_view"):
            pytest.skip(f"no minimal filesystem view on this host: {report.get('errors')}")
        res = await run(r, VIEW_PROBE, event={"paths": paths})
        workdir = r._launcher.workdir  # noqa: SLF001 - the host side of the view's staging directory
        template = r.stats()["template_pid"]
        assert os.listdir(workdir) == []  # the view's tmpfs lives only in the template's mount namespace
        assert os.stat(f"/proc/{template}/ns/mnt").st_ino != os.stat("/proc/self/ns/mnt").st_ino
    assert res["outcome"] == "allow", res["denial"]
    view = res["state"]["a"]["view"]
    assert "/proc" in paths and "/etc/shadow" in paths and str(secret) in paths
    for path in paths:
        for op in ("stat", "lstat", "readlink", "listdir"):
            assert view[f"{op} {path}"] == "FileNotFoundError", (op, path, view[f"{op} {path}"])
    assert view["works"] == ["3.0", "Europe/Paris"]
    assert view["cwd"] == "/"
    assert "fs_view" in report["prepared"]


async def test_a_template_that_dies_while_starting_fails_its_start_at_once(tmp_path: Any) -> None:
    """A template that cannot start (here: an interpreter that exits at once) fails start() when it dies,
    not after start_timeout; a runner then falls back to spawning each worker."""
    import time

    from actionpool.runner._errors import TemplateError
    from actionpool.runner._template import Template

    dies = tmp_path / "dies"
    dies.write_text("#!/bin/sh\nexit 3\n")
    dies.chmod(0o755)
    t = Template(python=str(dies), start_timeout=30.0)
    t0 = time.monotonic()
    with pytest.raises(TemplateError, match="fork template"):
        await t.start()
    assert time.monotonic() - t0 < 10.0  # its death, not the 30 s timeout, ended the wait
    await t.close()
