"""The Python API: ``attnc.compile(spec, backend=...)`` and ``attnc.load(path)``.

``compile`` parses a spec (its text or a path), runs the pipeline, renders the backend's
files into a cache folder keyed by content (spec text, backend, options, name and the
compiler's own version and sources) and returns the imported module: its functions by
definition name, plus ``spec``, ``stages``, ``ir``, ``kernels``, ``report``, ``path`` and
``files`` (computed on first use when the module came from the cache).  A second
``compile`` of the same content in the same process returns the same module object.

A mistake in the spec raises :class:`SpecError` (its message is every located error of
the phase: ``file:line:col``, the source line, a caret); a bad option raises ``TypeError``
or ``ValueError`` naming the option and the valid choices.  Nothing here calls sys.exit.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import types
from dataclasses import asdict, dataclass
from pathlib import Path

import re
from typing import TYPE_CHECKING

from .. import __version__
from ..backends import load_generated, write_atomic
from ..einsum_ir.diagnostics import Diagnostic, SpecError, SpecWarning
from . import parse
from .progress import status

if TYPE_CHECKING:
    from ..einsum_ir.ir import Module

__all__ = ["compile", "load", "CompileOptions", "CompiledModule", "cache_dir", "SpecError", "SpecWarning"]

META = "attnc.json"  # written last: a cache folder with it is complete


@dataclass(frozen=True)
class CompileOptions:
    """What ``compile`` accepts besides the spec and the backend (validated here)."""

    passes: tuple[str, ...] | None = None  # the pipeline's passes (default: all)
    stop_after: str | None = None  # stop after this pass
    tile: int | None = None  # tile of the streamed rank (default: the backend's)
    workers: int | None = None  # workers of split-k / stream-k
    sizes: tuple[tuple[str, int], ...] = ()  # size assumptions for cost decisions
    fused: bool = True  # False: the per-Einsum form (numpy), like -O0
    grad: bool = False  # NAME_backward too (the backward program); torch: NAME differentiable

    @classmethod
    def of(cls, given: dict) -> "CompileOptions":
        unknown = sorted(set(given) - set(cls.__dataclass_fields__))
        if unknown:
            raise TypeError(f"unknown option {unknown[0]!r}; valid options are "
                            + ", ".join(cls.__dataclass_fields__))
        opts = dict(given)
        if isinstance(opts.get("passes"), str):
            opts["passes"] = [p.strip() for p in opts["passes"].split(",") if p.strip()]
        if opts.get("passes") is not None:
            opts["passes"] = tuple(opts["passes"])
        opts["sizes"] = tuple(sorted(dict(opts.get("sizes") or ()).items()))
        return cls(**opts)

    def validate(self) -> None:
        """Values against the registries (a cached compile was validated when it was built)."""
        from ..passes.lowering import LOWERING_STAGES
        from ..passes.pipeline import resolve

        stages = [s.name for s in resolve(list(self.passes) if self.passes is not None else None)]
        if self.stop_after is not None and self.stop_after not in stages:
            raise ValueError(f"stop_after={self.stop_after!r} is not in the pipeline "
                             f"({', '.join(stages)})" + (
                                 "; lowering stages print with `attnc compile --emit kernel`"
                                 if self.stop_after in LOWERING_STAGES else ""))
        for field in ("tile", "workers"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < 1):
                raise ValueError(f"option {field}={value!r}: expected a positive integer")
        for rank, n in self.sizes:
            if not isinstance(rank, str) or not isinstance(n, int) or n < 0:
                raise ValueError(f"option sizes: expected rank names to whole numbers, "
                                 f"got {rank!r}: {n!r}")

    def pipeline(self) -> tuple[list[str] | None, dict]:
        """(pass names, pass options) as ``compile_module`` takes them."""
        names = list(self.passes) if self.passes is not None else None
        if not self.fused and names is None:
            names = ["canonicalize"]
        options = {"tile": self.tile, "workers": self.workers}
        sizes = {k: v for k, v in self.sizes if v > 0}
        if sizes:
            options["sizes"] = sizes
        return names, options


def cache_dir() -> Path:
    """``$ATTNC_CACHE_DIR``, else ``$XDG_CACHE_HOME/attnc``, else ``~/.cache/attnc``."""
    if os.environ.get("ATTNC_CACHE_DIR"):
        return Path(os.environ["ATTNC_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "attnc"


def compile(spec, backend: str = "numpy", *, name: str | None = None,
            cache: str | os.PathLike | None = None, progress: bool | None = None,
            **options) -> "CompiledModule":
    """Compile a spec (its text, or the path of a ``.attn`` file) and import the result.

    ``backend``: numpy, triton or cuda.  ``name``: the generated module's file stem
    (default: the spec file's stem, or the first definition's name).  ``cache``: the
    cache folder (default :func:`cache_dir`).  ``progress``: a status line on stderr
    (default: when stderr is a terminal).  ``options``: see :class:`CompileOptions`.
    """
    opts = CompileOptions.of(options)
    text, filename = _spec_text(spec)
    stem = name or (Path(filename).stem if filename != "<string>" else _first_name(text))
    if not stem or Path(stem).name != stem or stem.startswith("."):
        raise ValueError(f"name {stem!r}: the generated module's file stem must be a plain "
                         f"file name")
    key = content_key(text, backend, stem, opts)
    folder = Path(cache or cache_dir()) / f"{stem}-{key[:16]}"
    if (folder / META).is_file():  # built (and so validated) before: no parsing, no sympy
        return _load(folder, stem, _Context(text, filename, backend, opts, None, None))
    from ..backends import get_backend

    get_backend(backend)
    opts.validate()
    module = parse(text, filename)
    stages = _build(module, backend, stem, opts, folder, filename, text, progress)
    return _load(folder, stem, _Context(text, filename, backend, opts, module, stages))


def load(path: str | os.PathLike) -> types.ModuleType:
    """Import a generated module (``attnc compile -o DIR`` wrote ``DIR/<stem>.py``).  From a
    cache folder of :func:`compile`, the result has ``compile``'s attributes too."""
    path = Path(path)
    if path.suffix == ".attn":
        raise ValueError(f"{path} is a spec: compile it with attnc.compile({str(path)!r})")
    if not path.is_file():
        raise FileNotFoundError(f"no generated module at {path}")
    meta = path.parent / META
    if meta.is_file():
        info = json.loads(meta.read_text())
        if info.get("module") == path.name:
            opts = CompileOptions.of({k: v for k, v in info["options"].items()})
            ctx = _Context(info["source"], info["filename"], info["backend"], opts, None, None)
            return _load(path.parent, path.stem, ctx)
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    return load_generated(path.resolve(), f"attnc_loaded_{path.stem}_{digest}")


