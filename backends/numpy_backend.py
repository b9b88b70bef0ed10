"""The numpy backend: a Cascade rendered as a plain, per-Einsum vectorised module.

Each statement becomes a few lines over a grid of axes (one per LHS variable,
one per variable of each reduction, so a reduction's variable shadows an outer
use of the same rank).  Values travel with their presence masks (``None`` when
everything is present), so absent elements follow the contract exactly.  A sum
over a product of tensors becomes one ``np.einsum``.  The jinja2 template lays
out the module; this file renders expressions, where precedence is easy.

    QK[p,m] = sum[e](Q[p,e] * K[m,e] * scale)   where m <= p + M - P
    ->
    _p0 = _ix(P, 0, 3); _m1 = _ix(M, 1, 3)
    _w0 = _holds(_m1 <= _p0 + M - P, None)
    _t1, _k1 = _contract('...ac,...bc->...ab', (0, 1), 3, (Q, K), (None, None), (E,))
    QK, QK_m = _store(_t1 * scale, _and(_k1, _w0), batch + (P, M), 2, 3, ct)
"""
from __future__ import annotations

import keyword
import math
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import sympy

from .. import __version__
from ..einsum_ir.exprs import free_ranks, walk
from ..einsum_ir.ir import (COMPARE_OPS, Access, Binary, Call, Const, Definition, Einsum, Expr,
                            Index,
                            IterativeEinsum, Module, Num, Param, Reduce, Size, Unary)
from ..einsum_ir.printer import format_number, print_definition, print_size, print_statement
from ..einsum_ir.schedule import Loop, schedule

TEMPLATES = Path(__file__).resolve().parent.parent / "templates" / "numpy"
RESERVED = {"np", "Fraction", "math", "batch", "ct", "out_dtype"}
# Python's parser rejects more than 200 nested brackets in a line; deeper expressions are
# split into temporaries well before that (a statement's line adds a few levels of its own)
MAX_CODE_NESTING = 50

ARITHMETIC = ("+", "-", "*", "/", "//", "**")
UNARY_NP = {"exp": "np.exp", "exp2": "np.exp2", "log": "np.log", "log2": "np.log2",
            "sqrt": "np.sqrt", "tanh": "np.tanh", "abs": "np.abs"}


def pyname(name: str) -> str:
    """A user name as a safe Python identifier (user names never start with '_u')."""
    if keyword.iskeyword(name) or name.startswith("_") or name in RESERVED:
        return f"u_{name}"
    return name


def mask_name(tensor: str) -> str:
    return f"{pyname(tensor)}_m"


# ----------------------------------------------------------------------------
# sizes and defaults (sympy -> Python)
# ----------------------------------------------------------------------------


def size_code(e: sympy.Expr, exact: bool, lib: str = "np", vector: bool = False,
              symbol=None) -> str:
    """sympy size expression -> Python; ``exact`` renders a let's value exactly.

    ``lib`` names the math module of the generated code (``np`` or ``math``);
    ``vector`` renders ceil/floor for arrays; ``symbol`` names a symbol (default: pyname).
    """
    if exact and not vector:
        return _exact_code(e, lib, symbol)

    def again(x, ex=exact):
        return size_code(x, ex, lib, vector, symbol)

    if e.is_Symbol:
        return (symbol or pyname)(e.name)
    if e.is_Integer:
        return str(int(e))
    if e.is_Rational:
        return f"({e.p} / {e.q})"
    if e.is_Float:
        return repr(float(e))
    if e is sympy.pi:
        return f"{lib}.pi"
    if e is sympy.oo:
        return f"{lib}.inf"
    if e.is_Add:
        return "(" + " + ".join(again(a, exact) for a in e.args) + ")"
    if e.is_Mul:
        return "(" + " * ".join(again(a, exact) for a in e.args) + ")"
    if e.is_Pow:
        base, exp = e.args
        if exp.is_Integer and exp < 0:
            if lib == "np":  # IEEE, as the interpreter: a default 1/L0 at L0 = 0 is inf
                return f"np.divide(1.0, {again(base ** -exp, exact)})"
            if lib == "math":  # plain floats: the runtime's IEEE divide (sizes.py.jinja)
                return f"_fdiv(1.0, {again(base ** -exp, exact)})"
            return f"(1.0 / {again(base ** -exp, exact)})"
        if exp == sympy.Rational(1, 2):
            return f"{lib}.sqrt({again(base, False)})"
        if exp == -sympy.Rational(1, 2):
            return f"_fdiv(1.0, math.sqrt({again(base, False)}))" if lib == "math" else \
                f"(1.0 / {lib}.sqrt({again(base, False)}))"
        return f"({again(base, exact)} ** {again(exp, exact)})"
    if isinstance(e, (sympy.ceiling, sympy.floor)) and not vector:
        return _rounded_code(e, lib, symbol)
    if isinstance(e, sympy.ceiling):
        return f"np.ceil({again(e.args[0])})"
    if isinstance(e, sympy.floor):
        return f"np.floor({again(e.args[0])})"
    if isinstance(e, (sympy.Min, sympy.Max)):
        fn = "min" if isinstance(e, sympy.Min) else "max"
        return f"{fn}(" + ", ".join(again(a, exact) for a in e.args) + ")"
    if isinstance(e, sympy.exp):
        return f"{lib}.exp({again(e.args[0], False)})"
    if isinstance(e, sympy.log):
        return f"{lib}.log({again(e.args[0], False)})"
    if isinstance(e, sympy.Abs):
        return f"abs({again(e.args[0], exact)})"
    if e.is_number and e.is_extended_real:  # constants sympy keeps symbolic: E, -oo, EulerGamma
        v = float(e)
        return repr(v) if math.isfinite(v) else f"{lib}.inf" if v > 0 else f"(-{lib}.inf)"
    raise NotImplementedError(f"size expression {e}")


