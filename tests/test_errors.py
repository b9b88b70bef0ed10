"""User mistakes give located ``SpecError``s: ``file:line:col: error: ...``, the line, a caret.

Each test writes a small spec with one (or a few) mistakes and checks the
diagnostic's position against the place the mistake is written, found by
searching the source text for it, so a wrong column fails the test.
"""
from __future__ import annotations

import pytest

from attnc.einsum_ir.exprs import walk
from attnc.einsum_ir.ir import Access, Loc
from attnc.frontends import SpecError, parse, parse_file

FILE = "spec.attn"
HEADER = "attention f(Q[P,E], K[M,E], V[M,F]) -> AV[P,F] {\n"


def spec(*lines: str, header: str = HEADER) -> str:
    return header + "".join(f"  {line}\n" for line in lines) + "}\n"


def spec_error(text: str) -> SpecError:
    with pytest.raises(SpecError) as info:
        parse(text, FILE)
    return info.value


def position(text: str, needle: str, nth: int = 0) -> tuple[int, int]:
    """1-based line and column of the ``nth`` occurrence of ``needle`` in ``text``."""
    idx = -1
    for _ in range(nth + 1):
        idx = text.index(needle, idx + 1)
    line = text.count("\n", 0, idx) + 1
    col = idx - (text.rfind("\n", 0, idx) + 1) + 1
    return line, col


def assert_reported(err: SpecError, text: str, at: str, message: str, hint: str | None = None,
                    nth: int = 0) -> None:
    """``err`` holds a diagnostic at the ``nth`` ``at`` whose message contains ``message``."""
    line, col = position(text, at, nth)
    found = [d for d in err.diagnostics if d.loc == Loc(FILE, line, col) and message in d.message]
    assert found, f"no '{message}' at {line}:{col}; got:\n{err.format()}"
    block = found[0].format(err.sources).splitlines()
    assert block[0] == f"{FILE}:{line}:{col}: error: {found[0].message}"
    assert block[1] == "  " + text.splitlines()[line - 1]
    assert block[2] == "  " + " " * (col - 1) + "^"
    if hint is not None:
        assert any(hint in b for b in block[3:] if b.startswith("  note: ")), "\n".join(block)
    assert "\n".join(block) in err.format()


def assert_single(text: str, at: str, message: str, hint: str | None = None, nth: int = 0) -> None:
    err = spec_error(text)
    assert len(err.diagnostics) == 1, err.format()
    assert_reported(err, text, at, message, hint, nth)


# --- syntax ---------------------------------------------------------------------------------


def test_syntax_error_is_located_with_expected_tokens():
    text = spec("QK[p,m] = Q[p,e] * * K[m,e]", "AV[p,f] = QK[p,m] * V[m,f]")
    assert_single(text, "* K", "syntax error: unexpected '*'")
    assert "expected" in spec_error(text).diagnostics[0].message


def test_two_syntax_errors_in_two_statements_come_together():
    text = spec("QK[p,m] = Q[p,e] * * K[m,e]", "AV[p,f] = QK[p,m] ) V[m,f]")
    err = spec_error(text)
    assert len(err.diagnostics) == 2
    assert_reported(err, text, "* K", "unexpected '*'")
    assert_reported(err, text, ") V", "unexpected ')'")
    assert err.format().index("'*'") < err.format().index("')'")


def test_syntax_error_in_the_header():
    text = "attention f(Q[P,E] K[M,E]) -> AV[P,F] {\n  AV[p,f] = Q[p,e]\n}\n"
    assert_single(text, "K[M", "syntax error: unexpected 'K'")


def test_unexpected_character():
    text = spec("AV[p,f] = Q[p,e] @ V[e,f]")
    assert_single(text, "@", "unexpected character '@'")


def test_unexpected_end_of_file():
    err = spec_error("attention f(Q[P,E]) -> AV[P,E] {\n  AV[p,e] = Q[p,e]\n")
    assert "end of file" in err.diagnostics[0].message
    assert err.diagnostics[0].loc.line >= 1 and err.diagnostics[0].loc.col >= 1


