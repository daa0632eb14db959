"""The multiprocessing internals safepool builds on, in one place.

``multiprocessing.managers`` has no public API for what a manager-hosted pool needs (rebuilding a
proxy, converting a reply into an exception, a server's request loop). These names are the
stdlib's own, unchanged across CPython 3.10-3.13 (compared line by line); typeshed does not
describe them, so they are re-exported here with loose types.
"""

from __future__ import annotations

from multiprocessing import managers
from typing import Any

__all__ = ["RebuildProxy", "State", "base_proxy_incref", "convert_to_error", "dispatch",
           "public_methods"]  # fmt: skip

RebuildProxy: Any = getattr(managers, "RebuildProxy")  # noqa: B009
convert_to_error: Any = getattr(managers, "convert_to_error")  # noqa: B009
public_methods: Any = getattr(managers, "public_methods")  # noqa: B009
dispatch: Any = getattr(managers, "dispatch")  # noqa: B009
State: Any = getattr(managers, "State")  # noqa: B009
base_proxy_incref: Any = getattr(managers.BaseProxy, "_incref")  # noqa: B009
