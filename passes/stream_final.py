"""``stream-final``: fold a sum that reads a running max's final value into the loop.

A cascade that keeps a running max ``T`` over an iterative rank ``I``
(``T[0] = -inf``, ``T[i+1] = max(T[i], X[i])`` with ``X`` a local max) and,
after the loop, sums over ``i`` a value scaled by ``exp(c * (Y - T[I]))`` makes
a second pass over ``I``.  Since ``exp(c*(Y - T[I])) = exp(c*(Y - T[i+1])) *
exp(c*(T[i+1] - T[I]))``, the sum is a running sum rescaled whenever ``T``
moves, exactly like the running denominator.  Before → after (FuseMax's
2-pass online normalizer, after the default pipeline up to ``online``)::

    RM[0,p] = -inf
    RD[0,p] = 0
    BQK[m1,m0,p] = sum[e](Q[p,e] * BK[m1,m0,e])
    LM[m1,p] = max[m0](BQK[m1,m0,p])
    RM[m1+1,p] = max(RM[m1,p], LM[m1,p])
    SLD[m1,p] = sum[m0](exp(BQK[m1,m0,p] - RM[m1 + 1, p]))
    RD[m1+1,p] = SLD[m1,p] + RD[m1,p] * exp(RM[m1,p] - RM[m1 + 1, p])
    AV_sum[p,f] = sum[m1, m0](exp(BQK[m1,m0,p] - RM[M1,p]) * BV[m1,m0,f])
    AV[p,f] = AV_sum[p,f] / RD[M1,p]

    RM[0,p] = -inf
    RAV_sum[0,p,f] = 0                                    # the new running sum
    RD[0,p] = 0
    ...                                                   # the loop as it was
    LAV_sum[m1,p,f] = sum[m0](exp(BQK[m1,m0,p] - RM[m1 + 1, p]) * BV[m1,m0,f])
    RAV_sum[m1+1,p,f] = LAV_sum[m1,p,f] + RAV_sum[m1,p,f] * exp(RM[m1,p] - RM[m1 + 1, p])
    AV_sum[p,f] = RAV_sum[M1,p,f]   where RM[M1,p] > -inf
    AV[p,f] = AV_sum[p,f] / RD[M1,p]

Conditions (else the statement is left alone, and the cascade stays 2-pass):

* the sum ``S[x] = sum[i, j...](F) where W`` reduces the loop's index ``i``
  and exactly the ranks ``j`` of the local max ``X``, and not over ``x``;
* ``F`` reads ``T`` only as ``T[I, s]`` (``s`` over ``x``), inside one factor
  ``exp``/``exp2`` of ``c * (Y - T[I, s])`` with ``c`` a positive constant, of
  a product (``F`` is linear in it); ``W`` does not read ``T``;
* every other read is an input, or a tensor available at step ``i``: read at
  plain ``i`` along ``I`` if it carries ``I``, and not computed after a loop
  (no final state, no reduction over an iterative rank upstream of it); no
  other iterative tensor is read.

**Absent elements.**  An update whose local sum is absent carries the state
without rescaling, so per fiber ``x`` the local sum must be present in every
step where ``T`` moves: the sum's points (presence analysis of
``defer_normalization.Presence``, reads of ``T`` counted present) must be the
local max's points at the same ``(i, j)`` plus only conditions that depend on
neither ``i`` nor ``j`` (the check of ``online._sits_on_max``, with ragged
input reads compared by their bounds, so ``K[m1*M0+m0, e]`` and
``V[m1*M0+m0, f]`` are absent at the same points).  The running sum is always
present, so the final map is guarded: by ``T[I, s] > -inf`` when the sum has
exactly the max's points (some step moved the max), else by a presence state
``R<S>_seen`` (0, then ``1 + 0 * L<S>``).  A fully absent row stays absent, so
a later ``AV_sum / RD`` gives 0, not NaN.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import networkx as nx

from ..einsum_ir.exprs import free_ranks, transform, walk
from ..einsum_ir.ir import (Access, Binary, Call, Const, Definition, Einsum, Expr, Index,
                            IterativeEinsum, Num, Reduce, Size, Statement, Unary)
from ..einsum_ir.schedule import dataflow_graph, statement_reads
from .defer_normalization import (Capture, Presence, atom_ranks, fresh_name, is_reduction,
                                  linear_terms, positive, simplify, substitute_atom,
                                  taken_names, varying)
from .online import SHIFT_FUNCTIONS, NotPositiveScale, local_name, peel_scale, running_name

NEG_INF = Unary("-", Const("inf"))


class NotStreamable(Exception):
    """Why a post-loop sum cannot be folded into the loop."""


@dataclass(frozen=True)
class MaxState:
    """``T[0] = -inf``, ``T[i+1] = max(T[i], X[...])`` over iterative rank ``rank``."""

    name: str
    rank: str
    lhs: tuple[str, ...]
    local: Access          # X, read in the update's index variables
    local_st: Einsum       # X's statement: a max reduction


@dataclass(frozen=True)
class Shift:
    """The factor ``fn(c * (Y - T[I, s]))`` of the summed value."""

    read: Access           # T[I, s]
    fn: str
    ops: tuple[tuple[str, Expr], ...]


def stream_final(defn: Definition) -> Definition:
    """Fold every post-loop sum that meets the module doc's conditions into its loop."""
    while (new := _fold_one(defn)) is not None:
        defn = new
    return defn


