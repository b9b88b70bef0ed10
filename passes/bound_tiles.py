"""``bound-tiles``: one derivation of the tiles a row block visits, for every target.

From the update guards of the tile program (necessary conditions for a state update to
be computed, :func:`attnc.passes.tile.update_guards`) and the ``where`` clauses of the
loop body, per kernel:

* **live** tiles ``[lo, hi)``: a tile outside it changes no update for any row of the
  block, so it is skipped.  Exact for affine guards (strict integer comparisons tighten:
  ``x > 0`` is ``x >= 1``); a bound over a float parameter (a window ``W``) is widened by
  a tile on its side, which is conservative and correct (a full range over one is
  narrowed by two: a window's tiles inside it run unmasked); a guard that is not affine
  bounds nothing (the tile stays live) and, when it only reads inputs, becomes a
  per-tile **probe** (a block mask computed where it is used);
* **full** tiles ``[lo, hi)``: every ``where`` over the tile holds at every point of it
  for every row of the block, so the tile runs without masks; data-dependent atoms of
  those ``where`` clauses are checked per tile (``full_probes``).

Before → after (causal, rows ``p`` of a block, tiles of ``M0`` keys)::

    RM is updated only where exists m0: m1*M0 + m0 <= p + M - P
    ->  live tiles [0, min(M1, floor((ROW_LAST + M - P) / M0) + 1))
        full tiles [0, min(M // M0, floor((ROW_FIRST + M - P - BLOCK_M0 + 1) / M0) + 1))

The bounds are :mod:`attnc.einsum_ir.kernel` integer expressions; backends print them.
"""
from __future__ import annotations

import dataclasses

import sympy

from ..einsum_ir.exprs import free_ranks, transform, walk
from ..einsum_ir.ir import Access, Binary, Index
from ..einsum_ir.kernel import (ROW_FIRST, ROW_LAST, CeilDiv, FloatFloor, FloorDiv, IntExpr,
                                Kernel, Program, TileBounds, TileRange, imax, imin, map_kernels)
from ..einsum_ir.printer import print_expr
from ..einsum_ir.types import INTEGER_DTYPES
from .tile import conjunctions, to_sympy
from .tile_loads import expand_loads, expanded_body


def _size(rank: str) -> sympy.Symbol:
    return sympy.Symbol(rank, integer=True, positive=True)


def _sign(e) -> int | None:
    if e.is_number:
        return 1 if e > 0 else -1 if e < 0 else None
    if e.is_positive:
        return 1
    if e.is_negative:
        return -1
    return None


def _symbols(bound) -> set:
    """The sympy symbols of a kernel-IR bound (its nested integer expressions)."""
    if isinstance(bound, sympy.Basic):
        return set(bound.free_symbols)
    out = set()
    for x in (bound.args if hasattr(bound, "args") else (bound.num, bound.den)):
        out |= _symbols(x)
    return out


def _integral(e: sympy.Expr) -> bool:
    """A polynomial with integer coefficients in integer symbols (exact integer code)."""
    return all(c.is_Integer for c in sympy.Poly(e, *sorted(e.free_symbols, key=str)).coeffs()) \
        if e.free_symbols else bool(e.is_Integer)


