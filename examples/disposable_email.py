"""Block logins from disposable e-mail domains (reference: api.deny).

    actionpool run examples/disposable_email.py --trigger post-login --event examples/disposable_email.event.json

The reason goes to the audit log; the user sees the tenant's denial message.
"""


def on_execute_post_login(event, api):
    email = event.user.email or ""  # a missing field reads as None
    if email.endswith("@disposable.example"):
        api.deny("disposable-email-blocked")
        return
