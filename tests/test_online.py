"""``online``: derived one-pass cascades (FuseMax's Cascade 5), checked against the interpreter.

Every derived cascade must print as valid ``.attn`` that parses back to itself,
have ``pass_bound == 1``, and compute what its source computes — on ragged sizes
(M not a multiple of the tile), with batch dims, with masks (data-dependent
ones too) and with fully masked rows, which must come out 0, never NaN.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from attnc.einsum_ir.interpreter import interpret
from attnc.einsum_ir.ir import IterativeEinsum
from attnc.einsum_ir.printer import print_ir
from attnc.frontends import parse, parse_file
from attnc.passes.canonicalize import canonicalize
from attnc.passes.defer_normalization import defer_normalization
from attnc.passes.online import online, online_blockers
from attnc.passes.passcount import count_passes
from attnc.passes.tile import tile_program
from conftest import EXAMPLES as EXAMPLES_DIR
from conftest import all_examples

QKV = "Q[P,E], K[M,E], V[M,F]"


def spec(body: str, args: str = QKV, outs: str = "AV[P,F]", name: str = "t"):
    return parse(f"attention {name}({args}) -> {outs} {{\n{body}\n}}").definitions[0]


def one_pass(defn, tile: int = 4):
    """``online(defer_normalization(defn))``, checked to print and parse back to itself."""
    out = online(defer_normalization(defn), tile)
    assert parse(print_ir(out)).definitions[0] == out
    assert online(out, tile) == out
    return out


def as_tuple(x) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def assert_same(source, derived, args, **params) -> None:
    expected = as_tuple(interpret(source, *args, **params))
    actual = as_tuple(interpret(derived, *args, **params))
    for e, a in zip(expected, actual):
        assert a.shape == e.shape
        assert np.all(np.isfinite(a)), "non-finite values in the derived cascade's result"
        np.testing.assert_array_equal(a == 0, e == 0, err_msg="zero pattern differs")
        np.testing.assert_allclose(a, e, rtol=1e-9, atol=1e-12)


def qkv(rng, P, M, E=3, F=2, batch=()):
    return [rng.standard_normal(batch + (P, E)), rng.standard_normal((M, E)),
            rng.standard_normal((M, F))]


CASCADE4 = """
  QK[p,m] = Q[p,e] * K[m,e]
  GM[p]   = max[m](QK[p,m])
  SN[p,m] = exp(QK[p,m] - GM[p])
  SD[p]   = sum[m](SN[p,m])
  A[p,m]  = SN[p,m] / SD[p]
  AV[p,f] = A[p,m] * V[m,f]"""

CASCADE5 = """
  let M0 = 64
  let M1 = ceil(M / M0)
  BK[m1,m0,e]   = K[m1*M0 + m0, e]
  BV[m1,m0,f]   = V[m1*M0 + m0, f]
  RM[0,p]       = -inf
  RD[0,p]       = 0
  RNV[0,p,f]    = 0
  BQK[m1,m0,p]  = Q[p,e] * BK[m1,m0,e]
  LM[m1,p]      = max[m0](BQK[m1,m0,p])
  RM[m1+1,p]    = max(RM[m1,p], LM[m1,p])
  SLN[m1,m0,p]  = exp(BQK[m1,m0,p] - RM[m1+1,p])
  SLD[m1,p]     = sum[m0](SLN[m1,m0,p])
  SLNV[m1,p,f]  = SLN[m1,m0,p] * BV[m1,m0,f]
  PRM[m1,p]     = exp(RM[m1,p] - RM[m1+1,p])
  RD[m1+1,p]    = SLD[m1,p] + RD[m1,p] * PRM[m1,p]
  RNV[m1+1,p,f] = SLNV[m1,p,f] + RNV[m1,p,f] * PRM[m1,p]
  AV[p,f]       = RNV[M1,p,f] / RD[M1,p]   where RD[M1,p] > 0"""


# --- the shape of Cascade 5 ---------------------------------------------------------------


def test_softmax_online_form_golden(golden):
    out = one_pass(spec(CASCADE4, name="softmax"), tile=64)
    golden(print_ir(out))


def test_cascade4_derives_exactly_fusemax_cascade5():
    # but for the final guard: the contract's `> 0` drops a NaN row to 0, where Cascade 4
    # gives NaN; the derived `!= 0` keeps NaN (docs/language.md, "NaN and Inf")
    derived = one_pass(spec(CASCADE4, name="softmax_1pass"), tile=64)
    assert derived == spec(CASCADE5.replace("RD[M1,p] > 0", "RD[M1,p] != 0"), name="softmax_1pass")


def test_causal_derives_cascade5_with_the_mask_on_the_tile():
    body = CASCADE4.replace("K[m,e]", "K[m,e]   where m <= p + M - P")
    text = print_ir(one_pass(spec(body), tile=16))
    assert "BQK[m1,m0,p] = sum[e](Q[p,e] * BK[m1,m0,e])   where m1 * M0 + m0 <= p + M - P" in text
    assert "AV[p,f] = RNV[M1,p,f] / RD[M1,p]   where RD[M1,p] != 0" in text


def test_the_derived_cascade_is_one_pass():
    source = spec(CASCADE4)
    assert count_passes(source).pass_bound == 3
    assert count_passes(defer_normalization(source)).pass_bound == 2
    assert count_passes(one_pass(source)).pass_bound == 1


def test_the_derived_cascade_is_canonical_and_deterministic():
    out = one_pass(spec(CASCADE4))
    assert canonicalize(out) == out
    assert print_ir(one_pass(spec(CASCADE4))) == print_ir(out)


# --- variants, against the interpreter ---------------------------------------------------

VARIANTS = {
    "causal": (QKV, "AV[P,F]", CASCADE4.replace("K[m,e]", "K[m,e]   where m <= p + M - P")),
    "gqa_style_fused": (QKV, "AV[P,F]", """
      QK[p,m] = Q[p,e] * K[m,e] * scale   where m <= p + M - P
      GM[p]   = max[m](QK[p,m])
      SN[p,m] = exp(QK[p,m] - GM[p])
      SD[p]   = sum[m](SN[p,m])
      AV[p,f] = SN[p,m] * V[m,f] / SD[p]""".replace("scale", "0.5")),
    "softmax1": (QKV, "AV[P,F]", """
      QK[p,m] = Q[p,e] * K[m,e]   where m <= p + M - P
      GM[p]   = max[m](QK[p,m])
      SN[p,m] = exp(QK[p,m] - GM[p])
      SD[p]   = sum[m](SN[p,m]) + exp(-GM[p])
      A[p,m]  = SN[p,m] / SD[p]
      AV[p,f] = A[p,m] * V[m,f]"""),
    "lse": (QKV, "(AV[P,F], LSE[P])", """
      QK[p,m] = Q[p,e] * K[m,e]   where m <= p + M - P
      GM[p]   = max[m](QK[p,m])
      SN[p,m] = exp(QK[p,m] - GM[p])
      SD[p]   = sum[m](SN[p,m])
      LSE[p]  = GM[p] + log(SD[p])
      AV[p,f] = SN[p,m] * V[m,f] / SD[p]"""),
    "differential": (QKV + ", K2[M,E]", "AV[P,F]", """
      QK1[p,m] = Q[p,e] * K[m,e]    where m <= p + M - P
      GM1[p]   = max[m](QK1[p,m])
      SN1[p,m] = exp(QK1[p,m] - GM1[p])
      SD1[p]   = sum[m](SN1[p,m])
      QK2[p,m] = Q[p,e] * K2[m,e]   where m <= p + M - P
      GM2[p]   = max[m](QK2[p,m])
      SN2[p,m] = exp(QK2[p,m] - GM2[p])
      SD2[p]   = sum[m](SN2[p,m])
      A[p,m]   = SN1[p,m] / SD1[p] - 0.3 * SN2[p,m] / SD2[p]
      AV[p,f]  = A[p,m] * V[m,f]"""),
    "key_padding": (QKV + ", KEEP[M]: bool", "AV[P,F]",
                    CASCADE4.replace("K[m,e]", "K[m,e]   where KEEP[m]")),
    "document_mask": (QKV + ", DQ[P]: i32, DK[M]: i32", "AV[P,F]",
                      CASCADE4.replace("K[m,e]", "K[m,e]   where DQ[p] == DK[m]")),
    "exp2": (QKV, "AV[P,F]", CASCADE4.replace("exp(", "exp2(")),
    "exp2_scaled": (QKV, "AV[P,F]", """
      QK[p,m] = Q[p,e] * K[m,e]   where m <= p + M - P
      GM[p]   = max[m](QK[p,m])
      SN[p,m] = exp2((QK[p,m] - GM[p]) * 1.4426950408889634)
      SD[p]   = sum[m](SN[p,m])
      AV[p,f] = SN[p,m] * V[m,f] / SD[p]"""),
    "exp_inside_the_sums": (QKV, "(AV[P,F], GM[P])", """
      QK[p,m] = Q[p,e] * K[m,e]   where m <= p
      GM[p]   = max[m](QK[p,m])
      SD[p]   = sum[m](exp(QK[p,m] - GM[p]))
      AV[p,f] = exp(QK[p,m] - GM[p]) * V[m,f] / SD[p]"""),
    "sums_and_min_that_do_not_use_the_max": (QKV, "(AV[P,F], SS[P], MN[P], KS[P])", """
      QK[p,m] = Q[p,e] * K[m,e]   where m <= p + M - P
      GM[p]   = max[m](QK[p,m])
      SN[p,m] = exp(QK[p,m] - GM[p])
      SD[p]   = sum[m](SN[p,m])
      AV[p,f] = SN[p,m] * V[m,f] / SD[p]
      SS[p]   = sum[m](QK[p,m] * QK[p,m])
      MN[p]   = min[m](QK[p,m])
      KS[p]   = sum[m](K[m,e])   where m < p + 2"""),
    "where_on_the_reductions": (QKV, "AV[P,F]", """
      QK[p,m] = Q[p,e] * K[m,e]
      AV[p,f] = exp(QK[p,m] - max[m](QK[p,m])) * V[m,f] / sum[m](exp(QK[p,m] - max[m](QK[p,m])))   where m <= p"""),
    "index_only_bias": (QKV, "AV[P,F]", """
      B[p,m]  = 0.25 * (p - m)
      QK[p,m] = Q[p,e] * K[m,e] + B[p,m]
      GM[p]   = max[m](QK[p,m])
      SN[p,m] = exp(QK[p,m] - GM[p])
      AV[p,f] = SN[p,m] * V[m,f] / sum[m](SN[p,m])"""),
    "shifted_input_read": (QKV, "AV[P,F]", """
      QK[p,m] = Q[p,e] * K[m,e] + V[m + 1, 0]
      GM[p]   = max[m](QK[p,m])
      SN[p,m] = exp(QK[p,m] - GM[p])
      AV[p,f] = SN[p,m] * V[m,f] / sum[m](SN[p,m])"""),
    "heads": ("Q[H,P,E], K[HK,M,E], V[HK,M,F]", "AV[H,P,F]", """
      let G = H / HK
      QK[h,p,m] = Q[h,p,e] * K[h // G, m, e]   where m <= p + M - P
      GM[h,p]   = max[m](QK[h,p,m])
      SN[h,p,m] = exp(QK[h,p,m] - GM[h,p])
      SD[h,p]   = sum[m](SN[h,p,m])
      AV[h,p,f] = SN[h,p,m] * V[h // G, m, f] / SD[h,p]"""),
}


def variant_inputs(name: str, rng, P: int, M: int, batch=()):
    if name == "heads":
        return [rng.standard_normal(batch + (4, P, 3)), rng.standard_normal((2, M, 3)),
                rng.standard_normal((2, M, 2))]
    args = qkv(rng, P, M, batch=batch)
    if name == "differential":
        args.append(rng.standard_normal((M, 3)))
    if name == "key_padding":
        args.append(rng.random(M) < 0.4)
    if name == "document_mask":
        args += [rng.integers(0, 3, P), rng.integers(0, 3, M)]  # some queries see nothing
    return args


@pytest.mark.parametrize("tile", [4, 16])
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_matches_its_source(name, tile):
    args, outs, body = VARIANTS[name]
    source = spec(body, args, outs)
    derived = one_pass(source, tile)
    assert any(isinstance(s, IterativeEinsum) for s in derived.statements), online_blockers(source)
    assert count_passes(derived).pass_bound == 1
    rng = np.random.default_rng(tile)
    for P, M, batch in [(5, 37, ()), (9, 6, (2,)), (1, 1, ())]:
        assert_same(source, derived, variant_inputs(name, rng, P, M, batch))


def test_fully_masked_rows_give_zero_not_nan():
    source = spec(VARIANTS["lse"][2], outs="(AV[P,F], LSE[P])")
    derived = one_pass(source, tile=4)
    av, lse = interpret(derived, *qkv(np.random.default_rng(0), 12, 5))
    assert np.all(av[:7] == 0) and np.all(lse[:7] == 0)  # p + M - P < 0: no key visible
    assert np.all(np.isfinite(av)) and np.all(av[7:] != 0)


def test_a_tile_with_no_visible_key_carries_the_state():
    source = spec(VARIANTS["key_padding"][2], VARIANTS["key_padding"][0])
    derived = one_pass(source, tile=4)
    rng = np.random.default_rng(3)
    keep = np.array([1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0], dtype=bool)  # tiles 1 and 3 empty
    assert_same(source, derived, qkv(rng, 3, 13) + [keep])


def test_several_softmaxes_get_their_own_running_states():
    text = print_ir(one_pass(spec(VARIANTS["differential"][2], VARIANTS["differential"][0])))
    for line in ("RM1[m1+1,p] = max(RM1[m1,p], LM1[m1,p])", "PRM2[m1,p] = exp(RM2[m1,p] - RM2[m1 + 1, p])",
                 "RN1V[m1+1,p,f] = SLN1V[m1,p,f] + RN1V[m1,p,f] * PRM1[m1,p]"):
        assert line in text


def test_exp2_with_a_scale_rescales_with_the_same_scale():
    text = print_ir(one_pass(spec(VARIANTS["exp2_scaled"][2])))
    assert "PRM[m1,p] = exp2((RM[m1,p] - RM[m1 + 1, p]) * 1.4426950408889634)" in text


def test_generated_names_do_not_clash():
    source = spec(CASCADE4.replace("AV[p,f] = A[p,m] * V[m,f]", """AV[p,f] = A[p,m] * V[m,f]
      RM[p] = Q[p,e]
      BK[p] = 2 * RM[p]
      M0[p] = BK[p]"""), outs="(AV[P,F], M0[P])")
    derived = one_pass(source)
    names = [s.tensor for s in derived.statements if not isinstance(s, IterativeEinsum)]
    assert len(names) == len(set(names))
    assert {"RM1", "BK1"} <= {s.tensor for s in derived.statements}
    assert [x.name for x in derived.lets] == ["M01", "M1"]
    assert_same(source, derived, qkv(np.random.default_rng(1), 4, 11))


# --- what the pass must refuse -----------------------------------------------------------

REFUSED = {
    "normalizer_inside_the_loop": (CASCADE4, "A reads SD, a sum over m, inside the loop over m"),
    "max_outside_exp": ("""
      QK[p,m] = Q[p,e] * K[m,e]
      GM[p]   = max[m](QK[p,m])
      A[p,m]  = sigmoid(QK[p,m] - GM[p])
      AV[p,f] = exp(QK[p,m] - GM[p]) * A[p,m] * V[m,f]""", "A uses GM outside exp(... - GM)"),
    "probabilities_as_output": ("""
      QK[p,m] = Q[p,e] * K[m,e]
      GM[p]   = max[m](QK[p,m])
      AV[p,m] = exp(QK[p,m] - GM[p])""", "output AV carries m"),
    "reordered_read": ("""
      QK[p,m] = Q[p,e] * K[m,e]
      GM[p]   = max[m](QK[p,m])
      SN[p,m] = exp(QK[p,M - 1 - m] - GM[p])
      AV[p,f] = SN[p,m] * V[m,f]""", "SN reads QK[p, M - 1 - m]"),
    "sum_with_another_mask": ("""
      QK[p,m] = Q[p,e] * K[m,e]
      GM[p]   = max[m](QK[p,m])
      SN[p,m] = exp(QK[p,m] - GM[p])
      SD[p]   = sum[m](SN[p,m])   where m <= p
      AV[p,f] = SN[p,m] * V[m,f] / SD[p]""", "SD is summed at other points of m than GM's max"),
    "max_of_the_shifted_exponential": ("""
      QK[p,m] = Q[p,e] * K[m,e]
      GM[p]   = max[m](QK[p,m])
      AV[p,f] = max[m](exp(QK[p,m] - GM[p]) * V[m,f])""", "takes the max of a shifted exponential"),
    "unknown_sign_scale": ("""
      QK[p,m] = Q[p,e] * K[m,e]
      GM[p]   = max[m](QK[p,m])
      AV[p,f] = exp((QK[p,m] - GM[p]) * s) * V[m,f]""", "scales the max by s"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_cascades_are_left_alone_and_explained(name):
    body, reason = REFUSED[name]
    source = spec(body, QKV + (", s" if "* s)" in body else ""),
                  "AV[P,M]" if "AV[p,m]" in body else "AV[P,F]")
    if name != "normalizer_inside_the_loop":
        source = defer_normalization(source)
    assert online(source) == canonicalize(source)
    blockers = online_blockers(source)
    assert any(reason in b for b in blockers), blockers
    assert all(b.startswith("GM (max over m): ") for b in blockers)


@pytest.mark.parametrize("body", [
    "S[p,m] = Q[p,e] * K[m,e]\n  AV[p,f] = S[p,m] * V[m,f] / max[m](S[p,m])",  # 2 passes over m
    "S[p,m] = sigmoid(Q[p,e] * K[m,e])\n  AV[p,f] = S[p,m] / sum[m](S[p,m]) * V[m,f]",  # 2 passes
    CASCADE5,                                                            # already one-pass
])
def test_noop_where_it_does_not_apply(body):
    source = canonicalize(spec(body))
    assert online(source) == source
    assert online_blockers(source) == []


def test_tile_must_be_positive():
    with pytest.raises(ValueError, match="tile"):
        online(spec(CASCADE4), 0)


# --- every example, every prefix of the pipeline ------------------------------------------

PREFIXES = {
    "canonicalize": [canonicalize],
    "defer_normalization": [canonicalize, defer_normalization],
    "online-4": [canonicalize, defer_normalization, lambda d: online(d, 4)],
    "online-16": [canonicalize, defer_normalization, lambda d: online(d, 16)],
    "online-without-defer": [canonicalize, lambda d: online(d, 4)],
}


def example_cases():
    try:
        from example_refs import EXAMPLES
    except ImportError:  # pragma: no cover - the example registry is another engineer's file
        return []
    on_disk = {p.relative_to(EXAMPLES_DIR).as_posix() for p in all_examples()}
    return [(path, EXAMPLES[path]) for path in sorted(on_disk & set(EXAMPLES))]


@pytest.mark.parametrize("path,ref", example_cases(), ids=[p for p, _ in example_cases()])
def test_every_example_through_every_pipeline_prefix(path, ref):
    source = next(d for d in parse_file(EXAMPLES_DIR / path).definitions
                  if d.name == ref.definition)
    results = {}
    for name, stages in PREFIXES.items():
        current = source
        for stage in stages:
            current = stage(current)
        assert parse(print_ir(current)).definitions[0] == current, name
        results[name] = current
    rng = np.random.default_rng(len(path))
    for sizes in ref.sizes:
        draws = [ref.make_inputs(rng, sizes) for _ in range(2)]  # a batch of two
        args = [np.stack([d[0][i] for d in draws]) for i in range(len(draws[0][0]))]
        for derived in results.values():
            assert_same(source, derived, args, **draws[0][1])
    if results["online-4"] != results["defer_normalization"]:
        assert count_passes(results["online-4"]).pass_bound == 1
        if len(results["online-16"].iterative_ranks) == 1:
            assert tile_program(results["online-16"]).tile_size == 16
        else:  # a recurrence computed whole beside the tile loop (selective attention)
            assert any(let.value == 16 for let in results["online-16"].lets)


# --- random softmax cascades --------------------------------------------------------------

MASKS = ["", "m <= p + M - P", "KEEP[m]", "m <= p + M - P and p + M - P - m < 3",
         "m < 2 or m > p", "KEEP[m] and m <= p"]


@st.composite
def softmax_cascades(draw):
    """A softmax-family cascade: mask, exp/exp2, scaled shift, numerator style, extras."""
    mask = draw(st.sampled_from(MASKS))
    fn = draw(st.sampled_from(["exp", "exp2"]))
    shift = draw(st.sampled_from(["QK[p,m] - GM[p]", "(QK[p,m] - GM[p]) * 0.5",
                                  "QK[p,m] * 2 - GM[p] * 2"]))
    lines = [f"QK[p,m] = Q[p,e] * K[m,e]" + (f"   where {mask}" if mask else ""),
             "GM[p] = max[m](QK[p,m])", f"SN[p,m] = {fn}({shift})",
             "SD[p] = sum[m](SN[p,m])" + (" + exp(-GM[p])" if draw(st.booleans()) else "")]
    lines += {
        "cascade4": ["A[p,m] = SN[p,m] / SD[p]", "AV[p,f] = A[p,m] * V[m,f]"],
        "fused": ["AV[p,f] = SN[p,m] * V[m,f] / SD[p]"],
        "deferred": ["SNV[p,f] = SN[p,m] * V[m,f]", "AV[p,f] = SNV[p,f] / SD[p]"],
    }[draw(st.sampled_from(["cascade4", "fused", "deferred"]))]
    outs = ["AV[P,F]"]
    if draw(st.booleans()):
        lines.append("LSE[p] = GM[p] + log(SD[p])")
        outs.append("LSE[P]")
    if draw(st.booleans()):
        lines.append("SS[p] = sum[m](QK[p,m])")
        outs.append("SS[P]")
    args = QKV + (", KEEP[M]: bool" if "KEEP" in mask else "")
    out_text = outs[0] if len(outs) == 1 else f"({', '.join(outs)})"
    return spec("\n".join(lines), args, out_text)


@given(softmax_cascades(), st.integers(1, 9), st.integers(1, 40), st.sampled_from([1, 3, 4, 8, 16]),
       st.integers(0, 2**16))
def test_random_softmax_cascades(source, P, M, tile, seed):
    derived = one_pass(source, tile)
    assert online_blockers(defer_normalization(source)) == []
    assert count_passes(derived).pass_bound == 1
    rng = np.random.default_rng(seed)
    args = qkv(rng, P, M, batch=(2,))
    if len(source.tensor_args) == 4:
        args.append(rng.random(M) < 0.5)
    assert_same(source, derived, args)


# --- one-pass cascades without a max: plain running reductions ---------------------------

SUM_ONLY_EXAMPLES = ["sigmoid.attn", "linear_causal.attn", "cosine.attn"]


@pytest.mark.parametrize("tile", [4, 16])
@pytest.mark.parametrize("path", SUM_ONLY_EXAMPLES)
def test_sum_only_examples_stream_the_key_rank(path, tile):
    source = parse_file(EXAMPLES_DIR / path).definitions[0]
    derived = one_pass(source, tile)
    assert count_passes(derived).pass_bound == 1
    tp = tile_program(derived)
    assert (tp.stream_rank, tp.loop_rank, tp.tile_size) == ("M", "M1", tile)
    rng = np.random.default_rng(tile)
    for P, M, batch in [(5, 37, ()), (9, 6, (2,)), (1, 1, (3, 1)), (4, 0, ())]:
        assert_same(source, derived, qkv(rng, P, M, batch=batch))


def test_linear_causal_golden(golden):
    source = parse_file(EXAMPLES_DIR / "linear_causal.attn").definitions[0]
    golden(print_ir(one_pass(source, tile=64)))


def test_independent_sums_share_the_blocked_loads():
    text = print_ir(one_pass(parse_file(EXAMPLES_DIR / "linear_causal.attn").definitions[0]))
    assert text.count("= K[m1 * M0 + m0, e]") == 1 and text.count("= V[m1 * M0 + m0, f]") == 1
    assert "RAV_sum[m1+1,p] = LAV_sum[m1,p] + RAV_sum[m1,p]" in text
    assert "RV[m1+1,p,f] = SLV[m1,p,f] + RV[m1,p,f]" in text
    # one presence state, on the smaller of the two sums that share the mask
    assert "AV[p,f] = RV[M1,p,f] / RAV_sum[M1,p]   where RAV_sum_seen[M1,p] != 0" in text
    assert "RV_seen" not in text


def test_an_unmasked_sum_needs_only_a_nonempty_rank():
    text = print_ir(one_pass(parse_file(EXAMPLES_DIR / "cosine.attn").definitions[0]))
    assert "AV[p,f] = RAV[M1,p,f]   where E > 0 and M > 0" in text
    assert "_seen" not in text


SUM_ONLY = {
    "max_and_min": (QKV, "(MX[P], MN[P], SS[P])", """
      S[p,m]  = tanh(Q[p,e] * K[m,e])   where m <= p + M - P
      MX[p]   = max[m](S[p,m])
      MN[p]   = min[m](S[p,m] * V[m,0])
      SS[p]   = sum[m](S[p,m])"""),
    "key_padding": (QKV + ", KEEP[M]: bool", "AV[P,F]", """
      S[p,m]  = sigmoid(Q[p,e] * K[m,e])   where KEEP[m]
      AV[p,f] = S[p,m] * V[m,f] / sum[m](S[p,m])"""),
    "where_on_the_reductions": (QKV, "AV[P,F]", """
      S[p,m]  = relu(Q[p,e] * K[m,e]) + 0.5
      AV[p,f] = S[p,m] * V[m,f] / sum[m](S[p,m])   where m < 2 or m > p"""),
    "normalised_by_a_max": (QKV, "AV[P,F]", """
      S[p,m]  = exp(Q[p,e] * K[m,e] * 0.5)
      AV[p,f] = S[p,m] * V[m,f] / max[m](S[p,m])   where m <= p + M - P"""),
    "state_over_e_and_f": (QKV, "(AV[P,F], KV[E,F])", """
      S[p,m]  = sigmoid(Q[p,e] * K[m,e])   where m <= p + M - P
      AV[p,f] = S[p,m] * V[m,f]
      KV[e,f] = K[m,e] * V[m,f]"""),
    "heads": ("Q[H,P,E], K[HK,M,E], V[HK,M,F]", "AV[H,P,F]", """
      let G = H / HK
      S[h,p,m]  = sigmoid(Q[h,p,e] * K[h // G, m, e])   where m <= p + M - P
      AV[h,p,f] = S[h,p,m] * V[h // G, m, f]"""),
}


@pytest.mark.parametrize("tile", [3, 16])
@pytest.mark.parametrize("name", sorted(SUM_ONLY))
def test_sum_only_variant_matches_its_source(name, tile):
    args, outs, body = SUM_ONLY[name]
    source = spec(body, args, outs)
    derived = one_pass(source, tile)
    assert derived.iterative_ranks == ("M1",)
    assert count_passes(derived).pass_bound == 1
    tile_program(derived)
    rng = np.random.default_rng(tile)
    for P, M, batch in [(5, 37, ()), (9, 6, (2,)), (1, 1, ())]:
        inputs = (variant_inputs("heads", rng, P, M, batch) if name == "heads"
                  else qkv(rng, P, M, batch=batch))
        if name == "key_padding":
            inputs.append(rng.random(M) < 0.4)
        assert_same(source, derived, inputs)


def test_running_max_and_min_start_at_infinity():
    args, outs, body = SUM_ONLY["max_and_min"]
    text = print_ir(one_pass(spec(body, args, outs)))
    for line in ("RMX[0,p] = -inf", "RMN[0,p] = inf", "RMX[m1+1,p] = max(RMX[m1,p], LMX[m1,p])",
                 "RMN[m1+1,p] = min(RMN[m1,p], LMN[m1,p])",
                 "MX[p] = RMX[M1,p]   where RMX[M1,p] != -inf"):
        assert line in text


def test_fully_masked_rows_of_a_running_sum_stay_absent():
    source = parse_file(EXAMPLES_DIR / "sigmoid.attn").definitions[0]
    derived = one_pass(source, tile=4)
    rng = np.random.default_rng(0)
    args = qkv(rng, 12, 5)
    out = interpret(derived, *args)
    assert np.all(out[:7] == 0) and np.all(out[7:] != 0)  # p + M - P < 0: no key visible
    keep = np.array([1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0], dtype=bool)  # tiles 1 and 3 empty
    args, outs, body = SUM_ONLY["key_padding"]
    assert_same(spec(body, args, outs), one_pass(spec(body, args, outs)), qkv(rng, 3, 13) + [keep])
    assert_same(spec(body, args, outs), one_pass(spec(body, args, outs)),
                qkv(rng, 3, 13) + [np.zeros(13, dtype=bool)])


def test_the_rank_whose_states_stay_small_is_streamed():
    # sigmoid: e is one-pass too, but its running state would be S_sum[p,m]
    derived = one_pass(parse_file(EXAMPLES_DIR / "sigmoid.attn").definitions[0])
    assert derived.iterative_ranks == ("M1",)
    # linear attention FQ·(FK^T V) contracts e last: e streams, m is reduced per tile
    derived = one_pass(parse_file(EXAMPLES_DIR / "linear.attn").definitions[0])
    assert derived.iterative_ranks == ("E1",)
    assert count_passes(derived).pass_bound == 1
    # a small state over e does not stop m from streaming the P×M scores
    args, outs, body = SUM_ONLY["state_over_e_and_f"]
    assert one_pass(spec(body, args, outs)).iterative_ranks == ("M1",)


def test_a_softmax_cascade_gets_no_second_loop():
    derived = one_pass(spec(VARIANTS["sums_and_min_that_do_not_use_the_max"][2],
                            outs=VARIANTS["sums_and_min_that_do_not_use_the_max"][1]))
    assert derived.iterative_ranks == ("M1",)
    tile_program(derived)


SCORES = ["sigmoid({x})", "tanh({x})", "relu({x})", "abs({x})", "{x}", "exp({x} * 0.25)"]
SUM_MASKS = ["", "m <= p + M - P", "KEEP[m]", "m < 2 or m > p", "KEEP[m] and m <= p"]


@st.composite
def sum_only_cascades(draw):
    """A one-pass cascade over m with no max shift: scores, a mask, sums/maxes/mins."""
    mask = draw(st.sampled_from(SUM_MASKS))
    on_scores = draw(st.booleans())
    x = draw(st.sampled_from(["Q[p,e] * K[m,e]", "Q[p,e] * K[m,e] * 0.5 + 0.1 * (p - m)"]))
    score = draw(st.sampled_from(SCORES)).format(x=x)
    where = f"   where {mask}" if mask else ""
    lines = [f"S[p,m] = {score}" + (where if on_scores else "")]
    red = "" if on_scores else where
    kinds = draw(st.sets(st.sampled_from(["N", "D", "MX", "MN", "KS"]), min_size=1))
    fused = "N" in kinds and "D" in kinds and draw(st.booleans())
    if fused:  # the normaliser inside the sum: defer-normalization makes it one-pass
        lines.append(f"D[p] = sum[m](sigmoid(S[p,m])){red}")
        lines.append(f"AV[p,f] = S[p,m] * V[m,f] / D[p]{red}")
        outs = ["AV[P,F]"]
    else:
        reductions = {"N": f"N[p,f] = sum[m](S[p,m] * V[m,f]){red}",
                      "D": f"D[p] = sum[m](sigmoid(S[p,m])){red}",
                      "MX": f"MX[p] = max[m](S[p,m]){red}",
                      "MN": f"MN[p] = min[m](S[p,m] * V[m,0]){red}",
                      "KS": "KS[f] = sum[m](V[m,f])" + (where if mask == "KEEP[m]" else "")}
        lines += [reductions[k] for k in sorted(kinds)]
        outs = []
        if "N" in kinds:
            av = "N[p,f]" + (" / D[p]" if "D" in kinds else "")
            lines.append(f"AV[p,f] = {av}" + (" + MX[p]" if "MX" in kinds else ""))
            outs.append("AV[P,F]")
        outs += [f"{k}[P]" for k in ("D", "MX", "MN") if k in kinds and "N" not in kinds]
        outs += ["MN[P]"] * ("MN" in kinds and "N" in kinds) + ["KS[F]"] * ("KS" in kinds)
    args = QKV + (", KEEP[M]: bool" if "KEEP" in mask else "")
    out_text = outs[0] if len(outs) == 1 else f"({', '.join(outs)})"
    return spec("\n".join(lines), args, out_text)


@given(sum_only_cascades(), st.integers(1, 9), st.integers(1, 40), st.sampled_from([1, 3, 4, 16]),
       st.integers(0, 2**16))
def test_random_sum_only_cascades(source, P, M, tile, seed):
    derived = one_pass(source, tile)
    assert derived.iterative_ranks == ("M1",)
    assert count_passes(derived).pass_bound == 1
    tile_program(derived)
    rng = np.random.default_rng(seed)
    args = qkv(rng, P, M, batch=(2,))
    if len(source.tensor_args) == 4:
        args.append(rng.random(M) < 0.5)
    assert_same(source, derived, args)


def test_blocked_copies_keep_the_ranks_an_input_is_read_at_unless_they_repeat():
    """``W[BX,M]`` read at ``W[b,m]`` (``let B = BX``) gets a blocked copy over ``B``, the
    rank the kernel's grid indexes (varlen's adjoint ``dO[BX,PX,H,F]``); a diagonal read
    ``X[m,e,e]`` keeps the declared ranks (a copy over ``E`` twice is no tensor)."""
    from attnc.einsum_ir.ir import Access, Einsum

    src = parse("attention d(Q[P,E], K[M,E], V[M,F], X[M,E,G], W[BX,M]) -> O[B,P,F] {\n"
                "  let B = BX\n"
                "  S[b,p,m] = Q[p,e] * K[m,e] * X[m,e,e] * W[b,m]\n"
                "  O[b,p,f] = exp(S[b,p,m] - max[m](S[b,p,m])) * V[m,f]"
                " / sum[m](exp(S[b,p,m] - max[m](S[b,p,m])))\n}\n").definitions[0]
    out = online(defer_normalization(src), 4)
    copies = {st.expr.tensor: st.lhs for st in out.statements if isinstance(st, Einsum)
              and isinstance(st.expr, Access) and st.expr.tensor in ("X", "W")}
    assert copies["X"][2:] == ("E", "G") and copies["W"][2:] == ("B",), copies
    rng = np.random.default_rng(0)
    args = [rng.standard_normal(s) for s in ((3, 2), (11, 2), (11, 4), (11, 2, 3), (2, 11))]
    assert_same(src, out, args)


REVERSED_BIAS = """attention reversed_bias(Q[P,E], K[M,E], V[M,F], B[P,N]) -> O[P,F] {
  S[p,m] = Q[p,e] * K[m,e] + B[P - 1 - p, m]
  O[p,f] = exp(S[p,m] - max[m](S[p,m])) * V[m,f] / sum[m](exp(S[p,m] - max[m](S[p,m])))   where m <= p
}"""


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_an_input_read_at_a_reversed_row_is_blocked_at_that_row(tmp_path, monkeypatch, backend):
    """``B[P - 1 - p, m]`` (a row read reversed; B's own key rank N, so its blocked copy
    keeps the bound ``m < M``): the copy reads the input at the reversed row,
    ``BB[m1,m0,p] = B[P - 1 - p, m1 * M0 + m0]``, and the tile reads it at plain ``p``.
    Blocked at B's own row and read shifted, the copy was a computed value a kernel cannot
    read at another row, and both kernel backends refused the spec ("BB is read with a
    shifted subscript"); the numpy backend compiled it.  Now each matches the interpreter
    (a backward stage reads selective attention's saved step adjoints the same way)."""
    pytest.importorskip("torch")
    from attnc.backends import compile_module, load_generated, write_atomic
    from attnc.backends.check import check_definition, torch_caller

    module = parse(REVERSED_BIAS, "reversed_bias.attn")
    blocked = online(canonicalize(defer_normalization(module.definitions[0])), tile=4)
    copy = next(st for st in blocked.statements if st.tensor == "BB")
    assert print_ir(copy).startswith("BB[m1,m0,p] = B[P - 1 - p, m1 * M0 + m0]"), print_ir(copy)
    if backend == "cuda":
        monkeypatch.setenv("ATTNC_CUDA_EMULATE", "1")
    _, files = compile_module(module, backend, "rev", options={"tile": 16})
    for fname, text in files.items():
        write_atomic(tmp_path / fname, text)
    fn = load_generated(tmp_path / "rev.py").reversed_bias
    assert all(r.ok for r in check_definition(module.definitions[0], torch_caller(fn, "cpu"),
                                              tolerance=2e-5))


def test_a_presence_state_keeps_only_the_ranks_its_presence_depends_on():
    """A key-major ``dK_1[m,e]`` is present where some query's mask admits key ``m``, for
    every ``e`` alike: its presence state is one per key, marked from the tile's own mask
    (``LP_any[p1,m] = max[p0](1) where m <= ...``), and ``dV_1[m,f]`` shares it (two
    ``[M, E]`` and ``[M, F]`` states before, as wide as the accumulators).  In the dQ
    stage, ``dQ_1[p,e]`` reads ``dQ_1_sum[p,e]`` and ``dSD_1[p]``; testing ``dSD_1``'s
    per-row state first covers both (``where RdQ_1_sum_seen[M1,p,e] != 0 and E > 0``
    before).  The gradients are checked against the interpreter in
    ``test_backward_program``; here, that the states are per row."""
    from attnc.passes.backward_program import backward_program

    bp = backward_program(parse_file(EXAMPLES_DIR / "causal.attn").definitions[0], "triton")

    def presence_states(outputs):
        stage = next(s for s in bp.stages if outputs <= {o.name for o in s.outputs})
        tiled = online(canonicalize(stage), tile=16)
        return tiled, {st.tensor: st.lhs for st in tiled.statements
                       if isinstance(st, IterativeEinsum) and st.tensor.endswith("_seen")}

    tiled, states = presence_states({"dK", "dV"})
    assert list(states.values()) == [("P1", "M")], states
    marks = [st for st in tiled.statements if st.tensor.endswith("_any")]
    assert len(marks) == 1 and print_ir(marks[0]).startswith("LP_any[p1,m] = max[p0](1)   where")
    _, states = presence_states({"dQ"})
    assert all(len(lhs) == 2 for lhs in states.values()), states


ATTAINED = """  S[p,m]  = Q[p,e] * K[m,e]   where m <= p + M - P
  N[p]    = max[m](S[p,m])
  NT[p]   = sum[m](select(S[p,m] == N[p], 1, 0))
  NA[p]   = min[m](select(S[p,m] == N[p], m, inf))
  L[p]    = min[m](S[p,m])
  LA[p]   = min[m](select(L[p] == S[p,m], m, inf))"""


@pytest.mark.parametrize("tile", [1, 2, 3, 5])
def test_where_a_max_is_attained_streams_with_it(tile):
    """A tie count and a first attaining index (a max's gradient, :mod:`.backward`) read
    the max through ``select(S == N, ...)``: one pass, the count zeroed and the index reset
    when the running max moves (a min's too).  Small integer scores: ties are many, the
    max moves often, the first ``P - M`` rows see no key."""
    source = spec(ATTAINED, outs="(N[P], NT[P], NA[P], L[P], LA[P])")
    derived = one_pass(source, tile=tile)
    assert count_passes(derived).pass_bound == 1
    text = print_ir(derived)
    assert "select(RN[m1,p] == RN[m1 + 1, p], 1, 0)" in text
    assert "RNA[m1+1,p] = min(select(RN[m1,p] == RN[m1 + 1, p], RNA[m1,p], inf), LNA[m1,p])" \
        in text
    rng = np.random.default_rng(tile)
    ties = 0
    for P, M in ((9, 7), (4, 11), (6, 6), (3, 13)):
        q = rng.integers(-2, 3, (P, 2)).astype(float)
        k = rng.integers(-2, 3, (M, 2)).astype(float)
        expected = interpret(source, q, k, np.zeros((M, 1)))
        actual = interpret(derived, q, k, np.zeros((M, 1)))
        for e, a in zip(expected, actual):
            np.testing.assert_array_equal(a, e)
        assert np.all(expected[1][max(P - M, 0):] >= 1)
        ties += int(np.sum(expected[1] > 1))
    assert ties > 3


@pytest.mark.parametrize("body, why", [
    ("N[p] = max[m](S[p,m])\n  NA[p] = min[m](select(S[p,m] == N[p], m, 0))",
     "NA takes the min of values selected where a running N is attained, other than "
     "select(X == N, a, inf)"),
    ("N[p] = max[m](S[p,m])\n  NT[p] = sum[m](select(S[p,m] == N[p], 1, 2))",
     "NT selects 2 where N is not attained, which no running state can rescale"),
    ("N[p] = min[m](S[p,m])\n  NA[p] = min[m](select(S[p,m] == N[p], m, inf))\n"
     "  D[p] = sum[m](exp(S[p,m] - N[p]))",
     "D has exp(S[p,m] - N[p]), not exp(X - max)"),
])
def test_an_attained_max_read_otherwise_is_refused(body, why):
    source = spec("  S[p,m] = Q[p,e] * K[m,e]\n  " + body,
                  outs="(N[P], NA[P])" if "NA" in body else "(N[P], NT[P])")
    assert any(why in b for b in online_blockers(source)), online_blockers(source)
