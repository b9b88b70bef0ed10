"""Fuzzing: a mutated spec either parses (and compiles) or fails with located diagnostics;
random valid cascades agree with the interpreter on every path (bounded samples of
``tests/fuzz.py``, whose long run is ``python -m tests.fuzz --budget 600``).

Mutants come from the contract's ``attn`` blocks and every ``examples/**/*.attn``,
changed at random (seeded, so failures reproduce) at the character or token
level.  The frontend must never raise anything but :class:`SpecError`; every
diagnostic must carry ``file:line:col`` inside the source; and whatever does
parse must survive ``print_ir`` and parse back to the same IR.
"""
from __future__ import annotations

import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnc.einsum_ir import ir
from attnc.einsum_ir.printer import print_ir
from attnc.frontends import SpecError, parse
from conftest import all_examples
from fuzz import TILES, check_cascade, check_mutant
from strategies import attention_cascades, contract_blocks, definitions, require_contract

MUTANTS_PER_SOURCE = 24
MUTANTS_COMPILED = 200
TOKEN = re.compile(r"[A-Za-z_][A-Za-z_0-9]*|\d+\.?\d*(?:[eE][+-]?\d+)?|\*\*|//|->|<=|>=|==|!="
                   r"|\n|[^\sA-Za-z_0-9]")
VOCABULARY = (
    ["attention", "let", "where", "and", "or", "not", "inf", "pi", "sum", "max", "min", "select",
     "ceil", "floor", "0", "1", "2", "0.5", "1e-6", "64", "i+1", "m+1", "\n", ";", "#", "->",
     "(", ")", "[", "]", "{", "}", ",", "=", ":", "+", "-", "*", "/", "//", "**", "<", "<=",
     "==", "!=", ">", "bf16", "f32", "i32", "x", "T", "lambda", "M", "m", "P", "p", "E", "e"]
    + list(ir.FUNCTIONS))
CHARS = "()[]{},;:=+-*/<>!#.\n abcmpqMPQKV019_"


def _sources() -> list[tuple[str, str]]:
    blocks = [(f"contract-{i}", text) for i, text in enumerate(contract_blocks())]
    return blocks + [(str(p.relative_to(p.parents[1])), p.read_text()) for p in all_examples()]


def _tokens(text: str) -> list[str]:
    """Tokens with the white space before each kept, so joining them restores the text."""
    out, pos = [], 0
    for m in TOKEN.finditer(text):
        out.append(text[pos:m.end()])
        pos = m.end()
    return out + [text[pos:]]


def _char_mutation(rng: random.Random, text: str) -> str:
    i = rng.randrange(len(text))
    kind = rng.choice(("delete", "duplicate", "swap", "insert"))
    if kind == "delete":
        return text[:i] + text[i + 1:]
    if kind == "duplicate":
        return text[:i] + text[i] + text[i:]
    if kind == "swap" and i + 1 < len(text):
        return text[:i] + text[i + 1] + text[i] + text[i + 2:]
    return text[:i] + rng.choice(CHARS) + text[i:]


def _names(tokens: list[str]) -> list[str]:
    return sorted({t.strip() for t in tokens if t.strip()[:1].isalpha()})


def _token_mutation(rng: random.Random, text: str) -> str:
    toks = _tokens(text)
    i = rng.randrange(len(toks))
    kind = rng.choice(("delete", "duplicate", "swap", "insert", "rename", "truncate"))
    if kind == "delete":
        del toks[i]
    elif kind == "duplicate":
        toks.insert(i, toks[i])
    elif kind == "swap" and i + 1 < len(toks):
        toks[i], toks[i + 1] = toks[i + 1], toks[i]
    elif kind == "insert":
        toks.insert(i, " " + rng.choice(VOCABULARY))
    elif kind == "rename" and toks[i].strip()[:1].isalpha():
        lead = toks[i][: len(toks[i]) - len(toks[i].lstrip())]
        toks[i] = lead + rng.choice(_names(toks) + VOCABULARY)
    else:
        toks = toks[:i]
    return "".join(toks)


