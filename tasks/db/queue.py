"""The queue table's statements, each named: claim, sweep, renew and load, acknowledge, retry,
prune. Built with SQLAlchemy Core so one logic compiles for SQL Server, PostgreSQL,
MySQL/MariaDB and SQLite; the tests compile them for each dialect (T-SQL parsed as SQL Server
would). docs/architecture.md says how to add one.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Connection,
    Row,
    Select,
    Table,
    Update,
    and_,
    case,
    column,
    exists,
    func,
    literal,
    literal_column,
    null,
    or_,
    select,
    table,
    type_coerce,
    update,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.expression import ColumnElement, Executable, FromClause

from ..amplitude.limits import MAX_BYTES
from ..amplitude.payloads import ROW_COLUMNS, row_limit
from ..outcomes import FAILURE_CLASSES, GAVE_UP, INVALID, KINDS, ORDERED_KINDS, Kind
from . import chunks, retry
from .chunks import Change
from .schema import QueueTables
from .sql import (
    FAILED,
    IN_FLIGHT,
    PENDING,
    SENT,
    LenientTime,
    bigint,
    lit,
    stored_bytes,
    utcnow,
    utcnow_plus,
)
from .sql import token as token_literal
from .tsql import CHUNK, DriverSQL, driver_sql

# Ids per statement: a statement changes at most this many rows (SQL Server escalates to a
# table lock at about 5,000 locks, docs/sqlserver.md).
_IDS_PER_STATEMENT = CHUNK

# Every statement ampsync sends: a SQLAlchemy statement, or a T-SQL batch (tasks/db/tsql.py).
Statement = Executable | DriverSQL

# The JSON a claim may take, as stored: rows are taken in id order until the count or these
# bytes are reached (the first row always goes). One Batch request's worth: a send's memory
# grows with what it loads, a few times the JSON's size (bench/README.md, "Memory (issue
# 15)"), so 2,000 rows of 20 MB cannot all be loaded by one worker at once.
CLAIM_BYTES = MAX_BYTES["batch"]
# A row whose JSON is stored larger than any endpoint accepts is never loaded whole.
LARGEST_ROW = max(row_limit(endpoint) for endpoint in MAX_BYTES)

# --- claim -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    token: str
    rows: int
    last_id: int = 0  # the highest id claimed; 0 when nothing was

    def next_floor(self, limit: int) -> int:
        """Where the next claim of the kind starts (`after_id`): past this one when it was full;
        after a short one, at the oldest due row again, where retried and released rows wait."""
        return self.last_id if self.rows == limit else 0


def _earlier_of_same_key(
    q: Table,
    kind: str,
    later: FromClause[Any],
    conditions: Callable[[FromClause[Any]], tuple[ColumnElement[bool], ...]],
) -> ColumnElement[bool]:
    """An earlier row of `later`'s key (user, else device, else group) meets the conditions.

    One EXISTS per kind of key, each a seek on its index (kind, key, id): an OR of the keys
    inside one EXISTS made PostgreSQL scan every row of the kind per candidate; split, each
    candidate costs two index seeks (bench/README.md, finding 1).
    """
    earlier = q.alias("earlier")
    base = (earlier.c.kind == lit(kind), earlier.c.id < later.c.id, *conditions(earlier))
    if kind == "group_identify":
        return exists().where(
            *base,
            earlier.c.group_type == later.c.group_type,
            earlier.c.group_value == later.c.group_value,
        )
    return or_(
        and_(
            later.c.user_id.is_not(None),
            exists().where(*base, earlier.c.user_id == later.c.user_id),
        ),
        and_(
            later.c.user_id.is_(None),
            exists().where(
                *base, earlier.c.user_id.is_(None), earlier.c.device_id == later.c.device_id
            ),
        ),
    )


def claim_statement(
    tables: QueueTables,
    kind: str,
    limit: int,
    lease_seconds: float,
    token: str,
    after_id: int = 0,
    after_identify: bool = False,
) -> tuple[Select[Any], Update]:
    """The claim's parts: the locking SELECT of candidates and the UPDATE that stamps them.

    Due rows of one kind, oldest first, skipping rows another claim has locked. A row of an
    ordered kind waits while an earlier row of its key is in flight or backing off; an earlier
    row that is due travels in the same batch, ahead of it.
    `after_id` (the keyset floor) starts the index seek past rows a previous claim took: with
    statistics taken while every row was pending, PostgreSQL otherwise walks the primary key
    over every row already claimed, so claims grow through a drain; with the floor they stay
    flat (bench/README.md, finding 3). The same-key check ignores it.
    `after_identify`: an event waits while an earlier identify row of its user (else device)
    is pending or in flight, so Amplitude stamps it with the properties written before it.
    Returns (select of candidate ids with their JSON's stored bytes, update of those ids);
    `within_budget` takes the ids a claim keeps, `claim_statements` puts them together.
    """
    assert kind in KINDS
    q = tables.queue
    candidate = q.alias("candidate")
    now = utcnow()
    due = and_(
        candidate.c.kind == lit(kind),
        candidate.c.status == PENDING,
        or_(candidate.c.next_attempt_at.is_(None), candidate.c.next_attempt_at <= now),
    )
    if kind in ORDERED_KINDS:
        blocked = _earlier_of_same_key(
            q,
            kind,
            candidate,
            lambda earlier: (
                or_(
                    earlier.c.status == IN_FLIGHT,
                    and_(earlier.c.status == PENDING, earlier.c.next_attempt_at > now),
                ),
            ),
        )
        due = and_(due, ~blocked)
    if kind == Kind.EVENT and after_identify:
        waiting = _earlier_of_same_key(
            q,
            Kind.IDENTIFY,
            candidate,
            lambda earlier: (earlier.c.status.in_([PENDING, IN_FLIGHT]),),
        )
        due = and_(due, ~waiting)
    if after_id:
        due = and_(due, candidate.c.id > after_id)
    locked = (
        select(candidate.c.id, _json_bytes(candidate).label("stored_bytes"))
        .where(due)
        .order_by(candidate.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True, of=candidate)
        .with_hint(candidate, "WITH (ROWLOCK, UPDLOCK, READPAST)", dialect_name="mssql")
    )
    stamp = update(q).values(
        status=IN_FLIGHT,
        claim_token=token,
        locked_until=utcnow_plus(lease_seconds),
        attempts=q.c.attempts + 1,
        first_attempt_at=func.coalesce(q.c.first_attempt_at, utcnow()),
    )
    return locked, stamp


def _json_bytes(q: FromClause[Any]) -> ColumnElement[int]:
    """The bytes of a row's JSON columns as stored, measured by the database."""
    return stored_bytes(q.c.properties) + stored_bytes(q.c.extra)


def _bytes_before(rows: FromClause[Any]) -> ColumnElement[int]:
    """The JSON bytes of the rows ahead of each one in id order: a row is taken while this is
    under the claim's budget, so the first always goes and the sum stops past the budget."""
    size: ColumnElement[int] = rows.c.stored_bytes
    running: ColumnElement[int] = func.sum(size).over(order_by=rows.c.id, rows=(None, 0))
    return running - size


def _budget(budget_bytes: int) -> ColumnElement[int]:
    return bigint(literal(int(budget_bytes), BigInteger))


def within_budget(locked: Select[Any], budget_bytes: int) -> Select[Any]:
    """The ids of the locked candidates a claim takes: in id order until the byte budget.
    The running sum sits outside the locking SELECT: PostgreSQL refuses FOR UPDATE beside a
    window function, and inside it the sum would read every due row before the LIMIT."""
    rows = locked.subquery("locked")
    ranked = select(rows.c.id, _bytes_before(rows).label("bytes_before")).subquery("ranked")
    return select(ranked.c.id).where(ranked.c.bytes_before < _budget(budget_bytes))


# The columns the claim's CTE exposes to its UPDATE on SQL Server.
_CLAIMED = ("id", "status", "claim_token", "locked_until", "attempts", "first_attempt_at")


def claim_batch(
    tables: QueueTables,
    kind: str,
    limit: int,
    lease_seconds: float,
    token: str,
    dialect: Dialect,
    after_id: int = 0,
    after_identify: bool = False,
    budget_bytes: int = CLAIM_BYTES,
) -> DriverSQL:
    """The claim on SQL Server: one table reference, read and locked under ROWLOCK, UPDLOCK,
    READPAST, and the claimed ids returned through OUTPUT … INTO a table variable (OUTPUT
    without INTO fails once the queue table has a trigger). The byte budget is a second CTE
    over the locked ones; the UPDATE goes through it to the one table. docs/sqlserver.md
    shows it."""
    if not token or any(c not in "0123456789abcdef" for c in token):
        raise ValueError(f"a claim token is hex digits, not {token!r}")
    locked, _ = claim_statement(tables, kind, limit, lease_seconds, token, after_id, after_identify)
    candidate = locked.selected_columns[0].table
    rows = driver_sql(
        locked.with_only_columns(
            *(candidate.c[n] for n in _CLAIMED), _json_bytes(candidate).label("stored_bytes")
        ),
        dialect,
    )
    lease = str(utcnow_plus(lease_seconds).compile(dialect=dialect))
    c = table("c", *(column(n) for n in (*_CLAIMED, "stored_bytes")))
    ranked = select(*(c.c[n] for n in _CLAIMED), _bytes_before(c).label("bytes_before"))
    budget = str(_budget(budget_bytes).compile(dialect=dialect, compile_kwargs=_INLINE))
    return DriverSQL(
        "DECLARE @ids TABLE (id BIGINT PRIMARY KEY);\n"
        f"WITH c AS (\n{rows.sql}\n),\n"
        f"b AS (\n{ranked.compile(dialect=dialect)}\n)\n"
        f"UPDATE b SET status = {IN_FLIGHT}, claim_token = '{token}', locked_until = {lease}, "
        "attempts = attempts + 1, "
        "first_attempt_at = COALESCE(first_attempt_at, SYSUTCDATETIME())\n"
        f"OUTPUT inserted.id INTO @ids\nWHERE bytes_before < {budget};\n"
        "SELECT id FROM @ids ORDER BY id",
        rows.params,
    )


_INLINE = {"literal_binds": True}


def claim_statements(
    tables: QueueTables,
    kind: str,
    limit: int,
    lease_seconds: float,
    token: str,
    dialect: Dialect,
    after_id: int = 0,
    after_identify: bool = False,
    ids: Sequence[int] = (),
    budget_bytes: int = CLAIM_BYTES,
) -> list[Statement]:
    """What a claim sends on `dialect`: the SQL Server batch; on MySQL/MariaDB (no UPDATE …
    RETURNING) the locking SELECT, then the UPDATE of the `ids` it returned; elsewhere one
    UPDATE … RETURNING."""
    if dialect.name == "mssql":
        return [
            claim_batch(
                tables,
                kind,
                limit,
                lease_seconds,
                token,
                dialect,
                after_id,
                after_identify,
                budget_bytes,
            )
        ]
    locked, stamp = claim_statement(
        tables, kind, limit, lease_seconds, token, after_id, after_identify
    )
    pick = within_budget(locked, budget_bytes)
    q = tables.queue
    if dialect.name in ("mysql", "mariadb"):
        return [pick, *(stamp.where(q.c.id.in_(chunk)) for chunk in _chunks(list(ids)))]
    return [stamp.where(q.c.id.in_(pick.scalar_subquery())).returning(q.c.id)]


def claim(
    conn: Connection,
    tables: QueueTables,
    kind: str,
    limit: int,
    lease_seconds: float,
    after_id: int = 0,
    after_identify: bool = False,
    budget_bytes: int = CLAIM_BYTES,
) -> Claim:
    """Claim up to `limit` due rows of `kind` with ids above `after_id` under a new token,
    in id order until their JSON reaches `budget_bytes` as stored (commits)."""
    token = uuid.uuid4().hex
    dialect = conn.dialect

    def statements(ids: Sequence[int] = ()) -> list[Statement]:
        return claim_statements(
            tables,
            kind,
            limit,
            lease_seconds,
            token,
            dialect,
            after_id,
            after_identify,
            ids,
            budget_bytes,
        )

    def run(c: Connection) -> list[int]:
        first = statements()[0]
        if isinstance(first, DriverSQL):
            return list(first.run(c).scalars())
        ids = list(c.execute(first).scalars())
        if dialect.name in ("mysql", "mariadb"):  # locked FOR UPDATE until the commit
            for stamp in statements(ids)[1:]:
                c.execute(_core(stamp))
        return ids

    ids = retry.transaction(conn, run)
    return Claim(token, len(ids), max(ids, default=0))


# --- sweep -------------------------------------------------------------------------------------


def _gave_up(q: Table, why: str) -> ColumnElement[str]:
    """The last_error of a row ampsync stops retrying: the class, why, then the error before."""
    assert "'" not in why
    return func.substring(
        literal_column(f"'{GAVE_UP} {why}; last error: '")
        + func.coalesce(q.c.last_error, literal_column("'none'")),
        1,
        2000,
    )


def sweep_changes(
    tables: QueueTables, max_attempts: int, max_age_seconds: float = 0
) -> tuple[Change, ...]:
    """Leases that expired (a worker died or lost its message): the row is due again, or failed
    once its attempts are spent (attempts count at claim, so a row that kills its worker ends).
    Pending rows of a kind ampsync does not know fail. With a maximum age, pending rows first
    tried longer ago than that fail too: a re-send after Amplitude's 7-day dedup window could
    count twice. Each is applied in chunks (tasks/db/chunks.py)."""
    q = tables.queue
    expired = (q.c.status == IN_FLIGHT, q.c.locked_until < utcnow())
    give_up = Change(
        q,
        (*expired, q.c.attempts >= max_attempts),
        dict(
            status=FAILED,
            claim_token=None,
            locked_until=None,
            last_error=_gave_up(
                q, f"{max_attempts} attempts: lease expired (the worker died or stopped mid-batch)"
            ),
        ),
    )
    release = Change(
        q,
        (*expired, q.c.attempts < max_attempts),
        dict(status=PENDING, claim_token=None, locked_until=None),
    )
    # No claim ever selects a kind it does not know: such a row would stay pending forever.
    unknown_kind = Change(
        q,
        (q.c.status == PENDING, _unknown_kind(q)),
        dict(
            status=FAILED,
            last_error=literal_column(f"'{INVALID} kind '''")
            + q.c.kind
            + literal_column(f"''' is not one of {', '.join(KINDS)}'"),
        ),
    )
    if not max_age_seconds:
        return give_up, release, unknown_kind
    too_old = Change(
        q,
        (q.c.status == PENDING, q.c.first_attempt_at < utcnow_plus(-float(max_age_seconds))),
        dict(
            status=FAILED,
            next_attempt_at=None,
            last_error=_gave_up(
                q,
                f"{max_age_seconds:g} s: pending longer than "
                f"AMPSYNC_MAX_AGE_SECONDS ({max_age_seconds:g} s) since its "
                "first attempt",
            ),
        ),
    )
    return give_up, release, unknown_kind, too_old


def sweep_statements(
    tables: QueueTables,
    max_attempts: int,
    dialect: Dialect,
    max_age_seconds: float = 0,
    chunk: int = CHUNK,
) -> list[Statement]:
    """One chunk's statement of each of the sweep's changes, as `dialect` runs it."""
    return [
        change.statement(dialect, chunk, low_priority=True)
        for change in sweep_changes(tables, max_attempts, max_age_seconds)
    ]


def _unknown_kind(q: Table) -> ColumnElement[bool]:
    """kind is none of KINDS, written as the ranges between them: the claim index (kind, status,
    id) answers with a few empty seeks instead of reading every pending row."""
    known = sorted(KINDS)
    return or_(
        q.c.kind < lit(known[0]),
        *(and_(q.c.kind > lit(a), q.c.kind < lit(b)) for a, b in itertools.pairwise(known)),
        q.c.kind > lit(known[-1]),
    )


def sweep(
    conn: Connection,
    tables: QueueTables,
    max_attempts: int,
    max_age_seconds: float = 0,
    thorough: bool = True,
    chunk: int = CHUNK,
) -> tuple[int, int]:
    """Run the sweep; returns (rows failed, rows released). Expired leases are released on every
    call; the unsendable-row statements (unknown kind, too old) run only when `thorough`, on
    beat's and manual syncs, not on every follow-up of a drain (bench/README.md, finding 4).
    Each statement changes at most `chunk` rows and commits; on SQL Server at low deadlock
    priority and with a lock timeout, so claims and acknowledgements win."""
    give_up, release, *unsendable = sweep_changes(tables, max_attempts, max_age_seconds)
    with chunks.low_priority(conn):
        failed = chunks.run(conn, give_up, chunk, low_priority=True)
        released = chunks.run(conn, release, chunk, low_priority=True)
        if thorough:
            for change in unsendable:
                failed += chunks.run(conn, change, chunk, low_priority=True)
    return failed, released


# --- send side: renew, load, acknowledge -------------------------------------------------------


def _mine(q: Table, token: str) -> ColumnElement[bool]:
    """The rows of one claim still in flight. The token is written as a plain '…' literal
    (sql.token): a bind parameter would reach SQL Server as N'…' and scan the index."""
    return and_(q.c.claim_token == token_literal(token), q.c.status == IN_FLIGHT)


def renew_statement(tables: QueueTables, token: str, lease_seconds: float) -> Update:
    q = tables.queue
    return update(q).where(_mine(q, token)).values(locked_until=utcnow_plus(lease_seconds))


def renew(conn: Connection, tables: QueueTables, token: str, lease_seconds: float) -> int:
    """Extend the lease of this claim's rows; 0 means the claim is no longer ours (a count the
    caller only reports: on SQL Server with NOCOUNT on it is -1)."""
    statement = renew_statement(tables, token, lease_seconds)
    return retry.transaction(conn, lambda c: int(c.execute(statement).rowcount))


def renew_and_load_statement(
    tables: QueueTables, token: str, send_seconds: float, max_row_bytes: int = LARGEST_ROW
) -> Select[Any]:
    """The claim's rows, each with whether its lease is shorter than `send_seconds`."""
    q = tables.queue
    short = (q.c.locked_until < utcnow_plus(send_seconds)).label("short")
    return load_statement(tables, token, max_row_bytes).add_columns(short)


def renew_and_load(
    conn: Connection,
    tables: QueueTables,
    token: str,
    lease_seconds: float,
    send_seconds: float,
    max_row_bytes: int = LARGEST_ROW,
) -> Sequence[Row[Any]]:
    """The claim's rows in id order, their lease renewed; [] when the claim is no longer ours.

    The lease is written only when what is left would not cover a send of the longest allowed
    time, `send_seconds` (the message waited in the broker): every UPDATE writes a new version
    of each row and its index entries, and a renewal nobody needs was a third of the
    database's writes per row. What `load_statement` says of large rows and bad times holds.
    """
    statement = renew_and_load_statement(tables, token, send_seconds, max_row_bytes)
    rows = retry.transaction(conn, lambda c: c.execute(statement).all())
    if rows and rows[0].short:  # one claim, one statement: every row has the same lease
        renew(conn, tables, token, lease_seconds)
    return rows


def count_rerun_statements(tables: QueueTables, token: str, max_attempts: int) -> list[Update]:
    """Fail the claim's rows whose attempts are spent; count one more attempt for the rest."""
    q = tables.queue
    mine = _mine(q, token)
    return [
        update(q)
        .where(mine, q.c.attempts >= max_attempts)
        .values(
            status=FAILED,
            claim_token=None,
            locked_until=None,
            last_error=_gave_up(
                q,
                f"{max_attempts} attempts: the worker sending the "
                "batch died (killed, out of memory or crashed); see the "
                "worker log",
            ),
        ),
        update(q).where(mine).values(attempts=q.c.attempts + 1),
    ]


def count_rerun(conn: Connection, tables: QueueTables, token: str, max_attempts: int) -> int:
    """A send task run again because its worker died mid-send (Celery redelivers its message):
    the lost run was an attempt. Without this a batch that kills its worker every time would
    run forever, renewing its own lease. Rows whose attempts are spent fail; the others count
    one more attempt. Returns the number of rows failed (reported only)."""
    give_up, count = count_rerun_statements(tables, token, max_attempts)

    def run(c: Connection) -> int:
        failed = int(c.execute(give_up).rowcount)
        c.execute(count)
        return failed

    return retry.transaction(conn, run)


def defer_statements(
    tables: QueueTables, kind: str, token: str, ids: Sequence[int] = ()
) -> list[Statement]:
    """The rows of the claim held back by an earlier unfinished row of their key in another
    claim, then the UPDATE that gives the returned `ids` back (ids in chunks)."""
    q = tables.queue
    mine = q.alias("mine")
    blocked = select(mine.c.id).where(
        mine.c.claim_token == token_literal(token),
        _earlier_of_same_key(
            q,
            kind,
            mine,
            lambda earlier: (
                earlier.c.status.in_([PENDING, IN_FLIGHT]),
                or_(
                    earlier.c.claim_token.is_(None),
                    earlier.c.claim_token != token_literal(token),
                ),
            ),
        ),
    )
    statements: list[Statement] = [blocked]
    for chunk in _chunks(list(ids)):
        statements.append(
            update(q)
            .where(q.c.claim_token == token_literal(token), q.c.id.in_(chunk))
            .values(status=PENDING, claim_token=None, locked_until=None, attempts=q.c.attempts - 1)
        )
    return statements


def defer_out_of_order(conn: Connection, tables: QueueTables, kind: str, token: str) -> set[int]:
    """Give back rows whose earlier same-key row is unfinished in another claim (two claims
    raced past each other); they keep their attempt and go out after that row."""
    if kind not in ORDERED_KINDS:
        return set()

    def run(c: Connection) -> list[int]:
        ids = list(c.execute(_core(defer_statements(tables, kind, token)[0])).scalars())
        for statement in defer_statements(tables, kind, token, ids)[1:]:
            c.execute(_core(statement))
        return ids

    return set(retry.transaction(conn, run))


_JSON_COLUMNS = ("properties", "extra")
_TIME_COLUMNS = ("event_time", "created_at")


def load_statement(
    tables: QueueTables, token: str, max_row_bytes: int = LARGEST_ROW
) -> Select[Any]:
    """The claim's rows (ROW_COLUMNS, then `oversized`), each guarded so that it can fail
    alone: properties and extra stored over `max_row_bytes` are left in the database (NULL
    here) and `oversized` says their size, so a row no request can carry never reaches the
    worker's memory; a time the dialect cannot parse arrives as stored (`LenientTime`).
    The payload builder fails such rows with their reason."""
    q = tables.queue
    size = _json_bytes(q)
    over = size > _budget(max_row_bytes)
    columns: list[ColumnElement[Any]] = []
    for name in ROW_COLUMNS:
        if name in _JSON_COLUMNS:
            columns.append(case((over, null()), else_=q.c[name]).label(name))
        elif name in _TIME_COLUMNS:
            columns.append(type_coerce(q.c[name], LenientTime()).label(name))
        else:
            columns.append(q.c[name])
    oversized = case((over, size), else_=null()).label("oversized")
    return select(*columns, oversized).where(_mine(q, token)).order_by(q.c.id)


def load(
    conn: Connection, tables: QueueTables, token: str, max_row_bytes: int = LARGEST_ROW
) -> Sequence[Row[Any]]:
    statement = load_statement(tables, token, max_row_bytes)
    return retry.transaction(conn, lambda c: c.execute(statement).all())


@dataclass
class Acknowledgement:
    """How each row of a claim ended, applied in one transaction."""

    sent: list[int]
    failed: dict[int, str]
    # (delay seconds, refund attempt, reason) -> ids
    retry: dict[tuple[float, bool, str], list[int]]
    # Set by the sender when `sent` holds every row the claim still has.
    all_sent: bool = False


def ack_statements(tables: QueueTables, token: str, ack: Acknowledgement) -> list[Update]:
    """One UPDATE per outcome (ids in chunks), never one per row. Every statement is bounded
    by the claim token, so a late or duplicated send task cannot overwrite a newer claim, and
    a claim has at most one batch of rows (AMPSYNC_BATCH_SIZE, at most 2,000)."""
    q = tables.queue
    mine = _mine(q, token)
    if ack.all_sent:  # the common case: one statement by claim token, no id list
        return [
            update(q)
            .where(mine)
            .values(
                status=SENT,
                sent_at=utcnow(),
                claim_token=None,
                locked_until=None,
                last_error=None,
                next_attempt_at=None,
            )
        ]
    statements = [
        update(q)
        .where(mine, q.c.id.in_(chunk))
        .values(
            status=SENT,
            sent_at=utcnow(),
            claim_token=None,
            locked_until=None,
            last_error=None,
            next_attempt_at=None,
        )
        for chunk in _chunks(ack.sent)
    ]
    for chunk in _chunks(sorted(ack.failed)):
        # each id as BIGINT (db/sql.py, `bigint`): a bare id above 2^31 is DECIMAL to SQL Server
        reasons = case(
            *((bigint(literal(i, BigInteger)), ack.failed[i][:2000]) for i in chunk), value=q.c.id
        )
        statements.append(
            update(q)
            .where(mine, q.c.id.in_(chunk))
            .values(status=FAILED, last_error=reasons, claim_token=None, locked_until=None)
        )
    for (delay, refund, reason), ids in ack.retry.items():
        statements += [
            update(q)
            .where(mine, q.c.id.in_(chunk))
            .values(
                status=PENDING,
                claim_token=None,
                locked_until=None,
                next_attempt_at=utcnow_plus(delay),
                attempts=q.c.attempts - 1 if refund else q.c.attempts,
                last_error=reason[:2000],
            )
            for chunk in _chunks(sorted(ids))
        ]
    return statements


def acknowledge(
    conn: Connection,
    tables: QueueTables,
    token: str,
    ack: Acknowledgement,
    history: dict[str, Any] | None = None,
) -> int:
    """Write the outcome of a claim, and its run-history row, in one transaction (run again
    whole after a deadlock); returns the number of rows changed (reported only)."""
    statements = ack_statements(tables, token, ack)

    def run(c: Connection) -> int:
        changed = sum(int(c.execute(st).rowcount) for st in statements)
        if history is not None:
            c.execute(tables.runs.insert().values(**history).inline())
        return changed

    return retry.transaction(conn, run)


def prune_changes(tables: QueueTables, sent_days: float, history_days: float) -> list[Change]:
    """`sent` rows and run history older than the given days (0 days = keep: no change)."""
    q, runs = tables.queue, tables.runs
    changes = []
    if sent_days:
        changes.append(
            Change(q, (q.c.status == SENT, q.c.sent_at < utcnow_plus(-sent_days * 86400)))
        )
    if history_days:
        changes.append(Change(runs, (runs.c.finished_at < utcnow_plus(-history_days * 86400),)))
    return changes


def prune(
    conn: Connection,
    tables: QueueTables,
    sent_days: float,
    history_days: float,
    chunk: int = CHUNK,
) -> tuple[int, int]:
    """Delete `sent` rows and run history older than the given days, a chunk at a time so
    no statement holds many locks (SQL Server escalates past ~5000). 0 days = keep."""
    deleted = {tables.queue.name: 0, tables.runs.name: 0}
    with chunks.low_priority(conn):
        for change in prune_changes(tables, sent_days, history_days):
            deleted[change.table.name] = chunks.run(conn, change, chunk, low_priority=True)
    return deleted[tables.queue.name], deleted[tables.runs.name]


def insert_rows(conn: Connection, tables: QueueTables, rows: Sequence[dict[str, Any]]) -> None:
    """Insert rows that may name different columns (as a user's SQL would write them)."""
    columns = sorted({key for row in rows for key in row})
    conn.execute(tables.queue.insert().inline(), [{c: row.get(c) for c in columns} for row in rows])


def insert_rows_ids(
    conn: Connection, tables: QueueTables, rows: Sequence[dict[str, Any]]
) -> list[int]:
    """`insert_rows`, then the new rows' ids in order: those above the highest id before
    (no other writer, as in `ampsync check`'s scratch table and the tests' tables)."""
    q = tables.queue
    before = conn.execute(select(func.coalesce(func.max(q.c.id), 0))).scalar_one()
    insert_rows(conn, tables, rows)
    return list(conn.execute(select(q.c.id).where(q.c.id > before).order_by(q.c.id)).scalars())


# --- operator statements -----------------------------------------------------------------------


def retry_failed_changes(
    tables: QueueTables,
    kind: str | None = None,
    ids: Sequence[int] | None = None,
    failure_class: str | None = "gave-up",
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[Change]:
    """The failed rows `retry-failed` selects, back to pending as new (one change per chunk of
    `ids` when given)."""
    q = tables.queue
    where = _failed_where(q, kind, failure_class, since, until)
    values = dict(
        status=PENDING,
        attempts=0,
        next_attempt_at=None,
        claim_token=None,
        locked_until=None,
        first_attempt_at=None,
    )
    return [Change(q, (*where, *chunk), values) for chunk in _id_filters(q, ids)]


def retry_failed(
    conn: Connection,
    tables: QueueTables,
    kind: str | None = None,
    ids: Sequence[int] | None = None,
    failure_class: str | None = "gave-up",
    since: datetime | None = None,
    until: datetime | None = None,
    chunk: int = CHUNK,
) -> int:
    """Put the selected failed rows back to pending as new: attempts and the first-attempt
    clock (AMPSYNC_MAX_AGE_SECONDS) start again, `chunk` rows a statement, each committed.
    Returns the number of rows."""
    changes = retry_failed_changes(tables, kind, ids, failure_class, since, until)
    return sum(chunks.run(conn, change, chunk) for change in changes)


def failed_first_tried_before_statements(
    tables: QueueTables,
    seconds: float,
    kind: str | None = None,
    ids: Sequence[int] | None = None,
    failure_class: str | None = "gave-up",
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[Select[Any]]:
    q = tables.queue
    where = _failed_where(q, kind, failure_class, since, until)
    old = q.c.first_attempt_at < utcnow_plus(-float(seconds))
    return [select(func.count()).where(*where, old, *chunk) for chunk in _id_filters(q, ids)]


def failed_first_tried_before(
    conn: Connection,
    tables: QueueTables,
    seconds: float,
    kind: str | None = None,
    ids: Sequence[int] | None = None,
    failure_class: str | None = "gave-up",
    since: datetime | None = None,
    until: datetime | None = None,
) -> int:
    """How many of the failed rows `retry_failed` would select were first tried over `seconds`
    ago (the caller passes Amplitude's dedup window)."""
    statements = failed_first_tried_before_statements(
        tables, seconds, kind, ids, failure_class, since, until
    )
    return retry.transaction(
        conn, lambda c: sum(int(c.execute(st).scalar_one()) for st in statements)
    )


def _failed_where(
    q: Table,
    kind: str | None,
    failure_class: str | None,
    since: datetime | None,
    until: datetime | None,
) -> list[ColumnElement[bool]]:
    where = [q.c.status == FAILED]
    if kind:
        where.append(q.c.kind == lit(kind))
    if failure_class:
        where.append(q.c.last_error.like(FAILURE_CLASSES[failure_class] + "%"))
    if since:
        where.append(q.c.created_at >= since)
    if until:
        where.append(q.c.created_at < until)
    return where


def _id_filters(q: Table, ids: Sequence[int] | None) -> list[list[ColumnElement[bool]]]:
    """One extra condition list per chunk of ids; no condition when ids is not given."""
    if not ids:
        return [[]]
    return [[q.c.id.in_(chunk)] for chunk in _chunks(list(ids))]


def has_due_rows_statement(tables: QueueTables, kind: str) -> Select[Any]:
    q = tables.queue
    return (
        select(q.c.id)
        .where(
            q.c.kind == lit(kind),
            q.c.status == PENDING,
            or_(q.c.next_attempt_at.is_(None), q.c.next_attempt_at <= utcnow()),
        )
        .limit(1)
    )


def has_due_rows(conn: Connection, tables: QueueTables, kind: str) -> bool:
    statement = has_due_rows_statement(tables, kind)
    return retry.transaction(conn, lambda c: c.execute(statement).first() is not None)


def _core(statement: Statement) -> Executable:
    """A statement known to be SQLAlchemy's (not a T-SQL batch)."""
    assert not isinstance(statement, DriverSQL)
    return statement


def _chunks(ids: list[int], size: int = _IDS_PER_STATEMENT) -> Iterable[list[int]]:
    for start in range(0, len(ids), size):
        yield ids[start : start + size]
