"""The Einstein term rule: which subexpression an implicitly summed index variable sums over.

Every bullet of the contract's "Implicit reduction" paragraph is checked on the
printed IR (where the ``sum[...]`` lands), then a few against hand-written numpy.
"""
from __future__ import annotations

import numpy as np
import pytest

from attnc.einsum_ir.exprs import free_ranks
from attnc.einsum_ir.interpreter import interpret
from attnc.einsum_ir.printer import print_ir
from attnc.frontends import parse
from strategies import require_contract


def definition(args: str, out: str, *lines: str):
    text = f"attention t({args}) -> {out} {{\n" + "".join(f"  {ln}\n" for ln in lines) + "}\n"
    return parse(text, "term.attn")["t"]


def lowered(args: str, out: str, *lines: str, tensor: str | None = None) -> str:
    """The printed IR of the statement defining ``tensor`` (default: the output)."""
    defn = definition(args, out, *lines)
    name = tensor or defn.outputs[0].name
    return "\n".join(print_ir(st) for st in defn.statements if st.tensor == name)


# --- the contract's bullets -------------------------------------------------------------------


def test_product_sums_over_the_product():
    got = lowered("Q[P,E], K[M,E]", "QK[P,M]", "QK[p,m] = Q[p,e] * K[m,e]")
    assert got == "QK[p,m] = sum[e](Q[p,e] * K[m,e])"


def test_difference_sums_in_the_first_term_only():
    got = lowered("Q[H,P,E], K[H,M,E], SLOPE[H], scale", "S[H,P,M]",
                  "S[h,p,m] = Q[h,p,e] * K[h,m,e] * scale - SLOPE[h] * (p - m)")
    assert got == "S[h,p,m] = sum[e](Q[h,p,e] * K[h,m,e] * scale) - SLOPE[h] * (p - m)"


def test_sum_stays_inside_a_function_argument():
    got = lowered("Q[P,E], K[M,E], cap", "S[P,M]", "S[p,m] = cap * tanh(Q[p,e] * K[m,e] / cap)")
    assert got == "S[p,m] = cap * tanh(sum[e](Q[p,e] * K[m,e] / cap))"


def test_sum_climbs_through_products_and_quotients():
    got = lowered("S[P,M], GM[P], SD[P], V[M,F]", "O[P,F]",
                  "O[p,f] = exp(S[p,m] - GM[p]) * V[m,f] / SD[p]")
    assert got == "O[p,f] = sum[m](exp(S[p,m] - GM[p]) * V[m,f] / SD[p])"


def test_iterative_update_sums_t_in_the_second_term():
    got = lowered("X[I,T,P], V[I,T,F], C[I,P]", "AV[P,F]",
                  "RNV[0,p,f] = 0",
                  "RNV[i+1,p,f] = RNV[i,p,f] * C[i,p] + X[i,t,p] * V[i,t,f]",
                  "AV[p,f] = RNV[I,p,f]", tensor="RNV")
    assert got.splitlines() == ["RNV[0,p,f] = 0",
                                "RNV[i+1,p,f] = RNV[i,p,f] * C[i,p] + sum[t](X[i,t,p] * V[i,t,f])"]


def test_function_alone_sums_inside():
    got = lowered("S[P,M]", "A[P]", "A[p] = exp(S[p,m])")
    assert got == "A[p] = exp(sum[m](S[p,m]))"


def test_explicit_sum_outside_a_function_is_kept():
    got = lowered("S[P,M]", "A[P]", "A[p] = sum[m](exp(S[p,m]))")
    assert got == "A[p] = sum[m](exp(S[p,m]))"


def test_explicit_reduction_inside_a_larger_expression_adds_no_sum():
    got = lowered("SN[P,M], GM[P]", "SD[P]", "SD[p] = sum[m](SN[p,m]) + exp(-GM[p])")
    assert got == "SD[p] = sum[m](SN[p,m]) + exp(-GM[p])"


def test_reduction_shadows_the_outer_variable():
    got = lowered("S[P,M], V[M,F]", "O[P,F]", "O[p,f] = exp(S[p,m] - max[m](S[p,m])) * V[m,f]")
    assert got == "O[p,f] = sum[m](exp(S[p,m] - max[m](S[p,m])) * V[m,f])"


