"""The kernel IR: a *program of kernels*, below the cascade and above every backend.

A cascade says what is computed; a kernel program says how it runs on a machine with a
grid of programs: which kernels run in which order, with which buffers between them, and
for each kernel its loop over the tiles of the streamed rank, the role of every rank
(grid, row block, vector), the tiles each row block visits (skipped / partial / full) and
the launch variants (streamed, split-K, stream-K).  It is produced by the lowering stages
of :mod:`attnc.passes.lowering` (``tile`` → ``map-ranks`` → ``bound-tiles`` →
``variants``) and rendered by every backend (numpy, Triton, CUDA), which make no
scheduling decision of their own.

Every node is a frozen dataclass, changed with ``dataclasses.replace``; statements inside a
kernel are Einsum-IR statements (typed by :mod:`einsum_ir.types`), so a kernel prints in
the user's notation.  :func:`print_program` is ``attnc compile --emit kernel``, and
:func:`verify` checks the invariants the stages promise.

Tile bounds are small integer expressions (:class:`IMax`, :class:`IMin`,
:class:`FloorDiv`, :class:`CeilDiv`, :class:`FloatFloor` over sympy leaves) whose symbols
are sizes, parameters (``param_<name>``), the first and last row of the block
(``ROW_FIRST``, ``ROW_LAST``) and block sizes (``BLOCK_<rank>``); a backend prints them with
its own syntax and decides nothing about them.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Union

import sympy

from .ir import Definition, Expr
from .printer import print_expr, print_size, print_statement

# ----------------------------------------------------------------------------
# integer bound expressions
# ----------------------------------------------------------------------------

ROW_FIRST, ROW_LAST = "ROW_FIRST", "ROW_LAST"


@dataclass(frozen=True, slots=True)
class IMax:
    """The largest of ``args`` (integers)."""

    args: tuple["IntExpr", ...]


@dataclass(frozen=True, slots=True)
class IMin:
    """The smallest of ``args`` (integers)."""

    args: tuple["IntExpr", ...]


@dataclass(frozen=True, slots=True)
class FloorDiv:
    """``floor(num / den) + offset`` for an integer ``num`` and a positive integer ``den``;
    ``nonneg`` when ``num`` is known not to be negative (a plain quotient then)."""

    num: sympy.Expr
    den: sympy.Expr
    offset: int = 0
    nonneg: bool = False


@dataclass(frozen=True, slots=True)
class CeilDiv:
    """``ceil(num / den)`` for an integer ``num`` and a positive integer ``den``."""

    num: sympy.Expr
    den: sympy.Expr


@dataclass(frozen=True, slots=True)
class FloatFloor:
    """``trunc(num / den) + offset`` in float arithmetic: a bound over a float parameter,
    widened by ``offset`` tiles on its side so that truncation toward zero never cuts a
    live tile."""

    num: sympy.Expr
    den: sympy.Expr
    offset: int


IntExpr = Union[sympy.Expr, IMax, IMin, FloorDiv, CeilDiv, FloatFloor]


def _flat(kind, args) -> tuple:
    out = []
    for a in args:
        out += list(a.args) if isinstance(a, kind) else [a]
    return tuple(dict.fromkeys(out))


def imax(*args: IntExpr) -> IntExpr:
    """``IMax`` over the distinct args, nested maxima flattened (one arg: itself)."""
    args = _flat(IMax, args)
    return args[0] if len(args) == 1 else IMax(args)


def imin(*args: IntExpr) -> IntExpr:
    """``IMin`` over the distinct args, nested minima flattened (one arg: itself)."""
    args = _flat(IMin, args)
    return args[0] if len(args) == 1 else IMin(args)


def eval_int(e: IntExpr, env: dict[str, float]) -> int:
    """The bound's value with its symbols bound by ``env`` (tests, launch-time checks)."""
    import math

    if isinstance(e, IMax):
        return max(eval_int(a, env) for a in e.args)
    if isinstance(e, IMin):
        return min(eval_int(a, env) for a in e.args)
    if isinstance(e, FloorDiv):
        return math.floor(_num(e.num, env) / _num(e.den, env)) + e.offset
    if isinstance(e, CeilDiv):
        return math.ceil(_num(e.num, env) / _num(e.den, env))
    if isinstance(e, FloatFloor):
        return int(_num(e.num, env) / _num(e.den, env)) + e.offset
    return int(_num(e, env))


