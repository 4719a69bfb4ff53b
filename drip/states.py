"""The delivery state machine (DESIGN §2): the table of allowed changes, and every statement that
makes one. Claims, sending, enrolment changes, operators' retries, unsubscribing and bounces all
change a delivery's state through here, and nowhere else.

    scheduled ─┐                ┌─► sent
    retry ─────┴─► claimed ─► sending ─┼─► retry / failed / unknown / skipped (stale)
      ▲              │                 │
      └──────────────┴── given back ◄──┘ (deferred, lease lost, relay failing)

Each change is one conditional UPDATE on the state(s) a row must still be in, so two processes
can never both win a row. Statements that find rows by id test the state without its index (see
`unindexed`), so the rows are looked up by primary key.

The per-email commit of the sender (drip.sending._EmailCommit) runs MARK_SENDING and RECORD_SENT
as SQL compiled from the statements here, so the hot path and this table cannot disagree.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    Connection,
    String,
    Update,
    and_,
    bindparam,
    case,
    exists,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session

from drip.db import rowcount
from drip.models import (
    ACTIVE,
    CANCELLED,
    CLAIMED,
    DELIVERIES,
    ENROLMENTS,
    FAILED,
    PATIENTS,
    RETRY,
    SCHEDULED,
    SENDING,
    SENT,
    SKIPPED,
    STATES,
    UNKNOWN,
    WAITING_STATES,
)

D, E, P = DELIVERIES.c, ENROLMENTS.c, PATIENTS.c

STALE = "stale"  # the reason of a step skipped for being too late (its late policy) begins so
STALE_REASON = f"{STALE}: too late to send (the step's late policy)"

# Every allowed change: from-state → the states it may become. Anything else is a bug, refused
# when the statement is built.
TRANSITIONS: dict[str, frozenset[str]] = {
    # claimed by a ticker; re-planned; skipped as stale or unsubscribed; cancelled by unenrol
    SCHEDULED: frozenset({CLAIMED, SCHEDULED, SKIPPED, CANCELLED}),
    RETRY: frozenset({CLAIMED, RETRY, SCHEDULED, SKIPPED, CANCELLED}),
    # sent on its way; given back (deferred, lease lost, relay failing); settled before sending
    CLAIMED: frozenset({SENDING, SCHEDULED, RETRY, SKIPPED, FAILED, CANCELLED}),
    # the server's answer; a lease lost mid-send is unknown; a retry past its step's age is stale
    SENDING: frozenset({SENT, RETRY, FAILED, UNKNOWN, SKIPPED}),
    # an operator's decision (drip retry)
    FAILED: frozenset({SCHEDULED}),
    UNKNOWN: frozenset({SCHEDULED}),
    # a stale step planned again when the first session moves
    SKIPPED: frozenset({SCHEDULED}),
    SENT: frozenset(),
    CANCELLED: frozenset(),
}
assert set(TRANSITIONS) == set(STATES)

# last_error is a String(500): PostgreSQL refuses a longer value (and with it the whole
# transaction), where SQLite would store it whole. A reason quoting an exception can be any length.
ERROR_LENGTH: int = cast(String, D.last_error.type).length or 500
UNSENT = (SCHEDULED, RETRY, CLAIMED)  # not yet on its way: a coordinator's change still wins


class TransitionError(AssertionError):
    """Raised when code asks for a change the table does not allow (a bug, not a user error)."""


def check(from_states: Iterable[str], to_state: str) -> None:
    for state in from_states:
        if to_state not in TRANSITIONS[state]:
            raise TransitionError(f"a delivery cannot go from {state} to {to_state}")


def unindexed(column: ColumnElement[str]) -> ColumnElement[str]:
    """`column || ''`: the same value, but no database can use an index for the term.

    Every statement that changes rows by id *and* checks the state they must still be in uses
    it, so that the rows are looked up by primary key. Otherwise both planners prefer
    ix_deliveries_state_due_at, and walk every row in that state, live or dead:
    - SQLite, without ANALYZE statistics, expects an equality on the first column of an index to
      match about ten rows: `id IN (…700 ids…) AND state = ?` walked all the scheduled rows
      (16 ms per claim at 20,000 patients, under the write lock);
    - PostgreSQL, whose statistics say hardly any row is `claimed` or `sending` (ANALYZE ran
      after the enrolment), picks the state index even for `id = 5 AND state = 'claimed'`, and
      then walks the thousands of claimed rows, plus the dead index entries every state change
      leaves until VACUUM: most of the server's time while sending, before this."""
    return column + ""


def _in_state(states: Sequence[str], *, by_id: bool) -> ColumnElement[bool]:
    column = unindexed(D.state) if by_id else D.state
    return column == states[0] if len(states) == 1 else column.in_(states)


def waiting_state() -> ColumnElement[str]:
    """The state a row goes back to when it is given back or re-planned: `retry` once it has
    been tried (its attempts count toward its limit), else `scheduled`."""
    return case((D.attempts > 0, RETRY), else_=SCHEDULED)


