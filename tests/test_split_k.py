"""``split_k`` / ``stream_k``: the tile loop split across workers, checked against the interpreter.

The split forms must print as ``.attn`` that parses back to themselves and
compute what the unsplit one-pass cascade computes for 1, 2, 3 and 7 workers:
on ragged sizes (M not a multiple of tile × workers), with workers that get no
tile, and with fully masked rows (P > M, causal), which must come out 0.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from attnc.einsum_ir.interpreter import Interpreter, interpret
from attnc.einsum_ir.printer import print_ir
from attnc.frontends import parse, parse_file
from attnc.passes.canonicalize import canonicalize
from attnc.passes.defer_normalization import defer_normalization
from attnc.passes.online import online
from attnc.passes.split_k import (SplitKUnsupported, combines, split_k, split_k_blockers,
                                  stream_k, stream_k_schedule)
from conftest import EXAMPLES as EXAMPLES_DIR
from conftest import all_examples
from example_refs import EXAMPLES

WORKERS = (1, 2, 3, 7)


def one_pass(path: str, tile: int):
    ref = EXAMPLES[path]
    defn = parse_file(EXAMPLES_DIR / path)[ref.definition]
    return online(defer_normalization(canonicalize(defn)), tile)


def spec(text: str):
    return parse(text).definitions[0]


def round_trips(defn) -> None:
    assert parse(print_ir(defn)).definitions[0] == defn


def as_tuple(x) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def assert_same(source, derived, args, params) -> None:
    expected = as_tuple(interpret(source, *args, **params))
    actual = as_tuple(interpret(derived, *args, **params))
    assert len(actual) == len(expected)
    for e, a in zip(expected, actual):
        assert a.shape == e.shape
        assert np.all(np.isfinite(a)), "non-finite values in the split cascade's result"
        np.testing.assert_array_equal(a == 0, e == 0, err_msg="zero pattern differs")
        np.testing.assert_allclose(a, e, rtol=1e-9, atol=1e-12)


# (example, tile, sizes): ragged M, M1 below the worker count, P > M (fully masked rows)
CASES = [
    ("causal.attn", 4, ({"P": 5, "M": 37, "E": 3, "F": 2}, {"P": 9, "M": 6, "E": 3, "F": 2})),
    ("softmax1.attn", 8, ({"P": 4, "M": 29, "E": 3, "F": 2}, {"P": 7, "M": 5, "E": 2, "F": 2})),
    ("lse.attn", 4, ({"P": 3, "M": 23, "E": 3, "F": 2}, {"P": 8, "M": 6, "E": 2, "F": 3})),
    ("differential.attn", 4, ({"P": 3, "M": 14, "E": 2, "F": 2, "lam": 0.4},
                              {"P": 6, "M": 3, "E": 2, "F": 2, "lam": -0.3})),
    ("gqa_decode.attn", 4, ({"H": 4, "HK": 2, "P": 1, "M": 19, "E": 3, "F": 2},
                            {"H": 3, "HK": 1, "P": 6, "M": 5, "E": 2, "F": 2})),
    ("document_mask.attn", 8, ({"P": 5, "M": 27, "E": 3, "F": 2},
                               {"P": 8, "M": 20, "E": 2, "F": 2, "packed": 0})),
]


@pytest.mark.parametrize("path,tile,sizes", CASES, ids=[c[0] for c in CASES])
def test_split_k_matches_unsplit(path, tile, sizes):
    source = one_pass(path, tile)
    splits = {w: split_k(source, w) for w in WORKERS}
    for out in splits.values():
        round_trips(out)
    rng = np.random.default_rng(4)
    for s in sizes:
        args, params = EXAMPLES[path].make_inputs(rng, s)
        for out in splits.values():
            assert_same(source, out, args, params)


@pytest.mark.parametrize("path,tile,sizes", CASES[:2] + CASES[4:5],
                         ids=["causal", "softmax1", "gqa"])
def test_stream_k_matches_unsplit(path, tile, sizes):
    source = one_pass(path, tile)
    rng = np.random.default_rng(5)
    forms = [stream_k(source, w) for w in WORKERS] + [stream_k(source, w, units=()) for w in (2, 7)]
    for out in forms:
        round_trips(out)
    for s in sizes:
        args, params = EXAMPLES[path].make_inputs(rng, s)
        for out in forms:
            assert_same(source, out, args, params)


def example_key(path) -> str:
    return path.relative_to(EXAMPLES_DIR).as_posix()


@pytest.mark.parametrize("path", all_examples(), ids=lambda p: example_key(p))
def test_every_one_pass_example_splits(path):
    """Every example that online makes one-pass splits (3 workers, its first sizes)."""
    key = example_key(path)
    source = one_pass(key, 4)
    if len(source.iterative_ranks) != 1:  # none, or a recurrence beside the tile loop
        assert split_k_blockers(source)
        return
    assert split_k_blockers(source) == []
    args, params = EXAMPLES[key].make_inputs(np.random.default_rng(3), EXAMPLES[key].sizes[0])
    assert_same(source, split_k(source, 3), args, params)


def test_fully_masked_rows_give_zero():
    source = one_pass("causal.attn", 4)
    rng = np.random.default_rng(6)
    args, _ = EXAMPLES["causal.attn"].make_inputs(rng, {"P": 9, "M": 5, "E": 2, "F": 2})
    for w in WORKERS:
        out = interpret(split_k(source, w), *args)
        assert np.all(out[:4] == 0) and np.all(out[4:] != 0)


def test_batch_dims():
    source = one_pass("gqa_decode.attn", 4)
    rng = np.random.default_rng(7)
    draws = [EXAMPLES["gqa_decode.attn"].make_inputs(rng, {"H": 2, "HK": 1, "P": 2, "M": 11,
                                                            "E": 2, "F": 2})[0] for _ in range(2)]
    args = [np.stack(xs) for xs in zip(*draws)]
    assert_same(source, split_k(source, 3), args, {})


# --- other recurrences: a plain running sum, a presence flag, exp2 --------------------

LINEAR = """
attention linear_1pass(Q[P,E], K[M,E], V[M,F]) -> AV[P,F] {
  let M0 = 4
  let M1 = ceil(M / M0)
  BK[m1,m0,e] = K[m1*M0 + m0, e]
  BV[m1,m0,f] = V[m1*M0 + m0, f]
  RKV[0,e,f] = 0
  RZ[0,e] = 1
  RKV[m1+1,e,f] = RKV[m1,e,f] + BK[m1,m0,e] * BV[m1,m0,f]
  RZ[m1+1,e] = BK[m1,m0,e] + RZ[m1,e]
  N[p,f] = Q[p,e] * RKV[M1,e,f]
  Z[p] = Q[p,e] * RZ[M1,e]
  AV[p,f] = N[p,f] / Z[p]
}
"""

FLAG = """
attention flagged(Q[P,E], K[M,E]) -> S[P] {
  let M0 = 4
  let M1 = ceil(M / M0)
  BK[m1,m0,e] = K[m1*M0 + m0, e]
  BQK[m1,m0,p] = Q[p,e] * BK[m1,m0,e]   where m1*M0 + m0 <= p + M - P
  LS[m1,p] = sum[m0](BQK[m1,m0,p])
  RS[0,p] = 0
  SEEN[0,p] = 0
  RS[m1+1,p] = RS[m1,p] + LS[m1,p]
  SEEN[m1+1,p] = 1 + 0 * LS[m1,p]
  S[p] = RS[M1,p] + 1   where SEEN[M1,p] > 0
}
"""


def test_running_sum_and_nonzero_init():
    source = spec(LINEAR)
    assert {n: c.kind for n, c in combines(source).items()} == {"RKV": "sum", "RZ": "sum"}
    rng = np.random.default_rng(8)
    for M in (13, 3, 0):
        args = [np.abs(rng.standard_normal((4, 3))), np.abs(rng.standard_normal((M, 3))),
                rng.standard_normal((M, 2))]
        for w in WORKERS:
            out = split_k(source, w)
            round_trips(out)
            assert_same(source, out, args, {})


def test_presence_flag():
    source = spec(FLAG)
    assert {n: c.kind for n, c in combines(source).items()} == {"RS": "sum", "SEEN": "max"}
    rng = np.random.default_rng(9)
    args = [rng.standard_normal((9, 2)), rng.standard_normal((6, 2))]
    for w in WORKERS:
        out = split_k(source, w)
        round_trips(out)
        assert_same(source, out, args, {})


def test_exp2_and_scaled_shift():
    source = online(defer_normalization(canonicalize(spec("""
