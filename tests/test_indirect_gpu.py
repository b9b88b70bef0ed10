"""Indirect subscripts on the kernel backends: Triton (its CPU interpreter) and CUDA (the
generated ``.cu`` compiled as host C++, ``ATTNC_CUDA_EMULATE=1``).

The oracle is the dense float64 reference built by un-paging (tests/example_refs.py), as
in tests/test_indirect.py: page sizes 1, 16 and 64 with several key tiles of 16, GQA,
lengths from 0 to full, and adversarial page tables (permutations, repeated pages, -1, one
past the cache, the int32 extremes) that must read absent keys and never memory outside
the cache; the streamed, split-K and stream-K launches; packed variable-length batches with
empty, overhanging and out-of-range offsets; ``%`` on negative values.  Sizes are tiny:
the interpreter runs a Python loop per program.  nvcc (sm_80/sm_90) and Triton's sm_90 AOT
compile cover these examples in tests/test_cuda_backend.py and tests/test_triton_compile.py.
"""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from attnc.backends import compile_module, load_generated, write_atomic  # noqa: E402
from attnc.frontends import parse, parse_file  # noqa: E402

from conftest import EXAMPLES  # noqa: E402
from example_refs import ref_paged_decode, ref_paged_prefill, ref_varlen_prefill  # noqa: E402
from test_indirect import INT32, paged_cases, varlen_cases  # noqa: E402

BACKENDS = ("triton", "cuda")
TILE = 16
TOL = 2e-5          # float32 kernels against float64 references, relative to the largest value


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    """``get(backend, spec)``: the generated function of a spec (an example's file name or
    ``.attn`` text), compiled once per module with tiles of 16 keys."""
    root = tmp_path_factory.mktemp("indirect_gpu")
    cache = {}

    def get(backend: str, spec: str):
        if backend == "cuda" and not (shutil.which("g++") or shutil.which("c++")):
            pytest.skip("no C++ compiler for the CUDA host emulation")
        if backend == "triton":
            pytest.importorskip("triton")
        if (backend, spec) not in cache:
            module = parse_file(EXAMPLES / spec) if spec.endswith(".attn") else parse(spec, "spec.attn")
            defn = module.definitions[0]
            stem = f"{defn.name}_{backend}_{len(cache)}"  # one torch op namespace per module
            _, files = compile_module(module, backend, stem, options={"tile": TILE})
            for name, text in files.items():
                write_atomic(root / name, text)
            cache[backend, spec] = getattr(load_generated(root / f"{stem}.py"), defn.name)
        return cache[backend, spec]
    return get


