"""``backward``: the vector-Jacobian cascade of a definition, derived as another cascade.

Reverse-mode differentiation of a cascade of Einsums is a cascade of Einsums: the forward
statements are kept (recomputed, not stored), and for every statement ``T[lhs] = E`` that
reads a floating-point tensor ``X`` the adjoint ``dT`` flows back as

    dX <- sum[ranks of the statement not in X's subscripts](dT[lhs] * dE/dX[subs])

with the statement's ``where`` (a point that is not computed contributes nothing).  A
reduction's body is differentiated the same way (sum: the body's derivative; max and min:
the first point that attains it, in its ranks' order, takes the adjoint).  Before → after (one statement)::

    QK[p,m] = Q[p,e] * K[m,e] * scale   where m <= p + M - P

    dQ_1[p,e] = sum[m](dQK[p,m] * K[m,e] * scale)   where m <= p + M - P
    dK_1[m,e] = sum[p](dQK[p,m] * Q[p,e] * scale)   where m <= p + M - P
    dscale_1  = sum[p,m,e](dQK[p,m] * Q[p,e] * K[m,e])   where m <= p + M - P

**Absent elements.**  A contribution is absent where its statement computed nothing, and
the contract's ``+`` of an absent and a present element is absent; so a tensor with several
contributions adds them after filling each one's absent points with 0 — an iterative rank
of size 1 (``F[0,x] = 0; F[z+1,x] = C[x]``: an update that is not computed carries the 0)
— unless each is proven present wherever the tensor is and an empty rank would empty
them all alike (:meth:`_Builder.covers`, :meth:`_Builder.vanishing`): then a plain ``+``,
which kernels can run.  A stabilising shift (softmax's row max,
:mod:`attnc.passes.shift_invariance`) is a constant.  GQA/MQA reads of K and V contribute
per query head, then sum each group.
A tensor no statement reads back has no adjoint; an output's adjoint is an input ``dAV``.
Masked rows therefore get zero gradients, never NaN (the division ``a / b`` is
differentiated only where it was computed).  Integer and bool tensors, and ``where``
conditions, are constants.  A prefix-sum recurrence ``T[i+1, x] = T[i, x] + E`` is
delooped (:mod:`attnc.passes.deloop`) and its adjoint is a suffix sum
(:meth:`_Builder.propagate_recurrence`); other recurrences are refused (a hand-written
online cascade's source form is the one to differentiate).
Other subscripts that are not a rank's own
index scatter by a filter (``... where sub == r``).
"""
from __future__ import annotations

import dataclasses

import sympy

from ..einsum_ir.exprs import children, free_ranks, walk, with_children
from ..einsum_ir.ir import (Access, Binary, Call, Const, Definition, Einsum, Expr, Index,
                            IterativeEinsum, Num, Output, Param, Reduce, Size, SizeLet,
                            Statement, TensorArg, Unary)
from ..einsum_ir.types import FLOAT, type_env
from ..einsum_ir.ir import size_symbol
from .canonicalize import canonicalize
from .defer_normalization import (affine_in_range, conjoin, conjuncts, integer_sympy,
                                  taken_names)
from .deloop import NotAdditive, Recurrence, delooped
from .names import fresh_rank
from .shift_invariance import shifts
from .tile_loads import substitute


class NotDifferentiable(Exception):
    """Why a definition has no derived backward (the message names the statement)."""


def adjoint_name(name: str) -> str:
    return f"d{name}"


# --- derivatives of expressions ---------------------------------------------------------------


def _is_zero(e: Expr) -> bool:
    return isinstance(e, Num) and e.value == 0


def _is_one(e: Expr) -> bool:
    return isinstance(e, Num) and e.value == 1


def _position(ranks: tuple[str, ...]) -> Expr:
    """A point's place in the row-major order of ``ranks``: ``m``; ``r * S + s`` for two."""
    out: Expr = Index(ranks[0])
    for r in ranks[1:]:
        out = Binary("+", Binary("*", out, Size(r)), Index(r))
    return out


def _mul(a: Expr, b: Expr) -> Expr:
    if _is_zero(a) or _is_zero(b):
        return Num(0)
    if _is_one(a):
        return b
    if _is_one(b):
        return a
    return Binary("*", a, b)


def _add(a: Expr, b: Expr) -> Expr:
    if _is_zero(a):
        return b
    if _is_zero(b):
        return a
    return Binary("+", a, b)


def _neg(a: Expr) -> Expr:
    return Num(0) if _is_zero(a) else Unary("-", a)


LN2 = Num(0.6931471805599453)


def derivative(e: Expr, leaf) -> Expr:
    """d e / d leaf, where ``leaf(node)`` is True for the one node differentiated against
    (an access occurrence or a parameter); comparisons and conditions are constants."""
    if leaf(e):
        return Num(1)
    if isinstance(e, (Num, Const, Index, Size, Param, Access)) or not children(e):
        return Num(0)  # another tensor, a size, a constant (subscripts are positions)
    if isinstance(e, Unary):
        return _neg(derivative(e.operand, leaf)) if e.op == "-" else Num(0)
    if isinstance(e, Binary):
        da, db = derivative(e.left, leaf), derivative(e.right, leaf)
        a, b = e.left, e.right
        if e.op == "+":
            return _add(da, db)
        if e.op == "-":
            return _add(da, _neg(db))
        if e.op == "*":
            return _add(_mul(da, b), _mul(a, db))
        if e.op == "/":
            return _add(Binary("/", da, b) if not _is_zero(da) else Num(0),
                        _neg(_mul(db, Binary("/", e, b))))
        if e.op == "**":
            out = Num(0)
            if not _is_zero(da):
                out = _mul(da, _mul(b, Binary("**", a, Binary("-", b, Num(1)))))
            if not _is_zero(db):
                out = _add(out, _mul(db, _mul(e, Call("log", (a,)))))
            return out
        return Num(0)  # comparisons, and/or, //, %: piecewise constant
    if isinstance(e, Call):
        return _call_derivative(e, leaf)
    raise NotDifferentiable(f"cannot differentiate {type(e).__name__}")


def _call_derivative(e: Call, leaf) -> Expr:
    if e.fn == "select":
        c, a, b = e.args
        da, db = derivative(a, leaf), derivative(b, leaf)
        if _is_zero(da) and _is_zero(db):
            return Num(0)
        return Call("select", (c, da, db))
    if e.fn in ("max", "min"):
        a, b = e.args
        da, db = derivative(a, leaf), derivative(b, leaf)
        if _is_zero(da) and _is_zero(db):
            return Num(0)
        pick_a = Binary(">=" if e.fn == "max" else "<=", a, b)
        return Call("select", (pick_a, da, db))
    (x,) = e.args
    dx = derivative(x, leaf)
    if _is_zero(dx):
        return Num(0)
    local = {
        "exp": lambda: e,
        "exp2": lambda: _mul(e, LN2),
        "log": lambda: Binary("/", Num(1), x),
        "log2": lambda: Binary("/", Num(1), _mul(x, LN2)),
        "sqrt": lambda: Binary("/", Num(0.5), e),
        "rsqrt": lambda: Unary("-", _mul(Num(0.5), Binary("/", e, x))),
        "tanh": lambda: Binary("-", Num(1), _mul(e, e)),
        "sigmoid": lambda: _mul(e, Binary("-", Num(1), e)),
        "abs": lambda: Call("select", (Binary(">=", x, Num(0)), Num(1), Unary("-", Num(1)))),
        "relu": lambda: Call("select", (Binary(">", x, Num(0)), Num(1), Num(0))),
    }.get(e.fn)
    if local is None:
        raise NotDifferentiable(f"no derivative for {e.fn}")
    return _mul(dx, local())


# --- the backward cascade ---------------------------------------------------------------------


