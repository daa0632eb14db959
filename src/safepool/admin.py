"""Operator tools for a running pool server: see every pool and its leases; revoke a lease.

These are what ``python -m safepool inspect`` and ``python -m safepool revoke`` run, usable
from Python too::

    from safepool.admin import inspect_server, revoke_lease

    for report in inspect_server("127.0.0.1:5500", authkey=key):
        print(report.name, report.stats.leased, [lease.lease_id for lease in report.leases])
    revoke_lease("127.0.0.1:5500", "db", 3, action="reset", authkey=key)

Each call is one server-level request on a connection of its own, answered only after the
authkey handshake. The server reaches its pools only through their public methods.
"""

from __future__ import annotations

import os
from typing import Any

from ._protocol import request
from ._revoke import check_action, check_lease_id
from .remote import AUTHKEY_ENV, load_authkey, parse_address
from .stats import LeaseInfo, PoolReport

__all__ = ["inspect_server", "resolve_authkey", "revoke_lease"]


def resolve_authkey(
    authkey: bytes | None = None,
    *,
    authkey_file: str | os.PathLike[str] | None = None,
    authkey_env: str | None = AUTHKEY_ENV,
) -> bytes:
    """``authkey``, else the key in ``authkey_file``, else in ``$authkey_env``; a clear
    ValueError when there is none (never a guess)."""
    if authkey is not None:
        if not isinstance(authkey, bytes):
            raise TypeError(f"authkey must be bytes, got {type(authkey).__name__}")
        return authkey
    key = load_authkey(env=authkey_env, file=authkey_file)
    if key is None:
        where = f"${authkey_env} is not set" if authkey_env else "no authkey source was given"
        raise ValueError(
            f"no authkey: {where}. Set it (export {authkey_env or AUTHKEY_ENV}=...) or pass "
            "the file the server reads its key from (--authkey-file PATH; a loopback server "
            "started without a key prints the file it wrote one to)"
        )
    return key


def _address(address: Any) -> Any:
    if isinstance(address, str):
        return parse_address(address)
    if isinstance(address, tuple) and len(address) == 2:
        return address
    raise TypeError(f"address must be HOST:PORT, [::1]:PORT or unix:PATH, got {address!r}")


def inspect_server(
    address: tuple[str, int] | str,
    *,
    authkey: bytes | None = None,
    authkey_file: str | os.PathLike[str] | None = None,
    authkey_env: str | None = AUTHKEY_ENV,
) -> list[PoolReport]:
    """Every pool the server at ``address`` hosts: its stats and its lease table."""
    where = _address(address)
    key = resolve_authkey(authkey, authkey_file=authkey_file, authkey_env=authkey_env)
    reports: list[PoolReport] = request(where, key, "pools")
    return reports


def revoke_lease(
    address: tuple[str, int] | str,
    pool: str,
    lease_id: int,
    *,
    action: str,
    authkey: bytes | None = None,
    authkey_file: str | os.PathLike[str] | None = None,
    authkey_env: str | None = AUTHKEY_ENV,
) -> LeaseInfo:
    """Take lease ``lease_id`` of pool ``pool`` (its name, or its id when names repeat) back
    from a stopped or hung holder. ``action="close"`` closes the item; ``"reset"`` returns it
    to the pool after the pool's reset hook. Returns the lease as it was.

    Raises :class:`~safepool.errors.LeaseError` (no such lease, or a call on its item is
    running in the server) or ``LookupError`` (no such pool), changing nothing."""
    where = _address(address)
    if not isinstance(pool, str) or not pool:
        raise TypeError(f"pool must be a pool's name or id, got {pool!r}")
    check_lease_id(lease_id)
    check_action(action)
    key = resolve_authkey(authkey, authkey_file=authkey_file, authkey_env=authkey_env)
    info: LeaseInfo = request(where, key, "revoke_lease", (pool, lease_id, action))
    return info
