"""Showing a URL without its password: every message, log line and repr that names a database,
broker or mail server goes through redact().

The URLs come from operators, well-formed or not, so redact() does not parse them (a parser gives
up, or splits a password holding '@' or ':' in the wrong place); it assumes the worst instead:
everything before the last '@' is credentials; only the scheme survives, and the user name of
`scheme://user:…@`.
"""

from __future__ import annotations

import re

HIDDEN = "***"
# DRIP_*_URL schemes; a word before ':' that is not one of them may be a user name, not a scheme.
SCHEMES = frozenset(
    "sqlite postgresql postgres redis rediss smtp smtps file http https amqp amqps imap imaps "
    "pop3 pop3s".split()
)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9.+-]*):(//)?")
_QUERY_SECRET = re.compile(r"(?i)([?&;](?:password|passwd|pass|pwd|secret|token)=)[^&;#]*")


def redact(url: str) -> str:
    """`url` with any password (and whatever might be one) replaced by ***."""
    url = _QUERY_SECRET.sub(rf"\g<1>{HIDDEN}", url)
    head, at, host = url.rpartition("@")
    if not at:
        if "//" not in url and ":" in url:  # "admin:s3cret": no host to tell it from a password
            return f"{url.partition(':')[0]}:{HIDDEN}"
        return url
    match = _SCHEME.match(head)
    if match and match[2]:  # scheme://user:password@host: the user name may show
        user, colon, _ = head[match.end() :].partition(":")
        return f"{match[0]}{user}{':' + HIDDEN if colon else ''}@{host}"
    if match and match[1].lower().split("+")[0] in SCHEMES:
        return f"{match[0]}{HIDDEN}@{host}"  # scheme:user:password@host, or scheme:password@…
    return f"{HIDDEN}@{host}"  # user:password@host