def _num(e: sympy.Expr, env) -> float:
    value = sympy.sympify(e).subs({s: env[s.name] for s in e.free_symbols})
    return float(value)


def print_int(e: IntExpr) -> str:
    """The bound in a readable, target-neutral notation."""
    if isinstance(e, IMax):
        return "max(" + ", ".join(print_int(a) for a in e.args) + ")"
    if isinstance(e, IMin):
        return "min(" + ", ".join(print_int(a) for a in e.args) + ")"
    if isinstance(e, FloorDiv):
        tail = f" + {e.offset}" if e.offset else ""
        return f"floor(({e.num}) / {e.den}){tail}"
    if isinstance(e, CeilDiv):
        return f"ceil(({e.num}) / {e.den})"
    if isinstance(e, FloatFloor):
        return f"trunc(({e.num}) / {e.den}) {'+' if e.offset >= 0 else '-'} {abs(e.offset)}"
    return str(e)


# ----------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HeadPacking:
    """A grid rank folded into the row block (GQA/MQA): the ``group`` query heads that
    share one K/V head share a program, whose rows are the (g, p) pairs.

    ``group`` and ``units`` are ranks (``G``, ``HK``) or None (MQA: the whole rank is
    one group, one unit); ``divisor`` is the subscript ``h // G`` the streamed loads use."""

    rank: str
    group: str | None
    units: str | None
    divisor: Expr | None


@dataclass(frozen=True, slots=True)
class RankRoles:
    """The role of every rank in one kernel: ``grid`` ranks are one value per program,
    ``row`` is the rank whose block a program owns, ``tile`` the rank inside a streamed
    tile, ``loop`` the tile index, ``vector`` the ranks a program holds whole (canonical
    order: row, tile, then the others)."""

    row: str | None
    tile: str | None
    loop: str | None
    grid: tuple[str, ...]
    vector: tuple[str, ...]
    packing: HeadPacking | None = None


@dataclass(frozen=True, slots=True)
class TileRange:
    """Tiles ``[lo, hi)`` of the loop rank."""

    lo: IntExpr
    hi: IntExpr


@dataclass(frozen=True, slots=True)
class TileBounds:
    """Which tiles a row block visits and how.

    * ``live``: tiles some update may change (outside it: *skipped*); None: every tile;
    * ``live_probes``: per update, data-dependent guards evaluated per tile (a block-mask
      probe); empty when the affine range is all there is;
    * ``full``: tiles that need no mask (every ``where`` over the tile holds on the whole
      tile), checked per tile against ``full_probes`` (data-dependent atoms); None when the
      loop cannot be split; ``full_holds``: the ``where`` conditions that hold there;
    * ``elements``: integer input elements that are one value per program (``L[b]``), read
      by the bounds as the symbols ``_L[b]``.
    Tiles in ``live`` but not in ``full`` are *partial* (masked)."""

    live: TileRange | None
    live_probes: tuple[tuple[Expr, ...], ...] = ()
    full: TileRange | None = None
    full_probes: tuple[Expr, ...] = ()
    full_holds: frozenset = frozenset()
    elements: tuple[tuple[str, Expr], ...] = ()  # (index symbol, the per-program element it is)

    def loop_kinds(self) -> tuple[str, ...]:
        """The loops a renderer emits, in order."""
        if self.full is None:
            return ("masked",)
        return ("masked", "full", "masked")


@dataclass(frozen=True, slots=True)
class Buffer:
    """A tensor between kernels: ``input``, ``output``, ``workspace`` (final states of a
    split loop, one slot per worker) or ``intermediate`` (a multi-kernel stage's result)."""

    name: str
    ranks: tuple[str, ...]
    kind: str