def backward(defn: Definition, wrt: tuple[str, ...] | None = None,
             nonempty: frozenset = frozenset()) -> Definition:
    """The VJP cascade of ``defn`` (see the module docstring).  Its arguments are
    ``defn``'s and one adjoint ``d<OUT>`` per output; its outputs the gradients
    ``d<X>`` of ``wrt`` (default: every floating-point tensor argument and every float
    scalar parameter), in that order.  ``nonempty``: ranks assumed of size > 0 (their
    emptiness then does not tell contributions apart: a caller checks the sizes)."""
    defn = canonicalize(defn)
    iterative = [st for st in defn.statements if isinstance(st, IterativeEinsum)]
    try:
        defn, recurrences = delooped(defn)
    except NotAdditive as why:
        raise NotDifferentiable(
            f"{defn.name} is an iterative cascade ({iterative[0].tensor} over "
            f"{iterative[0].iter_rank}) whose backward is not derived: {why}; a prefix sum "
            f"(T[i+1, ...] = T[i, ...] + step) is; a hand-written online cascade is "
            f"differentiated through its source form, whose derived online form the backward "
            f"recomputes") from None
    lets = {let.name for let in defn.lets}
    types = type_env(defn)
    floats = {a.name for a in defn.tensor_args if a.dtype is None or a.dtype in
              ("f16", "bf16", "f32", "f64")}
    floats |= {st.tensor for st in defn.statements if types.of(st.expr) == FLOAT}
    for rec in recurrences:  # (FS[0,m] = 0 is an integer; its update adds floats)
        if types.of(rec.update.expr) == FLOAT:
            floats |= {rec.tensor, rec.at, rec.final} - {None}
    params = {p.name for p in defn.scalar_params if p.dtype is None or p.dtype.startswith(("f", "b"))}
    targets = tuple(wrt) if wrt is not None else tuple(
        [a.name for a in defn.tensor_args if a.name in floats] + sorted(params))
    taken = taken_names(defn) | {adjoint_name(n) for n in targets} \
        | {adjoint_name(o.name) for o in defn.outputs}
    # a stabilising shift (softmax's row max) has a zero adjoint: a constant here, so its
    # contributions, its ties and their extra passes are never made
    b = _Builder(defn, floats - shifts(defn), params, taken)
    b.nonempty = frozenset(nonempty)
    for out in defn.outputs:
        b.seed(out)
    by_tensor = {r.tensor: r for r in recurrences}
    # a step's or the final step's copy passes its adjoint to the recurrence's (whose
    # every step is present: a constant start, carried), read there without T itself
    copies = {r.final for r in recurrences} | {r.at for r in recurrences}
    for st in reversed(defn.statements):
        if isinstance(st, IterativeEinsum):
            if not st.init:
                b.propagate_recurrence(by_tensor[st.tensor])
        elif st.tensor not in copies:
            b.propagate(st)
    outputs, statements = [], list(defn.statements)
    for name in targets:
        grad, stmts = b.gradient(name)
        statements += stmts
        outputs.append(grad)
    args = tuple(defn.params) + tuple(TensorArg(adjoint_name(o.name), _adjoint_ranks(o, lets, b))
                                      for o in defn.outputs)
    return dataclasses.replace(defn, name=f"{defn.name}_backward", params=args,
                               lets=defn.lets + tuple(b.lets), statements=tuple(statements),
                               outputs=tuple(outputs))


def _adjoint_ranks(out: Output, lets: set[str], b: "_Builder") -> tuple[str, ...]:
    """The ranks of an output's adjoint argument: the output's, except that a rank a
    ``let`` computes (varlen's ``O[B,P,H,F]`` under ``let B = C - 1``, ``let P = T``) gets a
    rank of its own, bound by the argument's shape (arguments bind sizes; a ``let`` cannot
    be bound twice).  The seed reads it at the output's indices, ``dO[b,p,h,f]``: an
    adjoint of the output's shape is read whole."""
    out_ranks = []
    for r in out.ranks:
        if r in lets:
            r = fresh_rank(f"{r}X", b.taken)
        out_ranks.append(r)
    return tuple(out_ranks)


