"""Generic traversal of IR expressions: children, rebuilding, free index variables."""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

from .ir import Access, Binary, Call, Expr, Index, Reduce, Unary


def children(e: Expr) -> tuple[Expr, ...]:
    if isinstance(e, Access):
        return e.subscripts
    if isinstance(e, Unary):
        return (e.operand,)
    if isinstance(e, Binary):
        return (e.left, e.right)
    if isinstance(e, Call):
        return e.args
    if isinstance(e, Reduce):
        return (e.body,)
    return ()


def with_children(e: Expr, kids: tuple[Expr, ...]) -> Expr:
    """``e`` with its children replaced (same node type, same location)."""
    if isinstance(e, Access):
        return dataclasses.replace(e, subscripts=tuple(kids))
    if isinstance(e, Unary):
        return dataclasses.replace(e, operand=kids[0])
    if isinstance(e, Binary):
        return dataclasses.replace(e, left=kids[0], right=kids[1])
    if isinstance(e, Call):
        return dataclasses.replace(e, args=tuple(kids))
    if isinstance(e, Reduce):
        return dataclasses.replace(e, body=kids[0])
    return e


def walk(e: Expr) -> Iterator[Expr]:
    """Pre-order traversal (iterative: linear time and no recursion limit at any depth)."""
    stack = [e]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(reversed(children(node)))


def transform(e: Expr, fn: Callable[[Expr], Expr | None]) -> Expr:
    """Bottom-up rewrite: ``fn`` returns a replacement, or None to keep the node."""
    kids = children(e)
    if kids:
        new = tuple(transform(c, fn) for c in kids)
        if any(a is not b for a, b in zip(new, kids)):
            e = with_children(e, new)
    out = fn(e)
    return e if out is None else out


def free_ranks(e: Expr) -> frozenset[str]:
    """Ranks whose index variables occur free in ``e`` (reductions bind theirs)."""
    if isinstance(e, Index):
        return frozenset((e.rank,))
    if isinstance(e, Reduce):
        return free_ranks(e.body) - frozenset(e.ranks)
    out: frozenset[str] = frozenset()
    for c in children(e):
        out |= free_ranks(c)
    return out


def accessed_tensors(e: Expr) -> frozenset[str]:
    return frozenset(n.tensor for n in walk(e) if isinstance(n, Access))


def reductions(e: Expr) -> list[Reduce]:
    return [n for n in walk(e) if isinstance(n, Reduce)]


def product_factors(e: Expr) -> list[Expr]:
    """Flatten a ``*`` tree into its factors."""
    if isinstance(e, Binary) and e.op == "*":
        return product_factors(e.left) + product_factors(e.right)
    return [e]