def _exact_code(e: sympy.Expr, lib: str, symbol) -> str:
    """A size's exact value as integer arithmetic over one quotient, ``_q(num, den)``
    (the generated runtime's: an integer when ``den`` divides ``num``, else a Fraction),
    so symbolic sizes (torch SymInts under ``torch.compile(dynamic=True)``) stay symbolic:
    ``H / HK`` -> ``_q(H, HK)``, ``ceiling(M/M0)`` -> ``(-((-M) // M0))``."""
    num, den = sympy.fraction(sympy.together(e))
    if den == 1:
        return _integer_code(num, lib, symbol)
    return f"_q({_integer_code(num, lib, symbol)}, {_integer_code(den, lib, symbol)})"


def _integer_code(e: sympy.Expr, lib: str, symbol) -> str:
    """A numerator or denominator: sums, products and whole powers of integers, sizes,
    rounded quotients and min/max (exact); anything else (sqrt, exp) as floats."""
    if e.is_Symbol:
        return (symbol or pyname)(e.name)
    if e.is_Integer:
        return str(int(e))
    if e.is_Add or e.is_Mul:
        sep = " + " if e.is_Add else " * "
        return "(" + sep.join(_integer_code(a, lib, symbol) for a in e.args) + ")"
    if e.is_Pow and e.args[1].is_Integer and e.args[1] > 0:
        return f"({_integer_code(e.args[0], lib, symbol)} ** {int(e.args[1])})"
    if isinstance(e, (sympy.ceiling, sympy.floor)):
        return _rounded_code(e, lib, symbol)
    if isinstance(e, (sympy.Min, sympy.Max)):
        fn = "min" if isinstance(e, sympy.Min) else "max"
        return f"{fn}(" + ", ".join(_exact_code(a, lib, symbol) for a in e.args) + ")"
    if isinstance(e, sympy.Abs):
        return f"abs({_exact_code(e.args[0], lib, symbol)})"
    return size_code(e, False, lib, symbol=symbol)


def _rounded_code(e: sympy.Expr, lib: str, symbol) -> str:
    """ceil/floor of a quotient by floor division (``ceil(n/d) = -(-n // d)``); of a
    whole number, the number itself; else the runtime's ``_ceil``/``_floor``."""
    num, den = sympy.fraction(sympy.together(e.args[0]))
    n, d = _integer_code(num, lib, symbol), _integer_code(den, lib, symbol)
    if den != 1 and num.is_integer and den.is_integer:
        return f"({n} // {d})" if isinstance(e, sympy.floor) else f"(-((-{n}) // {d}))"
    if den == 1 and num.is_integer:
        return n
    fn = "_floor" if isinstance(e, sympy.floor) else "_ceil"
    return f"{fn}({_exact_code(e.args[0], lib, symbol)})"


