"""``python -m safepool serve``: bad input refused at start (one line saying what to fix, exit
status 2, no traceback), help with defaults and units, --version, logging to stderr, and
Ctrl+C -- once, and twice during a shutdown that hangs."""

from __future__ import annotations

import ctypes
import os
import re
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import remote_targets
from helpers import LONG, SHORT, run_cli, wait_until
from safepool import __version__, connect_pool

pytestmark = pytest.mark.timeout(120)

TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "PYTHONPATH": str(TESTS)}
ENV.pop("SAFEPOOL_AUTHKEY", None)

FACTORY = ("--factory", "manager_targets:tokens")

BAD_INPUT = [
    ((*FACTORY, "--handshake-timeout", "0"), "--handshake-timeout: must be a finite number of"),
    ((*FACTORY, "--handshake-timeout", "-1"), "--handshake-timeout: must be a finite number"),
    ((*FACTORY, "--handshake-timeout", "inf"), "--handshake-timeout: must be a finite number"),
    ((*FACTORY, "--handshake-timeout", "soon"), "--handshake-timeout: must be a number of seconds"),
    ((*FACTORY, "--authkey-env", "SAFEPOOL_TEST_UNSET"), "$SAFEPOOL_TEST_UNSET is not set"),
    ((*FACTORY, "--authkey", "secret"), "never taken from the command line"),
    (("--factory", "server_targets:needs_argument"), "cannot be called with no arguments"),
    (("--factory", "server_targets:not_callable"), "not a callable"),
    (("--factory", "no_such_module_here:f"), "cannot import the factory's module"),
    (("--factory", "nocolon"), "factory must be module:callable"),
    ((*FACTORY, "--address", "0.0.0.0:0"), "without an authkey"),
    ((*FACTORY, "--address", "5500"), "--address: address must be HOST:PORT"),
    ((*FACTORY, "--max-size", "0"), "--max-size: must be >= 1"),
    ((*FACTORY, "--max-size", "two"), "--max-size: must be a whole number"),
    ((*FACTORY, "--min-size", "3", "--max-size", "2"), "min_size (3) must not exceed max_size (2)"),
    ((*FACTORY, "--max-waiting", "-1"), "--max-waiting: must be >= 0"),
    ((*FACTORY, "--timeout", "nan"), "--timeout: must be a number of seconds >= 0"),
    ((*FACTORY, "--max-idle", "0"), "--max-idle: must be a finite number of seconds > 0"),
    ((*FACTORY, "--max-unauthenticated", "0"), "--max-unauthenticated: must be >= 1"),
    ((*FACTORY, "--log-level", "LOUD"), "--log-level: invalid choice"),
    ((), "the following arguments are required: --factory"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "message"), BAD_INPUT)
def test_bad_input_is_one_line_and_exit_status_2(args: tuple[str, ...], message: str) -> None:
    result = run_cli("serve", *args, env=ENV)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""  # it never started
    error_lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1, result.stderr
    assert message in error_lines[0]
    assert error_lines[0].startswith("python -m safepool serve: error:")


def test_help_gives_every_option_a_default_or_says_it_is_required() -> None:
    result = run_cli("serve", "--help", env=ENV)
    assert result.returncode == 0
    help_text = " ".join(result.stdout.split())
    options = re.findall(r"\s(--[a-z-]+)", result.stdout.split("options:")[1])
    described = {o for o in options if o != "--help"}
    assert len(described) >= 16
    sections = re.split(r" (?=--[a-z-]+ [A-Z{])", help_text.split("options:")[1])
    for section in sections[1:]:
        assert "default" in section or "required" in section, section
    for unit in ("SECONDS", " N "):
        assert unit in help_text


def test_version() -> None:
    result = run_cli("--version", env=ENV)
    assert result.returncode == 0
    assert result.stdout.strip() == f"safepool {__version__}"


def serve(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "safepool", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )


def test_ctrl_c_stops_cleanly_with_the_start_up_line_once_and_logs_on_stderr() -> None:
    authkey = secrets.token_hex(32)
    proc = serve(*FACTORY, "--share", "value", env={**ENV, "SAFEPOOL_AUTHKEY": authkey})
    assert proc.stdout is not None and proc.stderr is not None
    line = proc.stdout.readline()
    assert line.startswith("safepool: serving pool 'pool' at 127.0.0.1:")
    address = line.rsplit(" at ", 1)[1].strip()
    with connect_pool(address, authkey=authkey.encode()).lease(timeout=SHORT):
        pass
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=LONG)
    assert proc.returncode == 0
    assert "Traceback" not in err
    assert "serving pool" not in out + err  # printed once, before
    assert "INFO safepool" in err and "server stopped" in err  # logging reaches stderr


def test_a_second_ctrl_c_during_a_hung_shutdown_exits_at_once(tmp_path: Path) -> None:
    marker = tmp_path / "closing"
    env = {**ENV, "SAFEPOOL_AUTHKEY": secrets.token_hex(32), "SAFEPOOL_TEST_CLOSING": str(marker)}
    proc = serve("--factory", "server_targets:slow_closing", env=env)
    assert proc.stdout is not None
    address = proc.stdout.readline().rsplit(" at ", 1)[1].strip()
    pool = connect_pool(address, authkey=env["SAFEPOOL_AUTHKEY"].encode())
    with pool.lease(timeout=SHORT):
        pass  # the pool exists (made on first use), with one item to close at shutdown
    proc.send_signal(signal.SIGINT)
    wait_until(marker.exists, LONG, "the shutdown closes the item (and hangs there)")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=SHORT)
    assert proc.returncode == 128 + signal.SIGINT
    assert "Traceback" not in err
    assert "interrupted again while stopping" in err


def test_sigterm_stops_cleanly_too() -> None:
    with remote_targets.served(*FACTORY, env={"SAFEPOOL_AUTHKEY": secrets.token_hex(32)}) as (
        _,
        proc,
    ):
        proc.terminate()
        proc.wait(LONG)
        assert proc.returncode == 0


def _tgkill(pid: int, tid: int, signum: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.tgkill(pid, tid, signum) != 0:
        raise OSError(ctypes.get_errno(), "tgkill failed")


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "tgkill"), reason="no tgkill in this libc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_the_kernel_hands_to_another_thread_still_stops_it(signum: int) -> None:
    """A process-directed signal may be delivered to any thread that does not block it; the
    main thread must still notice (a wait with no timeout never returned)."""
    with remote_targets.served(*FACTORY, env={"SAFEPOOL_AUTHKEY": secrets.token_hex(32)}) as (
        _,
        proc,
    ):
        tasks = sorted(int(t) for t in os.listdir(f"/proc/{proc.pid}/task"))
        others = [t for t in tasks if t != proc.pid]  # the accepter at least
        assert others
        _tgkill(proc.pid, others[0], signum)
        proc.wait(LONG)
        assert proc.returncode == 0
