"""The CUDA C++ backend: one ``__global__`` kernel per tile program, plus a torch launcher.

Like the Triton backend, the kernel is rendered from the tile program (no
FlashAttention template with hooks), and it reuses that backend's analysis:
the rank roles of ``classify_ranks`` (row / tile / grid / vector ranks), the
blocked copies turned into loads, and presence terms that make absent elements
follow the contract.  What differs is how a block value lives on the GPU:

* one thread block of ``ATTNC_THREADS`` threads owns ``BLOCK_<row>`` rows of
  one batch element and one value of each grid rank, and loops over the live
  key tiles (``tile_lo_ .. tile_hi_``, from the update guards);
* loads become shared-memory tiles (coalesced, bounds-checked, zero-filled);
  loop-invariant ones (the query block) are loaded once, before the loop; where the
  tensor is contiguous and 16-byte aligned along the tile's last dim (checked once per
  kernel) they are 16-byte ``cp.async`` copies, and a tile loop's K/V-like loads are
  issued a tile ahead into a ring of two stages (``STAGES_``, one where two do not fit):
  the copies of tile m1 + 1 fly while tile m1 computes;
* where bound-tiles found an affine range of full tiles, the tile body is compiled twice
  (``FULL_`` true / false): on full tiles the ``where`` tests that hold there and the
  key range test fold away;
* a statement is rendered as a C expression over *index variables*
  (``i_p``, ``i_m0``, ...) and evaluated by an element-wise loop over the elements a
  thread owns.  In a kernel with rows and a tile loop (:attr:`KernelRenderer.fragments`)
  a value over ``[row, x]`` is spread as mma.sync's accumulators: 64 rows per block,
  warp w owning the 16-row groups w, w + 4, ...; in a group lane l holds
  ``(l/4, 8j + 2(l%4) + {0,1})`` and ``(l/4 + 8, ...)`` of each 8-wide column slice j
  (``attnc_frag_row`` / ``attnc_frag_col``), and a value over ``[row]`` the rows of those
  fragments, two per group.  Other layouts (and combines) use the flat spread: thread
  ``t`` owns elements ``t, t + T, t + 2T, ...``.  The online state uses the mapping of its
  layout, so it stays in registers (``r_rnv[k_]``) and is mirrored to shared memory only
  where another loop shape reads it;
* a sum over one rank of two 2-D operands (``Q·Kᵀ``, ``P·V``) runs on tensor cores:
  into a fragment (``attnc_mma_frag``: ldmatrix + mma.m16n8k16 for f16/bf16, tf32
  mma.m16n8k8 or exact FMA per fragment element for f32), with a row operand the tile
  computed taken from its registers (``attnc_mma_frag_areg``: P of P·V, no shared round
  trip) and a state update ``X = product + rest`` accumulating the product into the
  state's registers (:meth:`KernelRenderer.chained_update`); elsewhere through shared
  tiles (``nvcuda::wmma``, f32 accumulate: 16×16×16 for f16/bf16 inputs, tf32 16×16×8
  for f32 inputs, sm_80+; ``-DATTNC_F32_IEEE``, which the launcher passes unless
  ``ATTNC_CUDA_F32=tf32``: exact fp32 FMA instead), an operand that is not a loaded tile
  first converted into a shared tile of the input element type (``scalar_t``);
* reductions along the columns of a fragment fold a thread's elements, then its quad
  (two shuffles: no shared memory, no barrier); other reductions use one warp per output
  element (shuffle reductions); both compute "some point present" alongside the value
  when presence needs it;
* a value's presence is a conjunction of boolean terms (ranges, in-bounds
  tests, ``where`` filters, "any" buffers of reductions); an update not
  computed carries the state, absent outputs are stored as 0.

Before → after (one statement, in a kernel of fragments)::

    SLD[m1,p] = sum[m0](SLN[m1,m0,p])
    ->
    float r_sum_7[ATTNC_FRAG_ROWS(BLOCK_P)];
    for (int k_ = 0; k_ < ATTNC_FRAG_ROWS(BLOCK_P); ++k_) r_sum_7[k_] = 0.0f;
    for (int k_ = 0; k_ < ATTNC_FRAG(BLOCK_P, BLOCK_M0); ++k_) {
      const int i_p = attnc_frag_row<BLOCK_M0>(k_, warp_, lane_);
      const int i_m0 = attnc_frag_col<BLOCK_M0>(k_, lane_);
      if (((row0_ + i_p) < P) && (...where...) && (...in bounds...))
        r_sum_7[attnc_frag_slot<BLOCK_M0>(k_)] += r_sln_6[k_];
    }
    for (int k_ = 0; k_ < ATTNC_FRAG_ROWS(BLOCK_P); ++k_) r_sum_7[k_] = attnc_quad_sum(r_sum_7[k_]);

Split-K decode (``build_variant``): beside the streamed kernel, each definition whose loop
splits gets the variant of ``split_k(defn, 2)``: a per-worker streamed kernel (grid rank W,
tiles ``w * MT + mt``) storing the final states into an fp32 workspace, and a combine kernel
without a tile loop that runs the epilogue with W as an in-block reduced rank
(``_combine_program`` of the Triton backend).  W and MT are sizes passed at launch.

Stream-K decode (``build_stream_variant``): a persistent worker kernel renders the
definition's own tile program (epilogue removed) inside a loop over the "units" (what one
block of the streamed kernel owns: a row block, a batch element, a value of each grid rank).
Block ``wid_`` of ``SK_WORKERS`` takes the global tiles ``[wid*G / SK_WORKERS,
(wid+1)*G / SK_WORKERS)`` of the ``G = n_row * SK_UNITS * M1`` tiles numbered unit by unit,
runs each unit's segment, and stores the final states into the split-K workspace at slot
``wid - (first worker of the unit)``; the split-K combine kernel, unchanged, reduces over
W = the slots.  The launcher fills the workspace with the states' constant initial values
first, so a slot no segment writes acts as a worker that saw no tile (no constant init: no
stream-K variant).  Before → after (the streamed kernel → the worker)::

    int pid_ = blockIdx.x; <grid, batch indices>; row0_ = blockIdx.y * BLOCK_P;
    <inits>; tile_lo_ = lo; tile_hi_ = hi; <tile loop>; <store AV>
    ->
    for (long long unit_ = g_start_ / M1; unit_ < (g_end_ + M1 - 1) / M1; ++unit_) {
      seg_first_ = ...; seg_stop_ = ...; slot_ = ...;
      int pid_ = (int)(unit_ / n_row_); <grid, batch indices>;
      row0_ = (int)(unit_ % n_row_) * BLOCK_P;
      <inits>; tile_lo_ = max(lo, seg_first_); tile_hi_ = min(hi, seg_stop_); <tile loop>
      <store RM, RD, RNV at [slot_, h, p, ...]>
      __syncthreads();  // the next unit reuses the shared buffers
    }

The launcher chooses per call (``_variant``): the streamed kernel when its grid has at least
one block per SM or fewer than 4 tiles per row; else stream-K (about two persistent blocks
per SM, at least 2 tiles each), else split-K (workers from the grid and the SM count).
``ATTNC_STREAM_K=N`` forces stream-K with N workers, ``ATTNC_SPLIT=N`` split-K with N (1: none).

The generated ``.cu`` also compiles as plain C++ with ``-DATTNC_HOST_EMULATION``: a
block's threads run as fibers on one host thread, switching at ``__syncthreads`` and at
warp collectives, which are emulated warp by warp from the PTX ISA's layouts (shuffles,
votes, ``ldmatrix``, ``mma.sync``).  The launcher runs it on CPU tensors under
``ATTNC_CUDA_EMULATE=1``, which lets tests check the generated indexing, masks, tile
bounds and fragment layouts against the interpreter without a GPU.  Inputs are emulated
as float32; with ``ATTNC_CUDA_EMULATE_16BIT=1`` bfloat16 inputs keep 16-bit tiles (the
ldmatrix / mma.m16n8k16 path).  For f32 inputs under ``ATTNC_CUDA_F32=tf32`` the emulation
rounds the matrix-product operands to tf32 as the tensor cores do
(``-DATTNC_EMULATE_TF32``); by default both are exact fp32.
"""
from __future__ import annotations

import dataclasses
import math
from functools import cached_property
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import jinja2

from .. import __version__
from ..einsum_ir.exprs import free_ranks, walk
from ..einsum_ir.ir import (Access, Binary, Call, Const, Definition, Einsum, Expr, Index,
                            IterativeEinsum, Num, Param, Reduce, Size, Unary)
from ..einsum_ir.kernel import (ROW_FIRST, ROW_LAST, Kernel, KernelModule, Program,
                                RankRoles as Ranks, TileBounds)
from ..einsum_ir.printer import format_number, print_definition, print_statement
from ..passes.capabilities import refuse_unsupported_subscripts
from ..passes.tile import NotTileable, TileProgram
from ..passes.tile_loads import expanded_body
from .kernel_common import (KernelValue, Term, TileRendererBase, _indirect, _integer_affine,
                            _merge_terms, _nonneg, chain_spec, constant_code, default_code,
                            in_own_range, plan_reads, py_literal, rendered_kernels)
from .numpy_backend import pyname, size_code

TEMPLATES = Path(__file__).resolve().parent.parent / "templates" / "cuda"
MAX_BATCH_DIMS = 4
ALIGN = 128            # bytes: every shared buffer starts on this boundary
ROW_BLOCKS = (64, 32, 16)
FRAGMENT_ROWS = (64,)  # a block of register fragments: 16 rows per warp (mma.sync's)
THREADS = 128
STATE_PER_THREAD = 64   # register-state floats per thread beyond which ptxas may spill

_C_KEYWORDS = frozenset("""
auto break case char const continue default do double else enum extern float for goto if inline
int long register restrict return short signed sizeof static struct switch typedef union unsigned
void volatile while bool true false class namespace template typename this new delete operator
private public protected virtual friend using catch try throw constexpr nullptr""".split())

# element types of shared buffers: C type -> (bytes, skew of the last dim)
_ELEM = {"scalar_t": ("sizeof(scalar_t)", 8), "float": ("4", 4), "uint8_t": ("1", 0),
         "int32_t": ("4", 0), "int64_t": ("8", 0), "bool": ("1", 0), "double": ("8", 0),
         "__half": ("2", 0), "__nv_bfloat16": ("2", 0)}
_DTYPE_C = {"f32": "float", "f64": "double", "i32": "int32_t", "i64": "int64_t", "bool": "bool",
            "f16": "__half", "bf16": "__nv_bfloat16"}
_STATE_REF = re.compile(r"\$S\{(\w+)\}")
STAGES = "STAGES_"      # the template parameter (a "block") of a double-buffered kernel's ring depth
AHEAD = "(BLOCK_STAGES_ > 1 ? 1 : 0)"  # copy groups a tile's wait leaves in flight
_SHARED_NAME = re.compile(r"(?<!\.)\bs_[A-Za-z0-9_]+")  # (not a stride: a.s_K)
_DECLARED = re.compile(r"\b(?:float|int|bool|long long|scalar_t|uint8_t)\s*\*?\s+([A-Za-z_]\w*)\s*[=\[;]")


class CudaUnsupported(NotTileable):
    """The tile program uses something this renderer cannot express (the message says what)."""


def cname(name: str) -> str:
    """A user name as a C identifier that cannot collide with the kernel's own (``x_`` names)."""
    if name in _C_KEYWORDS or name.endswith("_") or name.startswith("attnc") or name == "a":
        return f"{name}_u"
    return name


@dataclass(frozen=True)
class Buffer:
    """A shared-memory array over ``layout`` (row-major, the last dim skewed)."""

    name: str
    layout: tuple[str, ...]
    ctype: str
    region: str          # "main" (before and in the loop) or "post" (after it)
    stages: int = 1      # 2: a tile load double-buffered (the next tile's copy in flight)


@dataclass(frozen=True)
class CVal(KernelValue):
    """A value: a C expression over the index variables of ``layout``, with presence terms."""

    buf: Buffer | None = None     # the 16-bit tile it was loaded into (a tensor-core operand)


def _conj(codes) -> str | None:
    codes = list(dict.fromkeys(c for c in codes if c))
    if not codes:
        return None
    return codes[0] if len(codes) == 1 else "(" + " && ".join(codes) + ")"


