"""``split_k`` and ``stream_k``: split a one-pass cascade's tile loop across workers.

Both take a cascade with one iterative rank (the tile loop ``M1`` that
``online`` derives) and give every worker ``w`` of ``W`` a share of the tiles.
Each worker runs the same recurrence from the init state over its share: the
states and the loop body's maps get the worker rank and a per-worker step rank
in place of ``m1``, and what the body reads per tile (``LM[m1,p]``, the blocked
inputs) is read at the worker's tile.  A **combine** then merges the workers'
final states.  The combine is derived from each state's update, not
from its name (:func:`combines`):

* a running max/min ``R[i+1] = max(R[i], X[i])`` merges by ``max[w]``;
* a rescaled sum ``R[i+1] = X[i] + R[i] * exp(c*(A[i] - A[i+1]))``, where ``A``
  is a running max, ``c`` a positive constant (``exp2`` too) and ``X`` carries
  ``exp(-c*A[i+1])``, merges by ``sum[w](R_w * exp(c*(A_w - A)))`` with ``A`` the
  merged max (LeanAttention's and Flash-Decoding's merge);
* a running sum ``R[i+1] = R[i] + X[i]`` merges by ``sum[w]``;
* a presence flag ``R[i+1] = 1 + 0 * X[i]`` (a constant update) by ``max[w]``
  (``min[w]`` if the constant is below the init);
* where a running max ``A`` is attained (``online``'s equality factor, a max's first
  attaining point for its gradient): a sum ``R[i+1] = X[i] + R[i] * select(A[i] ==
  A[i+1], 1, 0)`` merges as a rescaled sum, by ``sum[w](R_w * select(A_w == A, 1, 0))``;
  a reset ``R[i+1] = min(select(A[i] == A[i+1], R[i], inf), X[i])`` by ``min[w](select(A_w
  == A, R_w, inf))`` (max likewise): only workers that saw the merged max count;
* anything else raises :class:`SplitKUnsupported`, naming the state and its update
  (:func:`split_k_blockers` lists the reason without raising).

``X`` must not otherwise read the loop's state (it would see a worker's
partial state instead of the whole prefix).  The rescaled merge also relies
on the invariant ``online`` establishes and this pass does not re-prove: a
rescaled sum is updated at every step where its max moves.  Before → after, ``split_k`` of
the causal one-pass cascade with 2 workers (the maps elided)::

    RM[0,p] = -inf
    RM[m1+1,p] = max(RM[m1,p], LM[m1,p])
    PRM[m1,p] = exp(RM[m1,p] - RM[m1 + 1, p])
    RD[m1+1,p] = SLD[m1,p] + RD[m1,p] * PRM[m1,p]
    AV[p,f] = RNV[M1,p,f] / RD[M1,p]   where RD[M1,p] > 0

    let W = 2
    let MT = ceil(M1/W)                        # tiles per worker: tile m1 = w * MT + mt
    RM[w,0,p] = -inf                           # every worker starts from the init
    RM[w,mt+1,p] = max(RM[w,mt,p], LM[w * MT + mt, p])
    PRM[w,mt,p] = exp(RM[w,mt,p] - RM[w, mt + 1, p])   where w * MT + mt < M1
    RD[w,mt+1,p] = SLD[w,mt,p] + RD[w,mt,p] * PRM[w,mt,p]
    CRM[p] = max[w](RM[w,MT,p])                # the merge, derived from the updates
    PCRM[w,p] = select(RM[w,MT,p] == CRM[p], 1, exp(RM[w,MT,p] - CRM[p]))
    CRD[p] = sum[w](RD[w,MT,p] * PCRM[w,p])
    AV[p,f] = CRNV[p,f] / CRD[p]   where CRD[p] > 0

**Absent elements.**  A tile past the end of the loop (``w * MT + mt >= M1``)
reads its blocked inputs out of bounds, so its updates are not computed and
the state carries (rule 2); a body statement that reads no such tile input
gets the guard ``where w * MT + mt < M1`` instead.  A worker with no tile for
a row keeps the init state (max ``-inf``, sums 0).  The merge's rescale is
guarded by ``select(A_w == A, 1, ...)``: where a worker's max equals the merged
one no rescale is needed, and that also covers ``exp(-inf - -inf)`` on a row
no worker saw, so the merged state is the source's init state there and the
final maps' guards (``where CRD[p] > 0``) keep working.

**Stream-K** (:func:`stream_k`) flattens the (unit, tile) space, a unit being
one point of the ranks every state carries (a row ``p``, a head and row
``h, p``), and gives worker ``w`` the contiguous global tiles
``[w*TILES // W, (w+1)*TILES // W)``: shares differ by at most one tile and a
worker may cross from one unit into the next.  In the IR the global tile
``g = w*TILES // W + mt`` is unit ``g // M1``, tile ``g - g // M1 * M1``; every
body statement is guarded by the share and the unit (the IR's states stay dense
over the units; the guards are the license to visit only the worker's own),
and the combine is the split-K one, in ascending worker order.  ``units=()`` splits each unit's tiles
the same way on its own (the decode case, where all work is along M).  A
backend maps it with :func:`stream_k_schedule`: one program per worker walks
its segments ``(unit, first tile, end tile)`` in order, writes one partial state
per segment, and a unit's partial states are merged in ascending worker order.
"""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field

