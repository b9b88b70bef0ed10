"""``online``: derive the 1-pass online form (FuseMax's Cascade 5) of a cascade.

Applies to a max reduction over a rank ``R`` whose result is subtracted
inside ``exp``/``exp2`` and consumed, through such shifted exponentials, by
sum reductions over ``R``.  ``R`` is split into tiles (``R1`` of ``R0``) and
every reduction over ``R`` becomes a local reduction over the tile plus a
running state over ``R1``; a sum that carries ``exp(X - GM)`` is rescaled by
``exp(RM[r1] - RM[r1+1])`` when the running max moves.  Before → after (the
deferred Cascade 4, tile 64)::

    QK[p,m]  = sum[e](Q[p,e] * K[m,e])
    GM[p]    = max[m](QK[p,m])
    SN[p,m]  = exp(QK[p,m] - GM[p])
    SD[p]    = sum[m](SN[p,m])
    SNV[p,f] = sum[m](SN[p,m] * V[m,f])
    AV[p,f]  = SNV[p,f] / SD[p]

    let M0 = 64
    let M1 = ceil(M/M0)
    BK[m1,m0,e] = K[m1 * M0 + m0, e]                  # every input read along m, blocked
    BV[m1,m0,f] = V[m1 * M0 + m0, f]
    RM[0,p] = -inf                                     # running states: their inits
    RD[0,p] = 0
    RNV[0,p,f] = 0
    BQK[m1,m0,p] = sum[e](Q[p,e] * BK[m1,m0,e])       # maps over m: per tile
    LM[m1,p] = max[m0](BQK[m1,m0,p])                  # local max, running max
    RM[m1+1,p] = max(RM[m1,p], LM[m1,p])
    SLN[m1,m0,p] = exp(BQK[m1,m0,p] - RM[m1 + 1, p])  # shifted by the running max
    SLD[m1,p] = sum[m0](SLN[m1,m0,p])                 # local sums
    SLNV[m1,p,f] = sum[m0](SLN[m1,m0,p] * BV[m1,m0,f])
    PRM[m1,p] = exp(RM[m1,p] - RM[m1 + 1, p])         # rescale factor
    RD[m1+1,p] = SLD[m1,p] + RD[m1,p] * PRM[m1,p]     # running sums
    RNV[m1+1,p,f] = SLNV[m1,p,f] + RNV[m1,p,f] * PRM[m1,p]
    AV[p,f] = RNV[M1,p,f] / RD[M1,p]   where RD[M1,p] > 0

It is generic: any number of sums share a max (denominator, numerator,
softmax_1's ``+ exp(-GM)``, a log-sum-exp ``GM + log(SD)`` read after the
loop); several maxes over ``R`` each get their own running state and rescale
(differential attention); ``exp2`` and positive scalings of ``X - GM`` work;
sums and maxes over ``R`` that do not involve the shift become plain running
reductions.  Names come from the source tensors: ``GM`` → local ``LM``,
running ``RM``, rescale ``PRM``; ``SD`` → ``SLD``, ``RD``; ``SN`` → ``SLN``; any other
``T`` → ``LT``, ``RT``; maps before the shift → ``B<T>``; clashes get a number.

**Absent elements.**  The derived cascade keeps the source's meaning:

* A tile in which a fiber has no computed point gives an absent local
  reduction, so the update is not computed and the state carries (rule 2).
  A running sum is rescaled only when it is updated, so the pass requires
  each rescaled sum to be computed at the points of its max (or nowhere, per
  fiber), otherwise a max that moves in a tile where the sum has no point would
  leave the sum unrescaled: that is a blocker.
* Out-of-bounds reads of a ragged last tile are absent through the blocked
  inputs; a tiled map that reads none of them gets ``where m1 * M0 + m0 < M``.
* After the loop a state is always present (its init is), so every map that
  reads a final state ``T[M1, ...]`` gets a guard: the presence analysis
  (``defer_normalization.Presence``) finds a state with the same presence as
  the source tensor and tests it — ``RD[M1,p] > 0`` for a sum of the shifted
  exponential itself (its max point contributes ``exp(0) = 1``),
  ``RM[M1,p] > -inf`` for a max — and, if none exists, a presence state
  ``R<T>_seen`` (0, then 1 once a tile contributes), over the ranks that
  presence depends on (one per key for a key-major ``dK_1[m,e]``: marked from
  the tile's mask, the ranks it needs non-empty tested apart).  So a fully
  masked row gives 0, never NaN.  The first rescale ``exp(-inf - RM[1,p])`` is 0.

When a max cannot be made one-pass, :func:`online_blockers` names the
dependency that blocks it (the pass leaves that rank alone).

**Without a max.**  A cascade that is already one-pass over a rank ``R``
(sums, maxes and mins over ``R`` whose results are read only after the
reduction) gets the same tiled form with plain running reductions, when no
max-shifted rank was converted: ``R[0] = 0`` (``-inf``, ``inf``) and
``R[r1+1] = L[r1] + R[r1]`` (``max(...)``, ``min(...)``).  Before → after
(causal linear attention with inputs ``FQ``, ``FK``, deferred, tile 64)::

    S[p,m]    = sum[e](FQ[p,e] * FK[m,e])
    SD[p]     = sum[m](S[p,m])            where m <= p + M - P
    SV[p,f]   = sum[m](S[p,m] * V[m,f])   where m <= p + M - P
    AV[p,f]   = SV[p,f] / SD[p]

    let M0 = 64
    let M1 = ceil(M/M0)
    BFK[m1,m0,e] = FK[m1 * M0 + m0, e]                 # loads shared by both sums
    BV[m1,m0,f] = V[m1 * M0 + m0, f]
    RD[0,p] = 0
    RV[0,p,f] = 0
    RD_seen[0,p] = 0                                   # presence of SD (and of SV)
    BS[m1,m0,p] = sum[e](FQ[p,e] * BFK[m1,m0,e])       # maps over m: per tile
    SLD[m1,p] = sum[m0](BS[m1,m0,p])   where m1 * M0 + m0 <= p + M - P
    SLV[m1,p,f] = sum[m0](BS[m1,m0,p] * BV[m1,m0,f])   where m1 * M0 + m0 <= p + M - P
    RD[m1+1,p] = SLD[m1,p] + RD[m1,p]                  # running sums, no rescale
    RV[m1+1,p,f] = SLV[m1,p,f] + RV[m1,p,f]
    RD_seen[m1+1,p] = 1 + 0 * SLD[m1,p]                # 1 once a tile contributes
    AV[p,f] = RV[M1,p,f] / RD[M1,p]   where RD_seen[M1,p] > 0

A sum has no witness of its own presence (it may be 0 where present), so the
final maps test the presence state of the reduction with the fewest ranks
that is present exactly where the source one is, or, when the source's
reduction is absent only if a rank is empty (no ``where``, no ragged reads),
just ``M > 0``.  Which rank (:func:`streamable_regions`): one the pass count
finds one-pass, symbolic, unblocked and streaming an input along it, whose
running states hold no fiber that a later reduction contracts (``m``, not
``e``, for ``S[p,m] = sum[e](...)`` summed over ``m``); of several, the one
that stops the most intermediates shaped like no input (``S[p,m]``) from being
materialised.  One rank per cascade: the backends render one loop.  Non-causal
linear attention, ``FQ·(FK^T V)``, streams ``e``, the contraction it does last.
"""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field

import networkx as nx
import sympy

from ..einsum_ir.exprs import children, free_ranks, transform, walk, with_children
from ..einsum_ir.ir import (Access, Binary, Call, Const, Definition, Einsum, Expr, Index,
                            IterativeEinsum, Num, Reduce, Size, SizeLet, Statement, Unary,
                            size_symbol)
from ..einsum_ir.printer import print_expr
from ..einsum_ir.schedule import dataflow_graph, statement_reads
from .canonicalize import canonicalize
from .names import fresh_rank
from .defer_normalization import (Capture, Presence, atom_ranks, conjoin, fresh_name,
                                  is_reduction, linear_terms, multiply, positive, simplify,
                                  substitute, substitute_atom, taken_names, varying)