def _float_literal(v: float) -> str:
    text = format_number(float(v))
    if text in ("inf", "-inf"):
        return "INFINITY" if text == "inf" else "(-INFINITY)"
    if "e" not in text and "." not in text:
        text += ".0"
    return text + "f"


@dataclass
class KernelRenderer(TileRendererBase):
    """Renders one tile program as the body of a CUDA kernel (lines of C++)."""

    Unsupported = CudaUnsupported
    Value = CVal
    FUNCTIONS = {"exp": "expf({x})", "exp2": "exp2f({x})", "log": "logf({x})",
                 "log2": "log2f({x})", "sqrt": "sqrtf({x})", "rsqrt": "rsqrtf({x})",
                 "tanh": "tanhf({x})", "sigmoid": "(1.0f / (1.0f + expf(-{x})))",
                 "abs": "fabsf({x})", "relu": "fmaxf({x}, 0.0f)"}
    MINMAX = "f{fn}f({a}, {b})"
    OUTER_FACTORS = True  # sum[e](Q K) * exp(CG[p] - CG[m]): the MMA, then the factor
    IMAX, IMIN = "attnc_imax", "attnc_imin"
    ROW_NAMES = {ROW_FIRST: "row0_", ROW_LAST: "p_last_"}

    tp: TileProgram
    lines: list[str] = field(default_factory=list)
    count: int = 0
    memo: dict = field(default_factory=dict)
    ranks: Ranks | None = None        # the kernel's rank roles (map-ranks)
    bounds: TileBounds | None = None  # its tile ranges (bound-tiles)
    outputs: tuple | None = None      # what the kernel stores (default: the definition's outputs)
    slot: str | None = None           # a stream-K worker: the workspace rank indexed by ``slot_``
    flat: bool = False                # the flat spread everywhere (no register fragments)

    def __post_init__(self):
        self.defn = self.tp.cascade
        self.loads, self.body = expanded_body(self.tp)
        if self.outputs is None:
            self.outputs = tuple(self.defn.outputs)
        self.inputs = {a.name: a for a in self.defn.tensor_args}
        self.values: dict[str, CVal] = {}
        self.state_layout: dict[str, tuple[str, ...]] = {}
        self.buffers: dict[str, Buffer] = {}
        self.used_in: dict[str, set[str]] = {}
        self.hoisted: list[str] = []
        self.hoisted_memo: dict = {}
        self.in_loop = False
        self.phase = "pre"
        self.dirty = False
        self.async_pending = False     # 16-byte copies in flight that the next barrier waits for
        self.prefetch_pending = False  # this tile's prefetched copies not yet waited for
        self.hoisted_async = False     # a copy among the loads hoisted before the loop
        self.can_prefetch = False      # in a tile loop whose loads may run a tile ahead
        self.prefetches: list[tuple[Buffer, list[str]]] = []
        self.full_split = False        # the body is specialised for full tiles (FULL_)
        self.vector_flags: dict[str, str] = {}
        self.temporaries: set[str] = set()  # register values that are not loop state
        self.pending: dict = {}  # fragment products not emitted yet: name -> lines(target, acc)
        self.program_flags: dict[str, str] = {}  # a test of the program's indices -> its flag
        self.fragment_products = 0  # products rendered into register fragments
        self.loop_start = 0
        self.indent = 1
        self.uses = self._count_uses()
        self.check_supported()

    # --- helpers --------------------------------------------------------------------
    def emit(self, line: str) -> None:
        if self.phase == "post":  # a load made before the loop and read after it stays
            for name in _SHARED_NAME.findall(line):  # (its code may come from before)
                if name in self.used_in:
                    self.used_in[name].add("post")
        self.lines.append("  " * self.indent + line if line else "")

    def block(self, r: str) -> str:
        return f"BLOCK_{r}"

    def size(self, r: str) -> str:
        return cname(r)

    def ivar(self, r: str) -> str:
        return f"i_{r.lower()}"

    def count_code(self, layout) -> str:
        return " * ".join(self.block(r) for r in layout) or "1"

    @cached_property
    def fragments(self) -> bool:
        """Whether [row, x] values live in mma.sync fragments: a kernel with rows and a tile
        loop (streamed, split-K and stream-K workers) whose [row, x] state passes the
        register budget (:meth:`fragment_state`).  A combine has no tile loop and keeps the
        flat spread (its [rows, workers, x] tiles sit in shared memory, at 16 to 64 rows);
        so does a kernel that runs no product into a fragment (:func:`kernel_spec` renders it
        again flat: a decode whose rows are the value dim took 4677 instructions per tile
        with fragments against 2679 flat)."""
        return (not self.flat and self.ranks.row is not None and self.ranks.loop is not None
                and self.fragment_state() <= STATE_PER_THREAD)

    def fragment_state(self) -> int:
        """Floats per thread of the [row, x] loop state as fragments of 64 rows at a head
        dim of 128 (the bf16 instance): one output state (64) fits beside the tile's S and
        P fragments; differential's two spilled 12 to 40 bytes on sm_80."""
        row = self.ranks.row
        total = 0
        for st in self.tp.inits:
            lay = tuple(r for r in self.ranks.vector if r in st.lhs)
            if len(lay) == 2 and lay[0] == row:
                total += FRAGMENT_ROWS[0] * (self.tp.tile_size if lay[1] == self.ranks.tile
                                             else 128) // THREADS
        return total

    def fragment_kind(self, layout) -> str | None:
        """How registers over ``layout`` are spread over the threads: "rx" for [row, x] (the
        mma.sync accumulator layout, a warp's 16-row groups), "r" for [row] (each thread its
        fragments' rows), None for the flat spread (thread t: elements t, t + T, ...)."""
        row = self.ranks.row
        if not self.fragments or not layout or layout[0] != row or len(layout) > 2:
            return None
        return "rx" if len(layout) == 2 else "r"

    def reg_count(self, layout) -> str:
        """Registers per thread of a value over ``layout``."""
        kind = self.fragment_kind(layout)
        if kind == "rx":
            return f"ATTNC_FRAG({self.block(layout[0])}, {self.block(layout[1])})"
        if kind == "r":
            return f"ATTNC_FRAG_ROWS({self.block(layout[0])})"
        return f"ATTNC_CEIL({self.count_code(layout)})"

    def program_flag(self, code: str) -> str:
        """A test over the program's grid indices and sizes alone, computed once per program
        (``const bool pf_N_``) instead of in every element's mask: an integer division by a
        runtime divisor (``attnc_floordiv(idx_h, G) < HK``) in a fragment's unrolled loop
        was 64 divisions per tile.  A test reading the tile loop's index stays inline."""
        loop = self.ranks.loop.lower() if self.ranks.loop else None
        if loop and re.search(rf"\b{loop}\b", code):
            return code
        if code not in self.program_flags:
            self.program_flags[code] = f"pf_{len(self.program_flags) + 1}_"
        return self.program_flags[code]

    def temporary(self, prefix: str, layout) -> str:
        """A register array over ``layout`` for a value made in the tile (not a state)."""
        name = self.new(f"r_{prefix}")
        self.state_layout[name] = tuple(layout)
        self.temporaries.add(name)
        self.emit(f"float {name}[{self.reg_count(layout)}];")
        return name

    def _count_uses(self) -> dict[str, int]:
        out: dict[str, int] = {}  # (an init may read an input: a sink starts a running max)
        for st in self.body + self.tp.epilogue + self.tp.prologue + self.tp.inits:
            for e in (st.expr, st.where):
                for n in walk(e) if e is not None else ():
                    if isinstance(n, Access):
                        out[n.tensor] = out.get(n.tensor, 0) + 1
        for o in self.outputs:
            out[o.name] = out.get(o.name, 0) + 1
        return out

    def check_supported(self):
        vec = set(self.ranks.vector)
        for st in self.body + self.tp.epilogue + self.tp.prologue:
            for red in walk(st.expr):
                if isinstance(red, Reduce) and not set(red.ranks) <= vec:
                    extra = (" after the loop (a second pass over the keys)"
                             if st in self.tp.epilogue else "")
                    raise CudaUnsupported(f"reduction over grid rank(s) "
                                          f"{','.join(sorted(set(red.ranks) - vec))} in {st.tensor}{extra}")
        if len(self.ranks.vector) > 4:
            raise CudaUnsupported(f"{len(self.ranks.vector)} vector ranks "
                                  f"({', '.join(self.ranks.vector)}); at most 4 fit in shared memory")
        if self.ranks.tile is not None and (self.tp.tile_size or 0) % 16:
            raise CudaUnsupported(f"tile size {self.ranks.tile} = {self.tp.tile_size} is not a "
                                  f"multiple of 16 (tensor-core tiles)")
        for st in self.tp.epilogue:
            for n in walk(st.expr):
                if isinstance(n, Access) and n.tensor in self.tp.local | self.tp.kept and \
                        n.tensor not in self.tp.state:
                    raise CudaUnsupported(f"{st.tensor} reads the loop's {n.tensor} after the loop")

    # --- shared buffers -----------------------------------------------------------------
    def buffer(self, prefix: str, layout, ctype: str) -> Buffer:
        region = "post" if self.phase == "post" else "main"
        buf = Buffer(self.new(f"s_{prefix}"), tuple(layout), ctype, region)
        self.buffers[buf.name] = buf
        self.used_in[buf.name] = {self.phase}
        return buf

    def at(self, buf: Buffer) -> str:
        """The element of ``buf`` at the current index variables."""
        self.used_in[buf.name].add(self.phase)
        lay = buf.layout
        if not lay:
            return f"{buf.name}[0]"
        lin = self.ivar(lay[0])
        for r in lay[1:-1]:
            lin = f"({lin}) * {self.block(r)} + {self.ivar(r)}"
        if len(lay) > 1:
            lin = f"({lin}) * cfg::LD_{buf.name} + {self.ivar(lay[-1])}"
        return f"{buf.name}[{lin}]"

    def ld(self, buf: Buffer) -> str:
        return f"cfg::LD_{buf.name}"

    # --- loops ---------------------------------------------------------------------
    def sync_if_dirty(self):
        """A barrier before reading shared memory written since the last one; copies still
        in flight are waited for first (this tile's prefetched ones: all but the next
        tile's group)."""
        if self.dirty:
            if self.async_pending:
                self.emit("attnc_cp_wait<0>();")
            elif self.prefetch_pending:  # this tile's copies (the next tile's may fly)
                self.emit(f"attnc_cp_wait<{AHEAD}>();")
            self.async_pending = self.prefetch_pending = False
            self.emit("__syncthreads();")
            self.dirty = False

    def decode(self, src: str, layout, rem: str, body: str | None = None) -> list[str]:
        """Index variables of ``layout`` from a flat index (only those ``body`` uses)."""
        used = [r for r in layout if body is None or re.search(rf"\b{self.ivar(r)}\b", body)]
        if not used:
            return []
        if len(layout) == 1:
            return [f"const int {self.ivar(layout[0])} = {src};"]
        first = min(layout.index(r) for r in used)
        out = [f"int {rem} = {src};"]
        for j in range(len(layout) - 1, 0, -1):
            r = layout[j]
            if r in used:
                out.append(f"const int {self.ivar(r)} = {rem} % {self.block(r)};")
            if first < j:
                out.append(f"{rem} /= {self.block(r)};")
        if layout[0] in used:
            out.append(f"const int {self.ivar(layout[0])} = {rem};")
        return out

    def resolve(self, code: str, layout, registers: bool) -> str:
        """Replace state references: registers where the loop maps elements like the state."""
        def sub(m):
            name = m.group(1)
            if name in self.pending:  # a product is emitted where it is first read
                self.flush(name)
            lay = self.state_layout[name]
            if not lay:
                return name
            if registers and lay == tuple(layout):
                return f"{name}[k_]"
            if registers and self.fragment_kind(layout) == "rx" and lay == tuple(layout[:1]):
                return f"{name}[attnc_frag_slot<{self.block(layout[1])}>(k_)]"
            return self.at(self.mirror(name))
        return _STATE_REF.sub(sub, code)

    def mirror(self, name: str) -> Buffer:
        """A shared copy of register state ``name`` (written once per phase / tile)."""
        key = ("mirror", name)
        if key not in self.memo:
            lay = self.state_layout[name]
            buf = self.buffer(f"{name}{'_out' if self.phase == 'post' else ''}", lay, "float")
            self.elementwise(lay, [f"{self.at(buf)} = {name}[k_];"], reads_shared=False)
            self.dirty = True
            self.memo[key] = buf
        return self.memo[key]

    def elementwise(self, layout, body: list[str], reads_shared: bool = True) -> None:
        """Run ``body`` for every element of ``layout`` a thread owns: its fragment's
        (:meth:`fragment_kind`), else elements t, t + T, ... of thread t."""
        body = [self.resolve(b, layout, True) for b in body]
        if reads_shared and any(_SHARED_NAME.search(b) for b in body):
            self.sync_if_dirty()  # (a body of registers and global loads needs no barrier)
        if not layout:
            self.emit("{")
            for b in body:
                self.emit("  " + b)
            self.emit("}")
            return
        kind = self.fragment_kind(layout)
        if kind is not None:
            text = "\n".join(body)
            if "[k_]" in text or "(k_)" in text:
                self.emit("#pragma unroll")
            self.emit(f"for (int k_ = 0; k_ < {self.reg_count(layout)}; ++k_) {{")
            for ln in self.fragment_decode(layout, text) + body:
                self.emit("  " + ln)
            self.emit("}")
            return
        n = self.count_code(layout)
        if any("[k_]" in b for b in body):
            self.emit("#pragma unroll")
        self.emit(f"for (int k_ = 0; k_ < ATTNC_CEIL({n}); ++k_) {{")
        self.emit(f"  const int idx_ = tid_ + k_ * ATTNC_THREADS;")
        self.emit(f"  if (idx_ < {n}) {{")
        for ln in self.decode("idx_", layout, "rem_", "\n".join(body)) + body:
            self.emit("    " + ln)
        self.emit("  }")
        self.emit("}")

    def fragment_decode(self, layout, body: str) -> list[str]:
        """The index variables of element ``k_`` of a thread's fragment over ``layout``."""
        out = []
        r = layout[0]
        if re.search(rf"\b{self.ivar(r)}\b", body):
            out.append(f"const int {self.ivar(r)} = " + (
                f"attnc_frag_row<{self.block(layout[1])}>(k_, warp_, lane_);" if len(layout) == 2
                else "attnc_frag_rows_row(k_, warp_, lane_);"))
        if len(layout) == 2 and re.search(rf"\b{self.ivar(layout[1])}\b", body):
            out.append(f"const int {self.ivar(layout[1])} = "
                       f"attnc_frag_col<{self.block(layout[1])}>(k_, lane_);")
        return out

    # --- index variables -------------------------------------------------------------
    def index_code(self, r: str) -> tuple[str, tuple[str, ...]]:
        if self.slot is not None and r == self.slot:
            return "slot_", ()
        if r == self.ranks.loop:
            return r.lower(), ()
        if r in self.ranks.grid:
            return f"idx_{r.lower()}", ()
        if r == self.ranks.row:
            return f"(row0_ + {self.ivar(r)})", (r,)
        return self.ivar(r), (r,)

    def range_term(self, r: str) -> Term | None:
        if r == self.ranks.tile or r == self.ranks.loop or r in self.ranks.grid:
            return None
        code, _ = self.index_code(r)
        return Term(f"({code} < {self.size(r)})", (r,))

    def subscript(self, e: Expr) -> tuple[str, tuple[str, ...]]:
        """An integer-affine expression: (C code, layout)."""
        if isinstance(e, Index):
            return self.index_code(e.rank)
        if isinstance(e, Size):
            return self.size(e.rank), ()
        if isinstance(e, Num):
            return str(int(e.value)), ()
        if isinstance(e, Unary) and e.op == "-":
            c, lay = self.subscript(e.operand)
            return f"(-{c})", lay
        if isinstance(e, Access):  # an index tensor's element: a gather (kernel_common)
            v = self.index_element(e)
            return v.code, v.layout
        if isinstance(e, Binary) and e.op in ("+", "-", "*", "//", "%"):
            a, la = self.subscript(e.left)
            b, lb = self.subscript(e.right)
            lay = self.canon(set(la) | set(lb))
            wide = "64" if _indirect(e) else ""  # index elements are 64-bit
            if e.op in ("//", "%") and not (wide and _nonneg(e.left)):  # C truncates
                return f"attnc_{'floordiv' if e.op == '//' else 'floormod'}{wide}({a}, {b})", lay
            return f"({a} {'/' if e.op == '//' else e.op} {b})", lay
        raise CudaUnsupported(f"subscript {e}")

    # --- loads -----------------------------------------------------------------------
    def ctype(self, name: str) -> str:
        dt = self.inputs[name].dtype
        return "scalar_t" if dt in (None, "f16", "bf16") else _DTYPE_C[dt]

    def hoisted_load(self, e: Access, index: bool = False) -> CVal:
        """A load before the loop: at the body's indent, not touching the loop's sync state."""
        saved = self.dirty, self.indent, self.async_pending
        self.indent, self.async_pending = 1, False
        out = super().hoisted_load(e, index)
        self.hoisted_async = self.hoisted_async or self.async_pending
        self.dirty, self.indent, self.async_pending = saved
        return out

    def emit_load(self, e: Access, index: bool = False) -> CVal:
        """A load of an input: a register for a scalar, else a shared buffer filled by the
        block (see :meth:`TileRendererBase.load`); ``index``: an index tensor's elements,
        read as ``long long``."""
        name = e.tensor
        arg = self.inputs[name]
        terms, offset, copy_terms = [], [], []
        for k, (sub, rank) in enumerate(zip(e.subscripts, arg.ranks)):
            code, lay = self.subscript(sub)
            terms += self.index_terms(sub)
            offset.append(f"(long long)({code}) * a.s_{name}[{MAX_BATCH_DIMS + k}]")
            if isinstance(sub, Index) and sub.rank == rank:
                t = self.range_term(rank) if rank in self.ranks.vector else None
                if t:
                    terms.append(t)
            elif not in_own_range(sub, rank):  # m % PG over PG: in range
                low = "" if _nonneg(sub) else f"{code} >= 0 && "  # m // PG: never negative
                term = Term(f"({low}{code} < {self.size(rank)})", lay)
                if not lay:  # a test of the program's own indices (K[h // G] over HK)
                    term = Term(self.program_flag(term.code), ())
                if self.full_split and self.in_loop and self.blocked(sub, rank):
                    copy_terms.append(term)  # the copy keeps it; values know it holds
                    term = Term(f"(FULL_ || {term.code})", lay)
                terms.append(term)
        layout = self.canon(set().union(set(), *(free_ranks(s) & set(self.ranks.vector)
                                                 for s in e.subscripts)))
        ctype = self.ctype(name)
        terms = list(_merge_terms(terms))
        if not index and any(_indirect(s) for s in e.subscripts) and len(layout) > 1:
            offset, terms = self.per_key(e, offset, terms)
        addr = f"{cname(name)}[boff_{name} + {' + '.join(offset) or '0'}]"
        mask = _conj([t.code for t in terms if not t.code.startswith("(FULL_ || ")]
                     + [t.code for t in copy_terms])
        if index:
            return self.emit_index_load(name, addr, mask, layout, terms, ctype)
        gathers = any(_indirect(s) for s in e.subscripts)
        if not layout:
            v = self.new(name.lower())
            read = f"attnc_to_float({addr})"
            self.emit(f"const float {v} = {f'{mask} ? {read} : 0.0f' if mask else read};")
            out = CVal(v, (), tuple(terms), loaded=True)
        else:
            buf = self.buffer(name.lower(), layout, ctype)
            zero = f"attnc_from_float<{ctype}>(0.0f)"
            scalar = [f"{self.at(buf)} = {f'{mask} ? {addr} : {zero}' if mask else addr};"]
            last = self.vector_rank(e, layout, terms) if ctype == "scalar_t" else None
            if last is None:
                self.elementwise(layout, scalar, reads_shared=gathers)
            else:
                if gathers:
                    self.sync_if_dirty()
                buf = self.vector_load(e, buf, layout, last, offset, mask, scalar)
            self.dirty = True
            out = CVal(f"attnc_to_float({self.at(buf)})", layout, tuple(terms), loaded=True,
                       buf=buf if ctype == "scalar_t" else None)
        return out

    def per_key(self, e: Access, offset: list[str], terms: list[Term]
                ) -> tuple[list[str], list[Term]]:
        """A gathered tile's address terms and presence that depend on the key alone,
        computed once per key of the tile (one thread a key) instead of in every element
        of the copy and of every block that tests the loaded values' presence.  Before →
        after (a paged cache, ``PG`` a runtime size: a division per element)::

            s_kc[i_m0][i_e] = (m // PG < NB && pt ok && e < E) ? KC[pt * s0 + (m % PG) * s1
                + hk * s2 + e * s3] : 0
            ->
            s_kc_at[i_m0] = pt * s0 + (m % PG) * s1;  s_kc_ok[i_m0] = m // PG < NB && pt ok
            s_kc[i_m0][i_e] = (s_kc_ok[i_m0] && e < E) ? KC[s_kc_at[i_m0] + hk * s2 + e * s3] : 0
        """
        key = self.ranks.tile
        if key is None or not self.in_loop:
            return offset, terms
        vector = set(self.ranks.vector)
        along = [k for k, sub in enumerate(e.subscripts) if free_ranks(sub) & vector == {key}]
        per_key = [t for t in terms if t.layout == (key,) and not t.code.startswith("(FULL_ || ")]
        if not any(key in free_ranks(sub) for k in along for n in walk(e.subscripts[k])
                   if isinstance(n, Access) for sub in n.subscripts):
            return offset, terms  # (an index read once per program, CU[b] + m, streams as is)
        lines, out, kept = [], list(offset), list(terms)
        at = self.buffer(f"{e.tensor.lower()}_at", (key,), "int64_t")
        lines.append(f"{self.at(at)} = {' + '.join(offset[k] for k in along)};")
        for k in along:  # (positions kept: a 16-byte copy rewrites the last one)
            out[k] = f"(long long){self.at(at)}" if k == along[0] else "0LL"
        if len(per_key) > 1:
            ok = self.buffer(f"{e.tensor.lower()}_ok", (key,), "bool")
            lines.append(f"{self.at(ok)} = {_conj([t.code for t in per_key])};")
            kept = [Term(self.at(ok), (key,))] + [t for t in terms if t not in per_key]
        self.elementwise((key,), lines, reads_shared=True)
        self.dirty = True
        return out, kept

    # --- full tiles ----------------------------------------------------------------------
    def blocked(self, sub: Expr, rank: str) -> bool:
        """Whether ``sub`` is the streamed rank's blocked index ``m1 * M0 + m0`` (inside the
        rank on a full tile)."""
        r = self.ranks
        return (rank == self.tp.stream_rank and r.tile is not None and sub ==
                Binary("+", Binary("*", Index(r.loop), Size(r.tile)), Index(r.tile)))

    def filter_term(self, st, scope: set[str]):
        """A ``where`` that holds on every full tile (bound-tiles' ``full_holds``) is
        ``(FULL_ || cond)``: the body is compiled twice, and on full tiles the test folds
        away."""
        t = super().filter_term(st, scope)
        if t is not None and self.full_split and self.in_loop and st.where in self.bounds.full_holds:
            return Term(f"(FULL_ || {t.code})", t.layout)
        return t

    def full_range(self) -> tuple[str, str] | None:
        """[lo, hi) of the tiles that need no mask, where the body can be specialised for
        them: an affine full range (no per-tile data probe, no probed live tiles)."""
        b = self.bounds
        if b is None or b.full is None or b.full_probes or b.live_probes or self.tp.stream_rank is None:
            return None
        return self.bound_code(b.full.lo), self.bound_code(b.full.hi)

    # --- 16-byte loads, a tile ahead ---------------------------------------------------
    def vector_rank(self, e: Access, layout, terms) -> str | None:
        """The rank whose 16-byte runs a tile load may copy whole: the last subscript of
        ``e`` is that rank's own index, the buffer's last dim, read by no other subscript
        and tested by no presence term but its own range (so a run of 8 bf16 / 4 f32
        elements is present or absent as one); None if there is none.  Whether the tensor
        is contiguous and aligned there is decided at run time (:meth:`vector_flag`)."""
        sub = e.subscripts[-1]
        if not (isinstance(sub, Index) and layout and sub.rank == layout[-1]
                and sub.rank in self.ranks.vector and sub.rank != self.ranks.tile):
            return None
        r = sub.rank
        if any(r in free_ranks(s) for s in e.subscripts[:-1]):
            return None
        own = self.range_term(r)
        if any(r in t.layout and t != own for t in terms):
            return None
        return r

    def vector_flag(self, name: str, rank: str) -> str:
        """A block-uniform flag, computed once per kernel: ``name`` may be read in 16-byte
        runs along ``rank`` (stride 1 there, every other stride and the rank's size a
        multiple of the run, the batch element's base 16-byte aligned)."""
        key = f"vec_{name}_{rank.lower()}_"
        if key not in self.vector_flags:
            n = len(self.inputs[name].ranks)
            strides = [f"a.s_{name}[{k}] % vec_ == 0" for k in range(MAX_BATCH_DIMS + n - 1)]
            self.vector_flags[key] = " && ".join(
                [f"attnc_aligned16({cname(name)} + boff_{name})",
                 f"a.s_{name}[{MAX_BATCH_DIMS + n - 1}] == 1", f"{self.size(rank)} % vec_ == 0"]
                + strides)
        return key

    def vector_load(self, e: Access, buf: Buffer, layout, last: str, offset: list[str],
                    mask: str | None, scalar: list[str]) -> Buffer:
        """A tile load in 16-byte copies (``cp.async`` on sm_80+) where the tensor allows it
        at run time, else element by element.  Before → after::

            s_k[i_m0][i_e] = mask ? K[off + i_e * s_K[5]] : 0        (one element a thread)
            ->
            if (vec_K_e_) { ... attnc_cp_async16(&s_k[i_m0][i_e], &K[off + i_e], mask); }
            else { <the element-wise copy> }

        In a tile loop without per-tile probes, a copy that reads nothing the loop computes
        is issued a tile ahead instead (:meth:`render` places it): the buffer gets two
        stages and this point only waits for the tile's copies."""
        flag = self.vector_flag(e.tensor, last)
        n = self.count_code(layout)
        per_row = f"({self.block(last)} / vec_)"
        offset = offset[:-1] + [f"(long long)({self.index_code(last)[0]})"]  # (stride 1)
        addr = f"{cname(e.tensor)}[boff_{e.tensor} + {' + '.join(offset)}]"
        copy = (f"attnc_cp_async16(&{self.at(buf)}, {mask} ? &{addr} : {cname(e.tensor)}, {mask});"
                if mask else f"attnc_cp_async16(&{self.at(buf)}, &{addr}, true);")
        lines = [f"if ({flag}) {{",
                 "  #pragma unroll 1",  # (unrolled, ptxas keeps every copy's address live)
                 f"  for (int k_ = 0; k_ < ATTNC_CEIL({n} / vec_); ++k_) {{",
                 f"    const int idx_ = tid_ + k_ * ATTNC_THREADS;",
                 f"    if (idx_ < {n} / vec_) {{",
                 f"      int vrem_ = idx_;",
                 f"      const int {self.ivar(last)} = (vrem_ % {per_row}) * vec_;"]
        if len(layout) > 1:
            lines.append(f"      vrem_ /= {per_row};")
        lines += ["      " + ln for ln in self.decode("vrem_", layout[:-1], "rem_", copy)]
        lines += [f"      {copy}", "    }", "  }", "} else {"]
        saved_lines, saved_indent, self.lines, self.indent = self.lines, self.indent, [], 1
        self.elementwise(layout, scalar, reads_shared=False)
        lines += self.lines + ["}"]
        self.lines, self.indent = saved_lines, saved_indent
        if self.prefetchable(buf, lines):  # (a ring of one stage loads it here)
            buf = replace(buf, stages=2)
            self.buffers[buf.name] = buf
            self.prefetches.append((buf, lines))
            self.prefetch_pending = True
            self.emit(f"if constexpr (BLOCK_{STAGES} == 1) {{")
            for ln in lines + ["attnc_cp_commit();"]:
                self.emit("  " + ln)
            self.emit("}")
            return buf
        for ln in lines + ["attnc_cp_commit();"]:
            self.emit(ln)
        self.async_pending = True
        return buf

    def prefetchable(self, buf: Buffer, lines: list[str]) -> bool:
        """Whether a tile load may be issued a tile ahead: in a tile loop without per-tile
        probes (:attr:`can_prefetch`), reading no other shared buffer and nothing declared
        in the loop so far (only the tile index, which the issue rebinds to the next)."""
        if not (self.can_prefetch and self.in_loop and self.phase == "loop"):
            return False
        text = "\n".join(lines)
        if set(_SHARED_NAME.findall(text)) - {buf.name}:
            return False
        declared = set(_DECLARED.findall("\n".join(self.lines[self.loop_start:])))
        reads = set(re.findall(r"\b[A-Za-z_]\w*\b", text)) - set(_DECLARED.findall(text))
        return not declared & reads

    def emit_index_load(self, name: str, addr: str, mask, layout, terms, ctype: str) -> CVal:
        """An index tensor's elements for a subscript: a ``long long`` register for a
        scalar, else a shared buffer of its own type (0 where absent)."""
        if not layout:
            v = self.new(name.lower())
            read = f"(long long){addr}"
            self.emit(f"const long long {v} = {f'{mask} ? {read} : 0LL' if mask else read};")
            return CVal(v, (), tuple(terms), loaded=True, is_int=True)
        buf = self.buffer(name.lower(), layout, ctype)
        read = f"{mask} ? {addr} : ({ctype})0" if mask else addr
        self.elementwise(layout, [f"{self.at(buf)} = {read};"], reads_shared=False)
        self.dirty = True
        return CVal(f"((long long){self.at(buf)})", layout, tuple(terms), loaded=True, is_int=True)

    def previous_state(self, t: str) -> CVal:
        """State ``t`` before this step: its ``_prev`` copy (resolved where it is read)."""
        val = self.values[t]
        return dataclasses.replace(val, code=f"$S{{r_{t.lower()}_prev}}")

    # --- expressions --------------------------------------------------------------------
    def number_value(self, e: Num) -> CVal:
        return CVal(_float_literal(e.value), ())

    def constant_value(self, e: Const) -> CVal:
        return CVal("INFINITY" if e.name == "inf" else "3.14159265358979f", ())

    def size_value(self, e: Size) -> CVal:
        return CVal(f"(float){self.size(e.rank)}", ())

    def param_value(self, e: Param) -> CVal:
        return CVal(cname(e.name), ())

    def index_value(self, e: Index) -> CVal:
        code, lay = self.index_code(e.rank)
        return CVal(f"(float){code}", lay)

    def unary(self, e: Unary, st) -> CVal:
        x = self.value(e.operand, st)
        if e.op == "-":
            return CVal(f"(-{self.num(x)})", x.layout, x.terms)
        return CVal(f"(!{x.code})" if x.is_bool else f"({x.code} == 0.0f)", x.layout, x.terms,
                    is_bool=True)

    @staticmethod
    def num(x: CVal) -> str:
        return f"(float){x.code}" if x.is_bool else x.code

    @staticmethod
    def truth(x: CVal) -> str:
        return x.code if x.is_bool else f"({x.code} != 0.0f)"

    def binary(self, e: Binary, st) -> CVal:
        exact = self.int_comparison(e) if e.op in ("<", "<=", ">", ">=", "==", "!=") else None
        if exact is not None:  # integers from index tensors: compared as integers
            ac, la, bc, lb, terms = exact
            return CVal(f"({ac} {e.op} {bc})", self.canon(set(la) | set(lb)), terms, is_bool=True)
        a, b = self.value(e.left, st), self.value(e.right, st)
        lay = self.canon(set(a.layout) | set(b.layout))
        terms = _merge_terms(a.terms, b.terms)
        if e.op in ("and", "or"):
            op = "&&" if e.op == "and" else "||"
            return CVal(f"({self.truth(a)} {op} {self.truth(b)})", lay, terms, is_bool=True)
        if e.op in ("<", "<=", ">", ">=", "==", "!="):
            ac, bc = self.num(a), self.num(b)
            if _integer_affine(e.left) and _integer_affine(e.right):
                ac, bc = self.subscript(e.left)[0], self.subscript(e.right)[0]
            return CVal(f"({ac} {e.op} {bc})", lay, terms, is_bool=True)
        ac, bc = self.num(a), self.num(b)
        if e.op == "**":
            if isinstance(e.right, Num) and float(e.right.value) == 2.0:
                return CVal(f"({ac} * {ac})", lay, terms)
            return CVal(f"powf({ac}, {bc})", lay, terms)
        if e.op == "//":
            return CVal(f"floorf({ac} / {bc})", lay, terms)
        return CVal(f"({ac} {e.op} {bc})", lay, terms)

    def float_code(self, x: CVal, layout) -> str:
        """``x`` as a float (the layout is implicit in the index variables)."""
        return self.num(x)

    def select(self, args: list[CVal], layout, terms) -> CVal:
        return CVal(f"({self.truth(args[0])} ? {self.num(args[1])} : {self.num(args[2])})",
                    layout, terms)

    # --- where filters --------------------------------------------------------------------
    def where_term(self, c: CVal) -> Term:
        """A ``where`` condition's value as a presence term (absent points do not pass)."""
        return Term(_conj([self.truth(c)] + [t.code for t in c.terms]), c.layout)

    # --- reductions -----------------------------------------------------------------------
    def reduction(self, e: Reduce, body: CVal, lay, terms: list[Term]) -> CVal:
        """One warp per output element reduces ``body`` over the reduced ranks of ``lay``
        (see :meth:`TileRendererBase.reduce`); along the columns of a fragment, the
        threads of a quad reduce their registers (:meth:`fragment_reduction`)."""
        red = tuple(r for r in lay if r in e.ranks)
        out = tuple(r for r in lay if r not in e.ranks)
        if self.fragment_kind(lay) == "rx" and red == lay[1:]:
            return self.fragment_reduction(e, body, lay, terms)
        keep = [t for t in terms if not set(t.layout) & set(red)]
        inner = [t for t in terms if set(t.layout) & set(red)]
        ranges = {self.range_term(r) for r in red}
        need_any = bool(inner) and not all(t in ranges for t in inner)
        acc = self.buffer(e.op, out, "float")
        anyb = self.buffer("any", out, "uint8_t") if need_any else None
        fill = {"sum": "0.0f", "max": "(-INFINITY)", "min": "INFINITY"}[e.op]
        step = {"sum": "acc_ += v_;", "max": "acc_ = fmaxf(acc_, v_);", "min": "acc_ = fminf(acc_, v_);"}[e.op]
        code = self.resolve(self.num(body), lay, False)
        # a presence term over ranks outside this reduction's loops (a where on the rows
        # around a sum over e) is the result's presence only: it cannot be read in the loop
        pres = self.resolve(_conj(t.code for t in keep if set(t.layout) <= set(lay)) or "", lay, False)
        pin = self.resolve(_conj(t.code for t in inner) or "", lay, False)
        self.sync_if_dirty()
        n_out, n_red = self.count_code(out), self.count_code(red)
        self.emit(f"// {e.op}[{','.join(r.lower() for r in e.ranks)}]: one warp per output element")
        self.emit(f"for (int o_ = warp_; o_ < {n_out}; o_ += ATTNC_WARPS) {{")
        text = "\n".join([code, pres, pin, self.at(acc)])
        for ln in (self.decode("o_", out, "ro_", text) if out else []):
            self.emit("  " + ln)
        self.emit(f"  float acc_ = {fill};")
        if need_any:
            self.emit("  bool any_ = false;")
        self.emit(f"  for (int j_ = lane_; j_ < {n_red}; j_ += ATTNC_WARP) {{")
        for ln in self.decode("j_", red, "rj_", text):
            self.emit("    " + ln)
        cond = _conj([pres, pin])
        inner_lines = [f"const float v_ = {code};", step] + (["any_ = true;"] if need_any else [])
        if cond:
            self.emit(f"    if ({cond}) {{")
            for ln in inner_lines:
                self.emit("      " + ln)
            self.emit("    }")
        else:
            for ln in inner_lines:
                self.emit("    " + ln)
        self.emit("  }")
        self.emit(f"  acc_ = attnc_warp_{e.op}(acc_);")
        if need_any:
            self.emit("  any_ = attnc_warp_any(any_);")
        self.emit("  if (lane_ == 0) {")
        self.emit(f"    {self.at(acc)} = acc_;")
        if need_any:
            self.emit(f"    {self.at(anyb)} = any_;")
        self.emit("  }")
        self.emit("}")
        self.dirty = True
        out_terms = list(keep)
        if need_any:
            out_terms.append(Term(f"({self.at(anyb)} != 0)", out))
        elif inner:
            out_terms += [Term(f"({self.size(t.layout[0])} > 0)", ()) for t in dict.fromkeys(inner)]
        return CVal(self.at(acc), out, tuple(out_terms))

    def fragment_reduction(self, e: Reduce, body: CVal, lay, terms: list[Term]) -> CVal:
        """``op[x](body[r, x])`` over a fragment: each thread folds its elements into its
        rows' registers, then its quad (the 4 lanes sharing those rows) combines them by two
        shuffles; no shared memory, no barrier.  Before → after::

            for (o_ = warp_; o_ < BLOCK_R; ...) { for (j_ = lane_; ...) acc_ = max(acc_, v_);
                                                  s_max[o_] = attnc_warp_max(acc_); }
            ->
            for (k_ ...) r_max[slot(k_)] = fmaxf(r_max[slot(k_)], v(k_));
            for (k_ ...) r_max[k_] = attnc_quad_max(r_max[k_]);
        """
        out = lay[:1]
        keep = [t for t in terms if lay[1] not in t.layout]
        inner = [t for t in terms if lay[1] in t.layout]
        need_any = bool(inner) and not all(t == self.range_term(lay[1]) for t in inner)
        fill = {"sum": "0.0f", "max": "(-INFINITY)", "min": "INFINITY"}[e.op]
        fold = {"sum": "{a} + {v}", "max": "fmaxf({a}, {v})", "min": "fminf({a}, {v})"}[e.op]
        acc = self.temporary(e.op, out)
        anyr = self.temporary("any", out) if need_any else None
        self.emit(f"// {e.op}[{lay[1].lower()}]: the thread's elements, then its quad")
        self.elementwise(out, [f"{acc}[k_] = {fill};"] + ([f"{anyr}[k_] = 0.0f;"] if anyr else []),
                         reads_shared=False)
        slot = f"attnc_frag_slot<{self.block(lay[1])}>(k_)"
        cond = _conj([t.code for t in keep if set(t.layout) <= set(lay)] + [t.code for t in inner])
        step = [f"{acc}[{slot}] = {fold.format(a=f'{acc}[{slot}]', v=self.num(body))};"]
        if anyr:
            step.append(f"{anyr}[{slot}] = 1.0f;")
        self.elementwise(lay, [f"if ({cond}) {{ {' '.join(step)} }}" if cond else " ".join(step)])
        quad = [f"{acc}[k_] = attnc_quad_{e.op}({acc}[k_]);"]
        if anyr:
            quad.append(f"{anyr}[k_] = attnc_quad_max({anyr}[k_]);")
        self.elementwise(out, quad, reads_shared=False)
        out_terms = list(keep)
        if anyr:
            out_terms.append(Term(f"($S{{{anyr}}} != 0.0f)", out))
        elif inner:
            out_terms += [Term(f"({self.size(t.layout[0])} > 0)", ()) for t in dict.fromkeys(inner)]
        return CVal(f"$S{{{acc}}}", out, tuple(out_terms))

    def dot(self, e: Reduce, st) -> CVal | None:
        """``sum[r](A[a,r] * B[r,b] * c)`` on tensor cores; None when not that shape."""
        m = self.match_dot(e, st)
        if m is None:
            return None
        r, ra, rb = m.r, m.ra, m.rb
        outer = [self.value(f, st) for f in m.outer]
        if not all(set(o.layout) <= {ra, rb} and not o.is_bool for o in outer):
            return None
        c_lay = self.canon({ra, rb})
        if self.fragment_kind(c_lay) == "rx":
            code = self.fragment_dot(m, ra, rb, r, c_lay)
        else:
            code = self.shared_dot(m, ra, rb, r, c_lay)
        terms: tuple[Term, ...] = ()
        for s in m.scalars:
            sv = self.value(s, st)
            code = f"({code} * {self.num(sv)})"
            terms = _merge_terms(terms, sv.terms)
        for o in outer:  # a factor constant along r multiplies the product (GLA's decay)
            code = f"({code} * {self.float_code(o, c_lay)})"
            terms = _merge_terms(terms, o.terms)
        a_terms, b_terms = self.dot_input_terms(m)
        pres = self.dot_presence(a_terms, b_terms, r, ra, rb, c_lay)
        return CVal(code, c_lay, _merge_terms(terms, pres))

    def fragment_dot(self, m, ra: str, rb: str, r: str, c_lay) -> str:
        """``sum[r](A B)`` into registers laid out as mma.sync's accumulators (the warp's
        rows of ``c_lay``); the row operand from registers where it is a fragment the tile
        computed (P of P·V: no shared round trip), else both from shared tiles.  The product
        is emitted where its value is first read (:meth:`flush`), or into the state it
        updates (:meth:`chained_update`)."""
        row, col = c_lay
        x_row, x_col = (m.a, m.b) if row == ra else (m.b, m.a)
        out = self.new("r_dot")
        self.fragment_products += 1
        self.state_layout[out] = tuple(c_lay)
        self.temporaries.add(out)
        kr = self.block(r)
        if not x_row.loaded and tuple(x_row.layout) == (row, r):
            bbuf = self.operand(x_col)
            areg = self.temporary("op", x_row.layout)
            self.elementwise(x_row.layout, [f"{areg}[k_] = {self.zero_filled(x_row)};"])
            b_row = bbuf.layout == (r, col)
            self.used_in[bbuf.name].add(self.phase)
            self.pending[out] = lambda target, acc: [
                f"// {row.lower()}·{r.lower()} (registers) x {r.lower()}·{col.lower()} on tensor cores"
                + (f", into {target}" if acc else ""),
                f"attnc_mma_frag_areg<{self.block(row)}, {self.block(col)}, {kr}, "
                f"{'true' if b_row else 'false'}, {'true' if acc else 'false'}>("
                f"{target}, {areg}, {bbuf.name}, {self.ld(bbuf)});"]
            return f"$S{{{out}}}"
        abuf, bbuf = self.operand(x_row), self.operand(x_col)
        a_row, b_row = abuf.layout == (row, r), bbuf.layout == (r, col)
        for x in (abuf, bbuf):
            self.used_in[x.name].add(self.phase)
        self.pending[out] = lambda target, acc: [
            f"// {row.lower()}·{r.lower()} x {r.lower()}·{col.lower()} on tensor cores, into "
            + (target if acc else "registers"),
            f"attnc_mma_frag<{self.block(row)}, {self.block(col)}, {kr}, "
            f"{'true' if a_row else 'false'}, {'true' if b_row else 'false'}, "
            f"{'true' if acc else 'false'}>({target}, {abuf.name}, {self.ld(abuf)}, "
            f"{bbuf.name}, {self.ld(bbuf)});"]
        return f"$S{{{out}}}"

    def flush(self, name: str, target: str | None = None) -> None:
        """Emit the pending product ``name``: into its own registers, or (``target``) added
        to a state's."""
        call = self.pending.pop(name)
        if target is None:
            self.emit(f"float {name}[{self.reg_count(self.state_layout[name])}];")
        self.sync_if_dirty()  # its shared operands
        for ln in call(target or name, target is not None):
            self.emit(ln)

    def shared_dot(self, m, ra: str, rb: str, r: str, c_lay) -> str:
        """``sum[r](A B)`` into a shared float tile over ``c_lay`` (wmma fragments)."""
        abuf, bbuf = self.operand(m.a), self.operand(m.b)
        cbuf = self.buffer("dot", c_lay, "float")
        self.sync_if_dirty()
        a_row, b_row, c_row = abuf.layout == (ra, r), bbuf.layout == (r, rb), c_lay == (ra, rb)
        flag = lambda x: "true" if x else "false"  # noqa: E731
        self.emit(f"// {'·'.join(x.lower() for x in (ra, r))} x {'·'.join(x.lower() for x in (r, rb))}"
                  f" on tensor cores")
        self.emit(f"attnc_mma<{self.block(ra)}, {self.block(rb)}, {self.block(r)}, {flag(a_row)}, "
                  f"{flag(b_row)}, {flag(c_row)}>({cbuf.name}, {self.ld(cbuf)}, {abuf.name}, "
                  f"{self.ld(abuf)}, {bbuf.name}, {self.ld(bbuf)});")
        for x in (abuf, bbuf, cbuf):
            self.used_in[x.name].add(self.phase)
        self.dirty = True
        return self.at(cbuf)

    def masked_operand(self, x: CVal, filt: Term) -> CVal:
        """``x`` under a ``where`` term (no longer a plain load)."""
        return dataclasses.replace(x, terms=_merge_terms(x.terms, (filt,)), loaded=False)

    def zero_filled(self, x: CVal) -> str:
        """``x`` as a matrix-product operand: 0 where absent or out of range."""
        terms = list(x.terms) + [t for t in (self.range_term(r) for r in x.layout) if t]
        mask = _conj(t.code for t in terms)
        v = self.num(x)
        return f"{mask} ? {v} : 0.0f" if mask else v

    def operand(self, x: CVal) -> Buffer:
        """A 16-bit shared tile holding ``x`` (0 where absent): its load, or a converted copy."""
        if x.loaded and x.buf is not None:
            return x.buf
        key = ("operand", x)
        if key not in self.memo:
            buf = self.buffer("op", x.layout, "scalar_t")
            self.elementwise(x.layout, [f"{self.at(buf)} = attnc_from_float<scalar_t>("
                                        f"{self.zero_filled(x)});"])
            self.dirty = True
            self.memo[key] = buf
        return self.memo[key]

    def both_present(self, a_terms, b_terms, r, ra, rb, layout) -> Term:
        """Some r where both operands are present: a flag per output element, in a buffer
        (see :meth:`TileRendererBase.dot_presence`)."""
        inner = [t for t in _merge_terms(a_terms, b_terms) if r in t.layout]
        buf = self.buffer("anydot", layout, "uint8_t")
        cond = self.resolve(_conj(t.code for t in inner), layout + (r,), False)
        self.sync_if_dirty()
        self.emit(f"// some {r.lower()} where both operands are present")
        self.elementwise(layout, [f"bool any_ = false;",
                                  f"for (int {self.ivar(r)} = 0; {self.ivar(r)} < {self.block(r)} "
                                  f"&& !any_; ++{self.ivar(r)}) any_ = {cond};",
                                  f"{self.at(buf)} = any_;"])
        self.dirty = True
        return Term(f"({self.at(buf)} != 0)", layout)

    def any_term(self, inner: list[Term], ranks: set[str]) -> Term:
        """Whether some point along ``ranks`` has all ``inner`` terms: one warp per output
        element, a flag in a buffer (see :meth:`TileRendererBase.reduce_presence`)."""
        lay = self.canon(set().union(*(set(t.layout) for t in inner)))
        red = tuple(x for x in lay if x in ranks)
        out = tuple(x for x in lay if x not in ranks)
        if self.fragment_kind(lay) == "rx" and red == lay[1:]:  # a fragment: the quads
            anyr = self.temporary("any", out)
            self.elementwise(out, [f"{anyr}[k_] = 0.0f;"], reads_shared=False)
            cond = _conj(t.code for t in inner)
            self.elementwise(lay, [f"if ({cond}) {anyr}[attnc_frag_slot<{self.block(lay[1])}>(k_)] = 1.0f;"])
            self.elementwise(out, [f"{anyr}[k_] = attnc_quad_max({anyr}[k_]);"], reads_shared=False)
            return Term(f"($S{{{anyr}}} != 0.0f)", out)
        buf = self.buffer("any", out, "uint8_t")
        cond = self.resolve(_conj(t.code for t in inner), lay, False)
        self.sync_if_dirty()
        self.emit(f"for (int o_ = warp_; o_ < {self.count_code(out)}; o_ += ATTNC_WARPS) {{")
        for ln in (self.decode("o_", out, "ro_", cond + self.at(buf)) if out else []):
            self.emit("  " + ln)
        self.emit("  bool any_ = false;")
        self.emit(f"  for (int j_ = lane_; j_ < {self.count_code(red)}; j_ += ATTNC_WARP) {{")
        for ln in self.decode("j_", red, "rj_", cond):
            self.emit("    " + ln)
        self.emit(f"    any_ = any_ || {cond};")
        self.emit("  }")
        self.emit("  any_ = attnc_warp_any(any_);")
        self.emit(f"  if (lane_ == 0) {self.at(buf)} = any_;")
        self.emit("}")
        self.dirty = True
        return Term(f"({self.at(buf)} != 0)", out)

    # --- statements -------------------------------------------------------------------
    def lhs_layout(self, st) -> tuple[str, ...]:
        return self.canon(r for r in st.lhs if r in self.ranks.vector)

    def statement(self, st) -> None:
        self.emit(f"// {print_statement(st)}")
        if self.chained_update(st):
            return
        val = self.value(st.expr, st)
        init = isinstance(st, IterativeEinsum) and st.init
        filt = self.filter_term(st, set(st.lhs) - ({st.iter_rank} if init else set()))
        terms = _merge_terms(val.terms, (filt,) if filt else ())
        layout = self.lhs_layout(st)
        code = self.num(val)
        name = f"r_{st.tensor.lower()}"
        if init:
            if terms:
                raise CudaUnsupported(f"the init of {st.tensor} may be absent")
            self.declare_state(name, layout)
            self.elementwise(layout, [f"{name}{'[k_]' if layout else ''} = {code};"])
            self.values[st.tensor] = CVal(f"$S{{{name}}}", layout)
            return
        if isinstance(st, IterativeEinsum):
            mask = _conj(t.code for t in terms)
            target = f"{name}{'[k_]' if layout else ''}"
            self.elementwise(layout, [f"if ({mask}) {target} = {code};" if mask else f"{target} = {code};"])
            self.values[st.tensor] = CVal(f"$S{{{name}}}", layout)
            if layout:
                self.memo.pop(("mirror", name), None)
            return
        calls = any(isinstance(n, (Call,)) or (isinstance(n, Binary) and n.op == "**")
                    for n in walk(st.expr))
        if self.uses.get(st.tensor, 0) > 1 and calls and not val.code.startswith("s_") and \
                self.fragment_kind(layout) is not None:
            name = self.temporary(st.tensor.lower(), layout)
            self.elementwise(layout, [f"{name}[k_] = {code};"])
            self.values[st.tensor] = CVal(f"$S{{{name}}}", layout, terms)
        elif self.uses.get(st.tensor, 0) > 1 and calls and not val.code.startswith("s_"):
            buf = self.buffer(st.tensor.lower(), layout, "float")
            self.elementwise(layout, [f"{self.at(buf)} = {code};"])
            self.dirty = True
            self.values[st.tensor] = CVal(self.at(buf), layout, terms)
        else:
            self.values[st.tensor] = CVal(code, layout, terms, is_bool=False)
        for o in self.stepped_outputs():
            if self.in_loop and o.name == st.tensor:  # a value per step (the chunked scan)
                self.store_output(o)

    def chained_update(self, st) -> bool:
        """A state update ``X[i+1] = D + rest`` whose ``D`` is a pending fragment product read
        nowhere else: the product accumulates into the state's registers (one accumulation
        chain, as ``acc = dot(p, v, acc)``), instead of a register array of its own beside
        the state.  Before → after::

            float r_dot[..]; attnc_mma_frag_areg<.., false>(r_dot, ..);
            for (k_ ..) if (mask) r_rnv[k_] = r_dot[k_] + r_rnv_prev[k_] * prm[slot];
            ->
            for (k_ ..) if (mask) r_rnv[k_] = r_rnv_prev[k_] * prm[slot];
            attnc_mma_frag_areg<.., true>(r_rnv, ..);

        Where ``mask`` fails the product is added all the same, so every term of the mask
        must be one under which that is harmless: the product's own presence (where it
        fails, the product is 0: its operands are zero-filled where absent), a range test of
        the layout's ranks (padding, never stored: rows and columns do not mix) or a
        scalar.  Else (a ``where`` on the update): False, the plain update."""
        if not isinstance(st, IterativeEinsum) or st.init or not isinstance(st.expr, Binary) \
                or st.expr.op != "+":
            return False
        layout = self.lhs_layout(st)
        if self.fragment_kind(layout) != "rx":
            return False
        for dot_side, rest_side in ((st.expr.left, st.expr.right), (st.expr.right, st.expr.left)):
            if not isinstance(dot_side, Access) or self.uses.get(dot_side.tensor, 0) != 1:
                continue
            d = self.value(dot_side, st)
            ref = _STATE_REF.fullmatch(d.code)
            if ref is None or ref.group(1) not in self.pending or tuple(d.layout) != tuple(layout):
                continue
            rest = self.value(rest_side, st)
            filt = self.filter_term(st, set(st.lhs))
            allowed = set(d.terms) | {self.range_term(r) for r in layout}
            terms = _merge_terms(d.terms, rest.terms, (filt,) if filt else ())
            if not all(t in allowed or not t.layout for t in terms):
                return False
            name = f"r_{st.tensor.lower()}"
            mask = _conj(t.code for t in terms)
            target = f"{name}[k_]"
            code = self.num(rest)
            self.elementwise(layout, [f"if ({mask}) {target} = {code};" if mask else f"{target} = {code};"])
            self.flush(ref.group(1), target=name)
            self.values[st.tensor] = CVal(f"$S{{{name}}}", layout)
            self.memo.pop(("mirror", name), None)
            return True
        return False

    def declare_state(self, name: str, layout) -> None:
        self.state_layout[name] = layout
        self.state_layout[f"{name}_prev"] = layout
        self.emit(f"float {name}{f'[{self.reg_count(layout)}]' if layout else ''};")

    # --- tile range from the guards (TileRendererBase.tile_bounds) ------------------------
    def floor_div(self, a: str, b: str) -> str:
        return f"attnc_floordiv({a}, {b})"

    def nonneg_div(self, num: str, den: str) -> str:
        return f"(({num}) / ({den}))"  # C truncates: the floor of a never-negative quotient

    def first_tile(self, k: str, c: str) -> str:
        """The least m1 with ``c*m1 + k >= 0`` (c > 0): ``floor((-k + c - 1) / c)``."""
        return self.floor_div(f"-({k}) + {c} - 1", c)

    def bound_symbol(self, n: str) -> str:
        """A bound's symbol: an index variable (``_m1``), a row or block name, or a size."""
        if n.startswith("_"):
            return self.index_code(n[1:])[0]
        if n.startswith("param_"):
            return cname(n[len("param_"):])
        if n in self.ROW_NAMES:
            return self.ROW_NAMES[n]
        return n if n.startswith("BLOCK_") else self.size(n)

    def float_floor(self, num: str, den: str, offset: int) -> str:
        return f"((int)((float)({num}) / (float)({den})) {'+' if offset >= 0 else '-'} {abs(offset)})"

    def bound_number(self, e) -> str:
        """A non-integer number of a float bound (over a float parameter)."""
        return _float_literal(float(e))

    # --- the whole kernel body ----------------------------------------------------------
    def render(self) -> list[str]:
        r = self.ranks
        for st in self.tp.prologue:
            self.statement(st)
        for st in self.tp.inits:
            self.statement(st)
        if r.loop is None:  # a kernel without a streamed loop (a split-K combine)
            for st in self.tp.epilogue:
                self.statement(st)
            return self.lines
        lo, hi = self.tile_bounds()
        if self.slot is not None:  # a stream-K worker runs its segment of the unit's tiles
            lo, hi = f"attnc_imax({lo}, seg_first_)", f"attnc_imin({hi}, seg_stop_)"
        if self.planned:  # a plan's span of live tiles narrows the range
            lo = f"(use_plan_ ? attnc_imax({lo}, a.plan_span[2 * plan_at_]) : {lo})"
            hi = f"(use_plan_ ? attnc_imin({hi}, a.plan_span[2 * plan_at_ + 1]) : {hi})"
        self.emit(f"const int tile_lo_ = {lo};")
        self.emit(f"const int tile_hi_ = {hi};")
        self.sync_if_dirty()
        outer, self.lines = self.lines, []
        saved_memo, self.memo = self.memo, {}
        self.phase, self.in_loop, self.dirty, self.indent = "loop", True, False, 2
        for t in self.tp.state:
            name = f"r_{t.lower()}"
            lay = self.state_layout[name]
            if lay:
                self.emit(f"float {name}_prev[{self.reg_count(lay)}];")
                self.emit("#pragma unroll")
                self.emit(f"for (int k_ = 0; k_ < {self.reg_count(lay)}; ++k_) "
                          f"{name}_prev[k_] = {name}[k_];")
            else:
                self.emit(f"const float {name}_prev = {name};")
        live = self.block_probe()
        start = len(self.lines)
        self.can_prefetch, self.loop_start = live is None, start
        full = self.full_range()
        self.full_split = full is not None
        for st in self.body:
            self.statement(st)
        self.can_prefetch = self.full_split = False
        if full is not None and any(re.search(r"\bFULL_\b", ln) for ln in self.lines[start:]):
            self.lines[start:] = self.specialised(self.lines[start:], full)
        if live is not None:  # a tile no row of the block can use runs nothing
            pad = "  " * self.indent
            make = []
            if self.planned:  # the planner records the tile's class, and runs no body
                make = [f"{pad}if (make_plan_) {{",
                        f"{pad}  if (tid_ == 0) a.plan_cls[plan_at_ * a.plan_tiles + "
                        f"{r.loop.lower()}] = ({live}) ? 1 : 0;",
                        f"{pad}}} else"]
            self.lines[start:] = (make + [f"{pad}if ({live}) {{"]
                                  + ["  " + ln for ln in self.lines[start:]] + [f"{pad}}}"])
        self.emit("__syncthreads();  // the next tile overwrites this tile's buffers")
        body, self.lines = self.lines, outer
        self.memo, self.in_loop, self.indent = saved_memo, False, 1
        self.lines += self.hoisted
        self.lines += ["  " + ln for ln in self.prefetch_lines("tile_lo_", "(tile_lo_ < tile_hi_)")]
        if self.hoisted:
            if self.hoisted_async:  # the hoisted group, not the first tile's
                self.emit(f"attnc_cp_wait<{AHEAD if self.prefetches else 0}>();")
            self.emit("__syncthreads();")
        m1 = r.loop.lower()
        self.emit(f"for (int {m1} = tile_lo_; {m1} < tile_hi_; ++{m1}) {{")
        for buf, _ in self.prefetches:  # this tile's stage
            self.emit(f"  {buf.name} = {self.stage_pointer(buf, m1)};")
        self.lines += ["    " + ln for ln in self.prefetch_lines(f"{m1} + 1", f"({m1} + 1 < tile_hi_)")]
        self.lines += body
        self.emit("}")
        self.emit("__syncthreads();  // buffers after the loop may reuse the loop's")
        self.phase, self.dirty = "post", False
        self.memo = {}
        for st in self.tp.epilogue:
            self.statement(st)
        return self.lines

    def specialised(self, lines: list[str], full: tuple[str, str]) -> list[str]:
        """The tile body twice, ``FULL_`` true on the full tiles (a block-uniform branch,
        so the barriers inside stay uniform) and false on the partial ones. Before →
        after::

            if ((FULL_ || m1 * M0 + i_m0 <= p)) acc_ += ...
            ->
            if (full_lo_ <= m1 && m1 < full_hi_) { ... if ((true || ...)) acc_ += ... }
            else { ... if ((false || m1 * M0 + i_m0 <= p)) acc_ += ... }
        """
        m1 = self.ranks.loop.lower()
        pad = "  " * self.indent
        flag = re.compile(r"\bFULL_\b")
        return ([f"{pad}if ({full[0]} <= {m1} && {m1} < {full[1]}) {{  // a full tile: no masks"]
                + ["  " + flag.sub("true", ln) for ln in lines] + [f"{pad}}} else {{"]
                + ["  " + flag.sub("false", ln) for ln in lines] + [f"{pad}}}"])

    def stage_pointer(self, buf: Buffer, tile: str) -> str:
        """The stage of a double-buffered tile load that tile ``tile`` uses."""
        return (f"reinterpret_cast<{buf.ctype}*>(smem_ + cfg::off_{buf.name} + "
                f"(({tile}) & (BLOCK_{STAGES} - 1)) * cfg::stage_{buf.name})")

    def prefetch_lines(self, tile: str, live: str) -> list[str]:
        """The copies of tile ``tile``'s prefetched loads into their stage, one group.
        The load code is the loop's own with the tile index and the buffers rebound::

            { const int m1_at_ = m1 + 1;
              if (m1 + 1 < tile_hi_) { const int m1 = m1_at_; scalar_t* s_k = <stage>; <copies> } }
            attnc_cp_commit();
        """
        if not self.prefetches:
            return []
        m1 = self.ranks.loop.lower()
        out = [f"if constexpr (BLOCK_{STAGES} > 1) {{  // the copies of tile {tile}",
               f"  const int {m1}_at_ = {tile};", f"  if ({live}) {{",
               f"    const int {m1} = {m1}_at_;"]
        for buf, lines in self.prefetches:
            out += ["    {", f"      {buf.ctype}* {buf.name} = {self.stage_pointer(buf, m1)};"]
            out += ["      " + ln for ln in lines] + ["    }"]
        return out + ["  }", "  attnc_cp_commit();", "}"]

    def block_probe(self) -> str | None:
        """A block-uniform flag 'some update can change a row of this block on this tile',
        from the data-dependent guards the bound-tiles stage found (a block mask computed per
        tile, reduced by :meth:`any_term` into shared memory, so every thread takes the same
        branch around the tile's barriers); None when only affine guards (tile bounds) apply."""
        r = self.ranks
        probes = self.bounds.live_probes if self.bounds is not None else ()
        if not probes:
            return None
        flags = []
        for conds in dict.fromkeys(probes):
            parts = []
            for cond in conds:
                c = self.value(cond, Einsum("_probe", (), cond))
                lay = self.canon(set(c.layout) | {r.row, r.tile})
                terms = [Term(self.truth(c), c.layout), *c.terms]
                terms += [t for t in (self.range_term(r.row),) if t]
                start = len(self.lines)
                parts.append(self.any_term(terms, set(lay)).code)
                if self.planned:  # a plan's reader skips the reduction (block-uniform)
                    self.lines[start:] = (["if (!use_plan_) {"] + ["  " + ln for ln in self.lines[start:]]
                                          + ["}"])
            flags.append(" && ".join(parts))
        self.sync_if_dirty()
        live = " || ".join(f"({f})" for f in flags)
        if self.planned:
            live = (f"(use_plan_ ? ((a.plan_cls[plan_at_ * a.plan_tiles + {r.loop.lower()}] & 1) != 0)"
                    f" : ({live}))")
        return live

    @property
    def planned(self) -> bool:
        """Whether the kernel probes a block mask per tile, which a plan can hold instead
        (``a.plan_mode``: 0 probe, 1 read the plan, 2 make it)."""
        b = self.bounds
        return (b is not None and bool(b.live_probes) and self.ranks.loop is not None
                and self.ranks.row is not None)

    def store_outputs(self) -> None:
        for o in self.outputs:
            if o not in self.stepped_outputs():  # those are stored in the loop
                self.store_output(o)

    def store_output(self, o) -> None:
        """Store output ``o`` (absent elements as 0); the loop rank indexes by the step."""
        val = self.values[o.name]
        layout = self.lhs_layout(Einsum(o.name, o.ranks, Num(0)))
        present = _conj(t.code for t in val.terms)
        v = self.num(val)
        code = f"{present} ? {v} : 0.0f" if present else v
        offset = [f"(long long){self.index_code(rank)[0]} * a.s_{o.name}[{MAX_BATCH_DIMS + k}]"
                  for k, rank in enumerate(o.ranks)]
        ranges = _conj([t.code for t in (self.range_term(x) for x in layout) if t]
                       # an output without the row rank (a decode's state, when map-ranks
                       # made a head dim the row) is the same in every row block
                       + (["(row0_ == 0)"] if self.ranks.row not in (None, *o.ranks) else []))
        ctype = f"out_{o.name}_t"
        store = (f"{cname(o.name)}[boff_{o.name} + {' + '.join(offset) or '0'}] = "
                 f"attnc_from_float<{ctype}>({code});")
        self.emit(f"// store {o.name}")
        self.elementwise(layout, [f"if ({ranges}) {store}" if ranges else store])


