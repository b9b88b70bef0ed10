"""``map-ranks``: the role of every rank in a kernel, and GQA/MQA head packing.

A kernel is launched on a grid of programs.  Each rank gets one role:

* **grid** ranks take one value per program: ranks that select *which* keys stream
  (the head ``h`` of ``K[h, m, e]``), and ranks of the state other than the row;
* the **row** rank: a program owns a block of its values (the queries ``p``); it is the
  state rank the update guards constrain, so a row block can skip tiles;
* the **tile** rank (``m0``) and the other **vector** ranks (head dims) are held whole.

Before → after (causal GQA decode, the loads ``K[h // G, m1*M0 + m0, e]``)::

    state RM[h,p], RD[h,p], RNV[h,p,f]     grid (h)  rows p  vector (p, m0, e, f)
                                        -> packed h by G per HK

**Head packing** (targets that take it): when the streamed loads read a grid rank ``h``
only as ``h // G`` with ``let G = H / HK`` (GQA), or not at all (MQA), the ``G`` query
heads that share one K/V head share one program: its rows are the ``(g, p)`` pairs and
every K/V tile is loaded once for the whole group instead of once per head.
"""
from __future__ import annotations

import dataclasses

import sympy

from ..einsum_ir.exprs import free_ranks, walk
from ..einsum_ir.ir import Access, Binary, Index, Reduce, Size, size_symbol
from ..einsum_ir.kernel import HeadPacking, Kernel, Program, RankRoles, map_kernels
from .tile import NotTileable, TileProgram
from .tile_loads import expanded_body


def long_ranks(defn) -> frozenset[str]:
    """Ranks of tensor arguments other than the innermost dim of a float argument: the
    sequence-like ranks a kernel blocks or streams, never holds whole.  A statistic over a
    subset of another argument's ranks (the row statistics ``GM[H,P]`` a backward stage
    reads beside ``Q[H,P,E]``) does not make its innermost rank short."""
    floats = [a for a in defn.tensor_args if a.ranks and a.dtype not in ("i32", "i64", "bool")]

    def statistic(a) -> bool:
        return any(set(a.ranks) < set(b.ranks) and a.ranks[-1] in b.ranks[:-1] for b in floats)

    short = {a.ranks[-1] for a in floats if not statistic(a)}
    every = {r for a in defn.tensor_args for r in a.ranks}
    return frozenset(every - short)


def long_with_lets(cascade) -> frozenset[str]:
    """:func:`long_ranks`, with the ``let`` sizes that are one long rank or a product of
    ranks with a long one (``let M = P`` of self-attention, ``let M = NB * PG`` of a paged
    cache): a reduction over them streams as one over the long rank would."""
    long = set(long_ranks(cascade))
    for let in cascade.lets:
        value = let.value
        factors = value.as_powers_dict() if value.is_Mul else {value: 1}
        if all(getattr(f, "is_Symbol", False) and k == 1 for f, k in factors.items()) and \
                any(f.name in long for f in factors):
            long.add(let.name)
    return frozenset(long)


def chunk_ranks(defn) -> frozenset[str]:
    """Ranks counting chunks of an argument's rank, ``let M1 = ceil(M/M0)`` (the chunked
    form's per-chunk states ``LKV[m1,e,f]``, GLA's chunk-local gate sums ``CG_local[m1,m0]``):
    a loopless kernel runs one program per chunk."""
    import sympy

    sizes = {r for a in defn.tensor_args for r in a.ranks}
    for let in defn.lets:  # sizes of sizes: rwkv's ``let M = P``
        if let.value.free_symbols and {s.name for s in let.value.free_symbols} <= sizes:
            sizes.add(let.name)
    return frozenset(let.name for let in defn.lets
                     if {s.name for s in let.value.free_symbols} & sizes
                     and let.value.has(sympy.ceiling))


