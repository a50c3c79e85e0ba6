"""Ask an external risk API for a score, log it, deny above 90 (reference: "Fetch then deny").

    actionpool run examples/fetch_then_deny.py --trigger post-login --event examples/fetch_then_deny.event.json \
        --secret RISK_API_URL=https://risk.cymmetri.io/v1/score --allow-host risk.cymmetri.io \
        --fetch-stub examples/fetch_then_deny.stub.json

Offline, the bundled stub (examples/fetch_then_deny.stub.json) answers for the
risk API with a score of 37 and nothing reaches the network; without
--fetch-stub the request goes to the URL given. The URL comes from the
action's secrets so it can point at a local server (--secret
RISK_API_URL=http://127.0.0.1:8080/v1/score --allow-host 127.0.0.1);
the host must be on the fetch allowlist (--allow-host) or the call is refused
with error_kind "http_fetch_denied" and the flow is denied without a packet
leaving the machine. The request is made by the supervisor, not the worker.
"""

import json

DEFAULT_URL = "https://risk.cymmetri.io/v1/score"


async def on_execute_post_login(event, api):
    url = event.secrets.RISK_API_URL or DEFAULT_URL
    res = await api.fetch(url, {
        "method": "POST",
        "body": json.dumps({"ip": event.request.ip}),
        "headers": {"Content-Type": "application/json"},
    })
    if res.status != 200:  # handle non-2xx responses explicitly: fail closed
        api.deny(f"risk-api-status-{res.status}")
        return

    score = json.loads(res.body).get("score")
    if score is None:
        score = 0

    api.log("info", f"Risk score from external API: {score}")

    if score > 90:
        api.deny("external-risk-score-too-high")
        return

    api.state.set("external_risk_score", score)
