"""The data model: patients, their enrolments, one delivery row per planned email, and an event log.

The database is the source of truth for who gets which email when (DESIGN §1). Times are stored as
naive UTC and come back timezone-aware (UTCDateTime), the same on SQLite and PostgreSQL.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time
from typing import Any, cast

from sqlalchemy import (
    CheckConstraint,
    Date,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Time,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Delivery states (DESIGN §2, contract).
SCHEDULED = "scheduled"
CLAIMED = "claimed"
SENDING = "sending"
SENT = "sent"
RETRY = "retry"
FAILED = "failed"
UNKNOWN = "unknown"
SKIPPED = "skipped"
CANCELLED = "cancelled"
STATES = (SCHEDULED, CLAIMED, SENDING, SENT, RETRY, FAILED, UNKNOWN, SKIPPED, CANCELLED)
WAITING_STATES = (SCHEDULED, RETRY)  # planned, not yet taken by a ticker
IN_FLIGHT_STATES = (CLAIMED, SENDING)
FINAL_STATES = (SENT, FAILED, UNKNOWN, SKIPPED, CANCELLED)

# Enrolment statuses.
ACTIVE = "active"
PAUSED = "paused"
ENDED = "ended"
ENROLMENT_STATUSES = (ACTIVE, PAUSED, ENDED)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class UTCDateTime(TypeDecorator[datetime]):
    """An aware UTC datetime in Python, naive UTC in the database."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class Patient(Base):
    """A person who receives emails. Names and address live here and nowhere else."""

    __tablename__ = "patients"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email: Mapped[str] = mapped_column(String(320))
    email_key: Mapped[str] = mapped_column(String(320), unique=True)  # lower-cased, for lookups
    # Opaque and random (drip.patients.new_public_id): what unsubscribe links name, never the id.
    public_id: Mapped[str] = mapped_column(String(22), unique=True)
    first_name: Mapped[str] = mapped_column(String(100))
    last_name: Mapped[str | None] = mapped_column(String(100))
    timezone: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    unsubscribed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The mirror of `suppressions` for this patient's address, which claims and the send path
    # check without hashing: kept by drip.suppression alone (DESIGN §4).
    suppressed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    suppressed_reason: Mapped[str | None] = mapped_column(String(200))


class Enrolment(Base):
    """One patient in one campaign. At most one open (active or paused) per patient and campaign."""

    __tablename__ = "enrolments"
    __table_args__ = (
        CheckConstraint(_in("status", ENROLMENT_STATUSES), name="status"),
        Index(
            "uq_enrolments_open",
            "patient_id",
            "campaign",
            unique=True,
            sqlite_where=text("status != 'ended'"),
            postgresql_where=text("status != 'ended'"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id"), index=True)
    campaign: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    enrolled_at: Mapped[datetime] = mapped_column(UTCDateTime())
    first_session_on: Mapped[date | None] = mapped_column(Date)  # patient's local date
    first_session_at: Mapped[time | None] = mapped_column(Time)  # patient's local time, if known
    paused_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    ended_reason: Mapped[str | None] = mapped_column(String(32))


class Delivery(Base):
    """One planned email: its due time, its state and, once sent, its Message-ID."""

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("enrolment_id", "step_key"),
        CheckConstraint(_in("state", STATES), name="state"),
        Index("ix_deliveries_state_due_at", "state", "due_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    enrolment_id: Mapped[int] = mapped_column(ForeignKey("enrolments.id"))
    step_key: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    due_at: Mapped[datetime | None] = mapped_column(UTCDateTime())  # None: waits for a date
    # After this instant the step is stale (its late policy): never sent, at claim or at send.
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    first_tried_at: Mapped[datetime | None] = mapped_column(UTCDateTime())  # DRIP_RETRY_FOR
    last_error: Mapped[str | None] = mapped_column(String(500))
    message_id: Mapped[str | None] = mapped_column(String(255))  # set when marked sending
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Event(Base):
    """Append-only log of what happened, by whom, when. Ids and state names only: never a name,
    an address or an email body."""

    __tablename__ = "events"
    __table_args__ = (Index("ix_events_patient_id_at", "patient_id", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    actor: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(40))
    patient_id: Mapped[int | None] = mapped_column(Integer)
    enrolment_id: Mapped[int | None] = mapped_column(Integer)
    delivery_id: Mapped[int | None] = mapped_column(Integer)
    detail: Mapped[str | None] = mapped_column(String(500))


class Suppression(Base):
    """An address that must never get another email, as a keyed hash (drip.suppression): no
    address is stored, so the list outlives the patient's record."""

    __tablename__ = "suppressions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    address_hash: Mapped[str] = mapped_column(String(64), unique=True)  # hex HMAC-SHA256
    key_id: Mapped[str] = mapped_column(String(16))  # which DRIP_SECRET_KEY made the hash
    reason: Mapped[str] = mapped_column(String(200))
    source: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


# Core tables, for bulk inserts and conditional updates.
PATIENTS = cast(Table, Patient.__table__)
ENROLMENTS = cast(Table, Enrolment.__table__)
DELIVERIES = cast(Table, Delivery.__table__)
EVENTS = cast(Table, Event.__table__)
SUPPRESSIONS = cast(Table, Suppression.__table__)
