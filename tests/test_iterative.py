"""Iterative ranks and data-flow order, checked on the reference interpreter.

Expected values come from plain numpy (running sums, per-tile online-softmax
state computed by hand), never from the interpreter itself.
"""
from __future__ import annotations

import dataclasses
import random
import re
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from attnc.einsum_ir.interpreter import Interpreter, interpret
from attnc.einsum_ir.ir import Access, Binary, Index, IterativeEinsum, Num, Reduce, Size
from attnc.einsum_ir.schedule import Loop, loop_bodies, schedule
from attnc.frontends import SpecError, parse

from example_refs import softmax_av

RNG = np.random.default_rng(99)


def defn(src: str):
    return parse(src, "test.attn").definitions[0]


def run(src: str, *arrays, **params):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return interpret(defn(src), *arrays, **params)


def store(src: str, **inputs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return Interpreter(defn(src)).run(inputs)


def rand(*shape):
    return RNG.normal(size=shape)


CASCADE4 = """
attention softmax_3pass(Q[P,E], K[M,E], V[M,F]) -> AV[P,F] {
  QK[p,m] = Q[p,e] * K[m,e]      where MASK
  GM[p]   = max[m](QK[p,m])
  SN[p,m] = exp(QK[p,m] - GM[p])
  SD[p]   = sum[m](SN[p,m])
  A[p,m]  = SN[p,m] / SD[p]
  AV[p,f] = A[p,m] * V[m,f]
}
"""

CASCADE5_LETS = """  let M0 = TILE
  let M1 = ceil(M / M0)"""
CASCADE5_STATEMENTS = """  BK[m1,m0,e]   = K[m1*M0 + m0, e]
  BV[m1,m0,f]   = V[m1*M0 + m0, f]
  RM[0,p]       = -inf
  RD[0,p]       = 0
  RNV[0,p,f]    = 0
  BQK[m1,m0,p]  = Q[p,e] * BK[m1,m0,e]     where MASK
  LM[m1,p]      = max[m0](BQK[m1,m0,p])
  RM[m1+1,p]    = max(RM[m1,p], LM[m1,p])
  SLN[m1,m0,p]  = exp(BQK[m1,m0,p] - RM[m1+1,p])
  SLD[m1,p]     = sum[m0](SLN[m1,m0,p])
  SLNV[m1,p,f]  = SLN[m1,m0,p] * BV[m1,m0,f]
  PRM[m1,p]     = exp(RM[m1,p] - RM[m1+1,p])
  RD[m1+1,p]    = SLD[m1,p] + RD[m1,p] * PRM[m1,p]
  RNV[m1+1,p,f] = SLNV[m1,p,f] + RNV[m1,p,f] * PRM[m1,p]
  AV[p,f]       = RNV[M1,p,f] / RD[M1,p]   where RD[M1,p] > 0"""


def cascade5(tile: int, mask: str = "1 > 0", statements: str = CASCADE5_STATEMENTS,
             outputs: str = "AV[P,F]") -> str:
    body = CASCADE5_LETS.replace("TILE", str(tile)) + "\n" + statements.replace("MASK", mask)
    return (f"attention softmax_1pass(Q[P,E], K[M,E], V[M,F]) -> {outputs} {{\n"
            f"{body}\n}}\n")


def cascade4(mask: str = "1 > 0") -> str:
    return CASCADE4.replace("MASK", mask)


def qkv(p=5, m=70, e=4, f=3):
    return rand(p, e), rand(m, e), rand(m, f)


# ----------------------------------------------------------------------------
# Cascade 4 and Cascade 5 agree (and both agree with numpy)
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("tile", [16, 64, 70, 128, 1])
def test_cascade5_equals_cascade4_on_ragged_m(tile):
    q, k, v = qkv(m=70)
    expected = softmax_av(q @ k.T, np.ones((5, 70), bool), v)
    np.testing.assert_allclose(run(cascade4(), q, k, v), expected, rtol=1e-11)
    np.testing.assert_allclose(run(cascade5(tile), q, k, v), expected, rtol=1e-11)


@pytest.mark.parametrize("mask4, mask5, numpy_mask", [
    ("m <= p + M - P", "m1*M0 + m0 <= p + M - P", lambda p, m: m <= p + 70 - 6),
    ("m <= p - 3", "m1*M0 + m0 <= p - 3", lambda p, m: m <= p - 3),  # rows 0..2 fully masked
    ("m >= 16 and m <= p + 40", "m1*M0 + m0 >= 16 and m1*M0 + m0 <= p + 40",  # tile 0 masked
     lambda p, m: (m >= 16) & (m <= p + 40)),
])
def test_masked_cascade5_equals_cascade4(mask4, mask5, numpy_mask):
    q, k, v = qkv(p=6, m=70)
    expected = softmax_av(q @ k.T, numpy_mask(*np.indices((6, 70))), v)
    out4 = run(cascade4(mask4), q, k, v)
    out5 = run(cascade5(16, mask5), q, k, v)
    assert np.isfinite(out5).all()
    np.testing.assert_allclose(out4, expected, rtol=1e-11, atol=1e-14)
    np.testing.assert_allclose(out5, expected, rtol=1e-11, atol=1e-14)


@given(m=st.integers(0, 40), tile=st.sampled_from([1, 3, 8, 16]), p=st.integers(1, 4),
       shift=st.integers(-6, 6))
def test_cascades_agree_for_any_ragged_size_and_causal_shift(m, tile, p, shift):
    rng = np.random.default_rng(m * 1000 + tile * 10 + p)
    q, k, v = rng.normal(size=(p, 3)), rng.normal(size=(m, 3)), rng.normal(size=(m, 2))
    out4 = run(cascade4(f"m <= p + {shift}" if shift >= 0 else f"m <= p - {-shift}"), q, k, v)
    cond = f"m1*M0 + m0 <= p + {shift}" if shift >= 0 else f"m1*M0 + m0 <= p - {-shift}"
    out5 = run(cascade5(tile, cond), q, k, v)
    pp, mm = np.indices((p, m))
    expected = softmax_av(q @ k.T, mm <= pp + shift, v)
    np.testing.assert_allclose(out4, expected, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(out5, expected, rtol=1e-10, atol=1e-13)


def test_empty_kv_cache_runs_no_step():
    out = run(cascade5(16), rand(3, 4), rand(0, 4), rand(0, 2))
    assert out.shape == (3, 2)
    np.testing.assert_array_equal(out, 0.0)


# ----------------------------------------------------------------------------
# Data-flow order, not file order
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
def test_statement_order_does_not_matter(seed):
    lines = CASCADE5_STATEMENTS.splitlines()
    random.Random(seed).shuffle(lines)
    shuffled = cascade5(16, "m1*M0 + m0 <= p + 60", "\n".join(lines))
    q, k, v = qkv(m=70)
    np.testing.assert_array_equal(run(shuffled, q, k, v),
                                  run(cascade5(16, "m1*M0 + m0 <= p + 60"), q, k, v))


def test_plain_statements_run_in_dependency_order():
    src = """
    attention o(A[P]) -> Z[P] {
      Z[p] = Y[p] * 2
      Y[p] = X[p] + 1
      X[p] = A[p] * 3
    }
    """
    a = rand(4)
    np.testing.assert_allclose(run(src, a), (3 * a + 1) * 2)


# ----------------------------------------------------------------------------
# The loop body
# ----------------------------------------------------------------------------

def test_loop_body_holds_exactly_the_statements_touching_iterative_state():
    d = defn(cascade5(16))
    body = {st.tensor for st in loop_bodies(d)["M1"]}
    assert body == {"RM", "SLN", "SLD", "SLNV", "PRM", "RD", "RNV"}
    steps = schedule(d)
    loops = [s for s in steps if isinstance(s, Loop)]
    assert len(loops) == 1 and loops[0].rank == "M1"
    names = [s.tensor if not isinstance(s, Loop) else "LOOP" for s in steps]
    for before in ("BK", "BV", "BQK", "LM"):  # carry m1 but read no iterative state
        assert names.index(before) < names.index("LOOP")
    assert names.index("AV") > names.index("LOOP")
    inits = [s for s in steps if isinstance(s, IterativeEinsum)]
    assert {s.tensor for s in inits} == {"RM", "RD", "RNV"} and all(s.init for s in inits)
    assert all(names.index(s.tensor) < names.index("LOOP") for s in inits)
    order = [s.tensor for s in loops[0].body]
    assert order.index("RM") < order.index("SLN") < order.index("SLD") < order.index("RD")
    assert order.index("PRM") < order.index("RD") and order.index("PRM") < order.index("RNV")


def test_non_iterative_tensors_in_the_loop_keep_every_step():
    extra = CASCADE5_STATEMENTS + "\n  TOT[p] = sum[m1](SLD[m1,p])\n  LAST[p] = RM[M1,p]"
    src = cascade5(16, statements=extra, outputs="(AV[P,F], TOT[P], LAST[P])")
    q, k, v = qkv(p=3, m=40)
    s = q @ k.T
    tiles = [s[:, i:i + 16] for i in range(0, 40, 16)]
    running = np.maximum.accumulate(np.stack([t.max(1) for t in tiles]), axis=0)  # RM[m1+1]
    sld = np.stack([np.exp(t - running[i][:, None]).sum(1) for i, t in enumerate(tiles)])
    vals = store(src, Q=q, K=k, V=v)
    assert vals["SLD"].present.all()
    np.testing.assert_allclose(vals["SLD"].val, sld, rtol=1e-12)
    np.testing.assert_allclose(vals["RM"].val[1:], running, rtol=1e-12)
    assert (vals["RM"].val[0] == -np.inf).all()
    av, tot, last = run(src, q, k, v)
    np.testing.assert_allclose(tot, sld.sum(0), rtol=1e-12)
    np.testing.assert_allclose(last, s.max(1), rtol=1e-12)
    np.testing.assert_allclose(av, softmax_av(s, np.ones_like(s, bool), v), rtol=1e-11)


def test_an_update_that_is_not_computed_carries_the_state():
    # tile 1 (keys 16..31) is wholly outside the where: LM[1] is absent, so the
    # updates at step 1 are not computed and RM, RD, RNV keep their step-1 values
    src = cascade5(16, "m1 != 1")
    q, k, v = qkv(p=3, m=40)
    vals = store(src, Q=q, K=k, V=v)
    assert not vals["LM"].present[1].any()
    for name in ("RM", "RD", "RNV"):
        np.testing.assert_array_equal(vals[name].val[2], vals[name].val[1])
        assert vals[name].present[2].all()
    keep = np.ones((3, 40), bool)
    keep[:, 16:32] = False
    np.testing.assert_allclose(run(src, q, k, v), softmax_av(q @ k.T, keep, v), rtol=1e-11)


def test_update_where_carries_a_hand_written_running_sum():
    src = """
    attention r(X[I,P]) -> (Y[P], Z[P]) {
      R[0,p] = 0
      R[i+1,p] = R[i,p] + X[i,p]   where X[i,p] > 0
      S[0,p] = 0
      S[i+1,p] = S[i,p] + X[i,p]
      Y[p] = R[I,p]
      Z[p] = S[I,p]
    }
    """
    x = rand(6, 3)
    vals = store(src, X=x)
    expected = np.vstack([np.zeros(3), np.cumsum(np.where(x > 0, x, 0.0), axis=0)])
    np.testing.assert_allclose(vals["R"].val, expected, rtol=1e-12)
    assert vals["R"].present.all()
    y, z = run(src, x)
    np.testing.assert_allclose(y, expected[-1], rtol=1e-12)
    np.testing.assert_allclose(z, x.sum(0), rtol=1e-12)


def test_running_sum_matches_cumsum_and_reads_the_step_index():
    src = """
    attention r(X[I,P]) -> (C[I,P], Y[P]) {
      R[0,p] = 0
      R[i+1,p] = R[i,p] + X[i,p] * (i + 1)
      C[i,p] = R[i+1,p]
      Y[p] = R[I,p]
    }
    """
    x = rand(5, 2)
    c, y = run(src, x)
    expected = np.cumsum(x * np.arange(1, 6)[:, None], axis=0)
    np.testing.assert_allclose(c, expected, rtol=1e-12)
    np.testing.assert_allclose(y, expected[-1], rtol=1e-12)


def test_an_absent_initial_state_stays_absent_until_an_update():
    src = """
    attention r(X[I,P], A[P]) -> Y[P] {
      R[0,p] = A[p + 1]
      R[i+1,p] = X[i,p]   where X[i,p] > 0
      Y[p] = R[I,p] + 1
    }
    """
    x = np.array([[-1.0, -1.0], [-1.0, 2.0]])
    a = np.array([5.0, 7.0])
    # p=0: R[0,0] = A[1] = 7, never updated -> 8; p=1: R[0,1] = A[2] is absent, updated to 2 -> 3
    np.testing.assert_array_equal(run(src, x, a), [8.0, 3.0])
    x[1, 1] = -2.0  # p=1 now never updated: stays absent -> output 0
    np.testing.assert_array_equal(run(src, x, a), [8.0, 0.0])


def test_two_loops_with_a_body_statement_carrying_both_ranks():
    src = """
    attention two(X[I,P], Y[J,P], W[J]) -> OUT[P] {
      R[0,p] = 0
      R[i+1,p] = R[i,p] + X[i,p]
      S[0,p] = 1
      S[j+1,p] = S[j,p] * Y[j,p]
      Z[i,j,p] = R[i+1,p] * W[j]
      OUT[p] = sum[i,j](Z[i,j,p]) + S[J,p]
    }
    """
    x, y, w = rand(4, 2), rand(3, 2), rand(3)
    expected = np.cumsum(x, axis=0).sum(0) * w.sum() + y.prod(0)
    np.testing.assert_allclose(run(src, x, y, w), expected, rtol=1e-12)


def test_batch_dims_through_a_loop():
    q, k, v = rand(2, 5, 4), rand(3, 1, 20, 4), rand(20, 3)
    out = run(cascade5(8), q, k, v)
    assert out.shape == (3, 2, 5, 3)
    for b in range(3):
        for c in range(2):
            s = q[c] @ k[b, 0].T
            np.testing.assert_allclose(out[b, c], softmax_av(s, np.ones_like(s, bool), v), rtol=1e-11)


# ----------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("body", [
    "A[p] = B[p] + X[p]\n B[p] = A[p] * 2\n O[p] = A[p]",
    "A[p] = A[p] + X[p]\n O[p] = A[p]",
    "R[0,p] = 0\n R[i+1,p] = R[i,p] + S[i,p]\n S[i,p] = R[i+1,p] * X[p]\n O[p] = R[I,p]",
    "R[0,p] = 0\n R[i+1,p] = R[i+1,p] + X[p]\n O[p] = R[I,p]",
    "R[0,p] = Z[p]\n R[i+1,p] = R[i,p] + X[p]\n Z[p] = R[I,p]\n O[p] = Z[p]",
    "R[0,p] = 0\n R[i+1,p] = R[i,p] + Z[p]\n Z[p] = R[I,p] * 2\n O[p] = Z[p]",
])
def test_a_dependency_cycle_is_an_error(body):
    src = f"attention c(X[P], T[I]) -> O[P] {{\n {body}\n}}"
    with pytest.raises(SpecError):  # the frontend or the scheduler reports it
        parse(src)