import networkx as nx
import sympy

from ..einsum_ir.exprs import (children, free_ranks, product_factors, transform, walk,
                               with_children)
from ..einsum_ir.ir import (Access, Binary, Call, Const, Definition, Einsum, Expr, Index,
                            IterativeEinsum, Num, Reduce, Size, SizeLet, Statement, Unary,
                            size_symbol)
from ..einsum_ir.printer import print_expr, print_statement
from ..einsum_ir.schedule import dataflow_graph, loop_bodies, statement_reads
from .names import fresh_rank
from .online import INITS
from .defer_normalization import (conjoin, fresh_name, linear_terms, signed_sum, substitute,
                                  taken_names)

SHIFT_FUNCTIONS = ("exp", "exp2")


class SplitKUnsupported(Exception):
    """The cascade's loop cannot be split: its reason names the state and its update."""


class _NotRelative(Exception):
    """Why an expression is not ``Y * exp(-c * A[i+1])`` with ``Y`` free of the loop's state."""


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------


@dataclass
class _Loop:
    """The one iterative rank of a definition: its states and its body."""

    defn: Definition
    rank: str
    inits: dict[str, IterativeEinsum]
    updates: dict[str, IterativeEinsum]
    maps: dict[str, Einsum]  # non-iterative Einsums of the loop body
    _stateful: dict[str, bool] = field(default_factory=dict)

    def is_state(self, name: str) -> bool:
        return name in self.updates

    def in_body(self, name: str) -> bool:
        return name in self.maps or name in self.updates

    def position(self, name: str) -> int:
        return self.defn.tensor_ranks(name).index(self.rank)

    def step(self, acc: Access) -> str | None:
        """``'i'``, ``'i+1'`` or ``'final'`` for a body tensor read along the loop rank."""
        sub = acc.subscripts[self.position(acc.tensor)]
        if sub == Index(self.rank):
            return "i"
        if sub == Binary("+", Index(self.rank), Num(1)):
            return "i+1"
        return "final" if sub == Size(self.rank) else None

    def reads_state(self, e: Expr | None) -> bool:
        """``e`` reads a state, directly or through body maps (their ``where`` included)."""
        return e is not None and any(isinstance(n, Access) and self._stateful_tensor(n.tensor)
                                     for n in walk(e))

    def _stateful_tensor(self, name: str) -> bool:
        if self.is_state(name):
            return True
        if name not in self.maps:
            return False
        if name not in self._stateful:
            st = self.maps[name]
            self._stateful[name] = self.reads_state(st.expr) or self.reads_state(st.where)
        return self._stateful[name]

    def inline(self, acc: Access) -> tuple[Expr, Expr | None]:
        """A body map's expression and ``where`` at the point ``acc`` reads."""
        st = self.maps[acc.tensor]
        mapping = dict(zip(st.lhs, acc.subscripts))
        where = substitute(st.where, mapping) if st.where is not None else None
        return substitute(st.expr, mapping), where


def _loop(defn: Definition) -> _Loop:
    ranks = defn.iterative_ranks
    if len(ranks) != 1:
        found = f"{len(ranks)}" + (f": {', '.join(ranks)}" if ranks else "")
        raise SplitKUnsupported(f"{defn.name}: split-K needs exactly one iterative rank (the "
                                f"tile loop), found {found}")
    rank = ranks[0]
    body = loop_bodies(defn)[rank]
    inits = {st.tensor: st for st in defn.statements if isinstance(st, IterativeEinsum) and st.init}
    updates = {st.tensor: st for st in body if isinstance(st, IterativeEinsum)}
    maps = {st.tensor: st for st in body if isinstance(st, Einsum)}
    loop = _Loop(defn, rank, inits, updates, maps)
    _check_outside(loop)
    return loop


def _check_outside(loop: _Loop) -> None:
    """After the loop only final states may be read; outputs are not states."""
    v = loop.rank.lower()
    for st in loop.defn.statements:
        if loop.in_body(st.tensor) or st.tensor in loop.inits:
            continue
        for acc in statement_reads(st):
            if acc.tensor in loop.maps:
                raise SplitKUnsupported(f"{st.tensor} reads {print_expr(acc)}, a value of the "
                                        f"loop over {v}, outside the loop")
            if loop.is_state(acc.tensor) and loop.step(acc) != "final":
                raise SplitKUnsupported(f"{st.tensor} reads {print_expr(acc)}: only the final "
                                        f"state {acc.tensor}[{loop.rank}, ...] can be merged")
    for out in loop.defn.outputs:
        if loop.in_body(out.name):
            raise SplitKUnsupported(f"output {out.name} is computed inside the loop over {v}")


# ---------------------------------------------------------------------------
# The combine, derived from each state's update
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Combine:
    """How one state's per-worker final values merge.

    ``kind`` is ``"max"``, ``"min"``, ``"sum"``, ``"rescaled"`` or ``"reset max"`` /
    ``"reset min"``; a rescaled sum (and a reset) names its running max ``by`` and its
    rescale factor ``factor``
    (``exp(c*(A[i] - A[i+1]))`` in the update's index variables) and ``by_subs``,
    the subscripts it reads ``A`` at.
    """

    state: str
    kind: str
    by: str | None = None
    factor: Expr | None = None
    by_subs: tuple[Expr, ...] = ()


