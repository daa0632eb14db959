"""A hypothesis state machine drives the pool through random operations and checks invariants."""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from helpers import FakeClock
from safepool import LeaseError, PoolClosed, PoolTimeout, SafeConnectionPool


class Item:
    count = 0

    def __init__(self) -> None:
        Item.count += 1
        self.n = Item.count
        self.closed = False
        self.healthy = True

    def close(self) -> None:
        assert not self.closed, "closed twice"
        self.closed = True


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.max_size = 4
        self.pool: SafeConnectionPool[Item] = SafeConnectionPool(
            factory=Item,
            max_size=self.max_size,
            min_size=1,
            check=lambda item: item.healthy,
            max_lifetime=50,
            max_idle=20,
            clock=self.clock,
            background=False,  # maintain() runs as a rule, not behind the machine's back
        )
        self.held: list[Item] = []
        self.released: list[Item] = []

    @rule()
    def acquire(self) -> None:
        try:
            item = self.pool.acquire(timeout=0)
        except PoolTimeout:
            assert len(self.held) == self.max_size
            return
        except PoolClosed:
            assert self.pool.closed
            return
        assert not item.closed
        assert all(item is not h for h in self.held), "one item leased twice"
        self.held.append(item)

    @precondition(lambda self: self.held)
    @rule(index=st.integers(min_value=0), discard=st.booleans(), sicken=st.booleans())
    def release(self, index: int, discard: bool, sicken: bool) -> None:
        item = self.held.pop(index % len(self.held))
        item.healthy = not sicken
        self.pool.release(item, discard=discard)
        self.released.append(item)

    @precondition(lambda self: self.released)
    @rule(index=st.integers(min_value=0))
    def release_again(self, index: int) -> None:
        item = self.released[index % len(self.released)]
        if any(item is h for h in self.held):
            return
        before = self.pool.stats()
        try:
            self.pool.release(item)
        except LeaseError:
            pass
        else:
            raise AssertionError("a double release was accepted")
        assert self.pool.stats() == before

    @rule()
    def release_foreign(self) -> None:
        before = self.pool.stats()
        try:
            self.pool.release(Item())
        except LeaseError:
            pass
        else:
            raise AssertionError("a foreign release was accepted")
        assert self.pool.stats() == before

    @rule(seconds=st.floats(min_value=0, max_value=30))
    def advance_time(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def maintain(self) -> None:
        self.pool.maintain()

    @precondition(lambda self: not self.pool.closed)
    @rule()
    def close(self) -> None:
        self.pool.close()

    @invariant()
    def counts_add_up(self) -> None:
        s = self.pool.stats()
        assert s.size <= s.max_size
        assert s.size == s.idle + s.leased + s.pending
        assert s.pending == 0 and s.waiting == 0
        assert s.leased == len(self.held)
        assert s.created - s.closed == s.size
        assert len({id(h) for h in self.held}) == len(self.held)
        assert not any(h.closed for h in self.held)

    def teardown(self) -> None:
        for item in self.held:
            self.pool.release(item)
        self.pool.close()
        assert self.pool.stats().size == 0


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