@functools.cache
def compiler_digest() -> str:
    """The version and a digest of the compiler's own sources: a cache entry is stale when
    attnc changes, released or not (an editable checkout changes without a new version)."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256(__version__.encode())
    for folder in ("frontends", "einsum_ir", "passes", "backends", "templates"):
        for f in sorted((root / folder).rglob("*")):
            if f.suffix in (".py", ".jinja", ".lark") and f.is_file():
                h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def content_key(text: str, backend: str, stem: str, opts: CompileOptions) -> str:
    what = {"source": text, "backend": backend, "name": stem, "options": asdict(opts),
            "attnc": compiler_digest()}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


class CompiledModule(types.ModuleType):
    """A generated module with what produced it.  Its functions are attributes named by
    definition (a definition named like an attribute below wins over it)."""

    @property
    def _ctx(self) -> "_Context":
        return self.__dict__["__attnc__"]

    @functools.cached_property
    def spec(self) -> Module:
        """The parsed spec (Einsum IR), before any pass."""
        return self._ctx.module or parse(self._ctx.text, self._ctx.filename)

    @functools.cached_property
    def stages(self) -> list[tuple[str, Module]]:
        """(stage, cascade): the spec ("input"), then the cascade after every pass compiled."""
        return self._ctx.stages or self._compiled[0]

    @functools.cached_property
    def ir(self) -> dict[str, str]:
        """Stage name -> the cascade after it as ``.attn`` text ("input": as parsed)."""
        from ..einsum_ir.printer import print_module

        return {n: print_module(m) for n, m in self.stages}

    @functools.cached_property
    def kernels(self):
        """The kernel program (Triton, CUDA) as the kernel IR; None for numpy.
        ``str(mod.kernels)`` is what ``attnc compile --emit kernel`` prints."""
        return self._compiled[1]

    @functools.cached_property
    def lowering(self) -> dict[str, str]:
        """Lowering stage (tile, map-ranks, bound-tiles, variants) -> the kernel program
        after it, printed (Triton, CUDA; empty for numpy), as ``--print-after-all`` shows."""
        return self._compiled[2]

    @functools.cached_property
    def _compiled(self):
        return _stages(self.spec, self._ctx)

    @functools.cached_property
    def report(self) -> dict:
        """What ``attnc report --json`` prints: per stage, pass counts, costs, footprints."""
        from ..passes.report import build_report

        return build_report(self.spec, dict(self._ctx.options.sizes) or None, self.stages)

    @property
    def backend(self) -> str:
        return self._ctx.backend

    @property
    def path(self) -> Path:
        return Path(self.__file__)

    @property
    def files(self) -> list[Path]:
        info = json.loads((self.path.parent / META).read_text())
        return [self.path.parent / f for f in info["files"]]


@dataclass(frozen=True)
class _Context:
    text: str
    filename: str
    backend: str
    options: CompileOptions
    module: Module | None
    stages: list | None


class _Kernels:
    """A kernel module that prints as ``--emit kernel`` does."""

    def __init__(self, kernels):
        self.module = kernels

    def __str__(self) -> str:
        from ..einsum_ir.kernel import print_kernel_module

        return print_kernel_module(self.module)

    __repr__ = __str__


def _stages(module: Module, ctx: _Context):
    """(stages, kernels or None, lowering stage -> printed program) of the compiled form,
    recomputed (no rendering)."""
    from ..backends import choose_form, get_backend
    from ..einsum_ir.kernel import print_program
    from ..passes.pipeline import run_pipeline

    names, options = ctx.options.pipeline()
    if options.get("tile") is None:
        options["tile"] = get_backend(ctx.backend).tile
    stages = run_pipeline(module, names, ctx.options.stop_after, None, options)
    if get_backend(ctx.backend).runtime == "numpy":
        return stages, None, {}
    lowering: dict[str, list[str]] = {}

    def seen(stage, program):
        text = program if isinstance(program, str) else print_program(program)
        lowering.setdefault(stage, []).append(text)
    stages, kernels = choose_form(module, stages, ctx.backend, options, names,
                                  after_lowering=seen)
    return stages, _Kernels(kernels), {k: "\n".join(v) for k, v in lowering.items()}


def _build(module: Module, backend: str, stem: str, opts: CompileOptions, folder: Path,
           filename: str, text: str, progress: bool | None):
    from ..backends import compile_module
    from ..passes.backward import NotDifferentiable
    from ..passes.tile import NotTileable

    names, options = opts.pipeline()
    shown = Path(filename).name if filename != "<string>" else stem
    with status(f"compiling {shown} for {backend}", enabled=progress) as line:
        def after(stage, _):
            line.update(f"compiling {shown} for {backend}: {stage}")
        try:
            stages, files = compile_module(module, backend, stem, names, options, opts.stop_after,
                                           after, fused=opts.fused, after_lowering=after,
                                           backward=opts.grad)
        except NotDifferentiable as err:
            raise SpecError([Diagnostic(f"no derived backward: {err}")]) from None
        except NotTileable as err:
            raise SpecError([Diagnostic(
                f"the {backend} backend cannot compile this spec: {err}",
                hint="`attnc report` shows the passes this cascade needs; the numpy backend "
                     "compiles any cascade")]) from None
        main = f"{stem}.py"
        for fname in sorted(files, key=lambda f: f == main):  # the module last
            write_atomic(folder / fname, files[fname])
    key = content_key(text, backend, stem, opts)
    meta = {"key": key, "module": main, "files": sorted(files), "backend": backend,
            "options": asdict(opts), "source": text, "filename": filename,
            "attnc": __version__}
    write_atomic(folder / META, json.dumps(meta, indent=1) + "\n")
    return stages


def _module_name(folder: Path, stem: str) -> str:
    """One module per cache folder and process (its torch custom ops register once)."""
    return f"attnc_{stem}_{hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]}"


def _load(folder: Path, stem: str, ctx: _Context) -> CompiledModule:
    name = _module_name(folder, stem)
    loaded = sys.modules.get(name)
    if isinstance(loaded, CompiledModule):
        return loaded
    mod = load_generated(folder / f"{stem}.py", name)
    mod.__dict__["__attnc__"] = ctx
    mod.__class__ = CompiledModule
    return mod


def _spec_text(spec) -> tuple[str, str]:
    """(text, file name) of a spec given as text or as a path."""
    if isinstance(spec, os.PathLike) or (isinstance(spec, str) and _looks_like_path(spec)):
        from . import read_spec

        return read_spec(spec).removeprefix("\ufeff"), str(Path(spec))
    if not isinstance(spec, str):
        raise TypeError(f"spec must be .attn source text or a path, got {type(spec).__name__}")
    return spec, "<string>"


def _first_name(text: str) -> str:
    """The first definition's name, read without parsing (comments dropped); a spec without
    one fails to parse anyway."""
    found = re.search(r"\battention\s+([A-Za-z_]\w*)", re.sub(r"#[^\n]*", "", text))
    return found.group(1) if found else "spec"


def _looks_like_path(text: str) -> bool:
    """A spec's text has a body in braces; anything else names a file (a typo in a path
    is then "cannot read", not a syntax error at 1:1)."""
    return "{" not in text