def test_statement_broken_by_a_newline_is_reported_at_its_line():
    text = spec("AV[p,f] = Q[p,e] *", "V[e,f]")
    err = spec_error(text)
    assert err.diagnostics[0].loc.line == 2
    assert "end of line" in err.diagnostics[0].message


def test_unclosed_bracket_is_pointed_at():
    text = spec("S[p] = sum[e](Q[p,e]", "AV[p,f] = S[p] * V[0,f]")
    err = spec_error(text)
    assert len(err.diagnostics) == 1
    line, col = position(text, "(Q[p")
    assert_reported(err, text, "AV[p,f]", "syntax error", f"the '(' at {line}:{col} is never closed")


def test_syntax_error_after_recovery_keeps_later_lines_located():
    text = spec("A[p] = Q[p,0] +", "B[p] = Q[p,0]", "C[p] = * Q[p,0]", "AV[p,f] = A[p] * V[0,f]")
    err = spec_error(text)
    assert [d.loc.line for d in err.diagnostics] == [2, 4]


# --- names ------------------------------------------------------------------------------------


def test_unknown_tensor_suggests_the_nearest():
    text = spec("AV[p,f] = Q[p,e] * Kx[e,f]")
    assert_single(text, "Kx[", "unknown tensor 'Kx'", "did you mean K?")


def test_two_unknown_tensors_on_two_lines_come_together():
    text = spec("S[p,m] = Q[p,e] * Kx[m,e]", "AV[p,f] = S[p,m] * Vx[m,f]")
    err = spec_error(text)
    assert len(err.diagnostics) == 2
    assert_reported(err, text, "Kx[", "unknown tensor 'Kx'", "did you mean K?")
    assert_reported(err, text, "Vx[", "unknown tensor 'Vx'", "did you mean V?")


def test_index_of_an_undeclared_rank():
    text = spec("AV[p,f] = Q[p,e] * V[x,f]")
    assert_single(text, "x,f", "index 'x' belongs to no declared rank", "let X = ...")


def test_undeclared_index_on_the_left():
    text = spec("S[p,x] = Q[p,e]", "AV[p,f] = Q[p,e] * V[e,f]")
    assert_reported(spec_error(text), text, "x]", "index 'x' belongs to no declared rank")


def test_rank_written_where_an_index_variable_belongs():
    text = spec("S[P] = Q[p,e]", "AV[p,f] = S[p] * V[0,f]")
    assert_reported(spec_error(text), text, "P]", "'P' is a rank", "'p'")


def test_unknown_name_suggests_the_nearest():
    text = spec("AV[p,f] = Q[p,e] * V[0,f] * scal", header=HEADER.replace("V[M,F]", "V[M,F], scale"))
    assert_single(text, "scal\n", "unknown name 'scal'", "did you mean scale?")


def test_lowercase_tensor_name_suggests_the_tensor():
    text = spec("AV[p,f] = q * V[0,f]")
    assert_single(text, "q *", "unknown name 'q'", "did you mean Q?")


def test_name_used_for_a_rank_and_a_tensor():
    text = spec("M[p] = Q[p,e]", "AV[p,f] = M[p] * V[0,f]")
    assert_reported(spec_error(text), text, "M[p] =", "'M' names two things (rank and tensor)")


def test_name_used_for_a_tensor_and_a_parameter():
    text = spec("AV[p,f] = Q[p,0] * V[0,f]", header=HEADER.replace("V[M,F]", "V[M,F], Q"))
    assert_reported(spec_error(text), text, "Q)", "'Q' names two things (tensor and parameter)")


def test_tensor_named_like_an_index_variable():
    text = spec("m[p] = Q[p,0]", "AV[p,f] = m[p] * V[0,f]")
    assert_reported(spec_error(text), text, "m[p] =", "tensor 'm' clashes with the index variable "
                                                       "of rank 'M'")


def test_parameter_named_like_an_index_variable():
    text = spec("AV[p,f] = Q[p,0] * V[0,f] * e", header=HEADER.replace("V[M,F]", "V[M,F], e"))
    assert_reported(spec_error(text), text, "e)", "parameter 'e' clashes with the index variable")


