"""A static kernel-quality report: every kernel of a spec compiled for a GPU target without
a GPU, with the launcher's own configuration, and counted from its SASS.

Triton (the default): per kernel, grid, blocks, warps, stages, registers, stack bytes
(spills and local arrays), shared memory; and for the
main loop (the innermost backward branch holding the most MMA instructions) its SASS
instruction count (all of it, and on its fall-through path: a probed full tile's unmasked
branch), MMA (``HGMMA``/``HMMA``) and MUFU counts, wgmma waits
(``WARPGROUP.DEPBAR``), other scoreboard waits (``DEPBAR``) and global loads.  This is the
performance loop when no GPU is lent (``attnc kernels``, docs/performance.md).

The compile runs in a subprocess without ``TRITON_INTERPRET`` (Triton decides at import
whether ``@triton.jit`` builds interpreted functions).  Triton's bundled ``cuobjdump``
prints the SASS.

CUDA (:func:`cuda_kernel_report`, ``attnc kernels --backend cuda``): every kernel the
``.cu`` defines for the spec, one instance each (the element type and the blocks the torch
launcher picks at the sizes), compiled by ``nvcc -cubin`` and counted in its tile loop
(:func:`tile_loop_counts`: the outermost loop holding MMA, since the CUDA kernels run
element-wise and ``wmma`` loops inside it).
"""
from __future__ import annotations

import inspect
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

from .triton_backend import MAX_BATCH_DIMS as MAX_BATCH

POINTER = {None: "*bf16", "f16": "*fp16", "bf16": "*bf16", "f32": "*fp32", "f64": "*fp64",
           "i32": "*i32", "i64": "*i64", "bool": "*i1"}
FLOAT_POINTER = {"bf16": "*bf16", "f16": "*fp16", "f32": "*fp32"}

COMPILE = r"""
import json, sys, importlib.util
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import triton
path, jobs, arch, out = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
spec = importlib.util.spec_from_file_location("generated", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
results = []
for job in jobs:
    constexprs = {(int(i),): v for i, v in job["constexprs"].items()}
    attrs = {(int(i),): v for i, v in job["attrs"].items()}
    compiled = triton.compile(ASTSource(fn=getattr(module, job["kernel"]), signature=job["signature"],
                                        constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": job["num_warps"], "num_stages": job["num_stages"]})
    cubin = f"{out}/{job['kernel']}.cubin"
    open(cubin, "wb").write(compiled.asm["cubin"])
    md = compiled.metadata
    results.append(dict(kernel=job["kernel"], registers=getattr(compiled, "n_regs", None),
                        spills=getattr(compiled, "n_spills", None), shared=md.shared, cubin=cubin))
print(json.dumps(results))
"""


@dataclass
class LoopCounts:
    """SASS of the main loop, per iteration (one streamed tile).  The fields after
    ``local_memory`` are the CUDA report's (None in Triton's): a CUDA tile loop holds
    loops of its own, so its counts are static (an inner loop's body counted once)."""

    instructions: int = 0
    path: int = 0          # on the fall-through path (a probed tile's unmasked branch)
    mma: int = 0
    mufu: int = 0
    wgmma_waits: int = 0
    waits: int = 0
    global_loads: int = 0
    local_memory: int = 0
    inner_loops: int | None = None     # loops nested in it (their bodies run many times)
    bar_syncs: int | None = None       # BAR.SYNC: __syncthreads
    shared_loads: int | None = None    # LDS, LDSM
    shared_stores: int | None = None   # STS
    generic_memory: int | None = None  # LD, ST: through generic addresses


@dataclass
class KernelReport:
    kernel: str
    variant: str
    grid: str
    blocks: dict
    num_warps: int
    num_stages: int | None      # None: CUDA (no software pipeline stages)
    registers: int | None = None
    spill_bytes: int | None = None
    shared_bytes: int | None = None   # CUDA: the dynamic shared memory (cfg::bytes)
    main_loop: LoopCounts = field(default_factory=LoopCounts)
    backend: str = "triton"
    threads: int | None = None          # CUDA: threads per block (ATTNC_THREADS)
    # CUDA: cuobjdump's SHARED, static __shared__ arrays (sm_90 counts 1 KB there for any
    # kernel that uses shared memory)
    static_shared_bytes: int | None = None


_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_TARGET = re.compile(r"`?\(?\.L_x_\d+\)?|0x([0-9a-f]+)")


