"""The CUDA backend: rendering, nvcc compilation, goldens, the launcher, and emulated numerics.

Without a GPU, three checks stand in for running the kernels:

* every example's ``.cu`` compiles with ``nvcc`` for sm_80 and sm_90 (one nvcc run per
  example, both targets, in parallel, cached by content within the session), and
  ``-Xptxas -v`` shows no register spills in the kernels;
* the same ``.cu`` compiled as plain C++ (``-DATTNC_HOST_EMULATION``, one thread per
  block) through the generated launcher (``ATTNC_CUDA_EMULATE=1``) matches every
  example's numpy reference: this checks the generated indexing, presence masks,
  state carries and tile bounds;
* the launcher's own nvcc path builds a loadable shared library with the entry it
  looks up.
What needs a GPU: tensor-core fragments, warp shuffles, barriers, speed.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from attnc.backends.cuda_backend import CudaUnsupported, render_files
from attnc.passes.lowering import TARGETS, lower_module
from attnc.frontends import parse_file
from attnc.backends import compile_module
from attnc.passes.pipeline import run_pipeline
from attnc.passes.tile import NotTileable

from conftest import EXAMPLES as EXAMPLES_DIR
from conftest import TWO_PASS, all_examples
from example_refs import EXAMPLES, ref_gqa_decode

NVCC = shutil.which("nvcc")
CXX = shutil.which("g++") or shutil.which("c++")
ARCHS = ("sm_80", "sm_90")
# every example compiles (cosine and causal linear attention through the one-pass form: see
# compile_module; online_normalizer_2pass through the stream-final pass)
UNSUPPORTED: dict[str, str] = {}  # examples the backend declines, and why
NO_CONTRACTION = ("paged_decode.attn",)
GOLDEN_EXAMPLES = ("causal.attn", "gqa_decode.attn", "document_mask.attn")
EXAMPLE_IDS = [p.relative_to(EXAMPLES_DIR).as_posix() for p in all_examples()]
SUPPORTED = [p for p in EXAMPLE_IDS if p not in UNSUPPORTED]


def render(path: str, tile: int = 64) -> dict[str, str]:
    """What `attnc compile --backend cuda` writes (the default pipeline, with its fallback)."""
    module = parse_file(EXAMPLES_DIR / path)
    return compile_module(module, "cuda", Path(path).stem, options={"tile": tile})[1]


# --- rendering --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", SUPPORTED)
def test_renders_both_files(path):
    stem = Path(path).stem
    files = render(path)
    assert set(files) == {f"{stem}.cu", f"{stem}.py"}
    cu = files[f"{stem}.cu"]
    # a decode without a query rank (one query per head) has no matrix product to run there
    calls = re.findall(r"\battnc_mma(?:_frag|_frag_areg)?<BLOCK_", cu)  # (not the helpers)
    assert calls or path in NO_CONTRACTION, "no tensor-core contraction in the kernel"
    assert "for (int m1 = tile_lo_" in cu or "for (int e1 = tile_lo_" in cu
    compile(files[f"{stem}.py"], f"{stem}.py", "exec")


def test_unsupported_cascades_say_why():
    """A cascade that stays 2-pass (conftest.TWO_PASS) is declined, saying why."""
    from attnc.frontends import parse

    module = parse(TWO_PASS, "two_pass.attn")
    with pytest.raises(CudaUnsupported, match="grid rank.*M1 in AV_sum after the loop") as info:
        compile_module(module, "cuda", "two_pass")
    assert isinstance(info.value, NotTileable)


def test_split_k_cascade_renders_a_streamed_and_a_combine_kernel():
    """A cascade already split by the split-k pass (W = 4 fixed) renders as two kernels: the
    per-worker loop storing the final states, and the combine reducing over W in-block."""
    module = parse_file(EXAMPLES_DIR / "gqa_decode.attn")
    names = ["canonicalize", "defer-normalization", "reassociate", "online", "split-k"]
    final = run_pipeline(module, names, options={"tile": 64, "workers": 4})[-1][1]
    files = render_files(lower_module(final, TARGETS["cuda"], {"tile": 64, "workers": 4}), "gqa_decode")
    cu = files["gqa_decode.cu"]
    assert "gqa_decode_kernel(const" in cu and "gqa_decode_combine_kernel(const" in cu
    assert "gqa_decode_split_kernel" not in cu, "an already split cascade gets no second split"
    combine = cu[cu.index("gqa_decode_combine_kernel(const"):]
    assert "for (int mt = tile_lo_" not in combine and "// max[w]" in combine
    assert "const float* __restrict__ RM" in combine, "the final states are read as fp32"
    compile(files["gqa_decode.py"], "gqa_decode.py", "exec")


@pytest.mark.parametrize("path", ["gqa_decode.attn", "softmax1.attn", "lse.attn", "causal.attn"])
def test_split_k_and_stream_k_variants_are_rendered_beside_the_streamed_kernel(path):
    """Split-K (per-worker kernel + combine) and stream-K (a persistent worker + the same
    combine, defined once) beside the streamed kernel; the launcher chooses at run time."""
    stem = Path(path).stem
    files = render(path)
    cu, py = files[f"{stem}.cu"], files[f"{stem}.py"]
    name = re.search(r"__global__ void __launch_bounds__\(ATTNC_THREADS, 1\) (\w+)_kernel", cu).group(1)
    for kernel in (name, f"{name}_split", f"{name}_split_combine", f"{name}_stream"):
        assert cu.count(f"{kernel}_kernel(const {kernel}_args a)") == 1, kernel
        assert py.count(f"def _{kernel}_run(") == 1, kernel
    assert "_split_count(" in py and "multi_processor_count" in py and "ATTNC_SPLIT" in py
    assert '_variant(programs, M1, device, ["fused", "split", "stream"])' in py
    assert "ATTNC_STREAM_K" in py and "_stream_slots(_n_tiles, SK_WORKERS, M1)" in py
    worker = cu[cu.index(f"{name}_stream_kernel(const"):]
    worker = worker[:worker.index("\n}\n")]
    assert "for (long long unit_ = g_start_ / M1;" in worker
    assert "attnc_imax(" in worker and ", seg_first_)" in worker and ", seg_stop_)" in worker
    assert "(long long)slot_ * a.s_" in worker, "final states stored at the worker's slot"
    assert worker.rstrip().endswith("__syncthreads();  // the next unit reuses the shared buffers\n  }"), \
        worker[-300:]
    assert "torch.full(" in py, "the workspace starts at the states' initial values"


def test_tile_size_must_suit_tensor_cores():
    with pytest.raises(CudaUnsupported, match="multiple of 16"):
        render("causal.attn", tile=24)


@pytest.mark.parametrize("path", GOLDEN_EXAMPLES)
def test_generated_cuda_golden(path, golden):
    golden(render(path)[f"{Path(path).stem}.cu"])


def test_rendering_is_deterministic():
    assert render("document_mask.attn") == render("document_mask.attn")


# --- nvcc: every example for sm_80 and sm_90 ----------------------------------------------------

_COMPILED: dict[str, tuple[int, str]] = {}


# examples whose decode kernels (split-K: streamed per worker + combine; stream-K: the
# persistent worker) nvcc also compiles; the others skip those instances
# (-DATTNC_NO_SPLIT_INSTANCES) to keep the suite fast
SPLIT_COMPILED = {"gqa_decode.attn", "mqa_decode.attn", "softmax1.attn", "lse.attn", "causal.attn",
                  "differential.attn", "sinks_window.attn", "alibi.attn"}


# examples whose float32 instances (tf32 tensor cores) nvcc also compiles, every variant's
F32_COMPILED = {"causal.attn", "gqa_decode.attn", "differential.attn"}


def _skipped(path: str) -> tuple[str, ...]:
    """The instance groups an example's nvcc run leaves out (``-D<macro>``)."""
    return tuple(m for m, keep in (("ATTNC_NO_SPLIT_INSTANCES", path in SPLIT_COMPILED),
                                   ("ATTNC_NO_F32_INSTANCES", path in F32_COMPILED)) if not keep)


