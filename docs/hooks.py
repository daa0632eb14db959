"""MkDocs hooks: the home page is the README, so the two never drift apart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

HOME = "https://github.com/safepool/safepool/blob/main/docs/"


def on_page_read_source(page: Any, config: Any) -> str | None:
    if page.file.src_uri != "index.md":
        return None
    readme = Path(config["docs_dir"]).parent / "README.md"
    return readme.read_text(encoding="utf-8").replace(HOME, "")
