"""What every tile-program kernel renderer shares (Triton, CUDA): how ranks are
laid out in a kernel, presence terms, loads inlined from blocked copies, and the
target-independent half of a renderer (:class:`TileRendererBase`: expression dispatch,
state reads, index elements of indirect subscripts, tile bounds from the guards).

An indirect subscript (``KC[PT[b, m // PG], m % PG, e]``) is gathered: the index
tensor's elements for the tile are loaded first (as 64-bit integers, masked by the index
tensor's own bounds), then the addressed rows, masked by the subscript's bounds.  Both
masks are presence terms of the value, so an index element outside its tensor, or one
(``-1``, past the cache) that addresses no row, reads an absent element, never memory
outside the tensor.  Before → after (Triton)::

    KC[PT[b, (m1*M0 + m0) // PG], (m1*M0 + m0) % PG, e]
    ->
    inb_1 = ((m1 * M0 + offs_m0) // PG >= 0) & ((m1 * M0 + offs_m0) // PG < NB)
    pt_2 = tl.load(PT_ptr + ... , mask=inb_1, other=0).to(tl.int64)
    inb_3 = (pt_2 >= 0) & (pt_2 < NP)
    kc_4 = tl.load(KC_ptr + pt_2[:, None] * stride_KC_0 + ..., mask=inb_1 & inb_3 & ...)
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import sympy

from ..einsum_ir.exprs import free_ranks, walk
from ..einsum_ir.ir import (Access, Binary, Call, Const, Expr, Index, Num, Param, Reduce,
                            Size, Unary)
from ..einsum_ir.kernel import CeilDiv, FloatFloor, FloorDiv, IMax, IMin
from ..einsum_ir.types import INT, INTEGER_DTYPES, type_env
from ..passes.defer_normalization import linear_terms, signed_sum
from ..passes.tile import TileProgram


@dataclass(frozen=True)
class Term:
    """A presence term: a boolean block over ``layout`` (canonical rank order).
    ``invariant``: a scalar the kernel's arguments decide (a rank is not empty), the same
    on every tile, so a renderer may test it once instead of in every update."""

    code: str
    layout: tuple[str, ...]
    invariant: bool = False


def in_own_range(sub: Expr, rank: str) -> bool:
    """Whether subscript ``sub`` lies inside ``rank`` on every point: a floor modulo by the
    rank's own size (``KC[.., m % PG, ..]`` over ``PG``) is in ``[0, PG)``, so its load
    needs no bounds term (a size is never negative; where it is 0 the tensor is empty and
    no tile reads it)."""
    return isinstance(sub, Binary) and sub.op == "%" and sub.right == Size(rank)


def _merge_terms(*groups: tuple[Term, ...]) -> tuple[Term, ...]:
    out: dict[Term, None] = {}
    for g in groups:
        for t in g:
            out.setdefault(t, None)
    return tuple(out)


def _factors(e: Expr) -> list[Expr]:
    """Factors of a product; ``x / c`` contributes ``x`` and ``1 / c``."""
    if isinstance(e, Binary) and e.op == "*":
        return _factors(e.left) + _factors(e.right)
    if isinstance(e, Binary) and e.op == "/":
        return _factors(e.left) + [Binary("/", Num(1.0), e.right)]
    return [e]


def _integer_affine(e: Expr) -> bool:
    """An integer expression of index variables, sizes and integer literals (+, -, *)."""
    if isinstance(e, (Index, Size)):
        return True
    if isinstance(e, Num):
        return isinstance(e.value, int)
    if isinstance(e, Unary):
        return e.op == "-" and _integer_affine(e.operand)
    if isinstance(e, Binary):
        return e.op in ("+", "-", "*") and _integer_affine(e.left) and _integer_affine(e.right)
    return False


def split_affine_bias(e: Expr, tile: str | None) -> Expr | None:
    """``L ± c * A`` with ``A`` an integer-affine position (ALiBi's ``p + M - P - (m1*M0 +
    m0)``) and ``c`` constant along the tile: the position split into its part per row and
    tile and its part per key of the tile, each scaled on its own, so that a score takes
    one add where it took a subtract, a multiply and an add::

        BS - SLOPE[h] * (p + M - P - (m1 * M0 + m0))
        ->
        (BS - SLOPE[h] * (p + M - P - m1 * M0)) - SLOPE[h] * (-m0)

    Both parts are exact integers in float32 (< 2**24), and the row part is relative to
    the tile, so the rounding of its product is that of a distance within a tile or two of
    the exact one's (no cancellation of two products of absolute positions).  None where
    the expression is not that shape."""
    if tile is None or not (isinstance(e, Binary) and e.op in ("+", "-")):
        return None
    prod = e.right
    if not (isinstance(prod, Binary) and prod.op == "*"):
        return None
    for c, a in ((prod.left, prod.right), (prod.right, prod.left)):
        if not _integer_affine(a) or tile in free_ranks(c) or tile not in free_ranks(a):
            continue
        terms = linear_terms(a)
        col = [(s, t) for s, t in terms if tile in free_ranks(t)]
        row = [(s, t) for s, t in terms if tile not in free_ranks(t)]
        if not any(free_ranks(t) for _, t in row) or any(free_ranks(t) != {tile} for _, t in col):
            return None
        return Binary(e.op, Binary(e.op, e.left, Binary("*", c, signed_sum(row))),
                      Binary("*", c, signed_sum(col)))
    return None


def _indirect(e: Expr) -> bool:
    """Whether a subscript reads an index tensor's element."""
    return any(isinstance(n, Access) for n in walk(e))


