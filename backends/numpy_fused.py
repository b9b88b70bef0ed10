"""The fused numpy form: a kernel of the kernel IR rendered as one loop over key tiles.

numpy is a renderer of the same kernel program as Triton and CUDA (``passes/lowering.py``
with the ``numpy`` target): the tile program, the row rank (map-ranks) and the live /
full tile ranges and block-mask probes (bound-tiles) come from the kernel; what differs
is that one numpy "program" holds every row, so a range bound per row block becomes a
range per row, evaluated as vectors.  A multi-kernel program renders each part so and
runs them in order (``templates/common/chain.py.jinja``).

Tensors of the loop body live for one tile (no ``m1`` dimension, rows relative
to the tile's row range); the iterative state is two buffers (this step's and
the next); tiles and rows that no update can change are skipped, and ``where``
filters are dropped on tiles where they hold everywhere.  Memory is
O(rows · tile) instead of O(rows · M).  Before → after::

    for m1 in range(M1): ... BQK[m1,m0,p] ... RM[m1+1,p] = ...        (per-Einsum)
    for m1 in range(M1):
        _lo, _hi = rows this tile can change (from the update guards)
        BQK[m0, p - _lo] = ...; RM_next[_lo:_hi] = ...; RM = RM_next  (fused)
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy

from ..einsum_ir.exprs import free_ranks, walk
from ..einsum_ir.ir import Access, Binary, Definition, Index, IterativeEinsum, Num, Reduce
from ..einsum_ir.kernel import (ROW_FIRST, ROW_LAST, CeilDiv, FloatFloor, FloorDiv, IMax, IMin,
                                Kernel)
from ..einsum_ir.printer import print_expr, print_statement
from ..einsum_ir.schedule import statement_reads
from ..passes.tile import NotTileable, TileProgram
from ..passes.tile_loads import expand_loads, inline_loads
from .numpy_backend import Bound, FunctionRenderer, StatementRenderer, mask_name, pyname, tup


@dataclass(frozen=True)
class Rows:
    """The row range of the current tile: rank, and code names for its bounds."""

    rank: str
    lo: str = "_lo"
    hi: str = "_hi"


def always_present_states(tp: TileProgram) -> frozenset[str]:
    """States whose init reads nothing and has no ``where``: present from the start, and an
    update that is not computed carries them, so they are present at every step."""
    return frozenset(st.tensor for st in tp.inits if st.where is None
                     and not any(isinstance(n, Access) for n in walk(st.expr)))


class FusedStatementRenderer(StatementRenderer):
    """Renders a body statement for one tile (see the module docstring)."""

    def __init__(self, defn, st, temps, tp: TileProgram, rows: Rows | None, full_flags: dict,
                 in_loop: bool = True):
        super().__init__(defn, st, temps, tp.loop_rank if in_loop else None,
                         frozenset(a.name for a in defn.tensor_args) | always_present_states(tp))
        self.tp, self.rows, self.full_flags, self.in_loop = tp, rows, full_flags, in_loop

    # --- grid ---------------------------------------------------------------
    def restricted(self, rank: str) -> bool:
        return self.in_loop and self.rows is not None and rank == self.rows.rank

    def index(self, b: Bound) -> str:
        if b.axis is None or not self.restricted(b.rank):
            return super().index(b)
        if b.axis not in self.index_arrays:
            name = f"_{b.rank.lower()}{b.axis}"
            self.lines.append(f"{name} = _ix_range({self.rows.lo}, {self.rows.hi}, {b.axis}, {self.nd})")
            self.index_arrays[b.axis] = name
        return self.index_arrays[b.axis]

    # --- storage ----------------------------------------------------------------
    def kind(self, tensor: str) -> str:
        if tensor in self.tp.state:
            return "state"
        if self.in_loop and tensor in self.tp.local:
            return "local"
        return "global"

    def resolve(self, e: Access):
        """(array, mask, core ranks, subscripts, rows relative) of an access in the tile loop."""
        kind = self.kind(e.tensor)
        ranks = list(self.defn.tensor_ranks(e.tensor))
        subs = list(e.subscripts)
        array, mask = pyname(e.tensor), self.mask_of(e.tensor)
        if kind in ("local", "state"):
            if self.tp.loop_rank not in ranks:  # e.g. split-K's blocked loads, read at w*MT+mt
                raise NotTileable(f"{e.tensor} does not carry the loop rank {self.tp.loop_rank}")
            pos = ranks.index(self.tp.loop_rank)
            step = subs[pos]
            if kind == "state":
                nxt = step == Binary("+", Index(self.tp.loop_rank), Num(1))
                if nxt:
                    array, mask = f"{array}_next", None if mask is None else f"{mask}_next"
            elif step != Index(self.tp.loop_rank):
                raise NotTileable(f"{e.tensor} is read at another tile than the current one")
            del ranks[pos], subs[pos]
        return array, mask, ranks, subs, kind == "local"

    def access(self, e: Access, env):
        if self.kind(e.tensor) == "global" and not any(self.restricted(r) for r in free_ranks(e)):
            return super().access(e, env)
        array, mask, ranks, subs, relative = self.resolve(e)
        return self._access(array, mask, ranks, subs, env, relative)

    def view_operand(self, e: Access, env):
        if self.kind(e.tensor) == "global" and not any(self.restricted(r) for r in free_ranks(e)):
            return super().view_operand(e, env)
        array, mask, ranks, subs, relative = self.resolve(e)
        if not all(isinstance(s, Index) and s.rank == r and env[r].axis is not None
                   for s, r in zip(subs, ranks)):
            return None
        axes = tuple(env[r].axis for r in ranks)
        if len(set(axes)) != len(axes):
            return None
        if not relative:
            array, mask = self.slice_rows(array, mask, ranks)
        return array, mask, axes

    def slice_rows(self, array: str, mask: str | None, ranks) -> tuple[str, str | None]:
        """A tile-wide tensor cut to this tile's rows (its row rank sliced to lo:hi)."""
        for pos, r in enumerate(ranks):
            if self.restricted(r):
                rows = f"{pos}, {len(ranks)}, {self.rows.lo}, {self.rows.hi}"
                array = f"_rows({array}, {rows})"
                mask = None if mask is None else f"_rows({mask}, {rows})"
        return array, mask

    def _access(self, array, mask, ranks, subs, env, relative):
        plain = all(isinstance(s, Index) and s.rank == r and env[r].axis is not None
                    for s, r in zip(subs, ranks))
        axes = tuple(env[r].axis for r in ranks) if plain else ()
        if plain and len(set(axes)) == len(axes):
            if not relative:
                array, mask = self.slice_rows(array, mask, ranks)
            masks = [] if mask is None else [f"_view({mask}, {axes}, {self.nd})"]
            return f"_view({array}, {axes}, {self.nd})", masks
        codes, index_masks = [], []
        for s in subs:
            code = self.subscript(s, env, index_masks)
            if relative and any(self.restricted(r) for r in free_ranks(s)):
                code = f"({code} - {self.rows.lo})"
            codes.append(code)
        indirect = any(isinstance(n, Access) for s in subs for n in walk(s))
        return self.gather(array, mask, codes, indirect, index_masks)

    def filter_at(self, env):
        flag = self.full_flags.get(self.st.tensor) if self.in_loop else None
        if flag is None:
            return super().filter_at(env)
        if self.st.where is None or not free_ranks(self.st.where) <= set(env):
            return None
        for r in free_ranks(self.st.where):  # eager: the index arrays outlive the `if`
            if env[r].axis is not None:
                self.index(env[r])
        outer, self.lines = self.lines, []
        w = super().filter_at(env)
        inner, self.lines = self.lines, outer
        if w is None:
            return None
        self.lines.append(f"if {flag}:")
        self.lines.append(f"    {w} = None")
        self.lines.append("else:")
        self.lines += ["    " + ln for ln in inner]
        return w

    def render(self):
        env = self.lhs_env()
        nl = sum(1 for b in env.values() if b.axis is not None)
        self.assign_axes(nl)
        if self.in_loop and self.st.tensor in self.full_flags:
            for b in env.values():  # eager: the filter may be computed under an `if`
                if b.axis is not None:
                    self.index(b)
        return super().render_from(env, nl)


