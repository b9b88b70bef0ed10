"""Data-flow order of a cascade, including the loops of iterative ranks.

Order of evaluation follows data dependencies, not the order in the file.  An
iterative rank ``I`` becomes a :class:`Loop`: its body is every update
``T[i+1,..]`` plus every Einsum that carries ``i`` on its left and reads an
iterative tensor at ``i``/``i+1`` (directly or through other body Einsums).
Inits run before the loop; readers of ``T[I, ...]`` after it.

Errors (reported into a :class:`Collector`): a dependency cycle, a statement
reading itself included (an update may read its own ``T[i]``, not ``T[i+1]``),
and a read of an iterative tensor at ``i``/``i+1`` outside its loop.
"""
from __future__ import annotations

from dataclasses import dataclass

import networkx as nx

from .diagnostics import Collector, SpecError
from .exprs import walk
from .ir import Access, Binary, Definition, Einsum, Index, IterativeEinsum, Module, Num, Statement


@dataclass(frozen=True)
class Loop:
    """``for i in range(I)`` over the ``body`` statements, in dependency order."""

    rank: str
    body: tuple[Statement, ...]


Step = Statement | Loop


def statement_reads(st: Statement) -> list[Access]:
    accesses = [n for n in walk(st.expr) if isinstance(n, Access)]
    if st.where is not None:
        accesses += [n for n in walk(st.where) if isinstance(n, Access)]
    return accesses


def _reads_step(acc: Access, defn: Definition, rank: str) -> str | None:
    """'i' or 'i+1' when ``acc`` reads along ``rank`` at the current step, else None."""
    ranks = defn.tensor_ranks(acc.tensor)
    if rank not in ranks:
        return None
    sub = acc.subscripts[ranks.index(rank)]
    if sub == Index(rank):
        return "i"
    if sub == Binary("+", Index(rank), Num(1)):
        return "i+1"
    return None


def loop_bodies(defn: Definition) -> dict[str, list[Statement]]:
    """Iterative rank -> its body statements (file order), by fixpoint."""
    iterative = defn.iterative_tensors
    bodies: dict[str, list[Statement]] = {}
    for rank in defn.iterative_ranks:
        members = {st.tensor for st in defn.statements
                   if isinstance(st, IterativeEinsum) and not st.init and st.iter_rank == rank}
        changed = True
        while changed:
            changed = False
            for st in defn.statements:
                if st.tensor in members or not isinstance(st, Einsum) or rank not in st.lhs:
                    continue
                for acc in statement_reads(st):
                    step = _reads_step(acc, defn, rank)
                    inside = acc.tensor in members or iterative.get(acc.tensor) == rank
                    if step is not None and inside:
                        members.add(st.tensor)
                        changed = True
                        break
        bodies[rank] = [st for st in defn.statements if st.tensor in members
                        and not (isinstance(st, IterativeEinsum) and st.init)]
    return _unnest(defn, bodies)


def _unnest(defn: Definition, bodies: dict[str, list[Statement]]) -> dict[str, list[Statement]]:
    """Statements in two loops' bodies (an online softmax over key tiles ``m1`` written
    inside a recurrence over queries ``p``: its tiles' statements carry ``p`` and read the
    recurrence's values at ``p``) go to the loop that runs second, over every step of the
    first at once, when the first loop's own statements read nothing of the second's (its
    values stay complete for every step): each statement then belongs to one loop.
    Before → after::

        loop p: FS, BL, LM, SLN, SLD, SLNV     loop m1: RM, SLN, SLD, SLNV, PRM, RD, RNV
        ->  loop p: FS, BL, LM     loop m1: RM, SLN, SLD, SLNV, PRM, RD, RNV
    """
    ranks = list(bodies)
    for a in ranks:
        for b in ranks:
            if a == b:
                continue
            shared = {st.tensor for st in bodies[a]} & {st.tensor for st in bodies[b]}
            if not shared:
                continue
            b_only = {st.tensor for st in bodies[b]} - shared
            a_reads = {acc.tensor for st in bodies[a] if st.tensor not in shared
                       for acc in statement_reads(st)}
            if a_reads & (b_only | shared):
                continue  # a reads b's values: not a runs first (b, a may be; else a cycle)
            bodies[a] = [st for st in bodies[a] if st.tensor not in shared]
    return bodies


def dataflow_graph(defn: Definition) -> nx.DiGraph:
    """The cascade as a DAG of tensors: an edge ``A -> B`` when B's Einsum reads A."""
    g = nx.DiGraph()
    for arg in defn.tensor_args:
        g.add_node(arg.name, kind="input")
    for st in defn.statements:
        g.add_node(st.tensor, kind="iterative" if isinstance(st, IterativeEinsum) else "einsum")
    for st in defn.statements:
        for acc in statement_reads(st):
            if acc.tensor != st.tensor:
                g.add_edge(acc.tensor, st.tensor)
    return g


