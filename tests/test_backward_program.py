"""The backward as kernels: shift invariance, presence-proven sums, the staged backward
program (passes/backward_program.py), NAME_backward on every backend and torch autograd.

The oracle is the interpreter running the derived backward cascade (itself checked against
finite differences in test_backward.py)."""
from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings

from attnc.backends import compile_module, load_generated, write_atomic
from attnc.backends.check import bounded_sizes, random_call
from attnc.einsum_ir import ir
from attnc.einsum_ir.interpreter import interpret
from attnc.einsum_ir.ir import Einsum
from attnc.frontends import parse, parse_file
from attnc.passes.backward import backward
from attnc.passes.backward_program import backward_program
from attnc.passes.canonicalize import canonicalize
from attnc.passes.shift_invariance import is_shift, shifts
from attnc.passes.tile import NotTileable

from conftest import EXAMPLES
from strategies import attention_cascades


def _tuple(x):
    return x if isinstance(x, tuple) else (x,)


def _example(name):
    return parse_file(EXAMPLES / name).definitions[0]


# --- shift invariance --------------------------------------------------------------------------


def test_softmax_row_max_is_a_shift_and_a_returned_or_unnormalised_max_is_not():
    assert shifts(canonicalize(_example("causal.attn"))) == {"GM"}
    assert shifts(canonicalize(_example("lse.attn"))) == {"GM"}  # LSE = GM + log(SD)
    assert shifts(canonicalize(_example("sink_logit.attn"))) == {"MX"}
    # softpick's eps in the denominator does not scale with exp(-MX)
    assert shifts(canonicalize(_example("softpick.attn"))) == frozenset()
    unnormalised = parse("""
attention f(Q[P,E], K[M,E]) -> O[P] {
  S[p,m] = Q[p,e] * K[m,e]
  GM[p] = max[m](S[p,m])
  O[p] = sum[m](exp(S[p,m] - GM[p]))
}""").definitions[0]
    assert not is_shift(canonicalize(unnormalised), "GM")
    summed_over_rows = parse("""
attention f(Q[P,E], K[M,E], V[M,F]) -> O[F] {
  S[p,m] = Q[p,e] * K[m,e]
  GM[p] = max[m](S[p,m])
  O[f] = sum[p,m](exp(S[p,m] - GM[p]) * V[m,f]) / sum[p,m](exp(S[p,m] - GM[p]))
}""").definitions[0]
    # the factor exp(-c[p]) differs between the terms of a sum over p
    assert not is_shift(canonicalize(summed_over_rows), "GM")


def test_a_shift_has_no_adjoint_statements():
    bw = backward(_example("causal.attn"))
    names = {st.tensor for st in bw.statements}
    assert not any(n.startswith(("dGM", "GM_at")) for n in names)


# --- sums of contributions without fills --------------------------------------------------------


def test_contributions_present_wherever_their_tensor_is_add_without_fills():
    bw = backward(_example("causal.attn"))
    assert all(isinstance(st, Einsum) for st in bw.statements)
    assert any(st.tensor == "dSN" for st in bw.statements)


def test_presence_follows_reads_wheres_and_fibers():
    """differential's dSN1 has a contribution from A[p,m] = SN1/SD1 - lam * SN2/SD2, which
    reads SN2 and SD2: present wherever SN1 is (the same mask on QK2, GM2's fiber holds the
    point, SD2 sums SN2); softmax_1's SD adds exp(-GM), read by SN itself."""
    for name in ("differential.attn", "softmax1.attn", "sink_logit.attn"):
        bw = backward(_example(name))
        filled = {st.tensor for st in bw.statements if not isinstance(st, Einsum)}
        assert not any(f.startswith(("dSN", "dN", "dA")) for f in filled), (name, filled)


def test_lse_keeps_fills_and_stays_exact_when_the_value_dim_is_empty():
    """AV is empty when F = 0 but LSE is not: SN's contribution through AV is absent there,
    so it is filled with 0 before the sum (a plain '+' would drop LSE's)."""
    d = _example("lse.attn")
    bw = backward(d)
    assert any(not isinstance(st, Einsum) for st in bw.statements)
    rng = np.random.default_rng(3)
    Q, K, V = rng.standard_normal((4, 3)), rng.standard_normal((6, 3)), np.zeros((6, 0))
    dAV, dLSE = np.zeros((4, 0)), rng.standard_normal(4)
    dQ = interpret(bw, Q, K, V, dAV, dLSE)[0]
    assert np.abs(dQ).max() > 0  # LSE's gradient survives
    eps, v = 1e-6, rng.standard_normal(Q.shape)
    plus = interpret(d, Q + eps * v, K, V)[1]
    minus = interpret(d, Q - eps * v, K, V)[1]
    assert np.sum(dQ * v) == pytest.approx(np.sum((plus - minus) / (2 * eps) * dLSE), rel=1e-5)


# --- the staged program -------------------------------------------------------------------------


def test_causal_backward_program_streams_once_per_stage():
    bp = backward_program(_example("causal.attn"), "triton")
    outs = [tuple(o.name for o in s.outputs) for s in bp.stages]
    assert outs[0] == ("GM", "SD")            # the forward's row statistics, one pass
    assert ("dSD_1", "dQ") in outs            # the row term and dQ: one query-major pass
    assert ("dK", "dV") in outs               # one key-major kernel for both
    assert set(bp.saved) == {"GM", "SD", "dSD_1"}
    assert len(bp.stages) == 4                # and dscale's own (a scalar over all rows)


