"""``canonicalize``: one reduction per Einsum, at the root of its right-hand side.

Every reduction that is nested in, or sits inside a map of, a larger
expression moves into an Einsum of its own, innermost first.  Before → after::

    SD[p] = sum[m](SN[p,m]) + exp(-GM[p])
    SD_sum[p] = sum[m](SN[p,m])
    SD[p] = SD_sum[p] + exp(-GM[p])

    O[p,f] = sum[m](exp(S[p,m] - max[m](S[p,m])) * V[m,f])   where m <= p
    O_max[p] = max[m](S[p,m])                                  where m <= p
    O[p,f] = sum[m](exp(S[p,m] - O_max[p]) * V[m,f])         where m <= p

The temporary's ranks are the reduction's free variables, plus the ``where``'s
variables when the ``where`` applies at that reduction's level, so it keeps
the source statement's meaning (absent where nothing was computed).  A
``where`` that no level of the rewritten statement has in scope any more is
dropped from it (it applied only inside the extracted reduction)::

    GM[p] = exp(max[m](QK[p,m]))   where m <= p
    GM_max[p] = max[m](QK[p,m])    where m <= p
    GM[p] = exp(GM_max[p])

A reduction inside a ``where`` is not filtered by that ``where``; it becomes an
unfiltered temporary over its free variables::

    X[p] = A[p,0]   where A[p,0] > max[m](A[p,m])
    X_max[p] = max[m](A[p,m])
    X[p] = A[p,0]   where A[p,0] > X_max[p]
"""
from __future__ import annotations

import dataclasses

from ..einsum_ir.exprs import children, free_ranks, walk, with_children
from ..einsum_ir.ir import (Access, Definition, Einsum, Expr, Index, IterativeEinsum, Reduce,
                            Statement)
from .names import fresh_name


def _taken_names(defn: Definition) -> set[str]:
    names = {p.name for p in defn.params} | set(defn.ranks) | {r.lower() for r in defn.ranks}
    return names | {st.tensor for st in defn.statements}


def _lhs_scope(st: Statement) -> tuple[str, ...]:
    if isinstance(st, IterativeEinsum) and st.init:
        return tuple(r for r in st.lhs if r != st.iter_rank)
    return st.lhs


def _innermost_nonroot(e: Expr, path=()):
    """Path of a reduction to extract: one whose body holds no reduction, not the root."""
    found = None
    for i, c in enumerate(children(e)):
        found = found or _innermost_nonroot(c, path + (i,))
    if found is not None:
        return found
    if isinstance(e, Reduce) and path:
        return path
    return None


def _scope_at(e: Expr, path, outer: tuple[str, ...]) -> tuple[str, ...]:
    scope = list(outer)
    for i in path:
        if isinstance(e, Reduce):
            scope += [r for r in e.ranks if r not in scope]
        e = children(e)[i]
    return tuple(scope)


def _node_at(e: Expr, path):
    for i in path:
        e = children(e)[i]
    return e


def _replace_at(e: Expr, path, new: Expr) -> Expr:
    if not path:
        return new
    kids = list(children(e))
    kids[path[0]] = _replace_at(kids[path[0]], path[1:], new)
    return with_children(e, tuple(kids))


def _extract_one(st: Statement, path, taken: set[str]) -> tuple[Einsum, Statement]:
    red: Reduce = _node_at(st.expr, path)
    scope = _scope_at(st.expr, path, _lhs_scope(st))
    need = set(free_ranks(red))
    where = None
    if st.where is not None and free_ranks(st.where) <= set(scope) | set(red.ranks):
        where = st.where
        need |= free_ranks(st.where) - set(red.ranks)
    ranks = tuple(r for r in scope if r in need)
    name = fresh_name(f"{st.tensor}_{red.op}", taken)
    temp = Einsum(name, ranks, red, where, loc=st.loc)
    use = Access(name, tuple(Index(r, loc=red.loc) for r in ranks), loc=red.loc)
    return temp, dataclasses.replace(st, expr=_replace_at(st.expr, path, use))


def _extract_from_where(st: Statement, taken: set[str]) -> tuple[Einsum, Statement] | None:
    """Move the innermost reduction of ``st.where`` into an unfiltered temporary."""
    if st.where is None or (path := _innermost_reduce(st.where)) is None:
        return None
    red: Reduce = _node_at(st.where, path)
    free = free_ranks(red)
    scope = _scope_at(st.where, path, tuple(_rank_order(st.where)))
    ranks = tuple(r for r in scope if r in free)
    name = fresh_name(f"{st.tensor}_{red.op}", taken)
    temp = Einsum(name, ranks, red, None, loc=st.loc)
    use = Access(name, tuple(Index(r, loc=red.loc) for r in ranks), loc=red.loc)
    return temp, dataclasses.replace(st, where=_replace_at(st.where, path, use))