def _nested(fn: str, args: list[str]) -> str:
    out = args[-1]
    for a in reversed(args[:-1]):
        out = f"{fn}({a}, {out})"
    return out


def row_rank(k: Kernel) -> str | None:
    """The kernel's row rank (map-ranks) when this form can restrict a tile to the rows
    it changes: every state carries it, no body Einsum reduces over it, nothing is kept.
    Else None: every row runs every live tile (slower, as exact)."""
    tp, r = k.tiles, k.roles.row if k.roles is not None else None
    if r is None or tp.kept or any(r not in st.lhs for st in tp.inits):
        return None
    for st in tp.body:
        if any(r in red.ranks for red in walk(st.expr) if isinstance(red, Reduce)):
            return None
    return r


def _skips_tiles(bounds) -> bool:
    """Whether the bounds let a tile skip rows or masks (else rows are not restricted)."""
    return bounds is not None and bool(
        bounds.live is not None or bounds.live_probes
        or (bounds.full is not None and bounds.full_holds and not bounds.full_probes))


class BoundPrinter:
    """The ``bound-tiles`` stage's integer bounds (:mod:`attnc.einsum_ir.kernel`) as
    vectorised numpy code: one value per row (the block of one row, ``ROW_FIRST`` =
    ``ROW_LAST`` = ``_allrows``), so a tile's live rows are ``lo <= m1 < hi``.  Before →
    after::

        IMin(M1, FloorDiv(ROW_LAST + M - P, M0, 1))  ->  np.minimum(M1, (_allrows + M - P) // M0 + 1)
    """

    def __init__(self, k: Kernel):
        self.k = k

    def code(self, e) -> str:
        if isinstance(e, (IMax, IMin)):
            return _nested("np.maximum" if isinstance(e, IMax) else "np.minimum",
                           [self.code(a) for a in e.args])
        if isinstance(e, FloorDiv):  # numpy's // floors
            code = f"({self.int_code(e.num)}) // ({self.int_code(e.den)})"
            return f"({code} + {e.offset})" if e.offset else code
        if isinstance(e, CeilDiv):
            return f"(-((-({self.int_code(e.num)})) // ({self.int_code(e.den)})))"
        if isinstance(e, FloatFloor):
            trunc = f"np.trunc(({self.int_code(e.num)}) / ({self.int_code(e.den)})).astype(np.int64)"
            return f"({trunc} + {e.offset})"
        return self.int_code(e)

    def int_code(self, e: sympy.Expr) -> str:
        if e.is_Symbol:
            return self.symbol(e.name)
        if e.is_Integer:
            return str(int(e))
        if e.is_Rational or e.is_Float:
            return repr(float(e))
        if isinstance(e, (sympy.Min, sympy.Max)):  # a bound that holds on every tile or none
            return _nested("np.minimum" if isinstance(e, sympy.Min) else "np.maximum",
                           [self.int_code(a) for a in e.args])
        if e.is_Add:
            return "(" + " + ".join(self.int_code(x) for x in e.args) + ")"
        if e.is_Mul:
            return "(" + " * ".join(self.int_code(x) for x in e.args) + ")"
        raise NotTileable(f"cannot render the bound {e}")

    def symbol(self, name: str) -> str:
        if name in (ROW_FIRST, ROW_LAST):
            return "_allrows"
        if name.startswith("BLOCK_"):
            return pyname(name[len("BLOCK_"):])
        if name.startswith("param_"):
            return pyname(name[len("param_"):])
        if name.startswith("_"):
            return name[1:].lower()
        return pyname(name)


