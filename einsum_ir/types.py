"""Value types of expressions: ``int``, ``bool`` or ``float``, decided once for every backend.

The contract computes in at least float32, but integers stay integers where they can
(sizes, index variables, integer literals, ``i32``/``i64`` tensor elements, and ``+ - * //
%`` of integers), because subscripts and tile bounds need exact integer arithmetic.  A
float function (``exp``, ``sqrt``, ``tanh``...) or true division turns its operands into
floats: a renderer asks :func:`expr_type` and converts an ``int`` or ``bool`` operand there,
instead of guessing from the code it wrote.  Before → after (Triton)::

    S = Q . K / sqrt(E)          # E: int
    ->  tl.sqrt(E)               # fails: tl.sqrt takes fp32/fp64
    ->  tl.sqrt(E.to(tl.float32))  # expr_type(Size('E')) == 'int' asks for a conversion

Promotion: ``bool`` < ``int`` < ``float``; comparisons, ``and``, ``or`` and ``not`` are
``bool``; ``select`` joins its branches.
"""
from __future__ import annotations

from functools import lru_cache

from .ir import (Access, Binary, Call, Const, Definition, Einsum, Expr, Index, IterativeEinsum,
                 Num, Param, Reduce, Size, Unary)

INT, BOOL, FLOAT = "int", "bool", "float"
_RANK = {BOOL: 0, INT: 1, FLOAT: 2}
INTEGER_DTYPES = ("i32", "i64")
FLOAT_FUNCS = ("exp", "exp2", "log", "log2", "sqrt", "rsqrt", "tanh", "sigmoid")


def join(*kinds: str) -> str:
    """The type that holds every one of ``kinds`` (bool < int < float)."""
    return max(kinds, key=_RANK.__getitem__)


def dtype_type(dtype: str | None) -> str:
    """The value type of a tensor element of ``dtype`` (no dtype: float)."""
    if dtype in INTEGER_DTYPES:
        return INT
    return BOOL if dtype == "bool" else FLOAT


def _arith(op: str, a: str, b: str, right: Expr) -> str:
    if op == "/":
        return FLOAT
    if op == "**":
        # an integer to a non-negative integer literal power stays an integer
        exact = isinstance(right, Num) and isinstance(right.value, int) and right.value >= 0
        return INT if exact and join(a, b) != FLOAT else FLOAT
    if op in ("//", "%"):
        return INT if join(a, b) != FLOAT else FLOAT
    return INT if join(a, b) != FLOAT else FLOAT


class TypeEnv:
    """Types of one definition's tensors, parameters and expressions."""

    def __init__(self, defn: Definition):
        self.defn = defn
        self.tensors = {a.name: dtype_type(a.dtype) for a in defn.tensor_args}
        self.params = {p.name: (INT if p.dtype in INTEGER_DTYPES else FLOAT)
                       for p in defn.scalar_params}
        for st in _in_dependency_order(defn):
            if st.tensor not in self.tensors:
                self.tensors[st.tensor] = self.of(st.expr)

    def of(self, e: Expr) -> str:
        """The value type of expression ``e``."""
        if isinstance(e, Num):
            return INT if isinstance(e.value, int) and not isinstance(e.value, bool) else FLOAT
        if isinstance(e, Const):
            return FLOAT
        if isinstance(e, (Size, Index)):
            return INT
        if isinstance(e, Param):
            return self.params.get(e.name, FLOAT)
        if isinstance(e, Access):
            return self.tensors.get(e.tensor, FLOAT)
        if isinstance(e, Unary):
            return BOOL if e.op == "not" else join(INT, self.of(e.operand))
        if isinstance(e, Binary):
            return self._binary(e)
        if isinstance(e, Call):
            return self._call(e)
        if isinstance(e, Reduce):
            body = self.of(e.body)
            return join(INT, body) if e.op == "sum" else body
        raise TypeError(f"no type for {e!r}")

    def _binary(self, e: Binary) -> str:
        if e.op in ("and", "or", "<", "<=", ">", ">=", "==", "!="):
            return BOOL
        return _arith(e.op, self.of(e.left), self.of(e.right), e.right)

    def _call(self, e: Call) -> str:
        if e.fn in FLOAT_FUNCS:
            return FLOAT
        if e.fn == "select":
            return join(*(self.of(a) for a in e.args[1:]))
        return join(INT, *(self.of(a) for a in e.args))  # abs, relu, max, min

    def needs_float(self, e: Expr) -> bool:
        """Whether ``e`` must be converted where a float is required (it is int or bool)."""
        return self.of(e) != FLOAT


def _in_dependency_order(defn: Definition):
    """Statements ordered so that a tensor's definition comes before its readers (inits
    before updates; cycles through iterative state read the init's type)."""
    from .exprs import walk

    pending = list(defn.statements)
    done: set[str] = {a.name for a in defn.tensor_args}
    out = []
    while pending:
        progressed = False
        for st in list(pending):
            reads = {n.tensor for n in walk(st.expr) if isinstance(n, Access)}
            if isinstance(st, IterativeEinsum) and not st.init:
                reads.discard(st.tensor)
            if reads <= done | {st.tensor}:
                out.append(st)
                done.add(st.tensor)
                pending.remove(st)
                progressed = True
        if not progressed:  # a cycle the checker reports elsewhere: type the rest as read
            out += pending
            break
    return [s for s in out if isinstance(s, (Einsum, IterativeEinsum))]


@lru_cache(maxsize=256)
def type_env(defn: Definition) -> TypeEnv:
    """The (cached) type environment of ``defn``."""
    return TypeEnv(defn)
