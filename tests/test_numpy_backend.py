"""The numpy backend: every example against the interpreter, validation, golden code."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from attnc.backends import load_generated, write_atomic
from attnc.backends.check import check_definition
from attnc.backends.numpy_backend import render_module
from attnc.einsum_ir.interpreter import interpret
from attnc.frontends import parse, parse_file

from conftest import EXAMPLES, all_examples

EXAMPLE_IDS = [str(p.relative_to(EXAMPLES)) for p in all_examples()]


def compile_text(src: str, tmp_path: Path, stem: str = "spec"):
    module = parse(src, f"{stem}.attn")
    path = tmp_path / f"{stem}.py"
    write_atomic(path, render_module(module, f"{stem}.attn"))
    return module, load_generated(path)


def compile_example(rel: str, tmp_path: Path):
    module = parse_file(EXAMPLES / rel)
    stem = Path(rel).stem
    path = tmp_path / f"{stem}.py"
    write_atomic(path, render_module(module, f"{stem}.attn"))
    return module, load_generated(path)


@pytest.mark.parametrize("rel", EXAMPLE_IDS)
def test_example_matches_interpreter(rel, tmp_path):
    module, gen = compile_example(rel, tmp_path)
    for defn in module.definitions:
        rows = check_definition(defn, getattr(gen, defn.name), seed=3)
        bad = [r for r in rows if not r.ok]
        assert not bad, bad


@pytest.mark.parametrize("rel", EXAMPLE_IDS)
def test_generated_code_golden(rel, golden):
    module = parse_file(EXAMPLES / rel)
    golden(render_module(module, Path(rel).name, include_runtime=False))


def test_generated_module_is_deterministic_and_needs_only_numpy(tmp_path):
    src = (EXAMPLES / "causal.attn").read_text()
    a = render_module(parse(src, "causal.attn"), "causal.attn")
    b = render_module(parse(src, "causal.attn"), "causal.attn")
    assert a == b
    imports = [ln for ln in a.splitlines() if ln.startswith(("import ", "from "))]
    assert imports == ["from fractions import Fraction", "import numpy as np"]


CAUSAL = """
attention causal(Q[P,E], K[M,E], V[M,F], scale = 1/sqrt(E)) -> AV[P,F] {
  QK[p,m] = Q[p,e] * K[m,e] * scale      where m <= p + M - P
  GM[p]   = max[m](QK[p,m])
  SN[p,m] = exp(QK[p,m] - GM[p])
  SD[p]   = sum[m](SN[p,m])
  AV[p,f] = SN[p,m] * V[m,f] / SD[p]
}
"""


def test_fully_masked_rows_are_zero_without_warnings(tmp_path):
    _, gen = compile_text(CAUSAL, tmp_path)
    rng = np.random.default_rng(0)
    # P > M: the first P - M queries see no key at all.
    Q, K, V = rng.standard_normal((6, 4)), rng.standard_normal((3, 4)), rng.standard_normal((3, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = gen.causal(Q, K, V)
    assert np.all(out[:3] == 0.0) and np.all(np.isfinite(out))
    assert np.abs(out[3:]).sum() > 0
    np.testing.assert_allclose(out, interpret(parse(CAUSAL).definitions[0], Q, K, V), rtol=1e-12)


INF_BESIDE_ABSENT = """
attention t(A[P,M], B[M,F]) -> O[P,F] {
  X[p,m] = A[p,m]   where m <= p
  O[p,f] = X[p,m] * B[m,f]
}
"""


def test_infinite_values_meet_absent_points_as_the_contract_says(tmp_path):
    """A contraction zeroes absent factors (fast einsum) only when every present value is
    finite: an inf where the point is absent is harmless (it is never read), an inf in a
    present factor at another factor's absent point is left out, not 0 * inf = NaN."""
    module, gen = compile_text(INF_BESIDE_ABSENT, tmp_path)
    rng = np.random.default_rng(1)
    A, B = rng.standard_normal((5, 5)), rng.standard_normal((5, 3))
    A[np.triu_indices(5, 1)] = np.inf      # absent points of X: never read
    want = interpret(module.definitions[0], A, B)
    assert np.isfinite(want).all()
    np.testing.assert_allclose(gen.t(A, B), want, rtol=1e-12)
    B[4] = np.inf                          # present, met only by row 4's present X[4,4]
    want = interpret(module.definitions[0], A, B)
    assert np.isfinite(want[:4]).all() and np.isinf(want[4]).all()
    np.testing.assert_array_equal(gen.t(A, B), want)


def test_batch_dims_broadcast_and_dtypes(tmp_path):
    _, gen = compile_text(CAUSAL, tmp_path)
    rng = np.random.default_rng(1)
    Q = rng.standard_normal((2, 1, 5, 4)).astype(np.float32)
    K = rng.standard_normal((3, 7, 4)).astype(np.float32)
    V = rng.standard_normal((7, 2))
    out = gen.causal(Q, K, V)
    assert out.shape == (2, 3, 5, 2)
    assert out.dtype == np.float32  # the first floating-point tensor passed
    ref = interpret(parse(CAUSAL).definitions[0], Q, K, V)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    half = gen.causal(Q.astype(np.float16), K, V)
    assert half.dtype == np.float16


def test_declared_output_dtype(tmp_path):
    src = CAUSAL.replace("-> AV[P,F]", "-> AV[P,F]: f32")
    _, gen = compile_text(src, tmp_path)
    x = np.ones((2, 3))
    assert gen.causal(x, x, x).dtype == np.float32


