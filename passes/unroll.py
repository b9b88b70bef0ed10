"""``unroll_rank``: a rank of a known, small size written out, one tensor per index.

Context parallelism merges two states at a time (``passes/context_parallel.py``): its merge,
derived over states stacked along a rank ``W``, becomes a map of two states that every
backend renders as a loop-less kernel on the device (a reduction over a stacked rank reads
as one over a sequence to the kernel stages).  Before → after, ``W`` = 2::

    RM_state[W,P], RD_state[W,P]                       RM_state_0[P], RM_state_1[P], RD_...
    CRM[p] = max[w](RM_state[w,p])                 ->  CRM[p] = max(RM_state_0[p], RM_state_1[p])
    PCRM[w,p] = select(RM_state[w,p] == CRM[p], ..)    PCRM_0[p] = select(RM_state_0[p] == ..)
                                                       PCRM_1[p] = select(RM_state_1[p] == ..)
    CRD[p] = sum[w](RD_state[w,p] * PCRM[w,p])         CRD[p] = RD_state_0[p] * PCRM_0[p]
                                                                + RD_state_1[p] * PCRM_1[p]

Exact where no element is absent: ``sum[w]`` drops absent terms where ``+`` does not, so a
statement with a ``where`` that depends on the rank is refused (:class:`NotUnrollable`),
as is an iterative statement, a reduction other than sum/max/min over it, and a tensor
read over it at anything but its own index.
"""
from __future__ import annotations

import dataclasses

from ..einsum_ir.exprs import children, walk, with_children
from ..einsum_ir.ir import (Access, Binary, Call, Definition, Expr, Index, IterativeEinsum, Num,
                            Reduce, Size, TensorArg)

_FOLD = {"sum": lambda a, b: Binary("+", a, b),
         "max": lambda a, b: Call("max", (a, b)),
         "min": lambda a, b: Call("min", (a, b))}


class NotUnrollable(Exception):
    """Why a rank cannot be written out."""


def unrolled_name(tensor: str, k: int) -> str:
    return f"{tensor}_{k}"


def unroll_rank(defn: Definition, rank: str, count: int) -> Definition:
    """``defn`` with ``rank`` (of size ``count``) written out (see the module docstring):
    an argument or statement over it becomes ``count`` of them, ``unrolled_name(t, k)``."""
    over = {a.name: a.ranks.index(rank) for a in defn.tensor_args if rank in a.ranks}
    over.update({st.tensor: st.lhs.index(rank) for st in defn.statements if rank in st.lhs})
    if any(o.name in over for o in defn.outputs):
        raise NotUnrollable(f"an output is over {rank}")
    params = []
    for p in defn.params:
        if isinstance(p, TensorArg) and p.name in over:
            params += [dataclasses.replace(p, name=unrolled_name(p.name, k),
                                           ranks=_without(p.ranks, over[p.name]))
                       for k in range(count)]
        else:
            params.append(p)
    statements = []
    for st in defn.statements:
        if isinstance(st, IterativeEinsum):
            raise NotUnrollable(f"{st.tensor} is iterative")
        touches = rank in st.lhs or any(isinstance(n, Reduce) and rank in n.ranks
                                        for n in walk(st.expr))
        if touches and st.where is not None:
            raise NotUnrollable(f"{st.tensor} has a 'where' and reads {rank}: a sum over it "
                                f"drops absent terms, a '+' does not")
        if rank not in st.lhs:
            where = st.where and _written_out(st.where, rank, count, over, {})
            statements.append(dataclasses.replace(
                st, expr=_written_out(st.expr, rank, count, over, {}), where=where))
            continue
        for k in range(count):
            statements.append(dataclasses.replace(
                st, tensor=unrolled_name(st.tensor, k), lhs=_without(st.lhs, over[st.tensor]),
                expr=_written_out(st.expr, rank, count, over, {rank: k})))
    return dataclasses.replace(defn, params=tuple(params), statements=tuple(statements),
                               lets=tuple(x for x in defn.lets if x.name != rank))


def _without(ranks: tuple, at: int) -> tuple:
    return ranks[:at] + ranks[at + 1:]


def _written_out(e: Expr, rank: str, count: int, over: dict, env: dict) -> Expr:
    """``e`` with ``rank`` bound to ``env[rank]`` (where bound) and reductions over it
    folded into ``count`` terms."""
    if isinstance(e, Index) and e.rank == rank:
        if rank not in env:
            raise NotUnrollable(f"{rank} is read outside a statement or reduction over it")
        return Num(env[rank])
    if isinstance(e, Size) and e.rank == rank:
        return Num(count)
    if isinstance(e, Access) and e.tensor in over:
        at = over[e.tensor]
        own = e.subscripts[at]
        if not (isinstance(own, Index) and own.rank == rank) or rank not in env:
            raise NotUnrollable(f"{e.tensor} is read over {rank} at another index than its own")
        subs = tuple(_written_out(s, rank, count, over, env) for s in _without(e.subscripts, at))
        return Access(unrolled_name(e.tensor, env[rank]), subs, e.loc)
    if isinstance(e, Reduce) and rank in e.ranks:
        if e.op not in _FOLD:
            raise NotUnrollable(f"a {e.op}[{rank}] has no binary form")
        terms = [_written_out(e.body, rank, count, over, dict(env, **{rank: k}))
                 for k in range(count)]
        folded = terms[0]
        for t in terms[1:]:
            folded = _FOLD[e.op](folded, t)
        rest = tuple(r for r in e.ranks if r != rank)
        return dataclasses.replace(e, ranks=rest, body=folded) if rest else folded
    kids = children(e)
    if not kids:
        return e
    return with_children(e, tuple(_written_out(c, rank, count, over, env) for c in kids))
