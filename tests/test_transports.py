from __future__ import annotations

import os
import re
import smtplib
import threading
from collections.abc import Iterator
from pathlib import Path
from ssl import SSLContext
from typing import Any

import pytest

from drip.errors import (
    ConfigError,
    PermanentDeliveryError,
    RelayConfigError,
    TransientDeliveryError,
    UnknownOutcomeError,
)
from drip.transports import (
    AfterContent,
    FileTransport,
    MemoryTransport,
    SMTPTransport,
    mail_timeout,
    open_transport,
)
from drip.transports.smtp import _envelope_address
from tests.smtp_servers import (
    DROP,
    HOST,
    STALL,
    CapturingServer,
    ScriptedServer,
    closed_port,
    self_signed_tls,
)

SENDER = "care@clinic.example"
PATIENT = "pat.doe@patients.example"
MESSAGE = (
    b"From: Clinic <care@clinic.example>\r\n"
    b"To: pat.doe@patients.example\r\n"
    b"Subject: Welcome\r\n"
    b"\r\n"
    b"Hello Pat,\r\n"
    b".a line that starts with a dot\r\n"
    b".\r\n"
    b"..two dots\r\n"
    b"Bye.\r\n"
)


@pytest.fixture(autouse=True)
def no_thread_left_behind() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    assert set(threading.enumerate()) <= before


def transport(server: CapturingServer | ScriptedServer, **options: Any) -> SMTPTransport:
    return SMTPTransport(HOST, server.port, timeout=30.0, **options)  # only stops a hang


def assert_no_address(error: Exception) -> None:
    assert PATIENT not in str(error) and "pat.doe" not in str(error)


# --- a real server ------------------------------------------------------------------------


def test_a_message_arrives_byte_for_byte_with_its_envelope() -> None:
    with CapturingServer() as server, transport(server) as smtp:
        smtp.send(SENDER, PATIENT, MESSAGE)
        (captured,) = server.wait_for(1)
    assert captured.mail_from == SENDER
    assert captured.rcpt_tos == (PATIENT,)
    assert captured.data == MESSAGE


def test_lines_starting_with_a_dot_are_dot_stuffed_on_the_wire() -> None:
    with ScriptedServer() as server, transport(server) as smtp:
        smtp.send(SENDER, PATIENT, MESSAGE)
        smtp.send(SENDER, PATIENT, b".first line\r\n")
    first, second = server.bodies
    assert b"\r\n..a line that starts with a dot\r\n..\r\n...two dots\r\n" in first
    assert second == b"..first line\r\n"


def test_bare_newlines_are_sent_as_crlf_and_a_missing_final_newline_is_added() -> None:
    with CapturingServer() as server, transport(server) as smtp:
        smtp.send(SENDER, PATIENT, b"Subject: x\n\nline one\nline two")
        (captured,) = server.wait_for(1)
    assert captured.data == b"Subject: x\r\n\r\nline one\r\nline two\r\n"


def test_one_connection_carries_many_messages() -> None:
    with CapturingServer() as server:
        with transport(server) as smtp:
            for i in range(50):
                smtp.send(SENDER, f"patient{i}@patients.example", MESSAGE)
        messages = server.wait_for(50)
        assert server.connections == 1
    assert [m.rcpt_tos[0] for m in messages] == [f"patient{i}@patients.example" for i in range(50)]


def test_the_connection_is_reopened_lazily_after_close() -> None:
    with CapturingServer() as server:
        smtp = transport(server)
        smtp.close()  # nothing open yet: nothing to do
        assert server.connections == 0
        with smtp:
            smtp.send(SENDER, PATIENT, MESSAGE)
        with smtp:
            smtp.send(SENDER, PATIENT, MESSAGE)
        server.wait_for(2)
        assert server.connections == 2


# --- reconnecting -------------------------------------------------------------------------


def test_a_connection_the_server_dropped_between_messages_is_replaced_without_failing() -> None:
    with ScriptedServer() as server, transport(server) as smtp:
        smtp.send(SENDER, PATIENT, MESSAGE)
        server.drop_connections()
        smtp.send(SENDER, PATIENT, MESSAGE)
    assert server.connections == 2
    assert len(server.bodies) == 2


def test_a_421_to_mail_on_a_reused_connection_is_an_idle_timeout_and_is_retried_fresh() -> None:
    with ScriptedServer({"MAIL": ["250 Ok", "421 4.4.2 timeout exceeded"]}) as server:
        with transport(server) as smtp:
            smtp.send(SENDER, PATIENT, MESSAGE)
            smtp.send(SENDER, PATIENT, MESSAGE)
    assert server.connections == 2
    assert len(server.bodies) == 2


def test_an_idle_connection_is_checked_with_noop_and_replaced_when_dead() -> None:
    with ScriptedServer() as server, transport(server, idle_seconds=0.0) as smtp:
        smtp.send(SENDER, PATIENT, MESSAGE)
        smtp.send(SENDER, PATIENT, MESSAGE)
        server.drop_connections()
        smtp.send(SENDER, PATIENT, MESSAGE)
    assert server.verbs()[:13] == [
        "EHLO",
        "MAIL",
        "RCPT",
        "DATA",  # first message, new connection
        "NOOP",
        "MAIL",
        "RCPT",
        "DATA",  # idle: checked, still alive
        "EHLO",
        "MAIL",
        "RCPT",
        "DATA",  # the NOOP found it dead (unseen): a new connection
        "QUIT",
    ]
    assert server.connections == 2


