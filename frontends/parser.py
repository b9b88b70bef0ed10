"""Text -> surface syntax tree (``frontends.ast``), with every syntax error located.

The grammar lives in ``attn.lark``.  Statements end at a newline only inside a
body and outside brackets, which the :class:`NewlineFilter` postlexer enforces.
After a syntax error inside a body the parser blanks that line and tries again,
so one run reports every independent syntax error at once.
"""
from __future__ import annotations

import functools
from pathlib import Path

import lark
from lark import Token, Transformer, v_args

from ..einsum_ir.diagnostics import Collector
from ..einsum_ir.ir import Loc
from . import ast
from .limits import check_limits

MAX_SYNTAX_ERRORS = 20

TOKEN_NAMES = {
    "NAME": "a name", "NUMBER": "a number", "_NL": "end of line", "$END": "end of file",
    "LSQB": "'['", "RSQB": "']'", "LPAR": "'('", "RPAR": "')'", "LBRACE": "'{'",
    "RBRACE": "'}'", "COMMA": "','", "EQUAL": "'='", "COLON": "':'", "SEMICOLON": "';'",
    "COMP_OP": "a comparison", "ADD_OP": "'+' or '-'", "MUL_OP": "'*', '/', '//' or '%'",
    "POW_OP": "'**'",
    "__ANON_0": "'->'", "MORETHAN": "'>'",
}


class NewlineFilter:
    """Drops ``_NL`` tokens outside a ``{...}`` body or inside ``(...)``/``[...]``."""

    always_accept = ("_NL",)

    def process(self, stream):
        braces = brackets = 0
        for tok in stream:
            if tok.type in ("LPAR", "LSQB"):
                brackets += 1
            elif tok.type in ("RPAR", "RSQB"):
                brackets = max(brackets - 1, 0)
            elif tok.type == "LBRACE":
                braces += 1
                brackets = 0
            elif tok.type == "RBRACE":
                braces = max(braces - 1, 0)
                brackets = 0
            elif tok.type == "_NL" and (braces == 0 or brackets > 0):
                continue
            yield tok


@functools.cache
def _parser() -> lark.Lark:
    grammar = (Path(__file__).parent / "attn.lark").read_text()
    return lark.Lark(
        grammar, parser="lalr", lexer="basic", postlex=NewlineFilter(),
        propagate_positions=True, maybe_placeholders=True,
    )


def _describe_expected(expected: set[str]) -> str:
    names = sorted({TOKEN_NAMES.get(t, f"'{t.lower()}'" if t.isalpha() else t) for t in expected})
    if len(names) > 6:
        return ""
    return " (expected " + ", ".join(names) + ")"


def _syntax_message(err: lark.exceptions.UnexpectedInput) -> str:
    if isinstance(err, lark.exceptions.UnexpectedCharacters):
        return f"syntax error: unexpected character {err.char!r}"
    if isinstance(err, lark.exceptions.UnexpectedEOF):
        return "syntax error: unexpected end of file" + _describe_expected(set(err.expected))
    tok = err.token
    if tok.type == "$END":
        what = "end of file"
    elif tok.type == "_NL":
        what = "end of line"
    else:
        what = repr(str(tok))
    return f"syntax error: unexpected {what}" + _describe_expected(set(err.expected))


def _error_position(err: lark.exceptions.UnexpectedInput, text: str) -> tuple[int, int]:
    line, col = getattr(err, "line", None), getattr(err, "column", None)
    if not line or line < 1 or not col or col < 1:
        lines = text.splitlines() or [""]
        return len(lines), len(lines[-1]) + 1
    return line, col


def _unclosed_bracket(text: str, line: int, col: int) -> tuple[str, int, int] | None:
    """The innermost ``(`` or ``[`` still open at ``line:col``, if it opened on an earlier line.

    A newline inside brackets does not end a statement, so a missing ``)`` shows up as
    an error lines later; pointing at the bracket says where the mistake really is.
    """
    stack: list[tuple[str, int, int]] = []
    for n, src in enumerate(text.split("\n")[:line], start=1):
        code = src.split("#", 1)[0]
        if n == line:
            code = code[: col - 1]
        for c, ch in enumerate(code, start=1):
            if ch in "([":
                stack.append((ch, n, c))
            elif ch in ")]" and stack:
                stack.pop()
            elif ch in "{}":
                stack.clear()
    return stack[-1] if stack and stack[-1][1] < line else None


def _unclosed_hint(unclosed: tuple[str, int, int] | None) -> str | None:
    if unclosed is None:
        return None
    bracket, line, col = unclosed
    return f"the '{bracket}' at {line}:{col} is never closed"


def _blank_line(text: str, line: int) -> str | None:
    """Blank out ``line`` if that keeps brackets balanced; None when recovery is unsafe."""
    lines = text.split("\n")
    if not 1 <= line <= len(lines):
        return None
    src = lines[line - 1]
    code = src.split("#", 1)[0]
    if any(code.count(a) != code.count(b) for a, b in ("()", "[]", "{}")):
        return None
    if "{" in code or "}" in code or "attention" in code:
        return None
    lines[line - 1] = " " * len(src)
    return "\n".join(lines)


