"""The process that started a server, whose death ends it.

A ``PoolManager``'s server process serves until it is shut down; if the process that started
it dies first (killed, or interrupted before it could record the server), nothing would ever
shut it down, and ``multiprocessing`` would wait for it at the interpreter's exit. So such a
server watches its starter, and ``SafeServer.serve_forever()`` returns once it is gone.
"""

from __future__ import annotations

import multiprocessing
import os
from multiprocessing.process import BaseProcess

__all__ = ["end_with_parent", "starter_gone"]

# The process whose death ends serve_forever() (a PoolManager's server process: its starter),
# and whether it is this process's parent; None: serve until shut down.
_starter: tuple[BaseProcess, bool] | None = None


def end_with_parent() -> None:
    """In a process started by ``multiprocessing``: make ``serve_forever()`` return when the
    process that started this one dies (killed, or gone without shutting the server down)."""
    global _starter
    parent = multiprocessing.parent_process()
    if parent is not None:
        _starter = (parent, os.getppid() == parent.pid)


def starter_gone() -> bool:
    """Whether the starting process died. A direct child (fork, spawn) sees its parent pid
    change; under forkserver, the starter's sentinel says so."""
    if _starter is None:
        return False
    parent, direct = _starter
    if direct:
        return os.getppid() != parent.pid
    return not parent.is_alive()