def _values(now: datetime, state: Any, **values: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"state": state, "updated_at": now} | values
    if isinstance(out.get("last_error"), str):
        out["last_error"] = out["last_error"][:ERROR_LENGTH]
    return out


def move(
    from_states: Sequence[str],
    to_state: str,
    *,
    ids: Sequence[int] | None = None,
    where: ColumnElement[bool] | None = None,
    now: datetime,
    state: Any = None,
    **values: Any,
) -> Update:
    """The one conditional UPDATE: rows still in `from_states` (by `ids`, and/or `where`) become
    `to_state` (or `state`, an SQL expression whose every outcome is `to_state`-like and checked
    by the caller's own `check`). Refuses a change the table does not allow."""
    check(from_states, to_state)
    conditions = [_in_state(from_states, by_id=ids is not None)]
    if ids is not None:
        conditions.append(D.id.in_(list(ids)))
    if where is not None:
        conditions.append(where)
    return (
        update(DELIVERIES)
        .where(and_(*conditions))
        .values(**_values(now, state if state is not None else to_state, **values))
    )


# --- claiming (the ticker) ----------------------------------------------------------------------


def claim(ids: Sequence[int], from_state: str, *, now: datetime, lease: timedelta) -> Update:
    """Claimed for a batch, with a lease."""
    return move([from_state], CLAIMED, ids=ids, now=now, lease_until=now + lease).returning(D.id)


def skip_expired(*, now: datetime) -> Update:
    """Due rows past their step's age (its late policy) are skipped before anyone claims them."""
    return move(
        WAITING_STATES,
        SKIPPED,
        where=and_(D.due_at <= now, D.expires_at < now),
        now=now,
        lease_until=None,
        last_error=STALE_REASON,
    )


def expire_claims(*, now: datetime, retry_for: timedelta) -> Update:
    """Claimed rows whose lease ran out (the worker holding them stopped, Redis lost the task)
    are given back at once, as a try: `retry`, or `failed` once they have been tried for longer than
    `retry_for`, so that no row is claimed again and again without reaching a final state."""
    check([CLAIMED], RETRY)
    check([CLAIMED], FAILED)
    given_up = D.first_tried_at < now - retry_for
    return move(
        [CLAIMED],
        RETRY,
        where=D.lease_until < now,
        now=now,
        state=case((given_up, FAILED), else_=RETRY),
        lease_until=None,
        attempts=D.attempts + 1,
        first_tried_at=func.coalesce(D.first_tried_at, now),
        last_error=case(
            (given_up, "gave up: the lease ran out again and again (see the workers' logs)"),
            else_="lease ran out while claimed: the worker holding it stopped",
        ),
    )


LOST_IN_SENDING = (
    "lease expired while sending: it may or may not have arrived; `drip retry` resends it"
)


def expire_sending(*, now: datetime) -> Update:
    """A lease that ran out in `sending`: the message may have arrived, so `unknown`, never
    resent by itself."""
    return move(
        [SENDING],
        UNKNOWN,
        where=D.lease_until < now,
        now=now,
        lease_until=None,
        last_error=LOST_IN_SENDING,
    )


# --- sending (the worker) -----------------------------------------------------------------------

_NOW = bindparam("now", type_=D.updated_at.type)
_ENROLMENT_OPEN = exists().where(
    E.id == D.enrolment_id,
    E.status == ACTIVE,
    P.id == E.patient_id,
    P.unsubscribed_at.is_(None),
    P.suppressed_at.is_(None),
)

# claimed → sending, the step that puts content on the wire. It re-checks, in the same statement,
# that the row is still claimed with the plan it was loaded with (a reschedule moves `due_at`),
# that its enrolment is still active and the patient has not unsubscribed or been suppressed:
# a coordinator's change made after the batch loaded its rows wins.
MARK_SENDING = (
    update(DELIVERIES)
    .where(
        D.id == bindparam("mark_id"),
        unindexed(D.state) == CLAIMED,
        D.due_at == bindparam("planned_due", type_=D.due_at.type),
        _ENROLMENT_OPEN,
    )
    .values(
        state=SENDING,
        attempts=D.attempts + 1,
        lease_until=bindparam("lease_until", type_=D.lease_until.type),
        updated_at=_NOW,
        first_tried_at=func.coalesce(D.first_tried_at, _NOW),
        message_id=bindparam("message_id", type_=D.message_id.type),
    )
)
check([CLAIMED], SENDING)

RECORD_SENT = (
    update(DELIVERIES)
    .where(D.id == bindparam("sent_id"), unindexed(D.state) == SENDING)
    .values(
        state=SENT,
        lease_until=None,
        updated_at=_NOW,
        sent_at=_NOW,
        last_error=None,
    )
)
check([SENDING], SENT)


def mark_sending_params(
    delivery_id: int, planned_due: datetime, message_id: str, *, now: datetime, lease: timedelta
) -> dict[str, Any]:
    return {
        "mark_id": delivery_id,
        "planned_due": planned_due,
        "message_id": message_id,
        "now": now,
        "lease_until": now + lease,
    }