# ----------------------------------------------------------------------------
# statements
# ----------------------------------------------------------------------------


@dataclass
class Temps:
    """Deterministic temporary names, numbered per generated function."""

    count: int = 0

    def new(self, prefix: str) -> str:
        self.count += 1
        return f"_{prefix}{self.count}"


@dataclass(frozen=True)
class Bound:
    """How an index variable is bound: a grid axis, or a loop's scalar step."""

    rank: str
    axis: int | None
    code: str


@dataclass
class StatementRenderer:
    """Renders one statement's right-hand side over its grid."""

    defn: Definition
    st: Einsum | IterativeEinsum
    temps: Temps
    loop_rank: str | None = None
    static_present: frozenset[str] = frozenset()
    lines: list[str] = field(default_factory=list)
    nd: int = 0
    axes_of: dict[int, tuple[int, ...]] = field(default_factory=dict)
    index_arrays: dict[int, str] = field(default_factory=dict)

    # --- grid -------------------------------------------------------------
    def lhs_env(self) -> dict[str, Bound]:
        env: dict[str, Bound] = {}
        for r in self.st.lhs:
            if isinstance(self.st, IterativeEinsum) and r == self.st.iter_rank:
                if not self.st.init:
                    env[r] = Bound(r, None, r.lower())
            elif r == self.loop_rank:
                env[r] = Bound(r, None, r.lower())
            else:
                env[r] = Bound(r, len([b for b in env.values() if b.axis is not None]), "")
        return env

    def assign_axes(self, nl: int) -> None:
        self.nd = nl
        for node in walk(self.st.expr):
            if isinstance(node, Reduce):
                self.axes_of[id(node)] = tuple(range(self.nd, self.nd + len(node.ranks)))
                self.nd += len(node.ranks)

    def index(self, b: Bound) -> str:
        """Code for an index variable's integer values."""
        if b.axis is None:
            return b.code
        if b.axis not in self.index_arrays:
            name = f"_{b.rank.lower()}{b.axis}"
            self.lines.append(f"{name} = _ix({pyname(b.rank)}, {b.axis}, {self.nd})")
            self.index_arrays[b.axis] = name
        return self.index_arrays[b.axis]

    # --- expressions ---------------------------------------------------------
    def value(self, e: Expr, env: dict[str, Bound]) -> tuple[str, list[str]]:
        """(Python code for the value, names of the masks it depends on)."""
        if isinstance(e, Num):
            return format_number(float(e.value)) if not isinstance(e.value, bool) else str(e.value), []
        if isinstance(e, Const):
            return ("np.inf" if e.name == "inf" else "np.pi"), []
        if isinstance(e, Size):
            return pyname(e.rank), []
        if isinstance(e, Param):
            return pyname(e.name), []
        if isinstance(e, Index):
            b = env[e.rank]
            return (b.code if b.axis is None else f"{self.index(b)}.astype(ct)"), []
        if isinstance(e, Access):
            return self.access(e, env)
        if isinstance(e, Unary):
            v, m = self.value(e.operand, env)
            code = f"(-{_number(v, e.operand)})" if e.op == "-" else f"({v} == 0)"
            return self.bounded(code, m)
        if isinstance(e, Binary):
            return self.bounded(*self.binary(e, env))
        if isinstance(e, Call):
            return self.bounded(*self.call(e, env))
        if isinstance(e, Reduce):
            return self.reduce(e, env)
        raise TypeError(e)

    def bounded(self, code: str, masks: list[str]) -> tuple[str, list[str]]:
        """``code``, or a temporary assigned it once it nests deeper than MAX_CODE_NESTING:
        a deep expression becomes a chain of assignments that Python can still parse."""
        if code.count("(") <= MAX_CODE_NESTING or _nesting(code) <= MAX_CODE_NESTING:
            return code, masks
        v = self.temps.new("v")
        self.lines.append(f"{v} = {code}")
        return v, masks

    def binary(self, e: Binary, env) -> tuple[str, list[str]]:
        a, ma = self.value(e.left, env)
        b, mb = self.value(e.right, env)
        if e.op in ARITHMETIC:
            a, b = _number(a, e.left), _number(b, e.right)
        if e.op == "and":
            return f"np.logical_and({a} != 0, {b} != 0)", ma + mb
        if e.op == "or":
            return f"np.logical_or({a} != 0, {b} != 0)", ma + mb
        if e.op == "//":
            return f"np.floor_divide({a}, {b})", ma + mb
        return f"({a} {e.op} {b})", ma + mb

    def call(self, e: Call, env) -> tuple[str, list[str]]:
        parts = [self.value(a, env) for a in e.args]
        args = [p[0] if e.fn == "select" else _number(p[0], a) for p, a in zip(parts, e.args)]
        masks = [m for p in parts for m in p[1]]
        if e.fn == "select":
            return f"np.where({args[0]} != 0, {args[1]}, {args[2]})", masks
        if e.fn in ("max", "min") and len(args) == 2:
            return f"np.{e.fn}imum({args[0]}, {args[1]})", masks
        if e.fn == "rsqrt":
            return f"(1.0 / np.sqrt({args[0]}))", masks
        if e.fn == "sigmoid":
            return f"(0.5 + 0.5 * np.tanh(0.5 * {args[0]}))", masks
        if e.fn == "relu":
            return f"np.maximum({args[0]}, 0.0)", masks
        return f"{UNARY_NP[e.fn]}({args[0]})", masks

    def subscript(self, e: Expr, env, masks: list[str] | None = None) -> str:
        """Integer code for a subscript; an index tensor's element in it (an indirect term) is
        read into a temporary and its presence mask appended to ``masks``."""
        if isinstance(e, Index):
            return self.index(env[e.rank])
        if isinstance(e, Size):
            return pyname(e.rank)
        if isinstance(e, Num):
            return str(int(e.value))
        if isinstance(e, Unary):
            return self.bounded(f"(-{self.subscript(e.operand, env, masks)})", [])[0]
        if isinstance(e, Binary):
            left, right = self.subscript(e.left, env, masks), self.subscript(e.right, env, masks)
            return self.bounded(f"({left} {e.op} {right})", [])[0]  # deep ones: temporaries
        if isinstance(e, Access) and masks is not None:
            value, index_masks = self.access(e, env)
            masks.extend(index_masks)
            return f"{value}.astype(np.int64)"  # i32 arithmetic (PT * PG) would wrap around
        raise TypeError(f"not an affine subscript: {e}")

    def plain_axes(self, e: Access, env) -> tuple[int, ...] | None:
        """Grid axes of an access whose subscripts are its own ranks' variables, else None."""
        ranks = self.defn.tensor_ranks(e.tensor)
        axes = []
        for sub, rank in zip(e.subscripts, ranks):
            if not (isinstance(sub, Index) and sub.rank == rank and env[rank].axis is not None):
                return None
            axes.append(env[rank].axis)
        if self.defn.iterative_tensors.get(e.tensor) or len(set(axes)) != len(axes):
            return None
        return tuple(axes)

    def view_operand(self, e: Access, env) -> tuple[str, str | None, tuple[int, ...]] | None:
        """(array code, mask code, grid axes of its core dims) of a viewable access, else None."""
        axes = self.plain_axes(e, env)
        return None if axes is None else (pyname(e.tensor), self.mask_of(e.tensor), axes)

    def gathered_operand(self, e: Access, env) -> tuple[str, str | None, tuple[int, ...]]:
        """An indirect read as an ``np.einsum`` operand: gathered on the grid, then cut to the
        grid axes its subscripts vary along (the others have extent 1 there)."""
        axes = tuple(sorted({env[r].axis for r in free_ranks(e) if env[r].axis is not None}))
        value, masks = self.access(e, env)
        mask = f"_axes({_and(masks)}, {axes}, {self.nd})" if masks else None
        return f"_axes({value}, {axes}, {self.nd})", mask, axes

    def mask_of(self, tensor: str) -> str | None:
        return None if tensor in self.static_present else mask_name(tensor)

    def access(self, e: Access, env) -> tuple[str, list[str]]:
        t, m = pyname(e.tensor), self.mask_of(e.tensor)
        axes = self.plain_axes(e, env)
        if axes is not None:
            masks = [] if m is None else [f"_view({m}, {axes}, {self.nd})"]
            return f"_view({t}, {axes}, {self.nd})", masks
        index_masks: list[str] = []
        subs = [self.subscript(s, env, index_masks) for s in e.subscripts]
        return self.gather(t, m, subs, is_indirect(e), index_masks)

    def gather(self, array: str, mask: str | None, subs: list[str], indirect: bool,
               index_masks: list[str]) -> tuple[str, list[str]]:
        """A gathered read; one with indirect subscripts goes through ``_gather_at``, whose
        subscripts carry the index tensors' batch dims and presence."""
        v, k = self.temps.new("t"), self.temps.new("k")
        if indirect:
            self.lines.append(f"{v}, {k} = _gather_at({array}, {mask}, {tup(subs)}, "
                              f"{_and(index_masks)}, {self.nd})")
        else:
            self.lines.append(f"{v}, {k} = _gather({array}, {mask}, {tup(subs)}, {self.nd})")
        return v, [k]

    def filter_at(self, env: dict[str, Bound]) -> str | None:
        """The where-filter at a level whose variables are ``env``, if it applies there."""
        if self.st.where is None or not free_ranks(self.st.where) <= set(env):
            return None
        v, masks = self.value(self.st.where, env)
        w = self.temps.new("w")
        self.lines.append(f"{w} = _holds({v}, {_and(masks)})")
        return w

    def reduce(self, e: Reduce, env) -> tuple[str, list[str]]:
        axes = self.axes_of[id(e)]
        inner = dict(env)
        for r, a in zip(e.ranks, axes):
            inner[r] = Bound(r, a, "")
        extents = tup(pyname(r) for r in e.ranks)
        if e.op == "sum":
            # a where not over the summed ranks filters the sum's result; one over them
            # masks the operand whose ranks it spans
            outside = self.filter_outside(e)
            fast = self.contraction(e, inner, axes, extents, fold_where=not outside)
            if fast is not None:
                filt = self.filter_at(inner) if outside else None
                return fast[0], fast[1] + ([filt] if filt else [])
        filt = self.filter_at(inner)
        body, masks = self.value(e.body, inner)
        v, k = self.temps.new("t"), self.temps.new("k")
        self.lines.append(f"{v}, {k} = _reduce({e.op!r}, {body}, {_and(masks)}, {filt}, "
                          f"{axes}, {extents}, {self.nd})")
        return v, [k]

    def filter_outside(self, e: Reduce) -> bool:
        return self.st.where is None or not (free_ranks(self.st.where) & set(e.ranks))

    def contraction(self, e: Reduce, env, axes, extents,
                    fold_where: bool = False) -> tuple[str, list[str]] | None:
        """``sum[r](T1[..] * T2[..] * c)`` as one np.einsum, or None if not that shape.
        Factors that are not plain reads become operands over their grid axes: presence
        and scale the backward adds (``select(K[m,e] == K[m,e], 1, 1)``), a divisor free
        of the summed ranks as its reciprocal (``1 / SD[p]``), ``exp(QK[p,m] - GM[p])``;
        ``fold_where``: the statement's where (over the summed ranks) masks the operand
        whose axes it spans (causal ``m <= p`` on ``dQK[p,m]`` of ``dK``)."""
        summed = set(e.ranks)
        grid = set(env)
        tensors, scalars, outer = [], [], []
        divisors = []
        for f in _factors_over(e.body, summed):
            if isinstance(f, _Divisor):
                divisors.append(f.expr)
                continue
            view = self.view_operand(f, env) if isinstance(f, Access) else None
            if view is None and isinstance(f, Access) and is_indirect(f):
                view = self.gathered_operand(f, env)
            if view is not None:
                tensors.append(view)
            elif not free_ranks(f) and not any(isinstance(n, (Access, Reduce)) for n in walk(f)):
                scalars.append(self.value(f, env)[0])
            elif not any(isinstance(n, Reduce) for n in walk(f)) and (
                    free_ranks(f) < grid or not (free_ranks(f) & summed)):
                outer.append(f)
            else:
                return None
        if not tensors:
            return None
        # the other factors are operands too: np.einsum over non-finite values goes
        # point by point (_contract_on_grid), so NaN and Inf stay the interpreter's
        tensors += [self.expression_operand(f, env) for f in outer]
        tensors += [self.expression_operand(d, env, reciprocal=True) for d in divisors]
        used = {a for _, _, ax in tensors for a in ax}
        if not set(axes) <= used:
            return None
        if fold_where:
            tensors = self.where_folded(tensors, env)
            if tensors is None:
                return None
        letters = lambda ax: "".join(chr(ord("a") + a) for a in ax)  # noqa: E731
        out_axes = tuple(sorted(used - set(axes)))
        spec = ",".join("..." + letters(ax) for _, _, ax in tensors) + "->..." + letters(out_axes)
        ops = tup(array for array, _, _ in tensors)
        masks = tup(str(mask) for _, mask, _ in tensors)
        v, k = self.temps.new("t"), self.temps.new("k")
        self.lines.append(f"{v}, {k} = _contract({spec!r}, {out_axes}, {self.nd}, {ops}, {masks}, "
                          f"{extents})")
        value = " * ".join([v] + scalars)
        return (f"({value})" if scalars else v), [k]

    def expression_operand(self, f: Expr, env, reciprocal: bool = False
                           ) -> tuple[str, str | None, tuple[int, ...]]:
        """A factor computed on the grid, cut to the grid axes of its ranks (an operand);
        ``reciprocal``: ``1 / f`` (a divisor: numpy's division, inf at 0)."""
        axes = tuple(sorted({env[r].axis for r in free_ranks(f) if env[r].axis is not None}))
        value, masks = self.value(f, env)
        if reciprocal:
            value = f"np.divide(1.0, {value})"
        t = self.temps.new("t")
        self.lines.append(f"{t} = _axes({value}, {axes}, {self.nd})")
        mask = None
        if masks:
            mask = self.temps.new("k")
            self.lines.append(f"{mask} = _axes_as({_and(masks)}, {axes}, {self.nd}, "
                              f"np.shape({t}))")
        return t, mask, axes

    def where_folded(self, tensors, env):
        """The operands with the statement's where folded into the presence of the first
        one whose axes it spans, or None when none does."""
        ranks = free_ranks(self.st.where)
        if not ranks <= set(env):
            return None
        want = {env[r].axis for r in ranks if env[r].axis is not None}
        for i, (array, mask, ax) in enumerate(tensors):
            if want <= set(ax):
                v, masks = self.value(self.st.where, env)
                w = self.temps.new("w")
                self.lines.append(f"{w} = _axes_as(_holds({v}, {_and(masks)}), {ax}, "
                                  f"{self.nd}, np.shape({array}))")
                return tensors[:i] + [(array, _and([mask, w]), ax)] + tensors[i + 1:]
        return None

    # --- the statement ----------------------------------------------------------
    def render(self) -> tuple[list[str], str, str | None, int]:
        """Lines computing the RHS; returns (lines, value, mask, nl)."""
        env = self.lhs_env()
        nl = sum(1 for b in env.values() if b.axis is not None)
        self.assign_axes(nl)
        return self.render_from(env, nl)

    def render_from(self, env: dict[str, Bound], nl: int):
        value, masks = self.value(self.st.expr, env)
        filt = self.filter_at(env)
        mask = _and(masks + ([filt] if filt else []))
        return self.lines, value, mask, nl