# --- where a use counts, and where the climb stops --------------------------------------------


def test_use_inside_a_subscript_counts_at_the_access():
    got = lowered("K[M,E], B[E]", "A[M1,E]", "let M0 = 4", "let M1 = ceil(M / M0)",
                  "A[m1,e] = K[m1*M0 + m0, e] + B[e]")
    assert got == "A[m1,e] = sum[m0](K[m1 * M0 + m0, e]) + B[e]"


def test_use_inside_a_subscript_climbs_from_the_access():
    got = lowered("K[M,E], W[E]", "A[M1]", "let M0 = 4", "let M1 = ceil(M / M0)",
                  "A[m1] = 2 * K[m1*M0 + m0, e] * W[e]")
    assert got == "A[m1] = sum[m0, e](2 * K[m1 * M0 + m0, e] * W[e])"


@pytest.mark.parametrize("rhs,expected", [
    ("Q[p,e] ** 2", "sum[e](Q[p,e]) ** 2"),
    ("2 ** Q[p,e]", "2 ** sum[e](Q[p,e])"),
    ("(Q[p,e] * W[e]) ** 2", "sum[e](Q[p,e] * W[e]) ** 2"),
])
def test_power_operands_stop_the_climb(rhs, expected):
    assert lowered("Q[P,E], W[E]", "A[P]", f"A[p] = {rhs}") == f"A[p] = {expected}"


@pytest.mark.parametrize("rhs,expected", [
    ("select(p > 0, Q[p,e], 0)", "select(p > 0, sum[e](Q[p,e]), 0)"),
    ("select(Q[p,e] > 0, Q[p,e], 0)", "sum[e](select(Q[p,e] > 0, Q[p,e], 0))"),
    ("2 * select(p > 0, W[e], 1)", "2 * select(p > 0, sum[e](W[e]), 1)"),
])
def test_select_arguments_stop_the_climb(rhs, expected):
    assert lowered("Q[P,E], W[E]", "A[P]", f"A[p] = {rhs}") == f"A[p] = {expected}"


@pytest.mark.parametrize("rhs,expected", [
    ("Q[p,e] > 0", "sum[e](Q[p,e]) > 0"),
    ("Q[p,e] * W[e] > p", "sum[e](Q[p,e] * W[e]) > p"),
    ("0 < Q[p,e] < 1", "sum[e](0 < Q[p,e] and Q[p,e] < 1)"),
    ("not Q[p,e] * W[e]", "not sum[e](Q[p,e] * W[e])"),
    ("p > 0 and W[e] > 0", "p > 0 and sum[e](W[e]) > 0"),
])
def test_comparison_and_boolean_operands_stop_the_climb(rhs, expected):
    assert lowered("Q[P,E], W[E]", "A[P]", f"A[p] = {rhs}") == f"A[p] = {expected}"


@pytest.mark.parametrize("rhs,expected", [
    ("Q[p,e] + 1", "sum[e](Q[p,e]) + 1"),
    ("1 - Q[p,e] * W[e]", "1 - sum[e](Q[p,e] * W[e])"),
    ("-Q[p,e] * 2", "sum[e](-Q[p,e] * 2)"),
    ("-(Q[p,e] * W[e])", "sum[e](-(Q[p,e] * W[e]))"),
    ("1 / Q[p,e]", "sum[e](1 / Q[p,e])"),
    ("(Q[p,e] + W[e]) * 2", "sum[e]((Q[p,e] + W[e]) * 2)"),
    ("max(Q[p,e], 0) * W[e]", "sum[e](max(Q[p,e], 0) * W[e])"),
])
def test_sum_and_difference_operands_stop_the_climb(rhs, expected):
    assert lowered("Q[P,E], W[E]", "A[P]", f"A[p] = {rhs}") == f"A[p] = {expected}"


def test_two_variables_in_one_term_share_one_sum():
    got = lowered("Q[P,E], K[M,E]", "A[P]", "A[p] = Q[p,e] * K[m,e]")
    assert got == "A[p] = sum[e, m](Q[p,e] * K[m,e])"


def test_two_variables_in_two_terms_get_two_sums():
    got = lowered("Q[P,E], W[E], K[M,E], U[M]", "A[P]", "A[p] = Q[p,e] * W[e] + K[m,0] * U[m]")
    assert got == "A[p] = sum[e](Q[p,e] * W[e]) + sum[m](K[m,0] * U[m])"


