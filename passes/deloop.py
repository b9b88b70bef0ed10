"""``deloop``: an additive recurrence run over a rank of its own, so that what reads its
steps is ordinary (the form :func:`attnc.passes.backward.backward` differentiates).

A recurrence ``T[i+1, x] = T[i, x] + E`` (``E`` not reading ``T``) from a constant
``T[0, x] = C`` is a prefix sum: ``T[i, x] = C + sum of E at the computed steps before i``.
Its iterative rank moves to a fresh alias, a body copy keeps every step, and the statements
that read a step read the copy (a final read, a copy of the last step).  Before → after
(selective attention's running sum)::

    FS[0,m]   = 0
    FS[p+1,m] = FS[p,m] + relu(S[p,m])   where m < p
    L[p,m]    = S[p,m] - FS[p,m]
 ->
    let PS = P
    FS[0,m]    = 0
    FS[ps+1,m] = FS[ps,m] + relu(S[ps,m])   where m < ps
    FS_at[ps,m] = FS[ps,m]            (the loop's body: every step kept)
    L[p,m]     = S[p,m] - FS_at[p,m]  (an ordinary read: L is no longer in a loop)

The backward then runs the recurrence's adjoint as a suffix sum over a reversed rank
(``backward._Builder.propagate_recurrence``).  Other recurrences (a running max, states
that rescale each other: FuseMax's one-pass cascades) are refused with the reason.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..einsum_ir.exprs import transform, walk
from ..einsum_ir.ir import (Access, Binary, Definition, Einsum, Expr, Index, IterativeEinsum,
                            Num, Size, SizeLet, Statement, size_symbol)
from ..einsum_ir.schedule import statement_reads
from .names import fresh_name, fresh_rank


class NotAdditive(Exception):
    """A recurrence that is not a prefix sum (the message says why)."""


@dataclass(frozen=True)
class Recurrence:
    """One delooped recurrence: its tensor, the fresh iterative rank, its init and update
    (over that rank), the step ``E`` the update adds, the body copy and the final copy."""

    tensor: str
    rank: str
    init: IterativeEinsum
    update: IterativeEinsum
    step: Expr
    at: str
    final: str | None


def _added_step(update: IterativeEinsum) -> Expr | None:
    """``E`` of ``T[i+1, x] = T[i, x] + E`` (either order), else None."""
    own = Access(update.tensor, tuple(Index(r) for r in update.lhs))
    e = update.expr
    if isinstance(e, Binary) and e.op == "+":
        if e.left == own:
            return e.right
        if e.right == own:
            return e.left
    return None


def _downstream(defn: Definition, name: str) -> set[str]:
    """Tensors whose statements read ``name``, directly or through each other."""
    out, changed = {name}, True
    while changed:
        changed = False
        for st in defn.statements:
            if st.tensor not in out and any(a.tensor in out for a in statement_reads(st)):
                out.add(st.tensor)
                changed = True
    return out


def _replace_reads(e: Expr, tensor: str, pos: int, rank: str, at: str, final: str | None) -> Expr:
    """Reads of ``tensor`` at a step read its body copy ``at``; at its last step
    (``Size(rank)`` along ``pos``), its final copy."""
    def replace(n: Expr) -> Expr | None:
        if not (isinstance(n, Access) and n.tensor == tensor):
            return None
        if n.subscripts[pos] == Size(rank) and final is not None:
            return Access(final, n.subscripts[:pos] + n.subscripts[pos + 1:])
        return Access(at, n.subscripts)

    return transform(e, replace)


def delooped(defn: Definition) -> tuple[Definition, tuple[Recurrence, ...]]:
    """``defn`` with every recurrence delooped (see the module docstring); raises
    :class:`NotAdditive` for one that is not a prefix sum from a constant."""
    from .tile_loads import substitute

    iterative = defn.iterative_tensors
    if not iterative:
        return defn, ()
    taken = {st.tensor for st in defn.statements} | {a.name for a in defn.params} | \
        {r for st in defn.statements for r in st.lhs} | {let.name for let in defn.lets} | \
        {r for a in defn.tensor_args for r in a.ranks}
    taken |= {t.lower() for t in taken}
    lets, statements, recs = list(defn.lets), list(defn.statements), []
    for tensor, rank in iterative.items():
        inits = [s for s in statements if isinstance(s, IterativeEinsum) and s.tensor == tensor
                 and s.init]
        updates = [s for s in statements if isinstance(s, IterativeEinsum)
                   and s.tensor == tensor and not s.init]
        if len(inits) != 1 or len(updates) != 1:
            raise NotAdditive(f"{tensor} has no single init and update")
        init, update = inits[0], updates[0]
        step = _added_step(update)
        if step is None:
            raise NotAdditive(f"{tensor}'s update is not {tensor}[{rank.lower()}, ...] plus a "
                              f"step (a running max or a rescaled state: a hand-written online "
                              f"cascade, whose source form is the one to differentiate)")
        after = _downstream(defn, tensor) - {tensor}
        if any(a.tensor in after or a.tensor in iterative for a in walk(step)
               if isinstance(a, Access)) or (update.where is not None and any(
                   a.tensor in after or a.tensor in iterative for a in walk(update.where)
                   if isinstance(a, Access))):
            raise NotAdditive(f"the step {tensor} adds depends on {tensor} (or on another "
                              f"recurrence): not a prefix sum")
        if any(isinstance(a, Access) for a in walk(init.expr)):
            raise NotAdditive(f"{tensor} starts from a value that reads tensors (its absence "
                              f"is not tracked through the loop)")
        pos = update.iter_pos
        for st in statements:
            if st.tensor == tensor:
                continue
            for acc in statement_reads(st):
                if acc.tensor == tensor and acc.subscripts[pos] not in (Index(rank), Size(rank)):
                    raise NotAdditive(f"{st.tensor} reads {tensor} at "
                                      f"{acc.subscripts[pos]!r} along {rank}, not at a step")
        alias = fresh_rank(f"{rank}S", taken)
        lets.append(SizeLet(alias, size_symbol(rank)))
        lhs = tuple(alias if r == rank else r for r in update.lhs)
        to_alias = {rank: Index(alias)}
        init2 = dataclasses.replace(init, lhs=lhs, iter_rank=alias)
        update2 = dataclasses.replace(
            update, lhs=lhs, iter_rank=alias, expr=substitute(update.expr, to_alias),
            where=substitute(update.where, to_alias) if update.where is not None else None)
        at = fresh_name(f"{tensor}_at", taken)
        copy = Einsum(at, lhs, Access(tensor, tuple(Index(r) for r in lhs)))
        final_read = any(acc.tensor == tensor and acc.subscripts[pos] == Size(rank)
                         for st in statements if st.tensor != tensor
                         for acc in statement_reads(st))
        final = fresh_name(f"{tensor}_final", taken) if final_read else None
        out: list[Statement] = []
        for st in statements:
            if st is init:
                out.append(init2)
            elif st is update:
                out.append(update2)
                out.append(copy)
                if final is not None:
                    out.append(Einsum(final, tuple(r for r in lhs if r != alias),
                                      Access(tensor, tuple(Size(alias) if r == alias else
                                                           Index(r) for r in lhs))))
            else:
                out.append(dataclasses.replace(
                    st, expr=_replace_reads(st.expr, tensor, pos, rank, at, final),
                    where=_replace_reads(st.where, tensor, pos, rank, at, final)
                    if st.where is not None else None))
        statements = out
        recs.append(Recurrence(tensor, alias, init2, update2,
                               substitute(step, to_alias), at, final))
    return dataclasses.replace(defn, lets=tuple(lets), statements=tuple(statements)), tuple(recs)
