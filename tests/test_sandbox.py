"""The worker sandbox, applied by real interpreter processes and then attacked.

Every test starts ``python -I -c <script>``: the script creates its asyncio
loop, calls ``worker._sandbox.apply`` and prints one JSON line per outcome on
a descriptor it kept. The attacks target real things this test set up: a TCP
listener and a UDP socket on 127.0.0.1, a secret file in a temp dir, and the
sandboxed process' real parent (an intermediate python process, so a sandbox
bug kills that one and not pytest).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any, Iterator

import pytest

from actionpool.runner._spawn import _site_paths, register_code  # noqa: E402
from actionpool.worker import _sandbox  # noqa: E402

CAPS = _sandbox.host_capabilities()
IS_ROOT = os.geteuid() == 0
TESTS_DIR = str(Path(__file__).resolve().parent)
pytestmark = pytest.mark.skipif(
    not CAPS["seccomp"] or CAPS["landlock_abi"] < 1,
    reason=f"host lacks seccomp or Landlock: {CAPS}",
)
GiB = 1 << 30
CHILD_PATH = json.dumps(_site_paths())

PRELUDE = """
import asyncio, json, os, sys
OUT = os.dup(1)                      # our channel to the test; 0/1/2 go to /dev/null
IN = os.dup(0)
def emit(**kw):
    os.write(OUT, (json.dumps(kw) + "\\n").encode())
sys.path[:] = json.loads(sys.argv[1])   # like the real worker: -I -S and an explicit path
""" + register_code() + """
SPEC = json.loads(sys.argv[2])
ARGS = json.loads(sys.argv[3])
loop = asyncio.new_event_loop()      # before the sandbox: it owns an epoll fd and a socketpair
from actionpool.worker import _sandbox
STRAY = os.open("/dev/null", os.O_RDONLY)   # must be closed by apply()
NULL_RDEV = os.stat("/dev/null").st_rdev
SPEC.setdefault("keep_fds", [OUT, IN] + _sandbox.loop_fds(loop))
try:
    REPORT = _sandbox.apply(SPEC)
except _sandbox.SandboxError as exc:
    emit(sandbox_error=str(exc))
    REPORT = None
else:
    emit(report=REPORT)

def attempt(name, fn):
    try:
        value = fn()
    except BaseException as exc:
        emit(name=name, ok=False, exc=type(exc).__name__, errno=getattr(exc, "errno", None), msg=str(exc))
    else:
        if not isinstance(value, (int, float, str, bool, list, type(None))):
            value = repr(value)
        emit(name=name, ok=True, value=value)
