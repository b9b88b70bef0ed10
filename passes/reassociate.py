"""``reassociate``: choose the contraction order of softmax-free chains by FLOP cost.

A chain of sums of products with no nonlinearity between them is one big sum
of products, and the order in which its operands are contracted is free.
The pass inlines the chain into its last Einsum, chooses the cheapest order
(exhaustively, like opt_einsum's optimal path) and keeps it when the whole
cascade gets cheaper.  Before → after (cosine attention)::

    S[p,m]  = sum[e](QN[p,e] * KN[m,e])
    AV[p,f] = sum[m](S[p,m] * V[m,f] / M)

    KNV[e,f] = sum[m](KN[m,e] * V[m,f])
    AV[p,f]  = sum[e](QN[p,e] * KNV[e,f] / M)

A linear-attention denominator is the same rewrite: ``sum[m](S[p,m])`` with
``S = sum[e](FQ*FK)`` becomes ``sum[e](FQ[p,e] * KS[e])``, ``KS[e] =
sum[m](FK[m,e])``.  A contraction read by several Einsums is inlined into each
that gets cheaper, and disappears once nothing reads it.

**Causal chains → chunked prefix form.**  A chain summed over ``m`` under one
causal mask ``m <= p + D`` cannot be reordered pairwise (the mask couples ``p``
and ``m``), so ``m`` is cut into chunks of ``M0`` and the sum is split into the
chunks before the query's own chunk, read from a running prefix state over
``M1`` (an iterative rank), and the query's own chunk, computed quadratically
under the mask; the queries are cut into chunks as the keys are, and read back
in their order at the end.  The form is the ``chunked`` pass's
(:mod:`attnc.passes.chunked`, whose decays this case has none of), at chunks of
``tile``.  Before → after (causal linear attention's numerator)::

    AV[p,f] = sum[m](S[p,m] * V[m,f] / AV_sum[p])   where m <= p + M - P

    let M0 = 64
    let M1 = ceil(M/M0)
    let M0Q = M0
    LFKV[m1,e,f] = sum[m0](FK[m1 * M0 + m0, e] * V[m1 * M0 + m0, f])
    SFKV[0,e,f] = 0
    SFKV[m1+1,e,f] = SFKV[m1,e,f] + LFKV[m1,e,f]
    PFKV[m1,e,f] = SFKV[m1,e,f]          # the state before chunk m1, kept per step
    QFK[m1,m0q,m0] = sum[e](phi(Q[m1 * M0 + m0q + P - M, e]) * FK[m1 * M0 + m0, e])
                     where m0 <= m0q          # phi: FQ's map, written at its reads
    AV_intra[m1,m0q,f] = sum[m0](QFK[m1,m0q,m0] * V[m1 * M0 + m0, f])
    AV_inter[m1,m0q,f] = sum[e](phi(Q[m1 * M0 + m0q + P - M, e]) * PFKV[m1,e,f])
    AV_chunks[m1,m0q,f] = AV_intra[m1,m0q,f] + select(m1 > 0, AV_inter[m1,m0q,f], 0)
    AV[p,f] = AV_chunks[(p + M - P) // M0, (p + M - P) % M0, f] / AV_sum[p]

The prefix part and the chunk part are terms of their own, ordered by cost
like any other.  The cost is ``O((P+M)·M0·(E+F) + M1·E·F)`` instead of
``O(P·M·(E+F))``; the form is a candidate like the pairwise orders, kept only
when it is the cheapest.  The chunk size is the ``tile`` option (64).

**What is a chain.**  A *term* is a canonical Einsum whose right side is a
``sum`` (or no reduction) over a product: factors multiplied or divided, the
``where`` as a mask factor, rank-free numbers, sizes and parameters as
coefficients.  A factor that reads a tensor defined by such a term that itself
sums (a contraction), or by a product map over one, is replaced by that
term's factors (its summed ranks renamed into the consumer must not clash: a
clash leaves the factor alone; a map that is not over a contraction stays a
factor).  Only terms that sum over **two or more ranks** after inlining are
reordered pairwise: with one summed rank every order meets at the same
largest iteration space, and moving factors out of a single sum is
``defer_normalization``'s job, so softmax cascades (a single sum over
``exp(...)`` scores) are never touched.  The chunked form needs one summed
rank.  Anything under ``exp``, ``max``, ``select``, a ``+`` ... is an opaque
factor, never looked into; at most 7 factors are searched (Bell(8) plans).

**Size assumptions.**  Costs are FLOPs as ``costs.py`` counts them, evaluated
at sizes: the given ``sizes``, else 4096 for *sequence ranks* and 64 for the
others.  A sequence rank is the second-to-last core dimension of some tensor
argument (the rows of a ``[rows, features]`` matrix: ``P`` of ``Q[P,E]``, ``M``
of ``K[M,E]``); feature, head and batch-like ranks are the rest.  ``let``
sizes follow their formulas at those values.  Ties keep the source.

**Absent elements.**  Reordering a sum of products is exact for values and
presence alike: a point contributes only where every factor is present (and
every mask holds), and a sum is present where some point contributes; pushing
a sum inside a product of factors that do not depend on the summed rank
rewrites ``∃x (A ∧ B(x))`` to ``A ∧ ∃x B(x)``.  So a mask is one more
operand of the search (the ``where`` of whichever Einsum it joins; it is never
an Einsum alone), and out-of-bounds reads (absent) need no special case.
The chunked form combines its two parts with ``+``, which needs both present,
so it is used only when it provably keeps the meaning:

* exactly one mask, ``m <= p + D`` (``<``, ``>=``, ``>`` normalised), with ``p``
  an output rank, ``m`` summed and ``D`` made of sizes and integers such that
  ``p + D <= M - 1`` for every query (``D <= M - P``: the KV-cache offset
  ``M - P`` qualifies, a bare ``m <= p`` does not since ``P <= M`` is unknown);
* no other factor reads both ``p`` and ``m``; some factor reads ``m`` as a
  plain in-bounds subscript (so keys past ``M`` in the last chunk are absent);
* every factor that reads ``m`` is *total*: present at every in-bounds point
  (inputs, and maps or sums over them with no ``where`` and plain in-bounds
  subscripts).  Factors of ``p`` may be absent anywhere.

Then for a query with ``p + D >= 0`` the prefix state is present and the first
key of its own chunk is present, so both parts are present exactly where some
choice of the other ranks makes the factors of ``p`` present, as in the
source; a query with ``p + D < 0`` reads neither (the chunk index is
negative: out of bounds), and the source sums over no key there.
"""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from itertools import product as cartesian
from typing import Iterator