def test_gqa_key_and_value_gradients_are_per_head_then_summed_per_group():
    bp = backward_program(_example("gqa_decode.attn"), "triton")
    outs = [o.name for s in bp.stages for o in s.outputs]
    assert {"dK_1_heads", "dV_1_heads", "dK", "dV"} <= set(outs)


def test_a_state_reduced_over_blocked_rows_is_not_one_kernel():
    """Programs own disjoint row blocks: a scalar summed over the rows cannot be one of
    their states (it would be written by each program; a race found in the backward)."""
    stage = parse("""
attention s(Q[P,E], K[M,E]) -> (dK[M,E], T) {
  S[p,m] = exp(Q[p,e] * K[m,e])
  dK[m,e] = sum[p](S[p,m] * Q[p,e])
  T = sum[p,m](S[p,m])
}""").definitions[0]
    from attnc.passes.backward_program import lowers
    assert "row rank" in (lowers(stage, "triton") or "")


def _check_module(mod, d, backend, seeds=(0, 1), high=40, heads=None):
    """``heads``: (low, high) for the float arguments' innermost ranks (the head dims),
    the others drawn small."""
    bw = backward(d)
    for seed in seeds:
        rng = np.random.default_rng(seed)
        sizes = bounded_sizes(d, rng, 1, high)
        if heads is not None:
            inner = {a.ranks[-1] for a in d.tensor_args
                     if a.ranks and a.dtype not in ("i32", "i64", "bool")}
            sizes = {r: int(rng.integers(*heads)) if r in inner else min(n, 12)
                     for r, n in sizes.items()}
        args, params = random_call(d, rng, sizes)
        outs = _tuple(interpret(d, *args, **params))
        douts = [rng.standard_normal(o.shape) for o in outs]
        ref = _tuple(interpret(bw, *args, *douts, **params))
        fn = getattr(mod, f"{d.name}_backward")
        if backend == "numpy":
            got = _tuple(fn(*args, *douts, **params))
        else:
            import torch

            cast = [torch.tensor(a, dtype=torch.float32) if np.asarray(a).dtype == np.float64
                    else torch.tensor(np.asarray(a)) for a in args]
            got = _tuple(fn(*cast, *[torch.tensor(x, dtype=torch.float32) for x in douts],
                            **params))
            got = tuple(np.asarray(g.detach().numpy() if hasattr(g, "numpy") else g) for g in got)
        for out, g, r in zip(bw.outputs, got, ref):
            r = np.asarray(r, dtype=np.float64)
            scale = np.abs(r).max() + 1e-3  # a row with one visible key: dQ is 0 (rounding)
            tol = 5e-2 if not out.ranks else 2e-5  # a parameter's: sums of cancelling parts
            assert np.asarray(g).shape == r.shape, out.name
            assert np.abs(np.asarray(g, dtype=np.float64) - r).max() / scale < tol, \
                (out.name, seed)


def _compiled(tmp_path, name, backend, **options):
    module = parse_file(EXAMPLES / name)
    return module.definitions[0], _compiled_module(tmp_path, module, backend, **options)


def _compiled_module(tmp_path, module, backend, **options):
    """``module`` compiled with its backward for ``backend`` into ``tmp_path``, imported."""
    _, files = compile_module(module, backend, "mod", options=options or None, backward=True)
    for fname, text in files.items():
        write_atomic(tmp_path / fname, text)
    return load_generated(tmp_path / "mod.py")


@pytest.mark.parametrize("name", ["causal.attn", "mha.attn", "document_mask.attn",
                                  "softcap.attn", "sliding_window.attn", "sigmoid.attn",
                                  "lse.attn", "gqa_decode.attn", "differential.attn",
                                  "rwkv.attn", "softpick.attn", "prefix_lm.attn",
                                  "selective.attn"])
def test_numpy_backward_matches_the_cascade(tmp_path, name):
    d, mod = _compiled(tmp_path, name, "numpy", tile=8)  # several tiles per row
    _check_module(mod, d, "numpy")


@pytest.mark.parametrize("name", ["mha.attn", "softcap.attn", "mqa_decode.attn", "alibi.attn",
                                  "differential.attn", "linear_causal.attn", "softpick.attn",
                                  "rwkv.attn", "prefix_lm.attn", "linear.attn",
                                  "fusemax/deferred_2pass.attn", "cosine.attn", "gla.attn",
                                  "infini.attn", "selective.attn"])
def test_triton_backward_stages_match_the_cascade(tmp_path, name):
    d, mod = _compiled(tmp_path, name, "triton", tile=16)  # several tiles per row
    _check_module(mod, d, "triton", seeds=(0,))