def sass_loops(sass: str) -> list[tuple[int, int, list[tuple[int, str, str]]]]:
    """The backward branches of a SASS listing: (start, end, instructions inside)."""
    instructions = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in _LINE.finditer(sass)]
    labels = {}
    for m in re.finditer(r"\.(L_x_\d+):\s*\n\s*/\*([0-9a-f]+)\*/", sass):
        labels[m.group(1)] = int(m.group(2), 16)
    loops = []
    for addr, op, rest in instructions:
        if not op.startswith("BRA"):
            continue
        target = None
        lab = re.search(r"\.(L_x_\d+)", rest)
        if lab and lab.group(1) in labels:
            target = labels[lab.group(1)]
        else:
            hexa = re.search(r"0x([0-9a-f]+)", rest)
            target = int(hexa.group(1), 16) if hexa else None
        if target is not None and target < addr:  # (not the trailing BRA to itself)
            loops.append((target, addr, [i for i in instructions if target <= i[0] <= addr]))
    return loops


_PREDICATED_BRA = re.compile(r"/\*([0-9a-f]{4,})\*/\s+@!?U?P\w+\s+BRA")


def fall_through_path(sass: str, body: list[tuple[int, str, str]]) -> int:
    """Instructions of a loop body on its fall-through path: those an unconditional forward
    branch inside the body jumps over are left out.  A full tile that probes its data
    (``if every: unmasked body else: masked body``) runs its first branch whenever the
    probe holds; the other is the rare case (a page-table hole)."""
    predicated = {int(m.group(1), 16) for m in _PREDICATED_BRA.finditer(sass)}
    start, end = body[0][0], body[-1][0]
    skipped, reach = 0, start
    for addr, op, rest in body:
        if addr < reach or not op.startswith("BRA") or addr in predicated:
            continue
        target = re.search(r"0x([0-9a-f]+)", rest)
        target = int(target.group(1), 16) if target else None
        if target is not None and addr < target <= end:
            skipped += sum(1 for a, _, _ in body if addr < a < target)
            reach = target
    return len(body) - skipped


def main_loop_counts(sass: str) -> LoopCounts:
    """Counts of the innermost loop with the most MMA instructions (the streamed tile); of
    the whole program in a kernel without a loop (a chunk's output, a map)."""
    best = None
    for start, end, body in sass_loops(sass):
        mma = _mma(body)
        key = (mma, -(end - start))
        if best is None or key > best[0]:
            best = (key, body)
    whole = _instructions(sass)
    if best is None and not whole:
        return LoopCounts()
    return _loop_counts(sass, best[1] if best is not None else whole)


def _instructions(sass: str) -> list[tuple[int, str, str]]:
    return [(int(m.group(1), 16), m.group(2), m.group(3)) for m in _LINE.finditer(sass)]


def _mma(body) -> int:
    return sum(op.startswith(("HGMMA", "HMMA")) for _, op, _ in body)


def _count(body, *prefixes: str) -> int:
    return sum(op.startswith(prefixes) for _, op, _ in body)


def _loop_counts(sass: str, body) -> LoopCounts:
    """The Triton report's counts of one loop body."""
    return LoopCounts(
        instructions=len(body), path=fall_through_path(sass, body), mma=_mma(body),
        mufu=_count(body, "MUFU"), wgmma_waits=_count(body, "WARPGROUP.DEPBAR"),
        waits=_count(body, "DEPBAR"), global_loads=_count(body, "LDG", "LDGSTS", "UTMALDG"),
        local_memory=_count(body, "LDL", "STL"))


_UNCONDITIONAL_EXIT = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:EXIT|RET)\b")


def code_loops(sass: str) -> list[tuple[int, int, list[tuple[int, str, str]]]]:
    """The loops of :func:`sass_loops` less the backward jumps of out-of-line code: nvcc
    places a divergent shuffle's slow path (``BRA.DIV``) and subroutines after the kernel's
    ``EXIT``, and the slow path jumps back into the body; such a "loop" spans an
    unconditional ``EXIT`` or ``RET``, which no loop body holds."""
    exits = [int(m.group(1), 16) for m in _UNCONDITIONAL_EXIT.finditer(sass)]
    return [(s, e, body) for s, e, body in sass_loops(sass)
            if not any(s <= x <= e for x in exits)]


def _inside(inner, outer) -> bool:
    """``inner`` nests in ``outer`` (another header: branches to one header are one loop)."""
    return outer[0] < inner[0] and inner[1] <= outer[1]


def _outermost(loops):
    """Of ``loops``, the one with the most MMA among those no other loop contains."""
    top = [lp for lp in loops if not any(o[0] <= lp[0] and lp[1] <= o[1] and o[:2] != lp[:2]
                                         for o in loops)]
    return max(top, key=lambda lp: (_mma(lp[2]), lp[1] - lp[0]), default=None)


