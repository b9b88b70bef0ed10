"""The Einsum IR: immutable, typed nodes for cascades of extended Einsums.

Every node is a frozen dataclass with a ``loc`` that is ignored by equality, so
``parse(print(ir)) == ir`` compares meaning, not positions.  Rewrites never
mutate: they build new nodes with ``dataclasses.replace``.

Naming: a *rank* is an uppercase name (``M``, ``HK``, ``M1``); its *index
variable* is the lowercase name (``m``, ``hk``, ``m1``).  Inside the IR every
reference to an index variable stores the **rank** name (``Index("M")``), and
the printer lowercases it.  Sizes are sympy expressions over rank symbols.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

import sympy


@dataclass(frozen=True, slots=True)
class Loc:
    """A source position: 1-based line and column in ``file``."""

    file: str
    line: int
    col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


def _loc() -> Loc | None:
    return field(default=None, compare=False, repr=False, hash=False)


# ----------------------------------------------------------------------------
# Expressions
# ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Num:
    """A numeric literal (``2``, ``0.5``, ``1e-6``)."""

    value: int | float
    loc: Loc | None = _loc()


@dataclass(frozen=True, slots=True)
class Const:
    """A named constant: ``inf`` or ``pi``."""

    name: str
    loc: Loc | None = _loc()


@dataclass(frozen=True, slots=True)
class Size:
    """A rank's size used as a number (``E`` in ``1/sqrt(E)``)."""

    rank: str
    loc: Loc | None = _loc()


@dataclass(frozen=True, slots=True)
class Index:
    """A rank's index variable used as a number or subscript (``m`` is ``Index('M')``)."""

    rank: str
    loc: Loc | None = _loc()


@dataclass(frozen=True, slots=True)
class Param:
    """A scalar parameter of the definition (``scale``)."""

    name: str
    loc: Loc | None = _loc()


@dataclass(frozen=True, slots=True)
class Access:
    """A tensor element ``T[s0, s1, ...]``; subscripts are integer-affine expressions.

    A subscript may hold one level of indirection: an element of an i32/i64 argument,
    itself read at affine subscripts (``KC[PT[b, m // PG], m % PG, e]``).
    """

    tensor: str
    subscripts: tuple["Expr", ...]
    loc: Loc | None = _loc()


@dataclass(frozen=True, slots=True)
class Unary:
    """``-x`` or ``not x``."""

    op: str
    operand: "Expr"
    loc: Loc | None = _loc()


@dataclass(frozen=True, slots=True)
class Binary:
    """Arithmetic ``+ - * / ** // %``, comparisons ``< <= > >= == !=``, ``and``, ``or``."""

    op: str
    left: "Expr"
    right: "Expr"
    loc: Loc | None = _loc()


@dataclass(frozen=True, slots=True)
class Call:
    """An elementwise function: ``exp(x)``, binary ``max(a, b)``, ``select(c, a, b)``."""

    fn: str
    args: tuple["Expr", ...]
    loc: Loc | None = _loc()


@dataclass(frozen=True, slots=True)
class Reduce:
    """``op[ranks](body)`` with op in sum/max/min; binds ``ranks`` inside ``body``."""

    op: str
    ranks: tuple[str, ...]
    body: "Expr"
    loc: Loc | None = _loc()


Expr = Union[Num, Const, Size, Index, Param, Access, Unary, Binary, Call, Reduce]

ARITH_OPS = ("+", "-", "*", "/", "**", "//", "%")  # '%' only in subscripts (floor modulo)
COMPARE_OPS = ("<", "<=", ">", ">=", "==", "!=")
BOOL_OPS = ("and", "or")
REDUCE_OPS = ("sum", "max", "min")
UNARY_FUNCS = ("exp", "exp2", "log", "log2", "sqrt", "rsqrt", "tanh", "sigmoid", "abs", "relu")
BINARY_FUNCS = ("max", "min")
FUNCTIONS = UNARY_FUNCS + BINARY_FUNCS + ("select",)
DTYPES = ("f16", "bf16", "f32", "f64", "i32", "i64", "bool")
FLOAT_DTYPES = ("f16", "bf16", "f32", "f64")

# ----------------------------------------------------------------------------
# Declarations and statements
# ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TensorArg:
    """A tensor argument ``Q[P,E]`` (optionally ``: bf16``); its ranks are its core dims."""

    name: str
    ranks: tuple[str, ...]
    dtype: str | None = None
    loc: Loc | None = _loc()


