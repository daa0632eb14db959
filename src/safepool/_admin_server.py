"""The server's half of the operator tools: list its pools, revoke a lease in one of them.

:class:`~safepool._server.SafeServer` answers two server-level requests with these functions,
``pools`` and ``revoke_lease``; like every request they are served only after the client
authenticated. They reach the hosted pools through the server's table of shared objects, and
only through each pool's public methods (``stats``, ``leases``, ``describe``, ``revoke``).
"""

from __future__ import annotations

from typing import Any

from ._hosted import HostedPool
from .stats import LeaseInfo, PoolReport

__all__ = ["pool_reports", "revoke_lease"]


def _hosted_pools(server: Any) -> list[tuple[str, HostedPool]]:
    """(id, pool) of every pool the server hosts, each once, by name then id."""
    with server.mutex:
        objects = [(ident, entry[0]) for ident, entry in server.id_to_obj.items()]
    seen: set[int] = set()
    found = []
    for ident, obj in objects:
        if isinstance(obj, HostedPool) and id(obj) not in seen:
            seen.add(id(obj))
            found.append((ident, obj))
    found.sort(key=lambda pair: (pair[1].name, pair[0]))
    return found


def pool_reports(server: Any) -> list[PoolReport]:
    reports = []
    for ident, pool in _hosted_pools(server):
        described = pool.describe()
        reports.append(
            PoolReport(
                id=ident,
                name=pool.name,
                share=described["share"],
                fast_path=bool(described["fast_path"]),
                stats=pool.stats(),
                leases=tuple(pool.leases()),
            )
        )
    return reports


def revoke_lease(server: Any, pool: str, lease_id: int, action: str) -> LeaseInfo:
    """Revoke lease ``lease_id`` of the pool named (or with the id) ``pool``."""
    if not isinstance(pool, str) or not pool:
        raise TypeError(f"pool must be a pool's name or id, a str, got {pool!r}")
    pools = _hosted_pools(server)
    matches = [p for ident, p in pools if ident == pool] or [p for _, p in pools if p.name == pool]
    if not matches:
        names = ", ".join(f"{p.name!r} (id {ident})" for ident, p in pools) or "none"
        raise LookupError(f"this server hosts no pool named {pool!r}; its pools: {names}")
    if len(matches) > 1:
        ids = ", ".join(ident for ident, p in pools if p in matches)
        raise LookupError(
            f"this server hosts {len(matches)} pools named {pool!r}: name one by its id ({ids})"
        )
    return matches[0].revoke(lease_id, action)
