"""``chunked``: causal, softmax-free sums with an associative state → the chunked algorithm.

A sum over keys ``m`` under a causal mask ``m <= p + D`` whose factors split into factors
of the query ``p``, factors of the key ``m``, and *decays* ``g(p, m)`` of the form
``exp(E)``, ``exp2(E)`` or ``base ** E`` with an exponent that separates additively,
``E = A(p) + B(m) + E0``, has an associative state: the keys before a point ``r`` reach
every later query through ``g(p, r)``, since ``g(p, m) = g(p, r) · h(m, r)`` with
``h(m, r) = kind(B(m) - B(r))`` free of ``p``.  The pass cuts the keys into chunks of
``C`` (``m = m1*M0 + m0``; a query's chunk is ``(p + D) // M0``) and writes

* the **state** ``S[m1]`` at each chunk's start, carried by an iterative rank over the
  chunks: ``S[m1+1] = h(m1*M0, (m1+1)*M0) · S[m1] + L[m1]``, ``L[m1] = sum[m0](h(m,
  (m1+1)*M0) · key factors)`` (with no decay, a plain running sum);
* the **intra-chunk** part: the source sum over the query's own chunk, quadratic in ``C``,
  under the source's mask;
* the **inter-chunk** part: query factors times ``g(p, start of its chunk)`` times the
  state there;

and the output is their sum (factors over the output's ranks only, a normaliser, applied
after).  The queries are cut into chunks as the keys are: the query at position
``m1*M0 + q0`` (its chunk ``m1``, its place ``q0``) is source row ``m1*M0 + q0 - D``, so a
chunk's queries read its keys and its state as whole tiles (matrix products on a GPU, not
a gather of keys per query), and a last map reads the queries back in their order,
``O[p] = O_chunks[(p + D) // M0, (p + D) % M0]``.  A map of the arguments the query
factors read (a feature map) is computed at those reads.  Every decay is taken relative
to a chunk start, so exponents are differences of
nearby positions (``gamma ** (M0 - m0)``, ``exp(CG[(m1+1)*M0] - CG[m1*M0 + m0])``) and
nothing overflows on long sequences where ``gamma ** -m`` would; a decay that reads a
causal running sum (GLA's cumulative log-gate ``CG[t] = sum[m](LG[m]) where m <= t``) reads
it through the chunk-local running sum ``CG_local[m1,m0]`` instead, since every difference
the chunked form takes lies within a chunk or across one chunk boundary
(``exp(CG_local[m1, M0 - 1] + CG_local[1 + m1, 0] - CG_local[m1,m0])``): the global sum,
which grows with the sequence and loses float32 precision, is not needed.  Before → after
(retention, ``C = 64``)::

    S[p,m] = sum[e](Q[p,e] * K[m,e] * gamma ** (p + M - P - m))   where m <= p + M - P
    O[p,f] = sum[m](S[p,m] * V[m,f])

    let M0 = 64
    let M1 = ceil(M/M0)
    let M0Q = M0
    K1[m1,m0,e] = K[m1 * M0 + m0, e] * gamma ** (M0 - m0)
    LKV[m1,e,f] = sum[m0](K1[m1,m0,e] * V[m1 * M0 + m0, f])
    SKV[0,e,f] = 0
    SKV[m1+1,e,f] = select(m1 > 0, gamma ** M0 * SKV[m1,e,f], 0) + LKV[m1,e,f]
    PKV[m1,e,f] = SKV[m1,e,f]                      # the state at chunk m1's start
    QK[m1,m0q,m0] = sum[e](Q[m1 * M0 + m0q + P - M, e] * K[m1 * M0 + m0, e])
    T[m0q,m0] = gamma ** (m0q - m0)   where m0 <= m0q
    QK1[m1,m0q,m0] = QK[m1,m0q,m0] * T[m0q,m0]
    O_intra[m1,m0q,f] = sum[m0](QK1[m1,m0q,m0] * V[m1 * M0 + m0, f])
    QPKV[m1,m0q,f] = sum[e](Q[m1 * M0 + m0q + P - M, e] * PKV[m1,e,f])
    O_inter[m1,m0q,f] = QPKV[m1,m0q,f] * gamma ** m0q
    O_chunks[m1,m0q,f] = O_intra[m1,m0q,f] + select(m1 > 0, O_inter[m1,m0q,f], 0)
    O[p,f] = O_chunks[(p + M - P) // M0, (p + M - P) % M0, f]

(the zero state before the first chunk is never multiplied: ``0 * inf`` would be NaN where
the source has Inf).  Each part's contraction order is the cheapest (``reassociate``'s planner).  A decay
``select(m == p + D, X, g)`` (RWKV's bonus for the current token) is ``g`` for every key
the state carries and the whole ``select`` in the intra-chunk part.

**When it applies** (``chunked_blockers`` says which condition fails, per statement): a
plain Einsum whose chain (inlined as ``reassociate`` inlines one) sums over ``m`` with
exactly one mask, ``m <= p + D`` with ``p`` an output rank and ``p + D <= M - 1`` for every
query (``D <= M - P``, as ``reassociate``'s chunked prefix form requires); every factor
reading ``p`` and ``m`` together is a decay as above (a map-defined tensor is looked
through); the base of a power reads neither; key factors (and decays) are present at
every in-bounds point, and a decay reads a tensor over the keys' positions only at the
key's or the query's own position (tensors of the query's own ranks at ``p``).  Then the two parts combine with ``+`` exactly where the
source is present (see ``reassociate``'s chunked form: the query's own key is in its
chunk, and the state is present from its zero init); a query with ``p + D < 0`` reads a
negative chunk, absent, as the source sums over no key; a chunk's places before the first
query or past the last read no query (absent), which no output reads.  A factor
``select(m < (p + D) // L * L, 1, 0)`` (the keys of earlier segments of a size ``L``,
Infini-attention's memory) fixes the chunk to ``L``: 1 for every key the state carries,
0 in the query's own chunk, so there is no intra-chunk part.

**Choosing C.** ``costs.form_cost`` (FLOPs plus a latency per sequential step) of each
chunk size in ``CHUNK_SIZES`` at the assumed sizes (``reassociate.assumed_sizes``); the
cheapest is kept when it is cheaper than the source.  ``chunk=`` forces a size.
``chunked_forms`` gives the recurrent (``C = 1``), chunked and quadratic forms' costs side
by side (``attnc report`` prints them).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

import sympy
from sympy.core.function import AppliedUndef

from ..einsum_ir.exprs import free_ranks, transform, walk
from ..einsum_ir.ir import (Access, Binary, Call, Definition, Einsum, Expr, Index,
                            IterativeEinsum, Num, Reduce, Size, SizeLet, Unary,
                            size_symbol)
from ..einsum_ir.printer import print_expr
from .canonicalize import canonicalize
from .costs import form_cost
from .defer_normalization import multiply
from .names import fresh_rank
from .reassociate import (CausalMask, Factor, Term, _affine, _extent, _fits, _in_bounds,
                          _Namer, _plain_einsum, _reads_total, _size_ir, as_term,
                          assumed_sizes, causal_mask, consumers, emit, expand, plan_term,
                          rename, replace_statement)

CHUNK_SIZES = (16, 32, 64, 128, 256)
# a decay per channel (RWKV's exp(-exp(WD[e]))) makes the intra-chunk part a product over
# the query, the key and the channel, held whole by a kernel: at 64, 64 x 64 x E spilled
# 10 KB per thread on sm_90 (flash-linear-attention's RWKV kernels use sub-chunks of 16)
CHANNEL_CHUNK_SIZES = (16,)
DECAY_FUNCS = ("exp", "exp2")


class NotChunkable(ValueError):
    """Why a statement has no chunked form (a precise, user-facing reason)."""


# ----------------------------------------------------------------------------
# Exponents as sympy: separating A(p) + B(m) + E0, substituting positions
# ----------------------------------------------------------------------------


class _Sym:
    """IR ↔ sympy for exponents: indices ``i_R``, sizes, tensor reads and calls as
    uninterpreted functions; anything else (parameters, float literals, comparisons) an
    opaque atom that must not read the query or key index."""

    def __init__(self):
        self.atoms: dict[sympy.Symbol, Expr] = {}
        self.funcs: dict[str, tuple[str, str]] = {}

    def to(self, e: Expr) -> sympy.Expr:
        if isinstance(e, Num) and isinstance(e.value, int):
            return sympy.Integer(e.value)
        if isinstance(e, Size):
            return size_symbol(e.rank)
        if isinstance(e, Index):
            return sympy.Symbol(f"i_{e.rank}", integer=True)
        if isinstance(e, Unary) and e.op == "-":
            return -self.to(e.operand)
        if isinstance(e, Binary) and e.op in ("+", "-", "*"):
            a, b = self.to(e.left), self.to(e.right)
            return {"+": a + b, "-": a - b, "*": a * b}[e.op]
        if isinstance(e, Access) and all(not isinstance(n, Access) for s in e.subscripts
                                         for n in walk(s)):
            return self._func("T", e.tensor)(*(self.to(s) for s in e.subscripts))
        if isinstance(e, Call) and e.fn != "select":
            return self._func("F", e.fn)(*(self.to(a) for a in e.args))
        return self.atom(e)

    def _func(self, kind: str, name: str):
        key = f"{kind}_{name}"
        self.funcs[key] = (kind, name)
        return sympy.Function(key)

    def atom(self, e: Expr) -> sympy.Symbol:
        """The symbol standing for the opaque ``e``."""
        for sym, known in self.atoms.items():
            if known == e:
                return sym
        sym = sympy.Symbol(f"atom_{len(self.atoms)}")
        self.atoms[sym] = e
        return sym

    def back(self, x: sympy.Expr) -> Expr:
        """The IR of a sympy expression built from this converter's symbols."""
        if x.is_Integer:
            return Num(int(x)) if x >= 0 else Unary("-", Num(int(-x)))
        if x.is_Rational:
            return Binary("/", self.back(x.p), Num(int(x.q)))
        if isinstance(x, sympy.Symbol):
            return self._symbol(x)
        if isinstance(x, AppliedUndef):
            kind, name = self.funcs[str(x.func)]
            args = tuple(self.back(a) for a in x.args)
            return Access(name, args) if kind == "T" else Call(name, args)
        if isinstance(x, sympy.Add):
            return self._sum(x)
        if isinstance(x, sympy.Mul):
            return self._product(x)
        if isinstance(x, sympy.Pow) and x.exp.is_Integer and x.exp > 0:
            return Binary("**", self.back(x.base), Num(int(x.exp)))
        raise NotChunkable(f"cannot write {x} back as an expression")  # not reached from IR

    def _symbol(self, x: sympy.Symbol) -> Expr:
        if x in self.atoms:
            return self.atoms[x]
        name = str(x)
        return Index(name[2:]) if name.startswith("i_") else Size(name)

    def _sum(self, x: sympy.Add) -> Expr:
        terms = sorted(x.args, key=lambda t: (t.could_extract_minus_sign(),
                                              sympy.default_sort_key(t)))
        out = None
        for t in terms:
            negative = t.could_extract_minus_sign()
            node = self.back(-t if negative else t)
            if out is None:
                out = Unary("-", node) if negative else node
            else:
                out = Binary("-" if negative else "+", out, node)
        return out

    def _product(self, x: sympy.Mul) -> Expr:
        coeff, rest = x.as_coeff_Mul()
        if coeff < 0:
            return Unary("-", self.back(-x))
        num, den = [], []
        for f in sympy.Mul.make_args(rest):
            if f.is_Pow and f.exp.is_Integer and f.exp < 0:
                den.append(self.back(f.base ** -f.exp))
            else:
                num.append(self.back(f))
        if coeff != 1:
            num.insert(0, self.back(sympy.Integer(coeff.p)))
            if coeff.q != 1:
                den.append(Num(int(coeff.q)))
        return multiply(num, den)