def _instances(source: str, skipped=()) -> list[str]:
    """The default entries nvcc compiles (``ATTNC_ENTRY_<kernel>(TAG, ...)``), less those
    inside ``#ifndef <macro>`` groups (nested) for the ``skipped`` macros."""
    tail = source[source.index("#if !defined(ATTNC_NO_DEFAULT_INSTANCES)"):].splitlines()[1:]
    out, stack = [], []
    for line in tail:
        if line.startswith("#ifndef "):
            stack.append(line.split()[1])
        elif line.startswith("#endif"):
            if not stack:
                break
            stack.pop()
        elif line.startswith("ATTNC_ENTRY_") and not set(stack) & set(skipped):
            out.append(re.match(r"ATTNC_ENTRY_\w+\(\w+", line).group(0))
    return out


def _nvcc(source: str, workdir: Path, skipped=()) -> tuple[int, str]:
    """(return code, nvcc output) of compiling ``source`` for ARCHS, once per content."""
    key = hashlib.sha256((source + " ".join(skipped)).encode()).hexdigest()[:16]
    if key not in _COMPILED:
        src = workdir / f"{key}.cu"
        src.write_text(source)
        gencode = [f for a in ARCHS for f in ("-gencode", f"arch=compute_{a[3:]},code={a}")]
        gencode += [f"-D{m}" for m in skipped]
        done = subprocess.run([NVCC, "-std=c++17", "-O3", "-c", *gencode, "-Xptxas", "-v",
                               "-o", str(workdir / f"{key}.o"), str(src)],
                              capture_output=True, text=True)
        _COMPILED[key] = (done.returncode, done.stdout + done.stderr)
    return _COMPILED[key]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """nvcc results of every supported example, compiled two at a time."""
    if NVCC is None:
        pytest.skip("nvcc is not on PATH (CI has it): the CUDA compile checks need it")
    workdir = tmp_path_factory.mktemp("nvcc")
    sources = {p: render(p)[f"{Path(p).stem}.cu"] for p in SUPPORTED}
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(sources, pool.map(lambda p: _nvcc(sources[p], workdir, _skipped(p)),
                                             sources)))
    return {p: (code, out, _instances(sources[p], _skipped(p))) for p, (code, out) in results.items()}


def ptxas_report(output: str) -> dict[tuple[str, str], tuple[int, int]]:
    """(kernel, arch) -> (registers, spill store bytes) from ``-Xptxas -v`` output."""
    out, current, spills = {}, None, 0
    for line in output.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for '(sm_\d+a?)'", line)
        if m:
            current = m.groups()
        m = re.search(r"(\d+) bytes spill stores", line)
        if m and current:
            spills = int(m.group(1))
        m = re.search(r"Used (\d+) registers", line)
        if m and current:
            out[current] = (int(m.group(1)), spills)
            current, spills = None, 0
    return out


