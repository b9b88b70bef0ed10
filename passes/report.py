"""The cascade report: passes, dependencies, costs and fusion groups of every definition.

``build_report`` gathers everything as a JSON-able dict with a stable key order (the
schema is in ``docs/report.md``); ``render_report`` lays it out as aligned text (a cost
whose sizes are not all given is symbolic); ``report_dot`` draws every stage's cascade as a
Graphviz graph: Einsums coloured by pass, the reads that force an extra pass marked, the
recurrences of iterative ranks drawn as loops.  Each
stage of a report is one version of the module ("input", then one per transformation
pass); a definition's list of stages shows how the passes change.
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

import sympy

from ..einsum_ir.ir import (Access, Definition, IterativeEinsum, Module, Num, Statement,
                            size_symbol)
from ..einsum_ir.printer import print_definition, print_size, print_statement
from ..einsum_ir.schedule import statement_reads
from .canonicalize import canonicalize
from .costs import (COMPUTE_BYTES, CascadeCosts, cascade_costs, evaluate, known_sizes,
                    sequential_steps, stored_elements)
from .fusion import STREAM, FusionGroup, fusion_groups
from .passcount import (Dependency, PassAnalysis, count_passes, iteration_space,
                        reduced_ranks, statement_label)

SCHEMA = "attnc.report/1"
PASS_COLOURS = ("#8dd3c7", "#ffffb3", "#bebada", "#fb8072", "#80b1d3", "#fdb462", "#b3de69",
                "#fccde5")
INPUT_COLOUR = "#eeeeee"


# ----------------------------------------------------------------------------
# build_report
# ----------------------------------------------------------------------------


def build_report(module: Module, sizes: Mapping[str, int] | None = None,
                 stages: Sequence[tuple[str, Module]] | None = None) -> dict:
    """The report of every definition of ``module``, one entry per stage.

    ``sizes`` binds rank sizes (``{"M": 8192}``) for the values next to each symbolic
    cost; a name that is no rank of any definition is a ``ValueError``; ranks left out stay
    symbolic.  ``stages`` defaults to ``[("input", module)]``; each stage's definitions are
    analysed in canonical form.
    """
    stages = list(stages) if stages is not None else [("input", module)]
    _check_size_names(sizes or {}, [module] + [m for _, m in stages])
    definitions = []
    for defn in module.definitions:
        versions = [(name, _find(m, defn.name)) for name, m in stages]
        entry = {
            "name": defn.name,
            "stages": [stage_report(name, d, sizes) for name, d in versions if d is not None],
        }
        forms = forms_report(defn, sizes)
        if forms:
            entry["forms"] = forms
        definitions.append(entry)
    return {"schema": SCHEMA, "sizes": dict(sizes or {}), "definitions": definitions}


def _check_size_names(sizes: Mapping[str, int], modules: list[Module]) -> None:
    ranks = {r for m in modules for d in m.definitions for r in d.ranks}
    unknown = sorted(set(sizes) - ranks)
    if unknown:
        raise ValueError(f"unknown size name(s) {', '.join(unknown)}: the ranks are "
                         f"{', '.join(sorted(ranks)) or '(none)'}")


def _find(module: Module, name: str) -> Definition | None:
    return next((d for d in module.definitions if d.name == name), None)


def stage_report(after: str, defn: Definition, sizes: Mapping[str, int] | None) -> dict:
    """One stage of one definition: passes, dependencies, costs, fusion, the cascade."""
    analysis = count_passes(defn)
    canonical = analysis.definition
    known = known_sizes(canonical, sizes)
    costs = cascade_costs(analysis)
    groups = fusion_groups(analysis)
    return {
        "after": after,
        "pass_bound": analysis.pass_bound,
        "passes": analysis.passes,
        "bound_rank": analysis.bound_rank,
        "ranks": [_rank_entry(canonical, rp, foot, known)
                  for rp, foot in zip(analysis.ranks, costs.footprints)],
        "einsums": _einsum_entries(analysis, costs, groups, known),
        "flops": _quantity(costs.total_flops, known),
        "compulsory_bytes": {**_quantity(costs.compulsory_bytes, known),
                             "tensors": [_traffic_entry(t, known) for t in costs.traffic]},
        "arithmetic_intensity": _quantity(costs.intensity, known),
        "footprint": {"elements": _quantity(costs.footprint_elements, known),
                      "bytes": _quantity(costs.footprint_bytes, known)},
        "fusion": [_group_entry(g) for g in groups],
        "cascade": print_definition(canonical),
        "online_blockers": _online_blockers(defn) if analysis.pass_bound > 1 else [],
        "not_one_pass": not_one_pass(analysis, defn) if analysis.pass_bound > 1 else [],
    }


def forms_report(defn: Definition, sizes: Mapping[str, int] | None) -> list[dict]:
    """The recurrent, chunked and quadratic forms of a definition with a chunked form
    (``chunked.chunked_forms``, on the cascade after defer-normalization), side by side:
    FLOPs, sequential steps, the cost the choice compares, stored intermediates, the live
    footprint; ``chosen`` marks the cheaper of the chunked and the quadratic form.  Empty
    when no sum has a chunked form."""
    from .chunked import chunked_forms
    from .defer_normalization import defer_normalization

    forms = chunked_forms(defer_normalization(canonicalize(defn)), dict(sizes or {}))
    if not forms:
        return []
    chosen = min(forms[1:], key=lambda f: f.cost).name
    out = []
    for form in forms:
        analysis = count_passes(form.definition)
        known = known_sizes(analysis.definition, sizes)
        costs = cascade_costs(analysis)
        out.append({
            "form": form.name,
            "chunks": list(form.chunks),
            "chosen": form.name == chosen,
            "pass_bound": analysis.pass_bound,
            "flops": _quantity(costs.total_flops, known),
            "steps": _quantity(sequential_steps(form.definition), known),
            "cost": form.cost,
            "stored_elements": _quantity(stored_elements(form.definition), known),
            "footprint": {"elements": _quantity(costs.footprint_elements, known),
                          "bytes": _quantity(costs.footprint_bytes, known)},
            "cascade": print_definition(form.definition),
        })
    return out


def not_one_pass(analysis: PassAnalysis, defn: Definition) -> list[str]:
    """Why a stage needs more than one pass, always with a true reason: the dependences
    over the bound rank (from the pass count: each re-read and what completes first), then
    why the online pass does not remove them (its blockers, or that no max read inside
    ``exp`` over that rank gives it a shift to rescale by)."""
    from .online import candidate_maxes, fold_max_inits

    rank = analysis.bound_rank
    rp = analysis[rank]
    lines = [d.describe() for d in rp.chain]
    blockers = _online_blockers(defn)
    lines += blockers
    if not blockers:
        shifted = rank in candidate_maxes(fold_max_inits(canonicalize(defn))[0])
        lines.append(
            f"online: {'the max' if shifted else 'no max'} over {rank.lower()} "
            + ("is not blocked, but a later reduction still re-reads a fiber it completed"
               if shifted else
               f"is read inside exp/exp2, so there is no running max to rescale partial sums "
               f"by; plain running reductions stream {rank.lower()} only where the cascade "
               f"already makes one pass over it"))
    return lines


def _online_blockers(defn: Definition) -> list[str]:
    """Why the online pass cannot make this stage one-pass (its own explanation)."""
    from .online import online_blockers

    return online_blockers(defn)


def _quantity(expr: sympy.Expr, known: Mapping[str, int]) -> dict:
    return {"expr": str(expr), "value": evaluate(expr, known)}


def _rank_size_text(defn: Definition, rank: str) -> str:
    let = next((x for x in defn.lets if x.name == rank), None)
    return print_size(let.value) if let is not None else rank


def _rank_entry(defn: Definition, rp, foot, known: Mapping[str, int]) -> dict:
    return {
        "rank": rp.rank,
        "size": _rank_size_text(defn, rp.rank),
        "value": known.get(rp.rank),
        "constant": rp.constant,
        "passes": rp.count,
        "einsum_pass": dict(rp.einsum_pass),
        "chain": [_dependency_entry(d) for d in rp.chain],
        "footprint": {**_quantity(foot.elements, known), "reason": foot.reason},
        "data_dependent": bool(rp.indexed_by),
        "indexed_by": list(rp.indexed_by),
    }


def _dependency_entry(dep: Dependency) -> dict:
    return {"pass": dep.pass_number, "earlier": dep.earlier, "later": dep.later,
            "through": list(dep.through), "tensor": dep.tensor, "kind": dep.kind,
            "text": dep.describe()}


def _einsum_entries(analysis: PassAnalysis, costs: CascadeCosts, groups, known) -> list[dict]:
    where = {m.einsum: (g.number, m.role) for g in groups for m in g.members}
    out = []
    for st in analysis.definition.statements:
        label = statement_label(st)
        space = iteration_space(st)
        out.append({
            "name": label,
            "statement": print_statement(st),
            "space": list(space),
            "reduces": list(reduced_ranks(st)),
            "passes": {rp.rank: rp.einsum_pass[label] for rp in analysis.ranks
                       if label in rp.einsum_pass},
            "group": where[label][0],
            "role": where[label][1],
            "flops": _quantity(costs.flops[label], known),
        })
    return out


def _traffic_entry(t, known) -> dict:
    return {"name": t.name, "role": t.role, "dtype": t.dtype,
            "elements": _quantity(t.elements, known), "bytes": _quantity(t.bytes, known)}


def _group_entry(g: FusionGroup) -> dict:
    return {"group": g.number, "rank": g.rank,
            "members": [{"einsum": m.einsum, "role": m.role} for m in g.members],
            "blocked_by": [_dependency_entry(d) for d in g.blocked_by]}


# ----------------------------------------------------------------------------
# render_report
# ----------------------------------------------------------------------------


def render_report(report: dict) -> str:
    """The report as aligned plain text, one block per definition and stage."""
    blocks = []
    sizes = report.get("sizes") or {}
    for defn in report["definitions"]:
        stages = defn["stages"]
        if len(stages) > 1:
            blocks.append(_render_summary(defn["name"], stages))
        if defn.get("forms"):
            blocks.append(_render_forms(defn["name"], defn["forms"]))
        for before, stage in zip([None] + stages, stages):
            if before is not None and before["cascade"] == stage["cascade"]:
                text = (f"== {defn['name']} (after {stage['after']}): "
                        f"the cascade after {before['after']}, unchanged\n")
                if stage is stages[-1] and stage.get("not_one_pass"):
                    text += (f"still {stage['pass_bound']}-pass over {stage['bound_rank']} "
                             f"because:\n" + "\n".join(_indent(stage["not_one_pass"])) + "\n")
                blocks.append(text)
            else:
                blocks.append(_render_stage(defn["name"], stage, sizes))
    return "\n".join(blocks)


def _render_summary(name: str, stages: list[dict]) -> str:
    """One row per stage: pass bound, passes per rank, flops and footprint.  A cost whose
    value is unknown (no ``--size``, or ranks left out) is symbolic: in full when short,
    else its leading terms; the full flops of every stage then follow the table."""
    ranks = list(dict.fromkeys(r for s in stages for r in s["passes"]))
    flops = [_cost_cell(s["flops"]) for s in stages]
    rows = [[s["after"], str(s["pass_bound"])] + [str(s["passes"].get(r, "-")) for r in ranks]
            + [cell, _cost_cell(s["footprint"]["elements"])]
            for s, cell in zip(stages, flops)]
    header = ["after", "pass bound"] + [f"passes({r})" for r in ranks] + ["flops", "footprint"]
    lines = [f"== {name}: stages", ""] + _indent(_table(header, rows))
    symbolic = [s for s in stages if s["flops"]["value"] is None]
    if symbolic:
        shortened = any(cell != s["flops"]["expr"] for s, cell in zip(stages, flops)
                        if s["flops"]["value"] is None)
        lines += ["", "  flops per stage" + (" (the table shows the leading terms; ... stands "
                                             "for lower-order ones):" if shortened else ":")]
        width = max(len(s["after"]) for s in symbolic)
        for before, s in zip([None] + stages, stages):
            if s["flops"]["value"] is None:
                same = before is not None and before["flops"]["expr"] == s["flops"]["expr"]
                lines.append(f"    {s['after']:<{width}}  "
                             + (f"= {before['after']}" if same else s["flops"]["expr"]))
    return "\n".join(lines) + "\n"


SHORT_COST = 24  # a symbolic cost up to this long is shown whole in the stages table


def _cost_cell(quantity: dict) -> str:
    """A QUANTITY for a table cell: its value, else its expression, or when that is longer
    than ``SHORT_COST`` its leading terms (``M*P*(3*E + 2*F) + ...``)."""
    if quantity["value"] is not None:
        return _fmt(quantity["value"])
    text = quantity["expr"]
    if len(text) <= SHORT_COST:
        return text
    lead = leading_terms(parse_cost(text))
    return text if lead is None else lead


def parse_cost(text: str) -> sympy.Expr:
    """A report's expression text back as sympy.  Every name not called as a function is a
    rank's size (``E``, ``S``, ``Q`` are ranks here, not sympy's constants), as
    :func:`~..einsum_ir.ir.size_symbol` makes them."""
    from sympy.parsing.sympy_parser import parse_expr

    names = {m.group(1) for m in _NAME.finditer(text)} - {"oo", "zoo", "nan"}
    return parse_expr(text, local_dict={n: size_symbol(n) for n in sorted(names)})


_NAME = re.compile(r"\b([A-Za-z_]\w*)\b(?!\s*\()")


def leading_terms(expr: sympy.Expr) -> str | None:
    """The terms of ``expr`` of the highest total degree in its symbols, factored, with
    ``+ ...`` when lower-order terms are left out; None when that is no shorter (a single
    term, or not a sum)."""
    terms = sympy.Add.make_args(sympy.expand(expr))
    if len(terms) < 2:
        return None

    def degree(term: sympy.Expr) -> int:
        try:
            return sympy.Poly(term).total_degree() if term.free_symbols else 0
        except sympy.PolynomialError:
            return 0

    degrees = [degree(t) for t in terms]
    top = [t for t, d in zip(terms, degrees) if d == max(degrees)]
    lead = str(sympy.factor(sympy.Add(*top)))
    return lead if len(top) == len(terms) else lead + " + ..."


def _render_forms(name: str, forms: list[dict]) -> str:
    """The recurrent, chunked and quadratic forms side by side, and the choice."""
    header = ["form", "chunk", "pass bound", "flops", "steps", "cost", "stored", "footprint"]
    rows = [[f["form"] + (" (chosen)" if f["chosen"] else ""),
             ",".join(map(str, f["chunks"])) or "-", str(f["pass_bound"]),
             _cost_cell(f["flops"]), _cost_cell(f["steps"]), f"{f['cost']:.3g}",
             _cost_cell(f["stored_elements"]), _cost_cell(f["footprint"]["elements"])]
            for f in forms]
    lines = [f"== {name}: forms of its causal sums (passes/chunked.py)", ""]
    lines += _indent(_table(header, rows))
    lines += ["", "  cost = flops + steps * STEP_FLOPS (costs.form_cost, at the given sizes, "
                  "else 4096 per sequence rank and 64 per other); stored = the intermediates' "
                  "elements; flops, steps, stored and footprint symbolic:"]
    for f in forms:
        lines.append(f"    {f['form']}: flops {f['flops']['expr']}; steps {f['steps']['expr']}; "
                     f"stored {f['stored_elements']['expr']}")
    return "\n".join(lines) + "\n"


def _render_stage(name: str, stage: dict, sizes: Mapping[str, int]) -> str:
    bound = stage["bound_rank"]
    over = f" over {bound}" if bound else ""
    lines = [f"== {name} (after {stage['after']}): {stage['pass_bound']}-pass{over}"]
    if sizes:
        lines.append("sizes: " + ", ".join(f"{k}={v}" for k, v in sizes.items()))
    lines += ["", "cascade:"] + _indent(stage["cascade"].rstrip("\n").splitlines())
    lines += ["", "ranks:"] + _indent(_table(["rank", "size", "value", "kind", "passes",
                                               "footprint", ""], _rank_rows(stage)))
    for r in stage["ranks"]:
        if r.get("indexed_by"):
            lines += ["", f"{r['rank']} is data-dependent: read at positions an index tensor "
                          f"holds, known only at run time, through"]
            lines += _indent(r["indexed_by"])
    for r in stage["ranks"]:
        if r["chain"]:
            lines += ["", f"dependencies over {r['rank']}:"]
            lines += _indent([d["text"] for d in r["chain"]])
    chain = {d["text"] for r in stage["ranks"] for d in r["chain"]}  # printed just above
    why = [x for x in stage.get("not_one_pass", []) if x not in chain]
    if why:
        lines += ["", "not one-pass because:"] + _indent(why)
    lines += ["", "einsums:"] + _indent(_table(_einsum_header(stage), _einsum_rows(stage)))
    lines += ["", "totals:"] + _indent(_table(["", "", ""], _total_rows(stage), show_header=False))
    lines += ["", "fusion groups" + (f" over {bound}:" if bound else ":")]
    lines += _indent(_group_lines(stage))
    return "\n".join(lines) + "\n"


def _indent(lines: list[str]) -> list[str]:
    return ["  " + line for line in lines]


def _table(header: list[str], rows: list[list[str]], show_header: bool = True) -> list[str]:
    cells = ([header] if show_header else []) + rows
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))] if cells else []
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}"
    return f"{value:,}"


def _rank_rows(stage: dict) -> list[list[str]]:
    rows = []
    for r in stage["ranks"]:
        foot = r["footprint"]
        kind = "constant" if r["constant"] else "symbolic"
        rows.append([r["rank"], r["size"], _fmt(r["value"]),
                     kind + (", data-dependent" if r.get("data_dependent") else ""), str(r["passes"]),
                     foot["expr"], foot["reason"]])
    return rows


def _einsum_header(stage: dict) -> list[str]:
    bound = stage["bound_rank"]
    return ["einsum", f"pass({bound})" if bound else "pass", "group", "flops", "value"]


def _einsum_rows(stage: dict) -> list[list[str]]:
    bound = stage["bound_rank"]
    rows = []
    for e in stage["einsums"]:
        own = e["passes"].get(bound) if bound else 1
        role = "" if e["role"] == STREAM else f" ({e['role']})"
        rows.append([e["name"], "-" if own is None else str(own), f"{e['group']}{role}",
                     e["flops"]["expr"], _fmt(e["flops"]["value"])])
    return rows


def _total_rows(stage: dict) -> list[list[str]]:
    foot = stage["footprint"]
    return [
        ["flops", stage["flops"]["expr"], _fmt(stage["flops"]["value"])],
        ["compulsory bytes", stage["compulsory_bytes"]["expr"],
         _fmt(stage["compulsory_bytes"]["value"])],
        ["arithmetic intensity", stage["arithmetic_intensity"]["expr"],
         _fmt(stage["arithmetic_intensity"]["value"])],
        ["live footprint (elements)", foot["elements"]["expr"], _fmt(foot["elements"]["value"])],
        [f"live footprint (bytes, {COMPUTE_BYTES}/element)", foot["bytes"]["expr"],
         _fmt(foot["bytes"]["value"])],
    ]


def _group_lines(stage: dict) -> list[str]:
    lines = []
    for g in stage["fusion"]:
        names = []
        for m in g["members"]:
            names.append(m["einsum"] if m["role"] == STREAM else f"{m['einsum']} ({m['role']})")
        lines.append(f"group {g['group']}: " + ", ".join(names))
        for dep in g["blocked_by"]:
            lines.append(f"  not fused with group {g['group'] - 1}: {dep['text']}")
    return lines


# ----------------------------------------------------------------------------
# report_dot
# ----------------------------------------------------------------------------


def report_dot(module: Module, stages: Sequence[tuple[str, Module]] | None = None) -> str:
    """The cascades as one Graphviz digraph, Einsums coloured by pass.

    Without ``stages``, one cluster per definition of ``module`` (node ids
    ``"DEFN/LABEL"``).  With ``stages`` (``build_report``'s: ``input``, then one per pass),
    one cluster per definition holding one cluster per stage (node ids
    ``"DEFN/STAGE/LABEL"``); a stage whose canonical cascade equals the previous one's is a
    one-node cluster that says so.  In every cascade, the reads that force an extra pass
    (each rank's dependencies, ``PassAnalysis``) are red edges labelled ``pass N over R``
    (orange over a constant rank: a tile re-read), and each iterative update that reads its
    own state has a loop labelled with its rank (``RM[m1+1]`` from ``RM[m1]``).
    """
    lines = ["digraph attnc {", "  rankdir=TB;",
             '  node [fontname="Helvetica", style=filled];',
             '  edge [fontname="Helvetica", fontsize=10];', "  compound=true;"]
    for defn in module.definitions:
        if stages is None:
            lines += _indent(_dot_cluster(count_passes(defn), defn.name, defn.name, ""))
            continue
        body: list[str] = []
        before: tuple[str, str] | None = None  # (stage, canonical cascade) drawn last
        for after, version in ((a, _find(m, defn.name)) for a, m in stages):
            if version is None:
                continue
            analysis = count_passes(version)
            cascade = print_definition(analysis.definition)
            prefix = f"{defn.name}/{after}"
            if before is not None and before[1] == cascade:
                body += [f"subgraph {_quote('cluster_' + prefix)} {{",
                         f"  label={_quote('after ' + after)};",
                         f"  {_quote(prefix)} [shape=note, fillcolor=white, "
                         f"label={_quote('the cascade after ' + before[0] + ', unchanged')}];",
                         "}"]
            else:
                body += _dot_cluster(analysis, defn.name, prefix, f"after {after}: ")
            before = (after, cascade)
        lines += _indent([f"subgraph {_quote('cluster_' + defn.name)} {{",
                          f"  label={_quote(defn.name)};"] + _indent(body) + ["}"])
    lines.append("}")
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return '"' + escaped + '"'


PASS_EDGE = "red"        # a read that starts a new pass over a symbolic rank
TILE_PASS_EDGE = "orange"  # the same over a constant rank (a tile read again)
RECURRENCE_EDGE = "blue"  # an iterative update reading its own previous state


def _dot_cluster(analysis: PassAnalysis, name: str, prefix: str, title: str) -> list[str]:
    canonical = analysis.definition
    groups = {m.einsum: g.number for g in fusion_groups(analysis) for m in g.members}
    bound = analysis.bound_rank
    title += f"{name}: " if not title else ""
    title += f"{analysis.pass_bound}-pass" + (f" over {bound}" if bound else "")
    lines = [f"subgraph {_quote('cluster_' + prefix)} {{", f"  label={_quote(title)};"]
    outputs = {o.name for o in canonical.outputs}
    for arg in canonical.tensor_args:
        lines.append(f"  {_node_id(prefix, arg.name)} [shape=box, "
                     f"fillcolor={_quote(INPUT_COLOUR)}, "
                     f"label={_quote(arg.name + '[' + ','.join(arg.ranks) + ']')}];")
    for st in canonical.statements:
        lines.append("  " + _dot_statement(prefix, st, groups, bound, st.tensor in outputs))
    data = _dot_edges(canonical)
    marks = _pass_edges(analysis)
    for src, dst in data + [e for e in marks if e not in set(data)]:
        lines.append(f"  {_node_id(prefix, src)} -> {_node_id(prefix, dst)}"
                     + _pass_edge_style(marks.get((src, dst)), (src, dst) in data) + ";")
    for label, rank in _recurrences(canonical):
        node = _node_id(prefix, label)
        lines.append(f"  {node} -> {node} [color={_quote(RECURRENCE_EDGE)}, "
                     f"fontcolor={_quote(RECURRENCE_EDGE)}, "
                     f"label={_quote(f'{rank.lower()} -> {rank.lower()}+1 (over {rank})')}];")
    lines.append("}")
    return lines


def _pass_edges(analysis: PassAnalysis) -> dict[tuple[str, str], list[tuple[str, bool]]]:
    """(producer, consumer) -> [(label, constant rank)] for every read on a dependency's
    path (``earlier`` through ``through`` to ``later``): the dependencies of each rank's
    chain and those nearest each held-back Einsum (``RankPasses.causes``, so a second
    chain beside the longest one is marked too) whose ``later`` traverses the rank (one
    that does not merely runs after a traversal: no extra pass).  Only the first read of a
    path, the one that waits for ``earlier`` to complete, is labelled."""
    marks: dict[tuple[str, str], list[tuple[str, bool]]] = {}
    for rp in analysis.ranks:
        deps = dict.fromkeys(list(rp.chain) + list(rp.causes.values()))
        for dep in (d for d in deps if d.later in rp.einsum_pass):  # a pass, not a wait
            path = [dep.earlier, *dep.through, dep.later]
            for k, edge in enumerate(zip(path, path[1:])):
                label = f"pass {dep.pass_number} over {rp.rank}" if k == 0 else ""
                entry = marks.setdefault(edge, [])
                if (label, rp.constant) not in entry:
                    entry.append((label, rp.constant))
    return marks


def _pass_edge_style(marks: list[tuple[str, bool]] | None, drawn: bool) -> str:
    if not marks:
        return ""
    colour = TILE_PASS_EDGE if all(constant for _, constant in marks) else PASS_EDGE
    label = "\n".join(dict.fromkeys(text for text, _ in marks if text))
    return (f" [color={_quote(colour)}, fontcolor={_quote(colour)}, penwidth=2"
            + ("" if drawn else ", style=dashed")  # drawn from the init, say: the step read
            + (f", label={_quote(label)}" if label else "") + "]")


def _recurrences(defn: Definition) -> list[tuple[str, str]]:
    """(update label, iterative rank) of each update that reads its own state."""
    return [(statement_label(st), st.iter_rank) for st in defn.statements
            if isinstance(st, IterativeEinsum) and not st.init
            and any(acc.tensor == st.tensor for acc in statement_reads(st))]


def _node_id(prefix: str, label: str) -> str:
    return _quote(f"{prefix}/{label}")


def _dot_statement(prefix: str, st: Statement, groups: dict[str, int],
                   bound: str | None, is_output: bool) -> str:
    label = statement_label(st)
    number = groups[label]
    colour = PASS_COLOURS[(number - 1) % len(PASS_COLOURS)]
    where = f"pass {number}" if bound is None or bound in iteration_space(st) else \
        f"between passes (group {number})"
    extra = ", peripheries=2" if is_output else ""
    return (f"{_node_id(prefix, label)} [shape=ellipse, fillcolor={_quote(colour)}{extra}, "
            f"label={_quote(label + chr(10) + where)}];")


def _dot_edges(defn: Definition) -> list[tuple[str, str]]:
    """(producer, consumer) labels: arguments by name, statements by label, no duplicates."""
    init = {st.tensor: statement_label(st) for st in defn.statements
            if isinstance(st, IterativeEinsum) and st.init}
    plain = {st.tensor: statement_label(st) for st in defn.statements
             if not (isinstance(st, IterativeEinsum) and st.init)}
    edges: dict[tuple[str, str], None] = {}
    for st in defn.statements:
        me = statement_label(st)
        for acc in statement_reads(st):
            src = _dot_source(defn, acc, init, plain)
            if src == me:
                src = init.get(acc.tensor, src)
            if src != me:
                edges.setdefault((src, me), None)
    return list(edges)


def _dot_source(defn: Definition, acc: Access, init: dict[str, str], plain: dict[str, str]) -> str:
    if acc.tensor in init:
        rank = next(st.iter_rank for st in defn.statements
                    if isinstance(st, IterativeEinsum) and st.tensor == acc.tensor)
        step = acc.subscripts[defn.tensor_ranks(acc.tensor).index(rank)]
        if step == Num(0):
            return init[acc.tensor]
    return plain.get(acc.tensor, acc.tensor)

