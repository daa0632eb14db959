"""RedisBudget: one limit shared by every process on every host, held in Redis.

A permit is an entry in a sorted set with an expiry (``ttl``), renewed by a heartbeat thread of
the holder's process; acquire, renew and release are atomic Lua scripts (see
:mod:`safepool._redisscripts`), fencing tokens come from ``INCR``, and waiters queue in Redis
and block in ``BLPOP``: a release hands its permit straight to the oldest waiter and wakes it
(first come, first served; no busy polling). A waiter pipelines its ``BLPOP`` with its next
acquire call, so a wake-up and the claim of the permit are one round trip.

The guarantee is weaker than :class:`~safepool.PostgresBudget`'s, and the documentation says so:

* A holder that dies keeps its permit until ``ttl`` runs out (nothing in Redis notices a dead
  client).
* A holder that cannot renew for ``ttl`` (paused by SIGSTOP or a debugger, a garbage-collection
  pause, a network partition) loses its permit, and another process may get it. The holder
  learns it: ``permit.valid`` is false from the moment its local deadline passes (before any
  renewal could fail), and ``on_lost`` runs when the heartbeat sees it.
* If Redis loses data (a restart without persistence), the budget refuses grants for one
  ``ttl``, so every old holder has seen its permit expire first. A failover to a replica that
  missed the last writes can hand a permit out twice, and can repeat fencing tokens; that is
  the nature of Redis replication (``WAIT`` would narrow it, not close it).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import operator
import os
import threading
import time
from typing import Any, NamedTuple

from . import _fork, _redisscripts
from ._config import check_duration, redact
from ._netbudget import (
    HOST,
    check_on_lost,
    deadline_of,
    fire_lost,
    import_driver,
    timeout_error,
)
from ._signals import start_daemon
from ._waiting import Flag
from .budget import (
    BudgetStats,
    Permit,
    PermitHolder,
    PermitLease,
    check_budget_limit,
    check_budget_name,
    check_permit,
)
from .errors import BudgetUnavailable

__all__ = ["RedisBudget"]

logger = logging.getLogger("safepool.budget")

DRIFT = 0.99  # a permit's local deadline: 99% of ttl after the request was sent
_SHAS: dict[str, str] = {}  # script name -> its SHA1 (for EVALSHA)


class _ExpiringPermit(Permit):
    """A Redis permit: valid only until its local deadline, which each renewal moves on."""

    __slots__ = ("_deadline",)

    def __init__(self, owner: object, budget: str, token: int, key: str, deadline: float) -> None:
        super().__init__(owner, budget, token, key)
        self._deadline = deadline  # time.monotonic(); written under the budget's _lock

    @property
    def valid(self) -> bool:
        return super().valid and time.monotonic() < self._deadline

    @property
    def lost_reason(self) -> str | None:
        if self._lost is None and not self._released and time.monotonic() >= self._deadline:
            return "not renewed within ttl: Redis may have given it to another process"
        return self._lost


class _Tried(NamedTuple):
    """An acquire attempt that found no permit (and queued its waiter)."""

    sent: float  # time.monotonic() when it was sent
    ran: float  # time.time() when it ran, as this process guesses (half-way to the reply)
    clock: int  # the Redis clock (µs) when it ran


_MAKE_CONNECTION = operator.methodcaller("make_connection")


class _Process:
    """A budget's state in one process (a forked child starts a new one)."""

    def __init__(self) -> None:
        # lock guards held, orphans and beat; taken alone (no I/O or callback under it).
        self.lock = threading.Lock()
        self.held: dict[str, _ExpiringPermit] = {}  # member -> permit, held by this process
        self.orphans: set[tuple[str, str]] = set()  # (script, argument): see _orphan()
        self.beat: threading.Thread | None = None  # the heartbeat (it ends when idle)
        self.client: Any = None
        self.redis: Any = None  # the redis module, once imported
        self.idle: list[Any] = []  # connections not in use (list.pop and append are atomic)
        self.heads: dict[str, tuple[bytes, int]] = {}  # script -> its packed head, its length
        # Nonces and waiter ids: a random prefix of this process, then a counter (no uuid4 per
        # call; next() on a count is atomic).
        self.prefix = os.urandom(8).hex()
        self.ids = itertools.count()
        self.stop = Flag()


