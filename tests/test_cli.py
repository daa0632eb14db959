"""The command line's bad input: one line on stderr naming what is wrong, exit status 2, never a
traceback (``serve``'s own options are in test_cli_serve.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import safepool

BAD = [
    (["demo", "--bogus"], "python -m safepool demo: error: unrecognized arguments: --bogus"),
    (["demo", "--db", "/nonexistent/x.db"], "the folder /nonexistent does not exist"),
    (["demo", "--threads", "abc"], "--threads: must be a whole number, got 'abc'"),
    (["demo", "--max-size", "0"], "--max-size: must be >= 1, got 0"),
    (["demo", "--start-method", "thread"], "--start-method: invalid choice: 'thread'"),
    (["serve", "--factory", "os:getcwd", "--log-level", "LOUD"], "invalid choice: 'LOUD'"),
    (["bogus"], "invalid choice: 'bogus'"),
    ([], "the following arguments are required: COMMAND"),
    (["inspect"], "the following arguments are required: ADDRESS"),
    (["inspect", "nowhere"], "inspect: error: argument ADDRESS"),
    (["revoke", "127.0.0.1:1", "db", "x", "--action", "close"], "LEASE_ID"),
]


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "safepool", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(("argv", "message"), BAD, ids=lambda v: " ".join(v) or "(none)")
def test_bad_input_is_one_line_and_exit_status_2(argv: list[str], message: str) -> None:
    done = run(*argv)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr  # one line: no usage dump, no traceback
    assert "Traceback" not in done.stderr
    assert done.stdout == ""


def test_version() -> None:
    done = run("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"safepool {safepool.__version__}"


@pytest.mark.parametrize("command", [[], ["demo"], ["serve"], ["inspect"], ["revoke"]])
def test_help_shows_defaults_and_no_markup(command: list[str]) -> None:
    done = run(*command, "--help")
    assert done.returncode == 0
    assert "``" not in done.stdout  # no reStructuredText leaking into --help
    if command in (["demo"], ["serve"]):
        assert "(default" in done.stdout