# ----------------------------------------------------------------------------
# shared-memory plan, the kernel around the body, the launcher
# ----------------------------------------------------------------------------


def _smem_plan(kr: KernelRenderer) -> tuple[list[str], list[str]]:
    """Buffer offsets as C ``constexpr`` lines and as the launcher's Python lines.

    Placement: buffers still read after the loop ("pinned") first, then the
    loop's, while buffers made after the loop overlay the loop's (after a barrier).
    """
    groups: dict[str, list[Buffer]] = {"pinned": [], "main": [], "post": []}
    for buf in kr.buffers.values():
        group = "post" if buf.region == "post" else "pinned" if "post" in kr.used_in[buf.name] else "main"
        groups[group].append(buf)
    c_lines, py_lines = [], []
    ends = {}
    prev = "0"
    for group in ("pinned", "main", "post"):
        if group == "post":
            prev = ends.get("pinned", "0")
        for buf in groups[group]:
            bytes_c, skew = _ELEM[buf.ctype]
            bytes_py = "isz" if buf.ctype == "scalar_t" else bytes_c
            lay = buf.layout
            n = buf.name
            if len(lay) >= 2:
                plus = f" + {skew}" if skew else ""
                c_lines.append(f"static constexpr int LD_{n} = BLOCK_{lay[-1]}{plus};")
                elems_c = " * ".join([f"BLOCK_{r}" for r in lay[:-1]] + [f"LD_{n}"])
                elems_py = " * ".join([f"B[{r!r}]" for r in lay[:-1]] + [f"(B[{lay[-1]!r}]{plus})"])
            else:
                elems_c = f"BLOCK_{lay[0]}" if lay else "1"
                elems_py = f"B[{lay[0]!r}]" if lay else "1"
            c_lines.append(f"static constexpr int off_{n} = {prev};")
            if buf.stages > 1:  # a tile load's ring of BLOCK_STAGES_ stages, each aligned
                c_lines.append(f"static constexpr int stage_{n} = attnc_align({elems_c} * (int){bytes_c});")
                c_lines.append(f"static constexpr int end_{n} = off_{n} + BLOCK_{STAGES} * stage_{n};")
                py_lines.append(f"end_{n} = {prev} + B[{STAGES!r}] * _align({elems_py} * {bytes_py})")
            else:
                c_lines.append(f"static constexpr int end_{n} = attnc_align(off_{n} + {elems_c} * (int){bytes_c});")
                py_lines.append(f"end_{n} = _align({prev} + {elems_py} * {bytes_py})")
            prev = f"end_{n}"
            ends[group] = prev
        if group != "post":
            ends.setdefault(group, prev)
    main_end = ends.get("main", ends.get("pinned", "0"))
    post_end = ends.get("post", ends.get("pinned", "0"))
    c_lines.append(f"static constexpr int bytes = attnc_cmax({main_end}, {post_end});")
    py_lines.append(f"return max({main_end}, {post_end})")
    return c_lines, py_lines


