"""What every tile-program kernel renderer shares (Triton, CUDA): how ranks are
laid out in a kernel, presence terms, loads inlined from blocked copies, and the
target-independent half of a renderer (:class:`TileRendererBase`: expression dispatch,
state reads, tile bounds from the guards)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import sympy

from ..einsum_ir.exprs import children, free_ranks, walk, with_children
from ..einsum_ir.ir import (Access, Binary, Call, Const, Einsum, Expr, Index, Num, Param, Reduce,
                            Size, Unary)
from ..passes.tile import TileProgram, conjunctions, to_sympy


@dataclass(frozen=True)
class Term:
    """A presence term: a boolean block over ``layout`` (canonical rank order)."""

    code: str
    layout: tuple[str, ...]


def _merge_terms(*groups: tuple[Term, ...]) -> tuple[Term, ...]:
    out: dict[Term, None] = {}
    for g in groups:
        for t in g:
            out.setdefault(t, None)
    return tuple(out)


@dataclass
class Ranks:
    """The roles of the ranks in one kernel."""

    row: str | None
    tile: str | None
    loop: str
    grid: tuple[str, ...]          # program-scalar ranks (besides the batch dims)
    vector: tuple[str, ...]        # canonical order: row, tile, then the others

    def block(self, r: str) -> str:
        return f"BLOCK_{r}"


def _inline_loads(tp: TileProgram) -> tuple[dict[str, Einsum], tuple]:
    """Blocked copies ``BK[m1,m0,e] = K[m1*M0 + m0, e]`` become loads at their uses."""
    inputs = {a.name for a in tp.cascade.tensor_args}
    loads = {}
    for st in tp.body:
        if (isinstance(st, Einsum) and st.where is None and isinstance(st.expr, Access)
                and st.expr.tensor in inputs and st.tensor not in tp.kept):
            loads[st.tensor] = st
    body = tuple(s for s in tp.body if s.tensor not in loads)
    return loads, body


def _substitute(e: Expr, mapping: dict[str, Expr]) -> Expr:
    if isinstance(e, Index) and e.rank in mapping:
        return mapping[e.rank]
    kids = children(e)
    if not kids:
        return e
    return with_children(e, tuple(_substitute(k, mapping) for k in kids))


def _expand_loads(e: Expr, loads: dict[str, Einsum]) -> Expr:
    """Replace each access of a blocked copy by the access it copies."""
    if isinstance(e, Access) and e.tensor in loads:
        st = loads[e.tensor]
        mapping = dict(zip(st.lhs, e.subscripts))
        return _substitute(st.expr, mapping)
    kids = children(e)
    if not kids:
        return e
    return with_children(e, tuple(_expand_loads(k, loads) for k in kids))


def classify_ranks(tp: TileProgram, statements) -> Ranks:
    """Row, tile, grid and vector ranks from how the statements use them."""
    defn = tp.cascade
    inputs = {a.name for a in defn.tensor_args}
    streamed = set()
    for st in statements:
        for acc in walk(st.expr):
            if isinstance(acc, Access) and acc.tensor in inputs and any(
                    tp.loop_rank in free_ranks(s) for s in acc.subscripts):
                streamed.add(acc.tensor)
    state_ranks = []
    for st in tp.inits:
        state_ranks += [r for r in st.lhs if r != st.iter_rank and r not in state_ranks]
    in_streamed, in_other = set(), set()
    for st in statements + tuple(tp.epilogue) + tuple(tp.prologue):
        for acc in walk(st.expr):
            if isinstance(acc, Access) and acc.tensor in inputs:
                used = set().union(*(free_ranks(s) for s in acc.subscripts)) if acc.subscripts else set()
                (in_streamed if acc.tensor in streamed else in_other).update(used)
    selectors = set()  # ranks that choose *which* keys stream (w in K[(w*MT + mt)*M0 + m0])
    for st in statements:
        for acc in walk(st.expr):
            if isinstance(acc, Access) and acc.tensor in streamed:
                for sub in acc.subscripts:
                    if not isinstance(sub, Index) and tp.loop_rank in free_ranks(sub):
                        selectors |= free_ranks(sub) - {tp.loop_rank, tp.tile_rank}
    grid = [r for r in state_ranks if (r in in_streamed and r in in_other) or r in selectors]
    rows = [r for r in state_ranks if r not in in_streamed and r not in grid]
    guard_ranks = set()
    for _, gs in tp.guards:
        for g in gs:
            guard_ranks |= free_ranks(g.cond)
    row = next((r for r in rows if r in guard_ranks), rows[-1] if rows else None)
    grid += [r for r in rows if r != row]
    vector = [r for r in (row, tp.tile_rank) if r]
    every = set()
    for st in statements + tuple(tp.epilogue) + tuple(tp.prologue) + tuple(tp.inits):
        every |= set(st.lhs) | free_ranks(st.expr)
        for red in walk(st.expr):
            if isinstance(red, Reduce):
                every |= set(red.ranks)
    for r in defn.ranks:
        if r in every and r not in vector and r not in grid and r != tp.loop_rank:
            vector.append(r)
    return Ranks(row, tp.tile_rank, tp.loop_rank, tuple(grid), tuple(vector))


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


def _sign(e) -> int | None:
    if e.is_number:
        return 1 if e > 0 else -1 if e < 0 else None
    if e.is_positive:
        return 1
    if e.is_negative:
        return -1
    return None


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


def expanded_body(tp: TileProgram) -> tuple[dict[str, Einsum], tuple]:
    """The loop body with its blocked copies inlined as loads: (the copies, the body)."""
    loads, body = _inline_loads(tp)
    body = tuple(dataclasses.replace(s, expr=_expand_loads(s.expr, loads),
                                     where=None if s.where is None else
                                     _expand_loads(s.where, loads))
                 for s in body)
    return loads, body


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
      ``floor_div``, ``first_tile``, ``bound_symbol`` and ``bound_number``, and the
      flags below.
    """

    Unsupported: type[Exception] = Exception
    Value: type[KernelValue] = KernelValue
    FUNCTIONS: dict[str, str] = {}     # one-argument functions: code templates over ``{x}``
    MINMAX = ""                        # two-argument max / min: over ``{fn}``, ``{a}``, ``{b}``
    UNAVAILABLE = "here"               # where a value read too early is missing (error text)
    IMAX = IMIN = ROW_FIRST = ROW_LAST = ""
    TIGHTENS_STRICT = True             # an integer ``x > 0`` bounds as ``x >= 1``
    WIDENS_FLOAT_BOUNDS = False        # a bound over a float parameter widens by a tile
    DECLINES_UNCODABLE_BOUNDS = False  # a bound with no integer code: no bound (else raise)

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
        """The rendered value of expression ``e`` of statement ``st``."""
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

    def load(self, e: Access):
        """A load of an input, once per tile; one that does not depend on the tile is
        emitted once, before the loop."""
        key = ("load", e)
        invariant = not any(self.ranks.loop in free_ranks(s) for s in e.subscripts)
        if invariant and key in self.hoisted_memo:
            return self.hoisted_memo[key]
        if key in self.memo:
            return self.memo[key]
        if invariant and self.in_loop:
            return self.hoisted_load(e)
        out = self.emit_load(e)
        self.memo[key] = out
        return out

    def hoisted_load(self, e: Access):
        """``load(e)`` emitted into the code before the loop, with that code's memo."""
        saved, self.lines = self.lines, self.hoisted
        saved_memo, self.memo = self.memo, self.hoisted_memo
        self.in_loop = False
        out = self.load(e)
        self.in_loop = True
        self.lines, self.memo = saved, saved_memo
        return out

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
        lay = self.canon(set(body.layout) | set(e.ranks))
        terms = list(body.terms)
        filt = self.filter_term(st, set(st.lhs) | set(e.ranks))
        if filt:
            terms.append(filt)
        terms += [t for t in (self.range_term(r) for r in e.ranks) if t]
        return self.reduction(e, body, lay, terms)

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
            return tuple(keep) + tuple(Term(f"({self.size(t.layout[0])} > 0)", ())
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
        tensors, scalars = [], []
        for f in _factors(e.body):
            (tensors if free_ranks(f) & set(self.ranks.vector) else scalars).append(f)
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
        return DotShape(a, b, r, ra, rb, filt, tuple(scalars))

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

    # --- tile range from the guards ----------------------------------------------------
    def tile_bounds(self) -> tuple[str, str]:
        """Code for the first and last+1 live tile of this program's rows: the union over
        the updates of the tiles every guard of the update may pass."""
        r = self.ranks
        full = ("0", self.size(r.loop))
        if r.tile is None or r.row is None:
            return full
        per_update = []
        for _, guards in self.tp.guards:
            ranges = [x for x in (self.guard_range(g) for g in guards) if x is not None]
            if not ranges:
                return full
            per_update.append((_nest(self.IMAX, [x[0] for x in ranges]),
                               _nest(self.IMIN, [x[1] for x in ranges])))
        lo = _nest(self.IMIN, [x[0] for x in per_update])
        hi = _nest(self.IMAX, [x[1] for x in per_update])
        return f"{self.IMAX}(0, {lo})", f"{self.IMIN}({self.size(r.loop)}, {hi})"

    def guard_range(self, g) -> tuple[str, str] | None:
        """[lo, hi) of tiles that may satisfy guard g for some row of the block; None when
        a conjunct of it is not an affine bound."""
        r = self.ranks
        if r.tile not in g.exists or not free_ranks(g.cond) <= {r.loop, r.tile, r.row}:
            return None
        dnf = conjunctions(g.cond)
        if dnf is None:
            return None
        spans = []
        for conj in dnf:
            lo, hi = ["0"], [self.size(r.loop)]
            for atom in conj:
                b = self.atom_tiles(atom)
                if b is None:
                    return None
                kind, code = b
                (lo if kind == "lo" else hi).append(code)
            spans.append((_nest(self.IMAX, lo), _nest(self.IMIN, hi)))
        return (_nest(self.IMIN, [s[0] for s in spans]),
                _nest(self.IMAX, [s[1] for s in spans]))

    def atom_tiles(self, atom, worst: bool = False) -> tuple[str, str] | None:
        """An affine atom as a bound ``("lo" | "hi", code)`` on the tile index m1: where it
        holds for *some* m0 and row of the block, or (``worst``) for *every* m0 and row."""
        inequality = self.tile_inequality(atom, worst)
        if inequality is None:
            return None
        c1, k, floating = inequality
        sign = _sign(c1)
        if sign is None:
            return None
        try:
            kcode, c1code = self.int_code(k), self.int_code(c1 if sign > 0 else -c1)
        except self.Unsupported:
            if self.DECLINES_UNCODABLE_BOUNDS:
                return None
            raise
        if floating:
            return self.widened_bound(sign, kcode, c1code)
        if sign > 0:   # m1 >= ceil(-k / c1)
            return "lo", self.first_tile(kcode, c1code)
        return "hi", f"{self.floor_div(kcode, c1code)} + 1"  # m1 <= floor(k / (-c1))

    def tile_inequality(self, atom, worst: bool):
        """An affine atom over m1, m0 and the row as ``c1*m1 + k >= 0`` at the block's
        best (or, ``worst``, its worst) m0 and row: ``(c1, k, floating)``, ``floating`` when
        k has a float parameter; None when the atom is not of that form."""
        r = self.ranks
        if not isinstance(atom, Binary) or atom.op not in ("<", "<=", ">", ">="):
            return None
        a, b = to_sympy(atom.left), to_sympy(atom.right)
        if a is None or b is None:
            return None
        diff = sympy.expand(b - a if atom.op in ("<", "<=") else a - b)  # >= 0 (or > 0)
        x1, x0, xp = (sympy.Symbol(f"_{n}", integer=True) for n in (r.loop, r.tile, r.row))
        c0, cp = diff.coeff(x0), diff.coeff(xp)
        rest = sympy.expand(diff - c0 * x0 - cp * xp)
        c1 = rest.coeff(x1)
        const = sympy.expand(rest - c1 * x1)
        floating = any(s.name.startswith("param_") for s in const.free_symbols)
        if floating and (worst or not self.WIDENS_FLOAT_BOUNDS):
            return None
        if not (c0.is_number and cp.is_number):
            return None
        if self.TIGHTENS_STRICT and atom.op in ("<", ">") and not floating:
            const -= 1  # integers: x > 0 is x >= 1
        high_m0 = (c0 > 0) != worst
        high_p = (cp > 0) != worst
        m0_best = sympy.Symbol("BLOCK_" + r.tile) - 1 if high_m0 else 0
        p_best = sympy.Symbol(self.ROW_LAST) if high_p else sympy.Symbol(self.ROW_FIRST)
        k = sympy.expand(const + c0 * m0_best + cp * p_best)
        return c1, k, floating

    def widened_bound(self, sign: int, k: str, c: str) -> tuple[str, str]:
        """The bound of ``c*m1 + k >= 0`` (``sign`` of c1) over a float parameter, a tile
        wider on each side; only for targets with ``WIDENS_FLOAT_BOUNDS``."""
        raise NotImplementedError

    def int_code(self, e: sympy.Expr) -> str:
        """Integer code for a sympy bound (sums and products of symbols and integers)."""
        if e.is_Symbol:
            return self.bound_symbol(e.name)
        if e.is_Integer:
            return str(int(e))
        if e.is_Add:
            return "(" + " + ".join(self.int_code(x) for x in e.args) + ")"
        if e.is_Mul:
            return "(" + " * ".join(self.int_code(x) for x in e.args) + ")"
        return self.bound_number(e)

    def bound_number(self, e: sympy.Expr) -> str:
        """Code for a bound's non-integer number; the base cannot write one."""
        raise self.Unsupported(f"bound {e}")
