"""``reassociate``: contraction order by cost, chunked prefix form of causal chains.

Every result is compared with the interpreter on the source (ragged sizes, batch
dims), prints as valid ``.attn``, and is canonical.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import sympy
from hypothesis import given
from hypothesis import strategies as st

from attnc.einsum_ir import ir
from attnc.einsum_ir.exprs import walk
from attnc.einsum_ir.interpreter import interpret
from attnc.einsum_ir.printer import print_ir
from attnc.frontends import parse, parse_file
from attnc.passes.canonicalize import canonicalize
from attnc.passes.costs import statement_flops
from attnc.passes.reassociate import assumed_sizes, reassociate, sequence_ranks

from conftest import EXAMPLES as EXAMPLES_DIR
from conftest import all_examples
from example_refs import EXAMPLES
from strategies import definitions, sample_inputs, sample_sizes

P, M, E, F = (ir.size_symbol(r) for r in "PMEF")


@functools.lru_cache(maxsize=None)
def example(name: str) -> ir.Definition:
    return canonicalize(parse_file(EXAMPLES_DIR / f"{name}.attn").definitions[0])


def total_flops(defn: ir.Definition) -> sympy.Expr:
    return sympy.expand(sum((statement_flops(s) for s in defn.statements), sympy.Integer(0)))


def has_monomial_with(expr: sympy.Expr, *symbols) -> bool:
    return any(all(s in term.free_symbols for s in symbols) for term in sympy.Add.make_args(expr))


def assert_valid(out: ir.Definition) -> None:
    """Prints as valid .attn (parses back to itself) and is canonical."""
    assert parse(print_ir(out), "out.attn").definitions[0] == out
    for s in out.statements:
        reds = [n for n in walk(s.expr) if isinstance(n, ir.Reduce)]
        assert len(reds) <= 1 and (not reds or reds[0] is s.expr), print_ir(s)
        assert s.where is None or not any(isinstance(n, ir.Reduce) for n in walk(s.where))


def assert_same(actual, expected) -> None:
    actual = actual if isinstance(actual, tuple) else (actual,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape
        np.testing.assert_array_equal(a == 0, e == 0, err_msg="absent pattern differs")
        scale = max(1.0, float(np.max(np.abs(e), initial=0.0)))
        assert np.max(np.abs(a - e), initial=0.0) <= 1e-9 * scale


def qkv(rng, P, M, E=3, F=2, batch=(2,)):
    return (rng.standard_normal(batch + (P, E)), rng.standard_normal(batch + (M, E)),
            rng.standard_normal((M, F)))


# ---------------------------------------------------------------------------------------------
# Size assumptions
# ---------------------------------------------------------------------------------------------


def test_sequence_ranks_are_the_rows_of_argument_matrices():
    assert sequence_ranks(example("causal")) == {"P", "M"}
    assert assumed_sizes(example("causal")) == {"P": 4096, "E": 64, "M": 4096, "F": 64}
    gqa = example("gqa_decode")
    assert sequence_ranks(gqa) == {"P", "M"}
    assert assumed_sizes(gqa, {"H": 32, "HK": 8})["G"] == 4


def test_bad_sizes_and_tile_are_rejected():
    with pytest.raises(ValueError, match="size P"):
        reassociate(example("cosine"), {"P": 0})
    with pytest.raises(ValueError, match="tile"):
        reassociate(example("cosine"), tile=0)


# ---------------------------------------------------------------------------------------------
# Examples
# ---------------------------------------------------------------------------------------------

CASES = [(path, k) for path, ref in sorted(EXAMPLES.items()) for k in range(len(ref.sizes))]


@pytest.mark.parametrize("path,case", CASES, ids=[f"{p}-{k}" for p, k in CASES])
def test_every_example_stays_equivalent(path, case):
    ref = EXAMPLES[path]
    defn = next(d for d in parse_file(EXAMPLES_DIR / path).definitions if d.name == ref.definition)
    source = canonicalize(defn)
    out = reassociate(source, tile=4)
    assert_valid(out)
    rng = np.random.default_rng(case)
    draws = [ref.make_inputs(rng, ref.sizes[case]) for _ in range(2)]
    arrays = [np.stack([d[0][i] for d in draws]) for i in range(len(draws[0][0]))]
    assert_same(interpret(out, *arrays, **draws[0][1]), interpret(source, *arrays, **draws[0][1]))


def test_only_softmax_free_chains_change():
    changed = set()
    for path in all_examples():
        for d in parse_file(path).definitions:
            source = canonicalize(d)
            if reassociate(source) != source:
                changed.add(d.name)
            extrema = {s.tensor for s in source.statements for n in walk(s.expr)
                       if isinstance(n, ir.Reduce) and n.op in ("max", "min")}
            # a softmax's statements (its max and what reads it) are never touched; a
            # softmax-free chain beside one (Infini-attention's memory) may be
            softmax = [s for s in source.statements if s.tensor in extrema or any(
                isinstance(n, ir.Access) and n.tensor in extrema for n in walk(s.expr))]
            after = reassociate(source).statements
            assert all(s in after for s in softmax), f"{d.name}: a softmax was touched"
    assert {"cosine", "linear_causal"} <= changed
    assert "linear_attention" not in changed  # already in associative form
    assert "sigmoid_attn" not in changed  # a single sum under a nonlinearity


def test_cosine_loses_its_quadratic_term(golden):
    source = example("cosine")
    out = reassociate(source)
    assert has_monomial_with(total_flops(source), P, M)
    assert not has_monomial_with(total_flops(out), P, M)
    golden(print_ir(out))


def test_linear_attention_is_left_alone():
    source = example("linear")
    assert reassociate(source) == source
    assert not has_monomial_with(total_flops(source), P, M)


def test_causal_linear_attention_becomes_chunked_prefix_form(golden):
    source = example("linear_causal")
    out = reassociate(source)
    flops = total_flops(out)
    assert has_monomial_with(total_flops(source), P, M, E)
    assert not has_monomial_with(flops, P, M)
    m0, m1, m0q = ir.size_symbol("M0"), ir.size_symbol("M1"), ir.size_symbol("M0Q")
    # each chunk's queries against its keys, and each chunk's state
    assert has_monomial_with(flops, m1, m0q, m0, E) and has_monomial_with(flops, m1, E, F)
    assert set(out.iterative_ranks) == {"M1", "M11"}  # numerator and denominator
    counts = {P, M, m1, ir.size_symbol("M11")}
    for term in sympy.Add.make_args(flops):  # linear in the sequence: one of P, M, M1 at most
        assert len(term.free_symbols & counts) <= 1, term
    golden(print_ir(out))


@pytest.mark.parametrize("name", ["cosine", "linear_causal", "linear"])
def test_reassociate_is_idempotent(name):
    once = reassociate(example(name))
    assert reassociate(once) == once


@pytest.mark.parametrize("P_,M_", [(5, 9), (9, 9), (12, 7), (1, 1), (4, 3), (7, 2), (3, 0), (0, 4)])
def test_causal_chunks_are_exact_with_a_kv_cache_offset(P_, M_):
    source = example("linear_causal")
    out = reassociate(source, tile=3)
    args = qkv(np.random.default_rng(P_ * 10 + M_), P_, M_)
    assert_same(interpret(out, *args), interpret(source, *args))


def test_zero_sized_head_dim_is_absent_both_ways():
    source = example("linear_causal")
    args = qkv(np.random.default_rng(0), 4, 6, E=0)
    assert_same(interpret(reassociate(source, tile=2), *args), interpret(source, *args))


def test_given_sizes_decide():
    source = example("cosine")
    assert reassociate(source, {"P": 8, "M": 8, "E": 512, "F": 512}) == source
    assert reassociate(source, {"P": 8, "M": 8, "E": 2, "F": 2}) != source


SELF_CAUSAL = """
attention self_causal(Q[P,E], K[M,E], V[M,F]) -> AV[P,F] {
  S[p,m]  = Q[p,e] * K[m,e]
  AV[p,f] = S[p,m] * V[m,f]   where m <= p
}
"""


def test_bare_causal_mask_is_not_chunked():
    """``m <= p`` may reach past the keys (``P > M``): no chunking, but still exact."""
    source = canonicalize(parse(SELF_CAUSAL, "s.attn").definitions[0])
    out = reassociate(source, tile=2)
    assert out.iterative_ranks == ()
    args = qkv(np.random.default_rng(1), 6, 4)
    assert_same(interpret(out, *args), interpret(source, *args))


PREFIX_SUM = """
attention prefix_sum(Q[P], K[M], V[M,F]) -> AV[P,F] {
  AV[p,f] = Q[p] * K[m] * V[m,f]   where m <= p + M - P
}
"""


def test_a_single_masked_sum_becomes_a_prefix_sum():
    source = canonicalize(parse(PREFIX_SUM, "s.attn").definitions[0])
    out = reassociate(source, {"P": 4096, "M": 4096}, tile=2)
    assert out.iterative_ranks == ("M1",)
    rng = np.random.default_rng(3)
    for P_, M_ in [(3, 8), (8, 8), (8, 3)]:
        args = [rng.standard_normal(s) for s in ((2, P_), (M_,), (M_, 3))]
        assert_same(interpret(out, *args), interpret(source, *args))


QUADRATIC_LINEAR = """
attention quadratic_linear(Q[H,P,E], K[H,M,E], V[H,M,F], scale) -> AV[H,P,F] {
  S[h,p,m]  = Q[h,p,e] * K[h,m,e] * scale
  AV[h,p,f] = S[h,p,m] * V[h,m,f] / sum[m](S[h,p,m])
}
"""


def test_shared_contraction_is_inlined_into_both_readers():
    source = canonicalize(parse(QUADRATIC_LINEAR, "q.attn").definitions[0])
    out = reassociate(source)
    assert "S" not in {s.tensor for s in out.statements}
    assert not has_monomial_with(total_flops(out), P, M)
    rng = np.random.default_rng(2)
    args = [np.abs(rng.standard_normal(s)) for s in ((2, 3, 5, 4), (3, 7, 4), (3, 7, 2))]
    assert_same(interpret(out, *args, scale=0.5), interpret(source, *args, scale=0.5))


HEADS_CAUSAL = """
attention heads_causal(Q[H,P,E], K[H,M,E], V[H,M,F], W[M]) -> AV[H,P,F] {
  S[h,p,m]  = Q[h,p,e] * K[h,m,e] * W[m] / E
  AV[h,p,f] = S[h,p,m] * V[h,m,f] * 2   where m < p + M - P
}
"""


@pytest.mark.parametrize("P_,M_", [(4, 9), (5, 5), (9, 4)])
def test_chunked_state_carries_shared_ranks(P_, M_):
    source = canonicalize(parse(HEADS_CAUSAL, "h.attn").definitions[0])
    out = reassociate(source, tile=2)
    assert_valid(out)
    assert out.iterative_ranks == ("M1",)
    rng = np.random.default_rng(P_)
    args = [rng.standard_normal(s) for s in ((2, 3, P_, 4), (3, M_, 4), (3, M_, 2), (M_,))]
    assert_same(interpret(out, *args), interpret(source, *args))


# ---------------------------------------------------------------------------------------------
# Random chains of contractions
# ---------------------------------------------------------------------------------------------

RANKS = ("P", "M", "E", "F", "H")
MASKS = ("m <= p + M - P", "m < p + M - P", "m <= p", "p >= m + 1", "m <= p + M - P - 2")


def _mask(text: str) -> ir.Expr:
    d = parse(f"attention t(X[P,M]) -> Y[P] {{\n Y[p] = sum[m](X[p,m]) where {text}\n}}", "m")
    return d.definitions[0].statements[0].where


def _ordered(ranks) -> tuple[str, ...]:
    chosen = set(ranks)
    return tuple(r for r in RANKS if r in chosen)


def _arg_ranks(draw, i: int, causal: bool) -> tuple[str, ...]:
    """Any ranks; for causal chains, query-side (no M) and key-side (no P) in turn."""
    pool = [r for r in RANKS if not causal or r != ("M", "P")[i % 2]]
    return _ordered(draw(st.lists(st.sampled_from(pool), min_size=1, max_size=3, unique=True)))


@st.composite
def chains(draw, causal: bool = False) -> ir.Definition:
    """2–4 contractions over earlier tensors (each reads the previous one), sometimes a
    nonlinear map between, a coefficient, or a causal mask (always one, when ``causal``)."""
    args = tuple(ir.TensorArg(f"A{i}", _arg_ranks(draw, i, causal))
                 for i in range(draw(st.integers(2, 4))))
    tensors = [(a.name, a.ranks) for a in args]
    statements = []
    for i in range(draw(st.integers(2, 4))):
        if i and draw(st.integers(0, 5)) == 0:
            name, ranks = tensors[-1]
            expr = ir.Call("tanh", (_access(name, ranks),))
            statements.append(ir.Einsum(f"T{i}", ranks, expr))
            tensors.append((f"T{i}", ranks))
            continue
        picks = draw(st.lists(st.sampled_from(tensors), min_size=2, max_size=3))
        if i:
            picks[0] = tensors[-1]
        used = _ordered(r for _, rs in picks for r in rs)
        lhs = tuple(r for r in used if draw(st.booleans()))
        summed = tuple(r for r in used if r not in lhs)
        expr = _product(*(_access(n, rs) for n, rs in picks))
        coefficient = draw(st.sampled_from((None, ir.Num(0.5), ir.Size("E"))))
        if coefficient is not None and (coefficient != ir.Size("E") or "E" in used):
            expr = ir.Binary("/", expr, coefficient)
        where = None
        if "P" in lhs and "M" in summed and (causal or draw(st.booleans())):
            where = _mask(draw(st.sampled_from(MASKS)))
        statements.append(ir.Einsum(f"T{i}", lhs, ir.Reduce("sum", summed, expr) if summed
                                    else expr, where))
        tensors.append((f"T{i}", lhs))
    last = statements[-1]
    return ir.Definition("chain", args, (), (ir.Output(last.tensor, last.lhs),), tuple(statements))


def _access(name: str, ranks) -> ir.Access:
    return ir.Access(name, tuple(ir.Index(r) for r in ranks))


def _product(*factors: ir.Expr) -> ir.Expr:
    expr = factors[0]
    for f in factors[1:]:
        expr = ir.Binary("*", expr, f)
    return expr


@st.composite
def causal_chains(draw) -> ir.Definition:
    """Linear-attention-like chains: scores over query- and key-side inputs, maybe a
    product map of them, then a masked sum over keys, maybe divided by its own masked sum."""
    extra = lambda: draw(st.lists(st.sampled_from(("E", "F", "H")), max_size=2, unique=True))
    q = ir.TensorArg("Q", _ordered(["P"] + extra()))
    ks = [ir.TensorArg(f"K{i}", _ordered(["M"] + extra())) for i in range(draw(st.integers(1, 2)))]
    v = ir.TensorArg("V", _ordered(["M"] + extra()))
    score_ranks = _ordered(r for a in [q] + ks for r in a.ranks)
    keep = _ordered(["P", "M"] + [r for r in "H" if r in score_ranks and draw(st.booleans())])
    score = _product(*(_access(a.name, a.ranks) for a in [q] + ks))
    summed = tuple(r for r in score_ranks if r not in keep)
    statements = [ir.Einsum("S", keep, ir.Reduce("sum", summed, score) if summed else score)]
    if draw(st.booleans()):
        statements.append(ir.Einsum("U", keep, ir.Binary("/", _access("S", keep), ir.Size("M"))))
    last = statements[-1].tensor
    mask = _mask(draw(st.sampled_from(MASKS)))
    used = _ordered(keep + v.ranks)
    out = tuple(r for r in used if r != "M" and (r == "P" or draw(st.booleans())))
    body = _product(_access(last, keep), _access(v.name, v.ranks))
    if draw(st.booleans()):
        den_ranks = tuple(r for r in keep if r != "M")
        statements.append(ir.Einsum("D", den_ranks, ir.Reduce("sum", ("M",), _access(last, keep)),
                                    mask))
        body = ir.Binary("/", body, _access("D", den_ranks))
    statements.append(ir.Einsum("AV", out, ir.Reduce("sum", tuple(r for r in used if r not in out),
                                                     body), mask))
    return ir.Definition("causal_chain", (q, *ks, v), (), (ir.Output("AV", out),),
                         tuple(statements))


COST_SIZES = (None, {"P": 4096, "M": 4096, "E": 64, "F": 64, "H": 2},
              {"P": 2, "M": 64, "E": 4096, "F": 2, "H": 64})


@given(st.one_of(chains(), chains(causal=True), causal_chains()), st.sampled_from(COST_SIZES),
       st.sampled_from((2, 3, 64)), st.integers(0, 2**32 - 1))
def test_random_chains_stay_equivalent(source, sizes, tile, seed):
    assert parse(print_ir(source), "chain.attn").definitions[0] == source
    out = reassociate(source, sizes, tile=tile)
    assert_valid(out)
    rng = np.random.default_rng(seed)
    dims = {r: int(rng.integers(0 if rng.random() < 0.1 else 1, 5)) for r in RANKS}
    args = [rng.standard_normal(((2,) if i == 0 else ()) + tuple(dims[r] for r in a.ranks))
            for i, a in enumerate(source.tensor_args)]
    assert_same(interpret(out, *args), interpret(source, *args))


@given(definitions(), st.integers(0, 2**32 - 1))
def test_random_definitions_stay_equivalent(source, seed):
    """Any valid cascade (lets, selects, iterative ranks, wheres): rewritten or left alone."""
    source = canonicalize(source)
    out = reassociate(source, tile=2)
    assert_valid(out)
    rng = np.random.default_rng(seed)
    args = sample_inputs(source, rng, sample_sizes(source, rng))
    params = {p.name: 0.7 for p in source.scalar_params if p.default is None}
    assert_same(interpret(out, *args, **params), interpret(source, *args, **params))