from .passcount import count_passes

SHIFT_FUNCTIONS = ("exp", "exp2")


class Blocked(Exception):
    """Why a statement keeps a rank from being made one-pass."""


@dataclass(frozen=True)
class Shift:
    """A factor ``fn(c * (X - GM[subs]))`` of a value; ``ops`` build ``c * (old - new)``."""

    gm: str
    fn: str
    ops: tuple[tuple[str, Expr], ...]
    subs: tuple[Expr, ...]

    def at(self, mapping: dict[str, Expr]) -> "Shift":
        return dataclasses.replace(self, subs=tuple(substitute(s, mapping) for s in self.subs))

    @property
    def rescale(self) -> tuple:
        """What identifies the rescale factor tensor."""
        return (self.gm, self.fn, self.ops)


# ---------------------------------------------------------------------------
# Analysis: the region of a rank and what blocks it
# ---------------------------------------------------------------------------


@dataclass
class Region:
    """Everything over one rank ``R`` that the conversion rewrites."""

    defn: Definition
    rank: str
    maps: dict[str, Einsum]          # carry R: computed per tile
    reductions: dict[str, Einsum]    # reduce over R: local reduction + running state
    maxes: frozenset[str]            # maxes over exactly R: the possible shifts (and mins
                                     # compared for equality: their running min)
    post: frozenset[str]             # other statements that read a reduction's result
    shifts: dict[str, tuple[Shift, ...] | None] = field(default_factory=dict)
    direct: list[tuple[Einsum, Shift]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    inits: dict[str, Expr] = field(default_factory=dict)  # a running max's start (a sink)
    whole: frozenset[str] = frozenset()  # computed before the loop, read per tile as inputs

    def reads_shift(self, e: Expr) -> bool:
        """``e`` reads a max of the region or a map that carries a shift."""
        for n in walk(e):
            if isinstance(n, Access) and (n.tensor in self.maxes or self.map_shifts(n.tensor)):
                return True
        return False

    def map_shifts(self, name: str) -> tuple[Shift, ...]:
        if name not in self.maps:
            return ()
        if name not in self.shifts:
            self.shifts[name] = None  # a cycle is impossible: maps form a DAG
            self.shifts[name] = _statement_shifts(self, self.maps[name])
        return self.shifts[name] or ()


def candidate_maxes(defn: Definition) -> dict[str, list[str]]:
    """Rank -> the maxes over exactly that rank whose result is read inside exp/exp2, and
    the maxes and mins over it that a ``select`` compares for equality (a gradient's
    first attaining point, :meth:`attnc.passes.backward._Builder.first_attaining`)."""
    in_exp: set[str] = set()
    for st in defn.statements:
        for e in (st.expr, st.where):
            for n in walk(e) if e is not None else ():
                if isinstance(n, Call) and n.fn in SHIFT_FUNCTIONS:
                    in_exp |= {a.tensor for a in walk(n) if isinstance(a, Access)}
    compared = equality_compared(defn)
    out: dict[str, list[str]] = {}
    for st in defn.statements:
        if (_is_max_over_one(st) and st.tensor in in_exp) or \
                (_is_extremum_over_one(st) and st.tensor in compared):
            out.setdefault(st.expr.ranks[0], []).append(st.tensor)
    return out


def _is_extremum_over_one(st: Statement) -> bool:
    return (is_reduction(st) and st.expr.op in ("max", "min") and len(st.expr.ranks) == 1
            and st.expr.ranks[0] not in st.lhs)


def equality_compared(defn: Definition) -> frozenset[str]:
    """Tensors read as a side of the condition of ``select(X == T[...], a, b)``."""
    out: set[str] = set()
    for st in defn.statements:
        for e in (st.expr, st.where):
            for n in walk(e) if e is not None else ():
                cond = equality_condition(n)
                if cond is not None:
                    out |= {side.tensor for side in (cond.left, cond.right)
                            if isinstance(side, Access)}
    return frozenset(out)


def equality_condition(e: Expr) -> Binary | None:
    """The condition of ``select(X == Y, a, b)``."""
    if isinstance(e, Call) and e.fn == "select" and isinstance(e.args[0], Binary) \
            and e.args[0].op == "==":
        return e.args[0]
    return None


def _is_max_over_one(st: Statement) -> bool:
    return (is_reduction(st) and st.expr.op == "max" and len(st.expr.ranks) == 1
            and st.expr.ranks[0] not in st.lhs)


def fold_max_inits(defn: Definition, rank: str | None = None) -> tuple[Definition, dict[str, Expr]]:
    """A max over ``R`` joined, after the reduction, with values that do not vary over
    ``R`` is one running max that *starts* at them (a monoid's identity replaced by a
    start value: max is idempotent, so the start joins once whatever the tiling).  Before
    → after (an attention sink inside the softmax's max)::

        MX_max[h,p] = max[m](S[h,p,m])            MX[h,p] = max[m](S[h,p,m])
        MX[h,p] = max(MX_max[h,p], SINK[h])   ->  (its running max starts at SINK[h]:
                                                   RMX[0,h,p] = SINK[h], not -inf)

    Only when the reduction is read by that join alone, the join has no ``where``, and
    the start values are present wherever the join is computed (numbers, parameters,
    in-range reads of arguments over the join's ranks): then the folded max is present
    exactly where the source's join was.  ``rank``: fold only maxes over it.  Returns the
    folded definition and the start value of each folded max.
    """
    by_name = {st.tensor: st for st in defn.statements}
    readers: dict[str, list[str]] = {}
    for st in defn.statements:
        for acc in statement_reads(st):
            readers.setdefault(acc.tensor, []).append(st.tensor)
    outputs = {o.name for o in defn.outputs}
    folds: dict[str, tuple[str, Expr]] = {}   # join -> (reduction, start)
    for st in defn.statements:
        found = _max_join(defn, st, by_name)
        if found is None:
            continue
        red, start = found
        if rank is not None and by_name[red].expr.ranks != (rank,):
            continue
        if readers.get(red) == [st.tensor] and red not in outputs:
            folds[st.tensor] = (red, start)
    if not folds:
        return defn, {}
    folded = {red: join for join, (red, _) in folds.items()}
    statements = []
    for st in defn.statements:
        if st.tensor in folds:
            continue
        if st.tensor in folded:
            st = dataclasses.replace(st, tensor=folded[st.tensor])
        statements.append(st)
    inits = {join: start for join, (_, start) in folds.items()}
    return dataclasses.replace(defn, statements=tuple(statements)), inits


def _max_join(defn: Definition, st: Statement, by_name) -> tuple[str, Expr] | None:
    """``T = max(A, Y...)`` (nested, any order) with ``A`` a max over one rank of the same
    left side and the ``Y`` total and invariant over it: (A, start Y)."""
    if not isinstance(st, Einsum) or st.where is not None:
        return None
    args = _max_args(st.expr)
    if args is None or len(args) < 2:
        return None
    identity = tuple(Index(r) for r in st.lhs)
    reds = [a for a in args if isinstance(a, Access) and a.subscripts == identity
            and isinstance(by_name.get(a.tensor), Einsum) and _is_max_over_one(by_name[a.tensor])
            and by_name[a.tensor].lhs == st.lhs]
    if len(reds) != 1:
        return None
    red = by_name[reds[0].tensor]
    rest = [a for a in args if a is not reds[0]]
    if not all(_total_start(defn, y, st.lhs, red.expr.ranks[0]) for y in rest):
        return None
    start = rest[0]
    for y in rest[1:]:
        start = Call("max", (start, y))
    return red.tensor, start


def _max_args(e: Expr) -> list[Expr] | None:
    if isinstance(e, Call) and e.fn == "max":
        out = []
        for a in e.args:
            out += _max_args(a) or [a]
        return out
    return None


def _total_start(defn: Definition, e: Expr, lhs: tuple[str, ...], rank: str) -> bool:
    """``e`` is present at every point of ``lhs`` and does not vary over ``rank``."""
    args = {a.name: a for a in defn.tensor_args}
    for n in walk(e):
        if isinstance(n, Index) and n.rank not in lhs:
            return False
        if isinstance(n, Access):
            arg = args.get(n.tensor)
            if arg is None or any(not (isinstance(sub, Index) and sub.rank == r)
                                  for sub, r in zip(n.subscripts, arg.ranks)):
                return False
    return rank not in free_ranks(e)


def analyze_folded(defn: Definition, rank: str) -> Region:
    """:func:`analyze` of the definition with the maxes over ``rank`` that start at a
    value folded (:func:`fold_max_inits`); the region keeps the start values."""
    folded, inits = fold_max_inits(defn, rank)
    region = analyze(folded, rank)
    region.inits = {n: y for n, y in inits.items() if n in region.maxes}
    if set(region.inits) != set(inits):
        return analyze(defn, rank)
    return region


def analyze(defn: Definition, rank: str) -> Region:
    """The region over ``rank``; ``region.problems`` lists what blocks the conversion."""
    whole = _computed_whole(defn, rank)
    maps = {st.tensor: st for st in defn.statements if isinstance(st, Einsum) and rank in st.lhs
            and st.tensor not in whole}
    reductions = {st.tensor: st for st in defn.statements
                  if is_reduction(st) and rank in st.expr.ranks and rank not in st.lhs
                  and st.tensor not in whole}
    compared = equality_compared(defn)
    maxes = frozenset(n for n, st in reductions.items() if st.expr.ranks == (rank,)
                      and (st.expr.op == "max" or (st.expr.op == "min" and n in compared)))
    region = Region(defn, rank, maps, reductions, maxes, _post(defn, maps, reductions), whole=whole)
    for name in sorted(whole & region.post):  # a step reads the previous step's reduction
        region.problems.append(
            f"{name} belongs to a recurrence over another rank that carries {rank.lower()} "
            f"and reads a reduction over {rank.lower()}: each step would need its own loop "
            f"over {rank.lower()}'s tiles (a nested loop, not derived)")
    _check_structure(region)
    for st in list(maps.values()) + list(reductions.values()):
        _check_reads(region, st)
    for name in maps:
        region.map_shifts(name)
    for st in reductions.values():
        region.shifts[st.tensor] = _statement_shifts(region, st)
    _check_presence(region)
    return region


def _computed_whole(defn: Definition, rank: str) -> frozenset[str]:
    """A recurrence over another rank that carries ``rank`` (selective attention's
    ``FS[p+1,m] = FS[p,m] + relu(S[p,m])``), with the maps over ``rank`` it reads: they
    are computed whole before the loop over ``rank``'s tiles, whose statements read them
    at the tile's positions as they read inputs (the nested form: each step of the
    recurrence is a row of the online softmax).  Before → after (its statements)::

        S[p,m] = ...; FS[p+1,m] = FS[p,m] + relu(S[p,m]) where m < p     (as they were)
        L[p,m] = S[p,m] - FS[p,m]                ->  BL[m1,m0,p] = S[p, m1*M0 + m0]
                                                            - FS[p, m1*M0 + m0]
        GM[p] = max[m](L[p,m]) ...                   LM[m1,p] = max[m0](BL[m1,m0,p]) ...
    """
    carried = {st.tensor for st in defn.statements if isinstance(st, IterativeEinsum)
               and st.iter_rank != rank and rank in st.lhs}
    if not carried:
        return frozenset()
    graph = dataflow_graph(defn)
    out = set(carried)
    for name in carried:
        out |= {n for n in nx.ancestors(graph, name)
                if any(isinstance(st, Einsum) and st.tensor == n and rank in st.lhs
                       for st in defn.statements)}
    return frozenset(out)


def _post(defn: Definition, maps, reductions) -> frozenset[str]:
    g = dataflow_graph(defn)
    after: set[str] = set()
    for name in reductions:
        after |= nx.descendants(g, name)
    return frozenset(after - set(maps) - set(reductions))


def _check_structure(region: Region) -> None:
    r = region.rank.lower()
    for st in region.defn.statements:
        if isinstance(st, IterativeEinsum) and st.iter_rank == region.rank:
            region.problems.append(f"{st.tensor} is already iterative over {r}")
        if st.tensor in region.maps and any(region.rank in red.ranks for red in _reduces(st)):
            region.problems.append(f"{st.tensor} reduces over {r} while carrying {r}")
        if st.tensor not in region.maps and st.tensor not in region.reductions \
                and st.tensor not in region.whole:
            _check_outside(region, st)
    for out in region.defn.outputs:
        if out.name in region.maps:
            region.problems.append(f"output {out.name} carries {r}: it needs every tile at once")


def _reduces(st: Statement) -> list[Reduce]:
    return [n for n in walk(st.expr) if isinstance(n, Reduce)]


def _check_outside(region: Region, st: Statement) -> None:
    for acc in statement_reads(st):
        if acc.tensor in region.maps:
            region.problems.append(
                f"{st.tensor} reads {print_expr(acc)} outside a reduction over "
                f"{region.rank.lower()}, so {acc.tensor} cannot stay per-tile")


def _check_reads(region: Region, st: Einsum) -> None:
    r = region.rank.lower()
    for acc in statement_reads(st):
        name = acc.tensor
        if name in region.maps and not _plain_along(acc, region.maps[name].lhs, region.rank):
            region.problems.append(f"{st.tensor} reads {print_expr(acc)}: only {r} itself can be "
                                   f"tiled along {r}")
        elif name in region.reductions and name not in region.maxes:
            op = region.reductions[name].expr.op
            region.problems.append(
                f"{st.tensor} reads {name}, a {op} over {r}, inside the loop over {r}: "
                f"{name} is complete only after the last tile (defer-normalization moves such "
                f"factors out of reductions)")
        elif name in region.post:
            region.problems.append(f"{st.tensor} reads {name}, which needs a reduction over "
                                   f"{r}, inside the loop over {r}")
        elif name in region.defn.iterative_tensors and name not in region.whole:
            region.problems.append(f"{st.tensor} reads the iterative tensor {name}")


def _plain_along(acc: Access, ranks: tuple[str, ...], rank: str) -> bool:
    pos = ranks.index(rank)
    others = [s for i, s in enumerate(acc.subscripts) if i != pos]
    return acc.subscripts[pos] == Index(rank) and not any(rank in free_ranks(s) for s in others)


# --- shifts -----------------------------------------------------------------------


def _statement_shifts(region: Region, st: Einsum) -> tuple[Shift, ...] | None:
    try:
        if st.where is not None and region.reads_shift(st.where):
            raise Blocked("reads the shifted exponential in its where")
        found = _shifts(region, st, st.expr)
        if st.tensor in region.reductions:
            _check_reduction_shifts(region, st, found)
        return found
    except Blocked as why:
        region.problems.append(f"{st.tensor} {why}")
        return None


def _check_reduction_shifts(region: Region, st: Einsum, found) -> None:
    """A sum carries any shift factors; a max or min only an equality with its own
    identity elsewhere (``min[m](select(S == N, m, inf))``: reset, not rescaled)."""
    if not found or st.expr.op == "sum":
        return
    cond = equality_condition(st.expr.body)
    if len(found) == 1 and found[0].fn == "eq" and cond is not None \
            and st.expr.body.args[2] == INITS[st.expr.op]:
        return
    if any(s.fn == "eq" for s in found):
        raise Blocked(f"takes the {st.expr.op} of values selected where a running "
                      f"{found[0].gm} is attained, other than select(X == "
                      f"{found[0].gm}, a, {print_expr(INITS[st.expr.op])})")
    raise Blocked(f"takes the {st.expr.op} of a shifted exponential")


def _shifts(region: Region, st: Einsum, e: Expr) -> tuple[Shift, ...]:
    """The shift factors of ``e``; Blocked when the max enters it in any other way."""
    if not region.reads_shift(e):
        return ()
    if isinstance(e, Access) and e.tensor in region.maps:
        mapping = dict(zip(region.maps[e.tensor].lhs, e.subscripts))
        return tuple(s.at(mapping) for s in region.map_shifts(e.tensor))
    if isinstance(e, Call) and e.fn in SHIFT_FUNCTIONS:
        shift = _exp_shift(region, e)
        region.direct.append((st, shift))
        return (shift,)
    eq = _equality_shift(region, st, e)
    if eq is not None:
        region.direct.append((st, eq))
        return (eq,)
    if isinstance(e, Binary) and e.op == "*":
        return _shifts(region, st, e.left) + _shifts(region, st, e.right)
    if isinstance(e, Binary) and e.op == "/" and not region.reads_shift(e.right):
        return _shifts(region, st, e.left)
    if isinstance(e, Unary) and e.op == "-":
        return _shifts(region, st, e.operand)
    common = _common_shift(region, st, e)
    if common:
        return common
    if isinstance(e, Reduce) and (e.op == "sum" or e is st.expr):
        inner = _shifts(region, st, e.body)
        if any(free_ranks(sub) & set(e.ranks) for s in inner for sub in s.subs):
            raise Blocked("reduces the shifted exponential along a rank of its max's result")
        return inner
    bare = _bare_max(region, e)
    if bare is not None:
        raise Blocked(f"uses {bare} outside exp(... - {bare}), inside the loop over "
                      f"{region.rank.lower()}")
    raise Blocked(f"combines a shifted exponential by {_describe(e)}, which does not factor out "
                  f"of the sum")


POSITIVELY_HOMOGENEOUS = ("relu", "abs")  # f(a * x) = a * f(x) for a > 0


def _common_shift(region: Region, st: Einsum, e: Expr) -> tuple[Shift, ...]:
    """The shift factors every operand of ``e`` shares, when it is a sum or difference, a
    max or min, or ``relu`` / ``abs`` of operands carrying the same positive factor:
    ``a·x ± a·y = a·(x ± y)``, ``max(a·x, a·y) = a·max(x, y)``, ``relu(a·x) = a·relu(x)``.
    Before → after (softpick: ``exp(S - MX) - exp(-MX) = exp(-MX) · (exp(S) - 1)``)::

        X[p,m] = exp(S[p,m] - MX[p]) - exp(-MX[p])   carries exp(0 - MX[p])
        AV[p,f] = relu(X[p,m]) * V[m,f] / D[p]       carries it too: one rescale by the
                                                     running max, as for exp(S - MX) alone
    () when the operands' factors differ (or one has none)."""
    if isinstance(e, Binary) and e.op in ("+", "-"):
        operands = (e.left, e.right)
    elif isinstance(e, Call) and (e.fn in POSITIVELY_HOMOGENEOUS or e.fn in ("max", "min")):
        operands = e.args
    else:
        return ()
    if not all(region.reads_shift(a) for a in operands):
        return ()
    shifts = [_shifts(region, st, a) for a in operands]
    if any(sorted(x, key=repr) != sorted(shifts[0], key=repr) for x in shifts[1:]):
        return ()
    return shifts[0]


def _bare_max(region: Region, e: Expr) -> str | None:
    """A max of the region that ``e`` reads other than inside exp/exp2."""
    if isinstance(e, Access) and e.tensor in region.maxes:
        return e.tensor
    if isinstance(e, Call) and e.fn in SHIFT_FUNCTIONS:
        return None
    return next((m for c in children(e) if (m := _bare_max(region, c))), None)


def _describe(e: Expr) -> str:
    if isinstance(e, Binary):
        return f"'{e.op}'"
    if isinstance(e, Call):
        return f"{e.fn}(...)"
    if isinstance(e, Reduce):
        return f"{e.op}[...]"
    return print_expr(e)


def _equality_shift(region: Region, st: Einsum, e: Expr) -> Shift | None:
    """``select(X == GM, a, b)`` with ``GM`` a max (min) of the region and nothing else
    reading one: the factor ``[X == GM]``.  In a sum (``b = 0``) it is kept by the running
    sum while the running max stays and zeroes it when the max moves (no earlier point
    equals the new one): the rescale ``select(RM[m1] == RM[m1+1], 1, 0)``.  Before →
    after (a max's tie count)::

        NT[p] = sum[m](select(S[p,m] == N[p], 1, 0))

        LNT[m1,p] = sum[m0](select(BS[m1,m0,p] == RN[m1 + 1, p], 1, 0))
        PRN[m1,p] = select(RN[m1,p] == RN[m1 + 1, p], 1, 0)
        RNT[m1+1,p] = LNT[m1,p] + RNT[m1,p] * PRN[m1,p]

    A max or min reduction of such a select with ``b`` its identity is reset instead
    (:func:`_update`)."""
    cond = equality_condition(e)
    if cond is None:
        return None
    for x, gm in ((cond.left, cond.right), (cond.right, cond.left)):
        if isinstance(gm, Access) and gm.tensor in region.maxes and \
                not any(region.reads_shift(y) for y in (x, *e.args[1:])):
            whole = isinstance(st.expr, Reduce) and st.expr.op in ("max", "min") \
                and e is st.expr.body
            if e.args[2] != Num(0) and not whole:
                raise Blocked(f"selects {print_expr(e.args[2])} where {gm.tensor} is not "
                              f"attained, which no running state can rescale")
            return Shift(gm.tensor, "eq", (), gm.subscripts)
    return None


def _exp_shift(region: Region, call: Call) -> Shift:
    arg = call.args[0]
    if any(isinstance(n, Access) and region.map_shifts(n.tensor) for n in walk(arg)):
        raise Blocked(f"applies {call.fn} to a shifted exponential")
    arg, outer = _peel(region, arg)
    terms = [(s, t) for s, t in linear_terms(arg) if region.reads_shift(t)]
    if len(terms) != 1:
        raise Blocked(f"subtracts {len(terms)} maxima in one {call.fn}")
    sign, term = terms[0]
    term, inner = _peel(region, term)
    if not (isinstance(term, Access) and term.tensor in region.maxes) or sign > 0 or \
            region.reductions[term.tensor].expr.op != "max":
        raise Blocked(f"has {call.fn}({print_expr(call.args[0])}), not {call.fn}(X - max)")
    return Shift(term.tensor, call.fn, tuple(inner + outer), term.subscripts)


class NotPositiveScale(Exception):
    """A factor around a shifted max is not known to be a positive constant."""

    def __init__(self, factor: Expr):
        super().__init__(print_expr(factor))
        self.factor = factor


def peel_scale(e: Expr, reads_max) -> tuple[Expr, list[tuple[str, Expr]]]:
    """``(X - GM) * c`` -> ``X - GM, [("*", c)]``: the positive constant factors around the
    side of ``e`` that ``reads_max`` (a predicate on expressions) finds the max in.

    The ops are listed innermost first, the order in which they apply.  Raises
    :class:`NotPositiveScale` for a factor not known to be a positive constant.
    """
    ops: list[tuple[str, Expr]] = []
    while isinstance(e, Binary) and e.op in ("*", "/"):
        left, right = reads_max(e.left), reads_max(e.right)
        if left and not right:
            op, e, c = e.op, e.left, e.right
        elif right and not left and e.op == "*":
            op, e, c = "*", e.right, e.left
        else:
            break
        if not positive(c) or free_ranks(c) or any(isinstance(n, Access) for n in walk(c)):
            raise NotPositiveScale(c)
        ops.insert(0, (op, c))
    return e, ops


def _peel(region: Region, e: Expr) -> tuple[Expr, list[tuple[str, Expr]]]:
    try:
        return peel_scale(e, region.reads_shift)
    except NotPositiveScale as err:
        raise Blocked(f"scales the max by {err}, which is not known to be a "
                      f"positive constant") from None


# --- presence ---------------------------------------------------------------------


def _check_presence(region: Region) -> None:
    """Every shift is taken where its max has points; rescaled sums sit on their max's points."""
    presence = Presence(region.defn)
    exclude = region.maxes
    for st, shift in region.direct:
        if st.tensor in region.reductions:
            own, scope = presence.point(st, exclude), _point_scope(st)
        else:
            own, scope = presence.statement(st, exclude), frozenset(st.lhs)
        if not _max_points(region, presence, shift, scope) <= own:
            region.problems.append(
                f"{st.tensor} computes {shift.fn}(... - {shift.gm}) at points where {shift.gm}'s "
                f"max has none (their masks differ)")
    for name, st in region.reductions.items():
        for shift in region.shifts.get(name) or ():
            if not _sits_on_max(region, presence, st, shift):
                region.problems.append(
                    f"{name} is summed at other points of {region.rank.lower()} than "
                    f"{shift.gm}'s max (their masks differ), so its running sum could not be "
                    f"rescaled in tiles where only the max moves")


def _point_scope(st: Einsum) -> frozenset[str]:
    return frozenset(st.lhs) | frozenset(st.expr.ranks)


def _max_points(region: Region, presence: Presence, shift: Shift, scope) -> frozenset:
    """When a point of ``shift``'s max counts, in the variables of the statement taking it."""
    gm = region.reductions[shift.gm]
    mapping = dict(zip(gm.lhs, shift.subs))
    try:
        atoms = frozenset(substitute_atom(a, mapping) for a in presence.point(gm))
    except Capture:
        return frozenset({("unknown", shift)})  # matches nothing: the check fails safely
    return simplify(atoms, scope)


def _sits_on_max(region: Region, presence: Presence, st: Einsum, shift: Shift) -> bool:
    """Per fiber, the sum has exactly its max's points, or none (only invariant extra atoms)."""
    own = presence.point(st, region.maxes)
    points = _max_points(region, presence, shift, _point_scope(st))
    return points <= own and not varying(own - points, {region.rank})


# ---------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------


def local_name(name: str) -> str:
    """FuseMax's names: GM -> LM, SD -> SLD, SNV -> SLNV; else T -> LT."""
    if len(name) > 1 and name[0] == "G":
        return "L" + name[1:]
    if len(name) > 1 and name[0] == "S":
        return "SL" + name[1:]
    return "L" + name


def running_name(name: str) -> str:
    """FuseMax's names: GM -> RM, SD -> RD, SNV -> RNV; else T -> RT."""
    return "R" + name[1:] if len(name) > 1 and name[0] in "GS" else "R" + name


@dataclass
class _Tiling:
    """The state of one conversion: names and the statements made on the way."""

    region: Region
    r0: str
    r1: str
    taken: set[str]
    presence: Presence
    names: dict[str, str] = field(default_factory=dict)       # map/reduction -> tiled/local
    running: dict[str, str] = field(default_factory=dict)     # reduction -> running state
    blocked: dict[tuple[str, int], Einsum] = field(default_factory=dict)
    rescales: dict[tuple, Einsum] = field(default_factory=dict)
    # presence states by (reduction, ranks kept): (init, update, the local maps it reads)
    seen: dict[tuple, tuple[IterativeEinsum, IterativeEinsum, tuple]] = field(default_factory=dict)

    @property
    def rank(self) -> str:
        return self.region.rank

    @property
    def position(self) -> Expr:
        """``m1 * M0 + m0``: the source index of a tile element."""
        return Binary("+", Binary("*", Index(self.r1), Size(self.r0)), Index(self.r0))

    @property
    def tile_index(self) -> tuple[Expr, ...]:
        return (Index(self.r1), Index(self.r0))

    def step(self, when: str) -> Expr:
        if when == "i":
            return Index(self.r1)
        if when == "i+1":
            return Binary("+", Index(self.r1), Num(1))
        return Size(self.r1)

    def state(self, name: str, when: str, subs) -> Access:
        return Access(self.running[name], (self.step(when),) + tuple(subs))

    def local(self, name: str) -> Access:
        st = self.region.reductions[name]
        return Access(self.names[name], (Index(self.r1),) + _ids(st.lhs))

    def fresh(self, base: str) -> str:
        return fresh_name(base, self.taken)


def _ids(ranks) -> tuple[Expr, ...]:
    return tuple(Index(r) for r in ranks)


def online(defn: Definition, tile: int = 64) -> Definition:
    """The 1-pass form of every max-shifted rank that can have one, else of one rank that
    is reduced in one pass without a shift (see the module doc)."""
    if isinstance(tile, bool) or not isinstance(tile, numbers.Integral) or tile < 1:
        raise ValueError(f"online: tile must be a positive integer, got {tile!r}")
    tile = int(tile)
    defn = canonicalize(defn)
    tried: set[str] = set()
    while (rank := next((r for r in candidate_maxes(fold_max_inits(defn)[0])
                         if r not in tried), None)) is not None:
        tried.add(rank)
        region = analyze_folded(defn, rank)
        if not region.problems:
            defn = _convert(region, tile)
    if not defn.iterative_ranks:
        region = next((r for r in streamable_regions(defn) if r.rank not in tried), None)
        if region is not None:
            defn = _convert(region, tile)
    return defn


# --- ranks reduced in one pass without a shift ------------------------------------------


def streamable_regions(defn: Definition) -> list[Region]:
    """The regions of the ranks that plain running reductions can stream, best first.

    A rank qualifies when the cascade makes one pass over it, it is symbolic (a tile
    rank such as ``let M0 = 64`` is not), its region has no blocker, some reduction over
    it streams an input along it, and no running state would carry a fiber that a later
    reduction contracts (``QK[p,m] = sum[e](...)`` read by a sum over ``m``: streaming
    ``e`` would keep a state of ``m``'s size; a head dim is held whole anyway).  Best is the rank whose tiling stops the
    most *outer* intermediates from being materialised (tensors that carry the rank and
    are not shaped like one input, like ``S[p,m]``), then declaration order.
    """
    from .map_ranks import long_ranks

    passes = count_passes(defn)
    graph = dataflow_graph(defn)
    reductions = {st.tensor: st for st in defn.statements if is_reduction(st)}
    ranked: list[tuple[tuple[int, int], Region]] = []
    for order, rp in enumerate(passes.ranks):
        if rp.constant or rp.count != 1 or not any(rp.rank in st.expr.ranks
                                                   for st in reductions.values()):
            continue
        region = analyze(defn, rp.rank)
        if region.problems or not any(_streams_input(region, st.expr.body)
                                      for st in region.reductions.values()):
            continue
        long = long_ranks(defn)
        if any(_contracted_later(graph, reductions, st, rp.rank,
                                 long if rp.rank in long else None)
               for st in region.reductions.values()):
            continue
        outer = sum(not _input_shaped(defn, st.lhs) for st in region.maps.values())
        ranked.append(((-outer, order), region))
    return [region for _, region in sorted(ranked, key=lambda kr: kr[0])]


def _contracted_later(graph: nx.DiGraph, reductions: dict[str, Einsum], st: Einsum,
                      rank: str, long: frozenset[str] | None) -> bool:
    """A reduction downstream of ``st`` reduces one of ``st``'s other ranks; with ``long``
    (the streamed rank is a sequence rank), only one of those: a state over a head dim,
    cosine's ``dQN[p,e]`` before ``dQL[p] = sum[e](...)``, is held whole by a kernel."""
    others = set(st.lhs) - {rank}
    if long is not None:
        others &= long
    return any(set(reductions[n].expr.ranks) & others
               for n in nx.descendants(graph, st.tensor) if n in reductions)


def _input_shaped(defn: Definition, ranks: tuple[str, ...]) -> bool:
    return any(set(ranks) <= set(a.ranks) for a in defn.tensor_args)


def _streams_input(region: Region, e: Expr, seen: frozenset[str] = frozenset()) -> bool:
    """``e`` reads an argument along the region's rank, directly or through its maps."""
    inputs = {a.name for a in region.defn.tensor_args}
    for n in walk(e):
        if not isinstance(n, Access):
            continue
        if n.tensor in inputs and any(region.rank in free_ranks(s) for s in n.subscripts):
            return True
        st = region.maps.get(n.tensor)
        if st is not None and n.tensor not in seen:
            seen = seen | {n.tensor}
            if _streams_input(region, st.expr, seen) or (
                    st.where is not None and _streams_input(region, st.where, seen)):
                return True
    return False


def online_blockers(defn: Definition) -> list[str]:
    """Why each max over a rank that is used inside exp cannot be made one-pass ([] if none)."""
    defn = canonicalize(defn)
    out: list[str] = []
    for rank, maxes in candidate_maxes(fold_max_inits(defn)[0]).items():
        for problem in dict.fromkeys(analyze_folded(defn, rank).problems):
            out.append(f"{', '.join(maxes)} (max over {rank.lower()}): {problem}")
    return out


def _convert(region: Region, tile: int) -> Definition:
    defn = region.defn
    taken = taken_names(defn)
    r0 = fresh_rank(f"{region.rank}0", taken)
    r1 = fresh_rank(f"{region.rank}1", taken)
    t = _Tiling(region, r0, r1, taken, Presence(defn))
    _name_region(t)
    body = _body(t)
    updates = [_update(t, st) for st in region.reductions.values() if st.expr.op == "sum"]
    finals = _finals(t)
    inits = [_init(t, st) for st in region.reductions.values()]
    statements = (list(t.blocked.values()) + inits + [s[0] for s in t.seen.values()] + body
                  + [x for s in t.seen.values() for x in s[2]]
                  + list(t.rescales.values()) + updates + [s[1] for s in t.seen.values()] + finals)
    lets = defn.lets + (SizeLet(r0, sympy.Integer(tile)),
                        SizeLet(r1, sympy.ceiling(size_symbol(region.rank) / size_symbol(r0))))
    return dataclasses.replace(defn, lets=lets, statements=tuple(statements))


def _name_region(t: _Tiling) -> None:
    for st in t.region.defn.statements:
        if st.tensor in t.region.maps:
            shifted = bool(t.region.map_shifts(st.tensor))
            t.names[st.tensor] = t.fresh(local_name(st.tensor) if shifted else "B" + st.tensor)
        elif st.tensor in t.region.reductions:
            t.names[st.tensor] = t.fresh(local_name(st.tensor))
            t.running[st.tensor] = t.fresh(running_name(st.tensor))


def _body(t: _Tiling) -> list[Statement]:
    """Source order: maps per tile, local reductions (+ max updates); the rest as it was."""
    out: list[Statement] = []
    for st in t.region.defn.statements:
        if st.tensor in t.region.maps:
            out.append(_tiled_map(t, st))
        elif st.tensor in t.region.reductions:
            out.append(_local_reduction(t, st))
            if st.expr.op != "sum":
                out.append(_update(t, st))
        elif st.tensor not in t.region.post:
            out.append(st)
    return out


def _finals(t: _Tiling) -> list[Statement]:
    """Statements after the loop, reading final states; reductions that are outputs copied."""
    outputs = {o.name for o in t.region.defn.outputs}
    out: list[Statement] = []
    for st in t.region.defn.statements:
        if st.tensor in t.region.reductions and st.tensor in outputs:
            out.append(_copy(t, st))
        elif st.tensor in t.region.post:
            out.append(_finalize(t, st))
    return out


# --- per tile -----------------------------------------------------------------------


def _tile(t: _Tiling, e: Expr) -> Expr:
    """An expression of the region rewritten per tile: ``m`` -> ``m1 * M0 + m0``, reads blocked."""
    if isinstance(e, Index) and e.rank == t.rank:
        return t.position
    if isinstance(e, Access):
        return _tile_access(t, e)
    if isinstance(e, Reduce):
        ranks = tuple(t.r0 if r == t.rank else r for r in e.ranks)
        return dataclasses.replace(e, ranks=ranks, body=_tile(t, e.body))
    kids = children(e)
    return with_children(e, tuple(_tile(t, k) for k in kids)) if kids else e


def _tile_access(t: _Tiling, acc: Access) -> Access:
    region, name = t.region, acc.tensor
    if name in region.maps:
        pos = region.maps[name].lhs.index(t.rank)
        rest = tuple(_tile_subscript(t, s) for i, s in enumerate(acc.subscripts) if i != pos)
        return Access(t.names[name], t.tile_index + rest, loc=acc.loc)
    if name in region.maxes:
        return t.state(name, "i+1", acc.subscripts)
    pos = _input_position(t, acc)
    if pos is None:
        return Access(name, tuple(_tile_subscript(t, s) for s in acc.subscripts), loc=acc.loc)
    blocked, shifted = _blocked_input(t, name, pos, acc)
    rest = tuple(Index(shifted[i][0]) if i in shifted else s
                 for i, s in enumerate(acc.subscripts) if i != pos)
    return Access(blocked, t.tile_index + rest, loc=acc.loc)


def _tile_subscript(t: _Tiling, e: Expr) -> Expr:
    """A subscript per tile, ``m`` -> ``m1 * M0 + m0``.  An index tensor read in it stays a
    read of the input: a blocked copy would be a computed tensor, which cannot index."""
    if isinstance(e, Index) and e.rank == t.rank:
        return t.position
    kids = children(e)
    return with_children(e, tuple(_tile_subscript(t, k) for k in kids)) if kids else e


def _input_position(t: _Tiling, acc: Access) -> int | None:
    """Where an input is read at plain ``m`` (and nowhere else along m): it gets a blocked copy."""
    if acc.tensor not in {a.name for a in t.region.defn.tensor_args}:
        return None
    plain = [i for i, s in enumerate(acc.subscripts) if s == Index(t.rank)]
    if len(plain) != 1:
        return None
    others = [s for i, s in enumerate(acc.subscripts) if i != plain[0]]
    return None if any(t.rank in free_ranks(s) for s in others) else plain[0]


def _blocked_input(t: _Tiling, name: str, pos: int, acc: Access, shift: bool = True
                   ) -> tuple[str, dict[int, tuple[str, Expr]]]:
    """``BK[m1,m0,e] = K[m1 * M0 + m0, e]`` (absent past the end), made on first use, and
    the dims read shifted (:func:`_shifted_dims`), which the reader reads at the plain
    rank.  A dim the read indexes by a plain rank of another name keeps that rank (the
    adjoint ``dO[BX,PX,H,F]`` read at ``dO[b,p,h,f]``: ``BdO[p1,p0,B,H,F] = dO[b, p1 * P0 +
    p0, h, f]``, which the kernel's grid rank B indexes; over BX it would be a rank held
    whole)."""
    arg = next(a for a in t.region.defn.tensor_args if a.name == name)
    ranks = [s.rank if isinstance(s, Index) and i != pos else r
             for i, (s, r) in enumerate(zip(acc.subscripts, arg.ranks))]
    others = [r for i, r in enumerate(ranks) if i != pos]
    if len(set(others)) < len(others):  # a diagonal read (X[m, h, h]): the declared ranks
        ranks = list(arg.ranks)
    subs = list(_ids(ranks))
    shifted = _shifted_dims(acc, pos) if shift else {}
    for i, (rank, sub) in shifted.items():
        ranks[i], subs[i] = rank, sub
    others = [r for i, r in enumerate(ranks) if i != pos]
    if len(set(others)) < len(others):  # a shifted rank names another dim: not shifted
        return _blocked_input(t, name, pos, acc, shift=False)
    key = (name, pos, tuple(ranks), tuple(subs))
    if key not in t.blocked:
        subs[pos] = t.position
        lhs = (t.r1, t.r0) + tuple(r for i, r in enumerate(ranks) if i != pos)
        exact = t.presence.in_range(arg, pos, Index(t.rank)) and ranks == list(arg.ranks) \
            and not shifted
        where = None if exact else Binary("<", t.position, Size(t.rank))
        t.blocked[key] = Einsum(t.fresh("B" + name), lhs, Access(name, tuple(subs)), where)
    return t.blocked[key].tensor, shifted


def _shift_or_reflection(e: Expr) -> bool:
    """``e`` adds and subtracts sizes, numbers and one index (``P - 1 - p``, ``p + M - P``):
    a shift or a reflection of that rank, one element per index (not a group ``h // G``)."""
    indices = 0

    def visit(n: Expr) -> bool:
        nonlocal indices
        if isinstance(n, Index):
            indices += 1
            return True
        if isinstance(n, (Size, Num)):
            return True
        return isinstance(n, Binary) and n.op in ("+", "-") and visit(n.left) and visit(n.right)

    return visit(e) and indices == 1


def _shifted_dims(acc: Access, pos: int) -> dict[int, tuple[str, Expr]]:
    """Dims of a blocked input read at an expression of one rank that no other dim reads
    (a reversed row ``X[P - 1 - p, m]``): dim -> (that rank, the expression).  The copy
    reads the input there, ``BX[m1,m0,p] = X[P - 1 - p, m1 * M0 + m0]``, and is read at
    plain ``p`` (a kernel reads a value it holds at its own indices only)."""
    out = {}
    for i, sub in enumerate(acc.subscripts):
        if i == pos or isinstance(sub, Index) or any(isinstance(n, Access) for n in walk(sub)):
            continue
        free = free_ranks(sub)
        if len(free) != 1 or not _shift_or_reflection(sub):
            continue
        (rank,) = free
        if any(rank in free_ranks(s) for j, s in enumerate(acc.subscripts) if j != i):
            continue
        out[i] = (rank, sub)
    return out


def _bound(t: _Tiling, expr: Expr, where: Expr | None) -> Expr | None:
    """Add ``m1 * M0 + m0 < M`` unless a blocked read already makes the ragged end absent."""
    bounded = {st.tensor for st in t.blocked.values()} | {
        t.names[n] for n in t.region.maps}
    for e in (expr, where):
        if e is not None and any(isinstance(n, Access) and n.tensor in bounded for n in walk(e)):
            return where
    return conjoin(where, Binary("<", t.position, Size(t.rank)))


def _tiled_map(t: _Tiling, st: Einsum) -> Einsum:
    lhs = (t.r1, t.r0) + tuple(r for r in st.lhs if r != t.rank)
    expr = _tile(t, st.expr)
    where = _tile(t, st.where) if st.where is not None else None
    return Einsum(t.names[st.tensor], lhs, expr, _bound(t, expr, where), loc=st.loc)


def _local_reduction(t: _Tiling, st: Einsum) -> Einsum:
    """``LM[m1,p] = max[m0](...)``: the reduction over one tile."""
    expr = _tile(t, st.expr)
    where = _tile(t, st.where) if st.where is not None else None
    return Einsum(t.names[st.tensor], (t.r1,) + st.lhs, expr, _bound(t, expr, where), loc=st.loc)


# --- running states -------------------------------------------------------------------

INITS = {"max": Unary("-", Const("inf")), "min": Const("inf"), "sum": Num(0)}


def _init(t: _Tiling, st: Einsum) -> IterativeEinsum:
    """``RM[0,p] = -inf`` (``RMX[0,h,p] = SINK[h]`` for a max that starts at a sink)."""
    start = t.region.inits.get(st.tensor, INITS[st.expr.op])
    return IterativeEinsum(t.running[st.tensor], (t.r1,) + st.lhs, t.r1, True, start,
                           loc=st.loc)


def _update(t: _Tiling, st: Einsum) -> IterativeEinsum:
    """``RM[m1+1] = max(RM[m1], LM[m1])``; ``RD[m1+1] = SLD[m1] + RD[m1] * PRM[m1]``."""
    before = t.state(st.tensor, "i", _ids(st.lhs))
    shifts = t.region.shifts.get(st.tensor) or ()
    if st.expr.op == "sum":
        factors = [before] + [_rescale(t, s) for s in shifts]
        expr = Binary("+", t.local(st.tensor), multiply(factors))
    elif shifts:  # an equality with a running max: the earlier tiles' value is reset
        (shift,) = shifts
        kept = Call("select", (_unmoved(t, shift), before, INITS[st.expr.op]))
        expr = Call(st.expr.op, (kept, t.local(st.tensor)))
    else:
        expr = Call(st.expr.op, (before, t.local(st.tensor)))
    return IterativeEinsum(t.running[st.tensor], (t.r1,) + st.lhs, t.r1, False, expr, loc=st.loc)


def _rescale(t: _Tiling, shift: Shift) -> Access:
    """``PRM[m1,p] = exp(RM[m1,p] - RM[m1+1,p])``, made once per max, function and scale."""
    if shift.rescale not in t.rescales:
        gm = t.region.reductions[shift.gm]
        ids = _ids(gm.lhs)
        if shift.fn == "eq":  # select(RM[m1,p] == RM[m1+1,p], 1, 0)
            factor: Expr = Call("select", (_unmoved(t, shift), Num(1), Num(0)))
        else:
            diff: Expr = Binary("-", t.state(gm.tensor, "i", ids),
                                t.state(gm.tensor, "i+1", ids))
            for op, c in shift.ops:
                diff = Binary(op, diff, c)
            factor = Call(shift.fn, (diff,))
        name = t.fresh("P" + t.running[gm.tensor])
        t.rescales[shift.rescale] = Einsum(name, (t.r1,) + gm.lhs, factor)
    return Access(t.rescales[shift.rescale].tensor, (Index(t.r1),) + shift.subs)


def _unmoved(t: _Tiling, shift: Shift) -> Binary:
    """``RM[m1, subs] == RM[m1+1, subs]``: the running max did not move in tile m1."""
    return Binary("==", t.state(shift.gm, "i", shift.subs), t.state(shift.gm, "i+1", shift.subs))


# --- after the loop -------------------------------------------------------------------


def _final_reads(t: _Tiling, e: Expr | None) -> Expr | None:
    def final(n: Expr) -> Expr | None:
        if isinstance(n, Access) and n.tensor in t.region.reductions:
            return t.state(n.tensor, "final", n.subscripts)
        return None

    return None if e is None else transform(e, final)


def _finalize(t: _Tiling, st: Statement) -> Statement:
    scope = st.lhs + (st.expr.ranks if isinstance(st.expr, Reduce) else ())
    guards = _guards(t, statement_reads(st), scope)
    where = conjoin(_final_reads(t, st.where), *guards)
    return dataclasses.replace(st, expr=_final_reads(t, st.expr), where=where)


def _copy(t: _Tiling, st: Einsum) -> Einsum:
    """An output that is a reduction: ``GM[p] = RM[M1,p]  where RM[M1,p] > -inf``."""
    use = Access(st.tensor, _ids(st.lhs))
    guards = _guards(t, [use], st.lhs)
    return Einsum(st.tensor, st.lhs, _final_reads(t, use), conjoin(*guards), loc=st.loc)


def _guards(t: _Tiling, reads: list[Access], scope: tuple[str, ...]) -> list[Expr]:
    """Conditions that make a map absent where the source's reductions it reads were.

    ``scope`` holds the index variables a guard may use: the left side, and the ranks
    of the statement's reduction (a guard over them filters that reduction).
    """
    states = list(dict.fromkeys(a for a in reads if a.tensor in t.region.reductions))
    covered: frozenset = frozenset()
    for acc in reads:
        if acc.tensor not in t.region.reductions:
            covered |= t.presence.access(acc)
    candidates = states + [Access(n, _ids(st.lhs)) for n, st in t.region.reductions.items()
                           if set(st.lhs) <= set(scope)]
    guards: list[Expr] = []
    for acc in sorted(states, key=lambda a: _guard_order(t, a, candidates)):
        key = t.presence.access(acc)
        if key <= covered:
            continue
        guards.append(_witness(t, key, candidates) or _extent_guard(key - covered)
                      or _seen_guard(t, key, candidates))
        covered |= key
    return guards


def _guard_order(t: _Tiling, acc: Access, candidates: list[Access]) -> tuple:
    """Which state's presence to test first: the one whose presence says the most beyond
    ranks being non-empty, one a final state witnesses, then the one with fewest ranks;
    the others' presence is then often implied, or differs by an extent (``E > 0``).
    Before → after (a ``dQ`` stage: ``dQ_1[p,e]`` reads ``dQ_1_sum[p,e]``, present where
    some key is, and ``dSD_1[p]``, present there when E > 0 too)::

        where RdQ_1_sum_seen[M1,p,e] != 0 and E > 0      (a presence state per p and e)
     -> where RdSD_1_seen[M1,p] != 0                      (one per p, and no other)
    """
    key = t.presence.access(acc)
    conditioned = [a for a in key if not (a[0] == "exists" and not a[2])]
    return (-len(conditioned), _witness(t, key, candidates) is None, len(acc.subscripts))


def _witness(t: _Tiling, key: frozenset, candidates: list[Access]) -> Expr | None:
    """A test on a final state that holds exactly where ``key`` does."""
    for kind in ("positive", "max", "min"):
        for acc in candidates:
            if _witness_kind(t, acc.tensor) == kind and t.presence.access(acc) == key:
                return _test(kind, t.state(acc.tensor, "final", acc.subscripts))
    return None


def _extent_guard(atoms: frozenset) -> Expr | None:
    """``M > 0`` when all that is left to know is that some ranks are not empty.

    An unfiltered reduction over in-range reads is present unless its extent is 0.
    """
    if not atoms or any(a[0] != "exists" or a[2] for a in atoms):
        return None
    ranks = sorted({r for a in atoms for r in a[1]})
    return conjoin(*(Binary(">", Size(r), Num(0)) for r in ranks))


def _witness_kind(t: _Tiling, name: str) -> str | None:
    op = t.region.reductions[name].expr.op
    if name in t.region.inits:
        return None  # it starts at its sink: the state is never -inf, present or not
    if op != "sum":
        return op
    return "positive" if _positive_sum(t.region, t.region.reductions[name]) else None


def _test(kind: str, final: Access) -> Expr:
    """``!=`` the state's initial value, not ``>``: a NaN state is present (NaN propagates
    as in the source cascade), and NaN compares false with everything but ``!=``."""
    if kind == "positive":
        return Binary("!=", final, Num(0))
    if kind == "max":
        return Binary("!=", final, Unary("-", Const("inf")))
    return Binary("!=", final, Const("inf"))


def _positive_sum(region: Region, st: Einsum) -> bool:
    """A sum of ``exp(X - GM)`` itself: its max point adds ``exp(0) = 1``, so present means > 0."""
    e = st.expr.body
    while isinstance(e, Access) and e.tensor in region.maps:
        source = region.maps[e.tensor]
        e = substitute(source.expr, dict(zip(source.lhs, e.subscripts)))
    if not (isinstance(e, Call) and e.fn in SHIFT_FUNCTIONS and region.shifts.get(st.tensor)):
        return False
    try:
        arg, _ = _peel(region, e.args[0])
    except Blocked:
        return False
    terms = sorted(linear_terms(arg), key=lambda st_: -st_[0])
    if len(terms) != 2 or [s for s, _ in terms] != [1, -1]:
        return False
    (_, x), (_, gm_read) = terms
    if not (isinstance(gm_read, Access) and gm_read.tensor in region.maxes) \
            or gm_read.tensor in region.inits:  # the max may be the sink: terms may underflow
        return False
    gm = region.reductions[gm_read.tensor]
    return x == substitute(gm.expr.body, dict(zip(gm.lhs, gm_read.subscripts)))


def _seen_guard(t: _Tiling, key: frozenset, candidates: list[Access]) -> Expr:
    """A presence state: 0, then 1 once a tile contributes to a reduction present at ``key``.

    Of the reductions present exactly there, the one with the fewest ranks keeps it
    (``SD[p]`` rather than ``SNV[p,f]``).
    """
    acc = min((a for a in candidates if t.presence.access(a) == key),
              key=lambda a: len(a.subscripts))
    name = acc.tensor
    st = t.region.reductions[name]
    # ranks the presence does not depend on (a head dim held whole: dK_1[m,e] is present
    # where some query's mask admits m, for every e alike) are not the state's, when the
    # tile's own mask says where it contributes (_some_point)
    depends = frozenset().union(*(atom_ranks(a) for a in key))
    kept = tuple(i for i, r in enumerate(st.lhs) if r in depends)
    lhs = tuple(st.lhs[i] for i in kept)
    where = _some_point(t, key, lhs) if len(kept) < len(st.lhs) else None
    if where is None:
        kept, lhs, label = tuple(range(len(st.lhs))), st.lhs, (name, st.lhs)
    else:  # (one state for every reduction whose tiles contribute at the same points)
        label = ("point", lhs, where)
    if label not in t.seen:
        seen = t.fresh(t.running[name] + "_seen")
        init = IterativeEinsum(seen, (t.r1,) + lhs, t.r1, True, Num(0), loc=st.loc)
        points = ()
        source = t.local(name)
        if where is not None:
            points = (Einsum(t.fresh(f"L{t.region.rank}_any"), (t.r1,) + lhs,
                             Reduce("max", (t.r0,), Num(1)), where),)
            source = Access(points[0].tensor, _ids((t.r1,) + lhs))
        marked = Binary("+", Num(1), Binary("*", Num(0), source))
        update = IterativeEinsum(seen, (t.r1,) + lhs, t.r1, False, marked, loc=st.loc)
        t.seen[label] = (init, update, points)
    final = Access(t.seen[label][0].tensor,
                   (Size(t.r1),) + tuple(acc.subscripts[i] for i in kept))
    if t.seen[label][2]:
        return conjoin(Binary("!=", final, Num(0)), _extent_guard(frozenset(
            a for a in key if a[0] == "exists" and not a[2])))
    return Binary("!=", final, Num(0))  # 1 + 0 * NaN is NaN: still seen (see _test)


def _some_point(t: _Tiling, key: frozenset, lhs: tuple[str, ...]) -> Expr | None:
    """Where a tile has a point of a reduction present at ``key``, over ``lhs`` alone:
    ``key``'s one condition over the streamed rank, tiled (its other atoms say only that
    ranks are not empty, which the guard tests apart).  Before → after (a key-major
    ``dK_1[m,e]``, present where some query's mask admits key ``m``; ``dV_1[m,f]`` shares
    the state)::

        RdK_1_seen[p1+1,m,e] = 1 + 0 * LdK_1[p1,m,e]                  (a state per m and e)
     -> LdK_1_any[p1,m] = max[p0](1)   where m <= p1 * P0 + p0 + M - P and p1 * P0 + p0 < P
        RdK_1_seen[p1+1,m] = 1 + 0 * LdK_1_any[p1,m]                  (one per m)

    None when the key has another kind of condition, or several."""
    conditioned = [a for a in key if not (a[0] == "exists" and not a[2])]
    if len(conditioned) != 1:
        return None
    atom = conditioned[0]
    if atom[0] != "exists" or len(atom) != 3 or tuple(atom[1]) != (t.region.rank,) or any(
            c[0] != "where" for c in atom[2]):
        return None
    conds = atom[2]
    where = conjoin(*(_tile(t, c[1]) for c in sorted(conds, key=repr)),
                    Binary("<", t.position, Size(t.region.rank)))
    if free_ranks(where) - {t.r1, t.r0} - set(lhs) or any(
            isinstance(n, Access) for n in walk(where)):
        return None
    return where