attention s2(Q[P,E], K[M,E], V[M,F]) -> AV[P,F] {
  QK[p,m] = Q[p,e] * K[m,e]   where m <= p + M - P
  GM[p]   = max[m](QK[p,m])
  SN[p,m] = exp2((QK[p,m] - GM[p]) * 2)
  AV[p,f] = SN[p,m] * V[m,f] / sum[m](SN[p,m])
}"""))), 4)
    kinds = {n: (c.kind, c.by) for n, c in combines(source).items()}
    assert sorted(kinds.values()) == [("max", None), ("rescaled", "RM"), ("rescaled", "RM")]
    rng = np.random.default_rng(10)
    args = [rng.standard_normal((7, 2)), rng.standard_normal((17, 2)), rng.standard_normal((17, 2))]
    for w in WORKERS:
        assert_same(source, split_k(source, w), args, {})


def test_ragged_tail_is_guarded_when_no_read_bounds_it():
    """A counter reads no tile input, so the tail past M1 needs the share guard."""
    source = spec("""
attention count(X[U,M]) -> C[U] {
  let M0 = 3
  let M1 = ceil(M / M0)
  N[0,u] = 0
  N[m1+1,u] = N[m1,u] + 1
  C[u] = N[M1,u]
}""")
    for w in WORKERS:
        out = split_k(source, w)
        round_trips(out)
        assert "where w * MT + mt < M1" in print_ir(out)
        for m in (0, 2, 10, 22):
            np.testing.assert_array_equal(interpret(out, np.zeros((2, m))), np.full(2, -(-m // 3)))


# --- refusals -------------------------------------------------------------------------

def loop_with(update: str, extra: str = "") -> str:
    return f"""
