"""Plans: a block mask made once (``NAME.plan(...)``, FlexAttention's ``create_block_mask``,
FlashInfer's ``plan``) and read by later calls (``NAME(..., plan=p)``) instead of probing
the data-dependent ``where`` conditions on every tile.

On Triton (its CPU interpreter) and CUDA (host emulation).  The oracle is the interpreter
(``attnc check``'s shapes: ragged, broadcast batches, tiles of 16 so loops run several
tiles) and the same function without a plan, which must agree bitwise: a plan skips only tiles the probes would skip, and runs the others in the same
order.  Every example whose kernels probe a mask per tile, under the streamed, split-K and
stream-K launches; random attention variants with document masks; reuse across calls; a
stale plan (other sizes, other mask values, another window) raises instead of giving a
wrong result; ``torch.compile(dynamic=True, fullgraph=True)`` takes a plan.
"""
from __future__ import annotations

import os
import shutil
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import attnc  # noqa: E402
from attnc.backends.check import (INTERPRETED_GRID_POINTS, check_definition,  # noqa: E402
                                  torch_caller)
from attnc.frontends import parse, parse_file  # noqa: E402

from conftest import EXAMPLES  # noqa: E402
from test_parity import attention_specs  # noqa: E402

# every example whose Triton kernels probe a data-dependent mask per tile, and one whose
# float window bounds its full tiles from their corners (nothing left to probe)
PROBED = ("bigbird", "document_mask", "key_padding", "sliding_window", "paged_decode",
          "paged_prefill", "varlen_prefill")
# attnc check's shapes, smaller: each grid point is a Python loop in the interpreter
GRID_POINTS = INTERPRETED_GRID_POINTS // 5
# its where is affine (a window over a float parameter; a sequence's length L[b] or offsets
# CU[b], CU[b + 1], one value per program): the plan holds no block mask
AFFINE = ("sliding_window", "paged_decode", "paged_prefill", "varlen_prefill")
LAUNCHES = {"streamed": {}, "split-K": {"ATTNC_SPLIT": "3"}, "stream-K": {"ATTNC_STREAM_K": "5"}}


BACKENDS = ("triton", "cuda")


@pytest.fixture(autouse=True)
def _on_cpu(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("ATTNC_CUDA_EMULATE", "1")
    monkeypatch.delenv("ATTNC_SPLIT", raising=False)
    monkeypatch.delenv("ATTNC_STREAM_K", raising=False)


def _module(spec: str, backend: str = "triton"):
    if backend == "cuda" and not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("no C++ compiler for the CUDA host emulation")
    return attnc.compile(str(EXAMPLES / f"{spec}.attn") if "{" not in spec else spec,
                         backend=backend, tile=16)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # the interpreter computes masked lanes too
        return fn(*args, **kwargs)


def _check_planned(defn, fn) -> None:
    rows = check_definition(defn, torch_caller(fn, "cpu", planned=True), 0, 1e-4, GRID_POINTS)
    bad = [r for r in rows if not r.ok]
    assert not bad, f"{defn.name} with a plan: {bad}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", PROBED)
def test_every_probed_example_matches_the_interpreter_through_a_plan(spec, backend):
    mod = _module(spec, backend)
    for defn in parse_file(EXAMPLES / f"{spec}.attn").definitions:
        fn = getattr(mod, defn.name)
        q = _quiet(fn.plan, *_example_inputs(defn))
        if spec in AFFINE:
            assert q.live_fraction is None  # tile ranges from the window: nothing to probe
        else:
            assert q.live_fraction is not None, f"{spec}: a plan holds no mask, though its kernels probe one"
        _check_planned(defn, fn)


def _example_inputs(defn):
    """One call's arguments (``attnc check``'s random inputs, as torch tensors)."""
    from attnc.backends.check import bounded_sizes, random_call

    rng = np.random.default_rng(5)
    sizes = bounded_sizes(defn, rng, 20, 40, 1, INTERPRETED_GRID_POINTS)
    args, _ = random_call(defn, rng, sizes)
    return [torch.from_numpy(np.asarray(a, np.float32) if np.asarray(a).dtype.kind == "f"
                             else np.asarray(a)) for a in args]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("launch", LAUNCHES)