@pytest.mark.parametrize("call, message", [
    (lambda f, r: f(r((5, 4)), r((7, 3)), r((7, 2))), "argument 'K': rank E has size 3"),
    (lambda f, r: f(r((4,)), r((7, 4)), r((7, 2))), "argument 'Q' needs at least 2 dims"),
    (lambda f, r: f(r((2, 5, 4)), r((3, 7, 4)), r((7, 2))), "argument 'K': leading dims"),
    (lambda f, r: f(r((5, 4)) + 1j, r((7, 4)), r((7, 2))), "argument 'Q': dtype complex128"),
    (lambda f, r: f(r((5, 4)), r((7, 4)), r((6, 2))), "argument 'V': rank M has size 6"),
])
def test_input_validation_names_the_argument(tmp_path, call, message):
    _, gen = compile_text(CAUSAL, tmp_path)
    rng = np.random.default_rng(2)
    with pytest.raises(ValueError, match=message):
        call(gen.causal, rng.standard_normal)


def test_parameters_are_keyword_only_with_defaults(tmp_path):
    _, gen = compile_text(CAUSAL, tmp_path)
    rng = np.random.default_rng(3)
    Q, K, V = rng.standard_normal((3, 4)), rng.standard_normal((5, 4)), rng.standard_normal((5, 2))
    with pytest.raises(TypeError):
        gen.causal(Q, K, V, 0.5)
    d = parse(CAUSAL).definitions[0]
    np.testing.assert_allclose(gen.causal(Q, K, V, scale=0.5), interpret(d, Q, K, V, scale=0.5))
    np.testing.assert_allclose(gen.causal(Q, K, V), interpret(d, Q, K, V, scale=0.5 ** 1))


def test_required_parameter_and_let_divisibility(tmp_path):
    src = """
attention gqa(Q[H,P,E], K[HK,M,E], V[HK,M,F], cap) -> AV[H,P,F] {
  let G = H / HK
  S[h,p,m] = cap * tanh(Q[h,p,e] * K[h // G, m, e] / cap)
  AV[h,p,f] = exp(S[h,p,m]) * V[h // G, m, f]
}
"""
    _, gen = compile_text(src, tmp_path)
    rng = np.random.default_rng(4)
    Q, K, V = rng.standard_normal((6, 2, 3)), rng.standard_normal((4, 5, 3)), rng.standard_normal((4, 5, 2))
    with pytest.raises(TypeError, match="cap"):
        gen.gqa(Q, K, V)
    with pytest.raises(ValueError, match="let G = H/HK does not divide exactly"):
        gen.gqa(Q, K, V, cap=30.0)
    K2, V2 = K[:3], V[:3]
    d = parse(src).definitions[0]
    np.testing.assert_allclose(gen.gqa(Q, K2, V2, cap=30.0), interpret(d, Q, K2, V2, cap=30.0),
                               rtol=1e-12)


def test_declared_integer_and_bool_inputs(tmp_path):
    src = """
attention doc(Q[P,E], K[M,E], DQ[P]: i32, DK[M]: i32, B[P,M]: bool) -> O[P,E] {
  O[p,e] = K[m,e] * exp(Q[p,d] * K[m,d])   where DQ[p] == DK[m] and B[p,m]
}
"""
    with pytest.raises(Exception):
        parse(src)  # 'd' belongs to no rank
    src = src.replace("Q[p,d] * K[m,d]", "Q[p,e] * K[m,e]")
    module, gen = compile_text(src, tmp_path)
    rng = np.random.default_rng(5)
    Q, K = rng.standard_normal((4, 3)), rng.standard_normal((6, 3))
    DQ, DK = rng.integers(0, 2, 4).astype(np.int32), rng.integers(0, 2, 6).astype(np.int32)
    B = rng.random((4, 6)) < 0.5
    with pytest.raises(ValueError, match="argument 'DQ': declared i32"):
        gen.doc(Q, K, DQ.astype(float), DK, B)
    np.testing.assert_allclose(gen.doc(Q, K, DQ, DK, B),
                               interpret(module.definitions[0], Q, K, DQ, DK, B), rtol=1e-12)


def test_iterative_rank_and_zero_size(tmp_path):
    src = """
attention running(X[I,P]) -> (LAST[P], ALL[I,P]) {
  R[0,p] = 0
  R[i+1,p] = R[i,p] + X[i,p]   where X[i,p] > 0
  C[i,p] = R[i+1,p] * 2
  LAST[p] = R[I,p]
  ALL[i,p] = C[i,p]
}
"""
    module, gen = compile_text(src, tmp_path)
    rng = np.random.default_rng(6)
    X = rng.standard_normal((2, 7, 3))
    last, allc = gen.running(X)
    np.testing.assert_allclose(last, np.where(X > 0, X, 0).sum(axis=1))
    np.testing.assert_allclose(allc, 2 * np.cumsum(np.where(X > 0, X, 0), axis=1))
    last0, all0 = gen.running(np.zeros((0, 3)))
    assert last0.shape == (3,) and np.all(last0 == 0) and all0.shape == (0, 3)


def test_write_atomic_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "out.py"
    write_atomic(path, "old\n")
    import os

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_atomic(path, "new\n")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.py"]


@pytest.mark.parametrize("rel", ["bigbird.attn", "document_mask.attn"])
def test_data_dependent_masks_get_a_block_mask(rel, tmp_path):
    """A data-dependent where is probed per tile: only rows with a visible key are computed."""
    from attnc.backends import compile_module

    module = parse_file(EXAMPLES / rel)
    _, files = compile_module(module, "numpy", Path(rel).stem, options={"tile": 4})
    code = files[f"{Path(rel).stem}.py"]
    assert "# block mask: rows of this tile where" in code and "_rows_live(" in code
    path = tmp_path / f"{Path(rel).stem}.py"
    write_atomic(path, code)
    gen = load_generated(path)
    for defn in module.definitions:
        assert all(r.ok for r in check_definition(defn, getattr(gen, defn.name), seed=8))
