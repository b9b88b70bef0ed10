"""Launch recipes: a generated launcher records, for each class of arguments (shapes,
strides, dtypes, device, scalar parameters, variant knobs), the buffers it allocates and
the kernels it launches, and replays them on later calls of the class.

A replay must give what the slow path gives, on new values: the oracle is the interpreter
(or the dense un-paged reference for index tensors).  Triton runs under its CPU
interpreter, CUDA as host C++ (``ATTNC_CUDA_EMULATE=1``).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from attnc.backends import compile_module, load_generated, write_atomic  # noqa: E402
from attnc.backends.check import relative_error  # noqa: E402
from attnc.einsum_ir.interpreter import interpret  # noqa: E402
from attnc.frontends import parse, parse_file  # noqa: E402

from conftest import EXAMPLES  # noqa: E402
from example_refs import ref_paged_decode  # noqa: E402

CAUSAL = """
attention causal_softmax(Q[P,E], K[M,E], V[M,F], scale = 1/sqrt(E)) -> O[P,F] {
  S[p,m] = Q[p,e] * K[m,e] * scale  where m <= p
  O[p,f] = exp(S[p,m] - max[m](S[p,m])) * V[m,f] / sum[m](exp(S[p,m] - max[m](S[p,m])))
}
"""
BACKENDS = ("triton", "cuda")


def generated(backend, spec, tmp_path):
    """(module, definition, its function ``fn(*tensors, scale=...)``)."""
    module = parse_file(EXAMPLES / spec) if spec.endswith(".attn") else parse(spec, "spec.attn")
    defn = module.definitions[0]
    stem = f"{defn.name}_{backend}_recipes"
    _, files = compile_module(module, backend, stem, options={"tile": 16})
    for name, text in files.items():
        write_atomic(tmp_path / name, text)
    gen = load_generated(tmp_path / f"{stem}.py")
    gen._RECIPES.clear()
    if backend == "triton":  # the launcher itself: the op may be another module's
        launcher = getattr(gen, f"{defn.name}_launch")
        return gen, defn, lambda *args, scale: launcher(*args, scale, [])
    return gen, defn, getattr(gen, defn.name)


def launches(gen, monkeypatch) -> list[str]:
    """The kernels the slow path launches (a replay launches without ``_launch``)."""
    names, launch = [], gen._launch

    def spy(kernel, *args, **kwargs):
        names.append(getattr(getattr(kernel, "fn", kernel), "__name__", kernel))
        return launch(kernel, *args, **kwargs)
    monkeypatch.setattr(gen, "_launch", spy)
    return names


def run(fn, arrays, **params):
    xs = [torch.from_numpy(np.asarray(a, np.float32)) if a.dtype.kind == "f"
          else torch.from_numpy(a) for a in arrays]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*xs, **params)


def causal_inputs(rng, P, E=8, F=4):
    return [rng.standard_normal((P, E)), rng.standard_normal((P, E)), rng.standard_normal((P, F))]


def check_causal(defn, fn, arrays, scale):
    got = run(fn, arrays, scale=scale)
    want = interpret(defn, *arrays, scale=scale)
    assert relative_error(got.double().numpy(), want) < 1e-5
    return got


@pytest.mark.parametrize("backend_env", BACKENDS, indirect=True)
def test_calls_of_one_class_replay_the_first_ones_launches(backend_env, tmp_path, monkeypatch):
    gen, defn, fn = generated(backend_env, CAUSAL, tmp_path)
    names = launches(gen, monkeypatch)
    rng = np.random.default_rng(0)
    outs = [check_causal(defn, fn, causal_inputs(rng, 37), 0.3) for _ in range(3)]
    assert len(names) == 1 and len(gen._RECIPES) == 1  # launched once, then replayed
    assert len({o.data_ptr() for o in outs}) == 3       # each call its own output


@pytest.mark.parametrize("backend_env", BACKENDS, indirect=True)
def test_another_shape_stride_or_parameter_is_another_class(backend_env, tmp_path, monkeypatch):
    gen, defn, fn = generated(backend_env, CAUSAL, tmp_path)
    names = launches(gen, monkeypatch)
    rng = np.random.default_rng(1)
    check_causal(defn, fn, causal_inputs(rng, 37), 0.3)
    check_causal(defn, fn, causal_inputs(rng, 20), 0.3)           # another size
    check_causal(defn, fn, causal_inputs(rng, 20), -0.0)          # another parameter
    check_causal(defn, fn, causal_inputs(rng, 20), 0.0)           # -0.0 and 0.0 differ
    check_causal(defn, fn, causal_inputs(rng, 20), float("nan"))  # nan: a value of its own
    check_causal(defn, fn, causal_inputs(rng, 20), float("nan"))  # ... replayed
    assert len(names) == len(gen._RECIPES) == 5
    Q, K, V = causal_inputs(rng, 20)
    strided = torch.from_numpy(np.asarray(Q, np.float32)).t().contiguous().t()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = fn(strided, *[torch.from_numpy(np.asarray(x, np.float32)) for x in (K, V)],
                 scale=0.3)
    assert relative_error(got.numpy(), interpret(defn, Q, K, V, scale=0.3)) < 1e-5
    assert len(names) == len(gen._RECIPES) == 6                   # other strides


@pytest.mark.parametrize("backend_env", BACKENDS, indirect=True)
def test_one_tensor_passed_twice(backend_env, tmp_path, monkeypatch):
    """A recording call that passes Q as K is not recorded; a replay on Q as K is right."""
    gen, defn, fn = generated(backend_env, CAUSAL, tmp_path)
    names = launches(gen, monkeypatch)
    rng = np.random.default_rng(2)
    def twice():
        Q, _, V = causal_inputs(rng, 33)
        q, v = (torch.from_numpy(np.asarray(x, np.float32)) for x in (Q, V))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = fn(q, q, v, scale=0.5)
        assert relative_error(got.numpy(), interpret(defn, Q, Q, V, scale=0.5)) < 1e-5

    twice()
    assert len(gen._RECIPES) == 0
    check_causal(defn, fn, causal_inputs(rng, 33), 0.5)        # recorded
    twice()                                                      # replayed on Q as K
    assert len(names) == 2 and len(gen._RECIPES) == 1


@pytest.mark.parametrize("backend_env", BACKENDS, indirect=True)
def test_variant_knobs_are_part_of_the_class(backend_env, tmp_path, monkeypatch):
    """ATTNC_SPLIT read at the first call must not pin the variant of later calls."""
    gen, defn, fn = generated(backend_env, "gqa_decode.attn", tmp_path)
    names = launches(gen, monkeypatch)
    rng = np.random.default_rng(3)
    H, HK, P, M, E, F = 4, 2, 1, 150, 8, 4

    def call():
        arrays = [rng.standard_normal((H, P, E)), rng.standard_normal((HK, M, E)),
                  rng.standard_normal((HK, M, F))]
        got = run(fn, arrays, scale=0.4)
        want = interpret(defn, *arrays, scale=0.4)
        assert relative_error(got.double().numpy(), want) < 1e-5

    monkeypatch.setenv("ATTNC_SPLIT", "1")
    call(), call()
    streamed = list(names)
    monkeypatch.setenv("ATTNC_SPLIT", "3")
    call(), call()
    split = names[len(streamed):]
    assert len(streamed) == 1 and len(split) >= 2  # the split kernels and their combine
    assert len(gen._RECIPES) == 2


@pytest.mark.parametrize("backend_env", BACKENDS, indirect=True)
def test_index_tensors_are_read_by_the_kernels_not_the_recipe(backend_env, tmp_path, monkeypatch):
    """Paged decode: replays with other page tables and lengths (-1 pages, empty and full
    sequences) match the dense reference: nothing of a recipe depends on their values."""
    gen, defn, fn = generated(backend_env, "paged_decode.attn", tmp_path)
    names = launches(gen, monkeypatch)
    rng = np.random.default_rng(5)
    B, H, HK, E, F, NP, PG, NB = 3, 4, 2, 5, 3, 6, 16, 3
    for _ in range(3):
        table = rng.integers(-1, NP, (B, NB)).astype(np.int32)
        lengths = rng.integers(0, NB * PG + 1, B).astype(np.int32)
        lengths[rng.integers(B)] = 0
        arrays = [rng.standard_normal((B, H, E)), rng.standard_normal((NP, PG, HK, E)),
                  rng.standard_normal((NP, PG, HK, F)), table, lengths]
        got = run(fn, arrays, scale=0.7).double().numpy()
        want = ref_paged_decode(*arrays, scale=0.7)
        assert np.abs(got - want).max() <= 2e-5 * max(1.0, np.abs(want).max())
        np.testing.assert_array_equal(got == 0, want == 0)
    assert len(gen._RECIPES) == 1 and len(set(names)) == len(names)  # recorded once


@pytest.mark.parametrize("backend_env", BACKENDS, indirect=True)
def test_the_recipe_store_is_bounded(backend_env, tmp_path, monkeypatch):
    gen, defn, fn = generated(backend_env, CAUSAL, tmp_path)
    monkeypatch.setattr(gen, "_RECIPES_MAX", 2)
    rng = np.random.default_rng(6)
    for P in (17, 18, 19, 20, 17):
        check_causal(defn, fn, causal_inputs(rng, P), 0.3)
        assert 1 <= len(gen._RECIPES) <= 2


@pytest.mark.parametrize("backend_env", BACKENDS, indirect=True)
def test_calls_with_a_plan_are_not_recorded(backend_env, tmp_path):
    spec = """
attention doc_causal(Q[P,E], K[M,E], V[M,F], DQ[P]: i32, DK[M]: i32, scale = 1/sqrt(E)) -> O[P,F] {
  S[p,m] = Q[p,e] * K[m,e] * scale  where m <= p and DQ[p] == DK[m]
  O[p,f] = exp(S[p,m] - max[m](S[p,m])) * V[m,f] / sum[m](exp(S[p,m] - max[m](S[p,m])))
}
"""
    gen, defn, _ = generated(backend_env, spec, tmp_path)
    rng = np.random.default_rng(7)
    P = 40
    doc = np.sort(rng.integers(0, 3, P)).astype(np.int32)
    arrays = causal_inputs(rng, P) + [doc, doc]
    xs = [torch.from_numpy(np.asarray(a, np.float32)) if a.dtype.kind == "f"
          else torch.from_numpy(a) for a in arrays]
    f = getattr(gen, defn.name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = f.plan(*xs, scale=0.3)
        got = f(*xs, scale=0.3, plan=plan)
    assert relative_error(got.numpy(), interpret(defn, *arrays, scale=0.3)) < 1e-5
    assert len(gen._RECIPES) == 0
