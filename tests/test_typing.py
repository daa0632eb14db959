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
import textwrap
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

# mypy takes ~10 s cold; the tests share one cache (per xdist worker) and run in one group.
pytestmark = pytest.mark.xdist_group("mypy")


def guide_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", GUIDE.read_text(), flags=re.DOTALL | re.MULTILINE)


def mypy(*args: str, cache: Path) -> tuple[str, int]:
    out, err, status = mypy_api.run(
        [
            "--config-file", str(ROOT / "pyproject.toml"),
            "--strict", "--warn-unused-ignores", "--warn-unreachable",
            "--cache-dir", str(cache), "--no-error-summary", "--hide-error-context",
            *args,
        ]
    )  # fmt: skip
    return out + err, status


@pytest.fixture(scope="module")
def mypy_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mypy-cache")


def test_typecheck_files_and_guide_pass_mypy_strict(tmp_path: Path, mypy_cache: Path) -> None:
    blocks = guide_blocks()
    assert len(blocks) >= 3, "docs/guides/typing.md lost its examples"
    files = [str(path) for path in CHECKS]
    for number, block in enumerate(blocks, 1):
        path = tmp_path / f"typing_guide_{number}.py"
        path.write_text(block)
        files.append(str(path))
    output, status = mypy(*files, cache=mypy_cache)
    assert (output, status) == ("", 0)
    assert len(CHECKS) >= 2


def test_mypy_strict_catches_a_wrong_result_type_from_call(
    tmp_path: Path, mypy_cache: Path
) -> None:
    """The issue's test case: a user script annotating a call's result wrongly fails --strict."""
    script = tmp_path / "user_script.py"
    script.write_text(
        textwrap.dedent(
            """\
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
        )
    )
    output, status = mypy(str(script), cache=mypy_cache)
    assert status == 1
    assert re.findall(r"^[^:]+:(\d+): error:", output, flags=re.MULTILINE) == ["16", "18"]
    assert '"int", variable has type "str"' in output
    assert '"HostedItem[Connection]" has no attribute "execute"' in output


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


def test_guide_blocks_run_in_an_empty_folder(tmp_path: Path) -> None:
    for number, block in enumerate(guide_blocks(), 1):
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
        assert (number, result.returncode, result.stderr) == (number, 0, ""), result.stdout


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
