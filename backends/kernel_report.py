"""A static kernel-quality report: every Triton kernel of a spec compiled for a GPU target
without a GPU, with the launcher's own configuration, and counted from its SASS.

Per kernel: grid, blocks, warps, stages, registers, stack bytes (spills and local arrays),
shared memory; and for the
main loop (the innermost backward branch holding the most MMA instructions) its SASS
instruction count (all of it, and on its fall-through path: a probed full tile's unmasked
branch), MMA (``HGMMA``/``HMMA``) and MUFU counts, wgmma waits
(``WARPGROUP.DEPBAR``), other scoreboard waits (``DEPBAR``) and global loads.  This is the
performance loop when no GPU is lent (``attnc kernels``, docs/performance.md).

The compile runs in a subprocess without ``TRITON_INTERPRET`` (Triton decides at import
whether ``@triton.jit`` builds interpreted functions).  Triton's bundled ``cuobjdump``
prints the SASS.
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
    """SASS of the main loop, per iteration (one streamed tile)."""

    instructions: int = 0
    path: int = 0          # on the fall-through path (a probed tile's unmasked branch)
    mma: int = 0
    mufu: int = 0
    wgmma_waits: int = 0
    waits: int = 0
    global_loads: int = 0
    local_memory: int = 0


@dataclass
class KernelReport:
    kernel: str
    variant: str
    grid: str
    blocks: dict
    num_warps: int
    num_stages: int
    registers: int | None = None
    spill_bytes: int | None = None
    shared_bytes: int | None = None
    main_loop: LoopCounts = field(default_factory=LoopCounts)


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
        mma = sum(op.startswith(("HGMMA", "HMMA")) for _, op, _ in body)
        key = (mma, -(end - start))
        if best is None or key > best[0]:
            best = (key, body)
    whole = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in _LINE.finditer(sass)]
    if best is None and not whole:
        return LoopCounts()
    body = best[1] if best is not None else whole
    return LoopCounts(
        instructions=len(body), path=fall_through_path(sass, body),
        mma=sum(op.startswith(("HGMMA", "HMMA")) for _, op, _ in body),
        mufu=sum(op.startswith("MUFU") for _, op, _ in body),
        wgmma_waits=sum(op.startswith("WARPGROUP.DEPBAR") for _, op, _ in body),
        waits=sum(op.startswith("DEPBAR") for _, op, _ in body),
        global_loads=sum(op.startswith(("LDG", "LDGSTS", "UTMALDG")) for _, op, _ in body),
        local_memory=sum(op.startswith(("LDL", "STL")) for _, op, _ in body))


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
                  variants: tuple[str, ...] | None = None) -> list[KernelReport]:
    """Compile every kernel of the spec's definitions (or of ``name``; of the variant kinds
    ``variants``, e.g. ``("fused",)``) for ``sm_<arch>`` with the configuration the launcher
    picks at ``sizes`` and count its SASS.  Sizes of names that are no rank of a definition
    (``B=4,H=16`` for ``Q[P,E]``) are its leading batch dims, in order; tensors are
    contiguous."""
    from ..frontends import parse_file
    from . import compile_module, lower_stages

    if dtype not in FLOAT_POINTER:
        raise ValueError(f"dtype {dtype!r}: one of {', '.join(FLOAT_POINTER)}")
    module = parse_file(spec_path)
    stem = Path(spec_path).stem
    stages, files = compile_module(module, "triton", stem)
    text = files[f"{stem}.py"]
    programs = lower_stages(stages, "triton", {"tile": 64}).programs
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
                rows = known.get(part.row, 1) if part.row else 1
                head = max([known.get(r, 64) for r in part.vector if r not in
                            (part.row, part.tile, variant.split)] or [64])
                itemsize = 4 if dtype == "f32" else 2
                config = namespace["_config"](rows, head, SimpleNamespace(type="cuda"), itemsize,
                                              volume=_row_volume(part, variant, known))
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


def render_kernel_report(reports: list[KernelReport]) -> str:
    head = ["kernel", "variant", "blocks", "warps", "stages", "regs", "stack", "smem",
            "loop SASS", "path", "MMA", "MUFU", "wgmma waits", "waits", "loads", "local"]
    rows = []
    for r in reports:
        loop = r.main_loop
        rows.append([r.kernel, r.variant, " ".join(f"{k[6:]}={v}" for k, v in r.blocks.items()),
                     str(r.num_warps), str(r.num_stages), str(r.registers), str(r.spill_bytes),
                     str(r.shared_bytes), str(loop.instructions), str(loop.path), str(loop.mma),
                     str(loop.mufu),
                     str(loop.wgmma_waits), str(loop.waits), str(loop.global_loads),
                     str(loop.local_memory)])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in [head] + rows]
    return "\n".join(lines) + "\n"


def report_json(reports: list[KernelReport]) -> str:
    return json.dumps([asdict(r) for r in reports], indent=2)
