"""Command line: ``python -m safepool inspect`` and ``python -m safepool revoke``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, TextIO

from ._cliargs import whole_number
from .admin import inspect_server, resolve_authkey, revoke_lease
from .errors import SafePoolError
from .metrics import serve_prometheus  # (prometheus-client is imported when it is used)
from .remote import AUTHKEY_ENV, parse_address
from .stats import LeaseInfo, PoolReport

__all__ = ["COMMANDS", "add_metrics_arguments", "add_ops_parsers", "run_ops", "start_metrics"]

COMMANDS = ("inspect", "revoke")


def _address(text: str) -> str:
    """The address as given, once it parses (the admin functions parse it again)."""
    try:
        parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


_lease_id = whole_number(1, what="a lease id, a positive number as `inspect` shows it")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "address",
        type=_address,
        metavar="ADDRESS",
        help="the server: HOST:PORT, [::1]:PORT or unix:PATH",
    )
    key = parser.add_mutually_exclusive_group()
    key.add_argument(
        "--authkey-env",
        default=AUTHKEY_ENV,
        metavar="NAME",
        help=f"environment variable holding the server's authkey (default {AUTHKEY_ENV})",
    )
    key.add_argument(
        "--authkey-file", metavar="PATH", help="file holding the server's authkey (mode 600)"
    )


def add_ops_parsers(commands: Any) -> None:
    inspect = commands.add_parser(
        "inspect",
        help="show every pool of a running server: its stats and who holds its leases",
        description="Show every pool a running safepool server hosts: its stats, and its lease "
        "table (lease id, holder pid, host, process name, seconds held, leak flag).",
    )
    _add_common(inspect)
    inspect.add_argument("--json", action="store_true", help="print JSON instead of tables")
    revoke = commands.add_parser(
        "revoke",
        help="take a lease back from a stopped or hung holder",
        description="Take a lease back from a holder that is stopped (SIGSTOP, a debugger) or "
        "hung. The holder's later use or release of it raises safepool.LeaseRevoked.",
    )
    _add_common(revoke)
    revoke.add_argument("pool", metavar="POOL", help="the pool's name (or id, as inspect shows)")
    revoke.add_argument("lease_id", type=_lease_id, metavar="LEASE_ID", help="as inspect shows")
    revoke.add_argument(
        "--action",
        required=True,
        choices=("close", "reset"),
        help="close: close the item; reset: return it to the pool after the pool's reset hook",
    )


def run_ops(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run ``inspect`` or ``revoke``: 0 done, 1 the server refused or failed, 2 bad input."""
    out = out if out is not None else sys.stdout
    try:
        key = resolve_authkey(authkey_file=args.authkey_file, authkey_env=args.authkey_env)
    except ValueError as exc:
        print(f"safepool {args.command}: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "inspect":
            reports = inspect_server(args.address, authkey=key)
            if args.json:
                payload = {"address": args.address, "pools": [r.as_dict() for r in reports]}
                json.dump(payload, out, indent=2)
                out.write("\n")
            else:
                print_reports(reports, out)
            return 0
        info = revoke_lease(args.address, args.pool, args.lease_id, action=args.action, authkey=key)
    except (SafePoolError, LookupError) as exc:
        print(f"safepool {args.command}: {exc}", file=sys.stderr)
        return 1
    done = "closed its item" if args.action == "close" else "returned its item to the pool"
    print(
        f"safepool: revoked lease {args.lease_id} of pool {args.pool!r} "
        f"(held {info.held_for:.1f}s by {info.holder}); {done}",
        file=out,
    )
    return 0


def print_reports(reports: list[PoolReport], out: TextIO) -> None:
    if not reports:
        print("no pools (none created yet, or all closed)", file=out)
    for report in reports:
        s = report.stats
        fast = "fast path" if report.fast_path else "no fast path"
        print(f"pool {report.name!r} (id {report.id}, {report.share}, {fast})", file=out)
        print(
            f"  size {s.size}/{s.max_size} (min {s.min_size})  idle {s.idle}  leased {s.leased}"
            f"  pending {s.pending}  waiting {s.waiting}",
            file=out,
        )
        print(
            f"  created {s.created}  closed {s.closed}  requests {s.requests}  waits {s.waits}"
            f"  timeouts {s.timeouts}  lost {s.lost}  leaks {s.leaks}  reclaimed {s.reclaimed}"
            f"  revoked {s.revoked}",
            file=out,
        )
        print(_lease_table(report.leases), file=out)


def _lease_table(leases: tuple[LeaseInfo, ...]) -> str:
    if not leases:
        return "  no leases held"
    rows = [("LEASE", "PID", "HOST", "PROCESS", "HELD FOR (s)", "SINCE", "LEAK")]
    for lease in leases:
        rows.append(
            (
                "-" if lease.lease_id is None else str(lease.lease_id),
                "-" if lease.pid is None else str(lease.pid),
                lease.host or "-",
                lease.process or lease.holder,
                f"{lease.held_for:.1f}",
                time.strftime("%H:%M:%S", time.localtime(lease.since)),
                "LEAK" if lease.leaked else "",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        lines.append(("  " + "  ".join(cells)).rstrip())
    return "\n".join(lines)


# -- `serve --metrics-port` ---------------------------------------------------------------------


_port = whole_number(0, 65535, what="a port number 0-65535 (0: a free one)")


def add_metrics_arguments(serve: argparse.ArgumentParser) -> None:
    serve.add_argument(
        "--metrics-port",
        type=_port,
        metavar="PORT",
        help="serve Prometheus metrics of the pool at http://ADDR:PORT/metrics (0: a free port; "
        "default: no metrics). Needs: pip install 'safepool[prometheus]'",
    )
    serve.add_argument(
        "--metrics-addr",
        default="127.0.0.1",
        metavar="ADDR",
        help="address the metrics endpoint listens on (default 127.0.0.1, loopback only)",
    )


def start_metrics(args: argparse.Namespace) -> Any:
    """The Prometheus endpoint ``serve --metrics-port`` asks for (every pool this server
    hosts), or None."""
    if args.metrics_port is None:
        return None
    return serve_prometheus(args.metrics_port, None, addr=args.metrics_addr)
