"""The lowering pipeline: cascade → kernel program, one list of named stages.

After the cascade stages (:mod:`attnc.passes.pipeline`) a definition is lowered, for one
target, through::

    tile         the tile program(s): one loop over the streamed rank, or several kernels
                 with buffers between them when one loop cannot hold the cascade
    map-ranks    grid / row / vector roles of every rank; GQA/MQA head packing
    bound-tiles  skipped / partial / full tile ranges from the guards
    variants     streamed, split-K and stream-K, each a list of kernels

Each stage is ``Program -> Program`` (``tile`` starts from the cascade) and the verifier
(:func:`attnc.einsum_ir.kernel.verify`) runs after every one.  What differs between
targets is asked of the target (:class:`Target`, a capability query), never decided in a
backend: a target that cannot take a form gets another one, and the program's notes
say which and why (``--print-after-all`` and ``--emit kernel`` show them).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from ..einsum_ir.exprs import free_ranks, walk
from ..einsum_ir.ir import Access, Definition, Index, Module
from ..einsum_ir.kernel import KernelModule, Program, Variant, verify
from .tile import NotTileable
from .bound_tiles import bound_tiles
from .map_ranks import map_ranks
from .multikernel import tile_stage
from .variants import build_variants


@dataclass(frozen=True)
class Target:
    """What a backend can take.  ``packs_heads``: GQA/MQA query heads share a program's
    rows; ``multi_kernel``: programs of several kernels with buffers between them;
    ``variants``: which launch variants it renders."""

    name: str
    packs_heads: bool = True
    multi_kernel: bool = True
    variants: tuple[str, ...] = ("streamed", "split-k", "stream-k")
    pow2_tiles: bool = False      # a streamed tile's size must be a power of two
    wide_gathers: bool = True     # an input read over three of a program's block ranks
    scalar_grid: bool = True      # a program's grid indices are scalars (bounds may read L[b])

    def roles_blocker(self, k) -> str | None:
        """Why this target cannot hold kernel ``k``'s blocks (after map-ranks), or None:
        CUDA stages operands in shared memory, so an input gathered over three block ranks
        (the chunked form's ``K[(p + D) // M0 * M0 + m0, e]``: rows × chunk × head dim)
        does not fit at useful head dims."""
        if self.wide_gathers or k.roles is None:
            return None
        blocks = set(k.roles.vector) - ({k.roles.tile} if k.roles.tile else set())
        inputs = {a.name for a in k.cascade.tensor_args}
        for st in (*k.tiles.prologue, *k.tiles.inits, *k.tiles.body, *k.tiles.epilogue):
            for n in walk(st.expr):
                if isinstance(n, Access) and n.tensor in inputs:
                    held = set().union(*(free_ranks(x) for x in n.subscripts)) & blocks
                    if len(held) >= 3 and not all(isinstance(x, Index) for x in n.subscripts):
                        return (f"{k.name} gathers {n.tensor} over {len(held)} block ranks "
                                f"({', '.join(sorted(held))}), more than {self.name}'s shared "
                                f"tiles hold")
        return None

    def tile_blocker(self, k) -> str | None:
        """Why this target cannot run kernel ``k``'s tiles, or None."""
        n = k.tiles.tile_size
        if self.pow2_tiles and n is not None and n & (n - 1):
            return (f"the tile {k.tiles.tile_rank} = {n} is not a power of two, which "
                    f"{self.name} blocks need (write a power of two, or let the online pass "
                    f"tile: --tile N)")
        return None


TARGETS: dict[str, Target] = {
    "numpy": Target("numpy", packs_heads=False, variants=("streamed",), scalar_grid=False),
    "triton": Target("triton", pow2_tiles=True),
    "cuda": Target("cuda", packs_heads=False, wide_gathers=False),
}

LOWERING_STAGES: tuple[str, ...] = ("tile", "map-ranks", "bound-tiles", "variants")


def _variants(p: Program, target: Target, options: dict) -> Program:
    """A one-loop program gets each variant the target renders; each part of a
    multi-kernel program gets its own (a part that reduces the keys into a small buffer
    splits over workers like decode does); a loop-less kernel runs as it is."""
    if p.parts:
        parts = tuple(_variants(q, target, options) for q in p.parts)
        return dataclasses.replace(p, parts=parts, kernels=tuple(k for q in parts for k in q.kernels))
    if len(p.kernels) != 1 or p.kernels[0].role != "streamed":
        return dataclasses.replace(p, variants=(Variant("streamed", tuple(k.name for k in p.kernels)),))
    full = build_variants(p.cascade, target.packs_heads, options.get("workers") or 2, p.kernels[0])
    keep = {v.kind for v in full.variants} & set(target.variants)
    variants = tuple(v for v in full.variants if v.kind in keep)
    used = {k for v in variants for k in v.kernels}
    kernels = tuple(k for k in full.kernels if k.name in used)
    written = {b.name for k in kernels for b in k.writes}
    buffers = tuple(b for b in full.buffers if b.kind != "workspace" or b.name in written)
    return dataclasses.replace(full, kernels=kernels, variants=variants, buffers=buffers,
                               notes=p.notes + full.notes)


def lower(defn: Definition, target: Target, options: dict | None = None,
          source: Definition | None = None,
          after_each: Callable[[str, Program], None] | None = None,
          stop_after: str | None = None) -> Program:
    """Lower one optimised definition to a kernel program for ``target``.  ``source`` is
    the cascade before the ``online`` pass, which a multi-kernel program re-partitions."""
    from .pipeline import options_for

    options = options_for(options, defn.name)
    steps: list[tuple[str, Callable[[Program], Program]]] = [
        ("map-ranks", lambda p: map_ranks(p, target.packs_heads)),
        ("bound-tiles", lambda p: bound_tiles(p, target.scalar_grid)),
        ("variants", lambda p: _variants(p, target, options)),
    ]
    program = verify(tile_stage(defn, source, target, options), "tile")
    for q in program.parts or (program,):
        if not q.cascade.tensor_args:
            raise NotTileable(f"{defn.name}: the kernel program {q.name} reads no tensor (its "
                              f"values come from sizes alone), so no device to launch it on")
    for k in program.kernels:
        why = target.tile_blocker(k)
        if why:
            raise NotTileable(f"{defn.name}: {why}")
    if after_each:
        after_each("tile", program)
    if stop_after == "tile":
        return program
    for name, run in steps:
        program = verify(run(program), name)
        if name == "map-ranks":
            for k in program.kernels:
                why = target.roles_blocker(k)
                if why:
                    raise NotTileable(f"{defn.name}: {why}")
        if after_each:
            after_each(name, program)
        if stop_after == name:
            break
    return program


def lower_module(module: Module, target: Target, options: dict | None = None,
                 sources: Module | None = None, after_each=None, stop_after=None) -> KernelModule:
    """Every definition of ``module`` (``sources``: the same definitions before ``online``)."""
    programs = []
    for d in module.definitions:
        src = sources[d.name] if sources is not None else None
        programs.append(lower(d, target, options, src, after_each, stop_after))
    return KernelModule(tuple(programs))
