"""The Triton backend: one ``@triton.jit`` kernel per tile program, plus a torch launcher.

The kernel is rendered from the tile program, not from a softmax template:

* a program instance owns a block of rows (``BLOCK_<row>``) of one batch
  element and one value of each *grid rank* (ranks that select which keys are
  streamed, like the head ``h`` in ``K[h, m, e]`` or ``K[h // G, m, e]``);
* it loops over the key tiles the update guards leave live, carrying the
  iterative state in registers;
* every Einsum is rendered over its *vector ranks* (rows, the tile, head
  dims padded to a power of two) as Triton block operations: a sum over one
  rank of two 2-D tensors becomes ``tl.dot``, other reductions ``tl.sum`` /
  ``tl.max``, maps become elementwise code;
* values travel with *presence terms* (boolean blocks over a few ranks whose
  conjunction says where the value is present), so absent elements follow the
  contract: reductions ignore absent points, an update not computed carries the
  state, absent outputs are stored as 0.

Before → after (one statement)::

    BQK[m1,m0,p] = sum[e](Q[p,e] * BK[m1,m0,e] * scale)   where m1*M0 + m0 <= p + M - P
    ->
    q = tl.load(Q_ptr + ..., mask=rng_p[:, None] & rng_e[None, :], other=0.0)
    k = tl.load(K_ptr + ..., mask=inb_0[:, None] & rng_e[None, :], other=0.0)
    bqk = tl.dot(q, tl.trans(k.to(q.dtype))) * scale
    w_1 = (m1 * M0 + offs_m0[None, :]) <= (offs_p[:, None] + M - P)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import sympy

from .. import __version__
from ..einsum_ir.exprs import walk
from ..einsum_ir.ir import (Access, Binary, Call, Const, Einsum, Expr, Index, IterativeEinsum,
                            Num, Param, Reduce, Size, Unary)
from ..einsum_ir.kernel import (ROW_FIRST, ROW_LAST, Kernel, KernelModule, Program,
                                RankRoles as Ranks, TileBounds)
from ..einsum_ir.printer import format_number, print_definition, print_statement
from ..einsum_ir.types import INT, type_env
from ..passes.capabilities import refuse_unsupported_subscripts
from ..passes.tile import NotTileable, TileProgram
from ..passes.tile_loads import expand_loads as _expand_loads, expanded_body
from .kernel_common import (KernelValue, Term, TileRendererBase, _indirect, _integer_affine,
                            _merge_terms, _nonneg, chain_spec, constant_code, in_own_range,
                            launcher_signature, plan_reads, py_literal, rendered_kernels,
                            split_affine_bias)
from .numpy_backend import pyname, size_code

TEMPLATES = Path(__file__).resolve().parent.parent / "templates" / "triton"
COMMON = TEMPLATES.parent / "common"


def _in_bounds(sub: Expr, code: str, rank: str) -> str:
    """Triton code for 'subscript ``sub`` (rendered ``code``) lies inside ``rank``'; a
    subscript that is never negative (``m // PG``) needs no lower bound."""
    if _nonneg(sub):
        return f"({code} < {pyname(rank)})"
    return f"({code} >= 0) & ({code} < {pyname(rank)})"


class TritonUnsupported(NotTileable):
    """The tile program uses something this renderer cannot express yet."""


@dataclass(frozen=True)
class TVal(KernelValue):
    """A rendered Triton value (a block or a scalar)."""

    raw: str | None = None   # a load in its own dtype (for tl.dot operands)
    exact: bool = False      # a comparison of integers (and conjunctions of them)
    # (base, factor, signed): the value is ``base * factor`` with ``factor`` a scalar of the
    # kernel's arguments, so a consumer may fold the factor into its own constant;
    # ``signed``: the launcher can evaluate the factor (numbers and parameters), so a
    # kernel may specialise on its sign (:meth:`KernelRenderer.sign_flag`)
    scaled: tuple[str, str, bool] | None = None
    # where these terms fail, the value is its reduction's identity ``identity`` at every
    # point (a sum of operands zeroed there is 0, a max -inf): an update that adds it (or
    # takes the max with it) leaves the state as it was without a select
    vanishes: tuple = ()
    identity: str | None = None


LOG2E = "1.4426950408889634"


def _launcher_scalar(e: Expr) -> bool:
    """A scalar of numbers and parameters whose kernel code is also launcher code."""
    if isinstance(e, Binary):
        return e.op in ("*", "/", "+", "-") and _launcher_scalar(e.left) and _launcher_scalar(e.right)
    if isinstance(e, Unary):
        return e.op == "-" and _launcher_scalar(e.operand)
    return isinstance(e, (Num, Param))


def _argument_scalar(e: Expr) -> bool:
    """A scalar the kernel's arguments decide (numbers, parameters, sizes), rendered as one
    expression (not ``**``, which names its parts): the same on every tile, so code that
    uses it may move before the loop."""
    return all(isinstance(n, (Num, Param, Size, Const, Binary, Unary, Call))
               and not (isinstance(n, Binary) and n.op == "**") for n in walk(e))


@dataclass
class KernelRenderer(TileRendererBase):
    """Renders one tile program as a Triton kernel body (lines of Python)."""

    Unsupported = TritonUnsupported
    Value = TVal
    OUTER_FACTORS = True
    FUNCTIONS = {
        "exp": "tl.exp({x})", "exp2": "tl.exp2({x})", "log": "tl.log({x})",
        "log2": "tl.log2({x})", "sqrt": "tl.sqrt({x})", "rsqrt": "tl.rsqrt({x})",
        "tanh": "(2.0 * tl.sigmoid(2.0 * {x}) - 1.0)", "sigmoid": "tl.sigmoid({x})",
        "abs": "tl.abs({x})", "relu": "tl.maximum({x}, 0.0)",
    }
    MINMAX = "tl.{fn}imum({a}, {b})"
    UNAVAILABLE = "in registers here"
    IMAX, IMIN = "tl.maximum", "tl.minimum"
    ROW_NAMES = {ROW_FIRST: "p_first", ROW_LAST: "p_last"}

    tp: TileProgram
    lines: list[str] = field(default_factory=list)
    count: int = 0
    memo: dict = field(default_factory=dict)

    ranks: Ranks | None = None          # the kernel's rank roles (map-ranks)
    bounds: TileBounds | None = None    # its tile ranges (bound-tiles)
    # "": the kernel probes its block mask per tile; "use": it reads a plan's tile classes
    # instead (the planned twin); "make": it is the planner that writes them
    plan: str = ""

    def __post_init__(self):
        self.full_tiles = False          # rendering the loop over tiles that need no mask
        self.holds_on_full_tiles: set = set()
        self.blocked_index = None
        self.hoisted: list[str] = []
        self.hoisted_memo: dict = {}
        self.in_loop = False
        self.hoist_guards = False        # updates leave out invariant terms (loop_bodies)
        self.update_guards: list = []    # the invariant terms each update left out
        self.sign_flags: dict[str, str] = {}  # launcher code -> its flag (a sign, a page alignment)
        self.uniform_pages = False  # subscript(): an aligned tile's page number as a scalar
        self.trust_index = False    # a full tile whose index probe held: no index presence
        self.trusted = None         # (probe body, probe, body) of full tiles trusting their pages
        self.blocks: set = set()         # layouts of the blocks loaded and reduced
        self.has_dot = False             # some reduction is a tl.dot (rows at least 16)
        self.dots: set = set()           # the tile's products (each once, however rendered)
        self.segment = False             # a stream-K worker: the tile loop runs one segment
        self.outputs: list = []          # what the kernel stores (set by the kernel builder)
        self.defn = self.tp.cascade
        self.loads, self.body = expanded_body(self.tp)
        self.pack = self.ranks.packing
        if self.bounds is not None:
            self.holds_on_full_tiles = set(self.bounds.full_holds)
        self.values: dict[str, TVal] = {}     # tensor -> register value (this tile / prologue)
        self.state_prev: dict[str, TVal] = {}
        self.inputs = {a.name: a for a in self.defn.tensor_args}
        self.check_supported()

    # --- helpers ------------------------------------------------------------
    def emit(self, line: str) -> None:
        self.lines.append(line)

    def expand(self, code: str, layout: tuple[str, ...], target: tuple[str, ...]) -> str:
        if layout == target or not layout:
            return code
        idx = ", ".join(":" if r in layout else "None" for r in target)
        return f"({code})[{idx}]"

    def shape(self, layout) -> str:
        return "[" + ", ".join(f"BLOCK_{r}" for r in layout) + "]"

    def check_supported(self):
        vec = set(self.ranks.vector)
        for st in self.body + self.tp.epilogue + self.tp.prologue:
            for red in walk(st.expr):
                if isinstance(red, Reduce) and not set(red.ranks) <= vec:
                    raise TritonUnsupported(f"reduction over a grid rank in {st.tensor}")
        if len([r for r in self.ranks.vector]) > 6:
            raise TritonUnsupported("too many vector ranks")

    # --- index variables ---------------------------------------------------------
    def offs(self, r: str) -> str:
        return f"offs_{r.lower()}"

    def size(self, r: str) -> str:
        """A rank's size (a kernel argument)."""
        return pyname(r)

    def index_code(self, r: str, layout) -> tuple[str, tuple[str, ...]]:
        """(code, layout) of index variable r's integer values."""
        if r == self.ranks.loop:
            return r.lower(), ()
        if self.pack and r in (self.pack.rank, self.ranks.row):  # per row of the packed block
            return f"pk_{r.lower()}", (self.ranks.row,)
        if r in self.ranks.grid:
            return f"idx_{r.lower()}", ()
        return self.offs(r), (r,)

    def range_term(self, r: str) -> Term | None:
        if r == self.ranks.tile or r == self.ranks.loop or r in self.ranks.grid:
            return None
        return Term(f"rng_{r.lower()}", (r,))

    # --- expressions -----------------------------------------------------------
    def subscript(self, e: Expr) -> tuple[str, tuple[str, ...]]:
        """An affine subscript: (code, layout)."""
        if self.pack and e == self.pack.divisor:
            return "idx_pk", ()  # h // G is the program's K/V head
        if isinstance(e, Index):
            return self.index_code(e.rank, ())
        if isinstance(e, Size):
            return pyname(e.rank), ()
        if isinstance(e, Num):
            return str(int(e.value)), ()
        if isinstance(e, Unary):
            c, lay = self.subscript(e.operand)
            return f"(-{c})", lay
        if isinstance(e, Access):  # an index tensor's element: a gather (kernel_common)
            v = self.index_element(e)
            return v.code, v.layout
        if isinstance(e, Binary):
            a, la = self.subscript(e.left)
            b, lb = self.subscript(e.right)
            lay = self.canon(set(la) | set(lb))
            a, b = self.expand(a, la, lay), self.expand(b, lb, lay)
            if e.op in ("//", "%") and not _nonneg(e.left):  # Triton's truncate toward zero
                return (self.floor_div(a, b) if e.op == "//" else self.floor_mod(a, b)), lay
            general = f"({a} {e.op} {b})"
            if self.uniform_pages:
                page = self.page_index(e)
                if page is not None:
                    return page, ()
            return (self.page_aligned(e, general) or general), lay
        raise TritonUnsupported(f"subscript {e}")

    def page_flags(self, e: Binary) -> tuple[str, str] | None:
        """``(ALIGNED_PG, PAGE_PG)``, the launcher's flags for ``(m1 * M0 + m0) // PG`` or
        ``... % PG`` over a tile of keys (:meth:`page_aligned`); None for other subscripts."""
        r = self.ranks
        if r.tile is None or self.tp.tile_size is None or not isinstance(e.right, Size):
            return None
        tiled = Binary("+", Binary("*", Index(r.loop), Size(r.tile)), Index(r.tile))
        if e.op not in ("//", "%") or e.left != tiled:
            return None
        size, tile = pyname(e.right.rank), self.tp.tile_size
        aligned = self.sign_flags.setdefault(f"int({size} > 0 and {size} % {tile} == 0)",
                                             f"ALIGNED_{size}")
        page = self.sign_flags.setdefault(
            f"({size} if {size} > 0 and ({size} % {tile} == 0 or {tile} % {size} == 0) else 0)",
            f"PAGE_{size}")
        return aligned, page

    def page_index(self, e: Binary) -> str | None:
        """Under ``ALIGNED_PG``, the tile's one page number ``(m1 * M0) // PAGE_PG`` (a
        scalar: :meth:`emit_load` reads the page table once per tile with it)."""
        flags = self.page_flags(e)
        if flags is None or e.op != "//":
            return None
        return f"(({self.ranks.loop.lower()} * BLOCK_{self.ranks.tile}) // {flags[1]})"

    def page_aligned(self, e: Binary, general: str) -> str | None:
        """``(m1 * M0 + m0) // PG`` and ``... % PG`` over a tile of keys, specialised by two
        ``tl.constexpr`` flags the launcher sets from the sizes (``general`` where neither
        holds: a division per row).

        ``ALIGNED_PG`` (``PG % M0 == 0``: the tile divides the page): the whole tile lies in
        one page, so its page-table entry is one value (a broadcast scalar: one address per
        tile) and its rows are contiguous in the page, which Triton's axis analysis sees::

            PT[b, (m1 * M0 + m0) // PG]  ->  PT[b, (m1 * M0) // PAGE_PG]   (one value per tile)
            KC[.., (m1 * M0 + m0) % PG]  ->  KC[.., (m1 * M0) % PAGE_PG + m0]

        ``PAGE_PG`` (the page size itself where either divides the other, else 0) makes the
        divisions by it shifts or multiplications, not runtime divisions; where the page
        divides the tile, the tile starts a page and spans ``M0 / PG`` whole pages::

            PT[b, (m1 * M0 + m0) // PG]  ->  PT[b, (m1 * M0) // PG + m0 // PAGE_PG]
            KC[.., (m1 * M0 + m0) % PG]  ->  KC[.., m0 % PAGE_PG]
        """
        flags = self.page_flags(e)
        if flags is None:
            return None
        (aligned, page), r = flags, self.ranks
        start = f"{r.loop.lower()} * BLOCK_{r.tile}"
        m0 = self.offs(r.tile)
        if e.op == "//":
            return (f"(tl.full([BLOCK_{r.tile}], ({start}) // {page}, tl.int32) if {aligned} else "
                    f"((({start}) // {page} + {m0} // {page}) if {page} else {general}))")
        return (f"((({start}) % {page} + {m0}) if {aligned} else "
                f"(({m0} % {page}) if {page} else {general}))")

    def emit_load(self, e: Access, index: bool = False) -> TVal:
        """``tl.load`` of an input block, masked by its ranges and bounds (see
        :meth:`TileRendererBase.load`); ``index``: an index tensor's elements as int64."""
        name = e.tensor
        arg = self.inputs[name]
        parts = []
        terms = []
        for k, (sub, rank) in enumerate(zip(e.subscripts, arg.ranks)):
            code, lay = self.subscript(sub)
            parts.append((code, lay, k))
            trusted = self.trust_index and not index and _indirect(sub)
            if not trusted:  # (a full tile's index probe checked the index presence)
                terms += self.index_terms(sub)
            if trusted:
                pass
            elif isinstance(sub, Index) and sub.rank == rank and sub.rank in self.ranks.vector:
                t = self.range_term(rank)
                if t:
                    terms.append(t)
            elif isinstance(sub, Index) and sub.rank == rank:
                pass  # grid/loop rank of its own size: in bounds
            elif self.full_tiles and sub == self.blocked_index and rank == self.tp.stream_rank:
                pass  # a full tile lies inside the stream rank
            elif in_own_range(sub, rank):
                pass  # m % PG over PG
            elif self.pack and sub == self.pack.divisor and rank == self.pack.units:
                pass  # h // G, G = H / HK exactly: the program's K/V head, below HK
            else:
                bounds = _in_bounds(sub, code, rank)
                if ("inb", bounds) not in self.memo:
                    inb = self.new("inb")
                    self.emit(f"{inb} = {bounds}")
                    self.memo[("inb", bounds)] = inb
                terms.append(Term(self.memo[("inb", bounds)], lay))
        layout = self.canon(set().union(*(set(p[1]) for p in parts)) if parts else set())
        self.blocks.add(layout)
        offset = " + ".join(f"{self.expand(c, lay, layout)} * stride_{name}_{k}"
                            for c, lay, k in parts) or "0"
        mask_code = self.mask_code(terms, layout)
        v = self.new(name.lower())
        if index:
            mask = f", mask={mask_code}, other=0" if mask_code else ""
            load = f"tl.load({pyname(name)}_ptr + boff_{name} + {offset}{mask}).to(tl.int64)"
            uniform = self.uniform_index_load(e, layout)
            self.emit(f"{v} = {uniform} else {load}" if uniform else f"{v} = {load}")
            return TVal(v, layout, _merge_terms(terms), loaded=True, is_int=True)
        mask = f", mask={mask_code}, other=0.0" if mask_code else ""
        self.emit(f"{v} = tl.load({pyname(name)}_ptr + boff_{name} + {offset}{mask})")
        return TVal(f"{v}.to(tl.float32)", layout, _merge_terms(terms), loaded=True, raw=v)

    def uniform_index_load(self, e: Access, layout) -> str | None:
        """An index tensor read at a tile's page number, ``PT[b, (m1 * M0 + m0) // PG]``:
        the code ``(BROADCAST) if ALIGNED_PG`` to put before the block load's ``else``, where
        BROADCAST is one scalar load of the tile's entry broadcast over the block (the flag:
        the tile lies in one page), so every value and mask made from it is one scalar,
        whatever layout reads it.  None for other reads."""
        if not layout or not any(isinstance(n, Binary) and self.page_index(n) is not None
                                 for sub in e.subscripts for n in walk(sub)):
            return None
        flag = next(self.page_flags(n)[0] for sub in e.subscripts for n in walk(sub)
                    if isinstance(n, Binary) and self.page_index(n) is not None)
        self.uniform_pages = True
        try:
            arg, offsets, bounds = self.inputs[e.tensor], [], []
            for k, (sub, rank) in enumerate(zip(e.subscripts, arg.ranks)):
                code, lay = self.subscript(sub)
                if lay:
                    return None
                offsets.append(f"{code} * stride_{e.tensor}_{k}")
                if not (isinstance(sub, Index) and sub.rank == rank):
                    bounds.append(_in_bounds(sub, code, rank))
        finally:
            self.uniform_pages = False
        mask = f", mask={' & '.join(bounds)}, other=0" if bounds else ""
        return (f"(tl.zeros({self.shape(layout)}, tl.int64) + tl.load({pyname(e.tensor)}_ptr + "
                f"boff_{e.tensor} + {' + '.join(offsets)}{mask}).to(tl.int64)) if {flag}")

    def mask_code(self, terms, layout) -> str | None:
        """The conjunction of presence terms over ``layout`` (named once per tile).  Terms
        of one layout are joined at that layout before one broadcast (Triton does not
        reassociate ``&``), scalars into the narrowest block::

            w[None, :] & inb_7[None, :] & inb_9[None, :]  ->  ((w & inb_7 & inb_9))[None, :]
        """
        terms = tuple(t for t in terms if t is not None)
        if not terms:
            return None
        if len(terms) == 1 and (terms[0].layout == layout or not (terms[0].layout or layout)):
            return terms[0].code
        key = ("mask", terms, layout)
        if key not in self.memo:
            name = self.new("mask")
            groups: dict[tuple, list[str]] = {}
            for t in terms:
                groups.setdefault(t.layout, []).append(t.code)
            scalars = groups.pop((), [])
            parts = sorted(groups.items(), key=lambda g: len(g[0]))
            if scalars and layout:  # a scalar condition (perhaps a Python bool) joins a
                lay = parts[0][0] if parts else layout  # block of int1, the narrowest one
                full = f"(tl.full({self.shape(lay)}, 1, tl.int1) & {' & '.join(scalars)})"
                parts = [(lay, [full] + (parts[0][1] if parts else []))] + parts[1:]
                scalars = []
            blocks = [self.expand(codes[0] if len(codes) == 1 else f"({' & '.join(codes)})", lay,
                                  layout) for lay, codes in parts]
            code = " & ".join(blocks + scalars)
            self.emit(f"{name} = {code}")
            self.memo[key] = name
        return self.memo[key]

    def previous_state(self, t: str) -> TVal:
        """State ``t`` before this step."""
        return self.state_prev[t]

    def number_value(self, e: Num) -> TVal:
        return TVal(format_number(float(e.value)), ())

    def constant_value(self, e: Const) -> TVal:
        return TVal("float('inf')" if e.name == "inf" else "3.141592653589793", ())

    def size_value(self, e: Size) -> TVal:
        return TVal(pyname(e.rank), ())

    def param_value(self, e: Param) -> TVal:
        return TVal(pyname(e.name), ())

    def index_value(self, e: Index) -> TVal:
        code, lay = self.index_code(e.rank, ())
        return TVal(f"({code}).to(tl.float32)" if lay else code, lay)

    def unary(self, e: Unary, st) -> TVal:
        x = self.value(e.operand, st)
        if e.op == "-":
            return dataclasses.replace(x, code=f"(-{x.code})", loaded=False)
        return TVal(f"({x.code} == 0)", x.layout, x.terms, is_bool=True)

    def binary(self, e: Binary, st) -> TVal:
        split = split_affine_bias(e, self.ranks.tile) if self.in_loop else None
        if split is not None and type_env(self.defn).of(e) != INT:
            return self.value(split, st)
        exact = self.int_comparison(e) if e.op in ("<", "<=", ">", ">=", "==", "!=") else None
        if exact is not None:  # integers from index tensors: compared as integers
            ac, la, bc, lb, terms = exact
            lay = self.canon(set(la) | set(lb))
            return TVal(f"({self.expand(ac, la, lay)} {e.op} {self.expand(bc, lb, lay)})", lay,
                        terms, is_bool=True, exact=True)
        a, b = self.value(e.left, st), self.value(e.right, st)
        lay = self.canon(set(a.layout) | set(b.layout))
        ac, bc = self.expand(a.code, a.layout, lay), self.expand(b.code, b.layout, lay)
        terms = _merge_terms(a.terms, b.terms)
        if e.op in ("and", "or"):
            op = "&" if e.op == "and" else "|"
            ac = ac if a.is_bool else f"({ac} != 0)"
            bc = bc if b.is_bool else f"({bc} != 0)"
            # the interpreter's 0-d int1 of a float compare joins nothing: a plain int1
            ac = f"(tl.where({ac}, 1, 0) != 0)" if not a.layout and not a.exact else ac
            bc = f"(tl.where({bc}, 1, 0) != 0)" if not b.layout and not b.exact else bc
            return TVal(f"({ac} {op} {bc})", lay, terms, is_bool=True, exact=a.exact and b.exact)
        if e.op in ("<", "<=", ">", ">=", "==", "!="):
            exact = _integer_affine(e.left) and _integer_affine(e.right)
            if exact:
                (ia, la), (ib, lb) = self.subscript(e.left), self.subscript(e.right)
                lay = self.canon(set(la) | set(lb))
                ac, bc = self.expand(ia, la, lay), self.expand(ib, lb, lay)
            return TVal(f"({ac} {e.op} {bc})", lay, terms, is_bool=True, exact=exact)
        if e.op == "**":
            if isinstance(e.right, Num) and float(e.right.value) == 2.0:
                return TVal(f"({ac} * {ac})", lay, terms)
            ac, bc = self.float_code(a, lay), self.float_code(b, lay)
            return TVal(self.power(ac, bc), lay, terms)
        if e.op == "//":
            return TVal(f"tl.floor({ac} / {bc})", lay, terms)
        if a.is_bool:
            ac = f"{ac}.to(tl.float32)"
        if b.is_bool:
            bc = f"{bc}.to(tl.float32)"
        return TVal(f"({ac} {e.op} {bc})", lay, terms, scaled=self.scaled_product(e, a, b))

    def scaled_product(self, e: Binary, a: TVal, b: TVal) -> tuple[str, str, bool] | None:
        """``block * s`` (or ``s * block``) with ``s`` a scalar of the arguments: the block
        (or its own base) and the factor, for :attr:`TVal.scaled`."""
        if e.op != "*":
            return None
        for x, y, ye in ((a, b, e.right), (b, a, e.left)):
            if x.layout and not y.layout and _argument_scalar(ye) and not (
                    x.is_bool or x.is_int or y.is_bool or y.is_int):
                signed = _launcher_scalar(ye)
                if x.scaled:
                    return x.scaled[0], f"({x.scaled[1]} * {y.code})", x.scaled[2] and signed
                return x.code, y.code, signed
        return None

    def float_code(self, x: TVal, layout) -> str:
        """``x`` over ``layout``, a boolean or an integer as float (``* 1.0`` also converts
        a ``tl.constexpr`` size, which has no ``.to``)."""
        code = self.expand(x.code, x.layout, layout)
        if x.is_bool:
            return f"{code}.to(tl.float32)"
        return f"({code} * 1.0)" if x.is_int else code

    def call(self, e: Call, st) -> TVal:
        """``exp`` as ``exp2`` with log2(e) folded into the argument's scalar factors
        (:meth:`log2e_value`); ``tanh`` with the hardware's approximation (``_tanh``)."""
        if e.fn == "exp":
            x = self.log2e_value(e.args[0], st)
            if x is not None and x.layout:
                return TVal(f"_exp2({x.code})", x.layout, x.terms)
        if e.fn == "tanh":
            x = self.value(e.args[0], st)
            if x.layout and not (x.is_bool or x.is_int):
                return TVal(f"_tanh({x.code}, INPUT_PRECISION)", x.layout, x.terms)
        return super().call(e, st)

    def log2e_value(self, e: Expr, st) -> TVal | None:
        """``e * log2(e)``, distributed over ``+`` and ``-`` so that a scaled block takes
        the constant into its factor (one multiply-add per element with the subtrahend)
        and a row vector is scaled before it is broadcast; None for a boolean or integer
        operand.

        Before → after::

            tl.exp(bqk - rm[:, None])   with bqk = dot * scale
            ->
            _exp2(dot * scale_l2e - (rm * 1.4426950408889634)[:, None])
        """
        if isinstance(e, Binary) and e.op in ("+", "-"):
            a, b = self.log2e_value(e.left, st), self.log2e_value(e.right, st)
            if a is None or b is None:
                return None
            lay = self.canon(set(a.layout) | set(b.layout))
            return TVal(f"({self.expand(a.code, a.layout, lay)} {e.op} "
                        f"{self.expand(b.code, b.layout, lay)})", lay,
                        _merge_terms(a.terms, b.terms))
        if isinstance(e, Unary) and e.op == "-":
            a = self.log2e_value(e.operand, st)
            return None if a is None else dataclasses.replace(a, code=f"(-{a.code})")
        v = self.value(e, st)
        if v.is_bool or v.is_int:
            return None
        if v.scaled:
            return TVal(f"({v.scaled[0]} * {self.invariant_scalar(f'({v.scaled[1]} * {LOG2E})')})",
                        v.layout, v.terms)
        return TVal(f"({v.code} * {LOG2E})", v.layout, v.terms)

    def invariant_scalar(self, code: str) -> str:
        """A scalar of the arguments, named once before the loop."""
        key = ("scalar", code)
        memo = self.hoisted_memo if self.in_loop else self.memo
        if key not in memo:
            name = self.new("c")
            (self.hoisted if self.in_loop else self.lines).append(f"{name} = {code}")
            memo[key] = name
        return memo[key]

    def select(self, args: list[TVal], layout, terms) -> TVal:
        codes = [self.expand(a.code, a.layout, layout) for a in args]
        c = codes[0] if args[0].is_bool else f"({codes[0]} != 0)"
        return TVal(f"tl.where({c}, {codes[1]}, {codes[2]})", layout, terms)

    # --- where filters -------------------------------------------------------------
    def where_holds(self, cond: Expr) -> bool:
        """On the loop over full tiles, the conditions that hold at every point of them."""
        return self.full_tiles and cond in self.holds_on_full_tiles

    def where_term(self, c: TVal) -> Term:
        """A ``where`` condition's value as a named mask (absent points do not pass)."""
        code = c.code if c.is_bool else f"({c.code} != 0)"
        w = self.new("w")
        if c.terms:
            code = f"{code} & {self.mask_code(c.terms, c.layout)}"
        if not c.layout and not c.exact:  # the interpreter's 0-d int1 of a float compare
            code = f"tl.where({code}, 1, 0) != 0"  # joins no block: make it a plain int1
        self.emit(f"{w} = {code}")
        return Term(w, c.layout)

    # --- reductions ---------------------------------------------------------------
    def reduction(self, e: Reduce, body: TVal, lay, terms: list[Term]) -> TVal:
        """``tl.sum`` / ``tl.max`` / ``tl.min`` of ``body`` over ``lay``, absent points
        filled with the reduction's identity (see :meth:`TileRendererBase.reduce`)."""
        fill = {"sum": "0.0", "max": "float('-inf')", "min": "float('inf')"}[e.op]
        code = self.expand(body.code, body.layout, lay)
        if body.layout != lay and _number(code):  # (a constant body: max[p0](1))
            code = f"tl.full({self.shape(lay)}, {code}, tl.float32)"
        elif body.layout != lay:
            code = f"tl.broadcast_to({code}, {self.shape(lay)})"
        # only terms along the reduced ranks change which points count; the others stay
        # in the result's presence (their lanes are absent whatever the reduction gives)
        mask = self.mask_code([t for t in terms if set(t.layout) & set(e.ranks)], lay)
        self.blocks.add(lay)
        code, out_layout = self.reduce_code(e, code, mask, fill, lay)
        v = self.new(e.op)
        if e.op in ("max", "min") and body.scaled and body.scaled[2] and body.layout == lay:
            # max(x * s) = max(x) * s for s > 0 (rounding is monotone): one multiply per
            # row, not per element; the kernel is specialised on the sign of s
            base, factor, _ = body.scaled
            unscaled, _ = self.reduce_code(e, base, mask, fill, lay)
            self.emit(f"if {self.sign_flag(factor)}:")
            self.emit(f"    {v} = {unscaled} * {factor}")
            self.emit("else:")
            self.emit(f"    {v} = {code}")
        else:
            self.emit(f"{v} = {code}")
        presence = self.reduce_presence(tuple(terms), set(e.ranks))
        return TVal(v, out_layout, presence, identity=fill,
                    vanishes=tuple(t for t in presence if t not in set(terms)))

    def reduce_code(self, e: Reduce, code: str, mask: str | None, fill: str, lay):
        """Code reducing block ``code`` over ``lay`` along ``e``'s ranks (the points outside
        ``mask`` as ``fill``), and the result's layout."""
        if mask:
            code = f"tl.where({mask}, {code}, {fill})"
        out_layout = lay
        for r in sorted(e.ranks, key=lambda r: -lay.index(r)):
            axis = out_layout.index(r)
            code = f"tl.{e.op}({code}, axis={axis})"
            out_layout = tuple(x for x in out_layout if x != r)
        return code, out_layout

    def sign_flag(self, factor: str) -> str:
        """A ``tl.constexpr`` the launcher sets to ``factor > 0`` (so both signs compile to
        straight code; :attr:`sign_flags`)."""
        if factor not in self.sign_flags:
            self.sign_flags[factor] = f"POSITIVE_{len(self.sign_flags)}"
        return self.sign_flags[factor]

    def any_term(self, inner: list[Term], ranks: set[str]) -> Term:
        """Whether some point along ``ranks`` has all ``inner`` terms: a max over them."""
        lay = self.canon(set().union(*(set(t.layout) for t in inner)))
        code = self.mask_code(inner, lay)
        if set(lay) - ranks == set():
            # only the reduced ranks: a scalar "some point exists"
            code = f"tl.broadcast_to({code}, {self.shape(lay)})"
        out_layout = lay
        for r in sorted(ranks & set(lay), key=lambda r: -lay.index(r)):
            code = f"tl.max(({code}).to(tl.int32), axis={out_layout.index(r)})"
            out_layout = tuple(x for x in out_layout if x != r)
        name = self.new("any")
        self.emit(f"{name} = ({code}) > 0")
        return Term(name, out_layout)

    def dot(self, e: Reduce, st) -> TVal | None:
        """``sum[r](A[a,r] * B[r,b] * c)`` as ``tl.dot``; None when not that shape."""
        m = self.match_dot(e, st)
        if m is None:
            return None
        outer = [self.value(f, st) for f in m.outer]
        if not all(set(o.layout) <= {m.ra, m.rb} and not o.is_bool for o in outer):
            return None
        self.has_dot = True
        self.dots.add(repr(e))
        r, ra, rb = m.r, m.ra, m.rb
        ac = self.operand(m.a, (ra, r), r)
        bc = self.operand(m.b, (r, rb), r)
        v = self.new("dot")
        lhs, rhs = self.dot_operands(m.a, ac, m.b, bc)
        self.emit(f"{v} = tl.dot({lhs}, {rhs}, input_precision=INPUT_PRECISION)")
        out = (ra, rb)
        layout = self.canon({ra, rb})
        code = v if out == layout else f"tl.trans({v})"
        base, factor = code, None
        for s in m.scalars:
            sv = self.value(s, st)
            code = f"({code} * {sv.code})"
            factor = sv.code if factor is None else f"({factor} * {sv.code})"
        scaled = (base, factor, all(map(_launcher_scalar, m.scalars))) \
            if factor and all(map(_argument_scalar, m.scalars)) else None
        for o in outer:  # a factor constant along r multiplies the product
            code = f"({code} * {self.float_code(o, layout)})"
            scaled = None
        a_terms, b_terms = self.dot_input_terms(m)
        presence = self.dot_presence(a_terms, b_terms, r, ra, rb, layout)
        inputs = set(a_terms) | set(b_terms)  # the operands are zero where the rest fail
        # (an outer factor may be inf where the product is 0: no claim then)
        vanishes = () if outer else tuple(t for t in presence if t not in inputs)
        presence = _merge_terms(presence, *(o.terms for o in outer))
        return TVal(code, layout, presence, scaled=scaled, identity="0.0", vanishes=vanishes)

    def masked_operand(self, x: TVal, filt: Term) -> TVal:
        """``x`` under a ``where`` term (a load keeps its own dtype for ``tl.dot``)."""
        return dataclasses.replace(x, terms=_merge_terms(x.terms, (filt,)), loaded=False,
                                   code=x.raw or x.code if x.loaded else x.code)

    def both_present(self, a_terms, b_terms, r, ra, rb, layout) -> Term:
        """Some r where both operands are present: a dot of their masks (see
        :meth:`TileRendererBase.dot_presence`)."""
        ma = self.mask_code([t for t in a_terms if r in t.layout], (ra, r) if (ra, r) == self.canon({ra, r}) else self.canon({ra, r}))
        mb = self.mask_code([t for t in b_terms if r in t.layout], self.canon({r, rb}))
        la, lb = self.canon({ra, r}), self.canon({r, rb})
        ma = ma if la == (ra, r) else f"tl.trans({ma})"
        mb = mb if lb == (r, rb) else f"tl.trans({mb})"
        name = self.new("anydot")
        self.emit(f"{name} = tl.dot(({ma}).to(tl.float16), ({mb}).to(tl.float16)) > 0")
        out = name if (ra, rb) == layout else f"tl.trans({name})"
        return Term(out, layout)

    def operand(self, x: TVal, want: tuple[str, str], summed: str) -> str:
        """A dot operand laid out as ``want``, zero where it is absent along ``summed``."""
        code = x.raw if x.loaded else x.code
        along = [t for t in x.terms if summed in t.layout] if not x.loaded else []
        if along:
            code = f"tl.where({self.mask_code(along, x.layout)}, {code}, 0.0)"
        if x.layout != want:
            code = f"tl.trans({code})"
        return code

    def dot_operands(self, a: TVal, ac: str, b: TVal, bc: str) -> tuple[str, str]:
        """Tensor-core friendly operand types: match a loaded 16-bit operand's dtype."""
        if a.raw:
            return f"({ac}).to({a.raw}.dtype)", f"({bc}).to({a.raw}.dtype)"
        if b.raw:
            return f"({ac}).to({b.raw}.dtype)", f"({bc}).to({b.raw}.dtype)"
        return ac, bc

    # --- statements --------------------------------------------------------------
    def lhs_layout(self, st) -> tuple[str, ...]:
        packed = {self.ranks.row} if self.pack and self.pack.rank in st.lhs else set()
        return self.canon({r for r in st.lhs if r in self.ranks.vector} | packed)

    def statement(self, st) -> None:
        self.emit(f"# {print_statement(st)}")
        val = self.value(st.expr, st)
        filt = self.filter_term(st, set(st.lhs) - ({st.iter_rank} if isinstance(st, IterativeEinsum) and st.init else set()))
        terms = _merge_terms(val.terms, (filt,) if filt else ())
        layout = self.lhs_layout(st)
        code = self.expand(val.code, val.layout, layout)
        if val.layout != layout:
            code = f"tl.broadcast_to({code}, {self.shape(layout)})" if layout else code
        if val.is_bool:
            code = f"({code}).to(tl.float32)"
        name = pyname(st.tensor).lower()
        if isinstance(st, IterativeEinsum) and st.init:
            init_code = f"tl.full({self.shape(layout)}, {val.code}, tl.float32)" if not val.layout and layout else code
            self.emit(f"{name} = {init_code}")
            if terms:
                raise TritonUnsupported(f"the init of {st.tensor} may be absent")
            self.values[st.tensor] = TVal(name, layout, ())
            return
        if isinstance(st, IterativeEinsum):
            ranges = {self.range_term(r) for r in self.ranks.vector}
            terms = tuple(t for t in terms if t and t not in ranges)
            if self.hoist_guards:  # tested once before the loop (render)
                self.update_guards.append(frozenset(t for t in terms if t.invariant))
                terms = tuple(t for t in terms if not t.invariant)
            unguarded = self.unguarded_update(st, terms, layout) if terms else None
            if unguarded is not None:
                new = unguarded
            else:
                mask = self.mask_code(terms, layout)
                new = f"tl.where({mask}, {code}, {name})" if mask else code
            self.emit(f"{name} = {new}")
            self.values[st.tensor] = TVal(name, layout, ())
            return
        self.emit(f"{name} = {code}")
        same = val.layout == layout and not val.is_bool
        self.values[st.tensor] = TVal(name, layout, terms, is_bool=False,
                                      scaled=val.scaled if same else None,
                                      vanishes=val.vanishes if same else (),
                                      identity=val.identity if same else None)
        stepped = [o for o in self.stepped_outputs() if o.name == st.tensor]
        if self.in_loop and stepped:  # a value per step (the chunked scan's PKV[m1,e,f])
            self.lines += _store_lines(self, stepped)

    def unguarded_update(self, st, guards, layout) -> str | None:
        """An update whose guards all fail exactly where the value it adds (or takes the
        max / min with) is that operation's identity, as code without a block select:
        the state then comes out unchanged anyway.  With a factor on the state, the guard
        moves onto the factor (one select per row, not per element), so a matrix product
        accumulates straight into the state (``acc = dot(p, v, acc * alpha)``).  None when
        the update is not of that form.

        Before → after::

            rnv = tl.where(any_1[:, None], slnv + rnv_prev * prm[:, None], rnv)
            ->
            rnv = slnv + rnv_prev * tl.where(any_1, prm, 1.0)[:, None]
        """
        e, g = st.expr, set(guards)

        def state(x) -> bool:
            return isinstance(x, Access) and x.tensor == st.tensor

        def vanishing(x, identity) -> TVal | None:
            if not isinstance(x, Access) or x.tensor in self.tp.state or x.tensor in self.inputs:
                return None
            v = self.value(x, st)
            return v if v.identity == identity and g <= set(v.vanishes) else None

        if isinstance(e, Call) and e.fn in ("max", "min") and len(e.args) == 2:
            fill = "float('-inf')" if e.fn == "max" else "float('inf')"
            for x, a in (e.args, e.args[::-1]):
                if state(x) and vanishing(a, fill) is not None:
                    return self.expand(self.value(e, st).code, self.value(e, st).layout, layout)
        if not (isinstance(e, Binary) and e.op == "+"):
            return None
        for a, rest in ((e.left, e.right), (e.right, e.left)):
            av = vanishing(a, "0.0")
            if av is None:
                continue
            if state(rest):
                return self.expand(self.value(e, st).code, self.value(e, st).layout, layout)
            if not (isinstance(rest, Binary) and rest.op == "*"):
                continue
            for x, c in ((rest.left, rest.right), (rest.right, rest.left)):
                cv = self.value(c, st)
                if not state(x) or cv.is_bool or cv.is_int:
                    continue
                if not set().union(*(set(t.layout) for t in g)) <= set(cv.layout):
                    continue
                xv = self.value(x, st)
                factor = f"tl.where({self.mask_code(tuple(guards), cv.layout)}, {cv.code}, 1.0)"
                return (f"({self.expand(av.code, av.layout, layout)} + "
                        f"{self.expand(xv.code, xv.layout, layout)} * "
                        f"{self.expand(factor, cv.layout, layout)})")
        return None

    # --- tile range from the guards (TileRendererBase.tile_bounds) --------------------
    def power(self, a: str, b: str) -> str:
        """``a ** b`` as C's ``pow`` (and numpy's): a negative base with an integer exponent
        keeps its sign (``W ** (p - m)`` with ``W < 0``), ``x ** 0`` is 1; ``exp2(b *
        log2(a))`` alone is NaN there."""
        x, y, mag = self.new("pow_a"), self.new("pow_b"), self.new("pow")
        self.emit(f"{x} = {a}")
        self.emit(f"{y} = {b}")
        self.emit(f"{mag} = tl.exp2({y} * tl.log2(tl.abs({x})))")
        whole = f"({y} == tl.floor({y}))"
        odd = f"({y} - 2.0 * tl.floor({y} * 0.5) != 0.0)"
        signed = f"tl.where({whole}, tl.where({odd}, -{mag}, {mag}), tl.log2({x}))"  # NaN
        return f"tl.where({y} == 0.0, 1.0, tl.where({x} < 0.0, {signed}, {mag}))"

    def floor_div(self, a: str, b: str) -> str:
        """Floor division for a positive divisor (Triton's ``//`` truncates toward zero)."""
        return f"((({a}) - (((({a}) % ({b})) + ({b})) % ({b}))) // ({b}))"

    def floor_mod(self, a: str, b: str) -> str:
        """The language's ``%`` (floor modulo) for a positive divisor."""
        return f"(((({a}) % ({b})) + ({b})) % ({b}))"

    def first_tile(self, k: str, c: str) -> str:
        """The least m1 with ``c*m1 + k >= 0`` (c > 0): ``ceil(-k / c) = -floor(k / c)``."""
        return f"-({self.floor_div(k, c)})"

    def float_floor(self, num: str, den: str, offset: int) -> str:
        return f"(({num}) / {den}).to(tl.int32) {'+' if offset >= 0 else '-'} {abs(offset)}"

    def bound_symbol(self, n: str) -> str:
        """A bound's symbol: an index variable (``_m1``), a parameter, a row or block
        name, or a size (a kernel argument)."""
        if n.startswith("_"):
            return f"idx_{n[1:].lower()}" if n[1:] in self.ranks.grid else n[1:].lower()
        if n.startswith("param_"):
            return pyname(n[len("param_"):])
        if n in self.ROW_NAMES:
            return self.ROW_NAMES[n]
        return n if n.startswith("BLOCK_") else pyname(n)

    def bound_number(self, e: sympy.Expr) -> str:
        if e.is_Float or e.is_Rational:
            return repr(float(e))
        raise TritonUnsupported(f"bound {e}")

    def block_probe(self) -> str | None:
        """A scalar 'some update can change a row of this block' from the data-dependent
        guards the bound-tiles stage found (a block mask computed per tile); None when
        only affine guards (tile bounds) apply."""
        r = self.ranks
        probes = self.bounds.live_probes if self.bounds is not None else ()
        if not probes:
            return None
        if self.plan == "use":
            return self.plan_bit(1)
        terms = []
        for conds in probes:
            parts = []
            for cond in conds:
                key = ("probe", cond)
                if key not in self.memo:
                    c = self.value(cond, Einsum("_probe", (), cond))
                    code = c.code if c.is_bool else f"({c.code} != 0)"
                    lay = self.canon(set(c.layout) | {r.row, r.tile})
                    ranges = (self.range_term(r.row),)
                    mask = self.mask_code(tuple(c.terms) + ranges + (Term(code, c.layout),), lay)
                    name = self.new("live")
                    self.emit(f"{name} = tl.max(tl.max(({mask}).to(tl.int32), axis=1), axis=0) > 0")
                    self.memo[key] = name
                parts.append(self.memo[key])
            terms.append(" & ".join(parts))
        live = self.new("live")
        self.emit(f"{live} = " + " | ".join(f"({t})" for t in dict.fromkeys(terms)))
        return live

    def full_range(self) -> tuple[str, str, list] | None:
        """[lo, hi) of tiles needing no mask (the bound-tiles stage's ``full`` range), and
        the data-dependent atoms checked per tile (:meth:`all_probe`)."""
        full = self.bounds.full if self.bounds is not None else None
        if full is None:
            return None
        r = self.ranks
        self.blocked_index = Binary("+", Binary("*", Index(r.loop), Size(r.tile)), Index(r.tile))
        return self.bound_code(full.lo), self.bound_code(full.hi), list(self.bounds.full_probes)

    def all_probe(self, atoms) -> str:
        """A scalar 'every atom holds at every point of the block (valid rows)'."""
        if self.plan == "use":
            return self.plan_bit(2)
        r = self.ranks
        layout = self.canon({r.row, r.tile})
        parts = []
        for atom in atoms:
            cond = _expand_loads(atom, self.loads)
            c = self.value(cond, Einsum("_probe", (), cond))
            code = c.code if c.is_bool else f"({c.code} != 0)"
            present = self.mask_code(tuple(c.terms), c.layout)
            if present:
                code = f"({code}) & ({self.expand(present, c.layout, c.layout)})"
            parts.append(f"tl.broadcast_to({self.expand(f'({code})', c.layout, layout)}, "
                         f"{self.shape(layout)})")
        rows = self.expand(f"rng_{r.row.lower()}", (r.row,), layout)
        name = self.new("full")
        self.emit(f"{name} = tl.min(tl.min(tl.where({rows}, ({' & '.join(parts)}).to(tl.int32), 1), "
                  f"axis=1), axis=0) > 0")
        return name

    def trusted_loops(self, loop: str, full_body: list[str]) -> None:
        """The full tiles' loop twice, the tiles split once per program between them
        (:meth:`trusted_full_tiles`; no branch around or inside a loop, which would cost
        the loops their uniform registers)::

            pages_ok = (probe of every full tile)
            trust_hi = pages_ok ? full_hi : full_lo
            for m1 in range(full_lo, trust_hi):  <body without index presence>
            for m1 in range(trust_hi, full_hi):  <body with it>
        """
        probe_body, probe, trusted = self.trusted
        self.emit("pages_ok = full_lo >= 0")
        self.emit(f"for {loop} in range(full_lo, full_hi):")
        self.lines += ["    " + ln for ln in probe_body] + [f"    pages_ok = pages_ok & {probe}"]
        self.emit("trust_hi = tl.where(pages_ok, full_hi, full_lo)")
        for lo, hi, lines in (("full_lo", "trust_hi", trusted), ("trust_hi", "full_hi", full_body)):
            self.emit(f"for {loop} in range({lo}, {hi}):")
            self.lines += ["    " + ln for ln in lines]

    def index_probe(self) -> str | None:
        """In a full tile, a scalar 'every index element the tile reads is present and
        addresses a row' (the pages of a paged read are real), with the loads it needs
        emitted; None where no input is read indirectly::

            KC[PT[b, m // PG], m % PG, e]  ->  pt = PT[b, ...];  min(0 <= pt < NP)
        """
        reads = {n: None for st in self.body
                 for n in walk(st.expr if st.where is None else Binary("and", st.expr, st.where))
                 if isinstance(n, Access) and n.tensor in self.inputs
                 and any(_indirect(sub) for sub in n.subscripts)}
        terms = []
        for acc in reads:
            for sub, rank in zip(acc.subscripts, self.inputs[acc.tensor].ranks):
                if not _indirect(sub):
                    continue
                terms += self.index_terms(sub)
                code, lay = self.subscript(sub)
                if not in_own_range(sub, rank):
                    terms.append(Term(f"({_in_bounds(sub, code, rank)})", lay))
        terms = _merge_terms(terms)
        if not terms:
            return None
        name = self.new("pages")
        scalar = self.scalar_page_probe(reads)
        if scalar is not None:  # page-aligned tiles: a scalar per page, no reduction (whose
            flags, lines = scalar  # result would cost the loop its uniform registers)
            self.lines += [f"if {flags[0]}:"] + ["    " + ln.format(name=name) for ln in lines[0]]
            self.lines += [f"elif {flags[1]} * 8 >= BLOCK_{self.ranks.tile}:"]
            self.lines += ["    " + ln.format(name=name) for ln in lines[1]] + ["else:"]
            saved, self.lines = self.lines, []
        layout = self.canon(set().union(*(set(t.layout) for t in terms)))
        every = self.mask_code(terms, layout)
        reduced = f"({every}).to(tl.int32)"
        for _ in layout:
            reduced = f"tl.min({reduced}, axis=0)"
        self.emit(f"{name} = {reduced} > 0" if layout else f"{name} = ({every})")
        if scalar is not None:
            self.lines = saved + ["    " + ln for ln in self.lines]
        return name

    def scalar_page_probe(self, reads) -> tuple | None:
        """Where every indirect subscript of ``reads`` is a page-table entry at a tile's page
        (``KC[PT[b, (m1*M0 + m0) // PG], ..]``, the other subscripts one value per program):
        ``((ALIGNED_PG, PAGE_PG), (lines under ALIGNED_PG, lines where a tile spans at most 8
        pages))``, each checking its entries one scalar load at a time into ``{name}``."""
        entries = {}
        for acc in reads:
            for sub, rank in zip(acc.subscripts, self.inputs[acc.tensor].ranks):
                if not _indirect(sub):
                    continue
                if not isinstance(sub, Access) or sub.tensor not in self.inputs:
                    return None
                pages = [x for x in sub.subscripts if isinstance(x, Binary) and
                         self.page_index(x) is not None]
                if len(pages) != 1 or any(self.subscript(x)[1] for x in sub.subscripts
                                          if x is not pages[0]):
                    return None
                entries[(sub, rank)] = self.page_flags(pages[0])
        flags = set(entries.values())
        if len(flags) != 1:
            return None
        (aligned, page), = flags
        start = f"({self.ranks.loop.lower()} * BLOCK_{self.ranks.tile}) // {page}"
        lines = (["{name} = full_lo >= 0"],
                 ["{name} = full_lo >= 0",
                  f"for page_j in tl.static_range(BLOCK_{self.ranks.tile} // {page}):"])
        for (sub, rank) in entries:
            index_ranks = self.inputs[sub.tensor].ranks
            for which, at, indent in ((0, start, ""), (1, f"{start} + page_j", "    ")):
                offset, bound = [], ""
                for k, x in enumerate(sub.subscripts):
                    if isinstance(x, Binary) and self.page_index(x) is not None:
                        code = f"({at})"
                        bound = f", mask=({code} < {pyname(index_ranks[k])}), other=-1"
                    else:
                        code = self.subscript(x)[0]
                    offset.append(f"{code} * stride_{sub.tensor}_{k}")
                lines[which].append(f"{indent}page_e = tl.load({pyname(sub.tensor)}_ptr + "
                                    f"boff_{sub.tensor} + {' + '.join(offset)}{bound})")
                lines[which].append(f"{indent}{{name}} = {{name}} & (page_e >= 0) & "
                                    f"(page_e < {pyname(rank)})")
        return (aligned, page), lines

    # --- the whole kernel --------------------------------------------------------------
    def render(self) -> list[str]:
        r = self.ranks
        for st in self.tp.prologue:
            self.statement(st)
        for st in self.tp.inits:
            self.statement(st)
        if self.tp.loop_rank is None:  # a kernel without a streamed loop
            for st in self.tp.epilogue:
                self.statement(st)
            return self.lines
        lo, hi = self.tile_bounds()
        if self.segment:  # a stream-K worker runs its segment of the unit's tiles
            lo, hi = f"tl.maximum({lo}, seg_first)", f"tl.minimum({hi}, seg_stop)"
        self.emit(f"tile_lo = {lo}")
        self.emit(f"tile_hi = {hi}")
        if self.plan == "use":  # the plan's first and last live tile of this row block
            self.emit("plan_at = pid_flat.to(tl.int64) * PLAN_ROWS + pid_row")
            self.emit("tile_lo = tl.maximum(tile_lo, tl.load(plan_span_ptr + 2 * plan_at))")
            self.emit("tile_hi = tl.minimum(tile_hi, tl.load(plan_span_ptr + 2 * plan_at + 1))")
        outer, saved_memo = self.lines, self.memo
        before = (dict(self.values), dict(self.state_prev))
        body, full, full_body = self.loop_bodies(hoist_guards=True)
        guards = set(self.update_guards)
        if len(guards) == 1 and next(iter(guards)):
            # every update holds only where the same argument-decided scalars hold: test
            # them once, as an empty tile range, not as a block select per update per tile
            cond = " & ".join(sorted(t.code for t in next(iter(guards))))
            outer.append(f"tile_hi = tl.where({cond}, tile_hi, tile_lo)")
        elif len(guards) > 1:  # updates guarded differently: each keeps its own select
            self.values, self.state_prev = dict(before[0]), dict(before[1])
            body, full, full_body = self.loop_bodies(hoist_guards=False)
        self.in_loop = False
        self.lines = outer
        self.memo = saved_memo
        self.lines += self.hoisted
        if full_body is None:
            self.emit(f"for {r.loop.lower()} in range(tile_lo, tile_hi):")
            self.lines += ["    " + ln for ln in body]
        else:
            # masks only on the partial tiles: before, inside and after the full ones
            self.emit(f"full_lo = tl.minimum(tl.maximum({full[0]}, tile_lo), tile_hi)")
            self.emit(f"full_hi = tl.maximum(tl.minimum({full[1]}, tile_hi), full_lo)")
            loop = r.loop.lower()
            for lo, hi, lines in (("tile_lo", "full_lo", body), ("full_lo", "full_hi", full_body),
                                  ("full_hi", "tile_hi", body)):
                if lines is full_body and self.trusted is not None:
                    self.trusted_loops(loop, full_body)
                    continue
                self.emit(f"for {loop} in range({lo}, {hi}):")
                self.lines += ["    " + ln for ln in lines]
        for st in self.tp.epilogue:
            self.statement(st)
        return self.lines

    # --- plans: the block mask made once (NAME_plan), read by the planned twin ----------
    @property
    def probes(self) -> bool:
        """Whether the kernel probes data per tile (a block mask a plan can hold)."""
        b = self.bounds
        return b is not None and bool(b.live_probes or (b.full is not None and b.full_probes))

    def plan_bit(self, bit: int) -> str:
        """The planned twin's probe: bit ``bit`` of this tile's class in the plan (1: some
        live probe holds, 2: every full-tile data atom holds)."""
        key = ("plan", self.ranks.loop)
        if key not in self.memo:
            name = self.new("plan_cls")
            self.emit(f"{name} = tl.load(plan_ptr + plan_at * PLAN_TILES + {self.ranks.loop.lower()})")
            self.memo[key] = name
        return f"(({self.memo[key]} & {bit}) != 0)"

    def render_plan(self) -> list[str]:
        """The planner: per tile of this program's row block, its class (bit 1: some live
        probe holds, bit 2: every data atom of the full-tile ``where`` holds; the probes of
        :meth:`block_probe` and :meth:`all_probe`).  The launcher derives each row block's
        span of live tiles from the classes (``_plan_spans``).

        Before → after (a document mask's probe)::

            for m1 in range(tile_lo, tile_hi):  live = any(DOC[p] == DOC[m]);  if live: <body>
            ->  planner:  for m1 in range(PLAN_TILES): plan[at, m1] = live + 2 * every
                planned:  tile_lo, tile_hi narrowed to plan_span[at];  live = plan[at, m1] & 1
        """
        m1 = self.ranks.loop.lower()
        self.emit("plan_at = pid_flat.to(tl.int64) * PLAN_ROWS + pid_row")
        outer = self.lines
        self.lines, self.memo, self.in_loop = [], {}, True
        live = self.block_probe()
        full = self.full_range()
        every = self.all_probe(full[2]) if full is not None and full[2] else None
        bits = [f"tl.where({live}, 1, 0)" if live else "1", f"tl.where({every}, 2, 0)" if every else "0"]
        self.emit(f"tl.store(plan_ptr + plan_at * PLAN_TILES + {m1}, ({' + '.join(bits)}).to(tl.int8))")
        body, self.lines, self.in_loop = self.lines, outer + self.hoisted, False
        self.emit(f"for {m1} in range(0, PLAN_TILES):")
        self.lines += ["    " + ln for ln in body]
        return self.lines

    def loop_bodies(self, hoist_guards: bool):
        """The loop body over any tile, and over full tiles: (body, the full range or None,
        the full-tile body or None).  ``hoist_guards``: updates leave out their invariant
        scalar terms (recorded per update in ``update_guards``)."""
        self.hoist_guards, self.update_guards = hoist_guards, []
        self.lines, self.memo = [], {}
        state = list(self.tp.state)
        for t in state:
            self.state_prev[t] = self.values[t]
        for t in state:
            prev = f"{pyname(t).lower()}_prev"
            self.emit(f"{prev} = {pyname(t).lower()}")
            self.state_prev[t] = dataclasses.replace(self.values[t], code=prev)
        self.in_loop = True
        live = self.block_probe()
        head, self.lines = self.lines, []
        for st in self.body:
            self.statement(st)
        body = head + ([f"if {live}:"] + ["    " + ln for ln in self.lines] if live else self.lines)
        full = self.full_range()
        full_body, self.trusted = None, None
        if full is not None:
            self.lines, self.memo, self.full_tiles = [], {}, True
            if not full[2]:
                for t in state:
                    self.emit(f"{pyname(t).lower()}_prev = {pyname(t).lower()}")
            for st in self.body:
                self.statement(st)
            full_body, self.full_tiles = self.lines, False
            if full[2]:  # data-dependent atoms: the tile runs unmasked only where they all hold
                self.lines, self.memo = [], {}
                every = self.all_probe(full[2])
                prev, masked = head[:len(state)], head[len(state):] + body[len(head):]
                full_body = (prev + self.lines + [f"if {every}:"] + ["    " + ln for ln in full_body]
                             + ["else:"] + ["    " + ln for ln in masked])
            else:
                self.trusted = self.trusted_full_tiles(state)
        self.hoist_guards = False
        return body, full, full_body

    def trusted_full_tiles(self, state) -> tuple[list[str], str, list[str]] | None:
        """Where full tiles read inputs indirectly (a paged cache): the program checks once,
        over all its full tiles, that every index element they read is present and
        addresses a row (:meth:`index_probe`), and then runs them without index presence
        (:attr:`trust_index`), as unmasked as a contiguous cache, with no branch inside the
        loop (its loads stay pipelined); a program whose pages have a hole runs its full
        tiles with their index masks.  ``(probe body, its scalar, full-tile body)``, or
        None where no input is read indirectly."""
        self.lines, self.memo, self.full_tiles = [], {}, True
        probe = self.index_probe()
        probe_body = self.lines
        if probe is None:
            self.full_tiles = False
            return None
        self.lines, self.memo, self.trust_index = [], {}, True
        for t in state:
            self.emit(f"{pyname(t).lower()}_prev = {pyname(t).lower()}")
        for st in self.body:
            self.statement(st)
        body, self.full_tiles, self.trust_index = self.lines, False, False
        return probe_body, probe, body


# ----------------------------------------------------------------------------
# the kernel around the body, and the launcher
# ----------------------------------------------------------------------------

MAX_BATCH_DIMS = 4


@dataclass
class KernelPart:
    """One ``@triton.jit`` kernel of a definition."""

    kernel: str
    args: list            # (pyname, name, ranks)
    outputs: list         # (pyname, name, ranks, workspace?)
    sizes: list           # every rank size the kernel takes
    params: list          # pynames of the scalar parameters
    row: str | None
    grid: tuple
    vector: tuple
    tile: str | None
    tile_size: int | None
    body: list
    rows: str = "1"            # code: the rows the row blocks cover (P; P * G when packed)
    grid_sizes: tuple = ()     # code: each grid rank's program count
    persistent: bool = False   # a stream-K worker: one program per worker, grid (1, workers)
    define: bool = True        # False: the kernel is another variant's (a shared combine)
    fills: dict = field(default_factory=dict)  # workspace name -> its init value's code
    flags: list = field(default_factory=list)  # (constexpr, launcher code of a factor > 0)
    # the other ranks of each block a row carries (the launcher sizes the row block so
    # that the widest fits in registers); None when a tl.dot needs rows of 16 at least
    row_blocks: list | None = None
    # a kernel that probes a block mask per tile: its twin reading a plan instead, and
    # the planner writing that plan (same arguments, no outputs); None otherwise
    planned: "KernelPart | None" = None
    planner: "KernelPart | None" = None
    plan: bool = False          # this kernel takes the plan's arguments
    loop: str | None = None     # code: the tile count of the kernel's loop
    # code: the floats of loop state a row carries (RNV[p,f]: F; a backward stage's dQ and
    # its deferred second accumulator: 2E); the launcher halves the row block past one
    state: str = "1"


@dataclass
class Variant:
    """A way to compute a definition: kernels in order, with their workspace."""

    kernels: list
    lets: list            # (pyname, code, text); a split's worker count is chosen at launch
    split: str | None     # the worker (or stream-K slot) rank of a split variant
    loop_size: str | None  # the tile count the split divides
    kind: str = "fused"   # "fused", "split" (split-K) or "stream" (stream-K)


@dataclass
class KernelSpec:
    """Everything the module template needs for one definition."""

    name: str
    args: list            # (pyname, name, ranks, dtype)
    outputs: list         # (pyname, name, ranks, dtype)
    params: list          # (pyname, name, default code or None)
    signature: str
    doc: str
    input_ranks: list
    variants: list
    # what a plan (NAME_plan) depends on: the (pyname, name) of the tensors and parameters
    # its block-mask probes read; ``planned``: some kernel probes a block mask
    plan_tensors: list = field(default_factory=list)
    plan_params: list = field(default_factory=list)
    planned: bool = False


def _program_lines(kr: KernelRenderer) -> list[str]:
    """From ``pid_row`` and ``pid`` (set before): grid indices, batch offsets, rank offsets."""
    r = kr.ranks
    pre = ["pid_flat = pid"] if kr.plan else []  # the program's unit, as a plan indexes it
    if _group_rows(kr):  # the rows are one group's heads: which group is a grid index
        pre += [f"idx_pk = (pid % {_units(kr.pack)}).to(tl.int64)",
                f"pid = pid // {_units(kr.pack)}"]
    for g in reversed(r.grid):
        if kr.pack and g == kr.pack.rank:
            pre += [f"idx_pk = (pid % {_units(kr.pack)}).to(tl.int64)",
                    f"pid = pid // {_units(kr.pack)}"]
            continue
        pre += [f"idx_{g.lower()} = (pid % {pyname(g)}).to(tl.int64)", f"pid = pid // {pyname(g)}"]
    for k in range(MAX_BATCH_DIMS - 1, 0, -1):
        pre += [f"b{k} = pid % NB{k}", f"pid = pid // NB{k}"]
    pre.append("b0 = pid")
    tensors = [a.name for a in kr.defn.tensor_args] + [o.name for o in kr.outputs]
    for t in tensors:
        # 64-bit: a batch of long sequences passes 2**31 elements
        pre.append(f"boff_{t} = " + " + ".join(f"b{k}.to(tl.int64) * stride_{t}_b{k}"
                                               for k in range(MAX_BATCH_DIMS)))
    for v in r.vector:
        if v == r.row and kr.pack:
            pre += _packed_row_lines(kr)
            continue
        if v == r.row:
            pre.append(f"offs_{v.lower()} = pid_row * BLOCK_{v} + tl.arange(0, BLOCK_{v})")
            pre.append(f"p_first = pid_row * BLOCK_{v}")
            pre.append(f"p_last = tl.minimum(p_first + BLOCK_{v}, {pyname(v)}) - 1")
        else:
            pre.append(f"offs_{v.lower()} = tl.arange(0, BLOCK_{v})")
        if v != r.tile:
            pre.append(f"rng_{v.lower()} = offs_{v.lower()} < {pyname(v)}")
    return pre


def _group(pk) -> str:
    """Code: how many query heads share a packed unit (``G``; the whole rank for MQA)."""
    return pyname(pk.group)


def _units(pk) -> str:
    """Code: how many packed units (``HK``; one for MQA)."""
    return pyname(pk.units) if pk.units else "1"


def _group_rows(kr: KernelRenderer) -> bool:
    """The rows are the packed heads of one group (a decode without a query rank,
    ``map_ranks._rows_of_a_group``), not (g, p) pairs."""
    return bool(kr.pack) and kr.ranks.row == kr.pack.rank


def _packed_row_lines(kr: KernelRenderer) -> list[str]:
    """Rows of a packed block: (g, p) pairs, g-major; p_first..p_last bound the block's p
    (exact when the block lies within one g, else all of 0..P-1).  Rows that are the
    group's heads: g alone, p_first..p_last the block's heads."""
    row, pk = kr.ranks.row, kr.pack
    v, n = row.lower(), pyname(row)
    if _group_rows(kr):
        return [f"offs_{v} = pid_row * BLOCK_{row} + tl.arange(0, BLOCK_{row})",
                f"rng_{v} = offs_{v} < {_group(pk)}",
                f"pk_{v} = idx_pk * {_group(pk)} + offs_{v}",
                f"p_first = idx_pk * {_group(pk)} + pid_row * BLOCK_{row}",
                f"p_last = idx_pk * {_group(pk)} + tl.minimum(pid_row * BLOCK_{row} + "
                f"BLOCK_{row}, {_group(pk)}) - 1"]
    return [f"offs_{v} = pid_row * BLOCK_{row} + tl.arange(0, BLOCK_{row})",
            f"rng_{v} = offs_{v} < {n} * {_group(pk)}",
            f"pk_{v} = offs_{v} % {n}",
            f"pk_{pk.rank.lower()} = idx_pk * {_group(pk)} + offs_{v} // {n}",
            f"r_first = pid_row * BLOCK_{row}",
            f"r_last = tl.minimum(r_first + BLOCK_{row}, {n} * {_group(pk)}) - 1",
            f"p_first = tl.where(r_first // {n} == r_last // {n}, r_first % {n}, 0)",
            f"p_last = tl.where(r_first // {n} == r_last // {n}, r_last % {n}, {n} - 1)"]


def _store_lines(kr: KernelRenderer, outputs, slot: str | None = None) -> list[str]:
    """Store each output (absent elements as 0); rank ``slot`` is the program's stream-K slot."""
    r = kr.ranks
    post = []
    for o in outputs:
        if o.name not in kr.values:
            raise TritonUnsupported(f"{o.name} is not computed in the kernel")
        # an output without the row rank (a decode's state, when map-ranks made a head dim
        # the row) holds the same value in every row block: the first block stores it
        first_only = r.row is not None and r.row not in o.ranks and not (
            kr.pack and kr.pack.rank in o.ranks)
        val = kr.values[o.name]
        layout = kr.lhs_layout(Einsum(o.name, o.ranks, Num(0)))
        code = kr.expand(val.code, val.layout, layout)
        if val.layout != layout:
            code = f"tl.broadcast_to({code}, {kr.shape(layout)})"
        present = kr.mask_code(val.terms, layout)
        if present:
            code = f"tl.where({present}, {code}, 0.0)"
        offset = []
        for k, rank in enumerate(o.ranks):
            if rank == slot:
                offset.append(f"slot * stride_{o.name}_{k}")
                continue
            if rank == r.loop and r.tile is None:  # stored in the loop, at each step
                offset.append(f"{pyname(rank).lower()} * stride_{o.name}_{k}")
                continue
            if rank not in r.vector and rank not in r.grid:
                raise TritonUnsupported(f"output {o.name} has rank {rank}, not in the grid")
            idx, lay = kr.index_code(rank, ())
            offset.append(f"{kr.expand(idx, lay, layout)} * stride_{o.name}_{k}")
        ranges = [Term(f"rng_{x.lower()}", (x,)) for x in layout]
        if first_only:
            ranges.append(Term("(pid_row == 0)", ()))
        mask = kr.mask_code(ranges, layout)
        post.append(f"tl.store({pyname(o.name)}_ptr + boff_{o.name} + {' + '.join(offset) or '0'}, "
                    f"{code}{', mask=' + mask if mask else ''})")
    return post


def _kernel_lines(kr: KernelRenderer, outputs) -> list[str]:
    """The kernel's Python body: program ids, offsets, the statements, the stores."""
    kr.outputs = list(outputs)
    pre = ["pid_row = tl.program_id(0)", "pid = tl.program_id(1)"] + _program_lines(kr)
    stepped = kr.stepped_outputs()
    why = kr.stepped_blocker()
    if why:
        raise TritonUnsupported(why)
    body = kr.render()
    post = _store_lines(kr, [o for o in outputs if o not in stepped])  # may add mask definitions
    return pre + body + post


def _stream_k_lines(kr: KernelRenderer, outputs, slot: str) -> list[str]:
    """A persistent stream-K worker: program ``wid`` of ``SK_WORKERS`` takes the global
    tiles ``[wid*G // W, (wid+1)*G // W)`` of the ``G = units * M1`` tiles numbered unit
    by unit (a unit is what one program of the streamed kernel owns: a row block, a batch
    element, a grid point), walks them segment by segment, and stores each segment's
    final state in slot ``wid - (first worker of the unit)`` of the workspace.

    Before → after (the streamed kernel → the worker)::

        pid_row = tl.program_id(0); pid = tl.program_id(1)
        <offsets>; tile_lo = lo; tile_hi = hi; <tile loop>; <store>
        ->
        for unit in range(g_start // M1, (g_end + M1 - 1) // M1):
            seg_first = ...; seg_stop = ...; slot = ...
            pid_row = unit % nrow; pid = unit // nrow
            <offsets>; tile_lo = max(lo, seg_first); tile_hi = min(hi, seg_stop); <tile loop>
            <store at slot>
    """
    r = kr.ranks
    kr.outputs = list(outputs)
    kr.segment = True
    m1 = pyname(r.loop)
    nrow = f"tl.cdiv({_row_count(kr)}, BLOCK_{r.row})" if r.row else "1"
    head = ["wid = tl.program_id(1).to(tl.int64)",
            f"n_row = {nrow}",
            f"n_tiles = n_row * SK_UNITS * {m1}",
            "g_start = wid * n_tiles // SK_WORKERS",
            "g_end = (wid + 1) * n_tiles // SK_WORKERS",
            f"for unit in range(g_start // {m1}, (g_end + {m1} - 1) // {m1}):"]
    seg = [f"seg_first = (tl.maximum(g_start, unit * {m1}) - unit * {m1}).to(tl.int32)",
           f"seg_stop = (tl.minimum(g_end, unit * {m1} + {m1}) - unit * {m1}).to(tl.int32)",
           f"slot = wid + 1 - ((unit * {m1} + 1) * SK_WORKERS + n_tiles - 1) // n_tiles",
           "pid_row = (unit % n_row).to(tl.int32)",
           "pid = (unit // n_row).to(tl.int32)"]
    pre = seg + _program_lines(kr)
    body = kr.render()
    post = _store_lines(kr, outputs, slot)  # may add mask definitions to body
    inner = pre + body + post
    return head + ["    " + ln for ln in inner]


def _row_count(kr: KernelRenderer) -> str:
    if kr.ranks.row is None:
        return "1"
    n = pyname(kr.ranks.row)
    if _group_rows(kr):
        return _group(kr.pack)
    return f"{n} * {_group(kr.pack)}" if kr.pack else n


def _grid_sizes(kr: KernelRenderer) -> tuple[str, ...]:
    units = (_units(kr.pack),) if _group_rows(kr) else ()
    return units + tuple(_units(kr.pack) if kr.pack and g == kr.pack.rank else pyname(g)
                         for g in kr.ranks.grid)


def _part(kr: KernelRenderer, kernel: str, outputs, workspace: set[str]) -> KernelPart:
    defn = kr.defn
    lines = _kernel_lines(kr, outputs)
    sizes = list(dict.fromkeys([r for a in defn.tensor_args for r in a.ranks]
                               + [let.name for let in defn.lets]))
    return KernelPart(
        kernel=kernel, args=[(pyname(a.name), a.name, list(a.ranks)) for a in defn.tensor_args],
        outputs=[(pyname(o.name), o.name, list(o.ranks), o.name in workspace) for o in outputs],
        sizes=sizes, params=[pyname(p.name) for p in defn.scalar_params],
        row=kr.ranks.row, grid=kr.ranks.grid, vector=kr.ranks.vector, tile=kr.ranks.tile,
        tile_size=kr.tp.tile_size, body=lines, rows=_row_count(kr), grid_sizes=_grid_sizes(kr),
        flags=_flags(kr), row_blocks=_row_blocks(kr), plan=bool(kr.plan), loop=_loop_count(kr),
        state=_state_width(kr))


def _state_width(kr: KernelRenderer) -> str:
    """Launcher code: the loop-state floats per row, the sum over the states of their
    held ranks' block sizes (a row scalar counts 1), and a tile's width for each product
    past two in the loop body (its result is live beside the states: a backward stage's
    ``dO · V`` and ``dS · K`` beside ``Q · K``, as FlashAttention-2's smaller backward
    blocks)."""
    held = set(kr.ranks.vector) - {kr.ranks.row, kr.ranks.tile}
    terms = []
    for st in kr.tp.inits:
        ranks = [r for r in st.lhs if r in held and r != st.iter_rank]
        terms.append(" * ".join(f"_pow2({pyname(r)})" for r in ranks) or "1")
    if kr.ranks.tile and len(kr.dots) > 2:
        terms.append(f"{len(kr.dots) - 2} * {kr.tp.tile_size}")
    return " + ".join(terms) or "1"


def _loop_count(kr: KernelRenderer) -> str | None:
    return pyname(kr.tp.loop_rank) if kr.tp.loop_rank else None


def _planner_part(k: Kernel, twin: KernelPart) -> KernelPart:
    """The planner of kernel ``k`` (see :meth:`KernelRenderer.render_plan`): the kernel's
    arguments, no outputs, one program per row block and unit as the streamed kernel."""
    kr = KernelRenderer(k.tiles, ranks=k.roles, bounds=k.bounds, plan="make")
    kr.outputs = []
    lines = ["pid_row = tl.program_id(0)", "pid = tl.program_id(1)"] + _program_lines(kr)
    lines += kr.render_plan()
    return dataclasses.replace(
        twin, kernel=twin.kernel.replace("_kernel", "_planner"), outputs=[], body=lines,
        persistent=False, fills={}, flags=_flags(kr), planned=None, planner=None, plan=True,
        define=True)


def _with_plan(k: Kernel, part: KernelPart, render) -> KernelPart:
    """``part`` with its planned twin (``render(plan_renderer)`` gives its body) and its
    planner, when kernel ``k`` probes a block mask per tile."""
    probe = KernelRenderer(k.tiles, ranks=k.roles, bounds=k.bounds)
    if k.tiles.loop_rank is None or k.roles is None or not probe.probes:
        return part
    kr = KernelRenderer(k.tiles, ranks=k.roles, bounds=k.bounds, plan="use")
    planned = dataclasses.replace(part, kernel=part.kernel.replace("_kernel", "_planned"),
                                  body=render(kr), plan=True, flags=_flags(kr))
    return dataclasses.replace(part, planned=planned, planner=_planner_part(k, part))


def _flags(kr: KernelRenderer) -> list:
    """``(flag, factor, launcher code)`` of each ``tl.constexpr`` flag: a sign or an
    alignment is ``bool(factor > 0)``, a page size (``PAGE_``) its value."""
    return [(flag, factor, f"int({factor})" if flag.startswith("PAGE_") else f"bool({factor} > 0)")
            for factor, flag in kr.sign_flags.items()]


def _row_blocks(kr: KernelRenderer) -> list | None:
    """The non-row ranks of each block over the row rank (several: a 3-D block, like the
    split-K combine's [P, W, F]); None when the kernel has a tl.dot."""
    if kr.has_dot or kr.ranks.row is None:
        return None
    return sorted({tuple(r for r in lay if r != kr.ranks.row) for lay in kr.blocks
                   if kr.ranks.row in lay and len(lay) > 2})


def _renderer(k: Kernel) -> KernelRenderer:
    return KernelRenderer(k.tiles, ranks=k.roles, bounds=k.bounds)


def _written(k: Kernel) -> list:
    from ..einsum_ir.ir import Output

    return [Output(b.name, b.ranks) for b in k.writes]


def _kernel_name(k: Kernel) -> str:
    return f"_{pyname(k.name)}_kernel"


def _stream_part(k: Kernel, slot: str) -> KernelPart:
    """A persistent stream-K worker whose segments store into workspace slots over rank
    ``slot`` (see :func:`_stream_k_lines`)."""
    kr = _renderer(k)
    defn = k.cascade
    lines = _stream_k_lines(kr, _written(k), slot)
    sizes = list(dict.fromkeys([r for a in defn.tensor_args for r in a.ranks]
                               + [let.name for let in defn.lets])) + ["SK_UNITS", "SK_WORKERS"]
    return KernelPart(
        kernel=_kernel_name(k), args=[(pyname(a.name), a.name, list(a.ranks)) for a in defn.tensor_args],
        outputs=[(pyname(b.name), b.name, list(b.ranks), True) for b in k.writes],
        sizes=sizes, params=[pyname(p.name) for p in defn.scalar_params], row=kr.ranks.row,
        grid=kr.ranks.grid, vector=kr.ranks.vector, tile=kr.ranks.tile,
        tile_size=k.tiles.tile_size, body=lines, rows=_row_count(kr), grid_sizes=_grid_sizes(kr),
        persistent=True, fills={t: constant_code(v) for t, v in k.fills}, flags=_flags(kr),
        loop=_loop_count(kr))


def _kernel_part(k: Kernel, slot: str | None) -> KernelPart:
    if k.role == "stream-k":
        return _with_plan(k, _stream_part(k, slot),
                          lambda kr: _stream_k_lines(kr, _written(k), slot))
    workspace = {b.name for b in k.writes if b.kind == "workspace"}
    return _with_plan(k, _part(_renderer(k), _kernel_name(k), _written(k), workspace),
                      lambda kr: _kernel_lines(kr, _written(k)))


_KINDS = {"split-k": "split", "stream-k": "stream"}


def _variant(p: Program, v, parts: dict[str, KernelPart]) -> Variant:
    """One launch variant, its kernels rendered (once across variants)."""
    ks = [p.kernel(n) for n in v.kernels]
    out = rendered_kernels(p, v, parts, lambda k: _kernel_part(k, v.split))
    lets = [(pyname(let.name), size_code(let.value, True, "math"), str(let.value))
            for let in p.lets_of(v)]
    kind = _KINDS.get(v.kind, "split" if v.split else "fused")
    return Variant(out, lets, v.split, ks[0].tiles.loop_rank, kind)


def kernel_spec(p: Program) -> KernelSpec:
    """The launcher's spec: every variant of the kernel program, chosen at launch."""
    defn = p.cascade
    parts: dict[str, KernelPart] = {}
    variants = [_variant(p, v, parts) for v in p.variants]
    params, signature = launcher_signature(defn, pyname)
    return KernelSpec(
        name=pyname(defn.name),
        args=[(pyname(a.name), a.name, list(a.ranks), a.dtype) for a in defn.tensor_args],
        outputs=[(pyname(o.name), o.name, list(o.ranks), o.dtype) for o in defn.outputs],
        params=params, signature=signature, doc=print_definition(defn).rstrip(),
        input_ranks=list(dict.fromkeys(r for a in defn.tensor_args for r in a.ranks)),
        variants=variants, planned=any(k.planned for v in variants for k in v.kernels),
        plan_tensors=[(pyname(t), t) for t in plan_reads(p)[0]],
        plan_params=[(pyname(n), n) for n in plan_reads(p)[1]])


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader([str(TEMPLATES), str(COMMON)]),
                              keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True,
                              undefined=jinja2.StrictUndefined)
    env.filters["py"] = py_literal
    return env


