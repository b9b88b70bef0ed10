"""The ``attnc`` command line: compile, check, report, run.

User mistakes (bad specs, bad options, unreadable files) print located errors
and exit with code 2, never a traceback.  ``check`` exits 1 on a mismatch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path

from .. import __version__
from ..backends import BACKENDS, choose_form, compile_module, get_backend, load_generated, lower_stages, write_atomic
from ..einsum_ir.kernel import print_kernel_module, print_program
from ..passes.lowering import LOWERING_STAGES
from ..passes.backward import NotDifferentiable
from ..passes.tile import NotTileable
from ..einsum_ir.diagnostics import SpecError, SpecWarning
from ..einsum_ir.ir import Module
from ..einsum_ir.printer import print_module
from ..passes.pipeline import PASSES, resolve, run_pipeline
from . import parse_file
from .limits import recursion_room
from .progress import status

EXIT_MISMATCH = 1
EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 70  # EX_SOFTWARE: only for bugs in attnc


class UsageError(Exception):
    """A bad option value: reported like a spec error, exit code 2."""


def _parse_sizes(text: str | None, zero: bool = False) -> dict[str, int]:
    """``--size`` as a dict; sizes are positive (``zero``: or 0, for input shapes)."""
    if not text:
        return {}
    sizes = {}
    for item in text.split(","):
        name, eq, value = item.partition("=")
        value = value.strip()
        if not eq or not name.strip() or not value.isascii() or not value.isdigit():
            raise UsageError(f"--size expects NAME=INT[,NAME=INT...], got {item!r}")
        if int(value) < (0 if zero else 1) or len(value) > 18:
            raise UsageError(f"--size {item.strip()}: a size must be a positive integer "
                             f"below 10**18" + (" (or 0)" if zero else ""))
        sizes[name.strip()] = int(value)
    return sizes


def _check_sizes(modules: list[Module], sizes: dict[str, int]) -> None:
    """``--size`` against the spec, before any pass sees it: names that are ranks, lets that
    come out whole.  What fails here is the user's to fix; what fails later is a bug."""
    from ..passes.costs import known_sizes

    ranks = {r for m in modules for d in m.definitions for r in d.ranks}
    unknown = sorted(set(sizes) - ranks)
    if unknown:
        raise UsageError(f"--size names {', '.join(unknown)}, not ranks of the spec "
                         f"({', '.join(sorted(ranks)) or 'none'})")
    for m in modules:
        for defn in m.definitions:
            try:
                known_sizes(defn, sizes)
            except ValueError as err:
                raise UsageError(f"--size: {defn.name}: {err}") from None


def _check_passes(names: list[str] | None, stop_after: str | None) -> None:
    """Pass names and ``--stop-after`` against the registry (a user error lists the choices)."""
    try:
        stages = [s.name for s in resolve(names)]
    except ValueError as err:
        raise UsageError(str(err)) from None
    if stop_after is not None and stop_after not in stages \
            and stop_after not in LOWERING_STAGES:
        raise UsageError(f"--stop-after {stop_after!r} is not in the pipeline "
                         f"({', '.join(stages)})")


def _positive(text: str) -> int:
    """An argparse type: a positive integer (argparse reports anything else, exit 2)."""
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 2**31:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _pass_list(text: str | None) -> list[str] | None:
    return None if text is None else [p.strip() for p in text.split(",") if p.strip()]


def _choice(args) -> tuple[list[str] | None, dict]:
    """The passes and their options the command line asks for."""
    names = _pass_list(getattr(args, "passes", None))
    if getattr(args, "O0", False) and names is None:
        names = ["canonicalize"]
    _check_passes(names, getattr(args, "stop_after", None))
    tile = getattr(args, "tile", None)  # None: each backend's own (and a backward stage's)
    if getattr(args, "backend", None):
        _backend(args.backend)  # validated here: a later ValueError is a bug
    options = {"tile": tile, "workers": getattr(args, "workers", None)}
    if getattr(args, "size", None):
        options["sizes"] = {k: v for k, v in _parse_sizes(args.size, zero=True).items() if v > 0}
    return names, options


