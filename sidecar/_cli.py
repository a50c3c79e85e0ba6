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

        return serve(args.config, args.host, args.port, log_level=args.log_level)
    from ._replay import replay

    return asyncio.run(replay(args.config, args.flow_id, args.source, args.slug, fetch_stub=args.fetch_stub,
                              live_fetch=args.live_fetch))
