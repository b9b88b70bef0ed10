"""Semantic checks and lowering: surface tree -> Einsum IR.

Every user mistake becomes a located diagnostic; all of a phase's diagnostics
are raised together.  Names resolve to exactly one thing: a rank (its size, or
its lowercase index variable), a tensor, a scalar parameter or a constant.
Implicit sums are made explicit here (``frontends.implicit``), so the IR only
knows explicit reductions.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field

import sympy

from ..einsum_ir import ir
from ..einsum_ir.diagnostics import Collector
from ..einsum_ir.exprs import free_ranks, walk
from ..einsum_ir.ir import Loc
from . import ast
from .implicit import make_implicit_sums_explicit

CONSTANTS = ("inf", "pi")
SIZE_FUNCS = {
    "ceil": sympy.ceiling, "floor": sympy.floor, "min": sympy.Min, "max": sympy.Max,
    "sqrt": sympy.sqrt, "exp": sympy.exp, "log": sympy.log, "abs": sympy.Abs,
}


def suggest(name: str, candidates) -> str | None:
    close = difflib.get_close_matches(name, sorted(set(candidates)), n=1, cutoff=0.6)
    return f"did you mean {close[0]}?" if close else None


@dataclass
class Scope:
    """What each name of one definition denotes."""

    ranks: dict[str, Loc] = field(default_factory=dict)
    tensors: dict[str, tuple[str, ...]] = field(default_factory=dict)
    tensor_locs: dict[str, Loc] = field(default_factory=dict)
    params: dict[str, Loc] = field(default_factory=dict)
    inputs: set[str] = field(default_factory=set)

    def index_vars(self) -> dict[str, str]:
        return {r.lower(): r for r in self.ranks}


class DefinitionLowering:
    """Lowers one ``attention`` definition; reports into a shared collector."""

    def __init__(self, decl: ast.DefinitionDecl, errors: Collector):
        self.decl = decl
        self.errors = errors
        self.scope = Scope()
        self.iter_ranks: dict[str, str] = {}  # iterative tensor -> rank

    # --- entry ------------------------------------------------------------
    def lower(self) -> ir.Definition | None:
        self._declare_params()
        lets = self._declare_lets()
        self._declare_tensors()
        self._check_name_clashes()
        params = tuple(self._lower_param(p) for p in self.decl.params)
        statements = tuple(
            st for st in (self._lower_einsum(s) for s in self.decl.body if isinstance(s, ast.EinsumStmt))
            if st is not None
        )
        self._check_iteratives(statements)
        outputs = tuple(self._lower_output(o, statements) for o in self.decl.outputs)
        if any(p is None for p in params) or any(o is None for o in outputs):
            return None
        return ir.Definition(self.decl.name.name, params, lets, outputs, statements, loc=self.decl.loc)

    # --- declarations -------------------------------------------------------
    def _declare_rank(self, name: ast.Name) -> None:
        if not name.name[0].isupper() or name.name != name.name.upper():
            self.errors.error(
                f"rank '{name.name}' must have an uppercase name (its index variable is "
                f"'{name.name.lower()}')", name.loc)
            return
        self.scope.ranks.setdefault(name.name, name.loc)

    def _declare_params(self) -> None:
        for p in self.decl.params:
            if isinstance(p, ast.TensorParamDecl):
                self._declare_tensor(p.name, tuple(d.name for d in p.dims))
                self.scope.inputs.add(p.name.name)
                seen = set()
                for d in p.dims:
                    if d.name in seen:
                        self.errors.error(f"rank '{d.name}' appears twice in '{p.name.name}'", d.loc)
                    seen.add(d.name)
                    self._declare_rank(d)
                self._check_dtype(p.dtype)
            else:
                if p.name.name in self.scope.params:
                    self.errors.error(f"parameter '{p.name.name}' is declared twice", p.name.loc)
                self.scope.params[p.name.name] = p.name.loc
                self._check_dtype(p.dtype)

    def _declare_tensor(self, name: ast.Name, ranks: tuple[str, ...]) -> None:
        if name.name in self.scope.tensors and name.name in self.scope.inputs:
            self.errors.error(f"tensor '{name.name}' is declared twice", name.loc)
        self.scope.tensors.setdefault(name.name, ranks)
        self.scope.tensor_locs.setdefault(name.name, name.loc)

    def _check_dtype(self, dtype: ast.Name | None) -> None:
        if dtype is not None and dtype.name not in ir.DTYPES:
            hint = suggest(dtype.name, ir.DTYPES) or "dtypes are " + ", ".join(ir.DTYPES)
            self.errors.error(f"unknown dtype '{dtype.name}'", dtype.loc, hint)

    def _declare_lets(self) -> tuple[ir.SizeLet, ...]:
        lets = []
        let_stmts = [s for s in self.decl.body if isinstance(s, ast.LetStmt)]
        pending = {s.name.name for s in let_stmts}
        for s in let_stmts:
            if s.name.name in self.scope.ranks:
                self.errors.error(f"size '{s.name.name}' is defined twice", s.name.loc)
                continue
            pending.discard(s.name.name)
            value = self.size_expr(s.value, later=pending)
            self._declare_rank(s.name)
            if value is not None:
                lets.append(ir.SizeLet(s.name.name, value, loc=s.loc))
        return tuple(lets)

    def _declare_tensors(self) -> None:
        for s in self.decl.body:
            if not isinstance(s, ast.EinsumStmt):
                continue
            name = s.tensor.name
            if name in self.scope.inputs:
                self.errors.error(f"'{name}' is an input and cannot be assigned", s.tensor.loc)
                continue
            ranks = tuple(self._lhs_rank(sub) for sub in s.subscripts)
            known = self.scope.tensors.get(name)
            if known is None or (None in known and len(known) == len(ranks)):
                if known is not None:  # an init's '0' position: take the update's rank
                    ranks = tuple(r if r is not None else k for r, k in zip(ranks, known))
                self.scope.tensors[name] = ranks  # type: ignore[assignment]
                self.scope.tensor_locs.setdefault(name, s.tensor.loc)

    def _lhs_rank(self, sub: ast.SExpr) -> str | None:
        name = _lhs_index_name(sub)
        return self.scope.index_vars().get(name) if name else None

    def _check_name_clashes(self) -> None:
        index_vars = self.scope.index_vars()
        kinds: dict[str, list[tuple[str, Loc]]] = {}
        for r, loc in self.scope.ranks.items():
            kinds.setdefault(r, []).append(("rank", loc))
        for t, loc in self.scope.tensor_locs.items():
            kinds.setdefault(t, []).append(("tensor", loc))
        for p, loc in self.scope.params.items():
            kinds.setdefault(p, []).append(("parameter", loc))
        for name, uses in kinds.items():
            if len(uses) > 1:
                what = " and ".join(k for k, _ in uses)
                self.errors.error(f"'{name}' names two things ({what})", uses[-1][1])
            elif name in index_vars and uses[0][0] != "rank":
                self.errors.error(
                    f"{uses[0][0]} '{name}' clashes with the index variable of rank "
                    f"'{index_vars[name]}'", uses[0][1])
            elif name in CONSTANTS:
                self.errors.error(f"'{name}' is a built-in constant", uses[0][1])

    def _lower_param(self, p) -> ir.TensorArg | ir.ScalarParam | None:
        if isinstance(p, ast.TensorParamDecl):
            dtype = p.dtype.name if p.dtype else None
            return ir.TensorArg(p.name.name, tuple(d.name for d in p.dims), dtype, loc=p.loc)
        default = None
        if p.default is not None:
            default = self.size_expr(p.default, later=set(), allow_params=False)
            if default is None:
                return None
        return ir.ScalarParam(p.name.name, default, p.dtype.name if p.dtype else None, loc=p.loc)

    def _lower_output(self, o: ast.OutputDecl, statements) -> ir.Output | None:
        self._check_dtype(o.dtype)
        name = o.name.name
        ranks = tuple(d.name for d in o.dims)
        defs = [s for s in statements if s.tensor == name]
        if name in self.scope.inputs:
            self.errors.error(f"output '{name}' is an input; outputs must be defined in the body",
                              o.name.loc)
            return None
        if not defs:
            if name not in self.scope.tensor_locs:
                self.errors.error(f"output '{name}' is never defined", o.name.loc,
                                  suggest(name, self.scope.tensor_locs))
            return None
        if name in self.iter_ranks:
            self.errors.error(
                f"output '{name}' is iterative; define an output from its final step, "
                f"e.g. X[...] = {name}[{self.iter_ranks[name]}, ...]", o.name.loc)
            return None
        if ranks != defs[0].lhs:
            shown = ",".join(defs[0].lhs)
            self.errors.error(f"output '{name}' is declared [{','.join(ranks)}] but defined [{shown}]",
                              o.name.loc)
            return None
        return ir.Output(name, ranks, o.dtype.name if o.dtype else None, loc=o.loc)

    # --- sizes --------------------------------------------------------------
    def size_expr(self, e: ast.SExpr, later: set[str], allow_params: bool = False) -> sympy.Expr | None:
        """A size or default expression as sympy; None (with errors) if invalid."""
        try:
            return self._size(e, later)
        except _SizeError as err:
            self.errors.error(str(err.message), err.loc, err.hint)
            return None

    def _size(self, e: ast.SExpr, later: set[str]) -> sympy.Expr:
        if isinstance(e, ast.Number):
            return sympy.Integer(e.value) if isinstance(e.value, int) else sympy.Float(e.value)
        if isinstance(e, ast.Name):
            if e.name in self.scope.ranks:
                return ir.size_symbol(e.name)
            if e.name in later:
                raise _SizeError(f"size '{e.name}' is used before its let", e.loc,
                                 "a let may name only earlier sizes")
            if e.name == "pi":
                return sympy.pi
            if e.name == "inf":
                return sympy.oo
            raise _SizeError(f"unknown size '{e.name}'", e.loc, suggest(e.name, self.scope.ranks))
        if isinstance(e, ast.UnaryExpr) and e.op == "-":
            return -self._size(e.operand, later)
        if isinstance(e, ast.BinaryExpr) and e.op in ("+", "-", "*", "/", "//", "**"):
            a, b = self._size(e.left, later), self._size(e.right, later)
            return {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b, "/": lambda: a / b,
                    "//": lambda: sympy.floor(a / b), "**": lambda: a**b}[e.op]()
        if isinstance(e, ast.CallExpr) and e.fn.name in SIZE_FUNCS:
            args = [self._size(a, later) for a in e.args]
            want = 2 if e.fn.name in ("min", "max") else 1
            if len(args) != want:
                raise _SizeError(f"{e.fn.name} takes {want} argument(s) here", e.loc)
            return SIZE_FUNCS[e.fn.name](*args)
        if isinstance(e, ast.CallExpr):
            raise _SizeError(f"unknown size function '{e.fn.name}'", e.fn.loc,
                             suggest(e.fn.name, SIZE_FUNCS))
        raise _SizeError("a size expression may use only numbers, sizes, + - * / // ** and "
                         "ceil/floor/min/max/sqrt", _sloc(e))

    # --- statements -----------------------------------------------------------
    def _lower_einsum(self, s: ast.EinsumStmt) -> ir.Statement | None:
        lhs = self._lower_lhs(s)
        if lhs is None:
            return None
        ranks, iter_pos, init = lhs
        bound = set(ranks)
        if iter_pos is not None and init:
            bound.discard(ranks[iter_pos])
        expr = self.expr(s.expr)
        where = self.expr(s.where) if s.where is not None else None
        if expr is None or (s.where is not None and where is None):
            return None
        expr = make_implicit_sums_explicit(expr, bound)
        if where is not None:
            self._check_where_levels(where, expr, bound, s.where)
        self._check_iterative_reads(expr, s)
        if iter_pos is None:
            return ir.Einsum(s.tensor.name, ranks, expr, where, loc=s.loc)
        return ir.IterativeEinsum(s.tensor.name, ranks, ranks[iter_pos], init, expr, where, loc=s.loc)

    def _lower_lhs(self, s: ast.EinsumStmt):
        ranks: list[str] = []
        iter_pos = None
        init = False
        ok = True
        index_vars = self.scope.index_vars()
        for pos, sub in enumerate(s.subscripts):
            kind, name = _lhs_form(sub)
            if kind is None:
                self.errors.error("a left-hand side subscript must be an index variable, "
                                  "'0' or 'i+1' on an iterative rank", _sloc(sub))
                ok = False
                continue
            if kind in ("init", "update"):
                if iter_pos is not None:
                    self.errors.error("only one iterative position per tensor", _sloc(sub))
                    ok = False
                iter_pos, init = pos, kind == "init"
                if kind == "init":
                    name = None
            if name is not None and name not in index_vars:
                self._unknown_index(name, _sloc(sub))
                ok = False
                continue
            ranks.append(index_vars[name] if name is not None else "?")
        if iter_pos is not None and init:
            ranks[iter_pos] = "?"  # filled from the update below
        if not ok:
            return None
        if len(set(ranks)) != len(ranks):
            self.errors.error(f"an index variable appears twice on the left of '{s.tensor.name}'",
                              s.tensor.loc)
            return None
        return self._resolve_iterative_lhs(s, ranks, iter_pos, init)

    def _resolve_iterative_lhs(self, s, ranks, iter_pos, init):
        name = s.tensor.name
        if iter_pos is None:
            return tuple(ranks), None, False
        if not init:
            self.iter_ranks[name] = ranks[iter_pos]
            return tuple(ranks), iter_pos, False
        update = next((u for u in self.decl.body if isinstance(u, ast.EinsumStmt)
                       and u.tensor.name == name and _is_update(u)), None)
        if update is None:
            self.errors.error(f"iterative tensor '{name}' has an init but no 'i+1' update",
                              s.tensor.loc)
            return None
        kind, var = _lhs_form(update.subscripts[iter_pos]) if iter_pos < len(update.subscripts) else (None, None)
        rank = self.scope.index_vars().get(var) if kind == "update" else None
        if rank is None:
            return None  # reported at the update
        ranks[iter_pos] = rank
        return tuple(ranks), iter_pos, True

    def _check_iteratives(self, statements) -> None:
        by_tensor: dict[str, list[ir.Statement]] = {}
        for st in statements:
            by_tensor.setdefault(st.tensor, []).append(st)
        for name, defs in by_tensor.items():
            inits = [d for d in defs if isinstance(d, ir.IterativeEinsum) and d.init]
            updates = [d for d in defs if isinstance(d, ir.IterativeEinsum) and not d.init]
            plain = [d for d in defs if isinstance(d, ir.Einsum)]
            if len(plain) > 1 or len(inits) > 1 or len(updates) > 1 or (plain and (inits or updates)):
                self.errors.error(f"tensor '{name}' is defined twice", defs[1].loc,
                                  f"first defined at {defs[0].loc}")
            elif updates and not inits:
                self.errors.error(f"iterative tensor '{name}' has no init "
                                  f"(add '{name}[0, ...] = ...')", updates[0].loc)
            elif inits and updates and inits[0].lhs != updates[0].lhs:
                self.errors.error(f"the init and update of '{name}' have different ranks",
                                  inits[0].loc)

    def _check_where_levels(self, where: ir.Expr, expr: ir.Expr, bound: set[str], src) -> None:
        need = free_ranks(where)
        if need <= bound:
            return
        for scope in _reduction_scopes(expr, frozenset(bound)):
            if need <= scope:
                return
        names = ", ".join(sorted(r.lower() for r in need))
        self.errors.error(f"no level of this statement has all of the where's variables "
                          f"({names}) in scope", _sloc(src))

    def _check_iterative_reads(self, expr: ir.Expr, s: ast.EinsumStmt) -> None:
        for node in walk(expr):
            if not isinstance(node, ir.Access) or node.tensor not in self.iter_ranks:
                continue
            rank = self.iter_ranks[node.tensor]
            pos = self.scope.tensors[node.tensor].index(rank) if rank in self.scope.tensors[node.tensor] else None
            if pos is None or pos >= len(node.subscripts):
                continue
            sub = node.subscripts[pos]
            ok = sub in (ir.Index(rank), ir.Size(rank), ir.Binary("+", ir.Index(rank), ir.Num(1)))
            if not ok:
                v = rank.lower()
                self.errors.error(f"iterative tensor '{node.tensor}' can be read only at "
                                  f"{v}, {v}+1 or {rank}", sub.loc or node.loc)

    # --- expressions ------------------------------------------------------------
    def expr(self, e: ast.SExpr) -> ir.Expr | None:
        """Lower an expression; reports errors and returns None when it has any."""
        before = len(self.errors.diagnostics)
        out = self._expr(e)
        return out if len(self.errors.diagnostics) == before else None

    def _expr(self, e: ast.SExpr) -> ir.Expr:
        method = getattr(self, "_expr_" + type(e).__name__)
        return method(e)

    def _expr_Number(self, e: ast.Number) -> ir.Expr:
        return ir.Num(e.value, loc=e.loc)

    def _expr_Name(self, e: ast.Name) -> ir.Expr:
        n = e.name
        if n in self.scope.ranks:
            return ir.Size(n, loc=e.loc)
        index_vars = self.scope.index_vars()
        if n in index_vars:
            return ir.Index(index_vars[n], loc=e.loc)
        if n in self.scope.params:
            return ir.Param(n, loc=e.loc)
        if n in CONSTANTS:
            return ir.Const(n, loc=e.loc)
        if n in self.scope.tensors:
            ranks = self.scope.tensors[n]
            if ranks:
                self.errors.error(f"tensor '{n}' has {len(ranks)} rank(s) but is used without "
                                  f"subscripts", e.loc)
            return ir.Access(n, (), loc=e.loc)
        return self._unknown_name(e)

    def _unknown_name(self, e: ast.Name) -> ir.Expr:
        n = e.name
        if n.islower() and n.isidentifier() and len(n) <= 3:
            self._unknown_index(n, e.loc)
        else:
            cands = list(self.scope.ranks) + list(self.scope.params) + list(self.scope.tensors)
            self.errors.error(f"unknown name '{n}'", e.loc, suggest(n, cands))
        return ir.Num(0, loc=e.loc)

    def _unknown_index(self, name: str, loc: Loc) -> None:
        self.errors.error(f"index '{name}' belongs to no declared rank (no rank '{name.upper()}')",
                          loc, "declare the rank in an argument's dims or with 'let "
                          f"{name.upper()} = ...'")

    def _expr_AccessExpr(self, e: ast.AccessExpr) -> ir.Expr:
        name = e.name.name
        subs = tuple(self._subscript(s) for s in e.subscripts)
        if name not in self.scope.tensors:
            if name in ("sum", "max", "min"):
                self.errors.error(f"'{name}[...]' needs a body: {name}[i](expr)", e.loc)
            else:
                self.errors.error(f"unknown tensor '{name}'", e.name.loc,
                                  suggest(name, self.scope.tensors))
            return ir.Num(0, loc=e.loc)
        ranks = self.scope.tensors[name]
        if len(subs) != len(ranks):
            self.errors.error(f"tensor '{name}' has {len(ranks)} rank(s) "
                              f"[{','.join(r or '?' for r in ranks)}] but is indexed with {len(subs)}",
                              e.loc)
        return ir.Access(name, subs, loc=e.loc)

    def _subscript(self, s: ast.SExpr) -> ir.Expr:
        out = self._expr(s)
        why = _non_affine_reason(out)
        if why:
            self.errors.error(f"subscript is not integer-affine: {why}", _sloc(s))
        return out

    def _expr_CallExpr(self, e: ast.CallExpr) -> ir.Expr:
        fn = e.fn.name
        args = tuple(self._expr(a) for a in e.args)
        if fn not in ir.FUNCTIONS:
            self.errors.error(f"unknown function '{fn}'", e.fn.loc,
                              suggest(fn, ir.FUNCTIONS) or "functions are " + ", ".join(ir.FUNCTIONS))
            return ir.Num(0, loc=e.loc)
        want = 3 if fn == "select" else 2 if fn in ir.BINARY_FUNCS else 1
        if len(args) != want:
            hint = f"use {fn}[i](...) to reduce" if fn in ir.BINARY_FUNCS and len(args) == 1 else None
            self.errors.error(f"{fn} takes {want} argument(s), got {len(args)}", e.loc, hint)
        return ir.Call(fn, args, loc=e.loc)

    def _expr_ReduceExpr(self, e: ast.ReduceExpr) -> ir.Expr:
        op = e.op.name
        body = self._expr(e.body)
        if op not in ir.REDUCE_OPS:
            if op in self.scope.tensors:
                self.errors.error(f"tensor access '{op}[...]' cannot be called", e.loc)
            else:
                self.errors.error(f"unknown reduction '{op}'", e.op.loc,
                                  suggest(op, ir.REDUCE_OPS) or "reductions are sum, max, min")
            return ir.Num(0, loc=e.loc)
        ranks = []
        index_vars = self.scope.index_vars()
        for r in e.ranks:
            if not isinstance(r, ast.Name):
                self.errors.error("a reduction lists index variables", _sloc(r))
            elif r.name not in index_vars:
                self._unknown_index(r.name, r.loc)
            elif index_vars[r.name] in ranks:
                self.errors.error(f"'{r.name}' is listed twice", r.loc)
            else:
                ranks.append(index_vars[r.name])
        body_free = free_ranks(body)
        for r, src in zip(ranks, e.ranks):
            if r not in body_free:
                self.errors.error(f"{op}[{r.lower()}] reduces over a rank its body does not use",
                                  _sloc(src))
        return ir.Reduce(op, tuple(ranks), body, loc=e.loc)

    def _expr_UnaryExpr(self, e: ast.UnaryExpr) -> ir.Expr:
        return ir.Unary(e.op, self._expr(e.operand), loc=e.loc)

    def _expr_BinaryExpr(self, e: ast.BinaryExpr) -> ir.Expr:
        return ir.Binary(e.op, self._expr(e.left), self._expr(e.right), loc=e.loc)

    def _expr_CompareExpr(self, e: ast.CompareExpr) -> ir.Expr:
        operands = [self._expr(x) for x in e.operands]
        out = None
        for op, a, b in zip(e.ops, operands, operands[1:]):
            cmp = ir.Binary(op, a, b, loc=e.loc)
            out = cmp if out is None else ir.Binary("and", out, cmp, loc=e.loc)
        return out


class _SizeError(Exception):
    def __init__(self, message: str, loc: Loc, hint: str | None = None):
        self.message, self.loc, self.hint = message, loc, hint


def _sloc(e) -> Loc | None:
    return getattr(e, "loc", None)


def _lhs_index_name(sub: ast.SExpr) -> str | None:
    return _lhs_form(sub)[1]


def _lhs_form(sub: ast.SExpr) -> tuple[str | None, str | None]:
    """('var', name) | ('init', None) | ('update', name) | (None, None)."""
    if isinstance(sub, ast.Name):
        return "var", sub.name
    if isinstance(sub, ast.Number) and sub.value == 0 and isinstance(sub.value, int):
        return "init", None
    if (isinstance(sub, ast.BinaryExpr) and sub.op == "+" and isinstance(sub.left, ast.Name)
            and isinstance(sub.right, ast.Number) and sub.right.value == 1):
        return "update", sub.left.name
    return None, None


def _is_update(s: ast.EinsumStmt) -> bool:
    return any(_lhs_form(sub)[0] == "update" for sub in s.subscripts)


def _reduction_scopes(e: ir.Expr, outer: frozenset[str]):
    """The scope (outer variables plus its own) of every reduction in ``e``."""
    if isinstance(e, ir.Reduce):
        inner = outer | frozenset(e.ranks)
        yield inner
        yield from _reduction_scopes(e.body, inner)
        return
    from ..einsum_ir.exprs import children
    for c in children(e):
        yield from _reduction_scopes(c, outer)


def _depends(e: ir.Expr) -> bool:
    return bool(free_ranks(e))


def _non_affine_reason(e: ir.Expr) -> str | None:
    """Why ``e`` is not an integer-affine index expression, or None if it is."""
    if isinstance(e, (ir.Index, ir.Size)):
        return None
    if isinstance(e, ir.Num):
        return None if isinstance(e.value, int) else f"'{e.value}' is not an integer"
    if isinstance(e, ir.Unary) and e.op == "-":
        return _non_affine_reason(e.operand)
    if isinstance(e, ir.Binary) and e.op in ("+", "-"):
        return _non_affine_reason(e.left) or _non_affine_reason(e.right)
    if isinstance(e, ir.Binary) and e.op == "*":
        if _depends(e.left) and _depends(e.right):
            return "a product of two index variables"
        return _non_affine_reason(e.left) or _non_affine_reason(e.right)
    if isinstance(e, ir.Binary) and e.op == "//":
        if _depends(e.right):
            return "'//' must divide by a size or a constant"
        return _non_affine_reason(e.left) or _non_affine_reason(e.right)
    if isinstance(e, ir.Binary) and e.op == "/":
        return "'/' is not integer division (use '//')"
    if isinstance(e, ir.Param):
        return f"parameter '{e.name}' is not a size"
    if isinstance(e, ir.Access):
        return f"tensor '{e.tensor}' in a subscript (data-dependent indexing)"
    if isinstance(e, ir.Call):
        return f"function '{e.fn}' in a subscript"
    if isinstance(e, ir.Reduce):
        return "a reduction in a subscript"
    if isinstance(e, ir.Const):
        return f"'{e.name}' in a subscript"
    return f"'{getattr(e, 'op', type(e).__name__)}' in a subscript"


def lower_file(decl: ast.FileDecl, errors: Collector) -> ir.Module | None:
    defs = []
    names: dict[str, Loc] = {}
    for d in decl.definitions:
        if d.name.name in names:
            errors.error(f"definition '{d.name.name}' is defined twice", d.name.loc,
                         f"first defined at {names[d.name.name]}")
        names.setdefault(d.name.name, d.name.loc)
        out = DefinitionLowering(d, errors).lower()
        if out is not None:
            defs.append(out)
    if errors.diagnostics:
        return None
    return ir.Module(tuple(defs))