def _mentions(x: sympy.Expr, sym: sympy.Symbol) -> bool:
    return sym in x.free_symbols


@dataclass(frozen=True)
class Decay:
    """A factor ``kind(E)`` (``exp``, ``exp2``, or ``pow`` with ``base``) whose exponent is
    ``query + key``: ``query`` free of ``m`` (E0 included), ``key`` a function of ``m`` only."""

    kind: str
    base: Expr | None
    query: sympy.Expr
    key: sympy.Expr
    sym: _Sym
    source: Expr
    diagonal: Expr | None = None  # select(m == p + D, diagonal, decay): the current key's value

    def of(self, exponent: sympy.Expr) -> Expr:
        x = sympy.expand(exponent)
        # one coefficient per tensor read or call: (start + m0 + 1 - p) * w, not
        # start*w + m0*w + w - p*w, whose large terms cancel in floating point
        x = sympy.collect(x, sorted(x.atoms(AppliedUndef), key=sympy.default_sort_key))
        power = self.sym.back(x)
        if self.kind == "pow":
            return Binary("**", self.base, power)
        return Call(self.kind, (power,))


def _decay(f: Factor, p: str, m: str, offset: sympy.Expr, defn: Definition) -> Decay:
    """``f`` as a decay, or NotChunkable with the reason.  ``select(m == p + D, X, decay)``
    (a bonus for the query's own key, RWKV's) is the decay everywhere but on the diagonal,
    which only the intra-chunk part reaches."""
    e = _look_through(f.expr, defn)
    text = print_expr(f.expr)
    if f.role != "mul":
        raise NotChunkable(f"the factor {text} reads {p.lower()} and {m.lower()} and divides")
    if isinstance(e, Call) and e.fn == "select" and _diagonal(e.args[0], p, m, offset):
        if {p, m} & free_ranks(e.args[1]) or not _reads_total(defn, e.args[1]):
            raise NotChunkable(f"the diagonal value {print_expr(e.args[1])} of {text} reads "
                               f"{p.lower()} or {m.lower()}, or may be absent")
        inner = _decay(Factor.of(e.args[2], "mul"), p, m, offset, defn)
        return dataclasses.replace(inner, diagonal=e.args[1], source=f.expr)
    if isinstance(e, Call) and e.fn in DECAY_FUNCS and len(e.args) == 1:
        kind, base, power = e.fn, None, e.args[0]
    elif isinstance(e, Binary) and e.op == "**":
        kind, base, power = "pow", e.left, e.right
        if {p, m} & free_ranks(base):
            raise NotChunkable(f"the base of {text} reads {p.lower()} or {m.lower()}")
    else:
        raise NotChunkable(
            f"the factor {text} reads {p.lower()} and {m.lower()} together and is not a decay "
            f"exp(A({p.lower()}) + B({m.lower()})), exp2(...) or base ** (...)")
    sym = _Sym()
    ip, im = sympy.Symbol(f"i_{p}", integer=True), sympy.Symbol(f"i_{m}", integer=True)
    exponent = sympy.expand(sym.to(power))
    for atom, ir in sym.atoms.items():
        if {p, m} & free_ranks(ir):
            raise NotChunkable(f"the exponent of {text} reads {p.lower()} or {m.lower()} inside "
                               f"{print_expr(ir)}, which cannot be separated")
    query, key = sympy.Integer(0), sympy.Integer(0)
    for t in sympy.Add.make_args(exponent):
        if _mentions(t, ip) and _mentions(t, im):
            raise NotChunkable(f"the exponent of {text} has the term {print_expr(sym.back(t))} "
                               f"reading both "
                               f"{p.lower()} and {m.lower()}: it does not separate as "
                               f"A({p.lower()}) + B({m.lower()})")
        if _mentions(t, im):
            key += t
        else:
            query += t
    return Decay(kind, base, query, key, sym, f.expr)