def mutate(rng: random.Random, text: str) -> str:
    """One to three random edits of ``text``."""
    for _ in range(rng.randint(1, 3)):
        if not text:
            return text
        text = (_char_mutation if rng.random() < 0.4 else _token_mutation)(rng, text)
    return text


def check_frontend(text: str, filename: str = "mutant.attn") -> ir.Module | None:
    """Parse ``text``; assert the outcome is a round-tripping module or located SpecErrors."""
    try:
        module = parse(text, filename)
    except SpecError as err:
        _check_located(err, text, filename)
        return None
    printed = print_ir(module)
    assert parse(printed, "printed.attn") == module, f"round trip failed:\n{printed}"
    return module


def _check_located(err: SpecError, text: str, filename: str) -> None:
    assert err.diagnostics, "a SpecError without diagnostics"
    n_lines = max(len(text.splitlines()), 1)
    for d in err.diagnostics:
        assert d.loc is not None, f"diagnostic without a location: {d.message}"
        assert d.loc.file == filename
        assert 1 <= d.loc.line <= n_lines + 1, f"line {d.loc.line} outside the source: {d.message}"
        assert d.loc.col >= 1, f"column {d.loc.col}: {d.message}"
        assert d.message
    formatted = err.format()
    assert formatted.count(": error: ") == len(err.diagnostics)
    assert f"{filename}:{err.diagnostics[0].loc.line}:" in formatted


SOURCES = _sources()


@pytest.mark.parametrize("name,text", SOURCES, ids=[n for n, _ in SOURCES])
def test_mutants_parse_or_fail_cleanly(name, text):
    rng = random.Random(f"attnc-fuzz-{name}")
    outcomes = {"parsed": 0, "rejected": 0}
    for k in range(MUTANTS_PER_SOURCE):
        mutant = mutate(rng, text)
        try:
            ok = check_frontend(mutant) is not None
        except AssertionError as err:
            raise AssertionError(f"mutant {k} of {name}:\n{mutant}\n{err}") from None
        except Exception as err:
            raise AssertionError(f"mutant {k} of {name} crashed the frontend with "
                                 f"{type(err).__name__}: {err}\n{mutant}") from err
        outcomes["parsed" if ok else "rejected"] += 1
    assert outcomes["rejected"] > 0, "no mutant was rejected: the mutations are too weak"


@pytest.mark.parametrize("name,text", SOURCES, ids=[n for n, _ in SOURCES])
def test_unmutated_source_round_trips(name, text):
    assert check_frontend(text, name) is not None


@given(st.lists(st.sampled_from(VOCABULARY + ["Q[P,E]", "K[M,E]", "AV[p,f]", "Q[p,e]"]),
                max_size=30))
def test_token_soup_never_crashes(tokens):
    body = " ".join(tokens)
    check_frontend("attention f(Q[P,E], K[M,E]) -> AV[P,E] {\n  " + body + "\n}\n")
    check_frontend(body)


