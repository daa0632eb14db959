"""Module-level functions that child processes run (importable under spawn and forkserver)."""

from __future__ import annotations

import gc
import os
from typing import Any


def use_inherited_pool_in_child(pool: Any, parent_ids: list[int], conn_out: Any) -> None:
    """In a multiprocessing child: the inherited pool is empty and makes its own items."""
    try:
        stats = pool.stats()
        with pool.lease() as conn:
            fresh = id(conn) not in parent_ids
            conn.execute("INSERT INTO rows (who) VALUES (?)", (f"child-{os.getpid()}",))
            conn.commit()
        after = pool.stats()
        del pool
        gc.collect()  # no finaliser may close the parent's connections
        conn_out.send(("ok", stats.size, fresh, after.created))
    except BaseException as exc:
        conn_out.send(("error", repr(exc)))
