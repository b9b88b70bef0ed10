"""Backends: a registry of code generators, atomic output, loading generated modules."""
from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # annotations only: load_generated and write_atomic need no sympy
    from ..einsum_ir.ir import Module


@dataclass(frozen=True)
class Backend:
    name: str
    # (module, stem, fused=True) -> {filename: text}; a numpy-runtime backend also gets
    # sources=, options=, after_lowering= (it lowers each definition itself)
    render: Callable[..., dict[str, str]]
    doc: str
    tile: int = 64  # default tile of the streamed rank (the online pass's option)
    runtime: str = "numpy"  # what the generated functions take: numpy arrays or torch tensors


def _numpy(module: Module, stem: str, fused: bool = True, sources: Module | None = None,
           options: dict | None = None, after_lowering=None) -> dict[str, str]:
    from .numpy_backend import render_module

    return {f"{stem}.py": render_module(module, f"{stem}.attn", fused=fused, sources=sources,
                                        options=options, after_lowering=after_lowering)}


def _triton(module: Module, stem: str, fused: bool = True) -> dict[str, str]:
    from .triton_backend import render_module

    return {f"{stem}.py": render_module(module, f"{stem}.attn")}


def _cuda(module: Module, stem: str, fused: bool = True) -> dict[str, str]:
    from .cuda_backend import render_files

    return render_files(module, stem)


BACKENDS: dict[str, Backend] = {
    # numpy pays a Python iteration per tile: bigger tiles amortise it (bench/cpu.py)
    "numpy": Backend("numpy", _numpy, "plain numpy module (fused tile loop where possible)", 256),
    "triton": Backend("triton", _triton, "Triton kernels and torch launchers", runtime="torch"),
    "cuda": Backend("cuda", _cuda, "CUDA C++ kernels (WMMA) and a torch launcher", runtime="torch"),
}


def compile_module(module: Module, backend: str, stem: str, names=None, options=None,
                   stop_after=None, after_each=None, fused: bool = True, after_lowering=None,
                   backward: bool = False, choose_form_for: frozenset = frozenset()):
    """Run the cascade pipeline, lower to the kernel IR (kernel backends) and render;
    returns (stages, files).  ``after_lowering(stage, program)`` sees every lowering stage.
    ``backward``: each definition's backward program too (``NAME_backward``; torch
    backends make ``NAME`` differentiable), see :mod:`attnc.backends.backward_chain`.
    ``choose_form_for``: definitions (numpy) that take the form without ``reassociate``
    when only that one has a kernel program (the backward stages, as :func:`choose_form`
    does for every definition on kernel targets)."""
    if backward:
        return _compile_with_backward(module, backend, stem, names, options, stop_after,
                                      after_each, fused, after_lowering)
    from ..passes.pipeline import run_pipeline

    chosen = get_backend(backend)
    options = dict(options or {})
    if options.get("tile") is None:
        options["tile"] = chosen.tile
    stages = run_pipeline(module, names, stop_after, after_each, options)
    if chosen.runtime == "numpy":  # lowered per definition; the per-Einsum form takes the rest
        final, sources = stages[-1][1], _before_online(stages)
        if choose_form_for and fused and names is None and stop_after is None:
            final, sources = _numpy_forms(module, final, sources, choose_form_for, options)
        return stages, chosen.render(final, stem, fused=fused, options=options,
                                     sources=sources, after_lowering=after_lowering)
    render = lambda kernels: chosen.render(kernels, stem, fused=fused)  # noqa: E731
    stages, (_, files) = choose_form(module, stages, backend, options, names, after_each,
                                     after_lowering, render)
    return stages, files


def _numpy_forms(module: Module, final: Module, sources: Module | None, which: frozenset,
                 options: dict):
    """``final`` and ``sources`` with each definition in ``which`` that has no numpy kernel
    program in its reassociated form replaced by its form without ``reassociate``, when
    that one has (a backward stage's per-row parts: ``sum[m,e](dQK * Q * K)`` reassociated
    to ``dQK_1K[p,e]`` then a row sum does not stream; the plain form does)."""
    import dataclasses

    from ..einsum_ir.ir import Module
    from ..passes.lowering import TARGETS, lower
    from ..passes.pipeline import run_pipeline
    from ..passes.tile import NotTileable

    def lowers(d, src) -> bool:
        try:
            lower(d, TARGETS["numpy"], dict(options), src)
            return True
        except NotTileable:
            return False

    fallback = _without_reassociate()
    defs, srcs = list(final.definitions), list(sources.definitions) if sources else None
    for i, d in enumerate(defs):
        if d.name not in which or lowers(d, sources[d.name] if sources else None):
            continue
        alt = run_pipeline(Module((module[d.name],)), fallback, None, None, options)
        alt_final, alt_source = alt[-1][1].definitions[0], _before_online(alt)
        alt_source = alt_source.definitions[0] if alt_source is not None else None
        if lowers(alt_final, alt_source):
            defs[i] = alt_final
            if srcs is not None:
                srcs = [alt_source if s.name == d.name and alt_source is not None else s
                        for s in srcs]
    final = dataclasses.replace(final, definitions=tuple(defs))
    if srcs is not None:
        sources = dataclasses.replace(sources, definitions=tuple(srcs))
    return final, sources