def test_torch_autograd_and_torch_compile_fullgraph(tmp_path):
    torch = pytest.importorskip("torch")
    d, mod = _compiled(tmp_path, "causal.attn", "triton", tile=16)
    gen = torch.Generator().manual_seed(0)
    Q, K, V = (torch.randn(2, n, e, generator=gen, requires_grad=True)
               for n, e in ((19, 16), (37, 16), (37, 8)))
    def never(*args, **kwargs):
        raise AssertionError("a stage autograd does not need ran")

    # the forward saves GM and SD (causal_softmax_with_stats): stage 0 is skipped; the
    # scalar parameter's gradient is not asked for: its stage is skipped too
    mod.causal_softmax_backward_0 = never
    mod.causal_softmax_backward_3 = never
    (mod.causal_softmax(Q, K, V).square().sum()).backward()
    ref = [x.detach().double().requires_grad_() for x in (Q, K, V)]
    S = ref[0] @ ref[1].transpose(-1, -2) / 4.0
    mask = torch.arange(37)[None, :] <= torch.arange(19)[:, None] + 37 - 19
    (torch.softmax(S.masked_fill(~mask, float("-inf")), -1) @ ref[2]).square().sum().backward()
    for x, r in zip((Q, K, V), ref):
        assert (x.grad.double() - r.grad).abs().max() < 1e-5 * r.grad.abs().max()
        x.grad = None
    loss = torch.compile(lambda q, k, v: mod.causal_softmax(q, k, v).square().sum(),
                         fullgraph=True)
    loss(Q, K, V).backward()
    assert (Q.grad.double() - ref[0].grad).abs().max() < 1e-5 * ref[0].grad.abs().max()
    with torch.no_grad():  # no tape: the plain launch
        assert mod.causal_softmax(Q, K, V).grad_fn is None


@pytest.mark.parametrize("name", ["linear.attn", "causal.attn"])
def test_triton_backward_at_head_dims_past_a_row_block(tmp_path, name):
    """Head dims of 33 to 47, past the CPU launcher's 32-row block: linear attention's
    key-major dK and dV took the head dim e as their row and summed the scores over a
    block of e only (relative errors 2.5 and 1.0 at E = 37); the drawn sizes of the other
    tests stayed at or under 32."""
    d, mod = _compiled(tmp_path, name, "triton", tile=16)
    _check_module(mod, d, "triton", seeds=(0,), heads=(33, 48))


@pytest.mark.parametrize("name", ["causal.attn", "linear.attn", "gla.attn", "infini.attn",
                                  "selective.attn"])
def test_cuda_backward_under_emulation(tmp_path, monkeypatch, name):
    pytest.importorskip("torch")
    monkeypatch.setenv("ATTNC_CUDA_EMULATE", "1")
    d, mod = _compiled(tmp_path, name, "cuda", tile=16)
    _check_module(mod, d, "cuda", seeds=(0,), high=24)


