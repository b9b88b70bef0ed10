"""``defer_normalization``: move reduction-invariant normalizers out of reductions.

A factor of a reduction's body that does not depend on the reduced ranks but
reads a *normalizer* (a tensor that needs a reduction over one of those ranks,
like ``SD``) makes the reduction wait for that other reduction to finish: one
more pass.  Moving the factor out of the reduction removes the wait (FuseMax's
Cascade 4, 3 passes → 2).  Before → after::

    A[p,m]  = SN[p,m] / SD[p]
    AV[p,f] = sum[m](A[p,m] * V[m,f])

    SNV[p,f] = sum[m](SN[p,m] * V[m,f])
    AV[p,f]  = SNV[p,f] / SD[p]

    GM[p] = max[m](S[p,m] - C[p])              # C needs a sum over m
    GM_max[p] = max[m](S[p,m])
    GM[p] = GM_max[p] - C[p]

Rules: a ``sum`` gives out multiplicative factors (``sum(X*c) = sum(X)*c``,
``sum(X/c) = sum(X)/c``); ``max``/``min`` give out additive terms
(``max(X + c) = max(X) + c``) and provably positive factors.  Once a
reduction is rewritten, every invariant factor leaves it (``lam`` too), so
the map reads ``lam * SN2V / SD2``; a reduction with no invariant normalizer
is left alone, so the pass is a no-op on cascades it does not apply to.

Sub-steps, in order of need:

1. **Inlining.** A map read exactly once, by the reduction's body, is
   substituted into it when that exposes a normalizer (``A`` above); its
   ``where`` joins the reduction's, which is the same filter since every point
   of the reduction reads it.  The inlined map disappears.
2. **Distribution.** When no product exposes a normalizer, products are
   distributed over ``+``/``-`` and the sum splits into one sum per term
   (differential attention: ``sum[m]((SN1/SD1 - lam*SN2/SD2) * V)``).  A sum of
   terms computes a point only where every term is present, so the split is
   made only when the presence analysis below proves every term present at the
   same points of the reduced ranks.
3. **Naming.** The new reduction is named after the tensors it reads, in order
   (``SN``·``V`` → ``SNV``, FuseMax's name), or ``<T>_<op>`` when that is taken.

Presence semantics are kept: a factor moved out is read by the new map, so
the map is absent exactly where the factor is, as every point of the old
reduction was.

The module also owns the **presence analysis** that ``online`` shares: the
conditions under which a point of a statement is computed, as a set of atoms
compared syntactically.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from itertools import product as cartesian

import networkx as nx
import sympy

from ..einsum_ir.exprs import accessed_tensors, children, free_ranks, walk, with_children
from ..einsum_ir.ir import (Access, Binary, Call, Const, Definition, Einsum, Expr, Index, Num,
                            Reduce, Size, Statement, TensorArg, Unary, size_symbol)
from ..einsum_ir.schedule import dataflow_graph, statement_reads
from .canonicalize import canonicalize
from .names import fresh_name  # noqa: F401 - re-exported to the other passes

MAX_TERMS = 8  # distribution beyond this many terms is not worth the extra reductions


# ---------------------------------------------------------------------------
# Small expression helpers (shared with ``online``)
# ---------------------------------------------------------------------------


def substitute(e: Expr, mapping: dict[str, Expr]) -> Expr:
    """``e`` with index variables replaced (``{rank: expr}``); reductions bind their own."""
    if not mapping:
        return e
    if isinstance(e, Index):
        return mapping.get(e.rank, e)
    if isinstance(e, Reduce):
        inner = {k: v for k, v in mapping.items() if k not in e.ranks}
        return dataclasses.replace(e, body=substitute(e.body, inner))
    kids = children(e)
    if not kids:
        return e
    return with_children(e, tuple(substitute(k, mapping) for k in kids))


def conjuncts(cond: Expr | None) -> list[Expr]:
    """``a and b and c`` -> ``[a, b, c]``."""
    if cond is None:
        return []
    if isinstance(cond, Binary) and cond.op == "and":
        return conjuncts(cond.left) + conjuncts(cond.right)
    return [cond]


def conjoin(*conds: Expr | None) -> Expr | None:
    """The ``and`` of the given conditions (None when there are none), without repeats."""
    parts: list[Expr] = []
    for c in conds:
        parts += [p for p in conjuncts(c) if p not in parts]
    if not parts:
        return None
    out = parts[0]
    for p in parts[1:]:
        out = Binary("and", out, p)
    return out


def linear_terms(e: Expr) -> list[tuple[int, Expr]]:
    """``a - b + c`` -> ``[(1, a), (-1, b), (1, c)]`` (unary minus flips the sign)."""
    if isinstance(e, Binary) and e.op in ("+", "-"):
        right = linear_terms(e.right)
        if e.op == "-":
            right = [(-s, t) for s, t in right]
        return linear_terms(e.left) + right
    if isinstance(e, Unary) and e.op == "-":
        return [(-s, t) for s, t in linear_terms(e.operand)]
    return [(1, e)]


def signed_sum(terms: list[tuple[int, Expr]]) -> Expr:
    """Inverse of :func:`linear_terms`."""
    sign, first = terms[0]
    out = first if sign > 0 else Unary("-", first)
    for sign, t in terms[1:]:
        out = Binary("+" if sign > 0 else "-", out, t)
    return out


def multiply(factors: list[Expr], divisors: list[Expr] = ()) -> Expr:
    out = factors[0] if factors else Num(1)
    for f in factors[1:]:
        out = Binary("*", out, f)
    for d in divisors:
        out = Binary("/", out, d)
    return out


def positive(e: Expr) -> bool:
    """True when ``e`` is provably > 0 at every point (parameters are not: any float)."""
    if isinstance(e, Num):
        return e.value > 0
    if isinstance(e, Size):
        return True
    if isinstance(e, Const):
        return e.name in ("pi", "inf")
    if isinstance(e, Call):
        if e.fn in ("exp", "exp2", "sigmoid"):
            return True
        return e.fn in ("sqrt", "rsqrt") and positive(e.args[0])
    if isinstance(e, Binary) and e.op in ("*", "/", "+"):
        return positive(e.left) and positive(e.right)
    if isinstance(e, Binary) and e.op == "**":
        return positive(e.left)
    return False


def taken_names(defn: Definition) -> set[str]:
    """Every name in use: parameters, tensors, ranks and their index variables."""
    names = {p.name for p in defn.params} | {st.tensor for st in defn.statements}
    return names | set(defn.ranks) | {r.lower() for r in defn.ranks}


def read_counts(defn: Definition) -> dict[str, int]:
    counts: dict[str, int] = {}
    for st in defn.statements:
        for acc in statement_reads(st):
            counts[acc.tensor] = counts.get(acc.tensor, 0) + 1
    return counts


def is_reduction(st: Statement) -> bool:
    return isinstance(st, Einsum) and isinstance(st.expr, Reduce)


# ---------------------------------------------------------------------------
# Presence analysis (shared with ``online``)
# ---------------------------------------------------------------------------
# An atom is one condition for a point to be computed:
#   ("where", cond)           a conjunct of a where clause holds (its reads present)
#   ("read", access)          an element that may be absent (an input read that may
#                             fall outside its rank, an iterative tensor)
#   ("exists", ranks, atoms)  some point of the ranks' box meets all of ``atoms``
#   ("inside", 0 <= s < N)    an indirect subscript ``s`` (it reads an index tensor) lies
#                             inside its rank, so ``KC[PT[b, m // PG], ...]`` and
#                             ``VC[PT[b, m // PG], ...]`` are present at the same points
# A point is computed iff all atoms of its set hold.  Sets are compared as
# syntax: equal sets are provably the same points, a superset a subset of them.


class Capture(Exception):
    """A substitution would capture a variable bound by an ``exists`` atom."""


def atom_ranks(atom: tuple) -> frozenset[str]:
    """The free index variables of an atom."""
    if atom[0] == "exists":
        inner: frozenset[str] = frozenset()
        for a in atom[2]:
            inner |= atom_ranks(a)
        return inner - frozenset(atom[1])
    return free_ranks(atom[1])


def substitute_atom(atom: tuple, mapping: dict[str, Expr]) -> tuple:
    if atom[0] != "exists":
        return (atom[0], substitute(atom[1], mapping))
    inner = {k: v for k, v in mapping.items() if k not in atom[1]}
    if any(free_ranks(v) & set(atom[1]) for v in inner.values()):
        raise Capture
    return ("exists", atom[1], frozenset(substitute_atom(a, inner) for a in atom[2]))


def simplify(atoms: frozenset, scope) -> frozenset:
    """Drop the ``exists`` atoms that a point with ``scope``'s variables meets by itself:
    its ranks are in scope and its body is among the other atoms (take the point itself)."""
    atoms = frozenset(atoms)
    changed = True
    while changed:
        changed = False
        for a in atoms:
            if a[0] == "exists" and set(a[1]) <= set(scope) and a[2] <= atoms - {a}:
                atoms, changed = atoms - {a}, True
                break
    return atoms


def lift(atoms: frozenset, ranks) -> frozenset:
    """The atoms of 'some point over ``ranks`` is computed', from those of one point."""
    bound = set(ranks)
    free = frozenset(a for a in atoms if not atom_ranks(a) & bound)
    return free | {("exists", tuple(sorted(bound)), atoms - free)}


@dataclass
class Presence:
    """Presence conditions of the tensors of one definition (memoised)."""

    defn: Definition
    _memo: dict = field(default_factory=dict)

    def __post_init__(self):
        self.inputs = {a.name: a for a in self.defn.tensor_args}
        self.einsums = {st.tensor: st for st in self.defn.statements if isinstance(st, Einsum)}
        self.sizes = _let_sizes(self.defn)

    def size(self, rank: str) -> sympy.Expr:
        return self.sizes.get(rank, size_symbol(rank))

    def access(self, acc: Access, exclude: frozenset = frozenset()) -> frozenset:
        """When ``acc`` is present; reads of tensors in ``exclude`` count as always present."""
        if acc.tensor in exclude:
            return frozenset()
        if acc.tensor in self.inputs:
            arg = self.inputs[acc.tensor]
            outside = [(i, s) for i, s in enumerate(acc.subscripts) if not self.in_range(arg, i, s)]
            if outside and not all(_indirect(s) for _, s in outside):
                return frozenset({("read", acc)})
            return self.indirect(acc, arg, outside, exclude)
        if any(_indirect(s) for s in acc.subscripts):
            return frozenset({("read", acc)})  # where a computed tensor is absent is not known
        st = self.einsums.get(acc.tensor)
        if st is None:
            return frozenset({("read", acc)})
        try:
            own = self.statement(st, exclude)
            mapping = dict(zip(st.lhs, acc.subscripts))
            return frozenset(substitute_atom(a, mapping) for a in own)
        except Capture:
            return frozenset({("read", acc)})

    def indirect(self, acc: Access, arg: TensorArg, outside, exclude: frozenset) -> frozenset:
        """An input read whose only subscripts that may leave their ranks are indirect: present
        where the index elements it reads are and each such subscript lies inside its rank."""
        atoms = frozenset()
        for pos, sub in outside:
            rank = Size(arg.ranks[pos])
            atoms |= {("inside", Binary("and", Binary(">=", sub, Num(0)), Binary("<", sub, rank)))}
        for index in (n for s in acc.subscripts for n in walk(s) if isinstance(n, Access)):
            atoms |= self.access(index, exclude)
        return atoms

    def statement(self, st: Einsum, exclude: frozenset = frozenset()) -> frozenset:
        """When a point of ``st``'s left side is present, in its own index variables."""
        key = (st.tensor, exclude)
        if key not in self._memo:
            scope = frozenset(st.lhs)
            atoms = self.expr(st.expr, st.where, scope, exclude) | self.where(st.where, scope)
            self._memo[key] = simplify(atoms, scope)
        return self._memo[key]

    def point(self, st: Einsum, exclude: frozenset = frozenset()) -> frozenset:
        """When a point of a root reduction's full space (left side and reduced ranks) counts."""
        red = st.expr
        scope = frozenset(st.lhs) | frozenset(red.ranks)
        return self.inner(red.body, st.where, scope, exclude)

    def inner(self, body: Expr, where: Expr | None, scope: frozenset, exclude=frozenset()):
        return simplify(self.expr(body, where, scope, exclude) | self.where(where, scope), scope)

    def expr(self, e: Expr, where, scope: frozenset, exclude: frozenset) -> frozenset:
        if isinstance(e, Access):
            return self.access(e, exclude)
        if isinstance(e, Reduce):
            inner = scope | frozenset(e.ranks)
            return lift(self.inner(e.body, where, inner, exclude), e.ranks)
        out: frozenset = frozenset()
        for c in children(e):
            out |= self.expr(c, where, scope, exclude)
        return out

    def where(self, where: Expr | None, scope: frozenset) -> frozenset:
        if where is None or not free_ranks(where) <= scope:
            return frozenset()
        return frozenset(("where", c) for c in conjuncts(where))

    def in_range(self, arg: TensorArg, pos: int, sub: Expr) -> bool:
        """``i`` along a rank of i's size, or ``i // G`` along a rank of size I/G."""
        extent = self.size(arg.ranks[pos])
        if isinstance(sub, Index):
            return _same_size(self.size(sub.rank), extent)
        if isinstance(sub, Binary) and sub.op == "//" and isinstance(sub.left, Index):
            div = sub.right
            d = self.size(div.rank) if isinstance(div, Size) else (
                sympy.Integer(div.value) if isinstance(div, Num) and isinstance(div.value, int) else None)
            return d is not None and _same_size(self.size(sub.left.rank) / d, extent)
        if isinstance(sub, Binary) and sub.op == "%" and not free_ranks(sub.right):
            return sub.right == Size(arg.ranks[pos])  # floor modulo by N lies in [0, N)
        return affine_in_range(sub, extent, self.size)