def _compile_with_backward(module, backend, stem, names, options, stop_after, after_each,
                           fused, after_lowering):
    """The module, its definitions' backward stages, and the chain functions appended to
    the generated Python file."""
    from ..passes.tile import NotTileable
    from .backward_chain import programs_for, render_chains, with_stages

    chosen = get_backend(backend)
    stage_options = dict(options or {})
    if stage_options.get("tile") is None:
        stage_options["tile"] = chosen.tile
    programs = programs_for(module, backend, stage_options)
    stage_names = frozenset(s.name for p in programs for s in p.stages)
    staged = with_stages(module, programs)
    tiles = backward_tiles(module, programs, backend, options)
    try:
        stages, files = compile_module(staged, backend, stem, names,
                                       dict(options or {}, tiles=tiles) if tiles else options,
                                       stop_after, after_each, fused, after_lowering,
                                       choose_form_for=stage_names)
    except NotTileable:
        if not tiles:
            raise
        stages, files = compile_module(staged, backend, stem, names, options, stop_after,
                                       after_each, fused, after_lowering,
                                       choose_form_for=stage_names)
    files = dict(files)
    files[f"{stem}.py"] += render_chains(module, programs, chosen.runtime)
    return stages, files


BACKWARD_TILE = 32  # the key (or query) tile of a backward stage on Triton


def backward_tiles(module: Module, programs, backend: str, options: dict | None
                   ) -> dict[str, int]:
    """Stage name -> its tile: on Triton, when the caller chose none, every backward stage
    that makes gradients streams tiles of 32, as FlashAttention-2's and Triton's tutorial
    backward kernels do (their row carries two head dims of state and four tile products:
    at 64, ``attnc kernels --grad`` counts 536 bytes of spills in causal's dK/dV stage and
    120 in its dQ stage; at 32, 88 and 16).  A stage of the forward's statistics alone
    keeps the forward's tile.  Empty when nothing changes."""
    from ..passes.canonicalize import canonicalize

    if backend != "triton" or (options or {}).get("tile") is not None:
        return {}
    tiles = {}
    for d, program in zip(module.definitions, programs):
        forward = {st.tensor for st in canonicalize(d).statements}
        for stage in program.stages:
            if not all(o.name in forward for o in stage.outputs):
                tiles[stage.name] = BACKWARD_TILE
    return tiles


def choose_form(module: Module, stages, backend: str, options: dict, names=None,
                after_each=None, after_lowering=None, render=None):
    """(stages, kernel module): the pipeline's result lowered for ``backend``.  When the
    target cannot take the form the default pipeline's cost-based ``reassociate`` chose
    (a contraction order no kernel program of its holds, or one its renderer declines:
    the chunked form's per-row gathers on CUDA), the form without it is lowered instead
    — a visible choice: the programs' notes and ``--print-after-all`` say why, and the
    stages returned are the ones compiled.  With ``render``, the result is
    ``(kernels, render(kernels))``."""
    from ..passes.pipeline import run_pipeline
    from ..passes.tile import NotTileable

    def done(kernels):
        return kernels if render is None else (kernels, render(kernels))

    try:
        return stages, done(lower_stages(stages, backend, options, after_lowering))
    except NotTileable as err:
        ran = [n for n, _ in stages]
        if names is not None or "reassociate" not in ran:
            raise
        why = str(err)
    note = (f"the {backend} target cannot take the reassociated form ({why}); "
            f"compiling the cascade without 'reassociate'")
    if after_lowering is not None:
        after_lowering("choose-form", note)
    fallback = _without_reassociate()
    stages = run_pipeline(module, fallback, None, after_each, options)
    kernels = lower_stages(stages, backend, options, after_lowering)
    return stages, done(_with_note(kernels, note))


def _without_reassociate() -> list[str]:
    """The default pipeline without ``reassociate``: the form a target falls back to."""
    from ..passes.pipeline import DEFAULT_PIPELINE

    return [n for n in DEFAULT_PIPELINE if n != "reassociate"]


def _with_note(kernels, note: str):
    import dataclasses

    return dataclasses.replace(kernels, programs=tuple(
        dataclasses.replace(p, notes=(note,) + p.notes) for p in kernels.programs))


def lower_stages(stages, backend: str, options: dict, after_each=None, stop_after=None):
    """The kernel module of a pipeline's result for ``backend``'s target.  The cascade
    that entered ``online`` (when it ran) is what a multi-kernel program partitions."""
    from ..passes.lowering import TARGETS, lower_module

    return lower_module(stages[-1][1], TARGETS[backend], options, _before_online(stages),
                        after_each, stop_after)


def _before_online(stages) -> Module | None:
    """The cascade that entered ``online``, when it ran (what a multi-kernel program
    partitions)."""
    names = [n for n, _ in stages]
    return stages[names.index("online") - 1][1] if "online" in names else None


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; valid backends are {', '.join(sorted(BACKENDS))}")
    return BACKENDS[name]


def write_atomic(path: Path, text: str) -> None:
    """Write, then rename: readers never see a half-written file.  The file gets the mode
    the user's umask gives a new file (mkstemp's own is 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0o022)
        os.umask(umask)  # reading the umask means setting it: put it straight back
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "w", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_generated(path: Path, name: str | None = None) -> ModuleType:
    """Import a generated module from its file (without touching sys.path)."""
    name = name or f"attnc_generated_{path.stem}_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
