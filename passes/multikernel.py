"""The ``tile`` stage: a definition's kernels — one streamed loop, or several kernels.

A kernel holds the short ranks (head dims) whole, blocks one long rank into rows and
streams at most one other long rank in tiles.  When the optimised cascade fits that as
one loop (every softmax variant after ``online``), the program is one kernel.  When it
does not — reassociated linear attention ``Q (K^T V)``, whose ``K^T V`` reduces the keys
into a small ``E × F`` matrix that every query then reads, or a norm pre-pass — the
cascade that entered ``online`` is **partitioned** into parts joined by small buffers,
each part goes through ``online`` and ``stream-final`` on its own and becomes a kernel.
Before → after (linear attention)::

    FK[m,e]  = phi(K[m,e])                     part 0 (streams M):   KV[e,f], KS[e]
    KV[e,f]  = FK[m,e] * V[m,f]                  FK, KV, KS
    KS[e]    = sum[m](FK[m,e])             ->   part 1 (rows P):      AV[p,f]
    FQ[p,e]  = phi(Q[p,e])                       FQ, NUM, DEN, AV     reads KV, KS
    NUM[p,f] = FQ[p,e] * KV[e,f]  ...

Partition rule: a tensor over a long rank stays in the kernel that computes it (it is
recomputed, never written to memory); a tensor over short ranks only (``KV[e,f]``) may
be a buffer between kernels.  Long ranks are the ranks of tensor arguments other than
the last (innermost) dimension of a floating-point argument.
"""
from __future__ import annotations

import dataclasses

import networkx as nx

from ..einsum_ir.exprs import free_ranks, transform, walk
from ..einsum_ir.ir import (Access, Binary, Call, Definition, Einsum, Index, IterativeEinsum, Num,
                            Output, Param, Reduce, ScalarParam, Size, TensorArg)
from ..einsum_ir.kernel import Buffer, Kernel, Program
from ..einsum_ir.schedule import dataflow_graph
from .map_ranks import chunk_ranks, long_ranks, long_with_lets, map_kernel_ranks
from .names import fresh_name, fresh_rank
from .tile import NotTileable, TileProgram, tile_program


def kernel_blocker(tp: TileProgram, roles) -> str | None:
    """Why one kernel cannot hold ``tp`` (a long rank held whole, ``let`` sizes of long
    ranks too: a paged cache's ``let M = NB * PG``), or None."""
    long = long_with_lets(tp.cascade) | ({tp.stream_rank} if tp.stream_rank else set())
    held = [r for r in roles.vector if r not in (roles.row, roles.tile) and r in long]
    if held:
        return f"the kernel would hold the long rank {held[0]} whole in every program"
    return None


def _one_kernel(defn: Definition) -> Program:
    tp = tile_program(defn)
    outputs = tuple(Buffer(o.name, o.ranks, "output") for o in defn.outputs)
    k = Kernel(defn.name, "streamed", tp, outputs)
    why = kernel_blocker(tp, map_kernel_ranks(k, False).roles)
    if why:
        raise NotTileable(f"{defn.name}: {why}")
    return Program(defn.name, defn, (k,))


# ----------------------------------------------------------------------------
# partition
# ----------------------------------------------------------------------------


def _partition(defn: Definition) -> list[list]:
    """Statements grouped into parts (in dependency order): a tensor over a long rank is
    fused with its readers, and so is a tensor that reads no tensor (a function of its
    indices, such as the chunked form's decay ``T[q0,m0] = gamma ** (q0 - m0)``: a kernel
    recomputes it rather than loading it)."""
    long = long_ranks(defn)
    stmts = [s for s in defn.statements]
    owner = {s.tensor: i for i, s in enumerate(stmts)}
    chunk_major = _chunk_major(defn)
    plain = _read_once_in_place(defn)
    g = nx.Graph()
    g.add_nodes_from(range(len(stmts)))
    dag = nx.DiGraph()
    dag.add_nodes_from(range(len(stmts)))
    for i, st in enumerate(stmts):
        for e in (st.expr, st.where):
            for n in (walk(e) if e is not None else ()):
                if isinstance(n, Access) and n.tensor in owner and owner[n.tensor] != i:
                    j = owner[n.tensor]
                    dag.add_edge(j, i)
                    if set(defn.tensor_ranks(n.tensor)) & long or isinstance(stmts[j], IterativeEinsum) \
                            or _spans_long(stmts[j], defn, long) or not _reads(stmts[j:j + 1]) \
                            or (plain[stmts[j].tensor] and (stmts[j].tensor in chunk_major
                                                            or _argument_map(stmts[j], defn))):
                        g.add_edge(i, j)
        if isinstance(st, IterativeEinsum):
            for j, other in enumerate(stmts):
                if other.tensor == st.tensor and j != i:
                    g.add_edge(i, j)
    parts = nx.quotient_graph(dag, [set(c) for c in nx.connected_components(g)])
    if not nx.is_directed_acyclic_graph(parts):
        raise NotTileable(f"{defn.name}: its kernels would depend on each other in a cycle")
    order = nx.lexicographical_topological_sort(parts, key=min)
    return [[stmts[i] for i in sorted(node)] for node in order]