class TileBounder:
    """The bound derivation for one kernel (its roles must be mapped)."""

    def __init__(self, k: Kernel, scalar_grid: bool = False):
        self.kernel = k
        self.tp = k.tiles
        self.r = k.roles
        self.inputs = {a.name for a in self.tp.cascade.tensor_args}
        self.loads, self.body = expanded_body(self.tp)
        self.selectors = self._selectors()
        self.elements = self._program_elements() if scalar_grid else {}
        self.fixed = self.selectors | frozenset(self.elements.values())

    def _program_elements(self) -> dict[Access, str]:
        """Integer input elements that are one value per program, ``L[b]`` in ``m < L[b]``
        (each subscript the grid rank it indexes, on a target whose programs hold their
        grid indices as scalars): bounds may read them, named ``L[b]`` as index symbols.
        Before → after (paged decode)::

            where m1*M0 + m0 < L[b]    (a per-tile probe of every key tile)
            ->  live tiles [0, min(M1, ceil(L[b] / M0))), full tiles [0, floor(L[b] / M0))
        """
        r = self.r
        if r is None or self.kernel.role == "stream-k":  # (a persistent worker's segments
            return {}                                    # cross programs: no one value)
        packed = r.packing.rank if r.packing is not None else None
        program = set(r.grid) - {packed}
        integer = {a.name: a for a in self.tp.cascade.tensor_args if a.dtype in INTEGER_DTYPES}
        conds = [st.where for st in self.body if st.where is not None]
        conds += [g.cond for _, guards in self.tp.guards for g in guards]
        found: dict[Access, str] = {}
        for n in (n for e in conds for n in walk(e)):
            ranks = integer[n.tensor].ranks if isinstance(n, Access) and n.tensor in integer else ()
            if ranks and all(self._inside(sub, rank, program)
                             for sub, rank in zip(n.subscripts, ranks)):
                found.setdefault(n, f"{n.tensor}[{', '.join(print_expr(x) for x in n.subscripts)}]")
        return found

    def _inside(self, sub, rank: str, program: set[str]) -> bool:
        """Whether subscript ``sub`` (affine in the program's grid indices) lies inside
        ``rank`` for every program: ``CU[b + 1]`` over ``CU[C]`` with ``let B = C - 1``."""
        if free_ranks(sub) - program or any(isinstance(x, Access) for x in walk(sub)):
            return False
        e = to_sympy(sub)
        if e is None:
            return False
        e = sympy.expand(e)
        lo = hi = e.subs({sympy.Symbol(f"_{g}", integer=True): 0 for g in program})
        for g in program:
            c = e.coeff(sympy.Symbol(f"_{g}", integer=True))
            if not c.is_Integer:
                return False
            lo, hi = lo + min(c, 0) * (_size(g) - 1), hi + max(c, 0) * (_size(g) - 1)
        lets = {sympy.Symbol(x.name, integer=True, positive=True): x.value
                for x in self.tp.cascade.lets}
        below = sympy.expand((_size(rank) - 1 - hi).subs(lets).subs(lets))
        return bool(sympy.expand(lo.subs(lets)).is_nonnegative) and bool(below.is_nonnegative)

    def scalarise(self, e):
        """``e`` with its per-program elements as index symbols (:meth:`_program_elements`)."""
        if not self.elements:
            return e
        return transform(e, lambda n: Index(self.elements[n]) if n in self.elements else None)

    def _selectors(self) -> frozenset[str]:
        """Grid ranks that choose which tiles a split-K worker streams (``w`` in
        ``K[(w*MT + mt)*M0 + m0]``): one value per program, so its bounds may read them
        (the kernel targets that run workers have them as scalars)."""
        from .tile import blocked_subscript, direct_ranks

        r = self.r
        if r is None or r.loop is None or self.kernel.role != "worker":
            return frozenset()  # (a numpy kernel vectorises its grid: no scalar to read)
        found = blocked_subscript(self.tp.cascade, r.loop)
        if found is None:
            return frozenset()
        packed = r.packing.rank if r.packing is not None else None
        return frozenset(direct_ranks(found[0]) & set(r.grid) - {packed})

    # --- one affine atom -------------------------------------------------------------
    def tile_inequality(self, atom, worst: bool):
        """An affine atom over m1, m0 and the row as ``c1*m1 + k >= 0`` at the block's
        best (or, ``worst``, its worst) m0 and row: ``(c1, k, floating)``, ``floating`` when
        k is not exact integer arithmetic (a float parameter); None when not that form."""
        r = self.r
        if not isinstance(atom, Binary) or atom.op not in ("<", "<=", ">", ">="):
            return None
        a, b = to_sympy(atom.left), to_sympy(atom.right)
        if a is None or b is None:
            return None
        diff = sympy.expand(b - a if atom.op in ("<", "<=") else a - b)  # >= 0 (or > 0)
        x1, x0, xp = (sympy.Symbol(f"_{n}", integer=True) for n in (r.loop, r.tile, r.row))
        c0, cp = diff.coeff(x0), diff.coeff(xp)
        rest = sympy.expand(diff - c0 * x0 - cp * xp)
        c1 = rest.coeff(x1)
        const = sympy.expand(rest - c1 * x1)
        fixed = {f"_{g}" for g in self.fixed}  # a program's selector index, its elements
        if any(s.name.startswith("_") and s.name not in fixed for s in const.free_symbols):
            return None  # another index variable: not a bound of this block
        floating = not _integral(const) or any(s.name.startswith("param_") for s in const.free_symbols)
        if not (c0.is_number and cp.is_number and c0.is_Integer and cp.is_Integer):
            return None
        if atom.op in ("<", ">") and not floating:
            const -= 1  # integers: x > 0 is x >= 1
        high_m0 = (c0 > 0) != worst
        high_p = (cp > 0) != worst
        m0_best = sympy.Symbol("BLOCK_" + r.tile, integer=True, positive=True) - 1 if high_m0 else 0
        p_best = sympy.Symbol(ROW_LAST if high_p else ROW_FIRST, integer=True)
        k = sympy.expand(const + c0 * m0_best + cp * p_best)
        return c1, k, floating

    def atom_tiles(self, atom, worst: bool = False) -> tuple[str, IntExpr] | None:
        """An affine atom as a bound ``("lo" | "hi", bound)`` on the tile index m1: where it
        holds for *some* m0 and row of the block, or (``worst``) for *every* m0 and row."""
        inequality = self.tile_inequality(self.scalarise(atom), worst)
        if inequality is None:
            return None
        c1, k, floating = inequality
        if c1 == 0:  # the atom holds on every tile or on none (exactly: integer code only)
            all_or_none = sympy.Max(sympy.Min(k + 1, 1), 0) * _size(self.r.loop)
            return None if floating else ("hi", all_or_none)
        sign = _sign(c1)
        if sign is None or not _integral(c1):
            return None
        c = c1 if sign > 0 else -c1
        if floating and worst:  # trunc toward zero, a tile narrower on each side (and one
            if sign > 0:        # more: a strict atom, float rounding at the boundary)
                return "lo", FloatFloor(sympy.expand(-k), c, 2)
            return "hi", FloatFloor(k, c, -1)
        if floating:  # trunc toward zero, a tile wider on each side
            if sign > 0:
                return "lo", FloatFloor(sympy.expand(-k), c, -1)
            return "hi", FloatFloor(k, c, 2)
        if sign > 0:   # m1 >= ceil(-k / c1)
            return "lo", CeilDiv(sympy.expand(-k), c)
        return "hi", FloorDiv(k, c, 1)  # m1 <= floor(k / (-c1))

    # --- live tiles ---------------------------------------------------------------------
    def guard_range(self, g) -> TileRange | None:
        """Tiles that may satisfy guard g for some row of the block, from its affine atoms
        over the loop, tile and row (an atom that is not one, ``DQ[p] == DK[m]`` or one
        reading another program's rank, ``p < CU[b + 1] - CU[b]``, is dropped: a weaker
        condition is still necessary); None when some disjunct has no such atom."""
        r = self.r
        if r.tile not in g.exists:
            return None
        dnf = conjunctions(g.cond)
        if dnf is None:
            return None
        spans = []
        for conj in dnf:
            lo, hi = [sympy.Integer(0)], [_size(r.loop)]
            for b in filter(None, (self.atom_tiles(atom) for atom in conj)):
                (lo if b[0] == "lo" else hi).append(b[1])
            if len(lo) + len(hi) == 2:
                return None
            spans.append((imax(*lo), imin(*hi)))
        return TileRange(imin(*(s[0] for s in spans)), imax(*(s[1] for s in spans)))

    def exact(self, g) -> bool:
        """Whether every atom of guard g is an affine bound (its range is all there is)."""
        dnf = conjunctions(g.cond)
        return dnf is not None and all(self.atom_tiles(a) is not None for conj in dnf for a in conj)

    def live(self) -> TileRange | None:
        """The union over the updates of the tiles every guard of the update may pass."""
        r = self.r
        if r.tile is None:  # (no row rank: a kernel whose rows are its grid's)
            return None
        per_update = []
        for _, guards in self.tp.guards:
            ranges = [x for x in (self.guard_range(g) for g in guards) if x is not None]
            if not ranges:
                return None
            per_update.append((imax(*(x.lo for x in ranges)), imin(*(x.hi for x in ranges))))
        if not per_update:
            return None
        lo = imin(*(x[0] for x in per_update))
        hi = imax(*(x[1] for x in per_update))
        return TileRange(imax(sympy.Integer(0), lo), imin(_size(r.loop), hi))

    def live_probes(self) -> tuple[tuple, ...]:
        """Per update, its data-dependent guards over the block (reading inputs only); empty
        when some update is not gated by data (the tile is then always live)."""
        r = self.r
        if r.tile is None or r.row is None:
            return ()
        out = []
        for _, guards in self.tp.guards:
            data = [g for g in guards if r.tile in g.exists and not self.exact(g)
                    and free_ranks(g.cond) <= {r.loop, r.tile, r.row} | set(r.grid)]
            if not data:
                return ()
            conds = tuple(expand_loads(g.cond, self.loads) for g in data)
            if any(isinstance(n, Access) and n.tensor not in self.inputs
                   for c in conds for n in walk(c)):
                return ()
            out.append(conds)
        return tuple(out)

    # --- full tiles ---------------------------------------------------------------------
    def probe_ready(self, atom) -> bool:
        """An atom a tile probe can evaluate: over the loop, tile and row, reading inputs."""
        r = self.r
        cond = expand_loads(atom, self.loads)
        return free_ranks(cond) <= {r.loop, r.tile, r.row} and not any(
            isinstance(n, Access) and n.tensor not in self.inputs for n in walk(cond))

    def inside_stream(self):
        """The end of the tiles that lie wholly inside the streamed rank: ``M // M0``, or
        for a split worker, whose tile ``mt`` is tile ``w*MT + mt`` of the keys, the bound
        of ``(w*MT + mt)*M0 + m0 < M`` at the tile's last point; a paged read's ``m % PG``
        lies inside ``PG`` on every tile (the keys' end ``m < M`` is then a ``where``)."""
        from ..einsum_ir.ir import Size
        from .tile import blocked_subscript, direct_ranks

        r = self.r
        found = blocked_subscript(self.tp.cascade, r.loop)
        sub = found[0] if found is not None else None
        if isinstance(sub, Binary) and sub.op == "%" and sub.right == Size(self.tp.stream_rank):
            return _size(r.loop)  # KC[.., m % PG]: inside PG on every tile (M is a where's)
        if found is None or direct_ranks(found[0]) <= {r.loop, r.tile}:
            return FloorDiv(_size(self.tp.stream_rank), _size(r.tile), nonneg=True)
        bound = self.atom_tiles(Binary("<", found[0], Size(self.tp.stream_rank)), worst=True)
        return bound[1] if bound is not None and bound[0] == "hi" else None

    def banded_disjunct(self, dnf) -> tuple | None:
        """Of a ``where`` that is a disjunction, the one disjunct whose tiles run unmasked:
        a tile where it holds at every point satisfies the whole condition.  The disjunct
        must be affine; the one with the most bounds that move with the rows is taken (the
        band the loop spends its tiles in: a window beside a few sink keys), the first of
        equals; None if no disjunct is affine with such a bound.
        Before → after (sinks_window)::

            m < sinks or (m <= p + M - P and p + M - P - m < window)
            -> full tiles: those inside the window (the sink tiles stay masked)
        """
        rows = {ROW_FIRST, ROW_LAST}
        best, moving = None, 0
        for conj in dnf:
            bounds = [self.atom_tiles(atom, worst=True) for atom in conj]
            if any(b is None for b in bounds):
                continue
            n = sum(bool(rows & {str(x) for x in _symbols(b[1])}) for b in bounds)
            if n > moving:
                best, moving = conj, n
        return best

    def full(self):
        """(range, data atoms, conditions that hold) of the tiles needing no mask, or None."""
        r = self.r
        if r.tile is None or r.row is None or self.tp.stream_rank is None:
            return None
        inside = self.inside_stream()
        if inside is None:
            return None
        lo, hi = [sympy.Integer(0)], [inside]
        data, holds = [], set()
        for st in self.body:
            if st.where is None or r.tile not in free_ranks(st.where):
                continue
            if not free_ranks(self.scalarise(st.where)) <= {r.loop, r.tile, r.row} | self.fixed:
                return None
            dnf = conjunctions(st.where)
            if dnf is None:
                return None
            conj = dnf[0] if len(dnf) == 1 else self.banded_disjunct(dnf)
            if conj is None:
                return None
            for atom in conj:
                bound = self.atom_tiles(atom, worst=True)
                if bound is not None:
                    (lo if bound[0] == "lo" else hi).append(bound[1])
                elif self.probe_ready(atom):
                    data.append(atom)
                else:
                    return None
            holds.add(st.where)
        return TileRange(imax(*lo), imin(*hi)), tuple(dict.fromkeys(data)), frozenset(holds)

    def bounds(self) -> TileBounds:
        live, full = self.live(), self.full()
        used = set().union(*(_symbols(b) for rng in (live, full and full[0]) if rng is not None
                             for b in (rng.lo, rng.hi)))
        elements = tuple((name, acc) for acc, name in self.elements.items()
                         if sympy.Symbol(f"_{name}", integer=True) in used)
        if full is None:
            return TileBounds(live, self.live_probes(), elements=elements)
        return TileBounds(live, self.live_probes(), full[0], full[1], full[2], elements)


def bound_kernel_tiles(k: Kernel, scalar_grid: bool = True) -> Kernel:
    """Bounds for one kernel (a kernel without a loop gets none); ``scalar_grid``: the
    target's programs hold their grid indices as scalars (Triton, CUDA; not numpy, which
    vectorises them), so bounds may read per-program elements."""
    if k.tiles.loop_rank is None or k.roles is None:
        return k
    return dataclasses.replace(k, bounds=TileBounder(k, scalar_grid).bounds())


def bound_tiles(p: Program, scalar_grid: bool = True) -> Program:
    """The ``bound-tiles`` stage."""
    return map_kernels(p, lambda k: bound_kernel_tiles(k, scalar_grid))