def _diagonal(cond: Expr, p: str, m: str, offset: sympy.Expr) -> bool:
    """Whether ``cond`` is ``m == p + offset`` (either side)."""
    if not (isinstance(cond, Binary) and cond.op == "=="):
        return False
    a, b = _affine(cond.left), _affine(cond.right)
    if a is None or b is None:
        return False
    ip, im = sympy.Symbol(f"i_{p}", integer=True), sympy.Symbol(f"i_{m}", integer=True)
    diff = sympy.expand(a - b)
    want = im - ip - offset
    return sympy.expand(diff - want) == 0 or sympy.expand(diff + want) == 0


def _look_through(e: Expr, defn: Definition) -> Expr:
    """A plain access of a tensor defined by a plain map (no reduction, no where) at its own
    indices: that map's expression, renamed to the access's subscripts."""
    if not (isinstance(e, Access) and all(isinstance(s, Index) for s in e.subscripts)):
        return e
    st = _plain_einsum(defn, e.tensor)
    if st is None or st.where is not None or any(isinstance(n, Reduce) for n in walk(st.expr)):
        return e
    return rename(st.expr, {r: s.rank for r, s in zip(st.lhs, e.subscripts)})


def _decay_reads_total(defn: Definition, decay: Decay, p: str, m: str,
                       offset: sympy.Expr) -> str | None:
    """Why a decay might be absent where the chunked form evaluates it, or None."""
    ip, im = sympy.Symbol(f"i_{p}", integer=True), sympy.Symbol(f"i_{m}", integer=True)
    at = {"query": ip + offset, "key": im}
    for part, x in (("query", decay.query), ("key", decay.key)):
        for call in x.atoms(AppliedUndef):
            kind, name = decay.sym.funcs[str(call.func)]
            if kind != "T":
                continue
            acc = decay.sym.back(call)
            dims = defn.tensor_ranks(name)
            for s, d, arg in zip(acc.subscripts, dims, call.args):
                plain = isinstance(s, Index) and _extent(defn, s.rank) == _extent(defn, d)
                if part == "query" and plain:
                    continue  # read at the query's own p in every part
                if _mentions(arg, ip if part == "query" else im):
                    if sympy.expand(arg - at[part]) != 0:
                        return (f"{print_expr(acc)} in {print_expr(decay.source)} is read at "
                                f"another place than the {part}'s position")
                    if _extent(defn, d) != _extent(defn, m):
                        return (f"{print_expr(acc)} in {print_expr(decay.source)} reads rank "
                                f"{d} at a key's position: its extent need not be {m}'s")
                elif not plain:
                    return f"{print_expr(acc)} in {print_expr(decay.source)} may read out of bounds"
            if not _total(defn, name):
                return (f"{name}, read by {print_expr(decay.source)}, may be absent at some "
                        f"position")
    for atom in decay.sym.atoms.values():
        if any(isinstance(n, Access) for n in walk(atom)) and not _reads_total(defn, atom):
            return f"{print_expr(atom)} in {print_expr(decay.source)} may be absent"
    return None