def _chunk_major(defn: Definition) -> set[str]:
    """Tensors over a chunk rank ``M1 = ceil(M/M0)`` and a rank of the chunk's size ``M0``
    (``M0`` itself or a ``let M0Q = M0``): as large as the long rank ``M`` they cut, so
    never a buffer when one reader can compute them (the chunked form's
    ``QK[m1,m0q,m0]``, ``O_intra[m1,m0q,f]``)."""
    import sympy

    chunks = {let.name: let.value for let in defn.lets if let.name in chunk_ranks(defn)}
    alias = {let.name: str(let.value) for let in defn.lets if isinstance(let.value, sympy.Symbol)}
    lets = {let.name for let in defn.lets}
    out = set()
    for st in defn.statements:
        sizes = {alias.get(r, r) for r in st.lhs}  # M0Q counts as M0
        for c in set(st.lhs) & set(chunks):
            if sizes & lets & {str(s) for s in chunks[c].free_symbols}:
                out.add(st.tensor)
    return out


def _argument_map(st, defn: Definition) -> bool:
    """``st`` maps the arguments alone (no reduction): its one reader recomputes it (the
    chunked form's per-channel decay ``U1[q0,e,m0] = select(m0 == q0, U[e], ...)``)."""
    args = {a.name for a in defn.tensor_args}
    return type(st) is Einsum and not any(isinstance(n, Reduce) for n in walk(st.expr)) \
        and _reads([st]) <= args


def _read_once_in_place(defn: Definition) -> dict[str, bool]:
    """Per tensor: read by exactly one statement, and there at its own ranks (plain
    subscripts), so that statement's kernel can compute it."""
    readers: dict[str, set[int]] = {}
    in_place: dict[str, bool] = {}
    for i, st in enumerate(defn.statements):
        for e in (st.expr, st.where):
            for n in (walk(e) if e is not None else ()):
                if isinstance(n, Access):
                    readers.setdefault(n.tensor, set()).add(i)
                    ok = all(isinstance(x, Index) for x in n.subscripts)
                    in_place[n.tensor] = in_place.get(n.tensor, True) and ok
    return {t: len(r) == 1 and in_place[t] for t, r in readers.items()}


def _inline_argument_maps(defn: Definition) -> Definition:
    """``defn`` with each map of the arguments alone (no ``where``, no reduction, not an
    output) inlined where it is read, at the read's subscripts.  Before → after (causal
    linear attention's chunked form, whose per-chunk states and output kernel both read the
    feature map, with the scan over chunks between them)::

        FK[m,e] = select(K[m,e] > 0, K[m,e] + 1, exp(K[m,e]))
        FQFK[p,m0] = sum[e](FQ[p,e] * FK[(p + D) // M0 * M0 + m0, e])
    ->  FQFK[p,m0] = sum[e](FQ[p,e] * select(K[(p + D) // M0 * M0 + m0, e] > 0, ...))
    """
    from .defer_normalization import substitute

    args = {a.name for a in defn.tensor_args}
    outs = {o.name for o in defn.outputs}
    maps = {st.tensor: st for st in defn.statements
            if type(st) is Einsum and st.where is None and st.tensor not in outs
            and not any(isinstance(n, Reduce) for n in walk(st.expr))
            and all(n.tensor in args for n in walk(st.expr) if isinstance(n, Access))}
    if not maps:
        return defn

    def fix(n):
        if isinstance(n, Access) and n.tensor in maps:
            st = maps[n.tensor]
            return substitute(st.expr, dict(zip(st.lhs, n.subscripts)))
        return None
    kept = tuple(_transformed(st, fix) for st in defn.statements if st.tensor not in maps)
    return dataclasses.replace(defn, statements=kept)