def test_parameter_declared_twice():
    text = spec("AV[p,f] = Q[p,0] * V[0,f] * s",
                header=HEADER.replace("V[M,F]", "V[M,F], s, s = 2"))
    assert_reported(spec_error(text), text, "s = 2", "parameter 's' is declared twice")


def test_rank_must_be_uppercase():
    text = spec("AV[p,f] = Q[p,0] * V[0,f]", header=HEADER.replace("Q[P,E]", "Q[P,e]"))
    assert_reported(spec_error(text), text, "e]", "rank 'e' must have an uppercase name")


def test_rank_repeated_in_one_argument():
    text = spec("AV[p,f] = Q[p,p] * V[0,f]", header=HEADER.replace("Q[P,E]", "Q[P,P]"))
    assert_reported(spec_error(text), text, "P]", "rank 'P' appears twice in 'Q'")


@pytest.mark.parametrize("word", ["lambda", "class", "def", "import", "None"])
def test_parameter_named_like_a_python_keyword(word):
    text = spec(f"AV[p,f] = Q[p,0] * V[0,f] * {word}",
                header=HEADER.replace("V[M,F]", f"V[M,F], {word} = 2"))
    assert_single(text, f"{word} = 2", f"parameter '{word}' is a Python keyword", "rename it")


def test_tensor_named_like_a_python_keyword():
    text = spec("def[p] = Q[p,0]", "AV[p,f] = def[p] * V[0,f]")
    assert_single(text, "def[p] =", "tensor 'def' is a Python keyword")
    text = spec("AV[p,f] = Q[p,0] * V[0,f]", header=HEADER.replace("K[M,E]", "in[M,E]"))
    assert_single(text, "in[", "tensor 'in' is a Python keyword")


def test_definition_named_like_a_python_keyword():
    text = spec("AV[p,f] = Q[p,0] * V[0,f]", header=HEADER.replace(" f(", " class("))
    assert_single(text, "class", "definition 'class' is a Python keyword")


@pytest.mark.parametrize("rank", ["IF", "OR", "WHERE", "INF"])
def test_rank_whose_index_variable_is_reserved(rank):
    text = spec("AV[p,f] = Q[p,0] * V[0,f]", header=HEADER.replace("K[M,E]", f"K[{rank},E]"))
    assert_single(text, f"{rank},", f"rank '{rank}' cannot be used: its index variable "
                                    f"'{rank.lower()}'")


def test_definition_defined_twice():
    one = spec("AV[p,f] = Q[p,0] * V[0,f]")
    text = one + one
    assert_single(text, "f(", "definition 'f' is defined twice", nth=1)


def test_input_cannot_be_assigned():
    text = spec("K[m,e] = 1", "AV[p,f] = Q[p,0] * V[0,f]")
    assert_single(text, "K[m,e] =", "'K' is an input and cannot be assigned")


# --- dtypes -----------------------------------------------------------------------------------


def test_dtype_typo_suggests_the_dtype():
    text = spec("AV[p,f] = Q[p,0] * V[0,f]", header=HEADER.replace("Q[P,E]", "Q[P,E]: bf61"))
    assert_single(text, "bf61", "unknown dtype 'bf61'", "did you mean bf16?")


def test_output_dtype_typo_lists_the_dtypes():
    text = spec("AV[p,f] = Q[p,0] * V[0,f]", header=HEADER.replace("AV[P,F]", "AV[P,F]: float"))
    assert_single(text, "float", "unknown dtype 'float'", "dtypes are f16, bf16")


# --- tensors and outputs ----------------------------------------------------------------------


def test_tensor_indexed_with_the_wrong_number_of_subscripts():
    text = spec("S[p,m] = Q[p,e] * K[m]", "AV[p,f] = S[p,m] * V[m,f]")
    assert_single(text, "K[m]", "tensor 'K' has 2 rank(s) [M,E] but is indexed with 1")


def test_tensor_used_without_subscripts():
    text = spec("AV[p,f] = Q * V[0,f]")
    assert_single(text, "Q *", "tensor 'Q' has 2 rank(s) but is used without subscripts")


