"""Context parallelism: a definition as partial / merge / finish, from the derived combine.

When a sequence is split over devices, each device holds a shard of the queries (rank
``P``, the kernel's rows) and of the keys and values (the streamed rank ``M``); attention
of its queries against every key shard is one *partial state* per key shard, and the
partial states merge with the same combine that split-K derives (``passes/split_k.py``:
the max of the running maxes, sums rescaled to it).  Three definitions come out of one:

* ``partial`` — the cascade on one query shard and one key shard, at **global positions**:
  every index of a sharded rank becomes ``m + m_offset`` (``p + p_offset``) and its size
  the parameter ``M_total`` (``P_total``), except where it subscripts a sharded input
  (``K[m, e]`` reads the local shard); its outputs are the loop's final states;
* ``merge`` — states stacked over a rank ``W`` (one slot per key shard) → one state;
  ``pair_merge`` is the same for two states with ``W`` written out (``passes/unroll.py``),
  a map that runs on the device;
* ``finish`` — a state → the definition's outputs (the statements after the loop).

Before → after (causal, states ``RM``, ``RD``, ``RNV``)::

    QK[p,m] = Q[p,e] * K[m,e] * scale   where m <= p + M - P

    partial: QK[p,m] = ... where m + m_offset <= p + p_offset + M_total - P_total
             -> RM_state[P], RD_state[P], RNV_state[P,F]     (the final running states)
    merge:   RM_state[W,P], ... -> CRM = max[w](RM_state[w,p]), CRD = sum[w](RD_state * PCRM)...
    finish:  AV[p,f] = RNV_state[p,f] / RD_state[p]   where RD_state[p] != 0

A shard with no visible key (a causal shard after the queries) leaves the init states, which
the merge ignores as split-K's empty workers, so a fully masked shard is exact.  What cannot
be sharded is refused with the reason (:class:`ContextParallelUnsupported`): an input over
both sharded ranks, a sharded input read other than at its own index, a size ``let`` or a
default over a sharded rank, a loop without a derivable combine.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import networkx as nx

from ..einsum_ir.exprs import children, walk, with_children
from ..einsum_ir.ir import (Access, Binary, Definition, Einsum, Expr, Index, IterativeEinsum,
                            Output, Param, Reduce, ScalarParam, Size, Statement, TensorArg)
from ..einsum_ir.printer import print_expr
from ..einsum_ir.schedule import dataflow_graph, statement_reads
from .split_k import SplitKUnsupported, split_k, split_k_blockers


class ContextParallelUnsupported(Exception):
    """Why a definition cannot be sharded over devices."""


@dataclass(frozen=True)
class ShardedForm:
    """A definition's context-parallel form (see the module docstring)."""

    source: Definition
    keys: str                       # the streamed rank, sharded over devices
    queries: str | None             # the rows' rank, sharded too (None: every device has all)
    partial: Definition
    merge: Definition
    finish: Definition
    states: tuple[str, ...]         # interface tensors, in order: partial's outputs
    key_inputs: tuple[str, ...]     # inputs sharded along ``keys`` (they travel the ring)
    query_inputs: tuple[str, ...]   # inputs sharded along ``queries``
    pair_merge: Definition | None = None  # ``merge`` of two states, ``W`` written out
    pair_merge_refused: str | None = None  # why there is none


def offset_param(rank: str) -> str:
    return f"{rank.lower()}_offset"


def total_param(rank: str) -> str:
    return f"{rank}_total"


def state_name(state: str) -> str:
    return f"{state}_state"


# --- partial: the cascade at global positions -----------------------------------------------