def _nonneg(e: Expr) -> bool:
    """An integer subscript known not to be negative (index variables, sizes, non-negative
    literals under ``+ * // %``): its ``//`` and ``%`` need no floor correction.  An index
    element is not known to be (a page table holds -1)."""
    if isinstance(e, (Index, Size)):
        return True
    if isinstance(e, Num):
        return isinstance(e.value, int) and e.value >= 0
    if isinstance(e, Binary) and e.op in ("+", "*", "//", "%"):
        return _nonneg(e.left) and _nonneg(e.right)
    return False


def _subscript_expr(e: Expr, indices: frozenset[str]) -> bool:
    """An integer expression a subscript may hold: integer-affine, with ``//`` and ``%``,
    and elements of the input index tensors ``indices`` read at such subscripts."""
    if isinstance(e, Access):
        return e.tensor in indices and all(_subscript_expr(s, indices) for s in e.subscripts)
    if isinstance(e, Binary):
        return e.op in ("+", "-", "*", "//", "%") and _subscript_expr(e.left, indices) \
            and _subscript_expr(e.right, indices)
    if isinstance(e, Unary):
        return e.op == "-" and _subscript_expr(e.operand, indices)
    return _integer_affine(e)


def constant_code(e: Expr) -> str | None:
    """Python code for a constant expression (``0``, ``-inf``), else None."""
    if isinstance(e, Num):
        return repr(float(e.value))
    if isinstance(e, Const) and e.name in ("inf", "pi", "e"):
        return {"inf": 'float("inf")', "pi": "math.pi", "e": "math.e"}[e.name]
    if isinstance(e, Unary) and e.op == "-":
        inner = constant_code(e.operand)
        return None if inner is None else f"-{inner}"
    return None


def constant_inits(tp: TileProgram) -> dict[str, str] | None:
    """Each state's init as Python code (what a stream-K workspace is filled with: a slot
    no segment writes reads as a worker that saw no tile); None when one is not constant."""
    fills = {}
    for st in tp.inits:
        code = constant_code(st.expr)
        if code is None or st.where is not None:
            return None
        fills[st.tensor] = code
    return fills


def _nest(fn: str, args: list[str]) -> str:
    """``fn(a, fn(b, c))`` over the distinct args, in order (one arg: itself)."""
    args = list(dict.fromkeys(args))
    out = args[-1]
    for a in reversed(args[:-1]):
        out = f"{fn}({a}, {out})"
    return out