def _pipeline(module: Module, args, echo=None) -> list[tuple[str, Module]]:
    names, options = _choice(args)  # validated: a ValueError from here on is a bug
    return run_pipeline(module, names, getattr(args, "stop_after", None), echo, options)


def _write(path: Path, text: str) -> None:
    """Write an output file; a path that cannot be written is the user's to fix."""
    try:
        write_atomic(path, text)
    except OSError as err:
        raise UsageError(f"cannot write {path}: {err.strerror or err}") from None


def _backend(name: str):
    try:
        return get_backend(name)
    except ValueError as err:
        raise UsageError(str(err)) from None


def _load(args) -> Module:
    """The spec's module; with ``--backward``, each definition's derived backward cascade
    (``NAME_backward``: gradients from the outputs' adjoints, passes/backward.py)."""
    module = parse_file(args.spec)
    if not getattr(args, "backward", False):
        return module
    from ..passes.backward import NotDifferentiable, backward

    try:
        return Module(tuple(backward(d) for d in module.definitions))
    except NotDifferentiable as why:
        raise UsageError(f"{args.spec}: no derived backward: {why}") from None


def cmd_compile(args) -> int:
    if getattr(args, "grad", False) and (args.backward or args.emit in ("ir", "kernel")
                                         or getattr(args, "stop_after", None)):
        raise UsageError("--grad writes a differentiable module: it takes neither --backward "
                         "(the backward cascade alone), --emit ir/kernel nor --stop-after")
    module = _load(args)

    def echo(name, mod):
        if args.print_after_all:
            print(f"# ---- after {name} ----")
            print(print_module(mod))

    def echo_kernel(name, program):
        if args.print_after_all:
            print(f"# ---- after {name} ----")
            print(program if isinstance(program, str) else print_program(program))

    lowering = getattr(args, "stop_after", None) in LOWERING_STAGES
    if args.emit == "kernel" or lowering:
        _, kernels = _lower(module, args, echo, echo_kernel)
        print(print_kernel_module(kernels), end="")
        return 0
    if args.emit == "ir":
        print(_compiled_cascade(module, args, echo), end="")
        return 0
    _, files = _compile(module, args, echo, echo_kernel)
    if args.emit == "code":
        for text in files.values():
            print(text, end="")
        return 0
    out_dir = Path(args.output)
    for name, text in sorted(files.items()):
        _write(out_dir / name, text)
        print(f"wrote {out_dir / name}")
    return 0


def _lower(module: Module, args, echo=None, echo_kernel=None):
    """(stages, kernel module) of the spec for the backend's target (``--emit kernel``)."""
    names, options = _choice(args)
    stop = getattr(args, "stop_after", None)
    cascade_stop = None if stop in LOWERING_STAGES else stop
    if options.get("tile") is None:
        options["tile"] = _backend(args.backend).tile
    try:
        stages = run_pipeline(module, names, cascade_stop, echo, options)
        if stop in LOWERING_STAGES:
            return stages, lower_stages(stages, args.backend, options, echo_kernel, stop)
        return choose_form(module, stages, args.backend, options, names, echo, echo_kernel)
    except NotTileable as err:  # options were validated by _choice: a ValueError is a bug
        raise _declined(args.backend, err) from None


def _compiled_cascade(module: Module, args, echo=None) -> str:
    """``--emit ir``: exactly the cascade the backend compiles — for a kernel backend the
    form the lowering chose, one definition per kernel program of a multi-kernel one."""
    if _backend(args.backend).runtime == "numpy" or getattr(args, "O0", False):
        return print_module(_pipeline(module, args, echo)[-1][1])
    _, kernels = _lower(module, args, echo)
    parts = [q.cascade for p in kernels.programs for q in (p.parts or (p,))]
    return print_module(Module(tuple(parts)))


def _declined(backend: str, err: Exception) -> UsageError:
    return UsageError(f"the {backend} backend cannot compile this spec: {err}\n"
                      f"  (its kernels stream the keys once: `attnc report` shows the passes "
                      f"this cascade needs and what blocks one pass; the numpy backend "
                      f"compiles any cascade)")


