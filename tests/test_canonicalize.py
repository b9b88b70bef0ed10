"""``canonicalize``: one reduction per Einsum, at its root, with the same meaning."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from attnc.einsum_ir.exprs import reductions
from attnc.einsum_ir.interpreter import interpret
from attnc.einsum_ir.printer import print_ir
from attnc.einsum_ir.schedule import loop_bodies, schedule
from attnc.frontends import parse
from attnc.passes.canonicalize import canonicalize


def defn(src: str):
    return parse(src, "test.attn").definitions[0]


def run(d, *arrays, **params):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return interpret(d, *arrays, **params)


def assert_canonical(d) -> None:
    for st in d.statements:
        found = reductions(st.expr)
        assert len(found) <= 1, print_ir(st)
        assert not found or found[0] is st.expr, print_ir(st)
        assert st.where is None or not reductions(st.where), print_ir(st)


CASES = {
    "map_of_reduction": ("""
attention f(SN[P,M], GM[P]) -> SD[P] {
  SD[p] = sum[m](SN[p,m]) + exp(-GM[p])
}""", [(4, 5), (4,)]),
    "shadowed_with_where": ("""
attention f(S[P,M], V[M,F]) -> O[P,F] {
  O[p,f] = exp(S[p,m] - max[m](S[p,m])) * V[m,f]   where m <= p
}""", [(4, 4), (4, 2)]),
    "where_only_inside_the_reduction": ("""
attention f(A[P,M]) -> X[P] {
  X[p] = exp(max[m](A[p,m])) * 2   where m <= p
}""", [(4, 4)]),
    "where_on_an_enclosing_reduction_variable": ("""
attention f(A[P,M], B[P,N]) -> O[P] {
  O[p] = sum[m](A[p,m] * max[n](B[p,n]))   where n < m
}""", [(3, 4), (3, 5)]),
    "both_sums_filtered": ("""
attention f(N[P,M], V[M,F]) -> O[P,F] {
  O[p,f] = N[p,m] * V[m,f] / sum[m](N[p,m])   where m <= p
}""", [(4, 4), (4, 2)]),
    "nested_three_deep": ("""
attention f(A[P,M], B[M,N]) -> O[P] {
  O[p] = log(sum[m](exp(A[p,m] - max[n](B[m,n] + min[m](A[p,m])))))   where m != 1
}""", [(3, 4), (4, 3)]),
    "lhs_where_and_sibling_reductions": ("""
attention f(A[P,M]) -> X[P] {
  X[p] = max[m](A[p,m]) - min[m](A[p,m]) + sum[m](A[p,m])   where p < 2
}""", [(4, 3)]),
    "data_dependent_where": ("""
attention f(S[P,M], DOC[M]) -> O[P] {
  O[p] = exp(S[p,m] - max[m](S[p,m])) / sum[m](exp(S[p,m]))   where DOC[m] > 0
}""", [(3, 6), (6,)]),
    "reduction_in_the_where": ("""
attention f(A[P,M]) -> X[P] {
  X[p] = sum[m](A[p,m])   where A[p,0] < max[m](A[p,m])
}""", [(4, 3)]),
    "iterative_updates_with_reductions": ("""
attention f(Q[P,E], K[M,E], V[M,F]) -> AV[P,F] {
  let M0 = 4
  let M1 = ceil(M / M0)
  BK[m1,m0,e]   = K[m1*M0 + m0, e]
  BV[m1,m0,f]   = V[m1*M0 + m0, f]
  RM[0,p]       = -inf
  RD[0,p]       = 0
  RNV[0,p,f]    = 0
  BQK[m1,m0,p]  = Q[p,e] * BK[m1,m0,e]   where m1*M0 + m0 <= p + 3
  RM[m1+1,p]    = max(RM[m1,p], max[m0](BQK[m1,m0,p]))
  SLN[m1,m0,p]  = exp(BQK[m1,m0,p] - RM[m1+1,p])
  PRM[m1,p]     = exp(RM[m1,p] - RM[m1+1,p])
  RD[m1+1,p]    = sum[m0](SLN[m1,m0,p]) + RD[m1,p] * PRM[m1,p]
  RNV[m1+1,p,f] = SLN[m1,m0,p] * BV[m1,m0,f] + RNV[m1,p,f] * PRM[m1,p]
  AV[p,f]       = RNV[M1,p,f] / RD[M1,p]   where RD[M1,p] > 0
}""", [(5, 3), (10, 3), (10, 2)]),
    "iterative_init_with_reduction": ("""