def tile_loop(sass: str, depth: int = 0):
    """The CUDA kernel's tile loop: the outermost loop holding MMA instructions (ties: the
    most MMA).  Not the innermost, as for Triton: the tile loop of a CUDA kernel holds the
    ``wmma`` k-loops of ``attnc_mma`` and element-wise loops, and the innermost loop with
    the most MMA is a k-loop whenever one k-loop holds all of the tile's MMA.  Without MMA (f32 inputs: exact FMA loops) the outermost loop
    holding a ``BAR.SYNC``: in these kernels only the tile loop (and a stream-K worker's
    loop around it) synchronises inside.  ``depth`` 1 takes the outermost such loop inside
    that one (a stream-K worker's tile loop sits in its loop over units).  None: no such
    loop (a split-K combine)."""
    loops = code_loops(sass)
    loops = [lp for lp in loops if _mma(lp[2])] or \
        [lp for lp in loops if _count(lp[2], "BAR.SYNC")]
    best = None
    for _ in range(depth + 1):
        pick = _outermost(loops)
        if pick is None:
            break
        best = pick
        loops = [lp for lp in loops if _inside(lp, best)]
    return best


def tile_loop_counts(sass: str, depth: int = 0) -> LoopCounts:
    """Counts of :func:`tile_loop` (of the whole kernel when there is none: a split-K
    combine), with the CUDA fields: loops nested in it, ``BAR.SYNC``, shared loads and
    stores.  Static counts: an inner loop's body is counted once, though it runs several
    times per tile (``inner_loops`` says how many such loops there are), and a subroutine
    it calls (``CALL``) is not counted."""
    best = tile_loop(sass, depth)
    body = best[2] if best is not None else _instructions(sass)
    if not body:
        return LoopCounts(inner_loops=0, bar_syncs=0, shared_loads=0, shared_stores=0,
                          generic_memory=0)
    nested = {s for s, e, _ in code_loops(sass) if best is None or _inside((s, e), best)}
    counts = _loop_counts(sass, body)
    counts.global_loads = _count(body, "LDG") - _count(body, "LDGDEPBAR")  # LDG, LDGSTS
    counts.inner_loops = len(nested)
    counts.bar_syncs = _count(body, "BAR.SYNC")
    counts.shared_loads = _count(body, "LDS")
    counts.shared_stores = _count(body, "STS")
    counts.generic_memory = sum(op in ("LD", "ST") or op.startswith(("LD.", "ST."))
                                for _, op, _ in body)
    return counts


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def kernel_signature(part, arg_names, pointers: dict, blocks: dict,
                     values: dict | None = None) -> tuple[dict, dict, dict]:
    """A kernel's argument types for ``triton.compile`` (``pointers``: pointer type per
    tensor argument; ``blocks``: ``BLOCK_<rank>`` and other constexprs), its constexprs by
    position, and its attributes, specialised as Triton's launcher specialises the call
    (``triton.runtime.jit``): pointers 16-byte aligned; an integer ``values`` gives is a
    constant when it is 1 (a contiguous stride) and divisible by 16 when it is; integers
    it does not give are plain ``i32``."""
    signature, constexprs, attrs = {}, {}, {}
    divisible = [["tt.divisibility", 16]]
    for i, name in enumerate(arg_names):
        if name.endswith("_ptr"):
            signature[name] = pointers[name[:-len("_ptr")]]
            attrs[(i,)] = divisible
        elif name in blocks or name == "INPUT_PRECISION":
            signature[name] = "constexpr"
            constexprs[(i,)] = blocks.get(name, "tf32")
        elif name in set(part.params):
            signature[name] = "fp32"
        elif values is not None and values.get(name) == 1:
            signature[name] = "constexpr"
            constexprs[(i,)] = 1
        else:
            value = (values or {}).get(name)
            signature[name] = "i64" if value is not None and abs(value) >= 2 ** 31 else "i32"
            if value is not None and value % 16 == 0:
                attrs[(i,)] = divisible
    return signature, constexprs, attrs