class _Builder:
    def __init__(self, defn, floats, params, taken):
        self.defn, self.floats, self.params = defn, floats, params
        self.taken = set(taken)
        self.contributions: dict[str, list[Statement]] = {}
        self.adjoint: dict[str, str] = {}      # tensor -> the name of its full adjoint
        self.pending: list[Statement] = []     # adjoint statements, in the order made
        self.lets: list[SizeLet] = []
        self.origin: dict[str, tuple] = {}     # contribution -> (statement, access) it came from
        # adjoint or contribution -> the ranks whose size 0 makes all of it absent
        self.vanish: dict[str, frozenset] = {}
        self.assumed: set[str] = set()  # ranks a presence proof assumed non-empty
        # contribution -> (statement, lhs, summed ranks, where): two with the same one are
        # present at the same points (every contribution reads all its statement's reads)
        self.signature: dict[str, tuple] = {}
        self.extra_implied: set = set()  # conditions a presence proof may assume hold
        # tensor -> the where (conjuncts over its ranks) under which its adjoint is present
        # wherever it is; None when not proven (a contribution it seeds is then unproven)
        self.adjoint_where: dict[str, frozenset | None] = {}
        self.seeds: set[str] = set()  # the callers' adjoints dAV_0: present everywhere
        self.nonempty: frozenset = frozenset()  # ranks assumed of size > 0 (see backward)
        self.plain: dict[str, tuple] = {}  # contribution -> (statement, read) without filters
        self.filled: set[str] = set()      # tensors whose adjoint adds filled contributions
        self._total: dict[str, bool] = {}
        # adjoint tensors present at every point (a recurrence's step adjoint) -> ranks
        self.everywhere: dict[str, tuple[str, ...]] = {}
        self.let_values = {let.name: let.value for let in defn.lets}
        self.statement = {st.tensor: st for st in defn.statements}
        self.args = {a.name: a for a in defn.tensor_args}

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.taken or name.lower() in {t.lower() for t in self.taken}:
            name, k = f"{base}_{k}", k + 1
        self.taken.add(name)
        return name

    def seed(self, out: Output) -> None:
        """The caller's adjoint of an output: its first contribution (other statements
        that read the output add theirs)."""
        ids = tuple(Index(r) for r in out.ranks)
        c = Einsum(self.fresh(f"{adjoint_name(out.name)}_0"), out.ranks,
                   Access(adjoint_name(out.name), ids))
        self.contributions.setdefault(out.name, []).append(c)
        self.pending.append(c)
        self.seeds.add(c.tensor)

    def ranks(self, name: str) -> tuple[str, ...]:
        if name in self.params:
            return ()
        return self.defn.tensor_ranks(name)

    def propagate(self, st: Einsum) -> None:
        """Contributions of ``st``'s adjoint to every float tensor and parameter it reads."""
        dT = self.finish(st.tensor)
        if dT is None:
            return
        body, reduce = st.expr, None
        if isinstance(body, Reduce):
            reduce, body = body, body.body
        seed: Expr = Access(dT, tuple(Index(r) for r in st.lhs))
        if reduce is not None and reduce.op in ("max", "min"):
            at = self.first_attaining(st, reduce)
            self.pending.append(at)
            position = _position(reduce.ranks)
            picked = Binary("==", position, Access(at.tensor, tuple(Index(r) for r in st.lhs)))
            seed = _mul(seed, Call("select", (picked, Num(1), Num(0))))
        space = tuple(st.lhs) + (reduce.ranks if reduce is not None else ())
        reads = [n for n in walk(st.expr) if isinstance(n, Access)]
        for node in _differentiable_leaves(body, self.floats, self.params):
            d = derivative(body, lambda n, node=node: n is node)
            if _is_zero(d):
                continue
            self.contribute(st, node, _present_where(_mul(seed, d), reads), space)

    def first_attaining(self, st: Einsum, reduce: Reduce) -> Einsum:
        """Where a max (min) reduction is attained: the first point in the order of its
        reduced ranks (``torch.max(dim)``'s index), which takes the whole adjoint.  An index
        and not a comparison in every stage: a kernel that recomputes ``S`` in another
        contraction order (a key-major ``K·Qᵀ``) may round it differently from the one
        that took the max, so ``S == N`` tested there can miss the maximum.  The ``online``
        pass computes this index in the same pass as the max it compares with
        (an equality factor), so the scores compared are the ones maximised.  Before →
        after (one statement)::

            N[p] = max[m](S[p,m])

            N_at[p] = min[m](select(S[p,m] == N[p], m, inf))
            dS_1[p,m] = dN[p] * select(m == N_at[p], 1, 0)
        """
        ids = tuple(Index(r) for r in st.lhs)
        attains = Binary("==", st.expr.body, Access(st.tensor, ids))
        body = Call("select", (attains, _position(reduce.ranks), Const("inf")))
        return Einsum(self.fresh(f"{st.tensor}_at"), st.lhs, Reduce("min", reduce.ranks, body),
                      st.where)

    def propagate_recurrence(self, rec: Recurrence) -> None:
        """The adjoint of a prefix sum ``T[i+1, x] = T[i, x] + E`` (:mod:`.deloop`): every
        step ``E`` computed at ``i`` reaches ``T`` at the steps after it and at the final
        one, so its adjoint is a suffix sum of ``T``'s, run as a recurrence over a reversed
        rank ``j`` (``i = I - 1 - j``); the init's is the whole sum.  Before → after::

            FS[0,m] = 0;  FS[ps+1,m] = FS[ps,m] + relu(S[ps,m])   where m < ps
         ->
            dFS_suffix[0,m] = 0                     (dFS_final[m] when the last step is read)
            dFS_suffix[psx+1,m] = dFS_suffix[psx,m] + dFS[PS - 1 - psx, m]
            dFS_after[psx,m] = dFS_suffix[psx,m]    (steps after PS - 1 - psx)
            dFS_step[ps,m] = dFS_after[PS - 1 - ps, m]
            dS_k[ps,m] = dFS_step[ps,m] * select(S[ps,m] > 0, 1, 0)   where m < ps

        An absent ``dFS`` element is not added (the update is not computed: it carries),
        so no fill is needed; the step's own contributions go through :meth:`propagate`
        of ``FS_step[ps,m] = relu(S[ps,m]) where m < ps``."""
        dT = self.finish(rec.at)
        dF = self.finish(rec.final) if rec.final else None
        if dT is None and dF is None:
            return
        lhs = rec.update.lhs
        xs = tuple(r for r in lhs if r != rec.rank)
        j = self.alias(rec.rank)
        lhs_j = tuple(j if r == rec.rank else r for r in lhs)
        ids_j = tuple(Index(r) for r in lhs_j)
        start: Expr = Num(0)
        if dF is not None:  # absent -> 0, so later steps still add
            start, fill = self.fill(dF, xs, self.one_step_rank())
            self.pending += fill
        suffix = self.fresh(f"{adjoint_name(rec.tensor)}_suffix")
        after = self.fresh(f"{adjoint_name(rec.tensor)}_after")
        reversed_step = Binary("-", Binary("-", Size(rec.rank), Num(1)), Index(j))
        added: Expr = Access(suffix, ids_j)
        if dT is not None:
            added = Binary("+", added, Access(dT, tuple(
                reversed_step if r == j else Index(r) for r in lhs_j)))
        self.pending += [IterativeEinsum(suffix, lhs_j, j, True, start),
                         IterativeEinsum(suffix, lhs_j, j, False, added),
                         Einsum(after, lhs_j, Access(suffix, ids_j))]
        d_step = self.fresh(f"{adjoint_name(rec.tensor)}_step")
        self.everywhere[d_step] = lhs  # a suffix sum from a present start: never absent
        at_step = Binary("-", Binary("-", Size(rec.rank), Num(1)), Index(rec.rank))
        self.pending.append(Einsum(d_step, lhs, Access(after, tuple(
            at_step if r == rec.rank else Index(r) for r in lhs))))
        step = Einsum(self.fresh(f"{rec.tensor}_step"), lhs, rec.step, rec.update.where)
        self.adjoint[step.tensor] = d_step
        self.propagate(step)
        if any(isinstance(n, (Access, Param)) for n in walk(rec.init.expr)):
            d_init = self.fresh(f"{adjoint_name(rec.tensor)}_init")
            self.pending.append(Einsum(d_init, xs, Access(suffix, tuple(
                Size(j) if r == j else Index(r) for r in lhs_j))))
            init = Einsum(self.fresh(f"{rec.tensor}_init"), xs, rec.init.expr, rec.init.where)
            self.adjoint[init.tensor] = d_init
            self.propagate(init)

    def contribute(self, st: Einsum, node, value: Expr, space: tuple[str, ...]) -> None:
        """``dX_k[X's ranks] = sum[the rest](value) where st's where``.  A subscript that is
        not the rank's own index scatters by a filter: ``V[h // G, m, f]`` gives
        ``dV_k[hk,m,f] = sum[h](...) where h // G == hk`` (GQA's heads summed per group)."""
        name = node.tensor if isinstance(node, Access) else node.name
        if isinstance(node, Access) and self.group_read(node) is not None:
            return self.contribute_by_group(st, node, value, space)
        if isinstance(node, Access) and self.broadcast_heads(node, space):
            return self.contribute_per_head(st, node, value, space)
        lhs, conds = [], []
        if isinstance(node, Access):
            for sub, r in zip(node.subscripts, self.defn.tensor_ranks(name)):
                if sub == Index(r) and r not in lhs:
                    lhs.append(r)
                    continue
                if isinstance(sub, Index) and sub.rank not in lhs and \
                        self.same_size(sub.rank, r):  # K[m,e] with K over [P,E], M = P
                    lhs.append(sub.rank)
                    continue
                if r in space or r in lhs:  # the statement iterates r itself: an alias
                    r = self.alias(r)
                lhs.append(r)
                conds.append(Binary("==", _without_mod(sub), Index(r)))
        lhs = tuple(lhs)
        conds, solved = _solved(conds, space, lhs)
        where = st.where
        if solved:  # V[M - 1 - m, f]: m = M - 1 - mx, no sum over m filtered by an equality
            value = substitute(value, solved)
            where = substitute(where, solved) if where is not None else None
            space = tuple(r for r in space if r not in solved)
            for r, sol in solved.items():  # the solution must be a point of r
                conds.append(Binary("<=", Num(0), sol))
                conds.append(Binary("<", sol, Size(r)))
        summed = tuple(r for r in dict.fromkeys(space + tuple(sorted(free_ranks(value))))
                       if r not in lhs)
        expr = Reduce("sum", summed, value) if summed else value
        where = conjoin(where, *conds)
        c = Einsum(self.fresh(f"{adjoint_name(name)}_{len(self.contributions.get(name, [])) + 1}"),
                   lhs, expr, where)
        self.contributions.setdefault(name, []).append(c)
        self.pending.append(c)
        self.vanish[c.tensor] = self.vanishing(st, space, lhs)
        if not conds and not solved:
            self.signature[c.tensor] = (st.tensor, lhs, summed, st.where)
        if isinstance(node, Access) and not conds and not solved:
            self.origin[c.tensor] = (st, node)
        if not conds and not solved:
            self.plain[c.tensor] = (st, node)

    def size(self, rank: str) -> sympy.Expr:
        """A rank's size in argument sizes (through the ``let``s that alias it)."""
        value = self.let_values.get(rank)
        if value is None:
            return size_symbol(rank)
        return value.subs({sym: self.size(sym.name) for sym in value.free_symbols
                           if sym.name in self.let_values})

    def same_size(self, a: str, b: str) -> bool:
        return a == b or sympy.simplify(self.size(a) - self.size(b)) == 0

    def same_ranks(self, a: tuple[str, ...], b: tuple[str, ...]) -> bool:
        """Positionally the same ranks (by size: ``[M,E]`` is ``[P,E]`` when M = P)."""
        return len(a) == len(b) and all(self.same_size(x, y) for x, y in zip(a, b))

    def vanishing(self, st: Einsum, space, kept) -> frozenset:
        """Ranks whose size 0 makes a contribution of ``st`` absent everywhere: its seed's,
        and the ranks it sums that the gradient does not keep."""
        seed = self.adjoint.get(st.tensor)
        every_output = frozenset.intersection(*(frozenset(o.ranks) for o in self.defn.outputs))
        # a rank the gradient keeps, or every output has, empties it (or everything) anyway
        return (self.vanish.get(seed, frozenset()) | frozenset(space)) - frozenset(kept) \
            - every_output

    def group_read(self, node: Access) -> int | None:
        """The position of the one grouped subscript ``h // G`` (``G = H / HK``, into a rank
        of size ``HK``) of a read whose other subscripts are the ranks' own indices."""
        ranks = self.defn.tensor_ranks(node.tensor)
        grouped = [j for j, (sub, r) in enumerate(zip(node.subscripts, ranks))
                   if sub != Index(r)]
        if len(grouped) != 1 or len(set(ranks)) != len(ranks):
            return None
        (j,) = grouped
        sub = node.subscripts[j]
        if not (isinstance(sub, Binary) and sub.op == "//" and isinstance(sub.left, Index)
                and isinstance(sub.right, Size) and self.in_bounds(sub, ranks[j])
                and sub.left.rank not in ranks):
            return None
        return j

    def contribute_by_group(self, st: Einsum, node: Access, value: Expr, space) -> None:
        """A read ``V[h // G, m, f]`` (GQA: ``G`` query heads per K/V head) contributes per
        query head, then sums each group.  Before → after::

            dV_1[hk,m,f] = sum[h, p](...)   where h // G == hk
         ->
            dV_1_heads[h,m,f] = sum[p](...)
            dV_1[hk,m,f] = sum[g](dV_1_heads[hk*G + g, m, f])

        (the per-head part is what a key-major kernel computes for MHA)."""
        j = self.group_read(node)
        ranks = self.defn.tensor_ranks(node.tensor)
        sub = node.subscripts[j]
        per_head = tuple(sub.left.rank if k == j else r for k, r in enumerate(ranks))
        g = self.alias(sub.right.rank)
        at = tuple(Binary("+", Binary("*", Index(ranks[j]), Size(sub.right.rank)), Index(g))
                   if k == j else Index(r) for k, r in enumerate(ranks))
        self.partial_then_sum(st, node, value, space, per_head, (g,), at)

    def partial_then_sum(self, st: Einsum, node: Access, value: Expr, space, per_head,
                         heads, at) -> None:
        """The contribution over ``per_head`` ranks (``dX_n_heads``), then its sum over
        ``heads`` read at ``at`` (``dX_n``): what a GQA group or all MQA heads share."""
        ranks = self.defn.tensor_ranks(node.tensor)
        summed = tuple(r for r in dict.fromkeys(space + tuple(sorted(free_ranks(value))))
                       if r not in per_head)
        expr = Reduce("sum", summed, value) if summed else value
        n = len(self.contributions.get(node.tensor, [])) + 1
        part = Einsum(self.fresh(f"{adjoint_name(node.tensor)}_{n}_heads"), per_head, expr,
                      st.where)
        c = Einsum(self.fresh(f"{adjoint_name(node.tensor)}_{n}"), ranks,
                   Reduce("sum", heads, Access(part.tensor, at)))
        self.contributions.setdefault(node.tensor, []).append(c)
        self.pending += [part, c]
        self.vanish[c.tensor] = self.vanishing(st, space, per_head)

    def broadcast_heads(self, node: Access, space) -> tuple[str, ...]:
        """Head ranks (the leading rank of a 3+-rank argument) the statement iterates but
        ``node`` does not read, when it reads its own ranks: MQA's ``K[m,e]`` shared by
        every query head ``h``."""
        ranks = self.defn.tensor_ranks(node.tensor)
        if node.subscripts != tuple(Index(r) for r in ranks):
            return ()
        heads = {a.ranks[0] for a in self.defn.tensor_args if len(a.ranks) > 2}
        return tuple(r for r in space if r in heads and r not in ranks)

    def contribute_per_head(self, st: Einsum, node: Access, value: Expr, space) -> None:
        """A read shared by every head contributes per head, then sums the heads (as a GQA
        group does).  Before → after::

            dK_1[m,e] = sum[h, p](...)
         ->
            dK_1_heads[h,m,e] = sum[p](...)
            dK_1[m,e] = sum[h](dK_1_heads[h,m,e])"""
        heads = self.broadcast_heads(node, space)
        per_head = heads + self.defn.tensor_ranks(node.tensor)
        self.partial_then_sum(st, node, value, space, per_head, heads,
                              tuple(Index(r) for r in per_head))

    def alias(self, rank: str) -> str:
        """A rank of the same size under another name (``let P_1 = P``)."""
        alias = fresh_rank(f"{rank}X", self.taken)
        self.taken |= {alias, alias.lower()}
        self.lets.append(SizeLet(alias, size_symbol(rank)))
        self.let_values[alias] = size_symbol(rank)  # (same_size sees it)
        return alias

    def finish(self, name: str) -> str | None:
        """The adjoint of ``name`` (summing its contributions), or None when nothing reads it."""
        if name in self.adjoint:
            return self.adjoint[name]
        found = self.contributions.get(name)
        if not found:
            return None
        out, stmts = self._sum(name, found)
        self.pending += stmts
        self.adjoint[name] = out
        return out

    def _sum(self, name: str, found: list[Einsum]) -> tuple[str, list[Statement]]:
        """One adjoint from the contributions (read by position: a contribution may name an
        alias of a rank)."""
        lhs = self.ranks(name)
        if len(found) == 1 and self.same_ranks(found[0].lhs, lhs):
            self.adjoint_where[name] = self.covers(found[0].tensor) if \
                found[0].lhs == lhs else None
            return found[0].tensor, []
        if self.all_present(name, found) or self.same_presence(name, found) or \
                self.widened(name, found):
            total: Expr = Access(found[0].tensor, tuple(Index(r) for r in lhs))
            for c in found[1:]:
                total = Binary("+", total, Access(c.tensor, tuple(Index(r) for r in lhs)))
            out = self.fresh(adjoint_name(name))
            self.vanish[out] = self.vanish.get(found[0].tensor, frozenset())
            return out, [Einsum(out, lhs, total)]
        self.adjoint_where[name] = frozenset()  # filled: present everywhere
        self.filled.add(name)
        z = self.one_step_rank()
        stmts, terms = [], []
        for c in found:
            term, fill = self.fill(c.tensor, lhs, z)
            stmts += fill
            terms.append(term)
        total: Expr = terms[0]
        for t in terms[1:]:
            total = Binary("+", total, t)
        out = self.fresh(adjoint_name(name))
        stmts.append(Einsum(out, lhs, total))
        return out, stmts

    def one_step_rank(self) -> str:
        """A fresh rank of size 1, the iterative rank of fills."""
        z = fresh_rank("Z", self.taken)
        self.taken |= {z, z.lower()}
        self.lets.append(SizeLet(z, sympy.Integer(1)))
        return z

    def fill(self, tensor: str, ranks, z: str) -> tuple[Access, list[Statement]]:
        """``tensor`` with its absent points 0: a one-step iterative fill over ``z``
        (``F[0,x] = 0; F[z+1,x] = T[x]``: an update not computed carries the 0); returns
        the read of the filled tensor and its statements."""
        f = self.fresh(f"{tensor}_filled")
        ids = tuple(Index(r) for r in ranks)
        return Access(f, (Size(z),) + ids), [
            IterativeEinsum(f, (z,) + tuple(ranks), z, True, Num(0)),
            IterativeEinsum(f, (z,) + tuple(ranks), z, False, Access(tensor, ids))]

    def same_presence(self, name: str, found: list[Einsum]) -> bool:
        """Whether the contributions to ``name``'s adjoint are present at the same points,
        so a plain ``+`` is their filled sum: the same statement, ranks and ``where`` (each
        reads all its statement's reads), or each present wherever the tensor is and one
        shared ``where`` holds (:meth:`covers`), as long as no rank is empty; a rank whose
        size 0 empties one must empty all (the same vanishing ranks), so then the sum is
        absent everywhere, which a later fill or the output reads as 0."""
        lhs = self.ranks(name)
        if not all(self.same_ranks(c.lhs, lhs) for c in found):
            return False
        if len({self.signature.get(c.tensor, c.tensor) for c in found}) == 1:
            self.adjoint_where[name] = self.covers(found[0].tensor)
            return True
        every_output = frozenset.intersection(*(frozenset(o.ranks) for o in self.defn.outputs))
        wheres = []
        for c in found:
            self.assumed = set()
            wheres.append(self.covers(c.tensor))
            self.vanish[c.tensor] = self.vanish.get(c.tensor, frozenset()) | (
                frozenset(self.assumed) - frozenset(lhs) - every_output)
        gone = self.nonempty | self.empties(name, 0)
        vanish = {self.vanish.get(c.tensor, frozenset()) - gone for c in found}
        same = len(vanish) == 1 and None not in wheres and len(set(wheres)) == 1
        if same:
            self.adjoint_where[name] = wheres[0]
        return same

    def widened(self, name: str, found: list[Einsum]) -> bool:
        """Whether the contributions are made present at the same points by widening the
        ``where`` of the maps among them whose reads are present everywhere: such a map
        moves its own ``where`` into a ``select`` and takes the others' shared one, which
        its own implies (so it adds the same where it was present, and 0 elsewhere).
        ``found`` is rewritten in place.  Before → after (selective attention's scores get
        their softmax's adjoint on ``m <= p`` and the recurrence's on ``m < ps``)::

            dS_1[p,m]  = dL[p,m] * ...                                  (present: m <= p)
            dS_2[ps,m] = dFS_step[ps,m] * select(S[ps,m] > 0, 1, 0)   where m < ps
         ->
            dS_2[ps,m] = select(m < ps, dFS_step[ps,m] * select(S[ps,m] > 0, 1, 0), 0)
                         where m <= ps

        The others must share one proven ``where`` (:meth:`covers`) and every contribution
        the same vanishing ranks (:meth:`same_presence`)."""
        lhs = self.ranks(name)
        if len(found) < 2 or not all(self.same_ranks(c.lhs, lhs) for c in found):
            return False
        wide = [c.where is not None and self.present_everywhere_map(c) for c in found]
        if all(wide) or not any(wide):
            return False
        wheres = [self.cover_and_vanish(c, lhs) for c, w in zip(found, wide) if not w]
        gone = self.nonempty | self.empties(name, 0)
        if None in wheres or len(set(wheres)) != 1 or \
                len({self.vanish.get(c.tensor, frozenset()) - gone for c in found}) != 1:
            return False
        target = sorted(wheres[0], key=repr)
        rewritten = list(found)
        for k, (c, w) in enumerate(zip(found, wide)):
            if not w:
                continue
            rename = {r: Index(own) for r, own in zip(lhs, c.lhs)}
            want = [substitute(t, rename) for t in target]
            if not all(self.implies(conjuncts(c.where), t) for t in want):
                return False
            rewritten[k] = Einsum(c.tensor, c.lhs, Call("select", (c.where, c.expr, Num(0))),
                                  conjoin(*want) if want else None)
        for old, new in zip(found, rewritten):
            if old is not new:
                self.pending = [new if st is old else st for st in self.pending]
        found[:] = rewritten
        self.adjoint_where[name] = wheres[0]
        return True

    def present_everywhere_map(self, c: Einsum) -> bool:
        """A contribution without reductions whose ``where`` reads no tensor and whose
        reads are present at every point (:meth:`everywhere_read`)."""
        return not any(isinstance(n, Reduce) for n in walk(c.expr)) and not any(
            isinstance(n, Access) for n in walk(c.where)) and all(
            self.everywhere_read(n) for n in walk(c.expr) if isinstance(n, Access))

    def everywhere_read(self, acc: Access) -> bool:
        if acc.tensor in self.everywhere:
            return all(isinstance(s, Index) for s in acc.subscripts) and self.same_ranks(
                tuple(s.rank for s in acc.subscripts), self.everywhere[acc.tensor])
        if acc.tensor in self.args:
            return all(self.in_bounds(sub, r)
                       for sub, r in zip(acc.subscripts, self.args[acc.tensor].ranks))
        return acc.tensor in self.statement and self.in_range(acc) and self.total(acc.tensor)

    def cover_and_vanish(self, c: Einsum, lhs) -> frozenset | None:
        """:meth:`covers` of ``c``, the ranks its proof assumed non-empty joining its
        vanishing ranks (see :meth:`same_presence`)."""
        every_output = frozenset.intersection(*(frozenset(o.ranks) for o in self.defn.outputs))
        self.assumed = set()
        where = self.covers(c.tensor)
        self.vanish[c.tensor] = self.vanish.get(c.tensor, frozenset()) | (
            frozenset(self.assumed) - frozenset(lhs) - every_output)
        return where

    def implies(self, conds: list, cond: Expr) -> bool:
        """``cond`` holds wherever every one of ``conds`` does: one of them, always true,
        or one integer comparison's slack exceeding another's by a non-negative amount
        (``m < ps`` implies ``m <= ps``)."""
        if cond in conds or self.always_holds(cond):
            return True
        want = self.slack(cond)
        return want is not None and any(
            (have := self.slack(c)) is not None and bool(
                sympy.expand(want - have).is_nonnegative) for c in conds)

    # --- present everywhere (no where, reads in range, sums over non-empty ranks) --------

    def all_present(self, name: str, found: list[Einsum]) -> bool:
        """Whether every contribution to ``name``'s adjoint is present at every point, given
        the ranks assumed non-empty: then a plain ``+`` is their filled sum.  (Linear
        attention has no ``where`` at all; ``dFQ = dDEN[p] * KS[e] + sum[f](dNUM * KV)``
        differs in presence only when M or F is empty.)"""
        if not self.nonempty or not all(self.same_ranks(c.lhs, self.ranks(name)) for c in found):
            return False
        if not all(self.total_contribution(c.tensor) for c in found):
            return False
        self.adjoint_where[name] = frozenset()
        return True

    def total_contribution(self, c: str) -> bool:
        if c in self.seeds:
            return True
        if c not in self.plain:
            return False
        st, node = self.plain[c]
        if not self.total(st.tensor) or not self.total_adjoint(st.tensor):
            return False
        space = set(st.lhs) | (set(st.expr.ranks) if isinstance(st.expr, Reduce) else set())
        kept: set[str] = set()
        if isinstance(node, Access):
            if not self.in_range(node) or len({x.rank for x in node.subscripts}) != len(
                    node.subscripts):
                return False
            kept = {x.rank for x in node.subscripts}
        return all(self.never_empty(r) for r in space - kept)

    def total_adjoint(self, name: str) -> bool:
        if name in self.filled:
            return True
        found = self.contributions.get(name, [])
        return bool(found) and all(self.total_contribution(c.tensor) for c in found)

    def total(self, name: str) -> bool:
        """Whether forward tensor ``name`` is present at every point: an argument, or a
        statement without a ``where`` whose reads are total, at their own ranks' indices,
        and whose reductions run over ranks that are never empty."""
        if name in self.args or name in self.params or self.carried_everywhere(name):
            return True
        if name not in self._total:
            self._total[name] = False  # (a DAG: no cycle reaches this)
            st = self.statement.get(name)
            self._total[name] = isinstance(st, Einsum) and st.where is None and all(
                (not isinstance(n, Reduce) or all(self.never_empty(r) for r in n.ranks))
                and (not isinstance(n, Access) or (self.in_range(n) and self.total(n.tensor)))
                for n in walk(st.expr))
        return self._total[name]

    def carried_everywhere(self, name: str) -> bool:
        """Whether iterative tensor ``name`` is present at every step: it starts from a
        constant everywhere (``FS[0,m] = 0``, no ``where``), and a step whose update is not
        computed carries the state (the contract's rule 2), so no step is ever absent."""
        inits = [st for st in self.defn.statements if isinstance(st, IterativeEinsum)
                 and st.tensor == name and st.init]
        return len(inits) == 1 and inits[0].where is None and not any(
            isinstance(n, Access) for n in walk(inits[0].expr))

    def in_range(self, node: Access) -> bool:
        """Every subscript an index of a rank of the accessed dimension's size."""
        subs = node.subscripts
        return all(isinstance(x, Index) for x in subs) and self.same_ranks(
            tuple(x.rank for x in subs), self.ranks(node.tensor))

    def never_empty(self, rank: str) -> bool:
        """Assumed non-empty, or a ``let`` of a positive number, of such a rank, or of a
        product or quotient of such ranks (``let G = H / HK``)."""
        if rank in self.nonempty:
            return True
        value = self.let_values.get(rank)
        if value is None:
            return False
        if value.is_number:
            return bool(value > 0)
        factors = value.as_powers_dict() if value.is_Mul else {value: 1}
        return all(getattr(f, "is_Symbol", False) and k in (1, -1) and self.never_empty(f.name)
                   for f, k in factors.items())

    def empties(self, name: str, depth: int) -> frozenset:
        """Ranks whose size 0 makes ``name`` itself absent everywhere (so its adjoint's
        contributions need not agree there): those its reduction sums, and those of what
        it reads outside reductions (``SD[p] = sum[m](SN[p,m])``: M)."""
        st = self.statement.get(name)
        if not isinstance(st, Einsum) or depth > 8:
            return frozenset()
        out = set(st.expr.ranks) if isinstance(st.expr, Reduce) else set()
        body = st.expr.body if isinstance(st.expr, Reduce) else st.expr
        for n in walk(body):
            if isinstance(n, Reduce):
                continue
            if isinstance(n, Access) and n.tensor in self.statement and not isinstance(
                    st.expr, Reduce):
                out |= self.empties(n.tensor, depth + 1)
        return frozenset(out)

    def covers(self, contribution: str) -> frozenset | None:
        """The ``where`` (its conjuncts) under which a contribution is present wherever its
        tensor is, or None when not proven.  Its statement must compute the point that reads
        the tensor's element whenever that element is present and the ``where`` holds: the
        statement iterates the tensor's ranks (ranks it adds have a point unless empty: the
        contribution's vanishing ranks, see :meth:`same_presence`), a ``where`` over those
        ranks only (the conjuncts the element's presence implies drop out), and every other
        read present there too (:meth:`present_with`, whose assumptions of non-empty ranks
        join them)."""
        if contribution in self.seeds:
            return frozenset()
        if contribution not in self.origin:
            return None
        st, node = self.origin[contribution]
        seed_where = self.adjoint_where.get(st.tensor)
        if seed_where is None:  # where the statement's adjoint is present is not known
            return None
        ranks = self.defn.tensor_ranks(node.tensor)
        body, reduced = st.expr, ()
        if isinstance(body, Reduce):
            body, reduced = body.body, body.ranks
        if (node.subscripts != tuple(Index(r) for r in ranks)
                or len(set(ranks)) != len(ranks) or not set(ranks) <= set(st.lhs) | set(reduced)
                or any(isinstance(n, Reduce) for n in walk(body))):
            return None
        if not all(free_ranks(c) <= set(ranks) for c in seed_where):
            return None
        implied = self.implied(node, 0)
        adds = (set(st.lhs) | set(reduced)) - set(ranks)
        # conjuncts over the ranks the contribution sums hold at a fiber point of the
        # tensor's own reduction (the same mask: AV_sum[p] = sum[m](S[p,m]) where m <= p)
        over_adds = [c for c in conjuncts(st.where) if free_ranks(c) & adds]
        mapping: dict = {}
        if over_adds and not self.where_at_fiber(over_adds, node, adds, mapping):
            return None
        residual = frozenset(c for c in conjuncts(st.where) + sorted(seed_where, key=repr)
                             if c not in implied and c not in over_adds)
        self.extra_implied = set(residual) | ({conjoin(*sorted(residual, key=repr))}
                                              if residual else set())
        try:
            # a rank the statement adds (the f of AV[p,f] = sum[m](SN[p,m] * V[m,f]) reading
            # SN) has a point unless its size is 0: a vanishing rank (see same_presence)
            reads = [acc for acc in walk(body) if isinstance(acc, Access)]
            rest = [acc for acc in reads if not self.present_with(acc, node, 0)]
            witnesses = [acc for acc in rest if self.fiber_witness(acc, node, adds, mapping)]
            # the others present where a witness is (SN2[p,m] under the mask of SN1[p,m])
            ok = all(acc in witnesses or any(self.present_with(acc, w, 0) for w in witnesses)
                     for acc in rest)
        finally:
            self.extra_implied = set()
        return residual if ok else None

    def fiber_witness(self, acc: Access, x: Access, adds: set, mapping: dict) -> bool:
        """``acc`` (over ranks the contribution sums, ``adds``) is a read of ``x``'s own
        reduction body at one fiber point, the same point for every such read
        (``mapping``: x's reduced ranks -> the contribution's): ``x`` present means some
        fiber point was computed, where all of them are present.  ``A[p,m] = SN[p,m] /
        SD[p]`` gives ``dSD_1[p] = sum[m](dA_1[p,m] * ...)``, present wherever ``SD[p] =
        sum[m](SN[p,m])`` is."""
        st = self.statement.get(x.tensor)
        if not isinstance(st, Einsum) or \
                not all(isinstance(s, Index) for s in x.subscripts + acc.subscripts):
            return False
        point = dict(zip(st.lhs, x.subscripts))
        if isinstance(st.expr, Reduce) and not (free_ranks(acc) & set(st.expr.ranks)) and any(
                _at(y, point) == acc or self.read_by(acc, _at(y, point), 0)
                for y in walk(st.expr.body)
                if isinstance(y, Access) and all(isinstance(s, Index) for s in y.subscripts)):
            # read by the fiber's values (GM[p] by SN[p,m] of SD[p] = sum[m]), or in the
            # body itself (O_max[p] in O_sum[p] = sum[m](exp(L[p,m] - O_max[p])))
            return True
        if not (free_ranks(acc) & adds):
            return False
        if not isinstance(st.expr, Reduce):  # a map: present where what it reads is
            return st.where is None and any(
                self.fiber_witness(acc, _at(y, point), adds, mapping)
                for y in walk(st.expr) if isinstance(y, Access)
                and all(isinstance(s, Index) for s in y.subscripts))
        for read in walk(st.expr.body):
            if not isinstance(read, Access) or read.tensor != acc.tensor:
                continue
            trial = dict(mapping)
            for sub, mine in zip(read.subscripts, acc.subscripts):
                if not isinstance(sub, Index):
                    break
                if sub.rank in point:
                    if point[sub.rank] != mine:
                        break
                elif sub.rank in st.expr.ranks and mine.rank in adds and \
                        trial.setdefault(sub.rank, mine.rank) == mine.rank:
                    continue
                else:
                    break
            else:
                mapping.update(trial)
                return True
        return False

    def present_with(self, acc: Access, x: Access, depth: int) -> bool:
        """``acc`` is present wherever ``x`` is (both read at one point of a statement)."""
        if acc == x:
            return True
        if depth > 8:
            return False
        if acc.tensor in self.statement and self.in_range(acc) and self.total(acc.tensor):
            return True  # present everywhere (FS_at[p,m], a carried recurrence's steps)
        if acc.tensor in self.args:  # an input read at its own ranks is in bounds, or at
            known = self.bounded_by(x, 0)  # subscripts x's presence shows are in bounds
            return all(self.in_bounds(sub, r) or (sub, r) in known
                       for sub, r in zip(acc.subscripts, self.args[acc.tensor].ranks))
        if any(isinstance(n, Access) for s in acc.subscripts for n in walk(s)):
            return False
        if self.read_by(acc, x, depth):
            return True
        st = self.statement.get(acc.tensor)
        if not isinstance(st, Einsum) or not all(isinstance(s, Index) for s in acc.subscripts):
            return False
        body, reduced = st.expr, ()
        if isinstance(body, Reduce):
            body, reduced = body.body, body.ranks
        if any(isinstance(n, Reduce) for n in walk(body)):
            return False
        point = dict(zip(st.lhs, acc.subscripts))
        implied = self.implied(x, 0) | self.extra_implied
        def where_holds(at: dict) -> bool:
            return st.where is None or substitute(st.where, at) in implied or all(
                c in implied or self.always_holds(c) for c in conjuncts(substitute(st.where, at)))

        if st.where is not None and not (free_ranks(st.where) & set(reduced)) \
                and not where_holds(point):
            return False  # a where that x's own presence implies (or always true) is fine

        whole_fiber = st.where is None or not (free_ranks(st.where) & set(reduced))
        if reduced and whole_fiber and all(
                self.present_with(_at(n, point), x, depth + 1) if not (
                    set().union(*(free_ranks(u) for u in n.subscripts)) & set(reduced))
                else self.always_present(n, 0)
                for n in walk(body) if isinstance(n, Access)):
            # a fiber of values present everywhere: present unless a rank of it is empty
            # (x's presence may show it is not; else the sum's proof assumes it: see _sum)
            self.assumed |= {r for r in reduced if ("nonempty", r) not in implied}
            return True
        if not reduced:  # a map: present where everything it reads is
            return all(self.present_with(_at(n, point), x, depth + 1)
                       for n in walk(body) if isinstance(n, Access))
        # the reduction's point that reads x's element: its ranks pinned by one read of x
        for read in (n for n in walk(body) if isinstance(n, Access) and n.tensor == x.tensor):
            pinned = dict(point)
            for sub, want in zip(read.subscripts, x.subscripts):
                if not isinstance(sub, Index):
                    break
                if sub.rank in pinned and pinned[sub.rank] != want:
                    break
                pinned[sub.rank] = want
            else:
                if not set(reduced) <= set(pinned) or not where_holds(pinned):
                    continue
                if all(self.present_with(_at(n, pinned), x, depth + 1)
                       for n in walk(body) if isinstance(n, Access)):
                    return True
        # or the fiber's point at x's own indices (GM2[p] = max[m](QK2[p,m]) beside SN1[p,m])
        mine = {s.rank for s in x.subscripts if isinstance(s, Index)}
        if set(reduced) <= mine and set(reduced).isdisjoint(point):
            pinned = {**point, **{r: Index(r) for r in reduced}}
            if where_holds(pinned) and all(self.present_with(_at(n, pinned), x, depth + 1)
                                           for n in walk(body) if isinstance(n, Access)):
                return True
        return self.witnessed_fiber(st, point, x, depth)

    def witnessed_fiber(self, st: Einsum, point: dict, x: Access, depth: int) -> bool:
        """A masked reduction is present where ``x`` is when its fiber has a point the mask
        always admits: the ranks the ``where`` constrains pinned to indices of ``x``'s point
        of the same size (so in range), every conjunct there implied by ``x``'s presence or
        true at every point (:meth:`always_holds`), and the reads there present where ``x``
        is.  ``SNV[p,f] = sum[m](SN[p,m] * V[m,f])   where m <= p and m >= p // L * L``
        (Infini-attention's local softmax) has ``m = p``: ``p <= p``, ``p >= p // L * L``.
        The other reduced ranks keep the whole fiber (reads present everywhere; a rank
        assumed non-empty, as for an unmasked sum)."""
        reduced = st.expr.ranks
        if any(free_ranks(s) & set(reduced) for s in point.values()):
            return False
        body = st.expr.body
        spots = [s.rank for s in dict.fromkeys(tuple(x.subscripts) + tuple(point.values()))
                 if isinstance(s, Index)]
        masked = [r for r in reduced if st.where is not None and r in free_ranks(st.where)]
        implied = self.implied(x, 0) | self.extra_implied
        # every reduced rank pinned (the reads' own masks: SN[p,m] of a masked S), else the
        # ones the where names (the others' reads present everywhere)
        choices = _assignments(list(reduced), spots, self.same_size)
        if masked and len(masked) < len(reduced):
            choices += _assignments(masked, spots, self.same_size)
        for choice in choices:
            pinned = {**point, **{r: Index(s) for r, s in choice.items()}}
            if st.where is not None and not all(
                    c in implied or self.always_holds(c)
                    for c in conjuncts(substitute(st.where, pinned))):
                continue
            free = set(reduced) - set(choice)
            if all(self.always_present(n, 0) if free_ranks(n) & free else
                   self.present_with(_at(n, pinned), x, depth + 1)
                   for n in walk(body) if isinstance(n, Access)):
                self.assumed |= {r for r in free if ("nonempty", r) not in implied}
                return True
        return False

    def always_holds(self, cond: Expr) -> bool:
        """An integer comparison true at every point: its slack, over indices >= 0 and
        sizes >= 0 (``floor(a / b)`` as ``(a - Mod(a, b)) / b`` for a positive ``b``), is
        known non-negative by sympy (``p - p // L * L`` is ``Mod(p, L)``)."""
        slack = self.slack(cond, equal=True)
        if slack is None:
            return False
        if cond.op == "==":
            return slack == 0
        return bool(slack.is_nonnegative)

    def slack(self, cond: Expr, equal: bool = False) -> sympy.Expr | None:
        """An integer comparison's slack, non-negative exactly where it holds (``a < b``:
        ``b - a - 1``; ``==``, with ``equal``: ``a - b``), ``floor`` rewritten as
        :meth:`always_holds` says; None for anything else."""
        ops = ("<", "<=", ">", ">=") + (("==",) if equal else ())
        if not (isinstance(cond, Binary) and cond.op in ops):
            return None
        a, b = integer_sympy(cond.left, self.size), integer_sympy(cond.right, self.size)
        if a is None or b is None:
            return None
        slack = {"<": b - a - 1, "<=": b - a, ">": a - b - 1, ">=": a - b, "==": a - b}[cond.op]
        return sympy.expand(slack.replace(
            lambda e: isinstance(e, sympy.floor),
            lambda e: (e.args[0].as_numer_denom()[0]
                       - sympy.Mod(*e.args[0].as_numer_denom())) / e.args[0].as_numer_denom()[1]))

    def in_bounds(self, sub: Expr, rank: str) -> bool:
        """``sub`` (over the ranks of the reading statement) stays inside ``rank``: the rank
        itself, or a group ``h // G`` with ``G = H / HK`` reading a rank of size ``HK``."""
        if sub == Index(rank):
            return True
        if (isinstance(sub, Binary) and sub.op == "//" and isinstance(sub.left, Index)
                and isinstance(sub.right, Size)):
            lets = {let.name: let.value for let in self.defn.lets}
            group = lets.get(sub.right.rank, size_symbol(sub.right.rank))
            return sympy.simplify(size_symbol(sub.left.rank) / group - size_symbol(rank)) == 0
        # a reversed read V[M - 1 - m, f] over m < M, or a shift that fits
        return affine_in_range(sub, self.size(rank), self.size)

    def bounded_by(self, x: Access, depth: int) -> set:
        """``(subscript, rank)`` pairs that ``x`` being present shows are in bounds: its
        statement reads an input at them (inside a reduction too, for subscripts free of
        the reduced ranks: some point of the fiber was computed).  Paged attention's
        ``S[b,h,m]`` reads ``KC[PT[b, m // PG], m % PG, h // G, e]``, so ``VC``'s read at
        the same page, slot and head is present wherever ``S`` is."""
        st = self.statement.get(x.tensor)
        if not isinstance(st, Einsum) or depth > 8 or \
                not all(isinstance(s, Index) for s in x.subscripts):
            return set()
        point = dict(zip(st.lhs, x.subscripts))
        out = set()

        def visit(e: Expr, reduced: frozenset) -> None:
            if isinstance(e, Reduce):
                reduced = reduced | frozenset(e.ranks)
            if isinstance(e, Access):
                if e.tensor in self.args:
                    for sub, r in zip(e.subscripts, self.args[e.tensor].ranks):
                        if not free_ranks(sub) & reduced:
                            out.add((substitute(sub, point), r))
                elif not reduced:
                    out.update(self.bounded_by(_at(e, point), depth + 1))
                for sub in e.subscripts:  # an index tensor's read: PT[b, m // PG]
                    visit(sub, reduced)
                return
            for k in children(e):
                visit(k, reduced)

        visit(st.expr, frozenset())
        return out

    def where_at_fiber(self, conds: list, x: Access, adds: set, mapping: dict) -> bool:
        """Every condition in ``conds`` (over the ranks the contribution sums) is one of
        the ``where`` conjuncts of ``x``'s own reduction at a fiber point (its reduced
        ranks renamed by ``mapping``, extended here by size), so it holds at the fiber
        point ``x``'s presence shows was computed."""
        st = self.statement.get(x.tensor)
        if not isinstance(st, Einsum) or not isinstance(st.expr, Reduce) or st.where is None \
                or not all(isinstance(s, Index) for s in x.subscripts):
            return False
        point = dict(zip(st.lhs, x.subscripts))
        free = [r for r in st.expr.ranks if r not in mapping]
        for choice in _assignments(free, sorted(adds - set(mapping.values())),
                                   self.same_size):
            trial = {**mapping, **choice}
            at = {**point, **{r: Index(s) for r, s in trial.items()}}
            mine = set(conjuncts(substitute(st.where, at)))
            if all(c in mine for c in conds):
                mapping.update(trial)
                return True
        return False

    def always_present(self, acc: Access, depth: int) -> bool:
        """Present at every point: an input read at its own ranks, or a map without
        ``where`` of such values (``FK[m,e] = elu(K[m,e]) + 1``)."""
        if acc.tensor in self.args:  # K[m,e] for K[P,E] with M = P too
            return self.in_range(acc)
        st = self.statement.get(acc.tensor)
        if (depth > 8 or not isinstance(st, Einsum) or st.where is not None
                or any(isinstance(n, Reduce) for n in walk(st.expr))
                or acc.subscripts != tuple(Index(r) for r in st.lhs)):
            return False
        return all(self.always_present(n, depth + 1) for n in walk(st.expr)
                   if isinstance(n, Access))

    def implied(self, x: Access, depth: int) -> set:
        """The ``where`` conditions (at ``x``'s point) that ``x`` being present implies: its
        statement's, and those of what it reads outside reductions."""
        st = self.statement.get(x.tensor)
        if not isinstance(st, Einsum) or depth > 8 or \
                not all(isinstance(s, Index) for s in x.subscripts):
            return set()
        point = dict(zip(st.lhs, x.subscripts))
        out = {substitute(st.where, point)} if st.where is not None else set()
        if isinstance(st.expr, Reduce):  # present: some point of the fiber was computed
            out |= {("nonempty", r) for r in st.expr.ranks}

        def visit(e: Expr) -> None:
            if isinstance(e, Reduce):
                return
            if isinstance(e, Access):
                out.update(self.implied(_at(e, point), depth + 1))
                return
            for k in children(e):
                visit(k)

        visit(st.expr)
        return out

    def read_by(self, acc: Access, x: Access, depth: int) -> bool:
        """``x``'s own statement reads ``acc`` at ``x``'s point (outside any reduction), so
        ``x`` present means ``acc`` present: ``SN[p,m] = exp(QK[p,m] - GM[p])`` reads
        ``GM[p]``."""
        st = self.statement.get(x.tensor)
        if not isinstance(st, Einsum) or not all(isinstance(s, Index) for s in x.subscripts):
            return False
        point = dict(zip(st.lhs, x.subscripts))

        def visit(e: Expr) -> bool:
            if isinstance(e, Reduce):
                return False  # a reduction's reads are present at some point only
            if isinstance(e, Access):
                at = _at(e, point)
                return at == acc or (depth < 8 and self.statement.get(e.tensor) is not None
                                     and all(isinstance(s, Index) for s in at.subscripts)
                                     and self.read_by(acc, at, depth + 1))
            return any(visit(k) for k in children(e))

        return visit(st.expr)

    def gradient(self, name: str) -> tuple[Output, list[Statement]]:
        """The output ``d<name>`` and the statements that make it (0 when nothing reads it)."""
        adj = self.finish(name)
        ranks = self.ranks(name)
        out_name = adjoint_name(name)
        stmts = list(self.pending)
        self.pending = []
        if adj is None:
            stmts.append(Einsum(out_name, ranks, Num(0)))
        elif adj != out_name:
            made = next((c.lhs for cs in self.contributions.values() for c in cs
                         if c.tensor == adj), ranks)
            if made != ranks and self.same_ranks(made, ranks):
                ranks = made  # dK[m,e] for K[P,E] read as K[m,e] (M = P): one kernel's ranks
            stmts.append(Einsum(out_name, ranks, Access(adj, tuple(Index(r) for r in ranks))))
        dtype = next((a.dtype for a in self.defn.tensor_args if a.name == name), None)
        return Output(out_name, ranks, dtype), stmts


