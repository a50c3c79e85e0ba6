"""The trusted side of every api method: an explicit registry, never ``getattr``.

Each execution gets an :class:`ExecutionContext`. The worker already checked
arguments, but the worker is untrusted, so every call is checked again here:
the name must be in the registry, offered by the trigger, of the right kind
(notification vs. request) and with valid parameters. A call the honest proxy
could never have sent is a protocol violation and kills the worker.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from ..protocol import LOG_LEVELS, METHODS, check_params, truncate_utf8

from ._services import InvalidFetchRequest
from ._worker import ApiFailure, CallHandler, Violation

if TYPE_CHECKING:
    from ._flow import FlowState
    from ._services import Services
    from ._triggers import TriggerProfile



class ExecutionContext(CallHandler):
    """Dispatches one execution's api calls onto the flow's state and the services."""

    def __init__(self, flow: "FlowState", slug: str, profile: "TriggerProfile", services: "Services",
                 action_deadline: float) -> None:
        self.flow = flow
        self.slug = slug
        self.profile = profile
        self.services = services
        self.limits = flow.limits_for(slug)
        self.action_deadline = action_deadline
        self.calls = 0
        self.log_entries = 0
        self.denied_here = False
        self.grew_event = False   # state, metadata or user id changed: later actions' events grow
        self._values = [0]        # values (objects, arrays, items) in this execution's api arguments
        # ApiError codes this execution's calls really failed with: the engine believes a worker's
        # "died of an uncaught cache_unavailable" only if it is here (runner/_failure.py).
        self.failed_calls: set[str] = set()
        self._fetch_slots: asyncio.Semaphore | None = None  # created on the first fetch

    # -- admission -----------------------------------------------------------------
    def _admit(self, method: str, params: list[Any], registry: dict[str, Any]) -> tuple[Any, list[Any]]:
        fn = registry.get(method)
        if fn is None:
            raise Violation("protocol_error", f"worker called unknown or misdirected api method {method!r:.70}")
        if method not in self.profile.methods:
            raise Violation("protocol_error", f"worker called api.{method}, which {self.profile.name} does not offer")
        self.calls += 1
        if self.calls > self.limits.max_calls:
            raise Violation("output_limit", f"more than {self.limits.max_calls} api calls in one execution")
        try:
            args = check_params(METHODS[method], params, tree=True, tally=self._values)
        except (TypeError, ValueError) as exc:
            raise Violation("protocol_error", f"invalid arguments from worker: {exc}") from None
        if self._values[0] > self.limits.max_values:
            # Bytes are bounded elsewhere; this bounds what they decode to and keep alive in the flow
            # (a byte of msgpack can be a 56-byte Python object the cyclic GC scans).
            raise Violation("output_limit", f"more than {self.limits.max_values} values in one execution's api calls")
        return fn, args

    def notify(self, method: str, params: list[Any]) -> None:
        fn, args = self._admit(method, params, _NOTIFY)
        fn(self, args)

    def request(self, method: str, params: list[Any]) -> Awaitable[Any]:
        fn, args = self._admit(method, params, _REQUEST)
        return fn(self, args)

    # -- flow control ------------------------------------------------------------------
    def _record_denial(self, kind: str, reason: str, user_message: str | None, error_code: str | None = None) -> None:
        if not self.denied_here:
            self.denied_here = True
            self.flow.deny(self.slug, kind, reason, user_message, error_code)

    def _deny(self, a: list[Any]) -> None:
        self._record_denial("denied", a[0], None)

    def _access_deny(self, a: list[Any]) -> None:
        self._record_denial("denied", a[0], a[1])

    def _validation_error(self, a: list[Any]) -> None:
        self._record_denial("validation_error", a[1], a[1], error_code=a[0])

    # -- state, logs, metadata, claims -------------------------------------------------------
    def _state_set(self, a: list[Any]) -> None:
        self.grew_event = True
        self.flow.set_state(self.slug, a[0], a[1])

    def _log(self, a: list[Any]) -> None:
        level, message = a
        if level not in LOG_LEVELS:
            raise Violation("protocol_error", f"invalid log level {level!r:.20}")
        self.log_entries += 1
        if self.log_entries > self.limits.max_log_entries:
            raise Violation("output_limit", f"more than {self.limits.max_log_entries} log entries in one execution")
        self.flow.log(self.slug, level, truncate_utf8(message, self.limits.max_log_message_bytes))

    def _set_app_metadata(self, a: list[Any]) -> None:
        self.grew_event = True
        self.flow.patch_metadata("app_metadata", a[0])

    def _set_user_metadata(self, a: list[Any]) -> None:
        self.grew_event = True
        self.flow.patch_metadata("user_metadata", a[0])

    def _set_user_id(self, a: list[Any]) -> None:
        if not a[0]:
            raise Violation("protocol_error", "user id must be a non-empty string")
        self.grew_event = True
        self.flow.set_user_id(a[0])

    def _claim(self, token: str, name: str, value: Any) -> None:
        if self.profile.issues_tokens:
            self.flow.set_claim(token, name, value)
        else:
            self.flow.log(self.slug, "warn",
                          f"claim {name!r} discarded: the {self.profile.name} trigger does not issue tokens")

    def _access_claim(self, a: list[Any]) -> None:
        self._claim("access_token", a[0], a[1])

    def _id_claim(self, a: list[Any]) -> None:
        self._claim("id_token", a[0], a[1])

    # -- cache and fetch (value-returning requests) ----------------------------------------------
    async def _cache_get(self, a: list[Any]) -> Any:
        try:
            return await self.services.cache_get(self.flow.tenant, self.flow.trigger, a[0])
        except ApiFailure as exc:
            self.failed_calls.add(exc.kind)
            raise

    async def _cache_set(self, a: list[Any]) -> Any:
        # A backend that is down is a result ({"type": "error", "code": "CacheUnavailable"}), never raised.
        return await self.services.cache_set(self.flow.tenant, self.flow.trigger, a[0], a[1], a[2])

    async def _cache_delete(self, a: list[Any]) -> Any:
        return await self.services.cache_delete(self.flow.tenant, self.flow.trigger, a[0])

    async def _fetch(self, a: list[Any]) -> Any:
        now = time.monotonic()
        remaining = min(self.action_deadline, self.flow.deadline) - now
        # Leave the action a moment after its fetch times out, so the fetch's own verdict
        # (http_fetch_timeout) comes first instead of racing the action's kill timer.
        budget = remaining - min(0.1, remaining * 0.1)
        if self._fetch_slots is None:
            self._fetch_slots = asyncio.Semaphore(self.services.fetch_config.max_concurrent_per_execution)
        async with self._fetch_slots:
            try:
                return await self.services.fetch(self.flow.tenant, a[0], a[1], budget,
                                                 max_reply_bytes=self.limits.max_frame_bytes,
                                                 record=self.flow.fetches)
            except ApiFailure as exc:
                if not isinstance(exc, InvalidFetchRequest):   # the action's own mistake never fails open
                    self.failed_calls.add(exc.kind)
                if exc.kind in ("http_fetch_denied", "http_fetch_timeout"):
                    # "treated as a deny": the flow halts even if the action catches it
                    self._record_denial(exc.kind, str(exc), None)
                raise


# The explicit registries: wire name -> trusted handler. Nothing else is callable from a worker.
_NOTIFY: dict[str, Callable[[ExecutionContext, list[Any]], None]] = {
    "deny": ExecutionContext._deny,
    "access.deny": ExecutionContext._access_deny,
    "validation.error": ExecutionContext._validation_error,
    "state.set": ExecutionContext._state_set,
    "log": ExecutionContext._log,
    "user.setAppMetadata": ExecutionContext._set_app_metadata,
    "user.setUserMetadata": ExecutionContext._set_user_metadata,
    "user.setUserId": ExecutionContext._set_user_id,
    "session.setCustomClaim": ExecutionContext._access_claim,
    "accessToken.setCustomClaim": ExecutionContext._access_claim,
    "idToken.setCustomClaim": ExecutionContext._id_claim,
}
_REQUEST: dict[str, Callable[[ExecutionContext, list[Any]], Awaitable[Any]]] = {
    "cache.get": ExecutionContext._cache_get,
    "cache.set": ExecutionContext._cache_set,
    "cache.delete": ExecutionContext._cache_delete,
    "fetch": ExecutionContext._fetch,
}
assert set(_NOTIFY) | set(_REQUEST) == set(METHODS), "every api method needs exactly one trusted handler"
assert not set(_NOTIFY) & set(_REQUEST)