@pytest.mark.parametrize("text", [
    "", "attention", "attention f(", "attention f() -> X {", "}", "{", "\n\n\n",
    "attention f(Q[P,E]) -> AV[P,E] {\n  AV[p,e] = Q[p,e]",
    "attention f(Q[P,E]) -> AV[P,E] {\n  AV[p,e] = ((((Q[p,e]\n}\n",
    "attention f(Q[P,E]) -> AV[P,E] {\n  AV[p,e] = Q[p,e] @ 2\n}\n",
    "attention f(Q[P,E]) -> AV[P,E] {\n  let X = 1/0\n  AV[p,e] = Q[p,e]\n}\n",
    "attention f(Q[P,E]) -> AV[P,E] {\n  let X = 10 ** 10 ** 10\n  AV[p,e] = Q[p,e]\n}\n",
    "attention f(Q[P,E], s = sqrt(0 - E)) -> AV[P,E] {\n  AV[p,e] = Q[p,e] * s\n}\n",
    "attention f(Q[P,E]) -> AV[P,E] {\n  AV[p,e] = Q[p,e] * 1e999\n}\n",
    "attention f(Q[P,E]) -> AV[P,E] {\n  AV[] = Q[]\n}\n",
    "attention f(Q[]) -> AV {\n  AV = Q\n}\n",
    "attention f(Q[P,E]) -> AV[P,E] {\n  AV[p,e] = sum[](Q[p,e])\n}\n",
    "attention f(Q[P,E]) -> AV[P,E] {\n  AV[0,e] = Q[0,e]\n}\n",
    "attention f(Q[P,E]) -> AV[P,E] {\n  AV[p+1,e] = AV[p,e]\n}\n",
    "attention f(Q[P,E]) -> AV[P,E] {\n  R[0,e] = 0\n  R[e,p+1] = R[e,p]\n  AV[p,e] = R[e,P]\n}\n",
])
def test_edge_cases_parse_or_fail_cleanly(text):
    check_frontend(text)


@pytest.mark.parametrize("text", [
    "\ufeffattention f(Q[P,E]) -> AV[P,E] {\n  AV[p,e] = Q[p,e]\n}\n",
    "attention f(Q[P]) -> T[P] {\n  T[p] = " + "-" * 3000 + "Q[p]\n}\n",
    "attention f(Q[P]) -> T[P] {\n  T[p] = " + "exp(" * 2500 + "Q[p]" + ")" * 2500 + "\n}\n",
    "attention f(Q[P]) -> T[P] {\n  T[p] = Q[p] * " + "9" * 400 + "\n}\n",
    "attention f(Q[P], s = -inf) -> T[P] {\n  T[p] = max(Q[p], s)\n}\n",
    "attention f(Q[P], s = exp(1)) -> T {\n  T = sum[p](Q[p] * s)\n}\n",
    "attention f(Q[P]) -> T[P] {\n  T[p] = " + "Q" * 3000 + "[p]\n}\n",
])
def test_extreme_inputs_compile_or_fail_cleanly(text):
    check_mutant(text)


def test_accepted_mutants_compile():
    """Mutants that parse must compile on both numpy forms (a bounded sample; the long run
    is ``python -m tests.fuzz``)."""
    rng = random.Random("attnc-fuzz-compile")
    outcomes = {"compiled": 0, "rejected": 0}
    for k in range(MUTANTS_COMPILED):
        name, text = SOURCES[k % len(SOURCES)]
        mutant = mutate(rng, text)
        try:
            outcomes[check_mutant(mutant)] += 1
        except Exception as err:
            raise AssertionError(f"mutant {k} of {name}: {type(err).__name__}: {err}\n"
                                 f"{mutant}") from err
    assert outcomes["compiled"] > 0 and outcomes["rejected"] > 0, outcomes


@settings(max_examples=6, deadline=None, derandomize=True)  # CI: the same sample every run
@given(attention_cascades(), st.sampled_from(TILES), st.integers(0, 2**32 - 1))
def test_attention_cascades_agree_on_every_path(defn, tile, seed):
    """Masks, reversed/offset reads, extra outputs, zero sizes, many tiles: every pass prefix
    × both numpy forms equals the interpreter (a bounded sample of ``tests/fuzz.py``)."""
    check_cascade(defn, tile, seed)


@settings(max_examples=6, deadline=None, derandomize=True)  # CI: the same sample every run
@given(definitions(data_masks=True), st.sampled_from(TILES), st.integers(0, 2**32 - 1))
def test_random_cascades_agree_on_every_path(defn, tile, seed):
    """Scalar outputs, several outputs, iterative ranks, lets, data-dependent masks."""
    check_cascade(defn, tile, seed)


def test_contract_blocks_are_fuzzed():
    blocks = require_contract()
    assert len(blocks) >= 3
    assert sum(name.startswith("contract-") for name, _ in SOURCES) == len(blocks)
