"""What every tile-program kernel renderer shares (Triton, CUDA): how ranks are
laid out in a kernel, presence terms, and loads inlined from blocked copies."""
from __future__ import annotations

from dataclasses import dataclass

from ..einsum_ir.exprs import children, free_ranks, walk, with_children
from ..einsum_ir.ir import Access, Binary, Const, Einsum, Expr, Index, Num, Reduce, Size, Unary
from ..passes.tile import TileProgram


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