class RedisBudget:
    """A budget whose permits are expiring entries in Redis, renewed by a heartbeat.

    :param url: a redis-py URL (``redis://host:6379/0``, ``rediss://``, ``unix://``).
    :param name: the budget's name (see :func:`~safepool.budget.check_budget_name`).
    :param limit: most permits held at once, across every process and host.
    :param ttl: seconds a permit lives without renewal; the heartbeat renews every ``ttl / 3``.
        A dead holder's permit comes back after at most ``ttl``. All users of a budget must
        agree on it (it is stored with the budget, like ``limit``).
    :param on_lost: ``on_lost(permit)`` runs (in the heartbeat thread) when this process loses
        a permit it held.
    :param socket_timeout: seconds any one Redis command may take; a waiter blocks in chunks of
        half this.
    :param connect_timeout: seconds to wait for a connection.
    :param prefix: the first part of the budget's keys (``<prefix>:{<name>}:...``).

    Counters in :meth:`stats` are the budget's, across every process (kept in Redis).
    """

    def __init__(
        self,
        url: str,
        name: str,
        limit: int,
        *,
        ttl: float = 10.0,
        on_lost: Any = None,
        socket_timeout: float = 5.0,
        connect_timeout: float = 5.0,
        prefix: str = "safepool",
    ) -> None:
        self._name = check_budget_name(name)
        self._limit = check_budget_limit(limit)
        check_duration("ttl", ttl, allow_zero=False, allow_inf=False)
        if ttl < 0.1:
            raise ValueError(f"ttl must be >= 0.1 seconds, got {ttl!r}")
        self._on_lost = check_on_lost(on_lost)
        check_duration("socket_timeout", socket_timeout, allow_zero=False, allow_inf=False)
        check_duration("connect_timeout", connect_timeout, allow_zero=False, allow_inf=False)
        if not isinstance(url, str):
            raise TypeError(f"url must be a str, got a {type(url).__name__} object")
        if not isinstance(prefix, str) or not prefix or "{" in prefix or "}" in prefix:
            raise ValueError(f"prefix must be a non-empty str without braces, got {prefix!r}")
        self._url = url
        self._ttl = float(ttl)
        self._ttl_ms = max(1, round(ttl * 1000))
        self._ttl_arg = str(self._ttl_ms)
        self._socket_timeout = socket_timeout
        self._connect_timeout = connect_timeout
        self._options = {
            "ttl": ttl,
            "on_lost": on_lost,
            "socket_timeout": socket_timeout,
            "connect_timeout": connect_timeout,
            "prefix": prefix,
        }
        self._base = f"{prefix}:{{{name}}}"  # every key of the budget starts with it
        self._holders_key = f"{self._base}:holders"

        self._where = redact(url)
        self._p = _Process()
        self._open()
        _fork.register(self)

    def _open(self) -> None:
        try:
            found = self._run("open", "OPEN", str(self._limit), str(self._ttl_ms))
        except BaseException:
            self.close()  # change nothing: no connection of ours is left to the collector
            raise
        if found != "ok":
            self.close()
            limit, ttl_ms = found
            raise ValueError(
                f"budget {self._name!r} exists in Redis with limit {limit} and ttl "
                f"{int(ttl_ms) / 1000:g}s, not limit {self._limit} and ttl {self._ttl:g}s: open "
                "it with the same limit and ttl, or unlink() it first"
            )

    # -- talking to Redis -------------------------------------------------------------------

    def _client(self) -> Any:
        p = self._p
        if p.client is None:
            redis = import_driver("redis", "redis", "RedisBudget")
            backoff = import_driver("redis.backoff", "redis", "RedisBudget")
            retry = import_driver("redis.retry", "redis", "RedisBudget")
            p.client = redis.Redis.from_url(
                self._url,
                socket_timeout=self._socket_timeout,
                socket_connect_timeout=self._connect_timeout,
                retry=retry.Retry(backoff.NoBackoff(), 0),  # scripts are not retried blindly
                decode_responses=True,
            )
        return p.client

    def _execute(self, *command: str) -> Any:
        """One command on a connection of the pool (see :meth:`_send`)."""
        return self._send(_bulk(command, b"*%d\r\n" % len(command)))

    def _send(self, packed: bytes, replies: int = 1) -> Any:
        """Packed commands (``replies`` of them) on an idle connection of this process; the
        last one's reply.

        A connection interrupted between sending a command and reading its reply (an exception
        from a signal handler) is closed before it is used again: the next caller would get the
        unread reply. The connection goes back to the idle list however the call ends (before,
        an interruption as it was taken left it to the garbage collector, and one landing in
        redis-py's finaliser then left its socket unclosed).
        """
        redis = self._p.redis or self._driver()
        held: list[Any] = []  # the connection in use, given back however this ends
        complete = False
        try:
            self._connection(redis, held)
            conn = held[0]
            conn.send_packed_command([packed], check_health=False)
            for _ in range(replies - 1):
                conn.read_response()
            try:
                reply = conn.read_response()
            except redis.ResponseError:
                complete = True  # an error reply is a whole reply
                raise
            complete = True
            return reply
        finally:
            for conn in held:
                try:
                    if not complete:
                        conn.disconnect()
                finally:
                    self._p.idle.append(conn)

    def _connection(self, redis: Any, into: list[Any]) -> None:
        """Put an idle connection into ``into``, checked as redis-py's pool checks one (without
        its lock and bookkeeping, which cost as much as the rest of a call): none has a reply
        pending. It is taken from the idle list and put into ``into`` in one step (map and
        extend run in C: no signal handler can run between), so an interruption never leaves
        a connection to the garbage collector."""
        try:
            into.extend(map(list.pop, (self._p.idle,)))
        except IndexError:
            into.extend(map(_MAKE_CONNECTION, (self._client().connection_pool,)))
            return  # it connects when first used
        conn = into[0]
        conn.connect()  # if it is not connected (it raises when Redis cannot be reached)
        try:
            if conn.can_read():
                raise redis.ConnectionError("the connection has unread data")
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            conn.disconnect()  # closed by the server, or dirty: a new one
            conn.connect()

    def _driver(self) -> Any:
        self._p.redis = import_driver("redis", "redis", "RedisBudget")
        return self._p.redis

    def _run(self, what: str, script: str, *args: str, before: bytes = b"") -> Any:
        """One script call (loading it if Redis lost it), sent after the packed command
        ``before`` (if any; its reply is dropped); failures become BudgetUnavailable."""
        redis = self._p.redis or self._driver()
        head, count = self._p.heads.get(script) or self._head(script)
        try:
            packed = _bulk(args, b"*%d\r\n%b" % (count + len(args), head))
            try:
                return self._send(before + packed, 2 if before else 1)
            except redis.exceptions.NoScriptError:
                self._execute("SCRIPT", "LOAD", getattr(_redisscripts, script))
                return self._send(packed)
        except redis.RedisError as exc:
            raise BudgetUnavailable(
                f"budget {self._name!r}: {what} failed at Redis {self._where}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def _head(self, script: str) -> tuple[bytes, int]:
        """``EVALSHA <sha> 1 <base>`` (for ACQUIRE, then this process's constant arguments),
        packed, and how many arguments that is: every call of ``script`` starts with it."""
        text = getattr(_redisscripts, script)
        sha = _SHAS.get(script) or _SHAS.setdefault(script, hashlib.sha1(text.encode()).hexdigest())
        parts = ["EVALSHA", sha, "1", self._base]
        if script == "ACQUIRE":
            parts += [str(self._limit), self._ttl_arg, str(os.getpid()), HOST]
        self._p.heads[script] = found = (_bulk(parts, b""), len(parts))
        return found

    # -- the protocol -----------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def ttl(self) -> float:
        return self._ttl

    def acquire(self, timeout: float | None = None) -> Permit:
        """A permit, waiting up to ``timeout`` seconds (None: no limit; 0: do not wait).

        Raises :class:`~safepool.BudgetTimeout` when none came free in time, and
        :class:`~safepool.BudgetUnavailable` when Redis cannot be reached.
        """
        deadline = deadline_of(timeout)
        # A caller that may wait queues in the same script call that finds no permit; then it
        # blocks for its wake-up and tries again in one round trip (BLPOP, then the script).
        waiter = "" if timeout == 0 else self._new_id()
        outcome = "interrupted"
        try:
            permit, again, last = self._attempt(waiter, deadline, None, 0.0)
            while True:  # not `while cond:` inside a try (see safepool._poolstate)
                if permit is not None:
                    outcome = "granted"
                    return permit
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    outcome = "timeout"
                    raise timeout_error(self._name, self._limit, timeout)
                # (a third of ttl at most: a permit granted after the wait is trusted from the
                # moment the wait began, see _attempt)
                wait = min(remaining, again, self._socket_timeout / 2, self._ttl / 3)
                permit, again, last = self._attempt(waiter, deadline, last, wait)
        finally:
            if waiter and outcome != "granted":
                self._give_up(waiter, outcome == "timeout")

    def _new_id(self) -> str:
        """A nonce or waiter id unique across processes and hosts."""
        p = self._p
        return f"{p.prefix}{next(p.ids):x}"

    def _attempt(
        self, waiter: str, deadline: float, before: _Tried | None, wait: float
    ) -> tuple[Permit | None, float, _Tried | None]:
        """One acquire script call, after a wait of up to ``wait`` seconds for the waiter's
        wake-up if ``before`` (the previous, failed attempt) is given.

        (the permit, 0, None), or (None, seconds worth waiting, this attempt).
        """
        nonce = self._new_id()
        sent = time.monotonic()
        remaining = deadline - sent - wait
        stay = max(0, min(remaining, self._socket_timeout)) * 1000 + 2000
        last = "1" if remaining <= 0 and not waiter else "0"
        since, base, queued, blpop = time.time(), "", "0", b""
        if before is not None:  # the script moves `since` on by the time Redis saw pass
            since, base, queued = before.ran, str(before.clock), "1"
            blpop = _bulk(("BLPOP", f"{self._base}:wake:{waiter}", f"{max(0.01, wait):.3f}"),
                          b"*3\r\n")  # fmt: skip
        reply: list[Any] | None = None
        try:
            reply = self._run(
                "acquire", "ACQUIRE", nonce, waiter, str(int(stay)), last, queued, f"{since:.6f}",
                base, before=blpop,
            )  # fmt: skip
            if reply[0] == 0:
                ran = time.time() - (time.monotonic() - sent) / 2
                return None, reply[1] / 1000, _Tried(sent, ran, reply[2])
            if reply[0] == -1:
                raise ValueError(
                    f"budget {self._name!r} was recreated in Redis with limit {reply[1]} and "
                    f"ttl {int(reply[2]) / 1000:g}s; this object has limit {self._limit}"
                )
            return self._granted(reply, sent, before), 0.0, None
        except BaseException:
            # It may have been granted (the reply unread, or read and not yet recorded with its
            # heartbeat): forget it here, and give it back in Redis.
            if reply is not None and reply[0] not in (0, -1):
                self._unrecord(reply[2])
            self._orphan(("FORGET", nonce))
            raise

    def _granted(self, reply: list[Any], sent: float, before: _Tried | None) -> Permit:
        """The permit of a granting ACQUIRE reply, trusted until its ttl could have run out:
        Redis granted it after this call was sent, and ``reply[3]`` µs (Redis clock) after it
        ran the previous attempt, which was after that attempt was sent."""
        key = reply[2]  # the member: "<token> <nonce> <pid> <since> <host>"
        granted = sent if before is None else max(sent, before.sent + reply[3] / 1e6)
        permit = _ExpiringPermit(self, self._name, int(reply[1]), key, granted + self._ttl * DRIFT)
        permit.since = float(key.split(" ", 4)[3])
        with self._p.lock:
            self._p.held[key] = permit
            self._beat_locked()
        return permit

    def _unrecord(self, key: str) -> None:
        """Forget the permit of member ``key`` if it was recorded (an acquire cut short)."""
        with self._p.lock:
            permit = self._p.held.pop(key, None)
        if permit is not None:
            permit._mark_released()

    def _give_up(self, waiter: str, timed_out: bool) -> None:
        try:
            self._run("giving up", "GIVE_UP", waiter, "1" if timed_out else "0", self._ttl_arg)
        except Exception as exc:  # the waiter entry expires by itself
            logger.debug("budget %r: deregistering a waiter failed: %s", self._name, exc)

    def release(self, permit: Permit) -> None:
        """Give a permit back. A foreign permit or a second release raises
        :class:`~safepool.LeaseError`; a lost or inherited permit is a quiet no-op.

        Never raises because Redis is unreachable: the heartbeat retries, and the entry expires
        after ``ttl`` anyway.
        """
        if not check_permit(self, permit, self._name):
            return
        key = permit._engine_state
        with self._p.lock:
            if self._p.held.get(key) is not permit:
                permit._mark_released()
                return  # lost meanwhile
            del self._p.held[key]
            permit._mark_released()
        try:
            self._run("release", "RELEASE", key, self._ttl_arg)
        except BudgetUnavailable as exc:
            logger.warning(
                "budget %r: releasing permit %s: %s (retrying in the background; it expires "
                "within ttl anyway)",
                self._name,
                permit.token,
                exc,
            )
            self._orphan(("RELEASE", key))
        except BaseException:
            self._orphan(("RELEASE", key))
            raise

    def lease(self, timeout: float | None = None) -> PermitLease:
        """``with budget.lease() as permit:`` -- released however the block exits."""
        return PermitLease(self, timeout)

    def stats(self) -> BudgetStats:
        in_use, waiting, acquired, timeouts, reclaimed = self._run("stats", "STATS")
        return BudgetStats(self._name, self._limit, in_use, waiting, acquired, timeouts,
                           reclaimed)  # fmt: skip

    def holders(self) -> list[PermitHolder]:
        """Every permit held now (not expired), in every process and on every host."""
        found = []
        for member in self._run("holders", "HOLDERS"):
            if member.startswith("+"):
                continue  # a permit on its way to a waiter
            token, _, pid, since, host = member.split(" ", 4)
            found.append(PermitHolder(int(pid), float(since), int(token), host))
        return sorted(found, key=lambda h: h.token)

    def unlink(self) -> None:
        """Delete the budget's keys. For tests and decommissioning: holders lose their permits
        at the next renewal, and the next acquire recreates the budget (after one ``ttl``)."""
        try:
            parts = ("meta", "holders", "token", "waiters", "queue")
            self._execute("DEL", *(f"{self._base}:{part}" for part in parts))
        except import_driver("redis", "redis", "RedisBudget").RedisError as exc:
            raise BudgetUnavailable(f"budget {self._name!r}: unlink failed: {exc}") from exc

    # -- the heartbeat ----------------------------------------------------------------------

    def _orphan(self, key: tuple[str, str]) -> None:
        """Give back, in the background, what may be held in Redis without a permit here:
        ("RELEASE", member) or ("FORGET", nonce) of an interrupted acquire."""
        with self._p.lock:
            self._p.orphans.add(key)
            self._beat_locked()

    def _beat_locked(self) -> None:
        """Under the lock: make sure a heartbeat thread runs. (A start cut short by a signal
        handler may leave a thread that never ran: it is not alive, and the next call starts
        another.)"""
        p = self._p
        if p.beat is not None and p.beat.is_alive():
            return
        # (start_daemon: on_lost callbacks are the user's code, run with this thread's mask.)
        p.beat = start_daemon(self._heartbeat, p, name="safepool-redisbudget-beat")

    def _heartbeat(self, p: _Process) -> None:
        pause = self._ttl / 3
        while not p.stop.wait(pause):
            with p.lock:
                if not p.held and not p.orphans:
                    if p.beat is threading.current_thread():
                        p.beat = None
                    return
                keys, orphans = list(p.held), list(p.orphans)
            ok = self._renew(p, keys) and self._clean(p, orphans)
            pause = self._ttl / 3 if ok else min(self._ttl / 10, 0.5)

    def _renew(self, p: _Process, keys: list[str]) -> bool:
        sent = time.monotonic()
        try:
            reply = self._run("renewing", "RENEW", str(self._ttl_ms), *keys) if keys else []
        except Exception as exc:
            logger.warning("budget %r: renewing permits failed: %s", self._name, exc)
            reply = None
        gone = set(reply) if reply is not None else set()
        lost = []
        with p.lock:
            now = time.monotonic()
            for key in keys:
                permit = p.held.get(key)
                if permit is None:
                    continue
                if key in gone:
                    reason = "Redis no longer holds it: it expired and may be another's"
                elif reply is not None:
                    permit._deadline = sent + self._ttl * DRIFT
                    continue
                elif now < permit._deadline:
                    continue
                else:
                    reason = "not renewed within ttl: Redis could not be reached"
                    p.orphans.add(("RELEASE", key))
                del p.held[key]
                lost.append((permit, permit._mark_lost(reason)))
        fire_lost(self._name, lost, self._on_lost)
        return reply is not None

    def _clean(self, p: _Process, orphans: list[tuple[str, str]]) -> bool:
        for orphan in orphans:
            try:
                self._run("cleaning up", *orphan, self._ttl_arg)
            except Exception:
                return False
            with p.lock:
                p.orphans.discard(orphan)
        return True

    # -- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        """Stop using the budget in this process: permits still held through this object are
        given back (and marked lost: ``on_lost`` runs for each), its heartbeat stops and its
        connections close. A later call connects again. Cut short, a permit it had not yet
        given back expires after ``ttl`` (nothing renews it any more)."""
        p = self._p
        p.stop.set()  # the heartbeat ends at its next wake-up
        with p.lock:
            held = list(p.held.items())
            p.held.clear()
        lost = []
        for key, permit in held:
            lost.append((permit, permit._mark_lost("the budget object was closed")))
            with contextlib.suppress(BudgetUnavailable):  # it expires within ttl anyway
                self._run("release", "RELEASE", key, self._ttl_arg)
        self._p = _Process()
        for conn in p.idle:
            conn.disconnect()
        if p.client is not None:
            p.client.close()
        fire_lost(self._name, lost, self._on_lost)

    def __enter__(self) -> RedisBudget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<RedisBudget {self._name!r} limit={self._limit} ttl={self._ttl:g}s>"

    def __reduce__(self) -> Any:
        """Pickle the recipe (for spawn children); the receiver connects on its own."""
        return (_restore, (self._url, self._name, self._limit, self._options))

    def _after_fork_in_child(self) -> None:
        _fork.abandon(self._p.client)  # the parent's sockets: never used, never closed
        self._p = _Process()


def _bulk(args: Any, start: bytes) -> bytes:
    """``start`` followed by ``args`` as RESP bulk strings (what redis-py's packer sends)."""
    parts = [start]
    for arg in args:
        data = arg.encode()
        parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(parts)


def _restore(url: str, name: str, limit: int, options: dict[str, Any]) -> RedisBudget:
    return RedisBudget(url, name, limit, **options)
