"""The PostgreSQL session behind :class:`~safepool.PostgresBudget`: one connection per process.

Every ``PostgresBudget`` of one process that names the same connection string shares one
:class:`Session`: one PostgreSQL connection (its *budget session*), one lock, and one watcher
thread. A permit is a session-level advisory lock held by that session, so PostgreSQL itself
gives every permit of a process back the moment the session ends: the process died, the network
dropped, or someone ran ``pg_terminate_backend``. The watcher notices the session ending (the
socket's hang-up) and marks this process's permits lost; it also reads the LISTEN/NOTIFY
wake-ups while threads of this process wait.

Advisory locks are re-entrant within a session, so two threads of one process must never both
lock the same slot: the acquire statement skips the slots this process already holds, and any
statement whose outcome is unknown (it failed or was interrupted after PostgreSQL may have taken
a lock) marks the budget *dirty*; the next use of the session reconciles it with ``pg_locks``
before anything else, giving back any lock this process holds without a permit for it.

Fork: a child starts with no sessions (``_after_fork_in_child``); the parent's connection is
abandoned there, never used or closed as a connection, but the child's copy of its socket is
closed at once (a child that kept it would keep a dead parent's session, and its permits, alive).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import select
import socket
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from . import _fork
from ._config import redact
from ._netbudget import OnLost, fire_lost, import_driver
from ._pgsql import PREPARE_RELEASE_SQL, RELEASE_STATEMENT, channel
from ._signals import start_daemon
from ._waiting import Beacon
from .budget import Permit
from .errors import BudgetUnavailable

if TYPE_CHECKING:  # pragma: no cover
    import psycopg

__all__ = ["Session", "session_for"]

logger = logging.getLogger("safepool.budget")

T = TypeVar("T")
Lost = list[tuple[Permit, list[OnLost]]]

_HANGUP = getattr(select, "POLLRDHUP", 0) | select.POLLHUP | select.POLLERR

#: the two-key advisory lock class of a budget is KEY_BASE + its id ("5AFE" in hex)
KEY_BASE = 0x5AFE0000

#: sessions per budget that LISTEN while they wait (the rest poll): a release wakes them all.
#: _pgsql.RELEASE_SQL checks listener slots 1 and 2: change both together.
LISTENERS = 2
LISTENER_SQL = (
    "SELECT i FROM generate_series(1, %(n)s) AS i "
    "WHERE pg_try_advisory_lock(%(key)s::int4, i) LIMIT 1"
)
UNLISTENER_SQL = "SELECT pg_advisory_unlock(%(key)s::int4, %(slot)s::int4)"

RECONCILE_SQL = """
SELECT l.objid::int4, pg_advisory_unlock(%(key)s::int4, l.objid::int4)
FROM pg_locks l
WHERE l.locktype = 'advisory' AND l.pid = pg_backend_pid() AND l.objsubid = 2
  AND l.classid = %(key)s::int4::oid AND l.granted
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND NOT (l.objid::int4 = ANY(%(held)s::int4[]))
"""


def driver() -> Any:
    return import_driver("psycopg", "postgres", "PostgresBudget")


def describe(conninfo: str) -> str:
    """host:port/dbname of a connection string, without credentials."""
    try:
        params = driver().conninfo.conninfo_to_dict(conninfo)
    except Exception:
        return redact(conninfo)
    host = params.get("host") or params.get("hostaddr") or "localhost"
    return f"{host}:{params.get('port') or 5432}/{params.get('dbname') or '?'}"


class Session:
    """This process's connection for the budgets of one connection string."""

    # _lock guards _conn, _backend, _held, _dirty, _unread, _listening, _waiters and users; it
    # is held across the statements run on _conn (one at a time). Invariants while it is free:
    #   * every slot in _held[b] is locked exactly once by _conn's backend, for that permit;
    #   * a budget b not in _dirty has no other lock of its class held by _conn's backend, once
    #     the release in flight (_unread == b: sent, its reply not read yet) has run;
    #   * _listening == set(_listener): budgets this session LISTENs for, holding a listener
    #     slot; only while some thread of this process waits for that budget.
    # Lock order: _lock, then _wake's (a Beacon: interrupt-safe). Callbacks, waits and
    # connecting-free work run with neither held.
    def __init__(self, conninfo: str, connect_timeout: float, socket_timeout: float) -> None:
        self.conninfo = conninfo
        self.where = describe(conninfo)
        self.connect_timeout = connect_timeout
        self.socket_timeout = socket_timeout
        self._busy_since: float | None = None  # when the statement running now began
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None
        self._backend = 0  # pg_backend_pid() of the server process behind _conn
        self._held: dict[int, dict[int, Permit]] = {}
        self._dirty: set[int] = set()
        self._listening: set[int] = set()
        self._listener: dict[int, int] = {}  # budget id -> the listener slot this session holds
        self._waiters: dict[int, int] = {}
        # The budget id of the release sent last whose reply is not read yet, or None. Set
        # before the release is sent, cleared once its reply is read: while it is set, _conn may
        # have that one statement in flight and nothing else (see release and _settle).
        self._unread: int | None = None
        self.users = 0  # open PostgresBudget objects using this session
        self._wake = Beacon()  # bumped whenever waiters should look again
        self._pipe_r, self._pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # The watcher's wake-up pipe lives as long as the session object: closed when nothing
        # (no budget, no watcher thread) can use it any more, so its numbers are never reused
        # under a thread that still writes to or polls them. Not at interpreter exit: the
        # watcher (a daemon thread, which holds the session) may still be polling them then.
        self._pipe_closer = weakref.finalize(self, _close_pipe, self._pipe_r, self._pipe_w)
        self._pipe_closer.atexit = False

    # -- running statements -----------------------------------------------------------------

    def call(self, what: str, fn: Callable[[Any], T], *, dirty: int | None = None) -> T:
        """Run ``fn(conn)`` on the session, connecting first if need be.

        A failure that leaves the connection unusable drops it (every permit of this process
        on it is lost) and raises :class:`BudgetUnavailable`; any other failure marks the budget
        ``dirty`` (when given) so the next use reconciles it. Never hangs beyond the connect
        timeout and the statement itself.
        """
        lost: Lost = []
        try:
            with self._lock:
                try:
                    conn = self._connected()
                    self._busy_since = time.monotonic()
                    if self._unread is not None:
                        self._settle(conn)
                    if self._dirty:
                        self._reconcile(conn)
                    return fn(conn)
                except BaseException as exc:
                    lost = self._failed(exc, dirty)
                    psycopg = driver()
                    if isinstance(exc, psycopg.Error):
                        raise BudgetUnavailable(
                            f"budget session to PostgreSQL at {self.where}: {what} failed: "
                            f"{type(exc).__name__}: {redact(str(exc)).strip()}"
                        ) from exc
                    raise
                finally:
                    self._busy_since = None
        finally:
            if lost:
                fire(lost)

    def _connected(self) -> Any:
        if self._conn is not None:
            return self._conn
        psycopg = driver()
        try:
            timeout = max(2, math.ceil(self.connect_timeout))  # libpq's minimum is 2 s
            conn = psycopg.connect(self.conninfo, autocommit=True, connect_timeout=timeout)
        except psycopg.Error as exc:
            raise BudgetUnavailable(
                f"cannot reach PostgreSQL at {self.where} for the budget session: "
                f"{type(exc).__name__}: {redact(str(exc)).strip()}"
            ) from exc
        try:
            conn.add_notify_handler(self._notified)
            self._backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            conn.execute(PREPARE_RELEASE_SQL)
        except BaseException:
            conn.close()
            raise
        if conn.info.backend_pid != self._backend:
            logger.warning(
                "budget session to %s goes through a connection pooler (PgBouncer?): budgets "
                "need session pooling; transaction pooling breaks session advisory locks",
                self.where,
            )
        self._conn = conn
        try:  # (start_daemon: the on_lost callbacks it may run get this thread's signal mask)
            start_daemon(self._watch, conn, name="safepool-pgbudget-watch")
        except BaseException:  # cut short: no watcher, or one that ends as the session does
            self._conn = None
            conn.close()
            raise
        return conn

    def check_backend(self, backend: int) -> None:
        """Under the lock: a statement ran on a server process other than the session's."""
        if backend != self._backend:
            raise BudgetUnavailable(
                f"budget session to {self.where}: the statement ran in server process {backend}, "
                f"not {self._backend}: the connection goes through a pooler in transaction or "
                "statement mode (PgBouncer?), which breaks session advisory locks; connect the "
                "budget directly to PostgreSQL or through a session-mode pool"
            )

    def _failed(self, exc: BaseException, dirty: int | None) -> Lost:
        """Under the lock, after ``exc`` interrupted a use of the session."""
        conn = self._conn
        if conn is None:
            return []
        if conn.closed or conn.broken or isinstance(exc, BudgetUnavailable):
            return self.drop(f"the budget session ended ({type(exc).__name__}: {exc})")
        if (
            conn.pgconn.transaction_status != driver().pq.TransactionStatus.IDLE
            and self._unread is None
        ):
            # Interrupted mid-statement by something psycopg does not cancel (an exception from
            # a signal handler): the reply is still due, so the session cannot be trusted. (A
            # release's reply still due is known, and read by the next use: see release.)
            return self.drop(
                f"a statement of the budget session was interrupted ({type(exc).__name__}), "
                "leaving the session in an unknown state; it was closed"
            )
        if dirty is not None:
            self._dirty.add(dirty)
            self._poke()
        return []

    def drop(self, reason: str) -> Lost:
        """Under the lock: close the connection; every permit of this process on it is lost."""
        conn, self._conn = self._conn, None
        self._unread = None
        if conn is not None:
            with contextlib.suppress(Exception):  # closing a broken connection
                conn.close()
        lost: Lost = []
        for slots in self._held.values():
            lost += [(p, p._mark_lost(reason)) for p in slots.values()]
        self._held.clear()
        self._dirty.clear()
        self._listening.clear()  # the LISTEN and the listener slot ended with the session
        self._listener.clear()
        self._poke()
        self.bump()
        return lost

    def _reconcile(self, conn: Any) -> None:
        """Under the lock: give back every lock of a dirty budget that no permit holds."""
        for budget_id in sorted(self._dirty):
            held = list(self._held.get(budget_id, {}))
            params = {"key": KEY_BASE + budget_id, "held": held}
            for _ in range(8):  # a lock taken twice needs two unlocks; one is the norm
                freed = conn.execute(RECONCILE_SQL, params).fetchall()
                if not freed:
                    break
                conn.execute("SELECT pg_notify(%s, '')", (channel(budget_id),))
                logger.info(
                    "budget session to %s: gave back %d advisory lock(s) of budget id %d left "
                    "by an interrupted statement",
                    self.where,
                    len(freed),
                    budget_id,
                )
            self._dirty.discard(budget_id)

    # -- permits ----------------------------------------------------------------------------

    def idle_for_blocking(self) -> bool:
        """Under the lock: nothing of this process lives on the session (no permit, listener
        slot, waiter or repair due), so one statement may wait in the server for a while
        without keeping another thread of the process from releasing what it holds."""
        return not (any(self._held.values()) or self._listening or self._waiters or self._dirty)

    def held(self, budget_id: int) -> dict[int, Permit]:
        """Under the lock: the slots of ``budget_id`` this process holds."""
        return self._held.setdefault(budget_id, {})

    def release(self, budget_id: int, slot: int, permit: Permit) -> None:
        """Give back one permit; never raises for the engine's failures (see PostgresBudget).

        The unlock (the session's prepared release) is sent, and its reply left for the next
        use of the session to read (_settle): a release costs no round trip of its own.
        PostgreSQL runs it before anything this process sends later, so this process's next
        statements see the slot free; other sessions see it within about one round trip.
        """

        def unlock(conn: Any) -> None:
            slots = self._held.get(budget_id, {})
            if slots.get(slot) is not permit:
                return  # lost with its session meanwhile: nothing is held any more
            del slots[slot]
            permit._mark_released()
            self._dirty.add(budget_id)  # until the unlock is on its way
            self._unread = budget_id  # (before sending: a reply may be due from here on)
            self._send(conn, budget_id, slot)
            self._dirty.discard(budget_id)
            if self._waiters.get(budget_id):
                self.bump()  # this process's own waiters look again (no NOTIFY reaches them)

        try:
            self.call("release", unlock, dirty=budget_id)
        except BudgetUnavailable as exc:
            logger.warning(
                "budget session to %s: releasing permit %s: %s (PostgreSQL frees it with the "
                "session, or the next use of the session gives it back)",
                self.where,
                permit.token,
                exc,
            )

    @staticmethod
    def _send(conn: Any, budget_id: int, slot: int) -> None:
        """Send the release of ``slot`` without waiting for its reply."""
        psycopg = driver()
        pgconn = conn.pgconn
        params = [b"%d" % (KEY_BASE + budget_id), b"%d" % slot, channel(budget_id).encode()]
        pgconn.send_query_prepared(RELEASE_STATEMENT, params)
        if pgconn.flush():  # (rare: the socket's buffer was full) the rest, once it drains
            psycopg.waiting.wait(psycopg.generators.send(pgconn), pgconn.socket)

    def _settle(self, conn: Any) -> None:
        """Under the lock: read the reply of the release sent last. Interrupted, the reply is
        read by the next use (libpq keeps what it had read). The budget counts as dirty until a
        reply says the unlock ran: when none comes (the release was interrupted before it was
        sent, or an interrupted read took the reply), _reconcile finds out from pg_locks."""
        psycopg = driver()
        budget_id = self._unread
        if budget_id is None:
            return
        self._dirty.add(budget_id)
        pgconn = conn.pgconn
        if pgconn.flush():  # the rest of a release whose sending was interrupted
            psycopg.waiting.wait(psycopg.generators.send(pgconn), pgconn.socket)
        results = psycopg.waiting.wait(psycopg.generators.fetch_many(pgconn), pgconn.socket)
        self._unread = None
        failed = [r for r in results if r.status != psycopg.pq.ExecStatus.TUPLES_OK]
        if failed:
            message = failed[0].error_message.decode(errors="replace").strip()
            logger.warning(
                "budget session to %s: a release failed: %s (its lock is given back now)",
                self.where,
                message,
            )
            return  # dirty: _reconcile gives the lock back
        if not results:
            return  # dirty: nothing was in flight, or what was is unknown
        if results[0].get_value(0, 0) != b"t":
            logger.warning("budget session to %s: a released slot was not locked", self.where)
        self._dirty.discard(budget_id)

    # -- waiting ----------------------------------------------------------------------------

    def start_waiting(self, budget_id: int) -> bool:
        """Count a waiter of this process; True if the session LISTENs for the budget (it is
        one of the budget's LISTENERS sessions), False if its waiters must poll."""

        def listen(conn: Any) -> bool:
            self._waiters[budget_id] = self._waiters.get(budget_id, 0) + 1
            return self._listen(conn, budget_id)

        return self.call("LISTEN", listen)

    def try_listen(self, budget_id: int) -> bool:
        """Become one of the budget's listening sessions, if a listener slot is free."""
        return self.call("LISTEN", lambda conn: self._listen(conn, budget_id))

    def _listen(self, conn: Any, budget_id: int) -> bool:
        """Under the lock. Every listening session wakes on every release, so only LISTENERS
        sessions per budget listen (each holds a listener slot: an advisory lock of the class
        ``-(KEY_BASE + id)``, freed with the session); the other waiters poll with back-off.
        An interruption here can leave a listener slot held until the session ends: the
        budget then has one listener fewer, never a permit less."""
        if budget_id in self._listening:
            return True
        row = conn.execute(LISTENER_SQL, {"key": -(KEY_BASE + budget_id), "n": LISTENERS})
        found = row.fetchone()
        if found is None:
            return False
        self._listener[budget_id] = found[0]
        conn.execute(f"LISTEN {channel(budget_id)}")
        self._listening.add(budget_id)
        self._poke()  # the watcher now reads notifications
        return True

    def stop_waiting(self, budget_id: int) -> None:
        def unlisten(conn: Any) -> None:
            count = self._waiters.get(budget_id, 0) - 1
            if count > 0:
                self._waiters[budget_id] = count
                return
            self._waiters.pop(budget_id, None)
            if budget_id in self._listening:
                conn.execute(f"UNLISTEN {channel(budget_id)}")
                self._listening.discard(budget_id)
                slot = self._listener.pop(budget_id)
                conn.execute(UNLISTENER_SQL, {"key": -(KEY_BASE + budget_id), "slot": slot})

        with contextlib.suppress(BudgetUnavailable):  # the session is gone, and its LISTEN
            self.call("UNLISTEN", unlisten)

    def sequence(self) -> int:
        return self._wake.sequence()

    def wait(self, seen: int, timeout: float) -> None:
        """Until a wake-up newer than ``seen`` (a NOTIFY, a lost session), or ``timeout``."""
        self._wake.wait(seen, timeout)

    def bump(self) -> None:
        self._wake.bump()

    def _notified(self, notify: Any) -> None:
        self.bump()

    # -- the watcher ------------------------------------------------------------------------

    def _poke(self) -> None:
        with contextlib.suppress(BlockingIOError):  # the watcher has wake-ups pending already
            os.write(self._pipe_w, b"!")

    def _watch(self, conn: Any) -> None:
        """Notice the session ending, read notifications, repair dirty budgets, and break a
        statement that outlives ``socket_timeout`` (one thread per connection; it ends with it).

        It reads the session's state without the lock (a stale value costs one tick), so a
        statement stuck in a hung server cannot stall it.
        """
        poller = select.poll()
        poller.register(self._pipe_r, select.POLLIN)
        sock = conn.pgconn.socket
        tick = max(0.05, self.socket_timeout / 2)
        while self._conn is conn:
            reading = bool(self._listening or self._dirty)
            poller.register(sock, _HANGUP | (select.POLLIN if reading else 0))
            poller.poll(1000 * (min(tick, 1.0) if self._dirty else tick))
            with contextlib.suppress(BlockingIOError):
                while True:  # not `while cond:` inside a with (see safepool._poolstate)
                    if not os.read(self._pipe_r, 512):
                        break
            busy = self._busy_since
            if busy is not None and time.monotonic() - busy > self.socket_timeout:
                self._abort(sock)
                continue
            if not self._lock.acquire(timeout=tick):
                continue
            try:
                lost = self._check(conn)
            finally:
                self._lock.release()
            fire(lost)

    def _abort(self, fd: int) -> None:
        """Shut the session's socket down: the statement waiting on it fails, and its thread
        drops the session (PostgreSQL frees the locks when it sees the connection go)."""
        logger.warning(
            "budget session to %s: a statement took longer than socket_timeout=%ss; closing "
            "the session (its permits are lost)",
            self.where,
            self.socket_timeout,
        )
        with contextlib.suppress(OSError), socket.socket(fileno=os.dup(fd)) as dup:
            dup.shutdown(socket.SHUT_RDWR)

    def _check(self, watched: Any) -> Lost:
        """Under the lock: read what the server sent while the session was idle."""
        conn: Any = watched  # (typed Any: the identity test below would narrow it)
        if self._conn is not watched:
            return []
        pgconn = conn.pgconn
        try:
            if self._unread is not None:  # read a release's reply only if it is here already
                pgconn.consume_input()
                if not pgconn.is_busy():
                    self._settle(conn)
            if self._dirty and self._unread is None:
                self._reconcile(conn)
            pgconn.consume_input()
            notified = False
            while True:  # not `while cond:` inside a try (see safepool._poolstate)
                if pgconn.notifies() is None:
                    break
                notified = True
            if pgconn.status != driver().pq.ConnStatus.OK:
                raise driver().OperationalError("the connection is not usable")
        except Exception as exc:
            if conn.closed or conn.broken or pgconn.status != driver().pq.ConnStatus.OK:
                return self.drop(f"the budget session ended: {type(exc).__name__}: {exc}")
            logger.warning("budget session to %s: watcher: %s", self.where, exc)
            return []
        if notified:
            self.bump()
        return []

    # -- closing ----------------------------------------------------------------------------

    def close_inherited(self) -> None:
        """In a forked child, on a session of the parent's (abandoned: never used here): close
        this process's copies of its socket and wake-up pipe, sending nothing. A child that kept
        the socket open would keep the session open on the server, and with it the permits of
        a parent that dies, for as long as the child lives. The lock may have been held by a
        parent thread at the fork: it is not taken (nothing else runs in the child yet)."""
        self._pipe_closer.detach()  # the numbers are closed here, once
        fds = [self._pipe_r, self._pipe_w]
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(Exception):  # a connection libpq has closed: no socket
                fds.append(conn.pgconn.socket)
        _close_pipe(*fds)

    def close(self, reason: str) -> None:
        with self._lock:
            lost = self.drop(reason)
        fire(lost)


