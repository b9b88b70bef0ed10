"""``variants``: the ways a kernel program can run, each a list of kernels.

* **streamed**: one program per row block streams every tile.  When the epilogue reduces
  over a grid rank (a sum over heads, say), the loop's final states go to a workspace
  and a **combine** kernel finishes: ``worker -> combine``.
* **split-K** (decode: few rows, long keys): the loop is split over ``W`` workers by the
  ``split-k`` cascade pass (:mod:`attnc.passes.split_k`); each worker stores its final
  states in slot ``w`` of a workspace and the combine kernel merges the slots with the
  *derived* combine.  Before → after::

      kernel causal (streamed) -> AV[P,F]
      ->
      kernel causal_split (worker) -> RM[W,P], RD[W,P], RNV[W,P,F]
      kernel causal_split_combine (combine) -> AV[P,F]

* **stream-K**: persistent workers share the flattened (unit × tile) space evenly and
  store each segment's final state in a slot of the split-K workspace, pre-filled with the
  (constant) init states; the split-K combine merges them unchanged.

The launcher chooses among the variants from the grid and the device at run time.
"""
from __future__ import annotations

import dataclasses

from ..einsum_ir.exprs import free_ranks, walk
from ..einsum_ir.ir import Access, Const, Definition, Expr, Num, Reduce, TensorArg, Unary
from ..einsum_ir.kernel import Buffer, Kernel, Program, RankRoles, Variant
from .bound_tiles import bound_kernel_tiles
from .map_ranks import map_kernel_ranks
from .tile import NotTileable, TileProgram, tile_program


def _reduced_after_loop(tp: TileProgram) -> set[str]:
    return {r for st in tp.epilogue for red in walk(st.expr) if isinstance(red, Reduce)
            for r in red.ranks}


def _outputs(defn: Definition) -> tuple[Buffer, ...]:
    return tuple(Buffer(o.name, o.ranks, "output") for o in defn.outputs)


def _workspace(tp: TileProgram) -> tuple[Buffer, ...]:
    """The final states, without their iterative rank."""
    d = tp.cascade
    return tuple(Buffer(st.tensor, tuple(r for r in d.tensor_ranks(st.tensor) if r != st.iter_rank),
                        "workspace") for st in tp.inits)


def _final_reads(e: Expr, states: dict[str, str], defn: Definition) -> Expr:
    """``T[.., I, ..]`` (a state's final step) -> ``T[.., ..]`` (the workspace tensor)."""
    from ..einsum_ir.exprs import transform

    def fix(n):
        if isinstance(n, Access) and n.tensor in states:
            pos = defn.tensor_ranks(n.tensor).index(states[n.tensor])
            return Access(n.tensor, n.subscripts[:pos] + n.subscripts[pos + 1:], loc=n.loc)
        return None
    return transform(e, fix)


def _prologue_needed(tp: TileProgram, statements) -> tuple:
    """Prologue statements the epilogue reads, directly or through each other (a combine
    kernel recomputes them: they are O(rows) and read no tile)."""
    by_name = {st.tensor: st for st in tp.prologue}
    need, stack = set(), [st for st in statements]
    while stack:
        st = stack.pop()
        for e in (st.expr, st.where):
            for n in (walk(e) if e is not None else ()):
                if isinstance(n, Access) and n.tensor in by_name and n.tensor not in need:
                    need.add(n.tensor)
                    stack.append(by_name[n.tensor])
    return tuple(st for st in tp.prologue if st.tensor in need)


