"""``chunked``: the chunked form of causal, softmax-free sums with an associative state.

Every chunked cascade is compared with the quadratic source in the interpreter (ragged
lengths, lengths below the chunk size, empty ones, a KV-cache offset, batch dims), and the
long-sequence test runs the numpy backend at 64k keys against a float64 recurrence.
"""
from __future__ import annotations

import functools
import re
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnc.backends import choose_form, lower_stages
from attnc.einsum_ir import ir
from attnc.einsum_ir.interpreter import interpret
from attnc.einsum_ir.printer import print_ir
from attnc.frontends import parse, parse_file
from attnc.passes.canonicalize import canonicalize
from attnc.passes.chunked import chunked, chunked_blockers, chunked_forms
from attnc.passes.costs import form_cost
from attnc.passes.defer_normalization import defer_normalization
from attnc.passes.passcount import raises_bound
from attnc.passes.pipeline import run_pipeline
from attnc.passes.reassociate import assumed_sizes
from attnc.passes.report import build_report, render_report
from attnc.passes.tile import NotTileable

from conftest import EXAMPLES as EXAMPLES_DIR
from example_refs import EXAMPLES

CHUNKABLE = ("retention", "gla", "linear_causal", "rwkv")


@functools.lru_cache(maxsize=None)
def example(name: str) -> ir.Definition:
    defn = parse_file(EXAMPLES_DIR / f"{name}.attn").definitions[0]
    return defer_normalization(canonicalize(defn))


@functools.lru_cache(maxsize=None)
def forced(name: str, chunk: int) -> ir.Definition:
    return chunked(example(name), chunk=chunk)


def inputs(name: str, P: int, M: int, E: int = 3, F: int = 2, batch=(), seed: int = 0):
    """Inputs of example ``name``: queries P, keys M (RWKV: M = P), log gates in
    (log 0.5, 0], RWKV's decays and bonus of either sign."""
    rng = np.random.default_rng(seed)
    if name == "rwkv":
        M = P
    args = [rng.standard_normal(batch + (P, E)), rng.standard_normal(batch + (M, E)),
            rng.standard_normal(batch + (M, F))]
    if name == "gla":
        args.append(np.log(rng.uniform(0.5, 1.0, batch + (M,))))
    if name == "rwkv":
        args += [rng.standard_normal(E), rng.standard_normal(E)]
    return args


