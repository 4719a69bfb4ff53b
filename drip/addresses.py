"""DRIP_FROM's one `Display Name <addr@domain>` split into its parts.

email.utils.parseaddr reads a comma as the end of one address of a list, so
"Lakeside Wellness, LLC <care@lakeside.example>" came back as ('', 'Lakeside'). DRIP_FROM is
always one mailbox: everything before the last `<` is the display name (quoted or not), and
the email package quotes it again when it builds the From header. `one_mailbox` checks a
DRIP_FROM once, at start-up, and gives its addr-spec in the ASCII form the relay takes.
"""

from __future__ import annotations

import re
import unicodedata
from email.utils import parseaddr

from email_validator import EmailNotValidError, validate_email

from drip import headers

_NAME_ADDR = re.compile(r"\s*([^<>]*?)\s*<([^<>]*)>\s*")
_ADDR_SPEC = re.compile(r"[^\s<>,;\"]+@[^\s<>,;\"]+")
_UNFIT = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}  # controls, line breaks, invisible format…


def split_from(value: str) -> tuple[str, str]:
    """(display name, addr-spec); ('', '') when `value` is not one mailbox. A bare address has
    no display name."""
    match = _NAME_ADDR.fullmatch(value)
    if match is None:
        return ("", "") if "<" in value or ">" in value else parseaddr(value)
    display, addr_spec = match[1], match[2].strip()
    if len(display) >= 2 and display[0] == display[-1] == '"':
        display = re.sub(r"\\(.)", r"\1", display[1:-1])
    return display, addr_spec


def one_mailbox(value: str) -> tuple[str, str]:
    """(display name, addr-spec with its domain in the xn-- form) of a From value; ValueError
    saying what to fix when it is not one mailbox on one line with an ASCII local part (the
    relay has no SMTPUTF8), or holds an RFC 2047 encoded word (drip.headers). A character is
    named as U+XXXX, never echoed; a line break at the end is refused like any other."""
    if bad := next((c for c in value if unicodedata.category(c) in _UNFIT), None):
        raise ValueError(f"contains {headers.code_point(bad)}")
    if headers.ENCODED_WORD_START in value:
        raise ValueError(
            "contains '=?', which mail programs read as the start of an RFC 2047 encoded word "
            "(a way to hide a line break); write the display name as plain text"
        )
    if len(_ADDR_SPEC.findall(value)) > 1:
        raise ValueError("holds more than one address")
    display, addr_spec = split_from(value)
    if not addr_spec.rpartition("@")[0].isascii():
        raise ValueError(
            "has letters outside ASCII before the @ (the relay takes no SMTPUTF8); only the "
            "domain may be international"
        )
    try:
        checked = validate_email(
            addr_spec, check_deliverability=False, allow_smtputf8=False, globally_deliverable=False
        )
    except EmailNotValidError as e:
        raise ValueError(f"has no valid address in <…> ({str(e).rstrip('.')})") from None
    return display, str(checked.ascii_email)