def _compile(module: Module, args, echo=None, echo_kernel=None):
    """(stages, files) for the spec's backend, through the requested pipeline."""
    names, options = _choice(args)
    what = f"compiling {Path(args.spec).name} for {args.backend}"
    quiet = False if getattr(args, "print_after_all", False) else None  # stdout shows the work
    with status(what, enabled=quiet) as line:
        def stage(name, x, show=None):
            line.update(f"{what}: {name}")
            if show is not None:
                show(name, x)
        try:
            return compile_module(module, args.backend, Path(args.spec).stem, names, options,
                                  getattr(args, "stop_after", None),
                                  lambda n, x: stage(n, x, echo), fused=not getattr(args, "O0", False),
                                  after_lowering=lambda n, x: stage(n, x, echo_kernel),
                                  backward=getattr(args, "grad", False))
        except NotTileable as err:
            raise _declined(args.backend, err) from None
        except NotDifferentiable as why:
            raise UsageError(f"{args.spec}: no derived backward: {why}") from None


def _compile_to_temp(spec: str, module: Module, args, tmp: str):
    _, files = _compile(module, args)
    for name, text in files.items():
        write_atomic(Path(tmp) / name, text)
    return load_generated(Path(tmp) / f"{Path(spec).stem}.py")


def _check_target(backend: str) -> tuple[str | None, float]:
    """(torch device or None for numpy, relative tolerance) of a backend's check."""
    if _backend(backend).runtime == "numpy":
        return None, 1e-9
    try:
        import torch
    except ImportError:
        raise UsageError(f"the {backend} backend needs torch: pip install -e '.[triton]'") from None
    if torch.cuda.is_available():
        return "cuda", 1e-4
    if backend == "triton":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors through Triton's interpreter
        return "cpu", 1e-4
    if backend == "cuda" and os.environ.get("ATTNC_CUDA_EMULATE") == "1":
        return "cpu", 1e-4  # the same .cu compiled as C++ for CPU tensors
    hint = " (or set ATTNC_CUDA_EMULATE=1 to run its .cu as C++ on the CPU)" if backend == "cuda" else ""
    raise UsageError(f"the {backend} backend needs a CUDA GPU to run{hint}; compile it with "
                     f"'attnc compile --backend {backend}'")


def cmd_check(args) -> int:
    from ..backends.check import INTERPRETED_GRID_POINTS, MAX_GRID_POINTS, check_definition

    if getattr(args, "grad", False) and args.backward:
        raise UsageError("--grad checks the backward program against the backward cascade: "
                         "it does not take --backward")
    if getattr(args, "plan", False) and (args.backend == "numpy" or args.grad or args.backward):
        raise UsageError("--plan checks calls through a plan (NAME.plan), which the triton and "
                         "cuda backends' forward functions have; numpy and backward functions "
                         "have none")
    if getattr(args, "stop_after", None) in LOWERING_STAGES:
        raise UsageError(f"--stop-after {args.stop_after} ends in a kernel program, which check "
                         f"cannot run: `attnc compile --stop-after {args.stop_after}` prints it")
    module = _load(args)
    failed = False
    device, tolerance = _check_target(args.backend)
    with tempfile.TemporaryDirectory() as tmp:
        generated = _compile_to_temp(args.spec, module, args, tmp)
        for defn in module.definitions:
            fn = getattr(generated, defn.name)
            if getattr(args, "grad", False):  # the oracle: the backward cascade, interpreted
                from ..passes.backward import backward

                defn, fn = backward(defn), getattr(generated, f"{defn.name}_backward")
            if device is not None:
                from ..backends.check import torch_caller

                fn = torch_caller(fn, device, planned=getattr(args, "plan", False))
            # a parameter's gradient sums cancelling parts over every point: 100x looser
            rows = check_definition(defn, fn, args.seed, tolerance, INTERPRETED_GRID_POINTS
                                    if device == "cpu" else MAX_GRID_POINTS,
                                    100 * tolerance if getattr(args, "grad", False) else None)
            worst: dict[str, float] = {}
            for row in rows:
                worst[row.output] = max(worst.get(row.output, 0.0), row.rel_error)
                if not row.ok:
                    failed = True
                    print(f"MISMATCH {defn.name}.{row.output} sizes={row.sizes} "
                          f"batch={row.batch}: relative error {row.rel_error:.3g}")
            allowed = {row.output: row.tolerance for row in rows}
            for out, err in worst.items():
                status = "ok" if err <= allowed[out] else "FAIL"
                print(f"{defn.name:24s} {out:12s} max relative error {err:.2e} over "
                      f"{len(rows) // len(worst)} shapes  {status}")
    return EXIT_MISMATCH if failed else 0