def assert_same(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    np.testing.assert_array_equal(actual == 0, expected == 0, err_msg="absent pattern differs")
    np.testing.assert_allclose(actual, expected, rtol=1e-10, atol=1e-12)


def test_retention_becomes_chunks_and_a_decayed_state():
    out = forced("retention", 64)
    text = print_ir(out)
    assert "let M0 = 64" in text and "let M1 = ceil(M/M0)" in text
    # the state at each chunk's start, decayed across a chunk, and every decay relative to
    # a chunk start (no gamma ** -m anywhere: it overflows for long sequences)
    assert "SKV[m1+1,e,f] = select(m1 > 0, gamma ** M0 * SKV[m1,e,f], 0) + LKV[m1,e,f]" in text
    assert "gamma ** (M0 - m0)" in text
    # the queries chunk-major like the keys: a chunk's queries read its keys as one tile,
    # and the decay inside a chunk depends on places in it only
    assert "QK[m1,m0q,m0] = sum[e](Q[m1 * M0 + m0q + P - M, e] * K[m1 * M0 + m0, e])" in text
    assert "gamma ** (m0q - m0)" in text
    assert "O_chunks[m1,m0q,f] = O_intra[m1,m0q,f] + select(m1 > 0, O_inter[m1,m0q,f], 0)" in text
    assert "O[p,f] = O_chunks[(p + M - P) // M0, (p + M - P) % M0, f]" in text
    assert out.iterative_ranks == ("M1",)
    assert parse(text, "out.attn").definitions[0] == out  # prints as valid .attn


def test_gla_decays_are_sums_of_a_chunks_own_gates():
    """The cumulative gate CG is read only through chunk-local running sums: the global
    CG (which grows with the sequence, and loses float32 precision) is gone."""
    out = forced("gla", 32)
    text = print_ir(out)
    assert "CG_local[m1,m0] = sum[m0k](LG[m1 * M0 + m0k])   where m0k <= m0" in text
    assert "CG[" not in text
    assert "exp(CG_local[m1,m0q] - CG_local[m1,m0])" in text
    assert "exp(CG_local[m1, M0 - 1] + CG_local[1 + m1, 0] - CG_local[m1,0]) * SKV[m1,e,f]" in text


def test_the_zero_state_is_never_multiplied():
    """Before the first chunk the state is a present 0 the source does not have: an Inf
    query factor or decay times it would be NaN where the source has Inf."""
    source, out = example("retention"), forced("retention", 4)
    args = inputs("retention", 6, 6, seed=2)
    args[0][1, 0] = np.inf  # a query of the first chunk
    with np.errstate(invalid="ignore", over="ignore"):
        got, want = interpret(out, *args), interpret(source, *args)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    assert np.isinf(got[1]).any()  # 0 * inf would have made the whole row NaN


@pytest.mark.parametrize("name", CHUNKABLE)
@pytest.mark.parametrize("chunk", [1, 3, 4, 16])
def test_chunked_equals_the_quadratic_form_on_ragged_lengths(name, chunk):
    source, out = example(name), forced(name, chunk)
    for P, M in [(1, 1), (5, 5), (13, 13), (7, 13), (3, 20), (2, 3), (0, 0), (0, 4), (3, 0),
                 (6, 2)]:
        args = inputs(name, P, M)
        assert_same(interpret(out, *args), interpret(source, *args))


@pytest.mark.parametrize("name", CHUNKABLE)
def test_chunked_equals_the_source_with_batch_dims_and_the_reference(name):
    args = inputs(name, 9, 11, batch=(2,), seed=3)  # RWKV's WD, U: no batch dim
    got = interpret(forced(name, 4), *args)
    assert_same(got, interpret(example(name), *args))
    per_batch = [a if a.ndim == 1 and name == "rwkv" else a[1] for a in args]
    np.testing.assert_allclose(got[1], EXAMPLES[f"{name}.attn"].reference(*per_batch),
                               rtol=1e-9, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(("retention", "gla", "linear_causal")), P=st.integers(0, 19),
       extra=st.integers(0, 23), chunk=st.integers(1, 9), seed=st.integers(0, 2**16),
       gamma=st.floats(0.05, 1.0))
def test_chunked_equals_the_source_for_any_lengths_and_chunks(name, P, extra, chunk, seed, gamma):
    M = P + extra
    args = inputs(name, P, M, seed=seed)
    params = {"gamma": gamma} if name == "retention" else {}
    assert_same(interpret(forced(name, chunk), *args, **params),
                interpret(example(name), *args, **params))


def test_queries_past_the_keys_read_no_state():
    """P > M: the first P - M queries sit before every key (absent, 0), as in the source."""
    source, out = example("retention"), forced("retention", 4)
    args = inputs("retention", 9, 4)
    got = interpret(out, *args)
    assert_same(got, interpret(source, *args))
    assert not got[:5].any() and got[5:].all()


@pytest.mark.parametrize("name", CHUNKABLE)
def test_the_chunked_form_keeps_the_pass_bound(name):
    assert not raises_bound(example(name), forced(name, 64))


# ----------------------------------------------------------------------------
# Long sequences: the numpy backend at 64k keys, against a float64 recurrence
# ----------------------------------------------------------------------------


def recurrent_reference(Q, K, V, decay):
    """O[t] = Q[t] S[t+1], S[t+1] = decay[t] S[t] + K[t]^T V[t], in float64, step by step."""
    S = np.zeros((K.shape[1], V.shape[1]))
    out = np.empty((Q.shape[0], V.shape[1]))
    for t in range(K.shape[0]):
        S = decay[t] * S + np.outer(K[t], V[t])
        out[t] = Q[t] @ S
    return out


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path / "cache"))