import networkx as nx
import sympy

from ..einsum_ir.exprs import free_ranks, transform, walk
from ..einsum_ir.ir import (Access, Binary, Call, Definition, Einsum, Expr, Index,
                            Num, Param, Reduce, Size, Statement, Unary, size_symbol)
from .canonicalize import canonicalize
from .costs import statement_flops
from .passcount import raises_bound

SEQUENCE_SIZE = 4096
FEATURE_SIZE = 64
DEFAULT_TILE = 64
MAX_OPERANDS = 7  # exhaustive search is over set partitions: Bell(8) plans at 7


# ----------------------------------------------------------------------------
# Size assumptions
# ----------------------------------------------------------------------------


def sequence_ranks(defn: Definition) -> frozenset[str]:
    """Ranks that are the second-to-last core dim of some tensor argument."""
    return frozenset(a.ranks[-2] for a in defn.tensor_args if len(a.ranks) >= 2)


def assumed_sizes(defn: Definition, sizes: dict[str, int] | None = None) -> dict[str, float]:
    """Rank sizes to compare costs at: given ones, else 4096 (sequence) or 64; lets follow."""
    given = {k: _positive_int(k, v) for k, v in (sizes or {}).items() if k in defn.ranks}
    seq = sequence_ranks(defn)
    known: dict[str, float] = {}
    for arg in defn.tensor_args:
        for r in arg.ranks:
            known.setdefault(r, given.get(r, SEQUENCE_SIZE if r in seq else FEATURE_SIZE))
    for let in defn.lets:
        known[let.name] = given.get(let.name, _let_value(let.value, known))
    return known


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"size {name}={value!r}: a size must be a positive integer")
    return int(value)


def _let_value(value: sympy.Expr, known: dict[str, float]) -> float:
    v = sympy.sympify(value).subs({size_symbol(k): n for k, n in known.items()})
    if not (v.is_number and v.is_finite):
        return FEATURE_SIZE
    return int(v) if v.is_integer else float(v)


