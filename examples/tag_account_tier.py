"""Tag enterprise accounts by e-mail domain for downstream blocks (reference: api.state.set).

    actionpool run examples/tag_account_tier.py --trigger post-login --event examples/tag_account_tier.event.json

A downstream Decision block reads ``step.tag-account-tier.tier == "enterprise"``;
a later action in the same flow reads ``event.step["tag-account-tier"]["tier"]``.
"""


def on_execute_post_login(event, api):
    email = event.user.email or ""
    domain = email.split("@")[1] if "@" in email else ""
    tier = "enterprise" if domain == "cymmetri.io" else "self-serve"

    api.state.set("tier", tier)