def combines(defn: Definition) -> dict[str, Combine]:
    """Every state's merge (see the module doc); :class:`SplitKUnsupported` says why not."""
    return _combines(_loop(defn))


def _combines(loop: _Loop) -> dict[str, Combine]:
    out: dict[str, Combine] = {}
    pending = []
    for name, st in loop.updates.items():
        found = _plain_combine(loop, st)
        if found is None:
            pending.append(st)
        else:
            out[name] = found
    for st in pending:
        out[st.tensor] = _rescaled_combine(loop, st, out)
    return {name: out[name] for name in loop.updates}


def _own_before(st: IterativeEinsum) -> Access:
    """``R[i, p, ...]``: the state's own element at the step before."""
    return Access(st.tensor, tuple(Index(r) for r in st.lhs))


def _reads_own(st: IterativeEinsum, e: Expr) -> bool:
    return any(isinstance(n, Access) and n.tensor == st.tensor for n in walk(e))


def _unsupported(loop: _Loop, st: IterativeEinsum, why: str) -> SplitKUnsupported:
    return SplitKUnsupported(
        f"cannot split the loop over {loop.rank.lower()}: state {st.tensor} has the update "
        f"'{print_statement(st)}', {why}")


def _plain_combine(loop: _Loop, st: IterativeEinsum) -> Combine | None:
    """A running max/min, a running sum, a flag; None if the update is none of them."""
    if loop.reads_state(st.where):
        raise _unsupported(loop, st, "whose where reads the loop's state")
    before, e = _own_before(st), st.expr
    if isinstance(e, Call) and e.fn in ("max", "min") and len(e.args) == 2 and before in e.args:
        other = e.args[1] if e.args[0] == before else e.args[0]
        _check_free(loop, st, other)
        return Combine(st.tensor, e.fn)
    terms = linear_terms(e)
    if (1, before) in terms and len(terms) > 1:
        rest = list(terms)
        rest.remove((1, before))
        increment = signed_sum(rest)
        if not _reads_own(st, increment):
            _check_free(loop, st, increment)
            return Combine(st.tensor, "sum")
    return _flag_combine(loop, st)


def _check_free(loop: _Loop, st: IterativeEinsum, increment: Expr) -> None:
    if _reads_own(st, increment):
        raise _unsupported(loop, st, "which reads the state in its increment: not associative")
    if loop.reads_state(increment):
        raise _unsupported(loop, st, f"whose increment {print_expr(increment)} reads the loop's "
                           "state: each worker would see only its own share")


def _flag_combine(loop: _Loop, st: IterativeEinsum) -> Combine | None:
    """``R[i+1] = c`` (its reads only decide whether it is computed): max or min with the init."""
    if _reads_own(st, st.expr):
        return None
    init_st = loop.inits.get(st.tensor)
    value, init = _constant(st.expr), _constant(init_st.expr) if init_st else None
    if value is None or init is None or _where_reads_state(loop, st.expr):
        return None
    return Combine(st.tensor, "max" if value >= init else "min")


def _constant(e: Expr) -> sympy.Expr | None:
    """The value of ``e`` when it does not depend on what it reads (``1 + 0 * X``)."""
    try:
        value = sympy.simplify(_Sympy({}).convert(e))
    except _NotRelative:
        return None
    return value if value.is_number and value.is_real else None


def _where_reads_state(loop: _Loop, e: Expr) -> bool:
    """Whether the presence of ``e`` may depend on the state's values (a body map's where)."""
    for n in walk(e):
        if isinstance(n, Access) and n.tensor in loop.maps:
            inner, where = loop.inline(n)
            if loop.reads_state(where) or _where_reads_state(loop, inner):
                return True
    return False


def _reset_combine(loop: _Loop, st: IterativeEinsum, found: dict[str, Combine]
                   ) -> Combine | None:
    """``R[i+1] = min(select(A[i] == A[i+1], R[i], inf), X[i])`` (max: ``-inf``)."""
    e, before = st.expr, _own_before(st)
    if not (isinstance(e, Call) and e.fn in ("max", "min") and len(e.args) == 2):
        return None
    for kept, increment in ((e.args[0], e.args[1]), (e.args[1], e.args[0])):
        if isinstance(kept, Call) and kept.fn == "select" and kept.args[1] == before \
                and kept.args[2] == INITS[e.fn]:
            by = _attained(loop, kept.args[0], found)
            if by is not None:  # the increment reads A[i+1] (where it is attained): online's
                if _reads_own(st, increment):  # invariant, not re-proven here
                    raise _unsupported(loop, st, "which reads the state in its increment")
                return Combine(st.tensor, f"reset {e.fn}", by[0], kept.args[0], by[1])
    return None



def _attained(loop: _Loop, cond: Expr, found: dict[str, Combine]
              ) -> tuple[str, tuple[Expr, ...]] | None:
    """``A[i, subs] == A[i+1, subs]`` (the running max or min ``A`` did not move): (A, subs)."""
    if not (isinstance(cond, Binary) and cond.op == "==" and isinstance(cond.left, Access)
            and isinstance(cond.right, Access) and cond.left.tensor == cond.right.tensor
            and loop.is_state(cond.left.tensor)):
        return None
    a, b = cond.left, cond.right
    if sorted([loop.step(a) or "?", loop.step(b) or "?"]) != ["i", "i+1"] or \
            _without_step(loop, a) != _without_step(loop, b):
        return None
    if found.get(a.tensor, Combine(a.tensor, "")).kind not in ("max", "min"):
        return None
    return a.tensor, _without_step(loop, a)