@pytest.mark.parametrize("path", SUPPORTED)
def test_nvcc_compiles_for_sm80_and_sm90_without_spills(path, compiled):
    code, output, instances = compiled[path]
    assert code == 0, output[-3000:]
    report = ptxas_report(output)
    archs = {arch for _, arch in report}
    assert archs == set(ARCHS), output[-2000:]
    kernels = {k for k, _ in report}
    assert len(kernels) == len(instances), "the default f16, bf16 (f32) instances of every kernel"
    f32 = 3 if path in F32_COMPILED else 2
    if path in SPLIT_COMPILED:
        assert sum("_split" in k for k in kernels) == 2 * f32, "split-K: streamed + combine"
        assert sum("_stream_kernel" in k for k in kernels) == f32, "stream-K: the worker"
    if path in F32_COMPILED:
        assert sum("_kernelIf" in k for k in kernels) == (4 if path in SPLIT_COMPILED else 1), \
            "float32 (tf32) instances of every kernel"
    spilled = {k: v for k, v in report.items() if v[1]}
    assert not spilled, f"register spills (kernel, arch) -> (registers, spill bytes): {spilled}"
    assert "warning" not in output.lower(), output[-3000:]


@pytest.mark.parametrize("path", sorted(SPLIT_COMPILED))
def test_nvcc_compiles_the_stream_k_worker_for_sm80_and_sm90(path, compiled, record_property):
    """The persistent stream-K worker (its unit loop around the streamed kernel's body)
    compiles for both targets without spills; its registers go to the report."""
    code, output, _ = compiled[path]
    assert code == 0, output[-3000:]
    report = {k: v for k, v in ptxas_report(output).items() if "_stream_kernel" in k[0]}
    n = 6 if path in F32_COMPILED else 4  # (f16, bf16[, f32]) x (sm_80, sm_90)
    assert {arch for _, arch in report} == set(ARCHS) and len(report) == n, report
    for (kernel, arch), (regs, spill) in sorted(report.items()):
        record_property(f"{arch}:{kernel}", f"{regs} registers, {spill} bytes spilled")
    assert not any(spill for _, spill in report.values()), report


# --- the launcher ----------------------------------------------------------------------------------