# ----------------------------------------------------------------------------
# Terms: a sum over a product of factors
# ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Factor:
    """One operand of a term: multiplied, divided by, or a ``where`` mask."""

    expr: Expr
    role: str  # "mul", "div" or "mask"
    ranks: frozenset[str]

    @staticmethod
    def of(expr: Expr, role: str) -> "Factor":
        return Factor(expr, role, free_ranks(expr))

    @property
    def is_coefficient(self) -> bool:
        return self.role != "mask" and not any(isinstance(n, (Access, Index))
                                               for n in walk(self.expr))


@dataclass(frozen=True, slots=True)
class Term:
    """``out[...] = sum[summed](product of factors and coefficients)``."""

    out: tuple[str, ...]
    summed: tuple[str, ...]
    factors: tuple[Factor, ...]
    coefficients: tuple[Factor, ...] = ()

    @property
    def ranks(self) -> tuple[str, ...]:
        """Every rank of the term, in order of first use by the factors, then outputs, summed."""
        seen = {n.rank: None for f in self.factors for n in walk(f.expr) if isinstance(n, Index)}
        seen.update(dict.fromkeys(self.out + self.summed))
        return tuple(seen)

    @property
    def contracted(self) -> tuple[str, ...]:
        """Summed ranks that some factor reads."""
        used = frozenset().union(*(f.ranks for f in self.factors))
        return tuple(r for r in self.summed if r in used)


NEG_ONE = Unary("-", Num(1))


def _flip(role: str) -> str:
    return "div" if role == "mul" else "mul"


def product_factors(e: Expr, role: str = "mul") -> list[Factor]:
    """``e`` as factors: ``a * b / c`` → a, b (mul), c (div); ``-a`` → -1, a."""
    if isinstance(e, Binary) and e.op == "*":
        return product_factors(e.left, role) + product_factors(e.right, role)
    if isinstance(e, Binary) and e.op == "/":
        return product_factors(e.left, role) + product_factors(e.right, _flip(role))
    if isinstance(e, Unary) and e.op == "-":
        return [Factor.of(NEG_ONE, "mul")] + product_factors(e.operand, role)
    return [Factor.of(e, role)]


def as_term(st: Statement) -> Term | None:
    """A plain Einsum whose right side is ``sum[...](product)`` or a product, as a term."""
    if not isinstance(st, Einsum):
        return None
    body, summed = st.expr, ()
    if isinstance(body, Reduce):
        if body.op != "sum" or set(body.ranks) & set(st.lhs):
            return None
        body, summed = body.body, body.ranks
    if any(isinstance(n, Reduce) for n in walk(body)):
        return None
    parts = product_factors(body)
    if st.where is not None:
        parts.append(Factor.of(st.where, "mask"))
    return Term(st.lhs, tuple(summed), tuple(f for f in parts if not f.is_coefficient),
                tuple(f for f in parts if f.is_coefficient))


def rename(e: Expr, mapping: dict[str, str | Expr]) -> Expr:
    """``e`` with index variables replaced (by ranks or by expressions), simultaneously."""
    def swap(n: Expr) -> Expr | None:
        if not isinstance(n, Index) or n.rank not in mapping:
            return None
        new = mapping[n.rank]
        return Index(new) if isinstance(new, str) else new
    return transform(e, swap)


def rename_term(term: Term, mapping: dict[str, str | Expr], out=None) -> Term:
    factors = tuple(Factor.of(rename(f.expr, mapping), f.role) for f in term.factors)
    return Term(term.out if out is None else out, term.summed, factors, term.coefficients)


# ----------------------------------------------------------------------------
# The definition's facts the pass relies on
# ----------------------------------------------------------------------------


def _iterative_scope(defn: Definition) -> tuple[frozenset[str], frozenset[str]]:
    return frozenset(defn.iterative_tensors), frozenset(defn.iterative_ranks)


def _plain_einsum(defn: Definition, name: str) -> Einsum | None:
    """The single plain Einsum defining ``name``, outside any loop, or None."""
    sts = defn.definitions_of(name)
    if len(sts) != 1 or not isinstance(sts[0], Einsum):
        return None
    tensors, ranks = _iterative_scope(defn)
    st = sts[0]
    reads = {n.tensor for n in walk(st.expr) if isinstance(n, Access)}
    if st.where is not None:
        reads |= {n.tensor for n in walk(st.where) if isinstance(n, Access)}
    return None if reads & tensors or set(st.lhs) & ranks else st