def _rescaled_combine(loop: _Loop, st: IterativeEinsum, found: dict[str, Combine]) -> Combine:
    """``R[i+1] = X[i] + R[i] * F[i]``, ``F = exp(c*(A[i] - A[i+1]))``, ``X ~ exp(-c*A[i+1])``;
    or ``F = select(A[i] == A[i+1], 1, 0)``, whose ``X`` is taken where ``A[i+1]`` is
    attained (``online`` establishes it; not re-proven here)."""
    reset = _reset_combine(loop, st, found)
    if reset is not None:
        return reset
    before = _own_before(st)
    terms = linear_terms(st.expr)
    scaled = [t for s, t in terms if s > 0 and before in product_factors(t)]
    if len(terms) != 2 or len(scaled) != 1:
        raise _unsupported(loop, st, "which is not a running max/min, a running sum or "
                           "X + R * exp(c*(A[i] - A[i+1]))")
    increment = next(t for s, t in terms if t is not scaled[0])
    factors = list(product_factors(scaled[0]))
    factors.remove(before)
    if len(factors) != 1 or _reads_own(st, increment) or _reads_own(st, factors[0]):
        raise _unsupported(loop, st, "which is not R * (one rescale factor) plus an increment "
                           "free of R")
    by, factor, subs, scale = _rescale(loop, st, factors[0], found)
    if scale is None:  # an equality factor: X counts where A[i+1] is attained
        if st.tensor not in loop.inits or loop.inits[st.tensor].expr != Num(0):
            raise _unsupported(loop, st, "and a rescaled sum must start from 0")
        return Combine(st.tensor, "rescaled", by, factor, subs)
    try:
        c = _coefficient(loop, increment, Access(by, _at(loop, by, subs, "i+1")))
    except _NotRelative as why:
        raise _unsupported(loop, st, f"and its increment {print_expr(increment)} {why}") from None
    if c.free_symbols:
        raise _unsupported(loop, st, f"and the scale of {by} in its increment "
                           f"{print_expr(increment)} depends on what the increment reads")
    if sympy.simplify(c - scale) != 0:
        raise _unsupported(loop, st, f"and its increment {print_expr(increment)} carries "
                           f"exp(-({c}) * {by}[i+1]), not the rescale's "
                           f"exp(-({scale}) * {by}[i+1])")
    if st.tensor not in loop.inits or loop.inits[st.tensor].expr != Num(0):
        raise _unsupported(loop, st, "and a rescaled sum must start from 0")
    return Combine(st.tensor, "rescaled", by, factor, subs)


def _at(loop: _Loop, name: str, subs: tuple[Expr, ...], when: str) -> tuple[Expr, ...]:
    """``subs`` (the non-loop subscripts of state ``name``) with the step put in place."""
    step = {"i": Index(loop.rank), "i+1": Binary("+", Index(loop.rank), Num(1))}[when]
    pos = loop.position(name)
    return subs[:pos] + (step,) + subs[pos:]


def _without_step(loop: _Loop, acc: Access) -> tuple[Expr, ...]:
    pos = loop.position(acc.tensor)
    return acc.subscripts[:pos] + acc.subscripts[pos + 1:]


def _rescale(loop: _Loop, st: IterativeEinsum, factor: Expr, found: dict[str, Combine]):
    """``(A, exp(...), subs, c)`` of a rescale factor ``exp(c*(A[i,subs] - A[i+1,subs]))``."""
    while isinstance(factor, Access) and factor.tensor in loop.maps:
        factor, where = loop.inline(factor)
        if loop.reads_state(where):
            raise _unsupported(loop, st, "whose rescale factor has a where that reads the state")
    if isinstance(factor, Call) and factor.fn == "select" and factor.args[1:] == (Num(1), Num(0)):
        by = _attained(loop, factor.args[0], found)
        if by is not None:
            return by[0], factor, by[1], None
    if not (isinstance(factor, Call) and factor.fn in SHIFT_FUNCTIONS):
        raise _unsupported(loop, st, f"whose factor {print_expr(factor)} is not exp(c*(A[i] - "
                           "A[i+1])) of a running max A")
    states = list(dict.fromkeys(n for n in walk(factor) if isinstance(n, Access)
                                and loop.is_state(n.tensor)))
    names = {a.tensor for a in states}
    steps = sorted(loop.step(a) or "?" for a in states)
    points = {_without_step(loop, a) for a in states}
    if len(names) != 1 or steps != ["i", "i+1"] or len(points) != 1:
        raise _unsupported(loop, st, f"whose factor {print_expr(factor)} does not compare one "
                           "state at two consecutive steps")
    by = names.pop()
    if found.get(by, Combine(by, "")).kind != "max":
        raise _unsupported(loop, st, f"whose rescale reads {by}, which is not a running max")
    old, new = (a for a in sorted(states, key=lambda a: loop.step(a)))
    scale = _rescale_scale(factor, old, new)
    if scale is None:
        raise _unsupported(loop, st, f"whose factor {print_expr(factor)} is not exp(c*({by}[i] - "
                           f"{by}[i+1])) with a constant c > 0")
    return by, factor, _without_step(loop, old), scale