def test_reading_an_iterative_tensor_mid_loop_outside_the_loop_is_an_error():
    src = """
    attention r(X[I,P]) -> Y[P] {
      R[0,p] = 0
      R[i+1,p] = R[i,p] + X[i,p]
      Y[p] = sum[i](R[i,p])
    }
    """
    with pytest.raises(SpecError, match="R"):
        parse(src)


RUNNING_SUM = """
attention r(X[I,P]) -> Y[P] {
  R[0,p] = 0
  R[i+1,p] = R[i,p] + X[i,p]
  Y[p] = R[I,p]
}
"""


def with_expr(d, tensor: str, expr, init: bool = False):
    """``d`` with one statement's right-hand side replaced (IR the frontend would reject)."""
    sts = tuple(dataclasses.replace(st, expr=expr)
                if st.tensor == tensor and getattr(st, "init", False) == init else st
                for st in d.statements)
    return dataclasses.replace(d, statements=sts)


def test_schedule_rejects_a_mid_loop_read_outside_the_loop():
    d = with_expr(defn(RUNNING_SUM), "Y", Reduce("sum", ("I",), Access("R", (Index("I"), Index("P")))))
    with pytest.raises(SpecError, match=r"'R' is read at i outside its loop over i"):
        schedule(d)


@pytest.mark.parametrize("tensor, expr, init", [
    ("R", Access("R", (Binary("+", Index("I"), Num(1)), Index("P"))), False),  # R[i+1] = R[i+1]
    ("R", Access("R", (Size("I"), Index("P"))), True),                          # R[0] = R[I]
    ("Y", Access("Y", (Index("P"),)), False),                                   # Y[p] = Y[p]
])
def test_schedule_rejects_self_reads_as_cycles(tensor, expr, init):
    d = with_expr(defn(RUNNING_SUM), tensor, expr, init)
    with pytest.raises(SpecError, match="cycle"):
        schedule(d)


