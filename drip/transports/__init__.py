"""Mail transports: hand one finished message to an SMTP server, a folder, or a list in memory.

base.py     the Transport protocol every transport implements
url.py      DRIP_MAIL_URL: open_transport(url), mail_timeout(url)
smtp.py     SMTPTransport: one pooled connection, PIPELINING, DATA spoken by hand
file.py     FileTransport: one .eml file per message (file://)
memory.py   MemoryTransport: a list and scripted failures, for unit tests of callers
errors.py   what each failure means to the caller's retry policy: SMTP replies and network or
            disk errors mapped to drip.errors' DeliveryError classes, in one place
"""

from drip.transports.base import Transport
from drip.transports.file import FileTransport
from drip.transports.memory import AfterContent, MemoryTransport
from drip.transports.smtp import SMTPTransport, TlsMode
from drip.transports.url import mail_timeout, open_transport

__all__ = [
    "AfterContent",
    "FileTransport",
    "MemoryTransport",
    "SMTPTransport",
    "TlsMode",
    "Transport",
    "mail_timeout",
    "open_transport",
]