@dataclass(frozen=True)
class KernelValue:
    """A rendered value: code, the vector ranks it varies over, its presence terms.
    Each target adds what it needs (Triton: the raw load, CUDA: the shared buffer)."""

    code: str
    layout: tuple[str, ...]
    terms: tuple[Term, ...] = ()
    loaded: bool = False     # a direct load: zero wherever it is absent
    is_bool: bool = False
    is_int: bool = False     # an integer value (einsum_ir.types): converted where a float is due


@dataclass(frozen=True)
class DotShape:
    """A reduction ``sum[r](A[ra,r] * B[r,rb] * scalars)`` matched as a matrix product."""

    a: KernelValue              # A (masked by a where over r and ra)
    b: KernelValue              # B (or masked by that where)
    r: str                      # the summed rank
    ra: str                     # A's other rank: the product's rows
    rb: str                     # B's other rank: the product's columns
    filt: Term | None           # the statement's where, when it lies in scope
    scalars: tuple[Expr, ...]   # the factors over no vector rank
    outer: tuple[Expr, ...] = ()  # factors over vector ranks but not r (OUTER_FACTORS)


class TileRendererBase:
    """What a kernel renderer does the same way whatever code it writes (Triton, CUDA).

    A subclass supplies the target's syntax through small hooks:

    * ``Unsupported``: the exception it raises for what it cannot express;
    * values: ``Value`` (its value class: code, layout, presence terms), ``number_value``,
      ``constant_value``, ``size_value``, ``param_value``, ``index_value``, ``unary``,
      ``binary``, ``emit_load`` (one load's code) and ``previous_state`` (a state's value
      before this step);
    * calls: ``FUNCTIONS`` and ``MINMAX`` (code templates), ``float_code`` and ``select``;
    * ``where`` filters: ``where_term`` (and ``where_holds``);
    * reductions: ``range_term``, ``dot`` and ``reduction``; ``masked_operand`` for
      :meth:`match_dot`; ``any_term`` and ``both_present`` for the presence of a result;
    * tile bounds: ``IMAX`` / ``IMIN`` (integer max / min functions), ``ROW_FIRST`` /
      ``ROW_LAST`` (names of the block's first and last row), ``size`` (a rank's size),
      ``floor_div``, ``first_tile``, ``float_floor``, ``bound_symbol`` and
      ``bound_number``: the syntax of the bounds the ``bound-tiles`` stage derived.
    """

    Unsupported: type[Exception] = Exception
    Value: type[KernelValue] = KernelValue
    # match_dot takes factors that do not vary along the summed rank out of the product
    # (``sum[e](Q*K*f[p,m]) = f[p,m] * sum[e](Q*K)``): a target that multiplies them in
    OUTER_FACTORS = False
    FUNCTIONS: dict[str, str] = {}     # one-argument functions: code templates over ``{x}``
    MINMAX = ""                        # two-argument max / min: over ``{fn}``, ``{a}``, ``{b}``
    UNAVAILABLE = "here"               # where a value read too early is missing (error text)
    IMAX = IMIN = ROW_FIRST = ROW_LAST = ""

    # --- helpers -------------------------------------------------------------------
    def new(self, prefix: str) -> str:
        """A fresh name: ``prefix_<n>``."""
        self.count += 1
        return f"{prefix}_{self.count}"

    def canon(self, ranks) -> tuple[str, ...]:
        """Ranks in the kernel's canonical (vector) order."""
        s = set(ranks)
        return tuple(r for r in self.ranks.vector if r in s)

    # --- expressions -----------------------------------------------------------------
    def value(self, e: Expr, st):
        """The rendered value of expression ``e`` of statement ``st``, marked integer when
        its type (:mod:`einsum_ir.types`) is ``int``."""
        out = self._value(e, st)
        if not out.is_bool and type_env(self.defn).of(e) == INT and not out.is_int:
            out = dataclasses.replace(out, is_int=True)
        return out

    def _value(self, e: Expr, st):
        if isinstance(e, Num):
            return self.number_value(e)
        if isinstance(e, Const):
            return self.constant_value(e)
        if isinstance(e, Size):
            return self.size_value(e)
        if isinstance(e, Param):
            return self.param_value(e)
        if isinstance(e, Index):
            return self.index_value(e)
        if isinstance(e, Access):
            return self.access(e)
        if isinstance(e, Unary):
            return self.unary(e, st)
        if isinstance(e, Binary):
            return self.binary(e, st)
        if isinstance(e, Call):
            return self.call(e, st)
        if isinstance(e, Reduce):
            return self.reduce(e, st)
        raise self.Unsupported(str(e))

    def load(self, e: Access, index: bool = False):
        """A load of an input, once per tile; one that does not depend on the tile is
        emitted once, before the loop.  ``index``: an index tensor's elements read as
        integers for a subscript (:meth:`index_element`)."""
        key = ("load", e, index)
        invariant = not any(self.ranks.loop in free_ranks(s) for s in e.subscripts)
        if invariant and key in self.hoisted_memo:
            return self.hoisted_memo[key]
        if key in self.memo:
            return self.memo[key]
        if invariant and self.in_loop:
            return self.hoisted_load(e, index)
        out = self.emit_load(e, index)
        self.memo[key] = out
        return out

    def hoisted_load(self, e: Access, index: bool = False):
        """``load(e)`` emitted into the code before the loop, with that code's memo."""
        saved, self.lines = self.lines, self.hoisted
        saved_memo, self.memo = self.memo, self.hoisted_memo
        self.in_loop = False
        out = self.load(e, index)
        self.in_loop = True
        self.lines, self.memo = saved, saved_memo
        return out

    # --- indirect subscripts --------------------------------------------------------------
    def index_element(self, e: Access):
        """An index tensor's element(s) in a subscript: a 64-bit integer value (0 where it
        is absent) whose presence terms are the index tensor's own bounds."""
        if e.tensor not in self.inputs:
            raise self.Unsupported(f"{e.tensor} is read as an index but is not an input")
        return self.load(e, index=True)

    def index_terms(self, e: Expr) -> tuple[Term, ...]:
        """Presence of the index elements subscript ``e`` reads: an absent index element
        makes the access absent (the contract's *Indirect subscripts*)."""
        return _merge_terms(*(self.index_element(n).terms for n in walk(e)
                              if isinstance(n, Access)))

    def int_comparison(self, e: Binary):
        """A comparison of two integer subscript expressions (``m < L[b]``, ``p < CU[b+1] -
        CU[b]``) in exact integer code: ``(left, its layout, right, its layout, presence)``,
        or None when a side is not one."""
        indices = frozenset(a.name for a in self.defn.tensor_args if a.dtype in INTEGER_DTYPES)
        if not (_subscript_expr(e.left, indices) and _subscript_expr(e.right, indices)):
            return None
        if not (_indirect(e.left) or _indirect(e.right)):
            return None
        (a, la), (b, lb) = self.subscript(e.left), self.subscript(e.right)
        return a, la, b, lb, _merge_terms(self.index_terms(e.left), self.index_terms(e.right))

    def access(self, e: Access):
        """A read: a load of an input, or a value computed in this kernel.

        A state read at ``m1 + 1`` (or at the loop's size, after the loop) is its value
        after this step, at ``m1`` the one before; other reads must use the loop rank
        (if they have it) and every other rank as itself."""
        t = e.tensor
        if t in self.inputs:
            return self.load(e)
        loop = self.ranks.loop
        ranks, subs = list(self.defn.tensor_ranks(t)), list(e.subscripts)
        if t in self.tp.state:
            pos = ranks.index(loop)
            step = subs[pos]
            del ranks[pos], subs[pos]
            nxt = step == Binary("+", Index(loop), Num(1)) or step == Size(loop)
            val = self.values[t] if nxt else self.previous_state(t)
        else:
            if loop in ranks:
                pos = ranks.index(loop)
                if subs[pos] != Index(loop):
                    raise self.Unsupported(f"{t} read at another tile")
                del ranks[pos], subs[pos]
            if t not in self.values:
                raise self.Unsupported(f"{t} is not available {self.UNAVAILABLE}")
            val = self.values[t]
        for s, r in zip(subs, ranks):
            if not (isinstance(s, Index) and s.rank == r):
                raise self.Unsupported(f"{t} is read with a shifted subscript")
        return val

    def call(self, e: Call, st):
        """A function call: ``select``, a two-argument max / min, or a one-argument
        function, over the union of the arguments' layouts and presence terms."""
        args = [self.value(a, st) for a in e.args]
        lay = self.canon(set().union(*(set(a.layout) for a in args)))
        terms = _merge_terms(*(a.terms for a in args))
        if e.fn == "select":
            return self.select(args, lay, terms)
        codes = [self.float_code(a, lay) for a in args]
        if e.fn in ("max", "min") and len(codes) == 2:
            return self.Value(self.MINMAX.format(fn=e.fn, a=codes[0], b=codes[1]), lay, terms)
        x = codes[0]
        return self.Value(self.FUNCTIONS[e.fn].format(x=x), lay, terms)

    def reduce(self, e: Reduce, st):
        """A reduction: a one-rank sum the target renders as a matrix product (``dot``,
        None when it cannot), else ``reduction`` of the body under its presence terms:
        the body's, the statement's ``where`` where it lies in scope, and the ranges of
        the reduced ranks."""
        if e.op == "sum" and len(e.ranks) == 1:
            fast = self.dot(e, st)
            if fast is not None:
                return fast
        body = self.value(e.body, st)
        terms = list(body.terms)
        filt = self.filter_term(st, set(st.lhs) | set(e.ranks))
        if filt:
            terms.append(filt)
        terms += [t for t in (self.range_term(r) for r in e.ranks) if t]
        # a term along the reduced ranks widens the block: sum[m0](LG[m]) where m <= t
        # reduces a (t, m0) block, although its body is over m0 alone
        along = [set(t.layout) for t in terms if set(t.layout) & set(e.ranks)]
        lay = self.canon(set(body.layout) | set(e.ranks) | set().union(*along))
        return self.reduction(e, body, lay, terms)

    # --- outputs stored at every step of the loop ------------------------------------
    def stepped_outputs(self) -> list:
        """Outputs over the loop rank, stored inside the loop at every step (the chunked
        scan's ``PKV[m1,e,f] = SKV[m1,e,f]``, the state at each chunk's start)."""
        loop = self.ranks.loop
        return [o for o in self.outputs if loop is not None and loop in o.ranks]

    def stepped_blocker(self) -> str | None:
        """Why the stepped outputs cannot be stored (a loop that tiles or skips its steps
        would leave some unwritten), or None."""
        stepped, b = self.stepped_outputs(), self.bounds
        if stepped and (self.ranks.tile is not None or (b is not None and (
                b.live is not None or b.live_probes or (b.full is not None and b.full_probes)))):
            return (f"output {stepped[0].name} is stored at every step of a loop that tiles "
                    f"or skips its steps")
        return None

    def reduce_presence(self, terms, ranks: set[str]) -> tuple[Term, ...]:
        """Presence after reducing ``ranks``: some point of the fiber present.  Terms not
        along the ranks stay; the ranks' ranges alone say "the rank is not empty"; other
        terms need an "any" reduction (``any_term``, once per tile)."""
        keep = [t for t in terms if not set(t.layout) & ranks]
        inner = [t for t in terms if set(t.layout) & ranks]
        if not inner:
            return tuple(keep)
        ranges = {self.range_term(r) for r in ranks}
        if all(t in ranges for t in inner):  # only rank ranges: "the rank is not empty"
            return tuple(keep) + tuple(Term(f"({self.size(t.layout[0])} > 0)", (), True)
                                       for t in dict.fromkeys(inner))
        key = ("any", tuple(inner), tuple(sorted(ranks)))
        if key not in self.memo:
            self.memo[key] = self.any_term(inner, ranks)
        return tuple(keep) + (self.memo[key],)

    # --- where filters -------------------------------------------------------------
    def filter_term(self, st, scope: set[str]) -> Term | None:
        """The presence term of statement ``st``'s ``where`` (once per tile); None when it
        has none, when it reads a rank outside ``scope``, or when it is known to hold."""
        if st.where is None or not free_ranks(st.where) <= scope:
            return None
        if self.where_holds(st.where):
            return None
        key = ("where", st.where)
        if key not in self.memo:
            self.memo[key] = self.where_term(self.value(st.where, st))
        return self.memo[key]

    def where_holds(self, cond: Expr) -> bool:
        """Whether ``cond`` is known to hold wherever this code runs (by default: no)."""
        return False

    # --- matrix products --------------------------------------------------------------
    def match_dot(self, e: Reduce, st) -> DotShape | None:
        """``e = sum[r](A * B * c)`` with A and B 2-D, each over r and one other rank, and
        a ``where`` over r folded into the operand it fits; None when not that shape."""
        r = e.ranks[0]
        tensors, scalars, outer = [], [], []
        for f in _factors(e.body):
            ranks = free_ranks(f) & set(self.ranks.vector)
            if self.OUTER_FACTORS and ranks and r not in free_ranks(f):
                outer.append(f)
            else:
                (tensors if ranks else scalars).append(f)
        if len(tensors) > 2:
            tensors = self.operand_groups(tensors, r)
        if len(tensors) != 2:
            return None
        a, b = (self.value(t, st) for t in tensors)
        if len(a.layout) != 2 or len(b.layout) != 2 or r not in a.layout or r not in b.layout:
            return None
        (ra,) = set(a.layout) - {r}
        (rb,) = set(b.layout) - {r}
        if ra == rb:
            return None
        filt = self.filter_term(st, set(st.lhs) | {r}) if st.where is not None else None
        if filt is not None and r in filt.layout:
            # a where over the summed rank masks the operand that has its other rank
            if set(filt.layout) <= set(a.layout):
                a = self.masked_operand(a, filt)
            elif set(filt.layout) <= set(b.layout):
                b = self.masked_operand(b, filt)
            else:
                return None
        return DotShape(a, b, r, ra, rb, filt, tuple(scalars), tuple(outer))

    def operand_groups(self, tensors: list, r: str) -> list:
        """More than two factors over the summed rank ``r`` as the two operands of one
        product, each the product of the factors over ``r`` and one other rank (a
        backward's ``sum[m0](dSN[m0,p] * exp(QK[m0,p] - GM[p]) * K[m0,e])`` is
        ``(dSN * exp(..)) @ K``); ``tensors`` unchanged when they do not split that way."""
        held = set(self.ranks.vector)
        other = [(free_ranks(f) & held) - {r} for f in tensors]
        sides = sorted(set().union(*other))
        if len(sides) != 2 or any(len(o) != 1 for o in other) or \
                not all(r in free_ranks(f) for f in tensors):
            return tensors
        groups = []
        for side in sides:
            part = [f for f, o in zip(tensors, other) if o == {side}]
            product = part[0]
            for f in part[1:]:
                product = Binary("*", product, f)
            groups.append(product)
        return groups

    def dot_input_terms(self, m: DotShape) -> tuple[tuple[Term, ...], tuple[Term, ...]]:
        """The operands' presence terms for the product's presence: A's also carry a
        ``where`` not over r, and r's range."""
        a_terms = m.a.terms
        if m.filt is not None and m.r not in m.filt.layout:
            a_terms = _merge_terms(a_terms, (m.filt,))
        range_r = self.range_term(m.r)
        return a_terms + ((range_r,) if range_r else ()), m.b.terms

    def dot_presence(self, a_terms, b_terms, r, ra, rb, layout) -> tuple[Term, ...]:
        """Presence of ``sum[r](A*B)`` over ``layout``: some r where both are present.
        Unless the terms along r reach both ra and rb, that is the presence after reducing
        r; else the target renders it (``both_present``)."""
        terms = _merge_terms(a_terms, b_terms)
        inner = [t for t in terms if r in t.layout]
        span = set().union(*(set(t.layout) for t in inner)) if inner else set()
        if not ({ra, rb} <= span):
            return self.reduce_presence(terms, {r})
        keep = tuple(t for t in terms if r not in t.layout)
        return keep + (self.both_present(a_terms, b_terms, r, ra, rb, layout),)

    # --- tile bounds (derived by the bound-tiles stage; printed here) -------------------
    def tile_bounds(self) -> tuple[str, str]:
        """Code for the first and last+1 live tile of this program's rows."""
        live = self.bounds.live if self.bounds is not None else None
        if live is None:
            return "0", self.size(self.ranks.loop)
        return self.bound_code(live.lo), self.bound_code(live.hi)

    def nonneg_div(self, num: str, den: str) -> str:
        """Floor division of a never-negative integer by a positive one (truncation)."""
        return f"{num} // {den}"

    def bound_code(self, e) -> str:
        """Code for a kernel-IR integer bound (:mod:`attnc.einsum_ir.kernel`)."""
        if isinstance(e, (IMax, IMin)):
            return _nest(self.IMAX if isinstance(e, IMax) else self.IMIN,
                         [self.bound_code(a) for a in e.args])
        if isinstance(e, FloorDiv):
            num, den = self.int_code(e.num), self.int_code(e.den)
            code = self.nonneg_div(num, den) if e.nonneg else self.floor_div(num, den)
            return f"{code} + {e.offset}" if e.offset else code
        if isinstance(e, CeilDiv):
            return self.first_tile(self.int_code(-e.num), self.int_code(e.den))
        if isinstance(e, FloatFloor):
            return self.float_floor(self.int_code(e.num), self.int_code(e.den), e.offset)
        return self.int_code(e)

    def float_floor(self, num: str, den: str, offset: int) -> str:
        """``trunc(num / den) + offset`` in float arithmetic."""
        raise NotImplementedError

    def int_code(self, e: sympy.Expr) -> str:
        """Integer code for a sympy bound (sums and products of symbols and integers)."""
        if e.is_Symbol:
            elements = dict(self.bounds.elements) if getattr(self, "bounds", None) else {}
            if e.name[1:] in elements:  # a per-program element, L[b]: its integer value
                return self.index_element(elements[e.name[1:]]).code
            return self.bound_symbol(e.name)
        if e.is_Integer:
            return str(int(e))
        if isinstance(e, (sympy.Min, sympy.Max)):  # a bound that holds on every tile or none
            return _nest(self.IMIN if isinstance(e, sympy.Min) else self.IMAX,
                         [self.int_code(x) for x in e.args])
        if e.is_Add:
            return "(" + " + ".join(self.int_code(x) for x in e.args) + ")"
        if e.is_Mul:
            return "(" + " * ".join(self.int_code(x) for x in e.args) + ")"
        return self.bound_number(e)

    def bound_number(self, e: sympy.Expr) -> str:
        """Code for a bound's non-integer number; the base cannot write one."""
        raise self.Unsupported(f"bound {e}")