def _plain_access(e: Expr) -> bool:
    """``T[i, j, ...]`` with distinct plain index variables."""
    if not isinstance(e, Access) or not all(isinstance(s, Index) for s in e.subscripts):
        return False
    return len({s.rank for s in e.subscripts}) == len(e.subscripts)


def _extent(defn: Definition, rank: str) -> sympy.Expr:
    """A rank's size in terms of argument ranks (lets substituted)."""
    value = size_symbol(rank)
    for let in reversed(defn.lets):
        value = value.subs(size_symbol(let.name), let.value)
    return sympy.simplify(value)


def _in_bounds(defn: Definition, acc: Access) -> bool:
    """Whether every subscript of ``acc`` is a plain index over its dimension's extent."""
    if not _plain_access(acc):
        return False
    dims = defn.tensor_ranks(acc.tensor)
    return all(s.rank == d or _extent(defn, s.rank) == _extent(defn, d)
               for s, d in zip(acc.subscripts, dims))


def is_total(defn: Definition, name: str, seen: frozenset[str] = frozenset()) -> bool:
    """Whether tensor ``name`` is present at every in-bounds point (sizes >= 1)."""
    if name in {a.name for a in defn.tensor_args}:
        return True
    st = _plain_einsum(defn, name)
    if st is None or st.where is not None or name in seen:
        return False
    return _reads_total(defn, st.expr, seen | {name})


def _reads_total(defn: Definition, e: Expr, seen: frozenset[str] = frozenset()) -> bool:
    accesses = [n for n in walk(e) if isinstance(n, Access)]
    return all(_in_bounds(defn, a) and is_total(defn, a.tensor, seen) for a in accesses)


# ----------------------------------------------------------------------------
# Inlining a chain into its last Einsum
# ----------------------------------------------------------------------------


def expand(term: Term, defn: Definition) -> tuple[Term, tuple[str, ...]]:
    """``term`` with every factor that reads a contraction replaced by its factors.

    Returns the expanded term and the names of the tensors inlined (with repeats).
    """
    factors: list[Factor] = []
    summed, coefficients = list(term.summed), list(term.coefficients)
    taken, inlined = set(term.ranks), []
    for f in term.factors:
        found = _producer_term(f, defn)
        if found is None or set(found[0].summed) & taken:
            factors.append(f)
            continue
        inner, names = found
        factors += inner.factors
        summed += inner.summed
        coefficients += inner.coefficients
        taken |= set(inner.ranks)
        inlined += names
    return Term(term.out, tuple(summed), tuple(factors), tuple(coefficients)), tuple(inlined)


def _producer_term(f: Factor, defn: Definition) -> tuple[Term, tuple[str, ...]] | None:
    """The expanded term of the contraction ``f`` reads, in ``f``'s ranks, or None."""
    if f.role != "mul" or not _plain_access(f.expr):
        return None
    st = _plain_einsum(defn, f.expr.tensor)
    term = as_term(st) if st is not None else None
    if term is None:
        return None
    term, names = expand(term, defn)
    if not term.contracted or not _in_bounds(defn, f.expr):
        return None
    mapping = {r: s.rank for r, s in zip(st.lhs, f.expr.subscripts)}
    out = tuple(mapping[r] for r in term.out)
    return rename_term(term, mapping, out=out), names + (st.tensor,)


# ----------------------------------------------------------------------------
# Choosing the order: exhaustive over the partitions of the factors
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """One Einsum: ``lhs = sum[summed](parts)``; a part is a factor index or a sub-plan."""

    lhs: tuple[str, ...]
    summed: tuple[str, ...]
    parts: tuple["Plan | int", ...]
    cost: tuple[float, float]  # (FLOPs, elements written), this Einsum and every sub-plan


