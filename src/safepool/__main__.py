"""Command line: ``python -m safepool demo``, ``serve``, ``inspect`` and ``revoke``."""

from __future__ import annotations

import argparse
import logging
import math
import multiprocessing
import sys
from collections.abc import Sequence
from typing import Any

from ._cli_ops import COMMANDS as OPS_COMMANDS
from ._cli_ops import add_metrics_arguments, add_ops_parsers, run_ops, start_metrics
from ._demo import run_demo
from .remote import (
    AUTHKEY_ENV,
    import_factory,
    is_local,
    load_authkey,
    parse_address,
    serve_pool,
    write_local_authkey,
)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if math.isnan(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text}")
    return value


class _NoAuthkeyOnTheCommandLine(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        parser.error(
            "the authkey is never taken from the command line (every user of this machine can "
            f"read it in the process list): set ${AUTHKEY_ENV} or use --authkey-file"
        )


def add_serve_parser(commands: Any) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve a pool to other processes and hosts until SIGTERM or Ctrl+C",
        description="Serve one pool through a manager server. Clients connect with "
        "safepool.connect_pool(address, typeid, authkey=...) or a PoolManager subclass.",
    )
    serve.add_argument(
        "--address",
        default="127.0.0.1:0",
        help="HOST:PORT or unix:PATH to listen on (default 127.0.0.1:0, a free loopback port); "
        "any non-loopback address needs an authkey",
    )
    serve.add_argument(
        "--factory",
        required=True,
        help="module:callable that makes one item, e.g. myapp.db:connect",
    )
    serve.add_argument(
        "--typeid", default="pool", help="the pool's name for clients (default pool)"
    )
    serve.add_argument("--share", choices=("hosted", "value"), default="hosted")
    serve.add_argument("--max-size", type=_positive, default=10)
    serve.add_argument("--min-size", type=int, default=0)
    serve.add_argument("--timeout", type=_seconds, default=30.0)
    serve.add_argument("--max-waiting", type=int, default=0)
    serve.add_argument("--max-lifetime", type=_seconds)
    serve.add_argument("--max-idle", type=_seconds)
    serve.add_argument("--leak-timeout", type=_seconds)
    serve.add_argument(
        "--authkey-env",
        default=AUTHKEY_ENV,
        metavar="VAR",
        help=f"environment variable holding the authkey (default {AUTHKEY_ENV})",
    )
    serve.add_argument("--authkey-file", metavar="PATH", help="file holding the authkey (mode 600)")
    serve.add_argument(
        "--authkey", nargs="?", action=_NoAuthkeyOnTheCommandLine, help=argparse.SUPPRESS
    )
    serve.add_argument(
        "--handshake-timeout",
        type=_seconds,
        default=5.0,
        help="seconds a new connection has to authenticate (default 5)",
    )
    serve.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    add_metrics_arguments(serve)


def run_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        address = parse_address(args.address)
        authkey = load_authkey(env=args.authkey_env, file=args.authkey_file)
        if authkey is None and not is_local(address):
            raise ValueError(
                f"refusing to listen on {args.address} without an authkey: anyone who can "
                f"reach it could run code in the server. Set ${args.authkey_env} or use "
                "--authkey-file (or listen on 127.0.0.1)"
            )
        factory = import_factory(args.factory)
    except ValueError as exc:
        print(f"safepool serve: {exc}", file=sys.stderr)
        return 2
    try:
        metrics = start_metrics(args)  # before serving: a bad port or a missing extra ends here
    except (ImportError, ValueError, OSError) as exc:
        print(f"safepool serve: {exc}", file=sys.stderr)
        return 2
    key_file = None
    if authkey is None and is_local(address):
        authkey, key_file = write_local_authkey()
    options = {
        name: getattr(args, name)
        for name in (
            "max_size",
            "min_size",
            "timeout",
            "max_waiting",
            "max_lifetime",
            "max_idle",
            "leak_timeout",
        )
    }

    def ready(bound: Any) -> None:
        shown = bound if isinstance(bound, str) else f"{bound[0]}:{bound[1]}"
        prefix = "unix:" if isinstance(bound, str) else ""
        print(f"safepool: serving pool {args.typeid!r} at {prefix}{shown}", flush=True)
        if key_file is not None:
            print(f"safepool: authkey written to {key_file} (readable by you only)", flush=True)
        if metrics is not None:
            print(f"safepool: metrics at {metrics.url}", flush=True)

    try:
        serve_pool(
            address,
            factory,
            typeid=args.typeid,
            authkey=authkey,
            share=args.share,
            handshake_timeout=args.handshake_timeout,
            on_ready=ready,
            **options,
        )
    except (ValueError, TypeError, OSError) as exc:
        print(f"safepool serve: {exc}", file=sys.stderr)
        return 2
    finally:
        if key_file is not None:
            key_file.unlink(missing_ok=True)
        if metrics is not None:
            metrics.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m safepool", description=__doc__)
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
