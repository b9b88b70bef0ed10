"""Pass-count lower bounds of a cascade, per rank (FuseMax, Nayak et al., MICRO 2024, §III).

"A pass that a cascade performs over a particular fiber of a particular rank and tensor is
a traversal of every element of that fiber.  Each time an element must be revisited after
visiting every other element of that fiber, there is an additional pass."

The analysis works on the canonical cascade (one reduction per Einsum, at its root) and
asks, for each rank ``R`` separately, in which traversal of ``R`` every Einsum can run at
the earliest.  An Einsum *traverses* ``R`` when ``R`` is in its iteration space (its left
side, or the ranks its reduction reduces).  Every read is an edge from the statement that
produces the value to the one that reads it, of weight 0 or 1:

* weight 0, *streamed*: the reader gets the value in the same traversal.  The producer
  traverses ``R`` and does not reduce it, and the reader reads it at its own ``r`` (or at
  ``r`` plus a number: a bounded look-ahead), or the producer does not traverse ``R`` at all
  (it is computed once, between traversals).
* weight 1, *complete*: the value exists only after the producer's whole traversal.  The
  producer reduces ``R`` (the "reduction" kind); or it is an iterative update over ``R``
  read at its final step ``T[R, ...]`` ("final state"); or the reader reads its
  ``R``-fiber out of order, at a fixed or shifted-by-a-size position ("reordered read").

The level of a statement is ``max(1, level(source) + weight)`` over its reads (inputs are
there from the start).  For an Einsum that traverses ``R`` the level is its *pass number*;
for one that does not, it is the pass before which it can be computed.  The *pass count*
over ``R`` is the largest pass number, 0 when no Einsum traverses ``R``.  Each weight-1
edge on the longest path is one read-read :class:`Dependency`: the later Einsum reads again
a fiber (of the ``tensor`` it names) that the earlier one had to read completely.

A plain, unfiltered copy of an argument (the ``online`` pass's tile copies ``BV[m1,m0,f] =
V[m1 * M0 + m0, f]``) is the argument: reading it makes no edge, in any order.

Iterative ranks (EDGE's iterative Einsums) are traversed once, in order: an update
``T[i+1] = f(T[i], X[i])`` consumes step ``i`` only, so reads at ``i`` and ``i+1`` stream;
only the final state ``T[I]`` needs the whole traversal.  For a rank ``R`` other than the
iterative rank ``I``, the loop over ``I`` runs each step to completion before the next,
so inside the loop a read of state at step ``i`` (the previous step's result) waits for the
init only; a read at ``i+1`` or ``I`` waits for the update as any other read does.

A rank is a *compile-time constant* when its ``let`` evaluates to a number (``let M0 =
64``); ranks bound from the arguments, and lets over them, are symbolic.  The cascade's
``pass_bound`` is the largest pass count over symbolic ranks (at least 1 when the cascade
has statements): passes over a constant rank re-read a tile whose size is fixed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import networkx as nx
import sympy

from ..einsum_ir.exprs import reductions, walk
from ..einsum_ir.printer import print_expr
from ..einsum_ir.ir import (Access, Binary, Definition, Expr, Index, IterativeEinsum, Num,
                            Size, Statement, size_symbol)
from ..einsum_ir.schedule import dataflow_graph, statement_reads
from .canonicalize import canonicalize

REDUCTION = "reduction"
FINAL_STATE = "final state"
REORDERED = "reordered read"


@dataclass(frozen=True, slots=True)
class Dependency:
    """A read-read dependency over ``rank`` that starts pass ``pass_number``.

    ``earlier`` (an Einsum's label) must finish its traversal, pass ``pass_number - 1``,
    before ``later`` can start; ``through`` are the Einsums between them that do not
    traverse the rank; ``tensor`` is the tensor whose ``rank``-fiber ``later`` reads again
    (one ``earlier`` read, or computed from what it read; None when ``later`` reads only
    fibers new to its traversal: the traversal is still a new one, it cannot start before
    ``earlier`` completes); ``kind`` is why: a reduction, a final state, a reordered read.
    """

    rank: str
    pass_number: int
    earlier: str
    later: str
    through: tuple[str, ...]
    tensor: str | None
    kind: str

    def describe(self) -> str:
        """One line: ``pass 2: SN after GM (max over m completes), re-reads QK's m-fiber``."""
        via = "".join(f" via {t}" for t in self.through)
        what = {REDUCTION: f"reduces {self.rank.lower()}",
                FINAL_STATE: f"final state over {self.rank.lower()}",
                REORDERED: f"{self.rank.lower()}-fiber read out of order"}[self.kind]
        fiber = f", re-reads {self.tensor}'s {self.rank.lower()}-fiber" if self.tensor else ""
        return f"pass {self.pass_number}: {self.later} after {self.earlier} ({what}){via}{fiber}"


@dataclass(frozen=True)
class RankPasses:
    """The passes a cascade makes over one rank.

    ``einsum_pass`` gives the pass number of each Einsum that traverses the rank;
    ``ready`` gives, for each Einsum that does not, the pass before which it can run;
    ``causes`` gives, for each Einsum past pass 1 (or ready after it), the dependency
    nearest to it that holds it back.  Keys are statement labels (:func:`statement_label`).
    """

    rank: str
    count: int
    constant: bool
    chain: tuple[Dependency, ...]
    einsum_pass: Mapping[str, int]
    ready: Mapping[str, int]
    causes: Mapping[str, Dependency]
    indexed_by: tuple[str, ...] = ()  # indirect reads of this rank: data-dependent positions


@dataclass(frozen=True)
class PassAnalysis:
    """Per-rank passes of one canonical definition, and its ``pass_bound``.

    ``bound_rank`` is the first symbolic rank (in declaration order) that needs
    ``pass_bound`` passes when that is more than one; None for a 1-pass cascade.
    """

    definition: Definition
    ranks: tuple[RankPasses, ...]
    pass_bound: int
    bound_rank: str | None

    def __getitem__(self, rank: str) -> RankPasses:
        for rp in self.ranks:
            if rp.rank == rank:
                return rp
        raise KeyError(rank)

    @property
    def passes(self) -> dict[str, int]:
        return {rp.rank: rp.count for rp in self.ranks}


@dataclass(frozen=True, slots=True)
class _Edge:
    """``source`` must reach level ``level(source) + weight`` before ``consumer`` runs."""

    consumer: int
    source: int
    weight: int
    kind: str
    access: Access


# ----------------------------------------------------------------------------
# Statements: labels, iteration spaces
# ----------------------------------------------------------------------------


def statement_label(st: Statement) -> str:
    """``QK`` for an Einsum; ``RM[0]`` and ``RM[m1+1]`` for an iterative init and update."""
    if isinstance(st, IterativeEinsum):
        return f"{st.tensor}[0]" if st.init else f"{st.tensor}[{st.iter_rank.lower()}+1]"
    return st.tensor


def reduced_ranks(st: Statement) -> tuple[str, ...]:
    """The ranks the statement's reductions reduce (canonically: its root reduction's)."""
    seen: dict[str, None] = {}
    for red in reductions(st.expr):
        for r in red.ranks:
            seen.setdefault(r, None)
    return tuple(seen)


def iteration_space(st: Statement) -> tuple[str, ...]:
    """The ranks a statement iterates: its left side (less an init's step) and its reductions."""
    lhs = st.lhs
    if isinstance(st, IterativeEinsum) and st.init:
        lhs = tuple(r for r in lhs if r != st.iter_rank)
    return lhs + tuple(r for r in reduced_ranks(st) if r not in lhs)


def constant_sizes(defn: Definition) -> dict[str, sympy.Expr]:
    """Ranks whose ``let`` is a number once earlier constant lets are substituted."""
    known: dict[str, sympy.Expr] = {}
    for let in defn.lets:
        value = let.value.subs({size_symbol(k): v for k, v in known.items()})
        if value.is_number:
            known[let.name] = sympy.nsimplify(value)
    return known


# ----------------------------------------------------------------------------
# Edges over one rank
# ----------------------------------------------------------------------------


def _is_aligned(sub: Expr, rank: str) -> bool:
    """``r``, ``r + 1``, ``r - 2``: the reader walks the fiber in the producer's order."""
    if sub == Index(rank):
        return True
    if isinstance(sub, Binary) and sub.op in ("+", "-") and sub.left == Index(rank):
        return isinstance(sub.right, Num)
    return isinstance(sub, Binary) and sub.op == "+" and sub.right == Index(rank) \
        and isinstance(sub.left, Num)


def input_copies(defn: Definition) -> frozenset[str]:
    """Tensors that are plain copies of an argument, unfiltered: the ``online`` pass's tile
    copies ``BV[m1,m0,f] = V[m1 * M0 + m0, f]``.  A read of one is a read of the argument,
    there from the start, whatever its order (no out-of-order re-read over ``f`` or a head
    rank is counted for it)."""
    args = {a.name for a in defn.tensor_args}
    outputs = {o.name for o in defn.outputs}
    return frozenset(st.tensor for st in defn.statements
                     if not isinstance(st, IterativeEinsum) and st.where is None
                     and isinstance(st.expr, Access) and st.expr.tensor in args
                     and st.tensor not in outputs)


class _Producers:
    """Which statement (index) produced each tensor: an Einsum, or an init and an update."""

    def __init__(self, defn: Definition):
        self.defn = defn
        self.plain: dict[str, int] = {}
        self.init: dict[str, int] = {}
        self.update: dict[str, int] = {}
        self.copies = input_copies(defn)
        for i, st in enumerate(defn.statements):
            if isinstance(st, IterativeEinsum):
                (self.init if st.init else self.update)[st.tensor] = i
            else:
                self.plain[st.tensor] = i
        # per statement, computed once: every read of a statement asks for these
        self.spaces = [iteration_space(st) for st in defn.statements]
        self.reduced = [reduced_ranks(st) for st in defn.statements]

    def edges(self, ci: int, acc: Access, rank: str) -> list[_Edge]:
        """The edges one read ``acc`` of statement ``ci`` makes over ``rank``."""
        if acc.tensor in self.copies:
            return []  # a copy of an argument (a tile copy) is the argument
        if acc.tensor in self.plain:
            return [self._generic(ci, self.plain[acc.tensor], acc, rank)]
        if acc.tensor in self.update:
            return self._iterative(ci, acc, rank)
        return []  # an argument: there from the start

    def _generic(self, ci: int, si: int, acc: Access, rank: str) -> _Edge:
        if rank not in self.spaces[si]:
            return _Edge(ci, si, 0, "between", acc)
        if rank in self.reduced[si]:
            return _Edge(ci, si, 1, REDUCTION, acc)
        ranks = self.defn.tensor_ranks(acc.tensor)
        if rank in self.spaces[ci] and _is_aligned(acc.subscripts[ranks.index(rank)], rank):
            return _Edge(ci, si, 0, "stream", acc)
        return _Edge(ci, si, 1, REORDERED, acc)

    def _iterative(self, ci: int, acc: Access, rank: str) -> list[_Edge]:
        """A read of iterative state ``T[step, ...]``: the init, the update, or both."""
        update = self.update[acc.tensor]
        step_rank = self.defn.statements[update].iter_rank
        step = acc.subscripts[self.defn.tensor_ranks(acc.tensor).index(step_rank)]
        from_init = self._from_init(ci, acc, rank)
        if step == Num(0):
            return from_init
        if rank != step_rank:
            if step == Index(step_rank) or ci == update:  # the previous step's state
                return from_init
            return [self._generic(ci, update, acc, rank)]
        if not _is_aligned(step, rank):
            kind = FINAL_STATE if step == Size(rank) else REORDERED
            return [_Edge(ci, update, 1, kind, acc)]
        current = [] if ci == update else [_Edge(ci, update, 0, "stream", acc)]
        return (from_init if step == Index(rank) else []) + current

    def _from_init(self, ci: int, acc: Access, rank: str) -> list[_Edge]:
        init = self.init.get(acc.tensor)
        return [] if init is None else [self._generic(ci, init, acc, rank)]


def _edges_over(defn: Definition, rank: str) -> list[_Edge]:
    producers = _Producers(defn)
    edges: list[_Edge] = []
    for ci, st in enumerate(defn.statements):
        for acc in statement_reads(st):
            edges += producers.edges(ci, acc, rank)
    return edges


def _levels(defn: Definition, edges: list[_Edge]) -> list[int]:
    """Longest paths from the inputs, by monotone relaxation (zero-weight cycles converge)."""
    levels = [1] * len(defn.statements)
    for _ in range(len(levels) + 1):
        changed = False
        for e in edges:
            need = levels[e.source] + e.weight
            if need > levels[e.consumer]:
                levels[e.consumer], changed = need, True
        if not changed:
            return levels
    raise ValueError(f"definition '{defn.name}': a cycle of complete reads; no pass count exists")


# ----------------------------------------------------------------------------
# Dependencies: walking back along the longest path
# ----------------------------------------------------------------------------


class _Chains:
    """Backtracks the longest path into :class:`Dependency` records over one rank."""

    def __init__(self, defn: Definition, rank: str, edges: list[_Edge], levels: list[int]):
        self.defn, self.rank, self.levels = defn, rank, levels
        self.by_consumer: dict[int, list[_Edge]] = {}
        for e in edges:
            self.by_consumer.setdefault(e.consumer, []).append(e)
        self.graph = dataflow_graph(defn)

    def chain(self, start: int) -> tuple[Dependency, ...]:
        """Every dependency on a longest path ending at ``start``, earliest first."""
        out: list[Dependency] = []
        current = start
        while self.levels[current] > 1:
            dep, current = self._nearest(current)
            out.append(dep)
        return tuple(reversed(out))

    def nearest(self, start: int) -> Dependency:
        """The dependency closest to ``start`` (level above 1) that holds it back."""
        return self._nearest(start)[0]

    def _nearest(self, start: int) -> tuple[Dependency, int]:
        path, edge = self._to_boundary(start)
        traversing = [k for k, i in enumerate(path) if self._traverses(i)]
        at = traversing[-1] if traversing else 0
        return self._dependency(edge, path[at], list(reversed(path[at + 1:]))), edge.source

    def _to_boundary(self, start: int) -> tuple[list[int], _Edge]:
        """Breadth-first along level-keeping streamed reads to the nearest complete read.

        Returns the statements walked (``start`` first; each reads the next) and the
        weight-1 edge the last one reads through.  A longest path has one, so it exists.
        """
        parent: dict[int, int | None] = {start: None}
        queue = [start]
        for node in queue:
            for e in self._achieving(node):
                if e.weight:
                    return self._path(parent, node), e
                if e.source not in parent:
                    parent[e.source] = node
                    queue.append(e.source)
        raise AssertionError("a level above 1 without a complete read")  # pragma: no cover

    @staticmethod
    def _path(parent: dict[int, int | None], node: int) -> list[int]:
        path = [node]
        while parent[path[-1]] is not None:
            path.append(parent[path[-1]])
        return list(reversed(path))

    def _achieving(self, i: int) -> list[_Edge]:
        return [e for e in self.by_consumer.get(i, ())
                if self.levels[e.source] + e.weight == self.levels[i]]

    def _traverses(self, i: int) -> bool:
        return self.rank in iteration_space(self.defn.statements[i])

    def _dependency(self, edge: _Edge, later: int, through: list[int]) -> Dependency:
        sts = self.defn.statements
        return Dependency(self.rank, self.levels[edge.source] + 1, statement_label(sts[edge.source]),
                          statement_label(sts[later]),
                          tuple(statement_label(sts[i]) for i in through),
                          self._reread(edge.source, later), edge.kind)

    def _reread(self, earlier: int, later: int) -> str | None:
        """The tensor whose fiber ``later`` reads again: one ``earlier`` read, or computed
        from what it read; None when ``later`` reads only fibers new to this traversal."""
        sts = self.defn.statements
        fibers = [a.tensor for a in statement_reads(sts[later]) if self._carries(a.tensor)]
        seen = nx.ancestors(self.graph, sts[earlier].tensor)
        return next((t for t in fibers if t in seen), None)

    def _carries(self, tensor: str) -> bool:
        return self.rank in self.defn.tensor_ranks(tensor)


# ----------------------------------------------------------------------------
# The analysis
# ----------------------------------------------------------------------------


def indirect_reads(defn: Definition) -> dict[str, tuple[str, ...]]:
    """Rank -> the accesses (printed) that read it through an indirect subscript.

    Which elements of such a rank are read, and in which order, depends on an index
    tensor's values (``NP`` in ``KC[PT[b, m // PG], ...]``): it is *data-dependent*.  The
    pass counts are over the ranks that drive the read (``m``), whose order is the
    program's; a data-dependent rank itself is never traversed in order.
    """
    out: dict[str, dict[str, None]] = {}
    for st in defn.statements:
        for part in (st.expr, st.where):
            for acc in (n for n in walk(part) if isinstance(n, Access)) if part is not None else ():
                for rank, sub in zip(defn.tensor_ranks(acc.tensor), acc.subscripts):
                    if any(isinstance(n, Access) for n in walk(sub)):
                        out.setdefault(rank, {})[print_expr(acc)] = None
    return {rank: tuple(reads) for rank, reads in out.items()}


def rank_passes(defn: Definition, rank: str) -> RankPasses:
    """The passes the canonical ``defn`` makes over ``rank``."""
    edges = _edges_over(defn, rank)
    levels = _levels(defn, edges)
    chains = _Chains(defn, rank, edges, levels)
    sts = defn.statements
    traversing = [i for i, st in enumerate(sts) if rank in iteration_space(st)]
    count = max((levels[i] for i in traversing), default=0)
    last = next((i for i in traversing if levels[i] == count), None)
    causes = {statement_label(sts[i]): chains.nearest(i)
              for i in range(len(sts)) if levels[i] > 1}
    return RankPasses(
        rank=rank, count=count, constant=rank in constant_sizes(defn),
        chain=chains.chain(last) if last is not None else (),
        einsum_pass={statement_label(sts[i]): levels[i] for i in traversing},
        ready={statement_label(st): levels[i] for i, st in enumerate(sts) if i not in traversing},
        causes=causes, indexed_by=indirect_reads(defn).get(rank, ()))


def count_passes(defn: Definition) -> PassAnalysis:
    """Pass counts of every rank of ``defn`` (canonicalised first) and its ``pass_bound``."""
    canonical = canonicalize(defn)
    ranks = tuple(rank_passes(canonical, r) for r in canonical.ranks)
    symbolic = [rp for rp in ranks if not rp.constant]
    bound = max((rp.count for rp in symbolic), default=0)
    if canonical.statements:
        bound = max(bound, 1)
    bound_rank = next((rp.rank for rp in symbolic if rp.count == bound > 1), None)
    return PassAnalysis(canonical, ranks, bound, bound_rank)


def raises_bound(before: Definition, after: Definition) -> bool:
    """Whether ``after`` needs more passes than ``before`` (its ``pass_bound`` is larger)."""
    return count_passes(after).pass_bound > count_passes(before).pass_bound
