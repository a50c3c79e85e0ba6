"""Persist the account tier, then embed it in this session's token (reference: "Tag then claim").

    actionpool run examples/tag_then_claim.py --trigger post-login --event examples/tag_then_claim.event.json

app_metadata survives to future logins; the claim lets the application that
receives the token branch without a back-channel lookup. Claims take effect
only in triggers that issue tokens (post-login, issue-tokens).
"""


def on_execute_post_login(event, api):
    # event.user.app_metadata is None when the user has none yet.
    tier = (event.user.app_metadata or {}).get("tier", "free")

    # Persist any tier change from this run (patch form; api.user.setAppMetadata("tier", tier) is the same).
    api.user.setAppMetadata({"tier": tier})

    # Embed in the current token.
    api.session.setCustomClaim("tier", tier)
    api.session.setCustomClaim("geo_country", event.request.geo.country)
