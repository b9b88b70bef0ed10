"""Fusion groups implied by the passes: which Einsums may run in one traversal, and why not.

The groups follow the cascade's governing rank, its ``bound_rank`` (the symbolic rank that
needs ``pass_bound`` passes).  Group ``k`` is pass ``k`` over that rank: the Einsums that
traverse it in pass ``k`` stream together, fused; an Einsum that does not traverse it runs
once, between passes, and joins the group it sits next to: *before* pass 1 when it needs
nothing complete, else *after* the pass it waits for (an epilogue).  An Einsum in group
``k > 1`` cannot fuse into group ``k - 1``; the reason is the :class:`Dependency` that holds
it back: the Einsum whose traversal must finish first, and the fiber read again.  A 1-pass
cascade is one group.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..einsum_ir.ir import Statement
from .passcount import Dependency, PassAnalysis, iteration_space, statement_label

BEFORE, STREAM, AFTER = "before", "stream", "after"


@dataclass(frozen=True, slots=True)
class Member:
    """One Einsum of a group and its role: ``before``/``after`` the traversal, or ``stream``."""

    einsum: str
    role: str


@dataclass(frozen=True, slots=True)
class FusionGroup:
    """The Einsums that may fuse into pass ``number`` over ``rank`` (None: the one group).

    ``blocked_by`` lists, once each, the dependencies that keep this group's Einsums out
    of the previous group.
    """

    number: int
    rank: str | None
    members: tuple[Member, ...]
    blocked_by: tuple[Dependency, ...]

    @property
    def einsums(self) -> tuple[str, ...]:
        return tuple(m.einsum for m in self.members)


def _placement(analysis: PassAnalysis, st: Statement) -> tuple[int, str]:
    """(group number, role) of one statement over the bound rank."""
    rank = analysis.bound_rank
    if rank is None:
        return 1, STREAM
    label, rp = statement_label(st), analysis[rank]
    if rank in iteration_space(st):
        return rp.einsum_pass[label], STREAM
    ready = rp.ready[label]
    return (1, BEFORE) if ready == 1 else (ready - 1, AFTER)


def _blockers(analysis: PassAnalysis, number: int, labels: list[str]) -> tuple[Dependency, ...]:
    rank = analysis.bound_rank
    if rank is None or number == 1:
        return ()
    causes = analysis[rank].causes
    found: dict[Dependency, None] = {}
    for label in labels:
        dep = causes.get(label)
        if dep is not None and dep.pass_number == number:
            found.setdefault(dep, None)
    return tuple(found)


def fusion_groups(analysis: PassAnalysis) -> tuple[FusionGroup, ...]:
    """The groups of the analysed definition, in pass order, members in statement order."""
    placed: dict[int, list[Member]] = {}
    for st in analysis.definition.statements:
        number, role = _placement(analysis, st)
        placed.setdefault(number, []).append(Member(statement_label(st), role))
    groups = []
    for number in sorted(placed):
        members = sorted(placed[number], key=lambda m: (m.role != BEFORE, m.role == AFTER))
        streaming = [m.einsum for m in members if m.role == STREAM]
        groups.append(FusionGroup(number, analysis.bound_rank, tuple(members),
                                  _blockers(analysis, number, streaming)))
    return tuple(groups)