attention t(Q[P,E], K[M,E]) -> S[P] {{
  let M0 = 4
  let M1 = ceil(M / M0)
  BK[m1,m0,e] = K[m1*M0 + m0, e]
  LX[m1,p] = Q[p,e] * BK[m1,m0,e]
  RM[0,p] = -inf
  RM[m1+1,p] = max(LX[m1,p], RM[m1,p])
  R[0,p] = 0
  {update}
  {extra}
  S[p] = R[M1,p]
}}"""


@pytest.mark.parametrize("update,why", [
    ("R[m1+1,p] = R[m1,p] * R[m1,p] + LX[m1,p]", "not R * (one rescale factor)"),
    ("R[m1+1,p] = R[m1,p] + LX[m1,p] * RM[m1+1,p]", "reads the loop's state"),
    ("R[m1+1,p] = LX[m1,p] + R[m1,p] * exp(RM[m1,p] - RM[m1+1,p])", "carries exp(-(0)"),
    ("R[m1+1,p] = exp(LX[m1,p] - RM[m1+1,p] * RM[m1+1,p]) + R[m1,p] * exp(RM[m1,p] - RM[m1+1,p])",
     "is not linear"),
    ("R[m1+1,p] = exp(LX[m1,p] * RM[m1+1,p]) + R[m1,p] * exp(RM[m1,p] - RM[m1+1,p])",
     "depends on what the increment reads"),
    ("R[m1+1,p] = exp(LX[m1,p] - RM[m1+1,p]) + R[m1,p] * exp2(RM[m1,p] - RM[m1+1,p])",
     "not the rescale's"),
    ("R[m1+1,p] = exp(LX[m1,p] - RM[m1+1,p]) + R[m1,p] * exp(RM[m1+1,p] - RM[m1,p])",
     "with a constant c > 0"),
    ("R[m1+1,p] = LX[m1,p]", "not a running max/min"),
], ids=["square", "increment-reads-max", "unshifted-increment", "quadratic-shift",
        "data-dependent-shift", "exp-vs-exp2", "wrong-sign", "last-value"])
def test_refuses_non_associative_updates(update, why):
    defn = spec(loop_with(update))
    with pytest.raises(SplitKUnsupported, match="state R has the update") as err:
        split_k(defn, 2)
    assert why in str(err.value)


def test_refuses_rescaled_sum_that_is_not_relative_to_its_max():
    update = ("R[m1+1,p] = sum[m0](exp(BQ[m1,m0,p] - RM[m1+1,p]) * BQ[m1,m0,p] ** 2 * RM[m1,p])"
              " + R[m1,p] * exp(RM[m1,p] - RM[m1+1,p])")
    defn = spec(loop_with(update, "BQ[m1,m0,p] = Q[p,e] * BK[m1,m0,e]"))
    with pytest.raises(SplitKUnsupported, match="reads the loop's state"):
        split_k(defn, 2)


def test_refuses_cascades_without_one_loop():
    defn = parse_file(EXAMPLES_DIR / "causal.attn").definitions[0]
    with pytest.raises(SplitKUnsupported, match="exactly one iterative rank"):
        split_k(defn, 2)
    with pytest.raises(ValueError, match="positive integer"):
        split_k(one_pass("causal.attn", 4), 0)


def test_stream_k_units_must_be_carried_by_every_state():
    with pytest.raises(ValueError, match="every state carries"):
        stream_k(one_pass("causal.attn", 4), 2, units=("F",))


def test_golden_causal_workers2(golden):
    out = split_k(one_pass("causal.attn", 16), 2)
    round_trips(out)
    golden(print_ir(out))


# --- Stream-K's schedule ----------------------------------------------------------------


@given(st.integers(0, 9), st.integers(0, 12), st.integers(1, 20))
def test_stream_k_schedule_balanced_cover(units, tiles, workers):
    plan = stream_k_schedule(units, tiles, workers)
    assert len(plan) == workers
    shares = [sum(end - first for _, first, end in segs) for segs in plan]
    assert max(shares) - min(shares) <= 1
    covered = [(u, t) for segs in plan for u, first, end in segs for t in range(first, end)]
    assert covered == [(u, t) for u in range(units) for t in range(tiles)]  # once each, in order
    for segs in plan:
        assert all(0 <= first < end <= tiles for _, first, end in segs)
        assert [u for u, _, _ in segs] == sorted({u for u, _, _ in segs})  # one segment per unit


@given(st.integers(1, 4), st.integers(1, 5), st.integers(1, 8))
def test_stream_k_ir_follows_the_schedule(units, tiles, workers):
    """Each worker's tile count per unit in the IR's states is the schedule's segment length."""
    defn = spec(f"""
attention count(X[U,M]) -> C[U] {{
  let M0 = 1
  let M1 = ceil(M / M0)
  BX[m1,m0,u] = X[u, m1*M0 + m0]
  N[0,u] = 0
  N[m1+1,u] = N[m1,u] + 1 + 0 * BX[m1,m0,u]
  C[u] = N[M1,u]
}}""")
    out = stream_k(defn, workers)
    store = Interpreter(out).run({"X": np.zeros((units, tiles))})
    counts = store["N"].val[:, -1, :]
    expected = np.zeros((workers, units))
    for w, segs in enumerate(stream_k_schedule(units, tiles, workers)):
        for u, first, end in segs:
            expected[w, u] = end - first
    np.testing.assert_array_equal(counts, expected)
    np.testing.assert_array_equal(interpret(out, np.zeros((units, tiles))), np.full(units, tiles))