def cmd_report(args) -> int:
    from ..passes.report import build_report, render_report, report_dot

    module = _load(args)
    sizes = _parse_sizes(args.size)
    stages = _pipeline(module, args)
    _check_sizes([module] + [m for _, m in stages], sizes)
    report = build_report(module, sizes, stages)
    if args.backward:
        report["backward_programs"] = _backward_programs(args.spec)
    if args.dot:
        _write(Path(args.dot), report_dot(module, stages))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render_report(report), end="")
        for prog in report.get("backward_programs", ()):
            print(_render_backward_program(prog), end="")
    return 0


def _backward_programs(spec: str) -> list[dict]:
    """Each definition's backward program for the kernel targets (``attnc compile --grad``):
    its stages, what each returns and reads from earlier ones, and its kernels' row and
    streamed ranks — or why there is none."""
    from ..passes.backward_program import backward_program

    out = []
    for d in parse_file(spec).definitions:
        entry = {"definition": d.name, "target": "triton"}
        try:
            prog = backward_program(d, "triton")
        except (NotTileable, NotDifferentiable) as why:
            entry["refused"] = str(why)
            out.append(entry)
            continue
        grads = {o.name for o in prog.cascade.outputs}
        rows = []
        for st in prog.stages:
            one = Module((st,))
            _, kernels = choose_form(one, run_pipeline(one, None, None, None, {"tile": 64}),
                                     "triton", {"tile": 64})
            program = kernels.programs[0]
            kernels = [f"{k.roles.row or '-'} x {k.tiles.stream_rank or '-'}"
                       for q in (program.parts or (program,)) for k in q.kernels[:1]]
            rows.append({"stage": st.name, "returns": [o.name for o in st.outputs],
                         "reads": [a.name for a in st.tensor_args
                                   if a.name in set(prog.saved) | {x for _, ps in prog.rows
                                                                   for x, _ in ps}],
                         "kernels": kernels,
                         "gradients": [o.name for o in st.outputs if o.name in grads]})
        entry["stages"] = rows
        entry["saved_by_forward"] = ([o.name for o in prog.with_stats.outputs][
            len(d.outputs):] if prog.with_stats is not None else [])
        out.append(entry)
    return out


def _render_backward_program(prog: dict) -> str:
    lines = [f"\n== {prog['definition']}: backward program ({prog['target']} kernels, "
             f"`attnc compile --grad`)"]
    if "refused" in prog:
        return "\n".join(lines + [f"  none: {prog['refused']}", ""]) + "\n"
    if prog["saved_by_forward"]:
        lines.append(f"  the forward saves {', '.join(prog['saved_by_forward'])} "
                     f"({prog['definition']}_with_stats): their stage is skipped under autograd")
    lines.append(f"  {'stage':32s} {'returns':28s} {'reads saved':20s} kernels (rows x streamed)")
    for r in prog["stages"]:
        lines.append(f"  {r['stage']:32s} {', '.join(r['returns']):28s} "
                     f"{', '.join(r['reads']) or '-':20s} {'; '.join(r['kernels'])}")
    return "\n".join(lines) + "\n"


