"""``actionpool replay FLOW_ID --config FILE [--source FILE [--slug SLUG]] [--fetch-stub FILE | --live-fetch]``.

Re-runs a recorded flow (its event as recorded: redacted fields stay
redacted) against the versions deployed now, or with one action replaced by a
draft, in a local Runner, and prints what changed. Needs the shared store
(``[store] url``): a sidecar without one keeps its history in its own memory.

A replay repeats no side effect by default: every ``api.fetch`` is answered
from the responses recorded with the run (a request the run did not make
fails with ``http_fetch_error`` and is listed under ``fetches.unanswered``).
``--fetch-stub FILE`` answers from a stub file instead; only ``--live-fetch``
makes real requests.

The replayed result is redacted exactly as the recording was (the tenant's
secrets and the event's redact-path values, keys and values) before it is
compared or printed, so redaction is never a difference and the output never
holds a secret.

Exit 0: the same decision and effects; 4: they differ; 2: bad input.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from ..runner import ActionError, ConfigError, Runner
from ..runner.hosting import flow_redactor, load_fetch_stub, stub_from_fetches
from ._config import ServeConfig, load_config
from ._server import Sidecar
from ._store import Version, version_of

EXIT_SAME, EXIT_DIFFERENT = 0, 4
COMPARED = ("outcome", "denial", "app_metadata", "user_metadata", "user_id", "claims", "state", "versions")
FETCH_MODES = ("recording", "stub", "live")


def _essence(result: dict[str, Any]) -> dict[str, Any]:
    out = {k: result.get(k) for k in COMPARED}
    if isinstance(out["denial"], dict):  # tracebacks and line numbers are not decisions
        out["denial"] = {k: out["denial"].get(k) for k in ("action", "kind", "reason", "error_code")}
    return out


def difference(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    a, b = _essence(before), _essence(after)
    return {k: {"recorded": a[k], "replayed": b[k]} for k in COMPARED if a[k] != b[k]}


class _NoAudit:
    enabled = False

    def emit(self, event: dict[str, Any]) -> None:
        return None


def _with_fetch(cfg: ServeConfig, run: dict[str, Any], secrets: tuple[str, ...], fetch_stub: str | None,
                live_fetch: bool) -> tuple[ServeConfig, str, list[str]]:
    """The config whose Runner answers the replay's fetches as asked: recording (default), stub file or live."""
    if live_fetch:
        return cfg, "live", []
    if fetch_stub is not None:
        stub, mode, skipped = load_fetch_stub(fetch_stub), "stub", []
        redact: tuple[str, ...] = ()
    else:
        stub, skipped = stub_from_fetches(run.get("fetches") or ())
        mode, redact = "recording", secrets  # recorded URLs are redacted: look requests up redacted too
    fetch = dataclasses.replace(cfg.runner.fetch, stub=stub, stub_redact=redact)
    return dataclasses.replace(cfg, runner=dataclasses.replace(cfg.runner, fetch=fetch)), mode, skipped


async def replay(config_path: str, flow_id: str, source_file: str | None = None, slug: str | None = None, *,
                 fetch_stub: str | None = None, live_fetch: bool = False) -> int:
    if fetch_stub is not None and live_fetch:
        raise ConfigError("replay: --fetch-stub and --live-fetch exclude each other")
    cfg = load_config(config_path)
    if cfg.store_url is None:
        raise ConfigError(f"{config_path}: store.url: replay reads the shared run history; without a store the "
                          "history lives in the serving process only")
    app = Sidecar(cfg)
    await app.store.start()
    try:
        run = await app.store.get_run(flow_id)
        if run is None:
            raise ConfigError(f"no recorded run {flow_id!r} (history keeps the last "
                              f"{cfg.server.history_size} flows per tenant)")
        if app.store.tenant(run["tenant"]) is None:
            raise ConfigError(f"tenant {run['tenant']}: the run's tenant is not in the store (deleted?)")
        tenant = app.tenant(run["tenant"])   # settings, flows and secrets: the store's, as the run had them
        secrets = tuple(app.secrets_of(tenant.name).values())
        replay_cfg, mode, skipped = _with_fetch(cfg, run, secrets, fetch_stub, live_fetch)
        # Not started yet: the fetch mode is the replay's own. No audit events: a replay is not a login,
        # and its report (redacted) is the only output.
        app.runner = Runner(replay_cfg.runner, audit=_NoAudit())
        event = run["event"] if isinstance(run.get("event"), dict) else {}
        await app.runner.start()
        app._apply_policy(tenant.name)   # the store's allow_hosts, as the served runs had them
        try:
            actions, versions = app._resolve(tenant, run["trigger"])
            if source_file is not None:
                p = Path(source_file)
                try:
                    source = p.read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError) as exc:
                    raise ActionError(f"cannot read {p}: {exc}") from None
                slug = slug or p.stem.replace("_", "-").lower()
                positions = [i for i, a in enumerate(actions) if a.slug == slug]
                if not positions:
                    raise ConfigError(f"the {run['trigger']} flow of {tenant.name} has no action {slug!r} "
                                      "(use --slug)")
                cur = app.store.current(tenant.name, slug)
                draft = app._action(tenant, slug, Version(
                    version=f"draft-{version_of(source)}", source=source, at=time.time(),
                    language=cur.language if cur else ("javascript" if p.suffix == ".js" else "python"),
                    secrets=cur.secrets if cur else (), failure=cur.failure if cur else None))
                for i in positions:
                    actions[i] = draft
                versions[slug] = f"draft:{version_of(source)}"
            result = await app.runner.run_flow(trigger=run["trigger"], actions=actions, event=event,
                                               tenant=tenant.name, denial_message=tenant.denial_message,
                                               record_fetches=True)
        finally:
            await app.runner.close()
    finally:
        await app.store.close()
    # Redacted exactly as the recording was: the same secrets, the same paths of the (recorded) event.
    red = flow_redactor(secrets, tenant.redact, event)
    replayed = result.to_dict()
    replayed["versions"] = versions
    replayed = red(replayed)
    recorded = run.get("result") if isinstance(run.get("result"), dict) else {}
    diff = difference(recorded, replayed)
    made = result.fetches or []
    unanswered = [{"method": f["method"], "url": f["url"], "error": f.get("error"), "message": f.get("message")}
                  for f in made if "error" in f]
    out: dict[str, Any] = {
        "flow_id": flow_id, "replayed_flow_id": replayed.get("flow_id"), "same": not diff, "differences": diff,
        "fetches": {"answered_from": mode, "recorded": len(run.get("fetches") or ()), "replayed": len(made),
                    "unanswered": unanswered, "not_replayable": skipped},
    }
    if run.get("truncated"):
        out["recording_truncated"] = True  # a cut value differs from the full one: say why
    cut = [f"{f.get('method')} {f.get('url')}" for f in run.get("fetches") or () if isinstance(f, dict)
           and f.get("body_truncated")]
    if cut:  # replayed from a body cut at FETCH_BODY_BYTES: a difference may be the cut, not the action
        out["fetches"]["bodies_truncated"] = cut
    sys.stdout.write(orjson.dumps(red(out), option=orjson.OPT_INDENT_2).decode() + "\n")
    return EXIT_SAME if not diff else EXIT_DIFFERENT
