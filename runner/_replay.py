"""``actionpool replay FLOW_ID --config FILE [--source FILE [--slug SLUG]]``.

Re-runs a recorded flow (its event as recorded: redacted fields stay
redacted) against the versions deployed now, or with one action replaced by a
draft, in a local Runner, and prints what changed. Needs the shared store
(``[store] url``): a sidecar without one keeps its history in its own memory.
Exit 0: the same decision and effects; 4: they differ; 2: bad input.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import orjson

from ._errors import ActionError, ConfigError
from ._serve_config import load_config
from ._server import Sidecar
from ._store import Version, version_of

EXIT_SAME, EXIT_DIFFERENT = 0, 4
COMPARED = ("outcome", "denial", "app_metadata", "user_metadata", "user_id", "claims", "state", "versions")


def _essence(result: dict[str, Any]) -> dict[str, Any]:
    out = {k: result.get(k) for k in COMPARED}
    if out["denial"] is not None:  # tracebacks and line numbers are not decisions
        out["denial"] = {k: out["denial"].get(k) for k in ("action", "kind", "reason", "error_code")}
    return out


def difference(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    a, b = _essence(before), _essence(after)
    return {k: {"recorded": a[k], "replayed": b[k]} for k in COMPARED if a[k] != b[k]}


async def replay(config_path: str, flow_id: str, source_file: str | None = None, slug: str | None = None) -> int:
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
        tenant = cfg.tenants.get(run["tenant"])
        if tenant is None:
            raise ConfigError(f"{config_path}: tenants.{run['tenant']}: the run's tenant is not configured")
        await app.runner.start()
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
                draft = app._action(tenant, slug, Version(version_of(source), source, time.time()))
                for i in positions:
                    actions[i] = draft
                versions[slug] = f"draft:{version_of(source)}"
            result = await app.runner.run_flow(trigger=run["trigger"], actions=actions, event=run["event"],
                                               tenant=tenant.name, denial_message=tenant.denial_message)
        finally:
            await app.runner.close()
    finally:
        await app.store.close()
    replayed = result.to_dict()
    replayed["versions"] = versions
    diff = difference(run["result"], replayed)
    out = {"flow_id": flow_id, "replayed_flow_id": replayed["flow_id"], "same": not diff, "differences": diff}
    sys.stdout.write(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode() + "\n")
    return EXIT_SAME if not diff else EXIT_DIFFERENT