def at_global_positions(defn: Definition, ranks: tuple[str, ...]) -> Definition:
    """``defn`` on shards of ``ranks``: indices offset, sizes the totals (module doc)."""
    for let in defn.lets:
        if let.name in ranks:
            raise ContextParallelUnsupported(
                f"the sharded rank {let.name} is computed (let {let.name} = {let.value}), not "
                f"an argument's dimension: a paged or packed layout would be sharded by its "
                f"pages or sequences, which this launcher does not do")
    for a in defn.tensor_args:
        both = [r for r in ranks if r in a.ranks]
        if len(both) > 1:
            raise ContextParallelUnsupported(
                f"input {a.name}[{','.join(a.ranks)}] is over both sharded ranks "
                f"{' and '.join(both)}: a device would need a 2-D block of it")
    for let in defn.lets:
        if {s.name for s in let.value.free_symbols} & set(ranks):
            raise ContextParallelUnsupported(
                f"let {let.name} is computed from a sharded rank's size: it would differ "
                f"per shard")

    def shift(e: Expr) -> Expr:
        """Index and size *values* move to global positions; subscripts address the local
        shard (every tensor over a sharded rank holds the shard's points only)."""
        if isinstance(e, Index) and e.rank in ranks:
            return Binary("+", e, Param(offset_param(e.rank)))
        if isinstance(e, Size) and e.rank in ranks:
            return Param(total_param(e.rank))
        if isinstance(e, Access):
            for sub, r in zip(e.subscripts, defn.tensor_ranks(e.tensor)):
                uses = {n.rank for n in walk(sub) if isinstance(n, (Index, Size))} & set(ranks)
                if uses and sub != Index(r):
                    raise ContextParallelUnsupported(
                        f"{e.tensor} is read at {print_expr(sub)} along {r}: a shard would "
                        f"need its neighbours' points (only a sharded rank's own index may "
                        f"subscript it)")
            return e
        kids = children(e)
        return with_children(e, tuple(shift(k) for k in kids)) if kids else e

    statements = tuple(dataclasses.replace(
        st, expr=shift(st.expr), where=None if st.where is None else shift(st.where))
        for st in defn.statements)
    # a default over a sharded rank's size is the launcher's to evaluate at the totals
    params = tuple(dataclasses.replace(p, default=None) if isinstance(p, ScalarParam)
                   and p.default is not None
                   and {x.name for x in p.default.free_symbols} & set(ranks) else p
                   for p in defn.params)
    params += tuple(ScalarParam(n) for r in ranks for n in (offset_param(r), total_param(r)))
    return dataclasses.replace(defn, params=params, statements=statements)


# --- the three definitions --------------------------------------------------------------------


def sharded_form(defn: Definition, options: dict | None = None,
                 state_dtype: str | None = "f32") -> ShardedForm:
    """The context-parallel form of ``defn`` (``ContextParallelUnsupported`` says why not).
    ``state_dtype``: the states' declared type between devices (None: the inputs')."""
    from .pipeline import run_pipeline
    from ..einsum_ir.ir import Module

    options = dict(options or {})
    names = ["canonicalize", "defer-normalization", "online", "stream-final"]
    plain = run_pipeline(Module((defn,)), names, options=options)[-1][1].definitions[0]
    keys, queries = _streamed_and_rows(plain, options)
    if keys is None or not plain.iterative_ranks:
        raise ContextParallelUnsupported("the cascade streams no rank in one loop: nothing to "
                                         "shard over devices")
    from .map_ranks import long_ranks

    if keys not in long_ranks(defn):
        raise ContextParallelUnsupported(
            f"its one-loop form streams {keys}, a head dim, not a sequence: the sequence ranks "
            f"({', '.join(sorted(long_ranks(defn)))}) are not what the loop splits")
    if queries == keys:
        raise ContextParallelUnsupported(
            f"queries and keys are the same rank {keys} (a 'let' ties them): shard a spec "
            f"whose keys have a rank of their own")
    if queries is not None and queries not in long_ranks(defn):
        queries = None  # rows over a head dim (decode): every device holds all of them
    ranks = (keys,) + ((queries,) if queries else ())
    local = at_global_positions(defn, ranks)
    online = run_pipeline(Module((local,)), names, options=options)[-1][1].definitions[0]
    blockers = split_k_blockers(online)
    if blockers:
        raise ContextParallelUnsupported("no derivable combine: " + "; ".join(blockers))
    try:
        split = split_k(online, 2)
    except SplitKUnsupported as err:  # pragma: no cover - blockers said it splits
        raise ContextParallelUnsupported(str(err)) from None
    loop_rank = online.iterative_ranks[0]
    updates = [st for st in online.statements if isinstance(st, IterativeEinsum) and not st.init]
    states = tuple(dict.fromkeys(st.tensor for st in updates))
    partial = _partial(online, loop_rank, states, state_dtype)
    merge, finish = (_bound(_global_sizes(d, ranks), defn, keys) for d in
                     _merge_and_finish(split, online, states, loop_rank, state_dtype))
    pair, refused = _pair_merge(merge)
    return ShardedForm(defn, keys, queries, partial, merge, finish,
                       tuple(state_name(s) for s in states),
                       tuple(a.name for a in defn.tensor_args if keys in a.ranks),
                       tuple(a.name for a in defn.tensor_args if queries and queries in a.ranks),
                       pair, refused)


def _pair_merge(merge: Definition) -> tuple[Definition | None, str | None]:
    """The merge of two states (``{state}_0``, ``{state}_1``) with its stacking rank written
    out: a map every backend runs as a loop-less kernel (``passes/unroll.py``)."""
    from .unroll import NotUnrollable, unroll_rank

    worker = merge.tensor_args[0].ranks[0]
    try:
        return dataclasses.replace(unroll_rank(merge, worker, 2),
                                   name=merge.name.replace("__merge", "__merge2")), None
    except NotUnrollable as why:
        return None, str(why)


