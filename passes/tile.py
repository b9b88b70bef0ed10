"""``tile`` + ``fuse``: lower a one-pass cascade to a **tile program**.

A tile program is the loop nest every backend renders: a grid over the batch
and the other ranks, one loop over the tiles of the streamed rank carrying the
iterative state, a prologue before the loop and an epilogue after it.  Every
Einsum that carries the tile index ``m1`` is fused into the loop and computed
one tile at a time, so memory is O(rows · tile) instead of O(rows · M).
Before → after (FuseMax Cascade 5)::

    BK[m1,m0,e] = K[m1*M0 + m0, e]          for m1 in 0..M1:            # key tiles
    BQK[m1,m0,p] = Q[p,e] * BK[m1,m0,e]         BK[m0,e]  = K[m1*M0 + m0, e]
    LM[m1,p] = max[m0](BQK[m1,m0,p])             BQK[m0,p] = Q[p,e] * BK[m0,e]
    RM[m1+1,p] = max(RM[m1,p], LM[m1,p])         LM[p] = max[m0](BQK[m0,p])
    ...                                          RM'[p] = max(RM[p], LM[p])  ...
    AV[p,f] = RNV[M1,p,f] / RD[M1,p]         AV[p,f] = RNV[p,f] / RD[p]     # epilogue

**Tile skipping.**  A loop step contributes nothing to a row when none of its
state updates is computed there (contract rule 2: the state carries).  Each
update gets *guards*: necessary conditions for it to be computed, derived from
the ``where`` clauses by presence propagation (a map needs all its operands; a
reduction over ``m0`` needs *some* computed point, so its guards become
existential over ``m0``).  A backend evaluates the guards per tile — exactly
for affine conditions, on the grid for data-dependent ones — and skips the rows
(or whole tiles) where some guard of every update fails.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import sympy

from ..einsum_ir.exprs import free_ranks, walk
from ..einsum_ir.ir import (Access, Binary, Definition, Einsum, Expr, Index, IterativeEinsum, Num,
                            Reduce, Size, Statement, Unary, index_var)
from ..einsum_ir.printer import print_expr, print_size, print_statement
from ..einsum_ir.schedule import Loop, schedule


class NotTileable(Exception):
    """The cascade has no one-pass streamed loop; the message says why."""


@dataclass(frozen=True)
class Guard:
    """A necessary condition: ``cond`` holds for some values of the ``exists`` ranks."""

    cond: Expr
    exists: frozenset[str]

    def __str__(self) -> str:
        if not self.exists:
            return print_expr(self.cond)
        return f"exists {','.join(sorted(index_var(r) for r in self.exists))}: {print_expr(self.cond)}"


@dataclass(frozen=True)
class TileProgram:
    """The loop nest of one definition (see the module docstring)."""

    name: str
    cascade: Definition
    prologue: tuple[Statement, ...]
    loop_rank: str                      # the iterative rank, e.g. M1
    tile_rank: str | None               # the rank inside a tile, e.g. M0
    tile_size: int | None
    stream_rank: str | None             # the rank that is tiled, e.g. M
    inits: tuple[IterativeEinsum, ...]
    body: tuple[Statement, ...]         # one tile, in dependency order
    epilogue: tuple[Statement, ...]
    kept: frozenset[str]                # body tensors read after the loop (every step kept)
    guards: tuple[tuple[str, tuple[Guard, ...]], ...]   # per state update
    row_rank: str | None                # the rank whose rows a tile may skip

    @property
    def state(self) -> tuple[str, ...]:
        return tuple(st.tensor for st in self.inits)

    @property
    def local(self) -> frozenset[str]:
        """Body tensors that live only for one tile."""
        return frozenset(st.tensor for st in self.body if isinstance(st, Einsum)) - self.kept


def _blocked_source(defn: Definition, loop_rank: str):
    """(tile rank, stream rank) from a blocked access ``X[m1*M0 + m0, ...]``, if any."""
    found = blocked_subscript(defn, loop_rank)
    return (None, None) if found is None else found[1:]


def blocked_subscript(defn: Definition, loop_rank: str):
    """(subscript, tile rank, stream rank) of a blocked access ``X[m1*M0 + m0, ...]`` (or a
    split worker's ``X[(w*MT + mt)*M0 + m0, ...]``), or None."""
    for st in defn.statements:
        for node in walk(st.expr):
            if not isinstance(node, Access) or node.tensor not in {a.name for a in defn.tensor_args}:
                continue
            ranks = defn.tensor_ranks(node.tensor)
            for sub, rank in zip(node.subscripts, ranks):
                used = direct_ranks(sub)
                if loop_rank in used and len(used) == 2:
                    (tile,) = used - {loop_rank}
                    return sub, tile, rank
                if loop_rank in used and len(used) > 2:  # a split worker's (w*MT + mt)*M0 + m0
                    tile = _unit_rank(sub, loop_rank, used)
                    if tile is not None:
                        return sub, tile, rank
    return None


def direct_ranks(sub) -> set[str]:
    """The ranks of a subscript outside the index tensors it reads: an index tensor's read
    (``CU[b] + m1*M0 + m0``) only offsets the blocked term."""
    return free_ranks(sub) - {r for n in walk(sub) if isinstance(n, Access) for r in free_ranks(n)}


def _unit_rank(sub, loop_rank: str, used: set[str]) -> str | None:
    """In an affine subscript that also reads a selector (a split worker's ``w``), the rank
    with coefficient 1 whose size is the loop rank's coefficient: ``m0`` in
    ``(w*MT + mt)*M0 + m0``, also under a paged read's ``// PG`` or ``% PG``."""
    if isinstance(sub, Binary) and sub.op in ("//", "%") and isinstance(sub.right, Size):
        sub = sub.left
    expr = to_sympy(sub)
    if expr is None:
        return None
    step = sympy.expand(expr).coeff(sympy.Symbol(f"_{loop_rank}", integer=True))
    for r in sorted(used - {loop_rank}):
        if (sympy.expand(expr).coeff(sympy.Symbol(f"_{r}", integer=True)) == 1
                and step == sympy.Symbol(r, integer=True, positive=True)):
            return r
    return None


def _let_value(defn: Definition, rank: str | None) -> int | None:
    for let in defn.lets:
        if let.name == rank and let.value.is_Integer:
            return int(let.value)
    return None


def _split_schedule(steps, loop: Loop):
    at = steps.index(loop)
    loops = [s for s in steps if isinstance(s, Loop)]
    if len(loops) > 1:
        said = ", ".join(f"over {lp.rank} ({', '.join(st.tensor for st in lp.body[:3])}"
                         f"{', ...' if len(lp.body) > 3 else ''})" for lp in loops)
        raise NotTileable(f"the cascade has more than one iterative loop: {said}; a kernel "
                          f"runs one loop (a recurrence whose steps each stream another rank "
                          f"is a nested form kernels do not have yet)")
    return list(steps[:at]), list(steps[at + 1:])


def _reads(st: Statement) -> set[str]:
    out = {n.tensor for n in walk(st.expr) if isinstance(n, Access)}
    if st.where is not None:
        out |= {n.tensor for n in walk(st.where) if isinstance(n, Access)}
    return out


def _replace_index(e: Expr, rank: str, value: Expr) -> Expr:
    from ..einsum_ir.exprs import transform
    from ..einsum_ir.ir import Index

    return transform(e, lambda n: value if isinstance(n, Index) and n.rank == rank else None)


def _tile_reads(defn: Definition, loop) -> tuple[str, Expr] | None:
    """(rank, index) when the loop reads a per-tile tensor at a computed tile index."""
    found = None
    body = {s.tensor for s in loop.body}
    before = {s.tensor: s for s in defn.statements if s.tensor not in body and isinstance(s, Einsum)}
    for st in loop.body:
        for acc in (n for n in walk(st.expr) if isinstance(n, Access) and n.tensor in before):
            for sub, rank in zip(acc.subscripts, before[acc.tensor].lhs):
                if loop.rank in free_ranks(sub) and sub != Index(loop.rank):
                    if found is not None and found != (rank, sub):
                        raise NotTileable("per-tile tensors are read at two different tile indices")
                    found = (rank, sub)
    return found


def reindex_tile_reads(defn: Definition) -> Definition:
    """Re-index per-tile tensors that the loop reads at a computed tile index.

    Split-K's workers read the tensors computed per tile before the loop at
    their own tile ``w*MT + mt``; re-indexed by ``(w, mt)`` they become part of
    the loop and are computed one tile at a time.  Before → after::

        BQK[m1,m0,p] = sum[e](Q[p,e] * BK[m1,m0,e])
        SLN[w,mt,m0,p] = exp(BQK[w * MT + mt, m0, p] - RM[w, mt + 1, p])
        ->
        BQK[w,mt,m0,p] = sum[e](Q[p,e] * BK[w,mt,m0,e])   where w * MT + mt < M1
        SLN[w,mt,m0,p] = exp(BQK[w,mt,m0,p] - RM[w, mt + 1, p])
    """
    steps = schedule(defn)
    loops = [s for s in steps if isinstance(s, Loop)]
    if len(loops) != 1:
        return defn
    hit = _tile_reads(defn, loops[0])
    if hit is None:
        return defn
    rank, index = hit
    new_ranks = tuple(dict.fromkeys(r for r in _ranks_in_order(index)))
    carried = {s.tensor: s for s in defn.statements
               if isinstance(s, Einsum) and rank in s.lhs and s.tensor not in
               {b.tensor for b in loops[0].body}}

    def reread(e: Expr) -> Expr:
        from ..einsum_ir.exprs import transform

        def fix(n):
            if isinstance(n, Access) and n.tensor in carried:
                pos = carried[n.tensor].lhs.index(rank)
                if n.subscripts[pos] != index:
                    raise NotTileable(f"{n.tensor} is read at another tile index")
                subs = n.subscripts[:pos] + tuple(Index(r) for r in new_ranks) + n.subscripts[pos + 1:]
                return Access(n.tensor, subs, loc=n.loc)
            return None
        return transform(e, fix)

    statements = []
    for st in defn.statements:
        if st.tensor in carried:
            pos = st.lhs.index(rank)
            lhs = st.lhs[:pos] + new_ranks + st.lhs[pos + 1:]
            raw = _replace_index(st.expr, rank, index)
            expr = reread(raw)
            where = None if st.where is None else reread(_replace_index(st.where, rank, index))
            if not _absent_past_the_end(defn, raw, rank, index, set(carried)):
                inside = Binary("<", index, Size(rank))
                where = inside if where is None else Binary("and", where, inside)
            statements.append(dataclasses.replace(st, lhs=lhs, expr=expr, where=where))
        else:
            statements.append(dataclasses.replace(
                st, expr=reread(st.expr), where=None if st.where is None else reread(st.where)))
    return dataclasses.replace(defn, statements=tuple(statements))


def _absent_past_the_end(defn: Definition, e: Expr, rank: str, index: Expr, carried) -> bool:
    """Whether ``e`` is absent for tiles ``index >= rank``: it reads a per-tile tensor, or
    an input at ``index * T + t`` where ``rank = ceil(N / T)`` and N is that input's dim."""
    from ..einsum_ir.ir import size_symbol

    let = next((x for x in defn.lets if x.name == rank), None)
    inputs = {a.name: a for a in defn.tensor_args}
    for acc in (n for n in walk(e) if isinstance(n, Access)):
        if acc.tensor in carried:
            return True
        if acc.tensor not in inputs or let is None:
            continue
        for sub, dim in zip(acc.subscripts, inputs[acc.tensor].ranks):
            if (isinstance(sub, Binary) and sub.op == "+" and isinstance(sub.left, Binary)
                    and sub.left.op == "*" and sub.left.left == index
                    and isinstance(sub.left.right, Size) and isinstance(sub.right, Index)
                    and sub.right.rank == sub.left.right.rank
                    and let.value == sympy.ceiling(size_symbol(dim) / size_symbol(sub.left.right.rank))):
                return True
    return False


def _ranks_in_order(e: Expr) -> list[str]:
    return [n.rank for n in walk(e) if isinstance(n, Index)]


def tile_program(defn: Definition) -> TileProgram:
    """Lower a one-pass cascade (one iterative loop) to a tile program."""
    defn = reindex_tile_reads(defn)
    steps = schedule(defn)
    loops = [s for s in steps if isinstance(s, Loop)]
    if not loops:
        raise NotTileable(f"{defn.name}: no iterative rank to stream over (run the 'online' "
                          f"pass, or the cascade is not one-pass)")
    loop = loops[0]
    before, after = _split_schedule(steps, loop)
    carried = [s for s in before if loop.rank in s.lhs and not isinstance(s, IterativeEinsum)]
    inits = tuple(s for s in before if isinstance(s, IterativeEinsum))
    prologue = tuple(s for s in before if s not in carried and s not in inits)
    body = tuple(carried) + loop.body
    body_names = {s.tensor for s in body if isinstance(s, Einsum)}
    for s in prologue:
        if _reads(s) & body_names:
            raise NotTileable(f"'{s.tensor}' reads every tile of "
                              f"{sorted(_reads(s) & body_names)[0]} before the loop: not one-pass")
    kept = frozenset(n for s in after for n in _reads(s) & body_names)
    kept |= frozenset(o.name for o in defn.outputs) & body_names
    tile_rank, stream_rank = _blocked_source(defn, loop.rank)
    guards = update_guards(defn, body, loop.rank)
    return TileProgram(
        name=defn.name, cascade=defn, prologue=prologue, loop_rank=loop.rank,
        tile_rank=tile_rank, tile_size=_let_value(defn, tile_rank), stream_rank=stream_rank,
        inits=inits, body=body, epilogue=tuple(after), kept=kept, guards=guards,
        row_rank=_row_rank(guards, loop.rank, tile_rank))


# ----------------------------------------------------------------------------
# guards: necessary conditions for an update to be computed
# ----------------------------------------------------------------------------


def _where_levels(st: Statement):
    """(applies at the LHS level, applies at the root reduction's level)."""
    if st.where is None:
        return False, False
    need = free_ranks(st.where)
    lhs = set(st.lhs) - ({st.iter_rank} if isinstance(st, IterativeEinsum) and st.init else set())
    at_lhs = need <= lhs
    at_red = isinstance(st.expr, Reduce) and need <= lhs | set(st.expr.ranks)
    return at_lhs, at_red


def _access_guards(e: Expr, known: dict[str, frozenset[Guard]]) -> frozenset[Guard]:
    """Guards of every tensor read in ``e`` outside nested reductions."""
    out: frozenset[Guard] = frozenset()
    stack = [e]
    while stack:
        node = stack.pop()
        if isinstance(node, Access):
            out |= known.get(node.tensor, frozenset())
        if not isinstance(node, Reduce):
            from ..einsum_ir.exprs import children

            stack.extend(children(node))
    return out


def _statement_guards(st: Statement, known, state: set[str]) -> frozenset[Guard]:
    at_lhs, at_red = _where_levels(st)
    own = frozenset({Guard(st.where, frozenset())}) if at_lhs else frozenset()
    guards = _access_guards(st.expr, known) | own
    for red in (n for n in walk(st.expr) if isinstance(n, Reduce)):
        inner = _access_guards(red.body, known)
        if at_red and red is st.expr:
            inner |= {Guard(st.where, frozenset())}
        guards |= {Guard(g.cond, (g.exists | frozenset(red.ranks)) & free_ranks(g.cond))
                   for g in inner}
    return frozenset(g for g in guards if not (_reads_any(g.cond) & state))


def _reads_any(e: Expr) -> set[str]:
    return {n.tensor for n in walk(e) if isinstance(n, Access)}


def update_guards(defn: Definition, body, loop_rank: str):
    state = set(defn.iterative_tensors)
    known: dict[str, frozenset[Guard]] = {}
    out = []
    for st in body:
        g = _statement_guards(st, known, state)
        if isinstance(st, IterativeEinsum):
            out.append((st.tensor, tuple(sorted(g, key=str))))
        else:
            known[st.tensor] = g
    return tuple(out)


def _row_rank(guards, loop_rank: str, tile_rank: str | None) -> str | None:
    """The one rank (besides the tile's) that every guard condition may depend on."""
    ranks: set[str] = set()
    for _, gs in guards:
        for g in gs:
            ranks |= free_ranks(g.cond) - {loop_rank} - ({tile_rank} if tile_rank else set())
    return next(iter(ranks)) if len(ranks) == 1 else None


# ----------------------------------------------------------------------------
# affine guards as intervals of the tile rank
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Bound:
    """``var >= value`` (lower) or ``var <= value`` (upper); value is sympy over other ranks."""

    lower: bool
    value: sympy.Expr


def to_sympy(e: Expr, params=frozenset()) -> sympy.Expr | None:
    """An affine numeric expression as sympy (index variables as ``_<rank>``), else None."""
    from ..einsum_ir.ir import Index, Param, Size

    if isinstance(e, Num):
        return sympy.nsimplify(e.value)
    if isinstance(e, Index):
        return sympy.Symbol(f"_{e.rank}", integer=True)
    if isinstance(e, Size):
        return sympy.Symbol(e.rank, integer=True, positive=True)
    if isinstance(e, Param):
        return sympy.Symbol(f"param_{e.name}", real=True)
    if isinstance(e, Unary) and e.op == "-":
        x = to_sympy(e.operand)
        return None if x is None else -x
    if isinstance(e, Binary) and e.op in ("+", "-", "*"):
        a, b = to_sympy(e.left), to_sympy(e.right)
        if a is None or b is None:
            return None
        out = a + b if e.op == "+" else a - b if e.op == "-" else a * b
        return out if _index_degree(out) <= 1 else None
    if isinstance(e, Binary) and e.op == "//":
        return None
    return None


def _index_degree(e: sympy.Expr) -> int:
    gens = sorted((s for s in e.free_symbols if s.name.startswith("_")), key=str)
    if not gens:
        return 0
    return sympy.Poly(sympy.expand(e), *gens).total_degree()


def atom_bound(cmp: Binary, var: str) -> Bound | bool | None:
    """An affine comparison solved for ``var``: a Bound, True/False if free of it, None if not affine."""
    if cmp.op not in ("<", "<=", ">", ">="):
        return None
    a, b = to_sympy(cmp.left), to_sympy(cmp.right)
    if a is None or b is None:
        return None
    diff = sympy.expand(b - a if cmp.op in ("<", "<=") else a - b)  # diff >= 0 (or > 0)
    strict = cmp.op in ("<", ">")
    x = sympy.Symbol(f"_{var}", integer=True)
    coeff = diff.coeff(x)
    rest = sympy.expand(diff - coeff * x)
    if coeff == 0:
        return None
    if not coeff.is_number:
        return None
    # coeff*x + rest >= 0 (> 0 when strict)
    if coeff > 0:
        v = -rest / coeff
        return Bound(True, sympy.floor(v) + 1 if strict else sympy.ceiling(v))
    v = rest / -coeff
    return Bound(False, sympy.ceiling(v) - 1 if strict else sympy.floor(v))


def conjunctions(cond: Expr) -> list[list[Expr]] | None:
    """``cond`` in disjunctive normal form (lists of atoms), or None if it has ``not``."""
    if isinstance(cond, Binary) and cond.op == "or":
        a, b = conjunctions(cond.left), conjunctions(cond.right)
        return None if a is None or b is None else a + b
    if isinstance(cond, Binary) and cond.op == "and":
        a, b = conjunctions(cond.left), conjunctions(cond.right)
        if a is None or b is None:
            return None
        return [x + y for x in a for y in b]
    if isinstance(cond, Unary) and cond.op == "not":
        return None
    return [[cond]]


# ----------------------------------------------------------------------------
# printing (golden tests, --emit tiles)
# ----------------------------------------------------------------------------


def print_tile_program(tp: TileProgram) -> str:
    lines = [f"tile_program {tp.name}:"]
    if tp.tile_rank:
        lines.append(f"  stream {tp.stream_rank} in tiles of {tp.tile_rank} = {tp.tile_size}, "
                     f"{tp.loop_rank} = {print_size(_let_expr(tp.cascade, tp.loop_rank))} tiles")
    lines.append(f"  rows: {tp.row_rank or '-'}")
    lines.append("  prologue:")
    lines += [f"    {print_statement(s)}" for s in tp.prologue] or ["    -"]
    lines.append("  state:")
    lines += [f"    {print_statement(s)}" for s in tp.inits]
    lines.append(f"  for {tp.loop_rank.lower()} in 0..{tp.loop_rank}:")
    for tensor, gs in tp.guards:
        lines.append(f"    # {tensor} is updated only where " + (" and ".join(f"({g})" for g in gs) or "always"))
    lines += [f"    {print_statement(s)}" + ("   [kept]" if s.tensor in tp.kept else "")
              for s in tp.body]
    lines.append("  epilogue:")
    lines += [f"    {print_statement(s)}" for s in tp.epilogue]
    return "\n".join(lines) + "\n"


def _let_expr(defn: Definition, rank: str):
    for let in defn.lets:
        if let.name == rank:
            return let.value
    return sympy.Symbol(rank)
