"""The language's size limits, checked on the parse tree before anything recurses over it.

* An expression nests at most ``MAX_EXPR_DEPTH`` levels (every operator, call, reduction,
  access and operand is a level; a chained comparison is one).  A sum of 1,000 terms is
  about 1,000 levels deep: left-associative operators nest.
* An integer literal has at most ``MAX_INT_DIGITS`` digits, so it converts to a float.

The passes recurse over expressions (a few Python frames per level), so the compiler
runs under :func:`recursion_room`, which raises Python's recursion limit enough for the
deepest expression the language allows.
"""
from __future__ import annotations

import contextlib
import sys

from lark import Token, Tree

from ..einsum_ir.diagnostics import Collector
from ..einsum_ir.ir import Loc

MAX_EXPR_DEPTH = 2000
MAX_INT_DIGITS = 300  # 10**308 is the largest float
FRAMES_PER_LEVEL = 20  # the deepest recursion of any pass, with room to spare
EXPR_RULES = frozenset({"or_op", "and_op", "not_op", "compare", "binop", "unary", "number",
                        "name", "access", "reduce", "call"})


def check_limits(tree: Tree, filename: str, errors: Collector) -> None:
    """Report expressions nested deeper than the limit (once) and over-long integer literals.

    Iterative, so a spec of any depth gets a located error instead of a RecursionError.
    """
    too_deep = False
    stack: list[tuple[Tree | Token | None, int]] = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, Token):
            _check_literal(node, filename, errors)
            continue
        if not isinstance(node, Tree):
            continue  # an absent optional part
        depth += node.data in EXPR_RULES
        if depth > MAX_EXPR_DEPTH:
            if not too_deep:
                errors.error(f"expression nested more than {MAX_EXPR_DEPTH} levels deep",
                             _tree_loc(node, filename),
                             "split it into several statements with temporaries")
            too_deep = True
            continue
        stack.extend((c, depth) for c in node.children)


def _check_literal(tok: Token, filename: str, errors: Collector) -> None:
    if tok.type == "NUMBER" and tok.isdigit() and len(tok) > MAX_INT_DIGITS:
        errors.error(f"integer literal of {len(tok)} digits (at most {MAX_INT_DIGITS})",
                     Loc(filename, tok.line, tok.column), "write it as a float: 1e300")


def _tree_loc(node: Tree, filename: str) -> Loc:
    meta = node.meta
    return Loc(filename, getattr(meta, "line", 1) or 1, getattr(meta, "column", 1) or 1)


@contextlib.contextmanager
def recursion_room():
    """Python's recursion limit raised for expressions ``MAX_EXPR_DEPTH`` deep, then restored."""
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, FRAMES_PER_LEVEL * MAX_EXPR_DEPTH))
    try:
        yield
    finally:
        sys.setrecursionlimit(old)
