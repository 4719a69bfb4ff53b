"""Claiming due deliveries with a lease, and taking expired leases back (the ticker's half of §1).

A claim is one conditional UPDATE: on PostgreSQL the candidate rows are picked with
`FOR UPDATE SKIP LOCKED`, so any number of tickers claim disjoint sets; on SQLite the whole
transaction holds the write lock (BEGIN IMMEDIATE), which serialises tickers just as well.
Only rows of active enrolments are claimed: a paused enrolment's rows simply wait.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import ColumnElement, Connection, String, select, text, update
from sqlalchemy.orm import Session

from drip.db import rowcount
from drip.models import (
    ACTIVE,
    CLAIMED,
    DELIVERIES,
    ENROLMENTS,
    RETRY,
    SCHEDULED,
    SENDING,
    UNKNOWN,
    Delivery,
)

D, E = DELIVERIES.c, ENROLMENTS.c

LOST_IN_SENDING = (
    "lease expired while sending: it may or may not have arrived; `drip retry` resends it"
)


def claim_due(session: Session, *, now: datetime, limit: int, lease: timedelta) -> list[int]:
    """Claim up to `limit` due rows, oldest first (rows waiting to be retried before rows never
    tried); return their ids.

    One query per waiting state, each walking the (state, due_at) index in order and stopping at
    `limit`; the enrolment's status is a scalar subquery, one primary-key lookup per candidate.
    This shape matters right after a bulk enrolment: until PostgreSQL has statistics for the new
    rows (autovacuum's ANALYZE comes a minute later), a join over `state IN (…)` can be planned as
    a nested loop that compares every due row with every enrolment: 250 ms per claim at 5,000
    patients. The subquery cannot be planned that way, whatever the statistics say.
    """
    sqlite = session.get_bind().dialect.name == "sqlite"
    if not sqlite:
        # The planner prices the subquery filter pessimistically (it assumes 0.5% of rows pass),
        # so with a large table the estimate crosses jit_above_cost and every claim would spend
        # 4 ms compiling (130 ms the first time in a session) to run for under one.
        session.execute(text("SET LOCAL jit = off"))
    claimed: list[int] = []
    enrolment_status = select(E.status).where(E.id == D.enrolment_id).scalar_subquery()
    for state in (RETRY, SCHEDULED):
        wanted = limit - len(claimed)
        if wanted <= 0:
            break
        candidates = (
            select(D.id)
            .where(D.state == state, D.due_at <= now, enrolment_status == ACTIVE)
            .order_by(D.due_at)
            .limit(wanted)
            .with_for_update(of=DELIVERIES, skip_locked=True)
        )
        ids = list(session.scalars(candidates))
        if not ids:
            continue
        result = session.execute(
            update(DELIVERIES)
            .where(D.id.in_(ids), unindexed(D.state) == state)
            .values(state=CLAIMED, lease_until=now + lease, updated_at=now)
            .returning(D.id)
        )
        claimed.extend(result.scalars())
    return sorted(claimed)


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


def release(session: Session, ids: list[int], *, now: datetime) -> int:
    """Give claimed rows back at once (e.g. the broker refused them), instead of at lease expiry."""
    return leave(session, ids, CLAIMED, now=now, state=SCHEDULED)


# last_error is a String(500): PostgreSQL refuses a longer value (and with it the whole
# transaction), where SQLite would store it whole. A reason quoting an exception can be any length.
ERROR_LENGTH: int = cast(String, D.last_error.type).length or 500


def leave(
    connection: Connection | Session,
    ids: list[int],
    from_state: str,
    *,
    now: datetime,
    state: str,
    error: str | None = None,
    due_at: datetime | None = None,
) -> int:
    """Move the rows among `ids` still in `from_state` to `state`, giving up their lease; return
    how many moved. Every row given back, deferred, skipped, failed or retried by id goes through
    here, so that each such change checks the state the same way (by primary key, see unindexed)
    and cuts `error` to what the column holds. `error` and `due_at` are left alone when None."""
    values: dict[str, Any] = {"state": state, "lease_until": None, "updated_at": now}
    if error is not None:
        values["last_error"] = error[:ERROR_LENGTH]
    if due_at is not None:
        values["due_at"] = due_at
    return rowcount(
        connection.execute(
            update(DELIVERIES)
            .where(D.id.in_(ids), unindexed(D.state) == from_state)
            .values(**values)
        )
    )


def expire_leases(session: Session, *, now: datetime) -> tuple[int, int]:
    """Expired leases come back: `claimed` → `scheduled`; `sending` → `unknown` (never resent
    automatically: the message may have arrived). Returns (released, unknown)."""
    released = rowcount(
        session.execute(
            update(Delivery)
            .where(Delivery.state == CLAIMED, Delivery.lease_until < now)
            .values(state=SCHEDULED, lease_until=None, updated_at=now)
        )
    )
    unknown = rowcount(
        session.execute(
            update(Delivery)
            .where(Delivery.state == SENDING, Delivery.lease_until < now)
            .values(state=UNKNOWN, lease_until=None, last_error=LOST_IN_SENDING, updated_at=now)
        )
    )
    return released, unknown
