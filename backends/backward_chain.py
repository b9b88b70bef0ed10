"""Modules with gradients: every definition's backward program, compiled and chained.

``compile_module(..., backward=True)`` compiles, besides each definition ``NAME``, the
stages of its backward program (:mod:`attnc.passes.backward_program`) as ordinary
definitions, and appends (``templates/common/backward.py.jinja``):

* ``NAME_backward(tensors..., adjoints..., *, params)``: the stages in order; returns the
  gradients of ``NAME``'s floating-point tensor arguments and float scalar parameters (a
  scalar's per batch element, as the backward cascade gives it);
* on torch backends, ``NAME`` itself becomes differentiable (a ``torch.autograd.Function``
  whose backward is ``NAME_backward``; without ``requires_grad`` it is the plain launch).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jinja2

from ..einsum_ir.ir import Definition, Module
from ..passes.backward import NotDifferentiable
from ..passes.backward_program import BackwardProgram, HostScatter, backward_program
from ..passes.tile import NotTileable
from .kernel_common import launcher_signature

COMMON = Path(__file__).resolve().parent.parent / "templates" / "common"


@dataclass(frozen=True)
class StageCall:
    fn: str
    args: tuple[str, ...]
    outs: tuple[str, ...]


@dataclass(frozen=True)
class ChainOfStages:
    """What the template needs for one definition's backward."""

    name: str
    signature: str            # NAME_backward's
    forward_signature: str    # NAME's
    inputs: tuple[str, ...]   # NAME's tensor arguments
    params: tuple[str, ...]   # NAME's scalar parameters
    tensors: tuple[str, ...]  # NAME_backward's tensor arguments (inputs, then adjoints)
    adjoints: tuple[str, ...]
    stages: tuple[StageCall, ...]
    grads: tuple[str, ...]
    scalar_grads: tuple[str, ...]
    zeros: tuple[tuple[str, str], ...]   # (gradient, the argument it has the shape of)
    # tensor arguments and their core rank counts: a scalar's gradient has their batch shape
    batch_of: tuple[tuple[str, int], ...]
    # (rank, argument, axis from the end) the kernels assume non-empty (checked per call)
    nonempty: tuple[tuple[str, str, int], ...]
    rows: tuple[tuple[str, tuple[tuple[str, int], ...]], ...]  # (gradient, (part, ranks to sum))
    with_stats: str | None            # NAME_with_stats, when the forward saves statistics
    outputs: tuple[str, ...]          # NAME's outputs
    stats: tuple[str, ...]            # what NAME_with_stats returns besides them
    scalar_parts: tuple[str, ...]     # stage outputs that only make scalar gradients
    scatters: tuple[tuple[str, str], ...] = ()  # (gradient, the function that scatters it)


def programs_for(module: Module, backend: str, options: dict | None = None
                 ) -> list[BackwardProgram]:
    """Each definition's backward program for ``backend``.  numpy runs a backward whose
    stages have no kernel program as the whole cascade (Einsum by Einsum); a kernel
    backend refuses it (NotTileable with the stage's reason)."""
    programs = []
    for d in module.definitions:
        try:
            programs.append(backward_program(d, backend, options))
        except NotTileable:
            if backend != "numpy":
                raise
            from ..passes.backward import backward

            import dataclasses

            whole = backward(d)
            stage = dataclasses.replace(whole, name=f"{whole.name}_0")
            programs.append(BackwardProgram(whole.name, whole, (stage,)))
    return programs


def with_stages(module: Module, programs: list[BackwardProgram]) -> Module:
    """``module``'s definitions, each forward with its saved statistics, and every
    backward stage, as one module to compile."""
    return Module(module.definitions
                  + tuple(p.with_stats for p in programs if p.with_stats is not None)
                  + tuple(s for p in programs for s in p.stages))