def launch_values(part, variant, sizes: dict, batch: tuple[int, ...]) -> dict[str, int]:
    """The integers the launcher passes a kernel for contiguous tensors of ``sizes`` with
    leading (batch) dims ``batch``: strides (0 where a tensor broadcasts), rank sizes and
    ``let`` sizes, the batch counts ``NB<k>``."""
    import math
    from fractions import Fraction

    values = {r: sizes[r] for r in part.sizes if r in sizes}
    for name, code, _ in variant.lets:  # M0 = 64, M1 = ceiling(M/M0), a split's W
        if name == variant.split:
            values[name] = 16
        else:
            try:
                values[name] = int(eval(code, {"math": math, "Fraction": Fraction}, dict(values)))  # noqa: S307
            except (NameError, TypeError, ZeroDivisionError):
                pass
    full = (1,) * (MAX_BATCH - len(batch)) + tuple(batch)
    values.update({f"NB{k}": full[k] for k in range(1, MAX_BATCH)})
    tensors = [(name, ranks) for _, name, ranks in part.args]
    tensors += [(name, ranks) for _, name, ranks, _ in part.outputs]
    for name, ranks in tensors:
        core = [values.get(r, sizes.get(r, 16)) for r in ranks]
        for k in range(len(ranks)):
            values[f"stride_{name}_{k}"] = math.prod(core[k + 1:])
        for k in range(MAX_BATCH):
            lead = math.prod(full[k + 1:]) * math.prod(core)
            values[f"stride_{name}_b{k}"] = lead if full[k] != 1 else 0
    return values


def _state(part, sizes: dict, namespace: dict) -> int:
    """The launcher's ``state`` for a kernel: its loop-state floats per row."""
    from .numpy_backend import pyname

    values = {pyname(r): v for r, v in sizes.items()}
    try:
        return int(eval(part.state, {"_pow2": namespace["_pow2"]}, values))  # noqa: S307
    except (NameError, TypeError):
        return 1


def _rows(part, sizes: dict) -> int:
    """The rows the launcher's row blocks cover (``part.rows``: ``P``, ``P * G`` packed,
    ``G`` when the rows are a group's heads)."""
    from .numpy_backend import pyname

    if not part.row:
        return 1
    try:
        return int(eval(part.rows, {}, {pyname(r): v for r, v in sizes.items()}))  # noqa: S307
    except (NameError, TypeError):
        return sizes.get(part.row, 1)


def _row_volume(part, variant, sizes: dict) -> int:
    """The launcher's ``volume`` for a kernel: the widest block's elements per row."""
    if not part.row_blocks:
        return 1
    return max(math.prod(part.tile_size if r == part.tile else 16 if r == variant.split
                         else max(16, _pow2(sizes.get(r, 64))) for r in lay)
               for lay in part.row_blocks)


def _flag_value(launch: str, sizes: dict) -> bool | int:
    """A kernel flag as the launcher sets it (``launch``: ``bool(factor > 0)``, or a page
    size's ``int(...)``) where the sizes decide it (a page alignment, ``int(PG % 64 == 0)``);
    True where a parameter does (a positive scale, as the defaults)."""
    try:
        return eval(launch, {"__builtins__": {"int": int, "bool": bool}}, dict(sizes))  # noqa: S307 - our code
    except (NameError, TypeError, ZeroDivisionError):
        return True


def _jobs(spec, part, variant, sizes: dict, dtype: str, config: dict, arg_names,
          batch: tuple[int, ...] = ()) -> dict:
    dtypes = {name: dt for _, name, _, dt in spec.args}
    pointers = {py: (POINTER[dtypes.get(name)] if dtypes.get(name) not in (None, "f32", "f16", "bf16")
                     else FLOAT_POINTER[dtype]) for py, name, _ in part.args}
    pointers.update({py: "*fp32" if work else FLOAT_POINTER[dtype]
                     for py, _, _, work in part.outputs})
    blocks = {}
    for r in part.vector:
        if r == part.tile:
            blocks[f"BLOCK_{r}"] = part.tile_size
        elif r == part.row:
            blocks[f"BLOCK_{r}"] = config["block"]
        elif r == variant.split:
            blocks[f"BLOCK_{r}"] = 16
        else:
            blocks[f"BLOCK_{r}"] = _pow2(sizes.get(r, 64))
    flags = {flag: _flag_value(launch, sizes) for flag, _, launch in part.flags}
    signature, constexprs, attrs = kernel_signature(
        part, arg_names, pointers, dict(blocks, **flags), launch_values(part, variant, sizes, batch))
    return dict(kernel=part.kernel, signature=signature,
                constexprs={str(k[0]): v for k, v in constexprs.items()},
                attrs={str(k[0]): v for k, v in attrs.items()},
                num_warps=config["num_warps"], num_stages=config.get("num_stages", 2),
                blocks=blocks)