def _ops(e: Expr) -> int:
    """Operators in a reduction-free ``e`` that are not folded at compile time (as costs.py)."""
    if not isinstance(e, (Unary, Binary, Call)):
        return 0
    if not any(isinstance(n, (Access, Index, Param)) for n in walk(e)):
        return 0
    return 1 + sum(_ops(c) for c in (e.args if isinstance(e, Call) else
                                      (e.operand,) if isinstance(e, Unary) else (e.left, e.right)))


def _volume(ranks, sizes: dict[str, float]) -> float:
    out = 1.0
    for r in ranks:
        out *= sizes[r]
    return out


def _bits(mask: int) -> list[int]:
    return [i for i in range(mask.bit_length()) if mask >> i & 1]


def _partitions(mask: int) -> Iterator[list[int]]:
    """Every partition of the set ``mask`` into blocks (bit masks), deterministically."""
    if not mask:
        yield []
        return
    low = mask & -mask
    rest = mask ^ low
    sub = rest
    while True:
        block = low | sub
        for tail in _partitions(mask ^ block):
            yield [block] + tail
        if not sub:
            break
        sub = (sub - 1) & rest


class _Planner:
    """Best plans for the subsets of one term's factors (see ``plan_term``)."""

    def __init__(self, term: Term, sizes: dict[str, float]):
        self.term, self.sizes = term, sizes
        self.full = (1 << len(term.factors)) - 1
        self.order = term.ranks
        self.best: dict[int, Plan] = {}

    def ranks_of(self, mask: int) -> frozenset[str]:
        return frozenset().union(*(self.term.factors[i].ranks for i in _bits(mask)))

    def kept(self, mask: int) -> tuple[str, ...]:
        need = set(self.term.out) | self.ranks_of(self.full ^ mask)
        return tuple(r for r in self.order if r in self.ranks_of(mask) and r in need)

    def run(self) -> Plan | None:
        for mask in sorted(range(1, self.full), key=lambda m: (bin(m).count("1"), m)):
            found = self.einsum(mask, self.kept(mask), root=False)
            if found is not None:
                self.best[mask] = found
        return self.einsum(self.full, self.term.out, root=True)

    def einsum(self, mask: int, lhs: tuple[str, ...], root: bool) -> Plan | None:
        best = None
        for blocks in _partitions(mask):
            if len(blocks) == 1 and (mask & (mask - 1)):
                continue  # a copy of a plan of the same factors
            for parts in cartesian(*(self.options(b, mask) for b in blocks)):
                plan = self.price(parts, lhs, root)
                if plan is not None and (best is None or plan.cost < best.cost):
                    best = plan
        return best

    def options(self, block: int, mask: int) -> list:
        """A block is a raw factor (single) or an earlier plan (materialised)."""
        opts: list = [_bits(block)[0]] if not block & (block - 1) else []
        if block != mask and block in self.best:
            opts.append(self.best[block])
        return opts

    def price(self, parts, lhs: tuple[str, ...], root: bool) -> Plan | None:
        raws = [self.term.factors[p] for p in parts if isinstance(p, int)]
        if not root and all(f.role == "mask" for f in raws) and len(raws) == len(parts):
            return None  # nothing to compute: a mask alone
        used = frozenset().union(*(part_ranks(self.term, p) for p in parts))
        summed = tuple(r for r in self.order if r in used and r not in lhs)
        if root:
            summed += tuple(r for r in self.term.summed if r not in self.ranks_of(self.full))
        elif not summed and len(parts) == 1:
            return None  # a copy of one factor
        expr, _ = plan_body(self.term, parts, root, lambda p: Access("_", ()))
        space = _volume(lhs, self.sizes) * _volume(summed, self.sizes)
        flops = space * _ops(expr) + (_volume(lhs, self.sizes) * (_volume(summed, self.sizes) - 1)
                                      if summed else 0)
        sub = [p.cost for p in parts if isinstance(p, Plan)]
        cost = (flops + sum(c[0] for c in sub), _volume(lhs, self.sizes) + sum(c[1] for c in sub))
        return Plan(tuple(lhs), summed, tuple(parts), cost)


def part_ranks(term: Term, part) -> frozenset[str]:
    return term.factors[part].ranks if isinstance(part, int) else frozenset(part.lhs)


def plan_term(term: Term, sizes: dict[str, float]) -> Plan | None:
    """The cheapest way to compute ``term`` as a tree of Einsums, or None if too large."""
    if len(term.factors) > MAX_OPERANDS:
        return None
    return _Planner(term, sizes).run()


