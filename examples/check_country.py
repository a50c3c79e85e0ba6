"""Leave a trail for operators and a flag for downstream blocks (reference: "Log then state").

    actionpool run examples/check_country.py --trigger post-login --event examples/check_country.event.json

Downstream Decision block:
    step.check-country.country_blocked == true  -> Deny block
    step.check-country.country_blocked == false -> continue
This action only reports; it does not deny by itself.
"""

BLOCKED_COUNTRIES = ("XX", "YY")


def on_execute_post_login(event, api):
    country = event.request.geo.country
    blocked = country in BLOCKED_COUNTRIES

    api.log("warn" if blocked else "info", f"Login from {country} — blocked: {blocked}")

    api.state.set("country_blocked", blocked)
