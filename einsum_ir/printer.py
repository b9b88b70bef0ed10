"""The IR printed back as valid ``.attn`` source: ``parse(print(ir)) == ir``.

Parentheses follow Python's precedence, so the printed form is minimal and the
tree it parses back to is the same tree.
"""
from __future__ import annotations

import math

import sympy
from sympy.printing.str import StrPrinter

from .ir import (Access, Binary, Call, Const, Definition, Einsum, Expr, Index, IterativeEinsum,
                 Module, Num, Param, Reduce, ScalarParam, Size, Statement, TensorArg, Unary)

PREC = {"or": 1, "and": 2, "not": 3, "<": 4, "<=": 4, ">": 4, ">=": 4, "==": 4, "!=": 4,
        "+": 5, "-": 5, "*": 6, "/": 6, "//": 6, "%": 6, "neg": 7, "**": 8}
ATOM = 9


def _prec(e: Expr) -> int:
    if isinstance(e, Binary):
        return PREC[e.op]
    if isinstance(e, Unary):
        return PREC["not"] if e.op == "not" else PREC["neg"]
    if isinstance(e, Num) and (e.value < 0 or math.copysign(1.0, e.value) < 0):
        return PREC["neg"]
    return ATOM


def format_number(v: int | float) -> str:
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, int):
        return str(v)
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    text = repr(float(v))
    return text


def _paren(e: Expr, need: bool) -> str:
    s = print_expr(e)
    return f"({s})" if need else s


def print_expr(e: Expr) -> str:
    """One expression in ``.attn`` syntax with minimal parentheses."""
    if isinstance(e, Num):
        return format_number(e.value)
    if isinstance(e, Const):
        return e.name
    if isinstance(e, Size):
        return e.rank
    if isinstance(e, Index):
        return e.rank.lower()
    if isinstance(e, Param):
        return e.name
    if isinstance(e, Access):
        if not e.subscripts:
            return e.tensor
        subs = [print_expr(s) for s in e.subscripts]
        sep = "," if all(isinstance(s, (Index, Size, Num)) for s in e.subscripts) else ", "
        return f"{e.tensor}[{sep.join(subs)}]"
    if isinstance(e, Call):
        return f"{e.fn}({', '.join(print_expr(a) for a in e.args)})"
    if isinstance(e, Reduce):
        return f"{e.op}[{', '.join(r.lower() for r in e.ranks)}]({print_expr(e.body)})"
    if isinstance(e, Unary):
        if e.op == "not":
            return "not " + _paren(e.operand, _prec(e.operand) < PREC["not"])
        return "-" + _paren(e.operand, _prec(e.operand) < PREC["neg"])
    if isinstance(e, Binary):
        return _print_binary(e)
    raise TypeError(f"not an expression: {e!r}")


def _print_binary(e: Binary) -> str:
    p = PREC[e.op]
    if e.op == "**":  # right-associative; the base binds tighter than unary minus
        left = _paren(e.left, _prec(e.left) <= p)
        right = _paren(e.right, _prec(e.right) < PREC["neg"])
        return f"{left} ** {right}"
    if p == 4:  # comparisons are chained in the surface syntax: never nest bare
        return f"{_paren(e.left, _prec(e.left) <= p)} {e.op} {_paren(e.right, _prec(e.right) <= p)}"
    left = _paren(e.left, _prec(e.left) < p)
    right = _paren(e.right, _prec(e.right) <= p)
    return f"{left} {e.op} {right}"


class _SizePrinter(StrPrinter):
    """sympy -> .attn size syntax (``ceil``, ``floor``, ``min``, ``max``, ``inf``)."""

    def _print_ceiling(self, e):
        return f"ceil({self._print(e.args[0])})"

    def _print_floor(self, e):
        return f"floor({self._print(e.args[0])})"

    def _print_Min(self, e):
        return self._minmax("min", e.args)

    def _print_Max(self, e):
        return self._minmax("max", e.args)

    def _minmax(self, name, args):
        out = self._print(args[0])
        for a in args[1:]:
            out = f"{name}({out}, {self._print(a)})"
        return out

    def _print_Infinity(self, e):
        return "inf"

    def _print_NegativeInfinity(self, e):
        return "-inf"

    def _print_Pi(self, e):
        return "pi"

    def _print_Exp1(self, e):
        return "exp(1)"

    def _print_Abs(self, e):
        return f"abs({self._print(e.args[0])})"

    def _print_Pow(self, e, rational=False):
        base, exp = e.args
        if exp == sympy.Rational(1, 2):
            return f"sqrt({self._print(base)})"
        if exp == -sympy.Rational(1, 2):
            return f"1/sqrt({self._print(base)})"
        if exp == -1:
            return f"1/{self.parenthesize(base, 60)}"
        return f"{self.parenthesize(base, 61)} ** {self.parenthesize(exp, 61)}"

    def _print_Float(self, e):
        return repr(float(e))

    def _print_Rational(self, e):
        return f"{e.p}/{e.q}"


def print_size(e: sympy.Expr) -> str:
    return _SizePrinter({"order": "none"}).doprint(e)


def _lhs(st: Statement) -> str:
    if not st.lhs:
        return st.tensor
    subs = []
    for r in st.lhs:
        if isinstance(st, IterativeEinsum) and r == st.iter_rank:
            subs.append("0" if st.init else f"{r.lower()}+1")
        else:
            subs.append(r.lower())
    return f"{st.tensor}[{','.join(subs)}]"


def print_statement(st: Statement) -> str:
    text = f"{_lhs(st)} = {print_expr(st.expr)}"
    if st.where is not None:
        text += f"   where {print_expr(st.where)}"
    return text


def _param(p: TensorArg | ScalarParam) -> str:
    if isinstance(p, TensorArg):
        text = f"{p.name}[{','.join(p.ranks)}]"
        return text + (f": {p.dtype}" if p.dtype else "")
    text = p.name + (f": {p.dtype}" if p.dtype else "")
    return text + (f" = {print_size(p.default)}" if p.default is not None else "")


def _output(o) -> str:
    text = f"{o.name}[{','.join(o.ranks)}]" if o.ranks else o.name
    return text + (f": {o.dtype}" if o.dtype else "")


def print_definition(d: Definition) -> str:
    outs = [_output(o) for o in d.outputs]
    out_text = outs[0] if len(outs) == 1 else f"({', '.join(outs)})"
    lines = [f"attention {d.name}({', '.join(_param(p) for p in d.params)}) -> {out_text} {{"]
    lines += [f"  let {let.name} = {print_size(let.value)}" for let in d.lets]
    lines += ["  " + print_statement(st) for st in d.statements]
    lines.append("}")
    return "\n".join(lines) + "\n"


def print_module(m: Module) -> str:
    return "\n".join(print_definition(d) for d in m.definitions)


def print_ir(node) -> str:
    """Print a module, definition, statement or expression."""
    if isinstance(node, Module):
        return print_module(node)
    if isinstance(node, Definition):
        return print_definition(node)
    if isinstance(node, (Einsum, IterativeEinsum)):
        return print_statement(node)
    return print_expr(node)
