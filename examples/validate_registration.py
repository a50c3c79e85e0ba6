"""Validate a sign-up before the user is created (reference: pre-user-registration).

    actionpool run examples/validate_registration.py --trigger pre-user-registration \
        --event examples/validate_registration.event.json

* a blocked domain         -> api.access.deny(reason, user_message)
* a malformed phone number -> api.validation.error(error_code, error_message)
* otherwise: record where the sign-up came from in user_metadata and assign
  the user id (derived from the e-mail, so a retried sign-up gets the same id).
"""

import hashlib
import re

BLOCKED_DOMAINS = ("competitor.example", "spam.example")
E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")


def on_execute_pre_user_registration(event, api):
    email = (event.user.email or "").strip().lower()
    domain = email.rpartition("@")[2]
    if domain in BLOCKED_DOMAINS:
        api.access.deny(f"blocked-domain:{domain}", "Sign-ups from this e-mail domain are not accepted.")
        return

    phone = event.user.phone_number
    if phone is not None and not E164.match(phone):
        api.validation.error("invalid_phone_number", "Enter the phone number in international format, e.g. +919812345678.")
        return

    query = event.request.query or {}
    api.user.setUserMetadata("signup_source", query.get("utm_source", "direct"))  # (key, value) form
    api.user.setUserMetadata({"locale": event.request.language or "en"})          # (patch) form
    api.user.setUserId("cym|" + hashlib.sha256(email.encode()).hexdigest()[:24])
