"""Delivery over SMTP, speaking DATA itself so that each failure says what a retry would do.

Why not `smtplib.sendmail`: SMTP cannot deliver exactly once. Between the moment the message body
starts going out and the server's final reply, a lost connection leaves the outcome unknown: the
server may have queued the message and died before answering. `sendmail` reports that case like
any other disconnection, so a caller that retries would send twice. Here each failure is one of
the classes drip.transports.errors describes: transient, permanent, or unknown outcome.

Speed comes from reusing one connection for many messages and, when the server offers PIPELINING
(RFC 2920), from writing MAIL, RCPT and DATA at once: two round trips per message (the commands,
then the body) instead of four, and no parsing of the message. The body phase, and with it the
unknown outcome, is the same either way. The caller's `before_content` (drip commits the row as
`sending` there) runs while the server reads those commands, so that commit and the round trip
overlap; no byte of the content goes out before it has returned. A transport is meant to be
owned by one worker process; a lock makes sharing it between threads safe, and a connection
inherited over fork() is never used.
"""

from __future__ import annotations

import logging
import os
import re
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from email.utils import getaddresses
from functools import cache
from typing import Literal

from drip.errors import DeliveryError, PermanentDeliveryError
from drip.transports import errors
from drip.transports.base import _Closing

log = logging.getLogger("drip.transports")

TlsMode = Literal["opportunistic", "required", "implicit", "none"]

DEFAULT_TIMEOUT = 30.0  # seconds any one network wait may take, unless DRIP_MAIL_URL says
IDLE_SECONDS = 30.0  # a connection idle longer than this is checked with NOOP before reuse
_LEADING_DOT = re.compile(rb"(?m)^\.")
_ANY_EOL = re.compile(rb"\r\n|\n|\r")
# An addr-spec smtplib.quoteaddr would pass through unchanged (a dot-atom local part, no quoting,
# no comments, no display name): written as <address> without email.utils.parseaddr's cost.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]+"
_PLAIN_ADDRESS = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*@{_ATEXT}(?:\.{_ATEXT})*")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")  # C0, C1 (NEL), line separators


@cache
def _local_hostname() -> str:
    """The EHLO name, looked up once: smtplib would call getfqdn() for every connection."""
    return socket.getfqdn()


