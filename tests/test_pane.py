"""``actionpool run --format pretty`` shows what actions wrote as text, never as rich markup (issue 16).

A log line ``[bold]`` used to vanish into a style and ``[/x]`` crashed the pane
(``MarkupError``: closing tag with nothing open). Every string an action, an
event or the configuration supplies must come out exactly as written: log
messages, denial reasons, the user's message, error codes, tracebacks, state,
claims and metadata keys and values, action slugs.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

from conftest import make_runner
from actionpool.runner import Action
from actionpool.runner._pane import render

ROOT = Path(__file__).resolve().parent.parent
MARKUP = ["[bold]B[/bold]", "[/x]", "[link=https://evil.invalid]L[/link]", "[red on white]R", ":smile:", "[/]"]

# Every field an action controls, each carrying every markup sample.
WRITER = f"""
MARKUP = {MARKUP!r}
def on_execute(event, api):
    for m in MARKUP:
        api.log("info", "log " + m)
        print("print " + m)
    api.state.set("state " + MARKUP[0], {{"value " + MARKUP[1]: MARKUP[2]}})
    api.session.setCustomClaim("https://claims.example/" + MARKUP[3], MARKUP[4])
    api.user.setAppMetadata("app " + MARKUP[1], "value " + MARKUP[5])
    api.user.setUserMetadata("user " + MARKUP[2], MARKUP[0])
"""
DENIER = f"""
MARKUP = {MARKUP!r}
def on_execute(event, api):
    api.access.deny("reason " + " ".join(MARKUP), "user sees " + " ".join(MARKUP))
"""
THROWER_JS = "throw new Error('thrown ' + " + json.dumps(" ".join(MARKUP)) + ");"


def pane(result: object) -> str:
    out = io.StringIO()
    render(result, out, width=400)  # wide: no table cell wraps a sample
    return out.getvalue()


async def test_markup_written_by_an_action_is_shown_as_written() -> None:
    async with make_runner() as r:
        result = await r.run_flow(trigger="post-login", event={"user": {"user_id": "u1"}}, tenant="t1",
                                  actions=[Action(slug="writer", source=WRITER), Action(slug="denier", source=DENIER)])
    assert result.outcome == "deny"
    text = pane(result)
    for m in MARKUP:
        assert f"log {m}" in text and f"print {m}" in text, m    # log lines, whatever their source
    assert "reason " + " ".join(MARKUP) in text                   # the denial reason
    assert "user sees " + " ".join(MARKUP) in text                # the user's message
    for fragment in (f"state {MARKUP[0]}", f"value {MARKUP[1]}", MARKUP[2],   # state: keys and values
                     f"https://claims.example/{MARKUP[3]}", MARKUP[4],        # claims
                     f"app {MARKUP[1]}", f"value {MARKUP[5]}", f"user {MARKUP[2]}"):  # metadata patch
        assert fragment in text, fragment


async def test_a_thrown_error_with_markup_is_shown_as_written() -> None:
    async with make_runner() as r:
        result = await r.run_flow(trigger="post-login", event={"user": {}}, tenant="t1",
                                  actions=[Action(slug="thrower", source=THROWER_JS, filename="thrower.js")])
    assert result.denial is not None and result.denial["kind"] == "uncaught_error"
    text = pane(result)
    assert "Error: thrown " + " ".join(MARKUP) in text  # in the reason and in the traceback
    assert text.count("thrown " + " ".join(MARKUP)) >= 2, text


def test_cli_pretty_pane_does_not_crash_on_markup(tmp_path: Path) -> None:
    action = tmp_path / "noisy.py"
    action.write_text("def on_execute(event, api):\n    api.log('warn', '[/x] [bold]still here')\n"
                      "    api.access.deny('[/]', '[link=https://evil.invalid]click[/link]')\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "actionpool.runner.cli", "run", str(action), "--trigger", "post-login",
                           "--event", "-", "--format", "pretty"], cwd=ROOT, input="{}", capture_output=True,
                          text=True, timeout=60)
    assert "MarkupError" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "[/x] [bold]still here" in proc.stdout
    assert "[link=https://evil.invalid]click[/link]" in proc.stdout and "reason: [/]" in proc.stdout