def _nonnegative_symbols(x: sympy.Expr) -> sympy.Expr:
    """``x`` with its symbols (sizes) only known to be non-negative integers."""
    return x.subs({f: sympy.Symbol(f.name, integer=True, nonnegative=True)
                   for f in x.free_symbols})


def integer_sympy(e: Expr, size_of) -> sympy.Expr | None:
    """An integer subscript-like expression as sympy, every symbol a non-negative integer
    (index ``r`` as ``i_r``; a size through ``size_of``, its ``let`` value), ``//`` and
    ``%`` by a positive divisor as ``floor`` and ``Mod``; None for anything else."""
    if isinstance(e, Num) and isinstance(e.value, int):
        return sympy.Integer(e.value)
    if isinstance(e, Index):
        return sympy.Symbol(f"i_{e.rank}", integer=True, nonnegative=True)
    if isinstance(e, Size):
        return _nonnegative_symbols(size_of(e.rank))
    if isinstance(e, Unary) and e.op == "-":
        inner = integer_sympy(e.operand, size_of)
        return None if inner is None else -inner
    if isinstance(e, Binary) and e.op in ("+", "-", "*", "//", "%"):
        a, b = integer_sympy(e.left, size_of), integer_sympy(e.right, size_of)
        if a is None or b is None:
            return None
        if e.op in ("//", "%"):
            if not b.is_positive:
                return None
            return sympy.floor(a / b) if e.op == "//" else sympy.Mod(a, b)
        return {"+": a + b, "-": a - b, "*": a * b}[e.op]
    return None