def _innermost_reduce(e: Expr, path=()):
    for i, c in enumerate(children(e)):
        if (found := _innermost_reduce(c, path + (i,))) is not None:
            return found
    return path if isinstance(e, Reduce) else None


def _rank_order(e: Expr) -> list[str]:
    """Ranks used in ``e`` (free or bound), in order of first use: a deterministic layout."""
    order: dict[str, None] = {}
    for n in walk(e):
        if isinstance(n, Index):
            order.setdefault(n.rank, None)
        elif isinstance(n, Reduce):
            for r in n.ranks:
                order.setdefault(r, None)
    return list(order)


def _where_applies(st: Statement) -> bool:
    """Whether some level of ``st`` (its LHS or a reduction) has all the where's variables."""
    need = free_ranks(st.where)
    return any(need <= scope for scope in _level_scopes(st.expr, frozenset(_lhs_scope(st))))


def _level_scopes(e: Expr, scope: frozenset[str]):
    yield scope
    if isinstance(e, Reduce):
        scope = scope | frozenset(e.ranks)
        yield scope
    for c in children(e):
        yield from _level_scopes(c, scope)


def split_reductions(st: Statement, taken: set[str]) -> list[Statement]:
    """``st`` as temporaries plus itself, each with at most one reduction, at its root."""
    out: list[Statement] = []
    while (moved := _extract_from_where(st, taken)) is not None:
        temp, st = moved
        out.append(temp)
    while (path := _innermost_nonroot(st.expr)) is not None:
        temp, st = _extract_one(st, path, taken)
        out.append(temp)
    if st.where is not None and not _where_applies(st):
        st = dataclasses.replace(st, where=None)
    out.append(st)
    return out


def fold_constants(e: Expr) -> Expr:
    """Arithmetic on literals computed once: ``1 / 2 * x`` -> ``0.5 * x``.

    Only results that print back as the same tree are folded (non-negative,
    finite numbers), so the cascade still round-trips through ``.attn``.
    """
    import math

    from ..einsum_ir.exprs import transform
    from ..einsum_ir.ir import Binary, Num

    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
           "/": lambda a, b: a / b}

    def fold(n):
        if (isinstance(n, Binary) and n.op in ops and isinstance(n.left, Num)
                and isinstance(n.right, Num) and not (n.op == "/" and n.right.value == 0)):
            value = ops[n.op](n.left.value, n.right.value)
            if isinstance(value, float) and value.is_integer() and n.op != "/":
                value = int(value) if all(isinstance(x.value, int) for x in (n.left, n.right)) else value
            if math.isfinite(value) and value >= 0:
                return Num(value, loc=n.loc)
        return None
    return transform(e, fold)


def eliminate_common_subexpressions(defn: Definition) -> Definition:
    """A plain Einsum equal to an earlier one (same ranks, expression and ``where``) is
    dropped and its readers read the earlier tensor.  Before → after::

        GM1[p] = max[m](S[p,m]);  GM2[p] = max[m](S[p,m]);  X[p] = GM1[p] - GM2[p]
        GM1[p] = max[m](S[p,m]);  X[p] = GM1[p] - GM1[p]
    """
    from ..einsum_ir.exprs import transform

    outputs = {o.name for o in defn.outputs}
    statements = list(defn.statements)
    while True:
        seen: dict[tuple, str] = {}
        rename: dict[str, str] = {}
        for st in statements:
            if not isinstance(st, Einsum):
                continue
            key = (st.lhs, st.expr, st.where)
            if key in seen and st.tensor not in outputs:
                rename[st.tensor] = seen[key]
            else:
                seen.setdefault(key, st.tensor)
        if not rename:
            return dataclasses.replace(defn, statements=tuple(statements))

        def fix(n):
            if isinstance(n, Access) and n.tensor in rename:
                return Access(rename[n.tensor], n.subscripts, loc=n.loc)
            return None
        statements = [dataclasses.replace(st, expr=transform(st.expr, fix),
                                          where=None if st.where is None else transform(st.where, fix))
                      for st in statements if st.tensor not in rename]


def canonicalize(defn: Definition) -> Definition:
    """One reduction per Einsum at its root, literals folded, duplicate Einsums merged."""
    taken = _taken_names(defn)
    statements: list[Statement] = []
    for st in defn.statements:
        st = dataclasses.replace(st, expr=fold_constants(st.expr),
                                 where=None if st.where is None else fold_constants(st.where))
        statements += split_reductions(st, taken)
    return eliminate_common_subexpressions(dataclasses.replace(defn, statements=tuple(statements)))
