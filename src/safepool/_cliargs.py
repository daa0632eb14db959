"""Argument types shared by the command line's commands (argparse ``type=`` callables)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

__all__ = ["whole_number"]


def whole_number(
    minimum: int, maximum: int | None = None, *, what: str | None = None
) -> Callable[[str], int]:
    """A whole number in ``[minimum, maximum]``; a bad one says what is wanted (``what``, or the
    bound it broke)."""

    def parse(text: str) -> int:
        try:
            value: int | None = int(text)
        except ValueError:
            value = None
        if value is not None and value >= minimum and (maximum is None or value <= maximum):
            return value
        if what is not None:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        if value is None:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}")
        bound = f">= {minimum}" if maximum is None else f"{minimum}-{maximum}"
        raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")

    return parse