def combine_program(tp: TileProgram, roles: RankRoles) -> tuple[TileProgram, RankRoles, tuple]:
    """The epilogue as a kernel of its own, reading the final states from a workspace.
    Before → after::

        AV[p,f] = sum[w](RNV[w,MT,p,f] * ...) / ...      (epilogue of the split loop)
        ->
        combine(RNV[W,P,F], ...):  AV[p,f] = sum[w](RNV[w,p,f] * ...) / ...
    """
    d = tp.cascade
    states = {st.tensor: st.iter_rank for st in tp.inits}
    workspace = _workspace(tp)
    args = tuple(TensorArg(b.name, b.ranks, "f32") for b in workspace) + d.tensor_args
    epilogue = tuple(dataclasses.replace(st, expr=_final_reads(st.expr, states, d),
                                         where=None if st.where is None else
                                         _final_reads(st.where, states, d))
                     for st in tp.epilogue)
    # an output the prologue makes (it reads no tile: T1 = min[p](K[p,0]) beside a loop
    # over e) is the combine's to store too, so it recomputes it (before, the combine
    # stored an output it never computed: a KernelIRError, found by tests/fuzz.py)
    outputs = {o.name for o in d.outputs}
    made = tuple(st for st in tp.prologue if st.tensor in outputs)
    needed = {st.tensor for st in _prologue_needed(tp, epilogue + made)} | outputs
    statements = tuple(st for st in tp.prologue if st.tensor in needed) + epilogue
    defn2 = dataclasses.replace(d, name=d.name + "_combine", params=args + d.scalar_params,
                                statements=statements)
    tp2 = TileProgram(name=defn2.name, cascade=defn2, prologue=statements, loop_rank=None,
                      tile_rank=None, tile_size=None, stream_rank=None, inits=(), body=(),
                      epilogue=(), kept=frozenset(), guards=(), row_rank=None)
    reduced = {r for st in statements for red in walk(st.expr) if isinstance(red, Reduce)
               for r in red.ranks}
    grid = tuple(g for g in roles.grid if g not in reduced)
    every = []
    for st in statements:
        for r in list(st.lhs) + sorted(free_ranks(st.expr)) + sorted(reduced):
            if r not in every:
                every.append(r)
    vector = tuple(dict.fromkeys(r for r in [roles.row] + every if r and r not in grid))
    return tp2, RankRoles(roles.row, None, None, grid, vector), workspace


def _lowered(k: Kernel, packs_heads: bool) -> Kernel:
    return bound_kernel_tiles(map_kernel_ranks(k, packs_heads))


def loop_kernels(defn: Definition, name: str, role: str, packs_heads: bool,
                 lowered: Kernel | None = None) -> tuple[Kernel, ...]:
    """One kernel for ``defn``, or a worker and a combine kernel when its epilogue reduces
    over a grid rank (the workers of a split loop, or heads summed after the loop).
    ``lowered``: ``defn``'s kernel as the earlier stages left it, kept when it stands alone."""
    tp = lowered.tiles if lowered is not None else tile_program(defn)
    head = _lowered(Kernel(name, role, dataclasses.replace(tp, epilogue=()), ()), packs_heads)
    if not _reduced_after_loop(tp) & set(head.roles.grid):
        return (lowered or _lowered(Kernel(name, role, tp, _outputs(defn)), packs_heads),)
    tp2, roles2, workspace = combine_program(tp, head.roles)
    worker = dataclasses.replace(head, role="worker", writes=workspace)
    combine = Kernel(f"{name}_combine", "combine", tp2, _outputs(defn), roles=roles2)
    return worker, combine


def _split_rank(kernels: tuple[Kernel, ...]) -> str | None:
    if len(kernels) != 2:
        return None
    reduced = _reduced_after_loop(kernels[1].tiles) | {
        r for st in kernels[1].tiles.prologue for red in walk(st.expr) if isinstance(red, Reduce)
        for r in red.ranks}
    return next((r for r in kernels[0].roles.grid if r in reduced), None)


def is_constant(e: Expr) -> bool:
    """A number, ``inf``, ``pi``, or the negation of one."""
    if isinstance(e, Num):
        return True
    if isinstance(e, Const):
        return e.name in ("inf", "pi", "e")
    return isinstance(e, Unary) and e.op == "-" and is_constant(e.operand)


