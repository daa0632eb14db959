"""HostBudget in one process: the API, tokens, stats, holders, names, bad input, unlink, close."""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import pathlib
import pickle
import sys
import threading
import uuid
from collections.abc import Iterator

import pytest

import hostbudget_targets as targets
from helpers import LONG, SHORT
from safepool import (
    Budget,
    BudgetTimeout,
    BudgetUnavailable,
    HostBudget,
    LeaseError,
    Permit,
    PoolTimeout,
    _hostipc,
)


def unique(prefix: str = "hb") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def name() -> Iterator[str]:
    n = unique()
    yield n
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f"/dev/shm/safepool-budget-{n}")


@pytest.fixture
def budget(name: str) -> Iterator[HostBudget]:
    b = HostBudget(name, 3)
    yield b
    b.close()


def snapshot(b: HostBudget) -> tuple[int, int, int, int, int]:
    s = b.stats()
    return s.in_use, s.waiting, s.acquired, s.timeouts, s.reclaimed


def test_implements_the_budget_protocol(budget: HostBudget, name: str) -> None:
    assert isinstance(budget, Budget)
    assert (budget.name, budget.limit) == (name, 3)
    assert repr(budget) == f"<HostBudget {name!r} limit=3 open>"


def test_acquire_release_and_stats(budget: HostBudget, name: str) -> None:
    permits = [budget.acquire() for _ in range(3)]
    assert all(p.valid and p.budget == name and p.pid == os.getpid() for p in permits)
    stats = budget.stats()
    assert (stats.name, stats.limit, stats.in_use, stats.acquired) == (name, 3, 3, 3)
    with pytest.raises(BudgetTimeout, match="no permit free"):
        budget.acquire(timeout=0)
    for p in permits:
        budget.release(p)
        assert not p.valid
    assert snapshot(budget) == (0, 0, 3, 1, 0)
    assert budget.stats().as_dict()["limit"] == 3


def test_tokens_strictly_increase_across_objects(name: str) -> None:
    a, b = HostBudget(name, 2), HostBudget(name, 2)
    seen = []
    for i in range(50):
        owner = (a, b)[i % 2]
        p = owner.acquire()
        seen.append(p.token)
        owner.release(p)
    assert seen == sorted(seen) and len(set(seen)) == len(seen)
    assert seen[0] >= 1
    a.close()
    b.close()


def test_holders_name_each_permit(budget: HostBudget) -> None:
    p1, p2 = budget.acquire(), budget.acquire()
    holders = budget.holders()
    assert [(h.pid, h.token) for h in holders] == [(os.getpid(), p1.token), (os.getpid(), p2.token)]
    assert holders[0].since == p1.since and holders[0].host is None
    budget.release(p1)
    assert [h.token for h in budget.holders()] == [p2.token]
    budget.release(p2)
    assert budget.holders() == []


def test_lease_releases_on_any_exit(budget: HostBudget) -> None:
    with budget.lease() as permit:
        assert budget.stats().in_use == 1
    assert not permit.valid and budget.stats().in_use == 0
    for exc in (ValueError("x"), KeyboardInterrupt(), SystemExit(3)):
        with pytest.raises(type(exc)), budget.lease(timeout=SHORT):
            raise exc
        assert budget.stats().in_use == 0


def test_budget_timeout_is_a_pool_timeout_and_a_timeout_error(budget: HostBudget) -> None:
    held = [budget.acquire() for _ in range(3)]
    with pytest.raises(PoolTimeout):
        budget.acquire(timeout=0.01)
    with pytest.raises(TimeoutError):
        budget.acquire(timeout=0)
    for p in held:
        budget.release(p)


def test_attaching_with_another_limit_is_refused(budget: HostBudget, name: str) -> None:
    with pytest.raises(ValueError, match="already exists on this host with limit 3, not 5"):
        HostBudget(name, 5)
    assert snapshot(budget) == (0, 0, 0, 0, 0)


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        ("", ValueError, "invalid budget name"),
        ("-x", ValueError, "invalid budget name"),
        ("a/b", ValueError, "invalid budget name"),
        ("x" * 65, ValueError, "invalid budget name"),
        (b"bytes", TypeError, "must be a str"),
        (None, TypeError, "must be a str"),
    ],
)
def test_bad_names_are_refused(bad: object, error: type[Exception], match: str) -> None:
    before = set(os.listdir("/dev/shm"))
    with pytest.raises(error, match=match):
        HostBudget(bad, 1)  # type: ignore[arg-type]
    assert set(os.listdir("/dev/shm")) - before == set()


