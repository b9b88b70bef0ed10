"""The derived backward cascade (passes/backward.py) against finite differences.

For a definition f, outputs y, random cotangents dy and a random direction v of input x,
the backward's dx must satisfy <dx, v> = d/dt <f(x + t v), dy> at t = 0 (central
differences in float64 through the interpreter)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings

from attnc.backends import compile_module, load_generated, write_atomic
from attnc.backends.check import bounded_sizes, random_call
from attnc.einsum_ir.interpreter import interpret
from attnc.einsum_ir.ir import Module
from attnc.einsum_ir.printer import print_module
from attnc.frontends import parse, parse_file
from attnc.passes.backward import NotDifferentiable, backward
from attnc.passes.canonicalize import canonicalize
from attnc.passes.shift_invariance import shifts

from conftest import EXAMPLES
from example_refs import EXAMPLES as REFS
from strategies import attention_cascades

# hand-written online cascades (running maxima, rescaled states): their source forms are
# the ones to differentiate; selective attention's prefix sum over the queries is derived
ITERATIVE = {"fusemax/cascade5.attn", "fusemax/cascade5_causal.attn",
             "fusemax/online_normalizer_2pass.attn"}
REFUSED: dict[str, str] = {}


def _tuple(x):
    return x if isinstance(x, tuple) else (x,)


def _inputs(defn, seed: int, low: int = 1, high: int = 6):
    rng = np.random.default_rng(seed)
    args, params = random_call(defn, rng, bounded_sizes(defn, rng, low, high))
    params = {p.name: params.get(p.name, float(rng.uniform(0.5, 1.5))) for p in defn.scalar_params}
    return rng, args, params


def directional_errors(defn, seed: int = 0, eps: float = 1e-6) -> dict[str, float]:
    """Relative error of <dx, v> against central differences, per gradient."""
    rng, args, params = _inputs(defn, seed)
    outs = _tuple(interpret(defn, *args, **params))
    douts = [rng.standard_normal(o.shape) for o in outs]
    bw = backward(defn)
    grads = _tuple(interpret(bw, *args, *douts, **params))
    names = [a.name for a in defn.tensor_args]

    def value(a, p):
        return sum(float(np.sum(x * d)) for x, d in zip(_tuple(interpret(defn, *a, **p)), douts))

    errors = {}
    for g, out in zip(grads, bw.outputs):
        name = out.name[1:]
        if name in names:
            i = names.index(name)
            v = rng.standard_normal(args[i].shape)
            plus, minus = list(args), list(args)
            plus[i], minus[i] = args[i] + eps * v, args[i] - eps * v
            fd = (value(plus, params) - value(minus, params)) / (2 * eps)
        else:
            v = 1.0
            fd = (value(args, {**params, name: params[name] + eps})
                  - value(args, {**params, name: params[name] - eps})) / (2 * eps)
        got = float(np.sum(g * v))
        assert np.all(np.isfinite(g)), name
        errors[name] = abs(got - fd) / max(abs(fd), 1e-3)  # FD noise near 0 is ~1e-10
    return errors


@pytest.mark.parametrize("path", sorted(REFS))
def test_every_example_has_a_backward_that_matches_finite_differences(path):
    defn = parse_file(EXAMPLES / path)[REFS[path].definition]
    if path in ITERATIVE or path in REFUSED:
        with pytest.raises(NotDifferentiable, match=REFUSED.get(path, "iterative")):
            backward(defn)
        return
    for seed in (0, 1):
        errors = directional_errors(defn, seed)
        assert max(errors.values(), default=0) < 1e-5, errors
    bw = backward(defn)
    assert parse(print_module(Module((bw,)))) == Module((bw,)), "prints and parses back"


@settings(max_examples=12, deadline=None)
@given(attention_cascades())
def test_random_attention_variants_differentiate(defn):
    errors = directional_errors(defn, 3)
    assert max(errors.values(), default=0) < 1e-4, errors


def test_masked_rows_get_zero_gradients_not_nan():
    """Causal with more queries than keys: the first queries see nothing; their output is
    0, and so are their gradients (no 0/0 from the normaliser)."""
    defn = parse_file(EXAMPLES / "causal.attn").definitions[0]
    rng = np.random.default_rng(5)
    P, M, E, F = 7, 3, 4, 2
    Q, K, V = rng.standard_normal((P, E)), rng.standard_normal((M, E)), rng.standard_normal((M, F))
    dQ, dK, dV, dscale = interpret(backward(defn), Q, K, V, rng.standard_normal((P, F)), scale=0.5)
    assert np.all(np.isfinite(dQ)) and np.all(np.isfinite(dK)) and np.all(np.isfinite(dV))
    assert np.all(dQ[: P - M] == 0) and np.any(dQ[P - M:] != 0)
    assert np.isfinite(dscale)


def test_gqa_sums_key_and_value_gradients_over_each_group():
    """V[h // G, m, f] is read by G query heads: its gradient is their sum (per query head,
    then over each group: h = hk*G + g), checked against finite differences."""
    defn = parse_file(EXAMPLES / "gqa_decode.attn").definitions[0]
    text = print_module(Module((backward(defn),)))
    assert "dV_1[hk,m,f] = sum[gx](dV_1_heads[hk * G + gx, m, f])" in text
    assert max(directional_errors(defn, 4).values()) < 1e-5


def test_the_numpy_backend_compiles_the_backward(tmp_path):
    module = Module((backward(parse_file(EXAMPLES / "softcap.attn").definitions[0]),))
    _, files = compile_module(module, "numpy", "softcap_bw")
    write_atomic(tmp_path / "softcap_bw.py", files["softcap_bw.py"])
    fn = load_generated(tmp_path / "softcap_bw.py").softcap_backward
    rng, args, params = _inputs(parse_file(EXAMPLES / "softcap.attn").definitions[0], 2, 3, 9)
    dAV = rng.standard_normal((args[0].shape[0], args[2].shape[1]))
    want = interpret(module.definitions[0], *args, dAV, **params)
    for g, w in zip(fn(*args, dAV, **params), want):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)


def test_integer_inputs_get_no_gradient():
    defn = parse_file(EXAMPLES / "document_mask.attn").definitions[0]
    outs = [o.name for o in backward(defn).outputs]
    assert outs == ["dQ", "dK", "dV", "dscale"]


def test_cli_backward(capsys):
    from attnc.frontends.cli import main

    assert main(["check", str(EXAMPLES / "softcap.attn"), "--backward"]) == 0
    out = capsys.readouterr().out
    assert "softcap_backward" in out and "dcap" in out and "FAIL" not in out
    assert main(["report", str(EXAMPLES / "causal.attn"), "--backward"]) == 0
    assert "causal_softmax_backward" in capsys.readouterr().out
    assert main(["compile", str(EXAMPLES / "fusemax/cascade5.attn"), "--backward"]) == 2
    assert "iterative" in capsys.readouterr().err


RUNNING_SUM = """
attention running(Q[P,E], K[M,E], V[M,F], c = 0.5) -> (O[P,F], TOT[M]) {
  S[p,m]   = Q[p,e] * K[m,e]
  R[0,m]   = c
  R[p+1,m] = R[p,m] + exp(S[p,m])   where m <= p
  O[p,f]   = R[p,m] * V[m,f] / (1 + R[p,m])
  TOT[m]   = R[P,m] * R[P,m]
}"""


def test_a_prefix_sum_recurrence_is_differentiated_by_a_suffix_sum():
    """A recurrence ``R[p+1,m] = R[p,m] + step`` read at every step and at its last, from a
    parameter: each step's adjoint is the sum of R's over the later steps and the last
    (an iterative suffix sum over a reversed rank), the start's the sum over all.  Matches
    finite differences (the parameter's gradient too) and prints back as a spec."""
    defn = parse(RUNNING_SUM).definitions[0]
    for seed in range(3):
        errors = directional_errors(defn, seed)
        assert set(errors) == {"Q", "K", "V", "c"}
        assert max(errors.values()) < 1e-6, errors
    bw = backward(defn)
    assert any(st.tensor == "dR_suffix" and getattr(st, "iter_rank", None)
               for st in bw.statements)
    assert parse(print_module(Module((bw,)))) == Module((bw,))
    _same_gradients(defn, range(4), lo=0, hi=6)


@pytest.mark.parametrize("update, why", [
    ("R[p,m] * exp(S[p,m])", "not R\\[p, ...\\] plus a step"),
    ("R[p,m] + R[p,m] * exp(S[p,m])", "the step R adds depends on R"),
    ("max(R[p,m], S[p,m])", "running max or a rescaled state")])
def test_a_recurrence_that_is_not_a_prefix_sum_is_refused_with_the_reason(update, why):
    defn = parse(RUNNING_SUM.replace("R[p,m] + exp(S[p,m])", update)).definitions[0]
    with pytest.raises(NotDifferentiable, match=why):
        backward(defn)


def _filled_everywhere(defn, nonempty=frozenset()):
    """The backward with every sum of contributions filled (no presence proof): the
    reference the proven plain sums must equal."""
    import attnc.passes.backward as module

    original = module._Builder.same_presence, module._Builder.widened
    module._Builder.same_presence = lambda self, name, found: False
    module._Builder.widened = lambda self, name, found: False
    try:
        return backward(defn, None, nonempty)
    finally:
        module._Builder.same_presence, module._Builder.widened = original


def _same_gradients(defn, seeds, lo: int = 0, hi: int = 5, nonempty=frozenset()) -> None:
    """The proven cascade and the all-fills one agree exactly in presence (absent outputs
    are 0) and to rounding in value, on sizes that include 0 (but for ``nonempty``)."""
    from attnc.backends.check import random_sizes

    proven, filled = backward(defn, None, nonempty), _filled_everywhere(defn, nonempty)
    for seed in seeds:
        rng = np.random.default_rng(seed)
        sizes = random_sizes(defn, rng, lo, hi)
        sizes.update({r: max(1, sizes[r]) for r in nonempty if r in sizes})
        args, params = random_call(defn, rng, sizes)
        douts = [rng.standard_normal(o.shape)
                 for o in _tuple(interpret(defn, *args, **params))]
        for got, want, out in zip(_tuple(interpret(proven, *args, *douts, **params)),
                                  _tuple(interpret(filled, *args, *douts, **params)),
                                  proven.outputs):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12, err_msg=out.name)