def test_tensor_defined_twice():
    text = spec("S[p] = Q[p,0]", "S[p] = Q[p,1]", "AV[p,f] = S[p] * V[0,f]")
    assert_single(text, "S[p] =", "tensor 'S' is defined twice", "first defined at spec.attn:2:3",
                  nth=1)


def test_output_never_defined_suggests_a_defined_tensor():
    text = spec("AW[p,f] = Q[p,0] * V[0,f]")
    assert_single(text, "AV[", "output 'AV' is never defined", "did you mean AW?")


def test_output_declared_with_other_ranks():
    text = spec("AV[f,p] = Q[p,0] * V[0,f]")
    assert_single(text, "AV[", "output 'AV' is declared [P,F] but defined [F,P]")


def test_output_listed_twice():
    text = spec("AV[p,f] = Q[p,0] * V[0,f]", header=HEADER.replace("AV[P,F]", "(AV[P,F], AV[P,F])"))
    assert_single(text, "AV[", "output 'AV' is listed twice", nth=1)


def test_output_that_is_an_input():
    text = spec("AV[p,f] = Q[p,0] * V[0,f]", header=HEADER.replace("AV[P,F]", "(AV[P,F], K[M,E])"))
    assert_single(text, "K[M,E])", "output 'K' is an input")


def test_lhs_index_variable_twice():
    text = spec("S[p,p] = Q[p,0]", "AV[p,f] = V[0,f]")
    assert_reported(spec_error(text), text, "S[p,p]", "an index variable appears twice")


def test_lhs_subscript_must_be_an_index_variable():
    text = spec("S[p,m+2] = Q[p,0]", "AV[p,f] = V[0,f]")
    assert_reported(spec_error(text), text, "+2", "a left-hand side subscript must be")


# --- functions, reductions, sizes -----------------------------------------------------------


def test_unknown_function_suggests_the_nearest():
    text = spec("AV[p,f] = exq(Q[p,0]) * V[0,f]")
    assert_single(text, "exq", "unknown function 'exq'", "did you mean exp?")


def test_unknown_function_with_a_digit_suggests_exp2():
    text = spec("AV[p,f] = exp3(Q[p,0]) * V[0,f]")
    assert_single(text, "exp3", "unknown function 'exp3'", "exp2")


def test_unknown_function_far_from_all_lists_them():
    text = spec("AV[p,f] = softplus(Q[p,0]) * V[0,f]")
    assert_single(text, "softplus", "unknown function 'softplus'", "functions are exp")


def test_function_arity():
    text = spec("AV[p,f] = max(Q[p,e]) * V[0,f]")
    assert_single(text, "max(", "max takes 2 argument(s), got 1", "use max[i](...) to reduce")


def test_unknown_reduction_suggests_the_nearest():
    text = spec("AV[p,f] = summ[m](K[m,0]) * V[0,f] * Q[p,0]")
    assert_single(text, "summ", "unknown reduction 'summ'", "did you mean sum?")


def test_reduction_without_a_body():
    text = spec("AV[p,f] = sum[m] * V[0,f]")
    assert_single(text, "sum[m]", "'sum[...]' needs a body")


def test_reduction_error_in_body_is_not_reported_twice():
    text = spec("AV[p,f] = sum[m](Kx[m,0]) * V[0,f] * Q[p,0]")
    assert_single(text, "Kx", "unknown tensor 'Kx'")


def test_reduction_with_no_ranks_and_with_a_rank_twice():
    text = spec("S[p] = sum[](Q[p,0])", "AV[p,f] = max[m, m](K[m,0]) * V[0,f] * S[p]")
    err = spec_error(text)
    assert_reported(err, text, "sum[]", "sum[] lists no index variable")
    assert_reported(err, text, "m](", "'m' is listed twice")


def test_unknown_size_suggests_the_nearest():
    text = spec("AV[p,f] = Q[p,0] * V[0,f]", header=HEADER.replace("V[M,F]", "V[M,F], s = 1/sqrt(EE)"))
    assert_single(text, "EE", "unknown size 'EE'", "did you mean E?")


def test_unknown_size_function_suggests_the_nearest():
    text = spec("let B = ceiling(M / 4)", "AV[p,f] = Q[p,0] * V[0,f]")
    assert_single(text, "ceiling", "unknown size function 'ceiling'", "did you mean ceil?")