def _global_sizes(defn: Definition, ranks: tuple[str, ...]) -> Definition:
    """After the merge a sharded rank's size is the total (``M > 0``: some shard has keys)."""
    def total(e: Expr) -> Expr:
        if isinstance(e, Size) and e.rank in ranks:
            return Param(total_param(e.rank))
        kids = children(e)
        return with_children(e, tuple(total(k) for k in kids)) if kids else e

    statements = tuple(dataclasses.replace(st, expr=total(st.expr),
                                           where=None if st.where is None else total(st.where))
                       for st in defn.statements)
    names = {p.name for p in defn.scalar_params}
    extra = tuple(ScalarParam(total_param(r)) for r in ranks if total_param(r) not in names)
    return _pruned(dataclasses.replace(defn, params=defn.params + extra, statements=statements))


def _bound(defn: Definition, source: Definition, keys: str) -> Definition:
    """Sizes the statements use that no argument binds come from a source argument that
    has them (a query input before a key shard): ``E > 0`` in cosine's finish reads Q."""
    bound = {r for a in defn.tensor_args for r in a.ranks} | {let.name for let in defn.lets}
    used = set()
    for st in defn.statements:
        used |= set(st.lhs)
        for e in (st.expr, st.where):
            used |= {n.rank for n in walk(e) if isinstance(n, (Index, Size))} if e is not None else set()
    extra = []
    for r in sorted(used - bound):
        arg = min((a for a in source.tensor_args if r in a.ranks),
                  key=lambda a: (keys in a.ranks, len(a.ranks)), default=None)
        if arg is not None and arg not in extra:
            extra.append(arg)
            bound |= set(arg.ranks)
    return dataclasses.replace(defn, params=defn.params + tuple(extra)) if extra else defn


def _streamed_and_rows(plain: Definition, options: dict) -> tuple[str | None, str | None]:
    """The rank the one-loop form streams (sharded as keys) and its rows (as queries)."""
    from ..einsum_ir.kernel import Kernel
    from .map_ranks import map_kernel_ranks
    from .tile import NotTileable, tile_program

    try:
        tp = tile_program(plain)
    except NotTileable as err:
        raise ContextParallelUnsupported(f"no one-loop form to shard: {err}") from None
    roles = map_kernel_ranks(Kernel(plain.name, "streamed", tp, ()), False).roles
    source_rank = {tp.loop_rank: tp.stream_rank}
    return tp.stream_rank, source_rank.get(roles.row, roles.row)


def _state_ranks(online: Definition, state: str, loop_rank: str) -> tuple[str, ...]:
    return tuple(r for r in online.tensor_ranks(state) if r != loop_rank)


def _partial(online: Definition, loop_rank: str, states: tuple[str, ...],
             dtype: str | None) -> Definition:
    """The loop and what it needs; outputs: every state's final value."""
    graph = dataflow_graph(online)
    needed: set[str] = set(states)
    for s in states:
        needed |= nx.ancestors(graph, s)
    body = [st for st in online.statements if st.tensor in needed]
    outs = []
    for s in states:
        ranks = _state_ranks(online, s, loop_rank)
        subs = tuple(Index(r) for r in ranks)
        pos = online.tensor_ranks(s).index(loop_rank)
        final = Access(s, subs[:pos] + (Size(loop_rank),) + subs[pos:])
        body.append(Einsum(state_name(s), ranks, final))
        outs.append(Output(state_name(s), ranks, dtype))
    return _pruned(dataclasses.replace(online, name=f"{online.name}__partial",
                                       statements=tuple(body), outputs=tuple(outs)))