def render_module(module: KernelModule, source_name: str) -> str:
    """The generated Triton module (kernels + launchers) of a kernel module; raises
    TritonUnsupported."""
    refuse_unsupported_subscripts(module, "triton", TritonUnsupported)
    specs, chains = [], []
    for p in module.programs:
        try:
            specs += [kernel_spec(q) for q in (p.parts or (p,))]
        except TritonUnsupported as err:
            raise TritonUnsupported(f"{p.name}: {err}") from None
        if p.parts:
            chains.append(chain_spec(p, pyname, size_code, print_definition(p.cascade).rstrip()))
    stem = Path(source_name).stem
    env = _environment()
    names = [pyname(p.name) for p in module.programs]
    tiles = [k.tile_size for s in specs for v in s.variants for k in v.kernels if k.tile_size]
    text = env.get_template("module.py.jinja").render(
        version=__version__, source=source_name, specs=specs, names=names,
        tile=max(tiles, default=64),
        namespace=_op_namespace(module, stem), max_batch=MAX_BATCH_DIMS)
    return text + env.get_template("chain.py.jinja").render(chains=chains)


def _op_namespace(module: KernelModule, stem: str) -> str:
    """``attnc_<stem>_<digest of the compiled IR>``: torch registers a custom op once per
    process, so two modules compiled differently from one spec (another tile size, an
    edited spec) must not share a name, or the second would run the first's kernels."""
    import hashlib

    text = __version__ + "\n" + "\n".join(print_definition(p.cascade) for p in module.programs)
    return f"attnc_{pyname(stem)}_{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def _number(code: str) -> bool:
    """Whether rendered code is a number literal (``1.0``), which ``tl.broadcast_to``
    does not take."""
    try:
        float(code)
    except ValueError:
        return False
    return True