def loopless_roles(tp: TileProgram) -> RankRoles:
    """Roles in a kernel without a streamed loop: the first long rank of what it stores
    is the row, its other long ranks are grid ranks, the rest are held whole."""
    defn = tp.cascade
    long = long_with_lets(defn)
    outs = [r for o in defn.outputs for r in o.ranks]
    chunks = chunk_ranks(defn)
    lhs_long = list(dict.fromkeys(r for r in outs if r in long and r not in chunks))
    row = lhs_long[0] if lhs_long else None
    grid = tuple(lhs_long[1:]) + tuple(r for r in dict.fromkeys(outs) if r in chunks)
    used = set()
    for st in tp.prologue + tp.epilogue:
        used |= set(st.lhs) | free_ranks(st.expr)
        for red in walk(st.expr):
            if isinstance(red, Reduce):
                used |= set(red.ranks)
    vector = tuple(r for r in ([row] if row else []) + [r for r in defn.ranks if r in used]
                   if r not in grid)
    return RankRoles(row, None, None, grid, tuple(dict.fromkeys(vector)))


def classify_ranks(tp: TileProgram, statements) -> RankRoles:
    """Row, tile, grid and vector ranks from how the statements use them.  A rank that a
    ``let`` makes a sequence rank counts as one (selective attention's keys ``M = P``,
    read by its saved states ``FS_at[p,m]`` beside ``K[m,e]``, are the rows of its
    key-major stage, not one key per program) unless the kernel would then hold it whole
    (its map over ``p`` and ``m``, whose keys stay one per program)."""
    long = long_with_lets(tp.cascade)
    roles = _classified(tp, statements, long)
    if any(r in long for r in roles.vector if r not in (roles.row, roles.tile)):
        return _classified(tp, statements, long_ranks(tp.cascade))
    return roles


def _classified(tp: TileProgram, statements, long: frozenset[str]) -> RankRoles:
    defn = tp.cascade
    inputs = {a.name for a in defn.tensor_args}
    streamed = _streamed_inputs(tp, statements, inputs)
    state_ranks = []
    for st in tp.inits:
        state_ranks += [r for r in st.lhs if r != st.iter_rank and r not in state_ranks]
    in_streamed, in_other = set(), set()
    beside_keys = set()  # ranks a streamed input reads with other ranks than the keys'
    for st in statements + tuple(tp.epilogue) + tuple(tp.prologue):
        for acc in walk(st.expr):
            if isinstance(acc, Access) and acc.tensor in inputs:
                used = set().union(*(free_ranks(s) for s in acc.subscripts)) if acc.subscripts else set()
                # a streamed input read off the loop (GLA's CG[p + M - P] beside CG[m]) is
                # an ordinary read: its ranks do not select keys
                along = acc.tensor in streamed and tp.loop_rank in used
                (in_streamed if along else in_other).update(used)
                if along and len(used - {tp.loop_rank, tp.tile_rank}) > 1:
                    beside_keys |= used
    selectors = _selectors(tp, statements, streamed)
    contracted = _contracted(statements)
    # a rank read by both streamed and other inputs selects which keys a program streams
    # (a head rank) -- unless the loop body contracts it: the head dim e of dQ[p,e] =
    # sum[m](dS[p,m] * K[m,e]) whose scores contract e too is held whole
    # and, beside a row, a long state rank only the streamed inputs read (the head h of a
    # key-major dV[h,m,f] = sum[p](dO[h,p,f] * A[h,p,m])) is one per program, not held whole
    has_row = any(r not in in_streamed for r in state_ranks)
    # (a rows × keys input, a bias B[p,m] or selective attention's stored steps, reads the
    # sequence rank p beside the keys alone: p stays a row; the keys' head h is read beside
    # e; a head dim such as f stays a grid rank: held in a block beside a masked dot operand,
    # an inf there times a masked 0 is NaN, as in causal linear attention's dV stage)
    grid = [r for r in state_ranks
            if ((r in in_streamed and r in in_other and (r in beside_keys or r not in long))
                or r in selectors
                or (has_row and r in in_streamed and r in long)) and r not in contracted]
    rows = [r for r in state_ranks if r not in in_streamed and r not in grid]
    guard_ranks = set()
    for _, gs in tp.guards:
        for g in gs:
            guard_ranks |= free_ranks(g.cond)
    row = next((r for r in rows if r in guard_ranks), rows[-1] if rows else None)
    if row is None:
        # a reduction of the keys into a state over head dims only (linear attention's
        # K^T V): its first rank is blocked into rows, so no program holds E x F whole
        row = next((r for r in state_ranks if r not in grid), None)
    grid += [r for r in rows if r != row]
    if row is not None:
        for st in tp.inits:  # programs own disjoint row blocks: a state without the row
            if row not in st.lhs and row in _summed_into(tp, st.tensor):  # rank that sums
                raise NotTileable(  # over it would differ per program, each writing it
                    f"{st.tensor} is reduced over the row rank {row}, whose blocks "
                    f"different programs own (no cross-program sum)")
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
    return RankRoles(row, tp.tile_rank, tp.loop_rank, tuple(grid), tuple(vector))