def plan_body(term: Term, parts, root: bool, access_of) -> tuple[Expr, Expr | None]:
    """The product (and the where) of an Einsum from its parts."""
    muls, divs, masks = [], [], []
    for p in parts:
        f = term.factors[p] if isinstance(p, int) else Factor(access_of(p), "mul", frozenset(p.lhs))
        {"mul": muls, "div": divs, "mask": masks}[f.role].append(f.expr)
    for c in term.coefficients if root else ():
        (muls if c.role == "mul" else divs).append(c.expr)
    expr = muls[0] if muls else Num(1)
    for m in muls[1:]:
        expr = Binary("*", expr, m)
    for d in divs:
        expr = Binary("/", expr, d)
    where = masks[0] if masks else None
    for m in masks[1:]:
        where = Binary("and", where, m)
    return expr, where


# ----------------------------------------------------------------------------
# Emitting a plan as Einsums
# ----------------------------------------------------------------------------


class _Namer:
    """Fresh deterministic names, and reuse of an identical Einsum already in the cascade."""

    def __init__(self, defn: Definition, statements):
        self.taken = ({p.name for p in defn.params} | set(defn.ranks)
                      | {r.lower() for r in defn.ranks} | {st.tensor for st in defn.statements})
        self.known = {(st.lhs, st.expr, st.where): st.tensor for st in statements
                      if isinstance(st, Einsum)}

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.taken:
            name, k = f"{base}{k}", k + 1
        self.taken.add(name)
        return name

    def name(self, base: str, st: Einsum) -> tuple[str, bool]:
        """The name for ``st`` (built with a placeholder name) and whether it is new."""
        key = (st.lhs, st.expr, st.where)
        if key in self.known:
            return self.known[key], False
        name = self.fresh(base)
        self.known[key] = name
        return name, True


def _leaf_names(term: Term, plan) -> str:
    if isinstance(plan, int):
        accs = [n.tensor for n in walk(term.factors[plan].expr) if isinstance(n, Access)]
        return accs[0] if accs and term.factors[plan].role != "mask" else ""
    return "".join(_leaf_names(term, p) for p in plan.parts)


def emit(term: Term, plan: Plan, root: str, namer: _Namer, loc=None) -> list[Einsum]:
    """The plan's Einsums, every sub-plan before its reader; the last is named ``root``."""
    out: list[Einsum] = []
    names: dict[int, str] = {}

    def visit(p: Plan, is_root: bool) -> None:
        for part in p.parts:
            if isinstance(part, Plan):
                visit(part, False)
        expr, where = plan_body(term, p.parts, is_root,
                                lambda q: Access(names[id(q)], tuple(Index(r) for r in q.lhs)))
        if p.summed:
            expr = Reduce("sum", p.summed, expr)
        st = Einsum(root, p.lhs, expr, where, loc=loc)
        if is_root:
            out.append(st)
            return
        names[id(p)], new = namer.name(_leaf_names(term, p) or "T", st)
        if new:
            out.append(dataclasses.replace(st, tensor=names[id(p)]))

    visit(plan, True)
    return out


# ----------------------------------------------------------------------------
# The chunked prefix form of a causal chain
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CausalMask:
    """``m <= p + offset``: ``p`` an output rank, ``m`` a summed rank."""

    p: str
    m: str
    offset: sympy.Expr


def _affine(e: Expr) -> sympy.Expr | None:
    """An integer-affine expression of indices and sizes as sympy (indices as ``i_R``)."""
    if isinstance(e, Num) and isinstance(e.value, int):
        return sympy.Integer(e.value)
    if isinstance(e, Size):
        return size_symbol(e.rank)
    if isinstance(e, Index):
        return sympy.Symbol(f"i_{e.rank}", integer=True)
    if isinstance(e, Unary) and e.op == "-":
        inner = _affine(e.operand)
        return None if inner is None else -inner
    if isinstance(e, Binary) and e.op in ("+", "-", "*"):
        a, b = _affine(e.left), _affine(e.right)
        if a is None or b is None:
            return None
        return {"+": a + b, "-": a - b, "*": a * b}[e.op]
    return None


