"""``python -m safepool serve``: its options, checked at start, and the run.

Every problem found at start is one line on stderr saying what to fix, and exit status 2 (as
argparse reports a bad option): a bad address, an unset ``--authkey-env`` variable, a factory
that cannot be imported or needs arguments, a handshake timeout that is not > 0, inconsistent
pool options. Logging goes to stderr (``--log-level``, default INFO).
"""

from __future__ import annotations

import argparse
import inspect
import logging
import math
import os
import sys
from typing import Any

from ._cli_ops import add_metrics_arguments, start_metrics
from ._cliargs import whole_number
from ._connections import DEFAULT_MAX_UNAUTHENTICATED
from ._transport import format_address, is_local, parse_address
from .pool import check_pool_options
from .remote import AUTHKEY_ENV, import_factory, load_authkey, serve_pool, write_local_authkey

__all__ = ["add_serve_parser", "run_serve"]

_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_POOL_OPTIONS = (
    "max_size", "min_size", "timeout", "max_waiting", "max_lifetime", "max_idle", "leak_timeout",
)  # fmt: skip


def _seconds(*, positive: bool) -> Any:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
        if math.isnan(value) or value < 0 or (positive and (value == 0 or math.isinf(value))):
            bound = "a finite number of seconds > 0" if positive else "a number of seconds >= 0"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    return parse