@pytest.fixture(scope="module")
def emulate(tmp_path_factory):
    """The CUDA launcher runs the host emulation (module-wide: hypothesis tests share it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTNC_CUDA_EMULATE", "1")
        mp.setenv("ATTNC_CACHE_DIR", str(tmp_path_factory.mktemp("cuda_cache")))
        yield mp


def call(fn, arrays, **params) -> np.ndarray:
    """The generated function on CPU tensors (floats as float32), as float64 numpy."""
    xs = [torch.from_numpy(np.asarray(a, np.float32)) if a.dtype.kind == "f"
          else torch.from_numpy(a) for a in arrays]
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # the interpreter computes masked lanes too
        return fn(*xs, **params).double().numpy()


def assert_close(got: np.ndarray, want: np.ndarray, what: str = "") -> float:
    """Same shape, same zero pattern (absent rows are exact zeros), within TOL."""
    assert got.shape == want.shape, what
    assert np.all(np.isfinite(got)), what
    np.testing.assert_array_equal(got == 0, want == 0, err_msg=f"{what}: zero pattern")
    err = float(np.max(np.abs(got - want), initial=0.0))
    assert err <= TOL * max(1.0, float(np.max(np.abs(want), initial=0.0))), (what, err)
    return err


VARIANTS = {"streamed": {"ATTNC_SPLIT": "1"}, "split-k": {"ATTNC_SPLIT": "3"},
            "stream-k": {"ATTNC_STREAM_K": "4"}}


def each_variant(monkeypatch, fn, arrays, want, **params) -> None:
    """The streamed kernel and the split-K and stream-K launches all give ``want``."""
    for name, env in VARIANTS.items():
        for var in ("ATTNC_SPLIT", "ATTNC_STREAM_K"):
            monkeypatch.delenv(var, raising=False)
        for var, value in env.items():
            monkeypatch.setenv(var, value)
        assert_close(call(fn, arrays, **params), want, name)
    for var in ("ATTNC_SPLIT", "ATTNC_STREAM_K"):
        monkeypatch.delenv(var, raising=False)


# --- page tables ---------------------------------------------------------------------------------


def adversarial_table(rng, B: int, NB: int, NP: int) -> np.ndarray:
    """Row 0 a permutation of distinct pages, row 1 entries that address no row (-1, NP,
    the int32 extremes) among real ones, row 2 one page repeated; more rows at random."""
    table = rng.integers(0, NP, (B, NB))
    table[0] = rng.permutation(max(NP, NB))[:NB] % NP
    table[1] = np.where(np.arange(NB) % 2 == 0, table[1],
                        np.resize([-1, NP, INT32.min, INT32.max], NB))
    if B > 2:
        table[2] = table[2, 0]
    return table.astype(np.int32)


# (PG, NB): page sizes 1, 16 and 64, each over several tiles of 16 keys
PAGES = [(1, 37), (16, 3), (64, 2)]


def paged_case(rng, PG: int, NB: int, P: int | None):
    """GQA (4 query heads on 2 KV heads); lengths: full, up to the last key of a page and
    past a page table hole, empty, mid-page, past the last page (the table's end bounds
    the keys), negative (no key: the kernels' tile ranges from L[b] are empty) and one key
    into the second tile of 16."""
    B, H, HK, E, F, NP = 7, 4, 2, 5, 3, 7
    M = NB * PG
    L = np.array([M, max(M - PG // 2 - 1, 1), 0, min(M, PG + 3), M + 7, -2, min(M, 17)],
                 np.int32)
    q_shape = (B, H, E) if P is None else (B, P, H, E)
    return [rng.standard_normal(q_shape), rng.standard_normal((NP, PG, HK, E)),
            rng.standard_normal((NP, PG, HK, F)), adversarial_table(rng, B, NB, NP), L]


@pytest.mark.parametrize("PG,NB", PAGES, ids=[f"PG{pg}" for pg, _ in PAGES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_decode_on_every_launch(backend, PG, NB, kernels, emulate):
    args = paged_case(np.random.default_rng(PG), PG, NB, None)
    fn = kernels(backend, "paged_decode.attn")
    each_variant(emulate, fn, args, ref_paged_decode(*args))
    assert np.all(call(fn, args)[2] == 0.0)  # the empty sequence


@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_decode_with_several_row_blocks_per_head_on_every_launch(backend, kernels, emulate):
    """Without head packing (CUDA) a decode's row is its value dim F: at F = 22 a head's
    rows span two row blocks, which share its row max and sum.  Stream-K would give the
    two blocks different segments, and slots, for one stored state (a 1e-2 error before);
    the variants stage offers no stream-K there, and forcing it falls back.  Triton packs
    the group's heads as the rows (``map_ranks._rows_of_a_group``): every state has the
    row, and stream-K runs (each_variant checks it)."""
    from attnc.backends import lower_stages

    rng = np.random.default_rng(22)
    B, H, HK, E, F, NP, PG, NB = 3, 4, 2, 4, 22, 6, 8, 5
    L = np.array([NB * PG, 17, 0], np.int32)
    args = [rng.standard_normal((B, H, E)), rng.standard_normal((NP, PG, HK, E)),
            rng.standard_normal((NP, PG, HK, F)), adversarial_table(rng, B, NB, NP), L]
    each_variant(emulate, kernels(backend, "paged_decode.attn"), args, ref_paged_decode(*args))
    stages, _ = compile_module(parse_file(EXAMPLES / "paged_decode.attn"), backend, "rows",
                               options={"tile": TILE})
    program = lower_stages(stages, backend, {"tile": TILE}).programs[0]
    if backend == "triton":
        assert "stream-k" in {v.kind for v in program.variants}
        assert program.kernels[0].roles.row == "H"
    else:
        assert "stream-k" not in {v.kind for v in program.variants}
        assert any("no stream-K variant: the state" in n for n in program.notes)


@pytest.mark.parametrize("PG,NB", PAGES, ids=[f"PG{pg}" for pg, _ in PAGES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_prefill_on_every_launch(backend, PG, NB, kernels, emulate):
    args = paged_case(np.random.default_rng(PG + 1), PG, NB, 3)
    each_variant(emulate, kernels(backend, "paged_prefill.attn"), args,
                 ref_paged_prefill(*args, scale=0.4), scale=0.4)


@settings(max_examples=6, deadline=None)
@given(case=paged_cases(prefill=False), backend=st.sampled_from(BACKENDS))
def test_paged_decode_on_random_adversarial_tables(kernels, emulate, case, backend):
    assert_close(call(kernels(backend, "paged_decode.attn"), case), ref_paged_decode(*case))


@settings(max_examples=4, deadline=None)
@given(case=paged_cases(prefill=True), backend=st.sampled_from(BACKENDS))
def test_paged_prefill_on_random_adversarial_tables(kernels, emulate, case, backend):
    assert_close(call(kernels(backend, "paged_prefill.attn"), case), ref_paged_prefill(*case))


def test_a_leading_batch_of_page_tables_broadcasts(kernels, emulate):
    """PT and L with a leading dim the cache lacks (per-replica tables over one cache)."""
    rng = np.random.default_rng(5)
    Q = rng.standard_normal((2, 3, 4, 3))
    KC, VC = rng.standard_normal((5, 4, 2, 3)), rng.standard_normal((5, 4, 2, 2))
    PT = rng.integers(-1, 6, (2, 3, 3)).astype(np.int32)
    L = rng.integers(0, 13, (2, 3)).astype(np.int32)
    want = ref_paged_decode(Q, KC, VC, PT, L)
    for backend in BACKENDS:
        assert_close(call(kernels(backend, "paged_decode.attn"), [Q, KC, VC, PT, L]), want, backend)


# --- packed variable-length batches ----------------------------------------------------------------


VARLEN = [  # offsets: sorted with an empty sequence; past the end; out of range and unsorted
    np.array([0, 7, 7, 18, 33], np.int32),
    np.array([0, 12, 30, 36], np.int32),
    np.array([3, -2, 40, 9, 33], np.int32),
]


@pytest.mark.parametrize("case", range(len(VARLEN)))
@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_prefill_on_every_launch(backend, case, kernels, emulate):
    rng = np.random.default_rng(case)
    T = 33
    args = [rng.standard_normal((T, 4, 3)), rng.standard_normal((T, 2, 3)),
            rng.standard_normal((T, 2, 2)), VARLEN[case]]
    each_variant(emulate, kernels(backend, "varlen_prefill.attn"), args, ref_varlen_prefill(*args))


@settings(max_examples=6, deadline=None)
@given(case=varlen_cases(), backend=st.sampled_from(BACKENDS))
def test_varlen_prefill_on_random_offsets(kernels, emulate, case, backend):
    assert_close(call(kernels(backend, "varlen_prefill.attn"), case), ref_varlen_prefill(*case))


# --- index arithmetic ------------------------------------------------------------------------------


ROLLED = """
attention rolled(Q[B,P,E], K[M,E], V[M,F], S[B]: i64) -> O[B,P,F] {
  X[b,p,m] = Q[b,p,e] * K[(m - S[b]) % M, e]
  O[b,p,f] = exp(X[b,p,m] - max[m](X[b,p,m])) * V[(m - S[b]) % M, f] / sum[m](exp(X[b,p,m] - max[m](X[b,p,m])))
}
"""


def softmax_rows(S: np.ndarray, V: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    S = np.where(mask, S, -np.inf) if mask is not None else S
    top = np.max(S, axis=-1, keepdims=True)
    W = np.exp(S - np.where(np.isfinite(top), top, 0))
    den = W.sum(axis=-1, keepdims=True)
    return np.where(den > 0, (W @ V) / np.where(den > 0, den, 1), 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_modulo_is_floor_modulo_on_negative_values(backend, kernels, emulate):
    """``(m - S[b]) % M`` with S negative and past M: numpy's roll, never a negative row."""
    rng = np.random.default_rng(6)
    Q, K, V = rng.standard_normal((5, 2, 3)), rng.standard_normal((37, 3)), \
        rng.standard_normal((37, 2))
    S = np.array([0, 3, -2, 40, -75], np.int64)
    want = np.stack([softmax_rows(Q[b] @ np.roll(K, s, 0).T, np.roll(V, s, 0))
                     for b, s in enumerate(S)])
    assert_close(call(kernels(backend, ROLLED), [Q, K, V, S]), want)


FLAT = """
attention flat(Q[B,E], KC[N,E], VC[N,F], PT[B,NB]: i32, L[B]: i32) -> O[B,F] {
  let PG = 4
  let M = NB * PG
  S[b,m] = Q[b,e] * KC[PT[b, m // PG] * PG + m % PG, e]   where m < L[b]
  O[b,f] = exp(S[b,m] - max[m](S[b,m])) * VC[PT[b, m // PG] * PG + m % PG, f] / sum[m](exp(S[b,m] - max[m](S[b,m])))
}
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_page_numbers_times_the_page_size_do_not_wrap(backend, kernels, emulate):
    """2**30 * 4 is 0 in int32 and -2**30 * 4 too: those pages must read absent keys, not
    page 0; only the real page 1 (rows 4..7 of the flat cache) is read."""
    rng = np.random.default_rng(7)
    Q, KC, VC = rng.standard_normal((2, 3)), rng.standard_normal((8, 3)), rng.standard_normal((8, 2))
    PT = np.array([[2**30, 1, -2**30], [-2**30, 2**30, 1]], np.int32)
    L = np.array([12, 9], np.int32)
    want = np.stack([softmax_rows(Q[0] @ KC[4:8].T, VC[4:8]),   # keys 4..7: page 1
                     softmax_rows(Q[1] @ KC[4:5].T, VC[4:5])])  # key 8 only: row 0 of page 1
    assert_close(call(kernels(backend, FLAT), [Q, KC, VC, PT, L]), want)


# --- the launcher names a bad index argument --------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_float_page_table_is_refused_naming_the_argument(backend, kernels, emulate):
    args = paged_case(np.random.default_rng(0), 16, 3, None)
    args[3] = args[3].astype(np.float32)
    with pytest.raises(ValueError, match="argument 'PT'"):
        call(kernels(backend, "paged_decode.attn"), args)


def test_half_precision_gathers_on_triton(kernels):
    """f16 cache and queries: the gathered K tile feeds tl.dot in its own dtype."""
    args = paged_case(np.random.default_rng(1), 16, 3, None)
    xs = [torch.from_numpy(a).to(torch.float16) if a.dtype.kind == "f" else torch.from_numpy(a)
          for a in args]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = kernels("triton", "paged_decode.attn")(*xs)
    want = ref_paged_decode(*args)
    assert got.dtype == torch.float16
    np.testing.assert_array_equal(got.numpy() == 0, want == 0)
    assert np.max(np.abs(got.double().numpy() - want)) <= 5e-3 * max(1.0, np.max(np.abs(want)))


@pytest.mark.parametrize("PG", [32, 24, 8])
def test_a_tile_inside_one_page_reads_one_table_entry_and_contiguous_rows(PG, kernels, emulate):
    """Page-aligned fast paths (Triton).  Where the key tile divides the page size, the
    launcher sets ``ALIGNED_PG`` and the kernel reads the tile's page-table entry once, as a
    scalar broadcast over the tile, and its rows as a run from the page's offset (two tiles
    per page at PG = 32).  Where the page divides the tile (two pages in a tile at 8),
    ``PAGE_PG`` is the page size as a constant, so a row's page and slot are shifts, not
    divisions.  Elsewhere (a tile across two pages at 24) it gathers row by row.  Each
    against the reference on every launch."""
    _, files = compile_module(parse_file(EXAMPLES / "paged_decode.attn"), "triton", "aligned",
                              options={"tile": TILE})
    text = files["aligned.py"]
    assert f"ALIGNED_PG=bool(int(PG > 0 and PG % {TILE} == 0) > 0)" in text
    assert (f"PAGE_PG=int((PG if PG > 0 and (PG % {TILE} == 0 or {TILE} % PG == 0) else 0))"
            in text)
    assert ("(tl.zeros([BLOCK_M0], tl.int64) + tl.load(PT_ptr + boff_PT + idx_b * stride_PT_0 + "
            "((m1 * BLOCK_M0) // PAGE_PG) * stride_PT_1") in text
    assert "((m1 * BLOCK_M0) % PAGE_PG + offs_m0) if ALIGNED_PG else" in text
    assert "((m1 * BLOCK_M0) // PAGE_PG + offs_m0 // PAGE_PG) if PAGE_PG else" in text
    assert "(offs_m0 % PAGE_PG) if PAGE_PG else" in text
    args = paged_case(np.random.default_rng(PG), PG, 96 // PG, None)
    each_variant(emulate, kernels("triton", "paged_decode.attn"), args, ref_paged_decode(*args))


@pytest.mark.parametrize("PG", [1, 4, 16])
def test_cuda_paged_rows_addressed_once_per_key(PG, kernels, emulate):
    """CUDA computes a gathered tile's page, slot and presence once per key of the tile
    (``s_kc_*_at``, ``s_kc_*_ok``; before, every element of the copy and every presence
    test divided by the runtime page size): 16-byte copies (E = F = 8, aligned) and the
    element-wise ones (F = 6), adversarial tables, every launch."""
    fn = kernels("cuda", "paged_decode.attn")
    text = Path(fn.__globals__["__file__"]).with_suffix(".cu").read_text()
    assert "_at_" in text and "_ok_" in text
    rng = np.random.default_rng(PG + 100)
    NB, NP = max(64 // PG, 2), max(96 // PG, 3)
    for F in (8, 6):
        args = [rng.standard_normal((3, 4, 8)), rng.standard_normal((NP, PG, 2, 8)),
                rng.standard_normal((NP, PG, 2, F)), adversarial_table(rng, 3, NB, NP),
                np.array([NB * PG, 0, NB * PG // 2 + 1], np.int32)]
        each_variant(emulate, fn, args, ref_paged_decode(*args))
