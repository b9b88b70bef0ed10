"""The contract's meaning, checked on the reference interpreter.

Every expected value here is computed by hand or with plain numpy from the
contract (/work/shared/attn-language.md), never by the interpreter itself.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from attnc.einsum_ir.interpreter import Interpreter, interpret
from attnc.einsum_ir.sizes import bind_sizes
from attnc.frontends import parse

from example_refs import softmax_av

RNG = np.random.default_rng(1234)


def defn(src: str):
    return parse(src, "test.attn").definitions[0]


def run(src: str, *arrays, **params):
    """The generated function's result, with every warning turned into an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return interpret(defn(src), *arrays, **params)


def store(src: str, params=None, **inputs):
    """Every tensor of the cascade as ``Value(val, present)``."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return Interpreter(defn(src)).run(inputs, params)


def rand(*shape):
    return RNG.normal(size=shape)


CAUSAL = """
attention causal_softmax(Q[P,E], K[M,E], V[M,F], scale = 1/sqrt(E)) -> AV[P,F] {
  QK[p,m] = Q[p,e] * K[m,e] * scale      where m <= p + M - P
  GM[p]   = max[m](QK[p,m])
  SN[p,m] = exp(QK[p,m] - GM[p])
  SD[p]   = sum[m](SN[p,m])
  A[p,m]  = SN[p,m] / SD[p]
  AV[p,f] = A[p,m] * V[m,f]
}
"""


# ----------------------------------------------------------------------------
# Rule 1: out-of-bounds subscripts read absent elements; nothing wraps
# ----------------------------------------------------------------------------

TILES = """
attention tiles(K[M,E]) -> BK[M1,M0,E] {
  let M0 = 4
  let M1 = ceil(M / M0)
  BK[m1,m0,e] = K[m1*M0 + m0, e]
}
"""


def test_ragged_end_of_a_tile_is_absent():
    k = rand(6, 3)
    st = store(TILES, K=k)["BK"]
    assert st.val.shape == (2, 4, 3)
    assert st.present[0].all() and st.present[1, :2].all()
    assert not st.present[1, 2:].any()
    np.testing.assert_array_equal(st.val[0], k[:4])
    np.testing.assert_array_equal(st.val[1, :2], k[4:])
    out = run(TILES, k)
    np.testing.assert_array_equal(out[1, 2:], 0.0)  # rule 3: absent -> 0


def test_negative_subscript_is_absent_not_wrapped():
    src = "attention d(V[M,F]) -> D[M,F] { D[m,f] = V[m,f] - V[m - 1, f] }"
    v = rand(5, 2)
    st = store(src, V=v)["D"]
    assert not st.present[0].any() and st.present[1:].all()
    out = run(src, v)
    np.testing.assert_array_equal(out[0], 0.0)  # wrapping would give v[0] - v[-1]
    np.testing.assert_allclose(out[1:], v[1:] - v[:-1])


def test_subscript_past_the_end_is_absent():
    src = "attention s(A[M]) -> X[M] { X[m] = A[m + 2] * 10 }"
    a = np.arange(1.0, 6.0)
    np.testing.assert_array_equal(run(src, a), [30.0, 40.0, 50.0, 0.0, 0.0])


def test_absent_reads_do_not_contribute_to_a_sum():
    # X[p] = sum over m of A[m + p]: the points past the end are simply not computed
    src = "attention s(A[M], B[P]) -> X[P] { X[p] = A[m + p] * B[p] }"
    a, b = np.arange(1.0, 5.0), np.ones(6)
    expected = [10.0, 9.0, 7.0, 4.0, 0.0, 0.0]
    np.testing.assert_array_equal(run(src, a, b), expected)


# ----------------------------------------------------------------------------
# Rule 2: maps of absent reads are absent; empty fibers reduce to absent
# ----------------------------------------------------------------------------

EMPTY_FIBER = """
attention e(S[P,M]) -> (GM[P], GS[P], GN[P], X[P]) {
  GM[p] = max[m](S[p,m])   where m < p
  GS[p] = sum[m](S[p,m])   where m < p
  GN[p] = min[m](S[p,m])   where m < p
  X[p]  = GM[p] + 1
}
"""


def test_reduction_over_an_empty_fiber_is_absent():
    s = rand(4, 4)
    st = store(EMPTY_FIBER, S=s)
    for name in ("GM", "GS", "GN", "X"):
        assert not st[name].present[0], name
        assert st[name].present[1:].all(), name
    gm, gs, gn, x = run(EMPTY_FIBER, s)
    # not 0 (X would be 1) and not -inf (X would be -inf): absent, so X[0] is 0
    assert gm[0] == gs[0] == gn[0] == x[0] == 0.0
    for p in range(1, 4):
        assert gm[p] == s[p, :p].max()
        assert gn[p] == s[p, :p].min()
        np.testing.assert_allclose(gs[p], s[p, :p].sum())
        assert x[p] == s[p, :p].max() + 1


def test_a_map_reading_an_absent_element_is_absent():
    src = "attention m(A[M], B[M]) -> X[M] { X[m] = exp(A[m - 1]) * 0 + B[m] }"
    a, b = rand(4), rand(4)
    out = run(src, a, b)
    assert out[0] == 0.0  # B[0] is present, but the map also reads A[-1]
    np.testing.assert_allclose(out[1:], b[1:])


@pytest.mark.parametrize("body, rest", [
    ("select(m > 0, A[m - 1], 5)", [1.0, 2.0, 3.0]),  # the guard is false at m=0, yet A[-1] is read
    ("select(m == 0, 7, A[m - 1])", [1.0, 2.0, 3.0]),
    ("select(m > 0, 5, A[m - 1])", [5.0, 5.0, 5.0]),
])
def test_select_cannot_guard_an_absent_read(body, rest):
    src = f"attention s(A[M]) -> X[M] {{ X[m] = {body} }}"
    out = run(src, np.arange(1.0, 5.0))
    assert out.tolist() == [0.0] + rest


def test_select_of_present_operands_picks_elementwise():
    src = "attention s(A[M], B[M]) -> X[M] { X[m] = select(A[m] > B[m], A[m], B[m] * 2) }"
    a, b = np.array([3.0, 0.0, -1.0]), np.array([1.0, 1.0, -2.0])
    np.testing.assert_array_equal(run(src, a, b), [3.0, 2.0, -1.0])


def test_fully_masked_softmax_rows_are_zero_without_nan_or_warnings():
    src = CAUSAL.replace("m <= p + M - P", "m <= p - 2")
    q, k, v = rand(5, 3), rand(4, 3), rand(4, 2)
    out = run(src, q, k, v)  # run() turns numpy warnings into errors
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[:2], 0.0)
    p, m = np.indices((5, 4))
    expected = softmax_av(q @ k.T / np.sqrt(3), m <= p - 2, v)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


def test_present_minus_inf_is_present():
    src = """
    attention n(A[P]) -> (X[P], Y[P], Z[P], W[P]) {
      X[p] = -inf
      Y[p] = exp(X[p])
      Z[p] = max(X[p], A[p])
      G    = max[p](X[p])
      W[p] = G + A[p]
    }
    """
    a = rand(3)
    st = store(src, A=a)
    assert st["X"].present.all() and (st["X"].val == -np.inf).all()
    assert st["G"].present and st["G"].val == -np.inf  # a max over present -inf values
    x, y, z, w = run(src, a)
    assert (x == -np.inf).all()  # a present -inf output stays -inf: it is not absent
    np.testing.assert_array_equal(y, 0.0)
    np.testing.assert_array_equal(z, a)
    assert (w == -np.inf).all()


def test_iterative_init_minus_inf_is_present():
    src = """
    attention r(X[I,P]) -> Y[P] {
      RM[0,p] = -inf
      RM[i+1,p] = max(RM[i,p], X[i,p])   where X[i,p] > 0
      Y[p] = RM[I,p]
    }
    """
    x = np.array([[-1.0, 2.0], [-3.0, 1.0]])
    st = store(src, X=x)["RM"]
    assert st.present.all()
    assert st.val[0, 0] == -np.inf
    y = run(src, x)
    assert y[0] == -np.inf and y[1] == 2.0


# ----------------------------------------------------------------------------
# where at every level
# ----------------------------------------------------------------------------

def test_where_filters_the_max_below_the_lhs_level():
    src = "attention g(QK[P,M]) -> GM[P] { GM[p] = max[m](QK[p,m])   where m <= p }"
    s = rand(4, 4)
    np.testing.assert_array_equal(run(src, s), [s[p, :p + 1].max() for p in range(4)])


def test_where_filters_both_sums_over_m():
    src = """
    attention o(N[P,M], V[M,F]) -> O[P,F] {
      O[p,f] = N[p,m] * V[m,f] / sum[m](N[p,m])   where m <= p
    }
    """
    n, v = RNG.uniform(0.5, 1.5, (4, 4)), rand(4, 2)
    tril = np.tril(np.ones((4, 4)))
    expected = (n * tril) @ v / (n * tril).sum(1, keepdims=True)
    np.testing.assert_allclose(run(src, n, v), expected, rtol=1e-12)


def test_where_on_lhs_variables_makes_points_absent():
    src = """
    attention w(A[P,M]) -> (X[P], Y[P]) {
      X[p] = A[p,0] * 2          where p < 3
      Y[p] = sum[m](A[p,m]) + 1  where p < 3
    }
    """
    a = rand(5, 3)
    st = store(src, A=a)
    assert st["X"].present.tolist() == [True, True, True, False, False]
    x, y = run(src, a)
    np.testing.assert_allclose(x, np.r_[2 * a[:3, 0], 0, 0])
    np.testing.assert_allclose(y, np.r_[a[:3].sum(1) + 1, 0, 0])


def test_where_without_index_variables():
    src = """
    attention c(A[P,M], cap) -> (X[P], Y[P]) {
      X[p] = A[p,0]              where cap > 0
      Y[p] = sum[m](A[p,m]) + 1  where cap > 0
    }
    """
    a = rand(3, 2)
    x, y = run(src, a, cap=1.0)
    np.testing.assert_allclose(x, a[:, 0])
    np.testing.assert_allclose(y, a.sum(1) + 1)
    x, y = run(src, a, cap=-1.0)
    np.testing.assert_array_equal(x, 0.0)
    np.testing.assert_array_equal(y, 0.0)  # not 1: the sum is absent too


def test_data_dependent_where():
    src = """
    attention doc(Q[P,E], K[P,E], V[P,F], DOC[P]: i32) -> AV[P,F] {
      let N = P
      QK[p,n] = Q[p,e] * K[n,e]   where DOC[n] == DOC[p]
      GM[p]   = max[n](QK[p,n])
      SN[p,n] = exp(QK[p,n] - GM[p])
      AV[p,f] = SN[p,n] * V[n,f] / sum[n](SN[p,n])
    }
    """
    q, k, v = rand(6, 3), rand(6, 3), rand(6, 2)
    doc = np.array([0, 0, 1, 1, 1, 2], dtype=np.int32)
    expected = softmax_av(q @ k.T, doc[:, None] == doc[None, :], v)
    np.testing.assert_allclose(run(src, q, k, v, doc), expected, rtol=1e-12)


def test_where_reading_an_absent_element_does_not_compute_the_point():
    src = "attention w(A[P,M], B[M]) -> X[P] { X[p] = sum[m](A[p,m]) where B[m + 1] > 0 }"
    a, b = rand(2, 4), np.array([1.0, 1.0, -1.0, 1.0])
    # m=0: B[1] > 0; m=1: B[2] < 0; m=2: B[3] > 0; m=3: B[4] is absent
    np.testing.assert_allclose(run(src, a, b), a[:, 0] + a[:, 2])


def test_shadowed_where_applies_to_the_inner_max_and_the_outer_sum():
    src = """
    attention sh(S[P,M], V[M,F]) -> O[P,F] {
      O[p,f] = exp(S[p,m] - max[m](S[p,m])) * V[m,f]   where m <= p
    }
    """
    s, v = rand(4, 4), rand(4, 2)
    expected = np.zeros((4, 2))
    for p in range(4):
        mx = s[p, :p + 1].max()
        expected[p] = np.exp(s[p, :p + 1] - mx) @ v[:p + 1]
    np.testing.assert_allclose(run(src, s, v), expected, rtol=1e-12)


def test_shadowing_without_where_is_independent_of_the_outer_m():
    src = """
    attention sh(S[P,M], V[M,F]) -> O[P,F] {
      O[p,f] = exp(S[p,m] - max[m](S[p,m])) * V[m,f]
    }
    """
    s, v = rand(3, 5), rand(5, 2)
    expected = np.exp(s - s.max(1, keepdims=True)) @ v
    np.testing.assert_allclose(run(src, s, v), expected, rtol=1e-12)


def test_reduction_inside_a_where_is_not_filtered_by_it():
    # the max in the condition ranges over all of m (its own m, shadowing the sum's)
    src = "attention w(A[P,M]) -> X[P] { X[p] = sum[m](A[p,m])   where A[p,m] < max[m](A[p,m]) }"
    a = rand(3, 5)
    expected = a.sum(1) - a.max(1)
    np.testing.assert_allclose(run(src, a), expected, rtol=1e-12)


def test_causal_softmax_with_offset():
    q, k, v = rand(3, 4), rand(7, 4), rand(7, 2)
    p, m = np.indices((3, 7))
    expected = softmax_av(q @ k.T / 2.0, m <= p + 7 - 3, v)
    np.testing.assert_allclose(run(CAUSAL, q, k, v), expected, rtol=1e-12)


# ----------------------------------------------------------------------------
# Implicit sums, numerically
# ----------------------------------------------------------------------------

def test_implicit_sum_in_the_first_term_only():
    src = """
    attention alibi(Q[H,P,E], K[H,M,E], SLOPE[H], scale) -> S[H,P,M] {
      S[h,p,m] = Q[h,p,e] * K[h,m,e] * scale - SLOPE[h] * (p - m)
    }
    """
    q, k, slope = rand(2, 3, 4), rand(2, 5, 4), rand(2)
    p, m = np.indices((3, 5))
    expected = np.einsum("hpe,hme->hpm", q, k) * 0.5 - slope[:, None, None] * (p - m)
    np.testing.assert_allclose(run(src, q, k, slope, scale=0.5), expected, rtol=1e-12)


def test_implicit_sum_inside_tanh():
    src = "attention cap(Q[P,E], K[M,E], cap) -> S[P,M] { S[p,m] = cap * tanh(Q[p,e] * K[m,e] / cap) }"
    q, k = rand(3, 4), rand(5, 4)
    expected = 2.5 * np.tanh(q @ k.T / 2.5)
    np.testing.assert_allclose(run(src, q, k, cap=2.5), expected, rtol=1e-12)


def test_implicit_sum_inside_exp_and_explicit_sum_outside():
    src = """
    attention e(S[P,M]) -> (X[P], Y[P]) {
      X[p] = exp(S[p,m])
      Y[p] = sum[m](exp(S[p,m]))
    }
    """
    s = rand(3, 4)
    x, y = run(src, s)
    np.testing.assert_allclose(x, np.exp(s.sum(1)), rtol=1e-12)
    np.testing.assert_allclose(y, np.exp(s).sum(1), rtol=1e-12)


def test_implicit_sum_over_a_whole_product_with_a_quotient():
    src = """
    attention o(S[P,M], GM[P], SD[P], V[M,F]) -> O[P,F] {
      O[p,f] = exp(S[p,m] - GM[p]) * V[m,f] / SD[p]
    }
    """
    s, gm, sd, v = rand(3, 4), rand(3), RNG.uniform(1, 2, 3), rand(4, 2)
    expected = np.exp(s - gm[:, None]) @ v / sd[:, None]
    np.testing.assert_allclose(run(src, s, gm, sd, v), expected, rtol=1e-12)


def test_implicit_sum_in_the_second_term_only():
    src = """
    attention t(R[P,F], C[P], X[T,P], V[T,F]) -> O[P,F] {
      O[p,f] = R[p,f] * C[p] + X[t,p] * V[t,f]
    }
    """
    r, c, x, v = rand(3, 2), rand(3), rand(4, 3), rand(4, 2)
    np.testing.assert_allclose(run(src, r, c, x, v), r * c[:, None] + x.T @ v, rtol=1e-12)


def test_index_variables_and_sizes_as_numbers():
    src = "attention n(A[P,M]) -> X[P] { X[p] = A[p,m] * (m + 1) / M + p }"
    a = rand(2, 3)
    # p is outside m's term (an operand of +), so it is added once, not per m
    expected = a @ (np.arange(1, 4) / 3) + np.arange(2)
    np.testing.assert_allclose(run(src, a), expected, rtol=1e-12)


# ----------------------------------------------------------------------------
# Sizes and parameters
# ----------------------------------------------------------------------------

GQA = """
attention gqa_decode(Q[H,P,E], K[HK,M,E], V[HK,M,F], scale = 1/sqrt(E)) -> AV[H,P,F] {
  let G = H / HK
  QK[h,p,m] = Q[h,p,e] * K[h // G, m, e] * scale   where m <= p + M - P
  GM[h,p]   = max[m](QK[h,p,m])
  SN[h,p,m] = exp(QK[h,p,m] - GM[h,p])
  SD[h,p]   = sum[m](SN[h,p,m])
  AV[h,p,f] = SN[h,p,m] * V[h // G, m, f] / SD[h,p]
}
"""


def gqa_expected(q, k, v, scale):
    h, p_, _ = q.shape
    g = h // k.shape[0]
    m_ = k.shape[1]
    p, m = np.indices((p_, m_))
    return np.stack([softmax_av(q[i] @ k[i // g].T * scale, m <= p + m_ - p_, v[i // g])
                     for i in range(h)])


def test_let_division_grouped_query_attention():
    q, k, v = rand(4, 2, 3), rand(2, 5, 3), rand(2, 5, 2)
    np.testing.assert_allclose(run(GQA, q, k, v), gqa_expected(q, k, v, 1 / np.sqrt(3)),
                               rtol=1e-12)


def test_let_division_must_be_exact():
    q, k, v = rand(6, 2, 3), rand(4, 5, 3), rand(4, 5, 2)
    with pytest.raises(ValueError, match=r"let G = H/HK.*divide exactly.*H=6.*HK=4"):
        interpret(defn(GQA), q, k, v)


def test_let_ceil_and_constant():
    d = defn(TILES)
    assert bind_sizes(d, {"K": (70, 3)}) == {"M": 70, "E": 3, "M0": 4, "M1": 18}
    assert bind_sizes(d, {"K": (8, 3)})["M1"] == 2
    assert bind_sizes(d, {"K": (0, 3)})["M1"] == 0


def test_let_second_rank_of_the_same_size():
    src = """
    attention gram(K[M,E]) -> (C[M,N], D[M]) {
      let N = M
      C[m,n] = K[m,e] * K[n,e]
      D[m]   = sum[n](C[m,n])   where n < m
    }
    """
    k = rand(4, 3)
    c, d = run(src, k)
    np.testing.assert_allclose(c, k @ k.T, rtol=1e-12)
    gram = k @ k.T
    np.testing.assert_allclose(d, [0.0] + [gram[i, :i].sum() for i in range(1, 4)], rtol=1e-12)


def test_default_parameter_and_override():
    src = "attention s(Q[P,E], K[M,E], scale = 1/sqrt(E)) -> S[P,M] { S[p,m] = Q[p,e] * K[m,e] * scale }"
    q, k = rand(2, 4), rand(3, 4)
    np.testing.assert_allclose(run(src, q, k), q @ k.T / 2.0, rtol=1e-12)
    np.testing.assert_allclose(run(src, q, k, scale=3.0), q @ k.T * 3.0, rtol=1e-12)


def test_missing_required_parameter_is_named():
    src = "attention c(A[P], cap) -> X[P] { X[p] = A[p] * cap }"
    with pytest.raises(TypeError, match="'cap'"):
        interpret(defn(src), rand(3))


def test_unknown_parameter_is_rejected():
    src = "attention c(A[P], cap) -> X[P] { X[p] = A[p] * cap }"
    with pytest.raises(TypeError, match="capp"):
        interpret(defn(src), rand(3), cap=1.0, capp=2.0)


def test_wrong_number_of_tensors():
    with pytest.raises(TypeError):
        interpret(defn(CAUSAL), rand(2, 3), rand(2, 3))


# ----------------------------------------------------------------------------
# Batch dims
# ----------------------------------------------------------------------------

def test_leading_dims_broadcast_like_a_gufunc():
    q, k, v = rand(2, 1, 3, 4), rand(3, 5, 4), rand(5, 2)
    out = run(CAUSAL, q, k, v)
    assert out.shape == (2, 3, 3, 2)
    p, m = np.indices((3, 5))
    for b0 in range(2):
        for b1 in range(3):
            expected = softmax_av(q[b0, 0] @ k[b1].T / 2.0, m <= p + 5 - 3, v)
            np.testing.assert_allclose(out[b0, b1], expected, rtol=1e-12)


def test_batch_dims_for_several_outputs():
    s = rand(2, 4, 4)
    outs = run(EMPTY_FIBER, s)
    assert [o.shape for o in outs] == [(2, 4)] * 4
    gm, x = outs[0], outs[3]
    for b in range(2):
        assert gm[b, 0] == x[b, 0] == 0.0
        assert gm[b, 3] == s[b, 3, :3].max() and x[b, 2] == s[b, 2, :2].max() + 1


def test_mismatched_core_sizes_name_the_argument():
    with pytest.raises(ValueError, match="'K'.*'Q'|'Q'.*'K'"):
        interpret(defn(CAUSAL), rand(3, 4), rand(5, 3), rand(5, 2))
    with pytest.raises(ValueError, match="'V'"):
        interpret(defn(CAUSAL), rand(3, 4), rand(5, 4), rand(6, 2))


def test_too_few_dims_name_the_argument():
    with pytest.raises(ValueError, match="'K'"):
        interpret(defn(CAUSAL), rand(3, 4), rand(4), rand(5, 2))


def test_unbroadcastable_batch_dims():
    with pytest.raises(ValueError, match="batch"):
        interpret(defn(CAUSAL), rand(2, 3, 4), rand(3, 5, 4), rand(5, 2))


def test_empty_batch_keeps_the_core_shape():
    out = run(CAUSAL, rand(0, 3, 4), rand(5, 4), rand(5, 2))
    assert out.shape == (0, 3, 2)


# ----------------------------------------------------------------------------
# Zero-size ranks
# ----------------------------------------------------------------------------

def test_empty_kv_cache_gives_zeros():
    out = run(CAUSAL, rand(3, 4), rand(0, 4), rand(0, 2))
    assert out.shape == (3, 2)
    np.testing.assert_array_equal(out, 0.0)


def test_empty_kv_cache_grouped_query():
    out = run(GQA, rand(4, 1, 3), rand(2, 0, 3), rand(2, 0, 2))
    assert out.shape == (4, 1, 2)
    np.testing.assert_array_equal(out, 0.0)


def test_empty_contraction_rank_is_absent():
    src = "attention s(Q[P,E], K[M,E]) -> (S[P,M], T[P,M]) { S[p,m] = Q[p,e] * K[m,e]; T[p,m] = S[p,m] + 1 }"
    s, t = run(src, rand(2, 0), rand(3, 0))
    np.testing.assert_array_equal(s, 0.0)
    np.testing.assert_array_equal(t, 0.0)  # the sum over no e is absent, not 0


def test_defaults_that_are_infinite_at_zero_sizes():
    # bias = -log(M) is +inf at M = 0 and scale = 1/sqrt(E) is +inf at E = 0; nothing is
    # computed there anyway, so the call works and every output is absent -> 0
    src = """
    attention sg(Q[P,E], K[M,E], V[M,F], scale = 1/sqrt(E), bias = -log(M)) -> AV[P,F] {
      S[p,m]  = sigmoid(Q[p,e] * K[m,e] * scale + bias)
      AV[p,f] = S[p,m] * V[m,f]
    }
    """
    np.testing.assert_array_equal(run(src, rand(2, 3), rand(0, 3), rand(0, 2)), 0.0)
    np.testing.assert_array_equal(run(src, rand(2, 0), rand(4, 0), rand(4, 2)), 0.0)
    q, k, v = rand(2, 3), rand(4, 3), rand(4, 2)
    s = 1 / (1 + np.exp(-(q @ k.T / np.sqrt(3) - np.log(4))))
    np.testing.assert_allclose(run(src, q, k, v), s @ v, rtol=1e-12)
