"""The backward as a program of stages: each stage an ordinary cascade that streams once.

The derived backward cascade (:mod:`attnc.passes.backward`) recomputes the forward and
reads row statistics in the same pass that makes them (``SN[p,m] = exp(QK[p,m] - GM[p])``
needs ``GM[p] = max[m](...)`` over the same keys).  A kernel streams the keys once, so the
backward is cut where a reduction over a long rank is read again along that rank: the
reduction becomes the output of an earlier stage and an input of the later ones (saved at
O(rows) memory, FlashAttention-2's row statistics).  Stages are grouped greedily — a
reduction joins the previous stage when that stage still lowers for the target (the
``online`` pass fuses ``GM`` and ``SD`` into one pass, as in the forward) — and so are the
gradients (``dK`` and ``dV`` share a key-major kernel; ``dQ`` gets a query-major one).
Before → after (causal softmax)::

    causal_softmax_backward(Q, K, V, scale, dAV) -> (dQ, dK, dV, dscale)   one cascade

    stage 0: (Q, K, V, scale, dAV)           -> (GM, SD, dSD_1)    rows p, streams m
    stage 1: (..., GM, SD, dSD_1)            -> dQ                 rows p, streams m
    stage 2: (..., GM, SD, dSD_1)            -> (dK, dV)           rows m, streams p
    stage 3: (..., GM, SD, dSD_1)            -> dscale

Each stage is compiled by the ordinary pipeline and lowering, so every backend renders
it; a stage no target kernel can take makes the backward refused for that target with the
stage's reason (numpy then runs the whole cascade Einsum by Einsum).
"""
from __future__ import annotations

import dataclasses
import re
from collections import Counter
from dataclasses import dataclass

import networkx as nx

from ..einsum_ir.exprs import free_ranks, transform, walk
from ..einsum_ir.ir import (Access, Binary, Const, Definition, Einsum, Index,
                            IterativeEinsum, Module, Num, Output, Reduce, Size, Statement,
                            TensorArg)
from ..einsum_ir.kernel import KernelIRError
from ..einsum_ir.printer import print_expr
from ..einsum_ir.schedule import dataflow_graph
from .backward import backward
from .canonicalize import canonicalize
from .head_partials import pushed_sums
from .map_ranks import long_ranks, long_with_lets
from .names import fresh_name, fresh_rank
from .online import equality_condition
from .tile import NotTileable


@dataclass(frozen=True)
class BackwardProgram:
    """``cascade``: the whole backward (its arguments and gradients are the program's);
    ``stages``: definitions run in order, each reading the arguments and what earlier
    stages returned (``saved``: every stage output that is not a gradient)."""

    name: str
    cascade: Definition
    stages: tuple[Definition, ...]
    zeros: tuple[str, ...] = ()   # gradients that are 0 (read only in conditions)
    # the forward with the row statistics the first stages would recompute as outputs too
    # (NAME_with_stats): under autograd it runs instead of NAME and those stages are skipped
    with_stats: Definition | None = None
    # (gradient over no long rank, its parts the host adds: (part, trailing ranks to sum))
    rows: tuple[tuple[str, tuple[tuple[str, int], ...]], ...] = ()
    # ranks the stages assume of size > 0 (an output over them empty changes which
    # contributions exist): (rank, an argument over it, the rank's axis from the end);
    # NAME_backward refuses a call where one is 0
    nonempty: tuple[tuple[str, str, int], ...] = ()
    # gradients that land through an index tensor: the kernels make their contributions
    # per point of the forward's layout, the host adds them at their places (HostScatter)
    scatters: tuple["HostScatter", ...] = ()

    @property
    def saved(self) -> tuple[str, ...]:
        grads = {o.name for o in self.cascade.outputs} | {x for _, parts in self.rows
                                                           for x, _ in parts}
        return tuple(o.name for s in self.stages for o in s.outputs if o.name not in grads)


@dataclass(frozen=True)
class HostScatter:
    """Gradient ``grad`` (of argument ``arg``) made by adding stage output ``part`` (over
    ``part_ranks``) at the places ``targets`` give: one integer expression per rank of
    ``grad``, over ``part_ranks`` and sizes, reading index tensors (an absent index element
    or a place outside the gradient adds nothing).  On torch backends the host adds them
    with ``index_put_(accumulate=True)`` (atomic adds on a GPU)."""

    grad: str
    arg: str
    part: str
    part_ranks: tuple[str, ...]
    targets: tuple[Expr, ...]


def host_scatters(cascade: Definition, dtype: str = "f32"
                  ) -> tuple[Definition, tuple[HostScatter, ...]]:
    """Gradients that scatter through an index tensor, split into what kernels make (a
    contribution per point of the forward's layout) and where the host adds it.  Before →
    after (packed variable-length queries)::

        dQ_1[t,h,e] = sum[b,p,m](X[b,p,h,m] * K[CU[b] + m, h, e])   where m <= p and CU[b] + p == t
        dQ[t,h,e] = dQ_1[t,h,e]
        ->
        dQ_1_at[b,p,h,e] = sum[m](X[b,p,h,m] * K[CU[b] + m, h, e])   where m <= p   (an output)
        dQ[CU[b] + p, h, e] += dQ_1_at[b,p,h,e]                                  (on the host)

    Where one equality goes through an index tensor (``CU[b] + p == t``, ``PT[b, m // PG]
    == np``), every equality that places a gradient rank moves to the host (``m % PG ==
    pg``, and ``h // G == hk``: the part is per head, the host adds a group's heads, as a
    key-major kernel cannot hold the heads of a group).  Several points landing on one
    element add up, as the sum did."""
    by_name = {st.tensor: st for st in cascade.statements}
    found = []
    for out in cascade.outputs:
        if out.name not in by_name or not any(a.name == out.name[1:] for a in cascade.tensor_args):
            continue
        srcs = _contributions(cascade, out.name)
        if len(srcs) != 1 or not isinstance(srcs[0], Einsum) or srcs[0].lhs != out.ranks:
            continue
        split = _scatter_split(srcs[0])
        if split is None:
            continue
        part, targets = split
        statements = tuple(part if st is srcs[0] else st for st in cascade.statements
                           if st.tensor != out.name or st is srcs[0])
        outputs = tuple(o for o in cascade.outputs if o.name != out.name) + (
            Output(part.tensor, part.lhs, dtype),)
        cascade = dataclasses.replace(cascade, statements=statements, outputs=outputs)
        found.append(HostScatter(out.name, out.name[1:], part.tensor, part.lhs, targets))
    return cascade, tuple(found)