@dataclass
class KernelSpec:
    """Everything the templates need for one definition."""

    name: str
    args: list            # (cname, name, ranks, ctype, dtype)
    outputs: list         # (cname, name, ranks, dtype)
    sizes: list           # rank names passed to the kernel (inputs, then lets)
    lets: list            # (pyname, code, text)
    params: list          # (pyname, name, default code or None, cname)
    signature: str
    row: str | None
    grid: tuple
    blocks: list          # template block ranks (the row first), besides the tile
    tile: str | None
    tile_size: int | None
    body: list
    smem_c: list
    smem_py: list
    out_ctypes: list
    state_py: list        # element counts of the register state (Python, over B)
    instances: list       # (tag, C type, block sizes): the default entries of the .cu
    doc: str
    input_ranks: list
    persistent: bool = False  # a stream-K worker: SK_WORKERS blocks, one row of the grid
    define: bool = True       # False: another variant's kernel (the shared split-K combine)
    plan: bool = False        # it probes a block mask per tile: it takes a plan's arguments
    loop: str | None = None   # the rank it loops over (a plan's tile count)
    row_blocks: tuple = ROW_BLOCKS  # the row blocks the launcher may pick


def _kernel_body(kr: KernelRenderer) -> list[str]:
    r = kr.ranks
    defn = kr.defn
    pre = ["const int tid_ = threadIdx.x;", "const int warp_ = tid_ / ATTNC_WARP;",
           "const int lane_ = tid_ % ATTNC_WARP;", "(void)warp_; (void)lane_;",
           "constexpr int vec_ = 16 / (int)sizeof(scalar_t);  // elements of a 16-byte copy",
           "(void)vec_;",
           "ATTNC_DYNAMIC_SMEM(smem_);"]
    used = [a.name for a in defn.tensor_args if kr.uses.get(a.name)]  # a combine reads few
    for a in defn.tensor_args:
        if a.name in used:
            pre.append(f"const {kr.ctype(a.name)}* __restrict__ {cname(a.name)} = "
                       f"static_cast<const {kr.ctype(a.name)}*>(a.ptr_{a.name});")
    for o in kr.outputs:
        pre.append(f"out_{o.name}_t* __restrict__ {cname(o.name)} = static_cast<out_{o.name}_t*>(a.ptr_{o.name});")
    for s in list(dict.fromkeys([x for t in defn.tensor_args for x in t.ranks] + [x.name for x in defn.lets])):
        pre.append(f"const int {cname(s)} = a.size_{s}; (void){cname(s)};")
    for p in defn.scalar_params:
        pre.append(f"const float {cname(p.name)} = a.param_{p.name}; (void){cname(p.name)};")
    stream = kr.slot is not None
    prog = ["int pid_ = (int)(unit_ / n_row_);" if stream else "int pid_ = blockIdx.x;"]
    if kr.planned:  # this program's row block in a plan: [units, row blocks, tiles]
        block = "(unit_ % n_row_)" if stream else "blockIdx.y"
        pre += ["const bool use_plan_ = a.plan_mode == 1;", "const bool make_plan_ = a.plan_mode == 2;",
                "(void)make_plan_;"]
        prog.append(f"const long long plan_at_ = (long long)pid_ * a.plan_rows + (long long){block};")
    for g in reversed(r.grid):
        prog += [f"const int idx_{g.lower()} = pid_ % {cname(g)};", f"pid_ /= {cname(g)};"]
    for k in range(MAX_BATCH_DIMS - 1, 0, -1):
        prog += [f"const int b{k}_ = pid_ % a.NB[{k}];", f"pid_ /= a.NB[{k}];"]
    prog.append("const int b0_ = pid_;")
    for t in used + [o.name for o in kr.outputs]:
        prog.append(f"const long long boff_{t} = " + " + ".join(
            f"(long long)b{k}_ * a.s_{t}[{k}]" for k in range(MAX_BATCH_DIMS)) + ";")
    if r.row:
        if kr.fragments:
            pre.append(f"static_assert(BLOCK_{r.row} % (16 * ATTNC_WARPS) == 0, "
                       f"\"rows in 16-row groups per warp (register fragments)\");")
        block = "(int)(unit_ % n_row_)" if stream else "blockIdx.y"
        prog.append(f"const int row0_ = {block} * BLOCK_{r.row};")
        prog.append(f"const int p_last_ = attnc_imin(row0_ + BLOCK_{r.row}, {cname(r.row)}) - 1;")
        prog.append("(void)p_last_;")
    kr.render()
    _check_outputs(kr)
    kr.store_outputs()
    body = kr.lines
    decl = []
    for name, buf in kr.buffers.items():
        decl.append(f"{buf.ctype}* {name} = reinterpret_cast<{buf.ctype}*>(smem_ + cfg::off_{name});")
    prog += [f"const bool {flag} = {code};" for flag, code in kr.vector_flags.items()]
    prog += [f"const bool {flag} = {code};" for code, flag in kr.program_flags.items()]
    if not stream:
        return ["  " + x for x in pre + prog + decl] + body
    return ["  " + x for x in pre + decl] + _stream_k_lines(kr, prog, body)


