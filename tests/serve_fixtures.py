"""Real ``actionpool serve`` processes for the sidecar tests.

``start_serve`` writes nothing itself: it starts ``python -m actionpool.runner.cli
serve`` on a free loopback port with the given config and environment, waits
until ``/readyz`` answers 200, and returns a handle whose ``stop()`` sends
SIGTERM and waits for the exit status.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from net_fixtures import free_port

TOKEN = "test-token-7f3a"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ADMIN_TOKEN = "test-admin-token-91c2"   # in the env as AP_ADMIN; a config names it with admin_token_env
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
# The secrets key a Redis-backed sidecar encrypts tenant secrets with (32 bytes, base64): a fixed test key.
SECRETS_KEY = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="


def stop_process(proc: "subprocess.Popen[bytes]", timeout: float) -> int:
    """SIGTERM (a drain), then SIGKILL after ``timeout``; the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


@dataclass
class Serve:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def client(self, **kw: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=AUTH, timeout=30, **kw)  # type: ignore[arg-type]

    def stop(self, timeout: float = 30) -> int:
        return stop_process(self.proc, timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def write_config(tmp: Path, body: str, actions: dict[str, str] | None = None, name: str = "serve.toml") -> Path:
    """The config file ``body`` plus action files under ``tmp/actions`` (paths relative to the config)."""
    (tmp / "actions").mkdir(exist_ok=True)
    for fname, source in (actions or {}).items():
        (tmp / "actions" / fname).write_text(textwrap.dedent(source))
    path = tmp / name
    path.write_text(textwrap.dedent(body))
    return path


def start_serve(config: Path, env: dict[str, str] | None = None, timeout: float = 60,
                args: tuple[str, ...] = ()) -> Serve:
    full_env = {**os.environ, "AP_TOKEN": TOKEN, "AP_ADMIN": ADMIN_TOKEN, "ACTIONPOOL_SECRETS_KEY": SECRETS_KEY,
                **(env or {})}
    last = ""
    for attempt in range(3):
        port = free_port()
        log = config.parent / f"serve-{port}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "actionpool.runner.cli", "serve", "--config", str(config),
                                     "--port", str(port), *args], stdout=out, stderr=subprocess.STDOUT, env=full_env)
        s = Serve(proc, f"http://127.0.0.1:{port}", log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(s.url + "/readyz", timeout=2).status_code == 200:
                    return s
            except httpx.HTTPError:
                pass
            time.sleep(0.05)  # polling a condition with a deadline
        last = s.output()
        s.stop()
        if "address already in use" not in last.lower():
            break
    raise AssertionError(f"actionpool serve did not become ready:\n{last[-3000:]}")