@pytest.mark.parametrize("name", ["retention", "gla"])
def test_64k_keys_on_the_numpy_backend_neither_overflow_nor_lose_accuracy(name, cache):
    import attnc

    N = 65536
    mod = attnc.compile(str(EXAMPLES_DIR / f"{name}.attn"), backend="numpy",
                        sizes={"P": N, "M": N, "E": 4, "F": 4})
    assert "SKV[m1+1,e,f] = " in mod.ir["reassociate"]  # the chunked form was chosen
    rng = np.random.default_rng(0)
    Q, K, V = (rng.standard_normal((N, 4)) for _ in range(3))
    if name == "gla":
        LG = np.log(rng.uniform(0.9, 1.0, N))
        args, decay = (Q, K, V, LG), np.exp(LG)
    else:
        args, decay = (Q, K, V), np.full(N, 0.96875)
    fn = getattr(mod, name)
    start = time.perf_counter()
    out = fn(*args)
    seconds = time.perf_counter() - start
    want = recurrent_reference(Q, K, V, decay)
    np.testing.assert_allclose(out, want, rtol=1e-8, atol=1e-10)
    assert seconds < 60, f"{name} at 64k took {seconds:.1f} s"
    out32 = fn(*(a.astype(np.float32) for a in args))  # float32 inputs: states in float32
    assert out32.dtype == np.float32 and np.isfinite(out32).all()
    # decays from a chunk's own gates: the global cumulative gate (|CG| ~ 3400 here) would
    # keep only about |CG| * 2^-24 ~ 2e-4 of a difference in float32
    assert np.abs(out32 - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("name", ["retention", "gla"])
def test_16_bit_inputs_keep_float32_states(name, cache):
    """f16 inputs: the chunked form's state and decays are computed in float32 (the
    language's rule), so the result is the float64 one up to f16 rounding."""
    import attnc

    N = 4096
    mod = attnc.compile(str(EXAMPLES_DIR / f"{name}.attn"), backend="numpy",
                        sizes={"P": N, "M": N, "E": 4, "F": 4})
    assert "SKV[m1+1,e,f] = " in mod.ir["reassociate"]
    rng = np.random.default_rng(1)
    args = [rng.standard_normal((N, 4)) for _ in range(3)]
    if name == "gla":
        args.append(np.log(rng.uniform(0.99, 1.0, N)))
    want = getattr(mod, name)(*args)
    got = getattr(mod, name)(*(a.astype(np.float16) for a in args))
    assert got.dtype == np.float16 and np.isfinite(got).all()
    assert np.abs(got.astype(np.float64) - want).max() <= 2e-3 * np.abs(want).max()


def test_a_naive_factorisation_would_overflow_where_the_chunked_form_does_not():
    """gamma ** (p - m) as gamma ** p * gamma ** -m: inf at 64k; the chunked form's decays
    are powers of distances within a chunk."""
    with np.errstate(over="ignore"):
        assert np.isinf(np.float64(0.96875) ** -65535.0)
    text = print_ir(forced("retention", 64))
    assert "** (-" not in text and not re.search(r"gamma \*\* \(?m\b", text)
    assert "gamma ** (m0q - m0)" in text  # distances within a chunk


# ----------------------------------------------------------------------------
# Refusals
# ----------------------------------------------------------------------------


def spec(body: str, args: str = "Q[P,E], K[M,E], V[M,F]") -> ir.Definition:
    text = f"attention t({args}) -> O[P,F] {{\n{body}\n}}"
    return defer_normalization(canonicalize(parse(text, "t.attn").definitions[0]))


@pytest.mark.parametrize("body, args, reason", [
    ("  QK[p,m] = Q[p,e] * K[m,e]   where m <= p + M - P\n"
     "  O[p,f] = exp(QK[p,m] - max[m](QK[p,m])) * V[m,f] / sum[m](exp(QK[p,m] - max[m](QK[p,m])))",
     None, "term QK[p,m] reading both p and m"),
    ("  O[p,f] = Q[p,e] * K[m,e] * gamma ** (p * m) * V[m,f]   where m <= p + M - P",
     "Q[P,E], K[M,E], V[M,F], gamma = 0.9", "reading both p and m"),
    ("  O[p,f] = Q[p,e] * K[m,e] * (p - m) * V[m,f]   where m <= p + M - P",
     None, "is not a decay"),
    ("  O[p,f] = Q[p,e] * K[m,e] * V[m,f]   where m <= p",
     None, "may lie past the last key"),
    ("  O[p,f] = Q[p,e] * K[m,e] * V[m,f]   where m <= p + M - P and p + M - P - m < 8",
     None, "which no state over chunks carries"),
    ("  O[p,f] = Q[p,e] * K[m,e] * V[m,f]", None, "no mask on its sum: not causal"),
    ("  KM[m,e] = K[m,e]   where K[m,e] > 0\n"
     "  O[p,f] = Q[p,e] * KM[m,e] * V[m,f]   where m <= p + M - P",
     None, "may be absent"),
    ("  O[p,f] = Q[p,e] * K[m,e] * gamma ** (p - m) * V[m,f]   where m <= p + M - P",
     "Q[P,E], K[M,E], V[M,F], G[M]", None),
])
def test_refusals_say_why(body, args, reason):
    if reason is None:  # the control: chunkable (the base G[M] is unused, gamma a param)
        defn = spec(body.replace("gamma", "0.5"), args)
        assert chunked_blockers(defn) == []
        return
    defn = spec(body, args or "Q[P,E], K[M,E], V[M,F]")
    blockers = chunked_blockers(defn)
    assert any(reason in b for b in blockers), blockers
    assert chunked(defn, chunk=4) == canonicalize(defn)  # left as it is


def test_the_softmax_examples_are_refused_for_their_scores():
    (line,) = [b for b in chunked_blockers(example("causal")) if b.startswith("SNV")]
    assert "the exponent of SN[p,m] has the term QK[p,m] reading both p and m" in line


# ----------------------------------------------------------------------------
# The cost model's choice, the pipeline, the report
# ----------------------------------------------------------------------------


def chosen_chunks(defn: ir.Definition, sizes) -> list[int]:
    out = chunked(defn, sizes)
    return [int(let.value) for let in out.lets if let not in defn.lets and let.value.is_Integer]


def test_the_cost_model_keeps_short_sequences_quadratic_and_chunks_long_ones():
    defn = example("retention")
    assert chosen_chunks(defn, {"P": 16, "M": 16, "E": 64, "F": 64}) == []
    assert chosen_chunks(defn, {"P": 4096, "M": 4096, "E": 64, "F": 64}) != []
    small = chosen_chunks(defn, {"P": 65536, "M": 65536, "E": 4, "F": 4})
    large = chosen_chunks(defn, {"P": 65536, "M": 65536, "E": 256, "F": 256})
    assert small[0] > large[0]  # wide heads make the intra-chunk part dearer: smaller chunks


def test_the_chosen_chunk_is_the_cheapest_candidate():
    defn, sizes = example("gla"), {"P": 8192, "M": 8192, "E": 64, "F": 64}
    assumed = assumed_sizes(defn, sizes)
    out = chunked(defn, sizes)
    for c in (16, 32, 64, 128, 256):
        assert form_cost(out, assumed) <= form_cost(chunked(defn, chunk=c), assumed) + 1e-6


def test_default_pipeline_chunks_for_every_target():
    """numpy, Triton and CUDA all take the chunked form: per-chunk states, the scan, the
    output per chunk, the queries back in order (tests/test_chunked_kernels.py runs them)."""
    module = parse_file(EXAMPLES_DIR / "retention.attn")
    options = {"tile": 64, "sizes": {"P": 4096, "M": 4096, "E": 64, "F": 64}}
    stages = run_pipeline(module, None, None, None, options)
    after = dict(stages)["reassociate"].definitions[0]
    assert after.iterative_ranks == ("M1",) and "SKV" in after.iterative_tensors
    for backend in ("triton", "cuda"):
        stages2, kernels = choose_form(module, stages, backend, options)
        assert stages2 is stages and len(kernels.programs[0].parts) == 4, backend
        assert not kernels.programs[0].notes[0].startswith(f"the {backend} target cannot")


def test_report_shows_the_three_forms_and_the_choice():
    module = parse_file(EXAMPLES_DIR / "retention.attn")
    report = build_report(module, {"P": 4096, "M": 4096, "E": 64, "F": 64})
    forms = report["definitions"][0]["forms"]
    assert [f["form"] for f in forms] == ["recurrent", "chunked", "quadratic"]
    assert [f["chosen"] for f in forms] == [False, True, False]
    rec, chu, quad = forms
    assert rec["steps"]["value"] == 4096 and quad["steps"]["value"] == 0
    assert chu["flops"]["value"] < quad["flops"]["value"] / 50
    assert rec["stored_elements"]["value"] > chu["stored_elements"]["value"]
    text = render_report(report)
    assert "forms of its causal sums" in text and "chunked (chosen)" in text
    assert "forms" not in build_report(parse_file(EXAMPLES_DIR / "causal.attn"))["definitions"][0]


def test_forms_agree_with_each_other():
    defn = example("gla")
    forms = chunked_forms(defn, {"P": 300, "M": 300, "E": 8, "F": 8})
    args = inputs("gla", 37, 50)
    want = interpret(defn, *args)
    for f in forms:
        assert_same(interpret(f.definition, *args), want)


# ----------------------------------------------------------------------------
# The algebra, not the examples' text
# ----------------------------------------------------------------------------

VARIANTS = {
    "per-head decay": ("Q[H,P,E], K[H,M,E], V[H,M,F], G[H]", "O[H,P,F]",
                       "  O[h,p,f] = Q[h,p,e] * K[h,m,e] * G[h] ** (p + M - P - m) * V[h,m,f]"
                       "   where m <= p + M - P"),
    "normalised retention": ("Q[P,E], K[M,E], V[M,F], gamma = 0.9", "O[P,F]",
                             "  S[p,m] = Q[p,e] * K[m,e] * gamma ** (p + M - P - m)"
                             "   where m <= p + M - P\n"
                             "  O[p,f] = S[p,m] * V[m,f] / sum[m](S[p,m])"),
    "exp2 of a data-dependent cumulative gate": (
        "Q[P,E], K[M,E], V[M,F], LG[M]", "O[P,F]",
        "  let T = M\n"
        "  CG[t] = sum[m](LG[m])   where m <= t\n"
        "  O[p,f] = Q[p,e] * K[m,e] * exp2(2 * CG[p + M - P] - 2 * CG[m] + 0.5) * V[m,f]"
        "   where m <= p + M - P"),
    "a decay written as its own map": (
        "Q[P,E], K[M,E], V[M,F], gamma = 0.8", "O[P,F]",
        "  D[p,m] = gamma ** (p - m + M - P)\n"
        "  O[p,f] = Q[p,e] * K[m,e] * D[p,m] * V[m,f]   where m <= p + M - P"),
    "query and key weights, no decay": (
        "Q[P,E], K[M,E], V[M,F], WQ[P], WK[M]", "O[P,F]",
        "  O[p,f] = Q[p,e] * WQ[p] * K[m,e] * WK[m] * V[m,f] / 3   where m <= p + M - P"),
}


def variant(key: str) -> ir.Definition:
    args, out, body = VARIANTS[key]
    text = f"attention v({args}) -> {out} {{\n{body}\n}}"
    return defer_normalization(canonicalize(parse(text, "v.attn").definitions[0]))


def variant_inputs(defn: ir.Definition, sizes: dict[str, int], seed: int):
    rng = np.random.default_rng(seed)
    out = []
    for a in defn.tensor_args:
        shape = tuple(sizes[r] for r in a.ranks)
        if a.name == "LG":
            out.append(np.log(rng.uniform(0.6, 1.0, shape)))
        elif a.name == "G":
            out.append(rng.uniform(0.5, 1.0, shape))
        else:
            out.append(rng.standard_normal(shape))
    return out


@pytest.mark.parametrize("key", sorted(VARIANTS))
@pytest.mark.parametrize("chunk", [1, 4, 5])
def test_variants_chunk_and_equal_their_source(key, chunk):
    source = variant(key)
    assert chunked_blockers(source) == []
    out = chunked(source, chunk=chunk)
    assert out.iterative_ranks and parse(print_ir(out), "o.attn").definitions[0] == out
    for P, M in [(1, 1), (6, 6), (4, 11), (9, 9), (0, 3), (5, 0)]:
        args = variant_inputs(source, {"P": P, "M": M, "E": 3, "F": 2, "H": 2}, P * 31 + M)
        assert_same(interpret(out, *args), interpret(source, *args))


def test_a_per_head_decay_gives_a_state_per_head():
    text = print_ir(chunked(variant("per-head decay"), chunk=8))
    assert "[0,h,e,f] = 0" in text and "G[h] ** M0 * " in text


def test_a_query_gate_read_at_p_is_a_decay_factor_of_the_query():
    """exp(GQ[p] - B[m]): GQ is over the queries, read at p in every part."""
    source = spec("  O[p,f] = Q[p,e] * K[m,e] * exp(GQ[p] - GK[m]) * V[m,f]   where m <= p + M - P",
                  "Q[P,E], K[M,E], V[M,F], GQ[P], GK[M]")
    out = chunked(source, chunk=3)
    assert out.iterative_ranks
    rng = np.random.default_rng(5)
    for P, M in [(4, 9), (7, 7), (0, 2)]:
        args = [rng.standard_normal(s) for s in ((P, 2), (M, 2), (M, 3), (P,), (M,))]
        assert_same(interpret(out, *args), interpret(source, *args))


def test_a_gate_running_sum_over_another_extent_may_be_absent_and_is_refused():
    """CG over T (not M's extent) read at the key: T may be shorter than the keys."""
    source = spec("  let N = T\n  CG[t] = sum[n](LG[n])   where n <= t\n"
                  "  O[p,f] = Q[p,e] * K[m,e] * exp(CG[p + M - P] - CG[m]) * V[m,f]"
                  "   where m <= p + M - P", "Q[P,E], K[M,E], V[M,F], LG[T]")
    (line,) = [b for b in chunked_blockers(source) if b.startswith("O:")]
    assert "reads rank T at a key's position: its extent need not be M's" in line


# ----------------------------------------------------------------------------
# Sums over earlier segments (Infini-attention's compressive memory)
# ----------------------------------------------------------------------------


def test_a_sum_over_earlier_segments_is_the_state_at_its_segment_start():
    """select(m < p // L * L, 1, 0) keeps the keys of earlier segments: chunks of one
    segment, no intra-chunk part, the state at the query's segment start (0 in the first)."""
    defn = defer_normalization(canonicalize(
        parse_file(EXAMPLES_DIR / "infini.attn").definitions[0]))
    out = chunked(defn)
    text = print_ir(out)
    assert "let M0 = L" in text and "let M01 = L" in text
    assert "_intra" not in text
    assert "MN_chunks[m11,m01q,f] = select(m11 > 0, MN_inter[m11,m01q,f], 0)" in text
    rng = np.random.default_rng(3)
    for P in (1, 15, 16, 17, 40, 65):
        args = [rng.standard_normal((2, P, 3)), rng.standard_normal((2, P, 3)),
                rng.standard_normal((2, P, 2))]
        np.testing.assert_allclose(interpret(out, *args, beta=0.3),
                                   interpret(defn, *args, beta=0.3), rtol=1e-10, atol=1e-12)


def test_two_segment_sizes_in_one_sum_are_refused():
    text = """
attention two(Q[P,E], K[M,E], V[M,F]) -> O[P,F] {
  let A = 4
  let B = 8
  O[p,f] = Q[p,e] * K[m,e] * V[m,f] * select(m < (p + M - P) // A * A, 1, 0) * select(m < (p + M - P) // B * B, 1, 0)   where m <= p + M - P
}
"""
    defn = canonicalize(parse(text, "two.attn").definitions[0])
    (reason,) = chunked_blockers(defn)
    assert "one chunk size cannot be both" in reason