def test_nested_terms_are_wrapped_innermost_first():
    got = lowered("Q[P,E], W[E], K[M,E]", "A[P]", "A[p] = tanh(Q[p,e] * W[e]) * K[m,0]")
    assert got == "A[p] = sum[m](tanh(sum[e](Q[p,e] * W[e])) * K[m,0])"


def test_implicit_sum_inside_an_explicit_reduction_body():
    got = lowered("Q[P,E], K[M,E]", "A[P]", "A[p] = max[m](Q[p,e] * K[m,e])")
    assert got == "A[p] = max[m](sum[e](Q[p,e] * K[m,e]))"


def test_lhs_variables_are_never_summed():
    got = lowered("Q[P,E]", "A[P,E]", "A[p,e] = Q[p,e] * e + p")
    assert got == "A[p,e] = Q[p,e] * e + p"


def test_where_is_kept_and_sums_apply_to_the_expression_only():
    got = lowered("Q[P,E], K[M,E]", "A[P,M]", "A[p,m] = Q[p,e] * K[m,e]   where e < 2 and m <= p")
    assert got == "A[p,m] = sum[e](Q[p,e] * K[m,e])   where e < 2 and m <= p"


def test_iterative_init_sums_its_free_variables():
    got = lowered("Q[P,E], C[I,P]", "AV[P]", "R[0,p] = Q[p,e]", "R[i+1,p] = R[i,p] * C[i,p]",
                  "AV[p] = R[I,p]", tensor="R")
    assert got.splitlines()[0] == "R[0,p] = sum[e](Q[p,e])"


def test_every_contract_cascade_has_only_explicit_sums_after_lowering():
    for block in require_contract():
        for defn in parse(block).definitions:
            for st in defn.statements:
                assert free_ranks(st.expr) <= set(st.lhs), print_ir(st)


# --- numbers ----------------------------------------------------------------------------------

RNG = np.random.default_rng(7)


def test_difference_numerically():
    defn = definition("Q[H,P,E], K[H,M,E], SLOPE[H], scale", "S[H,P,M]",
                      "S[h,p,m] = Q[h,p,e] * K[h,m,e] * scale - SLOPE[h] * (p - m)")
    q, k, slope = RNG.normal(size=(2, 3, 4)), RNG.normal(size=(2, 5, 4)), RNG.normal(size=2)
    p, m = np.arange(3)[:, None], np.arange(5)[None, :]
    expected = np.einsum("hpe,hme->hpm", q, k) * 0.5 - slope[:, None, None] * (p - m)
    np.testing.assert_allclose(interpret(defn, q, k, slope, scale=0.5), expected, rtol=1e-12)


def test_function_alone_numerically():
    defn = definition("S[P,M]", "A[P]", "A[p] = exp(S[p,m])")
    s = RNG.normal(size=(3, 6))
    np.testing.assert_allclose(interpret(defn, s), np.exp(s.sum(axis=1)), rtol=1e-12)


def test_shadowing_numerically():
    defn = definition("S[P,M], V[M,F]", "O[P,F]", "O[p,f] = exp(S[p,m] - max[m](S[p,m])) * V[m,f]")
    s, v = RNG.normal(size=(3, 6)), RNG.normal(size=(6, 2))
    expected = np.exp(s - s.max(axis=1, keepdims=True)) @ v
    np.testing.assert_allclose(interpret(defn, s, v), expected, rtol=1e-12)


def test_iterative_update_numerically():
    defn = definition("X[I,T,P], V[I,T,F], C[I,P]", "AV[P,F]",
                      "RNV[0,p,f] = 0",
                      "RNV[i+1,p,f] = RNV[i,p,f] * C[i,p] + X[i,t,p] * V[i,t,f]",
                      "AV[p,f] = RNV[I,p,f]")
    x, v, c = RNG.normal(size=(4, 3, 2)), RNG.normal(size=(4, 3, 5)), RNG.normal(size=(4, 2))
    state = np.zeros((2, 5))
    for i in range(4):
        state = state * c[i][:, None] + np.einsum("tp,tf->pf", x[i], v[i])
    np.testing.assert_allclose(interpret(defn, x, v, c), state, rtol=1e-12)