def load_launcher(path: str, tmp_path: Path, tile: int = 64):
    stem = Path(path).stem
    for name, text in render(path, tile).items():
        (tmp_path / name).write_text(text)
    spec = importlib.util.spec_from_file_location(f"attnc_cuda_test_{stem}_{tile}", tmp_path / f"{stem}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_launcher_imports_without_gpu_and_rejects_cpu_tensors(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.delenv("ATTNC_CUDA_EMULATE", raising=False)
    mod = load_launcher("causal.attn", tmp_path)
    q = torch.zeros(4, 8, dtype=torch.float16)
    with pytest.raises(ValueError, match="argument 'Q' is on cpu"):
        mod.causal_softmax(q, q, q)
    with pytest.raises(TypeError, match="argument 'Q' must be a torch.Tensor"):
        mod.causal_softmax(np.zeros((4, 8)), q, q)


def test_launcher_validates_under_emulation(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setenv("ATTNC_CUDA_EMULATE", "1")
    mod = load_launcher("causal.attn", tmp_path)
    q = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="argument 'V': rank E|argument 'K': rank E"):
        mod.causal_softmax(q, torch.zeros(4, 9), q)
    with pytest.raises(ValueError, match="argument 'K'.* do not broadcast"):
        mod.causal_softmax(torch.zeros(2, 4, 8), torch.zeros(3, 4, 8), torch.zeros(4, 8))
    with pytest.raises(TypeError, match="parameter 'scale'"):
        mod.causal_softmax(q, q, q, scale="x")


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH (CI has it)")
@pytest.mark.parametrize("path,name,tag,ctype,blocks,f32", [
    # (the last block: the ring of K/V stages, STAGES_)
    # (the first: the row block, 64 rows in 16-row groups per warp for register fragments)
    ("gqa_decode.attn", "gqa_decode", "bf16", "__nv_bfloat16", [64, 80, 80, 2], "tf32"),  # decode, head 80
    ("causal.attn", "causal_softmax", "f16", "__half", [64, 256, 256, 1], "tf32"),          # head 256
    ("causal.attn", "causal_softmax", "f32", "float", [64, 64, 64, 2], "tf32"),             # tf32 mma.sync
    ("causal.attn", "causal_softmax_stream", "f32", "float", [64, 64, 64, 2], "ieee"),      # fp32 FMA
])
def test_launcher_builds_a_loadable_library_with_nvcc(path, name, tag, ctype, blocks, f32, tmp_path,
                                                      monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("ATTNC_CUDA_ARCH", "sm_80")
    monkeypatch.setenv("ATTNC_CUDA_F32", f32)
    mod = load_launcher(path, tmp_path)
    fn, err, _ = mod._library(name, tag, ctype, blocks, None, False)
    assert fn.restype is not None and err(-1) == b"grid too large (more than 65535 row blocks)"
    shape = "_".join(map(str, blocks))
    assert len(list((tmp_path / "cache").glob(f"attnc_{name}_{tag}_{shape}_sm_80_*.so"))) == 1


def test_launcher_picks_blocks_that_fit_registers_and_shared_memory(tmp_path):
    import inspect

    pytest.importorskip("torch")
    mod = load_launcher("causal.attn", tmp_path)
    a100 = 163 * 1024

    def pick(rows, head, row_blocks=(64,)):
        blocks = {"E": mod._pad16(head), "F": mod._pad16(head), "M0": 64}
        return mod._blocks("causal_softmax", "P", rows, blocks, lambda B: mod._causal_softmax_smem(B, 2),
                           lambda B: sum(-(-n // 128) for n in [B["P"], B["P"], B["P"] * B["F"]]), a100,
                           staged=True, row_blocks=row_blocks)
    # the streamed kernel holds register fragments: 64 rows (16 per warp), whatever the head
    assert "row_blocks=[64]" in inspect.getsource(mod._causal_softmax_blocks)
    assert pick(1, 128)["P"] == pick(4096, 64)["P"] == pick(4096, 256)["P"] == 64
    assert pick(4096, 96)["E"] == 96          # non-power-of-two head dims pad to 16 only
    # K and V a tile ahead (two stages) where both stages fit, one stage past that
    assert pick(4096, 128)["STAGES_"] == 2
    assert pick(4096, 256)["STAGES_"] == 1    # 64 x 264 x 2 B x (1 + 2 x 2 stages) > 163 KB
    assert mod._causal_softmax_smem(dict(pick(4096, 128), STAGES_=2), 2) > \
        mod._causal_softmax_smem(dict(pick(4096, 128), STAGES_=1), 2)
    with pytest.raises(ValueError, match="shared memory"):
        pick(4096, 1024)

    # a kernel of the flat spread (a combine): the largest row block whose state fits
    def flat(rows, head):
        return pick(rows, head, (64, 32, 16))
    assert flat(1, 128)["P"] == 16            # decode
    assert flat(4096, 64)["P"] == 64
    assert flat(4096, 128)["P"] == 32         # 64 rows: 66 state floats per thread
    assert flat(4096, 256)["P"] == 16         # 32 rows x 256: 66 state floats per thread


# --- emulated numerics against the numpy references ------------------------------------------------

EMULATED = [(p, k) for p in SUPPORTED for k in range(len(EXAMPLES[p].sizes))]


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """path -> launcher module under ATTNC_CUDA_EMULATE=1 (tile 16: several tiles per row)."""
    if CXX is None:
        pytest.skip("no C++ compiler for the host emulation")
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("emulated")
    cache = {}

    def get(path):
        if path not in cache:
            d = root / path.replace("/", "_")
            d.mkdir()
            cache[path] = load_launcher(path, d, tile=16)
        return cache[path]
    return get, root


def as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def check(got, expected, tol=2e-5):
    for g, e in zip(as_tuple(got), as_tuple(expected)):
        g = g.double().numpy()
        assert g.shape == e.shape
        assert np.all(np.isfinite(g))
        np.testing.assert_array_equal(g == 0, e == 0, err_msg="zero pattern differs")
        assert np.max(np.abs(g - e), initial=0.0) <= tol * max(1.0, np.max(np.abs(e), initial=0.0))


@pytest.mark.parametrize("path,case", EMULATED, ids=[f"{p}-{k}" for p, k in EMULATED])
def test_emulated_kernel_matches_reference(path, case, emulated, monkeypatch):
    import torch

    get, root = emulated
    monkeypatch.setenv("ATTNC_CUDA_EMULATE", "1")
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(root / "cache"))
    ref = EXAMPLES[path]
    arrays, params = ref.make_inputs(np.random.default_rng(case), ref.sizes[case])
    got = getattr(get(path), ref.definition)(*[torch.from_numpy(a) for a in arrays], **params)
    check(got, ref.reference(*arrays, **params))


BF16_EMULATED = ["causal.attn", "alibi.attn", "softcap.attn", "sliding_window.attn",
                 "gqa_decode.attn", "differential.attn", "paged_decode.attn"]


@pytest.mark.parametrize("variant", ["fused", "split", "stream"])
@pytest.mark.parametrize("path", BF16_EMULATED)
def test_emulated_bfloat16_tiles_run_the_16bit_fragment_path(path, variant, emulated, monkeypatch):
    """bfloat16 inputs under ATTNC_CUDA_EMULATE_16BIT=1 keep 16-bit tiles: Q·Kᵀ from
    ldmatrix fragments, P·V with P packed from the accumulator registers, both on
    mma.m16n8k16 as the PTX ISA lays out its operands (the emulator's, warp by warp). A
    wrong fragment address, a missing .trans or a mispacked pair moves whole 8x8 tiles: the
    error is then of the output's size, not bfloat16's rounding."""
    import torch

    get, root = emulated
    monkeypatch.setenv("ATTNC_CUDA_EMULATE", "1")
    monkeypatch.setenv("ATTNC_CUDA_EMULATE_16BIT", "1")
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(root / "cache"))
    if variant != "fused":
        monkeypatch.setenv("ATTNC_SPLIT" if variant == "split" else "ATTNC_STREAM_K", "3")
    ref = EXAMPLES[path]
    arrays, params = ref.make_inputs(np.random.default_rng(7), ref.sizes[-1])
    tensors = [torch.from_numpy(a).bfloat16() if a.dtype.kind == "f" else torch.from_numpy(a)
               for a in arrays]
    rounded = [t.double().numpy() if t.is_floating_point() else a for t, a in zip(tensors, arrays)]
    got = getattr(get(path), ref.definition)(*tensors, **params)
    for g, e in zip(as_tuple(got), as_tuple(ref.reference(*rounded, **params))):
        assert g.dtype == torch.bfloat16
        g = g.double().numpy()
        assert g.shape == e.shape and np.all(np.isfinite(g))
        scale = max(1.0, np.max(np.abs(e), initial=0.0))
        assert np.max(np.abs(g - e), initial=0.0) <= 2e-2 * scale


TWO_OUTPUTS = """\
attention two(Q[P,E], K[M,E], V[M,F]) -> (AV[P,F], LSE[P]: f32) {
  QK[p,m] = Q[p,e] * K[m,e]
  GM[p]   = max[m](QK[p,m])
  SN[p,m] = exp(QK[p,m] - GM[p])
  SD[p]   = sum[m](SN[p,m])
  LSE[p]  = GM[p] + log(SD[p])
  AV[p,f] = SN[p,m] * V[m,f] / SD[p]
}
"""


def test_emulated_bfloat16_outputs_take_the_inputs_dtype_unless_declared(tmp_path, monkeypatch):
    """Under 16-bit emulation an undeclared output is bfloat16 like the inputs and a declared
    f32 one float32 (the declared-16-bit check looks at the declared outputs only)."""
    import torch

    if CXX is None:
        pytest.skip("no C++ compiler for the host emulation")
    monkeypatch.setenv("ATTNC_CUDA_EMULATE", "1")
    monkeypatch.setenv("ATTNC_CUDA_EMULATE_16BIT", "1")
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path / "cache"))
    from attnc.frontends import parse

    files = compile_module(parse(TWO_OUTPUTS, "two.attn"), "cuda", "two")[1]
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    spec = importlib.util.spec_from_file_location("attnc_cuda_test_two", tmp_path / "two.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(n, 16, generator=g).bfloat16() for n in (70, 90, 90))
    av, lse = mod.two(q, k, v)
    assert av.dtype == torch.bfloat16 and lse.dtype == torch.float32
    s = q.double() @ k.double().T
    assert float((av.double() - torch.softmax(s, -1) @ v.double()).abs().max()) < 2e-2
    assert float((lse.double() - torch.logsumexp(s, -1)).abs().max()) < 1e-5


def test_emulated_kernel_broadcasts_batch_dims(emulated, monkeypatch):
    import torch

    get, root = emulated
    monkeypatch.setenv("ATTNC_CUDA_EMULATE", "1")
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(root / "cache"))
    ref = EXAMPLES["gqa_decode.attn"]
    sizes = ref.sizes[0]
    draws = [ref.make_inputs(np.random.default_rng(10 + i), sizes)[0] for i in range(6)]
    q = np.stack([d[0] for d in draws]).reshape(2, 3, *draws[0][0].shape)
    k = np.stack([d[1] for d in draws[:2]]).reshape(2, 1, *draws[0][1].shape)
    v = np.stack([d[2] for d in draws[:3]]).reshape(1, 3, *draws[0][2].shape)
    got = get("gqa_decode.attn").gqa_decode(torch.from_numpy(q), torch.from_numpy(k),
                                            torch.from_numpy(v).transpose(-1, -2).contiguous()
                                            .transpose(-1, -2))
    check(got, ref.reference(q, k, v))


