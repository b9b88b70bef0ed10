"""The Einstein *term* rule: make implicit sums explicit.

An index variable that occurs on the right-hand side, is not on the LHS and is
not bound by an explicit reduction, is summed over its *term*: start at the
smallest subexpression holding all its occurrences (a use inside a subscript
counts as a use at that access) and climb only through ``*``, ``/`` and unary
``-``.  Before → after::

    QK[p,m] = Q[p,e] * K[m,e] * scale - B[p,m]
    QK[p,m] = sum[e](Q[p,e] * K[m,e] * scale) - B[p,m]

    S[p,m] = cap * tanh(Q[p,e] * K[m,e] / cap)
    S[p,m] = cap * tanh(sum[e](Q[p,e] * K[m,e] / cap))
"""
from __future__ import annotations

from ..einsum_ir.exprs import children, free_ranks, with_children
from ..einsum_ir.ir import Access, Binary, Expr, Index, Reduce, Unary

Path = tuple[int, ...]


def _occurrences(e: Expr, rank: str, path: Path = ()) -> list[Path]:
    """Paths of the nodes where ``rank``'s variable is used free (accesses count whole)."""
    if isinstance(e, Index):
        return [path] if e.rank == rank else []
    if isinstance(e, Access):
        return [path] if any(rank in free_ranks(s) for s in e.subscripts) else []
    if isinstance(e, Reduce) and rank in e.ranks:
        return []
    out: list[Path] = []
    for i, c in enumerate(children(e)):
        out += _occurrences(c, rank, path + (i,))
    return out


def _node_at(e: Expr, path: Path) -> Expr:
    for i in path:
        e = children(e)[i]
    return e


def _common_prefix(paths: list[Path]) -> Path:
    first = paths[0]
    n = len(first)
    for p in paths[1:]:
        n = min(n, len(p))
        for k in range(n):
            if p[k] != first[k]:
                n = k
                break
    return first[:n]


def _is_factor_link(parent: Expr) -> bool:
    return (isinstance(parent, Binary) and parent.op in ("*", "/")) or (
        isinstance(parent, Unary) and parent.op == "-"
    )


def term_path(e: Expr, rank: str) -> Path:
    """The path of ``rank``'s term in ``e`` (see the module docstring)."""
    path = _common_prefix(_occurrences(e, rank))
    while path and _is_factor_link(_node_at(e, path[:-1])):
        path = path[:-1]
    return path


def _wrap_at(e: Expr, path: Path, ranks: tuple[str, ...]) -> Expr:
    if not path:
        return Reduce("sum", ranks, e, loc=getattr(e, "loc", None))
    kids = list(children(e))
    kids[path[0]] = _wrap_at(kids[path[0]], path[1:], ranks)
    return with_children(e, tuple(kids))


def _first_use_order(e: Expr, ranks: set[str]) -> list[str]:
    order: list[str] = []

    def visit(x: Expr) -> None:
        if isinstance(x, Index) and x.rank in ranks and x.rank not in order:
            order.append(x.rank)
        for c in children(x):
            visit(c)

    visit(e)
    return order


def make_implicit_sums_explicit(e: Expr, bound: set[str] | frozenset[str]) -> Expr:
    """Wrap each implicitly summed variable's term in ``sum[...]`` (deepest terms first)."""
    implicit = set(free_ranks(e)) - set(bound)
    if not implicit:
        return e
    groups: dict[Path, list[str]] = {}
    for rank in _first_use_order(e, implicit):
        groups.setdefault(term_path(e, rank), []).append(rank)
    for path in sorted(groups, key=lambda p: (-len(p), p)):
        e = _wrap_at(e, path, tuple(groups[path]))
    return e