def affine_in_range(sub: Expr, extent: sympy.Expr, size_of) -> bool:
    """``sub`` is ``c + i`` or ``c - i`` over one index ``i`` and lies in ``[0, extent)``
    for every ``i`` of its rank: a reversed read ``V[M - 1 - m, f]`` over ``m < M``, or a
    shift that fits.  Sizes count as non-negative integers (``size_of``: a rank's size
    through the ``let``s), so nothing relies on a size being positive."""
    ranks = free_ranks(sub)
    if len(ranks) != 1 or any(isinstance(n, Access) for n in walk(sub)):
        return False
    (r,) = ranks
    x = integer_sympy(sub, size_of)
    if x is None:
        return False
    i = sympy.Symbol(f"i_{r}", integer=True, nonnegative=True)
    x = sympy.expand(x)
    a = x.coeff(i)
    c = sympy.expand(x - a * i)
    if a not in (1, -1) or c.has(i):
        return False
    n, top = integer_sympy(Size(r), size_of), _nonnegative_symbols(extent) - 1
    low, high = (c, c + n - 1) if a == 1 else (c - n + 1, c)
    return bool(sympy.expand(low).is_nonnegative) and \
        bool(sympy.expand(top - high).is_nonnegative)


def _indirect(sub: Expr) -> bool:
    """A subscript that reads an index tensor (its value is known only at run time)."""
    return any(isinstance(n, Access) for n in walk(sub))