def _scatter_split(st: Einsum) -> tuple[Einsum, tuple[Expr, ...]] | None:
    """:func:`host_scatters` for one statement: (the per-point part, the target of each of
    its ranks), or None where ``st`` does not scatter through an index tensor."""
    from .defer_normalization import conjoin, conjuncts

    if not isinstance(st.expr, Reduce) or st.expr.op != "sum" or st.where is None:
        return None
    reduced = frozenset(st.expr.ranks)
    candidates: dict[str, tuple[Expr, Expr]] = {}
    for c in conjuncts(st.where):
        if not (isinstance(c, Binary) and c.op == "=="):
            continue
        for side, other in ((c.left, c.right), (c.right, c.left)):
            if isinstance(side, Index) and side.rank in st.lhs and side.rank not in candidates                     and free_ranks(other) and free_ranks(other) <= reduced:
                candidates[side.rank] = (other, c)
                break
    if not any(isinstance(n, Access) for v in candidates.values() for n in walk(v[0])):
        return None
    host = candidates
    bound = set().union(*(free_ranks(v[0]) for v in host.values()))
    moved = {id(v[1]) for v in host.values()}
    rest = [c for c in conjuncts(st.where) if id(c) not in moved]
    if any(set(host) & free_ranks(e) for e in [st.expr.body, *rest]):
        return None  # the body reads a place it lands on: not a plain scatter
    at_ranks = tuple(r for r in st.expr.ranks if r in bound) + tuple(
        r for r in st.lhs if r not in host)
    remaining = tuple(r for r in st.expr.ranks if r not in bound)
    body = Reduce("sum", remaining, st.expr.body) if remaining else st.expr.body
    part = Einsum(f"{st.tensor}_at", at_ranks, body, conjoin(*rest), loc=st.loc)
    targets = tuple(host[r][0] if r in host else Index(r) for r in st.lhs)
    return part, targets


def _affine_sym(e: Expr):
    """An integer-affine subscript as sympy (indices as ``i_R``; the reassociate pass's
    form), or None where it is not one."""
    from .reassociate import _affine

    return _affine(e)


def _from_sym(x) -> Expr:
    """:func:`_affine_sym`'s inverse (a sum of products, positive terms first)."""
    import sympy

    from ..einsum_ir.ir import Unary

    def atom(a):
        if a.is_Integer:
            return Num(int(a))
        name = a.name
        return Index(name[2:]) if name.startswith("i_") else Size(name)

    def term(t):
        coeff, rest = t.as_coeff_mul()
        factors = [atom(f) for f in rest]
        out = factors[0] if factors else Num(abs(int(coeff)))
        for f in factors[1:]:
            out = Binary("*", out, f)
        if factors and abs(coeff) != 1:
            out = Binary("*", Num(abs(int(coeff))), out)
        return (1 if coeff >= 0 else -1), out

    terms = [term(t) for t in sympy.Add.make_args(sympy.expand(x))]
    terms.sort(key=lambda st: st[0] < 0)  # positive terms first: p + M - P
    sign, out = terms[0]
    out = out if sign > 0 else Unary("-", out)
    for sign, t in terms[1:]:
        out = Binary("+" if sign > 0 else "-", out, t)
    return out


def unshift_gradients(cascade: Definition) -> Definition:
    """A statement over ``t`` that reads a computed tensor at ``t + c`` (``c`` a size
    expression: the adjoint of a read at ``CG[p + M - P]``) is computed over that tensor's
    own rank and shifted once after: the computed tensor is then read where it is made,
    not at another row, and need not be saved whole.  Before → after (GLA)::

        dCG_1[t] = sum[m,e](dS_1[t + P - M, m] * Q[t + P - M, e] * ...)   where ...
        ->
        dCG_1_unshifted[p] = sum[m,e](dS_1[p, m] * Q[p, e] * ...)   where ...
        dCG_1[t] = dCG_1_unshifted[t + P - M]
    """
    import sympy

    computed = {st.tensor: st for st in cascade.statements}
    long = long_with_lets(cascade)
    statements = []
    for st in cascade.statements:
        shift = _shift_of(st, computed, long) if isinstance(st, Einsum) else None
        if shift is None:
            statements.append(st)
            continue
        t, a, c, new = shift
        t_sym = sympy.Symbol(f"i_{t}", integer=True)
        to_new = {t_sym: a * (sympy.Symbol(f"i_{new}", integer=True) - c)}  # (a = ±1)

        def move(e, to_new=to_new, t_sym=t_sym):
            x = _affine_sym(e)
            if x is None or not x.has(t_sym):
                return None
            return _from_sym(x.subs(to_new))

        expr, where = _moved_reads(st.expr, move), _sub_where(st.where, move)
        if any(t in free_ranks(e) for e in (expr, where) if e is not None):
            statements.append(st)  # t read otherwise than at an affine subscript
            continue
        lhs = tuple(new if r == t else r for r in st.lhs)
        name = f"{st.tensor}_unshifted"
        statements.append(Einsum(name, lhs, expr, where, loc=st.loc))
        back = tuple(_from_sym(a * t_sym + c) if r == new else Index(r) for r in lhs)
        statements.append(Einsum(st.tensor, st.lhs, Access(name, back), None, loc=st.loc))
    return dataclasses.replace(cascade, statements=tuple(statements))


def _sub_where(where, move):
    """``where`` with every integer-affine side of a comparison over ``t`` moved."""
    if where is None:
        return None

    def side(e):
        if isinstance(e, Binary) and e.op in ("and", "or"):
            return Binary(e.op, side(e.left), side(e.right))
        if isinstance(e, Binary) and e.op in ("<", "<=", ">", ">=", "==", "!="):
            return Binary(e.op, move(e.left) or _moved_reads(e.left, move),
                          move(e.right) or _moved_reads(e.right, move))
        return _moved_reads(e, move)
    return side(where)


def _moved_reads(e, move):
    return transform(e, lambda n: dataclasses.replace(
        n, subscripts=tuple(move(s) or s for s in n.subscripts)) if isinstance(n, Access) else None)


def _shift_of(st: Einsum, computed: dict, long: frozenset[str]
              ) -> tuple[str, int, object, str] | None:
    """(lhs rank t, a, c, the rank read at a·t + c) where ``st`` reads a computed tensor
    over two long ranks (a ``P × M`` one) at ``a·t + c``: a shift (``a = 1``, ``c`` a
    nonzero size expression) or a reflection (``a = -1``: the adjoint of a reversed read
    ``V[M - 1 - m, f]``), that rank free in ``st``; None otherwise."""
    import sympy

    for t in st.lhs:
        t_sym = sympy.Symbol(f"i_{t}", integer=True)
        for n in walk(st.expr):
            if not (isinstance(n, Access) and n.tensor in computed
                    and len(set(computed[n.tensor].lhs) & long) >= 2):
                continue  # (a vector read shifted, CG[p + M - P], is saved at O(rows))
            for k, s in enumerate(n.subscripts):
                x = _affine_sym(s)
                if x is None or not x.has(t_sym):
                    continue
                a = sympy.expand(x).coeff(t_sym)
                if a not in (1, -1):
                    continue
                c = sympy.expand(x - a * t_sym)
                rank = computed[n.tensor].lhs[k]
                used = set(st.lhs) | {r for m in walk(st.expr) if isinstance(m, Reduce)
                                      for r in m.ranks}
                if (c != 0 or a == -1) and rank not in used and \
                        not any(str(f).startswith("i_") for f in c.free_symbols):
                    return t, int(a), c, rank
    return None


def _reduced_long(st, long: frozenset[str]) -> set[str]:
    out = set()
    for n in walk(st.expr):
        if isinstance(n, Reduce):
            out |= set(n.ranks) & long
    return out