def test_let_that_uses_a_later_size():
    text = spec("let A0 = B0 * 2", "let B0 = 4", "AV[p,f] = Q[p,0] * V[0,f]")
    assert_single(text, "B0 * 2", "size 'B0' is used before its let", "only earlier sizes")


@pytest.mark.parametrize("value,shown", [("0", "0"), ("2.5", "2.5"), ("-1", "-1"), ("inf", "inf")])
def test_constant_let_must_be_a_positive_whole_number(value, shown):
    text = spec(f"let B = {value}", "AV[p,f] = Q[p,0] * V[0,f]")
    assert_single(text, value, f"size 'B' = {shown} is not a positive whole number")


def test_let_naming_itself():
    text = spec("let B = B + 1", "AV[p,f] = Q[p,0] * V[0,f]")
    assert_single(text, "B + 1", "size 'B' is used before its let")


@pytest.mark.parametrize("value,message", [
    ("Q", "tensor 'Q' cannot be used in a size"),
    ("m", "index 'm' cannot be used in a size"),
    ("s", "parameter 's' cannot be used in a size"),
])
def test_let_naming_something_else_than_a_size(value, message):
    text = spec(f"let B = {value} + 1", "AV[p,f] = Q[p,0] * V[0,f]",
                header=HEADER.replace("V[M,F]", "V[M,F], s"))
    assert_single(text, f"{value} + 1", message)


def test_tensor_called_like_a_function():
    text = spec("AV[p,f] = Q(1) * V[0,f]")
    assert_single(text, "Q(1)", "tensor 'Q' is not a function", "write Q[...]")


def test_let_defined_twice():
    text = spec("let B = 4", "let B = 8", "AV[p,f] = Q[p,0] * V[0,f]")
    assert_single(text, "B = 8", "size 'B' is defined twice")


def test_size_that_is_undefined_or_not_real():
    text = spec("let B = M // 0", "AV[p,f] = Q[p,0] * V[0,f]")
    assert_single(text, "// 0", "undefined or not real", "division by zero")
    header = HEADER.replace("V[M,F]", "V[M,F], s = log(0 - E)")
    text = spec("AV[p,f] = Q[p,0] * V[0,f] * s", header=header)
    assert_single(text, "log", "undefined or not real")


def test_number_literal_out_of_range():
    text = spec("AV[p,f] = Q[p,0] * V[0,f] * 1e999")
    assert_single(text, "1e999", "out of range", "inf")


# --- subscripts -------------------------------------------------------------------------------


@pytest.mark.parametrize("sub,at,why", [
    ("m*m", "*m", "a product of two index variables"),
    ("m/2", "/2", "'/' is not integer division"),
    ("exp(m)", "exp(m)", "function 'exp' in a subscript"),
    ("m // p", "// p", "'//' must divide by a size or a constant"),
    ("m + 0.5", "0.5", "'0.5' is not an integer"),
    ("m // 0", "// 0", "division by zero"),
    ("m + scale", "scale,", "parameter 'scale' is not a size"),
    ("m // IX[p]", "// IX", "'//' must divide by a size or a constant"),
    ("m % IX[p]", "% IX", "'%' must divide by a size or a constant"),
    ("IX[p] * m", "* m", "a product of an index tensor's element and another varying term"),
    ("IX[p] / 2", "/ 2", "'/' is not integer division"),
    ("IX[p * p]", "* p]", "a product of two index variables"),
])
def test_non_affine_subscript(sub, at, why):
    text = spec(f"AV[p,f] = Q[p,0] * K[{sub}, 0] * V[m,f]",
                header=HEADER.replace("V[M,F]", "V[M,F], IX[P]: i32, scale"))
    err = spec_error(text)
    assert_reported(err, text, at, f"subscript is not integer-affine: {why}")


def test_affine_subscripts_are_accepted():
    text = spec("let G = 2", "AV[p,f] = Q[p // G, 0] * K[2*m + 1 - M, 0] * V[M - 1 - m, f]")
    assert parse(text, FILE)["f"].statements[0].tensor == "AV"