def _assignments(ranks: list, targets: list, same_size) -> list[dict]:
    """Every injective assignment of ``ranks`` to same-size ``targets``."""
    if not ranks:
        return [{}]
    out = []
    for t in targets:
        if same_size(ranks[0], t):
            rest = [u for u in targets if u != t]
            out += [{ranks[0]: t, **more} for more in _assignments(ranks[1:], rest, same_size)]
    return out


def _solved(conds: list, space, lhs) -> tuple[list, dict]:
    """The filters ``sub == r`` whose ``sub`` is ``±s + ...`` in a rank ``s`` the statement
    sums (no rank the gradient keeps, no tensor read), solved for ``s``; returns
    the other filters (with the solutions substituted) and ``{s: solution}``.  Before →
    after (a reversed read ``V[M - 1 - m, f]``)::

        dV_1[mx,f] = sum[p, m](...m...)   where M - 1 - m == mx
        dV_1[mx,f] = sum[p](...M - 1 - mx...)   where 0 <= M - 1 - mx and M - 1 - mx < M
    """
    solved: dict = {}
    rest = []
    for c in conds:
        sub, target = c.left, c.right
        ranks = free_ranks(sub) & (set(space) - set(lhs) - set(solved))
        if ranks and not any(isinstance(n, Access) for n in walk(sub)) \
                and not (free_ranks(sub) - ranks) & set(lhs):
            # the innermost summed rank first (m of T[p - m + M - 1]: the sum keeps p)
            for rank in [r for r in reversed(space) if r in ranks]:
                sol = _isolate(sub, rank, target)
                if sol is not None:
                    solved[rank] = sol
                    break
            else:
                rest.append(c)
            continue
        rest.append(c)
    rest = [substitute(c, solved) for c in rest] if solved else rest
    return rest, solved