@pytest.mark.parametrize(
    ("limit", "error", "match"),
    [(0, ValueError, ">= 1"), (-1, ValueError, ">= 1"), (True, TypeError, "must be an int"),
     (2.0, TypeError, "must be an int"), (2**21, ValueError, "<= 1048576")],
)  # fmt: skip
def test_bad_limits_are_refused(name: str, limit: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        HostBudget(name, limit)  # type: ignore[arg-type]
    assert not os.path.exists(f"/dev/shm/safepool-budget-{name}")


@pytest.mark.parametrize("mode", [0o400, 0o1777, -1, "0o600", True])
def test_bad_modes_are_refused(name: str, mode: object) -> None:
    with pytest.raises(ValueError, match="mode must"):
        HostBudget(name, 1, mode=mode)  # type: ignore[arg-type]
    assert not os.path.exists(f"/dev/shm/safepool-budget-{name}")


@pytest.mark.parametrize("timeout", [-1, float("nan"), "1", True])
def test_bad_timeouts_are_refused(budget: HostBudget, timeout: object) -> None:
    with pytest.raises((TypeError, ValueError), match="timeout"):
        budget.acquire(timeout=timeout)  # type: ignore[arg-type]
    assert snapshot(budget) == (0, 0, 0, 0, 0)


def test_created_with_exactly_the_mode(name: str) -> None:
    old = os.umask(0o077)
    try:
        b = HostBudget(name, 1, mode=0o660)
    finally:
        os.umask(old)
    assert os.stat(f"/dev/shm/safepool-budget-{name}").st_mode & 0o777 == 0o660
    b.close()


def test_bad_releases_raise_and_change_nothing(budget: HostBudget, name: str) -> None:
    other = HostBudget(unique(), 3)
    mine, theirs = budget.acquire(), other.acquire()
    before = (snapshot(budget), budget.holders())
    forged = Permit(budget, name, mine.token, mine._engine_state, pid=os.getpid())
    made_up = Permit(budget, name, 10**6, 0)
    out_of_range = Permit(budget, name, 10**6, 99)
    twin = HostBudget(name, 3)  # the same budget, another object
    cases = [
        ("not a permit", "takes a Permit", "token"),
        (theirs, "issued by budget", None),
        (forged, "not one this budget object holds", None),
        (made_up, "not one this budget object holds", None),
        (out_of_range, "not one this budget object holds", None),
    ]
    for permit, match, _ in cases:
        with pytest.raises(LeaseError, match=match):
            budget.release(permit)  # type: ignore[arg-type]
        assert (snapshot(budget), budget.holders()) == before
    with pytest.raises(LeaseError, match="issued by budget"):
        twin.release(mine)
    assert (snapshot(budget), budget.holders()) == before
    budget.release(mine)
    with pytest.raises(LeaseError, match="already released"):
        budget.release(mine)
    assert snapshot(budget)[0] == 0
    other.release(theirs)
    for b in (other, twin):
        b.unlink()
        b.close()


def test_a_permit_cannot_be_pickled_but_a_budget_reopens_by_name(budget: HostBudget) -> None:
    with budget.lease() as permit, pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(permit)
    copy = pickle.loads(pickle.dumps(budget))
    assert copy is not budget and (copy.name, copy.limit) == (budget.name, budget.limit)
    with copy.lease():
        assert budget.stats().in_use == 1
    copy.close()


def test_two_names_are_independent(name: str) -> None:
    other_name = unique()
    a, b = HostBudget(name, 1), HostBudget(other_name, 1)
    pa = a.acquire()
    pb = b.acquire(timeout=0)  # not blocked by a
    with pytest.raises(BudgetTimeout):
        a.acquire(timeout=0)
    assert (a.stats().in_use, b.stats().in_use) == (1, 1)
    assert pa.token == pb.token == 1  # token sequences are per budget
    a.release(pa)
    b.release(pb)
    b.unlink()
    a.close()
    b.close()


def test_unlink_while_in_use(name: str) -> None:
    """unlink() removes the name: every open object refuses acquire() (waiters included),
    permits still held release quietly, and the name then makes a fresh budget."""
    a, b = HostBudget(name, 1), HostBudget(name, 1)
    held = a.acquire()
    waiter_error: list[BaseException] = []

    def wait() -> None:
        try:
            b.acquire(timeout=LONG)
        except BaseException as exc:
            waiter_error.append(exc)

    t = threading.Thread(target=wait)
    t.start()
    from helpers import wait_until

    wait_until(lambda: a.stats().waiting == 1, what="the waiter queued")
    a.unlink()
    assert not os.path.exists(f"/dev/shm/safepool-budget-{name}")
    t.join(SHORT)
    assert not t.is_alive()
    assert isinstance(waiter_error[0], BudgetUnavailable)
    assert "unlinked" in str(waiter_error[0])
    with pytest.raises(BudgetUnavailable, match="unlinked"):
        b.acquire(timeout=0)
    a.release(held)  # quiet, nothing raised
    assert not held.valid
    fresh = HostBudget(name, 2)  # another limit is fine: it is a new budget
    assert fresh.stats().acquired == 0
    with fresh.lease():
        pass
    for x in (a, b, fresh):
        x.close()


def test_close_releases_what_the_object_holds(name: str, caplog: pytest.LogCaptureFixture) -> None:
    a, b = HostBudget(name, 2), HostBudget(name, 2)
    p1, _p2 = a.acquire(), a.acquire()
    a.close()
    a.close()  # idempotent
    assert "closed while holding 2 permit(s)" in caplog.text
    assert b.stats().in_use == 0
    a.release(p1)  # quiet: close() released it
    with pytest.raises(BudgetUnavailable, match="closed"):
        a.acquire()
    with pytest.raises(BudgetUnavailable, match="closed"):
        a.stats()
    assert repr(a).endswith("closed>")
    with HostBudget(name, 2) as c:
        c.acquire()
    assert b.stats().in_use == 0
    b.close()


def test_a_collected_budget_object_gives_back_what_it_held(name: str) -> None:
    keeper = HostBudget(name, 1)
    b = HostBudget(name, 1)
    b.acquire()  # the permit is dropped, then the object
    del b
    gc.collect()
    with keeper.lease(timeout=0):
        pass
    keeper.close()


def test_many_objects_in_one_process_each_register(name: str) -> None:
    objects = [HostBudget(name, 1) for _ in range(20)]
    permit = objects[0].acquire()
    for b in objects[1:]:
        with pytest.raises(BudgetTimeout):
            b.acquire(timeout=0)
    objects[0].release(permit)
    for b in objects:
        b.close()


def test_a_missing_kernel_mechanism_fails_at_construction(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_hostipc, "_libc", None)
    monkeypatch.setattr(_hostipc, "_platform_error", None)
    monkeypatch.setattr(sys, "platform", "darwin")
    with pytest.raises(BudgetUnavailable, match="Linux futexes, robust mutexes and OFD locks"):
        HostBudget(name, 1)
    monkeypatch.setattr(_hostipc, "_platform_error", None)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(_hostipc, "SHM_DIR", "/no/such/dir")
    with pytest.raises(BudgetUnavailable, match="POSIX shared memory"):
        HostBudget(name, 1)
    monkeypatch.setattr(_hostipc, "_platform_error", None)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
@pytest.mark.parametrize(("mode", "allowed"), [(0o600, False), (0o660, False), (0o666, True)])
def test_a_budget_of_another_user_needs_its_mode_to_allow_us(
    name: str, mode: int, allowed: bool
) -> None:
    ctx = multiprocessing.get_context("fork")
    reader, writer = ctx.Pipe()
    proc = ctx.Process(target=targets.try_open, args=(name, 1, 65534, mode, writer))
    proc.start()
    assert reader.poll(LONG)
    assert reader.recv() == ("ok", "")
    proc.join(LONG)
    if allowed:
        HostBudget(name, 1).close()
    else:
        with pytest.raises(PermissionError, match="belongs to uid 65534"):
            HostBudget(name, 1)


def test_a_registration_lives_exactly_as_long_as_its_descriptor(tmp_path: pathlib.Path) -> None:
    """Not as long as the mapping: mmap keeps a descriptor of its own, and a forked child keeps
    the mapping. Were the lock on that descriptor's open file description, a closed budget (or a
    dead parent with a live child) would still look alive, and what it held would never come
    back."""
    path = str(tmp_path / "segment")

    def lay_out(segment: _hostipc.Segment) -> None:
        segment.mm[0:8] = b"TESTSEG1"

    segment = _hostipc.Segment.open(
        path, mode=0o600, size=4096, magic=b"TESTSEG1", lay_out=lay_out, validate=lambda s: None
    )
    assert segment.lock_registration(3)
    mapping = segment.mm  # referenced on: the mapping outlives the descriptor
    go_r, go_w = os.pipe()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child: keeps the mapping, drops the descriptor
        segment.forget()
        os.write(ready_w, b"1")
        os.read(go_r, 1)
        os._exit(0 if mapping[0:8] == b"TESTSEG1" else 1)
    try:
        assert os.read(ready_r, 1) == b"1"
        assert _hostipc.has_live_registration(path, 8) is True  # ours, not the child's
        segment.close()
        assert _hostipc.has_live_registration(path, 8) is False  # the child maps it still
        assert mapping[0:8] == b"TESTSEG1"
    finally:
        os.write(go_w, b"1")
        _, status = os.waitpid(pid, 0)
        for fd in (go_r, go_w, ready_r, ready_w):
            os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