# --- indirect subscripts (an index tensor's element in a subscript) --------------------------

PAGED = "attention f(Q[P,E], K[M,E], V[M,F], PT[P]: i32, X[P], D[P]: bool) -> AV[P,F] {\n"


@pytest.mark.parametrize("tensor,index,declared", [
    ("X", "X[p]", "a floating-point tensor (no dtype declared)"),
    ("D", "D[p]", "declared bool"),
    ("QK", "QK[p,0]", "a computed (floating-point) tensor"),
])
def test_non_integer_tensor_used_as_an_index(tensor, index, declared):
    text = spec("QK[p,m] = Q[p,e] * K[m,e]", f"AV[p,f] = Q[p,0] * K[{index} + m, 0] * V[m,f]",
                header=PAGED)
    assert_single(text, f"{index} + m", f"tensor '{tensor}' is used as an index but is {declared}",
                  "i32")


def test_two_levels_of_indirection():
    text = spec("AV[p,f] = Q[p,0] * K[PT[PT[p]], 0] * V[0,f]", header=PAGED)
    assert_single(text, "PT[p]]", "two levels of indirection: 'PT' indexes 'PT'",
                  "one integer tensor")


@pytest.mark.parametrize("divisor,shown", [("0", "(0)"), ("-2", "(-2)"), ("(E - E)", "(0)"),
                                           ("(E - 1)", "(-1 + E)")])
def test_modulo_by_a_non_positive_size_or_constant(divisor, shown):
    text = spec(f"AV[p,f] = Q[p,0] * K[m % {divisor}, 0] * V[m,f]", header=PAGED)
    assert_single(text, f"% {divisor}", f"'%' must be by a positive size or constant {shown}",
                  "divisor must be > 0")


def test_modulo_outside_a_subscript():
    text = spec("AV[p,f] = Q[p,0] % 2 * V[0,f]", header=PAGED)
    assert_single(text, "% 2", "'%' is allowed only in a subscript")


def test_indirect_errors_come_together_in_source_order():
    text = spec("S[p,m] = Q[p,e] * K[X[p] + m, e]", "AV[p,f] = S[p,m] * V[m % 0, f] * V[PT[PT[p]], f]",
                header=PAGED)
    err = spec_error(text)
    assert len(err.diagnostics) == 3, err.format()
    assert_reported(err, text, "X[p]", "tensor 'X' is used as an index")
    assert_reported(err, text, "% 0", "'%' must be by a positive size or constant")
    assert_reported(err, text, "PT[p]]", "two levels of indirection")


def test_indirect_subscripts_are_accepted():
    text = spec("let PG = 4", "AV[p,f] = Q[p,0] * K[PT[p // PG] * PG + p % PG, 0] * V[(PT[p] + 1) % M, f]",
                header=PAGED)
    st = parse(text, FILE)["f"].statements[0]
    assert [n.tensor for n in walk(st.expr) if isinstance(n, Access)].count("PT") == 2


# --- where, dependencies, iterative ranks ----------------------------------------------------


def test_where_with_no_level_holding_all_its_variables():
    text = spec("AV[p,f] = sum[m](K[m,0]) * V[0,f] + sum[e](Q[p,e]) where m == e")
    assert_single(text, "m == e", "no level of this statement has all of the where's variables "
                                  "(e, m) in scope")


def test_where_on_an_implicit_sum_level_is_accepted():
    text = spec("AV[p,f] = Q[p,e] * K[m,e] * V[m,f] where m <= p")
    assert parse(text, FILE)["f"].statements[0].where is not None


def test_dependency_cycle():
    text = spec("A[p] = B[p] + Q[p,0]", "B[p] = A[p]", "AV[p,f] = A[p] * V[0,f]")
    assert_single(text, "A[p] =", "dependency cycle between statements: A -> B -> A")


def test_tensor_reading_itself_needs_an_iterative_rank():
    text = spec("A[p] = A[p] + Q[p,0]", "AV[p,f] = A[p] * V[0,f]")
    assert_single(text, "A[p] =", "'A' reads itself", "iterative rank")


