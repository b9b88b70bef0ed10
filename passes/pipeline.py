"""The compiler's pipeline: one list of named stages, each ``Definition -> Definition``.

The CLI prints after or stops at any stage, and ``attnc report`` shows every
stage's analysis.  Registries list their valid choices when given a bad name.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from ..einsum_ir.ir import Definition, Module
from .canonicalize import canonicalize
from .chunked import chunked
from .costs import form_cost
from .defer_normalization import defer_normalization
from .online import online
from .passcount import raises_bound
from .reassociate import DEFAULT_TILE, assumed_sizes, reassociate
from .split_k import split_k, split_k_blockers, stream_k
from .stream_final import stream_final

Pass = Callable[[Definition], Definition]


@dataclass(frozen=True)
class Stage:
    name: str
    run: Pass
    doc: str
    options: tuple[str, ...] = ()  # keyword options the pass accepts (e.g. "tile")

    def __call__(self, defn: Definition, options: dict | None = None) -> Definition:
        kwargs = {k: v for k, v in (options or {}).items() if k in self.options and v is not None}
        return self.run(defn, **kwargs)


PASSES: dict[str, Stage] = {
    "canonicalize": Stage("canonicalize", canonicalize, "one reduction per Einsum, at its root"),
    "defer-normalization": Stage("defer-normalization", defer_normalization,
                                 "move reduction-invariant normalizers out of reductions"),
    "chunked": Stage("chunked", chunked,
                     "causal sums with an associative state: chunks and a state scan", ("sizes",)),
    "reassociate": Stage("reassociate", lambda d, sizes=None, tile=DEFAULT_TILE:
                         reassociate_or_chunk(d, sizes, tile),
                         "cheapest contraction order of softmax-free chains (causal ones with an "
                         "associative state: their chunked form, when cheaper)", ("sizes", "tile")),
    "online": Stage("online", online, "derive the one-pass (online softmax) cascade", ("tile",)),
    "stream-final": Stage("stream-final", stream_final,
                          "fold post-loop sums that read a running max's final value into the loop"),
    "split-k": Stage("split-k", lambda d, workers=2: _when_splittable(split_k, d, workers),
                     "split the streamed loop over workers, merge with the derived combine",
                     ("workers",)),
    "stream-k": Stage("stream-k", lambda d, workers=2: _when_splittable(stream_k, d, workers),
                      "balanced shares of the (unit, tile) space over workers", ("workers",)),
}

DEFAULT_PIPELINE: tuple[str, ...] = ("canonicalize", "defer-normalization", "reassociate", "online",
                                     "stream-final")


def reassociate_or_chunk(defn: Definition, sizes: dict[str, int] | None = None,
                         tile: int = DEFAULT_TILE) -> Definition:
    """The cheaper, by ``costs.form_cost`` at the assumed sizes, of ``reassociate`` and
    ``reassociate`` after ``chunked``.  One stage, so that a target that cannot take the
    chunked form falls back to the form without ``reassociate``, as for any form it chose
    (``backends.choose_form``).  The two candidates for retention at M = P = 4096, E = F =
    64 (``form_cost``: FLOPs + ``STEP_FLOPS`` per step)::

        reassociate:            O[p,f] = sum[m](QK1[p,m] * V[m,f])              4.4e9
        reassociate(chunked):   SKV[m1+1,e,f] = ... + LKV[m1,e,f]  (C = 32)     1.25e8  kept
    """
    plain = reassociate(defn, sizes, tile=tile)
    chunked_form = chunked(defn, sizes)
    if chunked_form == canonicalize(defn):
        return plain
    chunked_form = reassociate(chunked_form, sizes, tile=tile)
    assumed = assumed_sizes(defn, sizes)
    return chunked_form if form_cost(chunked_form, assumed) < form_cost(plain, assumed) else plain


def _when_splittable(split, defn: Definition, workers: int) -> Definition:
    """Split definitions whose loop has a derivable combine; leave the others as they are."""
    return defn if split_k_blockers(defn) else split(defn, workers)


def resolve(names: list[str] | tuple[str, ...] | None) -> list[Stage]:
    """Stages by name; a ValueError lists the valid choices."""
    names = DEFAULT_PIPELINE if names is None else names
    unknown = [n for n in names if n not in PASSES]
    if unknown:
        raise ValueError(f"unknown pass {unknown[0]!r}; valid passes are "
                         + ", ".join(sorted(PASSES)))
    return [PASSES[n] for n in names]


def options_for(options: dict | None, name: str) -> dict:
    """``options`` for definition ``name``: its own tile where ``options["tiles"]`` names
    one (a backward stage's narrower key tile, see ``backends.backward_tiles``)."""
    options = dict(options or {})
    tile = options.get("tiles", {}).get(name)
    if tile is not None:
        options["tile"] = tile
    return options


def apply(stage: Stage, module: Module, options: dict | None = None) -> Module:
    return dataclasses.replace(module, definitions=tuple(bounded(stage, d, options)
                                                         for d in module.definitions))


def bounded(stage: Stage, defn: Definition, options: dict | None = None) -> Definition:
    """The stage's result, or its input when the result needs more passes than the input
    (no stage raises a bound it was given).  Before → after (cosine attention: dividing
    by the norms before ``Q·K`` re-reads the normalised rows over ``e``)::

        reassociate: pass bound 1 -> 2     =>   reassociate keeps its input (bound 1)
    """
    out = stage(defn, options_for(options, defn.name))
    if out == defn or raises_bound(defn, out):
        return defn
    return out


def run_pipeline(module: Module, names=None, stop_after: str | None = None,
                 after_each: Callable[[str, Module], None] | None = None,
                 options: dict | None = None) -> list[tuple[str, Module]]:
    """Run the stages in order; returns ``[("input", module), (stage, result), ...]``."""
    stages = resolve(names)
    if stop_after is not None and stop_after not in [s.name for s in stages]:
        raise ValueError(f"--stop-after {stop_after!r} is not in the pipeline "
                         f"({', '.join(s.name for s in stages)})")
    results = [("input", module)]
    for stage in stages:
        module = apply(stage, module, options)
        results.append((stage.name, module))
        if after_each is not None:
            after_each(stage.name, module)
        if stage.name == stop_after:
            break
    return results