def _total(defn: Definition, name: str) -> bool:
    """Present at every in-bounds point: ``reassociate.is_total``, or a causal running sum
    ``sum[m](X) where m <= t + d`` (``d >= 0``) of total factors, which the key ``m = 0``
    makes present at every ``t``."""
    if any(a.name == name for a in defn.tensor_args):
        return True
    st = _plain_einsum(defn, name)
    if st is None:
        return False
    if st.where is None:
        return _reads_total(defn, st.expr)
    if not isinstance(st.expr, Reduce) or st.expr.op != "sum":
        return False
    mask = causal_mask(st.where, st.lhs, st.expr.ranks)
    return (mask is not None and bool(sympy.sympify(mask.offset).is_nonnegative)
            and _extent(defn, mask.m) == _extent(defn, mask.p)  # a t exists: so does m = 0
            and _reads_total(defn, st.expr.body))


def _running_sum(defn: Definition, name: str, m: str) -> Einsum | None:
    """``name``'s statement when it is ``T[t] = sum[n](X) where n <= t`` over the extent of
    the keys ``m`` (GLA's cumulative log-gate), with ``X`` total."""
    st = _plain_einsum(defn, name)
    if st is None or st.where is None or len(st.lhs) != 1 or not isinstance(st.expr, Reduce):
        return None
    if st.expr.op != "sum" or len(st.expr.ranks) != 1:
        return None
    mask = causal_mask(st.where, st.lhs, st.expr.ranks)
    if mask is None or sympy.sympify(mask.offset) != 0:
        return None
    if not (_extent(defn, mask.p) == _extent(defn, m) == _extent(defn, mask.m)):
        return None
    return st if _reads_total(defn, st.expr.body) else None


# ----------------------------------------------------------------------------
# Recognising a chunkable term
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Causal:
    """A term split for chunking: query ``p``, key ``m``, ``p + offset`` the query's position."""

    term: Term
    p: str
    m: str
    offset: sympy.Expr
    query: tuple[Factor, ...]  # read p, not m, and some rank the output does not have
    outer: tuple[Factor, ...]  # read p and output ranks only: applied to the sum (a normaliser)
    key: tuple[Factor, ...]  # read m (not p), or neither
    decays: tuple[Decay, ...]
    segment: str | None = None  # select(m < (p + D) // L * L, 1, 0): keys of earlier segments only


def recognise(defn: Definition, st: Einsum) -> tuple[Causal, tuple[str, ...]]:
    """The chunkable term of ``st`` and the tensors it inlines; NotChunkable says why not."""
    term = as_term(st)
    if term is None:
        op = st.expr.op if isinstance(st.expr, Reduce) else "map"
        raise NotChunkable(f"a {op}, not a sum of products: no state of sums carries it")
    term, inlined = expand(term, defn)
    mask = _causal(term, defn)
    p, m = mask.p, mask.m
    if not _fits(defn, mask):
        raise NotChunkable(f"a query's position {p.lower()} + {mask.offset} may lie past the last "
                           f"key (needs {mask.offset} <= {m} - {p})")
    query, outer, key, decays, segments = [], [], [], [], []
    for f in term.factors:
        if f.role == "mask":
            continue
        if p in f.ranks and m in f.ranks and _segment(f, p, m, mask.offset) is not None:
            segments.append(_segment(f, p, m, mask.offset))
        elif p in f.ranks and m in f.ranks:
            decays.append(_decay(f, p, m, mask.offset, defn))
        elif p in f.ranks and f.ranks <= set(term.out):
            outer.append(f)
        elif p in f.ranks:
            query.append(f)
        else:
            key.append(f)
    if not any(isinstance(n, Access) and _in_bounds(defn, n) and Index(m) in n.subscripts
               for f in key for n in walk(f.expr)):
        raise NotChunkable(f"no factor reads {m.lower()} as a plain in-bounds subscript")
    for f in key:
        if not _reads_total(defn, f.expr):
            raise NotChunkable(f"the key factor {print_expr(f.expr)} may be absent at an "
                               f"in-bounds key")
    for d in decays:
        why = _decay_reads_total(defn, d, p, m, mask.offset)
        if why is not None:
            raise NotChunkable(why)
    if len(set(segments)) > 1:
        raise NotChunkable(f"keys of earlier segments of {' and '.join(sorted(set(segments)))}: "
                           f"one chunk size cannot be both")
    return (Causal(term, p, m, mask.offset, tuple(query), tuple(outer), tuple(key),
                   tuple(decays), segments[0] if segments else None), inlined)


def _segment(f: Factor, p: str, m: str, offset: sympy.Expr) -> str | None:
    """``L`` when ``f`` is ``select(m < (p + D) // L * L, 1, 0)`` (the keys of the query's
    earlier segments of a size ``L``, Infini-attention's compressive memory) with ``p + D``
    the causal mask's query position; else None."""
    e = f.expr
    if not (isinstance(e, Call) and e.fn == "select" and e.args[1:] == (Num(1), Num(0))):
        return None
    cond = e.args[0]
    if not (isinstance(cond, Binary) and cond.op == "<" and _affine(cond.left) is not None
            and sympy.expand(_affine(cond.left) - sympy.Symbol(f"i_{m}", integer=True)) == 0):
        return None
    start = cond.right  # (p + D) // L * L
    if not (isinstance(start, Binary) and start.op == "*" and isinstance(start.right, Size)
            and isinstance(start.left, Binary) and start.left.op == "//"
            and start.left.right == start.right):
        return None
    at = _affine(start.left.left)
    if at is None or sympy.expand(at - sympy.Symbol(f"i_{p}", integer=True) - offset) != 0:
        return None
    return start.right.rank