def _stream_k_lines(kr: KernelRenderer, prog: list[str], body: list[str]) -> list[str]:
    """A persistent stream-K worker around the streamed kernel's body: block ``wid_`` of
    ``SK_WORKERS`` takes the global tiles ``[wid*G / SK_WORKERS, (wid+1)*G / SK_WORKERS)`` of
    the ``G = n_row * SK_UNITS * M1`` tiles numbered unit by unit (a unit is what one block
    of the streamed kernel owns: a row block, a batch element, a value of each grid rank),
    walks them segment by segment, and stores each segment's final states in slot
    ``wid - (first worker of the unit)`` of the split variant's workspace, whose other
    slots the launcher fills with the states' initial values (``passes.split_k.
    stream_k_schedule`` is the same schedule in Python)."""
    r = kr.ranks
    m1 = cname(r.loop)
    nrow = f"((long long){cname(r.row)} + BLOCK_{r.row} - 1) / BLOCK_{r.row}" if r.row else "1"
    head = ["const long long wid_ = blockIdx.x;",
            "const long long sk_workers_ = a.size_SK_WORKERS;",
            f"const long long n_row_ = {nrow};",
            f"const long long n_tiles_ = n_row_ * a.size_SK_UNITS * {m1};",
            "const long long g_start_ = wid_ * n_tiles_ / sk_workers_;",
            "const long long g_end_ = (wid_ + 1) * n_tiles_ / sk_workers_;",
            f"for (long long unit_ = g_start_ / {m1}; unit_ < (g_end_ + {m1} - 1) / {m1}; ++unit_) {{"]
    seg = [f"const long long unit0_ = unit_ * {m1};",
           "const int seg_first_ = (int)((g_start_ > unit0_ ? g_start_ : unit0_) - unit0_);",
           f"const int seg_stop_ = (int)((g_end_ < unit0_ + {m1} ? g_end_ : unit0_ + {m1}) - unit0_);",
           "const int slot_ = (int)(wid_ + 1 - ((unit0_ + 1) * sk_workers_ + n_tiles_ - 1) / n_tiles_);"]
    tail = ["__syncthreads();  // the next unit reuses the shared buffers"]
    return (["  " + x for x in head] + ["    " + x for x in seg + prog] +
            ["  " + x for x in body] + ["    " + x for x in tail] + ["  }"])