# ----------------------------------------------------------------------------
# multi-kernel programs: the public function that runs the parts in order
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ChainCall:
    fn: str                 # the part's generated function
    args: tuple[str, ...]   # its arguments (tensors by name; parameters as keywords)
    outs: tuple[str, ...]   # the names its outputs are bound to


@dataclass(frozen=True)
class ChainSpec:
    """What ``templates/common/chain.py.jinja`` needs for one multi-kernel program."""

    name: str
    signature: str
    doc: str
    args: list              # (pyname, name, ranks)
    input_ranks: list
    lets: list              # (pyname, code, text)
    params: list            # (pyname, name, default code or None)
    calls: tuple[ChainCall, ...]
    returns: tuple[str, ...]


def rendered_kernels(p, v, done: dict, render) -> list:
    """Variant ``v``'s kernels rendered by ``render(kernel)``, each once across the
    program's variants: one another variant shares (the split-K combine) comes again with
    ``define=False``."""
    out = []
    for name in v.kernels:
        if name in done:
            out.append(dataclasses.replace(done[name], define=False))
        else:
            done[name] = render(p.kernel(name))
            out.append(done[name])
    return out


def default_code(e) -> str:
    """A parameter default as launcher code in plain floats with IEEE division (``_fdiv``):
    ``1/sqrt(E)`` at ``E = 0`` is ``inf`` as in numpy, not a ZeroDivisionError, and a size
    under torch.compile(dynamic=True) stays a value the custom op takes (floor and
    ceiling keep exact integer code)."""
    from .numpy_backend import pyname, size_code

    if e.has(sympy.floor, sympy.ceiling):
        return size_code(e, False, "math")
    return size_code(e, False, "math", symbol=lambda n: f"float({pyname(n)})")