def renew(ids: Sequence[int], *, now: datetime, lease: timedelta) -> Update:
    """A batch still working renews the lease of the claimed rows it holds (never shortening
    one: a clock moved back must not take time away)."""
    until = now + lease
    return (
        update(DELIVERIES)
        .where(D.id.in_(list(ids)), unindexed(D.state) == CLAIMED, D.lease_until < until)
        .values(lease_until=until)
    )


def leave(
    connection: Connection | Session,
    ids: Sequence[int],
    from_state: str,
    to_state: str,
    *,
    now: datetime,
    error: str | None = None,
    due_at: datetime | None = None,
    tried: bool = False,
) -> int:
    """Move the rows among `ids` still in `from_state` to `to_state`, giving up their lease;
    return how many moved. `to_state` RETRY or SCHEDULED given back from `claimed` becomes
    `waiting_state()` (a row once tried stays `retry`). `tried`: the give-back counts as an
    attempt. `error` and `due_at` are left alone when None."""
    values: dict[str, Any] = {"lease_until": None}
    if error is not None:
        values["last_error"] = error
    if due_at is not None:
        values["due_at"] = due_at
    state: Any = None
    if tried:
        values["attempts"] = D.attempts + 1
        values["first_tried_at"] = func.coalesce(D.first_tried_at, now)
    if from_state == CLAIMED and to_state in WAITING_STATES and not tried:
        check([CLAIMED], RETRY)
        state = waiting_state()
    statement = move([from_state], to_state, ids=ids, now=now, state=state, **values)
    return rowcount(connection.execute(statement))


# --- coordinators, operators, patients ------------------------------------------------------------


def of_enrolment(enrolment_id: int) -> ColumnElement[bool]:
    return D.enrolment_id == enrolment_id


def of_patient(patient_id: int) -> ColumnElement[bool]:
    """Every row of every enrolment (any campaign, any status) of one patient."""
    return D.enrolment_id.in_(select(E.id).where(E.patient_id == patient_id).scalar_subquery())


def skip(
    session: Session,
    where: ColumnElement[bool] | None,
    reason: str,
    now: datetime,
    *,
    ids: Sequence[int] | None = None,
) -> int:
    """Unsubscribed or suppressed: every row (`where`, and/or by `ids`) not yet on its way is
    skipped with the reason, including rows a batch has claimed (its send-time check then finds
    them gone). A row already `sending` is beyond recall and left alone (see `in_flight`)."""
    statement = move(
        UNSENT, SKIPPED, ids=ids, where=where, now=now, lease_until=None, last_error=reason
    )
    return rowcount(session.execute(statement))


def in_flight(session: Session, where: ColumnElement[bool]) -> int:
    """How many of the rows `where` are already `sending`: on their way, beyond recall."""
    return int(session.scalar(select(func.count()).where(where, D.state == SENDING)) or 0)


def hold(session: Session, where: ColumnElement[bool], *, now: datetime) -> int:
    """A pause: rows already claimed by a batch go back to waiting (their batch will not send
    them: the enrolment is no longer active). Rows not claimed simply wait."""
    return rowcount(
        session.execute(
            move(
                [CLAIMED], SCHEDULED, where=where, now=now, state=waiting_state(), lease_until=None
            )
        )
    )


def cancel(session: Session, where: ColumnElement[bool], *, now: datetime) -> int:
    """Unenrolling: every row not yet on its way is cancelled, including rows already claimed."""
    return rowcount(
        session.execute(move(UNSENT, CANCELLED, where=where, now=now, lease_until=None))
    )


REPLANNABLE = or_(
    D.state.in_(UNSENT),
    and_(D.state == SKIPPED, D.last_error.like(f"{STALE}%")),
)


def replan(
    where: ColumnElement[bool],
    *,
    now: datetime,
    due_at: datetime | None,
    expires_at: datetime | None,
    stale: bool,
) -> Update:
    """A step planned again (first session moved, enrolment resumed): rows not yet on their way,
    or skipped only for being late, take the new plan; a stale one is skipped."""
    check([SCHEDULED, RETRY, CLAIMED, SKIPPED], SCHEDULED)
    check([SCHEDULED, RETRY, CLAIMED], SKIPPED)
    if stale:
        state: Any = SKIPPED
        error: Any = STALE_REASON
    else:  # a stale-skipped row comes back `scheduled`; a row once tried stays `retry`
        state = case((D.state == SKIPPED, SCHEDULED), else_=waiting_state())
        error = None
    return (
        update(DELIVERIES)
        .where(where, REPLANNABLE)
        .values(
            **_values(
                now,
                state,
                due_at=due_at,
                expires_at=expires_at,
                last_error=error,
                lease_until=None,
            )
        )
    )


RETRYABLE = (FAILED, UNKNOWN, RETRY)


def operator_retry(ids: Sequence[int], *, now: datetime) -> Update:
    """`drip retry`: an operator decided to send these again, now (the same Message-ID: a
    receiving client folds a duplicate by it). The retry age starts again; the step's age
    (expires_at) stays: a step past it is skipped, not sent late."""
    return move(
        RETRYABLE, SCHEDULED, ids=ids, now=now, due_at=now, lease_until=None, first_tried_at=None
    )