def _isolate(e: Expr, rank: str, target: Expr) -> Expr | None:
    """``x`` with ``e[rank := x] == target``, when ``e`` is ``±rank`` plus or minus terms
    free of ``rank``; None otherwise."""
    if e == Index(rank):
        return target
    if isinstance(e, Unary) and e.op == "-":
        return _isolate(e.operand, rank, Unary("-", target))
    if isinstance(e, Binary) and e.op in ("+", "-"):
        in_left, in_right = rank in free_ranks(e.left), rank in free_ranks(e.right)
        if in_left and not in_right:
            inverse = "-" if e.op == "+" else "+"
            return _isolate(e.left, rank, Binary(inverse, target, e.right))
        if in_right and not in_left:
            return _isolate(e.right, rank, Binary("-", target, e.left) if e.op == "+"
                            else Binary("-", e.left, target))
    return None


def _at(acc: Access, point: dict) -> Access:
    """``acc`` with its rank subscripts replaced by the expressions of ``point``."""
    return Access(acc.tensor, tuple(substitute(s, point) for s in acc.subscripts))


def _without_mod(e: Expr) -> Expr:
    """``a % b`` as ``a - a // b * b`` (a condition's value: '%' is for subscripts)."""
    if isinstance(e, Binary) and e.op == "%":
        a, b = _without_mod(e.left), _without_mod(e.right)
        return Binary("-", a, Binary("*", Binary("//", a, b), b))
    kids = children(e)
    if not kids or isinstance(e, Access):
        return e
    return with_children(e, tuple(_without_mod(k) for k in kids))