def _iterated(st) -> set[str]:
    out = set(st.lhs) | free_ranks(st.expr)
    for n in walk(st.expr):
        if isinstance(n, Reduce):
            out |= set(n.ranks)
    return out


def cut_points(cascade: Definition) -> list[str]:
    """Reductions over a long rank that a statement reads while iterating that rank again,
    in statement order."""
    long = long_with_lets(cascade)
    outputs = {o.name for o in cascade.outputs}
    readers: dict[str, list] = {}
    for st in cascade.statements:
        for n in walk(st.expr):
            if isinstance(n, Access):
                readers.setdefault(n.tensor, []).append(st)
    cuts = []
    # a recurrence's states, unless only copied whole again (the copy is then the cut)
    steps = {c for c in step_copies(cascade) if not all(
        isinstance(r.expr, Access) and r.expr.subscripts == tuple(Index(x) for x in r.lhs)
        for r in readers.get(c, []))}
    for st in cascade.statements:
        if not isinstance(st, Einsum) or st.tensor in outputs:
            continue
        reduced = _reduced_long(st, long)
        if st.tensor in steps:  # a recurrence's states: its scan saves them once
            cuts.append(st.tensor)
        elif reduced and _reread_along(st.tensor, reduced, readers):
            cuts.append(st.tensor)
        elif _read_elsewhere(cascade, st.tensor) or (reduced and _totalled(cascade, st.tensor)):
            cuts.append(st.tensor)
    return cuts


def step_copies(cascade: Definition) -> dict[str, str]:
    """The copies of a recurrence's steps (``FS_at[ps,m] = FS[ps,m]``, see
    :mod:`.deloop`; an adjoint's suffix ``dFS_after[psx,m] = dFS_suffix[psx,m]``) -> the
    recurrence.  Fills (iterative over a rank of size 1) are not recurrences."""
    ones = {let.name for let in cascade.lets if let.value == 1}
    loops = {st.tensor for st in cascade.statements
             if isinstance(st, IterativeEinsum) and st.iter_rank not in ones}
    return {st.tensor: st.expr.tensor for st in cascade.statements
            if isinstance(st, Einsum) and isinstance(st.expr, Access)
            and st.expr.tensor in loops and st.where is None
            and st.expr.subscripts == tuple(Index(r) for r in st.lhs)}


def carries_states(cascade: Definition) -> str | None:
    """A recurrence whose state spans two sequence ranks (selective attention's
    ``FS[PS,M]``: a row of keys per query), printed, or None.  Its kernels store every
    step's state, forward and backward, so such a backward saves ``P × M`` tensors."""
    size_of = _size_names(cascade)
    sequence = _sequence_sizes(cascade)
    for st in cascade.statements:
        if isinstance(st, IterativeEinsum) and not st.init and st.tensor in set(
                step_copies(cascade).values()):
            if len([r for r in st.lhs if size_of(r) in sequence]) >= 2:
                return f"{st.tensor}[{','.join(st.lhs)}]"
    return None


def _shifted_reads_inlined(stage: Definition) -> Definition:
    """A copy of an argument read at shifted subscripts, made at its readers' points, so
    that a kernel loads the argument there (the blocked copy of a tile keeps the shift in
    its load).  Before → after (the recurrence's step adjoint, saved reversed)::

        dFS_step[p,m] = dFS_step_unshifted[PS - 1 - p, m]
        dS_2[p,m] = select(m < p, dFS_step[p,m] * ..., 0)
     -> dS_2[p,m] = select(m < p, dFS_step_unshifted[PS - 1 - p, m] * ..., 0)

    Only a copy without ``where`` that is not a stage output, read at plain indices; a
    read out of the argument's range is absent at the reader as it was in the copy."""
    from .tile_loads import substitute

    args = {a.name for a in stage.tensor_args}
    outputs = {o.name for o in stage.outputs}
    copies = {st.tensor: st for st in stage.statements if isinstance(st, Einsum)
              and st.where is None and isinstance(st.expr, Access) and st.expr.tensor in args
              and st.tensor not in outputs
              and st.expr.subscripts != tuple(Index(r) for r in st.lhs)
              and not any(isinstance(n, Access) for x in st.expr.subscripts for n in walk(x))}
    plain = {t for t, st in copies.items() if all(
        all(isinstance(x, Index) for x in n.subscripts) and len(n.subscripts) == len(st.lhs)
        for other in stage.statements for e in (other.expr, other.where) if e is not None
        for n in walk(e) if isinstance(n, Access) and n.tensor == t)}
    if not plain:
        return stage

    def inline(n):
        if isinstance(n, Access) and n.tensor in plain:
            st = copies[n.tensor]
            at = dict(zip(st.lhs, n.subscripts))
            return Access(st.expr.tensor, tuple(substitute(x, at) for x in st.expr.subscripts),
                          n.loc)
        return None

    return dataclasses.replace(stage, statements=tuple(
        dataclasses.replace(st, expr=transform(st.expr, inline),
                            where=None if st.where is None else transform(st.where, inline))
        for st in stage.statements if st.tensor not in plain))


def _saved_ranks(ranks: tuple[str, ...], cascade: Definition, taken: set[str]
                 ) -> tuple[str, ...]:
    """The ranks a saved tensor over two sequence ranks is declared over: its own, except
    an innermost one that a ``let`` sizes, which gets a rank of its own (bound by the
    argument), the others then the argument ranks their aliases stand for (``PSX`` ->
    ``P``).  Declared over ``M`` (``let M = P``), a saved ``FS_at[PS,M]`` would make ``M``
    an innermost argument dim, a head dim held whole by the argument-layout rule, and a
    key-major stage would run one key per program; ``FS_at[P,MS]`` keeps ``M`` a sequence
    rank in tiles."""
    lets = {let.name: let.value for let in cascade.lets}
    size_of, sequence = _size_names(cascade), _sequence_sizes(cascade)
    if len(ranks) < 2 or ranks[-1] not in lets or \
            len([r for r in ranks if size_of(r) in sequence]) < 2:
        return ranks
    own = {r for a in cascade.tensor_args for r in a.ranks}
    lead = tuple(size_of(r) if size_of(r) in own and size_of(r) not in ranks else r
                 for r in ranks[:-1])  # PSX -> PS -> P: the argument rank it stands for
    if len(set(lead)) != len(lead):
        lead = ranks[:-1]
    return lead + (fresh_rank(f"{ranks[-1]}S", taken),)