def cmd_kernels(args) -> int:
    """Per kernel: configuration, registers, stack, shared memory, main-loop SASS counts
    (``--backend cuda``: the CUDA backend's kernels, counted in their tile loops)."""
    from ..backends.kernel_report import (ReportUnavailable, cuda_kernel_report, kernel_report,
                                          render_kernel_report, report_json)

    sizes = _parse_sizes(args.size)
    parse_file(args.spec)  # a located error before the compile subprocess
    from ..backends.triton_backend import TritonUnsupported

    report = cuda_kernel_report if args.backend == "cuda" else kernel_report
    if args.grad and args.backend == "cuda":
        raise UsageError("--grad: the backward's static report is Triton's (--backend triton)")
    try:
        with status("compiling %s kernels for sm_%d" % (args.backend, args.arch)):
            reports = report(args.spec, sizes, args.dtype, args.arch, grad=True) \
                if args.grad else report(args.spec, sizes, args.dtype, args.arch)
    except (TritonUnsupported, NotTileable) as err:
        raise _declined(args.backend, err) from None
    except ReportUnavailable as err:
        raise UsageError(str(err)) from None
    print(report_json(reports) if args.json else render_kernel_report(reports), end="")
    return 0


def cmd_run(args) -> int:
    """Compile, import the generated module, run it on random inputs, show the result."""
    import numpy as np

    from ..backends.check import random_call, relative_error
    from ..einsum_ir.interpreter import interpret
    from ..einsum_ir.sizes import evaluate_lets

    module = _load(args)
    given = _parse_sizes(args.size, zero=True)
    device, _ = _check_target(args.backend)
    rng = np.random.default_rng(args.seed)
    np.set_printoptions(precision=4, suppress=True, linewidth=100)
    with tempfile.TemporaryDirectory() as tmp:
        generated = _compile_to_temp(args.spec, module, args, tmp)
        for defn in module.definitions:
            ranks = list(dict.fromkeys(r for a in defn.tensor_args for r in a.ranks))
            unknown = set(given) - set(ranks)
            if unknown:
                raise UsageError(f"--size names {', '.join(sorted(unknown))}, not input ranks of "
                                 f"{defn.name} ({', '.join(ranks)})")
            sizes = {r: given.get(r, 8) for r in ranks}
            try:
                evaluate_lets(defn, sizes)
            except ValueError as err:
                raise UsageError(f"{defn.name}: {err}") from None
            call, params = random_call(defn, rng, sizes)
            fn = getattr(generated, defn.name)
            if device is not None:  # a torch backend: tensors in, numpy arrays out
                from ..backends.check import torch_caller

                fn = torch_caller(fn, device)
            outs = fn(*call, **params)
            refs = interpret(defn, *call, **params)
            if len(defn.outputs) == 1:
                outs, refs = (outs,), (refs,)
            shown = ", ".join(f"{a.name}{list(x.shape)}" for a, x in zip(defn.tensor_args, call))
            print(f"{defn.name}({shown}) with sizes {sizes}")
            for o, got, want in zip(defn.outputs, outs, refs):
                print(f"  {o.name}{list(got.shape)} {got.dtype}: "
                      f"relative error vs the interpreter {relative_error(got, want):.2e}")
                first = got[(0,) * max(got.ndim - 2, 0)]
                print("  " + str(first if first.ndim == 0 else first[:4]).replace("\n", "\n  "))
    return 0


