"""Bad configuration fails at construction, naming the argument and the value, changing nothing."""

from __future__ import annotations

import math
import re

import pytest

from safepool import SafeConnectionPool


def make() -> object:
    return object()


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        ({"max_size": 0}, ValueError, "max_size must be >= 1, got 0"),
        ({"max_size": -3}, ValueError, "max_size must be >= 1, got -3"),
        ({"max_size": 2.5}, TypeError, "max_size must be an int, got float 2.5"),
        ({"max_size": True}, TypeError, "max_size must be an int, got bool True"),
        ({"min_size": -1}, ValueError, "min_size must be >= 0, got -1"),
        ({"min_size": 5, "max_size": 2}, ValueError, "min_size (5) must not exceed max_size (2)"),
        ({"timeout": -1}, ValueError, "timeout must be >= 0 seconds, got -1"),
        ({"timeout": math.nan}, ValueError, "timeout must be a number of seconds, got NaN"),
        ({"timeout": "5"}, TypeError, "timeout must be a number of seconds, got str '5'"),
        ({"max_waiting": -1}, ValueError, "max_waiting must be >= 0, got -1"),
        ({"max_lifetime": 0}, ValueError, "max_lifetime must be > 0 seconds, got 0"),
        ({"max_lifetime": math.nan}, ValueError, "max_lifetime must be a number of seconds"),
        ({"max_idle": -5.0}, ValueError, "max_idle must be > 0 seconds, got -5.0"),
        ({"leak_timeout": 0.0}, ValueError, "leak_timeout must be > 0 seconds, got 0.0"),
        ({"check": "yes"}, TypeError, "check must be callable, got a str object"),
        ({"reset": 1}, TypeError, "reset must be callable, got a int object"),
        ({"close": object()}, TypeError, "close must be callable, got a object object"),
        ({"name": ""}, TypeError, "name must be a non-empty str"),
        ({"name": 3}, TypeError, "name must be a non-empty str, got int 3"),
        ({"background": "no"}, TypeError, "background must be a bool, got str"),
    ],
)
def test_bad_configuration_is_rejected_at_construction(
    kwargs: dict[str, object], exc: type[Exception], message: str
) -> None:
    kwargs.setdefault("factory", make)
    with pytest.raises(exc, match=re.escape(message)):
        SafeConnectionPool(**kwargs)  # type: ignore[arg-type]


def test_non_callable_factory_names_the_type_not_the_value() -> None:
    # A DSN passed by mistake must not end up in the message: it may carry a password.
    with pytest.raises(TypeError, match="factory must be callable, got a str object") as info:
        SafeConnectionPool(factory="postgresql://user:s3cret@db/app")  # type: ignore[arg-type]
    assert "s3cret" not in str(info.value)


def test_configuration_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        SafeConnectionPool(make, 3)  # type: ignore[misc]


def test_factory_is_required() -> None:
    with pytest.raises(TypeError, match="factory"):
        SafeConnectionPool()  # type: ignore[call-arg]


@pytest.mark.parametrize("timeout", [-0.5, math.nan, "1", [1]])
def test_bad_per_call_timeout_is_rejected_and_changes_nothing(timeout: object) -> None:
    pool = SafeConnectionPool(factory=make, max_size=1)
    before = pool.stats()
    with pytest.raises((ValueError, TypeError), match="timeout must be"):
        pool.acquire(timeout=timeout)  # type: ignore[arg-type]
    assert pool.stats() == before


def test_infinite_timeouts_are_allowed() -> None:
    pool = SafeConnectionPool(factory=make, timeout=math.inf, max_lifetime=math.inf)
    with pool.lease(timeout=math.inf) as item:
        assert item is not None


def test_min_size_items_are_made_at_construction() -> None:
    made = []
    pool = SafeConnectionPool(factory=lambda: made.append(object()) or made[-1], min_size=3)
    stats = pool.stats()
    assert (stats.size, stats.idle, stats.created, len(made)) == (3, 3, 3, 3)


def test_failing_prefill_closes_what_it_made_and_raises() -> None:
    closed = []
    calls = 0

    class Item:
        def close(self) -> None:
            closed.append(self)

    def factory() -> Item:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError("database is down")
        return Item()

    from safepool import FactoryError

    with pytest.raises(FactoryError) as info:
        SafeConnectionPool(factory=factory, min_size=3)
    assert isinstance(info.value.__cause__, OSError)
    assert len(closed) == 2