class SMTPTransport(_Closing):
    """Sends over one SMTP connection, opened on the first send and reused until it fails.

    tls: "opportunistic" uses STARTTLS whenever the server offers it, "required" refuses to go on
    without it (before any command that carries data: no MAIL, no AUTH), "implicit" is TLS from
    the first byte (smtps, port 465), "none" never uses TLS. Certificates are always verified,
    with the hostname: against the system's store, or `ssl_context` (DRIP_MAIL_URL's ?cafile=).
    Credentials are only ever sent over an encrypted connection, unless tls="none" says
    otherwise explicitly. Every such problem is a RelayConfigError (drip.transports.errors).
    Each message has exactly one envelope recipient: one RCPT, one address.

    timeout: the seconds any one network wait may take (connecting, the TLS handshake, writing the
    commands or the body, each wait for a reply's bytes), not a whole send, which waits several
    times: on a reused connection with PIPELINING, about six (commands, three replies, body, the
    final reply), more on a new one (greeting, EHLO, STARTTLS, AUTH) or without PIPELINING.
    """

    def __init__(
        self,
        host: str,
        port: int = 25,
        *,
        username: str | None = None,
        password: str = "",
        tls: TlsMode = "opportunistic",
        timeout: float = DEFAULT_TIMEOUT,
        ssl_context: ssl.SSLContext | None = None,
        idle_seconds: float = IDLE_SECONDS,
    ) -> None:
        self.host, self.port, self.tls, self.timeout = host, port, tls, timeout
        self.idle_seconds = idle_seconds
        self._username, self._password = username, password
        self._ssl_context = ssl_context
        self._smtp: smtplib.SMTP | None = None
        self._pid = 0
        self._last_used = 0.0
        self._lock = threading.Lock()
        self._where = f"{host}:{port}"

    def __repr__(self) -> str:  # no credentials, ever
        return f"SMTPTransport({self._where!r}, tls={self.tls!r})"

    def send(
        self,
        envelope_from: str,
        recipient: str,
        message: bytes,
        *,
        before_content: Callable[[], None] | None = None,
        while_waiting: Callable[[], None] | None = None,
    ) -> None:
        _check_envelope(envelope_from, recipient)
        payload = _data_payload(message)
        with self._lock:
            try:
                self._send(
                    envelope_from, recipient, message, payload, _Once(before_content), while_waiting
                )
            except DeliveryError:
                raise  # the connection was already kept or dropped, as the failure required
            except BaseException:
                # Interrupted mid-conversation (a task time limit, a signal): the server may still
                # be reading a message body, and the next message's commands would land in it.
                self._drop()
                raise
            finally:
                self._last_used = time.monotonic()

    def close(self) -> None:
        with self._lock:
            smtp, self._smtp = self._smtp, None
            if smtp is None:
                return
            try:
                if self._pid == os.getpid():
                    smtp.quit()
            except OSError:
                pass
            finally:
                smtp.close()

    # one message

    def _send(
        self,
        sender: str,
        recipient: str,
        message: bytes,
        payload: bytes,
        before_content: _Once,
        while_waiting: Callable[[], None] | None = None,
    ) -> None:
        smtp, fresh = self._ready()
        try:
            self._envelope(
                smtp, sender, recipient, message, before_content, stale_is_possible=not fresh
            )
        except _StaleConnection:
            smtp = self._connect()
            self._envelope(
                smtp, sender, recipient, message, before_content, stale_is_possible=False
            )
        before_content()  # a no-op (_envelope called it): no path reaches the body without it
        self._body(smtp, payload, while_waiting)

    def _envelope(
        self,
        smtp: smtplib.SMTP,
        sender: str,
        recipient: str,
        message: bytes,
        before_content: _Once,
        *,
        stale_is_possible: bool,
    ) -> None:
        """MAIL, RCPT and DATA up to the 354 reply: pipelined when the server offers it.
        `before_content` runs while the server reads the pipelined commands; in lock-step,
        before MAIL."""
        if smtp.has_extn("pipelining"):
            self._pipelined(
                smtp,
                sender,
                recipient,
                message,
                before_content,
                stale_is_possible=stale_is_possible,
            )
            return
        before_content()
        self._mail(smtp, sender, recipient, message, stale_is_possible=stale_is_possible)
        self._command(smtp, "RCPT", lambda: smtp.rcpt(recipient))
        self._command(smtp, "DATA", lambda: smtp.docmd("data"), expect=354)

    def _pipelined(
        self,
        smtp: smtplib.SMTP,
        sender: str,
        recipient: str,
        message: bytes,
        before_content: _Once,
        *,
        stale_is_possible: bool,
    ) -> None:
        """MAIL, RCPT and DATA in one write (RFC 2920), then `before_content` while the server
        reads them, then their three replies in order. If `before_content` raises, the server
        may already be waiting for content (354): the connection is dropped, which ends the
        transaction with nothing delivered (RFC 5321 4.1.1.4).

        Every reply is read before anything else is written, so the conversation stays in step
        whatever the server answered. The first refusal is the one raised, with the same
        classification as in lock-step; a 421 anywhere ends the connection. When MAIL or RCPT was
        refused yet DATA got 354 (a server that should have answered 503 or 554), RFC 2920 3.1
        says to send a lone "." at once: an empty message with no valid recipient, which the
        server refuses. Nothing of this message's content goes out either way, so the refusal
        keeps its own classification; a server that does not refuse that empty message is out of
        step with us, and its connection is dropped rather than reused.
        """
        options = self._mail_options(smtp, sender, recipient, message)
        mail_from = _envelope_address(sender) + "".join(" " + option for option in options)
        commands = f"MAIL FROM:{mail_from}\r\nRCPT TO:{_envelope_address(recipient)}\r\nDATA\r\n"
        try:
            smtp.send(commands.encode("utf-8" if "SMTPUTF8" in options else "ascii"))
        except OSError as e:
            raise self._lost("MAIL", e, stale_is_possible=stale_is_possible) from e
        try:
            before_content()
        except BaseException:
            self._drop()
            raise
        try:
            reply = smtp.getreply()
        except OSError as e:
            raise self._lost("MAIL", e, stale_is_possible=stale_is_possible) from e
        if reply[0] == 421 and stale_is_possible:
            raise _StaleConnection
        refusal: tuple[str, int, bytes] | None = None
        for stage, expect in (("MAIL", None), ("RCPT", None), ("DATA", 354)):
            if stage != "MAIL":
                try:
                    reply = smtp.getreply()
                except OSError as e:
                    if refusal is not None:
                        self._drop()
                        break  # nothing went out: the refusal already seen is the error
                    raise self._lost(stage, e, stale_is_possible=False) from e
            code, text = reply
            accepted = code == expect if expect else 200 <= code < 300
            if refusal is None and not accepted:
                refusal = (stage, code, text)
            if code == 421:  # the server closes the connection after it (RFC 5321 3.8)
                self._drop()
                break
            if stage == "DATA" and code == 354 and refusal is not None:
                self._abort_data(smtp)
        if refusal is not None:
            stage, code, text = refusal
            self._after_refusal(smtp, code)
            raise errors.refusal(self._where, stage, code, text)

    def _abort_data(self, smtp: smtplib.SMTP) -> None:
        """End a DATA the server accepted after refusing MAIL or RCPT, with no content."""
        try:
            smtp.send(b".\r\n")
            code = smtp.getreply()[0]
        except OSError:
            code = 0
        if code // 100 not in (4, 5) or code == 421:
            log.warning(
                "%s answered %s to an empty message after refusing its envelope; reconnecting",
                self._where,
                code or "nothing",
            )
            self._drop()

    def _mail(
        self,
        smtp: smtplib.SMTP,
        sender: str,
        recipient: str,
        message: bytes,
        *,
        stale_is_possible: bool,
    ) -> None:
        """MAIL FROM. On a reused connection, a drop or 421 here usually means the server timed
        the idle connection out: nothing of this message went out, so try once on a fresh one."""
        options = self._mail_options(smtp, sender, recipient, message)
        try:
            code, text = smtp.mail(sender, options)
        except OSError as e:
            raise self._lost("MAIL", e, stale_is_possible=stale_is_possible) from e
        if code == 421 and stale_is_possible:
            raise _StaleConnection
        self._check(smtp, "MAIL", code, text)

    def _mail_options(
        self, smtp: smtplib.SMTP, sender: str, recipient: str, message: bytes
    ) -> list[str]:
        options = []
        if not (sender.isascii() and recipient.isascii()):
            if not smtp.has_extn("smtputf8"):
                raise PermanentDeliveryError(
                    f"{self._where} does not offer SMTPUTF8, needed for a non-ASCII address",
                    enhanced="5.6.7",
                )
            options.append("SMTPUTF8")
        if not message.isascii() and smtp.has_extn("8bitmime"):
            options.append("BODY=8BITMIME")
        return options

    def _command(
        self,
        smtp: smtplib.SMTP,
        stage: str,
        call: Callable[[], tuple[int, bytes]],
        *,
        expect: int | None = None,
    ) -> None:
        """One command whose failure means nothing of the message was accepted."""
        try:
            code, text = call()
        except OSError as e:
            raise self._lost(stage, e, stale_is_possible=False) from e
        self._check(smtp, stage, code, text, expect=expect)

    def _lost(self, stage: str, error: OSError, *, stale_is_possible: bool) -> Exception:
        """What to raise when the connection fails at `stage`, before any content went out.

        On a reused connection that may have idled out, _StaleConnection (the caller tries once on
        a fresh one); otherwise the connection is dropped and the failure is transient: nothing of
        the message was accepted, so a retry cannot send it twice."""
        if stale_is_possible:
            return _StaleConnection()
        self._drop()
        return errors.lost_before_content(self._where, stage, error)

    def _body(
        self, smtp: smtplib.SMTP, payload: bytes, while_waiting: Callable[[], None] | None = None
    ) -> None:
        """After the 354 reply: from here a lost connection leaves the outcome unknown."""
        try:
            smtp.send(payload)
            if while_waiting is not None:
                while_waiting()  # the server is reading the body meanwhile
            code, text = smtp.getreply()
        except OSError as e:
            self._drop()
            raise errors.lost_after_content(self._where, e) from e
        if code // 100 not in (2, 4, 5):
            self._drop()
            raise errors.unexpected_after_content(self._where, code, text)
        self._check(smtp, "the message body", code, text)

    def _check(
        self, smtp: smtplib.SMTP, stage: str, code: int, text: bytes, *, expect: int | None = None
    ) -> None:
        """Return on the expected reply (any 2xx unless told); otherwise raise the refusal."""
        if code == expect or (expect is None and 200 <= code < 300):
            return
        self._after_refusal(smtp, code)
        raise errors.refusal(self._where, stage, code, text)

    def _after_refusal(self, smtp: smtplib.SMTP, code: int) -> None:
        """Keep the connection for the next message when the server is still talking to us."""
        if smtp is not self._smtp:
            return  # already dropped
        if code == 421 or code // 100 not in (4, 5):
            self._drop()
            return
        try:
            ok = smtp.rset()[0] == 250
        except OSError:
            ok = False
        if not ok:
            self._drop()

    # the connection

    def _ready(self) -> tuple[smtplib.SMTP, bool]:
        """The open connection (checked with NOOP after an idle spell), or a new one."""
        smtp = self._smtp
        if smtp is not None and self._pid != os.getpid():
            smtp.close()  # inherited over fork(): the parent owns that session
            smtp = self._smtp = None
        idle = time.monotonic() - self._last_used > self.idle_seconds
        if smtp is not None and idle and not self._alive(smtp):
            smtp = None
        if smtp is None:
            return self._connect(), True
        return smtp, False

    def _alive(self, smtp: smtplib.SMTP) -> bool:
        try:
            alive = smtp.noop()[0] == 250
        except OSError:
            alive = False
        if not alive:
            self._drop()
        return alive

    def _connect(self) -> smtplib.SMTP:
        self._drop()
        with self._setup_errors():
            smtp = self._client()
        try:
            with self._setup_errors():
                self._start(smtp)
        except BaseException:
            smtp.close()
            raise
        self._smtp, self._pid = smtp, os.getpid()
        log.debug("connected to %s", self._where)
        return smtp

    @contextmanager
    def _setup_errors(self) -> Iterator[None]:
        """Any failure to set up a session is about the server or the settings, never about
        one message, so it is transient."""
        try:
            yield
        except (OSError, ValueError) as e:  # sockets, timeouts, TLS, smtplib, non-ASCII login
            raise errors.setup_failed(self._where, e) from e  # a TLS failure: RelayConfigError

    def _client(self) -> smtplib.SMTP:
        """Connected, greeted (smtplib raises SMTPConnectError unless the greeting is 220).
        The host goes to the constructor: that is where smtplib takes the name TLS verifies."""
        name, timeout = _local_hostname(), self.timeout
        if self.tls == "implicit":
            return smtplib.SMTP_SSL(
                self.host, self.port, name, timeout=timeout, context=self.tls_context()
            )
        return smtplib.SMTP(self.host, self.port, name, timeout=timeout)

    def _start(self, smtp: smtplib.SMTP) -> None:
        """EHLO, STARTTLS, EHLO again, AUTH."""
        if smtp.sock is not None:  # whole commands are written at once: no need for Nagle
            smtp.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        smtp.ehlo_or_helo_if_needed()
        encrypted = self._secure(smtp)
        self._login(smtp, encrypted)

    def _secure(self, smtp: smtplib.SMTP) -> bool:
        """STARTTLS when offered (never under tls=none); True when the connection is encrypted.
        Under tls=required a relay without it is refused here, after EHLO and before anything
        that carries data."""
        if self.tls == "implicit":
            return True
        if self.tls != "none" and smtp.has_extn("starttls"):
            smtp.starttls(context=self.tls_context())
            smtp.ehlo_or_helo_if_needed()
            return True
        if self.tls == "required":
            raise errors.no_starttls(self._where)
        return False

    def _login(self, smtp: smtplib.SMTP, encrypted: bool) -> None:
        if self._username is None:
            return
        if not encrypted and self.tls != "none":
            raise errors.password_unencrypted(self._where)
        if not smtp.has_extn("auth"):
            raise errors.no_auth(self._where)
        try:
            smtp.login(self._username, self._password)
        except smtplib.SMTPAuthenticationError as e:
            raise errors.login_refused(self._where, e) from None

    @property
    def credentials(self) -> tuple[str, str] | None:
        """DRIP_MAIL_URL's user and password, or None: what AUTH sends (drip doctor's probe)."""
        return None if self._username is None else (self._username, self._password)

    def tls_context(self) -> ssl.SSLContext:
        """What the relay's certificate is verified with: ?cafile='s CA, else the system's."""
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    def _drop(self) -> None:
        """Forget a connection that cannot be trusted any more (no QUIT: it may hang)."""
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            smtp.close()


