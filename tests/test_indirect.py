"""Indirect subscripts: paged KV caches and packed variable-length batches.

The oracle is a dense float64 reference built by un-paging (tests/example_refs.py); the
interpreter, every pipeline prefix and both numpy backends (per-Einsum ``-O0`` and the
fused tile loop) must agree with it on adversarial page tables: permutations, repeated
pages, -1 and out-of-cache entries, page sizes 1, 16 and 64, lengths from 0 to full.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnc.backends import compile_module, load_generated, write_atomic
from attnc.backends.check import bounded_sizes, check_definition, index_extents, random_call
from attnc.einsum_ir.interpreter import interpret
from attnc.einsum_ir.printer import print_ir
from attnc.frontends import parse, parse_file
from attnc.passes.passcount import count_passes
from attnc.passes.pipeline import run_pipeline
from attnc.passes.report import build_report, render_report

from conftest import EXAMPLES
from example_refs import ref_paged_decode, ref_paged_prefill, ref_varlen_prefill

RTOL = 1e-10
INT32 = np.iinfo(np.int32)
INDIRECT_EXAMPLES = ("paged_decode.attn", "paged_prefill.attn", "varlen_prefill.attn")


def compiled(path: Path | str, tmp: Path, fused: bool):
    """The generated function of a spec's (a file's, or text's) first definition."""
    module = parse_file(path) if isinstance(path, Path) else parse(path, "spec.attn")
    stem = f"{module.definitions[0].name}_{'fused' if fused else 'O0'}"
    _, files = compile_module(module, "numpy", stem, fused=fused)
    write_atomic(tmp / f"{stem}.py", files[f"{stem}.py"])
    return getattr(load_generated(tmp / f"{stem}.py"), module.definitions[0].name)


@pytest.fixture(scope="module")
def paged(tmp_path_factory):
    """paged_decode / paged_prefill / varlen_prefill: (definition, fused fn, -O0 fn)."""
    tmp = tmp_path_factory.mktemp("indirect")
    out = {}
    for name in INDIRECT_EXAMPLES:
        path = EXAMPLES / name
        out[name] = (parse_file(path).definitions[0], compiled(path, tmp, True),
                     compiled(path, tmp, False))
    return out


def assert_all_agree(entry, args, expected, **params):
    """The interpreter and both numpy backends equal the dense reference."""
    defn, fused, plain = entry
    bound = RTOL * max(np.max(np.abs(expected), initial=0.0), 1.0)
    for name, got in (("interpreter", interpret(defn, *args, **params)),
                      ("fused", fused(*args, **params)), ("-O0", plain(*args, **params))):
        assert got.shape == expected.shape, name
        np.testing.assert_array_equal(got == 0, expected == 0, err_msg=f"{name}: zero pattern")
        assert np.max(np.abs(got - expected), initial=0.0) <= bound, name


# --- page tables -----------------------------------------------------------------------------