def causal_mask(cond: Expr, out: tuple[str, ...], summed: tuple[str, ...]) -> CausalMask | None:
    """``cond`` as ``m <= p + offset`` (any of ``< <= > >=``), or None."""
    if not (isinstance(cond, Binary) and cond.op in ("<", "<=", ">", ">=")):
        return None
    a, b = _affine(cond.left), _affine(cond.right)
    if a is None or b is None:
        return None
    slack = b - a if cond.op in ("<", "<=") else a - b  # slack >= 0 (> 0 when strict)
    slack = sympy.expand(slack - (1 if cond.op in ("<", ">") else 0))
    for p in out:
        for m in summed:
            ip, im = sympy.Symbol(f"i_{p}", integer=True), sympy.Symbol(f"i_{m}", integer=True)
            offset = sympy.expand(slack - ip + im)
            if not any(str(s).startswith("i_") for s in offset.free_symbols):
                return CausalMask(p, m, offset)
    return None


def _size_ir(base: Expr, value: sympy.Expr) -> Expr:
    """``base + value`` in IR, ``value`` an integer combination of sizes."""
    terms = sympy.Add.make_args(sympy.expand(value))
    for t in sorted(terms, key=lambda t: (t.could_extract_minus_sign(), str(t))):
        if t == 0:
            continue
        coeff, rest = t.as_coeff_Mul()
        node = None
        for s in sorted(rest.free_symbols, key=str) if rest != 1 else ():
            node = Size(str(s)) if node is None else Binary("*", node, Size(str(s)))
        if abs(coeff) != 1 or node is None:
            num = Num(int(abs(coeff)))
            node = num if node is None else Binary("*", num, node)
        base = Binary("-" if coeff < 0 else "+", base, node)
    return base


def chunkable(term: Term, defn: Definition) -> CausalMask | None:
    """The term's causal mask when the chunked form provably keeps its meaning, else None."""
    masks = {f.expr for f in term.factors if f.role == "mask"}
    if len(masks) != 1:
        return None
    mask = causal_mask(next(iter(masks)), term.out, term.summed)
    if mask is None or not _fits(defn, mask):
        return None
    fs = [f for f in term.factors if f.role != "mask"]
    if any(mask.p in f.ranks and mask.m in f.ranks for f in fs):
        return None
    if not any(_bounds_rank(defn, f.expr, mask.m) for f in fs):
        return None
    return mask if all(_reads_total(defn, f.expr) for f in fs if mask.m in f.ranks) else None


def _fits(defn: Definition, mask: CausalMask) -> bool:
    """``p + offset <= M - 1`` for every query: ``M - P - offset >= 0`` for positive sizes."""
    slack = sympy.simplify(_extent(defn, mask.m) - _extent(defn, mask.p)
                           - mask.offset.subs({size_symbol(l.name): l.value for l in defn.lets}))
    return bool(slack.is_nonnegative)


def _bounds_rank(defn: Definition, e: Expr, rank: str) -> bool:
    """Whether ``e`` reads some tensor at a plain in-bounds ``rank`` subscript."""
    return any(isinstance(n, Access) and _in_bounds(defn, n) and Index(rank) in n.subscripts
               for n in walk(e))


# ----------------------------------------------------------------------------
# The pass
# ----------------------------------------------------------------------------


def reassociate(defn: Definition, sizes: dict[str, int] | None = None, *,
                tile: int = DEFAULT_TILE) -> Definition:
    """Reorder the contractions of softmax-free chains where that lowers the FLOPs.

    ``sizes`` (rank -> size) fixes the sizes costs are compared at (defaults:
    see the module docstring); ``tile`` is the chunk size of the causal form.
    """
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile={tile!r}: the chunk size must be a positive integer")
    defn = canonicalize(defn)
    rewriter = _Rewriter(assumed_sizes(defn, sizes), tile)
    for name in consumers(defn):
        defn = rewriter.rewrite(defn, name)
    return defn


def consumers(defn: Definition) -> list[str]:
    """Plain Einsums, latest in the data flow first (a chain is seen from its end)."""
    tensors, ranks = _iterative_scope(defn)
    names = [st.tensor for st in defn.statements if isinstance(st, Einsum)
             and st.tensor not in tensors and not set(st.lhs) & ranks]
    order = {n: i for i, n in enumerate(names)}
    g = nx.DiGraph()
    g.add_nodes_from(names)
    for st in defn.statements:
        if st.tensor not in order:
            continue
        reads = [n for e in (st.expr, st.where) if e is not None for n in walk(e)]
        g.add_edges_from((n.tensor, st.tensor) for n in reads
                         if isinstance(n, Access) and n.tensor in order and n.tensor != st.tensor)
    return list(reversed(list(nx.lexicographical_topological_sort(g, key=lambda n: order[n]))))