def kernel_report(spec_path: str | Path, sizes: dict[str, int], dtype: str = "bf16",
                  arch: int = 90, name: str | None = None,
                  variants: tuple[str, ...] | None = None,
                  grad: bool = False) -> list[KernelReport]:
    """Compile every kernel of the spec's definitions (or of ``name``; of the variant kinds
    ``variants``, e.g. ``("fused",)``) for ``sm_<arch>`` with the configuration the launcher
    picks at ``sizes`` and count its SASS.  Sizes of names that are no rank of a definition
    (``B=4,H=16`` for ``Q[P,E]``) are its leading batch dims, in order; tensors are
    contiguous.  ``grad``: the backward program's stages too (``NAME_backward_<i>``, each
    stage's kernels; the adjoints and saved statistics take the sizes of what they adjoin)."""
    from ..frontends import parse_file
    from . import backward_tiles, choose_form, compile_module

    if dtype not in FLOAT_POINTER:
        raise ValueError(f"dtype {dtype!r}: one of {', '.join(FLOAT_POINTER)}")
    module = parse_file(spec_path)
    stem = Path(spec_path).stem
    stages, files = compile_module(module, "triton", stem, backward=grad)
    text = files[f"{stem}.py"]
    options: dict = {"tile": 64}
    if grad:  # the stages with the tiles the compiled module gave them
        from .backward_chain import programs_for, with_stages

        backward_programs = programs_for(module, "triton", {"tile": 64})
        options["tiles"] = backward_tiles(module, backward_programs, "triton", None)
        module = with_stages(module, backward_programs)
    programs = choose_form(module, stages, "triton", options)[1].programs
    with tempfile.TemporaryDirectory(prefix="attnc_kernels_") as tmp:
        return _compile_and_count(text, stem, programs, sizes, dtype, arch, name, variants,
                                  Path(tmp))


def _with_lets(defn, sizes: dict) -> dict:
    """``sizes`` with the definition's ``let`` sizes they determine (a chunk ``M0 = 16``,
    ``M1 = ceil(M/M0)``), so a let rank's block is its size, not a default."""
    import sympy

    from ..einsum_ir.ir import size_symbol

    out = dict(sizes)
    for let in defn.lets:
        value = sympy.sympify(let.value).subs({size_symbol(k): v for k, v in out.items()})
        if value.is_number and let.name not in out:
            out[let.name] = int(math.ceil(float(value)))
    return out


def _compile_and_count(text, stem, programs, sizes, dtype, arch, name, variants,
                       tmp: Path) -> list[KernelReport]:
    """:func:`kernel_report`'s work, in the scratch folder ``tmp`` (module, cubins)."""
    import triton

    from . import triton_backend

    path = tmp / f"{stem}_aot.py"
    path.write_text(text)
    namespace: dict = {}
    exec(compile(text, str(path), "exec"), namespace)  # noqa: S102 - our generated module
    jobs, meta = [], []
    for program in (q for p in programs for q in (p.parts or (p,))):
        if name is not None and program.cascade.name.split("__")[0] != name:
            continue
        spec = triton_backend.kernel_spec(program)
        known = _with_lets(program.cascade, sizes)
        for variant in spec.variants:
            if variants is not None and variant.kind not in variants:
                continue
            for part in variant.kernels:
                if not part.define:
                    continue
                rows = _rows(part, known)
                head = max([known.get(r, 64) for r in part.vector if r not in
                            (part.row, part.tile, variant.split)] or [64])
                itemsize = 4 if dtype == "f32" else 2
                config = namespace["_config"](rows, head, SimpleNamespace(type="cuda"), itemsize,
                                              volume=_row_volume(part, variant, known),
                                              state=_state(part, known, namespace))
                fn = namespace[part.kernel]
                names = list(inspect.signature(getattr(fn, "fn", fn)).parameters)
                ranks = set(spec.input_ranks) | {let[0] for let in variant.lets}
                batch = tuple(v for k, v in sizes.items() if k not in ranks)
                job = _jobs(spec, part, variant, known, dtype, config, names, batch)
                jobs.append(job)
                meta.append((part, variant, job))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE, str(path),
                           json.dumps([{k: v for k, v in j.items() if k != "blocks"} for j in jobs]),
                           str(arch), str(tmp)], capture_output=True, text=True, env=env,
                          timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"compiling for sm_{arch} failed:\n{done.stderr[-3000:]}")
    results = json.loads(done.stdout.strip().splitlines()[-1])
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    out = []
    for (part, variant, job), res in zip(meta, results):
        sass = subprocess.run([str(cuobjdump), "-sass", res["cubin"]], capture_output=True,
                              text=True).stdout
        usage = subprocess.run([str(cuobjdump), "-res-usage", res["cubin"]], capture_output=True,
                               text=True).stdout
        regs = re.search(r"REG:(\d+)", usage)
        stack = re.search(r"STACK:(\d+)", usage)  # spilled registers live on the stack
        res["registers"] = res["registers"] or (int(regs.group(1)) if regs else None)
        res["spills"] = res["spills"] if res["spills"] is not None else (
            int(stack.group(1)) if stack else None)
        out.append(KernelReport(
            kernel=part.kernel, variant=variant.kind, grid=", ".join(part.grid) or "-",
            blocks=job["blocks"], num_warps=job["num_warps"], num_stages=job["num_stages"],
            registers=res["registers"], spill_bytes=res["spills"], shared_bytes=res["shared"],
            main_loop=main_loop_counts(sass)))
    return out