def _rescale_scale(factor: Call, old: Access, new: Access) -> sympy.Expr | None:
    """``c`` (in base e) when ``factor`` is ``exp(c*(old - new))`` with ``c > 0``, else None."""
    a, b = sympy.Dummy("a"), sympy.Dummy("b")
    try:
        g = _natural(factor.fn, _Sympy({old: a, new: b}).convert(factor.args[0]))
    except _NotRelative:
        return None
    c = sympy.diff(g, a)
    if c.free_symbols & {a, b} or sympy.simplify(g - c * (a - b)) != 0:
        return None
    return c if c.is_positive else None


def _natural(fn: str, g: sympy.Expr) -> sympy.Expr:
    return g * sympy.log(2) if fn == "exp2" else g


def _coefficient(loop: _Loop, e: Expr, ref: Access) -> sympy.Expr:
    """``c`` such that ``e = Y * exp(-c * ref)`` with ``Y`` free of the state."""
    if not loop.reads_state(e):
        return sympy.Integer(0)
    if isinstance(e, Access) and e.tensor in loop.maps:
        inner, where = loop.inline(e)
        if loop.reads_state(where):
            raise _NotRelative(f"reads {e.tensor}, whose where reads the loop's state")
        return _coefficient(loop, inner, ref)
    if isinstance(e, Call) and e.fn in SHIFT_FUNCTIONS:
        return _exp_coefficient(loop, e, ref)
    if isinstance(e, Binary) and e.op in ("*", "/"):
        left, right = _coefficient(loop, e.left, ref), _coefficient(loop, e.right, ref)
        return left + right if e.op == "*" else left - right
    if isinstance(e, Unary) and e.op == "-":
        return _coefficient(loop, e.operand, ref)
    if isinstance(e, Reduce):  # exp(-c * ref) > 0 is a common factor of sum, max and min
        if set(e.ranks) & free_ranks(ref):
            raise _NotRelative(f"reduces over a rank that {print_expr(ref)} is read at")
        return _coefficient(loop, e.body, ref)
    common = (e.left, e.right) if isinstance(e, Binary) and e.op in ("+", "-") else \
        e.args if isinstance(e, Call) and e.fn in ("relu", "abs", "max", "min") else None
    if common is not None:  # a positive factor common to every operand factors out of them
        coefficients = [_coefficient(loop, a, ref) for a in common]
        if all(sympy.simplify(c - coefficients[0]) == 0 for c in coefficients[1:]):
            return coefficients[0]
        raise _NotRelative(f"combines terms scaled by different powers of exp({print_expr(ref)})")
    raise _NotRelative(f"reads the loop's state through {_describe(e)}")


def _exp_coefficient(loop: _Loop, call: Call, ref: Access) -> sympy.Expr:
    b = sympy.Dummy("b")
    g = _natural(call.fn, _Sympy({ref: b}, loop).convert(call.args[0]))
    c = -sympy.diff(g, b)
    if b in c.free_symbols:
        raise _NotRelative(f"is not linear in {print_expr(ref)} inside {call.fn}")
    return c


def _describe(e: Expr) -> str:
    if isinstance(e, Binary):
        return f"'{e.op}'"
    if isinstance(e, Call):
        return f"{e.fn}(...)"
    return print_expr(e)