def _let_sizes(defn: Definition) -> dict[str, sympy.Expr]:
    out: dict[str, sympy.Expr] = {}
    for let in defn.lets:
        out[let.name] = let.value.subs({size_symbol(k): v for k, v in out.items()})
    return out


def _same_size(a: sympy.Expr, b: sympy.Expr) -> bool:
    return sympy.simplify(a - b) == 0


def varying(atoms: frozenset, ranks) -> frozenset:
    """The atoms that depend on ``ranks``."""
    return frozenset(a for a in atoms if atom_ranks(a) & set(ranks))


# ---------------------------------------------------------------------------
# The pass
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Term:
    """``sign * prod(num) / prod(den)``: one term of a distributed reduction body."""

    sign: int
    num: tuple[Expr, ...]
    den: tuple[Expr, ...] = ()

    def times(self, other: "Term") -> "Term":
        return Term(self.sign * other.sign, self.num + other.num, self.den + other.den)

    def negated(self) -> "Term":
        return Term(-self.sign, self.num, self.den)

    @property
    def expr(self) -> Expr:
        return multiply(list(self.num), list(self.den))


@dataclass(frozen=True)
class Expansion:
    """Terms of a body, with the single-use maps inlined to get them and their wheres."""

    terms: tuple[Term, ...]
    inlined: frozenset[str] = frozenset()
    wheres: tuple[Expr, ...] = ()

    def times(self, other: "Expansion") -> "Expansion":
        terms = tuple(a.times(b) for a, b in cartesian(self.terms, other.terms))
        return Expansion(terms, self.inlined | other.inlined, self.wheres + other.wheres)