@pytest.mark.parametrize("path", sorted(set(REFS) - ITERATIVE - set(REFUSED)))
def test_proven_plain_sums_equal_the_filled_sums_on_every_example(path):
    """Presence proofs (same statement, a shared ``where``, bounds shown by an indirect
    read) never change a gradient, empty ranks included."""
    if path in ITERATIVE:
        return  # (no backward: see above)
    _same_gradients(parse_file(EXAMPLES / path)[REFS[path].definition], range(4))


@settings(max_examples=15, deadline=None)
@given(attention_cascades())
def test_proven_plain_sums_equal_the_filled_sums_on_random_cascades(defn):
    _same_gradients(defn, range(3))


SEED_GAP = """
attention seed_gap(Q[P,E], K[M,E], V[M,F]) -> (O[P,F], T[P,F]) {
  S[p,m] = Q[p,e] * K[m,e]
  D[p]   = sum[m](S[p,m])
  X[p,m] = S[p,m] * D[p]
  O[p,f] = X[p,m] * V[m,f]   where D[p] > 0
  T[p,f] = S[p,m] * S[p,m] * V[m,f]
}"""


def test_an_adjoint_absent_where_its_tensor_is_present_keeps_the_fill():
    """dX is absent on rows with D <= 0 (O's where), while T's contribution to dS is not:
    a plain dS = dS_1 + dS_2 + dS_3 would lose T's part there.  The proof tracks where
    each adjoint is present (its seed), so the sum stays filled and exact."""
    defn = parse(SEED_GAP).definitions[0]
    _same_gradients(defn, range(6), lo=1, hi=6)
    assert max(directional_errors(defn, 2).values()) < 1e-5
    fills = [st.tensor for st in backward(defn).statements if not hasattr(st, "where")
             or type(st).__name__ == "IterativeEinsum"]
    assert any(f.startswith("dS_") for f in fills), fills