# ----------------------------------------------------------------------------
# the CUDA backend: nvcc -cubin of the instances the torch launcher would build
# ----------------------------------------------------------------------------

# opt-in shared memory per block (bytes) by compute capability (the CUDA programming
# guide's table), what the launcher's _smem_limit reads from the device
SMEM_OPTIN = {70: 96 * 1024, 75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024,
              89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024, 120: 99 * 1024}
SPLIT_WORKERS = 16  # a split's worker count W (the launcher's depends on the GPU's SMs)
_TORCH_DTYPE = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}


class ReportUnavailable(RuntimeError):
    """The CUDA report cannot run here or at these sizes (no nvcc or cuobjdump; blocks
    that do not fit the target's shared memory): the user's to fix, not a bug."""


@dataclass
class CudaJob:
    """One kernel instance to compile: its spec, its variant, the launcher's blocks."""

    spec: object      # cuda_backend.KernelSpec
    variant: object   # cuda_backend.Variant
    blocks: dict      # rank -> block size, as the launcher's _<kernel>_blocks returns them
    smem: int         # dynamic shared memory: the launcher's mirror of <kernel>_cfg::bytes


def cuda_kernel_report(spec_path: str | Path, sizes: dict[str, int], dtype: str = "bf16",
                       arch: int = 90, name: str | None = None,
                       variants: tuple[str, ...] | None = None) -> list[KernelReport]:
    """Compile every kernel the CUDA backend's ``.cu`` defines for the spec's definitions
    (or ``name``'s; of the variant kinds ``variants``) for ``sm_<arch>`` with ``nvcc
    -cubin``, one instance each: the element type of ``dtype`` and the blocks the generated
    launcher picks at ``sizes`` (ranks ``--size`` omits: 64, as the Triton report; a split's
    worker count: :data:`SPLIT_WORKERS`; the target's opt-in shared memory, no device
    asked), the launcher's flags (f32: ``-DATTNC_F32_IEEE`` unless ``ATTNC_CUDA_F32=tf32``);
    count its tile loop (:func:`tile_loop_counts`) and read registers, stack and static
    shared memory from ``cuobjdump -res-usage``.  Needs torch (the launcher) and nvcc."""
    from ..frontends import parse_file
    from . import compile_module, lower_stages

    if dtype not in _TORCH_DTYPE:
        raise ValueError(f"dtype {dtype!r}: one of {', '.join(_TORCH_DTYPE)}")
    if arch not in SMEM_OPTIN:
        raise ReportUnavailable(f"sm_{arch}: the CUDA report knows the shared memory of "
                                f"sm_{', sm_'.join(map(str, SMEM_OPTIN))}")
    module = parse_file(spec_path)
    stem = Path(spec_path).stem
    stages, files = compile_module(module, "cuda", stem)
    programs = lower_stages(stages, "cuda", {"tile": 64}).programs
    with tempfile.TemporaryDirectory(prefix="attnc_kernels_cuda_") as tmp:
        launcher = _cuda_launcher(files, stem, SMEM_OPTIN[arch], Path(tmp))
        jobs = _cuda_jobs(programs, launcher, sizes, dtype, name, variants)
        return _compile_cuda_jobs(jobs, files[f"{stem}.cu"], launcher, dtype, arch, Path(tmp))


def _cuda_launcher(files: dict, stem: str, smem_limit: int, tmp: Path) -> dict:
    """The generated torch launcher's namespace, its device query replaced: the shared
    memory limit is the target's (``_smem_limit`` asks ``torch.cuda`` otherwise)."""
    for file, text in files.items():
        (tmp / file).write_text(text)
    path = tmp / f"{stem}.py"
    namespace: dict = {"__file__": str(path), "__name__": f"attnc_kernels_{stem}"}
    exec(compile(files[f"{stem}.py"], str(path), "exec"), namespace)  # noqa: S102 - ours
    namespace["_smem_limit"] = lambda device, emulate: smem_limit
    return namespace