@pytest.mark.parametrize("layout", ["aligned", "transposed", "offset"])
def test_emulated_tile_loads_vectorised_or_element_wise_agree(layout, emulated, monkeypatch):
    """K/V tiles go as 16-byte copies a tile ahead where the tensor is contiguous and
    aligned along the head dim, element by element otherwise (a transposed view: stride
    != 1; a storage offset of one element: misaligned); every form matches the reference,
    over several tiles, with full and partial tiles (causal, ragged sizes)."""
    import torch

    get, root = emulated
    monkeypatch.setenv("ATTNC_CUDA_EMULATE", "1")
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(root / "cache"))
    mod = get("causal.attn")
    source = (Path(mod.__file__).with_suffix(".cu")).read_text()
    assert "attnc_cp_async16" in source and "// a full tile: no masks" in source
    assert "if constexpr (BLOCK_STAGES_ > 1)" in source
    ref = EXAMPLES["causal.attn"]
    sizes = {"P": 45, "M": 77, "E": 8, "F": 12}
    (q, k, v), _ = ref.make_inputs(np.random.default_rng(7), sizes)
    def view(x):
        t = torch.from_numpy(np.ascontiguousarray(x))
        if layout == "transposed":
            return t.transpose(-1, -2).contiguous().transpose(-1, -2)
        if layout == "offset":
            return torch.cat([torch.zeros(1, dtype=t.dtype), t.flatten()])[1:].view(t.shape)
        return t
    check(mod.causal_softmax(view(q), view(k), view(v)), ref.reference(q, k, v))


# --- split-K decode: a per-worker streamed kernel and a combine kernel --------------------------

# P small, M about 200, tile 16: 12-13 tiles, several per worker; with 7 workers of 2 tiles,
# the last worker of M1 = 12 tiles has none (its states stay at their initial values).
SPLIT_SIZES = {
    "gqa_decode.attn": {"H": 4, "HK": 2, "P": 3, "M": 181, "E": 8, "F": 5},
    "softmax1.attn": {"P": 2, "M": 190, "E": 5, "F": 3},
    "lse.attn": {"P": 3, "M": 200, "E": 4, "F": 6},
}