def test_a_fresh_connection_that_fails_at_mail_is_not_retried() -> None:
    with ScriptedServer({"MAIL": [DROP]}) as server, transport(server) as smtp:
        with pytest.raises(TransientDeliveryError, match="connection lost at MAIL"):
            smtp.send(SENDER, PATIENT, MESSAGE)
    assert server.connections == 1


# --- what each failure means --------------------------------------------------------------


def test_451_to_rcpt_is_transient_and_the_retry_succeeds_on_the_same_connection() -> None:
    script = {"RCPT": ["451 4.3.0 <pat.doe@patients.example>: try again later"]}
    with ScriptedServer(script) as server, transport(server) as smtp:
        with pytest.raises(TransientDeliveryError, match="451 4.3.0") as failure:
            smtp.send(SENDER, PATIENT, MESSAGE)
        smtp.send(SENDER, PATIENT, MESSAGE)
    assert_no_address(failure.value)
    assert "[address]" in str(failure.value)
    assert server.connections == 1
    assert server.verbs()[:7] == ["EHLO", "MAIL", "RCPT", "DATA", "RSET", "MAIL", "RCPT"]
    assert len(server.bodies) == 1


def test_451_after_the_body_is_transient() -> None:
    with ScriptedServer({".": ["451 4.3.0 queue full"]}) as server, transport(server) as smtp:
        with pytest.raises(TransientDeliveryError, match="451"):
            smtp.send(SENDER, PATIENT, MESSAGE)
        smtp.send(SENDER, PATIENT, MESSAGE)
    assert server.connections == 1 and len(server.bodies) == 2


def test_550_5_1_1_to_rcpt_is_permanent_with_a_bad_mailbox() -> None:
    script = {"RCPT": ["550 5.1.1 <pat.doe@patients.example>: Recipient address rejected"]}
    with ScriptedServer(script) as server, transport(server) as smtp:
        with pytest.raises(PermanentDeliveryError) as failure:
            smtp.send(SENDER, PATIENT, MESSAGE)
        smtp.send(SENDER, PATIENT, MESSAGE)  # the connection is still good
    error = failure.value
    assert (error.code, error.enhanced, error.bad_mailbox) == (550, "5.1.1", True)
    assert_no_address(error)
    assert server.connections == 1


def test_552_after_the_body_is_permanent_but_not_a_bad_mailbox() -> None:
    with ScriptedServer({".": ["552 5.3.4 Message size exceeds fixed limit"]}) as server:
        with transport(server) as smtp, pytest.raises(PermanentDeliveryError) as failure:
            smtp.send(SENDER, PATIENT, MESSAGE)
    assert (failure.value.code, failure.value.enhanced) == (552, "5.3.4")
    assert not failure.value.bad_mailbox


def test_a_5xx_to_mail_is_permanent_and_a_reply_without_enhanced_code_has_none() -> None:
    with ScriptedServer({"MAIL": ["553 sender not allowed"]}) as server, transport(server) as s:
        with pytest.raises(PermanentDeliveryError) as failure:
            s.send(SENDER, PATIENT, MESSAGE)
    assert (failure.value.code, failure.value.enhanced) == (553, "")


def test_530_authentication_required_is_a_configuration_error_naming_the_fix() -> None:
    script = {"MAIL": ["530 5.7.0 Authentication required"]}
    with ScriptedServer(script) as server, transport(server) as smtp:
        with pytest.raises(RelayConfigError, match="DRIP_MAIL_URL"):
            smtp.send(SENDER, PATIENT, MESSAGE)


def test_421_at_the_greeting_is_transient() -> None:
    script = {"CONNECT": ["421 4.3.2 Service not available"]}
    with ScriptedServer(script) as server, transport(server) as smtp:
        with pytest.raises(TransientDeliveryError, match="421 4.3.2"):
            smtp.send(SENDER, PATIENT, MESSAGE)
        smtp.send(SENDER, PATIENT, MESSAGE)
    assert server.connections == 2 and len(server.bodies) == 1


def test_a_refused_connection_is_transient() -> None:
    with SMTPTransport(HOST, closed_port(), timeout=2.0) as smtp:
        with pytest.raises(TransientDeliveryError, match="cannot open a session"):
            smtp.send(SENDER, PATIENT, MESSAGE)


def test_a_connection_dropped_after_the_body_leaves_the_outcome_unknown() -> None:
    with ScriptedServer({".": [DROP]}) as server, transport(server) as smtp:
        with pytest.raises(UnknownOutcomeError, match="may have been delivered") as failure:
            smtp.send(SENDER, PATIENT, MESSAGE)
        smtp.send(SENDER, PATIENT, MESSAGE)  # and the next message gets a new connection
    assert_no_address(failure.value)
    assert server.connections == 2 and len(server.bodies) == 2


def test_a_timeout_waiting_for_the_final_reply_leaves_the_outcome_unknown() -> None:
    with ScriptedServer({".": [STALL]}) as server:
        with SMTPTransport(HOST, server.port, timeout=0.2) as smtp:
            with pytest.raises(UnknownOutcomeError, match="timed out"):
                smtp.send(SENDER, PATIENT, MESSAGE)


class Interrupted(Exception):
    """Stands for Celery's SoftTimeLimitExceeded arriving in the middle of a send."""


