"""What the Triton kernels are made of, beyond their values (issue 18): presence tests that
hold on every tile leave the loop, exp runs as exp2 with log2(e) folded into the scale, a
max over a positively scaled block is scaled once per row, batch offsets are 64-bit; the
static report specialises the compile as the launcher does, and the causal kernel meets the
static targets on sm_90 (docs/performance.md, "Static kernel report")."""
from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from attnc.backends import compile_module, load_generated, write_atomic  # noqa: E402
from attnc.backends.kernel_report import kernel_signature, launch_values  # noqa: E402
from attnc.backends.triton_backend import kernel_spec  # noqa: E402
from attnc.backends import lower_stages  # noqa: E402
from attnc.einsum_ir.interpreter import interpret  # noqa: E402
from attnc.frontends import parse_file  # noqa: E402

from conftest import EXAMPLES  # noqa: E402


def _module_text(name: str, tile: int = 16, sizes: dict | None = None) -> str:
    options = {"tile": tile} if sizes is None else {"tile": tile, "sizes": sizes}
    _, files = compile_module(parse_file(EXAMPLES / f"{name}.attn"), "triton", name,
                              options=options)
    return files[f"{name}.py"]


def _kernel(text: str, kernel: str) -> str:
    start = text.index(f"def {kernel}(")
    end = text.find("\n@triton.jit", start)
    return text[start:end if end > 0 else len(text)]


def _full_tile_loop(kernel: str) -> str:
    body = kernel.split("for m1 in range(full_lo, full_hi):")[1]
    return body.split("for m1 in range(full_hi, tile_hi):")[0]


@pytest.fixture(scope="module")
def causal(tmp_path_factory):
    text = _module_text("causal")
    path = tmp_path_factory.mktemp("q") / "causal_quality.py"
    write_atomic(path, text)
    return text, load_generated(path)


def test_full_tiles_update_the_state_without_selects(causal):
    """The "rank E is not empty" presence of every update is tested once, as an empty tile
    range, so the full tiles chain ``acc = dot + acc * alpha`` with no block select."""
    text, _ = causal
    kernel = _kernel(text, "_causal_softmax_kernel")
    assert "tile_hi = tl.where((E > 0), tile_hi, tile_lo)" in kernel
    assert "(E > 0)" not in kernel.split("tile_hi = tl.where((E > 0)")[1]
    full = _full_tile_loop(kernel)
    assert "tl.where" not in full
    assert re.search(r"rnv = \(slnv \+ \(rnv_prev \* \(prm\)\[:, None\]\)\)", full)


def test_exp_is_exp2_with_log2e_folded_into_the_scale(causal):
    text, _ = causal
    kernel = _kernel(text, "_causal_softmax_kernel")
    assert "tl.exp(" not in kernel
    scale = re.search(r"(c_\d+) = \(scale \* 1\.4426950408889634\)", kernel).group(1)
    full = _full_tile_loop(kernel)
    # one multiply-add per score: the raw product times the folded scale, minus the row max
    assert re.search(rf"sln = _exp2\(\(\(dot_\d+ \* {scale}\) - \(\(rm \* 1\.4426950408889634\)\)"
                     rf"\[:, None\]\)\)", full)
    # the row max of the raw product, scaled once per row when the scale is positive
    assert re.search(r"if POSITIVE_0:\n\s+max_\d+ = tl\.max\(dot_\d+, axis=1\) \* scale", full)


def test_batch_offsets_are_64_bit(causal):
    text, _ = causal
    kernel = _kernel(text, "_causal_softmax_kernel")
    assert "boff_Q = b0.to(tl.int64) * stride_Q_b0 + b1.to(tl.int64) * stride_Q_b1" in kernel


