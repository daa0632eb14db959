"""The public types, checked by mypy --strict, and the typed examples run for real.

``tests/typecheck/*.py`` hold ``assert_type`` checks and lines that must *not* type-check, each
marked ``# type: ignore[<code>]``: with ``warn_unused_ignores``, a line that stops being an error
(a result typed ``Any`` again, say) fails the run. The same files run against a real manager
server under every start method, so the types describe what happens at run time. The Python
blocks of docs/guides/typing.md are type-checked and run the same way, in an empty folder.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mypy import api as mypy_api

import safepool
from helpers import START_METHODS
from safepool import PoolAccessor, PoolManager, register_pool

ROOT = Path(__file__).resolve().parent.parent
CHECKS = sorted((ROOT / "tests" / "typecheck").glob("check_*.py"))
GUIDE = ROOT / "docs" / "guides" / "typing.md"
RUN_TIMEOUT = 120.0

# A user script with the two mistakes the issue names: both must be errors under --strict.
USER_SCRIPT = """\
import sqlite3

import safepool


def count(conn: sqlite3.Connection, table: str) -> int:
    return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def connect() -> sqlite3.Connection:
    return sqlite3.connect("x.db", check_same_thread=False)


with safepool.PoolManager() as manager:
    pool = manager.SafeConnectionPool(factory=connect)
    rows: str = pool.call(count, "t")
    with pool.lease() as conn:
        conn.execute("SELECT 1")
"""


def guide_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", GUIDE.read_text(), flags=re.DOTALL | re.MULTILINE)


def test_mypy_strict(tmp_path: Path) -> None:
    """One mypy run (~7 s cold): the typecheck files and the guide's blocks are clean, and the
    user script's mistakes are caught (a wrong result type from ``call``, a method of the
    connection on a ``HostedItem``)."""
    blocks = guide_blocks()
    assert len(CHECKS) >= 2 and len(blocks) >= 3, "the typing checks or the guide lost examples"
    files = [str(path) for path in CHECKS]
    for number, block in enumerate(blocks, 1):
        files.append(str(tmp_path / f"typing_guide_{number}.py"))
        Path(files[-1]).write_text(block)
    script = tmp_path / "user_script.py"
    script.write_text(USER_SCRIPT)
    out, err, status = mypy_api.run(
        [
            "--config-file", str(ROOT / "pyproject.toml"),
            "--strict", "--warn-unused-ignores", "--warn-unreachable",
            "--cache-dir", str(tmp_path / "mypy-cache"), "--no-error-summary",
            "--hide-error-context", "--no-pretty", *files, str(script),
        ]
    )  # fmt: skip
    assert (err, status) == ("", 1)
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert [line.split(":")[1] for line in errors] == ["16", "18"], out
    assert all(line.startswith(str(script)) for line in errors), out
    assert 'expression has type "int", variable has type "str"' in errors[0]
    assert '"HostedItem[Connection]" has no attribute "execute"' in errors[1]


@pytest.mark.parametrize("start_method", START_METHODS)
@pytest.mark.parametrize("check", CHECKS, ids=lambda path: path.name)
def test_typecheck_files_run(check: Path, start_method: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(check), str(tmp_path), start_method],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "ok\n", "")


# What each Python block of the guide prints, in order.
GUIDE_OUTPUT = ["1\n", "secret\nsec***\n", "1\n1\n"]


def test_guide_blocks_run_in_an_empty_folder(tmp_path: Path) -> None:
    blocks = guide_blocks()
    assert len(blocks) == len(GUIDE_OUTPUT)
    for number, (block, expected) in enumerate(zip(blocks, GUIDE_OUTPUT, strict=True), 1):
        folder = tmp_path / f"block{number}"
        folder.mkdir()
        (folder / "example.py").write_text(block)
        env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
        result = subprocess.run(
            [sys.executable, "example.py"],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            check=False,
        )
        assert (number, result.returncode, result.stderr, result.stdout) == (
            number,
            0,
            "",
            expected,
        )


class TestPoolAccessor:
    def test_calls_the_registered_pool_and_repr_names_it(self, tmp_path: Path) -> None:
        class Server(PoolManager):
            pass

        get_tokens = register_pool(Server, "tokens", str, share="value", max_size=1)
        assert isinstance(get_tokens, PoolAccessor)
        assert (get_tokens.manager_cls, get_tokens.typeid) == (Server, "tokens")
        assert repr(get_tokens) == "<PoolAccessor Server.tokens>"
        with Server() as server:
            pool = get_tokens(server)
            assert isinstance(pool, safepool.PoolProxy)
            assert pool.describe()["name"] == "tokens"
            with pool.lease(timeout=5) as token:
                assert token == ""
            # the accessor and the method reach the same pool
            assert server.tokens().stats().requests == 1  # type: ignore[attr-defined]

    def test_refuses_a_manager_of_another_class_changing_nothing(self) -> None:
        class Server(PoolManager):
            pass

        get_tokens = register_pool(Server, "tokens", str, share="value")
        with PoolManager() as other:
            with pytest.raises(TypeError, match=r"registered on Server; pass an instance of it"):
                get_tokens(other)
            assert not hasattr(other, "tokens")


def test_call_takes_timeout_as_the_wait_for_an_item_and_passes_the_rest_on() -> None:
    """``call``'s implementation takes ``timeout`` out of the keywords its overloads type."""
    with PoolManager() as manager:
        pool = manager.SafeConnectionPool(factory=str, share="value", max_size=1)
        assert pool.call(str.join, ["a", "b"], timeout=5) == "ab"
        with pool.lease(timeout=5), pytest.raises(safepool.PoolTimeout):
            pool.call(str.join, ["a", "b"], timeout=0.05)
        with pytest.raises(TypeError, match="keyword"):
            pool.call(str.join, ["a"], sep="-", timeout=5)
        assert pool.stats().leased == 0