@st.composite
def page_tables(draw, B: int, NB: int, NP: int) -> np.ndarray:
    """A permutation of the cache's pages, pages repeated across and within sequences, and
    entries that read absent keys: -1, NP (one past the cache), the int32 extremes."""
    kind = draw(st.sampled_from(["permutation", "repeats", "holes"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if kind == "permutation":
        pages = rng.permutation(max(NP, B * NB))[: B * NB] % max(NP, 1)
    else:
        pages = rng.integers(0, NP, B * NB)
    table = pages.reshape(B, NB)
    if kind == "holes":
        odd = rng.random((B, NB)) < 0.4
        table = np.where(odd, rng.choice([-1, NP, INT32.min, INT32.max], (B, NB)), table)
    return table.astype(np.int32)


@st.composite
def paged_cases(draw, prefill: bool):
    PG = draw(st.sampled_from([1, 16, 64]))
    B, NB = draw(st.integers(1, 3)), draw(st.integers(1, 4 if PG < 64 else 2))
    NP = draw(st.integers(1, 6))
    H, HK = draw(st.sampled_from([(2, 1), (2, 2), (4, 2)]))
    E, F = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    PT = draw(page_tables(B, NB, NP))
    L = np.array(draw(st.lists(st.integers(0, NB * PG), min_size=B, max_size=B)), np.int32)
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    q_shape = (B, draw(st.integers(1, 4)), H, E) if prefill else (B, H, E)
    return [rng.standard_normal(q_shape), rng.standard_normal((NP, PG, HK, E)),
            rng.standard_normal((NP, PG, HK, F)), PT, L]


@settings(max_examples=40)
@given(paged_cases(prefill=False))
def test_paged_decode_on_adversarial_page_tables(paged, args):
    assert_all_agree(paged["paged_decode.attn"], args, ref_paged_decode(*args))


@settings(max_examples=25)
@given(paged_cases(prefill=True))
def test_paged_prefill_on_adversarial_page_tables(paged, args):
    assert_all_agree(paged["paged_prefill.attn"], args, ref_paged_prefill(*args))


@st.composite
def varlen_cases(draw):
    """Sorted offsets with empty sequences; sometimes unsorted or past the end (absent)."""
    T, C = draw(st.integers(1, 24)), draw(st.integers(2, 5))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    CU = np.sort(rng.integers(0, T + 1, C))
    CU[0], CU[-1] = 0, T
    if draw(st.booleans()):
        CU = np.where(rng.random(C) < 0.3, rng.integers(-3, T + 4, C), CU)
    H, HK = draw(st.sampled_from([(1, 1), (2, 1), (4, 2)]))
    E, F = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    return [rng.standard_normal((T, H, E)), rng.standard_normal((T, HK, E)),
            rng.standard_normal((T, HK, F)), CU.astype(np.int32)]


@settings(max_examples=40)
@given(varlen_cases())
def test_varlen_prefill_on_packed_batches(paged, args):
    assert_all_agree(paged["varlen_prefill.attn"], args, ref_varlen_prefill(*args))


def test_a_page_table_of_minus_ones_gives_exact_zero(paged):
    rng = np.random.default_rng(0)
    Q, KC, VC = rng.standard_normal((2, 4, 3)), rng.standard_normal((3, 16, 2, 3)), \
        rng.standard_normal((3, 16, 2, 2))
    PT = np.array([[-1, -1], [1, -1]], np.int32)
    L = np.array([32, 20], np.int32)
    for fn in paged["paged_decode.attn"][1:]:
        with np.errstate(all="raise"):
            out = fn(Q, KC, VC, PT, L)
        assert np.all(out[0] == 0.0) and np.all(out[1] != 0.0)
        np.testing.assert_allclose(out, ref_paged_decode(Q, KC, VC, PT, L), rtol=1e-12)


def test_batched_page_tables_broadcast_like_the_other_inputs(paged):
    """A per-head-batch page table: PT and L carry a leading dim the cache does not."""
    rng = np.random.default_rng(1)
    Q = rng.standard_normal((3, 2, 4, 3))
    KC, VC = rng.standard_normal((5, 4, 2, 3)), rng.standard_normal((5, 4, 2, 2))
    PT = rng.integers(-1, 6, (3, 2, 3)).astype(np.int32)
    L = rng.integers(0, 13, (3, 2)).astype(np.int32)
    assert_all_agree(paged["paged_decode.attn"], [Q, KC, VC, PT, L],
                     ref_paged_decode(Q, KC, VC, PT, L))


# --- the semantics of the contract --------------------------------------------------------------

INDEX_OUT_OF_ITS_OWN_BOUNDS = """
attention f(K[N,E], PT[NB]: i32) -> O[M,E] {
  let PG = 2
  let M = NB * PG + 3
  O[m,e] = K[PT[m // PG] * PG + m % PG, e]
}
"""


def test_an_absent_index_element_reads_an_absent_element(tmp_path):
    """m past NB * PG reads PT out of its bounds: absent (0), never PT's last entry."""
    defn = parse(INDEX_OUT_OF_ITS_OWN_BOUNDS).definitions[0]
    K = np.arange(1.0, 13.0).reshape(6, 2)
    PT = np.array([2, -1, 0], np.int32)
    want = np.zeros((9, 2))
    for m in range(6):
        page = PT[m // 2]
        if 0 <= page * 2 + m % 2 < 6 and page >= 0:
            want[m] = K[page * 2 + m % 2]
    for fn in (lambda *a: interpret(defn, *a), compiled(INDEX_OUT_OF_ITS_OWN_BOUNDS, tmp_path, True),
               compiled(INDEX_OUT_OF_ITS_OWN_BOUNDS, tmp_path, False)):
        np.testing.assert_array_equal(fn(K, PT), want)


FLAT_CACHE = """
attention f(K[N,E], PT[NB]: i32) -> O[M,E] {
  let PG = 4
  let M = NB * PG
  O[m,e] = K[PT[m // PG] * PG + m % PG, e]
}
"""


def test_index_arithmetic_does_not_wrap_around_in_int32(tmp_path):
    """2**30 * 4 is 0 in int32: the page must still read absent rows, not page 0."""
    defn = parse(FLAT_CACHE).definitions[0]
    K = np.arange(1.0, 9.0).reshape(8, 1)
    PT = np.array([2**30, 1, -2**30], np.int32)
    want = np.array([0, 0, 0, 0, 5, 6, 7, 8, 0, 0, 0, 0.0])[:, None]
    for fn in (lambda *a: interpret(defn, *a), compiled(FLAT_CACHE, tmp_path, True),
               compiled(FLAT_CACHE, tmp_path, False)):
        np.testing.assert_array_equal(fn(K, PT), want)


MODULO = """
attention rotate(K[M,E], S[B]: i64) -> O[B,M,E] {
  O[b,m,e] = K[(m - S[b]) % M, e]
}
"""


def test_modulo_is_floor_modulo_as_in_python(tmp_path):
    """``%`` never gives a negative subscript: ``(m - s) % M`` is numpy's roll by s."""
    K = np.random.default_rng(2).standard_normal((7, 3))
    S = np.array([0, 3, -2, 9, -15], np.int64)
    want = np.stack([np.roll(K, s, axis=0) for s in S])
    defn = parse(MODULO).definitions[0]
    for fn in (lambda *a: interpret(defn, *a), compiled(MODULO, tmp_path, True),
               compiled(MODULO, tmp_path, False)):
        np.testing.assert_allclose(fn(K, S), want, rtol=0, atol=0)


def test_indirect_specs_round_trip():
    for name in INDIRECT_EXAMPLES:
        module = parse_file(EXAMPLES / name)
        for _, stage in run_pipeline(module, options={"tile": 16}):
            assert parse(print_ir(stage)) == stage


# --- passes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", INDIRECT_EXAMPLES)
def test_the_pipeline_derives_one_pass_and_split_k_keeps_the_meaning(name):
    """The default pipeline streams the key rank in one pass; split-K over 3 workers and
    stream-K keep the meaning on tables with holes."""
    module = parse_file(EXAMPLES / name)
    final = run_pipeline(module, options={"tile": 4})[-1][1].definitions[0]
    assert count_passes(final).pass_bound == 1
    source = module.definitions[0]
    rng = np.random.default_rng(3)
    sizes = {"B": 2, "H": 2, "HK": 1, "E": 3, "F": 2, "NP": 4, "PG": 3, "NB": 3, "P": 2, "T": 9,
             "C": 3}
    args, params = random_call(source, rng, {r: sizes[r] for a in source.tensor_args
                                             for r in a.ranks})
    want = interpret(source, *args, **params)
    for split in ("split-k", "stream-k"):
        names = ["canonicalize", "defer-normalization", "online", "stream-final", split]
        derived = run_pipeline(module, names, options={"tile": 4, "workers": 3})[-1][1]
        np.testing.assert_allclose(interpret(derived.definitions[0], *args, **params), want,
                                   rtol=1e-12, atol=1e-14)


# Cascades the examples do not cover: an index read inside a `where` and a blocked one
# (KEEP[IX[m]]), a flat cache (PT[...] * PG + m % PG), a map read at an indirect subscript
# (S[p, IX[m]]: online must leave it alone), softmax-free (reassociate), a packed output
# summed over sequences (a computed tensor read through an index: opaque to the passes).
CASCADES = {
    "where_indirect": """
attention f(Q[P,E], K[M,E], V[M,F], IX[M]: i32, KEEP[N]: bool) -> O[P,F] {
  S[p,m] = Q[p,e] * K[IX[m], e]   where KEEP[IX[m]]
  O[p,f] = exp(S[p,m] - max[m](S[p,m])) * V[IX[m], f] / sum[m](exp(S[p,m] - max[m](S[p,m])))
}""",
    "flat_cache": """
attention f(Q[B,E], KC[N,E], VC[N,F], PT[B,NB]: i64, L[B]: i64) -> O[B,F] {
  let PG = 4
  let M = NB * PG
  S[b,m] = Q[b,e] * KC[PT[b, m // PG] * PG + m % PG, e]   where m < L[b]
  GM[b] = max[m](S[b,m])
  SD[b] = sum[m](exp(S[b,m] - GM[b]))
  O[b,f] = exp(S[b,m] - GM[b]) * VC[PT[b, m // PG] * PG + m % PG, f] / SD[b]
}""",
    "map_read_indirectly": """
attention f(Q[P,E], K[M,E], V[M,F], IX[M]: i32) -> O[P,F] {
  S[p,m] = Q[p,e] * K[m, e]
  GM[p] = max[m](S[p,m])
  SN[p,m] = exp(S[p,m] - GM[p])
  SD[p] = sum[m](SN[p,m])
  O[p,f] = SN[p, IX[m]] * V[m, f] / SD[p]
}""",
    "linear_paged": """
attention f(Q[P,E], KC[NP,PG,E], VC[NP,PG,F], PT[NB]: i32) -> O[P,F] {
  let M = NB * PG
  O[p,f] = Q[p,e] * KC[PT[m // PG], m % PG, e] * VC[PT[m // PG], m % PG, f]
}""",
    "packed_output": """
attention f(Q[T,E], K[T,E], V[T,F], CU[C]: i32) -> O[T,F] {
  let B = C - 1
  let P = T
  let M = T
  S[b,p,m] = Q[CU[b] + p, e] * K[CU[b] + m, e]   where m <= p and p < CU[b+1] - CU[b]
  A[b,p,f] = exp(S[b,p,m] - max[m](S[b,p,m])) * V[CU[b] + m, f] / sum[m](exp(S[b,p,m] - max[m](S[b,p,m])))
  O[t,f] = A[b, t - CU[b], f]   where CU[b] <= t and t < CU[b+1]
}""",
}
PIPELINES = [["canonicalize", "defer-normalization"],
             ["canonicalize", "defer-normalization", "online"],
             ["canonicalize", "defer-normalization", "reassociate", "online", "stream-final",
              "split-k"],
             ["canonicalize", "defer-normalization", "online", "stream-final", "stream-k"]]


@pytest.mark.parametrize("name", sorted(CASCADES))
def test_every_pass_keeps_the_meaning_of_indirect_cascades(name, tmp_path):
    """Each pipeline's result prints and parses back, and means what the source means on
    inputs with absent index entries; both numpy backends agree with the interpreter."""
    module = parse(CASCADES[name], f"{name}.attn")
    source = module.definitions[0]
    rng = np.random.default_rng(4)
    calls = [random_call(source, rng, bounded_sizes(source, rng, 1, 9), batch, ())
             for batch in ((), (2,))]
    for names in PIPELINES:
        derived = run_pipeline(module, names, options={"tile": 3, "workers": 2})[-1][1]
        assert parse(print_ir(derived)) == derived, names
        for args, params in calls:
            np.testing.assert_allclose(interpret(derived.definitions[0], *args, **params),
                                       interpret(source, *args, **params), rtol=1e-12,
                                       atol=1e-13, err_msg=str(names))
    for fused in (True, False):
        assert all(r.ok for r in check_definition(source, compiled(CASCADES[name], tmp_path, fused),
                                                  seed=5))


def test_report_says_the_indirectly_read_rank_is_data_dependent():
    report = build_report(parse_file(EXAMPLES / "paged_decode.attn"))
    ranks = {r["rank"]: r for r in report["definitions"][0]["stages"][0]["ranks"]}
    assert ranks["NP"]["data_dependent"] and not ranks["M"]["data_dependent"]
    assert ranks["NP"]["indexed_by"] == ["KC[PT[b, m // PG], m % PG, h // G, e]",
                                         "VC[PT[b, m // PG], m % PG, h // G, f]"]
    json.dumps(report)
    text = render_report(report)
    assert "symbolic, data-dependent" in text
    assert "NP is data-dependent: read at positions an index tensor holds" in text


# --- attnc check's inputs ------------------------------------------------------------------------


def test_check_draws_index_tensors_in_range_with_some_absent_entries():
    defn = parse_file(EXAMPLES / "paged_decode.attn").definitions[0]
    sizes = {"B": 40, "H": 2, "HK": 1, "E": 2, "F": 2, "NP": 7, "PG": 3, "NB": 30}
    assert index_extents(defn, sizes) == {"PT": (7, True), "L": (91, False)}
    args, _ = random_call(defn, np.random.default_rng(0), sizes)
    PT, L = args[3], args[4]
    assert PT.dtype == np.int32 and PT.min() == -1 and PT.max() == 7
    assert 0.8 < np.mean((PT >= 0) & (PT < 7)) < 1.0
    assert L.min() >= 0 and L.max() <= 90
    varlen = parse_file(EXAMPLES / "varlen_prefill.attn").definitions[0]
    assert index_extents(varlen, {"T": 9, "H": 1, "HK": 1, "E": 1, "F": 1, "C": 3}) == \
        {"CU": (9, True)}


# --- the kernel backends compile them; a limit still refuses with the place ------------------


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("name", INDIRECT_EXAMPLES)
def test_kernel_backends_compile_indirect_examples(name, backend):
    """Gathers and floor modulo on Triton and CUDA: tests/test_indirect_gpu.py runs them."""
    module = parse_file(EXAMPLES / name)
    _, files = compile_module(module, backend, Path(name).stem, options={"tile": 16})
    text = "".join(files.values())
    assert ("tl.load(PT_ptr" in text or "tl.load(CU_ptr" in text) if backend == "triton" \
        else ("(long long)PT[" in text or "(long long)CU[" in text or "s_pt" in text)


RING = """
attention ring(Q[P,E], K[M,E], V[M,F]) -> O[P,F] {
  S[p,m] = Q[p,e] * K[(m + 1) % M, e]
  O[p,f] = exp(S[p,m] - max[m](S[p,m])) * V[(m + 1) % M, f] / sum[m](exp(S[p,m] - max[m](S[p,m])))
}
"""


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_a_backend_limit_refuses_with_the_place_and_the_reason(backend, monkeypatch):
    """The refusal machinery stays for what a kernel backend may lack (none today)."""
    from attnc.passes import capabilities
    from attnc.passes.tile import NotTileable

    compile_module(parse(RING, "spec.attn"), backend, "ring")
    monkeypatch.setitem(capabilities.LIMITS, backend, {"modulo": "does not compute floor modulo"})
    with pytest.raises(NotTileable, match=f"'%' subscript K\\[.*spec.attn:3:.*the {backend} "
                                          f"backend does not compute floor modulo; use --backend numpy"):
        compile_module(parse(RING, "spec.attn"), backend, "ring")