@dataclass
class _Scope:
    """What one reduction's rewrite needs to know about the definition."""

    defn: Definition
    st: Einsum
    normalizers: frozenset[str]
    reads: dict[str, int]
    outputs: frozenset[str]

    @property
    def ranks(self) -> frozenset[str]:
        return frozenset(self.st.expr.ranks)

    def invariant(self, e: Expr) -> bool:
        return not free_ranks(e) & self.ranks

    def uses_all(self, body: Expr) -> bool:
        """A reduction's body must use every rank it reduces (a language rule)."""
        return self.ranks <= free_ranks(body)

    def normalizing(self, e: Expr) -> bool:
        """An invariant factor that reads a normalizer: what this pass moves out."""
        return self.invariant(e) and bool(accessed_tensors(e) & self.normalizers)

    def inlinable(self, e: Expr) -> Einsum | None:
        """The single-use map ``e`` reads, if it may be substituted into the body."""
        if not isinstance(e, Access) or e.tensor in self.outputs or self.reads.get(e.tensor) != 1:
            return None
        st = next((s for s in self.defn.statements if s.tensor == e.tensor), None)
        ok = isinstance(st, Einsum) and not any(isinstance(n, Reduce) for n in walk(st.expr))
        return st if ok and st is not self.st else None


def normalizers(defn: Definition, ranks: frozenset[str]) -> frozenset[str]:
    """Tensors that need (transitively) a reduction over one of ``ranks``."""
    g = dataflow_graph(defn)
    out: set[str] = set()
    for st in defn.statements:
        if is_reduction(st) and set(st.expr.ranks) & ranks and st.tensor in g:
            out |= {st.tensor} | set(nx.descendants(g, st.tensor))
    return frozenset(out)