def _close_pipe(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def fire(lost: Lost) -> None:
    """Run the callbacks of lost permits, grouped by the budget object that issued them."""
    for permit, listeners in lost:
        owner: Any = permit._owner
        owner._counters.add("reclaimed")
        fire_lost(owner.name, [(permit, listeners)], getattr(owner, "_on_lost", None))


class _Registry:
    """This process's sessions by connection string; emptied in a forked child."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # guards sessions; taken alone
        self.sessions: dict[tuple[str, float, float], Session] = {}
        _fork.register(self)

    def _after_fork_in_child(self) -> None:
        # The parent's connections: never used or closed as connections here (that would end
        # the parent's sessions), only this process's descriptors of them.
        _fork.abandon(self.sessions)
        for session in self.sessions.values():
            session.close_inherited()
        self.lock = threading.Lock()
        self.sessions = {}


_registry = _Registry()


def session_for(conninfo: str, connect_timeout: float, socket_timeout: float) -> Session:
    """This process's session for ``conninfo`` (made, not yet connected, on first use)."""
    key = (conninfo, connect_timeout, socket_timeout)
    session = _registry.sessions.get(key)
    if session is None:
        with _registry.lock:
            session = _registry.sessions.get(key)
            if session is None:
                session = Session(conninfo, connect_timeout, socket_timeout)
                _registry.sessions[key] = session
    return session


def forget(session: Session) -> None:
    """Remove an unused session from the registry (after closing it)."""
    with _registry.lock:
        key = (session.conninfo, session.connect_timeout, session.socket_timeout)
        if _registry.sessions.get(key) is session:
            del _registry.sessions[key]