SEGMENTS = """
attention segments(Q[P,E], K[P,E], V[P,F]) -> O[P,F] {
  let L = 2
  let M = P
  S[p,m]  = Q[p,e] * K[m,e]   where m <= p and m >= p // L * L
  SN[p,m] = exp(S[p,m] - max[m](S[p,m]))
  AD[p,f] = SN[p,m] * V[m,f] / sum[m](SN[p,m])
  MN[p,f] = Q[p,e] * K[m,e] * V[m,f] * select(m < p // L * L, 1, 0)   where m MASK p
  O[p,f]  = AD[p,f] + MN[p,f]
}"""


@pytest.mark.parametrize("mask, plain", [("<=", True), ("<", False)])
def test_a_masked_sum_with_a_point_its_mask_always_admits_is_present(mask, plain):
    """Infini-attention's shape: the local softmax over ``p // L * L <= m <= p`` always has
    the key ``m = p`` (``p >= p // L * L`` is ``p % L >= 0``), and so does the memory sum
    over ``m <= p``: both are present at every row, so the scores' two contributions add
    plainly (no P x M fill).  With the memory over ``m < p``, row 0 sees no key: O, and
    with it the local part's adjoint, is absent there while AD is present, and the sum
    keeps its fill.  Either way the gradients equal the all-fills backward's (sizes from
    0, several segments)."""
    import attnc.passes.backward as module

    defn = parse(SEGMENTS.replace("MASK", mask)).definitions[0]
    _same_gradients(defn, range(6), lo=0, hi=7)

    def sn_filled():
        return any(st.tensor.startswith("dSN_") for st in backward(defn).statements
                   if type(st).__name__ == "IterativeEinsum")

    assert sn_filled() != plain
    original = module._Builder.witnessed_fiber
    module._Builder.witnessed_fiber = lambda *args: False
    try:
        assert sn_filled()  # the proof needs the witness
    finally:
        module._Builder.witnessed_fiber = original


