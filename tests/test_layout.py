"""The size limits of the layout: modules a newcomer can read in one sitting, functions on one screen.

A module over :data:`MAX_MODULE_LINES` must say why in its docstring (a line
containing "one module" and the reason); a function body (docstring
excluded) must stay within :data:`MAX_FUNCTION_CODE_LINES` lines of code
(blank and comment-only lines not counted).
"""

from __future__ import annotations

import ast
import pathlib

import jaxnet

MAX_MODULE_LINES = 500
MAX_FUNCTION_CODE_LINES = 80
PACKAGE = pathlib.Path(jaxnet.__file__).parent


def _code_lines(lines: list[str], first: int, last: int) -> int:
    return sum(1 for line in lines[first - 1 : last] if line.strip() and not line.strip().startswith("#"))


def _function_sizes(path: pathlib.Path, root: pathlib.Path = PACKAGE.parent) -> list[tuple[str, int]]:
    """``("path:line name", code lines)`` of every function and method in ``path``."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    sizes = []
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        body = node.body
        if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            body = body[1:]  # the docstring
        if body:
            where = f"{path.relative_to(root)}:{node.lineno} {node.name}"
            sizes.append((where, _code_lines(lines, body[0].lineno, node.end_lineno or body[-1].lineno)))
    return sizes


def test_code_line_count_skips_blanks_comments_and_the_docstring(tmp_path):
    src = tmp_path / "m.py"
    src.write_text('def f():\n    """Doc.\n\n    More."""\n    # why\n\n    x = 1\n    return x\n', encoding="utf-8")
    assert _function_sizes(src, tmp_path) == [("m.py:1 f", 2)]


def test_no_module_over_the_limit_without_a_stated_reason():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > MAX_MODULE_LINES and "one module" not in (ast.get_docstring(ast.parse(text)) or ""):
            long.append(f"{path.relative_to(PACKAGE.parent)} ({len(text.splitlines())} lines)")
    assert not long, f"split these modules or say in their docstring why each stays one module: {long}"


def test_no_function_over_the_limit():
    long = [
        f"{where} ({n} lines of code)"
        for path in sorted(PACKAGE.rglob("*.py"))
        for where, n in _function_sizes(path)
        if n > MAX_FUNCTION_CODE_LINES
    ]
    assert not long, f"split these functions: {long}"