def _cuda_jobs(programs, launcher: dict, sizes: dict, dtype: str, name, variants) -> list[CudaJob]:
    """Per kernel a definition's variants define (a kernel two variants share, the split-K
    combine, once), the blocks and shared memory the launcher gives it at ``sizes``."""
    import torch

    from .cuda_backend import def_spec

    torch_dtype = getattr(torch, _TORCH_DTYPE[dtype])
    jobs = []
    for program in (q for p in programs for q in (p.parts or (p,))):
        if name is not None and program.cascade.name.split("__")[0] != name:
            continue
        spec = def_spec(program)
        for variant in spec.variants:
            if variants is not None and variant.kind not in variants:
                continue
            known = _variant_sizes(launcher, program.cascade, spec.input_ranks, variant, sizes)
            for k in (k for k in variant.kernels if k.define):
                try:
                    blocks = launcher[f"_{k.name}_blocks"](known, None, torch_dtype, False)
                except launcher["_NoFit"] as err:
                    raise ReportUnavailable(str(err)) from None
                smem = launcher[f"_{k.name}_smem"](blocks, torch_dtype.itemsize)
                jobs.append(CudaJob(k, variant, blocks, smem))
    return jobs


def _variant_sizes(launcher: dict, defn, input_ranks, variant, sizes: dict) -> dict:
    """The sizes by name (``_s``) the launcher gives a variant's kernels: the input ranks
    (64 where ``sizes`` has none), the definition's lets, then the variant's own (a split's
    worker count W is :data:`SPLIT_WORKERS`, its tiles per worker ``MT`` follow),
    evaluated with the launcher's code."""
    from .numpy_backend import pyname

    known = _with_lets(defn, {**{r: 64 for r in input_ranks}, **sizes})
    for _, code, _, let in variant.lets:
        if let == variant.split:
            known[let] = SPLIT_WORKERS
        elif let not in known:
            scope = {pyname(k): v for k, v in known.items()}
            try:
                known[let] = int(eval(code, launcher, scope))  # noqa: S307 - generated code
            except (NameError, TypeError, ValueError, ZeroDivisionError):
                pass
    return known


def _compile_cuda_jobs(jobs: list[CudaJob], source: str, launcher: dict, dtype: str,
                       arch: int, tmp: Path) -> list[KernelReport]:
    """Compile the jobs' instances (as many at once as there are cores) and count them."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    tag, ctype = launcher["_ELEMENT"][getattr(torch, _TORCH_DTYPE[dtype])]
    try:
        nvcc = launcher["_compiler"](False)
    except RuntimeError as err:
        raise ReportUnavailable(str(err)) from None
    flags = ["-std=c++17", "-O3", f"-arch=sm_{arch}", "-cubin", *launcher["_defines"](tag, False)]

    def build(job: CudaJob) -> Path:
        return _nvcc_cubin(nvcc, flags, source, job, tag, ctype, tmp)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        cubins = list(pool.map(build, jobs))
    cuobjdump = _cuobjdump(nvcc)
    return [_cuda_kernel(job, cubin, cuobjdump) for job, cubin in zip(jobs, cubins)]


def _nvcc_cubin(nvcc: str, flags: list, source: str, job: CudaJob, tag: str, ctype: str,
                tmp: Path) -> Path:
    """One instance as the launcher's ``_library`` builds it (the .cu without its default
    instances, one ``ATTNC_ENTRY_<kernel>`` line), compiled to a cubin."""
    kernel = job.spec.name
    blocks = ", ".join(str(job.blocks[b]) for b in job.spec.blocks)
    src, out = tmp / f"{kernel}_entry.cu", tmp / f"{kernel}.cubin"
    src.write_text(f"#define ATTNC_NO_DEFAULT_INSTANCES\n{source}\n"
                   f"ATTNC_ENTRY_{kernel}({tag}, {ctype}, {blocks})\n")
    done = subprocess.run([nvcc, *flags, "-o", str(out), str(src)], capture_output=True,
                          text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"nvcc failed on {kernel}_kernel ({tag}, {blocks}):\n"
                           f"{done.stderr[-3000:]}")
    return out


def _cuobjdump(nvcc: str) -> str:
    """The toolkit's ``cuobjdump`` (beside nvcc, or on PATH), else Triton's bundled one."""
    import shutil

    beside = Path(nvcc).parent / "cuobjdump"
    for cand in (str(beside) if beside.exists() else None, shutil.which("cuobjdump")):
        if cand:
            return cand
    try:
        import triton
    except ImportError:
        raise ReportUnavailable("cuobjdump not found (beside nvcc, on PATH, or in triton)") \
            from None
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


_FUNCTION = re.compile(r"Function\s*:?\s*(\w+):?[ \t]*\n")


def function_section(text: str, kernel: str) -> str:
    """The part of a ``cuobjdump`` listing (``-sass`` or ``-res-usage``) about ``kernel``,
    whose mangled name holds its length and name (``21causal_softmax_kernel``); the whole
    listing when no function name matches."""
    parts = _FUNCTION.split(text)
    for i in range(1, len(parts) - 1, 2):
        if f"{len(kernel)}{kernel}" in parts[i]:
            return parts[i + 1]
    return text


def _cuda_kernel(job: CudaJob, cubin: Path, cuobjdump: str) -> KernelReport:
    """The report of one compiled instance."""
    from .cuda_backend import THREADS

    kernel = f"{job.spec.name}_kernel"

    def dump(option: str) -> str:
        done = subprocess.run([cuobjdump, option, str(cubin)], capture_output=True, text=True)
        return function_section(done.stdout, kernel)

    usage = dump("-res-usage")

    def resource(key: str) -> int | None:
        found = re.search(rf"\b{key}:(\d+)", usage)
        return int(found.group(1)) if found else None

    order = list(job.spec.blocks) + [r for r in job.blocks if r not in job.spec.blocks]
    return KernelReport(
        kernel=kernel, variant=job.variant.kind, grid=", ".join(job.spec.grid) or "-",
        blocks={f"BLOCK_{r}": job.blocks[r] for r in order}, num_warps=THREADS // 32,
        num_stages=None, registers=resource("REG"), spill_bytes=resource("STACK"),
        shared_bytes=job.smem,
        main_loop=tile_loop_counts(dump("-sass"), depth=int(job.spec.persistent)),
        backend="cuda", threads=THREADS, static_shared_bytes=resource("SHARED"))


def render_kernel_report(reports: list[KernelReport]) -> str:
    """One row per kernel: the Triton report's columns, or the CUDA report's (threads, the
    tile loop's nested loops, barriers, shared and generic memory operations)."""
    cuda = any(r.backend == "cuda" for r in reports)
    head, rows = (_cuda_table if cuda else _triton_table)(reports)
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in [head] + rows]
    return "\n".join(lines) + "\n"