def defer_normalization(defn: Definition) -> Definition:
    """Move invariant normalizers out of reductions until none is left (see module doc)."""
    defn = canonicalize(defn)
    for _ in range(len(defn.statements) + 1):
        rewritten = _defer_first(defn)
        if rewritten is None:
            break
        defn = rewritten
    return defn


def _defer_first(defn: Definition) -> Definition | None:
    reads = read_counts(defn)
    outputs = frozenset(o.name for o in defn.outputs)
    for st in defn.statements:
        if not is_reduction(st):
            continue
        scope = _Scope(defn, st, normalizers(defn, frozenset(st.expr.ranks)), reads, outputs)
        replacement = _defer_sum(scope) if st.expr.op == "sum" else _defer_extremum(scope)
        if replacement is not None:
            return _splice(defn, st, *replacement)
    return None


def _splice(defn: Definition, st: Einsum, new: list[Statement], dropped: frozenset[str]):
    statements: list[Statement] = []
    for s in defn.statements:
        if s is st:
            statements += new
        elif s.tensor not in dropped:
            statements.append(s)
    return dataclasses.replace(defn, statements=tuple(statements))


# --- sums -----------------------------------------------------------------------


def _defer_sum(scope: _Scope):
    """``sum(X * c / d)`` -> ``sum(X) * c / d``, distributing over +/- when needed."""
    body = scope.st.expr.body
    for distribute in (False, True):
        expansion = _expand(scope, body, distribute)
        if expansion is None or not _exposes_normalizer(scope, expansion.terms):
            continue
        if not all(scope.uses_all(_kept(scope, t).expr) for t in expansion.terms):
            continue  # a term with no factor over the reduced ranks cannot be summed alone
        if len(expansion.terms) > 1 and not _same_points(scope, expansion.terms):
            continue
        return _build_sum(scope, expansion), expansion.inlined
    return _defer_where(scope)


def _split_where(scope: _Scope, where: Expr | None) -> tuple[Expr | None, Expr | None]:
    """(the conjuncts that stay on the reduction, those that move to the map after it).
    A conjunct that does not depend on the reduced ranks but reads a normalizer filters
    whole output points; on the reduction it would make it wait for the normalizer (one
    more pass), on the map it filters the same points::

        RV[p,f] = sum[m](R[p,m] * V[m,f])   where D[p] > 0
        ->
        RV[p,f] = sum[m](R[p,m] * V[m,f]);   AV[p,f] = RV[p,f] / D[p]   where D[p] > 0

    (Every point ``(p, f, m)`` of a ``p`` where the conjunct fails is filtered, so the
    reduction's point ``(p, f)`` has no contribution: absent, as the map's filtered point.)"""
    stay, move = [], []
    for c in conjuncts(where):
        (move if scope.normalizing(c) else stay).append(c)
    return conjoin(*stay), conjoin(*move)


