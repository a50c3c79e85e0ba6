"""The ``serve`` and ``replay`` subcommands, kept here so runner/cli.py only wires them in."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

COMMANDS = ("serve", "replay")


def add_parsers(sub: Any) -> None:
    s = sub.add_parser("serve", help="run the HTTP sidecar a gateway calls (docs/gateway.md)")
    s.add_argument("--config", required=True, metavar="FILE", help="the sidecar's TOML config")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    s.add_argument("--log-format", default="text", choices=("text", "json"),
                   help="json: one object per line (ts, level, logger, msg; execution_id, tenant, trigger on a "
                        "flow's lines)")
    s.add_argument("--sync-config", action="store_true",
                   help="make every tenant the config names equal to the config at start (the store otherwise "
                        "wins once it holds a tenant; differences are reported as drift): docs/gateway.md")
    s.add_argument("--workers", type=int, default=1, metavar="N",
                   help="N sidecar processes behind the one port (SO_REUSEPORT), each with its own pool and a 1/N "
                        "share of the memory budget; needs a redis:// store (README \"Every core\")")
    r = sub.add_parser("replay", help="re-run a recorded flow and print what changed (exit 0 same, 4 different)")
    r.add_argument("flow_id", metavar="FLOW_ID")
    r.add_argument("--config", required=True, metavar="FILE")
    r.add_argument("--source", metavar="FILE", help="a draft of one action of the flow")
    r.add_argument("--slug", help="the draft's slug (default: from the file name)")
    fetch = r.add_mutually_exclusive_group()
    fetch.add_argument("--fetch-stub", metavar="FILE", help="answer api.fetch from this stub file (JSON: "
                       "\"METHOD URL\" -> {status, headers, body}) instead of the run's recorded responses")
    fetch.add_argument("--live-fetch", action="store_true", help="make real api.fetch requests (repeats the "
                       "recorded run's side effects); default: answer from the responses recorded with the run")


def run(args: argparse.Namespace) -> int:
    if args.command == "serve":
        from ._serve import serve
        from ._workers import WorkerSlot, child_argv, serve_workers

        if args.workers != 1 and WorkerSlot.from_env() is None:   # the parent of N (never inside one of them)
            return serve_workers(args.config, args.host, args.port, args.workers,
                                 child_argv(getattr(args, "argv", None) or ["serve", "--config", args.config]))

        return serve(args.config, args.host, args.port, log_level=args.log_level,
                     log_format=args.log_format, sync_config=args.sync_config)
    from ._replay import replay

    return asyncio.run(replay(args.config, args.flow_id, args.source, args.slug, fetch_stub=args.fetch_stub,
                              live_fetch=args.live_fetch))