def _spy_runs(mod, monkeypatch):
    """Record which kernels a call launches (name, W) through the launcher's ``_<kernel>_run``."""
    calls = []
    for attr in [n for n in dir(mod) if n.startswith("_") and n.endswith("_run")]:
        def spy(*args, _f=getattr(mod, attr), _name=attr[1:-len("_run")], **kwargs):
            calls.append((_name, args[1].get("W")))
            return _f(*args, **kwargs)
        monkeypatch.setattr(mod, attr, spy)
    return calls


@pytest.mark.parametrize("workers", [1, 2, 3, 7])
@pytest.mark.parametrize("path", sorted(SPLIT_SIZES))
def test_emulated_split_k_matches_reference(path, workers, emulated, monkeypatch):
    import torch

    get, root = emulated
    monkeypatch.setenv("ATTNC_CUDA_EMULATE", "1")
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(root / "cache"))
    monkeypatch.setenv("ATTNC_SPLIT", str(workers))
    ref = EXAMPLES[path]
    mod = get(path)
    calls = _spy_runs(mod, monkeypatch)
    arrays, params = ref.make_inputs(np.random.default_rng(workers), SPLIT_SIZES[path])
    got = getattr(mod, ref.definition)(*[torch.from_numpy(a) for a in arrays], **params)
    check(got, ref.reference(*arrays, **params))
    names = [c[0] for c in calls]
    if workers == 1:
        assert len(names) == 1 and not names[0].endswith("_split"), calls
    else:
        assert [n.endswith(("_split", "_split_combine")) for n in names] == [True, True], calls
        assert names[1] == names[0] + "_combine" and {c[1] for c in calls} == {workers}, calls


def test_split_and_stream_k_take_fewer_workers_or_the_streamed_kernel_when_a_combine_does_not_fit(
        emulated, monkeypatch):
    """The combine holds every worker's slot of a row block in shared memory ([P, W, F]):
    33 forced workers at F = 128 need 424 KB, one worker at F = 256 still 287 KB.  The
    launcher halves the workers until every kernel's blocks fit the device (227 KB under
    emulation, as on an H100), then falls back to the streamed kernel; the result is the
    same."""
    import torch

    get, root = emulated
    monkeypatch.setenv("ATTNC_CUDA_EMULATE", "1")
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(root / "cache"))
    monkeypatch.delenv("ATTNC_STREAM_K", raising=False)
    mod = get("gqa_decode.attn")
    calls = []
    for name in ("_gqa_decode_run", "_gqa_decode_split_run", "_gqa_decode_stream_run"):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _real=real, _name=name, **k: (
            calls.append((_name, a[1].get("W"))), _real(*a, **k))[1])
    rng = np.random.default_rng(8)
    for split, F, want in (("33", 128, ("_gqa_decode_split_run", 16)),
                           (None, 256, ("_gqa_decode_run", None))):
        if split:
            monkeypatch.setenv("ATTNC_SPLIT", split)
        else:
            monkeypatch.delenv("ATTNC_SPLIT", raising=False)
        Q, K, V = (rng.standard_normal((2, 1, 16)), rng.standard_normal((1, 700, 16)),
                   rng.standard_normal((1, 700, F)))
        calls.clear()
        got = mod.gqa_decode(*[torch.from_numpy(x).float() for x in (Q, K, V)])
        assert calls == [want]
        check(got, ref_gqa_decode(Q, K, V))


def test_launcher_picks_the_decode_variant_by_grid_and_sm_count(emulated, monkeypatch):
    """Without ATTNC_SPLIT / ATTNC_STREAM_K: a grid of fewer blocks than SMs (CPU: 4 "SMs")
    over at least 4 tiles runs stream-K (two persistent blocks per SM, at least 2 tiles
    each), split-K where there is no stream-K; larger grids and short rows stream as is."""
    import torch

    get, root = emulated
    monkeypatch.setenv("ATTNC_CUDA_EMULATE", "1")
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(root / "cache"))
    monkeypatch.delenv("ATTNC_SPLIT", raising=False)
    monkeypatch.delenv("ATTNC_STREAM_K", raising=False)
    mod = get("softmax1.attn")
    cpu, kinds = torch.device("cpu"), ["fused", "split", "stream"]
    assert mod._split_count(1, 12, cpu) == 6     # ceil(2 * 4 / 1), at most 12 // 2
    assert mod._split_count(100, 12, cpu) == 1
    assert mod._split_count(1, 3, cpu) == 1      # too few tiles to share
    assert mod._variant(8, 100, cpu, kinds) == ("fused", 1)
    assert mod._variant(2, 3, cpu, kinds) == ("fused", 1)            # too few tiles to share
    assert mod._variant(2, 100, cpu, kinds) == ("stream", 8)         # two blocks per SM
    assert mod._variant(2, 5, cpu, kinds) == ("stream", 5)           # at least 2 tiles each
    assert mod._variant(1, 12, cpu, ["fused", "split"]) == ("split", 6)
    assert mod._variant(2, 100, cpu, ["fused"]) == ("fused", 1)
    monkeypatch.setenv("ATTNC_SPLIT", "3")
    assert mod._variant(64, 100, cpu, kinds) == ("split", 3)
    monkeypatch.setenv("ATTNC_SPLIT", "1")
    assert mod._variant(1, 100, cpu, kinds) == ("fused", 1)          # 1: no split
    monkeypatch.setenv("ATTNC_STREAM_K", "5")
    assert mod._variant(64, 100, cpu, kinds) == ("stream", 5)
    assert mod._variant(1, 3, cpu, kinds) == ("stream", 5)           # capped by the tiles later
    monkeypatch.delenv("ATTNC_SPLIT")
    monkeypatch.delenv("ATTNC_STREAM_K")
    calls = _spy_runs(mod, monkeypatch)
    ref = EXAMPLES["softmax1.attn"]
    arrays, params = ref.make_inputs(np.random.default_rng(5), SPLIT_SIZES["softmax1.attn"])
    check(mod.softmax1(*[torch.from_numpy(a) for a in arrays], **params),
          ref.reference(*arrays, **params))
    # 1 block x 12 tiles: 6 workers of 2 tiles, one unit -> 6 slots
    assert calls == [("softmax1_stream", 6), ("softmax1_split_combine", 6)], calls


