"""Rewrites the api proxy's execution so it offers every method, then calls one post-login does not offer."""
from actionpool.protocol import METHODS


def on_execute(event, api):
    ex = object.__getattribute__(api, "_ex")
    ex.offered = frozenset(METHODS)
    object.__setattr__(api.user, "_ex", ex)
    api.user.setUserId("hijacked-user")
