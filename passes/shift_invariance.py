"""Shift invariance: a tensor whose value the outputs do not depend on (a stabilising shift).

Softmax subtracts its row max only for range: ``exp(S - GM) / sum(exp(S - GM))`` is the
same for any ``GM``.  The backward uses this: a shift's adjoint is exactly zero, so it is a
constant for differentiation (no ``dGM``, no first attaining point of the max, and the
forward's saved row statistic can be read instead of recomputed).  Before → after (the backward's statements)::

    dGM_1[p]    = sum[m](dSN[p,m] * (-1 * exp(QK[p,m] - GM[p])))     (gone: dGM = 0)
    GM_at[p]    = min[m](select(QK[p,m] == GM[p], m, inf))            (gone)

**The analysis.**  Perturb ``T[i] -> T[i] + c[i]`` (a different ``c`` per element) and
propagate what happens to every expression, as one of

* ``Shift(a, idx)``: the value changes by ``a * c[idx]`` (``T`` itself: ``a = 1``);
* ``Scale(k, idx)``: the value is multiplied by ``exp(k * c[idx])`` (``exp`` of a shift);
* ``UNCHANGED`` (both with ``a = k = 0``).

``idx`` is where ``c`` is read, as subscript expressions in the current statement's ranks.
Products add ``k``, quotients subtract, sums and reductions keep a common ``Scale`` (not
over a rank of ``idx``: the factor would differ term by term), ``log`` turns a ``Scale``
into a ``Shift``, ``relu``/``abs``/``max``/``sqrt`` keep a positive factor.  Anything else
(a ``where`` or ``select`` condition that moves, a factor meeting a non-factor in ``+``) is
*unknown*, and the tensor is not a shift.  ``T`` is a shift when every output comes out
``UNCHANGED``.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy

from ..einsum_ir.exprs import children, free_ranks, walk
from ..einsum_ir.ir import (Access, Binary, Call, Definition, Einsum, Reduce, Unary)
from .tile_loads import substitute


@dataclass(frozen=True)
class Effect:
    kind: str            # "shift" (additive a*c) or "scale" (multiplicative exp(k*c))
    amount: object       # a, or k (sympy numbers)
    idx: tuple | None    # where c is read (None when unchanged)

    @property
    def unchanged(self) -> bool:
        return self.amount == 0


UNCHANGED = Effect("shift", sympy.Integer(0), None)


class Unknown(Exception):
    """The perturbation does not propagate to a known form."""


def _shift(a, idx) -> Effect:
    return UNCHANGED if a == 0 else Effect("shift", a, idx)


def _scale(k, idx) -> Effect:
    return UNCHANGED if k == 0 else Effect("scale", k, idx)


def _as_scale(e: Effect) -> Effect:
    if e.unchanged:
        return UNCHANGED
    if e.kind != "scale":
        raise Unknown("an additive shift where a factor is needed")
    return e


def _same_idx(a: Effect, b: Effect):
    if a.unchanged:
        return b.idx
    if b.unchanged or a.idx == b.idx:
        return a.idx
    raise Unknown("two different perturbations meet")


def _combine_sum(a: Effect, b: Effect, sign: int) -> Effect:
    if a.unchanged and b.unchanged:
        return UNCHANGED
    if a.kind == "scale" or b.kind == "scale":
        if a.unchanged or b.unchanged or a.kind != b.kind or a.amount != b.amount or a.idx != b.idx:
            raise Unknown("a scaled term added to a term scaled otherwise")
        return a
    return _shift(a.amount + sign * b.amount, _same_idx(a, b))


def _product(a: Effect, b: Effect, sign: int) -> Effect:
    a, b = _as_scale(a), _as_scale(b)
    if a.unchanged and b.unchanged:
        return UNCHANGED
    idx = _same_idx(a, b)
    return _scale((0 if a.unchanged else a.amount) + sign * (0 if b.unchanged else b.amount), idx)


_POSITIVE_HOMOGENEOUS = {"relu": 1, "abs": 1, "sqrt": sympy.Rational(1, 2),
                         "rsqrt": sympy.Rational(-1, 2)}


class _Propagation:
    def __init__(self, defn: Definition, shifted: str):
        self.defn, self.shifted = defn, shifted
        self.of: dict[str, Effect] = {}   # tensor -> effect, in its own lhs ranks

    def access(self, acc: Access) -> Effect:
        for sub in acc.subscripts:  # an index read through a moving tensor: unknown
            if any(isinstance(n, Access) and not self.of.get(n.tensor, UNCHANGED).unchanged
                   for n in walk(sub)):
                raise Unknown("a subscript moves")
        if acc.tensor == self.shifted:
            return Effect("shift", sympy.Integer(1), acc.subscripts)
        eff = self.of.get(acc.tensor, UNCHANGED)
        if eff.unchanged:
            return UNCHANGED
        lhs = self.defn.tensor_ranks(acc.tensor)
        mapping = dict(zip(lhs, acc.subscripts))
        idx = tuple(substitute(s, mapping) for s in eff.idx)
        return Effect(eff.kind, eff.amount, idx)

    def expr(self, e) -> Effect:
        if isinstance(e, Access):
            return self.access(e)
        if isinstance(e, Reduce):
            body = self.expr(e.body)
            if body.unchanged:
                return UNCHANGED
            if any(set(e.ranks) & free_ranks(s) for s in body.idx):
                raise Unknown("the perturbation varies over a reduced rank")
            if e.op == "sum" and body.kind == "shift":
                raise Unknown("a sum of shifted terms")
            return body  # sum of a common factor; max/min of a common shift or factor
        if isinstance(e, Unary):
            inner = self.expr(e.operand)
            if e.op == "-":
                return inner if inner.kind == "scale" else _shift(-inner.amount, inner.idx)
            return self._constant(inner)
        if isinstance(e, Binary):
            if e.op in ("<", "<=", ">", ">=", "==", "!=", "and", "or", "//", "%"):
                self._constant(self.expr(e.left))
                self._constant(self.expr(e.right))
                return UNCHANGED
            a, b = self.expr(e.left), self.expr(e.right)
            if e.op in ("+", "-"):
                return _combine_sum(a, b, 1 if e.op == "+" else -1)
            if e.op in ("*", "/"):
                if e.op == "*" and a.kind == "shift" and not a.unchanged and _is_number(e.right):
                    return _shift(a.amount * sympy.nsimplify(e.right.value), a.idx)
                if e.op == "*" and b.kind == "shift" and not b.unchanged and _is_number(e.left):
                    return _shift(b.amount * sympy.nsimplify(e.left.value), b.idx)
                if e.op == "/" and a.kind == "shift" and not a.unchanged and _is_number(e.right):
                    return _shift(a.amount / sympy.nsimplify(e.right.value), a.idx)
                return _product(a, b, 1 if e.op == "*" else -1)
            if e.op == "**":
                self._constant(b)
                if a.unchanged:
                    return UNCHANGED
                if not _is_number(e.right):
                    raise Unknown("a power with a symbolic exponent")
                a = _as_scale(a)
                return _scale(a.amount * sympy.nsimplify(e.right.value), a.idx)
            raise Unknown(f"operator {e.op}")
        if isinstance(e, Call):
            return self.call(e)
        for k in children(e):
            self._constant(self.expr(k))
        return UNCHANGED

    def call(self, e: Call) -> Effect:
        args = [self.expr(a) for a in e.args]
        if all(a.unchanged for a in args):
            return UNCHANGED
        if e.fn == "select":
            self._constant(args[0])
            return _combine_sum(args[1], args[2], 1) if not (args[1].unchanged and args[2].unchanged) \
                else UNCHANGED if args[1] == args[2] else _raise("a select of different moves")
        if e.fn in ("max", "min"):
            a, b = args
            if a != b:
                raise Unknown(f"{e.fn} of differently moving operands")
            return a
        (x,) = args
        if e.fn == "exp" and x.kind == "shift":
            return _scale(x.amount, x.idx)
        if e.fn == "exp2" and x.kind == "shift":
            return _scale(x.amount * sympy.log(2), x.idx)
        if e.fn == "log" and x.kind == "scale":
            return _shift(x.amount, x.idx)
        if e.fn == "log2" and x.kind == "scale":
            return _shift(x.amount / sympy.log(2), x.idx)
        if e.fn in _POSITIVE_HOMOGENEOUS and x.kind == "scale":
            return _scale(x.amount * _POSITIVE_HOMOGENEOUS[e.fn], x.idx)
        raise Unknown(f"{e.fn} of a moving value")

    def _untouched_recurrence(self, st) -> None:
        """An iterative statement must not move (a state that a shift moved would carry
        the move to later steps, which this analysis does not follow): selective
        attention's ``FS[p+1,m] = FS[p,m] + relu(S[p,m])`` reads no shift, unchanged."""
        moved = [e for e in (st.expr, st.where) if e is not None and not self.expr(e).unchanged]
        if moved:
            raise Unknown("an iterative cascade whose state moves")
        self.of[st.tensor] = UNCHANGED

    @staticmethod
    def _constant(eff: Effect) -> Effect:
        if not eff.unchanged:
            raise Unknown("a condition or index moves")
        return UNCHANGED

    def run(self) -> bool:
        for st in self.defn.statements:
            if not isinstance(st, Einsum):
                self._untouched_recurrence(st)
                continue
            if st.tensor == self.shifted:
                continue
            if st.where is not None:
                self._constant(self.expr(st.where))
            eff = self.expr(st.expr)
            if not eff.unchanged:
                lhs = set(st.lhs)
                if any(not free_ranks(s) <= lhs for s in eff.idx):
                    raise Unknown("the perturbation escapes the statement's ranks")
            self.of[st.tensor] = eff
        return all(self.of.get(o.name, UNCHANGED).unchanged for o in self.defn.outputs)


def _raise(why: str):
    raise Unknown(why)


def _is_number(e) -> bool:
    from ..einsum_ir.ir import Num

    return isinstance(e, Num)


def is_shift(defn: Definition, name: str) -> bool:
    """Whether the outputs of (canonical, non-iterative) ``defn`` are unchanged when every
    element of ``name`` moves by its own constant."""
    if name in {o.name for o in defn.outputs}:
        return False
    try:
        return _Propagation(defn, name).run()
    except Unknown:
        return False


def shifts(defn: Definition) -> frozenset[str]:
    """The computed tensors of ``defn`` that are stabilising shifts.  Candidates are the
    statements that take a max or min (a shift's usual source); each is checked on its
    own."""
    out = set()
    for st in defn.statements:
        if not isinstance(st, Einsum):
            continue
        ops = {n.op for n in walk(st.expr) if isinstance(n, Reduce)} | \
            {n.fn for n in walk(st.expr) if isinstance(n, Call)}
        if ops & {"max", "min"} and is_shift(defn, st.tensor):
            out.add(st.tensor)
    return frozenset(out)
