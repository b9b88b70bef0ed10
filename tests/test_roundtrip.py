"""``parse(print_ir(d)) == d``: the printer and the parser agree, on examples and random IR.

Also a golden file of the printed IR of every example (``tests/golden/test_roundtrip/``).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings

from attnc.einsum_ir import ir
from attnc.einsum_ir.exprs import free_ranks, walk
from attnc.einsum_ir.interpreter import interpret
from attnc.einsum_ir.printer import print_ir
from attnc.frontends import parse, parse_file
from conftest import EXAMPLES, all_examples
from strategies import definitions, require_contract, sample_inputs

EXAMPLE_PATHS = all_examples()
EXAMPLE_IDS = [str(p.relative_to(EXAMPLES)) for p in EXAMPLE_PATHS]


def round_trip(module: ir.Module) -> ir.Module:
    return parse(print_ir(module), "printed.attn")


@pytest.mark.parametrize("path", EXAMPLE_PATHS, ids=EXAMPLE_IDS)
def test_example_round_trips(path):
    module = parse_file(path)
    assert round_trip(module) == module


@pytest.mark.parametrize("path", EXAMPLE_PATHS, ids=EXAMPLE_IDS)
def test_example_printed_ir_is_stable(path, golden):
    printed = print_ir(parse_file(path))
    assert print_ir(parse(printed)) == printed
    golden(printed)  # tests/golden/test_roundtrip/<test>-<example path>.txt


def test_contract_blocks_round_trip():
    for block in require_contract():
        module = parse(block)
        assert round_trip(module) == module


def test_equality_ignores_locations_but_not_meaning():
    text = "attention f(Q[P,E]) -> A[P] {\n  A[p] = Q[p,e] * 2\n}\n"
    spaced = "attention f(Q[P,E]) -> A[P] {\n\n   A[p]   =   Q[p,e]*2   # c\n}\n"
    assert parse(text) == parse(spaced)
    assert parse(text) != parse(text.replace("* 2", "* 3"))


@given(definitions())
def test_random_definition_round_trips(defn):
    printed = print_ir(defn)
    (parsed,) = parse(printed, "random.attn").definitions
    assert parsed == defn, printed


@given(definitions(safe=False))
def test_random_unsafe_definition_round_trips(defn):
    printed = print_ir(defn)
    (parsed,) = parse(printed, "random.attn").definitions
    assert parsed == defn, printed


@given(definitions())
def test_random_definitions_bind_every_index_variable(defn):
    for stmt in defn.statements:
        assert free_ranks(stmt.expr) <= set(stmt.lhs), print_ir(stmt)


@settings(max_examples=15)
@given(definitions())
def test_safe_definitions_evaluate_to_finite_values(defn):
    rng = np.random.default_rng(0)
    out = interpret(defn, *sample_inputs(defn, rng))
    for array in out if isinstance(out, tuple) else (out,):
        assert np.all(np.isfinite(array)), print_ir(defn)


@given(definitions())
def test_safe_definitions_use_only_safe_constructs(defn):
    for stmt in defn.statements:
        for node in walk(stmt.expr):
            assert node != ir.Const("inf")
            if isinstance(node, ir.Call) and node.fn in ("exp", "exp2"):
                assert node.args[0].fn == "tanh"
            if isinstance(node, ir.Binary) and node.op == "/":
                assert node.right.left == ir.Num(1) and node.right.right.fn == "abs"


def test_power_parses_like_python():
    (defn,) = parse("attention f(Q[P]) -> A[P] {\n  A[p] = -Q[p] ** 2 ** p\n}\n").definitions
    q, p = ir.Access("Q", (ir.Index("P"),)), ir.Index("P")
    assert defn.statements[0].expr == ir.Unary("-", ir.Binary("**", q, ir.Binary("**", ir.Num(2), p)))
    assert parse(print_ir(defn)).definitions[0] == defn