def _relooped(stage: Definition) -> Definition:
    """A forward recurrence of the stage iterates the rank it was delooped from, so that a
    kernel runs it as the forward does (a scan over ``p`` with rows of ``m``, reading
    ``S[p,m]`` at its step).  Before → after (``let PS = P``)::

        FS[ps+1,m] = FS[ps,m] + relu(S[ps,m])   where m < ps      FS[p+1,m] = ... S[p,m] ...
        FS_at[ps,m] = FS[ps,m]                                ->  FS_at[p,m] = FS[p,m]

    Only a recurrence that reads everything at its own step (plain indices) and whose
    alias is a ``let`` of a rank that the stage's other statements iterate; the stage's
    statements over that rank then run at each step, which changes no value: none reads
    another step (:mod:`.deloop` checked the forward's reads)."""
    lets = {let.name: let.value for let in stage.lets}
    copies = step_copies(stage)
    out = stage
    for copy, tensor in copies.items():
        stmts = [st for st in out.statements if st.tensor == tensor]
        update = next((st for st in stmts if isinstance(st, IterativeEinsum) and not st.init),
                      None)
        if update is None:
            continue
        alias = update.iter_rank
        value = lets.get(alias)
        if value is None or not value.is_Symbol:
            continue
        rank = value.name
        others = [st for st in out.statements if st.tensor not in (tensor, copy)]
        if not any(rank in st.lhs for st in others) or any(
                rank in st.lhs for st in stmts) or not all(
                isinstance(x, Index) for e in (update.expr, update.where) if e is not None
                for a in walk(e) if isinstance(a, Access) for x in a.subscripts):
            continue

        def rename(n, alias=alias, rank=rank):
            if isinstance(n, Index) and n.rank == alias:
                return Index(rank)
            if isinstance(n, Size) and n.rank == alias:
                return Size(rank)
            return None

        def moved(st, alias=alias, rank=rank):
            lhs = tuple(rank if r == alias else r for r in st.lhs)
            kw = {"lhs": lhs, "expr": transform(st.expr, rename),
                  "where": None if st.where is None else transform(st.where, rename)}
            if isinstance(st, IterativeEinsum):
                kw["iter_rank"] = rank if st.iter_rank == alias else st.iter_rank
            return dataclasses.replace(st, **kw)

        statements = tuple(moved(st) if st.tensor in (tensor, copy) else st
                           for st in out.statements)
        outputs = tuple(dataclasses.replace(o, ranks=tuple(rank if r == alias else r
                                                           for r in o.ranks))
                        if o.name == copy else o for o in out.outputs)
        out = dataclasses.replace(out, statements=statements, outputs=outputs)
    return out


def _alias_ranks_renamed(stage: Definition) -> Definition:
    """Each Einsum iterates the rank an alias rank of its stands for (``let PS = P``), so
    that a kernel's rows and tiles are the stage's ranks: renaming a statement's own index
    changes nothing its readers see (they read it by position).  Before → after::

        dS_2[ps,m] = select(m < ps, dFS_step[ps,m] * ..., 0)   where m <= ps
     -> dS_2[p,m]  = select(m < p,  dFS_step[p,m] * ..., 0)    where m <= p

    Only where every reader reads the statement at that rank's own index (``dS[p,m] =
    dS_1[p,m] + dS_2[p,m]``); not where the statement already iterates that rank, nor in
    a stage that iterates it (a recurrence over ``P`` would run the statement at each of
    its steps), nor for a stage output (its ranks are the program's), a recurrence, or a
    statement reading one of those."""
    size_of = _size_names(stage)
    looped = set(stage.iterative_ranks)
    kept = {o.name for o in stage.outputs} | {st.tensor for st in stage.statements
                                               if isinstance(st, IterativeEinsum)}
    statements, changed = [], False
    for st in stage.statements:
        if isinstance(st, IterativeEinsum) or st.tensor in kept or any(
                isinstance(a, Access) and a.tensor in kept for a in walk(st.expr)):
            statements.append(st)
            continue
        mine = set(st.lhs) | {r for n in walk(st.expr) if isinstance(n, Reduce) for r in n.ranks}
        reads = [n for other in stage.statements for e in (other.expr, other.where)
                 if e is not None for n in walk(e)
                 if isinstance(n, Access) and n.tensor == st.tensor]
        names = {}
        for k, r in enumerate(st.lhs):
            base = size_of(r)
            if base != r and base not in mine and base not in looped \
                    and base not in names.values() \
                    and all(n.subscripts[k] == Index(base) for n in reads):
                names[r] = base
        if not names:
            statements.append(st)
            continue

        def rename(n, names=names):
            return Index(names[n.rank]) if isinstance(n, Index) and n.rank in names else None

        statements.append(dataclasses.replace(
            st, lhs=tuple(names.get(r, r) for r in st.lhs), expr=transform(st.expr, rename),
            where=None if st.where is None else transform(st.where, rename)))
        changed = True
    if not changed:
        return stage
    return dataclasses.replace(stage, statements=tuple(statements))


def _totalled(cascade: Definition, name: str) -> bool:
    """Whether a statement only sums ``name`` over more ranks (the per-head partial of a
    K/V gradient shared by several heads: ``dK_1[m,e] = sum[h](dK_1_heads[h,m,e])``)."""
    return any(isinstance(st, Einsum) and isinstance(st.expr, Reduce)
               and isinstance(st.expr.body, Access) and st.expr.body.tensor == name
               for st in cascade.statements)


def _reread_along(name: str, reduced: set[str], readers: dict) -> bool:
    """Whether a statement iterating ``reduced`` reads ``name``, directly or through maps
    that do not (``SD[p] = SD_sum[p] + exp(-GM[p])`` read by ``A[p,m]``)."""
    todo, seen = [name], set()
    while todo:
        t = todo.pop()
        if t in seen:
            continue
        seen.add(t)
        for r in readers.get(t, []):
            if reduced & _iterated(r):
                return True
            if not any(isinstance(n, Reduce) for n in walk(r.expr)):
                todo.append(r.tensor)
    return False


def _read_elsewhere(cascade: Definition, name: str) -> bool:
    """Whether some statement reads ``name`` at points other than its own (a group sum
    ``dK_1_heads[hk*G + g, m, e]``): a kernel holds only the tile it computes."""
    for st in cascade.statements:
        for n in walk(st.expr):
            if isinstance(n, Access) and n.tensor == name and not all(
                    isinstance(s, Index) for s in n.subscripts):
                return True
    return False


def stage_definition(cascade: Definition, name: str, outputs: list[str],
                     inputs: set[str], dtype: str = "f32",
                     recompute_extrema: bool = False) -> Definition:
    """The slice of ``cascade`` computing ``outputs`` from its arguments and ``inputs``
    (earlier stages' results, ``dtype`` arguments here: float32, float64 on numpy).  Every argument of the cascade is
    kept: they bind the sizes."""
    needed = _needed(cascade, outputs, inputs)
    if recompute_extrema:  # only where this stage compares them
        compared = _compared_extrema(cascade, [st for st in cascade.statements
                                               if st.tensor in needed])
        if compared & set(inputs):
            inputs = set(inputs) - compared
            needed = _needed(cascade, outputs, inputs)
    statements = tuple(st for st in cascade.statements if st.tensor in needed)
    grads = {o.name: o for o in cascade.outputs}
    outs = tuple(grads.get(o) or Output(o, cascade.tensor_ranks(o), dtype) for o in outputs)
    taken = {r for a in cascade.tensor_args for r in a.ranks} | {x.name for x in cascade.lets}
    saved = tuple(TensorArg(t, _saved_ranks(cascade.tensor_ranks(t), cascade, taken), dtype)
                  for t in sorted(inputs)
                  if any(isinstance(n, Access) and n.tensor == t
                         for st in statements for e in (st.expr, st.where)
                         for n in (walk(e) if e is not None else ())))
    return _alias_ranks_renamed(_relooped(_shifted_reads_inlined(dataclasses.replace(
        cascade, name=name, params=cascade.params + saved, outputs=outs,
        statements=statements))))