ATTAINED = """attention t(Q[P,E], K[M,E], V[M,F]) -> (N[P], NT[P], NA[P], L[P], LA[P]) {
  S[p,m]  = Q[p,e] * K[m,e]   where m <= p + M - P
  N[p]    = max[m](S[p,m])
  NT[p]   = sum[m](select(S[p,m] == N[p], 1, 0))
  NA[p]   = min[m](select(S[p,m] == N[p], m, inf))
  L[p]    = min[m](S[p,m])
  LA[p]   = min[m](select(L[p] == S[p,m], m, inf))
}"""


@pytest.mark.parametrize("tile", [1, 2, 5])
def test_where_a_max_is_attained_merges_across_workers(tile):
    """A tie count (a sum zeroed when the running max moves) merges as a rescaled sum by
    ``select(A_w == A, 1, 0)``; a first attaining index (reset when it moves) by
    ``min[w](select(A_w == A, R_w, inf))``: only the workers that saw the merged max count.
    Small integer scores (ties across workers, a max in a late worker), empty rows, split-K
    and stream-K against the source."""
    source = spec(ATTAINED)
    derived = online(defer_normalization(source), tile)
    kinds = {c.kind for c in combines(derived).values()}
    assert {"rescaled", "reset min", "max", "min"} <= kinds, kinds
    forms = [split_k(derived, w) for w in WORKERS] + [stream_k(derived, w) for w in (2, 7)]
    text = print_ir(forms[1])
    assert "min[w](select(RN[w,MT,p] == CRN[p], RNA[w,MT,p], inf))" in text, text
    for out in forms:
        round_trips(out)
    rng = np.random.default_rng(tile)
    for P, M in ((9, 7), (4, 23), (6, 6)):
        q = rng.integers(-2, 3, (P, 2)).astype(float)
        k = rng.integers(-2, 3, (M, 2)).astype(float)
        expected = interpret(source, q, k, np.zeros((M, 1)))
        for out in forms:
            for e, a in zip(expected, interpret(out, q, k, np.zeros((M, 1)))):
                np.testing.assert_array_equal(a, e)