def _factors_over(e: Expr, summed: set[str]) -> list[Expr]:
    """``e``'s factors, a divisor free of the summed ranks marked as one:
    ``dA[p,m] * V[m,f] / SD[p]`` -> ``dA[p,m]``, ``V[m,f]``, divisor ``SD[p]``."""
    if isinstance(e, Binary) and e.op == "*":
        return _factors_over(e.left, summed) + _factors_over(e.right, summed)
    if isinstance(e, Binary) and e.op == "/" and not (free_ranks(e.right) & summed):
        return _factors_over(e.left, summed) + [_Divisor(e.right)]
    return [e]


@dataclass(frozen=True)
class _Divisor:
    """A divisor split off a contraction's body: its reciprocal is an operand."""

    expr: Expr


def is_indirect(e: Access) -> bool:
    """Whether a subscript of ``e`` reads an index tensor."""
    return any(isinstance(n, Access) for s in e.subscripts for n in walk(s))


def _boolean(e: Expr) -> bool:
    """Whether numpy computes ``e`` as a bool array: comparisons, logic, and what keeps them."""
    if isinstance(e, Binary):
        return e.op in COMPARE_OPS or e.op in ("and", "or")
    if isinstance(e, Unary):
        return e.op == "not"
    if isinstance(e, Call) and e.fn == "select":
        return _boolean(e.args[1]) and _boolean(e.args[2])
    if isinstance(e, Call) and e.fn in ("max", "min", "abs"):
        return all(_boolean(a) for a in e.args)
    return isinstance(e, Reduce) and e.op in ("max", "min") and _boolean(e.body)


