"""The ``actionpool`` command: run a flow, check the host's sandbox, benchmark, stress.

    actionpool run ACTION.py [...] --trigger post-login --event EVENT.json   exit 0 allow, 3 deny, 2 bad input
    actionpool check ACTION.py [...] [--trigger post-login]                  exit 0 clean, 1 problems, 2 bad input
    actionpool doctor                                                        exit 1 when a required protection is missing
    actionpool bench [--quick] [--out DIR]
    actionpool stress --executions N --concurrency C [--hostile-share 0.1] [--json FILE]
    actionpool serve --config FILE [--host H] [--port P]                     exit 2 bad config, 3 cannot start (docs/gateway.md)
    actionpool replay FLOW_ID --config FILE [--source FILE [--slug S]]      exit 0 same, 4 different
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import difflib
import logging
import signal
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import orjson

from ._config import FetchConfig, Limits, RunnerConfig, SandboxConfig
from ._errors import ActionpoolError, ConfigError, RunnerClosed, SandboxUnavailable
from ._flow import Action, FlowResult
from ._engine import event_problem
from ._runner import Runner
from ._triggers import TRIGGERS

EXIT_ALLOW, EXIT_ERROR, EXIT_USAGE, EXIT_DENY = 0, 1, 2, 3
# What `pip install -e '.[serve]'` adds (pyproject.toml): without it serve and replay say so, not a traceback.
_SERVE_EXTRA = frozenset({"uvicorn", "httptools", "prometheus_client", "cel"})


class UsageError(Exception):
    pass


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
        return v
    return parse


def _host(text: str) -> str:
    """An allowlist entry is a host, not a URL: ``http://x/`` is refused with the entry it probably meant."""
    if "://" in text or "/" in text or "?" in text or "@" in text:
        host = urllib.parse.urlsplit(text if "://" in text else f"//{text}").hostname
        hint = f"; did you mean --allow-host {host}?" if host else ""
        raise argparse.ArgumentTypeError(f"expects a host name, not a URL: {text!r}{hint}")
    if not text or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(f"expects a host name, got {text!r}")
    return text


def _trigger(text: str) -> str:
    """A trigger name; a near miss (``postlogin``, ``post_login``, ``PostLogin``) gets a "did you mean"."""
    if text in TRIGGERS:
        return text
    norm = "-".join(text.replace("_", "-").replace(" ", "-").lower().split("-"))
    squashed = {t.replace("-", ""): t for t in TRIGGERS}
    guess = norm if norm in TRIGGERS else squashed.get(norm.replace("-", ""))
    if guess is None:
        close = difflib.get_close_matches(norm, sorted(TRIGGERS), n=1, cutoff=0.6)
        guess = close[0] if close else None
    hint = f"; did you mean {guess}?" if guess else ""
    raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(sorted(TRIGGERS))}){hint}")