@dataclass(frozen=True, slots=True)
class Kernel:
    """One kernel: a tile program (prologue, carried state, one loop over tiles,
    epilogue; see :mod:`attnc.passes.tile`) with the decisions of the lowering stages.

    ``role``: ``streamed`` (the whole definition), ``worker`` (a split-K worker: its
    final states go to a workspace), ``stream-k`` (a persistent stream-K worker),
    ``combine`` (reads a workspace, merges with the derived combine), ``stage`` (one
    kernel of a multi-kernel program)."""

    name: str
    role: str
    tiles: object                      # passes.tile.TileProgram
    writes: tuple["Buffer", ...]       # what it stores (outputs or workspaces)
    roles: RankRoles | None = None     # set by map-ranks
    bounds: TileBounds | None = None   # set by bound-tiles
    fills: tuple[tuple[str, Expr], ...] = ()   # stream-K: workspace init values

    @property
    def cascade(self) -> Definition:
        return self.tiles.cascade


@dataclass(frozen=True, slots=True)
class Variant:
    """A way to run the definition: kernels in launch order.  ``kind``: ``streamed``,
    ``split-k`` or ``stream-k``; ``split``: the worker (slot) rank of a split variant."""

    kind: str
    kernels: tuple[str, ...]
    split: str | None = None


@dataclass(frozen=True, slots=True)
class Program:
    """The kernel program of one definition: its buffers, kernels and variants.
    ``cascade`` is the cascade the program computes (what ``--emit ir`` prints);
    ``stages`` the sub-cascades of a multi-kernel program, in order (else empty)."""

    name: str
    cascade: Definition
    kernels: tuple[Kernel, ...]
    buffers: tuple[Buffer, ...] = ()
    variants: tuple[Variant, ...] = ()
    notes: tuple[str, ...] = ()        # decisions worth showing (--print-after-all)
    parts: tuple["Program", ...] = ()  # a multi-kernel program: sub-programs run in order

    def kernel(self, name: str) -> Kernel:
        for k in self.kernels:
            if k.name == name:
                return k
        raise KeyError(name)

    def lets_of(self, v: Variant) -> tuple:
        """The sizes a variant's launch binds: its loop cascade's ``let``s — for stream-K
        the split-K cascade's, whose workspace (``W`` slots) it shares."""
        if v.kind == "stream-k":
            split = next(x for x in self.variants if x.kind == "split-k")
            return self.kernel(split.kernels[0]).cascade.lets
        return self.kernel(v.kernels[0]).cascade.lets


def map_kernels(p: Program, fn) -> Program:
    """``p`` with ``fn`` applied to every kernel, its parts' kernels included."""
    if not p.parts:
        return replace(p, kernels=tuple(fn(k) for k in p.kernels))
    parts = tuple(map_kernels(q, fn) for q in p.parts)
    return replace(p, parts=parts, kernels=tuple(k for q in parts for k in q.kernels))


@dataclass(frozen=True, slots=True)
class KernelModule:
    """The kernel programs of a whole ``.attn`` file (one per definition)."""

    programs: tuple[Program, ...]


# ----------------------------------------------------------------------------
# printing (--emit kernel)
# ----------------------------------------------------------------------------


def _roles_line(r: RankRoles) -> str:
    parts = [f"grid ({', '.join(r.grid) or '-'})", f"rows {r.row or '-'}",
             f"vector ({', '.join(r.vector) or '-'})"]
    if r.packing:
        pk = r.packing
        parts.append(f"packed {pk.rank} by {pk.group or pk.rank} per {pk.units or 'program'}")
    return "  ".join(parts)


def _bounds_lines(b: TileBounds, loop: str) -> list[str]:
    lines = []
    live = "all" if b.live is None else f"[{print_int(b.live.lo)}, {print_int(b.live.hi)})"
    lines.append(f"live tiles {live}")
    for probes in dict.fromkeys(b.live_probes):
        lines.append("  probe per tile: " + " and ".join(print_expr(p) for p in probes))
    if b.full is not None:
        lines.append(f"full tiles [{print_int(b.full.lo)}, {print_int(b.full.hi)})"
                     + (" where every point has " + " and ".join(print_expr(p) for p in b.full_probes)
                        if b.full_probes else ""))
    kinds = " | ".join(b.loop_kinds())
    lines.append(f"loops over {loop.lower()}: {kinds}")
    return lines