def _spans_long(st, defn: Definition, long: frozenset[str]) -> bool:
    """``st``'s tensor holds a long rank through its tiles: it reads an argument along a
    long rank at a subscript of several of its own ranks (the chunked form's
    ``K1[m1,m0,e] = K[m1 * M0 + m0, e] * ...``), so it is as long as the rank."""
    args = {a.name: a for a in defn.tensor_args}
    for n in walk(st.expr):
        if isinstance(n, Access) and n.tensor in args:
            for sub, r in zip(n.subscripts, args[n.tensor].ranks):
                ranks = free_ranks(sub)
                if r in long and len(ranks) > 1 and ranks <= set(st.lhs):
                    return True
    return False


def _part_definition(defn: Definition, stmts: list, k: int, later_reads: set[str],
                     made: dict[str, tuple]) -> Definition:
    """One part as a definition: its inputs are the arguments and earlier parts' buffers
    it reads, its outputs what later parts (or the caller) read."""
    reads = _reads(stmts)
    own = {st.tensor for st in stmts}
    args = tuple(a for a in defn.tensor_args if a.name in reads)
    args += _binding_args(defn, stmts, args, {o.name for o in defn.outputs} & own)
    args += tuple(TensorArg(t, made[t], "f32") for t in sorted(reads - own) if t in made)
    used = {n.name for st in stmts for e in (st.expr, st.where)
            for n in (walk(e) if e is not None else ()) if isinstance(n, Param)}
    # the caller resolves defaults (they may name sizes this part does not see)
    params = args + tuple(dataclasses.replace(p, default=None) for p in defn.scalar_params
                          if p.name in used)
    finals = {o.name: o for o in defn.outputs}
    lhs = {st.tensor: st.lhs for st in stmts}
    outs = tuple(finals[t] if t in finals else Output(t, lhs[t], "f32")
                 for t in dict.fromkeys(st.tensor for st in stmts)
                 if t in finals or t in later_reads)
    lets = _lets_bound_by(defn, args)
    bound = {r for a in args for r in a.ranks} | {x.name for x in lets}
    for st in stmts:  # a rank it iterates must have a size its inputs give
        ranks = set(st.lhs) | {r for n in walk(st.expr) if isinstance(n, Reduce) for r in n.ranks}
        if ranks - bound:
            raise NotTileable(f"{defn.name}: a kernel computing {st.tensor} would iterate "
                              f"{sorted(ranks - bound)[0]}, whose size none of its inputs gives")
    stmts, sizes = _sizes_as_params(stmts, bound)
    params += tuple(ScalarParam(size_param(r)) for r in sizes)
    return dataclasses.replace(defn, name=f"{defn.name}__k{k}", params=params, outputs=outs,
                               lets=lets, statements=tuple(stmts))


def _iterated(stmts) -> set[str]:
    return {r for st in stmts for r in st.lhs} | {
        r for st in stmts for n in walk(st.expr) if isinstance(n, Reduce) for r in n.ranks}


