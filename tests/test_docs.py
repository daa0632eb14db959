"""The documentation runs as written: every Python block of the README and of docs/, each on its
own, in an empty folder, offline, with only safepool (and the test extra) installed.

A block that needs PostgreSQL or Redis gets the test machine's addresses through
``SAFEPOOL_TEST_DSN``/``SAFEPOOL_TEST_REDIS`` (the blocks read them, with the local defaults) and is
skipped (failed under ``SAFEPOOL_REQUIRE_SERVICES=1``) when that server is not reachable. The
README's links must work on a package index page too: absolute, and pointing at files that exist.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)
HOME = "https://github.com/safepool/safepool/blob/main/"
RAW = "https://github.com/safepool/safepool/raw/main/"  # images, as a package index shows them
RUN_TIMEOUT = 90


def _blocks() -> list[pytest.param]:
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            name = f"{page.relative_to(ROOT)}:{line}"
            found.append(pytest.param(match.group(1), id=name))
    return found


BLOCKS = _blocks()


def test_the_documentation_has_python_blocks() -> None:
    assert len(BLOCKS) >= 25


def _services(code: str, request: pytest.FixtureRequest) -> dict[str, str]:
    env = {}
    if "SAFEPOOL_TEST_DSN" in code:
        env["SAFEPOOL_TEST_DSN"] = request.getfixturevalue("pg_dsn")
    if "SAFEPOOL_TEST_REDIS" in code:
        env["SAFEPOOL_TEST_REDIS"] = request.getfixturevalue("redis_url")
    return env


@pytest.mark.parametrize("code", BLOCKS)
def test_block_runs_as_written(code: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    script = tmp_path / "example.py"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAFEPOOL_", "PYTHONPATH"))}
    env.update(_services(code, request))
    env["SAFEPOOL_AUTHKEY"] = "docs-example-authkey-0123456789abcdef"
    done = subprocess.run(
        [sys.executable, str(script)],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr


def _links(text: str) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r'src="([^"]+)"', text)


def test_readme_links_work_on_a_package_index_page() -> None:
    text = (ROOT / "README.md").read_text()
    links = _links(text)
    assert links
    for link in links:
        assert link.startswith(("https://", "#")), f"relative link {link!r} breaks on PyPI"
        for prefix in (HOME, RAW):
            if link.startswith(prefix):
                path = ROOT / link.removeprefix(prefix).split("#")[0]
                assert path.exists(), f"{link} names {path}, which does not exist"


@pytest.mark.parametrize("page", PAGES[1:], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_in_docs_point_at_pages_that_exist(page: Path) -> None:
    for link in _links(page.read_text()):
        if link.startswith(("https://", "http://", "#", "mailto:")):
            continue
        target = (page.parent / link.split("#")[0]).resolve()
        assert target.exists(), f"{page.name}: {link} -> {target} does not exist"