def test_a_narrower_mask_over_reads_present_everywhere_is_widened_not_filled():
    """Selective attention's scores get the softmax's adjoint on ``m <= p`` and the
    recurrence's step adjoint on ``m < ps``; the latter reads only what is present
    everywhere (the suffix sum of a constant start, the scores), so it moves its mask into
    a ``select`` and takes ``m <= p``: a plain sum, no P x M fill.  The recurrence's
    states count as present everywhere (a constant start, carried) and the softmax's row
    max is a shift beside the recurrence.  The gradients equal the all-fills backward's on
    sizes from 0 (E >= 1, the rank the kernels assume); with the rule off the fill is back."""
    import attnc.passes.backward as module

    defn = parse_file(EXAMPLES / "selective.attn").definitions[0]
    assert shifts(canonicalize(defn)) == {"O_max"}

    def fills(bw):
        ones = {let.name for let in bw.lets if let.value == 1}
        return [st.tensor for st in bw.statements
                if type(st).__name__ == "IterativeEinsum" and st.iter_rank in ones]

    bw = backward(defn, None, frozenset({"E"}))
    assert not fills(bw), print_module(Module((bw,)))
    widened = next(st for st in bw.statements if st.tensor == "dS_2")
    assert "select" in repr(widened.expr) and "'<='" in repr(widened.where)
    _same_gradients(defn, range(6), lo=0, hi=6, nonempty=frozenset({"E"}))
    original = module._Builder.widened
    module._Builder.widened = lambda self, name, found: False
    try:
        assert set(fills(backward(defn, None, frozenset({"E"})))) == {"dS_1_filled", "dS_2_filled"}
    finally:
        module._Builder.widened = original


RELATIVE_TABLE = """
attention relative(Q[P,E], K[M,E], V[M,F], T[R], scale = 1/sqrt(E)) -> AV[P,F] {
  S[p,m]  = Q[p,e] * K[m,e] * scale + T[p - m + M - 1]   where m <= p + M - P
  GM[p]   = max[m](S[p,m])
  SN[p,m] = exp(S[p,m] - GM[p])
  AV[p,f] = SN[p,m] * V[M - 1 - m, f] / sum[m](SN[p,m])
}"""


def test_an_affine_read_is_differentiated_by_solving_its_subscript_not_by_a_filter():
    """A learned relative-position table T[p - m + M - 1] and a reversed V[M - 1 - m, f]:
    their gradients gather at the solved index (m = p + M - 1 - r) over one sum, instead
    of summing over (p, m) filtered by an equality; finite differences agree."""
    defn = parse(RELATIVE_TABLE).definitions[0]
    bw = backward(defn)
    for name in ("dT_1", "dV_1"):
        st = next(s for s in bw.statements if s.tensor == name)
        assert len(st.expr.ranks) == 1, print_module(Module((bw,)))
        assert "==" not in repr(st.where), st.where
    for seed in (0, 1):
        assert max(directional_errors(defn, seed).values()) < 1e-5
    _same_gradients(defn, range(3))


def test_an_output_over_let_sizes_has_an_adjoint_of_its_own_ranks(tmp_path):
    """varlen's O[B,P,H,F] is over sizes 'let' computes (B = C - 1, P = T): its adjoint
    argument dO gets ranks of its own (arguments bind sizes), read at O's indices.  The
    gradients match central differences on packed batches (the example's offsets), and
    the numpy module's NAME_backward runs them."""
    ref = REFS["varlen_prefill.attn"]
    defn = parse_file(EXAMPLES / "varlen_prefill.attn").definitions[0]
    bw = backward(defn)
    assert [a.ranks for a in bw.tensor_args if a.name == "dO"] == [("BX", "PX", "H", "F")]
    _, files = compile_module(parse_file(EXAMPLES / "varlen_prefill.attn"), "numpy", "vl",
                              backward=True)
    for name, text in files.items():
        write_atomic(tmp_path / name, text)
    mod = load_generated(tmp_path / "vl.py")
    for case in range(3):
        rng = np.random.default_rng(case)
        args, params = ref.make_inputs(rng, ref.sizes[case])
        dO = rng.standard_normal(interpret(defn, *args, **params).shape)
        grads = interpret(bw, *args, dO, **params)
        for i in range(3):  # Q, K, V
            v, eps = rng.standard_normal(args[i].shape), 1e-6
            plus, minus = list(args), list(args)
            plus[i], minus[i] = args[i] + eps * v, args[i] - eps * v
            fd = (np.sum(interpret(defn, *plus, **params) * dO)
                  - np.sum(interpret(defn, *minus, **params) * dO)) / (2 * eps)
            assert abs(np.sum(grads[i] * v) - fd) <= 1e-6 * max(abs(fd), 1e-3)
        got = mod.varlen_prefill_backward(*args, dO, **params)
        for g, r in zip(got, grads):
            np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-12)
