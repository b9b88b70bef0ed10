"""Every element of every buffer a launcher allocates without a fill is written before it
is read, and every output element is stored: the generated modules' ``torch.empty`` is
replaced by one that fills NaN (floats) or the most negative integer, and every example
must still match the interpreter, on the first call (the launcher's slow path) and on a
replay of its recipe.  A kernel that skips a tile it was meant to zero, a combine that
reads a worker slot nobody wrote, or an output left to an allocator that happened to
return zeros, fails here (a fresh CPU allocation is often zeros: a plain run would pass).

Triton runs under its CPU interpreter, CUDA as host C++ (``ATTNC_CUDA_EMULATE=1``), at
small ragged sizes with a batch rank and tiles of 16 (several tiles per row).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from attnc.backends import compile_module, load_generated, write_atomic  # noqa: E402
from attnc.backends.check import random_call, random_sizes, relative_error  # noqa: E402
from attnc.einsum_ir.interpreter import interpret  # noqa: E402
from attnc.frontends import parse_file  # noqa: E402

from conftest import EXAMPLES, all_examples  # noqa: E402

EXAMPLE_IDS = [str(p.relative_to(EXAMPLES)) for p in all_examples()]


class PoisonedTorch:
    """``torch``, except that ``empty`` returns NaN (or the most negative integer)."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def empty(self, *shape, **kwargs):
        x = self._real.empty(*shape, **kwargs)
        if x.is_floating_point():
            return x.fill_(float("nan"))
        if x.dtype != self._real.bool:
            return x.fill_(self._real.iinfo(x.dtype).min)
        return x.fill_(True)


def poisoned_module(backend, rel, tmp_path):
    module = parse_file(EXAMPLES / rel)
    stem = f"{Path(rel).stem}_{backend}_poisoned"
    try:
        _, files = compile_module(module, backend, stem, options={"tile": 16})
    except Exception as err:  # a refusal is test_parity's business
        pytest.skip(f"{backend} refuses {rel}: {str(err).splitlines()[0]}")
    for name, text in files.items():
        write_atomic(tmp_path / name, text)
    gen = load_generated(tmp_path / f"{stem}.py")
    gen.torch = PoisonedTorch(torch)
    gen._RECIPES.clear()
    return module, gen


@pytest.mark.parametrize("rel", EXAMPLE_IDS)
@pytest.mark.parametrize("backend_env", ["triton", "cuda"], indirect=True)
def test_unwritten_buffers_are_never_read(backend_env, rel, tmp_path):
    module, gen = poisoned_module(backend_env, rel, tmp_path)
    rng = np.random.default_rng(11)
    for defn in module.definitions:
        fn = getattr(gen, defn.name)  # the op is this module's: its stem is unique
        sizes = random_sizes(defn, rng, 3, 20)
        for _ in range(2):  # the slow path, then the replay of its recipe
            args, params = random_call(defn, rng, sizes, (2,), (2,))
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")
                want = interpret(defn, *args, **params)
                got = fn(*[torch.from_numpy(np.asarray(a, np.float32)) if a.dtype.kind == "f"
                            else torch.from_numpy(a) for a in args], **params)
            want = want if isinstance(want, tuple) else (want,)
            got = got if isinstance(got, tuple) else (got,)
            for g, w in zip(got, want):
                g = g.double().numpy()
                assert np.array_equal(np.isnan(g), np.isnan(w)), f"{defn.name}: NaN where none is"
                assert relative_error(g, w) < 1e-5, defn.name


EMPTY = [("attention s(X[H,F]) -> O[F] {\n  O[f] = sum[h](X[h,f])\n}", [(0, 5)]),
         ("attention s(Q[P,E], K[M,E], V[M,F]) -> O[P,F] {\n  S[p,m] = Q[p,e] * K[m,e]\n"
          "  O[p,f] = exp(S[p,m] - max[m](S[p,m])) * V[m,f] / sum[m](exp(S[p,m] - max[m](S[p,m])))\n}",
          [(3, 4), (0, 4), (0, 5)])]


@pytest.mark.parametrize("spec,shapes", EMPTY, ids=["empty-grid", "no-keys"])
@pytest.mark.parametrize("backend_env", ["triton", "cuda"], indirect=True)
def test_outputs_of_empty_loops_and_grids_are_zeros(backend_env, spec, shapes, tmp_path):
    """A sum over no heads and attention over no keys: the kernels loop over no tile and
    store every output element as 0, nothing is left to the allocator."""
    from attnc.frontends import parse

    module = parse(spec, "empty.attn")
    _, files = compile_module(module, backend_env, f"empty_{backend_env}_{len(shapes)}",
                              options={"tile": 16})
    for name, text in files.items():
        write_atomic(tmp_path / name, text)
    gen = load_generated(tmp_path / f"empty_{backend_env}_{len(shapes)}.py")
    gen.torch = PoisonedTorch(torch)
    for _ in range(2):
        got = gen.s(*[torch.randn(s) for s in shapes])
        assert torch.equal(got, torch.zeros_like(got)), got
