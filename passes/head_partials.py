"""``head_partials``: a sum over a long rank pushed past the statements that read it linearly,
so that no kernel holds that rank whole; the gradients then come as parts over that rank,
which the host adds.

Talking-heads attention mixes the heads' scores, ``T[h,p,m] = sum[g](W[h,g] * S[g,p,m])``,
so its backward sums the mixed heads back, ``dS_1[g,p,m] = sum[h](dS_1_heads[h,g,p,m])``;
a kernel making ``dQ`` from ``dS_1`` would hold every ``h`` (a long rank: ``W[H,G]``,
``V[H,M,F]``).  Each reader that is linear in ``dS_1`` sums ``h`` itself instead, and the
gradient is made per ``h`` (a grid rank) and added on the host.  Before → after::

    dS_1[g,p,m] = sum[h](dS_1_heads[h,g,p,m])
    dQ_1[g,p,e] = sum[m](dS_1[g,p,m] * K[g,m,e] * scale)   where m <= p + M - P
    dQ[g,p,e]   = dQ_1[g,p,e]
 ->
    dQ_1_by_h[g,p,e,h] = sum[m](dS_1_heads[h,g,p,m] * K[g,m,e] * scale)   where m <= p + M - P
    dQ = the sum of dQ_1_by_h over its trailing h       (on the host)

``sum[m](sum[h](x) * k) == sum[m, h](x * k)`` holds for present elements as the contract
defines them: a point is computed where all its reads are, and a sum adds its present
points (both sides are absent only where no point is).
"""
from __future__ import annotations

import dataclasses

from ..einsum_ir.exprs import transform, walk
from ..einsum_ir.ir import Access, Binary, Definition, Einsum, Expr, Index, Reduce, Unary
from .tile_loads import substitute


def _sums_over(cascade: Definition, rank_size) -> list[Einsum]:
    """Statements ``X[..] = sum[h](Y[..])`` over a rank of the given size (not outputs)."""
    outputs = {o.name for o in cascade.outputs}
    return [st for st in cascade.statements
            if isinstance(st, Einsum) and st.tensor not in outputs and st.where is None
            and isinstance(st.expr, Reduce) and st.expr.op == "sum"
            and len(st.expr.ranks) == 1 and rank_size(st.expr.ranks[0])
            and isinstance(st.expr.body, Access)]


def _linear_factor(e: Expr, name: str) -> bool:
    """``name`` read once in ``e``, as a factor of its product (``a * X * b``, ``X / c``,
    ``-X``), nowhere else (not inside a call, a subscript, a sum or a divisor)."""
    reads = [n for n in walk(e) if isinstance(n, Access) and n.tensor == name]
    if len(reads) != 1:
        return False

    def along(x: Expr) -> bool:
        if isinstance(x, Access):
            return x.tensor == name
        if isinstance(x, Unary) and x.op == "-":
            return along(x.operand)
        if isinstance(x, Binary) and x.op == "*":
            return along(x.left) or along(x.right)
        if isinstance(x, Binary) and x.op == "/":
            return along(x.left)
        return False

    return along(e)


def pushed_sums(cascade: Definition, rank_size) -> tuple[Definition, dict[str, str]]:
    """``cascade`` with every sum over a rank ``rank_size`` accepts pushed into its
    readers (each must read it linearly, see :func:`_linear_factor`); returns the new
    cascade and, per rewritten reader, the rank it now also sums.  Unchanged when a
    reader is not linear."""
    summed: dict[str, str] = {}
    for st in _sums_over(cascade, rank_size):
        readers = [r for r in cascade.statements if any(
            isinstance(n, Access) and n.tensor == st.tensor
            for e in (r.expr, r.where) if e is not None for n in walk(e))]
        if not readers or not all(
                isinstance(r, Einsum) and (r.where is None or st.tensor not in
                                           {n.tensor for n in walk(r.where)
                                            if isinstance(n, Access)})
                and _linear_factor(r.expr.body if isinstance(r.expr, Reduce) and
                                   r.expr.op == "sum" else r.expr, st.tensor)
                for r in readers):
            continue
        (h,) = st.expr.ranks
        statements = []
        for r in cascade.statements:
            if r not in readers:
                if r is not st:
                    statements.append(r)
                continue
            used = set(r.lhs) | {x for n in walk(r.expr) if isinstance(n, Reduce)
                                 for x in n.ranks}
            if h in used:
                return cascade, {}  # (a fresh alias would need a let: not needed so far)

            def summand(n: Expr, st=st) -> Access | None:
                """A read of the sum: its summand, ``h`` now the reader's own index."""
                if not (isinstance(n, Access) and n.tensor == st.tensor):
                    return None
                point = dict(zip(st.lhs, n.subscripts))
                point[h] = Index(h)
                body = st.expr.body
                return Access(body.tensor, tuple(substitute(s, point) for s in body.subscripts))

            if isinstance(r.expr, Reduce) and r.expr.op == "sum":
                expr = Reduce("sum", r.expr.ranks + (h,), transform(r.expr.body, summand))
            else:
                expr = Reduce("sum", (h,), transform(r.expr, summand))
            statements.append(dataclasses.replace(r, expr=expr))
            summed[r.tensor] = h
        cascade = dataclasses.replace(cascade, statements=tuple(statements))
    return cascade, summed