def _defer_where(scope: _Scope):
    """Only the ``where`` reads a normalizer: ``sum[m](X) where c[p]`` -> ``sum[m](X)``,
    then the map ``where c[p]`` (:func:`_split_where`)."""
    st = scope.st
    stay, move = _split_where(scope, st.where)
    if move is None or not scope.uses_all(st.expr.body):
        return None
    reduction = _reduction(scope, st.expr.body, stay, taken_names(scope.defn))
    return [reduction, Einsum(st.tensor, st.lhs, _use(reduction), move, loc=st.loc)], frozenset()


def _exposes_normalizer(scope: _Scope, terms) -> bool:
    return any(scope.normalizing(f) for t in terms for f in t.num + t.den)


def _expand(scope: _Scope, e: Expr, distribute: bool) -> Expansion | None:
    """The body as a sum of products (a single product unless ``distribute``)."""
    if distribute and isinstance(e, Binary) and e.op in ("+", "-"):
        left, right = _expand(scope, e.left, True), _expand(scope, e.right, True)
        if left is None or right is None:
            return None
        terms = right.terms if e.op == "+" else tuple(t.negated() for t in right.terms)
        return _capped(Expansion(left.terms + terms, left.inlined | right.inlined,
                                 left.wheres + right.wheres))
    if isinstance(e, Unary) and e.op == "-":
        inner = _expand(scope, e.operand, distribute)
        return inner and dataclasses.replace(inner, terms=tuple(t.negated() for t in inner.terms))
    if isinstance(e, Binary) and e.op == "*":
        left, right = _expand(scope, e.left, distribute), _expand(scope, e.right, distribute)
        return None if left is None or right is None else _capped(left.times(right))
    if isinstance(e, Binary) and e.op == "/":
        left = _expand(scope, e.left, distribute)
        return left and dataclasses.replace(
            left, terms=tuple(Term(t.sign, t.num, t.den + (e.right,)) for t in left.terms))
    inlined = _inline(scope, e, distribute)
    return inlined or Expansion((Term(1, (e,)),))


def _capped(x: Expansion) -> Expansion | None:
    return x if len(x.terms) <= MAX_TERMS else None


def _inline(scope: _Scope, e: Expr, distribute: bool) -> Expansion | None:
    """Expand the single-use map ``e`` reads, if that exposes a normalizer."""
    st = scope.inlinable(e)
    if st is None:
        return None
    mapping = dict(zip(st.lhs, e.subscripts))
    inner = _expand(scope, substitute(st.expr, mapping), distribute)
    if inner is None or not _exposes_normalizer(scope, inner.terms):
        return None
    wheres = inner.wheres + tuple(substitute(c, mapping) for c in conjuncts(st.where))
    return Expansion(inner.terms, inner.inlined | {st.tensor}, wheres)


def _same_points(scope: _Scope, terms) -> bool:
    """Every term is present at the same points of the reduced ranks."""
    presence = Presence(scope.defn)
    space = frozenset(scope.st.lhs) | scope.ranks
    sets = {varying(presence.inner(t.expr, scope.st.where, space), scope.ranks) for t in terms}
    return len(sets) == 1


def _build_sum(scope: _Scope, expansion: Expansion) -> list[Statement]:
    st = scope.st
    where, after = _split_where(scope, conjoin(st.where, *expansion.wheres))
    taken = taken_names(scope.defn)
    new: list[Statement] = []
    pieces: list[tuple[int, Expr]] = []
    for term in expansion.terms:
        reduction = _reduction(scope, _kept(scope, term).expr, where, taken)
        new.append(reduction)
        pieces.append((term.sign, _outside(scope, term, _use(reduction))))
    new.append(Einsum(st.tensor, st.lhs, signed_sum(pieces), after, loc=st.loc))
    return new