def test_a_backward_without_kernels_is_refused_with_the_stage_and_reason(tmp_path):
    # the scores' two contributions are present under different masks (m <= p, m >= p):
    # filled, they would be a P x M buffer at a stage boundary, so they keep their fill
    two_masks = ("attention two_masks(Q[P,E], K[M,E], V[M,F]) -> O[P,F] {\n"
                 "  S[p,m] = Q[p,e] * K[m,e]\n"
                 "  A[p,f] = S[p,m] * V[m,f]   where m <= p\n"
                 "  B[p,f] = S[p,m] * V[m,f]   where m >= p\n"
                 "  O[p,f] = A[p,f] + B[p,f]\n}\n")
    with pytest.raises(NotTileable, match=r"stage \d+ \(.*\) has no kernel program: .*"
                                          r"filling their absent points with 0"):
        backward_program(parse(two_masks).definitions[0], "triton")
    # scores read at another row than the one that makes them (p // 2: no shift to undo)
    halves = parse("attention q(Q[P,E], K[M,E], V[M,F]) -> O[P,F] {\n  S[p,m] = Q[p,e] * K[m,e]\n"
                   "  O[p,f] = S[p,m] * S[p // 2, m] * V[m,f]\n}\n").definitions[0]
    with pytest.raises(NotTileable, match=r"would save S\[P,M\], a tensor over two "
                                          r"sequence ranks"):
        backward_program(halves, "triton")
    (tmp_path / "two_masks.attn").write_text(two_masks)
    r = subprocess.run([sys.executable, "-m", "attnc", "compile", str(tmp_path / "two_masks.attn"),
                        "--backend", "triton", "--grad", "-o", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "filling their absent points with 0" in r.stderr
    r = subprocess.run([sys.executable, "-m", "attnc", "compile", str(EXAMPLES / "causal.attn"),
                        "--grad", "-o", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "def causal_softmax_backward(" in (tmp_path / "causal.py").read_text()


def test_selective_attention_trains_on_kernels_saving_its_recurrence_states():
    """Selective attention's state FS[p,m] carries a row of keys per query, so its kernels
    store every step's state, forward and backward (P x M, as the forward's scan does).
    The backward program: a scan over the queries saving the states ``FS_at`` (the
    recurrence iterates ``p`` again, as the forward, so one kernel runs it); the row
    statistics; the step adjoints ``dFS_at_1``; their suffix sum, a scan over the
    reversed queries; then dQ query-major and dK with dV key-major, reading the saved
    states at their points (declared over a key rank of their own, so the key-major
    stage holds row blocks of keys, not one key per program).  The numbers are checked
    in ``test_triton_backward_stages_match_the_cascade`` and under CUDA emulation."""
    from attnc.backends import compile_module

    bp = backward_program(_example("selective.attn"), "triton")
    scan = bp.stages[0]
    assert [o.name for o in scan.outputs] == ["FS_at"]
    assert {st.iter_rank for st in scan.statements if isinstance(st, ir.IterativeEinsum)} == {"P"}
    suffix = next(s for s in bp.stages if "dFS_step_unshifted" in {o.name for o in s.outputs})
    assert any(isinstance(st, ir.IterativeEinsum) for st in suffix.statements)
    assert "dFS_at_1" in {a.name for a in suffix.tensor_args}
    key_major = next(s for s in bp.stages if {"dK", "dV"} <= {o.name for o in s.outputs})
    saved = next(a for a in key_major.tensor_args if a.name == "FS_at")
    assert saved.ranks[0] == "P" and saved.ranks[1] not in ("M", "P"), saved
    lowered = []
    compile_module(ir.Module((key_major,)), "triton", "stage", options={"tile": 64},
                   after_lowering=lambda stage, p: lowered.append(p))
    program = lowered[-1].programs[0] if hasattr(lowered[-1], "programs") else lowered[-1]
    assert program.kernels[0].roles.row == "M", program.kernels[0].roles


def test_check_grad_compares_the_backward_program_with_the_interpreter():
    """`attnc check --grad`: NAME_backward (stages, per batch element, parameters' gradients
    too) against the interpreted backward cascade, on the check's ragged batched shapes."""
    r = subprocess.run([sys.executable, "-m", "attnc", "check", str(EXAMPLES / "alibi.attn"),
                        "--grad"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [x for x in r.stdout.splitlines() if x.startswith("alibi_backward")]
    assert {x.split()[1] for x in lines} == {"dQ", "dK", "dV", "dSLOPE", "dscale"}
    assert all(x.endswith("ok") for x in lines)


@pytest.mark.parametrize("name", ["linear.attn", "causal.attn", "lse.attn", "differential.attn",
                                  "alibi.attn"])
@pytest.mark.parametrize("empty", ["P", "M", "E", "F"])
def test_presence_proofs_stay_exact_when_a_rank_is_empty(name, empty):
    """A plain '+' of contributions assumes the ranks they sum non-empty only where an empty
    one empties them all alike: the backward matches central differences with a size 0."""
    d = _example(name)
    rng = np.random.default_rng(5)
    sizes = {"P": 3, "M": 4, "E": 2, "F": 3, "H": 2}
    sizes[empty] = 0
    args = [rng.standard_normal(tuple(sizes[r] for r in a.ranks)) for a in d.tensor_args]
    params = {p.name: 0.7 for p in d.scalar_params if p.default is None}
    outs = _tuple(interpret(d, *args, **params))
    douts = [rng.standard_normal(o.shape) for o in outs]
    grads = _tuple(interpret(backward(d), *args, *douts, **params))
    eps = 1e-6
    for i, a in enumerate(args):
        v = rng.standard_normal(a.shape)
        plus, minus = list(args), list(args)
        plus[i], minus[i] = a + eps * v, a - eps * v
        fd = sum(float(np.sum((p - m) * dy)) for p, m, dy in zip(
            _tuple(interpret(d, *plus, **params)), _tuple(interpret(d, *minus, **params)), douts))
        assert float(np.sum(grads[i] * v)) == pytest.approx(fd / (2 * eps), rel=1e-4, abs=1e-6)


def test_report_backward_lists_the_program_stages():
    r = subprocess.run([sys.executable, "-m", "attnc", "report", str(EXAMPLES / "causal.attn"),
                        "--backward", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    import json

    (prog,) = json.loads(r.stdout)["backward_programs"]
    kinds = {tuple(s["returns"]): s["kernels"] for s in prog["stages"]}
    assert kinds[("dK", "dV")] == ["M x P"] and kinds[("dSD_1", "dQ")] == ["P x M"]
    assert prog["saved_by_forward"] == ["GM", "SD"]


@settings(max_examples=8, deadline=None)
@given(attention_cascades())
def test_random_attention_variants_run_their_backward_program(defn):
    """Random cascades: the staged program (numpy, each stage a fused kernel program where
    one exists) equals the interpreted backward cascade on ragged batched shapes."""
    import tempfile
    from pathlib import Path

    from attnc.einsum_ir.ir import Module
    from attnc.passes.backward import NotDifferentiable

    try:
        _, files = compile_module(Module((defn,)), "numpy", "mod", backward=True)
    except NotDifferentiable:
        return
    with tempfile.TemporaryDirectory() as tmp:
        for fname, text in files.items():
            write_atomic(Path(tmp) / fname, text)
        _check_module(load_generated(Path(tmp) / "mod.py"), defn, "numpy", seeds=(0,), high=12)


@settings(max_examples=6, deadline=None)
@given(attention_cascades())
def test_random_attention_variants_run_their_triton_backward_or_are_refused(defn):
    """Parity for gradients: a random cascade's Triton backward program (interpreter, tiles
    of 16 over ragged sizes) equals the interpreted backward cascade, or compiling it is
    refused with the stage and the reason (a tensor over two sequence ranks, a fill that
    no presence proof removes, a long rank held whole)."""
    import tempfile
    from pathlib import Path

    from attnc.einsum_ir.ir import Module
    from attnc.passes.backward import NotDifferentiable

    pytest.importorskip("torch")
    try:
        _, files = compile_module(Module((defn,)), "triton", "mod", backward=True,
                                  options={"tile": 16})
    except NotDifferentiable:
        return
    except NotTileable as why:  # the backward's stage, or the forward itself, with why
        assert re.match(rf"{defn.name}(_backward: stage \d+ \(.*\) (has no kernel program|"
                        rf"would save)|\S*): \w", str(why)), str(why)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for fname, text in files.items():
            write_atomic(Path(tmp) / fname, text)
        _check_module(load_generated(Path(tmp) / "mod.py"), defn, "triton", seeds=(0,), high=20)


REVERSED_VALUES = """
attention reversed(Q[P,E], K[M,E], V[M,F], scale = 1/sqrt(E)) -> (AV[P,F], LSE[P]) {
  S[p,m]  = Q[p,e] * K[m,e] * scale   where m <= p
  GM[p]   = max[m](S[p,m])
  SN[p,m] = exp(S[p,m] - GM[p])
  SD[p]   = sum[m](SN[p,m])
  AV[p,f] = SN[p,m] * V[M - 1 - m, f] / SD[p]
  LSE[p]  = GM[p] + log(SD[p])
}"""


def test_a_reversed_value_read_streams_and_trains_on_triton(tmp_path):
    """``V[M - 1 - m, f]`` lies inside V for every key (``affine_in_range``), so the online
    pass streams the softmax (before: 'their masks differ', two passes), and the adjoint's
    read ``SN[p, M - 1 - mx]`` is computed over ``m`` and reflected once after
    (``unshift_gradients`` with ``a = -1``; before: a saved ``SN[P,M]``)."""
    from attnc.passes.backward_program import unshift_gradients

    defn = parse(REVERSED_VALUES).definitions[0]
    unshifted = unshift_gradients(backward(defn))
    (dv,) = [st for st in unshifted.statements if st.tensor == "dV_1"]
    assert isinstance(dv.expr, ir.Access) and dv.expr.tensor == "dV_1_unshifted"
    pytest.importorskip("torch")
    mod = _compiled_module(tmp_path, ir.Module((defn,)), "triton", tile=16)
    _check_module(mod, defn, "triton", seeds=(0, 1), high=40)


def test_a_max_output_gradient_compared_in_a_key_major_stage(tmp_path):
    """dK of N = max[m](S) is summed in a key-major stage, whose K·Qᵀ tiles may round
    otherwise than the Q·Kᵀ tiles that took the max.  Before, it compared S == N there and
    lost the maximum's key (dK off by 0.7 relative, tie counts of 0: NaN); now a row-major
    stage finds the first attaining key (``N_at``, recomputing N beside it) and the
    key-major stage compares indices, ``m == N_at[p]``."""
    defn = parse("""
attention a(Q[P,E], K[M,E], V[M,F], scale = 1/sqrt(E)) -> (AV[P,F], N[P]) {
  S[p,m]  = Q[p,e] * K[m,e] * scale
  AV[p,f] = sigmoid(S[p,m]) * V[m,f] / sum[m](sigmoid(S[p,m]))
  N[p]    = max[m](S[p,m])
}""").definitions[0]
    pytest.importorskip("torch")
    mod = _compiled_module(tmp_path, ir.Module((defn,)), "triton", tile=16)
    _check_module(mod, defn, "triton", seeds=(0, 1), high=60)


def test_a_gradient_scattered_through_an_index_tensor_is_added_by_the_host():
    """dKC lands through PT[b, m // PG] (two sequences' keys may share a cache row), dQ of a
    packed batch through CU[b] + p: the kernels make a part per point of the forward's
    layout and the host adds it at its place."""
    from attnc.einsum_ir.printer import print_expr, print_statement

    program = backward_program(_example("paged_decode.attn"), "triton")
    (dkc, dvc) = program.scatters
    assert (dkc.grad, dkc.arg, dkc.part, dkc.part_ranks) == ("dKC", "KC", "dKC_1_at",
                                                              ("B", "H", "M", "E"))
    assert [print_expr(t) for t in dkc.targets] == ["PT[b, m // PG]", "m - m // PG * PG",
                                                    "h // G", "e"]
    assert dvc.grad == "dVC" and "dKC" not in {o.name for s in program.stages for o in s.outputs}
    varlen = backward_program(_example("varlen_prefill.attn"), "triton")
    (dq, dk, dv) = varlen.scatters
    assert [print_expr(t) for t in dq.targets] == ["CU[b] + p", "h", "e"]
    part = next(st for s in varlen.stages for st in s.statements if st.tensor == "dQ_1_at")
    assert "CU[b] + p" not in print_statement(part).split("where")[-1]  # (the host places it)


@pytest.mark.parametrize("name", ["paged_decode.attn", "paged_prefill.attn",
                                  "varlen_prefill.attn"])
def test_scattered_gradients_train_on_triton(tmp_path, name):
    """Against the interpreted backward cascade (small sizes: the oracle materialises the
    scattered sum over every page and position)."""
    d, mod = _compiled(tmp_path, name, "triton", tile=16)
    _check_module(mod, d, "triton", seeds=(0, 1), high=10)


def test_adversarial_page_tables_scatter_exactly(tmp_path):
    """Pages shared by two sequences (their gradients add on one cache row), a -1 entry
    and an entry past the cache (nothing lands), a sequence of length 0; Triton's backward
    against the interpreted backward cascade."""
    import torch

    d, mod = _compiled(tmp_path, "paged_decode.attn", "triton", tile=16)
    rng = np.random.default_rng(3)
    B, H, HK, E, F, NP, PG, NB = 4, 4, 2, 8, 6, 5, 4, 3
    q = rng.standard_normal((B, H, E))
    kc, vc = rng.standard_normal((NP, PG, HK, E)), rng.standard_normal((NP, PG, HK, F))
    # page 2: twice in sequence 0 and once in 1; -1 and 7 (past NP): absent; page 4 past L
    pt = np.array([[2, 2, 0], [2, -1, 4], [7, 1, 3], [3, 3, 3]], dtype=np.int32)
    lens = np.array([11, 6, 9, 0], dtype=np.int32)
    do = rng.standard_normal((B, H, F))
    ref = interpret(backward(d), q, kc, vc, pt, lens, do)
    cast = [torch.tensor(x, dtype=torch.float32) for x in (q, kc, vc)]
    got = mod.paged_decode_backward(*cast, torch.tensor(pt), torch.tensor(lens),
                                    torch.tensor(do, dtype=torch.float32))
    for g, r in zip(got, ref):
        r = np.asarray(r, dtype=np.float64)
        assert np.abs(g.numpy() - r).max() <= 2e-5 * (np.abs(r).max() + 1e-3)
    assert np.abs(ref[1][2]).max() > 0 and not np.abs(ref[1][4]).any()


@pytest.mark.parametrize("name", ["varlen_prefill.attn", "paged_decode.attn"])
def test_scattered_gradients_on_cuda_under_emulation(tmp_path, monkeypatch, name):
    pytest.importorskip("torch")
    monkeypatch.setenv("ATTNC_CUDA_EMULATE", "1")
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path / "cache"))
    d, mod = _compiled(tmp_path, name, "cuda", tile=16)
    _check_module(mod, d, "cuda", seeds=(0,), high=10)


def test_numpy_backward_memory_grows_with_the_rows_not_with_rows_times_keys(tmp_path):
    """The backward stages stream the keys: no P x M tensor (bench/cpu.py --backward runs
    the P = M = 16384 check, docs/performance.md has its figures)."""
    import tracemalloc

    d, mod = _compiled(tmp_path, "causal.attn", "numpy", tile=64)
    peaks = {}
    for n in (512, 1024):
        rng = np.random.default_rng(n)
        q, k, v, do = (rng.standard_normal((n, 16)) for _ in range(4))
        tracemalloc.start()
        mod.causal_softmax_backward(q, k, v, do)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peaks[1024] < 1024 * 1024 * 8, peaks      # less than one float64 P x M tensor
    assert peaks[1024] / peaks[512] < 2.6, peaks     # linear in P (quadratic would be 4)


def test_16_bit_inputs_train_with_float32_statistics(tmp_path):
    """float16 inputs (the CPU interpreter's tl.dot is wrong for bf16, triton 3.9; the GPU
    bench checks bf16): the forward saves float32 row statistics and the gradients come
    back in float16 within half precision of the float64 reference."""
    torch = pytest.importorskip("torch")
    d, mod = _compiled(tmp_path, "alibi.attn", "triton", tile=16)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 29, 16, generator=gen) for _ in range(3))
    slopes = torch.tensor([0.5, 0.25])
    half = [x.half().requires_grad_() for x in (q, k, v)]
    out, *stats = mod.alibi_with_stats(*half, slopes)
    assert out.dtype == torch.float16 and all(s.dtype == torch.float32 for s in stats)
    mod.alibi(*half, slopes).float().square().sum().backward()
    ref = [x.half().double().requires_grad_() for x in (q, k, v)]
    i = torch.arange(29)
    S = ref[0] @ ref[1].transpose(-1, -2) / 4.0 - slopes.double()[:, None, None] * (i[:, None] - i[None, :])
    S = S.masked_fill(i[None, :] > i[:, None], float("-inf"))
    (torch.softmax(S, -1) @ ref[2]).square().sum().backward()
    for x, r in zip(half, ref):
        assert x.grad.dtype == torch.float16
        assert (x.grad.double() - r.grad).abs().max() < 5e-3 * r.grad.abs().max()


def test_lse_used_in_the_loss_trains_and_an_empty_value_dim_is_refused_per_call(tmp_path):
    """The log-sum-exp output in the loss (a z-loss) through torch autograd on Triton: the
    kernels assume F > 0 (AV empty would drop its gradient terms) and the call says so."""
    torch = pytest.importorskip("torch")
    d, mod = _compiled(tmp_path, "lse.attn", "triton", tile=16)
    assert backward_program(d, "triton").nonempty == (("F", "V", 1),)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(n, 16, generator=gen, requires_grad=True) for n in (23, 31, 31))
    out, lse = mod.attention_lse(q, k, v)
    (out.square().sum() + 0.1 * lse.square().sum()).backward()
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
    S = (ref[0] @ ref[1].T / 4.0).masked_fill(
        torch.arange(31)[None, :] > torch.arange(23)[:, None] + 31 - 23, float("-inf"))
    (torch.softmax(S, -1) @ ref[2]).square().sum().add(
        0.1 * torch.logsumexp(S, -1).square().sum()).backward()
    for x, r in zip((q, k, v), ref):
        assert (x.grad.double() - r.grad).abs().max() < 1e-5 * r.grad.abs().max()
    with pytest.raises(ValueError, match="V has F = 0"):
        mod.attention_lse_backward(q, k, v[:, :0], torch.zeros(23, 0), torch.ones(23))


MAX_BESIDE_SOFTMAX = """
attention a(Q[P,E], K[M,E], V[M,F], scale = 1/sqrt(E)) -> (AV[P,F], N[P]) {
  S[p,m] = Q[p,e] * K[M - 1 - m, e] * scale
  GM[p] = max[m](S[p,m])
  SN[p,m] = exp(S[p,m] - GM[p])
  SD[p] = sum[m](SN[p,m])
  AV[p,f] = SN[p,m] * V[M - 1 - m, f] / SD[p]
  N[p] = max[m](S[p,m])
}
"""


def test_a_max_output_finds_its_first_attaining_point_in_the_scores_it_recomputes(tmp_path):
    """The gradient of N = max[m](S) goes to the first score equal to it.  A stage that
    recomputes S in another contraction order may round differently from the forward
    that took the max: compared with the saved N, no score was equal (with the earlier
    tie counts, dQ and dK were 0/0, NaN, at seeds 0, 5, 15, 21 and 28).  The stage that
    finds the point recomputes N."""
    from attnc.passes.backward_program import stage_definition

    module = parse(MAX_BESIDE_SOFTMAX, "max_beside_softmax.attn")
    cascade = backward(module.definitions[0])
    (ties,) = [st.tensor for st in cascade.statements if st.tensor.endswith("_at")]
    maxima = {st.tensor for st in cascade.statements
              if isinstance(st.expr, ir.Reduce) and st.expr.op == "max"}
    for recompute in (True, False):
        stage = stage_definition(cascade, "s", [ties], maxima, recompute_extrema=recompute)
        reads = {a.name for a in stage.tensor_args}
        assert (reads & maxima == set()) if recompute else (reads & maxima), (recompute, reads)
    _, files = compile_module(module, "numpy", "mod", backward=True)
    for fname, text in files.items():
        write_atomic(tmp_path / fname, text)
    _check_module(load_generated(tmp_path / "mod.py"), module.definitions[0], "numpy",
                  seeds=(0, 5, 15, 21, 28), high=12)


FILLED_AT_A_STAGE_BOUNDARY = """
attention decay_pad(Q[P,E], K[P,E], V[P,F], C[P], KP[P]: i32) -> AV[P,F] {
  let M = P
  S[p,m]  = Q[p,e] * K[m,e] / sqrt(E) + C[p] - C[m]   where m <= p and KP[m] > 0
  GM[p]   = max[m](S[p,m])
  SN[p,m] = exp(S[p,m] - GM[p])
  AV[p,f] = SN[p,m] * V[m,f] / sum[m](SN[p,m])
}
"""


def test_a_fill_runs_as_a_stage_boundary_on_triton(tmp_path):
    """dC adds a contribution over the rows (absent where a row sees no key) and one over
    the keys (absent at padded keys): kernels have no form for filling them with 0, so each
    is a stage's output, stored with 0 at its absent points, and read back by the stage
    that adds them.  Against the interpreted backward cascade, several tiles, keys padded."""
    from attnc.passes.backward_program import fills_as_stage_inputs

    module = parse(FILLED_AT_A_STAGE_BOUNDARY, "decay_pad.attn")
    d = module.definitions[0]
    assert any(isinstance(st, ir.IterativeEinsum) for st in backward(d).statements)  # fills
    program = backward_program(d, "triton")
    outputs = {o.name for s in program.stages for o in s.outputs}
    assert {"dC_1", "dC_2"} <= outputs
    _, filled = fills_as_stage_inputs(backward(d))
    assert set(filled) == {"dC_1", "dC_2"}
    _, files = compile_module(module, "triton", "mod", options={"tile": 16}, backward=True)
    for fname, text in files.items():
        write_atomic(tmp_path / fname, text)
    _check_module(load_generated(tmp_path / "mod.py"), d, "triton", seeds=(0, 1))


def test_kernels_that_assume_ranks_non_empty_say_so_per_call(tmp_path):
    """Linear attention's dQ adds dDEN·KS (absent when M or F is empty) and dNUM·KV (when F
    is): the kernels assume every rank non-empty and a call with an empty one is refused,
    naming it; the numpy module takes it."""
    torch = pytest.importorskip("torch")
    d, mod = _compiled(tmp_path, "linear.attn", "triton", tile=16)
    Q, K, V = torch.randn(5, 4), torch.randn(0, 4), torch.randn(0, 3)
    with pytest.raises(ValueError, match="M = 0"):
        mod.linear_attention_backward(Q, K, V, torch.randn(5, 3))


def test_a_gradient_read_at_a_shifted_row_is_computed_where_it_is_made_and_shifted_after():
    """GLA's dCG_1[t] read dS_1[t + P - M, m]: dS_1 was saved whole (P x M).  Computed over
    p and shifted once after, the backward stays O(rows) and every stage lowers; the
    rewrite keeps the backward's values (P < M, P = M, P > M)."""
    from attnc.einsum_ir.printer import print_statement
    from attnc.passes.backward_program import unshift_gradients

    bw = backward(_example("gla.attn"))
    out = unshift_gradients(bw)
    made = {st.tensor: print_statement(st) for st in out.statements}
    assert made["dCG_1"] == "dCG_1[t] = dCG_1_unshifted[t + P - M]"
    assert made["dCG_1_unshifted"].startswith("dCG_1_unshifted[p] = sum[m, e](dS_1[p,m] * ")
    assert made["S"] == print_statement(next(s for s in bw.statements if s.tensor == "S"))
    rng = np.random.default_rng(0)
    for P, M in ((5, 9), (9, 9), (7, 4)):
        args = [rng.standard_normal((P, 3)), rng.standard_normal((M, 3)),
                rng.standard_normal((M, 2)), -0.1 * np.abs(rng.standard_normal(M)),
                rng.standard_normal((P, 2))]
        for a, b in zip(interpret(bw, *args), interpret(out, *args)):
            np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-14)
    stages = backward_program(_example("gla.attn"), "triton").stages
    assert "dS_1" not in {o.name for s in stages for o in s.outputs}


def test_a_scalar_gradients_rows_stream_a_let_sized_key_rank(tmp_path):
    """paged prefill's keys are ``let M = NB * PG``: a kernel that held M whole (the dscale
    rows stage streamed the heads instead, with rows x heads x E x M blocks past Triton's
    element limit at real sizes) is refused like one over an argument's rank, and the rows
    stream the keys with matrix products."""
    program = backward_program(_example("paged_prefill.attn"), "triton")
    (stage,) = [s for s in program.stages if "dscale_1_rows" in {o.name for o in s.outputs}]
    _, files = compile_module(ir.Module((stage,)), "triton", "stage")
    text = files["stage.py"]
    assert "for m1 in range(" in text and "tl.dot(" in text and "for h1 in range(" not in text


def test_scattered_gradients_take_batch_dims_and_broadcasts(tmp_path):
    """Batch dims (2, 1) on the queries and (3,) on the cache and the page table: the host
    gathers each batch element's page table, and the cache's gradient is per element of
    the call's batch (2, 3), as the interpreted backward and the kernels' other gradients."""
    import torch

    d, mod = _compiled(tmp_path, "paged_decode.attn", "triton", tile=16)
    sizes = {"B": 4, "H": 4, "E": 5, "NP": 5, "PG": 3, "HK": 2, "F": 3, "NB": 4}
    rng = np.random.default_rng(2)
    args, _ = random_call(d, rng, sizes, (2, 1), (3,))
    do = rng.standard_normal(np.shape(interpret(d, *args)))
    ref = interpret(backward(d), *args, do)
    cast = [torch.tensor(a, dtype=torch.float32) if a.dtype == np.float64 else torch.tensor(a)
            for a in args]
    got = mod.paged_decode_backward(*cast, torch.tensor(do, dtype=torch.float32))
    for g, r in zip(got, ref):
        r = np.asarray(r, dtype=np.float64)
        assert g.shape == r.shape
        assert np.abs(g.numpy() - r).max() <= 2e-5 * (np.abs(r).max() + 1e-3)


def test_a_sum_over_mixed_heads_is_pushed_into_its_linear_readers():
    """Talking heads: dS_1 = sum[h](dS_1_heads) would make the dQ kernel hold every head h;
    its readers sum h themselves and dQ, dK and dscale come as parts over h (a grid rank)
    that the host adds.  A reader that is not linear in the sum keeps it."""
    from attnc.passes.head_partials import pushed_sums

    program = backward_program(parse_file(EXAMPLES.parent / "tests" / "grad_variants" /
                                          "talking_heads.attn").definitions[0], "triton")
    rows = dict(program.rows)
    assert rows["dQ"] == (("dQ_1_by_h", 1),) and rows["dK"] == (("dK_1_by_h", 1),)
    made = {o.name: o.ranks for s in program.stages for o in s.outputs}
    assert made["dQ_1_by_h"] == ("G", "P", "E", "H")
    squared = parse("""
attention s(X[H,P,E]) -> O[P,E] {
  T[p,e] = sum[h](X[h,p,e])
  O[p,e] = T[p,e] * T[p,e]
}""").definitions[0]
    assert pushed_sums(squared, lambda r: r == "H") == (squared, {})
    linear = parse("""
attention s(X[H,P,E], W[E]) -> O[P] {
  T[p,e] = sum[h](X[h,p,e])
  O[p] = sum[e](-T[p,e] * W[e] / 2)
}""").definitions[0]
    pushed, summed = pushed_sums(linear, lambda r: r == "H")
    assert summed == {"O": "H"}
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((3, 4, 5)), rng.standard_normal(5)
    np.testing.assert_allclose(interpret(pushed, x, w), interpret(linear, x, w))


def test_a_max_output_trains_on_triton_with_the_default_tiles(tmp_path):
    """With no tile given, the statistics stage streams 64 keys and the gradient stages
    32: their Q·Kᵀ tiles round differently.  Comparing scores with a saved max across them
    gave softpick's Triton backward inf (``attnc check --grad``, dQ, dK, dscale); the first
    attaining point, made beside the max and saved by the forward (``N_at``), is compared
    as an index.  ``NAME_backward`` and torch autograd (the forward saves ``N_at``), against
    the interpreted backward and a dense float64 torch reference (``torch.max(dim)``: the
    gradient goes to the first maximum)."""
    torch = pytest.importorskip("torch")
    d = parse(MAX_BESIDE_SOFTMAX).definitions[0]
    prog = backward_program(d, "triton")
    assert "N_at" in {o.name for o in prog.with_stats.outputs}
    mod = _compiled_module(tmp_path, ir.Module((d,)), "triton")
    _check_module(mod, d, "triton", seeds=(0, 1, 2), high=90)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(n, 16, generator=gen, requires_grad=True) for n in (70, 75, 75))
    k.data[7] = k.data[40]  # an exact tie for some rows' maximum: the first key takes it
    out, n = mod.a(q, k, v)
    (out.square().sum() + n.sin().sum()).backward()
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
    S = ref[0] @ ref[1].flip(0).T / 4.0
    top = S.max(-1).values  # the first maximum's gradient, as N_at
    (torch.softmax(S, -1) @ ref[2].flip(0)).square().sum().add(top.sin().sum()).backward()
    for x, r in zip((q, k, v), ref):
        assert (x.grad.double() - r.grad).abs().max() < 1e-5 * r.grad.abs().max()


def test_softpick_trains_on_triton_with_the_default_tiles(tmp_path):
    """softpick's max has an adjoint (``+ eps`` breaks shift invariance): before, its
    Triton backward at the default tiles gave dQ, dK and dscale inf."""
    pytest.importorskip("torch")
    d = parse_file(EXAMPLES / "softpick.attn").definitions[0]
    mod = _compiled_module(tmp_path, ir.Module((d,)), "triton")
    _check_module(mod, d, "triton", seeds=(0, 1), high=90)