def _merge_and_finish(split: Definition, online: Definition, states: tuple[str, ...],
                      loop_rank: str, dtype: str | None) -> tuple[Definition, Definition]:
    """From split-K's form: the merge statements (reading ``R[w, MT, ...]``) over stacked
    state inputs, and the statements after them over one merged state."""
    worker = next(let.name for let in split.lets if let.name not in {l.name for l in online.lets}
                  and let.value.is_number)
    by_name = {st.tensor: st for st in split.statements}
    merged_name = {}
    for s in states:  # the merged state: the Einsum summing/maxing R[w, MT, ...] over w
        for st in split.statements:
            if isinstance(st, Einsum) and any(isinstance(n, Reduce) and worker in n.ranks
                                              and any(isinstance(a, Access) and a.tensor == s
                                                      for a in walk(n.body))
                                              for n in walk(st.expr)):
                merged_name.setdefault(s, st.tensor)
    if set(merged_name) != set(states):
        raise ContextParallelUnsupported("the combine does not merge every state")
    merge_stmts = _merge_statements(split, states, merged_name, worker, by_name)
    inputs = {s: TensorArg(state_name(s), (worker,) + _state_ranks(online, s, loop_rank), dtype)
              for s in states}

    def stacked(e: Expr) -> Expr:  # R[w, MT, subs] -> R_state[w, subs]
        if isinstance(e, Access) and e.tensor in inputs:
            subs = [x for x in e.subscripts if not isinstance(x, Size)]
            return Access(state_name(e.tensor), tuple(subs))
        kids = children(e)
        return with_children(e, tuple(stacked(k) for k in kids)) if kids else e

    merge_body = [dataclasses.replace(st, expr=stacked(st.expr),
                                      where=None if st.where is None else stacked(st.where))
                  for st in merge_stmts]
    merge_body += [Einsum(f"{state_name(s)}_merged", _state_ranks(online, s, loop_rank),
                          Access(merged_name[s], tuple(Index(r) for r in
                                                       _state_ranks(online, s, loop_rank))))
                   for s in states]
    merge = _pruned(dataclasses.replace(
        split, name=f"{online.name}__merge",
        params=tuple(inputs.values()) + split.params, statements=tuple(merge_body),
        outputs=tuple(Output(f"{state_name(s)}_merged", _state_ranks(online, s, loop_rank), dtype)
                      for s in states)))
    finish = _finish(split, online, states, merged_name, loop_rank, merge_stmts, dtype)
    return merge, finish


def _merge_statements(split, states, merged_name, worker, by_name) -> list[Statement]:
    """The merged states and what they read after the loop (the per-worker rescale
    factors): statements downstream of a state that run once, not per step."""
    graph = dataflow_graph(split)
    steps = {st.iter_rank for st in split.statements if isinstance(st, IterativeEinsum)}
    after: set[str] = set()
    for s in states:
        after |= nx.descendants(graph, s)
    after = {a for a in after if a in by_name and not isinstance(by_name[a], IterativeEinsum)
             and not steps & set(by_name[a].lhs)}
    out: set[str] = set()
    for name in merged_name.values():
        out |= ({name} | nx.ancestors(graph, name)) & after
    return [st for st in split.statements if st.tensor in out]


def _finish(split, online, states, merged_name, loop_rank, merge_stmts, dtype) -> Definition:
    """The statements after the merge, reading one merged state per input."""
    merged = set(merged_name.values()) | {st.tensor for st in merge_stmts}
    graph = dataflow_graph(split)
    after: set[str] = set()
    for name in merged_name.values():
        after |= nx.descendants(graph, name)
    after -= merged
    statements = {st.tensor for st in split.statements}
    cut = graph.copy()
    cut.remove_nodes_from(merged)  # what the finals read besides the merged states
    needed = set(after)
    for name in after:
        needed |= nx.ancestors(cut, name) & statements
    rename = {merged_name[s]: state_name(s) for s in states}

    def read_state(e: Expr) -> Expr:
        if isinstance(e, Access) and e.tensor in rename:
            return dataclasses.replace(e, tensor=rename[e.tensor])
        kids = children(e)
        return with_children(e, tuple(read_state(k) for k in kids)) if kids else e

    body = [dataclasses.replace(st, expr=read_state(st.expr),
                                where=None if st.where is None else read_state(st.where))
            for st in split.statements if st.tensor in needed]
    args = tuple(TensorArg(state_name(s), _state_ranks(online, s, loop_rank), dtype) for s in states)
    return _pruned(dataclasses.replace(split, name=f"{online.name}__finish",
                                       params=args + split.params, statements=tuple(body)))


def _pruned(defn: Definition) -> Definition:
    """Only the arguments, lets and parameters the statements use (the first arguments —
    stacked states — are kept: they bind the worker rank)."""
    reads = {a.tensor for st in defn.statements for a in statement_reads(st)}
    used_params = {n.name for st in defn.statements for e in (st.expr, st.where)
                   if e is not None for n in walk(e) if isinstance(n, Param)}
    params = tuple(p for p in defn.params
                   if (isinstance(p, TensorArg) and (p.name in reads or p.name.endswith("_state")))
                   or (isinstance(p, ScalarParam) and p.name in used_params))
    bound = {r for p in params if isinstance(p, TensorArg) for r in p.ranks}
    ranks_used = set()
    for st in defn.statements:
        ranks_used |= set(st.lhs)
        for e in (st.expr, st.where):
            for n in walk(e) if e is not None else ():
                if isinstance(n, (Index, Size)):
                    ranks_used.add(n.rank)
                if isinstance(n, Reduce):
                    ranks_used |= set(n.ranks)
    lets = []
    needed = set(ranks_used)
    for let in reversed(defn.lets):
        if let.name in needed and let.name not in bound:
            lets.append(let)
            needed |= {s.name for s in let.value.free_symbols}
    return dataclasses.replace(defn, params=params, lets=tuple(reversed(lets)))