def _binding_args(defn: Definition, stmts, args, finals: set[str]) -> tuple:
    """Arguments the part does not read but takes for their sizes: a rank it iterates, or a
    size in a subscript, that none of its inputs gives is given by the first argument of
    ``defn`` that has it (the chunked form's reordering
    ``O[p,f] = O_chunks[(p + D) // M0, (p + D) % M0, f]`` reads only the chunk-major
    buffer, yet iterates the queries ``P`` of ``Q[P,E]``); and a part
    that writes a final output takes a float argument, whose dtype the output's follows.
    Arguments come before buffers, so the first floating-point input is an argument.
    Only a part that writes a final output (``finals``) takes them: an inner part that
    iterates a rank no input gives (a backward stage's fill ``dV_1_filled[z,m,f]`` beside
    a saved ``SN[P,M]``, whose absent points a buffer cannot keep) stays refused, so that
    program is not made."""
    if not finals:
        return ()
    bound = {r for a in args for r in a.ranks}
    bound |= {x.name for x in _lets_bound_by(defn, args)}
    extra = []
    for r in sorted((_iterated(stmts) | _sizes_in_subscripts(stmts)) - bound):
        for a in defn.tensor_args:
            if r in a.ranks and a not in args and a not in extra:
                extra.append(a)
                bound |= set(a.ranks)
                break
    floats = [a for a in defn.tensor_args if a.dtype not in ("i32", "i64", "bool")]
    if finals and floats and not any(a in floats for a in (*args, *extra)):
        extra.append(floats[0])  # a final output's dtype follows the inputs', not a buffer's
    return tuple(extra)


def _sizes_in_subscripts(stmts) -> set[str]:
    """Sizes a part's subscripts use (``(p + M - P) // M0``): indices are integers, which
    a size turned into a (float) parameter is not."""
    out = set()
    for st in stmts:
        for e in (st.expr, st.where):
            for n in (walk(e) if e is not None else ()):
                if isinstance(n, Access):
                    out |= {x.rank for sub in n.subscripts for x in walk(sub)
                            if isinstance(x, Size)}
    return out


def size_param(rank: str) -> str:
    """The scalar parameter that carries a size a part's arguments do not bind."""
    return f"size_{rank.lower()}"


def _sizes_as_params(stmts, bound: set[str]):
    """Sizes used as numbers that no argument of the part binds become parameters
    (``/ (M + 1)`` in a part without the keys -> ``/ (size_m + 1)``)."""
    used: dict[str, None] = {}

    def fix(n):
        if isinstance(n, Size) and n.rank not in bound:
            used.setdefault(n.rank, None)
            return Param(size_param(n.rank), loc=n.loc)
        return None
    return [_transformed(st, fix) for st in stmts], tuple(used)


def _lets_bound_by(defn: Definition, args) -> tuple:
    """The ``let`` sizes computable from the ranks of ``args`` (and earlier such lets)."""
    known = {r for a in args for r in a.ranks}
    out = []
    for let in defn.lets:
        if {s.name for s in let.value.free_symbols} <= known:
            out.append(let)
            known.add(let.name)
    return tuple(out)


def _transformed(st, fix):
    """``st`` with ``fix`` (an ``exprs.transform`` rule) applied to its expression and where."""
    from ..einsum_ir.exprs import transform

    return dataclasses.replace(st, expr=transform(st.expr, fix),
                               where=None if st.where is None else transform(st.where, fix))


def _reads(stmts) -> set[str]:
    out = set()
    for st in stmts:
        for e in (st.expr, st.where):
            out |= {n.tensor for n in (walk(e) if e is not None else ()) if isinstance(n, Access)}
    return out