def _needed(cascade: Definition, outputs: list[str], inputs: set[str]) -> set[str]:
    """The tensors computing ``outputs`` needs, given ``inputs``."""
    by_name = {st.tensor: st for st in cascade.statements}
    needed: set[str] = set()
    todo = list(outputs)
    while todo:
        t = todo.pop()
        if t in needed or t in inputs or t not in by_name:
            continue
        needed.add(t)
        for st in cascade.statements:
            if st.tensor == t:
                for e in (st.expr, st.where):
                    for n in (walk(e) if e is not None else ()):
                        if isinstance(n, Access):
                            todo.append(n.tensor)
    return needed


def _compared_extrema(cascade: Definition, statements=None) -> set[str]:
    """Max and min reductions that ``statements`` (default: the cascade's) compare for
    equality with values (their gradient's first attaining point,
    ``min[m](select(S[p,m] == GM[p], m, inf))``): a stage that compares one recomputes it
    from the values it compares, where its kernels still lower, rather than read it saved.
    A saved maximum came from another computation of ``S`` (another kernel, another
    contraction order), which may round differently: then no recomputed score equals it
    and the gradient would lose its point.  Where some stage would then not lower, the
    program reads the saved maximum, as it did before: that relies on recomputing the
    scores as the forward did."""
    extrema = {st.tensor for st in cascade.statements if isinstance(st, Einsum)
               and isinstance(st.expr, Reduce) and st.expr.op in ("max", "min")}
    out = set()
    for st in (cascade.statements if statements is None else statements):
        for e in (st.expr, st.where):
            for n in (walk(e) if e is not None else ()):
                if isinstance(n, Binary) and n.op in ("==", "!=") and not _indexes(n):
                    out |= {a.tensor for a in (*walk(n.left), *walk(n.right))
                            if isinstance(a, Access) and a.tensor in extrema}
    return out


def _indexes(comparison: Binary) -> bool:
    """One side reads no tensor (``m == N_at[p]``, a max's first attaining point): the
    comparison is exact wherever it is computed."""
    return not all(any(isinstance(a, Access) for a in walk(side))
                   for side in (comparison.left, comparison.right))


def lowers(defn: Definition, backend: str, options: dict | None = None) -> str | None:
    """None when ``defn`` compiles to a kernel program that ``backend`` renders, else why
    not (numpy: a fused kernel program, not the Einsum-by-Einsum fallback)."""
    from ..backends import choose_form, compile_module
    from ..passes.pipeline import run_pipeline

    options = dict(options or {})
    options.setdefault("tile", 64)
    module = Module((defn,))
    if backend != "numpy" and _has_fills(defn):
        one_step = {let.name for let in defn.lets if let.value == 1}
        fills = sorted({st.tensor for st in defn.statements if isinstance(st, IterativeEinsum)
                        and st.iter_rank in one_step})
        return (f"{defn.name}: gradient contributions added after filling their absent "
                f"points with 0 ({', '.join(fills)}): the compiler could not prove each "
                f"present wherever its tensor is, and kernels have no form for the fill")
    scatter = _indirect_scatter(defn) if backend != "numpy" else None
    if scatter is not None:
        return scatter
    try:
        if backend == "numpy":
            choose_form(module, run_pipeline(module, None, None, None, options), backend,
                        options)
        else:
            compile_module(module, backend, "stage", options=options)
    except NotTileable as err:
        return str(err)
    except KernelIRError as err:  # a compiler bug in this grouping: another one is tried
        return f"the kernel program fails its verifier ({err})"
    return None


def _indirect_scatter(defn: Definition) -> str | None:
    """Why a stage has no kernel program when a gradient lands through an index tensor
    (``dKC_1[np,pg,hk,e] = sum[b,h,m](...) where PT[b, m // PG] == np``): several points
    of the sum may write one element, which needs atomics."""
    from ..einsum_ir.ir import Binary

    for st in defn.statements:
        for n in (walk(st.where) if st.where is not None else ()):
            if isinstance(n, Binary) and n.op == "==" and any(
                    isinstance(side, Index) and side.rank in st.lhs
                    and any(isinstance(k, Access) for k in walk(other))
                    for side, other in ((n.left, n.right), (n.right, n.left))):
                return (f"{defn.name}: {st.tensor} scatters through an index tensor (where "
                        f"{print_expr(n)}): several points of its sum land on one element, "
                        f"which needs atomics, and the kernel IR has none")
    return None


def cut_dependencies(cascade: Definition, name: str, cuts: set[str]) -> set[str]:
    """The cut tensors ``name`` reads, directly or through tensors that are not cut."""
    by_name = {st.tensor: st for st in cascade.statements}
    found, todo, seen = set(), [name], set()
    while todo:
        t = todo.pop()
        if t in seen:
            continue
        seen.add(t)
        for st in cascade.statements:
            if st.tensor != t:
                continue
            for e in (st.expr, st.where):
                for n in (walk(e) if e is not None else ()):
                    if isinstance(n, Access) and n.tensor in by_name:
                        (found.add if n.tensor in cuts and n.tensor != name else todo.append)(
                            n.tensor)
    return found - {name}


def _grouped(cascade: Definition, backend: str, items: list[str], prefix: str,
             options, forward: frozenset[str] = frozenset(),
             recompute: bool = False, before: frozenset[str] = frozenset()) -> list[list[str]]:
    """Stages from ``items`` (cut tensors and gradients, in dependency order): each item
    joins the earliest stage that has what it needs — its cut dependencies in earlier
    stages or in the same one (the ``online`` pass fuses a row max and its sum) — and
    still lowers; else it opens a new stage.  A stage of ``forward`` tensors alone (the
    row statistics ``GM``, ``SD``) takes no other, so the forward can save them
    (``NAME_with_stats``) and the backward skip that stage.  A dependency in ``before``
    (a filled contribution, see :func:`fills_as_stage_inputs`) comes from an earlier stage."""
    cuts = set(items)
    groups: list[list[str]] = []
    for item in items:
        deps = cut_dependencies(cascade, item, cuts)
        placed = False
        for i, group in enumerate(groups):
            if any(d in cuts and all(d not in g for g in groups[:i + 1]) for d in deps):
                continue  # a dependency is made later than this stage
            if any(d in before and d in group for d in deps):
                continue  # a filled contribution is read from memory, made before
            if item not in forward and all(t in forward for t in group):
                continue
            made = {t for g in groups[:i] for t in g}
            trial = stage_definition(cascade, prefix, group + [item], made,
                                     recompute_extrema=recompute)
            if lowers(trial, backend, options) is None:
                group.append(item)
                placed = True
                break
        if not placed:
            groups.append([item])
    return groups


