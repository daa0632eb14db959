"""Rules the source follows that no linter checks."""

from __future__ import annotations

import ast
from pathlib import Path

import safepool

SOURCE = Path(safepool.__file__).parent


def _guarded_while_loops(tree: ast.AST) -> list[int]:
    """Line numbers of `while <condition>:` loops inside a `with` or `try` of the same function.

    On CPython 3.13.0 an exception raised (by a signal handler) at such a loop's back edge
    misses the handlers of its own function (CPython issue 108214): `with lock:` around it can
    leave the lock held. `for` loops and `while True: ... break` are not affected.
    """
    found: list[int] = []

    def visit(node: ast.AST, guarded: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, False)  # a new frame: its own handlers
                continue
            inner = guarded or isinstance(child, (ast.With, ast.Try))
            constant_true = isinstance(child, ast.While) and (
                isinstance(child.test, ast.Constant) and child.test.value is True
            )
            if isinstance(child, ast.While) and guarded and not constant_true:
                found.append(child.lineno)
            visit(child, inner)

    visit(tree, False)
    return found


def test_no_conditional_while_loop_inside_a_with_or_try() -> None:
    offenders = {
        f"{path.name}:{line}"
        for path in sorted(SOURCE.glob("*.py"))
        for line in _guarded_while_loops(ast.parse(path.read_text(), str(path)))
    }
    assert not offenders, (
        f"`while cond:` inside with/try (CPython issue 108214): {sorted(offenders)}; "
        "use `for` or `while True: ... break`"
    )


def test_the_rule_finds_what_it_looks_for() -> None:
    source = "def f(lock):\n    with lock:\n        while g():\n            pass\n"
    assert _guarded_while_loops(ast.parse(source)) == [3]
    assert _guarded_while_loops(ast.parse(source.replace("g()", "True"))) == []
