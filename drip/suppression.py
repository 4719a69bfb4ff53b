"""The suppression list: addresses that must never get another email, kept as keyed hashes.

Each entry is the HMAC-SHA256 of an address, normalised as `patients.email_key` is (trimmed,
lower-cased, after drip.patients.check_email), under a key derived from a DRIP_SECRET_KEY with
its own purpose label (the raw key signs unsubscribe links and is never used for anything else).
No address is stored, so the list outlives a patient's record, and a copy of the table names
nobody to whoever lacks the key. `key_id` is a short fingerprint of the derived key: a later
tool can tell which key made an entry. Lookups try every configured key (an entry made before a
rotation still counts); new entries are made under the first.

`patients.suppressed_at/suppressed_reason` mirror the list for each known patient, so that claims
and the send path (drip.states.MARK_SENDING) check a column instead of hashing; only this module
writes them. Patients suppressed before revision 0003 have only the mirror (a migration holds no
key); `backfill` writes their hashes the first time drip runs with the key, and `find` reads the
mirror too until then. The sender also checks the list itself once per batch (`suppressed_among`).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import Connection, delete, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from drip import events, states
from drip.clock import iso
from drip.errors import Suppressed
from drip.models import ENDED, ENROLMENTS, PATIENTS, SUPPRESSIONS
from drip.patients import email_key

S, P, E = SUPPRESSIONS.c, PATIENTS.c, ENROLMENTS.c
PURPOSE = b"drip suppression list v1"
PREFIX = 12  # hex characters of a hash shown to people: enough to tell entries apart
CHUNK = 500  # addresses per lookup (times the number of keys: bound parameters)

UNSUBSCRIBED = "unsubscribed"
MANUAL = "manual"
MIGRATED = "migrated"  # the source of an entry back-filled from a patient suppressed before 0003

Keys = str | Sequence[str]


@dataclass(frozen=True)
class Entry:
    """One suppressed address, as anyone may see it: a hash prefix, never the address."""

    hash_prefix: str
    key_id: str
    reason: str
    source: str
    created_at: datetime

    def as_json(self) -> dict[str, Any]:
        return {
            "hash_prefix": self.hash_prefix,
            "key_id": self.key_id,
            "reason": self.reason,
            "source": self.source,
            "created_at": iso(self.created_at),
        }

    def describe(self) -> str:
        """ "suppressed since 2026-12-01 (unsubscribed)": for messages to coordinators."""
        return f"suppressed since {self.created_at:%Y-%m-%d} ({self.reason})"


def _keys(keys: Keys) -> Sequence[str]:
    keys = (keys,) if isinstance(keys, str) else keys
    if not keys:
        raise ValueError("no DRIP_SECRET_KEY to hash addresses with")
    return keys


@lru_cache(maxsize=16)
def _derived(key: str) -> bytes:
    return hmac.new(key.encode(), PURPOSE, hashlib.sha256).digest()


def key_id(key: str) -> str:
    """A fingerprint of the suppression key derived from `key` (not of `key` itself)."""
    return hmac.new(_derived(key), b"key id", hashlib.sha256).hexdigest()[:8]


def _hash(key: str, address: str) -> str:
    return hmac.new(_derived(key), email_key(address).encode(), hashlib.sha256).hexdigest()


def address_hash(keys: Keys, address: str) -> str:
    """The hash under which `address` is written: under the first key."""
    return _hash(_keys(keys)[0], address)


def address_hashes(keys: Keys, address: str) -> list[str]:
    """Every hash under which `address` may have been written: one per configured key."""
    return [_hash(key, address) for key in _keys(keys)]


def _entry(row: Any) -> Entry:
    return Entry(row.address_hash[:PREFIX], row.key_id, row.reason, row.source, row.created_at)


_SELECT = select(S.address_hash, S.key_id, S.reason, S.source, S.created_at)


# --- looking up ---------------------------------------------------------------------------------


def find(session: Session | Connection, keys: Keys, address: str) -> Entry | None:
    """Why `address` must get no email, or None: its entry in the list, else its patient's own
    columns (a patient suppressed or unsubscribed before the list held hashes)."""
    return blocked_among(session, keys, [address]).get(email_key(address))


def blocked_among(
    session: Session | Connection, keys: Keys, addresses: Iterable[str]
) -> dict[str, Entry]:
    """`find` for many addresses (a CSV's chunk), by email key: two queries per chunk."""
    wanted = {email_key(address) for address in addresses}
    found = suppressed_among(session, keys, wanted)
    rest = sorted(wanted - set(found))
    for start in range(0, len(rest), CHUNK):
        rows = session.execute(
            select(P.email_key, P.suppressed_at, P.suppressed_reason, P.unsubscribed_at).where(
                P.email_key.in_(rest[start : start + CHUNK]),
                or_(P.suppressed_at.is_not(None), P.unsubscribed_at.is_not(None)),
            )
        )
        for row in rows:
            found[row.email_key] = _from_patient(keys, row)
    return found


def _from_patient(keys: Keys, row: Any) -> Entry:
    """An entry as the list will hold it once back-filled, from a patient's own columns."""
    if row.suppressed_at is None:
        reason, since = UNSUBSCRIBED, row.unsubscribed_at
    else:
        reason, since = row.suppressed_reason or MANUAL, row.suppressed_at
    prefix = address_hash(keys, row.email_key)[:PREFIX]
    return Entry(prefix, key_id(_keys(keys)[0]), reason, MIGRATED, since)


def refuse_if_suppressed(session: Session, keys: Keys, address: str) -> None:
    """Enrolment's check: Suppressed (with the date, the reason and the way out) if `address`
    is on the list or its patient unsubscribed."""
    entry = find(session, keys, address)
    if entry is not None:
        raise Suppressed(entry.describe())


def suppressed_among(
    session: Session | Connection, keys: Keys, addresses: Iterable[str]
) -> dict[str, Entry]:
    """The suppressed ones among `addresses`, by their email key: one query per CHUNK addresses,
    whatever their number (the sender's once-per-batch check, a CSV's chunks)."""
    by_hash: dict[str, str] = {}
    for address in addresses:
        for digest in address_hashes(keys, address):
            by_hash[digest] = email_key(address)
    found: dict[str, Entry] = {}
    hashes = list(by_hash)
    step = CHUNK * len(_keys(keys))
    for start in range(0, len(hashes), step):
        chunk = hashes[start : start + step]
        for row in session.execute(_SELECT.where(S.address_hash.in_(chunk))):
            found[by_hash[row.address_hash]] = _entry(row)
    return found


def entries(session: Session, *, limit: int | None = None) -> list[Entry]:
    """The list, newest first."""
    query = _SELECT.order_by(S.created_at.desc(), S.id.desc()).limit(limit)
    return [_entry(row) for row in session.execute(query)]


def summary(session: Session) -> dict[str, int]:
    """How many entries per reason, the commonest first."""
    rows = session.execute(
        select(S.reason, func.count()).group_by(S.reason).order_by(func.count().desc(), S.reason)
    )
    return {reason: int(n) for reason, n in rows}


# --- changing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Halted:
    """What stopping one patient's emails did: enrolments ended (and their campaigns), rows
    skipped, and rows already `sending`, beyond recall. Counts only."""

    ended_enrolments: int = 0
    skipped: int = 0
    in_flight: int = 0
    campaigns: tuple[str, ...] = ()


@dataclass(frozen=True)
class Stopped:
    """What suppressing an address did: the entry that stands (`new`: made now), and for the
    patient with that address, if there is one, what stopped."""

    entry: Entry
    new: bool
    patient_id: int | None = None
    halted: Halted = Halted()


def add(
    session: Session,
    keys: Keys,
    address: str,
    *,
    reason: str,
    source: str,
    now: datetime,
    actor: str,
) -> Stopped:
    """Suppress `address`, and stop every email to the patient who has it: their mirror set,
    every open enrolment ended, every unsent delivery skipped (claimed ones too) with the
    reason. An address already suppressed keeps its entry (`new` False), and its patient is
    stopped again, which changes nothing unless something slipped past. Safe against a
    concurrent add of the same address: INSERT … ON CONFLICT DO NOTHING, then the entry that
    won. Records `patient.suppressed` for a new entry, `ended` for each enrolment ended."""
    existing = find_entry(session, keys, address)
    new = existing is None and _insert(session, keys, address, reason, source, now)
    entry = existing or find_entry(session, keys, address)
    assert entry is not None  # inserted now, or by whoever won the conflict
    patient_id = _patient_id(session, address)
    if new:
        detail = f"{reason} (source {source}, {entry.hash_prefix})"
        events.record(
            session,
            at=now,
            actor=actor,
            kind="patient.suppressed",
            patient_id=patient_id,
            detail=detail,
        )
    if patient_id is None:
        return Stopped(entry, new)
    _mirror(session, patient_id, entry)
    halted = stop(session, patient_id, skip_reason(reason), now=now, actor=actor)
    return Stopped(entry, new, patient_id, halted)


def skip_reason(reason: str) -> str:
    """What a delivery skipped for a suppression says: `unsubscribed`, or `suppressed: <why>`
    (the same words at claim and at send, drip.claims and drip.sending)."""
    return reason if reason == UNSUBSCRIBED else f"suppressed: {reason}"


def stop(session: Session, patient_id: int, reason: str, *, now: datetime, actor: str) -> Halted:
    """End every open enrolment of the patient and skip every delivery not yet on its way.
    `reason` goes on the skipped rows; an enrolment ends `unsubscribed` or `suppressed`."""
    ended_as = UNSUBSCRIBED if reason == UNSUBSCRIBED else "suppressed"
    ended = session.execute(
        update(ENROLMENTS)
        .where(E.patient_id == patient_id, E.status != ENDED)
        .values(status=ENDED, ended_at=now, ended_reason=ended_as)
        .returning(E.id, E.campaign)
    ).all()
    mine = states.of_patient(patient_id)
    skipped = states.skip(session, mine, reason, now)
    events.record_many(
        session,
        [
            events.event_row(now, actor, "ended", patient_id, e_id, None, reason)
            for e_id, _ in ended
        ],
    )
    campaigns = tuple(sorted({campaign for _, campaign in ended}))
    return Halted(len(ended), skipped, states.in_flight(session, mine), campaigns)


def find_entry(session: Session | Connection, keys: Keys, address: str) -> Entry | None:
    """The list's own entry for `address` (not the mirror), or None."""
    return suppressed_among(session, keys, [address]).get(email_key(address))


def _insert(
    session: Session, keys: Keys, address: str, reason: str, source: str, now: datetime
) -> bool:
    first = _keys(keys)[0]
    values = {
        "address_hash": _hash(first, address),
        "key_id": key_id(first),
        "reason": reason[:200],
        "source": source[:64],
        "created_at": now,
    }
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = (
        insert(SUPPRESSIONS)
        .values(values)
        .on_conflict_do_nothing(index_elements=[S.address_hash])
        .returning(S.id)
    )
    # the new row's id, or none when a concurrent add won (rowcount says -1 on PostgreSQL when
    # a Session runs an INSERT … RETURNING)
    return session.execute(statement).scalar() is not None


def _mirror(session: Session, patient_id: int, entry: Entry) -> None:
    session.execute(
        update(PATIENTS)
        .where(P.id == patient_id, P.suppressed_at.is_(None))
        .values(suppressed_at=entry.created_at, suppressed_reason=entry.reason)
    )


UNSUPPRESSED = "patient.unsuppressed"
RESUBSCRIBED = "patient.resubscribed"


def remove(
    session: Session,
    keys: Keys,
    address: str,
    *,
    reason: str,
    now: datetime,
    actor: str,
    kind: str = UNSUPPRESSED,
) -> Entry | None:
    """Lift the suppression of `address` (the entry that was lifted, or None if there was
    none): its entry under every key, the patient's mirror and their unsubscribe; record `kind`
    (`patient.unsuppressed`, or `patient.resubscribed` from `drip enroll --resubscribe`) with
    the actor and the reason (a person's decision: the patient consented again)."""
    entry = find(session, keys, address)  # the list's entry, or the patient's own columns
    if entry is None:
        return None
    session.execute(delete(SUPPRESSIONS).where(S.address_hash.in_(address_hashes(keys, address))))
    session.execute(
        update(PATIENTS)
        .where(P.email_key == email_key(address))
        .values(suppressed_at=None, suppressed_reason=None, unsubscribed_at=None)
    )
    events.record(
        session,
        at=now,
        actor=actor,
        kind=kind,
        patient_id=_patient_id(session, address),
        detail=f"{reason} (was {entry.reason})",
    )
    return entry


def backfill(session: Session, keys: Keys) -> int:
    """Write the hashes of patients suppressed or unsubscribed before the list held hashes
    (revision 0003 moved no rows: a migration holds no key), with their own reason and time;
    set the mirror of an unsubscribed patient that lacks it. Returns how many entries it wrote;
    0 once done, so every `drip db upgrade` may run it."""
    rows = session.execute(
        select(P.id, P.email_key, P.unsubscribed_at, P.suppressed_at, P.suppressed_reason).where(
            or_(P.suppressed_at.is_not(None), P.unsubscribed_at.is_not(None))
        )
    ).all()
    listed = suppressed_among(session, keys, [row.email_key for row in rows])
    written = 0
    for row in rows:
        reason = row.suppressed_reason or (UNSUBSCRIBED if row.unsubscribed_at else MANUAL)
        since = row.suppressed_at or row.unsubscribed_at
        if row.email_key not in listed:
            written += _insert(session, keys, row.email_key, reason, MIGRATED, since)
        if row.suppressed_at is None:
            session.execute(
                update(PATIENTS)
                .where(P.id == row.id)
                .values(suppressed_at=since, suppressed_reason=reason)
            )
    return written


def _patient_id(session: Session | Connection, address: str) -> int | None:
    return session.scalar(select(P.id).where(P.email_key == email_key(address)))