def _check_outputs(kr: KernelRenderer) -> None:
    r = kr.ranks
    why = kr.stepped_blocker()
    if why:
        raise CudaUnsupported(why)
    for o in kr.outputs:
        for rank in o.ranks:
            if rank not in r.vector and rank not in r.grid and rank != kr.slot \
                    and rank != r.loop:
                raise CudaUnsupported(f"output {o.name} has rank {rank}, not in the grid")
        if o.name not in kr.values:
            raise CudaUnsupported(f"output {o.name} is not computed in the kernel")


def kernel_spec(defn: Definition, tp: TileProgram, *, name: str | None = None,
                ranks: Ranks, bounds=None, outputs=None, slot: str | None = None) -> KernelSpec:
    """One kernel: the tile program ``tp`` of ``defn`` with the rank roles and tile bounds
    of the kernel IR, storing ``outputs`` (default: defn's).  ``slot``: a persistent
    stream-K worker storing at slot ``slot_`` of that workspace rank."""
    kr = KernelRenderer(tp, ranks=ranks, bounds=bounds,
                        outputs=None if outputs is None else tuple(outputs), slot=slot)
    body = _kernel_body(kr)
    if kr.fragments and not kr.fragment_products:  # fragments without a product: flat
        kr = KernelRenderer(tp, ranks=ranks, bounds=bounds,
                            outputs=None if outputs is None else tuple(outputs), slot=slot,
                            flat=True)
        body = _kernel_body(kr)
    input_ranks = list(dict.fromkeys(r for a in defn.tensor_args for r in a.ranks))
    lets = [(pyname(let.name), size_code(let.value, True, "math"), str(let.value)) for let in defn.lets]
    params = [(pyname(p.name), p.name, default_code(p.default) if p.default is not None else None,
               cname(p.name)) for p in defn.scalar_params]
    sig = [pyname(a.name) for a in defn.tensor_args]
    if params:
        sig += ["*"] + [p[0] if p[2] is None else f"{p[0]}=None" for p in params]
    blocks = [v for v in kr.ranks.vector if v != kr.ranks.tile]
    blocks += [STAGES] if kr.prefetches else []  # the ring's depth, chosen with the blocks
    smem_c, smem_py = _smem_plan(kr)
    state_py = [" * ".join(f"B[{r!r}]" for r in lay) or "1"
                for name_, lay in _state_layouts(kr)]
    instances = [(tag, ctype, _default_blocks(kr, blocks, head))
                 for tag, ctype, head in (("f16", "__half", 64), ("bf16", "__nv_bfloat16", 128),
                                          ("f32", "float", 64))]
    return KernelSpec(
        name=name or cname(pyname(defn.name)),
        args=[(cname(a.name), a.name, list(a.ranks), kr.ctype(a.name), a.dtype) for a in defn.tensor_args],
        outputs=[(cname(o.name), o.name, list(o.ranks), o.dtype) for o in kr.outputs],
        sizes=list(dict.fromkeys(input_ranks + [let.name for let in defn.lets]))
        + (["SK_UNITS", "SK_WORKERS"] if slot else []), lets=lets,
        params=params, signature=", ".join(sig), row=kr.ranks.row, grid=kr.ranks.grid, blocks=blocks,
        tile=kr.ranks.tile, tile_size=tp.tile_size, body=body, smem_c=smem_c, smem_py=smem_py,
        state_py=state_py, instances=instances,
        out_ctypes=[_DTYPE_C[o.dtype] if o.dtype else "scalar_t" for o in kr.outputs],
        doc=print_definition(defn).rstrip(), input_ranks=input_ranks, persistent=slot is not None,
        plan=kr.planned, loop=kr.ranks.loop,
        row_blocks=FRAGMENT_ROWS if kr.fragments else ROW_BLOCKS)