_TRIGGER_HELP = f"one of {', '.join(sorted(TRIGGERS))}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="actionpool", description="Run untrusted login/registration actions in isolated workers.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run one flow and print its FlowResult as JSON")
    r.add_argument("actions", nargs="+", metavar="ACTION.py", help="action files, in flow order")
    r.add_argument("--trigger", required=True, type=_trigger, metavar="TRIGGER", help=_TRIGGER_HELP)
    r.add_argument("--event", required=True, metavar="EVENT.json", help="event file, or - for stdin")
    r.add_argument("--tenant", default="default")
    r.add_argument("--secret", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument("--denial-message", default=None)
    r.add_argument("--timeout", type=_positive(float), help="per-action time limit in seconds (default 5)")
    r.add_argument("--flow-timeout", type=_positive(float), help="whole-flow time limit in seconds (default 20)")
    r.add_argument("--memory-mb", type=_positive(int), help="memory cap per worker in MiB (default 128)")
    r.add_argument("--allow-host", action="append", default=[], type=_host, metavar="HOST",
                   help="fetch allowlist entry: a host name, *.example.com or an IP (repeatable)")
    r.add_argument("--fetch-stub", metavar="FILE", help="answer api.fetch offline from a JSON file mapping "
                   "'METHOD URL' to {status, headers, body}; nothing reaches the network")
    r.add_argument("--cache", default="memory://", metavar="URL", help="memory:// or redis://host:port/db")
    r.add_argument("--sandbox", choices=("strict", "degraded", "off"), default="strict")
    r.add_argument("--format", choices=("json", "pretty"), default="json",
                   help="json (default): the FlowResult contract; pretty: a readable test pane")
    r.add_argument("--compact", action="store_true", help="print JSON on one line")

    c = sub.add_parser("check", help="compile action files and find their handlers (nothing is run)")
    c.add_argument("files", nargs="+", metavar="ACTION.py", help="action files")
    c.add_argument("--trigger", type=_trigger, metavar="TRIGGER",
                   help=f"the trigger the actions are bound to, {_TRIGGER_HELP} (default: any)")

    d = sub.add_parser("doctor", help="report which sandbox protections this host offers")
    d.add_argument("--json", action="store_true")
    d.add_argument("--store", metavar="URL", help="also check this Redis (the sidecar's store) for persistence")
    d.add_argument("--config", metavar="serve.toml", help="also check the store of this sidecar config")

    from ..sidecar import _cli as sidecar_cli  # the sidecar's commands: a floor above; parsers only

    sidecar_cli.add_parsers(sub)
    sub.add_parser("bench", help="benchmarks against the baselines (see: actionpool bench --help)")
    sub.add_parser("stress", help="stress and chaos run (see: actionpool stress --help)")
    return p


def _action_file_problem(path: str) -> str | None:
    """Why ``path`` cannot be an action file, or None: ``run`` and ``check`` refuse the same files alike.

    A directory, or a suffix no language has (a ``.json`` event, a ``README.md``): the
    languages are the checkers' suffixes, so ``run`` never executes what ``check`` refuses.
    """
    from ._check import CHECKERS

    p = Path(path)
    if p.is_dir():
        return f"{path} is a directory, not an action file; name the files (e.g. {path.rstrip('/')}/*.py)"
    if p.suffix in CHECKERS:
        return None
    known = ", ".join(sorted(CHECKERS))
    hint = "; a .json file is an event, not an action" if p.suffix.lower() == ".json" else ""
    return f"{path}: not an action file: no checker for {p.suffix or 'files without a suffix'} (known: {known}){hint}"


def _check_run_paths(actions: list[str], event: str, trigger: str) -> None:
    """The action files and the event of ``run``; swapped ones (``run x.event.json --event x.py``) are named."""
    from ._check import CHECKERS

    event_is_code = event != "-" and Path(event).suffix in CHECKERS
    json_actions = [a for a in actions if Path(a).suffix.lower() == ".json"]
    if event_is_code and json_actions:
        raise UsageError(f"the action and the event look swapped: {json_actions[0]} is JSON and --event {event} is "
                         f"an action file; the action files come first, the event after --event "
                         f"(actionpool run {event} --trigger {trigger} --event {json_actions[0]})")
    if event_is_code:
        raise UsageError(f"--event {event} looks like an action file, not an event (a JSON object); "
                         f"did you swap the action and the event?")
    for path in actions:
        problem = _action_file_problem(path)
        if problem is not None:
            raise UsageError(problem + ("; give it with --event" if path in json_actions else ""))


def _read_event(path: str, max_frame_bytes: int) -> Any:
    """The event as the runner would accept it; anything it would deny as ``invalid_event`` is a usage error."""
    try:
        if path == "-":
            raw = sys.stdin.buffer.read()
        else:
            with open(path, "rb") as f:
                raw = f.read()
    except OSError as exc:
        raise UsageError(f"cannot read event {path}: {exc.strerror}") from None
    try:
        event = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise UsageError(f"event {path} is not valid JSON: {exc}") from None
    if type(event) is not dict:
        raise UsageError(f"event {path} must be a JSON object, got {type(event).__name__}")
    problem = event_problem(event, max_frame_bytes)
    if problem is not None:
        raise UsageError(f"event {path}: {problem}")
    return event


def _secrets(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--secret expects KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


# The config key each ``run`` option sets: a bad value is reported under the flag the user typed.
_FLAG_OF_KEY = {"limits.action_timeout_s": ("--timeout", "timeout"),
                "limits.flow_timeout_s": ("--flow-timeout", "flow_timeout"),
                "limits.memory_mb": ("--memory-mb", "memory_mb"),
                "cache_url": ("--cache", "cache"),
                "sandbox.mode": ("--sandbox", "sandbox")}


def _as_flag_error(exc: ConfigError, args: argparse.Namespace) -> str:
    """``limits.memory_mb must be at least 32`` -> ``--memory-mb 8: must be at least 32``: the config key is
    what config files say; on the command line the message names the flag that was given."""
    text = str(exc)
    key = text.split(" ", 1)[0]
    flag = _FLAG_OF_KEY.get(key)
    value = getattr(args, flag[1], None) if flag else None
    if flag is None or value is None:
        return text
    return f"{flag[0]} {value}: {text[len(key):].strip()}"


def _config(args: argparse.Namespace) -> RunnerConfig:
    limits = Limits()
    over = {k: v for k, v in (("action_timeout_s", args.timeout), ("flow_timeout_s", args.flow_timeout),
                              ("memory_mb", args.memory_mb)) if v is not None}
    limits = dataclasses.replace(limits, **over)
    return RunnerConfig(pool_size=1, limits=limits, cache_url=args.cache,
                        fetch=FetchConfig(allow_hosts=tuple(args.allow_host), stub=_fetch_stub(args.fetch_stub)),
                        sandbox=SandboxConfig(mode=args.sandbox)).validate()


def _fetch_stub(path: str | None) -> dict[str, Any] | None:
    from ._fetch_stub import load_fetch_stub

    return None if path is None else load_fetch_stub(path)


async def _run(args: argparse.Namespace) -> int:
    _check_run_paths(args.actions, args.event, args.trigger)
    secrets = _secrets(args.secret)
    actions = [Action.from_file(path, secrets=secrets) for path in args.actions]
    config = _config(args)
    event = _read_event(args.event, config.limits.max_frame_bytes)
    runner = Runner(config)
    signals = _CloseOnSignal(runner)
    try:
        async with runner:
            result = await runner.run_flow(trigger=args.trigger, actions=actions, event=event, tenant=args.tenant,
                                           denial_message=args.denial_message)
    except RunnerClosed:  # the signal came before the flow started: nothing ran
        if signals.received is None:
            raise
        print("actionpool: the runner closed before the flow started; no action ran", file=sys.stderr)
        result = None
    finally:
        await signals.finish()
    if result is not None:
        _print_result(result, args)
    if signals.received is not None:
        return 128 + signals.received
    return EXIT_ALLOW if result is not None and result.allowed else EXIT_DENY


def _print_result(result: FlowResult, args: argparse.Namespace) -> None:
    if args.format == "pretty":
        from ._pane import render

        render(result, sys.stdout)
        return
    opt = 0 if args.compact else orjson.OPT_INDENT_2
    sys.stdout.write(orjson.dumps(result.to_dict(), option=opt).decode() + "\n")


class _CloseOnSignal:
    """SIGTERM and SIGINT close the runner: the flow in flight is denied ``shutdown`` and no worker survives."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.received: int | None = None
        self._closing: asyncio.Future[None] | None = None
        self._loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: int) -> None:
        if self.received is not None:
            return
        self.received = sig
        print(f"actionpool: {signal.Signals(sig).name}: closing the runner", file=sys.stderr, flush=True)
        self._closing = asyncio.ensure_future(self.runner.close(grace=0.0))

    async def finish(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.remove_signal_handler(sig)
        if self._closing is not None:
            await self._closing


def _check(args: argparse.Namespace) -> int:
    from ._check import CheckUsageError, check_file

    reports = []
    for path in args.files:
        problem = _action_file_problem(path)
        if problem is not None:
            raise UsageError(problem)
        try:
            reports.append(check_file(path, args.trigger))
        except CheckUsageError as exc:
            raise UsageError(str(exc)) from None
    for rep in reports:
        if rep.ok:
            found = sorted(set(rep.handlers.values()))
            where = f" for {args.trigger}" if args.trigger else ""
            print(f"{rep.path}: ok: {', '.join(found)}{where}")
        for problem in rep.problems:
            print(f"{rep.path}:{problem}" if problem[:1].isdigit() else f"{rep.path}: {problem}")
    bad = sum(1 for r in reports if not r.ok)
    if bad:
        print(f"{bad} of {len(reports)} file(s) with problems", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_ALLOW


def _doctor(args: argparse.Namespace) -> int:
    from ._doctor import doctor

    store = None
    if args.store or args.config:
        from ..sidecar._doctor import store_report

        store = store_report(args.store, args.config)
    return doctor(as_json=args.json, store=store)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if argv and argv[0] in ("bench", "stress"):  # their own parsers take every option
        try:
            if argv[0] == "bench":
                from ..benchmarks.bench import main as sub_main
            else:
                from ..benchmarks.stress import main as sub_main
        except ImportError as exc:
            print(f"actionpool: error: {argv[0]} is not available in this build ({exc})", file=sys.stderr)
            return EXIT_USAGE
        try:
            return int(sub_main(argv[1:]) or 0)
        except KeyboardInterrupt:
            return 130
        except SystemExit as exc:  # argparse (already printed) or a usage message
            if isinstance(exc.code, str):
                print(f"actionpool {argv[0]}: error: {exc.code}", file=sys.stderr)
                return EXIT_USAGE
            return EXIT_USAGE if exc.code not in (0, None) else 0
        except Exception as exc:  # never a silent failure: the reason goes to stderr
            print(f"actionpool {argv[0]}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
            return EXIT_ERROR
    try:
        args = _parser().parse_args(argv)
        args.argv = list(argv)   # `serve --workers N` starts N processes with the same command line
    except SystemExit as exc:
        return EXIT_USAGE if exc.code not in (0, None) else 0
    try:
        if args.command == "run":
            return asyncio.run(_run(args))
        if args.command == "check":
            return _check(args)
        if args.command == "doctor":
            return _doctor(args)
        if args.command in ("serve", "replay"):
            try:
                from ..sidecar import _cli as sidecar_cli

                return sidecar_cli.run(args)
            except ModuleNotFoundError as exc:
                if exc.name not in _SERVE_EXTRA:
                    raise
                print(f"actionpool {args.command}: error: {exc}: the serve extra is not installed; "
                      f"pip install -e '.[serve]'", file=sys.stderr)
                return EXIT_USAGE
    except SandboxUnavailable as exc:
        print(f"actionpool: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except (UsageError, ActionpoolError) as exc:
        text = _as_flag_error(exc, args) if isinstance(exc, ConfigError) and args.command == "run" else str(exc)
        print(f"actionpool: error: {text}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, RuntimeError) as exc:  # e.g. a worker that cannot start on this host
        print(f"actionpool: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