def _number(code: str, e: Expr) -> str:
    """``code`` as a number where numpy would do logic on bools (True + True is True,
    -True an error, exp(True) a float16)."""
    return f"(1.0 * {code})" if _boolean(e) else code


def _nesting(code: str) -> int:
    """The deepest bracket nesting in a line of generated code."""
    depth = deepest = 0
    for ch in code:
        if ch in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in ")]}":
            depth -= 1
    return deepest


def tup(items) -> str:
    """A Python tuple literal."""
    items = list(items)
    return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"


def _and(masks: list[str]) -> str:
    masks = [m for m in masks if m is not None]
    if not masks:
        return "None"
    if len(masks) == 1:
        return masks[0]
    return f"_and({', '.join(masks)})"


# ----------------------------------------------------------------------------
# functions and the module
# ----------------------------------------------------------------------------


class FunctionRenderer:
    """One generated function per definition."""

    def __init__(self, defn: Definition):
        self.defn = defn
        self.temps = Temps()
        self.static = frozenset(a.name for a in defn.tensor_args)
        self.iterative = defn.iterative_tensors
        self.undeclared: frozenset = frozenset()  # outputs in the inputs' float type

    def shape(self, st, extra_step: bool) -> str:
        dims = []
        for r in st.lhs:
            size = pyname(r)
            if extra_step and self.iterative.get(st.tensor) == r:
                size = f"{size} + 1"
            dims.append(size)
        return f"batch + {tup(dims)}"

    def statement(self, st, loop_rank: str | None = None) -> list[str]:
        r = StatementRenderer(self.defn, st, self.temps, loop_rank, self.static)
        lines, value, mask, nl = r.render()
        out = [f"# {print_statement(st)}"] + lines
        t, m = pyname(st.tensor), mask_name(st.tensor)
        nd = r.nd
        if isinstance(st, IterativeEinsum) and st.init:
            shape = self.shape(st, True)
            out += [f"{t} = np.zeros({shape}, ct)", f"{m} = np.zeros({shape}, bool)",
                    f"_write_step({t}, {m}, {st.iter_pos}, 0, {value}, {mask}, {nl}, {nd})"]
        elif isinstance(st, IterativeEinsum):
            out.append(f"_update_step({t}, {m}, {st.iter_pos}, {st.iter_rank.lower()}, {value}, "
                       f"{mask}, {nl}, {nd})")
        elif loop_rank is not None and loop_rank in st.lhs:
            out.append(f"_write_step({t}, {m}, {st.lhs.index(loop_rank)}, {loop_rank.lower()}, "
                       f"{value}, {mask}, {nl}, {nd})")
        else:
            out.append(f"{t}, {m} = _store({value}, {mask}, {self.shape(st, False)}, {nl}, {nd}, ct)")
        return out

    def loop(self, loop: Loop) -> list[str]:
        out = [f"# loop over the iterative rank {loop.rank}"]
        for st in loop.body:
            if isinstance(st, Einsum):
                shape = self.shape(st, False)
                out += [f"{pyname(st.tensor)} = np.zeros({shape}, ct)",
                        f"{mask_name(st.tensor)} = np.zeros({shape}, bool)"]
        out.append(f"for {loop.rank.lower()} in range({pyname(loop.rank)}):")
        for st in loop.body:
            out += ["    " + line for line in self.statement(st, loop.rank)]
        return out

    def body(self) -> list[str]:
        out: list[str] = []
        for step in schedule(self.defn):
            out += self.loop(step) if isinstance(step, Loop) else self.statement(step)
            out.append("")
        return out

    def context(self) -> dict:
        d = self.defn
        args = d.tensor_args
        lets = [(pyname(let.name), size_code(let.value, True), print_size(let.value)) for let in d.lets]
        params = []
        for p in d.scalar_params:
            default = size_code(p.default, False) if p.default is not None else None
            params.append((pyname(p.name), p.name, default, p.dtype))
        outputs = []
        for o in d.outputs:
            shape = f"batch + {tup(pyname(r) for r in o.ranks)}"
            dtype = None if o.name in self.undeclared else o.dtype
            outputs.append((pyname(o.name), mask_name(o.name), shape, dtype))
        sig = [pyname(a.name) for a in args]
        sig += ["*"] + [p[0] if p[2] is None else f"{p[0]}=None" for p in params] if params else []
        return dict(
            name=pyname(d.name), signature=", ".join(sig), args=[(pyname(a.name), a.name, a.ranks, a.dtype) for a in args],
            ranks=[pyname(r) for r in dict.fromkeys(r for a in args for r in a.ranks)],
            lets=lets, params=params, outputs=outputs, body=self.body(),
            doc=print_definition(d).rstrip(),
        )