def print_kernel(k: Kernel) -> list[str]:
    """One kernel as indented lines."""
    tp = k.tiles
    out = [f"kernel {k.name} ({k.role}) -> " + ", ".join(f"{b.name}[{','.join(b.ranks)}]" for b in k.writes)]
    if k.roles is not None:
        out.append("  " + _roles_line(k.roles))
    if tp.loop_rank and tp.tile_rank:
        size = tp.tile_size if tp.tile_size is not None else tp.tile_rank
        out.append(f"  stream {tp.stream_rank or '?'} in tiles of {tp.tile_rank} = {size}")
    if k.bounds is not None and tp.loop_rank:
        out += ["  " + ln for ln in _bounds_lines(k.bounds, tp.loop_rank)]
    out += [f"  {print_statement(s)}" for s in tp.prologue]
    out += [f"  state {print_statement(s)}" for s in tp.inits]
    if tp.loop_rank:
        out.append(f"  for {tp.loop_rank.lower()} in tiles:")
        guards = dict(tp.guards)
        for s in tp.body:
            note = ""
            if s.tensor in guards and guards[s.tensor]:
                note = "   # only where " + " and ".join(f"({g})" for g in guards[s.tensor])
            out.append(f"    {print_statement(s)}{note}")
    out += [f"  {print_statement(s)}" for s in tp.epilogue]
    out += [f"  fill {name} = {print_expr(v)}" for name, v in k.fills]
    return out


def print_program(p: Program) -> str:
    """The whole program, as ``--emit kernel`` shows it."""
    lines = [f"program {p.name}:"]
    for b in p.buffers:
        lines.append(f"  buffer {b.name}[{','.join(b.ranks)}] {b.kind}")
    for v in p.variants:
        lines.append(f"  variant {v.kind}: " + " -> ".join(v.kernels)
                     + (f"  (slots over {v.split})" if v.split else ""))
    for note in p.notes:
        lines.append(f"  # {note}")
    if p.parts:
        for q in p.parts:
            lines += ["  " + ln for ln in print_program(q).splitlines()]
        return "\n".join(lines) + "\n"
    for k in p.kernels:
        lines += ["  " + ln for ln in print_kernel(k)]
    return "\n".join(lines) + "\n"


def print_kernel_module(m: KernelModule) -> str:
    return "\n".join(print_program(p) for p in m.programs)


# ----------------------------------------------------------------------------
# verifier
# ----------------------------------------------------------------------------


class KernelIRError(Exception):
    """A lowering stage broke an invariant of the kernel IR (a compiler bug)."""


def verify(p: Program, stage: str = "") -> Program:
    """Check what every stage promises; raises :class:`KernelIRError`."""
    where = f"after {stage}: " if stage else ""
    for q in p.parts:
        verify(q, stage)
    names = [k.name for k in p.kernels]
    if len(set(names)) != len(names):
        raise KernelIRError(f"{where}{p.name}: two kernels share a name")
    for v in p.variants:
        for k in v.kernels:
            if k not in names:
                raise KernelIRError(f"{where}{p.name}: variant {v.kind} launches unknown kernel {k}")
    for k in p.kernels:
        _verify_kernel(k, where)
    return p


def _verify_kernel(k: Kernel, where: str) -> None:
    tp = k.tiles
    defined = {s.tensor for s in tp.prologue} | {s.tensor for s in tp.inits} | \
        {s.tensor for s in tp.body} | {s.tensor for s in tp.epilogue}
    missing = [w.name for w in k.writes if w.name not in defined]
    if missing:
        raise KernelIRError(f"{where}kernel {k.name} stores {missing[0]}, which it never computes")
    if k.roles is not None:
        r = k.roles
        every = set(r.grid) | set(r.vector)
        if len(every) != len(r.grid) + len(r.vector):
            raise KernelIRError(f"{where}kernel {k.name}: a rank is both grid and vector")
        if r.row is not None and r.row not in r.vector:
            raise KernelIRError(f"{where}kernel {k.name}: row rank {r.row} is not a vector rank")
        if (r.loop or None) != (tp.loop_rank or None):
            raise KernelIRError(f"{where}kernel {k.name}: loop rank differs from its tiles'")
    if k.bounds is not None and tp.loop_rank is None and k.bounds.live is not None:
        raise KernelIRError(f"{where}kernel {k.name} bounds tiles but has no loop")


def size_text(e) -> str:
    return print_size(e)