ITER = ("let T = 4", "R[0,p] = 0", "R[t+1,p] = R[t,p] + Q[p,t]")


def test_iterative_tensor_without_init():
    text = spec("let T = 4", "R[t+1,p] = R[t,p] + 1", "AV[p,f] = R[T,p] * V[0,f]")
    assert_single(text, "R[t+1", "iterative tensor 'R' has no init")


def test_iterative_init_without_update():
    text = spec("R[0,p] = 0", "AV[p,f] = R[0,p] * V[0,f]")
    assert_reported(spec_error(text), text, "R[0,p] =", "has an init but no 'i+1' update")


def test_iterative_init_at_another_position_than_its_update():
    text = spec("let T = 4", "R[p,0] = 0", "R[t+1,p] = R[t,p] + 1", "AV[p,f] = R[T,p] * V[0,f]")
    assert_single(text, "0] = 0", "the '0' of 'R' is not at the position of its update's 'i+1'")


def test_iterative_tensor_read_two_steps_ahead():
    text = spec(*ITER, "X[t,p] = R[t+2,p]", "AV[p,f] = X[0,p] * V[0,f]")
    assert_single(text, "+2,p", "iterative tensor 'R' can be read only at t, t+1 or T")


def test_iterative_tensor_read_at_a_step_before_its_update_line():
    text = spec("X[t,p] = R[t+2,p]", *ITER, "AV[p,f] = X[0,p] * V[0,f]")
    assert_single(text, "+2,p", "iterative tensor 'R' can be read only at t, t+1 or T")


def test_iterative_tensor_read_at_a_step_outside_its_loop():
    text = spec(*ITER, "AV[p,f] = R[t,p] * V[0,f]")
    assert_single(text, "t,p] * V", "outside its loop, iterative tensor 'R' can be read only at "
                                    "its final step, R[T, ...]")


def test_iterative_update_reading_its_own_next_step():
    text = spec("let T = 4", "R[0,p] = 0", "R[t+1,p] = R[t+1,p] + 1", "AV[p,f] = R[T,p] * V[0,f]")
    assert_single(text, "+1,p] + 1", "its own update can read 'R' only at the previous step")


def test_iterative_output_must_be_copied_out():
    text = spec("let T = 4", "AV[0,p] = 0", "AV[t+1,p] = AV[t,p] + 1",
                header=HEADER.replace("AV[P,F]", "AV[T,P]"))
    assert_reported(spec_error(text), text, "AV[T", "output 'AV' is iterative")


# --- collection across a phase ----------------------------------------------------------------


def test_errors_of_different_kinds_in_one_phase_come_together_in_source_order():
    text = spec("S[p,m] = Q[p,e] * K[m] * exq(1)", "AV[p,f] = S[p,m] * Vx[m,f]",
                header=HEADER.replace("Q[P,E]", "Q[P,E]: f23"))
    err = spec_error(text)
    assert len(err.diagnostics) == 4
    assert_reported(err, text, "f23", "unknown dtype")
    assert_reported(err, text, "K[m]", "indexed with 1")
    assert_reported(err, text, "exq", "unknown function")
    assert_reported(err, text, "Vx", "unknown tensor")
    lines = [d.loc.line for d in err.diagnostics]
    assert lines == sorted(lines)


def test_errors_in_two_definitions_come_together():
    text = spec("AV[p,f] = Qx[p,0] * V[0,f]") + spec("AV[p,f] = Q[p,0] * Vx[0,f]").replace(" f(", " g(")
    err = spec_error(text)
    assert_reported(err, text, "Qx", "unknown tensor 'Qx'")
    assert_reported(err, text, "Vx", "unknown tensor 'Vx'")


def test_parse_file_reports_a_missing_file(tmp_path):
    with pytest.raises(SpecError, match="cannot read"):
        parse_file(tmp_path / "absent.attn")


def test_parse_file_locates_errors_in_that_file(tmp_path):
    path = tmp_path / "bad.attn"
    path.write_text(spec("AV[p,f] = Q[p,0] * Vx[0,f]"))
    with pytest.raises(SpecError) as info:
        parse_file(path)
    assert info.value.format().startswith(f"{path}:2:")