def _present_where(value: Expr, reads: list[Access]) -> Expr:
    """``value`` computed only where the forward point was: every forward read it does not
    itself read enters as ``select(R == R, 1, 1)`` (1, but absent where ``R`` is)."""
    have = {n for n in walk(value) if isinstance(n, Access)}
    for acc in dict.fromkeys(reads):
        if acc not in have:
            value = _mul(value, Call("select", (Binary("==", acc, acc), Num(1), Num(1))))
            have.add(acc)
    return value


def _differentiable_leaves(e: Expr, floats: set[str], params: set[str]) -> list:
    """Every occurrence of a float tensor access or float parameter in ``e``, outside
    subscripts and conditions (they are constants)."""
    out = []

    def visit(n: Expr, constant: bool) -> None:
        if isinstance(n, Access):
            if n.tensor in floats and not constant:
                out.append(n)
            return  # subscripts are integer positions
        if isinstance(n, Param):
            if n.name in params and not constant:
                out.append(n)
            return
        if isinstance(n, Binary) and n.op in ("<", "<=", ">", ">=", "==", "!=", "and", "or"):
            constant = True
        if isinstance(n, Call) and n.fn == "select":
            visit(n.args[0], True)
            visit(n.args[1], constant)
            visit(n.args[2], constant)
            return
        for k in children(n):
            visit(k, constant)

    visit(e, False)
    return out
