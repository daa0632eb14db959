"""Command line: ``python -m safepool demo``, ``serve``, ``inspect`` and ``revoke``."""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from ._cli_ops import COMMANDS as OPS_COMMANDS
from ._cli_ops import add_ops_parsers, run_ops
from ._cliargs import whole_number
from ._cliserve import add_serve_parser, run_serve
from ._demo import run_demo
from ._version import __version__


class _Parser(argparse.ArgumentParser):
    """Bad input: one line saying what is wrong, and exit status 2 (no usage dump, no traceback)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _db_path(text: str) -> str:
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"the folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"the folder {folder} is not writable")
    return text


def _add_demo_parser(commands: Any) -> None:
    demo = commands.add_parser("demo", help="show the pool at work on an embedded sqlite3 database")
    add = demo.add_argument
    add(
        "--threads", type=whole_number(1), default=8, metavar="N", help="worker threads (default 8)"
    )
    add(
        "--rows", type=whole_number(1), default=50, metavar="N", help="rows per thread (default 50)"
    )
    add("--max-size", type=whole_number(1), default=3, metavar="N", help="pool size (default 3)")
    add(
        "--processes",
        type=whole_number(1),
        default=8,
        metavar="N",
        help="worker processes (default 8)",
    )
    add(
        "--leases",
        type=whole_number(1),
        default=20,
        metavar="N",
        help="leases per process (default 20)",
    )
    add(
        "--start-method",
        choices=multiprocessing.get_all_start_methods(),
        help="multiprocessing start method (default: the platform's)",
    )
    add(
        "--db",
        type=_db_path,
        metavar="PATH",
        help="sqlite3 file to use (default: a temporary file)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m safepool",
        description="safepool's command line: a demo, a pool server, and tools to inspect a "
        "running server and revoke its leases.",
    )
    parser.add_argument("--version", action="version", version=f"safepool {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo_parser(commands)
    add_serve_parser(commands)
    add_ops_parsers(commands)
    return parser


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse; an unknown option is reported by its command's parser, with that command's help."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        commands.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
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
