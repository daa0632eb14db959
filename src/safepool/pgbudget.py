"""PostgresBudget: one limit shared by every process on every host, held in PostgreSQL.

A permit is a session-level advisory lock (``pg_try_advisory_lock(class, slot)``, one slot per
permit) taken on a *budget session*: one PostgreSQL connection of the process's own, shared by
every ``PostgresBudget`` of that process on the same connection string (see
:mod:`safepool._pgsession`). PostgreSQL drops a session's locks the moment the session ends, so
a permit comes back as soon as its holder dies, with no timeout to wait for.

State in the database (created on first use, in ``schema``):

* ``safepool_budget``: one row per budget (id, name, limit); attaching with another limit is
  refused. The budget's advisory-lock class is ``0x5AFE0000 + id``.
* ``safepool_budget_token_<id>``: the sequence the fencing tokens come from.
* ``safepool_budget_permit`` (UNLOGGED): who took each slot last (host, pid, since, token, and
  the server process); ``holders()`` joins it with ``pg_locks``, so a dead holder's row is
  never reported.

Costs: one round trip to acquire (an ``INSERT ... SELECT`` that picks a free slot, takes its
lock, draws a token and records the holder), one to release (unlock, and ``pg_notify`` when a
waiter listens). The statements are in :mod:`safepool._pgsql`.

Waiting: a waiter whose process holds nothing on its budget session waits *in the server*,
queued for one slot's advisory lock for at most ``BLOCK_CHUNK`` seconds at a time (looking at
every slot between): PostgreSQL grants a freed lock to the first waiter in its queue, so waiters
cost no statements while they wait and a release wakes exactly one. A process that holds
permits cannot let one thread's wait occupy the session that its other threads release through:
its waiters ``LISTEN`` on the budget's channel instead (a few listener slots; the others poll
with back-off), and since PostgreSQL does not notify when a session *dies*, they also look again
every ``poll_interval`` seconds.
"""

from __future__ import annotations

import logging
import os
import random
import time
import weakref
from typing import Any

from . import _fork, _pgsession
from ._config import check_duration
from ._netbudget import HOST, Counters, check_on_lost, deadline_of, timeout_error
from ._pgsession import KEY_BASE, Session, driver, session_for
from ._pgsql import (
    ACQUIRE_SQL,
    HOLDERS_SQL,
    RELEASE_SQL,
    SETUP_LOCK,
    STATS_SQL,
    TABLES_SQL,
    WAIT_SQL,
    channel,
)
from .budget import (
    BudgetStats,
    Permit,
    PermitHolder,
    PermitLease,
    check_budget_limit,
    check_budget_name,
    check_permit,
)
from .errors import BudgetUnavailable, LeaseError

__all__ = ["PostgresBudget"]

logger = logging.getLogger("safepool.budget")

# Defaults added to the connection string unless it sets them: a dead network is noticed by the
# kernel within about 15 s instead of the system's two hours.
KEEPALIVES = {
    "keepalives": "1",
    "keepalives_idle": "5",
    "keepalives_interval": "2",
    "keepalives_count": "3",
    "tcp_user_timeout": "15000",
}

MAX_LIMIT = 100_000  # slots are scanned per acquire; PostgreSQL's lock table is finite too
BLOCK_CHUNK = 0.2  # the longest wait in the server before every slot is looked at again
CONTENDED_FOR = 1.0  # for so long after an acquire was kept waiting, the next waits at once
_NOT_BLOCKED = object()  # _block: the process holds something on its session


class _OnConnection:
    """The engine state of a permit held on a caller's own connection (``acquire_on``)."""

    __slots__ = ("conn", "slot")

    def __init__(self, conn: Any, slot: int) -> None:
        self.conn = conn
        self.slot = slot