def parse_syntax(text: str, filename: str, errors: Collector) -> ast.FileDecl | None:
    """Parse ``text``; syntax errors go to ``errors``.  Returns None if any occurred."""
    attempt = text
    tree = None
    for _ in range(MAX_SYNTAX_ERRORS):
        try:
            tree = _parser().parse(attempt)
            break
        except lark.exceptions.UnexpectedInput as err:
            line, col = _error_position(err, attempt)
            unclosed = _unclosed_bracket(attempt, line, col)
            errors.error(_syntax_message(err), Loc(filename, line, col), _unclosed_hint(unclosed))
            if unclosed:
                return None  # blanking lines cannot repair a bracket left open
            nxt = _blank_line(attempt, line)
            if nxt is None or nxt == attempt:
                return None
            attempt = nxt
    if errors.diagnostics or tree is None:
        return None
    check_limits(tree, filename, errors)  # before the transform recurses over the tree
    if errors.diagnostics:
        return None
    return _ToAst(filename).transform(tree)


@v_args(meta=True, inline=True)
class _ToAst(Transformer):
    """lark tree -> ``frontends.ast`` nodes with locations."""

    def __init__(self, filename: str):
        super().__init__()
        self.filename = filename

    def _loc(self, meta) -> Loc:
        return Loc(self.filename, getattr(meta, "line", 0), getattr(meta, "column", 0))

    def _tok(self, tok: Token) -> ast.Name:
        return ast.Name(str(tok), Loc(self.filename, tok.line, tok.column))

    def _name_or_none(self, tok):
        return None if tok is None else self._tok(tok)

    # --- structure -------------------------------------------------------
    @v_args(inline=False, meta=True)
    def start(self, meta, defs):
        return ast.FileDecl(tuple(defs))

    def definition(self, meta, name, *rest):
        *params, outputs, body = rest
        params = tuple(p for p in params if p is not None)
        return ast.DefinitionDecl(self._tok(name), params, outputs, body, self._loc(meta))

    def tensor_param(self, meta, name, *rest):
        *dims, dtype = rest
        dims = tuple(self._tok(d) for d in dims if d is not None)
        return ast.TensorParamDecl(self._tok(name), dims, self._name_or_none(dtype), self._loc(meta))

    def scalar_param(self, meta, name, dtype, default):
        return ast.ScalarParamDecl(self._tok(name), self._name_or_none(dtype), default, self._loc(meta))

    def one_output(self, meta, out):
        return (out,)

    def many_outputs(self, meta, *outs):
        return tuple(outs)

    def output(self, meta, name, *rest):
        *dims, dtype = rest
        dims = tuple(self._tok(d) for d in dims if d is not None)
        return ast.OutputDecl(self._tok(name), dims, self._name_or_none(dtype), self._loc(meta))

    def body(self, meta, *stmts):
        return tuple(s for s in stmts if s is not None)

    def let_stmt(self, meta, name, value):
        return ast.LetStmt(self._tok(name), value, self._loc(meta))

    def einsum_stmt(self, meta, lhs, expr, where):
        name, subs = lhs
        return ast.EinsumStmt(name, subs, expr, where, self._loc(meta))

    def lhs(self, meta, name, *subs):
        return self._tok(name), tuple(s for s in subs if s is not None)

    # --- expressions -----------------------------------------------------
    def or_op(self, meta, a, b):
        return ast.BinaryExpr("or", a, b, self._loc(meta))

    def and_op(self, meta, a, b):
        return ast.BinaryExpr("and", a, b, self._loc(meta))

    def not_op(self, meta, a):
        return ast.UnaryExpr("not", a, self._loc(meta))

    def compare(self, meta, first, *rest):
        ops = tuple(str(t) for t in rest[0::2])
        operands = (first,) + tuple(rest[1::2])
        return ast.CompareExpr(ops, operands, self._loc(meta))

    def binop(self, meta, a, op, b):
        return ast.BinaryExpr(str(op), a, b, Loc(self.filename, op.line, op.column))

    def unary(self, meta, op, a):
        if str(op) == "+":
            return a
        return ast.UnaryExpr("-", a, self._loc(meta))

    def number(self, meta, tok):
        text = str(tok)
        value: int | float = int(text) if text.isdigit() else float(text)
        return ast.Number(value, Loc(self.filename, tok.line, tok.column))

    def name(self, meta, tok):
        return self._tok(tok)

    def access(self, meta, name, *subs):
        return ast.AccessExpr(self._tok(name), tuple(s for s in subs if s is not None), self._loc(meta))

    def reduce(self, meta, name, *rest):
        *ranks, body = rest
        return ast.ReduceExpr(self._tok(name), tuple(r for r in ranks if r is not None), body, self._loc(meta))

    def call(self, meta, name, *args):
        return ast.CallExpr(self._tok(name), tuple(a for a in args if a is not None), self._loc(meta))
