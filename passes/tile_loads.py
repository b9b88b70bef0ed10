"""Blocked copies of inputs become loads at their uses (part of the ``tile`` stage).

The online pass streams an input through a blocked copy, ``BK[m1,m0,e] = K[m1*M0 + m0,
e]``; a kernel never materialises it: each use reads the input directly.  Before → after::

    BK[m1,m0,e] = K[m1*M0 + m0, e]
    BQK[m1,m0,p] = Q[p,e] * BK[m1,m0,e]      ->   BQK[m1,m0,p] = Q[p,e] * K[m1*M0 + m0, e]
"""
from __future__ import annotations

import dataclasses

from ..einsum_ir.exprs import children, with_children
from ..einsum_ir.ir import Access, Einsum, Expr, Index
from .tile import TileProgram


def inline_loads(tp: TileProgram) -> tuple[dict[str, Einsum], tuple]:
    """The blocked copies of the loop body, and the body without them."""
    inputs = {a.name for a in tp.cascade.tensor_args}
    loads = {}
    for st in tp.body:
        if (isinstance(st, Einsum) and st.where is None and isinstance(st.expr, Access)
                and st.expr.tensor in inputs and st.tensor not in tp.kept):
            loads[st.tensor] = st
    body = tuple(s for s in tp.body if s.tensor not in loads)
    return loads, body


def substitute(e: Expr, mapping: dict[str, Expr]) -> Expr:
    """``e`` with index variables replaced by expressions."""
    if isinstance(e, Index) and e.rank in mapping:
        return mapping[e.rank]
    kids = children(e)
    if not kids:
        return e
    return with_children(e, tuple(substitute(k, mapping) for k in kids))


def expand_loads(e: Expr, loads: dict[str, Einsum]) -> Expr:
    """Replace each access of a blocked copy by the access it copies."""
    if isinstance(e, Access) and e.tensor in loads:
        st = loads[e.tensor]
        mapping = dict(zip(st.lhs, e.subscripts))
        return substitute(st.expr, mapping)
    kids = children(e)
    if not kids:
        return e
    return with_children(e, tuple(expand_loads(k, loads) for k in kids))


def expanded_body(tp: TileProgram) -> tuple[dict[str, Einsum], tuple]:
    """The loop body with its blocked copies inlined as loads: (the copies, the body)."""
    loads, body = inline_loads(tp)
    body = tuple(dataclasses.replace(s, expr=expand_loads(s.expr, loads),
                                     where=None if s.where is None else
                                     expand_loads(s.where, loads))
                 for s in body)
    return loads, body
