"""actionpool's HTTP sidecar: the service a gateway calls for its login flows, and an operator manages.

It sits one floor above :mod:`actionpool.runner` (whose public API, ``actionpool.runner`` and
``actionpool.runner.hosting``, is all it uses) and beside ``actionpool.benchmarks``. It owns what a
network service needs and an embedded runner does not: the HTTP server and its guard against strangers,
the config file, the store of tenants, actions, flows, versions, secrets and run history (memory or
Redis, shared by replicas), the management API, replay, metrics and the OpenAPI document.

Public API::

    from actionpool.sidecar import Sidecar, ServeConfig, load_config, serve

``actionpool serve --config serve.toml`` is the usual way in (docs/gateway.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._config import ServeConfig, load_config
    from ._serve import serve
    from ._server import Sidecar

__all__ = ["ServeConfig", "Sidecar", "load_config", "serve"]

_WHERE = {"ServeConfig": "_config", "load_config": "_config", "serve": "_serve", "Sidecar": "_server"}


def __getattr__(name: str) -> Any:
    """Lazy: ``actionpool.sidecar`` imports the serve extra (uvicorn, prometheus-client, cel) only when used."""
    if name not in _WHERE:
        raise AttributeError(f"module 'actionpool.sidecar' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
