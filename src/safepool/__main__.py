"""Command line: ``python -m safepool demo``, ``serve``, ``inspect`` and ``revoke``."""

from __future__ import annotations

import argparse
import multiprocessing
import sys
from collections.abc import Sequence

from ._cli_ops import COMMANDS as OPS_COMMANDS
from ._cli_ops import add_ops_parsers, run_ops
from ._cliserve import add_serve_parser, run_serve
from ._demo import run_demo
from ._version import __version__


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m safepool", description=__doc__)
    parser.add_argument("--version", action="version", version=f"safepool {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="show the pool at work on an embedded sqlite3 database")
    demo.add_argument("--threads", type=_positive, default=8, help="worker threads (default 8)")
    demo.add_argument("--rows", type=_positive, default=50, help="rows per worker (default 50)")
    demo.add_argument("--max-size", type=_positive, default=3, help="pool size (default 3)")
    demo.add_argument("--processes", type=_positive, default=8, help="worker processes (default 8)")
    demo.add_argument(
        "--leases", type=_positive, default=20, help="leases per process (default 20)"
    )
    demo.add_argument(
        "--start-method",
        choices=multiprocessing.get_all_start_methods(),
        help="multiprocessing start method (default: the platform's)",
    )
    demo.add_argument("--db", help="sqlite3 file to use (default: a temporary file)")
    add_serve_parser(commands)
    add_ops_parsers(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        run_demo(
            threads=args.threads,
            rows=args.rows,
            max_size=args.max_size,
            processes=args.processes,
            leases=args.leases,
            start_method=args.start_method,
            db=args.db,
            out=sys.stdout,
        )
        return 0
    if args.command in OPS_COMMANDS:
        return run_ops(args)
    return run_serve(args)


if __name__ == "__main__":
    sys.exit(main())