def _recurrence_parts(source: Definition) -> list[Definition] | None:
    """Two kernels for a recurrence over one long rank that carries another, read by a
    softmax streaming that other one (selective attention's per-step softmax, whose one-pass
    form ``online`` derives with the recurrence computed whole): a scan over the steps with
    rows of the carried rank, storing each step's state, then the streamed kernel reading
    it as an input.  None when the cascade has no such recurrence.  Before → after::

        S[p,m] = ...                                part 0 (a scan over p, rows m):
        FS[0,m] = 0                                   S, FS, FS_steps[p,m] = FS[p,m]
        FS[p+1,m] = FS[p,m] + relu(S[p,m])   ->     part 1 (rows p, tiles of m):
        L[p,m] = S[p,m] - FS[p,m]  ...                S, L[p,m] = S[p,m] - FS_steps[p,m] ...

    The state is present everywhere (a constant init without a ``where``: a step that is
    not computed carries it), so the stored steps need no presence flags."""
    long = long_with_lets(source)
    by_name: dict[str, list] = {}
    for st in source.statements:
        by_name.setdefault(st.tensor, []).append(st)
    for name, stmts in by_name.items():
        init = [st for st in stmts if isinstance(st, IterativeEinsum) and st.init]
        step = [st for st in stmts if isinstance(st, IterativeEinsum) and not st.init]
        if len(init) != 1 or len(step) != 1 or init[0].where is not None or any(
                isinstance(n, Access) for n in walk(init[0].expr)):
            continue
        rank = step[0].iter_rank
        carried = [r for r in step[0].lhs if r != rank and r in long]
        if rank not in long or not carried:
            continue
        needed = nx.ancestors(dataflow_graph(source), name) | {name}
        first = [st for st in source.statements if st.tensor in needed]
        steps = fresh_name(f"{name}_steps", {st.tensor for st in source.statements}
                           | {a.name for a in source.params})
        ids = tuple(Index(r) for r in step[0].lhs)
        first.append(Einsum(steps, step[0].lhs, Access(name, ids)))

        def stored(e):
            if isinstance(e, Access) and e.tensor == name:
                first_sub = e.subscripts[0]
                if not (isinstance(first_sub, Index) and first_sub.rank == rank):
                    raise _NotSteps
                return Access(steps, e.subscripts, e.loc)
            return None

        try:
            rest = [dataclasses.replace(st, expr=transform(st.expr, stored),
                                        where=None if st.where is None
                                        else transform(st.where, stored))
                    for st in source.statements if st.tensor not in needed - _maps_of(
                        source, needed, name)]
        except _NotSteps:
            continue
        with_steps = dataclasses.replace(source, statements=tuple(first) + tuple(
            st for st in source.statements if st.tensor not in needed))
        made = {}
        part0 = _part_definition(with_steps, first, 0, {steps}, made)
        # the reader takes the stored steps over a rank of their own for each carried one
        # (FS_steps[P,MS]): its own M stays the 'let' of a sequence rank, streamed in tiles,
        # where an argument over M would make M an innermost dim, a head dim held whole
        taken = {a.name for a in source.params} | {st.tensor for st in source.statements}
        taken |= {r for a in source.tensor_args for r in a.ranks} | {x.name for x in source.lets}
        own = tuple(r if r == rank else fresh_rank(f"{r}S", taken) for r in step[0].lhs)
        made[steps] = own
        part1 = _part_definition(with_steps, rest, 1, set(), made)
        return [part0, part1]
    return None


class _NotSteps(Exception):
    """The recurrence is read at another step than the reader's own."""


def _maps_of(source: Definition, needed: set[str], name: str) -> set[str]:
    """What the recurrence reads that its readers read too (recomputed in both kernels)."""
    return {st.tensor for st in source.statements if st.tensor in needed
            and st.tensor != name and isinstance(st, Einsum)}


def split_definition(source: Definition) -> list[Definition]:
    """The parts of ``source`` (see the module docstring), each a definition.

    A buffer stores 0 where its tensor is absent, so each buffer travels with a presence
    buffer, and the reading part restores the absence.  Before → after::

        KV[e,f] = sum[m](FK[m,e] * V[m,f])      KV[e,f] = sum[m](FK[m,e] * V[m,f])
                                           ->   KV_present[e,f] = select(KV[e,f] > 0, 1, 1)
        ... KV[e,f] ...                         KV_read[e,f] = KV[e,f]   where KV_present[e,f] > 0
                                                ... KV_read[e,f] ...
    """
    try:
        groups = [list(g) for g in _partition(source)]
    except NotTileable:  # parts that depend on each other through a map of the arguments
        source = _inline_argument_maps(source)
        groups = [list(g) for g in _partition(source)]
    taken = {st.tensor for st in source.statements} | {a.name for a in source.params}
    flags: dict[str, str] = {}
    ranks_of = {st.tensor: st.lhs for st in source.statements}
    for k, stmts in enumerate(groups):
        later = _reads([s for g in groups[k + 1:] for s in g])
        for st in list(stmts):
            if st.tensor in later and st.tensor not in flags:
                flags[st.tensor] = fresh_name(f"{st.tensor}_present", taken)
                stmts.append(_presence_of(st, flags[st.tensor]))
    for k in range(1, len(groups)):
        groups[k] = _restore_absence(groups[k], flags, taken, ranks_of)
    made: dict[str, tuple] = {}
    parts = []
    for k, stmts in enumerate(groups):
        later = _reads([s for g in groups[k + 1:] for s in g])
        d = _part_definition(source, stmts, k, later, made)
        made.update({o.name: o.ranks for o in d.outputs})
        parts.append(d)
    return parts


