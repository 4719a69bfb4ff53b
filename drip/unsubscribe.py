"""Unsubscribe links: signed with DRIP_SECRET_KEY, naming a patient id and nothing personal.

A token is `<patient id>.<signature>`; the signature is an HMAC-SHA256 of the id, so a link
cannot be forged for another patient, and it never expires (an old email must still work). The
first DRIP_SECRET_KEY signs; every one of them verifies, so a key can be rotated without breaking
the links in emails already sent.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Sequence

PURPOSE = b"drip-unsubscribe:"
# ASCII digits only (str.isdigit also takes "²" and "١٢"), then the unpadded urlsafe base64 of
# 16 bytes: anything else is not a token drip made.
TOKEN = re.compile(r"([1-9][0-9]{0,11}|0)\.([A-Za-z0-9_-]{22})")


def _signature(secret: str, patient_id: int) -> str:
    digest = hmac.new(secret.encode(), PURPOSE + str(patient_id).encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:16]).rstrip(b"=").decode()


def make_token(secret: str, patient_id: int) -> str:
    return f"{patient_id}.{_signature(secret, patient_id)}"


def read_token(secrets: str | Sequence[str], token: str) -> int | None:
    """The patient id a token was made for by any of `secrets`, or None if it is malformed
    (whatever the characters) or forged."""
    match = TOKEN.fullmatch(token)
    if match is None:
        return None
    patient_id = int(match[1])
    keys = (secrets,) if isinstance(secrets, str) else secrets
    for key in keys:
        if hmac.compare_digest(match[2], _signature(key, patient_id)):
            return patient_id
    return None


def unsubscribe_url(public_url: str, secret: str, patient_id: int) -> str:
    return f"{public_url.rstrip('/')}/unsubscribe/{make_token(secret, patient_id)}"