class _Once:
    """Calls a caller's `before_content` the first time only: a reconnection after a stale
    connection goes through the envelope again, but the caller's commit happened already."""

    __slots__ = ("call",)

    def __init__(self, call: Callable[[], None] | None) -> None:
        self.call = call

    def __call__(self) -> None:
        call, self.call = self.call, None
        if call is not None:
            call()


class _StaleConnection(Exception):
    """Raised inside SMTPTransport when a reused connection turned out to be dead at MAIL."""


def _check_envelope(sender: str, recipient: str) -> None:
    """Refuse, before anything is written, an envelope address that is not one address: a
    line break in one would write a second command (a second RCPT), a list would name a
    second recipient. drip checks every address long before; this is the last line."""
    for which, address in (("envelope sender", sender), ("recipient", recipient)):
        if _CONTROL.search(address):
            raise errors.bad_envelope(which, "contains a line break or another control character")
        if not _PLAIN_ADDRESS.fullmatch(address) and len(getaddresses([address])) != 1:
            raise errors.bad_envelope(which, "holds more than one address")


def _envelope_address(address: str) -> str:
    """<address> for MAIL FROM or RCPT TO, as smtplib writes it (and refuses a line break in)."""
    if _PLAIN_ADDRESS.fullmatch(address):
        return f"<{address}>"
    if "\r" in address or "\n" in address:
        raise ValueError("an envelope address contains a line break")
    return smtplib.quoteaddr(address)


def _data_payload(message: bytes) -> bytes:
    """The bytes to send after 354: CRLF line endings, dot-stuffed (RFC 5321 4.5.2), then '.'."""
    crlf = message.count(b"\r\n")
    if message.count(b"\n") != crlf or message.count(b"\r") != crlf:
        message = _ANY_EOL.sub(b"\r\n", message)
    if message.startswith(b".") or b"\n." in message:
        message = _LEADING_DOT.sub(b"..", message)
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    return message + b".\r\n"
