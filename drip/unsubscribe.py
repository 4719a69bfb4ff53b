"""Unsubscribe links: signed with DRIP_SECRET_KEY, naming a patient id and nothing personal.

A token is `<patient id>.<signature>`; the signature is an HMAC-SHA256 of the id, so a link
cannot be forged for another patient, and it never expires (an old email must still work).
"""

from __future__ import annotations

import base64
import hashlib
import hmac

PURPOSE = b"drip-unsubscribe:"


def _signature(secret: str, patient_id: int) -> str:
    digest = hmac.new(secret.encode(), PURPOSE + str(patient_id).encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:16]).rstrip(b"=").decode()


def make_token(secret: str, patient_id: int) -> str:
    return f"{patient_id}.{_signature(secret, patient_id)}"


def read_token(secret: str, token: str) -> int | None:
    """The patient id a token was made for, or None if it is malformed or forged."""
    head, _, signature = token.partition(".")
    if not head.isdigit() or len(head) > 12:
        return None
    patient_id = int(head)
    if not hmac.compare_digest(signature, _signature(secret, patient_id)):
        return None
    return patient_id


def unsubscribe_url(public_url: str, secret: str, patient_id: int) -> str:
    return f"{public_url.rstrip('/')}/unsubscribe/{make_token(secret, patient_id)}"