def _conjuncts(e: Expr) -> list[Expr]:
    if isinstance(e, Binary) and e.op == "and":
        return _conjuncts(e.left) + _conjuncts(e.right)
    return [e]


def _causal(term: Term, defn: Definition) -> CausalMask:
    """The term's one causal mask ``m <= p + D``; NotChunkable says what else is there."""
    conds = [c for f in term.factors if f.role == "mask" for c in _conjuncts(f.expr)]
    found = [(c, causal_mask(c, term.out, term.summed)) for c in conds]
    causal = [(c, k) for c, k in found if k is not None]
    if not causal:
        if any(causal_mask(c, term.out, term.out) for c in conds):
            raise NotChunkable("it keeps both the query and the key rank: the sum over keys is "
                               "in a statement that reads it")
        _coupling_reason(term, defn)
        what = " and ".join(print_expr(c) for c in conds)
        raise NotChunkable(f"the mask {what} is no causal m <= p + D over its sum" if conds else
                           "no mask on its sum: not causal")
    cond, mask = causal[0]
    others = [c for c in conds if c != cond]
    if others:
        raise NotChunkable(f"besides the causal {print_expr(cond)}, the mask has "
                           + " and ".join(print_expr(c) for c in others)
                           + ", which no state over chunks carries")
    return mask


def _coupling_reason(term: Term, defn: Definition) -> None:
    """A factor over the query and the key of a causal mask upstream (softmax's
    ``SN[p,m] = exp(QK[p,m] - GM[p])`` under ``QK``'s mask): raise why it is no decay."""
    for f in term.factors:
        for cond in _upstream_wheres(defn, f.expr):
            mask = causal_mask(cond, tuple(free_ranks(cond)), tuple(free_ranks(cond)))
            if (f.role != "mask" and mask is not None and {mask.p, mask.m} <= f.ranks
                    and mask.p in term.out and mask.m in term.summed):
                _decay(f, mask.p, mask.m, sympy.Integer(0), defn)


def _upstream_wheres(defn: Definition, e: Expr, depth: int = 4) -> list[Expr]:
    """The ``where`` conditions of the statements ``e`` reads, transitively (a few levels)."""
    out: list[Expr] = []
    for n in walk(e):
        if isinstance(n, Access) and depth > 0:
            for st in defn.definitions_of(n.tensor):
                out += _conjuncts(st.where) if st.where is not None else []
                out += _upstream_wheres(defn, st.expr, depth - 1)
    return out


def _survey(defn: Definition) -> tuple[list[str], dict[str, str], set[str]]:
    """(chunkable sums, why each other sum is not, the tensors the chunkable ones inline)."""
    defn = canonicalize(defn)
    ok, why, inlined = [], {}, set()
    for name in consumers(defn):
        st = _plain_einsum(defn, name)
        if st is None or not any(isinstance(n, Reduce) for n in walk(st.expr)):
            continue
        try:
            inlined |= set(recognise(defn, st)[1])
            ok.append(name)
        except NotChunkable as err:
            why[name] = str(err)
    return ok, why, inlined


def chunkable_sums(defn: Definition) -> list[str]:
    """The statements whose sums have a chunked form."""
    return _survey(defn)[0]


def chunked_blockers(defn: Definition) -> list[str]:
    """Why each sum the pass leaves as it is has no chunked form, ``NAME: reason`` (a sum
    inlined into a chunkable one is not left); empty when every sum has one."""
    ok, why, inlined = _survey(defn)
    if not ok and not why:
        return ["no statement sums: nothing to chunk"]
    return [f"{name}: {reason}" for name, reason in why.items() if name not in inlined]


# ----------------------------------------------------------------------------
# The chunked form of one term
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunks:
    """Keys cut into ``count`` chunks of ``size``: ``m = m1*M0 + m0``."""

    size: str  # M0, the chunk size C
    count: str  # M1 = ceil(M / M0)
    key: str  # m0 (the size's own rank)

    def start(self) -> Expr:
        """Chunk ``m1``'s first key, ``m1 * M0``."""
        return Binary("*", Index(self.count), Size(self.size))


