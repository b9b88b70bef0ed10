"""Pass counts (FuseMax §III), costs, fusion groups and the cascade report."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import sympy
from hypothesis import given, settings
from hypothesis import strategies as st

from attnc.einsum_ir.ir import Module, size_symbol
from attnc.frontends import parse, parse_file
from attnc.passes.costs import cascade_costs, evaluate, known_sizes
from attnc.passes.fusion import fusion_groups
from attnc.passes.passcount import FINAL_STATE, REDUCTION, count_passes
from attnc.passes.report import PASS_COLOURS, build_report, render_report, report_dot

from conftest import EXAMPLES, all_examples
from strategies import definitions

FUSEMAX = EXAMPLES / "fusemax"
SIZES = {"M": 8192, "P": 8192, "E": 128, "F": 128}
M, P, E, F = (size_symbol(r) for r in "MPEF")

# The contract's Cascade 4 (FuseMax's 3-pass form), used when examples/ lacks a file.
CASCADE4 = """
attention cascade4(Q[P,E], K[M,E], V[M,F], scale = 1/sqrt(E)) -> AV[P,F] {
  QK[p,m] = Q[p,e] * K[m,e] * scale
  GM[p]   = max[m](QK[p,m])
  SN[p,m] = exp(QK[p,m] - GM[p])
  SD[p]   = sum[m](SN[p,m])
  A[p,m]  = SN[p,m] / SD[p]
  AV[p,f] = A[p,m] * V[m,f]
}
"""


def analyse(path: Path, name: str | None = None):
    module = parse_file(path)
    defn = module[name] if name else module.definitions[0]
    return count_passes(defn)


# ----------------------------------------------------------------------------
# FuseMax Table I: the three classes
# ----------------------------------------------------------------------------


def test_cascade4_is_three_pass_over_m():
    a = analyse(FUSEMAX / "cascade4.attn")
    assert a.pass_bound == 3 and a.bound_rank == "M"
    assert a.passes == {"P": 1, "E": 1, "M": 3, "F": 1}
    assert dict(a["M"].einsum_pass) == {"QK": 1, "GM": 1, "SN": 2, "SD": 2, "A": 3, "AV": 3}


def test_cascade4_chain_names_gm_then_sd():
    chain = analyse(FUSEMAX / "cascade4.attn")["M"].chain
    assert [(d.earlier, d.later, d.tensor, d.pass_number) for d in chain] == [
        ("GM", "SN", "QK", 2), ("SD", "A", "SN", 3)]
    assert all(d.kind == REDUCTION and d.rank == "M" for d in chain)


def test_deferred_division_is_two_pass():
    a = analyse(FUSEMAX / "deferred_2pass.attn")
    assert a.pass_bound == 2 and a.passes["M"] == 2
    assert dict(a["M"].einsum_pass) == {"QK": 1, "GM": 1, "SN": 2, "SD": 2, "SNV": 2}
    assert dict(a["M"].ready) == {"AV": 3}  # runs once, after pass 2


def test_online_normalizer_is_two_pass_by_its_final_state():
    a = analyse(FUSEMAX / "online_normalizer_2pass.attn")
    assert a.pass_bound == 2 and a.bound_rank == "M1"
    (dep,) = a["M1"].chain
    assert (dep.earlier, dep.later, dep.kind) == ("RM[m1+1]", "A", FINAL_STATE)


@pytest.mark.parametrize("name", ["cascade5.attn", "cascade5_causal.attn"])
def test_cascade5_is_one_pass_over_m1(name):
    path = FUSEMAX / name
    if not path.exists():
        pytest.skip(f"{path} not written yet")
    a = analyse(path)
    assert a.pass_bound == 1 and a.bound_rank is None
    assert a.passes["M1"] == 1 and a["M1"].chain == ()
    # its M0 tile is re-read after LM's max, but M0 is a compile-time constant
    assert a.passes["M0"] == 2 and a["M0"].constant and not a["M1"].constant
    assert [(d.earlier, d.later, d.through, d.tensor) for d in a["M0"].chain] == [
        ("LM", "SLN", ("RM[m1+1]",), "BQK")]


def test_analysis_follows_data_flow_not_names_or_order():
    # the same cascade, tensors renamed and statements shuffled: the same passes
    text = """
    attention shuffled(A1[P,E], B1[M,E], C1[M,F]) -> Z[P,F] {
      Z[p,f]  = Y[p,m] * C1[m,f]
      Y[p,m]  = W[p,m] / X[p]
      X[p]    = sum[m](W[p,m])
      W[p,m]  = exp(U[p,m] - T[p])
      T[p]    = max[m](U[p,m])
      U[p,m]  = A1[p,e] * B1[m,e]
    }"""
    a = count_passes(parse(text).definitions[0])
    assert a.passes["M"] == 3
    assert [(d.earlier, d.later) for d in a["M"].chain] == [("T", "W"), ("X", "Y")]


def test_iterative_rank_counts_a_reduction_over_itself():
    text = """
    attention it(X[I,P]) -> Y[P] {
      S[p]     = sum[i](X[i,p])
      T[0,p]   = 0
      T[i+1,p] = T[i,p] + X[i,p] / S[p]
      U[i,p]   = T[i,p] * 2
      Y[p]     = T[I,p] + sum[i](U[i,p])
    }"""
    a = count_passes(parse(text).definitions[0])
    # S completes pass 1; the recurrence and U (reading its state at i) stream in pass 2
    assert dict(a["I"].einsum_pass) == {"S": 1, "T[i+1]": 2, "U": 2, "Y_sum": 2}
    assert a.passes == {"I": 2, "P": 1}


# ----------------------------------------------------------------------------
# Every example, classified
# ----------------------------------------------------------------------------

# file -> (pass_bound, the pass count of each rank named).  Why:
# * The softmax cascades with a max pass (causal, alibi, bigbird, document_mask,
#   key_padding, prefix_lm, sinks_window, sliding_window, softcap, softmax1, sqa,
#   differential, cascade4) need 3 over M: the max GM completes pass 1 before SN can read
#   it, the sum SD completes pass 2 before A (or AV) can divide by it.
# * gqa_decode, mha, mqa_decode, lse write AV = SN * V / SD: by the term rule the division
#   is inside the sum over m, so AV reads SD at every m and still needs a third pass
#   (deferring the division, as deferred_2pass does, is a rewrite of the cascade).
# * linear_causal sums S over m for its denominator and divides inside the numerator's
#   sum: 2 over M.  cosine normalises the rows of Q and K (a sum over e) before its dot
#   product re-reads them: 2 over E, 1 over M.
# * sigmoid and linear have no normalising reduction before a re-read: 1 pass.
# * cascade5(_causal): 1 over M1 (every reduction over M1 is a recurrence); 2 over the
#   constant M0, which does not count.  online_normalizer_2pass: its second traversal
#   reads the final RM[M1], RD[M1]: 2 over M1.  deferred_2pass: 2 over M.
# * Ranks only in an argument's subscript arithmetic (bigbird's PB, MB; the KV-head rank
#   HK / HKV of the grouped examples; M once tiled into M1 x M0) are not traversed: 0.
EXPECTED = {
    "alibi.attn": (3, {"M": 3, "P": 1, "E": 1, "H": 1}),
    "bigbird.attn": (3, {"M": 3, "PB": 0, "MB": 0}),
    "causal.attn": (3, {"M": 3, "P": 1, "E": 1, "F": 1}),
    "cosine.attn": (2, {"E": 2, "M": 1, "P": 1}),
    "differential.attn": (3, {"M": 3, "E": 1}),
    "document_mask.attn": (3, {"M": 3}),
    "gqa_decode.attn": (3, {"M": 3, "HK": 0, "H": 1}),
    "key_padding.attn": (3, {"M": 3}),
    "linear.attn": (1, {"M": 1, "E": 1}),
    "linear_causal.attn": (2, {"M": 2, "E": 1}),
    "lse.attn": (3, {"M": 3}),
    "mha.attn": (3, {"M": 3}),
    "mqa_decode.attn": (3, {"M": 3}),
    "prefix_lm.attn": (3, {"M": 3}),
    "sigmoid.attn": (1, {"M": 1}),
    "sinks_window.attn": (3, {"M": 3}),
    "sliding_window.attn": (3, {"M": 3}),
    "softcap.attn": (3, {"M": 3}),
    "softmax1.attn": (3, {"M": 3}),
    "sqa.attn": (3, {"M": 3, "HKV": 0}),
    "fusemax/cascade4.attn": (3, {"M": 3}),
    "fusemax/cascade5.attn": (1, {"M1": 1, "M0": 2, "M": 0}),
    "fusemax/cascade5_causal.attn": (1, {"M1": 1, "M0": 2, "M": 0}),
    "fusemax/deferred_2pass.attn": (2, {"M": 2}),
    "fusemax/online_normalizer_2pass.attn": (2, {"M1": 2, "M0": 3}),
}


@pytest.mark.parametrize("path", all_examples(), ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_every_example_is_classified(path):
    key = str(path.relative_to(EXAMPLES))
    for defn in parse_file(path).definitions:
        a = count_passes(defn)
        symbolic = [rp.count for rp in a.ranks if not rp.constant]
        assert a.pass_bound == max(symbolic + [1])
        for rp in a.ranks:
            assert len(rp.chain) == max(rp.count - 1, 0)
            assert [d.pass_number for d in rp.chain] == list(range(2, rp.count + 1))
        if key in EXPECTED:  # examples added after this table are checked for consistency only
            bound, passes = EXPECTED[key]
            assert a.pass_bound == bound
            assert {r: a.passes[r] for r in passes} == passes


def test_expected_table_names_real_files():
    missing = [k for k in EXPECTED if not (EXAMPLES / k).exists()]
    assert not missing


# ----------------------------------------------------------------------------
# Costs
# ----------------------------------------------------------------------------


def test_cascade4_flops_match_hand_formulas():
    # one FLOP per operator per point; a reduction over R adds |R| - 1 steps per output
    costs = cascade_costs(count_passes(parse(CASCADE4).definitions[0]))
    hand = {"QK": 2 * P * M * E + P * M * (E - 1), "GM": P * (M - 1), "SN": 2 * P * M,
            "SD": P * (M - 1), "A": P * M, "AV": P * M * F + P * F * (M - 1)}
    assert {k: sympy.expand(v - hand[k]) for k, v in costs.flops.items()} == dict.fromkeys(hand, 0)
    assert sympy.expand(costs.total_flops - sum(hand.values())) == 0
    assert evaluate(costs.flops["QK"], SIZES) == 3 * 8192 * 8192 * 128 - 8192 * 8192


def test_compulsory_bytes_intensity_and_footprint():
    costs = cascade_costs(count_passes(parse(CASCADE4).definitions[0]))
    assert sympy.expand(costs.compulsory_bytes - 4 * (P * E + M * E + M * F + P * F)) == 0
    nbytes = 4 * (8192 * 128 * 4)
    assert evaluate(costs.compulsory_bytes, SIZES) == nbytes
    assert evaluate(costs.intensity, SIZES) == pytest.approx(evaluate(costs.total_flops, SIZES) / nbytes)
    assert costs.footprint_elements == M  # a whole M-fiber stays live across 3 passes


def test_dtypes_set_bytes_and_outputs_follow_the_first_float_input():
    text = "attention d(Q[P,E]: bf16, K[M,E]: f64, B[M]: bool) -> S[P,M] {\n S[p,m] = Q[p,e] * K[m,e] * B[m]\n}"
    costs = cascade_costs(count_passes(parse(text).definitions[0]))
    assert [(t.name, t.dtype) for t in costs.traffic] == [("Q", "bf16"), ("K", "f64"), ("B", "bool"),
                                                         ("S", "bf16")]
    assert sympy.expand(costs.compulsory_bytes - (2 * P * E + 8 * M * E + M + 2 * P * M)) == 0


def test_cascade5_footprint_is_the_constant_tile():
    path = FUSEMAX / "cascade5.attn"
    if not path.exists():
        pytest.skip(f"{path} not written yet")
    defn = parse_file(path).definitions[0]
    costs = cascade_costs(count_passes(defn))
    assert evaluate(costs.footprint_elements, known_sizes(defn, {})) == 64
    assert known_sizes(defn, {"M": 8192}) == {"M": 8192, "M0": 64, "M1": 128}


def test_sizes_are_checked():
    module = parse_file(EXAMPLES / "gqa_decode.attn") if (EXAMPLES / "gqa_decode.attn").exists() \
        else parse("attention g(Q[H,P,E], K[HK,M,E]) -> S[H,P,M] {\n let G = H / HK\n"
                   " S[h,p,m] = Q[h,p,e] * K[h // G, m, e]\n}")
    with pytest.raises(ValueError, match="unknown size name.*ZZ"):
        build_report(module, {"ZZ": 3})
    with pytest.raises(ValueError, match="let G"):
        build_report(module, {"H": 6, "HK": 4})
    with pytest.raises(ValueError, match="positive integer"):
        build_report(module, {"M": 0})
    report = build_report(module, {"M": 1024})  # the rest stays symbolic
    assert report["definitions"][0]["stages"][0]["flops"]["value"] is None


# ----------------------------------------------------------------------------
# Fusion groups
# ----------------------------------------------------------------------------


def test_fusion_groups_follow_passes_with_reasons():
    groups = fusion_groups(analyse(FUSEMAX / "deferred_2pass.attn"))
    assert [g.einsums for g in groups] == [("QK", "GM"), ("SN", "SD", "SNV", "AV")]
    assert [m.role for m in groups[1].members] == ["stream", "stream", "stream", "after"]
    (dep,) = groups[1].blocked_by
    assert (dep.earlier, dep.later, dep.tensor) == ("GM", "SN", "QK")


def test_one_pass_cascade_is_one_group():
    groups = fusion_groups(analyse(FUSEMAX / "online_normalizer_2pass.attn"))
    assert len(groups) == 2 and groups[0].members[0].role == "before"
    text = "attention s(Q[P,E], K[M,E], V[M,F]) -> AV[P,F] {\n AV[p,f] = exp(Q[p,e] * K[m,e]) * V[m,f]\n}"
    (group,) = fusion_groups(count_passes(parse(text).definitions[0]))
    assert group.blocked_by == ()


# ----------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------


def test_render_report_cascade4(golden):
    module = parse(CASCADE4, "cascade4.attn")
    golden(render_report(build_report(module, SIZES)))


def test_report_json_schema():
    module = parse_file(FUSEMAX / "deferred_2pass.attn")
    report = json.loads(json.dumps(build_report(module, SIZES)))
    assert list(report) == ["schema", "sizes", "definitions"]
    (defn,) = report["definitions"]
    assert list(defn) == ["name", "stages"]
    (stage,) = defn["stages"]
    assert list(stage)[:3] == ["after", "pass_bound", "passes"]
    assert list(stage) == ["after", "pass_bound", "passes", "bound_rank", "ranks", "einsums",
                           "flops", "compulsory_bytes", "arithmetic_intensity", "footprint",
                           "fusion", "cascade", "online_blockers", "not_one_pass"]
    assert stage["after"] == "input" and stage["pass_bound"] == 2
    assert stage["passes"] == {"P": 1, "E": 1, "M": 2, "F": 1}
    assert list(stage["ranks"][0]) == ["rank", "size", "value", "constant", "passes",
                                       "einsum_pass", "chain", "footprint", "data_dependent",
                                       "indexed_by"]
    assert list(stage["einsums"][0]) == ["name", "statement", "space", "reduces", "passes",
                                         "group", "role", "flops"]
    assert list(stage["flops"]) == ["expr", "value"] and isinstance(stage["flops"]["value"], int)
    assert list(stage["fusion"][1]) == ["group", "rank", "members", "blocked_by"]
    assert list(stage["fusion"][1]["blocked_by"][0]) == ["pass", "earlier", "later", "through",
                                                         "tensor", "kind", "text"]


def test_report_has_one_stage_per_given_module():
    module = parse(CASCADE4)
    deferred = parse_file(FUSEMAX / "deferred_2pass.attn")
    renamed = Module((dataclasses.replace(deferred.definitions[0], name="cascade4"),))
    report = build_report(module, None, [("input", module), ("defer", renamed)])
    stages = report["definitions"][0]["stages"]
    assert [(s["after"], s["pass_bound"]) for s in stages] == [("input", 3), ("defer", 2)]


def test_report_handles_every_example():
    for path in all_examples():
        report = build_report(parse_file(path), {k: v for k, v in SIZES.items()
                                                 if k in parse_file(path).definitions[0].ranks})
        assert render_report(report)
        json.dumps(report)


def test_report_dot_colours_einsums_by_pass():
    dot = report_dot(parse(CASCADE4))
    assert dot.startswith("digraph") and dot.rstrip().endswith("}")
    for colour in PASS_COLOURS[:3]:
        assert f'fillcolor="{colour}"' in dot
    assert '"cascade4/GM" -> "cascade4/SN"' in dot
    assert PASS_COLOURS[3] not in dot


# ----------------------------------------------------------------------------
# Brute force: stream random cascades element by element and count the traversals
# ----------------------------------------------------------------------------

RANKS = ("P", "M", "E")
ARGS = {"X": ("P", "M"), "K": ("M", "E"), "Z": ("P",), "W": ("P", "E"), "V": ("M",)}
# (left-side ranks, reduced ranks) of the statement shapes the generator draws from
SHAPES = [(("P", "M"), ()), (("P",), ()), (("P", "M", "E"), ()), (("P", "E"), ()),
          (("M",), ()), (("P",), ("M",)), (("P", "M"), ("E",)), (("P",), ("E",)),
          (("P", "E"), ("M",)), (("M",), ("P",))]


@st.composite
def cascades(draw):
    """A random cascade as [(name, lhs, reduced, reads)], every read aligned."""
    tensors = dict(ARGS)
    statements = []
    for k in range(draw(st.integers(1, 7))):
        lhs, red = draw(st.sampled_from(SHAPES))
        scope = set(lhs) | set(red)
        fits = sorted(t for t, r in tensors.items() if set(r) <= scope)
        reads = draw(st.lists(st.sampled_from(fits), min_size=1, max_size=3, unique=True))
        for rank in red:  # a reduction reads something along what it reduces
            if not any(rank in tensors[t] for t in reads):
                reads.append(next(t for t in fits if rank in tensors[t]))
        name = f"T{k}"
        statements.append((name, lhs, red, tuple(reads), draw(st.sampled_from(["sum", "max"]))))
        tensors[name] = lhs
    return statements


def cascade_source(statements) -> str:
    tensors = dict(ARGS)
    read = {t for s in statements for t in s[3]}
    lines = []
    for name, lhs, red, reads, op in statements:
        tensors[name] = lhs
        body = " * ".join(f"exp({t}[{','.join(r.lower() for r in tensors[t])}])" for t in reads)
        if red:
            body = f"{op}[{','.join(r.lower() for r in red)}]({body})"
        lines.append(f"  {name}[{','.join(r.lower() for r in lhs)}] = {body}")
    outs = [f"{n}[{','.join(lhs)}]" for n, lhs, *_ in statements if n not in read]
    args = ", ".join(f"{t}[{','.join(r)}]" for t, r in ARGS.items())
    return f"attention g({args}) -> ({', '.join(outs)}) {{\n" + "\n".join(lines) + "\n}\n"


def streamed_traversals(statements, rank: str, extent: int = 3) -> int:
    """Run the cascade as a streaming executor over ``rank`` and count its traversals.

    A traversal visits the elements 0..extent-1 of ``rank`` in order; at each element,
    every Einsum that joined the traversal (in statement order) reads its operands there.
    An Einsum joins a traversal when its operands at element 0 are ready; an Einsum with
    ``rank`` on its left publishes element r as it goes; one that reduces ``rank``
    publishes only when the traversal ends.  Einsums without ``rank`` run between
    traversals, once everything they read is complete.
    """
    ranks = dict(ARGS)
    ranks.update({s[0]: s[1] for s in statements})
    ready: dict[str, set[int]] = {t: set(range(extent)) for t in ARGS}
    iterating = [s for s in statements if rank in s[1] or rank in s[2]]
    done: set[str] = set()

    def whole(t: str) -> bool:
        return len(ready.get(t, ())) == extent

    def run_between() -> None:
        for name, lhs, red, reads, _ in statements:
            if name not in done and not (rank in lhs or rank in red) and all(map(whole, reads)):
                done.add(name)
                ready[name] = set(range(extent))

    def at(t: str, r: int) -> bool:
        return r in ready.get(t, ()) if rank in ranks[t] else whole(t)

    run_between()
    traversals = 0
    while any(s[0] not in done for s in iterating):
        joined = []
        for r in range(extent):
            for name, lhs, red, reads, _ in iterating:
                if name in done or (r == 0 and not all(at(t, 0) for t in reads)):
                    continue
                if r > 0 and name not in joined:
                    continue
                assert all(at(t, r) for t in reads)
                if r == 0:
                    joined.append(name)
                if rank in lhs:
                    ready.setdefault(name, set()).add(r)
        assert joined, "no progress: the cascade is not streamable"
        traversals += 1
        for name, lhs, red, reads, _ in iterating:
            if name in joined:
                done.add(name)
                ready[name] = set(range(extent))
        run_between()
    return traversals


@given(cascades())
def test_pass_count_matches_a_streaming_executor(statements):
    defn = parse(cascade_source(statements)).definitions[0]
    analysis = count_passes(defn)
    for rank in RANKS:
        assert analysis.passes[rank] == streamed_traversals(statements, rank)


def test_streaming_executor_on_cascade4():
    # the oracle itself, on a hand-checked case: QK, GM | SN, SD | A, AV
    statements = [("QK", ("P", "M"), ("E",), ("W", "K"), "sum"), ("GM", ("P",), ("M",), ("QK",), "max"),
                  ("SN", ("P", "M"), (), ("QK", "GM"), "sum"), ("SD", ("P",), ("M",), ("SN",), "sum"),
                  ("A", ("P", "M"), (), ("SN", "SD"), "sum"), ("AV", ("P", "E"), ("M",), ("A", "K"), "sum")]
    assert streamed_traversals(statements, "M") == 3
    # AV's output carries E again: E is traversed a second time, after QK's sum over e
    assert streamed_traversals(statements, "E") == 2
    assert streamed_traversals(statements, "P") == 1
    assert count_passes(parse(cascade_source(statements)).definitions[0]).passes["M"] == 3


def test_a_copy_of_an_argument_is_the_argument():
    """The online pass's tile copies are the inputs they copy: reading one out of order
    (a per-head gate from another head's value row) is no re-read of a computed fiber."""
    direct = """
attention g(Q[P,H,E], V[M,H,F]) -> O[P,H,F] {
  O[p,h,f] = sum[m](Q[p,h,0] * V[m,h,f] * V[m, H - 1 - h, f])
}"""
    copied = """
attention g(Q[P,H,E], V[M,H,F]) -> O[P,H,F] {
  BV[m,h,f] = V[m,h,f]
  O[p,h,f] = sum[m](Q[p,h,0] * BV[m,h,f] * BV[m, H - 1 - h, f])
}"""
    filtered = copied.replace("BV[m,h,f] = V[m,h,f]", "BV[m,h,f] = V[m,h,f]   where f > 0")
    a, b, c = (count_passes(parse(t).definitions[0]) for t in (direct, copied, filtered))
    assert a.passes == b.passes and b.pass_bound == 1
    assert c.passes["H"] == 2, "a filtered copy is a computed tensor: its reordered read counts"


@settings(max_examples=30, deadline=None)
@given(definitions(data_masks=True))
def test_a_cascade_left_above_one_pass_says_why(defn):
    """Every cascade the pipeline leaves above one pass gets a reason, and it is true: the
    report's first reasons are the pass count's own dependences over the bound rank."""
    from attnc.passes.pipeline import run_pipeline

    stages = run_pipeline(Module((defn,)), options={"tile": 4})
    report = build_report(Module((defn,)), stages=stages)
    final = report["definitions"][0]["stages"][-1]
    if final["pass_bound"] <= 1:
        assert final["not_one_pass"] == []
        return
    chain = count_passes(stages[-1][1].definitions[0])[final["bound_rank"]].chain
    assert chain and final["not_one_pass"][:len(chain)] == [d.describe() for d in chain]
    assert len(final["not_one_pass"]) > len(chain), "and why the online pass leaves them"
    assert "because:" in render_report(report)
