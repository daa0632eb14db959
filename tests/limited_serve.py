"""``python limited_serve.py NOFILE ARGS``: ``python -m safepool serve ARGS`` with its soft
RLIMIT_NOFILE set to NOFILE first (raised for a flood, or lowered to exhaust it)."""

from __future__ import annotations

import resource
import sys

from safepool.__main__ import main

if __name__ == "__main__":
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft if hard < 0 else min(soft, hard), hard))
    sys.exit(main(["serve", *sys.argv[2:]]))