class _Form:
    """Builds the chunked form of a recognised term (see the module docstring)."""

    def __init__(self, c: Causal, ch: Chunks, sizes: Mapping[str, float], namer: _Namer,
                 defn: Definition):
        self.c, self.ch, self.sizes, self.namer, self.defn = c, ch, dict(sizes), namer, defn
        self.lets: list[SizeLet] = []  # ranks the local running sums add
        self.locals: dict[str, Einsum] = {}  # running sum read by a decay -> its chunk-local sum
        self.looked: set[str] = set()  # maps the query factors compute at their reads
        self.ip = sympy.Symbol(f"i_{c.p}", integer=True)
        self.im = sympy.Symbol(f"i_{c.m}", integer=True)
        self.ij = sympy.Symbol(f"i_{ch.key}", integer=True)
        block = sympy.Symbol(f"i_{ch.count}", integer=True) * size_symbol(ch.size)
        self.block, self.next = block, block + size_symbol(ch.size)  # chunk m1's start, m1+1's
        # the queries chunk-major, like the keys: the query at position m1*M0 + q0 (its
        # chunk m1, its place q0) is row m1*M0 + q0 - D of the source
        self.query = fresh_rank(f"{ch.size}Q", namer.taken)
        namer.taken.add(self.query)
        self.lets.append(SizeLet(self.query, size_symbol(ch.size)))
        self.sizes[self.query] = self.sizes[ch.size]
        self.iq = sympy.Symbol(f"i_{self.query}", integer=True)
        self.chunk = Index(ch.count)  # the query's chunk
        self.start_at = ch.start()  # its chunk's start
        self.offset_at = Index(self.query)  # its place in the chunk
        self.position = Binary("+", self.start_at, self.offset_at)  # its position p + D
        self.row = _size_ir(self.position, -c.offset)  # its source row p
        prank = frozenset(c.term.out).union(*(f.ranks for f in c.query + c.outer))
        prank |= frozenset().union(*(self._ranks(d, d.query) for d in c.decays))
        halves = frozenset().union(*(self._ranks(d, d.key) for d in c.decays))
        mrank = frozenset().union(*(f.ranks for f in c.key)) | halves
        mrank -= {c.m}
        self.state = tuple(r for r in c.term.ranks if r in mrank and (r in prank or r in halves))
        self.private = tuple(r for r in c.term.ranks if r in mrank and r not in self.state)
        self.base = "".join(n.tensor for f in c.key for n in walk(f.expr)
                            if isinstance(n, Access))[:12] or "T"

    def _ranks(self, d: Decay, x: sympy.Expr) -> frozenset[str]:
        names = {str(s)[2:] for s in x.free_symbols if str(s).startswith("i_")}
        for s in x.free_symbols:
            if s in d.sym.atoms:
                names |= free_ranks(d.sym.atoms[s])
        return frozenset(names) - {self.c.p, self.c.m}

    def _query_decay(self, d: Decay, key: sympy.Expr) -> Expr:
        """``kind(A(p) + E0 + B(key))``: the decay from ``key`` (in the query's chunk) to
        the query, the query at ``p = m1*M0 + q0 - D``."""
        m1 = sympy.Symbol(f"i_{self.ch.count}", integer=True)
        at = self.block + self.iq
        query = d.query.subs(self.ip, at - self.c.offset)
        places = [(at, m1, self.iq), (self.block, m1, sympy.Integer(0)),
                  (self.block + self.ij, m1, self.ij)]
        return d.of(self._local(d, query + d.key.subs(self.im, key), places))

    def _key_decay(self, d: Decay, key: sympy.Expr, ref: sympy.Expr) -> Expr:
        """``kind(B(key) - B(ref))``: the decay from ``key`` (in chunk ``m1``) to the later
        position ``ref`` (the next chunk's start)."""
        m1 = sympy.Symbol(f"i_{self.ch.count}", integer=True)
        places = [(self.block, m1, sympy.Integer(0)), (self.block + self.ij, m1, self.ij),
                  (self.next, m1 + 1, sympy.Integer(0))]
        return d.of(self._local(d, d.key.subs(self.im, key) - d.key.subs(self.im, ref), places))

    def _local(self, d: Decay, x: sympy.Expr, places) -> sympy.Expr:
        """``x`` with every read ``CG[pos]`` of a causal running sum ``CG[t] = sum[n](X[n])
        where n <= t`` written chunk-locally: ``CG[c*M0 + o] = CL[c, o] + PRE[c]`` with
        ``CL`` the running sum within chunk ``c`` and ``PRE[c+1] = PRE[c] + CL[c, M0-1]``.
        The exponents are differences of positions in one chunk or the next, so ``PRE``
        cancels and what is left is sums of a chunk's own gates (float32 keeps them: the
        global ``CG`` grows with the sequence).  ``x`` as it is when ``PRE`` does not cancel."""
        m1 = sympy.Symbol(f"i_{self.ch.count}", integer=True)
        swap = {}
        for call in x.atoms(AppliedUndef):
            kind, name = d.sym.funcs[str(call.func)]
            local = self._local_sum(name) if kind == "T" and len(call.args) == 1 else None
            at = [(c, o) for pos, c, o in places if sympy.expand(call.args[0] - pos) == 0]
            if local is None or not at:
                continue
            (chunk, offset), = at[:1]
            d.sym.funcs[f"T_{local}"] = ("T", local)
            swap[call] = (sympy.Function(f"T_{local}")(chunk, offset)
                          + sympy.Function(f"PRE_{name}")(chunk))
        if not swap:
            return x
        out = sympy.expand(x.xreplace(swap))
        for name in {str(c.func)[4:] for c in out.atoms(AppliedUndef)
                     if str(c.func).startswith("PRE_")}:
            pre = sympy.Function(f"PRE_{name}")
            local = sympy.Function(f"T_{self.locals[name].tensor}")
            last = size_symbol(self.ch.size) - 1
            out = sympy.expand(out.xreplace({pre(m1 + 1): pre(m1) + local(m1, last)}))
        if any(str(c.func).startswith("PRE_") for c in out.atoms(AppliedUndef)):
            return x
        return out

    def _local_sum(self, name: str) -> str | None:
        """The chunk-local running sum of ``name`` (made once), or None if ``name`` is no
        causal running sum over the keys' positions."""
        if name not in self.locals:
            st = _running_sum(self.defn, name, self.c.m)
            if st is None:
                return None
            (n,) = st.expr.ranks
            k = fresh_rank(f"{self.ch.size}K", self.namer.taken)
            self.lets.append(SizeLet(k, size_symbol(self.ch.size)))
            at = Binary("+", self.ch.start(), Index(k))
            body = rename(st.expr.body, {n: at})
            self.locals[name] = Einsum(self.namer.fresh(f"{name}_local"),
                                       (self.ch.count, self.ch.key), Reduce("sum", (k,), body),
                                       Binary("<=", Index(k), Index(self.ch.key)), loc=st.loc)
        return self.locals[name].tensor

    def _keys(self, fs, at: Expr) -> list[Factor]:
        return [Factor.of(rename(f.expr, {self.c.m: at}), f.role) for f in fs]

    def out(self) -> tuple[str, ...]:
        """The source's output ranks with the query ``p`` as ``(m1, q0)``."""
        return tuple(x for r in self.c.term.out
                     for x in ((self.ch.count, self.query) if r == self.c.p else (r,)))

    def _queries(self) -> list[Factor]:
        """The query factors at ``p = m1*M0 + q0 - D``, a map of the arguments (a feature
        map ``FQ[p,e] = phi(Q[p,e])``) computed at its read: read chunk-major, a tensor
        made in the order of ``p`` would cost a second pass over the queries."""
        def inline(n: Expr) -> Expr | None:
            if isinstance(n, Access):
                inner = _look_through(n, self.defn)
                if inner is n:
                    return None
                self.looked.add(n.tensor)  # removed where no longer read
                return transform(inner, inline)
            return None
        return [Factor.of(rename(transform(f.expr, inline), {self.c.p: self.row}), f.role)
                for f in self.c.query]

    def intra(self) -> Term:
        """The query's own chunk: ``m = start + m0 <= p + D``, that is ``m0 <= q0``, quadratic."""
        at = Binary("+", self.start_at, Index(self.ch.key))
        summed = (self.ch.key,) + tuple(r for r in self.c.term.summed if r != self.c.m)
        fs = self._queries() + self._keys(self.c.key, at)
        fs += [self._intra_decay(d) for d in self.c.decays]
        fs.append(Factor.of(Binary("<=", Index(self.ch.key), self.offset_at), "mask"))
        return Term(self.out(), summed, tuple(fs))

    def _intra_decay(self, d: Decay) -> Factor:
        f = self._query_decay(d, self.block + self.ij)
        if d.diagonal is not None:
            on = Binary("==", Index(self.ch.key), self.offset_at)
            f = Call("select", (on, d.diagonal, f))
        return Factor.of(f, "mul")

    def local(self) -> Term:
        """Chunk ``m1``'s keys, decayed to the next chunk's start."""
        at = Binary("+", self.ch.start(), Index(self.ch.key))
        fs = self._keys(self.c.key, at)
        fs += [Factor.of(self._key_decay(d, self.block + self.ij, self.next), "mul")
               for d in self.c.decays]
        return Term((self.ch.count,) + self.state, (self.ch.key,) + self.private, tuple(fs))

    def inter(self, prefix: str) -> Term:
        """The chunks before the query's: the state at its chunk's start, decayed to it."""
        read = Access(prefix, (self.chunk,) + tuple(Index(r) for r in self.state))
        fs = self._queries() + [Factor.of(self._query_decay(d, self.block), "mul")
                                for d in self.c.decays]
        summed = tuple(r for r in self.c.term.summed if r != self.c.m and r not in self.private)
        return Term(self.out(), summed, tuple(fs) + (Factor.of(read, "mul"),))

    def chunk_decay(self) -> Expr | None:
        out = None
        for d in self.c.decays:
            f = self._key_decay(d, self.block, self.next)
            out = f if out is None else Binary("*", out, f)
        return out

    def statements(self, name: str, lhs: tuple[str, ...], loc) -> list:
        local, state, prefix = (self.namer.fresh(f"{k}{self.base}") for k in "LSP")
        idx = (Index(self.ch.count),) + tuple(Index(r) for r in self.state)
        slhs = (self.ch.count,) + self.state
        out = self._emit(self.local(), local, loc)
        # the zero state before the first chunk is no value of the source: it is never
        # multiplied (a decay or a query factor that is Inf would make 0 * inf = NaN), only
        # added to (0 + x is x, Inf and NaN included)
        carried: Expr = Access(state, idx)
        decay = self.chunk_decay()
        if decay is not None:
            first = Binary(">", Index(self.ch.count), Num(0))
            carried = Call("select", (first, Binary("*", decay, carried), Num(0)))
        out += [IterativeEinsum(state, slhs, self.ch.count, True, Num(0), loc=loc),
                IterativeEinsum(state, slhs, self.ch.count, False,
                                Binary("+", carried, Access(local, idx)), loc=loc),
                Einsum(prefix, slhs, Access(state, idx), loc=loc)]
        intra, inter = self.namer.fresh(f"{name}_intra"), self.namer.fresh(f"{name}_inter")
        if self.c.segment is None:  # (a sum over earlier segments has none in its own chunk)
            out += self._emit_intra(intra, loc)
        out += self._emit(self.inter(prefix), inter, loc)
        read = {n.tensor for st in out for e in (st.expr, st.where) if e is not None
                for n in walk(e) if isinstance(n, Access)}
        out = [st for st in self.locals.values() if st.tensor in read] + out
        major = self.out()
        subs = tuple(Index(r) for r in major)
        before = Call("select", (Binary(">", self.chunk, Num(0)), Access(inter, subs), Num(0)))
        both = self.namer.fresh(f"{name}_chunks")
        value = before if self.c.segment is not None else Binary("+", Access(intra, subs), before)
        out.append(Einsum(both, major, value, loc=loc))
        total: Expr = Access(both, self._relabel())
        for f in self.c.outer + self.c.term.coefficients:
            total = Binary("*" if f.role == "mul" else "/", total, f.expr)
        return out + [Einsum(name, lhs, total, loc=loc)]

    def _relabel(self) -> tuple[Expr, ...]:
        """The source's query ``p`` read chunk-major: ``[(p + D) // M0, (p + D) % M0]``."""
        at = _size_ir(Index(self.c.p), self.c.offset)
        size = Size(self.ch.size)
        return tuple(x for r in self.c.term.out
                     for x in ((Binary("//", at, size), Binary("%", at, size))
                               if r == self.c.p else (Index(r),)))

    def _emit_intra(self, root: str, loc) -> list:
        """The intra-chunk part in attention's order: a chunk's scores first, from the
        factors without an output rank of their own (queries, keys, decays, the mask),
        then their sum with the rest (the values) over the chunk's keys.  Before → after
        (causal linear attention's normaliser; the cheapest order by FLOPs would sum the
        keys first, a masked three-rank reduction that no matrix unit runs)::

            N[m1,q] = sum[e,m0](FQ[..q..,e] * FK[..m0..,e])   where m0 <= q
        ->  S[m1,q,m0] = sum[e](FQ[..q..,e] * FK[..m0..,e])   where m0 <= q
            N[m1,q] = sum[m0](S[m1,q,m0])
        """
        term = self.intra()
        queried = frozenset().union(*(f.ranks for f in self._queries()))
        own = set(term.out) - queried - {self.ch.count, self.query}  # the values' f
        values = [f for f in term.factors if f.ranks & own]
        scores = [f for f in term.factors if not f.ranks & own]
        if not any(f.role != "mask" for f in scores):
            return self._emit(term, root, loc)
        in_scores = frozenset().union(*(f.ranks for f in scores))
        later = set(term.out).union(*(f.ranks for f in values))
        score_out = tuple(dict.fromkeys(  # the output's order, then the chunk's keys
            tuple(r for r in term.out if r in in_scores) + (self.ch.key,) + tuple(
                r for r in term.ranks if r in later and r in in_scores)))
        summed = tuple(r for r in term.summed if r in in_scores and r not in score_out)
        name = self.namer.fresh(f"{root}_scores")
        out = self._emit(Term(score_out, summed, tuple(scores)), name, loc)
        read = Factor.of(Access(name, tuple(Index(r) for r in score_out)), "mul")
        rest = Term(term.out, tuple(r for r in term.summed if r not in summed),
                    tuple(values) + (read,), term.coefficients)
        return out + self._emit(rest, root, loc)

    def _emit(self, term: Term, root: str, loc) -> list:
        plan = plan_term(term, self.sizes)
        if plan is None:
            raise NotChunkable(f"{root}: more factors than the contraction search takes")
        return emit(term, plan, root, self.namer, loc)


