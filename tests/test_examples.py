"""Every spec under examples/ against its independent numpy reference (tests/example_refs.py).

The interpreter is the project's oracle; these tests are the oracle's oracle: each
example's meaning as the interpreter reads it must equal the textbook formula,
to 1e-10 relative error in float64, on ragged shapes and with broadcasting batch dims.
"""
from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest

from attnc.einsum_ir.interpreter import interpret
from attnc.frontends import parse, parse_file

from conftest import EXAMPLES as EXAMPLES_DIR
from conftest import all_examples
from example_refs import EXAMPLES, ExampleRef

RTOL = 1e-10
SIZE_CASES = [(path, k) for path, ref in EXAMPLES.items() for k in range(len(ref.sizes))]


@functools.lru_cache(maxsize=None)
def definition(path: str):
    ref = EXAMPLES[path]
    module = parse_file(EXAMPLES_DIR / path)
    return next(d for d in module.definitions if d.name == ref.definition)


def as_tuple(x) -> tuple[np.ndarray, ...]:
    return x if isinstance(x, tuple) else (x,)


def assert_close(actual, expected) -> None:
    """Same shapes, the same exact zeros (masked rows), and max error <= RTOL * max |expected|."""
    actual, expected = as_tuple(actual), as_tuple(expected)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape
        assert np.all(np.isfinite(a)), "non-finite values in the interpreter's result"
        np.testing.assert_array_equal(a == 0, e == 0, err_msg="zero pattern differs")
        bound = RTOL * np.max(np.abs(e), initial=0.0)
        assert np.max(np.abs(a - e), initial=0.0) <= bound, np.max(np.abs(a - e))


def batched_inputs(ref: ExampleRef, rng, sizes, batches: list[tuple[int, ...]]):
    """Argument i gets batch shape ``batches[i]`` (the last entry repeats), built by
    stacking independent draws of the example's own input factory."""
    draws = [ref.make_inputs(rng, sizes) for _ in range(max(int(np.prod(b)) for b in batches))]
    arrays = []
    for i in range(len(draws[0][0])):
        batch = batches[min(i, len(batches) - 1)]
        stacked = np.stack([d[0][i] for d in draws[: int(np.prod(batch))]])
        arrays.append(stacked.reshape(batch + stacked.shape[1:]))
    return arrays, draws[0][1]


def test_every_example_has_a_reference():
    on_disk = {p.relative_to(EXAMPLES_DIR).as_posix() for p in all_examples()}
    assert on_disk - set(EXAMPLES) == set(), "examples without an entry in tests/example_refs.py"
    assert set(EXAMPLES) - on_disk == set(), "registry entries without a spec file"


@pytest.mark.parametrize("path", sorted(EXAMPLES))
def test_example_declares_the_registered_definition(path):
    names = [d.name for d in parse_file(EXAMPLES_DIR / path).definitions]
    assert EXAMPLES[path].definition in names


@pytest.mark.parametrize("path,case", SIZE_CASES, ids=[f"{p}-{k}" for p, k in SIZE_CASES])
def test_example_matches_reference(path, case):
    ref = EXAMPLES[path]
    arrays, params = ref.make_inputs(np.random.default_rng(case), ref.sizes[case])
    expected = ref.reference(*arrays, **params)
    assert any(np.any(e != 0) for e in as_tuple(expected)), "a vacuous case: all outputs are 0"
    assert_close(interpret(definition(path), *arrays, **params), expected)


BATCH_PATTERNS = [[(2, 3), (1, 3), (3,)], [(3,), (2, 1, 1)]]


@pytest.mark.parametrize("path", sorted(EXAMPLES))
@pytest.mark.parametrize("batches", BATCH_PATTERNS, ids=["2x3-1x3-3", "3-2x1x1"])
def test_example_broadcasts_batch_dims(path, batches):
    ref = EXAMPLES[path]
    arrays, params = batched_inputs(ref, np.random.default_rng(7), ref.sizes[0], batches)
    expected = ref.reference(*arrays, **params)
    full = np.broadcast_shapes(*batches)
    assert as_tuple(expected)[0].shape[: len(full)] == full
    assert_close(interpret(definition(path), *arrays, **params), expected)


