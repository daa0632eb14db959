"""The error tree: one base, builtins where they fit, and every error survives pickling."""

from __future__ import annotations

import pickle

import pytest

import safepool
from safepool import errors

ALL_ERRORS = [getattr(errors, name) for name in errors.__all__]


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda c: c.__name__)
def test_every_error_derives_from_the_base_and_is_exported(cls: type[Exception]) -> None:
    assert issubclass(cls, safepool.SafePoolError)
    assert getattr(safepool, cls.__name__) is cls


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [
        (safepool.PoolTimeout, TimeoutError),
        (safepool.LeaseError, ValueError),
        (safepool.LeaseRevoked, safepool.LeaseError),
        (safepool.LeaseRevoked, ValueError),
        (safepool.ManagerUnavailable, ConnectionError),
    ],
)
def test_errors_subclass_the_builtin_they_mean(cls: type[Exception], builtin: type) -> None:
    assert issubclass(cls, builtin)
    with pytest.raises(builtin):
        raise cls("x")


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda c: c.__name__)
def test_every_error_round_trips_through_pickle(cls: type[Exception]) -> None:
    original = cls("pool 'db': something happened")
    original.extra = {"pool": "db"}  # type: ignore[attr-defined]
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        copy = pickle.loads(pickle.dumps(original, protocol=protocol))
        assert type(copy) is cls
        assert str(copy) == str(original)
        assert copy.args == original.args
        assert copy.extra == {"pool": "db"}  # type: ignore[attr-defined]


def test_real_errors_from_a_pool_round_trip() -> None:
    pool = safepool.SafeConnectionPool(factory=object, max_size=1)
    held = pool.acquire()
    raised = []
    for action in (
        lambda: pool.acquire(timeout=0),
        lambda: pool.release(object()),
    ):
        with pytest.raises(safepool.SafePoolError) as info:
            action()
        raised.append(info.value)
    pool.release(held)
    pool.close()
    with pytest.raises(safepool.PoolClosed) as closed:
        pool.acquire()
    raised.append(closed.value)
    for exc in raised:
        copy = pickle.loads(pickle.dumps(exc))
        assert type(copy) is type(exc)
        assert str(copy) == str(exc)


def test_lease_revoked_keeps_its_fields_through_pickle() -> None:
    original = safepool.LeaseRevoked(
        "pool 'db': lease 3 was revoked", pool="db", lease_id=3, action="reset"
    )
    copy = pickle.loads(pickle.dumps(original))
    assert type(copy) is safepool.LeaseRevoked
    assert (copy.pool, copy.lease_id, copy.action) == ("db", 3, "reset")
    assert str(copy) == str(original)