"""

# The intermediate parent: runs the sandboxed child, then says it is still alive.
PARENT = """
import subprocess, sys, os
p = subprocess.run(sys.argv[1:])
os.write(1, b'{"parent_alive": true, "child_rc": %d}\\n' % p.returncode)
"""

PARENT_SECRET = "parent-env-secret-4242"


def full_spec(tmp: Path, **over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "mode": "strict" if not over.get("mode") else over.pop("mode"),
        "require": ["fds", "rlimits", "no_new_privs", "caps", "landlock", "seccomp"],
        "memory_bytes": GiB,
        "cpu_seconds": 20,
        "max_open_files": 64,
        "file_size": 0,
        "workdir": str(tmp / "work"),
        "read_paths": [str(tmp / "allowed")],
        "network_namespace": CAPS["net_namespaces"],
        "drop_uid": 65534,
        "drop_gid": 65534,
    }
    spec.update(over)
    return spec


@pytest.fixture
def tmp() -> Iterator[Path]:
    """World-readable on purpose: only Landlock stands between the sandbox and the secret."""
    tmp_path = Path(tempfile.mkdtemp(prefix="sbx-test-", dir="/tmp"))
    os.chmod(tmp_path, 0o755)
    (tmp_path / "work").mkdir()
    (tmp_path / "allowed").mkdir()
    (tmp_path / "allowed" / "ok.txt").write_text("readable")
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "key.txt").write_text("TOP-SECRET")
    for p in tmp_path.rglob("*"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


def run_child(body: str, spec: dict[str, Any], args: dict[str, Any] | None = None, *,
              via_parent: bool = False, timeout: float = 30) -> dict[str, Any]:
    script = PRELUDE + textwrap.dedent(body)
    argv = [sys.executable, "-I", "-S", "-c", script, CHILD_PATH, json.dumps(spec), json.dumps(args or {})]
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PARENT_SECRET": PARENT_SECRET}
    if via_parent:
        argv = [sys.executable, "-I", "-c", PARENT, *argv]
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=env, cwd=TESTS_DIR, timeout=timeout)
    out: dict[str, Any] = {"rc": proc.returncode, "results": {}, "stderr": proc.stderr.decode(errors="replace")}
    for line in proc.stdout.decode().splitlines():
        msg = json.loads(line)
        if "name" in msg:
            out["results"][msg["name"]] = msg
        else:
            out.update(msg)
    return out


def interpreter_readable_by_nobody() -> bool:
    """Could uid/gid 65534 read the stdlib (mode bits of every ancestor)?"""
    path = os.path.realpath(os.path.dirname(os.__file__))
    parts = path.split("/")
    for i in range(1, len(parts) + 1):
        st = os.stat("/".join(parts[:i]) or "/")
        need = stat.S_IXOTH | (stat.S_IROTH if i == len(parts) else 0)
        if st.st_mode & need != need:
            return False
    return True


def failed(res: dict[str, Any], name: str, exc: str, err: int | None = None) -> None:
    r = res["results"][name]
    assert not r["ok"], f"{name} succeeded inside the sandbox: {r}"
    assert r["exc"] == exc, r
    if err is not None:
        assert r["errno"] == err, r


def succeeded(res: dict[str, Any], name: str) -> Any:
    r = res["results"][name]
    assert r["ok"], f"{name} failed inside the sandbox: {r}"
    return r["value"]


ATTACKS = """
import ctypes, socket, subprocess, threading, signal
attempt("tcp_connect", lambda: socket.create_connection(("127.0.0.1", ARGS["tcp_port"]), timeout=2))
attempt("tcp_socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(b"leak", ("127.0.0.1", ARGS["udp_port"]))
attempt("udp_send", udp)
attempt("unix_socket", lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
attempt("socketpair", lambda: socket.socketpair())
attempt("dns_localhost", lambda: socket.getaddrinfo("localhost", 80))
attempt("dns_name", lambda: socket.getaddrinfo("example.com", 443))
attempt("fork", os.fork)
attempt("subprocess", lambda: subprocess.run(["/bin/touch", ARGS["marker"]]))
attempt("os_system", lambda: os.system("/bin/touch " + ARGS["marker"]))
attempt("execv", lambda: os.execv("/bin/touch", ["touch", ARGS["marker"]]))
attempt("thread", lambda: threading.Thread(target=lambda: None).start())
attempt("write_tmp", lambda: open(ARGS["tmp_target"], "w"))
attempt("write_cwd", lambda: open("./x", "w"))
attempt("write_devnull", lambda: open("/dev/null", "w"))
attempt("mkdir", lambda: os.mkdir(ARGS["mkdir_target"]))
attempt("read_shadow", lambda: open("/etc/shadow").read())
ppid = os.getppid()
attempt("proc_environ", lambda: open(f"/proc/{ppid}/environ", "rb").read())
attempt("proc_cmdline", lambda: open(f"/proc/{ppid}/cmdline", "rb").read())
attempt("proc_mem", lambda: open(f"/proc/{ppid}/mem", "rb").read(1))
attempt("read_secret", lambda: open(ARGS["secret"]).read())
attempt("list_secret_dir", lambda: os.listdir(os.path.dirname(ARGS["secret"])))
attempt("read_root_home", lambda: os.listdir("/root"))
attempt("list_tmp", lambda: os.listdir("/tmp"))
attempt("kill_parent", lambda: os.kill(ppid, signal.SIGKILL))
def ptrace():
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.ptrace(16, ppid, None, None)   # PTRACE_ATTACH
    if rc == -1:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return rc
attempt("ptrace_parent", ptrace)
attempt("setuid_root", lambda: os.setuid(0))
attempt("raise_rlimit", lambda: __import__("resource").setrlimit(__import__("resource").RLIMIT_NOFILE, (1024, 1024)))

# --- what must keep working ---
def lazy_decimal():
    assert "decimal" not in sys.modules
    import decimal
    return str(decimal.Decimal("1.1") + 1)
attempt("import_decimal", lazy_decimal)
def lazy_email():
    import email.mime.text
    return email.mime.text.MIMEText("hi")["Content-Type"]
attempt("import_email", lazy_email)
def codecs():
    import json as j, orjson, msgpack
    data = {"a": [1, 2.5, "x", None, True]}
    assert j.loads(j.dumps(data)) == data
    assert orjson.loads(orjson.dumps(data)) == data
    assert msgpack.unpackb(msgpack.packb(data)) == data
    return "ok"
attempt("codecs", codecs)
async def work():
    await asyncio.sleep(0.001)
    fut = loop.create_future()
    loop.call_soon_threadsafe(fut.set_result, 42)   # writes to the loop's self-pipe socketpair
    return await fut
attempt("asyncio", lambda: loop.run_until_complete(work()))
def memory():
    try:
        big = bytearray(2 * (1 << 30))
    except MemoryError:
        small = bytearray(10 << 20)
        return f"MemoryError then {len(small)}"
    return "allocated"
attempt("memory_error", memory)
attempt("signal_self", lambda: os.kill(os.getpid(), 0))
got = []
signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
attempt("raise_signal_self", lambda: (signal.raise_signal(signal.SIGUSR1), len(got))[1])
attempt("read_allowed", lambda: open(ARGS["allowed"]).read())
attempt("misc", lambda: [len(os.urandom(8)), __import__("time").sleep(0.001) is None,
                         __import__("hashlib").sha256(b"x").hexdigest()[:8],
                         str(__import__("zoneinfo").ZoneInfo("Europe/Paris"))])
def rlimits():
    import resource as r
    return [list(r.getrlimit(x)) for x in (r.RLIMIT_AS, r.RLIMIT_NOFILE, r.RLIMIT_FSIZE, r.RLIMIT_CORE,
                                           r.RLIMIT_CPU, r.RLIMIT_NPROC)]
attempt("rlimits", rlimits)
attempt("stray_fd", lambda: os.fstat(STRAY))
attempt("stdio_devnull", lambda: [os.fstat(fd).st_rdev == NULL_RDEV for fd in (0, 1, 2)])
attempt("print", lambda: print("to /dev/null") is None)
"""


def test_full_sandbox_blocks_attacks_and_keeps_python_working(tmp: Path) -> None:
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(8)
        tcp.setblocking(False)
        udp.bind(("127.0.0.1", 0))
        udp.setblocking(False)
        args = {
            "tcp_port": tcp.getsockname()[1], "udp_port": udp.getsockname()[1],
            "marker": str(tmp / "pwned"), "tmp_target": str(tmp / "x"), "mkdir_target": str(tmp / "newdir"),
            "secret": str(tmp / "secret" / "key.txt"), "allowed": str(tmp / "allowed" / "ok.txt"),
        }
        res = run_child(ATTACKS, full_spec(tmp), args, via_parent=True)
        with pytest.raises(BlockingIOError):
            tcp.accept()  # nothing ever connected
        with pytest.raises(BlockingIOError):
            udp.recvfrom(64)  # nothing ever arrived
    finally:
        tcp.close()
        udp.close()

    assert "sandbox_error" not in res, res
    assert res.get("parent_alive") and res["child_rc"] == 0, res
    rep = res["report"]
    for name in ("fds", "fds_closed", "rlimits", "no_new_privs", "caps", "landlock", "seccomp"):
        assert rep[name] is True, (name, rep)
    assert rep["landlock_abi"] == min(CAPS["landlock_abi"], 7)
    assert rep["netns"] is CAPS["net_namespaces"]
    if not IS_ROOT:
        assert rep["uid"] == os.geteuid() and rep["uid_drop"] is True
    elif interpreter_readable_by_nobody():
        assert rep["uid"] == 65534 and rep["uid_drop"] is True, rep
    else:  # e.g. a pyenv under /root (mode 700): dropping would break every later import
        assert rep["uid"] == 0 and rep["uid_drop"] is False and rep["caps"] is True, rep
        assert any(e.startswith("uid_drop: uid 65534 could not read") for e in rep["errors"]), rep
    assert json.loads(json.dumps(rep)) == rep  # plain JSON types

    eperm, eacces = 1, 13
    for name in ("tcp_connect", "tcp_socket", "udp_send", "unix_socket", "socketpair", "fork", "subprocess",
                 "execv", "mkdir", "kill_parent", "ptrace_parent", "setuid_root",
                 "write_tmp", "write_cwd", "write_devnull"):  # write-mode open: seccomp refuses first
        r = res["results"][name]
        assert not r["ok"] and r["errno"] == eperm, r
    failed(res, "raise_rlimit", "ValueError")  # CPython's wording of EPERM from setrlimit
    failed(res, "dns_localhost", "gaierror")
    failed(res, "dns_name", "gaierror")
    assert succeeded(res, "os_system") != 0
    failed(res, "thread", "RuntimeError")
    for name in ("read_shadow", "proc_environ", "proc_cmdline",
                 "proc_mem", "read_secret", "list_secret_dir", "read_root_home", "list_tmp"):
        failed(res, name, "PermissionError", eacces)
    assert not (tmp / "pwned").exists() and not (tmp / "x").exists() and not (tmp / "newdir").exists()
    assert not (tmp / "work" / "x").exists()

    assert succeeded(res, "import_decimal") == "2.1"
    assert succeeded(res, "import_email").startswith("text/plain")
    assert succeeded(res, "codecs") == "ok"
    assert succeeded(res, "asyncio") == 42
    assert succeeded(res, "memory_error") == f"MemoryError then {10 << 20}"
    assert succeeded(res, "signal_self") is None
    assert succeeded(res, "raise_signal_self") == 1
    assert succeeded(res, "read_allowed") == "readable"
    assert succeeded(res, "misc") == [8, True, "2d711642", "Europe/Paris"]
    assert succeeded(res, "rlimits") == [[GiB, GiB], [64, 64], [0, 0], [0, 0], [20, 21], [1, 1]]
    failed(res, "stray_fd", "OSError", 9)
    assert succeeded(res, "stdio_devnull") == [True, True, True]
    assert succeeded(res, "print") is True
    assert PARENT_SECRET not in json.dumps(res)


KERNEL_VIEW = """
emit(pid=os.getpid())
os.read(IN, 1)   # wait until the test inspected us from outside
"""


def test_kernel_view_of_the_sandboxed_process(tmp: Path) -> None:
    """Independent of the report: what /proc/<pid>/status says about the sandboxed worker."""
    script = PRELUDE + textwrap.dedent(KERNEL_VIEW)
    argv = [sys.executable, "-I", "-S", "-c", script, CHILD_PATH, json.dumps(full_spec(tmp)), "{}"]
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=TESTS_DIR,
                          env={"PATH": "/usr/bin:/bin"}) as proc:
        assert proc.stdout is not None and proc.stdin is not None
        report = json.loads(proc.stdout.readline())["report"]
        pid = json.loads(proc.stdout.readline())["pid"]
        status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        net_child = os.stat(f"/proc/{pid}/ns/net").st_ino
        proc.stdin.write(b"x")
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0
        proc.stdout.close()
    assert status["NoNewPrivs"].strip() == "1"
    assert status["Seccomp"].strip() == "2"
    for cap in ("CapEff", "CapPrm", "CapInh", "CapAmb"):
        assert int(status[cap], 16) == 0, (cap, status[cap])
    if IS_ROOT:
        assert int(status["CapBnd"], 16) == 0
    assert int(status["Uid"].split()[1]) == report["uid"]
    if CAPS["net_namespaces"]:
        assert net_child != os.stat("/proc/self/ns/net").st_ino
    assert len(report["kept_fds"]) >= 5  # OUT, IN, and the loop's epoll fd + socketpair


def test_strict_mode_refuses_an_impossible_landlock_requirement(tmp: Path) -> None:
    body = "import socket\n" + 'attempt("socket_after_refusal", lambda: socket.socket().close() is None)\n'
    res = run_child(body, full_spec(tmp, require=["landlock"], landlock_max_abi=0))
    assert "required protection 'landlock' unavailable" in res["sandbox_error"], res
    # refused before touching anything: the process is not half-sandboxed
    assert succeeded(res, "socket_after_refusal") is True


def test_strict_mode_refuses_netns_when_not_configured(tmp: Path) -> None:
    res = run_child("", full_spec(tmp, require=["netns"], network_namespace=False))
    assert "required protection 'netns' unavailable" in res["sandbox_error"], res
    assert "network_namespace is false" in res["sandbox_error"]


@pytest.mark.skipif(not IS_ROOT, reason="uid_drop can only be missing when running as root")
def test_strict_mode_refuses_to_stay_root_without_drop_uid(tmp: Path) -> None:
    res = run_child("", full_spec(tmp, require=["uid_drop"], drop_uid=None, drop_gid=None))
    assert "required protection 'uid_drop' unavailable" in res["sandbox_error"], res


def test_strict_mode_with_available_requirements_succeeds(tmp: Path) -> None:
    res = run_child('attempt("tcp", lambda: __import__("socket").socket())\n', full_spec(tmp))
    assert "sandbox_error" not in res, res
    assert res["report"]["errors"] == [] or all(e.startswith("uid_drop") for e in res["report"]["errors"])
    failed(res, "tcp", "PermissionError", 1)


def test_degraded_mode_reports_what_is_missing(tmp: Path) -> None:
    body = """
import socket
attempt("read_secret", lambda: open(ARGS["secret"]).read())
attempt("tcp", lambda: socket.socket())
"""
    spec = full_spec(tmp, mode="degraded", landlock_max_abi=0)
    res = run_child(body, spec, {"secret": str(tmp / "secret" / "key.txt")})
    rep = res["report"]
    assert rep["mode"] == "degraded"
    assert rep["landlock"] is False and rep["landlock_abi"] == 0
    assert any(e.startswith("landlock: not available") for e in rep["errors"]), rep
    assert rep["seccomp"] is True and rep["no_new_privs"] is True and rep["rlimits"] is True
    # the report is honest: without Landlock the file really is readable; seccomp still holds
    assert succeeded(res, "read_secret") == "TOP-SECRET"
    failed(res, "tcp", "PermissionError", 1)


def test_off_mode_applies_only_rlimits_and_fd_hygiene(tmp: Path) -> None:
    body = """
import socket, resource
attempt("tcp", lambda: socket.socket().close() is None)
attempt("as", lambda: list(resource.getrlimit(resource.RLIMIT_AS)))
attempt("stray_fd", lambda: os.fstat(STRAY))
"""
    res = run_child(body, {"mode": "off", "memory_bytes": GiB, "require": ["seccomp"]})
    rep = res["report"]
    assert rep["rlimits"] is True and rep["fds"] is True
    assert rep["seccomp"] is False and rep["landlock"] is False and rep["netns"] is False
    assert rep["no_new_privs"] is False and rep["errors"] == []
    assert succeeded(res, "tcp") is True
    assert succeeded(res, "as") == [GiB, GiB]
    failed(res, "stray_fd", "OSError", 9)


BAD_SPECS = """
bad = [{"mode": "paranoid"}, {"require": ["seccomp", "selinux"]}, {"keep_fds": [-1]},
       {"memory_bytes": "1G"}, {"read_paths": [""]}, {"typo_key": 1}, "not a dict"]
for i, spec in enumerate(bad):
    try:
        _sandbox.apply(spec)
    except _sandbox.SandboxError as exc:
        emit(name=f"bad{i}", ok=False, exc="SandboxError", errno=None, msg=str(exc))
    else:
        emit(name=f"bad{i}", ok=True, value=None)
attempt("second_apply", lambda: _sandbox.apply({"mode": "off"}))
"""


def test_invalid_specs_are_refused_before_anything_happens() -> None:
    res = run_child(BAD_SPECS, {"mode": "off"})
    assert res["report"]["mode"] == "off"
    msgs = [res["results"][f"bad{i}"] for i in range(7)]
    assert all(not m["ok"] for m in msgs), msgs
    assert "mode must be" in msgs[0]["msg"] and "selinux" in msgs[1]["msg"] and "typo_key" in msgs[5]["msg"]
    failed(res, "second_apply", "SandboxError")
    assert "already applied" in res["results"]["second_apply"]["msg"]


@pytest.mark.skipif(not IS_ROOT or not interpreter_readable_by_nobody(),
                    reason="needs root and an interpreter readable by uid 65534 (this one lives in a "
                           "directory only root can traverse)")
def test_unprivileged_worker_gets_its_netns_through_a_user_namespace(tmp: Path) -> None:
    script = PRELUDE + 'attempt("tcp", lambda: __import__("socket").socket())\n'
    spec = full_spec(tmp, drop_uid=None, drop_gid=None, network_namespace=True)
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", script, CHILD_PATH, json.dumps(spec), "{}"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/", user=65534, group=65534, extra_groups=[],
                          env={"PATH": "/usr/bin:/bin"}, timeout=30)
    lines = [json.loads(x) for x in proc.stdout.decode().splitlines()]
    assert lines and "report" in lines[0], (lines, proc.stderr)
    rep = lines[0]["report"]
    assert rep["uid"] == 65534 and rep["netns"] is True and rep["caps"] is True and rep["seccomp"] is True


def test_host_capabilities_shape_and_no_side_effects() -> None:
    before = Path("/proc/self/status").read_text()
    fds_before = sorted(os.listdir("/proc/self/fd"))
    caps = _sandbox.host_capabilities()
    assert set(caps) == {"seccomp", "landlock_abi", "user_namespaces", "net_namespaces", "uts_namespaces", "root",
                         "cgroup"}
    assert isinstance(caps["landlock_abi"], int) and caps["landlock_abi"] >= 0
    assert caps["root"] is IS_ROOT
    assert caps["cgroup"] in ("v1", "v2", None)
    after = Path("/proc/self/status").read_text()
    pick = lambda s, k: [ln for ln in s.splitlines() if ln.startswith(k)]  # noqa: E731
    for key in ("NoNewPrivs", "Seccomp:", "CapEff", "Uid"):
        assert pick(before, key) == pick(after, key)
    assert sorted(os.listdir("/proc/self/fd")) == fds_before


def test_the_allowlist_never_allows_a_denied_syscall() -> None:
    assert not set(_sandbox._ALLOW) & set(_sandbox.DENIED)
    conditional = {"open", "openat", "kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo", "prlimit64",
                   "ioctl", "fcntl", "prctl"}
    assert not conditional & set(_sandbox.DENIED)
    assert _sandbox._ENOSYS == ("clone3",)


LAYER_ATTACKS = """
import socket, signal
attempt("write_tmp", lambda: open(ARGS["tmp_target"], "w"))
attempt("read_secret", lambda: open(ARGS["secret"]).read())
attempt("read_shadow", lambda: open("/etc/shadow").read())
attempt("proc_environ", lambda: open(f"/proc/{os.getppid()}/environ", "rb").read())
attempt("tcp_connect", lambda: socket.create_connection(("127.0.0.1", ARGS["tcp_port"]), timeout=2).close())
def abstract():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(ARGS["abstract"].encode("latin-1"))
    finally:
        s.close()
attempt("abstract_unix", abstract)
attempt("kill_parent", lambda: os.kill(os.getppid(), signal.SIGKILL))
attempt("socket", lambda: socket.socket().close())
"""


def run_layer(tmp: Path, skip: list[str]) -> dict[str, Any]:
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    uds = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract = f"\0actionpool-test-{os.getpid()}-{'-'.join(skip)}"
    try:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(8)
        tcp.setblocking(False)
        uds.bind(abstract.encode("latin-1"))
        uds.listen(8)
        uds.setblocking(False)
        args = {"tcp_port": tcp.getsockname()[1], "tmp_target": str(tmp / "x"), "abstract": abstract,
                "secret": str(tmp / "secret" / "key.txt")}
        res = run_child(LAYER_ATTACKS, full_spec(tmp, mode="degraded", skip=skip), args, via_parent=True)
        for srv in (tcp, uds):
            with pytest.raises(BlockingIOError):
                srv.accept()
    finally:
        tcp.close()
        uds.close()
    assert res.get("parent_alive"), res
    for name in skip:
        assert res["report"][name] is False and f"{name}: skipped by spec" in res["report"]["errors"]
    assert not (tmp / "x").exists()
    return res


def test_landlock_alone_still_blocks_files_tcp_signals_and_abstract_sockets(tmp: Path) -> None:
    res = run_layer(tmp, ["seccomp", "netns"])
    assert res["report"]["landlock"] is True
    for name in ("write_tmp", "read_secret", "read_shadow", "proc_environ"):
        failed(res, name, "PermissionError", 13)
    abi = res["report"]["landlock_abi"]
    if abi >= 4:
        failed(res, "tcp_connect", "PermissionError", 13)
    if abi >= 6:
        failed(res, "abstract_unix", "PermissionError", 1)
        failed(res, "kill_parent", "PermissionError", 1)
    assert succeeded(res, "socket") is None  # creating a socket is seccomp's to refuse


def test_seccomp_alone_still_blocks_writes_sockets_and_signals(tmp: Path) -> None:
    res = run_layer(tmp, ["landlock", "netns"])
    assert res["report"]["seccomp"] is True
    for name in ("write_tmp", "tcp_connect", "abstract_unix", "kill_parent", "socket"):
        failed(res, name, "PermissionError", 1)
    # reads are Landlock's job: without it only DAC remains, and the secret is world-readable
    assert succeeded(res, "read_secret") == "TOP-SECRET"


def test_strict_mode_refuses_to_skip_a_required_layer(tmp: Path) -> None:
    res = run_child("", full_spec(tmp, skip=["seccomp"]))
    assert "required protection 'seccomp' unavailable: skipped by spec" in res["sandbox_error"], res


CWD_PROBE = """
import os
DIR = {dir!r}
def on_execute(event, api):
    out = {{}}
    for name, fn in (("read", lambda: open(os.path.join(DIR, "secret.txt")).read()),
                     ("list", lambda: os.listdir(DIR)),
                     ("relative", lambda: open("secret.txt").read())):
        try:
            out[name] = fn()
        except Exception as exc:
            out[name] = type(exc).__name__
    api.state.set("r", out)
"""


def test_cli_run_from_a_directory_does_not_grant_it_to_actions(tmp: Path) -> None:
    """``python -m actionpool.runner.cli`` puts its cwd first on sys.path; the worker must not get it."""
    cwd = tmp / "project"
    cwd.mkdir()
    (cwd / "secret.txt").write_text("CWD-SECRET-9931")
    os.chmod(cwd / "secret.txt", 0o644)
    (cwd / "probe.py").write_text(CWD_PROBE.format(dir=str(cwd)))
    proc = subprocess.run([sys.executable, "-m", "actionpool.runner.cli", "run", "probe.py", "--trigger", "post-login",
                           "--event", "-", "--compact"], input=b"{}", cwd=cwd, capture_output=True, timeout=60)
    assert b"CWD-SECRET-9931" not in proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    assert result["outcome"] == "allow", result
    probe = result["state"]["probe"]["r"] if "probe" in result["state"] else next(iter(result["state"].values()))["r"]
    for name in ("read", "list", "relative"):
        assert probe[name] in ("PermissionError", "FileNotFoundError"), (name, probe)


# -- issue 16: uname() tells an action nothing of the host ---------------------------------------

UNAME_PROBE = """
import socket
attempt("uname", lambda: list(os.uname()))
attempt("gethostname", lambda: socket.gethostname())
attempt("sethostname", lambda: socket.sethostname("evil"))
"""


@pytest.mark.skipif(not CAPS["uts_namespaces"], reason="host cannot create a UTS namespace")
def test_worker_gets_its_own_uts_namespace_with_a_neutral_name(tmp: Path) -> None:
    res = run_child(UNAME_PROBE, full_spec(tmp, uts_namespace=True, require=["utsns", "seccomp"]))
    assert "sandbox_error" not in res, res
    assert res["report"]["utsns"] is True
    host = os.uname()
    sysname, nodename, release, version, machine = succeeded(res, "uname")
    assert nodename == _sandbox.UTS_HOSTNAME != host.nodename
    assert succeeded(res, "gethostname") == _sandbox.UTS_HOSTNAME
    # not namespaced: the kernel's own release (documented in docs/security.md)
    assert (sysname, release, version, machine) == (host.sysname, host.release, host.version, host.machine)
    failed(res, "sethostname", "PermissionError", 1)  # seccomp: the action cannot rename its namespace


@pytest.mark.skipif(not CAPS["uts_namespaces"], reason="host cannot create a UTS namespace")
def test_uts_namespace_together_with_the_network_namespace(tmp: Path) -> None:
    """Both entered by one worker (the order of apply(): netns, then utsns)."""
    spec = full_spec(tmp, uts_namespace=True, network_namespace=True, require=["netns", "utsns"])
    res = run_child(UNAME_PROBE + 'attempt("tcp", lambda: socket.socket())\n', spec)
    assert "sandbox_error" not in res, res
    assert res["report"]["netns"] is True and res["report"]["utsns"] is True
    assert succeeded(res, "gethostname") == _sandbox.UTS_HOSTNAME


def test_without_the_uts_namespace_the_report_says_so(tmp: Path) -> None:
    """Degraded (or not asked for): the action would see the host's own name; strict refuses a requirement."""
    res = run_child(UNAME_PROBE, full_spec(tmp, mode="degraded", uts_namespace=True, skip=["utsns"]))
    assert res["report"]["utsns"] is False
    assert "utsns: skipped by spec" in res["report"]["errors"], res["report"]
    assert succeeded(res, "gethostname") == socket.gethostname()
    res = run_child("", full_spec(tmp, require=["utsns"], uts_namespace=False))
    assert "required protection 'utsns' unavailable: spec.uts_namespace is false" in res["sandbox_error"], res
    res = run_child(BAD_SPECS, {"mode": "off", "uts_namespace": "yes"})
    assert "uts_namespace must be a bool" in res["sandbox_error"], res


UNAME_ACTION = """
import os, socket
def on_execute(event, api):
    api.state.set("node", os.uname().nodename)
    api.state.set("host", socket.gethostname())
"""


@pytest.mark.parametrize("fork_template", [True, False])
async def test_actions_see_the_neutral_host_name(fork_template: bool) -> None:
    """A real runner's workers, forked from the template or spawned: uname() is the namespace's."""
    from conftest import make_runner, run
    from actionpool.runner import RunnerConfig, SandboxConfig

    if not CAPS["uts_namespaces"]:
        pytest.skip("host cannot create a UTS namespace")
    cfg = RunnerConfig(pool_size=1, max_workers=2, fork_template=fork_template,
                       sandbox=SandboxConfig(mode="strict", require=("seccomp", "utsns")))
    async with make_runner(cfg) as r:
        res = await run(r, UNAME_ACTION)
        info = r.stats()
    assert res["outcome"] == "allow", res
    assert res["state"]["a"] == {"node": _sandbox.UTS_HOSTNAME, "host": _sandbox.UTS_HOSTNAME}, (res, info)