# ----------------------------------------------------------------------------
# The pass
# ----------------------------------------------------------------------------


def chunked(defn: Definition, sizes: dict[str, int] | None = None, *,
            chunk: int | None = None) -> Definition:
    """Rewrite every chunkable causal sum into its chunked form where that is cheaper.

    ``sizes`` are the sizes costs are compared at (``reassociate.assumed_sizes``); ``chunk``
    forces the chunk size and the rewrite (no cost comparison)."""
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk={chunk!r}: the chunk size must be a positive integer")
    defn = canonicalize(defn)
    assumed = assumed_sizes(defn, sizes)
    for name in consumers(defn):
        defn = _rewrite(defn, name, assumed, chunk)
    return defn


def _rewrite(defn: Definition, name: str, assumed: dict, chunk: int | None) -> Definition:
    st = _plain_einsum(defn, name)
    if st is None:
        return defn
    try:
        causal, inlined = recognise(defn, st)
        if chunk is not None:
            return chunk_statement(defn, st, causal, inlined, chunk, assumed)
        best, best_cost = defn, form_cost(defn, assumed)
        sizes = CHUNK_SIZES if not _per_channel(causal) else CHANNEL_CHUNK_SIZES
        for size in (sizes if causal.segment is None else (0,)):  # (0: the segment's size)
            candidate = chunk_statement(defn, st, causal, inlined, size, assumed)
            cost = form_cost(candidate, assumed)
            if cost < best_cost:
                best, best_cost = candidate, cost
        return best
    except NotChunkable:
        return defn


