"""SMTP servers for tests, each running in a thread so that tests stay synchronous.

CapturingServer   a real aiosmtpd server that accepts everything and keeps what it received;
                  optionally with STARTTLS or implicit TLS (see self_signed_tls) and AUTH; it can
                  be slow (`delay`) or hold every reply back until told (`hold`/`release`), so a
                  test knows a client is inside a send, whatever the speed of the machine; and it
                  can refuse chosen recipients at RCPT as a real server does (`refuse`).
ScriptedServer    a tiny hand-written server whose replies are scripted per command, for the
                  failures a real server will not produce on cue (451, 550 5.1.1, 421 at the
                  greeting, a connection dropped right after the message body...).

Both bind 127.0.0.1 on an ephemeral port, count connections, and stop every thread and socket
they started on exit. Use them as context managers:

    with CapturingServer() as server:
        ...  # send to 127.0.0.1:server.port
        (message,) = server.wait_for(1)
"""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import socketserver
import ssl
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as AioSMTP
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session

HOST = "127.0.0.1"


class _Threaded:
    """start() on enter, stop() on exit."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def closed_port() -> int:
    """A local port nothing listens on (connecting to it is refused)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
    return port


# --- a real server that keeps everything ------------------------------------------------------


@dataclass(frozen=True)
class Captured:
    """One message as the server received it (after un-dot-stuffing)."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes


@dataclass(frozen=True)
class Held:
    """A message whose body the server has, its reply held back (see CapturingServer.hold)."""

    message: Captured
    peer_port: int  # the client's port: tells which process is waiting for the reply


class CapturingServer(_Threaded):
    """aiosmtpd on 127.0.0.1:<ephemeral>; `.messages` holds every message received.

    tls_context: offer STARTTLS with it (or, with implicit_tls=True, speak TLS from the start).
    credentials: (user, password) to require AUTH with (aiosmtpd only offers AUTH after
    STARTTLS, unless auth_over_plain_text: then it offers AUTH, without requiring it, on any
    connection, implicit TLS included).
    `commands` records every command's verb as received (never its argument: AUTH carries the
    password), and `encrypted` whether the connection was under TLS then: ("EHLO", False).
    """

    def __init__(
        self,
        *,
        tls_context: ssl.SSLContext | None = None,
        implicit_tls: bool = False,
        credentials: tuple[str, str] | None = None,
        auth_over_plain_text: bool = False,
        delay: float = 0.0,
    ) -> None:
        self.messages: list[Captured] = []
        self.commands: list[tuple[str, bool]] = []
        self.delay = delay  # seconds before the reply to each message: a slow server
        self.held: list[Held] = []  # every message held back so far (see hold)
        self.refused: dict[str, str] = {}  # recipient (lower case) -> the reply to its RCPT
        self._released = threading.Event()
        self._released.set()
        self.connections = 0
        self.logins: list[str] = []
        self._changed = threading.Condition()
        self._credentials = credentials
        kwargs: dict[str, Any] = {"server_hostname": "capture.test"}
        if implicit_tls:
            kwargs["ssl_context"] = tls_context
        elif tls_context is not None:
            kwargs["tls_context"] = tls_context
        if credentials is not None:
            kwargs |= {"authenticator": self._authenticate, "auth_required": True}
        if auth_over_plain_text:  # offered, not required: aiosmtpd warns against requiring it
            kwargs |= {"auth_require_tls": False, "auth_required": False}
        self._controller = _Controller(self, _Collector(self), hostname=HOST, port=0, **kwargs)

    @property
    def port(self) -> int:
        return int(self._controller.port)

    def start(self) -> None:
        self._controller.start()
        with self._changed:
            self.connections = 0  # the controller's own start-up probe does not count

    def stop(self) -> None:
        self.release()
        self._controller.stop()

    def hold(self) -> None:
        """From now on, hold each message back once its body has arrived, without replying:
        the client waits inside its send (committed `sending`, outcome unknown) until release().
        A client that dies meanwhile leaves no message: the server never accepted it. A
        recipient to refuse (see refuse) is held at RCPT, before its refusal, likewise (its
        Held message has no data)."""
        self._released.clear()

    def release(self) -> None:
        """Answer the messages held back (250, as usual) and stop holding."""
        self._released.set()

    def refuse(self, recipient: str, reply: str) -> None:
        """From now on answer RCPT TO:<recipient> with `reply`, e.g. Postfix's "550 5.1.1
        <a@b.example>: Recipient address rejected: User unknown in virtual mailbox table"."""
        self.refused[recipient.lower()] = reply

    def wait_held(self, n: int = 1, timeout: float = 60.0) -> list[Held]:
        """Wait until at least n messages are held back; return them (AssertionError on timeout)."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.held) >= n, timeout):
                raise AssertionError(f"expected {n} message(s) held, got {len(self.held)}")
            return list(self.held)

    def wait_for(self, n: int, timeout: float = 60.0) -> list[Captured]:
        """Wait until at least n messages arrived; return them all (AssertionError on timeout)."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.messages) >= n, timeout):
                raise AssertionError(f"expected {n} message(s), got {len(self.messages)}")
            return list(self.messages)

    def _record(self, message: Captured) -> None:
        with self._changed:
            self.messages.append(message)
            self._changed.notify_all()

    def _hold(self, held: Held) -> None:
        with self._changed:
            self.held.append(held)
            self._changed.notify_all()

    def _connected(self) -> None:
        with self._changed:
            self.connections += 1

    def verbs(self) -> list[str]:
        """The verbs received so far, e.g. ["EHLO", "STARTTLS", "EHLO", "MAIL", ...]."""
        with self._changed:
            return [verb for verb, _ in self.commands]

    def _command(self, verb: str, encrypted: bool) -> None:
        with self._changed:
            self.commands.append((verb, encrypted))

    def _authenticate(
        self, server: AioSMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        ok = isinstance(data, LoginPassword) and self._credentials == (
            data.login.decode(),
            data.password.decode(),
        )
        if ok:
            self.logins.append(data.login.decode())
        return AuthResult(success=ok, handled=False)  # handled=True would mean "I replied"


class _Collector:
    """The aiosmtpd handler: keeps the envelope and the raw bytes of each message."""

    def __init__(self, owner: CapturingServer) -> None:
        self.owner = owner

    async def handle_RCPT(
        self,
        server: AioSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        refusal = self.owner.refused.get(address.lower())
        if refusal is not None:
            await self._held_back(Captured(envelope.mail_from or "", (address,), b""), session)
            return refusal
        envelope.rcpt_tos.append(address)  # what aiosmtpd does when no handler takes RCPT
        return "250 OK"

    async def handle_DATA(self, server: AioSMTP, session: Session, envelope: Envelope) -> str:
        owner = self.owner
        if owner.delay:
            await asyncio.sleep(owner.delay)
        data = envelope.original_content or b""
        message = Captured(envelope.mail_from or "", tuple(envelope.rcpt_tos), data)
        await self._held_back(message, session)
        owner._record(message)
        return "250 2.0.0 Ok: queued"

    async def _held_back(self, message: Captured, session: Session) -> None:
        """Wait for release() before replying, if the server is holding replies (see hold)."""
        owner = self.owner
        if not owner._released.is_set():
            owner._hold(Held(message, int(session.peer[1])))
            while not owner._released.is_set():  # cancelled if the client goes away
                await asyncio.sleep(0.01)


class _Recording(AioSMTP):
    """aiosmtpd's SMTP session, telling its owner each command it receives (smtp_* methods are
    aiosmtpd's way to handle a command; each here records, then does what aiosmtpd does)."""

    owner: CapturingServer

    def _record(self, verb: str) -> None:
        implicit = self.transport is not None and self.transport.get_extra_info("ssl_object")
        self.owner._command(verb, self._tls_protocol is not None or bool(implicit))

    async def smtp_EHLO(self, hostname: str) -> None:
        self._record("EHLO")
        await super().smtp_EHLO(hostname)

    async def smtp_HELO(self, hostname: str) -> None:
        self._record("HELO")
        await super().smtp_HELO(hostname)

    async def smtp_STARTTLS(self, arg: str) -> None:
        self._record("STARTTLS")
        await super().smtp_STARTTLS(arg)

    async def smtp_AUTH(self, arg: str) -> None:
        self._record("AUTH")
        await super().smtp_AUTH(arg)

    async def smtp_MAIL(self, arg: str | None) -> None:
        self._record("MAIL")
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        self._record("RCPT")
        await super().smtp_RCPT(arg)

    async def smtp_DATA(self, arg: str) -> None:
        self._record("DATA")
        await super().smtp_DATA(arg)

    async def smtp_QUIT(self, arg: str) -> None:
        self._record("QUIT")
        await super().smtp_QUIT(arg)


class _Controller(Controller):
    """aiosmtpd's Controller, on an ephemeral port, counting connections."""

    def __init__(self, owner: CapturingServer, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.owner = owner

    def factory(self) -> AioSMTP:
        self.owner._connected()  # called once per connection
        session = _Recording(self.handler, **self.SMTP_kwargs)
        session.owner = self.owner
        return session

    def _trigger_server(self) -> None:
        # Port 0 asks the OS for a free port; learn which before the controller probes it.
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


def self_signed_tls(directory: Path, host: str = HOST) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context trusting only it) for a certificate made for `host`.

    Needs the `cryptography` package; tests using it should pytest.importorskip it first.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ip_address(host))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    (directory / "cert.pem").write_bytes(cert_pem)
    (directory / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    client = ssl.create_default_context(cadata=cert_pem.decode())
    return server, client


# --- a server that says what it is told -------------------------------------------------------

DROP = "DROP"  # as a scripted reply: close the connection without answering
STALL = "STALL"  # as a scripted reply: never answer; wait for the client to hang up

_DEFAULTS = {
    "CONNECT": "220 scripted.test ESMTP",  # the greeting
    "HELO": "250 scripted.test",
    "MAIL": "250 2.1.0 Ok",
    "RCPT": "250 2.1.5 Ok",
    "DATA": "354 End data with <CR><LF>.<CR><LF>",
    ".": "250 2.0.0 Ok: queued",  # the reply after the message body
    "RSET": "250 2.0.0 Ok",
    "NOOP": "250 2.0.0 Ok",
    "QUIT": "221 2.0.0 Bye",
    "AUTH": "235 2.7.0 Authentication successful",
    "STARTTLS": "454 4.7.0 TLS not available",  # this server cannot really do TLS
}


class ScriptedServer(_Threaded):
    """A minimal SMTP server on 127.0.0.1:<ephemeral> whose replies are scripted.

    replies: for a verb ("CONNECT" is the greeting, "." the reply after the message body,
    otherwise the command: "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "AUTH", ...), the
    replies to give in turn, across connections; once used up, the verb's default applies.
    A reply of DROP closes the connection without answering, STALL never answers (the client
    times out); after any 421 reply the server closes the connection, as RFC 5321 says. Unless
    scripted otherwise, a command out of sequence gets what a real server answers: RCPT without
    an accepted MAIL 503, DATA without an accepted RCPT 554 (or 503 without MAIL), so pipelined
    commands after a refusal are refused too; script "DATA": ["354 ..."] for a server that
    wrongly accepts DATA then (the empty message it then gets is refused with 554 by default).
    Commands may arrive several in one write (PIPELINING); they are answered one by one.
    extensions: what EHLO offers, e.g. ("STARTTLS",) or ("AUTH PLAIN LOGIN",).

    Records every command line (`commands`), every message body exactly as it came over the
    wire, still dot-stuffed (`bodies`), and the number of connections (`connections`).
    """

    def __init__(
        self,
        replies: Mapping[str, Sequence[str]] | None = None,
        *,
        extensions: Sequence[str] = ("PIPELINING", "8BITMIME"),
    ) -> None:
        self.extensions = tuple(extensions)
        self.commands: list[str] = []
        self.bodies: list[bytes] = []
        self.connections = 0
        self._script = {verb.upper(): deque(lines) for verb, lines in (replies or {}).items()}
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._server = _TCPServer((HOST, 0), _Session)
        self._server.owner = self
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()  # stops accepting
        self._thread.join()
        self.drop_connections()  # sessions blocked reading from a client end now
        self._server.server_close()  # closes the listener, joins the session threads

    def drop_connections(self) -> None:
        """Close every open connection from the server's side (like an idle timeout)."""
        with self._lock:
            sockets = list(self._open)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by its session

    def verbs(self) -> list[str]:
        """The verbs received so far, e.g. ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"]."""
        with self._lock:
            return [c.split(" ", 1)[0].upper() for c in self.commands]

    # called from session threads

    def reply(self, verb: str, out_of_sequence: str | None = None) -> str:
        """The next scripted reply to verb; else out_of_sequence when given, else the default."""
        with self._lock:
            queue = self._script.get(verb)
            if queue:
                return queue.popleft()
        if out_of_sequence is not None:
            return out_of_sequence
        if verb == "EHLO":
            lines = ["scripted.test", *self.extensions]
            return "\r\n".join(
                f"250{'-' if i < len(lines) - 1 else ' '}{line}" for i, line in enumerate(lines)
            )
        return _DEFAULTS.get(verb, "502 5.5.2 Error: command not recognized")

    def record(self, command: str | None = None, body: bytes | None = None) -> None:
        with self._lock:
            if command is not None:
                self.commands.append(command)
            if body is not None:
                self.bodies.append(body)

    def opened(self, sock: socket.socket) -> None:
        with self._lock:
            self.connections += 1
            self._open.add(sock)

    def closed(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.discard(sock)


def _out_of_sequence(verb: str, sender: bool, recipients: bool) -> str | None:
    """What a real server answers to a command out of sequence (RFC 5321 4.1.4, RFC 2920 3.1:
    DATA after every RCPT was refused is refused too); None when in sequence."""
    if verb == "RCPT" and not sender:
        return "503 5.5.1 Error: need MAIL command"
    if verb == "DATA" and not recipients:
        return "554 5.5.1 Error: no valid recipients" if sender else "503 5.5.1 Error: need RCPT"
    if verb == "MAIL" and sender:
        return "503 5.5.1 Error: nested MAIL command"
    return None


class _TCPServer(socketserver.ThreadingTCPServer):
    # Session threads are not daemons and are joined on server_close(): nothing outlives a test.
    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True
    owner: ScriptedServer


class _Session(socketserver.StreamRequestHandler):
    """One client connection: read a command line, answer it as scripted, repeat."""

    server: _TCPServer

    def handle(self) -> None:
        owner = self.server.owner
        owner.opened(self.connection)
        try:
            self._converse(owner)
        except OSError:
            pass  # the client went away, or the test stopped the server
        finally:
            owner.closed(self.connection)

    def _converse(self, owner: ScriptedServer) -> None:
        if not self._send(owner.reply("CONNECT")):
            return
        sender = recipients = False  # the transaction so far: MAIL accepted, a RCPT accepted
        while line := self.rfile.readline():  # buffered: pipelined commands come one by one
            command = line.decode("utf-8", "replace").rstrip("\r\n")
            owner.record(command)
            verb = command.split(" ", 1)[0].upper()
            reply = owner.reply(verb, _out_of_sequence(verb, sender, recipients))
            if not self._send(reply) or verb == "QUIT":
                return
            accepted = reply.startswith("2")
            if verb in ("MAIL", "RCPT") and accepted:
                sender, recipients = True, recipients or verb == "RCPT"
            elif verb in ("RSET", "EHLO", "HELO") and accepted:
                sender = recipients = False
            if verb == "DATA" and reply.startswith("354"):
                body = self._read_body()
                if body is None:
                    return
                owner.record(body=body)
                after = None if recipients else "554 5.5.1 Error: no valid recipients"
                if not self._send(owner.reply(".", after)):
                    return
                sender = recipients = False

    def _read_body(self) -> bytes | None:
        """The body up to the lone ".", or None when the client left before sending it."""
        lines = []
        while (line := self.rfile.readline()) != b".\r\n":
            if not line:
                return None
            lines.append(line)
        return b"".join(lines)

    def _send(self, reply: str) -> bool:
        """Answer; False when the connection is to be closed now."""
        if reply == STALL:
            self.rfile.read()  # returns when the client closes (or the test stops the server)
        if reply in (DROP, STALL):
            return False
        self.wfile.write(reply.encode() + b"\r\n")
        return not reply.startswith("421")