def _fold_one(defn: Definition) -> Definition | None:
    for state in _max_states(defn):
        for st in defn.statements:
            try:
                return _fold(defn, state, st)
            except NotStreamable:
                continue
    return None


# ---------------------------------------------------------------------------
# Analysis
# ---------------------------------------------------------------------------


def _ids(ranks) -> tuple[Expr, ...]:
    return tuple(Index(r) for r in ranks)


def _max_states(defn: Definition) -> list[MaxState]:
    inits = {st.tensor: st for st in defn.statements
             if isinstance(st, IterativeEinsum) and st.init}
    einsums = {st.tensor: st for st in defn.statements if isinstance(st, Einsum)}
    out = []
    for st in defn.statements:
        if not isinstance(st, IterativeEinsum) or st.init or st.where is not None:
            continue
        init = inits.get(st.tensor)
        if init is None or init.expr != NEG_INF or init.where is not None:
            continue
        e = st.expr
        if not (isinstance(e, Call) and e.fn == "max" and len(e.args) == 2):
            continue
        own = Access(st.tensor, _ids(st.lhs))
        others = [a for a in e.args if a != own]
        if len(others) != 1 or len(e.args) - len(others) != 1:
            continue
        x = others[0]
        x_st = einsums.get(x.tensor) if isinstance(x, Access) else None
        if x_st is None or not is_reduction(x_st) or x_st.expr.op != "max":
            continue
        out.append(MaxState(st.tensor, st.iter_rank, st.lhs, x, x_st))
    return out


def _post_loop(defn: Definition) -> set[str]:
    """Tensors computed after some loop: they read a final state or reduce an iterative
    rank, or depend on such a tensor."""
    iterative = defn.iterative_tensors
    ranks = set(defn.iterative_ranks)
    seeds = set()
    for st in defn.statements:
        if not isinstance(st, Einsum):
            continue
        if any(isinstance(n, Reduce) and set(n.ranks) & ranks for n in walk(st.expr)):
            seeds.add(st.tensor)
        for acc in statement_reads(st):
            rank = iterative.get(acc.tensor)
            if rank is not None and not _at_step(defn, acc, rank):
                seeds.add(st.tensor)
    g = dataflow_graph(defn)
    out = set(seeds)
    for s in seeds:
        out |= nx.descendants(g, s)
    return out


def _at_step(defn: Definition, acc: Access, rank: str) -> bool:
    sub = acc.subscripts[defn.tensor_ranks(acc.tensor).index(rank)]
    return sub in (Index(rank), Binary("+", Index(rank), Num(1)))


def _check_shape(state: MaxState, st: Statement) -> tuple[str, ...]:
    """The sum's ranks besides ``i``: exactly those of the local max."""
    if not is_reduction(st) or st.expr.op != "sum":
        raise NotStreamable("not a sum")
    ranks, local = st.expr.ranks, state.local_st.expr.ranks
    if state.rank not in ranks or state.rank in st.lhs or state.rank in local:
        raise NotStreamable("does not reduce the loop's rank")
    if len(set(ranks)) != len(ranks) or set(ranks) != {state.rank} | set(local):
        raise NotStreamable("reduces other ranks than the local max")
    if set(local) & set(state.lhs):
        raise NotStreamable("the local max's ranks clash with the state's")
    return tuple(r for r in ranks if r != state.rank)


def _check_reads(defn: Definition, state: MaxState, st: Einsum) -> None:
    inputs = {a.name for a in defn.tensor_args}
    iterative = defn.iterative_tensors
    post = _post_loop(defn)
    einsums = {s.tensor: s for s in defn.statements if isinstance(s, Einsum)}
    if st.where is not None and any(isinstance(n, Access) and n.tensor == state.name
                                    for n in walk(st.where)):
        raise NotStreamable("its where reads the running max")
    for acc in statement_reads(st):
        name = acc.tensor
        if name == state.name or name in inputs:
            continue
        if name in iterative or name in post or name not in einsums:
            raise NotStreamable(f"reads {name}, which is not available inside the loop")
        lhs = einsums[name].lhs
        if state.rank in lhs:
            pos = lhs.index(state.rank)
            others = [s for k, s in enumerate(acc.subscripts) if k != pos]
            if acc.subscripts[pos] != Index(state.rank) or any(
                    state.rank in free_ranks(s) for s in others):
                raise NotStreamable(f"reads {name} at another step than i")


