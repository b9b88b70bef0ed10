"""``stream-final``: post-loop sums over a running max's final value folded into the loop.

Each hand-tiled 2-pass cascade must become 1-pass over its block rank and compute what
the interpreter computes on the source: ragged sizes (M not a multiple of the tile,
M < tile, M = 1), masks, fully masked rows (0, never NaN).  Where the sum's points
differ from its max's, the pass must leave the cascade alone.
"""
from __future__ import annotations

import numpy as np
import pytest

from attnc.einsum_ir.interpreter import interpret
from attnc.einsum_ir.ir import IterativeEinsum
from attnc.einsum_ir.printer import print_ir
from attnc.frontends import parse, parse_file
from attnc.passes.passcount import count_passes
from attnc.passes.pipeline import DEFAULT_PIPELINE, run_pipeline
from attnc.passes.stream_final import stream_final
from conftest import EXAMPLES

SIZES = [1, 3, 4, 5, 9, 12]  # tile 4: M < tile, M = tile, ragged, several tiles


def tiled(shift_sld: str, shift_rd: str, shift_av: str, qk_where: str = "",
          av_where: str = "", tile: int = 4):
    """The online normalizer's 2-pass cascade with the given shifts and masks."""
    qkw = f"  where {qk_where}" if qk_where else ""
    avw = f"  where {av_where}" if av_where else ""
    src = f"""attention t(Q[P,E], K[M,E], V[M,F]) -> AV[P,F] {{
  let M0 = {tile}
  let M1 = ceil(M / M0)
  BK[m1,m0,e]  = K[m1*M0 + m0, e]
  BV[m1,m0,f]  = V[m1*M0 + m0, f]
  RM[0,p]      = -inf
  RD[0,p]      = 0
  BQK[m1,m0,p] = Q[p,e] * BK[m1,m0,e]{qkw}
  LM[m1,p]     = max[m0](BQK[m1,m0,p])
  RM[m1+1,p]   = max(RM[m1,p], LM[m1,p])
  SLD[m1,p]    = sum[m0]({shift_sld})
  RD[m1+1,p]   = SLD[m1,p] + RD[m1,p] * {shift_rd}
  AV_sum[p,f]  = sum[m1,m0]({shift_av} * BV[m1,m0,f]){avw}
  AV[p,f]      = AV_sum[p,f] / RD[M1,p]
}}"""
    return parse(src)


PLAIN = ("exp(BQK[m1,m0,p] - RM[m1+1,p])", "exp(RM[m1,p] - RM[m1+1,p])",
         "exp(BQK[m1,m0,p] - RM[M1,p])")
SCALED = ("exp2((BQK[m1,m0,p] - RM[m1+1,p]) / sqrt(E))", "exp2((RM[m1,p] - RM[m1+1,p]) / sqrt(E))",
          "exp2(0.5 * ((BQK[m1,m0,p] - RM[M1,p]) * 2) / sqrt(E))")
CAUSAL = "m1*M0 + m0 <= p + M - P"

SPECS = {
    "plain": tiled(*PLAIN),
    "causal": tiled(*PLAIN, qk_where=CAUSAL),
    "exp2_scaled": tiled(*SCALED),
    "causal_exp2": tiled(*SCALED, qk_where=CAUSAL),
    # an extra mask that does not depend on m1 or m0: a presence state guards the result
    "row_mask": tiled(*PLAIN, av_where="p < 2"),
}


def after_pipeline(module):
    return run_pipeline(module, None, options={"tile": 4})[-1][1]


def assert_same(source, derived, args) -> None:
    expected, actual = interpret(source, *args), interpret(derived, *args)
    assert actual.shape == expected.shape
    assert np.all(np.isfinite(actual)), "non-finite values in the derived cascade's result"
    np.testing.assert_array_equal(actual == 0, expected == 0, err_msg="zero pattern differs")
    np.testing.assert_allclose(actual, expected, rtol=1e-9, atol=1e-12)


def qkv(rng, P, M, E=3, F=2):
    return [rng.standard_normal((P, E)), rng.standard_normal((M, E)),
            rng.standard_normal((M, F))]


def stream_rank_passes(defn) -> int:
    return count_passes(defn).passes["M1"]


def test_the_pass_is_in_the_default_pipeline_after_online():
    assert DEFAULT_PIPELINE.index("stream-final") == DEFAULT_PIPELINE.index("online") + 1


def test_example_becomes_one_pass():
    module = parse_file(EXAMPLES / "fusemax/online_normalizer_2pass.attn")
    stages = dict(run_pipeline(module))
    assert count_passes(stages["online"].definitions[0]).pass_bound == 2
    out = stages["stream-final"].definitions[0]
    assert count_passes(out).pass_bound == 1
    assert stream_rank_passes(out) == 1
    text = print_ir(out)
    assert "LAV_sum[m1,p,f] = sum[m0](exp(BQK[m1,m0,p] - RM[m1 + 1, p]) * BV[m1,m0,f])" in text
    assert "AV_sum[p,f] = RAV_sum[M1,p,f]   where RM[M1,p] != -inf" in text
    assert parse(text).definitions[0] == out


@pytest.mark.parametrize("M", [1, 5, 64, 65, 130])
def test_example_matches_the_interpreter(M):
    module = parse_file(EXAMPLES / "fusemax/online_normalizer_2pass.attn")
    source = module.definitions[0]
    derived = after_pipeline(module).definitions[0]
    rng = np.random.default_rng(M)
    assert_same(source, derived, qkv(rng, 3, M))


@pytest.mark.parametrize("name", sorted(SPECS))
def test_specs_become_one_pass(name):
    out = after_pipeline(SPECS[name]).definitions[0]
    assert count_passes(out).pass_bound == 1, print_ir(out)
    assert parse(print_ir(out)).definitions[0] == out
    assert stream_final(out) == out
    seen = any(isinstance(st, IterativeEinsum) and st.tensor.endswith("_seen")
               for st in out.statements)
    assert seen == (name == "row_mask")


@pytest.mark.parametrize("M", SIZES)
@pytest.mark.parametrize("P", [1, 5])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_specs_match_the_interpreter(name, P, M):
    module = SPECS[name]
    derived = after_pipeline(module).definitions[0]
    rng = np.random.default_rng(100 * M + P)
    assert_same(module.definitions[0], derived, qkv(rng, P, M))


# The sum is masked causally, its max is not: in a tile where only unmasked points
# move the max, the sum has no point and could not be rescaled.  Left alone.
NEGATIVE = {
    "sum_mask_only": tiled(*PLAIN, av_where=CAUSAL),
    # a mask along the tile's rank only: a tile's max may sit where the sum has no point
    "sum_mask_in_tile": tiled(*PLAIN, av_where="m0 < 2"),
    # a max that enters otherwise than exp(Y - T)
    "bare_max": tiled(*PLAIN[:2], "max(BQK[m1,m0,p], RM[M1,p])"),
}


@pytest.mark.parametrize("name", sorted(NEGATIVE))
def test_negative_cases_are_left_alone(name):
    module = NEGATIVE[name]
    stages = dict(run_pipeline(module, None, options={"tile": 4}))
    online_out = stages["online"].definitions[0]
    out = stages["stream-final"].definitions[0]
    assert out == online_out
    assert count_passes(out).pass_bound == 2
    for M in (1, 5, 9):
        for P in (1, 5):
            rng = np.random.default_rng(M + 7 * P)
            assert_same(module.definitions[0], out, qkv(rng, P, M))