def _reindexed_away(defn: Definition, tp: TileProgram) -> bool:
    """Whether re-indexing per-tile reads changed more than a tile's index: a left side with a
    rank twice, or an output over other ranks than declared (``T0[f, f // 2, f]`` read at
    ``p = f // 2`` is not a tile).  This renderer then declines; the per-Einsum form is exact."""
    statements = list(tp.prologue) + list(tp.inits) + list(tp.body) + list(tp.epilogue)
    if any(len(set(st.lhs)) != len(st.lhs) for st in statements):
        return True
    lhs = {st.tensor: st.lhs for st in statements}
    return any(o.name in lhs and lhs[o.name] != o.ranks for o in defn.outputs)


def _local_read_outside(tp: TileProgram) -> bool:
    """Whether a statement before or after the loop reads a per-tile tensor (an init
    ``T1[0, e] = T0[e]`` of a ``T0[m]`` computed in the loop over m)."""
    outside = list(tp.prologue) + list(tp.inits) + list(tp.epilogue)
    return any(acc.tensor in tp.local for st in outside for acc in statement_reads(st))


class FusedFunctionRenderer(FunctionRenderer):
    """A kernel of the kernel IR (one loop over tiles) as a numpy function: the kernel's
    tile program with all rows held at once, its ``bound-tiles`` ranges and probes
    evaluated per row (:class:`BoundPrinter`)."""

    def __init__(self, k: Kernel):
        tp = k.tiles
        super().__init__(tp.cascade)
        if tp.loop_rank is None:
            raise NotTileable(f"{k.name} has no loop over tiles")
        if tp.kept:
            raise NotTileable(f"{sorted(tp.kept)} are read after the loop")
        if _reindexed_away(tp.cascade, tp):
            raise NotTileable("the tile program re-indexes a tensor away from its ranks")
        if _local_read_outside(tp):
            raise NotTileable("a tensor that lives for one tile is read outside the loop")
        self.kernel, self.tp = k, tp
        row = row_rank(k) if _skips_tiles(k.bounds) else None
        self.rows = Rows(row) if row else None
        self.full_flags: dict = {}
        self.bound = BoundPrinter(k)

    def shape_without(self, st, drop: str, relative: bool) -> str:
        dims = []
        for r in st.lhs:
            if r == drop:
                continue
            if relative and self.rows and r == self.rows.rank:
                dims.append(f"{self.rows.hi} - {self.rows.lo}")
            else:
                dims.append(pyname(r))
        return f"batch + {tup(dims)}" if dims else "batch"

    def statement_outside(self, st) -> list[str]:
        r = FusedStatementRenderer(self.defn, st, self.temps, self.tp, self.rows, {}, in_loop=False)
        lines, value, mask, nl = r.render()
        out = [f"# {print_statement(st)}"] + lines
        t, m = pyname(st.tensor), mask_name(st.tensor)
        if isinstance(st, IterativeEinsum):  # an init: the state without its step dimension
            shape = self.shape_without(st, st.iter_rank, False)
            out.append(f"{t}, {m} = _state({value}, {mask}, {shape}, {nl}, {r.nd}, ct)")
        else:
            out.append(f"{t}, {m} = _store({value}, {mask}, {self.shape(st, False)}, {nl}, {r.nd}, ct)")
        return out

    def statement_inside(self, st) -> list[str]:
        r = FusedStatementRenderer(self.defn, st, self.temps, self.tp, self.rows, self.full_flags)
        lines, value, mask, nl = r.render()
        out = [f"# {print_statement(st)}"] + lines
        t, m = pyname(st.tensor), mask_name(st.tensor)
        if isinstance(st, IterativeEinsum):
            pos = [x for x in st.lhs if x != st.iter_rank].index(self.rows.rank) if self.rows else 0
            rows = f"{self.rows.lo}, {self.rows.hi}" if self.rows else "0, None"
            out.append(f"_update_rows({t}_next, {m}_next, {t}, {m}, {pos}, {nl}, {rows}, "
                       f"{value}, {mask}, {r.nd})")
        else:
            shape = self.shape_without(st, self.tp.loop_rank, True)
            out.append(f"{t}, {m} = _store({value}, {mask}, {shape}, {nl}, {r.nd}, ct)")
        return out

    # --- tile skipping (the kernel's bounds, per row) --------------------------------------
    def in_range(self, rng) -> str:
        """Per row: whether this tile lies in a kernel-IR tile range."""
        m1 = self.tp.loop_rank.lower()
        lo, hi = self.bound.code(rng.lo), self.bound.code(rng.hi)
        return f"np.broadcast_to((({lo}) <= {m1}) & ({m1} < ({hi})), (_allrows.shape[0],))"

    def guard_lines(self) -> list[str]:
        """Per tile: the rows any update can change (``_lo``, ``_hi``) from the live range
        and the block-mask probes, then the full-tile flag."""
        bounds = self.kernel.bounds
        if self.rows is None or bounds is None:
            return []
        lines, terms = [], []
        if bounds.live is not None:
            terms.append(self.in_range(bounds.live))
        if bounds.live_probes:
            per_update = [" & ".join(self.probe_live(c, lines) for c in conds)
                          for conds in bounds.live_probes]
            terms.append(" | ".join(f"({t})" for t in dict.fromkeys(per_update)))
        if not terms:
            return ["_lo, _hi = 0, _allrows.shape[0]"] + self.full_flag_lines()
        lines.append("_live = " + " & ".join(f"({t})" for t in terms))
        lines.append("_lo, _hi = _row_range(_live)")
        lines.append("if _lo >= _hi:")
        lines.append("    continue")
        return lines + self.full_flag_lines()

    def probe_live(self, cond, lines: list[str]) -> str:
        """A block-mask probe of the kernel (a data-dependent guard, loads expanded): rows
        where some point of this tile satisfies it (absent reads count false)."""
        from ..einsum_ir.ir import Call, Einsum

        key = ("live", cond)
        if key in self.full_flags:
            return self.full_flags[key]
        tp = self.tp
        others = tuple(sorted(free_ranks(cond) - {tp.loop_rank, self.rows.rank, tp.tile_rank}))
        probe = Einsum("_LIVE", (tp.loop_rank, self.rows.rank),  # any grid point (a sequence b)
                       Reduce("max", (tp.tile_rank,) + others,
                              Call("select", (cond, Num(1), Num(0)))))
        r = FusedStatementRenderer(self.defn, probe, self.temps, tp, None, {}, in_loop=True)
        body, value, mask, nl = r.render()
        name = self.temps.new("live")
        lines += [f"# block mask: rows of this tile where {print_expr(cond)}"] + body
        lines.append(f"{name} = _rows_live({value}, {mask}, {nl}, {r.nd}, _allrows.shape[0])")
        self.full_flags[key] = name
        return name

    def full_flag_lines(self) -> list[str]:
        """``_full``: this tile is in the kernel's full range for the row, so the ``where``
        clauses that hold on full tiles are dropped there.  Full tiles that also need a
        data-dependent check (``full_probes``) run masked here: masks are always exact."""
        bounds = self.kernel.bounds
        if bounds.full is None or bounds.full_probes:
            return []
        loads = inline_loads(self.tp)[0]
        tensors = [st.tensor for st in self.tp.body if st.where is not None
                   and expand_loads(st.where, loads) in bounds.full_holds]
        if not tensors:
            return []
        for t in tensors:
            self.full_flags[t] = "_full"
        return [f"_full_rows = {self.in_range(bounds.full)}"]

    def segment_lines(self) -> tuple[list[str], bool]:
        """Split this tile's rows into runs where every full-flag is constant: rows whose
        filter holds on the whole tile run without it (``_full_T``), the others with it."""
        flags = list(dict.fromkeys(f for k, f in self.full_flags.items() if isinstance(k, str)))
        if not flags:
            return [], False
        names = ", ".join(flags)
        rows = ", ".join(f"{f}_rows" for f in flags)
        return [f"for _lo, _hi, ({names},) in _row_segments(_lo, _hi, {rows}):"], True

    def body(self) -> list[str]:
        tp = self.tp
        out: list[str] = []
        for st in tp.prologue + tp.inits:
            out += self.statement_outside(st) + [""]
        if self.rows:
            out.append(f"_allrows = np.arange({pyname(self.rows.rank)})")
        out.append(f"# stream {tp.stream_rank or tp.loop_rank} tile by tile")
        out.append(f"for {tp.loop_rank.lower()} in range({pyname(tp.loop_rank)}):")
        inner = self.guard_lines()
        for t in tp.state:
            inner.append(f"{pyname(t)}_next, {mask_name(t)}_next = {pyname(t)}.copy(), "
                         f"{mask_name(t)}.copy()")
        segment, split = self.segment_lines() if self.rows else ([], False)
        statements = [ln for st in tp.body for ln in self.statement_inside(st)]
        inner += segment + (["    " + ln for ln in statements] if split else statements)
        for t in tp.state:
            inner.append(f"{pyname(t)}, {mask_name(t)} = {pyname(t)}_next, {mask_name(t)}_next")
        out += ["    " + ln for ln in inner] + [""]
        for st in tp.epilogue:
            out += self.statement_outside(st) + [""]
        return out
