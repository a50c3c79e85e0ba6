"""The TOML config as the declarative bootstrap of the store (GitOps), and the drift between the two.

The rule (docs/gateway.md, "The config and runtime changes"):

- At start, when the store holds no tenant at all (``is_empty()``: memory:// always, a fresh Redis), the
  config's tenants, secrets, actions (from their files) and flows are written to the store as author
  ``config`` (audit op ``sync``).
- Otherwise the store wins: runtime changes made through the management API are kept, and every
  difference between the config and the store is logged at start as one ``drift`` line and readable at
  ``GET /v1/drift``.
- ``actionpool serve --sync-config`` makes every tenant the config names equal to the config at start
  (settings, secrets, action sources and flows); objects only the store has stay, and are reported.

Only names and version ids are compared and reported for secrets: never a value.
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING, Any

from ..runner import TRIGGERS, ConfigError
from ..runner.hosting import validate_source
from ._config import ActionSpec, TenantSpec
from ._tenancy import settings_of

if TYPE_CHECKING:
    from ._server import Sidecar

log = logging.getLogger("actionpool.serve")
AUTHOR = "config"


def _source(app: Sidecar, tenant: str, spec: ActionSpec) -> str | None:
    if spec.file is None:
        return None
    try:
        return spec.file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{app.config.path}: tenants.{tenant}.actions.{spec.slug}.file: cannot read "
                          f"{spec.file}: {exc}") from None


def _bound(spec: TenantSpec, slug: str) -> list[str]:
    return [t for t, entries in spec.flows.items() if slug in entries]


def _same_action(cur: Any, source: str, spec: ActionSpec) -> bool:
    return (cur is not None and cur.source == source and cur.language == spec.language
            and tuple(cur.secrets) == tuple(spec.secrets) and cur.failure == spec.failure)


async def apply_tenant(app: Sidecar, spec: TenantSpec) -> list[str]:
    """Make the store's copy of one config tenant equal to the config; what changed, as short lines."""
    store, name, done = app.store, spec.name, []
    settings = settings_of(spec)
    rec = store.tenant(name)
    if rec is None or rec.settings != settings:
        await store.put_tenant(name, settings, author=AUTHOR)
        done.append(f"tenant {name}: settings")
    values = store.secret_values(name)
    for sname, value in spec.secrets.items():
        if values.get(sname) != value:
            await store.put_secret(name, sname, value, author=AUTHOR)
            done.append(f"tenant {name}: secret {sname}")
    for slug, aspec in spec.actions.items():
        source = _source(app, name, aspec)
        if source is None or _same_action(store.current(name, slug), source, aspec):
            continue
        problem = validate_source(source, aspec.language, _bound(spec, slug))
        if problem is not None:
            where = f" (line {problem.line}, column {problem.column})" if problem.line is not None else ""
            raise ConfigError(f"{app.config.path}: tenants.{name}.actions.{slug}.file: {aspec.file}: "
                              f"{problem.message}{where}")
        await store.deploy(name, slug, source, language=aspec.language, secrets=aspec.secrets,
                           failure=aspec.failure, message="from the config file", author=AUTHOR)
        done.append(f"tenant {name}: action {slug}")
    for trigger, entries in spec.flows.items():
        cur = store.flow(name, trigger)
        if cur is None or cur.entries != list(entries):
            # Shapes and CEL were checked when the config was loaded; a slug the config names without a
            # file may be deployed through the API later (until then the flow is denied "not_deployed").
            await store.put_flow(name, trigger, list(entries), author=AUTHOR, message="from the config file")
            done.append(f"tenant {name}: flow {trigger}")
    return done


async def apply_config(app: Sidecar, *, sync: bool) -> None:
    """The bootstrap rule at start: apply the config to an empty store (or with --sync-config); report drift."""
    store, cfg = app.store, app.config
    if store.is_empty() or sync:
        changed: list[str] = []
        for spec in cfg.tenants.values():
            changed += await apply_tenant(app, spec)
        if sync:
            for line in changed:
                log.warning("actionpool serve: sync-config: %s set from the config", line)
            for name in sorted(set(store.tenants()) - set(cfg.tenants)):
                log.warning("actionpool serve: sync-config: tenant %s is only in the store (kept)", name)
    app.drift = drift(app)
    for d in app.drift:
        log.warning("actionpool serve: drift: %s", d["detail"])


def _flow_version(entries: Any) -> str:
    import orjson

    return hashlib.sha256(orjson.dumps(entries, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def drift(app: Sidecar) -> list[dict[str, Any]]:
    """Every difference between the config and the store, one dict each (local reads only)."""
    store, cfg, out = app.store, app.config, []

    def add(tenant: str, kind: str, key: str, detail: str, **kw: Any) -> None:
        out.append({"tenant": tenant, "kind": kind, "key": key, "detail": f"tenant {tenant}: {detail}", **kw})

    for name, spec in cfg.tenants.items():
        rec = store.tenant(name)
        if rec is None:
            add(name, "tenant", name, "in the config, not in the store (deleted at runtime?)", config=True,
                store=False)
            continue
        want = settings_of(spec)
        for k in sorted(set(want) | set(rec.settings)):
            if want.get(k) != rec.settings.get(k):
                add(name, "tenant", k, f"setting {k}: the config has {want.get(k)!r}, the store "
                                       f"{rec.settings.get(k)!r}", config=want.get(k), store=rec.settings.get(k))
        have = {s["name"] for s in store.secret_names(name)}
        values = store.secret_values(name)
        for sname in sorted(set(spec.secrets) | have):
            if sname not in have:
                add(name, "secret", sname, f"secret {sname}: in the config, not in the store")
            elif sname not in spec.secrets:
                add(name, "secret", sname, f"secret {sname}: in the store only")
            elif values.get(sname) != spec.secrets[sname]:
                add(name, "secret", sname, f"secret {sname}: the store's value differs from the config's")
        for slug, aspec in spec.actions.items():
            try:
                source = _source(app, name, aspec)
            except ConfigError as exc:
                add(name, "action", slug, str(exc))
                continue
            cur = store.current(name, slug)
            if source is not None and not _same_action(cur, source, aspec):
                add(name, "action", slug, f"action {slug}: the store serves "
                                          f"{cur.version if cur else 'nothing'}, not the config's file",
                    store=cur.version if cur else None)
        for slug in store.slugs(name):
            if slug not in spec.actions:
                cur = store.current(name, slug)
                add(name, "action", slug, f"action {slug}: in the store only", store=cur.version if cur else None)
        for trigger in TRIGGERS:
            want_f = list(spec.flows[trigger]) if trigger in spec.flows else None
            got = store.flow(name, trigger)
            if want_f is None and got is None:
                continue
            if want_f is None:
                add(name, "flow", trigger, f"flow {trigger}: in the store only", store=got.version if got else None)
            elif got is None or got.entries != want_f:
                add(name, "flow", trigger, f"flow {trigger}: the store has "
                                           f"{got.version if got else 'none'}, the config {_flow_version(want_f)}",
                    config=_flow_version(want_f), store=got.version if got else None)
    for name in sorted(set(store.tenants()) - set(cfg.tenants)):
        add(name, "tenant", name, "in the store only (created at runtime)", config=False, store=True)
    return out