def py_literal(x) -> str:
    """A string or None as Python source for a template (``tojson`` writes ``null``)."""
    return "None" if x is None else json.dumps(x)


def launcher_signature(defn, pyname) -> tuple[list, str]:
    """A generated function's parameters ``(pyname, name, default code or None, dtype)`` and its
    signature: tensors positional, scalar parameters keyword-only."""
    params = [(pyname(s.name), s.name, default_code(s.default) if s.default is not None else None,
               s.dtype) for s in defn.scalar_params]
    sig = [pyname(a.name) for a in defn.tensor_args]
    if params:
        sig += ["*"] + [x[0] if x[2] is None else f"{x[0]}=None" for x in params]
    return params, ", ".join(sig)


def chain_spec(p, pyname, size_code, doc: str) -> ChainSpec:
    """The public function of multi-kernel program ``p``: each part is called with the
    tensors it reads and its parameters (sizes it cannot bind travel as ``size_<r>``)."""
    from ..passes.multikernel import size_param

    defn = p.cascade
    ranks = list(dict.fromkeys(r for a in defn.tensor_args for r in a.ranks))
    calls = []
    for q in p.parts:
        d = q.cascade
        args = [pyname(a.name) for a in d.tensor_args]
        for s in d.scalar_params:
            size = next((r for r in defn.ranks if size_param(r) == s.name), None)
            args.append(f"{pyname(s.name)}={pyname(size) if size else pyname(s.name)}")
        calls.append(ChainCall(pyname(d.name), tuple(args), tuple(pyname(o.name) for o in d.outputs)))
    params, signature = launcher_signature(defn, pyname)
    return ChainSpec(
        name=pyname(defn.name), signature=signature, doc=doc,
        args=[(pyname(a.name), a.name, list(a.ranks)) for a in defn.tensor_args],
        input_ranks=ranks,
        lets=[(pyname(x.name), size_code(x.value, True, "math"), str(x.value)) for x in defn.lets
              if {s.name for s in x.value.free_symbols} <= set(ranks) | {y.name for y in defn.lets}],
        params=params, calls=tuple(calls), returns=tuple(pyname(o.name) for o in defn.outputs))


def plan_reads(p) -> tuple[list[str], list[str]]:
    """The tensor arguments and scalar parameters the block-mask probes of program ``p``
    read (bound-tiles' ``live_probes`` and ``full_probes``): what a plan made once
    depends on, beyond the sizes.  ``DOC[p] == DOC[m]`` -> (["DOC"], [])."""
    from ..passes.tile_loads import expand_loads, expanded_body

    tensors, params = {}, {}
    for k in p.kernels:
        b = k.bounds
        if b is None:
            continue
        conds = [c for conds in b.live_probes for c in conds]
        conds += list(b.full_probes) if b.full is not None else []
        loads = expanded_body(k.tiles)[0] if conds else {}
        for c in conds:
            for n in walk(expand_loads(c, loads)):
                if isinstance(n, Access):
                    tensors[n.tensor] = None
                elif isinstance(n, Param):
                    params[n.name] = None
    args = [a.name for a in p.cascade.tensor_args]
    return [t for t in args if t in tensors], [s.name for s in p.cascade.scalar_params
                                               if s.name in params]