def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader([str(TEMPLATES), str(TEMPLATES.parent / "common")]),
                              keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True,
                              undefined=jinja2.StrictUndefined)


def lower_for_numpy(defn: Definition, source: Definition | None, options: dict,
                    after_lowering=None):
    """The kernel program of ``defn`` for the numpy target, or None when it has none (the
    per-Einsum form runs it: it takes every cascade; ``after_lowering`` hears why)."""
    from ..passes.lowering import TARGETS, lower
    from ..passes.tile import NotTileable

    try:
        return lower(defn, TARGETS["numpy"], options, source, after_lowering)
    except NotTileable as err:
        if after_lowering is not None:
            after_lowering("choose-form", f"{defn.name}: no kernel program ({err}); the numpy "
                                          f"backend runs the cascade Einsum by Einsum")
        return None


def kernel_renderer(k):
    """The fused renderer of one kernel, or None when this form cannot hold it."""
    from ..passes.tile import NotTileable
    from .numpy_fused import FusedFunctionRenderer

    try:
        FusedFunctionRenderer(k).body()  # a trial: rendering may find it untileable
        return FusedFunctionRenderer(k)  # fresh, so temporaries number from 1
    except NotTileable:
        return None


def part_renderer(q, between: set[str]) -> FunctionRenderer:
    """A part of a multi-kernel program: its streamed kernel fused, or (a loop-less part,
    or one this form cannot hold) its cascade per Einsum.  Buffers ``between`` parts keep
    the inputs' precision (the GPU targets' are float32; a float64 call stays float64)."""
    streamed = next((k for k in q.kernels if k.role == "streamed"), None)
    renderer = (kernel_renderer(streamed) if streamed is not None else None) \
        or FunctionRenderer(q.cascade)
    renderer.undeclared = frozenset(between)
    return renderer