def _state_layouts(kr: KernelRenderer) -> list[tuple[str, tuple[str, ...]]]:
    """The register state a row block's size is chosen by: each state's layout, twice in a
    loop that stores an output at every step (the chunked scan: the chunk's block it adds
    and the state it stores are register arrays of the state's size beside it; 64 rows of
    a 128-wide state spilled 400 bytes on sm_80 and sm_90)."""
    once = [(n, lay) for n, lay in kr.state_layout.items()
            if not n.endswith("_prev") and n not in kr.temporaries]
    return once * 2 if kr.stepped_outputs() else once


def _default_blocks(kr: KernelRenderer, blocks: list[str], head: int) -> list[int]:
    """Block sizes the launcher picks at head dim ``head`` (shared memory aside): the largest
    row block (a kernel of fragments: 64) whose register state is at most STATE_PER_THREAD floats per thread.  A rank
    that is a constant ``let`` (a split's key tile M0, its worker count W) takes that size."""
    fixed = {let.name: max(16, -(-int(let.value) // 16) * 16) for let in kr.defn.lets
             if getattr(let.value, "is_Integer", False)}
    sizes = {b: 2 if b == STAGES else fixed.get(b, head) for b in blocks}
    for rows in FRAGMENT_ROWS if kr.fragments else ROW_BLOCKS:
        if kr.ranks.row:
            sizes[kr.ranks.row] = rows
        state = sum(-(-math.prod(sizes.get(r, kr.tp.tile_size or 1) for r in lay) // THREADS)
                    for name, lay in _state_layouts(kr))
        if state <= STATE_PER_THREAD:
            break
    return [sizes[b] for b in blocks]


# ----------------------------------------------------------------------------
# variants: one streamed kernel, or a streamed kernel and a combine kernel
# ----------------------------------------------------------------------------


@dataclass
class Variant:
    """A way to compute a definition: kernels in launch order, with their fp32 workspace."""

    kernels: list         # KernelSpec, in launch order
    workspace: list       # (name, ranks): final states the first kernel writes, the combine reads
    lets: list            # (pyname, code, text, name)
    split: str | None     # the worker (stream-K: slot) rank whose size the launcher chooses
    loop_size: str | None  # pyname of the tile count the split divides
    kind: str = "fused"   # "fused", "split" (split-K) or "stream" (stream-K)
    fills: dict = field(default_factory=dict)  # workspace name -> its init value (Python code)


@dataclass
class DefSpec:
    """One definition: its public launcher and the variants it chooses among at run time."""

    name: str             # the C name of its kernels
    pyname: str           # the Python function's name (the definition's)
    args: list            # (cname, name, ranks, ctype, dtype)
    outputs: list         # (cname, name, ranks, dtype)
    params: list          # (pyname, name, default code or None, cname)
    signature: str
    doc: str
    input_ranks: list
    variants: list
    # what a plan (NAME_plan) depends on: (pyname, name) of the tensors and parameters its
    # block-mask probes read; ``planned``: some kernel probes a mask per tile
    plan_tensors: list = field(default_factory=list)
    plan_params: list = field(default_factory=list)
    planned: bool = False


def _outputs_of(k: Kernel) -> list:
    """What kernel ``k`` stores: the definition's outputs (their dtypes), fp32 workspaces."""
    from ..einsum_ir.ir import Output

    declared = {o.name: o for o in k.cascade.outputs}
    return [declared[b.name] if b.kind == "output" and b.name in declared
            else Output(b.name, b.ranks, "f32") for b in k.writes]


def _spec_of(k: Kernel, slot: str | None = None) -> KernelSpec:
    return kernel_spec(k.cascade, k.tiles, name=cname(pyname(k.name)), ranks=k.roles,
                       bounds=k.bounds, outputs=_outputs_of(k), slot=slot)


def _variant(p: Program, v, specs: dict[str, KernelSpec]) -> Variant:
    """One launch variant of the kernel program (a kernel two variants share — the split-K
    combine — is defined once)."""
    ks = [p.kernel(n) for n in v.kernels]
    kernels = rendered_kernels(p, v, specs,
                               lambda k: _spec_of(k, v.split if k.role == "stream-k" else None))
    workspace = [(b.name, list(b.ranks)) for b in ks[0].writes if b.kind == "workspace"]
    lets = [(pyname(let.name), size_code(let.value, True, "math"), str(let.value), let.name)
            for let in p.lets_of(v)]
    loop = ks[0].tiles.loop_rank
    kind = {"split-k": "split", "stream-k": "stream"}.get(v.kind, "fused")
    return Variant(kernels, workspace, lets, v.split if v.kind != "streamed" else None,
                   pyname(loop) if loop else None, kind,
                   {t: constant_code(e) for t, e in ks[0].fills})


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader([str(TEMPLATES), str(TEMPLATES.parent / "common")]),
                              keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True,
                              undefined=jinja2.StrictUndefined)
    env.filters["py"] = py_literal
    return env


def def_spec(p: Program) -> DefSpec:
    """The public launcher of one kernel program and the variants it chooses among."""
    d = p.cascade
    specs: dict[str, KernelSpec] = {}
    try:
        variants = [_variant(p, v, specs) for v in p.variants]
    except CudaUnsupported as err:
        raise CudaUnsupported(f"{d.name}: {err}") from None
    k0 = variants[0].kernels[0]
    return DefSpec(name=cname(pyname(d.name)), pyname=pyname(d.name), args=k0.args,
                   outputs=[(cname(o.name), o.name, list(o.ranks), o.dtype) for o in d.outputs],
                   params=k0.params, signature=k0.signature, doc=print_definition(d).rstrip(),
                   input_ranks=k0.input_ranks, variants=variants,
                   plan_tensors=[(pyname(t), t) for t in plan_reads(p)[0]],
                   plan_params=[(pyname(n), n) for n in plan_reads(p)[1]],
                   planned=any(k.plan for v in variants for k in v.kernels))


def kernel_specs(module: KernelModule) -> list[DefSpec]:
    """One spec per kernel program (a multi-kernel program: one per part)."""
    return [def_spec(q) for p in module.programs for q in (p.parts or (p,))]


def render_files(module: KernelModule, stem: str) -> dict[str, str]:
    """``{stem}.cu`` (kernels) and ``{stem}.py`` (torch launcher); raises CudaUnsupported."""
    refuse_unsupported_subscripts(module, "cuda", CudaUnsupported)
    specs = kernel_specs(module)
    kernels = [k for s in specs for v in s.variants for k in v.kernels if k.define]
    env = _environment()
    ns = f"attnc_{cname(pyname(stem))}"
    common = dict(version=__version__, source=f"{stem}.attn", specs=specs, kernels=kernels, stem=stem,
                  names=[s.name for s in specs], namespace=ns, max_batch=MAX_BATCH_DIMS,
                  row_blocks=ROW_BLOCKS, align=ALIGN)
    common.update(threads=THREADS, state_per_thread=STATE_PER_THREAD)
    common["names"] = [pyname(p.name) for p in module.programs]
    chains = [chain_spec(p, pyname, size_code, print_definition(p.cascade).rstrip())
              for p in module.programs if p.parts]
    launcher = env.get_template("launcher.py.jinja").render(**common)
    return {f"{stem}.cu": env.get_template("kernels.cu.jinja").render(**common),
            f"{stem}.py": launcher + env.get_template("chain.py.jinja").render(chains=chains)}
