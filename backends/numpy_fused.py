"""The fused numpy form: a tile program rendered as one loop over key tiles.

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
from ..einsum_ir.printer import print_statement
from ..einsum_ir.schedule import statement_reads
from ..passes.tile import Guard, NotTileable, TileProgram, atom_bound, conjunctions
from .numpy_backend import (Bound, FunctionRenderer, StatementRenderer, mask_name, pyname,
                            size_code, tup)


def guard_code(e: sympy.Expr, names: dict[str, str]) -> str:
    """A sympy bound as vectorised numpy code (index symbols ``_R`` renamed by ``names``)."""
    def symbol(name: str) -> str:
        if name.startswith("_"):
            return names[name[1:]]
        return pyname(name[len("param_"):] if name.startswith("param_") else name)
    try:
        return size_code(e, False, "np", vector=True, symbol=symbol)
    except NotImplementedError as err:
        raise NotTileable(f"cannot render the bound {e}") from err


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


def _row_rank_usable(tp: TileProgram) -> str | None:
    """The row rank, if every state tensor has it and no body Einsum reduces over it."""
    r = tp.row_rank
    if r is None or tp.kept:
        return None
    for st in tp.inits:
        if r not in st.lhs:
            return None
    for st in tp.body:
        if any(r in red.ranks for red in walk(st.expr) if isinstance(red, Reduce)):
            return None
    return r


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
    """A definition's function in the fused tile-loop form."""

    def __init__(self, defn: Definition, tp: TileProgram):
        super().__init__(defn)
        if tp.kept:
            raise NotTileable(f"{sorted(tp.kept)} are read after the loop")
        if _reindexed_away(defn, tp):
            raise NotTileable("the tile program re-indexes a tensor away from its ranks")
        if _local_read_outside(tp):
            raise NotTileable("a tensor that lives for one tile is read outside the loop")
        self.tp = tp
        self.rows = Rows(_row_rank_usable(tp)) if _row_rank_usable(tp) else None
        self.full_flags: dict[str, str] = {}

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

    # --- tile skipping -------------------------------------------------------------
    def bounds(self, g: Guard) -> list[list] | None:
        """Per conjunction of ``g``: affine bounds of the tile rank, or None if not affine."""
        dnf = conjunctions(g.cond)
        known = {self.tp.loop_rank, self.tp.tile_rank} | ({self.rows.rank} if self.rows else set())
        if dnf is None or self.tp.tile_rank is None or not free_ranks(g.cond) <= known:
            return None
        out = []
        for conj in dnf:
            bounds = []
            for atom in conj:
                b = atom_bound(atom, self.tp.tile_rank) if isinstance(atom, Binary) else None
                if b is None or isinstance(b, bool):
                    return None
                bounds.append(b)
            out.append(bounds)
        return out

    def names(self) -> dict[str, str]:
        names = {self.tp.loop_rank: self.tp.loop_rank.lower()}
        if self.rows:
            names[self.rows.rank] = "_allrows"
        return names

    def interval_code(self, bounds) -> tuple[str, str]:
        """Code for (lowest, highest) tile index a conjunction allows, per row."""
        lows = [guard_code(b.value, self.names()) for b in bounds if b.lower]
        highs = [guard_code(b.value, self.names()) for b in bounds if not b.lower]
        return _nested("np.maximum", ["0"] + lows), _nested("np.minimum", [str(self.tp.tile_size - 1)] + highs)

    def guard_lines(self) -> list[str]:
        """Per tile: the rows any update can change (``_lo``, ``_hi``), and full-tile flags."""
        tp = self.tp
        if self.rows is None:
            return []
        everything = ["_lo, _hi = 0, _allrows.shape[0]"]
        if tp.tile_size is None:
            return everything
        lines = []
        live_terms = []
        for tensor, guards in tp.guards:
            some_terms = []
            for g in guards:
                if tp.tile_rank not in g.exists:
                    continue
                conj = self.bounds(g)
                if conj is None:
                    data = self.data_dependent_live(g, lines)
                    if data is not None:
                        some_terms.append(data)
                    continue
                parts = []
                for bounds in conj:
                    lo, hi = self.interval_code(bounds)
                    parts.append(f"(({lo}) <= ({hi}))")
                some_terms.append(" | ".join(parts))
            if not some_terms:
                return everything  # an update that may always be computed: no row is skippable
            live_terms.append(" & ".join(f"({t})" for t in dict.fromkeys(some_terms)))
        live = " | ".join(f"({t})" for t in dict.fromkeys(live_terms))
        lines.append(f"_live = np.broadcast_to({live}, (_allrows.shape[0],))")
        lines.append("_lo, _hi = _row_range(_live)")
        lines.append("if _lo >= _hi:")
        lines.append("    continue")
        lines += self.full_flag_lines()
        return lines

    def data_dependent_live(self, g: Guard, lines: list[str]) -> str | None:
        """The block mask of a data-dependent guard for this tile: rows where some point of
        the tile satisfies it (evaluated on the rows × tile grid, absent reads count false)."""
        from ..passes.tile_loads import expand_loads as _expand_loads, inline_loads as _inline_loads

        tp = self.tp
        if not free_ranks(g.cond) <= {tp.loop_rank, tp.tile_rank, self.rows.rank}:
            return None
        cond = _expand_loads(g.cond, _inline_loads(tp)[0])  # blocked copies read at the source
        if any(isinstance(n, Access) and n.tensor in tp.local | set(tp.state) for n in walk(cond)):
            return None
        g = Guard(cond, g.exists)
        key = ("live", g.cond)
        if key in self.full_flags:
            return self.full_flags[key]
        from ..einsum_ir.ir import Call, Einsum, Reduce

        probe = Einsum("_LIVE", (tp.loop_rank, self.rows.rank),
                       Reduce("max", (tp.tile_rank,), Call("select", (g.cond, Num(1), Num(0)))))
        r = FusedStatementRenderer(self.defn, probe, self.temps, tp, None, {}, in_loop=True)
        body, value, mask, nl = r.render()
        name = self.temps.new("live")
        lines += [f"# block mask: rows of this tile where {g}"] + body
        lines.append(f"{name} = _rows_live({value}, {mask}, {nl}, {r.nd}, _allrows.shape[0])")
        self.full_flags[key] = name
        return name

    def full_flag_lines(self) -> list[str]:
        """``_full_T``: statement T's where holds at every point of this tile's rows."""
        lines = []
        for st in self.tp.body:
            if st.where is None or self.tp.tile_rank not in free_ranks(st.where):
                continue
            conj = self.bounds(Guard(st.where, frozenset({self.tp.tile_rank})))
            if conj is None or len(conj) != 1:
                continue
            lo, hi = self.interval_code(conj[0])
            flag = f"_full_{pyname(st.tensor)}"
            lines.append(f"{flag}_rows = np.broadcast_to(np.logical_and(({lo}) <= 0, "
                         f"({hi}) >= {self.tp.tile_size - 1}), (_allrows.shape[0],))")
            self.full_flags[st.tensor] = flag
        return lines

    def segment_lines(self) -> tuple[list[str], bool]:
        """Split this tile's rows into runs where every full-flag is constant: rows whose
        filter holds on the whole tile run without it (``_full_T``), the others with it."""
        flags = [f for k, f in self.full_flags.items() if isinstance(k, str)]
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