@contextmanager
def _spec_warnings_on_stderr():
    """Lints print like errors (located, with a caret), each time; other warnings as usual."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", SpecWarning)
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, SpecWarning):
                print(str(message), file=sys.stderr)
            else:
                shown(message, category, filename, lineno, file, line)
        warnings.showwarning = show
        yield


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnc", description="A compiler for attention cascades (.attn).")
    p.add_argument("--version", action="version", version=f"attnc {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, backend=True, pipeline=True):
        sp.add_argument("spec", help="the .attn file")
        sp.add_argument("--backward", action="store_true",
                        help="the derived backward cascade of each definition (NAME_backward: "
                             "the gradients of its float inputs from its outputs' adjoints)")
        if backend:
            sp.add_argument("--backend", default="numpy",
                            help="numpy (default), triton or cuda: " + "; ".join(
                                f"{b.name}: {b.doc}" for b in BACKENDS.values()))
        if pipeline:
            sp.add_argument("--passes", help="comma-separated passes: " + ", ".join(PASSES))
            sp.add_argument("--stop-after", dest="stop_after",
                            help="stop after this pass, or after a lowering stage ("
                                 + ", ".join(LOWERING_STAGES) + ": prints the kernel program)")
            sp.add_argument("--tile", type=_positive,
                            help="tile size of the streamed rank (online pass)")
            sp.add_argument("--workers", type=_positive,
                            help="workers of the split-k / stream-k passes")
            sp.add_argument("-O0", dest="O0", action="store_true",
                            help="no optimisation: the per-Einsum form of the canonical cascade")

    c = sub.add_parser("compile", help="compile a spec to a module")
    common(c)
    c.add_argument("-o", "--output", default=".", help="output folder (default: .)")
    c.add_argument("--emit", choices=("ir", "kernel", "code"),
                   help="print the compiled cascade (ir), the kernel program (kernel) or the "
                        "code instead of writing")
    c.add_argument("--print-after-all", action="store_true",
                   help="print the IR after every pass and the kernel program after every "
                        "lowering stage")
    c.add_argument("--size", help="size assumptions for cost decisions, e.g. M=8192,E=128")
    c.add_argument("--grad", action="store_true",
                   help="a differentiable module: NAME, and NAME_backward running the backward "
                        "program's kernels (torch backends: NAME is a torch.autograd.Function)")
    c.set_defaults(fn=cmd_compile)

    k = sub.add_parser("check", help="compare the compiled code with the interpreter")
    common(k)
    k.add_argument("--seed", type=int, default=0, help="random seed of the inputs (default 0)")
    k.add_argument("--grad", action="store_true",
                   help="check NAME_backward (the backward program's kernels) against the "
                        "interpreter running the derived backward cascade")
    k.add_argument("--plan", action="store_true",
                   help="call each function through a plan made from its arguments "
                        "(NAME.plan: the block mask made once; triton and cuda)")
    k.set_defaults(fn=cmd_check)

    r = sub.add_parser("report", help="pass-count bounds, footprints and costs")
    common(r, backend=False)
    r.add_argument("--json", action="store_true", help="machine-readable output")
    r.add_argument("--size", help="evaluate costs at sizes, e.g. M=8192,P=8192,E=128,F=128")
    r.add_argument("--dot", metavar="FILE",
                   help="write every stage's cascade as a Graphviz file: one cluster per "
                        "stage, Einsums coloured by pass, the reads that force an extra pass "
                        "red and labelled, iterative updates looped over their rank")
    r.set_defaults(fn=cmd_report)

    u = sub.add_parser("run", help="compile, then run the generated module on random inputs")
    common(u)
    u.add_argument("--size", help="input rank sizes, e.g. P=6,M=9 (default 8 each)")
    u.add_argument("--seed", type=int, default=0, help="random seed of the inputs (default 0)")
    u.set_defaults(fn=cmd_run)

    g = sub.add_parser("kernels", help="static kernel report: every Triton (or CUDA) kernel "
                                      "compiled for a GPU target without a GPU, counted from "
                                      "its SASS")
    g.add_argument("spec", help="the .attn file")
    g.add_argument("--backend", choices=("triton", "cuda"), default="triton",
                   help="whose kernels: triton (default) or cuda (nvcc -cubin of the instances "
                        "the CUDA launcher builds; counts the outermost loop with MMA)")
    g.add_argument("--size", required=True, help="the sizes the launcher configures for, "
                                                 "e.g. P=16384,M=16384,E=128,F=128")
    g.add_argument("--dtype", default="bf16", choices=("bf16", "f16", "f32"),
                   help="input dtype (default bf16)")
    g.add_argument("--arch", type=_positive, default=90, help="sm_ target (default 90)")
    g.add_argument("--json", action="store_true", help="machine-readable output")
    g.add_argument("--grad", action="store_true",
                   help="the backward program's kernels too (NAME_backward_<i>; triton)")
    g.set_defaults(fn=cmd_kernels)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with recursion_room(), _spec_warnings_on_stderr():
            return args.fn(args)
    except SpecError as err:
        print(err.format(), file=sys.stderr)
        return EXIT_USER_ERROR
    except UsageError as err:
        print(f"attnc: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        return 130
    except Exception:  # a compiler bug: say so plainly
        print("attnc: internal compiler error (this is a bug in attnc, not in your spec):",
              file=sys.stderr)
        traceback.print_exc()
        print("attnc: please report it with the spec, the command line and this output",
              file=sys.stderr)
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