def _reads(e: Expr, name: str) -> bool:
    return any(isinstance(n, Access) and n.tensor == name for n in walk(e))


def _shifts(e: Expr, state: MaxState) -> list[Shift]:
    """The shift factors of a product; NotStreamable if ``T`` enters it otherwise."""
    if not _reads(e, state.name):
        return []
    if isinstance(e, Binary) and e.op == "*":
        return _shifts(e.left, state) + _shifts(e.right, state)
    if isinstance(e, Binary) and e.op == "/" and not _reads(e.right, state.name):
        return _shifts(e.left, state)
    if isinstance(e, Unary) and e.op == "-":
        return _shifts(e.operand, state)
    if isinstance(e, Call) and e.fn in SHIFT_FUNCTIONS and len(e.args) == 1:
        return [_exp_shift(e, state)]
    raise NotStreamable("reads the running max outside a factor exp(c * (Y - T))")


def _exp_shift(call: Call, state: MaxState) -> Shift:
    arg, outer = _peel(call.args[0], state)
    terms = [(s, t) for s, t in linear_terms(arg) if _reads(t, state.name)]
    if len(terms) != 1 or terms[0][0] > 0:
        raise NotStreamable("not exp(c * (Y - T))")
    term, inner = _peel(terms[0][1], state)
    if not isinstance(term, Access) or term.tensor != state.name:
        raise NotStreamable("not exp(c * (Y - T))")
    return Shift(term, call.fn, tuple(inner + outer))


def _peel(e: Expr, state: MaxState) -> tuple[Expr, list[tuple[str, Expr]]]:
    """``(Y - T) * c`` -> ``Y - T, [("*", c)]`` for positive constants ``c``, innermost first."""
    try:
        return peel_scale(e, lambda x: _reads(x, state.name))
    except NotPositiveScale:
        raise NotStreamable("scales the max by a factor not known to be a positive constant") from None


def _the_shift(defn: Definition, state: MaxState, st: Einsum) -> Shift:
    shifts = _shifts(st.expr.body, state)
    if len(shifts) != 1:
        raise NotStreamable("needs exactly one shifted exponential factor")
    shift = shifts[0]
    pos = state.lhs.index(state.rank)
    subs = shift.read.subscripts
    if subs[pos] != Size(state.rank):
        raise NotStreamable("reads the running max at another step than the final one")
    rest = [s for k, s in enumerate(subs) if k != pos]
    if any(not free_ranks(s) <= set(st.lhs) for s in rest):
        raise NotStreamable("reads the running max along a summed rank")
    reads = [n for n in walk(st.expr) if isinstance(n, Access) and n.tensor == state.name]
    if any(r != shift.read for r in reads):
        raise NotStreamable("reads the running max at several places")
    return shift


# --- presence ---------------------------------------------------------------------


def _normalize(atoms: frozenset, presence: Presence) -> frozenset:
    """Ragged input reads as bounds (``m1*M0+m0 < M``); conditions free of an ``exists``'s
    ranks moved out of it."""
    out: set = set()
    for a in atoms:
        if a[0] == "read" and a[1].tensor in presence.inputs:
            out |= _bounds(a, presence)
        elif a[0] == "exists":
            inner = _normalize(a[2], presence)
            free = frozenset(b for b in inner if not atom_ranks(b) & set(a[1]))
            out |= free
            out.add(("exists", a[1], inner - free))
        else:
            out.add(a)
    return frozenset(out)


def _bounds(atom: tuple, presence: Presence) -> set:
    acc = atom[1]
    arg = presence.inputs[acc.tensor]
    out = set()
    for pos, sub in enumerate(acc.subscripts):
        if presence.in_range(arg, pos, sub):
            continue
        if not _nonnegative(sub):
            return {atom}
        out.add(("where", Binary("<", sub, Size(arg.ranks[pos]))))
    return out


def _nonnegative(e: Expr) -> bool:
    if isinstance(e, (Index, Size)):
        return True
    if isinstance(e, Num):
        return e.value >= 0
    return isinstance(e, Binary) and e.op in ("+", "*", "//") and (
        _nonnegative(e.left) and _nonnegative(e.right))