def _summed_into(tp: TileProgram, state: str) -> set[str]:
    """Ranks reduced by the loop-body statements that ``state``'s update reads, directly or
    through each other (a state that sums nothing over the row is the same in every
    program: decode's running max over keys when the value dim is the row)."""
    by_name: dict[str, list] = {}
    for st in tp.body:
        by_name.setdefault(st.tensor, []).append(st)
    out, todo, seen = set(), [state], set()
    while todo:
        t = todo.pop()
        if t in seen:
            continue
        seen.add(t)
        for st in by_name.get(t, []):
            for n in walk(st.expr):
                if isinstance(n, Reduce):
                    out |= set(n.ranks)
                elif isinstance(n, Access) and n.tensor in by_name:
                    todo.append(n.tensor)
    return out


def _contracted(statements) -> set[str]:
    """Ranks a reduction of the loop body sums over (the tile's head dims)."""
    out = set()
    for st in statements:
        for red in walk(st.expr):
            if isinstance(red, Reduce):
                out |= set(red.ranks)
    return out


def _streamed_inputs(tp: TileProgram, statements, inputs) -> set[str]:
    """Inputs read along the loop rank (the keys and values)."""
    streamed = set()
    for st in statements:
        for acc in walk(st.expr):
            if isinstance(acc, Access) and acc.tensor in inputs and any(
                    tp.loop_rank in free_ranks(s) for s in acc.subscripts):
                streamed.add(acc.tensor)
    return streamed


def _selectors(tp: TileProgram, statements, streamed) -> set[str]:
    """Ranks that choose *which* keys stream (``w`` in ``K[(w*MT + mt)*M0 + m0]``)."""
    out = set()
    for st in statements:
        for acc in walk(st.expr):
            if isinstance(acc, Access) and acc.tensor in streamed:
                for sub in acc.subscripts:
                    if not isinstance(sub, Index) and tp.loop_rank in free_ranks(sub):
                        out |= free_ranks(sub) - {tp.loop_rank, tp.tile_rank}
    return out


def head_packing(tp: TileProgram, statements, ranks: RankRoles) -> HeadPacking | None:
    """The first grid rank the key/value loads read only as ``h // G`` (or not at all)."""
    defn = tp.cascade
    if ranks.row is None or ranks.tile is None:
        return None
    args = {a.name: a for a in defn.tensor_args}
    moving = {ranks.loop, ranks.tile}
    streamed = []
    for st in statements:
        for e in (st.expr, st.where):
            for acc in (walk(e) if e is not None else ()):
                if isinstance(acc, Access) and acc.tensor in args and any(
                        moving & free_ranks(sub) for sub in acc.subscripts):
                    streamed.append(acc)
    lets = {let.name: let.value for let in defn.lets}
    for h in ranks.grid:
        forms, plain = set(), False
        for acc in streamed:
            for sub, rank in zip(acc.subscripts, args[acc.tensor].ranks):
                if h not in free_ranks(sub):
                    continue
                if (isinstance(sub, Binary) and sub.op == "//" and sub.left == Index(h)
                        and isinstance(sub.right, Size)):
                    forms.add((sub, rank))
                else:
                    plain = True
        if plain or len(forms) > 1:
            continue
        if not forms:
            return HeadPacking(h, h, None, None)
        ((sub, unit_rank),) = forms
        group = sub.right.rank
        if group in lets and sympy.simplify(
                lets[group] - size_symbol(h) / size_symbol(unit_rank)) == 0:
            return HeadPacking(h, group, unit_rank, sub)
    return None