def _presence_of(st, name: str) -> Einsum:
    """``name[...] = 1`` exactly where ``st``'s tensor is present (a map reads it)."""
    idx = tuple(Index(r) for r in st.lhs)
    read = Access(st.tensor, idx)
    return Einsum(name, st.lhs, Call("select", (Binary(">", read, Num(0)), Num(1), Num(1))))


def _restore_absence(stmts: list, flags: dict[str, str], taken: set[str], ranks_of) -> list:
    """Reads of earlier parts' buffers are absent where the buffer's presence flag is 0.

    Reads at the buffer's own ranks go through a copy, ``KV_read[e,f] = KV[e,f] where
    KV_present[e,f] > 0``.  A statement that reads a buffer at other subscripts (a copy
    would be read shifted, which a kernel cannot do with a value it holds) gets the flags
    as ``where`` atoms at the same subscripts instead, when its reads all lie on one level
    (outside reductions, or in its one top-level reduction); before → after (GLA's
    cumulative gate)::

        S[p,m] = Q[p,e] * K[m,e] * exp(CG[p + M - P] - CG[m])   where m <= p + M - P
    ->  S[p,m] = Q[p,e] * K[m,e] * exp(CG[p + M - P] - CG[m])
                 where m <= p + M - P and CG_present[p + M - P] > 0 and CG_present[m] > 0
    """
    own = {st.tensor for st in stmts}
    flagged = {t for t in _reads(stmts) if t in flags and t not in own}
    if not flagged:
        return stmts
    out, copied = [], {}
    for st in stmts:
        shifted = any(a.subscripts != tuple(Index(r) for r in ranks_of[a.tensor])
                      for a in _flagged_reads(st, flagged))
        guarded = _guarded_where(st, flagged, flags) if shifted else None
        if guarded is not None:
            out.append(guarded)
            continue
        for t in sorted(_reads([st]) & flagged):
            copied.setdefault(t, fresh_name(f"{t}_read", taken))
        out.append(st)
    copies = []
    for t, name in copied.items():
        idx = tuple(Index(r) for r in ranks_of[t])
        copies.append(Einsum(name, ranks_of[t], Access(t, idx),
                             where=Binary(">", Access(flags[t], idx), Num(0))))

    def fix(n):
        if isinstance(n, Access) and n.tensor in copied:
            return Access(copied[n.tensor], n.subscripts, loc=n.loc)
        return None
    return copies + [_transformed(st, fix) if _reads([st]) & set(copied) else st for st in out]


def _guarded_where(st, flagged: set[str], flags: dict[str, str]):
    """``st`` with ``flag[subs] > 0`` added to its ``where`` for each read of a flagged
    buffer, or None when a read sits inside a nested reduction (its own level)."""
    top = st.expr.body if isinstance(st.expr, Reduce) else st.expr
    nested = [n for n in walk(top) if isinstance(n, Reduce)]
    inner = {id(a) for r in nested for a in walk(r) if isinstance(a, Access)}
    reads = _flagged_reads(st, flagged)
    if not reads or any(id(a) in inner for a in reads):
        return None
    where = st.where
    for a in dict.fromkeys(Access(a.tensor, a.subscripts) for a in reads):
        atom = Binary(">", Access(flags[a.tensor], a.subscripts), Num(0))
        where = atom if where is None else Binary("and", where, atom)
    return dataclasses.replace(st, where=where)


def _flagged_reads(st, flagged: set[str]) -> list[Access]:
    return [n for e in (st.expr, st.where) if e is not None for n in walk(e)
            if isinstance(n, Access) and n.tensor in flagged]


def _part_program(part: Definition, options: dict) -> Program:
    """One part through ``online`` and ``stream-final``, as a one-loop or loop-less kernel."""
    from .online import online
    from .stream_final import stream_final

    if not part.iterative_ranks and not _reduces_long(part):
        return _map_kernel(part)  # nothing to stream (sums over head dims, chunks held whole)
    tile = options.get("tile")
    d = stream_final(online(part, tile=tile) if tile else online(part))
    try:
        return _one_kernel(d)
    except NotTileable:
        return _map_kernel(part)