# selective attention's recurrent form: each query's scores less the relu'd scores earlier
# queries gave each key
SELECTIVE_RECURRENCE = """
  let M = P
  S[p,m]     = Q[p,e] * K[m,e] / sqrt(E)
  FS[0,m]    = 0
  FS[p+1,m]  = FS[p,m] + relu(S[p,m])  where m < p
"""

SELECTIVE_2PASS = ("attention selective(Q[P,E], K[P,E], V[P,F]) -> O[P,F] {" + SELECTIVE_RECURRENCE
                   + """  L[p,m]     = S[p,m] - FS[p,m]
  O[p,f]     = exp(L[p,m] - max[m](L[p,m])) * V[m,f] / sum[m](exp(L[p,m] - max[m](L[p,m]))) where m <= p
}
""")

# the same, with each query's softmax online over key tiles of 4 (Cascade 5's statements
# over the penalised scores BL: a loop over m1 whose tiles' statements carry p and read the
# recurrence over p at its step)
SELECTIVE_ONLINE = (
    "attention selective_online(Q[P,E], K[P,E], V[P,F]) -> O[P,F] {" + SELECTIVE_RECURRENCE
    + CASCADE5_LETS.replace("TILE", "4") + "\n"
    + CASCADE5_STATEMENTS.replace("  BK[m1,m0,e]   = K[m1*M0 + m0, e]\n", "")
    .replace("BQK[m1,m0,p]  = Q[p,e] * BK[m1,m0,e]     where MASK",
             "BL[p,m1,m0]   = S[p, m1*M0 + m0] - FS[p, m1*M0 + m0]  where m1*M0 + m0 <= p")
    .replace("BQK[m1,m0,p]", "BL[p,m1,m0]").replace("AV[p,f]", "O[p,f]") + "\n}\n")