def map_kernel_ranks(k: Kernel, packs_heads: bool) -> Kernel:
    """Roles for one kernel (a combine kernel keeps the roles the variants stage gave it)."""
    if k.roles is not None:
        return k
    if k.tiles.loop_rank is None:
        return dataclasses.replace(k, roles=_no_split_sums(k, loopless_roles(k.tiles)))
    _, body = expanded_body(k.tiles)
    roles = classify_ranks(k.tiles, body)
    if packs_heads and k.role != "combine" and not _reduces_row(k.tiles, body, roles):
        roles = dataclasses.replace(roles, packing=head_packing(k.tiles, body, roles))
        roles = _rows_of_a_group(k.tiles, roles)
    return dataclasses.replace(k, roles=_no_split_sums(k, roles, body))


def _rows_of_a_group(tp: TileProgram, roles: RankRoles) -> RankRoles:
    """A decode without a query rank (``Q[B,H,E]``, ``O[B,H,F]``): classify found no row, so
    a head dim of the output (the value dim ``f``) became the row, and packing made rows of
    ``(g, f)`` pairs: each head's scores were recomputed for every ``f`` and ``P·V`` summed
    element-wise.  When some state lacks that row (the running max over keys ``RM[b,h]``,
    one per query head), the rows are the group's query heads themselves: ``Q·Kᵀ`` and
    ``P·V`` are products over ``G`` rows (padded to a block), K and V tiles are loaded in
    one layout, and ``f`` is held whole.  Before → after (paged decode, GQA)::

        grid (B, H)  rows F  vector (F, M0, E)  packed H by G per HK
        grid (B)     rows H  vector (H, M0, F, E)  packed H by G per HK
    """
    pk = roles.packing
    if pk is None or roles.row is None or roles.row == pk.rank or \
            roles.row in long_with_lets(tp.cascade) or \
            all(roles.row in st.lhs for st in tp.inits):
        return roles
    first = (pk.rank, roles.tile) if roles.tile else (pk.rank,)  # canonical: row, tile, ...
    return dataclasses.replace(roles, row=pk.rank,
                               grid=tuple(g for g in roles.grid if g != pk.rank),
                               vector=first + tuple(v for v in roles.vector if v not in first))


def _reduces_row(tp: TileProgram, body, roles: RankRoles) -> bool:
    """Whether a statement sums over the row rank: packed, a row block holds several heads'
    rows, and the sum would add them together (paged decode's ``dQ`` stage has no query
    positions, so its rows are the head dim ``e``, which ``S = sum[e](Q * K)`` reduces)."""
    return roles.row is not None and any(
        isinstance(n, Reduce) and roles.row in n.ranks
        for st in (*tp.prologue, *tp.inits, *body, *tp.epilogue) for n in walk(st.expr))


def _no_split_sums(k: Kernel, roles: RankRoles, body=()) -> RankRoles:
    """``roles``, or NotTileable when a statement reduces a rank the programs split (a grid
    rank): each program would hold a part of the sum and store it as the whole.  Before,
    a backward stage's ``dV_1[mx,f] = sum[p](...)`` beside ``dQ[p,e]`` ran with grid (P),
    every program overwriting ``dV_1`` with its own query's share."""
    tp = k.tiles
    long = long_with_lets(tp.cascade)  # (a split-K cascade's combine over W is its own kernel)
    if roles.row is not None and roles.row not in long and any(
            isinstance(n, Reduce) and roles.row in n.ranks
            for st in (*tp.prologue, *tp.inits, *body, *tp.epilogue) for n in walk(st.expr)):
        # a head dim the kernel contracts is held whole, not split into row blocks: a
        # key-major dK[m,e] whose scores sum over e, with m a grid rank (its keys' rows are
        # a head dim by the argument-layout rule: a saved D[P,M]), had its e in blocks, each
        # program summing a part of the scores
        roles = dataclasses.replace(roles, row=None)
    split_ranks = set(roles.grid) | ({roles.row} if roles.row else set())
    for st in (*tp.prologue, *tp.inits, *body, *tp.epilogue):
        for n in walk(st.expr):
            if isinstance(n, Reduce):
                split = sorted(set(n.ranks) & split_ranks & long)
                if split:
                    what = "row blocks" if split[0] == roles.row else "programs"
                    raise NotTileable(f"{k.name}: {st.tensor} reduces over {split[0]}, which "
                                      f"the kernel's {what} split (no cross-program sum)")
    return roles


def map_ranks(p: Program, packs_heads: bool = True) -> Program:
    """The ``map-ranks`` stage: every kernel of the program gets its rank roles."""
    return map_kernels(p, lambda k: map_kernel_ranks(k, packs_heads))