def _statistic_sums(defn: Definition) -> str | None:
    """Why a definition with nothing to stream still has no kernel, when that is a sum over
    a rank ``long_ranks`` takes for a sequence only because an argument over it reads as
    a row statistic of another (a decode step's ``Q[E]`` beside its state ``ST[E,F]``):
    the reason names the rank and the way out; None otherwise."""
    floats = [a for a in defn.tensor_args if a.dtype not in ("i32", "i64", "bool")]
    innermost = {a.ranks[-1] for a in floats if a.ranks}
    long = long_with_lets(defn)
    for st in defn.statements:
        for red in walk(st.expr):
            if isinstance(red, Reduce):
                for r in sorted(set(red.ranks) & long & innermost):
                    outer = next((a for a in floats if r in a.ranks[:-1]), None)
                    inner = next((a for a in floats if a.ranks and a.ranks[-1] == r), None)
                    if outer is None or inner is None:  # long through a 'let', not this
                        continue
                    return (f"{st.tensor} sums over {r}, which kernels take for a sequence rank: "
                            f"{inner.name}[{','.join(inner.ranks)}] reads as a row statistic "
                            f"of {outer.name}[{','.join(outer.ranks)}] (an outer rank there); "
                            f"with {r} innermost in {outer.name} it is a head dim held whole")
    return None


def _reduces_long(defn: Definition) -> bool:
    long = long_with_lets(defn)
    return any(set(red.ranks) & long for st in defn.statements for red in walk(st.expr)
               if isinstance(red, Reduce))


def _map_kernel(part: Definition) -> Program:
    """A part without a streamed loop: every statement once per row block."""
    stmts = tuple(part.statements)
    if any(isinstance(s, IterativeEinsum) for s in stmts):
        raise NotTileable(f"{part.name}: an iterative part that is not one loop")
    long = long_ranks(part)
    for st in stmts:
        for red in (n for n in walk(st.expr) if isinstance(n, Reduce)):
            if set(red.ranks) & long:
                raise NotTileable(f"{part.name}: {st.tensor} reduces the long rank "
                                  f"{sorted(set(red.ranks) & long)[0]} without a streamed loop")
    tp = TileProgram(name=part.name, cascade=part, prologue=stmts, loop_rank=None,
                     tile_rank=None, tile_size=None, stream_rank=None, inits=(), body=(),
                     epilogue=(), kept=frozenset(), guards=(), row_rank=None)
    outputs = tuple(Buffer(o.name, o.ranks, "output") for o in part.outputs)
    return Program(part.name, part, (Kernel(part.name, "stage", tp, outputs),))


def tile_stage(defn: Definition, source: Definition | None, target, options: dict) -> Program:
    """The ``tile`` stage (see the module docstring)."""
    try:
        return _one_kernel(defn)
    except NotTileable as err:
        if not defn.iterative_ranks and not _reduces_long(defn):
            # nothing to stream: one loop-less kernel (a backward stage's per-row
            # gradient, gated_output's dG[p,f] = dO[p,f] * AV[p,f] * ...)
            program = _map_kernel(defn)
            return dataclasses.replace(program, kernels=tuple(
                dataclasses.replace(k, role="streamed") for k in program.kernels))
        why = str(err)
        if not defn.iterative_ranks and _statistic_sums(defn):
            why = f"{defn.name}: {_statistic_sums(defn)}"  # (a more precise reason)
        if source is None or not target.multi_kernel:
            raise NotTileable(why) from err
    parts = _recurrence_parts(source) or split_definition(source)
    if len(parts) < 2:
        raise NotTileable(why)
    programs = tuple(_part_program(p, options) for p in parts)
    buffers = tuple(Buffer(o.name, o.ranks, "intermediate") for q in programs[:-1]
                    for o in q.cascade.outputs if o.name not in {x.name for x in defn.outputs})
    note = f"{len(programs)} kernels: one loop cannot hold it ({why.split(': ', 1)[-1]})"
    return Program(defn.name, defn, tuple(k for q in programs for k in q.kernels),
                   buffers=buffers, notes=(note,), parts=programs)