def _per_channel(c: Causal) -> bool:
    """Whether a decay's exponent reads a rank besides the query and the key (a channel)."""
    own = {f"i_{c.p}", f"i_{c.m}"}
    return any(str(s).startswith("i_") and str(s) not in own
               for d in c.decays for x in (d.query, d.key) for s in x.free_symbols)


def chunk_statement(defn: Definition, st: Einsum, causal: Causal, inlined, size: int,
                    assumed: Mapping[str, float]) -> Definition:
    """``defn`` with ``st`` replaced by its chunked form with chunks of ``size`` (of the
    segment size, for a sum over earlier segments)."""
    chunks, lets = _chunking(defn, causal, size)
    defn2 = dataclasses.replace(defn, lets=defn.lets + lets)
    sizes = dict(assumed)
    if causal.segment is not None:
        size = int(assumed.get(causal.segment, size))
    sizes[chunks.size] = size
    sizes[chunks.count] = -(-sizes[causal.m] // size)
    others = [s for s in defn2.statements if s is not st]
    form = _Form(causal, chunks, sizes, _Namer(defn2, others), defn2)
    statements = form.statements(st.tensor, st.lhs, st.loc)
    defn2 = dataclasses.replace(defn2, lets=defn2.lets + tuple(form.lets))
    st = next(s for s in defn2.statements if s == st)
    return replace_statement(defn2, st, statements,
                             tuple(inlined) + tuple(form.locals) + tuple(sorted(form.looked)))


def _chunking(defn: Definition, c: Causal, size: int) -> tuple[Chunks, tuple[SizeLet, ...]]:
    """Fresh chunk ranks for cutting ``c.m`` into chunks of ``size``: each chunked sum gets
    its own loop (a sum that reads another's result, as a normaliser is read, would
    otherwise share a loop with it in a cycle)."""
    taken = set(defn.ranks) | {x.name for x in defn.params} | {s.tensor for s in defn.statements}
    taken |= {r.lower() for r in defn.ranks}
    tile = fresh_rank(f"{c.m}0", taken)
    count = fresh_rank(f"{c.m}1", taken)
    value = size_symbol(c.segment) if c.segment is not None else sympy.Integer(size)
    lets = (SizeLet(tile, value),
            SizeLet(count, sympy.ceiling(size_symbol(c.m) / size_symbol(tile))))
    return Chunks(tile, count, tile), lets


# ----------------------------------------------------------------------------
# The three forms side by side (the report)
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Form:
    """One form of a chunkable definition: its name, chunk sizes and cascade, and its cost
    (``costs.form_cost``) at the sizes it was chosen at."""

    name: str  # "recurrent", "chunked", "quadratic"
    chunks: tuple[int, ...]  # the chunk size of each chunked sum (none: quadratic)
    definition: Definition
    cost: float


def chunked_forms(defn: Definition, sizes: dict[str, int] | None = None) -> list[Form]:
    """The recurrent (chunks of one key), chunked (the pass's chunk sizes, or the cheapest
    single size when the pass keeps the quadratic form) and quadratic (the source) forms;
    empty when no statement has a chunked form."""
    canonical = canonicalize(defn)
    if not chunkable_sums(canonical):
        return []
    assumed = assumed_sizes(canonical, sizes)

    def form(name: str, d: Definition) -> Form:
        new = tuple(int(let.value) for let in d.lets
                    if let not in canonical.lets and let.value.is_Integer)
        return Form(name, new, d, form_cost(d, assumed))

    chosen = chunked(canonical, sizes)
    if chosen == canonical:
        chosen = min((chunked(canonical, sizes, chunk=c) for c in CHUNK_SIZES),
                     key=lambda d: form_cost(d, assumed))
    return [form("recurrent", chunked(canonical, sizes, chunk=1)), form("chunked", chosen),
            form("quadratic", canonical)]