@dataclass
class _Sympy:
    """Arithmetic of IR expressions as sympy, the ``special`` reads as given symbols.

    A subexpression that reads no special access and is not arithmetic becomes an
    opaque symbol; with a ``loop``, one that reads the loop's state otherwise is refused.
    """

    special: dict[Access, sympy.Symbol]
    loop: _Loop | None = None
    opaque: dict[Expr, sympy.Symbol] = field(default_factory=dict)

    def convert(self, e: Expr) -> sympy.Expr:
        if e in self.special:
            return self.special[e]
        if isinstance(e, Num):
            return sympy.sympify(e.value)
        if isinstance(e, Size):
            return size_symbol(e.rank)
        if isinstance(e, Const):
            return sympy.oo if e.name == "inf" else sympy.pi
        if isinstance(e, Unary) and e.op == "-":
            return -self.convert(e.operand)
        if isinstance(e, Binary) and e.op in ("+", "-", "*", "/"):
            a, b = self.convert(e.left), self.convert(e.right)
            return {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[e.op]
        if any(n in self.special for n in walk(e)):
            raise _NotRelative(f"reads the state through {_describe(e)}")
        if self.loop is not None and self.loop.reads_state(e):
            raise _NotRelative(f"reads the loop's state through {print_expr(e)}")
        return self.opaque.setdefault(e, sympy.Dummy(f"x{len(self.opaque)}"))


# ---------------------------------------------------------------------------
# The rewrite: workers, per-worker steps, the merge
# ---------------------------------------------------------------------------


@dataclass
class _Split:
    """One split: the new ranks, where tile (w, t) is, and when it is one of w's tiles."""

    loop: _Loop
    worker: str
    step: str
    tile: Expr                      # the source tile index of worker w's step t
    share: Expr                     # the step is one of w's tiles
    lets: tuple[SizeLet, ...]
    bounded: bool                   # a tile input read past the end already makes a step absent
    unit_ranks: tuple[str, ...] = ()
    unit_guard: Expr | None = None  # the step belongs to this point's unit (stream-K)
    taken: set[str] = field(default_factory=set)


def _check_workers(workers) -> int:
    if isinstance(workers, bool) or not isinstance(workers, numbers.Integral) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    return int(workers)


def _new_ranks(loop: _Loop, taken: set[str], workers: int) -> tuple[str, str, SizeLet]:
    worker = fresh_rank("W", taken)
    step = fresh_rank(loop.rank.rstrip("0123456789") + "T", taken)
    return worker, step, SizeLet(worker, sympy.Integer(workers))


def split_k(defn: Definition, workers: int) -> Definition:
    """Worker ``w`` runs tiles ``w * MT + mt`` (``MT = ceil(M1 / W)``); states merged after."""
    workers = _check_workers(workers)
    loop = _loop(defn)
    merges = _combines(loop)
    return _rewrite(_split_k_assignment(loop, workers), merges)


def stream_k(defn: Definition, workers: int, units: tuple[str, ...] | None = None) -> Definition:
    """Balanced contiguous shares of the flattened (unit, tile) space (see the module doc).

    ``units`` are the ranks whose points are the grid units, flattened in this order;
    None takes every rank all states carry, ``()`` splits each unit's tiles alike.
    """
    workers = _check_workers(workers)
    loop = _loop(defn)
    merges = _combines(loop)
    units = _unit_ranks(loop) if units is None else tuple(units)
    _check_units(loop, units)
    return _rewrite(_stream_k_assignment(loop, workers, units), merges)


def split_k_blockers(defn: Definition) -> list[str]:
    """Why the definition's loop cannot be split ([] when it can)."""
    try:
        _combines(_loop(defn))
    except SplitKUnsupported as why:
        return [str(why)]
    return []


def _split_k_assignment(loop: _Loop, workers: int) -> _Split:
    taken = taken_names(loop.defn)
    w, t, let_w = _new_ranks(loop, taken, workers)
    tile = Binary("+", Binary("*", Index(w), Size(t)), Index(t))
    steps = SizeLet(t, sympy.ceiling(size_symbol(loop.rank) / size_symbol(w)))
    return _Split(loop, w, t, tile, Binary("<", tile, Size(loop.rank)), (let_w, steps), True,
                  taken=taken)


def _stream_k_assignment(loop: _Loop, workers: int, units: tuple[str, ...]) -> _Split:
    """Global tile ``g = w*TILES // W + mt`` while ``g < (w+1)*TILES // W``."""
    taken = taken_names(loop.defn)
    w, t, let_w = _new_ranks(loop, taken, workers)
    total = fresh_rank("TILES", taken) if units else loop.rank
    g = Binary("+", Binary("//", Binary("*", Index(w), Size(total)), Size(w)), Index(t))
    end = Binary("//", Binary("*", Binary("+", Index(w), Num(1)), Size(total)), Size(w))
    steps = SizeLet(t, sympy.ceiling(size_symbol(total) / size_symbol(w)))
    if not units:
        return _Split(loop, w, t, g, Binary("<", g, end), (let_w, steps), False, taken=taken)
    lets = (let_w, SizeLet(total, _grid_tiles(loop, units)), steps)
    unit_of = Binary("//", g, Size(loop.rank))
    tile = Binary("-", g, Binary("*", unit_of, Size(loop.rank)))
    return _Split(loop, w, t, tile, Binary("<", g, end), lets, False, units,
                  Binary("==", unit_of, _flat(units)), taken)


def _grid_tiles(loop: _Loop, units: tuple[str, ...]) -> sympy.Expr:
    total = size_symbol(loop.rank)
    for u in units:
        total = size_symbol(u) * total
    return total


def _unit_ranks(loop: _Loop) -> tuple[str, ...]:
    """The ranks every state carries, in the order of the first state."""
    lhs = [tuple(r for r in st.lhs if r != loop.rank) for st in loop.updates.values()]
    return tuple(r for r in lhs[0] if all(r in other for other in lhs[1:]))


def _check_units(loop: _Loop, units: tuple[str, ...]) -> None:
    if len(set(units)) != len(units):
        raise ValueError(f"stream_k: unit ranks {units!r} repeat a rank")
    for u in units:
        missing = [n for n, st in loop.updates.items() if u not in st.lhs]
        if u == loop.rank or u not in loop.defn.ranks or missing:
            raise ValueError(f"stream_k: unit rank {u!r} must be a rank every state carries"
                             + (f" ({', '.join(missing)} do not)" if missing else ""))


def _flat(units: tuple[str, ...]) -> Expr:
    """``h * P + p``: the flat index of a unit."""
    out: Expr = Index(units[0])
    for u in units[1:]:
        out = Binary("+", Binary("*", out, Size(u)), Index(u))
    return out


def _rewrite(split: _Split, merges: dict[str, Combine]) -> Definition:
    loop, defn = split.loop, split.loop.defn
    finals = {name: fresh_name("C" + name, split.taken) for name in loop.updates}
    post = _after_loop(loop)
    before: list[Statement] = []
    after: list[Statement] = []
    for st in defn.statements:
        if isinstance(st, IterativeEinsum) and st.init:
            before.append(_worker_init(split, st))
        elif loop.in_body(st.tensor):
            before.append(_worker_statement(split, st))
        elif st.tensor in post:
            after.append(_read_merged(split, st, finals))
        else:
            before.append(st)
    merged = _merge_statements(split, merges, finals)
    return dataclasses.replace(defn, lets=defn.lets + split.lets,
                               statements=tuple(before + merged + after))


def _after_loop(loop: _Loop) -> set[str]:
    """The statements that need a final state, directly or through each other."""
    graph = dataflow_graph(loop.defn)
    out: set[str] = set()
    for name in loop.updates:
        out |= nx.descendants(graph, name)
    return {n for n in out if not loop.in_body(n)}


# --- per worker ------------------------------------------------------------------------


def _split_lhs(split: _Split, lhs: tuple[str, ...]) -> tuple[str, ...]:
    pos = lhs.index(split.loop.rank)
    return lhs[:pos] + (split.worker, split.step) + lhs[pos + 1:]


def _worker_init(split: _Split, st: IterativeEinsum) -> IterativeEinsum:
    """``RM[w,0,p] = -inf``: every worker starts from the init state."""
    return dataclasses.replace(st, lhs=_split_lhs(split, st.lhs), iter_rank=split.step)


def _worker_statement(split: _Split, st: Statement) -> Statement:
    """A body statement per (worker, step), guarded by the worker's share where needed."""
    expr = _in_worker(split, st.expr)
    where = _in_worker(split, st.where) if st.where is not None else None
    guards = [] if split.bounded and _reads_tile_input(split.loop, st, set()) else [split.share]
    if split.unit_guard is not None and set(split.unit_ranks) <= set(st.lhs):
        guards.append(split.unit_guard)
    new = dataclasses.replace(st, lhs=_split_lhs(split, st.lhs), expr=expr,
                              where=conjoin(where, *guards))
    if isinstance(st, IterativeEinsum):
        new = dataclasses.replace(new, iter_rank=split.step)
    return new


def _in_worker(split: _Split, e: Expr) -> Expr:
    """``m1`` -> the worker's tile; body tensors read at ``[w, mt]`` (``mt + 1``)."""
    loop = split.loop
    if isinstance(e, Index) and e.rank == loop.rank:
        return split.tile
    if isinstance(e, Access) and loop.in_body(e.tensor):
        when = loop.step(e)
        if when not in ("i", "i+1") or (when == "i+1" and not loop.is_state(e.tensor)):
            raise SplitKUnsupported(f"{print_expr(e)} reads across steps of the loop over "
                                    f"{loop.rank.lower()}, which workers cannot share")
        pos = loop.position(e.tensor)
        step = Index(split.step) if when == "i" else Binary("+", Index(split.step), Num(1))
        rest = tuple(_in_worker(split, s) for s in e.subscripts)
        return dataclasses.replace(e, subscripts=rest[:pos] + (Index(split.worker), step)
                                   + rest[pos + 1:])
    if isinstance(e, Reduce) and loop.rank in e.ranks:
        raise SplitKUnsupported(f"{print_expr(e)} reduces over the loop rank inside the loop")
    kids = children(e)
    return with_children(e, tuple(_in_worker(split, k) for k in kids)) if kids else e


def _reads_tile_input(loop: _Loop, st: Statement, seen: set[str]) -> bool:
    """``st`` reads, directly or through body maps, a tensor outside the loop at tile ``m1``:
    past the last tile that read is out of bounds, so ``st`` is absent there."""
    for acc in statement_reads(st):
        if acc.tensor in loop.maps and acc.tensor not in seen and loop.step(acc) == "i":
            seen.add(acc.tensor)
            if _reads_tile_input(loop, loop.maps[acc.tensor], seen):
                return True
        elif not loop.in_body(acc.tensor) and _tile_position(loop, acc) is not None:
            return True
    return False


def _tile_position(loop: _Loop, acc: Access) -> int | None:
    ranks = loop.defn.tensor_ranks(acc.tensor)
    if loop.rank in ranks and acc.subscripts[ranks.index(loop.rank)] == Index(loop.rank):
        return ranks.index(loop.rank)
    return None


# --- the merge ---------------------------------------------------------------------------


def _final(split: _Split, name: str, subs: tuple[Expr, ...]) -> Access:
    """``R[w, MT, subs]``: worker ``w``'s final state."""
    pos = split.loop.position(name)
    return Access(name, subs[:pos] + (Index(split.worker), Size(split.step)) + subs[pos:])


def _ids(ranks) -> tuple[Expr, ...]:
    return tuple(Index(r) for r in ranks)


def _state_ranks(split: _Split, name: str) -> tuple[str, ...]:
    return tuple(r for r in split.loop.updates[name].lhs if r != split.loop.rank)


def _merge_statements(split: _Split, merges: dict[str, Combine], finals) -> list[Statement]:
    """Maxes and mins first, then the shared rescale factors, then the sums."""
    plain = [_merge_plain(split, m, finals[n]) for n, m in merges.items()
             if m.kind in ("max", "min", "sum")]
    factors: dict[tuple, Einsum] = {}
    sums = [_merge_rescaled(split, m, finals, factors) for m in merges.values()
            if m.kind == "rescaled"]
    resets = [_merge_reset(split, m, finals) for m in merges.values()
              if m.kind.startswith("reset")]
    return plain + list(factors.values()) + sums + resets


def _merge_reset(split: _Split, merge: Combine, finals) -> Einsum:
    """``CRNA[p] = min[w](select(RN[w,MT,p] == CRN[p], RNA[w,MT,p], inf))``: the workers
    whose running max is the merged one."""
    op = merge.kind.split()[1]
    ranks = _state_ranks(split, merge.state)
    seen = Binary("==", _final(split, merge.by, merge.by_subs),
                  Access(finals[merge.by], merge.by_subs))
    kept = Call("select", (seen, _final(split, merge.state, _ids(ranks)), INITS[op]))
    return Einsum(finals[merge.state], ranks, Reduce(op, (split.worker,), kept))


def _merge_plain(split: _Split, merge: Combine, name: str) -> Einsum:
    ranks = _state_ranks(split, merge.state)
    final = _final(split, merge.state, _ids(ranks))
    if merge.kind in ("max", "min"):
        return Einsum(name, ranks, Reduce(merge.kind, (split.worker,), final))
    init = split.loop.inits[merge.state].expr if merge.state in split.loop.inits else Num(0)
    if init == Num(0):
        return Einsum(name, ranks, Reduce("sum", (split.worker,), final))
    # every worker starts from the init: count it once
    return Einsum(name, ranks, Binary("+", init, Reduce("sum", (split.worker,),
                                                         Binary("-", final, init))))


def _merge_rescaled(split: _Split, merge: Combine, finals, factors: dict) -> Einsum:
    """``CRD[p] = sum[w](RD[w,MT,p] * PCRM[w,p])``."""
    ranks = _state_ranks(split, merge.state)
    rescale = _merged_rescale(split, merge, finals)
    by_ranks = _state_ranks(split, merge.by)
    renamed = _rename(merge.by_subs, by_ranks)
    if renamed is None:  # A read at other than its own points: rescale in place
        factor: Expr = rescale
    else:
        body = substitute(rescale, renamed)
        key = (merge.by, body)
        if key not in factors:
            name = fresh_name("P" + finals[merge.by], split.taken)
            factors[key] = Einsum(name, (split.worker,) + by_ranks, body)
        factor = Access(factors[key].tensor, (Index(split.worker),) + merge.by_subs)
    final = _final(split, merge.state, _ids(ranks))
    return Einsum(finals[merge.state], ranks,
                  Reduce("sum", (split.worker,), Binary("*", final, factor)))


def _merged_rescale(split: _Split, merge: Combine, finals) -> Expr:
    """``select(A_w == A, 1, exp(c*(A_w - A)))`` from the update's own rescale factor."""
    loop = split.loop
    worker = _final(split, merge.by, merge.by_subs)
    merged = Access(finals[merge.by], merge.by_subs)

    def at_merge(n: Expr) -> Expr | None:
        if isinstance(n, Access) and n.tensor == merge.by:
            return worker if loop.step(n) == "i" else merged
        return None

    rescale = transform(merge.factor, at_merge)
    if loop.rank in free_ranks(rescale) or any(
            isinstance(n, Access) and loop.in_body(n.tensor) and n.tensor != merge.by
            for n in walk(rescale)):
        raise SplitKUnsupported(f"the rescale {print_expr(merge.factor)} of {merge.state} "
                                "depends on the step, so the merge cannot apply it")
    return Call("select", (Binary("==", worker, merged), Num(1), rescale))


def _rename(subs: tuple[Expr, ...], ranks: tuple[str, ...]) -> dict[str, Expr] | None:
    """The renaming that reads ``subs`` (distinct index variables) as ``ranks``, if any."""
    if not all(isinstance(s, Index) for s in subs) or len({s.rank for s in subs}) != len(subs):
        return None
    return {s.rank: Index(r) for s, r in zip(subs, ranks)}


def _read_merged(split: _Split, st: Statement, finals: dict[str, str]) -> Statement:
    """``RD[M1,p]`` -> ``CRD[p]`` in a statement after the loop."""
    loop = split.loop

    def merged(n: Expr) -> Expr | None:
        if isinstance(n, Access) and loop.is_state(n.tensor):
            return Access(finals[n.tensor], _without_step(loop, n), loc=n.loc)
        return None

    where = transform(st.where, merged) if st.where is not None else None
    return dataclasses.replace(st, expr=transform(st.expr, merged), where=where)


# ---------------------------------------------------------------------------
# Stream-K's share assignment, for backends
# ---------------------------------------------------------------------------


def stream_k_schedule(units: int, tiles_per_unit: int,
                      workers: int) -> list[list[tuple[int, int, int]]]:
    """Per worker, its ``(unit, first tile, end tile)`` segments in order.

    Worker ``w`` gets the global tiles ``[w*G // W, (w+1)*G // W)`` of the
    ``G = units * tiles_per_unit`` tiles numbered unit by unit, so shares differ
    by at most one tile, every tile has exactly one worker, and a unit's
    segments belong to ascending workers: the order its partial states merge in.
    """
    for what, v in (("units", units), ("tiles_per_unit", tiles_per_unit)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
            raise ValueError(f"stream_k_schedule: {what} must be a non-negative integer, got {v!r}")
    workers = _check_workers(workers)
    total = units * tiles_per_unit
    out: list[list[tuple[int, int, int]]] = []
    for w in range(workers):
        start, end = w * total // workers, (w + 1) * total // workers
        segments = []
        while start < end:
            unit, first = divmod(start, tiles_per_unit)
            stop = min(end, (unit + 1) * tiles_per_unit)
            segments.append((unit, first, first + stop - start))
            start = stop
        out.append(segments)
    return out