def chain_of_stages(forward: Definition, program: BackwardProgram) -> ChainOfStages:
    cascade = program.cascade
    _, signature = launcher_signature(cascade, str)
    _, forward_signature = launcher_signature(forward, str)
    params = tuple(s.name for s in forward.scalar_params)
    stages = tuple(StageCall(s.name, tuple(a.name for a in s.tensor_args),
                             tuple(o.name for o in s.outputs)) for s in program.stages)
    grads = tuple(o.name for o in cascade.outputs)
    return ChainOfStages(
        name=forward.name, signature=signature, forward_signature=forward_signature,
        inputs=tuple(a.name for a in forward.tensor_args), params=params,
        tensors=tuple(a.name for a in cascade.tensor_args),
        adjoints=tuple(f"d{o.name}" for o in forward.outputs), stages=stages, grads=grads,
        scalar_grads=tuple(g for g in grads if g[1:] in params),
        zeros=tuple((g, g[1:]) for g in program.zeros), rows=program.rows,
        batch_of=tuple((a.name, len(a.ranks)) for a in forward.tensor_args),
        nonempty=program.nonempty,
        with_stats=program.with_stats.name if program.with_stats is not None else None,
        outputs=tuple(o.name for o in forward.outputs),
        stats=tuple(o.name for o in program.with_stats.outputs[len(forward.outputs):])
        if program.with_stats is not None else (),
        scalar_parts=tuple(x for g, parts in program.rows for x, _ in parts
                           if g[1:] in params),
        scatters=tuple((sc.grad, scatter_function(forward.name, cascade, sc))
                       for sc in program.scatters))


def scatter_function(name: str, cascade: Definition, sc: HostScatter) -> str:
    """Python source of ``_bw_scatter_<name>_<grad>(_t)``: the gradient ``sc.grad`` made by
    adding the stage output ``sc.part`` at its places (``sc.targets``), on the device
    (``index_put_(accumulate=True)``); ``_t``: the backward's tensors by name."""
    from ..einsum_ir.printer import print_expr
    from .numpy_backend import pyname, size_code

    lines = [f"def _bw_scatter_{name}_{sc.grad}(_t):",
             f'    """{sc.grad}[{", ".join(print_expr(t) for t in sc.targets)}] += '
             f'{sc.part}[{",".join(r.lower() for r in sc.part_ranks)}]"""']
    bound = set()
    for a in cascade.tensor_args:
        for i, r in enumerate(a.ranks):
            if r not in bound:
                bound.add(r)
                lines.append(f"    {pyname(r)} = _t[{a.name!r}].shape[{i - len(a.ranks)}]")
    for let in cascade.lets:
        lines.append(f"    {pyname(let.name)} = {size_code(let.value, True, 'math')}")
    codes = ", ".join(_torch_index(t, sc.part_ranks) for t in sc.targets)
    lines.append(f"    return _bw_scatter(_t[{sc.part!r}], _t[{sc.arg!r}], {len(sc.part_ranks)}, "
                 f"lambda ix, gather: [{codes}])")
    return "\n".join(lines) + "\n"


def _torch_index(e, ranks: tuple[str, ...]) -> str:
    """An integer subscript as torch code over the part's rank indices ``ix`` (by position
    in ``ranks``) and sizes; an index tensor's element through ``gather`` (per batch
    element, absent outside it)."""
    from ..einsum_ir.ir import Access, Binary, Index, Num, Size, Unary
    from .numpy_backend import pyname

    if isinstance(e, Index):
        return f"ix[{ranks.index(e.rank)}]"
    if isinstance(e, Size):
        return pyname(e.rank)
    if isinstance(e, Num):
        return str(int(e.value))
    if isinstance(e, Unary) and e.op == "-":
        return f"(-{_torch_index(e.operand, ranks)})"
    if isinstance(e, Binary) and e.op in ("+", "-", "*", "//", "%"):
        return f"({_torch_index(e.left, ranks)} {e.op} {_torch_index(e.right, ranks)})"
    if isinstance(e, Access):
        subs = ", ".join(_torch_index(s, ranks) for s in e.subscripts)
        return f"gather(_t[{e.tensor!r}], {subs})"
    raise NotTileable(f"a scattered gradient's place {e} has no host form")


def render_chains(module: Module, programs: list[BackwardProgram], runtime: str) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(COMMON)),
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined)
    chains = [chain_of_stages(d, p) for d, p in zip(module.definitions, programs)]
    return env.get_template("backward.py.jinja").render(programs=chains, runtime=runtime)


def not_differentiable_reason(err: Exception) -> str:
    if isinstance(err, NotDifferentiable):
        return f"no derived backward: {err}"
    return f"the backward has no kernel program: {err}"