def test_split_and_stream_k_workers_read_their_plan(launch, backend, monkeypatch):
    for k, v in LAUNCHES[launch].items():
        monkeypatch.setenv(k, v)
    for spec in ("document_mask", "key_padding"):
        mod = _module(spec, backend)
        defn = parse_file(EXAMPLES / f"{spec}.attn").definitions[0]
        _check_planned(defn, getattr(mod, defn.name))


def _documents(M: int, P: int, docs: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    dk = torch.sort(torch.randint(0, docs, (M,), generator=g, dtype=torch.int32)).values
    return dk[M - P:].clone(), dk


def _qkv(P, M, E=16, F=8, batch=(2,), seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*batch, P, E, generator=g), torch.randn(*batch, M, E, generator=g),
            torch.randn(*batch, M, F, generator=g))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("launch", LAUNCHES)
def test_a_sparse_plan_skips_tiles_and_agrees_bitwise(launch, backend, monkeypatch):
    """Sorted document ids: most (row block, key tile) pairs are dead; the plan says so,
    and the planned call equals the probed one bit for bit, for two calls with other
    queries, keys and values under one plan, under every launch (a split-K worker's tile
    ``mt`` is tile ``w*MT + mt`` of the keys: it probes, and plans, like the others)."""
    for k, v in LAUNCHES[launch].items():
        monkeypatch.setenv(k, v)
    mod = _module("document_mask", backend)
    f = mod.document_mask
    P, M = 70, 90
    dq, dk = _documents(M, P, 6, seed=1)
    plan = _quiet(f.plan, *_qkv(P, M), dq, dk)
    assert plan.live_fraction is not None and plan.live_fraction < 0.7, plan
    assert "tiles live" in repr(plan)
    for seed in (0, 1):
        q, k, v = _qkv(P, M, seed=seed)
        want = _quiet(f, q, k, v, dq, dk)
        got = _quiet(f, q, k, v, dq, dk, plan=plan)
        assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_row_block_with_no_live_tile_gives_absent_rows(backend):
    """Queries of a document no key belongs to: their row blocks' spans are empty, and
    their outputs are 0 (absent), as without a plan."""
    mod = _module("document_mask", backend)
    f = mod.document_mask
    P, M = 40, 40
    dk = torch.zeros(M, dtype=torch.int32)
    dq = torch.full((P,), 7, dtype=torch.int32)
    dq[:5] = 0
    q, k, v = _qkv(P, M)
    plan = _quiet(f.plan, q, k, v, dq, dk)
    got = _quiet(f, q, k, v, dq, dk, plan=plan)
    assert torch.equal(got, _quiet(f, q, k, v, dq, dk))
    assert torch.all(got[:, 5:] == 0) and torch.all(got[:, :5].abs().sum(-1) > 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stale_plan_raises_and_a_new_one_is_exact(backend):
    mod = _module("document_mask", backend)
    f = mod.document_mask
    P, M = 30, 50
    dq, dk = _documents(M, P, 4, seed=2)
    q, k, v = _qkv(P, M)
    plan = _quiet(f.plan, q, k, v, dq, dk)
    other = dk.clone()
    other[3] += 1
    with pytest.raises(ValueError, match="argument 'DK' differs"):
        f(q, k, v, dq, other, plan=plan)
    with pytest.raises(ValueError, match="argument 'plan' was made for shapes"):
        f(q[:, :20], k, v, dq[:20], dk, plan=plan)
    dk[3] += 1  # in place: the same tensor, other values
    with pytest.raises(ValueError, match="argument 'DK' differs"):
        f(q, k, v, dq, dk, plan=plan)
    dk[3] -= 1  # the values it was made with, under a newer version: accepted
    want = _quiet(f, q, k, v, dq, dk)
    assert torch.equal(_quiet(f, q, k, v, dq, dk.clone(), plan=plan), want)
    fresh = _quiet(f.plan, q, k, v, dq, other)
    assert torch.equal(_quiet(f, q, k, v, dq, other, plan=fresh), _quiet(f, q, k, v, dq, other))


LEVELLED = """
attention levelled(Q[P,E], K[M,E], V[M,F], KL[M]: i32, level = 2.0) -> AV[P,F] {
  S[p,m]  = Q[p,e] * K[m,e]   where KL[m] < level
  AV[p,f] = exp(S[p,m] - max[m](S[p,m])) * V[m,f] / sum[m](exp(S[p,m] - max[m](S[p,m])))
}
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_plan_over_a_parameter_is_tied_to_its_value(backend):
    """A probe that reads a parameter (keys whose level is under ``level``): a plan made
    for one level refuses another."""
    f = _module(LEVELLED, backend).levelled
    q, k, v = _qkv(40, 40)
    kl = torch.from_numpy(np.random.default_rng(2).integers(0, 5, 40).astype(np.int32))
    plan = _quiet(f.plan, q, k, v, kl, level=2.5)
    assert plan.live_fraction is not None
    assert torch.equal(_quiet(f, q, k, v, kl, level=2.5, plan=plan),
                       _quiet(f, q, k, v, kl, level=2.5))
    with pytest.raises(ValueError, match="made with level = 2.5"):
        f(q, k, v, kl, level=1.5, plan=plan)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_definition_without_probes_plans_nothing_and_checks_sizes(backend):
    mod = _module("causal", backend)
    f = mod.causal_softmax
    q, k, v = _qkv(20, 20)
    plan = _quiet(f.plan, q, k, v)
    assert plan.tensors == [] and plan.live_fraction is None
    assert torch.equal(_quiet(f, q, k, v, plan=plan), _quiet(f, q, k, v))
    with pytest.raises(ValueError, match="was made for"):
        f(q[:, :3], k, v, plan=plan)
    with pytest.raises(ValueError, match="made for causal_softmax"):
        other = _module("document_mask", backend).document_mask
        dq, dk = _documents(20, 20, 2, 0)
        other(q, k, v, dq, dk, plan=plan)


def test_torch_compile_takes_a_plan():
    mod = _module("document_mask")
    f = mod.document_mask
    P, M = 33, 47
    dq, dk = _documents(M, P, 3, seed=3)
    q, k, v = _qkv(P, M)
    plan = _quiet(f.plan, q, k, v, dq, dk)
    fast = torch.compile(f, dynamic=True, fullgraph=True)
    assert torch.equal(_quiet(fast, q, k, v, dq, dk, plan=plan), _quiet(f, q, k, v, dq, dk))


@settings(max_examples=3, deadline=None, derandomize=True,
          phases=(Phase.explicit, Phase.reuse, Phase.generate),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(text=attention_specs().filter(lambda t: "DQ[p] == DK[m]" in t))
def test_random_document_masked_variants_match_through_a_plan(text):
    defn = parse(text, "rand.attn").definitions[0]
    mod = attnc.compile(text, backend="triton", tile=16)
    _check_planned(defn, getattr(mod, defn.name))


@pytest.mark.parametrize("backend", BACKENDS)
def test_plans_are_documented_in_the_module(backend):
    mod = _module("document_mask", backend)
    assert mod.document_mask.plan is mod.document_mask_plan
    assert "DQ, DK" in mod.document_mask_plan.__doc__
    assert os.path.isfile(mod.__file__)


def test_a_differentiable_module_keeps_its_plan():
    """``grad=True`` wraps the function in autograd: calls without gradients still read
    the plan; a training call runs the forward that saves statistics (no plan)."""
    mod = attnc.compile(str(EXAMPLES / "document_mask.attn"), backend="triton", tile=16, grad=True)
    f = mod.document_mask
    P, M = 30, 40
    dq, dk = _documents(M, P, 3, seed=4)
    q, k, v = _qkv(P, M)
    plan = _quiet(f.plan, q, k, v, dq, dk)
    want = _quiet(f, q, k, v, dq, dk)
    assert torch.equal(_quiet(f, q, k, v, dq, dk, plan=plan), want)
    q.requires_grad_()
    out = _quiet(f, q, k, v, dq, dk, plan=plan)
    out.square().sum().backward()
    assert torch.allclose(out, want, atol=1e-6) and q.grad is not None


def test_attnc_check_plan_runs_every_call_through_a_plan(capsys):
    from attnc.frontends.cli import main

    assert main(["check", str(EXAMPLES / "key_padding.attn"), "--backend", "cuda", "--plan",
                 "--tile", "16"]) == 0
    assert "ok" in capsys.readouterr().out
    assert main(["check", str(EXAMPLES / "key_padding.attn"), "--plan"]) == 2
    assert "numpy" in capsys.readouterr().err
