"""``defer_normalization``: reduction-invariant normalizers leave their reductions.

Each rewrite is checked against the expected cascade and against the
interpreter; the pass is a no-op where it does not apply, and it takes the
softmax examples from 3 passes to 2.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given

from attnc.einsum_ir.interpreter import interpret
from attnc.einsum_ir.printer import print_ir
from attnc.frontends import parse
from attnc.passes.canonicalize import canonicalize
from attnc.passes.defer_normalization import Presence, defer_normalization
from attnc.passes.passcount import count_passes
from strategies import definitions, sample_inputs, sample_sizes

QKV = "Q[P,E], K[M,E], V[M,F]"


def spec(body: str, args: str = QKV, outs: str = "AV[P,F]"):
    return parse(f"attention t({args}) -> {outs} {{\n{body}\n}}").definitions[0]


def deferred(defn):
    out = defer_normalization(defn)
    assert parse(print_ir(out)).definitions[0] == out
    assert defer_normalization(out) == out  # nothing left to move
    return out


def as_tuple(x) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def assert_same(source, derived, args, rtol=1e-10, **params) -> None:
    for e, a in zip(as_tuple(interpret(source, *args, **params)),
                    as_tuple(interpret(derived, *args, **params))):
        np.testing.assert_array_equal(a == 0, e == 0)
        np.testing.assert_allclose(a, e, rtol=rtol, atol=1e-12)


def qkv(rng, P=5, M=13, E=3, F=2):
    return [rng.standard_normal((P, E)), rng.standard_normal((M, E)), rng.standard_normal((M, F))]


SOFTMAX = """
  QK[p,m] = Q[p,e] * K[m,e]   where m <= p + M - P
  GM[p]   = max[m](QK[p,m])
  SN[p,m] = exp(QK[p,m] - GM[p])
  SD[p]   = sum[m](SN[p,m])"""


def test_cascade4_inlines_the_normalized_map_and_divides_after_the_sum():
    source = spec(SOFTMAX + """
      A[p,m]  = SN[p,m] / SD[p]
      AV[p,f] = A[p,m] * V[m,f]""")
    expected = spec(SOFTMAX + """
      SNV[p,f] = sum[m](SN[p,m] * V[m,f])
      AV[p,f]  = SNV[p,f] / SD[p]""")
    out = deferred(source)
    assert out == canonicalize(expected)
    assert count_passes(source).pass_bound == 3 and count_passes(out).pass_bound == 2
    assert_same(source, out, qkv(np.random.default_rng(0), P=7, M=5))  # rows with no key too


def test_a_normalizer_inside_the_sum_body_moves_out():
    source = spec(SOFTMAX + "\n  AV[p,f] = SN[p,m] * V[m,f] / SD[p]")
    out = deferred(source)
    assert print_ir(out.statements[-2]) == "SNV[p,f] = sum[m](SN[p,m] * V[m,f])"
    assert print_ir(out.statements[-1]) == "AV[p,f] = SNV[p,f] / SD[p]"
    assert_same(source, out, qkv(np.random.default_rng(1)))


SQUARED_RELU = """
  R[p,m]  = relu(Q[p,e] * K[m,e]) ** 2   where m <= p + M - P
  D[p]    = sum[m](R[p,m])"""


def _rows_with_no_positive_score(rng, P=6, M=9, E=3, F=2):
    """Q, K, V where rows 0 and 3 have only scores <= 0 (D = 0 there)."""
    q, k, v = qkv(rng, P, M, E, F)
    k = np.abs(k)
    q[[0, 3]] = -np.abs(q[[0, 3]])
    return [q, k, v]


@pytest.mark.parametrize("body,reduction,after", [
    # the normaliser is a factor and the where's argument
    ("AV[p,f] = R[p,m] * V[m,f] / D[p]   where D[p] > 0",
     "RV[p,f] = sum[m](R[p,m] * V[m,f])", "AV[p,f] = RV[p,f] / D[p]   where D[p] > 0"),
    # only the where reads it
    ("AV[p,f] = R[p,m] * V[m,f]   where D[p] > 0 and m < p + 2",
     "RV[p,f] = sum[m](R[p,m] * V[m,f])   where m < p + 2", "AV[p,f] = RV[p,f]   where D[p] > 0"),
])
def test_a_where_that_reads_a_normalizer_filters_the_map_after_the_sum(body, reduction, after):
    """A conjunct over the output's ranks that reads a normalizer moves from the sum to the
    map after it (the sum does not wait for the normaliser: one pass); conjuncts over the
    reduced rank stay.  Rows where it fails are absent either way."""
    source = spec(SQUARED_RELU + "\n  " + body)
    out = deferred(source)
    assert print_ir(out.statements[-2]) == reduction
    assert print_ir(out.statements[-1]) == after
    assert count_passes(out).pass_bound < count_passes(source).pass_bound
    args = _rows_with_no_positive_score(np.random.default_rng(3))
    assert not interpret(source, *args)[[0, 3]].any()
    assert_same(source, out, args)


def test_a_max_keeps_a_where_over_its_rank_and_gives_out_a_normalizer_where():
    source = spec(SQUARED_RELU + "\n  GM[p] = max[m](R[p,m])   where D[p] > 0 and m <= p",
                  outs="GM[P]")
    out = deferred(source)
    assert print_ir(out.statements[-1]) == "GM[p] = GM_max[p]   where D[p] > 0"
    assert_same(source, out, _rows_with_no_positive_score(np.random.default_rng(4)))


def test_a_difference_of_softmaxes_splits_into_one_sum_per_term():
    body = SOFTMAX.replace("GM", "GM1").replace("SN", "SN1").replace("SD", "SD1")
    body += SOFTMAX.replace("K[m,e]", "K2[m,e]").replace("QK", "QK2").replace(
        "GM", "GM2").replace("SN", "SN2").replace("SD", "SD2")
    source = spec(body + """
      A[p,m]  = SN1[p,m] / SD1[p] - lam * SN2[p,m] / SD2[p]
      AV[p,f] = A[p,m] * V[m,f]""", QKV + ", K2[M,E], lam")
    out = deferred(source)
    text = print_ir(out)
    assert "SN1V[p,f] = sum[m](SN1[p,m] * V[m,f])" in text
    assert "AV[p,f] = SN1V[p,f] / SD1[p] - lam * SN2V[p,f] / SD2[p]" in text
    assert "A[p,m]" not in text
    rng = np.random.default_rng(2)
    assert_same(source, out, qkv(rng, P=6, M=4) + [rng.standard_normal((4, 3))], lam=0.4)


def test_terms_computed_at_different_points_are_not_split():
    body = SOFTMAX.replace("GM", "GM1").replace("SN", "SN1").replace("SD", "SD1")
    body += SOFTMAX.replace("m <= p + M - P", "m >= p").replace("QK", "QK2").replace(
        "GM", "GM2").replace("SN", "SN2").replace("SD", "SD2")
    source = spec(body + """
      A[p,m]  = SN1[p,m] / SD1[p] - SN2[p,m] / SD2[p]
      AV[p,f] = A[p,m] * V[m,f]""")
    assert defer_normalization(source) == canonicalize(source)


def test_an_inlined_map_brings_its_where_along():
    source = spec(SOFTMAX + """
      A[p,m]  = SN[p,m] / SD[p]   where m != p
      AV[p,f] = A[p,m] * V[m,f]""")
    out = deferred(source)
    assert print_ir(out.statements[-2]) == (
        "SNV[p,f] = sum[m](SN[p,m] * V[m,f])   where m != p")
    assert_same(source, out, qkv(np.random.default_rng(3), P=4, M=6))


def test_max_gives_out_an_additive_normalizer():
    source = spec("""
      S[p,m]  = Q[p,e] * K[m,e]
      C[p]    = sum[m](S[p,m])
      GM[p]   = max[m](S[p,m] - C[p])""", outs="GM[P]")
    out = deferred(source)
    assert print_ir(out.statements[-2]) == "GM_max[p] = max[m](S[p,m])"
    assert print_ir(out.statements[-1]) == "GM[p] = GM_max[p] - C[p]"
    assert_same(source, out, qkv(np.random.default_rng(4)))


SCALED_MAX = """
  S[p,m]  = Q[p,e] * K[m,e]
  C[p]    = sum[m](S[p,m])
  GM[p]   = max[m](S[p,m] * FACTOR)"""


def test_max_gives_out_a_positive_factor_only():
    positive = spec(SCALED_MAX.replace("FACTOR", "exp(C[p])"), outs="GM[P]")
    out = deferred(positive)
    assert print_ir(out.statements[-1]) == "GM[p] = GM_max[p] * exp(C[p])"
    assert_same(positive, out, qkv(np.random.default_rng(5)))
    unknown_sign = canonicalize(spec(SCALED_MAX.replace("FACTOR", "C[p]"), outs="GM[P]"))
    assert defer_normalization(unknown_sign) == unknown_sign


def test_normalization_over_an_inner_rank_is_deferred_too():
    source = spec("""
      QL[p]   = sqrt(sum[e](Q[p,e] * Q[p,e]))
      QN[p,e] = Q[p,e] / QL[p]
      S[p,m]  = QN[p,e] * K[m,e]
      AV[p,f] = S[p,m] * V[m,f]""")
    out = deferred(source)
    assert "S[p,m] = QK[p,m] / QL[p]" in print_ir(out)
    assert count_passes(out).pass_bound < count_passes(source).pass_bound
    assert_same(source, out, qkv(np.random.default_rng(6)))


@pytest.mark.parametrize("body", [
    SOFTMAX + "\n  SNV[p,f] = SN[p,m] * V[m,f]\n  AV[p,f] = SNV[p,f] / SD[p]",   # already deferred
    "AV[p,f] = sigmoid(Q[p,e] * K[m,e]) * V[m,f]",                           # no normalizer
    "S[p,m] = Q[p,e] * K[m,e] * 0.5\n  AV[p,f] = S[p,m] * V[m,f] / M",         # constants stay
    SOFTMAX + "\n  AV[p,f] = sum[m](SN[p,m] * V[m,f] + SD[p])",               # a term without m
])
def test_noop_where_it_does_not_apply(body):
    source = canonicalize(spec(body))
    assert defer_normalization(source) == source


def test_presence_of_a_softmax_denominator_is_its_max_presence():
    defn = canonicalize(spec(SOFTMAX + "\n  AV[p,f] = SN[p,m] * V[m,f] / SD[p]"))
    presence = Presence(defn)
    st = {s.tensor: s for s in defn.statements}
    assert presence.statement(st["SD"]) == presence.statement(st["GM"])
    assert presence.point(st["SD"], frozenset({"GM"})) == presence.point(st["GM"])


@given(definitions())
def test_random_cascades_keep_their_meaning(defn):
    out = defer_normalization(defn)
    assert parse(print_ir(out)).definitions[0] == out
    rng = np.random.default_rng(0)
    args = sample_inputs(defn, rng, sample_sizes(defn, rng))
    try:
        expected = as_tuple(interpret(defn, *args))
    except (ValueError, ZeroDivisionError):  # a let that does not divide at these sizes
        return
    for e, a in zip(expected, as_tuple(interpret(out, *args))):
        np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-8, equal_nan=True)


def test_affine_in_range_proves_reflections_and_fitting_shifts_only():
    """``c ± i`` inside ``[0, extent)`` for every index of its rank, sizes only known
    non-negative (a size of 0 must not make a bound true)."""
    import sympy

    from attnc.einsum_ir.ir import Binary, Index, Num, Size, size_symbol
    from attnc.passes.defer_normalization import affine_in_range

    sizes = {"M": size_symbol("M"), "W": size_symbol("W"), "T": size_symbol("M") + 2}
    size_of = sizes.__getitem__
    m, M = Index("M"), Size("M")
    reflected = Binary("-", Binary("-", M, Num(1)), m)          # M - 1 - m
    assert affine_in_range(reflected, sizes["M"], size_of)
    assert not affine_in_range(Binary("-", M, m), sizes["M"], size_of)       # M at m = 0
    assert not affine_in_range(Binary("+", m, Num(1)), sizes["M"], size_of)  # M at m = M - 1
    assert affine_in_range(Binary("+", m, Num(2)), sizes["T"], size_of)      # into M + 2
    assert not affine_in_range(Binary("-", Binary("+", m, Size("W")), Num(1)), sizes["M"] +
                               size_symbol("W"), size_of)  # m + W - 1: -1 when W = 0
    assert not affine_in_range(Binary("*", Num(2), m), sympy.Integer(100), size_of)
