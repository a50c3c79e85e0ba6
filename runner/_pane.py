"""The test pane: ``actionpool run --format pretty`` renders one FlowResult for a person, with rich.

What an action author looks at first: the decision, then why (the denial and
the message the user would see), then what the action wrote (logs with their
levels, state, claims, metadata patch) and how long each action took. JSON
(the default) stays the contract for machines; this is for reading.

Everything shown comes from actions, events or configuration, so none of it
is ever rich markup: every string is placed as a ``Text`` (``[bold]`` stays
``[bold]``, ``[/x]`` cannot close a style nobody opened, ``:smile:`` stays
text). A plain ``str`` handed to rich would be parsed for markup and emoji codes.
"""

from __future__ import annotations

from typing import IO, Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.json import JSON
from rich.table import Table
from rich.text import Text

from ._flow import FlowResult

LEVEL_STYLE = {"debug": "dim", "info": "cyan", "warn": "yellow", "error": "bold red"}
STATUS_STYLE = {"ok": "green", "denied": "yellow", "failed": "red", "skipped": "dim"}


def _banner(result: FlowResult) -> Panel:
    d = result.denial
    if d is None:
        title = Text("ALLOW", style="bold green")
        body = Text(f"{result.trigger} flow allowed for tenant {result.tenant}")
        return Panel(body, title=title, border_style="green")
    body = Text()
    body.append(f"{d['kind']}", style="bold")
    body.append(f" by {d['action'] or '(no action)'}\n")
    body.append("reason: ", style="dim")
    body.append(f"{d['reason']}\n")
    body.append("user sees: ", style="dim")
    body.append(f"{d['user_message']}", style="italic")
    if d.get("error_code"):
        body.append("\nerror code: ", style="dim")
        body.append(str(d["error_code"]))
    parts: list[Any] = [body]
    if d.get("traceback"):
        parts.append(Text(d["traceback"].rstrip(), style="red"))
    return Panel(Group(*parts), title=Text("DENY", style="bold red"), border_style="red")


def _logs(result: FlowResult) -> Table | Text:
    if not result.logs:
        return Text("no log entries", style="dim")
    t = Table("action", "level", "message", title="logs", title_justify="left", expand=False)
    for e in result.logs:
        level = str(e.get("level"))
        t.add_row(Text(str(e.get("action"))), Text(level, style=LEVEL_STYLE.get(level, "")),
                  Text(str(e.get("message"))))
    return t


def _mapping(title: str, value: dict[str, Any]) -> Panel:
    # JSON is highlighted as JSON, never parsed as markup: keys and values stay as the action wrote them
    return Panel(JSON.from_data(value) if value else Text("(none)", style="dim"), title=Text(title), title_align="left",
                 border_style="blue")


def _timings(result: FlowResult) -> Table:
    t = Table("action", "status", "ms", title="actions", title_justify="left")
    for a in result.actions:
        t.add_row(Text(a.slug), Text(a.status, style=STATUS_STYLE.get(a.status, "")), Text(f"{a.duration_ms:.2f}"))
    t.add_row(Text("flow", style="bold"), Text(""), Text(f"{result.duration_ms:.2f}", style="bold"))
    return t


def render(result: FlowResult, out: IO[str], *, width: int | None = None) -> None:
    """Write the pane for ``result`` to ``out`` (colour only when ``out`` is a terminal)."""
    console = Console(file=out, width=width, soft_wrap=False, highlight=False)
    console.print(_banner(result))
    console.print(_logs(result))
    console.print(_mapping("state", result.state))
    console.print(_mapping("claims", {k: v for k, v in result.claims.items() if v}))
    patch = {k: v for k, v in (("app_metadata", result.app_metadata), ("user_metadata", result.user_metadata),
                               ("user_id", result.user_id)) if v}
    console.print(_mapping("metadata patch", patch))
    console.print(_timings(result))
    console.print(Text(f"flow {result.flow_id}  tenant {result.tenant}  trigger {result.trigger}", style="dim"))