def _compare(module, defn, Q, K, V, **params):
    want = interpret(defn, Q, K, V, **params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = module.causal_softmax(*(torch.from_numpy(x) for x in (Q, K, V)), **params)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", [0.37, -0.37, 0.0])
def test_both_signs_of_the_scale_match_the_interpreter(causal, scale):
    """A positive scale takes the row-max shortcut, zero and negative ones the plain max."""
    _, module = causal
    defn = parse_file(EXAMPLES / "causal.attn").definitions[0]
    rng = np.random.default_rng(3)
    P, M, E, F = 21, 37, 8, 5
    Q, K, V = (rng.standard_normal(s).astype(np.float32) for s in ((P, E), (M, E), (M, F)))
    _compare(module, defn, Q, K, V, scale=scale)


def test_an_empty_head_dim_skips_every_tile(causal):
    """E = 0: no score is present, so no update runs (the hoisted guard) and every row is
    absent (0), as in the interpreter."""
    _, module = causal
    defn = parse_file(EXAMPLES / "causal.attn").definitions[0]
    rng = np.random.default_rng(4)
    Q, K = np.zeros((6, 0), np.float32), np.zeros((9, 0), np.float32)
    V = rng.standard_normal((9, 3)).astype(np.float32)
    _compare(module, defn, Q, K, V, scale=1.0)


def test_a_guard_some_update_lacks_stays_in_the_updates(tmp_path):
    """A state that counts tiles whatever E is (no "E > 0" in its presence) keeps E = 0
    rows running: the guard is then not hoisted into the tile range."""
    from attnc.frontends import parse

    spec = """
attention count(Q[P,E], K[M,E], V[M,F]) -> AV[P,F] {
  S[p,m]  = Q[p,e] * K[m,e]
  GM[p]   = max[m](S[p,m])
  SN[p,m] = exp(S[p,m] - GM[p])
  SD[p]   = sum[m](SN[p,m])
  AV[p,f] = SN[p,m] * V[m,f] / SD[p] + sum[m](select(m <= p, V[m,f], 0))
}
"""
    _, files = compile_module(parse(spec, "count.attn"), "triton", "count", options={"tile": 16})
    text = files["count.py"]
    kernel = _kernel(text, "_count_kernel")
    assert "tile_hi = tl.where((E > 0)" not in kernel
    assert "(E > 0)" in kernel
    write_atomic(tmp_path / "count_q.py", text)
    module = load_generated(tmp_path / "count_q.py")
    defn = parse(spec, "count.attn").definitions[0]
    rng = np.random.default_rng(5)
    for E in (0, 3):
        Q, K = (rng.standard_normal((n, E)).astype(np.float32) for n in (5, 23))
        V = rng.standard_normal((23, 2)).astype(np.float32)
        want = interpret(defn, Q, K, V)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = module.count(*(torch.from_numpy(x) for x in (Q, K, V)))
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


def test_the_report_specialises_arguments_as_the_launcher_does():
    """Contiguous strides are 1 (a constant), sizes and strides divisible by 16 carry the
    divisibility Triton's launcher gives them, pointers are 16-byte aligned."""
    module = parse_file(EXAMPLES / "causal.attn")
    stages, _ = compile_module(module, "triton", "causal")
    program = lower_stages(stages, "triton", {"tile": 64}).programs[0]
    variant = kernel_spec(program).variants[0]
    part = variant.kernels[0]
    sizes = dict(B=4, H=16, P=16384, M=16384, E=128, F=128)
    values = launch_values(part, variant, sizes, (4, 16))
    assert values["stride_K_1"] == 1 and values["stride_K_0"] == 128
    assert values["stride_K_b3"] == 16384 * 128 and values["stride_K_b0"] == 0
    assert values["M0"] == 64 and values["M1"] == 256 and values["NB1"] == 1
    names = ["K_ptr", "stride_K_1", "stride_K_0", "M1", "NB1", "scale", "BLOCK_M0"]
    signature, constexprs, attrs = kernel_signature(
        part, names, {"K": "*bf16"}, {"BLOCK_M0": 64}, values)
    assert signature["stride_K_1"] == "constexpr" and constexprs[(1,)] == 1
    assert signature["NB1"] == "constexpr" and signature["scale"] == "fp32"
    assert attrs[(0,)] == attrs[(2,)] == attrs[(3,)] == [["tt.divisibility", 16]]


@pytest.mark.xdist_group("sm90")
def test_causal_meets_the_static_targets_on_sm90():
    """Causal at B4 H16 P=M=16384, D128, bf16, compiled for sm_90 as launched: at most 420
    SASS instructions per full key tile, one wgmma wait, three stages of cp.async loads."""
    from attnc.backends.kernel_report import kernel_report

    sizes = dict(B=4, H=16, P=16384, M=16384, E=128, F=128)
    (fused,) = kernel_report(str(EXAMPLES / "causal.attn"), sizes, "bf16", 90,
                             variants=("fused",))
    loop = fused.main_loop
    assert fused.num_stages == 3 and fused.blocks["BLOCK_P"] == 128
    assert loop.instructions <= 420, loop
    assert loop.mma == 12 and loop.wgmma_waits == 1 and loop.mufu == 34
    assert loop.global_loads > 0 and loop.local_memory == 0


@pytest.mark.xdist_group("sm90")
def test_the_backward_stages_run_their_products_on_tensor_cores_on_sm90():
    """`attnc kernels --grad`: causal's dQ stage sums ``dSN * exp(QK - GM) * K`` over the
    tile, three factors: one wgmma chain, not a rows x tile x E broadcast (13,114 SASS per
    tile and 21 KB of spills before); the stages carrying two head dims of state (dQ's
    deferred sums, dK and dV) run 64-row blocks over 8 warps."""
    from attnc.backends.kernel_report import kernel_report

    sizes = dict(B=4, H=16, P=16384, M=16384, E=128, F=128)
    reports = {r.kernel: r for r in kernel_report(str(EXAMPLES / "causal.attn"), sizes, "bf16",
                                                  90, variants=("fused",), grad=True)}
    dq = reports["_causal_softmax_backward_1_kernel"]
    dkdv = reports["_causal_softmax_backward_2_kernel"]
    assert dq.main_loop.instructions <= 1200 and dq.main_loop.mma >= 32, dq.main_loop
    assert dq.blocks["BLOCK_P"] == 64 and dq.num_warps == 8
    assert dkdv.blocks["BLOCK_M"] == 64 and dkdv.num_warps == 8
    assert dkdv.main_loop.instructions <= 1400, dkdv.main_loop


def test_a_factor_constant_along_the_sum_leaves_the_product():
    """Retention's decay ``gamma ** (p - m)`` sits inside the e-sum (``sum[e](Q*K*decay)``):
    it does not vary along e, so the score is still one tl.dot times the decay, not a
    rows x tile x E block (whose four kernels took sm_90's compiler over 25 minutes).  At
    short sequences the cost model keeps the quadratic form (longer ones are chunked:
    tests/test_chunked_kernels.py)."""
    short = {"P": 64, "M": 64, "E": 64, "F": 64}
    kernel = _kernel(_module_text("retention", sizes=short), "_retention_kernel")
    full = _full_tile_loop(kernel)
    assert full.count("tl.dot(") == 2 and "[:, None, :]" not in full


def test_an_affine_bias_is_split_into_a_row_part_and_a_key_part(tmp_path):
    """ALiBi's ``SLOPE[h] * (p + M - P - m)`` is scaled per row (relative to the tile) and
    per key of the tile, each once, not per score: one add per score.  The split is exact
    in float32 up to the rounding of a distance within a tile of the exact one, so it
    matches the interpreter on ragged sizes over several tiles, with both signs of slope."""
    from attnc.backends.kernel_common import split_affine_bias
    from attnc.einsum_ir.printer import print_ir
    from attnc.frontends import parse

    st = parse("attention t(B[M], SL[P]) -> O[P,M] {\n"
               "  O[p,m] = B[m] - SL[p] * (p + M - P - m)\n}\n").definitions[0].statements[0]
    assert print_ir(split_affine_bias(st.expr, "M")) == \
        "B[m] - SL[p] * (p + M - P) - SL[p] * -m"
    assert split_affine_bias(st.expr, "E") is None  # no key part: nothing to split
    only_keys = parse("attention t(B[M], SL[P]) -> O[P,M] {\n  O[p,m] = B[m] - SL[p] * (M - m)\n}\n")
    assert split_affine_bias(only_keys.definitions[0].statements[0].expr, "M") is None

    full = _full_tile_loop(_kernel(_module_text("alibi"), "_alibi_kernel"))
    assert "(-(offs_m0).to(tl.float32))))[None, :]" in full, full
    assert "- (m1 * M0))))[:, None]" in full

    write_atomic(tmp_path / "alibi_split.py", _module_text("alibi", tile=16))
    mod = load_generated(tmp_path / "alibi_split.py")
    d = parse_file(EXAMPLES / "alibi.attn").definitions[0]
    rng = np.random.default_rng(5)
    H, P, M, E, F = 2, 37, 90, 8, 5
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((H, P, E), (H, M, E), (H, M, F)))
    for slope in (np.array([0.5, 2 ** -8], np.float32), np.array([-0.25, 0.125], np.float32)):
        got = mod.alibi(*(torch.from_numpy(x) for x in (q, k, v, slope))).numpy()
        ref = interpret(d, *(x.astype(np.float64) for x in (q, k, v, slope)))
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5)