def _address(text: str) -> tuple[str, int] | str:
    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _NoAuthkeyOnTheCommandLine(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        parser.error(
            "the authkey is never taken from the command line (every user of this machine can "
            f"read it in the process list): set ${AUTHKEY_ENV} or use --authkey-file"
        )


def add_serve_parser(commands: Any) -> argparse.ArgumentParser:
    serve: argparse.ArgumentParser = commands.add_parser(
        "serve",
        help="serve a pool to other processes and hosts until SIGTERM or Ctrl+C",
        description="Serve one pool through a hardened manager server. Clients connect with "
        "safepool.connect_pool(ADDRESS, TYPEID) or a PoolManager subclass.",
    )
    add = serve.add_argument
    add(
        "--address",
        type=_address,
        default="127.0.0.1:0",
        metavar="ADDRESS",
        help="where to listen: HOST:PORT (TCP; port 0 picks a free one), [IPv6]:PORT or "
        "unix:/path/to/socket (default 127.0.0.1:0); any non-loopback address needs an "
        "authkey",
    )
    add(
        "--factory",
        required=True,
        metavar="MODULE:CALLABLE",
        help="makes one item, called with no arguments, e.g. myapp.db:connect (required)",
    )
    add(
        "--typeid",
        default="pool",
        metavar="NAME",
        help="the pool's name for clients (default pool)",
    )
    add(
        "--share",
        choices=("hosted", "value"),
        default="hosted",
        help="hosted: items stay in the server; value: clients get copies of picklable "
        "items (default hosted)",
    )
    _add_pool_options(add)
    _add_security_options(add)
    add_metrics_arguments(serve)
    serve.set_defaults(serve_parser=serve)
    return serve


def _add_pool_options(add: Any) -> None:
    """The pool's options: SafeConnectionPool's, with their units."""
    add(
        "--max-size",
        type=whole_number(1),
        default=10,
        metavar="N",
        help="most items at once (default 10)",
    )
    add(
        "--min-size",
        type=whole_number(0),
        default=0,
        metavar="N",
        help="items made at start and kept (default 0)",
    )
    add(
        "--timeout",
        type=_seconds(positive=False),
        default=30.0,
        metavar="SECONDS",
        help="how long a lease waits for an item before PoolTimeout (default 30)",
    )
    add(
        "--max-waiting",
        type=whole_number(0),
        default=0,
        metavar="N",
        help="most clients waiting for an item at once; 0: no limit (default 0)",
    )
    add(
        "--max-lifetime",
        type=_seconds(positive=True),
        metavar="SECONDS",
        help="replace an item this long after it was made (default: 3600 for connections to a "
        "database server, never for other items)",
    )
    add(
        "--max-idle",
        type=_seconds(positive=True),
        metavar="SECONDS",
        help="close an item unused this long (default: 600 for connections to a database "
        "server, never for other items)",
    )
    add(
        "--leak-timeout",
        type=_seconds(positive=True),
        metavar="SECONDS",
        help="warn of a lease held this long (default: never)",
    )


def _add_security_options(add: Any) -> None:
    """The authkey, the handshake, logging."""
    add(
        "--authkey-env",
        metavar="VAR",
        help=f"environment variable holding the authkey; it must be set if given (default: "
        f"${AUTHKEY_ENV} if set; else, on loopback or a Unix socket only, a random key "
        "written to a file only you can read)",
    )
    add("--authkey-file", metavar="PATH", help="file holding the authkey, mode 600 (default: none)")
    add("--authkey", nargs="?", action=_NoAuthkeyOnTheCommandLine, help=argparse.SUPPRESS)
    add(
        "--handshake-timeout",
        type=_seconds(positive=True),
        default=5.0,
        metavar="SECONDS",
        help="time a new connection has, in all, to authenticate and make its request (default 5)",
    )
    add(
        "--max-unauthenticated",
        type=whole_number(1),
        default=DEFAULT_MAX_UNAUTHENTICATED,
        metavar="N",
        help="connections allowed in their handshake at once; past it, new "
        f"ones are closed at once (default {DEFAULT_MAX_UNAUTHENTICATED})",
    )
    add(
        "--log-level",
        type=str.upper,
        choices=_LEVELS,
        default="INFO",
        metavar="LEVEL",
        help=f"log server messages at this level and above to stderr: {', '.join(_LEVELS)} "
        "(default INFO)",
    )


def _check_factory(spec: str) -> Any:
    factory = import_factory(spec)
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return factory  # no signature to check (some builtins): the first item will tell
    try:
        signature.bind()
    except TypeError as exc:
        raise ValueError(
            f"the factory {spec!r} cannot be called with no arguments ({exc}); point --factory "
            "at a callable that makes one item by itself, e.g. a module-level function that "
            "calls connect(...) with your settings"
        ) from None
    return factory


def _authkey(args: argparse.Namespace, address: tuple[str, int] | str) -> bytes | None:
    env = args.authkey_env
    if env is not None and args.authkey_file is None and not os.environ.get(env):
        raise ValueError(
            f"--authkey-env {env}: the environment variable ${env} is not set (or empty); set "
            "it to the authkey, or leave --authkey-env out"
        )
    authkey = load_authkey(env=env or AUTHKEY_ENV, file=args.authkey_file)
    if authkey is None and not is_local(address):
        raise ValueError(
            f"refusing to listen on {format_address(address)} without an authkey: anyone who "
            f"can reach it could run code in the server. Set ${AUTHKEY_ENV} or use "
            "--authkey-file (or listen on 127.0.0.1)"
        )
    return authkey


def _log_to_stderr(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("safepool")
    root.addHandler(handler)
    root.setLevel(level)


def run_serve(args: argparse.Namespace) -> int:
    """Check everything, then serve until SIGTERM or Ctrl+C. Bad input: parser.error (exit 2)."""
    parser: argparse.ArgumentParser = args.serve_parser
    # Options left out keep the pool's defaults ("auto" lifetimes for database connections).
    options = {name: getattr(args, name) for name in _POOL_OPTIONS}
    options = {name: value for name, value in options.items() if value is not None}
    try:
        authkey = _authkey(args, args.address)
        factory = _check_factory(args.factory)
        check_pool_options(factory=factory, **options)
        metrics = start_metrics(args)  # before serving: a bad port or a missing extra ends here
    except (ValueError, TypeError, ImportError, OSError) as exc:
        parser.error(str(exc))
    _log_to_stderr(args.log_level)
    key_file = None
    if authkey is None:
        authkey, key_file = write_local_authkey()

    def ready(bound: Any) -> None:
        print(f"safepool: serving pool {args.typeid!r} at {format_address(bound)}", flush=True)
        if key_file is not None:
            print(f"safepool: authkey written to {key_file} (readable by you only)", flush=True)
        if metrics is not None:
            print(f"safepool: metrics at {metrics.url}", flush=True)

    try:
        serve_pool(
            args.address,
            factory,
            typeid=args.typeid,
            authkey=authkey,
            share=args.share,
            handshake_timeout=args.handshake_timeout,
            max_unauthenticated=args.max_unauthenticated,
            on_ready=ready,
            handle_signals=True,
            **options,
        )
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    except OSError as exc:
        print(
            f"python -m safepool serve: cannot serve at {format_address(args.address)}: {exc}",
            file=sys.stderr,
        )
        return 1
    finally:
        if key_file is not None:
            key_file.unlink(missing_ok=True)
        if metrics is not None:
            metrics.close()
    return 0