def _blocks_text(r: KernelReport) -> str:
    return " ".join(f"{k[6:]}={v}" for k, v in r.blocks.items())


def _triton_table(reports: list[KernelReport]) -> tuple[list[str], list[list[str]]]:
    head = ["kernel", "variant", "blocks", "warps", "stages", "regs", "stack", "smem",
            "loop SASS", "path", "MMA", "MUFU", "wgmma waits", "waits", "loads", "local"]
    rows = []
    for r in reports:
        loop = r.main_loop
        rows.append([r.kernel, r.variant, _blocks_text(r),
                     str(r.num_warps), str(r.num_stages), str(r.registers), str(r.spill_bytes),
                     str(r.shared_bytes), str(loop.instructions), str(loop.path), str(loop.mma),
                     str(loop.mufu),
                     str(loop.wgmma_waits), str(loop.waits), str(loop.global_loads),
                     str(loop.local_memory)])
    return head, rows


def _cuda_table(reports: list[KernelReport]) -> tuple[list[str], list[list[str]]]:
    """``smem``: the dynamic shared memory, ``+`` the static; the tile loop's columns count
    its SASS once (a nested loop's body runs more often: ``inner loops``)."""
    head = ["kernel", "variant", "threads", "blocks", "regs", "stack", "smem", "tile-loop SASS",
            "inner loops", "HMMA", "MUFU", "BAR.SYNC", "LDS/STS", "LD/ST generic",
            "LDG+LDGSTS", "DEPBAR", "local"]
    rows = []
    for r in reports:
        loop = r.main_loop
        smem = f"{r.shared_bytes}" + (f"+{r.static_shared_bytes}" if r.static_shared_bytes else "")
        rows.append([r.kernel, r.variant, str(r.threads), _blocks_text(r), str(r.registers),
                     str(r.spill_bytes), smem, str(loop.instructions), str(loop.inner_loops),
                     str(loop.mma), str(loop.mufu), str(loop.bar_syncs),
                     f"{loop.shared_loads}/{loop.shared_stores}", str(loop.generic_memory),
                     str(loop.global_loads), str(loop.waits), str(loop.local_memory)])
    return head, rows


def report_json(reports: list[KernelReport]) -> str:
    return json.dumps([asdict(r) for r in reports], indent=2)