def test_an_online_softmax_inside_a_recurrence_runs_after_it_with_each_statement_in_one_loop(tmp_path):
    """Selective attention's recurrent form with the softmax written online over key tiles:
    the tiles' statements carry the query rank and read the recurrence at its step, so both
    loops once claimed them (the numpy module then read RM before its loop ran: exit 70).
    The key-tile loop now runs after the query loop, over every query at once; the result
    equals the two-pass form's on the interpreter and on the numpy module."""
    from attnc.backends import compile_module, load_generated, write_atomic

    d = defn(SELECTIVE_ONLINE)
    loops = [s for s in schedule(d) if isinstance(s, Loop)]
    assert [(lp.rank, [st.tensor for st in lp.body]) for lp in loops] == [
        ("P", ["FS", "BL", "LM"]),
        ("M1", ["RM", "SLN", "SLD", "SLNV", "PRM", "RD", "RNV"])]
    rng = np.random.default_rng(5)
    for P in (1, 7, 13):
        Q, K, V = rng.standard_normal((P, 3)), rng.standard_normal((P, 3)), rng.standard_normal((P, 2))
        want = run(SELECTIVE_2PASS, Q, K, V)
        np.testing.assert_allclose(run(SELECTIVE_ONLINE, Q, K, V), want, rtol=1e-12, atol=1e-12)
        _, files = compile_module(parse(SELECTIVE_ONLINE, "sel.attn"), "numpy", "sel")
        path = tmp_path / "sel.py"
        write_atomic(path, files["sel.py"])
        got = load_generated(path).selective_online(Q, K, V)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_a_softmax_over_the_row_rank_of_a_recurrence_is_refused_on_kernels(backend):
    """The two-pass selective form's kernel is a scan over p with rows of keys m: its
    per-step max and sums over m ran within each program's block of keys, and only the
    first block's program stored O (wrong past one block of keys).  map-ranks now refuses
    a reduction over the rank the row blocks split, with that reason."""
    from attnc.backends import compile_module
    from attnc.passes.tile import NotTileable

    # a state that starts from the scores (not a constant) is not split into a scan kernel
    # and a streamed one, so the one-loop kernel with the per-step softmax is what remains
    spec = SELECTIVE_2PASS.replace("FS[0,m]    = 0", "FS[0,m]    = S[0,m] * 0")
    with pytest.raises(NotTileable, match="reduces over M, which the kernel's row blocks split"):
        compile_module(parse(spec, "sel.attn"), backend, "sel",
                       names=["canonicalize", "defer-normalization"])  # (two passes kept)


