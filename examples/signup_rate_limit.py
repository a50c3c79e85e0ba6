"""Limit sign-ups per client IP with a counter in api.cache (reference: pre-user-registration api.cache).

    actionpool run examples/signup_rate_limit.py --trigger pre-user-registration \
        --event examples/signup_rate_limit.event.json

The cache is scoped to (tenant, trigger) and shared by every runner on the
same backend: run with --cache redis://127.0.0.1:6379/0 to see the counter
grow across runs (memory:// starts empty in every CLI process). The limit is
a secret so operators can change it without editing code. The cache is
best-effort ("items may not be available in later transactions"), so this is
a brake, not an exact quota.
"""

WINDOW_MS = 60 * 60 * 1000  # one hour


def on_execute_pre_user_registration(event, api):
    limit = int(event.secrets.get("MAX_SIGNUPS_PER_HOUR", "5"))
    key = f"signups:{event.request.ip or 'unknown'}"

    record = api.cache.get(key)  # None, or {"value": "3", "expires_at": <ms since the epoch>}
    count = int(record.value) if record is not None else 0
    if count >= limit:
        api.log("warn", f"sign-up rate limit reached ({count}/{limit} this hour)")
        api.access.deny("signup-rate-limit", "Too many sign-ups from your network. Try again later.")
        return

    # Keep the window of the first sign-up: reuse its expiry instead of sliding it.
    options = {"expires_at": record.expires_at} if record is not None else {"ttl": WINDOW_MS}
    result = api.cache.set(key, str(count + 1), options)
    if result.type != "success":
        api.log("warn", f"cache write failed: {result.code}")  # fail open on a full cache: it is a brake
    api.state.set("signups_this_hour", count + 1)