class _Rewriter:
    """Rewrites one consumer at a time, keeping a rewrite only if the cascade gets cheaper."""

    def __init__(self, sizes: dict[str, float], tile: int):
        self.sizes, self.tile = dict(sizes), tile
        self.flop_cache: dict[Statement, float] = {}

    def rewrite(self, defn: Definition, name: str) -> Definition:
        st = _plain_einsum(defn, name)
        term = as_term(st) if st is not None else None
        if term is None:
            return defn
        term, inlined = expand(term, defn)
        if not 2 <= len(term.factors) <= MAX_OPERANDS:
            return defn
        best, best_cost = defn, self.cost(defn)
        for candidate in self.candidates(defn, st, term, inlined):
            cost = self.cost(candidate)
            if cost < best_cost and not raises_bound(defn, candidate):
                best, best_cost = candidate, cost
        return best

    def candidates(self, defn: Definition, st: Einsum, term: Term, inlined) -> Iterator[Definition]:
        """The cheapest pairwise order (a chain summing two ranks or more), the chunked form."""
        others = [s for s in defn.statements if s is not st]
        plan = plan_term(term, self.sizes) if len(term.contracted) >= 2 else None
        if plan is not None:
            namer = _Namer(defn, others)
            yield replace_statement(defn, st, emit(term, plan, st.tensor, namer, st.loc), inlined)
        outer = [f for f in term.factors if f.role != "mask" and f.ranks <= set(term.out)]
        core = dataclasses.replace(term, factors=tuple(f for f in term.factors if f not in outer))
        plan = plan_term(core, self.sizes) if outer and len(core.contracted) >= 2 else None
        if plan is not None:  # the same order, the factors over output ranks only applied last
            namer = _Namer(defn, others)
            name = namer.fresh(f"{st.tensor}_core")
            statements = emit(core, plan, name, namer, st.loc)
            value: Expr = Access(name, tuple(Index(r) for r in term.out))
            for f in outer:
                value = Binary("*" if f.role == "mul" else "/", value, f.expr)
            statements.append(Einsum(st.tensor, st.lhs, value, loc=st.loc))
            yield replace_statement(defn, st, statements, inlined)
        if chunkable(term, defn) is not None:  # the decay-free case of the chunked pass
            from .chunked import NotChunkable, chunk_statement, recognise
            try:
                causal, taken = recognise(defn, st)
                yield chunk_statement(defn, st, causal, taken, self.tile, self.sizes)
            except NotChunkable:
                pass

    def cost(self, defn: Definition) -> float:
        for let in defn.lets:  # the chunked form's chunk ranks
            if let.name not in self.sizes:
                self.sizes[let.name] = _let_value(let.value, self.sizes)
        return sum(self.statement_cost(st) for st in defn.statements)

    def statement_cost(self, st: Statement) -> float:
        if st not in self.flop_cache:
            value = statement_flops(st).subs({size_symbol(k): v for k, v in self.sizes.items()})
            self.flop_cache[st] = float(value)
        return self.flop_cache[st]


def replace_statement(defn: Definition, old: Einsum, new: list[Statement],
                      inlined: tuple[str, ...]) -> Definition:
    """``defn`` with ``old`` replaced by ``new`` and the inlined tensors no longer read removed."""
    statements: list[Statement] = []
    for st in defn.statements:
        statements += new if st is old else [st]
    outputs = {o.name for o in defn.outputs}
    changed = True
    while changed:
        read = {n.tensor for st in statements for e in (st.expr, st.where) if e is not None
                for n in walk(e) if isinstance(n, Access) and n.tensor != st.tensor}
        dead = {n for n in inlined if n not in read and n not in outputs}
        changed = any(st.tensor in dead for st in statements)
        statements = [st for st in statements if st.tensor not in dead]
    return dataclasses.replace(defn, statements=tuple(statements))