# --- stream-K decode: persistent workers over the (unit, tile) space, the split-K combine ----------

# decode shapes (P = 2, M = 77: 5 tiles of 16 per unit) and, for causal / alibi, P = 37 over
# M = 45 in row blocks of 16 (3 tiles, 3 row blocks per unit): with batch (2,) and heads, the
# workers' shares cross units (heads, batch elements, row blocks)
STREAM_SIZES = {
    "gqa_decode.attn": {"H": 4, "HK": 2, "P": 2, "M": 77, "E": 8, "F": 5},
    "mqa_decode.attn": {"H": 3, "P": 2, "M": 77, "E": 4, "F": 3},
    "softmax1.attn": {"P": 2, "M": 77, "E": 5, "F": 3},
    "lse.attn": {"P": 2, "M": 77, "E": 4, "F": 6},
    "differential.attn": {"P": 2, "M": 77, "E": 4, "F": 3},
    "sinks_window.attn": {"P": 2, "M": 77, "E": 4, "F": 3, "sinks": 3, "window": 20},
    "causal.attn": {"P": 77, "M": 85, "E": 4, "F": 3},
    "alibi.attn": {"H": 3, "P": 77, "M": 45, "E": 4, "F": 3},
}
STREAM_WORKERS = (1, 2, 3, 7, 13, 10_000)


def batched_inputs(ref, sizes, seed, batch=2):
    """``batch`` independent draws stacked along a leading batch dim."""
    draws = [ref.make_inputs(np.random.default_rng(seed + i), sizes) for i in range(batch)]
    return [np.stack(xs) for xs in zip(*(d[0] for d in draws))], draws[0][1]