def constant_fills(tp: TileProgram) -> tuple | None:
    """Each state's init when it is a constant (``0``, ``-inf``), else None: what a
    stream-K workspace is filled with, so a slot no segment writes reads as a worker that
    saw no tile."""
    fills = []
    for st in tp.inits:
        if st.where is not None or not is_constant(st.expr):
            return None
        fills.append((st.tensor, st.expr))
    return tuple(fills)


def stream_k_kernel(defn: Definition, name: str, split: tuple[Kernel, ...],
                    packs_heads: bool) -> Kernel | None:
    """The persistent stream-K worker over ``defn``'s loop, writing the split workspace."""
    tp = tile_program(defn)
    fills = constant_fills(tp)
    if fills is None:
        return None
    worker = split[0]
    if {b.name for b in worker.writes} != {t for t, _ in fills}:
        return None
    k = _lowered(Kernel(name, "stream-k", dataclasses.replace(tp, epilogue=()), worker.writes,
                        fills=fills), packs_heads)
    shared = _shared_across_row_blocks(k)
    if shared:
        raise NotTileable(f"the state {shared} has no row rank ({k.roles.row}), so every row "
                          f"block of a unit would store it into one slot, and stream-K's "
                          f"segments differ between row blocks")
    return k


def _shared_across_row_blocks(k: Kernel) -> str | None:
    """A workspace state of stream-K worker ``k`` without its row rank (a decode whose row
    is a head dim: the max over keys is one per query, stored once per unit): split-K's
    workers agree on their slots in every row block, stream-K's segments do not."""
    r = k.roles
    if r is None or r.row is None:
        return None
    for b in k.writes:
        if r.row not in b.ranks:
            return b.name
    return None


def build_variants(defn: Definition, packs_heads: bool = True, split_workers: int = 2,
                   streamed_kernel: Kernel | None = None) -> Program:
    """The kernel program of a one-loop definition with every variant it admits
    (``streamed_kernel``: its kernel as map-ranks and bound-tiles left it)."""
    from .split_k import SplitKUnsupported, split_k, split_k_blockers

    streamed = loop_kernels(defn, defn.name, "streamed", packs_heads, streamed_kernel)
    variants = [Variant("streamed", tuple(k.name for k in streamed), _split_rank(streamed))]
    kernels = list(streamed)
    notes = []
    if len(streamed) == 1:
        blockers = split_k_blockers(defn)
        if blockers:
            notes.append(f"no split-K variant: {blockers[0]}")
        else:
            try:
                split = loop_kernels(split_k(defn, split_workers), f"{defn.name}_split",
                                     "worker", packs_heads)
            except (NotTileable, SplitKUnsupported) as err:
                notes.append(f"no split-K variant: {err}")
            else:
                split_rank = _split_rank(split)
                variants.append(Variant("split-k", tuple(k.name for k in split), split_rank))
                kernels += split
                stream = _stream_variant(defn, split, packs_heads, notes)
                if stream is not None:
                    variants.append(Variant("stream-k", (stream.name, split[1].name), split_rank))
                    kernels.append(stream)
    buffers = {}
    for k in kernels:
        for b in k.writes:
            buffers.setdefault((b.name, b.ranks), b)
    inputs = tuple(Buffer(a.name, a.ranks, "input") for a in defn.tensor_args)
    return Program(defn.name, defn, tuple(kernels), inputs + tuple(buffers.values()),
                   tuple(variants), tuple(notes))


def _stream_variant(defn, split, packs_heads, notes) -> Kernel | None:
    if len(split) != 2:
        return None
    try:
        stream = stream_k_kernel(defn, f"{defn.name}_stream", split, packs_heads)
    except NotTileable as err:
        notes.append(f"no stream-K variant: {err}")
        return None
    if stream is None:
        notes.append("no stream-K variant: an initial state is not a constant")
    return stream