def fills_as_stage_inputs(cascade: Definition) -> tuple[Definition, list[str]]:
    """Fills (``F[0,x] = 0; F[z+1,x] = C[x]``: a contribution ``C`` with its absent points
    as 0) as a stage boundary: ``C`` becomes a stage's output, which a kernel stores with 0
    at its absent points, and the stage that adds it reads it back as an input, present
    everywhere.  Before → after (the fill read only as ``F[Z, x]``)::

        dC_1_filled[0,p] = 0                       dC_1_filled[p] = dC_1[p]
        dC_1_filled[z+1,p] = dC_1[p]          ->   dC_3[p] = dC_1_filled[p] + dC_2_filled[p]
        dC_3[p] = dC_1_filled[Z,p] + ...           (dC_1, dC_2 made by an earlier stage)

    Returns the cascade and the contributions (``C``) that must come from earlier stages."""
    fills: dict[str, tuple] = {}  # F -> (its rank z, C)
    for st in cascade.statements:
        if isinstance(st, IterativeEinsum) and not st.init and isinstance(st.expr, Access) \
                and st.lhs[0] == st.iter_rank and st.where is None:
            fills[st.tensor] = (st.iter_rank, st.expr.tensor)
    inits = {st.tensor for st in cascade.statements if isinstance(st, IterativeEinsum)
             and st.init and isinstance(st.expr, Num) and st.expr.value == 0}
    ones = {let.name for let in cascade.lets if let.value == 1}
    live = _needed_by_outputs(cascade)
    ranks = {st.tensor: st.lhs for st in cascade.statements}
    # stored, a contribution must be no larger than an argument (O(rows · head dim), never
    # a P × M buffer): the others keep their fill, and their stage is refused
    size_of = _size_names(cascade)
    small = [Counter(size_of(r) for r in a.ranks) for a in cascade.tensor_args]
    fills = {f: v for f, v in fills.items() if f in inits and v[0] in ones and f in live
             and any(Counter(size_of(r) for r in ranks.get(v[1], ())) <= r for r in small)}
    if not fills:
        return cascade, []

    def read_filled(e):
        if isinstance(e, Access) and e.tensor in fills and isinstance(e.subscripts[0], Size) \
                and e.subscripts[0].rank == fills[e.tensor][0]:
            return Access(e.tensor, e.subscripts[1:])
        return None

    statements = []
    for st in cascade.statements:
        if st.tensor in fills:
            if not st.init:
                statements.append(Einsum(st.tensor, st.lhs[1:], st.expr))
            continue
        statements.append(dataclasses.replace(
            st, expr=transform(st.expr, read_filled),
            where=None if st.where is None else transform(st.where, read_filled)))
    used = {r for st in statements for r in getattr(st, "lhs", ())} | {
        n.rank for st in statements for e in (st.expr, st.where) if e is not None
        for n in walk(e) if isinstance(n, (Size, Index))}
    lets = tuple(let for let in cascade.lets if let.name in used or let.name not in
                 {z for z, _ in fills.values()})
    out = dataclasses.replace(cascade, statements=tuple(statements), lets=lets)
    return out, list(dict.fromkeys(c for _, c in fills.values()))


def backward_program(defn: Definition, backend: str = "triton",
                     options: dict | None = None,
                     wrt: tuple[str, ...] | None = None) -> BackwardProgram:
    """The backward of ``defn`` as stages that each lower for ``backend`` (raises
    :class:`NotTileable` naming the stage that does not, and why)."""
    source = backward(defn, wrt)
    nonempty: tuple = ()
    if backend != "numpy" and _has_fills(source):
        assumed = _nonempty_without_fills(defn, wrt)
        if assumed is not None:
            source = backward(defn, wrt, assumed)
            nonempty = tuple(_locate(defn, r) for r in sorted(assumed))
    # kernel targets: no P x M tensor read at another row
    cascade = source if backend == "numpy" else unshift_gradients(source)
    try:
        return _assemble(defn, source, cascade, nonempty, backend, options)
    except NotTileable as why:  # a sum over a long rank the kernels would hold: pushed
        held = re.search(r"would hold the long rank (\w+) whole", str(why))
        if backend == "numpy" or held is None:
            raise
        pushed, parts = _head_parts(cascade, held.group(1), backend, options)
        if not parts:
            raise
        return _assemble(defn, source, pushed, nonempty, backend, options, parts)


def _head_parts(cascade: Definition, rank: str, backend: str, options
                ) -> tuple[Definition, tuple]:
    """Sums over ``rank`` (a long rank a kernel would hold whole) pushed into their linear
    readers (:mod:`.head_partials`), and each gradient they reach made as parts over that
    rank (a grid rank of its kernels), which the host adds: (cascade, rows entries)."""
    size_of = _size_names(cascade)
    pushed, summed = pushed_sums(cascade, lambda r: size_of(r) == size_of(rank))
    if not summed:
        return cascade, ()
    cuts = set(cut_points(pushed))
    rows = []
    for out in pushed.outputs:
        srcs = _contributions(pushed, out.name)
        if not srcs or not all(s.tensor in summed for s in srcs):
            continue
        work, parts = pushed, []
        for src in srcs:
            h = summed[src.tensor]
            reduced = tuple(r for r in src.expr.ranks if r != h)
            keeps = [(h,)] + [(h, r) for r in reduced]
            for keep in keeps:
                rest = tuple(r for r in src.expr.ranks if r not in keep)
                body = Reduce("sum", rest, src.expr.body) if rest else src.expr.body
                part = Einsum(f"{src.tensor}_by_{h.lower()}", src.lhs + keep, body, src.where)
                trial = _with_output(work, src.tensor, part.tensor, part.lhs, part,
                                     saved_dtype(backend))
                stage = stage_definition(trial, f"{cascade.name}_h", [part.tensor], cuts)
                if _quadratic_output(trial, stage) is None and \
                        lowers(stage, backend, options) is None:
                    work = trial
                    parts.append((part.tensor, len(keep)))
                    break
            else:
                break
        else:
            pushed = dataclasses.replace(work, outputs=tuple(
                o for o in work.outputs if o.name != out.name))
            rows.append((out.name, tuple(parts)))
    return pushed, tuple(rows)


def _assemble(defn: Definition, source: Definition, cascade: Definition, nonempty: tuple,
              backend: str, options, rows: tuple = ()) -> BackwardProgram:
    """The stages of :func:`backward_program` from the prepared cascade (``rows``: parts
    already made, see :func:`_head_parts`)."""
    name = source.name
    cascade, more = _scalars_by_rows(cascade, backend, options)
    rows = tuple(rows) + tuple(more)
    scatters: tuple = ()
    if backend != "numpy":  # kernels have no atomics: the host adds scattered gradients
        cascade, scatters = host_scatters(cascade, saved_dtype(backend))
    filled: list[str] = []
    if backend != "numpy":  # kernels have no form for a fill: a stage boundary is one
        cascade, filled = fills_as_stage_inputs(cascade)
    cuts = cut_points(cascade)
    cuts += [c for c in filled if c not in cuts]
    zeros = tuple(o.name for o in cascade.outputs if _is_zero(cascade, o.name))
    grads = [o.name for o in cascade.outputs if o.name not in zeros]
    items = _in_statement_order(cascade, cuts) + [g for g in grads if g not in cuts]
    forward = frozenset(st.tensor for st in canonicalize(defn).statements) \
        | first_attaining_points(cascade, defn)
    dtype = saved_dtype(backend)
    before = frozenset(filled)
    try:  # a compared maximum recomputed where it is compared, if every stage still lowers
        stages = _stages(cascade, backend, items, name, options, forward, dtype,
                         bool(_compared_extrema(cascade)), before)
    except NotTileable:
        if not _compared_extrema(cascade):
            raise
        stages = _stages(cascade, backend, items, name, options, forward, dtype, False, before)
    return BackwardProgram(name, source, tuple(stages), zeros, with_stats=_with_stats(
        defn, stages, backend, options, dtype), rows=rows, nonempty=nonempty,
        scatters=scatters)