@pytest.mark.parametrize("M", [1, 37, 64, 65, 150])
def test_cascade4_equals_cascade5(M):
    rng = np.random.default_rng(M)
    Q, K, V = rng.standard_normal((4, 5)), rng.standard_normal((M, 5)), rng.standard_normal((M, 3))
    scale = 0.4
    three_pass = interpret(definition("fusemax/cascade4.attn"), Q, K, V, scale=scale)
    one_pass = interpret(definition("fusemax/cascade5.attn"), Q * scale, K, V)
    np.testing.assert_allclose(one_pass, three_pass, rtol=RTOL, atol=1e-14)


@pytest.mark.parametrize("P,M", [(5, 37), (40, 37), (3, 16)])
def test_causal_cascade5_equals_causal_cascade4(P, M):
    rng = np.random.default_rng(P * M)
    Q, K, V = rng.standard_normal((P, 4)), rng.standard_normal((M, 4)), rng.standard_normal((M, 2))
    three_pass = interpret(definition("causal.attn"), Q, K, V)
    one_pass = interpret(definition("fusemax/cascade5_causal.attn"), Q, K, V)
    np.testing.assert_allclose(one_pass, three_pass, rtol=RTOL, atol=1e-14)


def interpret_strictly(path: str, *arrays, **params):
    """Run with every numpy floating-point problem and every warning raised as an error."""
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        return interpret(definition(path), *arrays, **params)


def test_query_whose_document_has_no_keys_gives_exact_zero():
    rng = np.random.default_rng(0)
    Q, K, V = rng.standard_normal((4, 3)), rng.standard_normal((6, 3)), rng.standard_normal((6, 2))
    DQ = np.array([0, 0, 5, 1], dtype=np.int32)   # document 5 has no keys
    DK = np.array([0, 0, 0, 1, 1, 1], dtype=np.int32)
    out = interpret_strictly("document_mask.attn", Q, K, V, DQ, DK)
    assert np.all(out[2] == 0.0)
    assert np.all(out[[0, 1, 3]] != 0.0)
    assert_close(out, EXAMPLES["document_mask.attn"].reference(Q, K, V, DQ, DK))


@pytest.mark.parametrize("path", ["sliding_window.attn", "sinks_window.attn"])
def test_empty_window_gives_all_zero(path):
    rng = np.random.default_rng(1)
    Q, K, V = rng.standard_normal((5, 3)), rng.standard_normal((9, 3)), rng.standard_normal((9, 2))
    params = {"window": 0} | ({"sinks": 0} if path == "sinks_window.attn" else {})
    out = interpret_strictly(path, Q, K, V, **params)
    assert out.shape == (5, 2) and np.all(out == 0.0)


@pytest.mark.parametrize("path", ["causal.attn", "fusemax/cascade5_causal.attn", "lse.attn",
                                  "softmax1.attn", "linear_causal.attn", "sigmoid.attn"])
def test_queries_before_the_first_key_give_exact_zero(path):
    """P > M: queries 0 .. P-M-1 sit before position 0 and see no key at all."""
    rng = np.random.default_rng(2)
    Q, K, V = rng.standard_normal((7, 3)), rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    for out in as_tuple(interpret_strictly(path, Q, K, V)):
        assert np.all(out[:3] == 0.0)
        assert np.all(out[3:] != 0.0)


def test_bigbird_block_without_keys_gives_exact_zero():
    rng = np.random.default_rng(3)
    Q, K, V = rng.standard_normal((40, 2)), rng.standard_normal((20, 2)), rng.standard_normal((20, 2))
    BM = np.array([[1, 0], [0, 0], [0, 1]], dtype=bool)
    out = interpret_strictly("bigbird.attn", Q, K, V, BM)
    assert np.all(out[16:32] == 0.0)
    assert np.all(out[:16] != 0.0) and np.all(out[32:] != 0.0)
    assert_close(out, EXAMPLES["bigbird.attn"].reference(Q, K, V, BM))


POWER_SPEC = """
attention l2_norm(Q[P,E]) -> N[P] {
  N[p] = sqrt(sum[e](Q[p,e] ** 2))
}
"""


def test_power_operator_in_a_spec():
    """`**` binds tighter than `*` and is not split into two `*` (cosine.attn relies on it)."""
    Q = np.random.default_rng(4).standard_normal((3, 5))
    out = interpret(parse(POWER_SPEC).definitions[0], Q)
    np.testing.assert_allclose(out, np.linalg.norm(Q, axis=-1), rtol=RTOL)
