"""DRIP_FROM's one `Display Name <addr@domain>` split into its parts.

email.utils.parseaddr reads a comma as the end of one address of a list, so
"Lakeside Wellness, LLC <care@lakeside.example>" came back as ('', 'Lakeside'). DRIP_FROM is
always one mailbox: everything before the last `<` is the display name (quoted or not), and
the email package quotes it again when it builds the From header.
"""

from __future__ import annotations

import re
from email.utils import parseaddr

_NAME_ADDR = re.compile(r"\s*([^<>]*?)\s*<([^<>]*)>\s*")


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