def _extra_points(defn: Definition, state: MaxState, st: Einsum, shift: Shift) -> frozenset:
    """The sum's conditions beyond its max's points; NotStreamable unless they are
    invariant per fiber (see the module doc)."""
    presence = Presence(defn)
    exclude = frozenset({state.name})
    scope = frozenset(st.lhs) | frozenset(st.expr.ranks)
    own = simplify(_normalize(presence.point(st, exclude), presence), scope)
    pos = state.lhs.index(state.rank)
    to_sum = {r: (Index(state.rank) if k == pos else shift.read.subscripts[k])
              for k, r in enumerate(state.lhs)}
    to_state = dict(zip(state.local_st.lhs, state.local.subscripts))
    try:
        atoms = [substitute_atom(a, to_state) for a in presence.point(state.local_st, exclude)]
        atoms = [substitute_atom(a, to_sum) for a in atoms]
    except Capture:
        raise NotStreamable("cannot relate the max's points to the sum's") from None
    points = simplify(_normalize(frozenset(atoms), presence), scope)
    extra = own - points
    if not points <= own or varying(extra, set(st.expr.ranks)):
        raise NotStreamable("is summed at other points than its running max's local max")
    return extra


# ---------------------------------------------------------------------------
# Rewrite
# ---------------------------------------------------------------------------


def _fold(defn: Definition, state: MaxState, st: Statement) -> Definition:
    inner = _check_shape(state, st)
    _check_reads(defn, state, st)
    shift = _the_shift(defn, state, st)
    extra = _extra_points(defn, state, st, shift)
    taken = taken_names(defn)
    local = fresh_name(local_name(st.tensor), taken)
    running = fresh_name(running_name(st.tensor), taken)
    i = state.rank
    lhs = (i,) + st.lhs
    ids = _ids(lhs)
    new_inits = [IterativeEinsum(running, lhs, i, True, Num(0), loc=st.loc)]
    body = [_local_sum(state, st, shift, local, inner), _update(state, shift, running, local, ids)]
    if extra:
        seen = fresh_name(running + "_seen", taken)
        new_inits.append(IterativeEinsum(seen, lhs, i, True, Num(0), loc=st.loc))
        mark = Binary("+", Num(1), Binary("*", Num(0), Access(local, ids)))
        body.append(IterativeEinsum(seen, lhs, i, False, mark, loc=st.loc))
        guard = Binary("!=", Access(seen, (Size(i),) + ids[1:]), Num(0))  # != keeps NaN present
    else:
        guard = Binary("!=", shift.read, NEG_INF)
    final = Einsum(st.tensor, st.lhs, Access(running, (Size(i),) + ids[1:]), guard, loc=st.loc)
    return _splice(defn, state, st, new_inits, body + [final])


def _at(state: MaxState, read: Access, step: Expr) -> Access:
    pos = state.lhs.index(state.rank)
    subs = list(read.subscripts)
    subs[pos] = step
    return Access(read.tensor, tuple(subs))


def _local_sum(state: MaxState, st: Einsum, shift: Shift, name: str, inner) -> Einsum:
    """``L<S>[i, x] = sum[j](F with T[I, s] -> T[i+1, s])``."""
    after = _at(state, shift.read, Binary("+", Index(state.rank), Num(1)))
    body = transform(st.expr.body, lambda n: after if n == shift.read else None)
    return Einsum(name, (state.rank,) + st.lhs, Reduce("sum", inner, body), st.where, loc=st.loc)


def _update(state: MaxState, shift: Shift, running: str, local: str, ids) -> IterativeEinsum:
    """``R<S>[i+1, x] = L<S>[i, x] + R<S>[i, x] * exp(c * (T[i, s] - T[i+1, s]))``."""
    i = Index(state.rank)
    diff: Expr = Binary("-", _at(state, shift.read, i),
                        _at(state, shift.read, Binary("+", i, Num(1))))
    for op, c in shift.ops:
        diff = Binary(op, diff, c)
    rescaled = Binary("*", Access(running, ids), Call(shift.fn, (diff,)))
    return IterativeEinsum(running, tuple(r.rank for r in ids), state.rank, False,
                           Binary("+", Access(local, ids), rescaled))


def _splice(defn: Definition, state: MaxState, st: Statement, inits, rest) -> Definition:
    """Inits after the loop's last init; the loop statements and the final map where ``st``
    was."""
    last = max(k for k, s in enumerate(defn.statements) if isinstance(s, IterativeEinsum)
               and s.init and s.iter_rank == state.rank)
    out: list[Statement] = []
    for k, s in enumerate(defn.statements):
        out += rest if s is st else [s]
        if k == last:
            out += inits
    return dataclasses.replace(defn, statements=tuple(out))
