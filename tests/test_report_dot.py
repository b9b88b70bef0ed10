"""``attnc report``: symbolic flops in the stages table; ``--dot`` draws every stage, the
reads that force an extra pass, and the recurrences of iterative ranks."""
from __future__ import annotations

import json
import re

import sympy
from sympy.parsing.sympy_parser import parse_expr

from attnc.frontends import parse
from attnc.frontends.cli import main
from attnc.passes.report import (PASS_EDGE, RECURRENCE_EDGE, TILE_PASS_EDGE, build_report,
                                 leading_terms, parse_cost, render_report, report_dot)

from conftest import EXAMPLES

CAUSAL = EXAMPLES / "causal.attn"
SIZES = {"M": 1000, "P": 300, "E": 64, "F": 32}
SIZE_ARG = ",".join(f"{k}={v}" for k, v in SIZES.items())


def report_json(capsys, *extra) -> dict:
    assert main(["report", str(CAUSAL), "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def stages_table(text: str) -> list[str]:
    """The rows of the first ``== NAME: stages`` table (header first)."""
    block = text.split(": stages\n\n", 1)[1].split("\n\n", 1)[0]
    return [line.strip() for line in block.splitlines()]


# ----------------------------------------------------------------------------
# Symbolic flops in the stages table
# ----------------------------------------------------------------------------


def test_stages_table_without_sizes_shows_symbolic_flops(capsys):
    assert main(["report", str(CAUSAL)]) == 0
    text = capsys.readouterr().out
    rows = stages_table(text)
    assert rows[0].split()[-2:] == ["flops", "footprint"]
    body = {row.split()[0]: row for row in rows[1:]}
    # the leading terms, factored: the Q.K^T and A.V products
    assert body["input"].endswith("M*P*(3*E + 2*F) + ...      M")
    assert "M0*M1*P*(3*E + 2*F) + ..." in body["online"] and body["online"].endswith("64")
    costs = rows[0].index("flops")  # the cost columns: never "-" for an unknown value
    assert all(row[costs:].split()[0] != "-" and not row.endswith(" -") for row in rows[1:])
    # and the whole expression of every stage under the table (unchanged ones refer back)
    listing = text.split("flops per stage", 1)[1].split("\n\n", 1)[0]
    assert "input                3*E*M*P + 2*F*M*P - F*P + 4*M*P - 2*P" in listing
    assert "canonicalize         = input" in listing


def test_stages_table_with_sizes_keeps_the_numbers(capsys):
    assert main(["report", str(CAUSAL), "--size", SIZE_ARG]) == 0
    text = capsys.readouterr().out
    row = next(r for r in stages_table(text) if r.startswith("input"))
    assert row.split()[-2:] == ["77,989,800", "1,000"]  # 3EMP + 2FMP - FP + 4MP - 2P
    assert "flops per stage" not in text


def test_json_flops_expression_evaluates_to_the_sized_value(capsys):
    symbolic = report_json(capsys)
    sized = report_json(capsys, "--size", SIZE_ARG)
    for defn, defn_sized in zip(symbolic["definitions"], sized["definitions"]):
        for stage, stage_sized in zip(defn["stages"], defn_sized["stages"]):
            assert stage["flops"]["value"] is None
            ranks = {r["rank"]: sympy.Symbol(r["rank"]) for r in stage["ranks"]}
            expr = parse_expr(stage["flops"]["expr"], local_dict=ranks)
            values = {ranks[r["rank"]]: r["value"] for r in stage_sized["ranks"]
                      if r["value"] is not None}
            values.update({ranks[k]: v for k, v in SIZES.items()})
            if "M1" in ranks:  # the online tiles: M1 = ceil(M / M0)
                values[ranks["M1"]] = -(-SIZES["M"] // values[ranks["M0"]])
            assert expr.subs(values) == stage_sized["flops"]["value"], stage["after"]


def test_leading_terms():
    M, P, E = (sympy.Symbol(n) for n in "MPE")
    assert leading_terms(3 * E * M * P + 4 * M * P - 2 * P) == "3*E*M*P + ..."
    assert leading_terms(2 * E * M + 3 * E * P + M) == "E*(2*M + 3*P) + ..."
    assert leading_terms(M + P) == "M + P"      # nothing left out
    assert leading_terms(3 * M * P) is None     # a single term is its own short form
    # rank names that are sympy constants elsewhere stay symbols
    assert parse_cost("E*N + S*Q").free_symbols == {sympy.Symbol(n, integer=True, positive=True)
                                                   for n in "ENSQ"}


def test_render_report_of_a_json_report_round_trip():
    """render_report works on a report read back from JSON, sizes partly given."""
    module = parse(CAUSAL.read_text())
    report = json.loads(json.dumps(build_report(module, {"M": 1000}, [("input", module),
                                                                      ("again", module)])))
    text = render_report(report)
    assert "M*P*(3*E + 2*F) + ..." in text and "again  = input" in text


# ----------------------------------------------------------------------------
# --dot: every stage, pass-forcing reads, recurrences
# ----------------------------------------------------------------------------


def dot_of(tmp_path, capsys, spec=CAUSAL) -> tuple[str, list[str]]:
    path = tmp_path / "out.dot"
    assert main(["report", str(spec), "--dot", str(path), "--json"]) == 0
    stages = [s["after"] for s in json.loads(capsys.readouterr().out)["definitions"][0]["stages"]]
    return path.read_text(), stages


def edge_attrs(dot: str, src: str, dst: str) -> str | None:
    """The attribute list of the edge ``src -> dst`` ("" when it has none), None if absent."""
    m = re.search(re.escape(f'"{src}" -> "{dst}"') + r"( \[(.*)\])?;", dot)
    return None if m is None else (m.group(2) or "")


def test_dot_has_one_cluster_per_stage(tmp_path, capsys):
    dot, stages = dot_of(tmp_path, capsys)
    assert stages == ["input", "canonicalize", "defer-normalization", "reassociate", "online",
                      "stream-final"]
    clusters = re.findall(r'subgraph "cluster_causal_softmax/([^"]+)"', dot)
    assert clusters == stages
    assert 'label="after input: 3-pass over M"' in dot
    assert 'label="after online: 1-pass"' in dot
    # a stage whose cascade is the previous one's says so instead of drawing it again
    assert '"causal_softmax/canonicalize" [shape=note' in dot
    assert "the cascade after input, unchanged" in dot
    assert '"causal_softmax/canonicalize/GM"' not in dot
    assert dot.count("{") == dot.count("}")


def test_dot_marks_the_reads_that_force_a_pass(tmp_path, capsys):
    dot, _ = dot_of(tmp_path, capsys)
    gm_sn = edge_attrs(dot, "causal_softmax/input/GM", "causal_softmax/input/SN")
    assert f'color="{PASS_EDGE}"' in gm_sn and 'label="pass 2 over M"' in gm_sn
    sd_a = edge_attrs(dot, "causal_softmax/input/SD", "causal_softmax/input/A")
    assert f'color="{PASS_EDGE}"' in sd_a and 'label="pass 3 over M"' in sd_a
    # a streamed read is a plain edge; so is a read after a reduction over a 1-pass rank
    assert edge_attrs(dot, "causal_softmax/input/QK", "causal_softmax/input/GM") == ""
    assert edge_attrs(dot, "causal_softmax/input/Q", "causal_softmax/input/QK") == ""
    # deferring the division leaves one dependency: pass 3 is gone
    assert "pass 3 over M" not in dot.split('cluster_causal_softmax/defer-normalization"')[1]
    # the online stage: the tile's second pass (LM completes before SLN, via RM) is orange
    lm_rm = edge_attrs(dot, "causal_softmax/online/LM", "causal_softmax/online/RM[m1+1]")
    assert f'color="{TILE_PASS_EDGE}"' in lm_rm and 'label="pass 2 over M0"' in lm_rm
    rm_sln = edge_attrs(dot, "causal_softmax/online/RM[m1+1]", "causal_softmax/online/SLN")
    assert f'color="{TILE_PASS_EDGE}"' in rm_sln and "label" not in rm_sln


def test_dot_draws_the_recurrence_of_an_iterative_rank(tmp_path, capsys):
    dot, _ = dot_of(tmp_path, capsys)
    for state in ("RM", "RD", "RNV"):
        node = f"causal_softmax/online/{state}[m1+1]"
        loop = edge_attrs(dot, node, node)
        assert loop is not None and f'color="{RECURRENCE_EDGE}"' in loop
        assert 'label="m1 -> m1+1 (over M1)"' in loop
        # and its init feeds it
        assert edge_attrs(dot, f"causal_softmax/online/{state}[0]", node) == ""
    assert "(over M1)" not in dot.split('cluster_causal_softmax/online"')[0]  # none before


def test_dot_is_deterministic(tmp_path, capsys):
    first, _ = dot_of(tmp_path, capsys)
    second, _ = dot_of(tmp_path, capsys, EXAMPLES / "differential.attn")
    third, _ = dot_of(tmp_path, capsys)
    assert first == third and first != second
    # both chains of differential are marked, not only the longest path's
    for i in "12":
        assert 'label="pass 2 over M"' in edge_attrs(
            second, f"differential/input/GM{i}", f"differential/input/SN{i}")


def test_report_dot_of_a_bare_module_keeps_one_cluster_per_definition():
    dot = report_dot(parse(CAUSAL.read_text()))
    assert re.findall(r'subgraph "(cluster_[^"]+)"', dot) == ["cluster_causal_softmax"]
    assert 'label="pass 2 over M"' in edge_attrs(dot, "causal_softmax/GM", "causal_softmax/SN")