def _stages(cascade: Definition, backend: str, items: list[str], name: str, options,
            forward: frozenset[str], dtype: str, recompute: bool,
            before: frozenset[str] = frozenset()) -> list[Definition]:
    """The stages of :func:`backward_program` (``recompute``: see :func:`_compared_extrema`;
    ``before``: see :func:`_grouped`); NotTileable names a stage that does not lower."""
    groups = _grouped(cascade, backend, items, f"{name}_s", options, forward, recompute,
                      before)
    stages, made = [], set()
    for i, group in enumerate(groups):
        stage = stage_definition(cascade, f"{name}_{i}", group, made, dtype, recompute)
        quadratic = _quadratic_output(cascade, stage) if backend != "numpy" and \
            not carries_states(cascade) else None
        if quadratic is not None:
            raise NotTileable(f"{name}: stage {i} ({', '.join(group)}) would save "
                              f"{quadratic}, a tensor over two sequence ranks: the backward "
                              f"must stay O(rows · head dim) in memory")
        why = lowers(stage, backend, options)
        if why is not None:
            raise NotTileable(f"{name}: stage {i} ({', '.join(group)}) has no kernel "
                              f"program: {why}")
        stages.append(stage)
        made |= set(group)
    return stages


def _nonempty_without_fills(defn: Definition, wrt) -> frozenset[str] | None:
    """Ranks that, assumed non-empty, leave the backward without fills (kernels have no
    form for one): the ranks some output lacks, else the argument ranks less each one the
    proofs do not need; None when no such set exists.

    A fill adds gradient contributions that the compiler cannot prove present at the same
    points, and the proofs fail only through ranks that may be empty: the fills an output's
    empty rank forces (lse: AV is empty when F = 0, LSE is not), or a sum over the keys
    beside one over the value dim (linear attention's ``dFQ``: ``dDEN[p] * KS[e]`` is
    absent when M = 0 or F = 0, ``sum[f](dNUM * KV)`` when F = 0).  The kernels then assume
    those ranks non-empty and each call checks them (the numpy module takes every size)."""
    some = {r for o in defn.outputs for r in o.ranks}
    every = set.intersection(*(set(o.ranks) for o in defn.outputs))
    first = frozenset(some - every)
    if first and not _has_fills(backward(defn, wrt, first)):
        return first
    ranks = [r for a in defn.tensor_args for r in a.ranks]
    assumed = set(dict.fromkeys(ranks))
    if not assumed or _has_fills(backward(defn, wrt, frozenset(assumed))):
        return None
    for r in sorted(assumed):  # drop what the proofs do not need
        if not _has_fills(backward(defn, wrt, frozenset(assumed - {r}))):
            assumed.discard(r)
    return frozenset(assumed)


def _quadratic_output(cascade: Definition, stage: Definition) -> str | None:
    """A stage output over two sequence ranks (``dS_1[P,M]``), printed, or None.  Sequence
    ranks are the positions of the float arguments (the rank before the innermost one:
    ``Q[H,P,E]``'s P, ``K[HK,M,E]``'s M); heads are not."""
    size_of = _size_names(cascade)
    sequence = _sequence_sizes(cascade)
    for o in stage.outputs:
        if len([r for r in o.ranks if size_of(r) in sequence]) >= 2:
            return f"{o.name}[{','.join(o.ranks)}]"
    return None


def _sequence_sizes(cascade: Definition) -> set[str]:
    """The sizes of the sequence ranks (see :func:`_quadratic_output`)."""
    size_of = _size_names(cascade)
    floats = [a for a in cascade.tensor_args
              if len(a.ranks) >= 2 and a.dtype not in ("i32", "i64", "bool")]
    inner = Counter(size_of(a.ranks[-1]) for a in floats)
    # contracted on their innermost dim with another argument (Q·K over E): rows of data
    return {size_of(a.ranks[-2]) for a in floats if inner[size_of(a.ranks[-1])] >= 2}


def _size_names(cascade: Definition):
    """A rank -> the rank whose size it has through ``let``s (M -> P under ``let M = P``)."""
    alias = {let.name: let.value.name for let in cascade.lets if let.value.is_Symbol}

    def size_of(r: str) -> str:
        while r in alias:
            r = alias[r]
        return r
    return size_of


def _needed_by_outputs(cascade: Definition) -> set[str]:
    """The tensors the outputs read, directly or not."""
    graph = dataflow_graph(cascade)
    return set().union(*({o.name} | nx.ancestors(graph, o.name) for o in cascade.outputs))


def _in_statement_order(cascade: Definition, names: list[str]) -> list[str]:
    order = {st.tensor: i for i, st in enumerate(cascade.statements)}
    return sorted(dict.fromkeys(names), key=lambda n: order.get(n, len(order)))


def _has_fills(cascade: Definition) -> bool:
    """Whether ``cascade`` fills a contribution (an iterative statement over a rank of
    size 1; a recurrence, forward or adjoint, is not one)."""
    ones = {let.name for let in cascade.lets if let.value == 1}
    return any(isinstance(st, IterativeEinsum) and st.iter_rank in ones
               for st in cascade.statements)


def _locate(defn: Definition, rank: str) -> tuple[str, str, int]:
    """(rank, the first tensor argument over it, its axis counted from the end)."""
    for a in defn.tensor_args:
        if rank in a.ranks:
            return rank, a.name, len(a.ranks) - a.ranks.index(rank)
    raise ValueError(f"no argument of {defn.name} is over {rank}")


def saved_dtype(backend: str) -> str:
    """What stages pass on (row statistics, per-row parts): float32 for the kernels, float64
    on numpy (whose inputs usually are)."""
    return "f64" if backend == "numpy" else "f32"


def _with_stats(defn: Definition, stages, backend: str, options,
                dtype: str = "f32") -> Definition | None:
    """``defn`` returning, besides its outputs, what the leading stages make from forward
    tensors alone (``GM``, ``SD``), when that still lowers: the forward saves its row
    statistics instead of the backward recomputing them (FlashAttention-2's LSE)."""
    source = canonicalize(defn)
    forward = {st.tensor for st in source.statements}
    saved, derived = [], []
    for stage in stages:
        names = [o.name for o in stage.outputs]
        made = {st.tensor: st for st in stage.statements}
        if not all(n in forward or _is_first_attaining(made.get(n), forward) for n in names):
            break
        saved += names
        derived += [made[n] for n in names if n not in forward]
    if not saved:
        return None
    ranks = {st.tensor: st.lhs for st in source.statements + tuple(derived)}
    extra = tuple(Output(n, ranks[n], dtype) for n in saved
                  if n not in {o.name for o in defn.outputs})
    out = dataclasses.replace(defn, name=f"{defn.name}_with_stats", outputs=defn.outputs + extra)
    if derived:  # they read the canonical form's tensors
        out = dataclasses.replace(out, statements=source.statements + tuple(derived))
    return out if lowers(out, backend, options) is None else None