def test_a_softmax_inside_a_recurrence_is_derived_one_pass(tmp_path):
    """Selective attention's recurrent form: the recurrence FS over queries carries the keys,
    so it and the scores it reads are computed whole, and the softmax of each query's row
    streams the key tiles reading them at the tile's positions (the nested form, derived).
    The default pipeline reaches one pass over M; numpy equals the interpreter at several
    tiles and ragged sizes."""
    from attnc.backends import compile_module, load_generated, write_atomic
    from attnc.passes.passcount import count_passes
    from attnc.passes.pipeline import run_pipeline
    from attnc.passes.tile import NotTileable

    module = parse(SELECTIVE_2PASS, "sel.attn")
    stages = run_pipeline(module, None, options={"tile": 4})
    derived = stages[-1][1].definitions[0]
    assert count_passes(derived).pass_bound == 1
    assert count_passes(module.definitions[0]).pass_bound > 1
    rng = np.random.default_rng(2)
    for tile in (4, 16):
        _, files = compile_module(module, "numpy", "sel", options={"tile": tile})
        write_atomic(tmp_path / "sel.py", files["sel.py"])
        fn = load_generated(tmp_path / "sel.py").selective
        for P in (1, 6, 21):
            Q, K, V = rng.standard_normal((P, 3)), rng.standard_normal((P, 3)), \
                rng.standard_normal((P, 2))
            want = run(SELECTIVE_2PASS, Q, K, V)
            np.testing.assert_allclose(interpret(derived, Q, K, V), want, rtol=1e-12,
                                       atol=1e-12)
            np.testing.assert_allclose(fn(Q, K, V), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend_env", ["triton", "cuda"], indirect=True)
def test_a_softmax_inside_a_recurrence_runs_as_a_scan_then_a_streamed_kernel(backend_env,
                                                                             tmp_path):
    """On Triton and CUDA the recurrence is a scan kernel over the queries with rows of keys,
    storing each step's state, and the softmax a streamed kernel over key tiles reading the
    stored states as an input: against the interpreter at ragged sizes past one block."""
    import torch

    from attnc.backends import compile_module, load_generated, write_atomic

    module = parse(SELECTIVE_2PASS, "sel.attn")
    _, files = compile_module(module, backend_env, "sel", options={"tile": 16})
    assert files["sel.py"].count("selective__k0") and files["sel.py"].count("selective__k1")
    # the streamed kernel's rows are queries (the stored steps read beside the keys alone do
    # not make p a grid rank) and its products run on tensor cores
    if backend_env == "triton":
        src = files["sel.py"]
        start = src.index("def _selective__k1_kernel")
        assert "tl.dot" in src[start:src.index("\ndef ", start + 30)]
    else:
        assert re.search(r"\battnc_mma(_frag|_frag_areg)?<BLOCK_", files["sel.cu"])  # a call
    for name, text in files.items():
        write_atomic(tmp_path / name, text)
    fn = load_generated(tmp_path / "sel.py").selective
    rng = np.random.default_rng(4)
    for P in (5, 37, 150):
        Q, K, V = rng.standard_normal((P, 8)), rng.standard_normal((P, 8)), \
            rng.standard_normal((P, 4))
        want = run(SELECTIVE_2PASS, Q, K, V)
        got = fn(*[torch.tensor(x, dtype=torch.float32) for x in (Q, K, V)]).numpy()
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


SELECTIVE_FED_BACK = """attention selective_dep(Q[P,E], K[P,E], V[P,F]) -> O[P,F] {
  let M = P
  S[p,m]     = Q[p,e] * K[m,e] / sqrt(E)
  FS[0,m]    = 0
  FS[p+1,m]  = FS[p,m] + A[p,m]  where m < p
  L[p,m]     = S[p,m] - FS[p,m]
  GM[p]      = max[m](L[p,m])   where m <= p
  A[p,m]     = exp(L[p,m] - GM[p]) / sum[m](exp(L[p,m] - GM[p]))   where m <= p
  O[p,f]     = A[p,m] * V[m,f]
}
"""


def test_a_recurrence_fed_by_its_own_softmax_stays_and_says_why():
    """When the recurrence reads the step's softmax (FS += A), its steps cannot be computed
    before the loop over the keys: the online pass leaves it, naming that dependence."""
    from attnc.passes.online import online_blockers

    d = defn(SELECTIVE_FED_BACK)
    assert any("reads a reduction over m" in b for b in online_blockers(d))
    from attnc.passes.pipeline import run_pipeline

    out = run_pipeline(parse(SELECTIVE_FED_BACK, "dep.attn"), None)[-1][1].definitions[0]
    rng = np.random.default_rng(1)
    Q, K, V = rng.standard_normal((9, 3)), rng.standard_normal((9, 3)), rng.standard_normal((9, 2))
    np.testing.assert_allclose(interpret(out, Q, K, V), run(SELECTIVE_FED_BACK, Q, K, V),
                               rtol=1e-12, atol=1e-12)
