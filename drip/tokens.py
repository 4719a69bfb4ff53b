"""Unsubscribe tokens: `<public id>.<signature>`, naming a patient and nothing personal.

The public id is the patient's opaque random id (22 characters of base64url,
drip.patients.new_public_id; never the row id, never the address); the signature an HMAC-SHA256
of it under DRIP_SECRET_KEY, cut to 128 bits, so a link cannot be forged for another patient.
Tokens never expire (an email from a year ago must still work). The first DRIP_SECRET_KEY signs;
every one of them verifies, so a key can be rotated without breaking the links in emails already
sent. No database here: the linter and the message builder use it (drip.unsubscribe acts on it).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Sequence

PURPOSE = b"drip-unsubscribe:"
# The unpadded urlsafe base64 of 16 random bytes, a dot, then that of a 16-byte signature
# (ASCII only: anything else is not a token drip made).
TOKEN = re.compile(r"([A-Za-z0-9_-]{22})\.([A-Za-z0-9_-]{22})")


def _signature(secret: str, public_id: str) -> str:
    digest = hmac.new(secret.encode(), PURPOSE + public_id.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:16]).rstrip(b"=").decode()


def make_token(secret: str, public_id: str) -> str:
    return f"{public_id}.{_signature(secret, public_id)}"


def read_token(secrets: str | Sequence[str], token: str) -> str | None:
    """The public id a token was made for by any of `secrets`, or None if it is malformed
    (whatever the characters), truncated or forged."""
    match = TOKEN.fullmatch(token)
    if match is None:
        return None
    public_id = match[1]
    keys = (secrets,) if isinstance(secrets, str) else secrets
    for key in keys:
        if hmac.compare_digest(match[2], _signature(key, public_id)):
            return public_id
    return None


def unsubscribe_url(public_url: str, secret: str, public_id: str) -> str:
    return f"{public_url.rstrip('/')}/unsubscribe/{make_token(secret, public_id)}"