attention f(X[I,P], A[P,M]) -> Y[P] {
  R[0,p] = exp(max[m](A[p,m]))
  R[i+1,p] = R[i,p] * 0.5 + sum[m](A[p,m] * X[i,p])   where m < i + 1
  Y[p] = R[I,p]
}""", [(3, 2), (2, 4)]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_canonical_form_has_one_reduction_at_the_root(name):
    assert_canonical(canonicalize(defn(CASES[name][0])))


@pytest.mark.parametrize("name", sorted(CASES))
def test_canonicalize_keeps_the_meaning(name):
    src, shapes = CASES[name]
    rng = np.random.default_rng(len(name))
    arrays = [rng.normal(size=s) for s in shapes]
    before = defn(src)
    after = canonicalize(before)
    schedule(after)  # still a valid cascade
    expected, got = run(before, *arrays), run(after, *arrays)
    for e, g in zip(expected if isinstance(expected, tuple) else (expected,),
                    got if isinstance(got, tuple) else (got,)):
        np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", sorted(CASES))
def test_canonical_form_prints_as_valid_attn(name):
    after = canonicalize(defn(CASES[name][0]))
    assert defn(print_ir(after)) == after


@pytest.mark.parametrize("name", sorted(CASES))
def test_canonicalize_is_deterministic_and_idempotent(name):
    once = canonicalize(defn(CASES[name][0]))
    assert print_ir(canonicalize(defn(CASES[name][0]))) == print_ir(once)
    assert canonicalize(once) == once


def test_shadowed_max_numerically():
    # checked against numpy too, so the equivalence above is not vacuous
    s, v = np.random.default_rng(0).normal(size=(4, 4)), np.random.default_rng(1).normal(size=(4, 2))
    expected = np.stack([np.exp(s[p, :p + 1] - s[p, :p + 1].max()) @ v[:p + 1] for p in range(4)])
    got = run(canonicalize(defn(CASES["shadowed_with_where"][0])), s, v)
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_where_dropped_only_where_no_level_holds_it():
    after = canonicalize(defn(CASES["where_only_inside_the_reduction"][0]))
    temp, main = after.statements
    assert temp.tensor == "X_max" and temp.where is not None
    assert main.tensor == "X" and main.where is None
    after = canonicalize(defn(CASES["shadowed_with_where"][0]))
    assert all(st.where is not None for st in after.statements)


def test_temporary_ranks_include_the_where_variables_it_depends_on():
    after = canonicalize(defn(CASES["where_on_an_enclosing_reduction_variable"][0]))
    temp = after.statements[0]
    assert (temp.tensor, temp.lhs) == ("O_max", ("P", "M"))


def test_temporaries_from_iterative_statements_join_the_loop():
    after = canonicalize(defn(CASES["iterative_updates_with_reductions"][0]))
    body = {st.tensor for st in loop_bodies(after)["M1"]}
    assert {"RD_sum", "RNV_sum", "RM", "RD", "RNV", "SLN", "PRM"} <= body
    assert "RM_max" not in body  # reads no iterative state: computed before the loop


def test_temp_names_do_not_clash():
    src = """
    attention f(A[P,M], SD_sum[P]) -> SD[P] {
      SD_sum1[p] = A[p,0]
      SD[p] = sum[m](A[p,m]) + SD_sum[p] + SD_sum1[p] + max[m](A[p,m]) + min[m](A[p,m]) + sum[m](A[p,m] * 2)
    }
    """
    after = canonicalize(defn(src))
    names = [st.tensor for st in after.statements]
    assert len(names) == len(set(names))
    assert names == ["SD_sum1", "SD_sum2", "SD_max", "SD_min", "SD_sum3", "SD"]
    a, b = np.random.default_rng(2).normal(size=(3, 4)), np.random.default_rng(3).normal(size=3)
    expected = a.sum(1) + b + a[:, 0] + a.max(1) + a.min(1) + 2 * a.sum(1)
    np.testing.assert_allclose(run(after, a, b), expected, rtol=1e-12)


def test_golden_shadowed(golden):
    golden(print_ir(canonicalize(defn(CASES["shadowed_with_where"][0]))))


def test_common_subexpressions_are_merged_and_literals_folded():
    from attnc.einsum_ir.interpreter import interpret
    from attnc.passes.canonicalize import canonicalize as canon

    src = """
attention s1(Q[P,E], K[M,E], V[M,F]) -> AV[P,F] {
  S[p,m] = Q[p,e]*K[m,e] * (1/2)
  AV[p,f] = exp(S[p,m] - max[m](S[p,m])) * V[m,f] / sum[m](exp(S[p,m] - max[m](S[p,m])))  where m <= p
}
"""
    d = parse(src).definitions[0]
    c = canon(d)
    text = print_ir(c)
    assert text.count("max[m]") == 1 and "0.5" in text and "1 / 2" not in text
    assert parse(text).definitions[0] == c
    rng = np.random.default_rng(0)
    Q, K, V = rng.standard_normal((5, 3)), rng.standard_normal((7, 3)), rng.standard_normal((7, 2))
    np.testing.assert_allclose(interpret(c, Q, K, V), interpret(d, Q, K, V), rtol=1e-12)