def first_attaining_points(cascade: Definition, defn: Definition) -> frozenset[str]:
    """The backward's first attaining points of the forward's maxima (``N_at[p] =
    min[m](select(S[p,m] == N[p], m, inf))``, see ``backward._Builder.first_attaining``):
    functions of the forward alone, made in its stage of row statistics and saved with them
    (one pass beside the max, :func:`attnc.passes.online._equality_shift`)."""
    forward = {st.tensor for st in canonicalize(defn).statements}
    return frozenset(st.tensor for st in cascade.statements if _is_first_attaining(st, forward))


def _is_first_attaining(st, forward) -> bool:
    if not (isinstance(st, Einsum) and isinstance(st.expr, Reduce) and st.expr.op == "min"):
        return False
    if equality_condition(st.expr.body) is None or st.expr.body.args[2] != Const("inf"):
        return False
    reads = {a.tensor for a in walk(st.expr) if isinstance(a, Access)}
    return bool(reads) and reads <= set(forward)


def _scalars_by_rows(cascade: Definition, backend: str, options
                     ) -> tuple[Definition, tuple[tuple[str, tuple[tuple[str, int], ...]], ...]]:
    """A gradient over no long rank (a float parameter's, a per-head slope's) is returned
    by the kernels as parts the host adds: one per contribution (an absent output element
    is 0, so no fill is needed), each summed per row in the kernels (the parts' trailing
    ranks, summed on the host) when the whole sum has no kernel program.  Before → after::

        dscale_1 = sum[h, p, m, e](dQK_1[h,p,m] * (Q[h,p,e] * K[h,m,e]))
        dscale = dscale_1
     ->
        dscale_1_rows[h,p] = sum[m, e](dQK_1[h,p,m] * (Q[h,p,e] * K[h,m,e]))   (an output)
        dscale = sum of dscale_1_rows                                          (on the host)
    """
    long = long_ranks(cascade)
    cuts = set(cut_points(cascade))
    found = []
    heads = {a.ranks[0] for a in cascade.tensor_args if len(a.ranks) > 2}
    for out in cascade.outputs:
        if (set(out.ranks) & long) - heads or _is_zero(cascade, out.name):
            continue  # a gradient over rows (dQ, dK) is made whole by a row kernel
        srcs = _contributions(cascade, out.name)
        if len(srcs) == 1 and lowers(stage_definition(cascade, f"{cascade.name}_r",
                                                      [out.name], cuts), backend, options) is None:
            continue  # one kernel makes it whole
        parts, work = [], cascade
        for src in srcs:
            if src.lhs != out.ranks:
                break
            trial = _with_output(work, src.tensor, src.tensor, out.ranks, None,
                                 saved_dtype(backend))
            if lowers(stage_definition(trial, f"{cascade.name}_r", [src.tensor], cuts),
                      backend, options) is None:
                work, part = trial, (src.tensor, 0)
            else:
                work, part = _by_rows(work, src, long, cuts, backend, options)
            if part is None:
                break
            parts.append(part)
        else:
            cascade = dataclasses.replace(work, outputs=tuple(
                o for o in work.outputs if o.name != out.name))
            found.append((out.name, tuple(parts)))
    return cascade, tuple(found)


def _contributions(cascade: Definition, name: str) -> list[Einsum]:
    """The statements whose values add up to scalar ``name``: the contributions of a
    filled sum, or the one reduction it copies."""
    by_name = {st.tensor: st for st in cascade.statements}
    st = by_name[name]
    while isinstance(st.expr, Access) and st.where is None and \
            st.expr.subscripts == tuple(Index(r) for r in st.lhs) and \
            isinstance(by_name.get(st.expr.tensor), Einsum):  # a copy: dcap = dcap_3
        st = by_name[st.expr.tensor]
    if not any(isinstance(by_name.get(n.tensor), Statement) and not isinstance(
            by_name[n.tensor], Einsum) for n in walk(st.expr) if isinstance(n, Access)):
        return [st]
    reads = [n.tensor for n in walk(st.expr) if isinstance(n, Access)]
    srcs = []
    for t in reads:
        updates = [u for u in cascade.statements
                   if u.tensor == t and not isinstance(u, Einsum) and not u.init]
        if updates and isinstance(updates[0].expr, Access):
            t = updates[0].expr.tensor
        srcs.append(by_name[t])
    return srcs


def _with_output(cascade: Definition, old: str, name: str, ranks, stmt,
                 dtype: str = "f32") -> Definition:
    statements = cascade.statements if stmt is None else \
        tuple(st for st in cascade.statements if st.tensor != name) + (stmt,)
    outputs = tuple(o for o in cascade.outputs if o.name != name) + (Output(name, ranks, dtype),)
    return dataclasses.replace(cascade, statements=statements, outputs=outputs)


def _by_rows(cascade, src, long, cuts, backend, options):
    """``src`` (a sum over every long rank) as partial sums kept over its outer ranks (heads
    and rows) but one long rank (the streamed one), which the host adds, if such a choice
    lowers: (cascade, (part, number of trailing ranks to add)), or (cascade, None)."""
    if not isinstance(src, Einsum) or not isinstance(src.expr, Reduce):
        return cascade, None
    reduced = src.expr.ranks
    outer = {r for a in cascade.tensor_args for r in a.ranks[:-1]}  # not a head dim
    keeps = [tuple(r for r in reduced if r in outer and r != streamed)
             for streamed in [r for r in reduced if r in long][::-1]]
    # or every outer rank kept: a per-key part whose own kernel streams the queries
    # (QK-norm's deps_1 = sum[m](dKR_1[m] * ...), dKR_1 a sum over p)
    keeps.append(tuple(r for r in reduced if r in outer))
    # or every rank but the innermost dims and a streamed sequence rank, ranks of `let`
    # sizes too (packed sequences' b and p: `let B = C - 1`, `let P = T`)
    inner = {a.ranks[-1] for a in cascade.tensor_args
             if a.ranks and a.dtype not in ("i32", "i64", "bool")}
    keeps += [tuple(r for r in reduced if r not in inner and r != streamed)
              for streamed in [r for r in reduced if r in long_with_lets(cascade)][::-1]]
    for keep in dict.fromkeys(keeps):
        rest = tuple(r for r in reduced if r not in keep)
        name = f"{src.tensor}_rows"
        body = Reduce("sum", rest, src.expr.body) if rest else src.expr.body
        part = Einsum(name, src.lhs + keep, body, src.where)
        trial = _with_output(cascade, src.tensor, name, src.lhs + keep, part,
                             saved_dtype(backend))
        if lowers(stage_definition(trial, f"{cascade.name}_r", [name], cuts),
                  backend, options) is None:
            return trial, (name, len(keep))
    return cascade, None


def _is_zero(cascade: Definition, name: str) -> bool:
    from ..einsum_ir.ir import Num

    return any(isinstance(st, Einsum) and st.tensor == name and st.expr == Num(0)
               for st in cascade.statements)