def test_a_send_interrupted_mid_body_never_reuses_the_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_send = smtplib.SMTP.send

    def interrupted_after_half(self: smtplib.SMTP, data: bytes | str) -> None:
        if isinstance(data, bytes) and data.endswith(b"\r\n.\r\n"):
            real_send(self, data[: len(data) // 2])
            raise Interrupted
        real_send(self, data)

    with ScriptedServer() as server, transport(server) as smtp:
        monkeypatch.setattr(smtplib.SMTP, "send", interrupted_after_half)
        with pytest.raises(Interrupted):
            smtp.send(SENDER, PATIENT, MESSAGE)
        monkeypatch.undo()
        smtp.send(SENDER, PATIENT, MESSAGE)
    assert server.connections == 2
    assert server.bodies == [MESSAGE.replace(b"\n.", b"\n..")]  # only the complete one


def test_a_drop_before_the_354_reply_is_transient_not_unknown() -> None:
    with ScriptedServer({"DATA": [DROP]}) as server, transport(server) as smtp:
        with pytest.raises(TransientDeliveryError, match="DATA"):
            smtp.send(SENDER, PATIENT, MESSAGE)
    assert server.bodies == []


def test_a_non_ascii_address_needs_smtputf8() -> None:
    with ScriptedServer() as server, transport(server) as smtp:
        with pytest.raises(PermanentDeliveryError, match="SMTPUTF8") as failure:
            smtp.send(SENDER, "zoë@patients.example", MESSAGE)
    assert failure.value.enhanced == "5.6.7" and "zoë" not in str(failure.value)
    assert "MAIL" not in server.verbs()


def test_a_non_ascii_address_goes_out_when_the_server_offers_smtputf8() -> None:
    with CapturingServer() as server, transport(server) as smtp:
        smtp.send(SENDER, "zoë@patients.example", "Subject: é\r\n\r\nzoë\r\n".encode())
        (captured,) = server.wait_for(1)
    assert captured.rcpt_tos == ("zoë@patients.example",)


# --- pipelining (RFC 2920) ---------------------------------------------------------------

LOCK_STEP = ("8BITMIME",)  # EHLO without PIPELINING


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every write the client makes to the server, as bytes."""
    seen: list[bytes] = []
    real_send = smtplib.SMTP.send

    def spy(self: smtplib.SMTP, data: bytes | str) -> None:
        seen.append(data.encode() if isinstance(data, str) else data)
        real_send(self, data)

    monkeypatch.setattr(smtplib.SMTP, "send", spy)
    return seen


def test_mail_rcpt_and_data_go_out_in_one_write_and_the_message_arrives_intact(
    writes: list[bytes],
) -> None:
    with ScriptedServer() as server, transport(server) as smtp:
        smtp.send(SENDER, PATIENT, MESSAGE)
        smtp.send(SENDER, "other@patients.example", b"Subject: x\r\n\r\n\xc3\xa9\r\n")
    stuffed = MESSAGE.replace(b"\n.", b"\n..")
    assert writes[-5:] == [
        b"MAIL FROM:<care@clinic.example>\r\nRCPT TO:<pat.doe@patients.example>\r\nDATA\r\n",
        stuffed + b".\r\n",
        b"MAIL FROM:<care@clinic.example> BODY=8BITMIME\r\n"
        b"RCPT TO:<other@patients.example>\r\nDATA\r\n",
        b"Subject: x\r\n\r\n\xc3\xa9\r\n.\r\n",
        b"quit\r\n",
    ]
    assert server.bodies == [stuffed, b"Subject: x\r\n\r\n\xc3\xa9\r\n"]
    assert server.connections == 1


def test_lock_step_is_kept_when_the_server_does_not_offer_pipelining(
    writes: list[bytes],
) -> None:
    with ScriptedServer(extensions=LOCK_STEP) as server, transport(server) as smtp:
        smtp.send(SENDER, PATIENT, MESSAGE)
    commands = [w for w in writes if not w.endswith(b"\r\n.\r\n")]
    assert commands[-4:] == [
        b"mail FROM:<care@clinic.example>\r\n",
        b"rcpt TO:<pat.doe@patients.example>\r\n",
        b"data\r\n",
        b"quit\r\n",
    ]
    assert server.bodies == [MESSAGE.replace(b"\n.", b"\n..")]


class Refused(Exception):
    pass


def test_before_content_runs_after_the_pipelined_commands_went_out_and_before_the_body(
    writes: list[bytes],
) -> None:
    seen: list[int] = []
    with ScriptedServer() as server, transport(server) as smtp:
        smtp.send(SENDER, PATIENT, MESSAGE, before_content=lambda: seen.append(len(writes)))
    assert seen == [len(writes) - 2]  # after MAIL/RCPT/DATA; before the body and QUIT
    assert writes[seen[0] - 1].startswith(b"MAIL FROM:") and len(server.bodies) == 1


def test_before_content_runs_before_mail_in_lock_step(writes: list[bytes]) -> None:
    seen: list[bytes] = []
    with ScriptedServer(extensions=LOCK_STEP) as server, transport(server) as smtp:
        first = len(writes)
        smtp.send(SENDER, PATIENT, MESSAGE, before_content=lambda: seen.extend(writes[first:]))
    assert not [w for w in seen if w.lower().startswith(b"mail")] and len(server.bodies) == 1


@pytest.mark.parametrize("extensions", [("PIPELINING", "8BITMIME"), LOCK_STEP])
def test_when_before_content_raises_nothing_is_delivered_and_the_next_message_goes_out(
    extensions: tuple[str, ...],
) -> None:
    def refuse() -> None:
        raise Refused

    with ScriptedServer(extensions=extensions) as server, transport(server) as smtp:
        with pytest.raises(Refused):
            smtp.send(SENDER, PATIENT, MESSAGE, before_content=refuse)
        smtp.send(SENDER, "other@patients.example", b"Subject: the next one\r\n\r\nHi\r\n")
    # Only the next message's body arrived. (The order of commands across the dropped connection
    # and the new one is up to the server's threads, so the bodies are what is compared.)
    assert server.bodies == [b"Subject: the next one\r\n\r\nHi\r\n"]


def test_before_content_is_not_run_when_the_send_fails_first() -> None:
    calls: list[str] = []
    with pytest.raises(TransientDeliveryError):
        SMTPTransport(HOST, closed_port(), timeout=2.0).send(
            SENDER, PATIENT, MESSAGE, before_content=lambda: calls.append("x")
        )
    assert calls == []


def test_before_content_runs_once_when_a_stale_connection_is_replaced() -> None:
    calls: list[str] = []
    with ScriptedServer({"MAIL": ["250 Ok", DROP]}) as server, transport(server) as smtp:
        smtp.send(SENDER, PATIENT, MESSAGE)
        smtp.send(SENDER, PATIENT, MESSAGE, before_content=lambda: calls.append("x"))
    assert calls == ["x"] and server.connections == 2 and len(server.bodies) == 2


def test_many_messages_are_pipelined_over_one_connection() -> None:
    with ScriptedServer() as server, transport(server) as smtp:
        for i in range(50):
            smtp.send(SENDER, f"patient{i}@patients.example", MESSAGE)
    assert server.connections == 1 and len(server.bodies) == 50
    rcpts = [c for c in server.commands if c.startswith("RCPT")]
    assert rcpts == [f"RCPT TO:<patient{i}@patients.example>" for i in range(50)]


@pytest.mark.parametrize("extensions", [("PIPELINING", "8BITMIME"), LOCK_STEP])
@pytest.mark.parametrize(
    ("stage", "reply", "error", "enhanced"),
    [
        ("MAIL", "553 5.7.1 <care@clinic.example>: refused", PermanentDeliveryError, "5.7.1"),
        ("MAIL", "451 4.3.0 try later", TransientDeliveryError, ""),
        ("RCPT", "451 4.3.0 <pat.doe@patients.example>: greylisted", TransientDeliveryError, ""),
        ("RCPT", "550 5.1.1 <pat.doe@patients.example>: unknown", PermanentDeliveryError, "5.1.1"),
        ("DATA", "554 5.5.0 no thanks", PermanentDeliveryError, "5.5.0"),
        ("DATA", "451 4.3.0 later", TransientDeliveryError, ""),
    ],
)
def test_a_refusal_at_each_stage_is_classified_and_the_connection_kept(
    extensions: tuple[str, ...],
    stage: str,
    reply: str,
    error: type[Exception],
    enhanced: str,
) -> None:
    with ScriptedServer({stage: [reply]}, extensions=extensions) as server:
        with transport(server) as smtp:
            with pytest.raises(error, match=f"{stage}: {reply[:3]}") as failure:
                smtp.send(SENDER, PATIENT, MESSAGE)
            smtp.send(SENDER, PATIENT, MESSAGE)  # same connection, in step
    assert_no_address(failure.value)
    assert "clinic.example" not in str(failure.value)
    if isinstance(failure.value, PermanentDeliveryError):
        assert failure.value.enhanced == enhanced
        assert failure.value.bad_mailbox == (enhanced == "5.1.1")
    assert server.connections == 1 and len(server.bodies) == 1
    verbs = server.verbs()
    assert verbs[verbs.index("RSET") + 1 :][:3] == ["MAIL", "RCPT", "DATA"]
    if "PIPELINING" in extensions:  # every reply was read before RSET
        assert verbs[1 : verbs.index("RSET")] == ["MAIL", "RCPT", "DATA"]


def test_after_a_refused_rcpt_the_refused_data_reply_is_read_before_rset() -> None:
    script = {"RCPT": ["550 5.1.1 unknown"], "RSET": ["250 2.0.0 Ok"]}
    with ScriptedServer(script) as server, transport(server) as smtp:
        with pytest.raises(PermanentDeliveryError):
            smtp.send(SENDER, PATIENT, MESSAGE)
        smtp.send(SENDER, PATIENT, MESSAGE)
    # The server answered DATA with 554 (no valid recipients), which the client read: had it
    # not, the 554 would have been taken as the reply to RSET and everything after shifted.
    assert server.verbs()[:8] == ["EHLO", "MAIL", "RCPT", "DATA", "RSET", "MAIL", "RCPT", "DATA"]
    assert len(server.bodies) == 1


@pytest.mark.parametrize("after_dot", ["554 5.5.1 no valid recipients", "250 2.0.0 queued"])
def test_a_354_after_a_refused_rcpt_gets_a_lone_dot_and_nothing_of_the_message(
    after_dot: str, caplog: pytest.LogCaptureFixture
) -> None:
    script = {
        "RCPT": ["550 5.1.1 unknown"],
        "DATA": ["354 go ahead (wrongly)"],
        ".": [after_dot],
    }
    with ScriptedServer(script) as server, transport(server) as smtp:
        with pytest.raises(PermanentDeliveryError) as failure:
            smtp.send(SENDER, PATIENT, MESSAGE)
        smtp.send(SENDER, PATIENT, MESSAGE)
    assert failure.value.bad_mailbox  # the refusal of the recipient, whatever came after
    assert server.bodies[0] == b""  # an empty message, ended at once
    assert server.bodies[1:] == [MESSAGE.replace(b"\n.", b"\n..")]
    if after_dot.startswith("5"):  # refused as expected: the connection stays in step
        assert server.connections == 1 and "RSET" in server.verbs()
    else:  # a server that takes an empty message without recipients is not trusted further
        assert server.connections == 2 and "RSET" not in server.verbs()
        assert "empty message" in caplog.text


def test_a_354_after_a_refused_mail_with_a_lost_connection_keeps_the_refusal() -> None:
    script = {"MAIL": ["451 4.3.0 later"], "DATA": ["354 go ahead"], ".": [DROP]}
    with ScriptedServer(script) as server, transport(server) as smtp:
        with pytest.raises(TransientDeliveryError, match="MAIL: 451"):
            smtp.send(SENDER, PATIENT, MESSAGE)
    assert server.bodies == [b""]


@pytest.mark.parametrize("stage", ["RCPT", "DATA"])
def test_a_drop_before_the_354_reply_is_transient_when_pipelined(stage: str) -> None:
    with ScriptedServer({stage: [DROP]}) as server, transport(server) as smtp:
        with pytest.raises(TransientDeliveryError, match=f"connection lost at {stage}"):
            smtp.send(SENDER, PATIENT, MESSAGE)
        smtp.send(SENDER, PATIENT, MESSAGE)
    assert server.connections == 2 and len(server.bodies) == 1


def test_a_drop_after_a_refusal_keeps_the_refusal() -> None:
    with ScriptedServer({"RCPT": ["550 5.1.1 unknown"], "DATA": [DROP]}) as server:
        with transport(server) as smtp, pytest.raises(PermanentDeliveryError) as failure:
            smtp.send(SENDER, PATIENT, MESSAGE)
    assert failure.value.bad_mailbox and server.bodies == []


@pytest.mark.parametrize("stage", ["RCPT", "DATA"])
def test_a_421_in_the_middle_is_transient_and_ends_the_connection(stage: str) -> None:
    script = {stage: ["421 4.3.2 shutting down"]}
    with ScriptedServer(script) as server, transport(server) as smtp:
        with pytest.raises(TransientDeliveryError, match=f"{stage}: 421 4.3.2"):
            smtp.send(SENDER, PATIENT, MESSAGE)
        smtp.send(SENDER, PATIENT, MESSAGE)
    assert server.connections == 2 and len(server.bodies) == 1
    assert "RSET" not in server.verbs()


def test_a_421_to_mail_on_a_fresh_pipelined_connection_is_transient() -> None:
    with ScriptedServer({"MAIL": ["421 4.3.2 busy"]}) as server, transport(server) as smtp:
        with pytest.raises(TransientDeliveryError, match="MAIL: 421"):
            smtp.send(SENDER, PATIENT, MESSAGE)
    assert server.connections == 1 and server.bodies == []


def test_a_stale_connection_found_at_the_first_pipelined_reply_is_replaced_once() -> None:
    with ScriptedServer({"MAIL": ["250 Ok", DROP, DROP]}) as server, transport(server) as smtp:
        smtp.send(SENDER, PATIENT, MESSAGE)
        with pytest.raises(TransientDeliveryError, match="connection lost at MAIL"):
            smtp.send(SENDER, PATIENT, MESSAGE)  # dead, then dead again on the fresh one
    assert server.connections == 2 and len(server.bodies) == 1


def test_a_drop_after_the_pipelined_body_leaves_the_outcome_unknown() -> None:
    with ScriptedServer({".": [DROP]}) as server, transport(server) as smtp:
        with pytest.raises(UnknownOutcomeError):
            smtp.send(SENDER, PATIENT, MESSAGE)
    assert "PIPELINING" in server.extensions and len(server.bodies) == 1


@pytest.mark.parametrize(
    "address",
    [
        PATIENT,
        "o'brien+tag@patients.example",
        "zoë@bücher.example",
        '"quoted local"@patients.example',
        "Pat Doe <pat.doe@patients.example>",
        "pat..doe@patients.example",
        "no-at-sign",
    ],
)
def test_envelope_addresses_are_written_as_smtplib_writes_them(address: str) -> None:
    assert _envelope_address(address) == smtplib.quoteaddr(address)


@pytest.mark.parametrize(
    ("recipient", "says"),
    [
        ("pat@x.example>\r\nRCPT TO:<evil@x.example", "line break"),
        ("pat@x.example\n", "line break"),
        ("pat@x.example\u2028", "line break"),
        ("pat@x.example, evil@x.example", "more than one address"),
        ("Pat <pat@x.example>, Evil <evil@x.example>", "more than one address"),
    ],
)
def test_an_envelope_address_that_is_not_one_address_is_refused_before_anything_is_written(
    writes: list[bytes], recipient: str, says: str
) -> None:
    """Permanent (this message can never go), so the row fails alone; nothing is written, not
    even a connection opened."""
    with ScriptedServer() as server, transport(server) as smtp:
        with pytest.raises(PermanentDeliveryError, match=says) as refused:
            smtp.send(SENDER, recipient, MESSAGE)
    assert server.connections == 0 and writes == []
    assert not refused.value.bad_mailbox and "evil" not in str(refused.value)


def test_each_message_goes_to_exactly_one_rcpt() -> None:
    with CapturingServer() as server, transport(server) as smtp:
        smtp.send(SENDER, PATIENT, MESSAGE)
        smtp.send(SENDER, "o'brien+tag@patients.example", MESSAGE)
        messages = server.wait_for(2)
    assert [m.rcpt_tos for m in messages] == [(PATIENT,), ("o'brien+tag@patients.example",)]
    assert server.verbs().count("RCPT") == 2 and server.verbs().count("MAIL") == 2


# --- TLS and credentials ------------------------------------------------------------------


def test_credentials_are_never_sent_over_an_unencrypted_connection() -> None:
    with ScriptedServer(extensions=("AUTH PLAIN LOGIN",)) as server:
        with transport(server, username="u", password="secret") as smtp:
            with pytest.raises(RelayConfigError, match="unencrypted") as failure:
                smtp.send(SENDER, PATIENT, MESSAGE)
    assert "AUTH" not in server.verbs() and "MAIL" not in server.verbs()
    assert "secret" not in str(failure.value) and "DRIP_MAIL_URL" in str(failure.value)


def test_tls_required_refuses_a_server_without_starttls() -> None:
    with ScriptedServer() as server, transport(server, tls="required") as smtp:
        with pytest.raises(RelayConfigError, match="STARTTLS"):
            smtp.send(SENDER, PATIENT, MESSAGE)
    assert server.verbs() == ["EHLO"]


def test_starttls_is_used_whenever_offered_and_its_failure_is_transient() -> None:
    with ScriptedServer(extensions=("STARTTLS",)) as server, transport(server) as smtp:
        with pytest.raises(TransientDeliveryError, match="454"):
            smtp.send(SENDER, PATIENT, MESSAGE)
    assert server.verbs() == ["EHLO", "STARTTLS"]


@pytest.fixture
def tls(tmp_path: Path) -> tuple[SSLContext, SSLContext]:
    pytest.importorskip("cryptography")
    return self_signed_tls(tmp_path)


def test_starttls_then_auth_then_send(tls: tuple[SSLContext, SSLContext]) -> None:
    server_context, client_context = tls
    with CapturingServer(tls_context=server_context, credentials=("u@x", "p w")) as server:
        with transport(server, username="u@x", password="p w", ssl_context=client_context) as s:
            s.send(SENDER, PATIENT, MESSAGE)
            s.send(SENDER, PATIENT, MESSAGE)
        assert [m.data for m in server.wait_for(2)] == [MESSAGE, MESSAGE]
        assert server.logins == ["u@x"] and server.connections == 1


def test_implicit_tls(tls: tuple[SSLContext, SSLContext]) -> None:
    server_context, client_context = tls
    with CapturingServer(tls_context=server_context, implicit_tls=True) as server:
        with transport(server, tls="implicit", ssl_context=client_context) as smtp:
            smtp.send(SENDER, PATIENT, MESSAGE)
        assert server.wait_for(1)[0].data == MESSAGE


@pytest.mark.parametrize("scheme", ["smtp", "smtps"])
def test_a_self_signed_certificate_is_refused_against_the_system_store(
    tls: tuple[SSLContext, SSLContext], scheme: str
) -> None:
    """Verified by default, STARTTLS and smtps alike: a configuration problem, said with its
    fix, and nothing that carries data was sent (no AUTH, no MAIL)."""
    server_context, _ = tls
    server = CapturingServer(
        tls_context=server_context, implicit_tls=scheme == "smtps", credentials=("u", "secret")
    )
    with server, open_transport(f"{scheme}://u:secret@{HOST}:{server.port}?timeout=30") as smtp:
        with pytest.raises(RelayConfigError, match="CERTIFICATE_VERIFY_FAILED") as refused:
            smtp.send(SENDER, PATIENT, MESSAGE)
        assert server.messages == []
        assert set(server.verbs()) <= {"EHLO", "STARTTLS"}
    message = str(refused.value)
    assert "cafile=" in message and "secret" not in message


@pytest.mark.parametrize("scheme", ["smtp", "smtps"])
def test_the_same_server_is_accepted_with_cafile_naming_its_ca(
    tls: tuple[SSLContext, SSLContext], tmp_path: Path, scheme: str
) -> None:
    server_context, _ = tls
    implicit = scheme == "smtps"  # aiosmtpd offers AUTH under implicit TLS only so
    server = CapturingServer(
        tls_context=server_context,
        implicit_tls=implicit,
        credentials=("u", "p w"),
        auth_over_plain_text=implicit,
    )
    cafile = tmp_path / "cert.pem"
    with server, open_transport(
        f"{scheme}://u:p%20w@{HOST}:{server.port}?cafile={cafile}&timeout=30"
    ) as smtp:
        smtp.send(SENDER, PATIENT, MESSAGE)
        (message,) = server.wait_for(1)
        assert message.data == MESSAGE and server.logins == ["u"]
        assert [encrypted for verb, encrypted in server.commands if verb == "AUTH"] == [True]


def test_a_certificate_for_another_host_is_refused_even_with_its_ca(
    tls: tuple[SSLContext, SSLContext], tmp_path: Path
) -> None:
    """The hostname is checked too: the certificate names 127.0.0.1, not localhost."""
    server_context, _ = tls
    with CapturingServer(tls_context=server_context) as server:
        url = f"smtp://localhost:{server.port}?cafile={tmp_path / 'cert.pem'}&timeout=30"
        with open_transport(url) as smtp:
            with pytest.raises(RelayConfigError, match="does not verify"):
                smtp.send(SENDER, PATIENT, MESSAGE)
        assert server.messages == [] and "MAIL" not in server.verbs()


def test_tls_required_refuses_a_real_server_without_starttls_before_mail_or_auth() -> None:
    with CapturingServer(credentials=("u", "secret"), auth_over_plain_text=True) as server:
        url = f"smtp://u:secret@{HOST}:{server.port}?tls=required&timeout=30"
        with open_transport(url) as smtp:
            with pytest.raises(RelayConfigError, match="STARTTLS") as refused:
                smtp.send(SENDER, PATIENT, MESSAGE)
        assert server.verbs() == ["EHLO"]  # nothing that carries data: no AUTH, MAIL, RCPT
    assert "secret" not in str(refused.value)


def test_credentials_are_never_sent_to_a_real_server_offering_auth_in_plain_text() -> None:
    with CapturingServer(credentials=("u", "secret"), auth_over_plain_text=True) as server:
        with open_transport(f"smtp://u:secret@{HOST}:{server.port}?timeout=30") as smtp:
            with pytest.raises(RelayConfigError, match="tls=none") as refused:
                smtp.send(SENDER, PATIENT, MESSAGE)
        assert "AUTH" not in server.verbs() and "MAIL" not in server.verbs()
        assert server.logins == [] and server.messages == []
    assert "secret" not in str(refused.value)


def test_tls_none_is_the_explicit_way_to_send_a_password_in_plain_text() -> None:
    with CapturingServer(credentials=("u", "secret"), auth_over_plain_text=True) as server:
        with open_transport(f"smtp://u:secret@{HOST}:{server.port}?tls=none&timeout=30") as smtp:
            smtp.send(SENDER, PATIENT, MESSAGE)
        server.wait_for(1)
        assert server.logins == ["u"] and ("AUTH", False) in server.commands


def test_tls_none_does_not_use_starttls_even_when_offered(
    tls: tuple[SSLContext, SSLContext],
) -> None:
    server_context, _ = tls
    with CapturingServer(tls_context=server_context) as server:
        with open_transport(f"smtp://{HOST}:{server.port}?tls=none&timeout=30") as smtp:
            smtp.send(SENDER, PATIENT, MESSAGE)
        server.wait_for(1)
        assert "STARTTLS" not in server.verbs()


def test_credentials_for_a_relay_that_offers_no_auth_are_a_configuration_error() -> None:
    with ScriptedServer(extensions=("PIPELINING",)) as server:
        smtp = transport(server, username="u", password="p", tls="none")
        with smtp, pytest.raises(RelayConfigError, match="offers no AUTH"):
            smtp.send(SENDER, PATIENT, MESSAGE)
    assert server.verbs() == ["EHLO"]


def test_a_tls_handshake_with_a_plain_text_port_is_a_configuration_error() -> None:
    """smtps:// pointed at a port that speaks plain SMTP: not a network blip."""
    with CapturingServer() as server:
        with open_transport(f"smtps://{HOST}:{server.port}?timeout=30") as smtp:
            with pytest.raises(RelayConfigError, match="smtps://"):
                smtp.send(SENDER, PATIENT, MESSAGE)
        assert server.messages == []


def test_a_wrong_password_is_a_configuration_error_naming_the_setting(
    tls: tuple[SSLContext, SSLContext],
) -> None:
    server_context, client_context = tls
    with CapturingServer(tls_context=server_context, credentials=("u", "right")) as server:
        with transport(server, username="u", password="wrong", ssl_context=client_context) as s:
            with pytest.raises(RelayConfigError, match="DRIP_MAIL_URL") as failure:
                s.send(SENDER, PATIENT, MESSAGE)
    assert "wrong" not in str(failure.value)


# --- files ----------------------------------------------------------------------------------


def test_the_file_transport_writes_one_eml_per_message_named_without_the_address(
    tmp_path: Path,
) -> None:
    outbox = tmp_path / "var" / "outbox"
    with FileTransport(outbox) as files:
        for _ in range(3):
            files.send(SENDER, PATIENT, MESSAGE)
    names = sorted(p.name for p in outbox.iterdir())
    assert len(names) == 3 and len(set(names)) == 3
    assert all(re.fullmatch(r"\d{8}T\d{12}Z-\d{6}-[0-9a-f]{8}\.eml", n) for n in names), names
    assert all("pat" not in n and "@" not in n for n in names)
    assert [(outbox / n).read_bytes() for n in names] == [MESSAGE] * 3
    assert all((outbox / n).stat().st_mode & 0o077 == 0 for n in names)


def test_the_file_transport_leaves_no_partial_file_when_writing_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    files = FileTransport(tmp_path)
    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(TransientDeliveryError, match="No space left"):
        files.send(SENDER, PATIENT, MESSAGE)
    assert list(tmp_path.iterdir()) == []


# --- memory -------------------------------------------------------------------------------


def test_the_memory_transport_records_and_replays_scripted_failures() -> None:
    boom = TransientDeliveryError("451 try later")
    memory = MemoryTransport([None, boom, None])
    with memory:
        memory.send(SENDER, "a@x.example", b"1")
        with pytest.raises(TransientDeliveryError) as failure:
            memory.send(SENDER, "b@x.example", b"2")
        memory.send(SENDER, "c@x.example", b"3")
        memory.send(SENDER, "d@x.example", b"4")  # the script is used up: success
    assert failure.value is boom
    assert memory.messages == [
        (SENDER, "a@x.example", b"1"),
        (SENDER, "c@x.example", b"3"),
        (SENDER, "d@x.example", b"4"),
    ]
    assert memory.attempts == 4 and memory.closed


def test_the_memory_transport_fails_before_or_after_content_as_scripted() -> None:
    """A plain failure never reaches `before_content` (nothing was marked `sending`); one wrapped
    in AfterContent is raised once it has returned, as a server that takes the body and then
    drops the connection."""
    refused = TransientDeliveryError("451 try later")
    lost = UnknownOutcomeError("connection lost after the body")
    memory = MemoryTransport([refused, AfterContent(lost), None])
    calls: list[str] = []
    for recipient, error in [("a@x.example", refused), ("b@x.example", lost)]:
        with pytest.raises(type(error)) as failure:
            memory.send(SENDER, recipient, b"m", before_content=lambda r=recipient: calls.append(r))
        assert failure.value is error
    memory.send(SENDER, "c@x.example", b"3", before_content=lambda: calls.append("c@x.example"))
    assert calls == ["b@x.example", "c@x.example"]
    assert memory.messages == [(SENDER, "c@x.example", b"3")]
    assert memory.attempts == 3


def test_the_memory_transport_raises_what_before_content_raises_and_records_nothing() -> None:
    memory = MemoryTransport([AfterContent(UnknownOutcomeError("never reached"))])

    def paused() -> None:
        raise RuntimeError("the enrolment was paused")

    with pytest.raises(RuntimeError, match="paused"):
        memory.send(SENDER, PATIENT, MESSAGE, before_content=paused)
    assert memory.messages == [] and memory.failures == []


# --- DRIP_MAIL_URL ------------------------------------------------------------------------


def test_open_transport_reads_smtp_urls() -> None:
    smtp = open_transport("smtp://us%40er:p%3Ass@mail.example:587?tls=required", timeout=7)
    assert isinstance(smtp, SMTPTransport)
    assert (smtp.host, smtp.port, smtp.tls, smtp.timeout) == ("mail.example", 587, "required", 7)
    assert (smtp._username, smtp._password) == ("us@er", "p:ss")
    assert "p:ss" not in repr(smtp)
    plain = open_transport("smtp://mail.example")
    assert (plain.port, plain.tls, plain._username) == (25, "opportunistic", None)


def test_open_transport_reads_smtps_urls_and_a_timeout() -> None:
    smtp = open_transport("smtps://u:p@mail.example?timeout=2.5")
    assert isinstance(smtp, SMTPTransport)
    assert (smtp.port, smtp.tls, smtp.timeout) == (465, "implicit", 2.5)


def test_mail_timeout_is_the_urls_timeout_the_default_or_none_for_a_folder() -> None:
    assert mail_timeout("smtps://u:p@mail.example?timeout=2.5") == 2.5
    assert mail_timeout("smtp://mail.example") == 30.0
    assert mail_timeout("file://var/outbox") is None
    with pytest.raises(ConfigError, match="timeout="):
        mail_timeout("smtp://mail.example?timeout=0")


def test_open_transport_reads_absolute_and_relative_file_urls() -> None:
    absolute = open_transport("file:///srv/drip/outbox")
    relative = open_transport("file://var/outbox")  # DESIGN's default: relative to the cwd
    assert isinstance(absolute, FileTransport) and isinstance(relative, FileTransport)
    assert absolute.directory == Path("/srv/drip/outbox")
    assert relative.directory == Path("var/outbox")


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://mail.example", "smtp://, smtps:// or file://"),
        ("mail.example:25", "smtp://, smtps:// or file://"),
        ("smtp://", "no host"),
        ("smtp://mail.example:port", "bad port"),
        ("smtp://mail.example?tls=sometimes", "tls="),
        ("smtp://mail.example?timeout=soon", "timeout="),
        ("smtp://mail.example?verify=no", "unknown option"),
        ("smtp://mail.example?tls=off", "tls=none"),
        ("smtps://mail.example?tls=none", "smtps://"),
        ("smtp://mail.example?tls=none&cafile=/etc/hosts", "tls=none"),
        ("smtp://mail.example?cafile=/no/such/ca.pem", "not a file"),
        ("file://", "no folder"),
    ],
)
def test_open_transport_refuses_a_bad_url_naming_the_variable(url: str, says: str) -> None:
    with pytest.raises(ConfigError, match="DRIP_MAIL_URL") as failure:
        open_transport(url)
    assert says in str(failure.value)


def test_a_cafile_that_is_no_certificate_is_refused_at_start_up(tmp_path: Path) -> None:
    junk = tmp_path / "ca.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError) as refused:
        open_transport(f"smtp://u:hunter2@mail.example?cafile={junk}")
    message = str(refused.value)
    assert "DRIP_MAIL_URL" in message and "cafile=" in message and "PEM" in message
    assert "hunter2" not in message


def test_open_transport_reads_tls_none_and_a_cafile(
    tls: tuple[SSLContext, SSLContext], tmp_path: Path
) -> None:
    plain = open_transport("smtp://u:p@relay.internal?tls=none")
    assert isinstance(plain, SMTPTransport) and plain.tls == "none"
    pinned = open_transport(f"smtps://relay.internal?cafile={tmp_path / 'cert.pem'}")
    assert isinstance(pinned, SMTPTransport) and pinned._ssl_context is not None


def test_a_bad_url_error_never_shows_the_password() -> None:
    with pytest.raises(ConfigError) as failure:
        open_transport("smtp://user:hunter2@mail.example:bad")
    assert "hunter2" not in str(failure.value)