def function_renderers(defn: Definition, fused: bool, program=None) -> tuple[list, list]:
    """(function renderers, chain specs) of one definition: the fused form of its kernel
    program when it has one (a multi-kernel program: one function per part and a chain
    that runs them), else the per-Einsum form."""
    if fused and program is not None:
        if program.parts:
            from .kernel_common import chain_spec

            chain = chain_spec(program, pyname, size_code, print_definition(defn).rstrip())
            params = [(pyname(p.name), p.name, size_code(p.default, False) if p.default is not None
                       else None, p.dtype) for p in program.cascade.scalar_params]
            between = {b.name for b in program.buffers if b.kind == "intermediate"}
            return [part_renderer(q, between) for q in program.parts], [
                dataclasses.replace(chain, params=params)]
        kernels = {k.name: k for k in program.kernels}
        streamed = next(v for v in program.variants if v.kind == "streamed").kernels
        r = kernel_renderer(kernels[streamed[0]]) if len(streamed) == 1 else None
        if r is not None:  # (a worker + combine pair, from a split-k pipeline: per Einsum)
            return [r], []
    return [FunctionRenderer(defn)], []


def render_module(module: Module, source_name: str, include_runtime: bool = True,
                  fused: bool = True, sources: Module | None = None,
                  options: dict | None = None, after_lowering=None) -> str:
    """The generated Python module's text (deterministic for a given module).  ``sources``:
    the definitions before ``online`` (what a multi-kernel program partitions)."""
    env = _environment()
    runtime = env.get_template("runtime.py.jinja").render() if include_runtime else "# (runtime)"
    functions, chains = [], []
    for d in module.definitions:
        source = sources[d.name] if sources is not None else None
        program = lower_for_numpy(d, source, dict(options or {}), after_lowering) if fused else None
        renderers, chain = function_renderers(d, fused, program)
        functions += [r.context() for r in renderers]
        chains += chain
    text = env.get_template("module.py.jinja").render(
        version=__version__, source=source_name, runtime=runtime, functions=functions,
        names=[pyname(d.name) for d in module.definitions])
    return text + env.get_template("chain.py.jinja").render(chains=chains)