@dataclass(frozen=True, slots=True)
class ScalarParam:
    """A scalar parameter: required (``default is None``) or with a sympy default."""

    name: str
    default: sympy.Expr | None = None
    dtype: str | None = None
    loc: Loc | None = _loc()


@dataclass(frozen=True, slots=True)
class SizeLet:
    """``let NAME = value``: a rank whose size is a sympy expression of earlier sizes."""

    name: str
    value: sympy.Expr
    loc: Loc | None = _loc()


@dataclass(frozen=True, slots=True)
class Output:
    """A declared output ``AV[P,F]`` (optionally ``: f32``)."""

    name: str
    ranks: tuple[str, ...]
    dtype: str | None = None
    loc: Loc | None = _loc()


@dataclass(frozen=True, slots=True)
class Einsum:
    """``T[lhs...] = expr where cond``; ``lhs`` holds rank names, one per position."""

    tensor: str
    lhs: tuple[str, ...]
    expr: Expr
    where: Expr | None = None
    loc: Loc | None = _loc()

    @property
    def ranks(self) -> tuple[str, ...]:
        return self.lhs


@dataclass(frozen=True, slots=True)
class IterativeEinsum:
    """An init ``T[0, p] = e`` (``init=True``) or update ``T[i+1, p] = e`` of rank ``iter_rank``.

    ``lhs`` lists the tensor's ranks; the iterative position holds ``iter_rank``.
    The tensor's extent along ``iter_rank`` is ``size + 1`` (steps ``0 .. I``).
    """

    tensor: str
    lhs: tuple[str, ...]
    iter_rank: str
    init: bool
    expr: Expr
    where: Expr | None = None
    loc: Loc | None = _loc()

    @property
    def ranks(self) -> tuple[str, ...]:
        return self.lhs

    @property
    def iter_pos(self) -> int:
        return self.lhs.index(self.iter_rank)


Statement = Union[Einsum, IterativeEinsum]


@dataclass(frozen=True, slots=True)
class Definition:
    """One ``attention NAME(...) -> ... { ... }``: a cascade of Einsums."""

    name: str
    params: tuple[TensorArg | ScalarParam, ...]
    lets: tuple[SizeLet, ...]
    outputs: tuple[Output, ...]
    statements: tuple[Statement, ...]
    loc: Loc | None = _loc()

    @property
    def tensor_args(self) -> tuple[TensorArg, ...]:
        return tuple(p for p in self.params if isinstance(p, TensorArg))

    @property
    def scalar_params(self) -> tuple[ScalarParam, ...]:
        return tuple(p for p in self.params if isinstance(p, ScalarParam))

    @property
    def ranks(self) -> tuple[str, ...]:
        """Every rank, in order of first declaration (arguments, then lets)."""
        seen: dict[str, None] = {}
        for arg in self.tensor_args:
            for r in arg.ranks:
                seen.setdefault(r, None)
        for let in self.lets:
            seen.setdefault(let.name, None)
        return tuple(seen)

    def tensor_ranks(self, name: str) -> tuple[str, ...]:
        """The core ranks of an argument or defined tensor."""
        for arg in self.tensor_args:
            if arg.name == name:
                return arg.ranks
        for st in self.statements:
            if st.tensor == name:
                return st.lhs
        raise KeyError(name)

    def definitions_of(self, name: str) -> tuple[Statement, ...]:
        return tuple(st for st in self.statements if st.tensor == name)

    @property
    def iterative_ranks(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for st in self.statements:
            if isinstance(st, IterativeEinsum):
                seen.setdefault(st.iter_rank, None)
        return tuple(seen)

    @property
    def iterative_tensors(self) -> dict[str, str]:
        """Iterative tensor name -> its iterative rank."""
        return {st.tensor: st.iter_rank for st in self.statements if isinstance(st, IterativeEinsum)}


@dataclass(frozen=True, slots=True)
class Module:
    """A whole ``.attn`` file: one or more definitions."""

    definitions: tuple[Definition, ...]
    loc: Loc | None = _loc()

    def __getitem__(self, name: str) -> Definition:
        for d in self.definitions:
            if d.name == name:
                return d
        raise KeyError(name)


def size_symbol(rank: str) -> sympy.Symbol:
    """The sympy symbol for a rank's size (a positive integer)."""
    return sympy.Symbol(rank, integer=True, positive=True)


def index_var(rank: str) -> str:
    """The surface name of a rank's index variable."""
    return rank.lower()