class _ConnectionPermit(Permit):
    """A permit held on the caller's connection: valid only while that connection is open."""

    __slots__ = ()

    @property
    def valid(self) -> bool:
        conn = self._engine_state.conn
        return super().valid and not (conn.closed or conn.broken)

    @property
    def lost_reason(self) -> str | None:
        conn = self._engine_state.conn
        if self._lost is None and not self._released and (conn.closed or conn.broken):
            return "the connection that held the permit was closed"
        return self._lost


class PostgresBudget:
    """A budget whose permits are session advisory locks in one PostgreSQL database.

    :param conninfo: a libpq connection string or URL (``"host=db1 dbname=app user=app"``).
        Budgets live in that database; TCP keep-alives are added unless the string sets them.
    :param name: the budget's name (see :func:`~safepool.budget.check_budget_name`).
    :param limit: most permits held at once, across every process and host.
    :param on_lost: ``on_lost(permit)`` runs (in a safepool thread) when this process loses a
        permit it held: its budget session was terminated or the connection dropped.
    :param poll_interval: how often a listening waiter (one of a process that holds permits)
        looks again without a notification (a dead holder's permit is free at once, but
        PostgreSQL notifies no one). A waiter of a process holding nothing waits in the server
        and looks at every slot at least every 0.2 s.
    :param connect_timeout: seconds to wait for PostgreSQL when (re)connecting.
    :param socket_timeout: seconds any one statement of the budget session may take; past it
        the session is closed (its permits are lost) and the caller gets
        :class:`~safepool.BudgetUnavailable`: a hung server or a silent network cannot hang
        ``acquire()``.
    :param schema: where the budget tables live (created on first use).

    The process's budget session is one more connection to PostgreSQL per process (shared by
    its budgets on the same ``conninfo``); :meth:`acquire_on` holds a permit on a connection of
    your own instead. Counters in :meth:`stats`: ``in_use`` and ``acquired`` are the budget's
    (every process); ``waiting``, ``timeouts`` and ``reclaimed`` are this object's, in this
    process.
    """

    def __init__(
        self,
        conninfo: str,
        name: str,
        limit: int,
        *,
        on_lost: Any = None,
        poll_interval: float = 0.5,
        connect_timeout: float = 5.0,
        socket_timeout: float = 10.0,
        schema: str = "public",
    ) -> None:
        self._name = check_budget_name(name)
        self._limit = check_budget_limit(limit)
        if limit > MAX_LIMIT:
            raise ValueError(f"limit must be <= {MAX_LIMIT} for a PostgresBudget, got {limit}")
        self._on_lost = check_on_lost(on_lost)
        check_duration("poll_interval", poll_interval, allow_zero=False, allow_inf=False)
        check_duration("connect_timeout", connect_timeout, allow_zero=False, allow_inf=False)
        check_duration("socket_timeout", socket_timeout, allow_zero=False, allow_inf=False)
        if not isinstance(conninfo, str):
            raise TypeError(f"conninfo must be a str, got a {type(conninfo).__name__} object")
        if not isinstance(schema, str) or not schema:
            raise TypeError(f"schema must be a non-empty str, got {schema!r}")
        self._options = {
            "on_lost": on_lost,
            "poll_interval": poll_interval,
            "connect_timeout": connect_timeout,
            "socket_timeout": socket_timeout,
            "schema": schema,
        }
        self._conninfo_arg = conninfo
        self._poll_interval = poll_interval
        psycopg = driver()
        try:
            self._conninfo = psycopg.conninfo.make_conninfo(conninfo, **_keepalives(conninfo))
        except psycopg.ProgrammingError as exc:
            raise ValueError(f"invalid conninfo: {exc}") from None
        self._schema = schema
        self._counters = Counters()
        self._contended_until = 0.0  # see acquire()
        self._id = 0
        self._session_users: weakref.WeakSet[Session] = weakref.WeakSet()
        self._open()
        _fork.register(self)

    # -- opening ----------------------------------------------------------------------------

    def _open(self) -> None:
        session = self._session()
        try:
            self._id = session.call("opening the budget", self._register)
        except BaseException:
            self.close()  # change nothing: no idle connection of ours is left over
            raise
        self._build_sql()

    def _session(self) -> Session:
        options = self._options
        session = session_for(self._conninfo, options["connect_timeout"], options["socket_timeout"])
        if session not in self._session_users:
            self._session_users.add(session)
            session.users += 1
        return session

    def _register(self, conn: Any) -> int:
        """Create the tables if need be, then find or add this budget's row and sequence."""
        sql = driver().sql
        budgets = sql.Identifier(self._schema, "safepool_budget")
        permits = sql.Identifier(self._schema, "safepool_budget_permit")
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s::int8)", (SETUP_LOCK,))
            exists = conn.execute(
                "SELECT to_regclass(%s), to_regclass(%s)",
                (budgets.as_string(conn), permits.as_string(conn)),
            ).fetchone()
            if None in exists:
                conn.execute(sql.SQL(TABLES_SQL).format(budgets=budgets, permits=permits))
            row = (
                conn.execute(
                    sql.SQL(
                        'INSERT INTO {} (name, "limit") VALUES (%s, %s) ON CONFLICT (name) DO '
                        'NOTHING RETURNING id, "limit"'
                    ).format(budgets),
                    (self._name, self._limit),
                ).fetchone()
                or conn.execute(
                    sql.SQL('SELECT id, "limit" FROM {} WHERE name = %s').format(budgets),
                    (self._name,),
                ).fetchone()
            )
            budget_id, limit = row
            if limit != self._limit:
                raise ValueError(
                    f"budget {self._name!r} exists in PostgreSQL with limit {limit}, not "
                    f"{self._limit}: open it with limit={limit}, or unlink() it first"
                )
            if KEY_BASE + budget_id > 2**31 - 1:  # pragma: no cover - 620 million budgets
                raise BudgetUnavailable("too many budgets in safepool_budget for lock classes")
            conn.execute(
                sql.SQL("CREATE SEQUENCE IF NOT EXISTS {}").format(self._sequence_id(budget_id))
            )
        return int(budget_id)

    def _sequence_id(self, budget_id: int) -> Any:
        return driver().sql.Identifier(self._schema, f"safepool_budget_token_{budget_id}")

    def _build_sql(self) -> None:
        """Render this budget's statements once (psycopg then prepares them on the server)."""
        sql = driver().sql
        sequence = self._sequence_id(self._id)
        self._key = KEY_BASE + self._id
        parts = {
            "permits": sql.Identifier(self._schema, "safepool_budget_permit"),
            "sequence": sql.Literal(sequence.as_string(None)),
            "channel": sql.Literal(channel(self._id)),
            "limit": sql.Literal(self._limit),
            "key": sql.Literal(self._key),
            "id": sql.Literal(self._id),
            # (a % in the host name would read as a placeholder)
            "host": sql.SQL(sql.Literal(HOST).as_string(None).replace("%", "%%")),
            "pid": sql.Literal(os.getpid()),  # rendered again in a forked child
        }
        self._acquire_sql = sql.SQL(ACQUIRE_SQL).format(**parts).as_string(None)
        self._release_sql = sql.SQL(RELEASE_SQL).format(**parts).as_string(None)
        self._wait_sql = sql.SQL(WAIT_SQL).format(**parts).as_string(None)
        self._holders_sql = sql.SQL(HOLDERS_SQL).format(**parts).as_string(None)
        self._stats_sql = sql.SQL(STATS_SQL).format(sequence=sequence).as_string(None)

    # -- the protocol -----------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def limit(self) -> int:
        return self._limit

    def acquire(self, timeout: float | None = None) -> Permit:
        """A permit, waiting up to ``timeout`` seconds (None: no limit; 0: do not wait).

        Raises :class:`~safepool.BudgetTimeout` when none came free in time, and
        :class:`~safepool.BudgetUnavailable` when PostgreSQL cannot be reached.
        """
        deadline = deadline_of(timeout)
        session = self._session()
        # Kept waiting lately: look and wait in one statement (_wait_in_server), not two.
        looked = time.monotonic() >= self._contended_until
        permit = self._try(session) if looked else None
        if permit is None:
            if looked:
                self._contended_until = time.monotonic() + CONTENDED_FOR
            if looked and time.monotonic() >= deadline:
                self._counters.add("timeouts")
                raise timeout_error(self._name, self._limit, timeout)
            self._counters.add("waiting")
            try:
                permit = self._wait_in_server(session, deadline)
                if permit is None:
                    permit = self._wait_listening(session, deadline, timeout)
            finally:
                self._counters.add("waiting", -1)
        self._counters.add("acquired")
        return permit

    def _wait_in_server(self, session: Session, deadline: float) -> Permit | None:
        """Look at every slot and wait in the server for one, in chunks; None when the process
        holds something on its session (then a thread of its own may need the session: the
        caller waits by listening instead) or the deadline passed."""
        chunk = 0.05
        cap = min(BLOCK_CHUNK, self._options["socket_timeout"] / 4)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            got = self._block(session, min(remaining, chunk, cap))
            if got is not None:
                return None if got is _NOT_BLOCKED else got  # type: ignore[return-value]
            chunk *= 2

    def _block(self, session: Session, wait: float) -> object:
        """One look at every slot, then a wait in the server of at most ``wait`` seconds: a
        permit, None (it timed out), or _NOT_BLOCKED (the session holds something of this
        process, or failed)."""
        psycopg = driver()

        def attempt(conn: Any) -> object:
            if not session.idle_for_blocking():
                return _NOT_BLOCKED
            since = time.time()
            params = {
                "start": random.randrange(self._limit),
                "wait": f"{max(1, int(wait * 1000))}ms",
                "slot": random.randrange(self._limit),
                "since": since,
            }
            try:
                row = conn.execute(self._wait_sql, params).fetchone()
            except psycopg.errors.LockNotAvailable:
                row = None  # lock_timeout: nothing taken
            if row is None or row[3]:  # it waited: look and wait at once next time too
                self._contended_until = time.monotonic() + CONTENDED_FOR
            return None if row is None else self._granted(session, row[:3], since)

        try:
            return session.call("acquire", attempt, dirty=self._id)
        except BudgetUnavailable:  # the session ended: the listening path reconnects
            return _NOT_BLOCKED

    def _wait_listening(self, session: Session, deadline: float, timeout: float | None) -> Permit:
        """Wait for a permit, woken by NOTIFY (a listener) or looking again with back-off."""
        waiting = listening = False
        misses = 0  # attempts that lost the race for a freed permit
        try:
            while True:
                seen = session.sequence()
                permit = self._try(session)
                if permit is not None:
                    return permit
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._counters.add("timeouts")
                    raise timeout_error(self._name, self._limit, timeout)
                if not waiting:  # LISTEN first, then look again: no wake-up can be missed
                    listening = session.start_waiting(self._id)
                    waiting = True
                    continue
                # A poller asks for a listener slot (one statement) every fourth look only.
                if not listening and misses % 4 == 0 and session.try_listen(self._id):
                    listening = True
                    continue
                # A listener hears every release, as do the other listeners: after a lost race,
                # a jittered back-off thins the herd. A poller backs off up to poll_interval.
                cap = 0.05 if listening else self._poll_interval
                backoff = random.uniform(0, min(cap, 0.001 * 2**misses))
                misses += 1
                if listening:
                    time.sleep(min(remaining, backoff) if misses > 1 else 0)
                    session.wait(seen, min(remaining, self._poll_interval))
                else:
                    session.wait(seen, min(remaining, max(backoff, 0.001)))
        finally:
            if waiting:
                session.stop_waiting(self._id)

    def _try(self, session: Session) -> Permit | None:
        def attempt(conn: Any) -> Permit | None:
            since = time.time()
            held = session.held(self._id)
            row = conn.execute(self._acquire_sql, self._params(held, since)).fetchone()
            return None if row is None else self._granted(session, row, since)

        return session.call("acquire", attempt, dirty=self._id)

    def _granted(self, session: Session, row: Any, since: float) -> Permit:
        """Under the session's lock: record the permit an acquire statement returned."""
        slot, token, backend = row
        permit = Permit(self, self._name, token, (session, slot))
        permit.since = since
        session.held(self._id)[slot] = permit
        session.check_backend(backend)
        return permit

    def _params(self, held: Any, since: float) -> dict[str, Any]:
        """The parameters of one acquire statement (``held``: the slots to skip)."""
        return {
            "start": random.randrange(self._limit),
            "held": "{" + ",".join(map(str, held)) + "}",  # an int4[] literal: cheaper to send
            "since": since,
        }

    def release(self, permit: Permit) -> None:
        """Give a permit back. A foreign permit or a second release raises
        :class:`~safepool.LeaseError`; a lost or inherited permit is a quiet no-op.

        The unlock is sent without waiting for its reply (the session's next statement reads
        it): this process's later calls see the permit free, other processes as soon as
        PostgreSQL has run it. A permit held with :meth:`acquire_on` is released on its
        connection, waiting for the reply.

        Never raises because PostgreSQL is unreachable: the permit then ends with the budget
        session (or is given back by the next use of the session).
        """
        if not check_permit(self, permit, self._name):
            return
        state = permit._engine_state
        if isinstance(state, _OnConnection):
            self._release_on(permit, state)
            return
        session, slot = state
        session.release(self._id, slot, permit)

    def lease(self, timeout: float | None = None) -> PermitLease:
        """``with budget.lease() as permit:`` -- released however the block exits."""
        return PermitLease(self, timeout)

    def stats(self) -> BudgetStats:
        def read(conn: Any) -> tuple[int, int]:
            in_use, acquired = conn.execute(self._stats_sql, {"key": self._key}).fetchone()
            return int(in_use), int(acquired)

        in_use, acquired = self._session().call("stats", read)
        c = self._counters
        return BudgetStats(self._name, self._limit, in_use, c.waiting, acquired, c.timeouts,
                           c.reclaimed)  # fmt: skip

    def holders(self) -> list[PermitHolder]:
        """Every permit held now, in every process and on every host (oldest token first)."""

        def read(conn: Any) -> list[PermitHolder]:
            rows = conn.execute(self._holders_sql, {"key": self._key, "id": self._id}).fetchall()
            return [PermitHolder(pid, since, token, host) for pid, since, token, host in rows]

        return self._session().call("holders", read)

    # -- holding a permit on a connection of your own ---------------------------------------

    def acquire_on(self, conn: Any, timeout: float | None = None) -> Permit:
        """A permit held on ``conn``, a psycopg connection of your own to the same database.

        The permit then lives and dies with that connection: closing it, or the server ending
        its session, gives the permit back; no budget session is used. ``conn`` must not be
        inside a transaction. Waiting polls (up to ``poll_interval`` apart): there is no
        LISTEN on a connection that is not the budget's. Release it with :meth:`release`
        before you hand ``conn`` to anyone else.
        """
        deadline = deadline_of(timeout)
        psycopg = driver()
        if not isinstance(conn, psycopg.Connection):
            raise TypeError(f"acquire_on() takes a psycopg Connection, got {type(conn).__name__}")
        pause = 0.002
        while True:
            permit = self._try_on(conn, psycopg)
            if permit is not None:
                self._counters.add("acquired")
                return permit
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._counters.add("timeouts")
                raise timeout_error(self._name, self._limit, timeout)
            time.sleep(min(pause, remaining))
            pause = min(pause * 2, self._poll_interval)

    def _try_on(self, conn: Any, psycopg: Any) -> Permit | None:
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            raise LeaseError(
                f"budget {self._name!r}: acquire_on() needs a connection outside any "
                "transaction (commit or roll back first)"
            )
        held = _held_on(conn)
        since = time.time()
        try:
            row = conn.execute(self._acquire_sql, self._params(sorted(held), since)).fetchone()
            if not conn.autocommit:
                conn.commit()
        except psycopg.Error as exc:
            raise BudgetUnavailable(
                f"budget {self._name!r}: acquire_on() failed on the given connection: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if row is None:
            return None
        slot, token, _ = row
        permit = _ConnectionPermit(self, self._name, token, _OnConnection(conn, slot))
        permit.since = since
        held.add(slot)
        return permit

    def _release_on(self, permit: Permit, state: _OnConnection) -> None:
        permit._mark_released()
        _held_on(state.conn).discard(state.slot)
        conn = state.conn
        if conn.closed or conn.broken:
            return  # the session ended, and the lock with it
        try:
            conn.execute(self._release_sql, {"slot": state.slot})
            if not conn.autocommit:
                conn.commit()
        except driver().Error as exc:
            logger.warning(
                "budget %r: releasing permit %s on its connection failed: %s (it ends with "
                "that connection's session)",
                self._name,
                permit.token,
                exc,
            )

    # -- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        """Stop using the budget in this process. When no other budget object of this process
        shares its budget session, the session is closed: permits still held through it are
        given back and marked lost."""
        for session in list(self._session_users):
            self._session_users.discard(session)
            session.users -= 1
            if session.users <= 0:
                session.close(f"budget {self._name!r} was closed")
                _pgsession.forget(session)

    def __enter__(self) -> PostgresBudget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def unlink(self) -> None:
        """Remove the budget from the database (its row, sequence and holder rows).

        For tests and decommissioning: processes still using it fail on their next acquire.
        """

        def drop(conn: Any) -> None:
            sql = driver().sql
            with conn.transaction():
                conn.execute(
                    sql.SQL("DELETE FROM {} WHERE id = %s").format(
                        sql.Identifier(self._schema, "safepool_budget")
                    ),
                    (self._id,),
                )
                conn.execute(
                    sql.SQL("DELETE FROM {} WHERE budget = %s").format(
                        sql.Identifier(self._schema, "safepool_budget_permit")
                    ),
                    (self._id,),
                )
                conn.execute(
                    sql.SQL("DROP SEQUENCE IF EXISTS {}").format(self._sequence_id(self._id))
                )

        self._session().call("unlink", drop)

    def __repr__(self) -> str:
        where = _pgsession.describe(self._conninfo)
        return f"<PostgresBudget {self._name!r} limit={self._limit} at {where}>"

    def __reduce__(self) -> Any:
        """Pickle the recipe (for spawn children); the receiver opens its own session."""
        return (_restore, (self._conninfo_arg, self._name, self._limit, self._options))

    def _after_fork_in_child(self) -> None:
        self._counters = Counters()
        self._contended_until = 0.0  # see acquire()
        self._session_users = weakref.WeakSet()
        if self._id:
            self._build_sql()  # this process's pid


def _restore(conninfo: str, name: str, limit: int, options: dict[str, Any]) -> PostgresBudget:
    return PostgresBudget(conninfo, name, limit, **options)


_held_slots: weakref.WeakKeyDictionary[Any, set[int]] = weakref.WeakKeyDictionary()


def _held_on(conn: Any) -> set[int]:
    """The slots held on a caller's connection (advisory locks are re-entrant per session)."""
    return _held_slots.setdefault(conn, set())


def _keepalives(conninfo: str) -> dict[str, str]:
    given = driver().conninfo.conninfo_to_dict(conninfo)
    return {k: v for k, v in KEEPALIVES.items() if k not in given}