def _topo(g: nx.DiGraph, order: dict, what: str, defn: Definition, errors: Collector,
          items: dict) -> list | None:
    """The ``items`` (statements or loops) of ``g``'s node keys in a topological order."""
    try:
        return [items[k] for k in nx.lexicographical_topological_sort(g, key=lambda n: order[n])]
    except nx.NetworkXUnfeasible:
        cycle = [(items[a], items[b]) for a, b in nx.find_cycle(g)]
        names = [getattr(n, "tensor", None) or f"loop over {n.rank}" for n, _ in cycle]
        first = next((n for n, _ in cycle if hasattr(n, "loc")), None)
        errors.error(f"dependency cycle {what}: " + " -> ".join(names + names[:1]),
                     getattr(first, "loc", None) or defn.loc)
        return None


def schedule(defn: Definition, errors: Collector | None = None) -> tuple[Step, ...]:
    """The definition's statements as a data-flow ordered list of statements and loops."""
    own = errors or Collector()
    bodies = loop_bodies(defn)
    _check_nesting(defn, bodies, own)
    # graph nodes are keys (a statement's index, a loop's rank), not the statements:
    # hashing a statement hashes its whole expression, quadratic in a long one
    items: dict = {("loop", rank): Loop(rank, ()) for rank in bodies}
    node_of: dict[str, object] = {}
    in_body = {st.tensor: rank for rank, sts in bodies.items() for st in sts}
    for i, st in enumerate(defn.statements):
        items[i] = st
        if isinstance(st, IterativeEinsum) and st.init:
            continue
        node_of[st.tensor] = ("loop", in_body[st.tensor]) if st.tensor in in_body else i
    g = nx.DiGraph()
    order: dict = {}
    for i, st in enumerate(defn.statements):
        init = isinstance(st, IterativeEinsum) and st.init
        node = i if init else node_of[st.tensor]
        g.add_node(node)
        order.setdefault(node, i)
        for acc in statement_reads(st):
            src = node_of.get(acc.tensor)
            # reads between members of one loop are ordered by _order_body; a
            # plain Einsum reading itself is a cycle (a self-loop here)
            if src is not None and not (src == node and isinstance(node, tuple)):
                g.add_edge(src, node)
        if init:
            g.add_edge(i, node_of[st.tensor])
    _check_reads_outside_loops(defn, in_body, own)
    steps = _topo(g, order, "between statements", defn, own, items)
    if steps is None:
        if errors is None:
            own.raise_if_any()
        return ()
    out: list[Step] = []
    for step in steps:
        if isinstance(step, Loop):
            body = _order_body(defn, step.rank, bodies[step.rank], own)
            out.append(Loop(step.rank, tuple(body or ())))
        else:
            out.append(step)
    if errors is None:
        own.raise_if_any()
    return tuple(out)


def _check_nesting(defn: Definition, bodies: dict[str, list[Statement]], errors: Collector) -> None:
    """A statement left in two loops' bodies (each loop reads the other's values at its
    step): the loops would nest, which the language's schedule does not do."""
    seen: dict[str, str] = {}
    for rank, body in bodies.items():
        for st in body:
            if st.tensor in seen:
                a, b = seen[st.tensor].lower(), rank.lower()
                errors.error(f"'{st.tensor}' is in the loop over {a} and in the loop over {b}, "
                             f"which read each other's values at their steps: nested iterative "
                             f"loops are not supported", st.loc,
                             f"run one loop over every step of the other (its values complete "
                             f"for all of them), or write one recurrence")
            seen.setdefault(st.tensor, rank)


def _check_reads_outside_loops(defn: Definition, in_body: dict[str, str], errors: Collector) -> None:
    """Outside its loop an iterative tensor can be read only at its final step ``T[I, ...]``."""
    iterative = defn.iterative_tensors
    for st in defn.statements:
        if in_body.get(st.tensor) is not None:
            continue
        for acc in statement_reads(st):
            rank = iterative.get(acc.tensor)
            step = _reads_step(acc, defn, rank) if rank is not None else None
            if step is not None:
                v = rank.lower()
                errors.error(f"iterative tensor '{acc.tensor}' is read at {step.replace('i', v)} "
                             f"outside its loop over {v}", acc.loc or st.loc,
                             f"outside the loop read its final step, {acc.tensor}[{rank}, ...]")


def _order_body(defn, rank, body, errors) -> list | None:
    g = nx.DiGraph()
    producers = {st.tensor: i for i, st in enumerate(body)}  # keys: indices (see schedule)
    order = {i: i for i in range(len(body))}
    for i, st in enumerate(body):
        g.add_node(i)
        for acc in statement_reads(st):
            src = producers.get(acc.tensor)
            if src is None:
                continue
            is_state = isinstance(body[src], IterativeEinsum)
            if is_state and _reads_step(acc, defn, rank) != "i+1":
                continue  # T[i] is last step's value: no edge within a step
            # anything else, a statement reading itself included, orders within the step
            g.add_edge(src, i)
    return _topo(g, order, f"inside the loop over {rank.lower()}", defn, errors,
                 dict(enumerate(body)))


def check_schedules(module: Module, errors: Collector) -> None:
    for defn in module.definitions:
        try:
            schedule(defn, errors)
        except SpecError as err:  # pragma: no cover - schedule() reports into errors
            errors.diagnostics.extend(err.diagnostics)