def _kept(scope: _Scope, term: Term) -> Term:
    """What stays inside the reduction: the factors over the reduced ranks."""
    return Term(1, tuple(f for f in term.num if not scope.invariant(f)),
                tuple(f for f in term.den if not scope.invariant(f)))


def _reduction(scope: _Scope, body: Expr, where: Expr | None, taken: set[str]) -> Einsum:
    st = scope.st
    used = free_ranks(body) | (free_ranks(where) if where is not None else frozenset())
    lhs = tuple(r for r in st.lhs if r in used)
    name = _reduction_name(body, taken, f"{st.tensor}_{st.expr.op}")
    return Einsum(name, lhs, Reduce(st.expr.op, st.expr.ranks, body), where, loc=st.loc)


def _use(st: Einsum) -> Access:
    return Access(st.tensor, tuple(Index(r) for r in st.lhs))


def _reduction_name(body: Expr, taken: set[str], fallback: str) -> str:
    """Named after the (one or two) tensors the body reads (SN*V -> SNV), else ``fallback``."""
    order: list[str] = []
    for n in walk(body):
        if isinstance(n, Access) and n.tensor not in order:
            order.append(n.tensor)
    name = "".join(order)
    if 0 < len(order) <= 2 and name not in taken and name != name.lower():
        taken.add(name)
        return name
    return fresh_name(fallback, taken)


def _outside(scope: _Scope, term: Term, use: Access) -> Expr:
    """The term's invariant factors around ``use``, which takes the first varying one's place."""
    factors: list[Expr] = []
    placed = False
    for f in term.num:
        if scope.invariant(f):
            factors.append(f)
        elif not placed:
            factors.append(use)
            placed = True
    if not placed:
        factors.insert(0, use)
    return multiply(factors, [d for d in term.den if scope.invariant(d)])


# --- max and min ----------------------------------------------------------------


def _flatten(e: Expr) -> Term:
    """A product/quotient tree as one term (no inlining, no distribution)."""
    if isinstance(e, Unary) and e.op == "-":
        return _flatten(e.operand).negated()
    if isinstance(e, Binary) and e.op == "*":
        return _flatten(e.left).times(_flatten(e.right))
    if isinstance(e, Binary) and e.op == "/":
        left = _flatten(e.left)
        return Term(left.sign, left.num, left.den + (e.right,))
    return Term(1, (e,))


def _defer_extremum(scope: _Scope):
    """``max(X + c)`` -> ``max(X) + c``; ``max(X * c)`` -> ``max(X) * c`` for c > 0."""
    st = scope.st
    terms = linear_terms(st.expr.body)
    out = [(s, t) for s, t in terms if scope.normalizing(t)]
    taken = taken_names(scope.defn)
    where, after = _split_where(scope, st.where)
    if out:
        keep = [(s, t) for s, t in terms if not scope.normalizing(t)]
        if not keep or not scope.uses_all(signed_sum(keep)):
            return None
        reduction = _reduction(scope, signed_sum(keep), where, taken)
        expr = signed_sum([(1, _use(reduction))] + out)
        return [reduction, Einsum(st.tensor, st.lhs, expr, after, loc=st.loc)], frozenset()
    term = _flatten(st.expr.body)
    moving = lambda f: scope.normalizing(f) and positive(f)  # noqa: E731
    if term.sign < 0 or not any(moving(f) for f in term.num + term.den):
        return _defer_where(scope)
    body = multiply([f for f in term.num if not moving(f)], [d for d in term.den if not moving(d)])
    if not scope.uses_all(body):
        return None
    reduction = _reduction(scope, body, where, taken)
    expr = multiply([_use(reduction)] + [f for f in term.num if moving(f)],
                    [d for d in term.den if moving(d)])
    return [reduction, Einsum(st.tensor, st.lhs, expr, after, loc=st.loc)], frozenset()