@pytest.mark.parametrize("workers", STREAM_WORKERS)
@pytest.mark.parametrize("path", sorted(STREAM_SIZES))
def test_emulated_stream_k_matches_reference(path, workers, emulated, monkeypatch):
    import torch

    get, root = emulated
    monkeypatch.setenv("ATTNC_CUDA_EMULATE", "1")
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(root / "cache"))
    monkeypatch.setenv("ATTNC_STREAM_K", str(workers))
    monkeypatch.delenv("ATTNC_SPLIT", raising=False)
    ref = EXAMPLES[path]
    mod = get(path)
    sizes = STREAM_SIZES[path]
    calls = _spy_runs(mod, monkeypatch)
    arrays, params = batched_inputs(ref, sizes, seed=sizes["P"] + sizes["M"])
    got = getattr(mod, ref.definition)(*[torch.from_numpy(a) for a in arrays], **params)
    check(got, ref.reference(*arrays, **params))
    name = calls[0][0] if calls else None
    assert [c[0] for c in calls] == [name, name.removesuffix("_stream") + "_split_combine"], calls
    assert name.endswith("_stream"), calls
    # the slots: W = _stream_slots(n_tiles, min(workers, n_tiles), M1); two row blocks of 64
    # rows (register fragments: 16 per warp)
    n_row = -(-sizes["P"] // 64)
    units = 2 * n_row * sizes.get("H", 1)
    tiles = -(-sizes["M"] // 16)
    n_tiles = units * tiles
    sk = min(workers, n_tiles)
    assert calls[0][1] == calls[1][1] == mod._stream_slots(n_tiles, sk, tiles), (calls, n_tiles, sk)


def test_emulated_stream_k_with_default_row_blocks(emulated, monkeypatch):
    """causal at P = 77 in its 64-row blocks: two row blocks per unit."""
    import torch

    get, root = emulated
    monkeypatch.setenv("ATTNC_CUDA_EMULATE", "1")
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(root / "cache"))
    ref = EXAMPLES["causal.attn"]
    mod = get("causal.attn")
    calls = _spy_runs(mod, monkeypatch)
    arrays, params = batched_inputs(ref, STREAM_SIZES["causal.attn"], seed=3, batch=3)
    for workers in (2, 4):
        monkeypatch.setenv("ATTNC_STREAM_K", str(workers))
        got = mod.causal_softmax(*[torch.from_numpy(a) for a in arrays], **params)
        check(got, ref.reference(*arrays, **params))
    assert [c[0] for c in calls] == ["causal_softmax_stream", "causal_softmax_split_combine"] * 2


def _slot(w, unit, tiles, n_tiles, workers):
    """The worker kernel's slot formula (C integer division of non-negative numbers)."""
    return w + 1 - ((unit * tiles + 1) * workers + n_tiles - 1) // n_tiles


def test_stream_k_slots_are_distinct_ordered_and_bounded(emulated):
    """Against the IR pass's schedule: each unit's segments get slots 0, 1, ... in worker
    order, below the launcher's slot count W; every worker has a tile."""
    from attnc.passes.split_k import stream_k_schedule

    get, _ = emulated
    mod = get("softmax1.attn")
    for units in range(1, 9):
        for tiles in range(1, 9):
            n_tiles = units * tiles
            for workers in range(1, n_tiles + 1):
                slots = mod._stream_slots(n_tiles, workers, tiles)
                seen: dict[int, list[int]] = {}
                for w, segments in enumerate(stream_k_schedule(units, tiles, workers)):
                    assert segments, (units, tiles, workers, w)
                    for unit, first, end in segments:
                        seen.setdefault(unit, []).append(_slot(w, unit, tiles, n_tiles, workers))
                for unit, got in seen.items():
                    assert got == list(range(len(got))) and len(got) <= slots, \
                        (units, tiles, workers, unit, got, slots)


# --- float32 inputs: exact fp32 FMA by default, tf32 tensor cores with ATTNC_CUDA_F32=tf32 -------

F32_EXAMPLES = ["causal.attn", "gqa_decode.attn", "differential.attn", "alibi.attn", "lse.attn"]
VARIANT_ENV = {"fused": {"ATTNC_SPLIT": "1"}, "split": {"ATTNC_SPLIT": "3"},
               "stream": {"ATTNC_STREAM_K": "3"}}


@pytest.mark.parametrize("variant", sorted(VARIANT_ENV))
@pytest.mark.parametrize("path", F32_EXAMPLES)
def test_emulated_float32_inputs_round_like_tf32_tensor_cores(path, variant, emulated, monkeypatch):
    """float32 inputs give float32 outputs, exact by default; with ATTNC_CUDA_F32=tf32 the
    emulation rounds the tensor-core operands to tf32 as the GPU does (about 1e-3 relative)."""
    import torch

    get, root = emulated
    monkeypatch.setenv("ATTNC_CUDA_EMULATE", "1")
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(root / "cache"))
    for name in ("ATTNC_SPLIT", "ATTNC_STREAM_K", "ATTNC_CUDA_F32"):
        monkeypatch.delenv(name, raising=False)
    for name, value in VARIANT_ENV[variant].items():
        monkeypatch.setenv(name, value)
    ref = EXAMPLES[path]
    mod = get(path)
    calls = _spy_runs(mod, monkeypatch)
    arrays, params = batched_inputs(ref, STREAM_SIZES[path], seed=11)
    arrays = [a.astype(np.float32) for a in arrays]
    want = ref.reference(*[a.astype(np.float64) for a in arrays], **params)
    ieee = as_tuple(getattr(mod, ref.definition)(*[torch.from_numpy(a) for a in arrays], **params))
    assert all(g.dtype == torch.float32 for g in ieee)
    check(ieee, want)
    monkeypatch.setenv("ATTNC_CUDA_F32", "tf32")
    tf32 = as_tuple(getattr(mod, ref.definition)(*[torch.from_numpy(a) for a in arrays], **params))
    check(tf32, want, tol=2e-3)
    assert max(float((a - b).abs().max()) for a, b in zip(tf32, ieee)) > 0, "no tf32 rounding"
    kinds = {"fused": ("",), "split": ("_split", "_split_combine"),
             "stream": ("_stream", "_split_combine")}[variant]
    base = calls[0][0].removesuffix(kinds[0])
    assert [c[0] for c in calls] == [base + k for k in kinds] * 2, calls


def test_launcher_float32_element_type_and_flags(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    mod = load_launcher("causal.attn", tmp_path)
    half, single = torch.zeros(2, 3, dtype=torch.float16), torch.zeros(2, 3)
    assert mod._element_type(("Q", single, None), ("K", single, None)) == torch.float32
    with pytest.raises(ValueError, match="floating inputs must share one dtype"):
        mod._element_type(("Q", half, None), ("K", single, None))
    assert mod._kernel_type(torch.float32, False) == ("f32", "float")
    assert mod._kernel_type(torch.float32, True) == ("f32", "float")
    assert mod._kernel_type(torch.float64, True) == ("exact", "float")
    monkeypatch.delenv("ATTNC_CUDA_F32", raising=False)  # exact float32 by default
    assert mod._defines("f32", False) == ["-DATTNC_F32_IEEE"] == mod._defines("f32", True)
    assert mod._defines("f16", False) == [] and mod._defines("exact", True) == []
    monkeypatch.setenv("ATTNC_CUDA_F32", "tf32")
    assert mod._defines("f32", False) == [] and mod._defines("f32", True) == ["-DATTNC_EMULATE_TF32"]
    monkeypatch.setenv("ATTNC_CUDA_F32", "fast")
    with pytest.raises(ValueError, match="ATTNC_CUDA_F32"):
        mod._defines("f32", False)
    monkeypatch.setenv("ATTNC_CUDA_EMULATE", "1")
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        mod.causal_softmax(torch.zeros(4, 8, dtype=torch.int32), single, single)
