"""Semantic checks and lowering: surface tree -> Einsum IR.

Every user mistake becomes a located diagnostic; all of a phase's diagnostics
are raised together.  Names resolve to exactly one thing: a rank (its size, or
its lowercase index variable), a tensor, a scalar parameter or a constant.
Implicit sums are made explicit here (``frontends.implicit``), so the IR only
knows explicit reductions.
"""
from __future__ import annotations

import difflib
import keyword
import math
from dataclasses import dataclass, field

import sympy

from ..einsum_ir import ir
from ..einsum_ir.diagnostics import Collector
from ..einsum_ir.exprs import accessed_tensors, children, free_ranks, walk
from ..einsum_ir.ir import Loc
from ..einsum_ir.printer import print_size
from . import ast
from .implicit import make_implicit_sums_explicit

CONSTANTS = ("inf", "pi")
MAX_SIZE_EXPONENT = 1024
MAX_SUGGEST_LENGTH = 64  # "did you mean" compares names up to this long
LANGUAGE_KEYWORDS = ("attention", "let", "where", "and", "or", "not")
SIZE_FUNCS = {
    "ceil": sympy.ceiling, "floor": sympy.floor, "min": sympy.Min, "max": sympy.Max,
    "sqrt": sympy.sqrt, "exp": sympy.exp, "log": sympy.log, "abs": sympy.Abs,
}


def _slips(name: str, candidate: str, fold: bool) -> float:
    """Typing slips between two names along ``difflib``'s alignment (its opcodes): each
    inserted, deleted or replaced letter is one; with ``fold``, letters are aligned
    ignoring case and an aligned pair that differs in case only is half of one; two
    neighbours swapped (``bf61`` for ``bf16``: delete, keep one, insert the same letter)
    are one."""
    a, b = (name.lower(), candidate.lower()) if fold else (name, candidate)
    ops = difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes()
    slips = 0.0
    for tag, i1, i2, j1, j2 in ops:
        if tag == "equal":
            slips += 0.5 * sum(x != y for x, y in zip(name[i1:i2], candidate[j1:j2]))
        else:
            slips += max(i2 - i1, j2 - j1)
    for first, kept, last in zip(ops, ops[1:], ops[2:]):
        if kept[0] == "equal" and kept[2] - kept[1] == 1 \
                and {first[0], last[0]} == {"delete", "insert"} \
                and _moved_letter(a, b, first) == _moved_letter(a, b, last) is not None:
            slips -= 1
    return slips


def _moved_letter(a: str, b: str, op: tuple) -> str | None:
    tag, i1, i2, j1, j2 = op
    text = a[i1:i2] if tag == "delete" else b[j1:j2]
    return text if len(text) == 1 else None


def name_distance(name: str, candidate: str) -> float:
    """How many slips turn ``name`` into ``candidate`` (a case-only difference is half of
    one): the better of ``difflib``'s case-folded and exact alignments (``mMin`` is ``min``
    with one extra letter, not a case slip and an extra letter)."""
    return min(_slips(name, candidate, True), _slips(name, candidate, False))


def _name_distance(name: str, candidate: str, limit: float) -> float:
    """Slips, except that a long enough prefix (``ceil`` of ``ceiling``) counts as near."""
    shorter = min(name, candidate, key=len)
    if len(shorter) >= 3 and (name.startswith(candidate) or candidate.startswith(name)):
        return min(limit, name_distance(name, candidate))
    return name_distance(name, candidate)


def suggest(name: str, candidates) -> str | None:
    """``did you mean X?`` (or ``X or Y?`` on a tie) for the nearest candidates, if any is near."""
    if len(name) > MAX_SUGGEST_LENGTH:
        return None  # a name this long is no typo of a short one; the distance is quadratic
    limit = max(1.0, len(name) / 3) if len(name) > 1 else 0.5  # one letter: case only
    # a length difference beyond the limit is beyond it in distance too (prefixes aside)
    near_length = [c for c in set(candidates) if c != name and len(c) <= MAX_SUGGEST_LENGTH
                   and (abs(len(c) - len(name)) <= limit or min(len(c), len(name)) >= 3)]
    scored = sorted((_name_distance(name, c, limit), abs(len(c) - len(name)), c)
                    for c in near_length)
    near = [s for s in scored if s[0] <= limit]
    if not near:
        return None
    best = [c for d, _, c in near if d == near[0][0]][:2]
    return "did you mean " + " or ".join(best) + "?"


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
        self.failed: set[str] = set()  # tensors with a statement that did not lower
        self.subscript_depth = 0  # > 0 while lowering a subscript ('%' is allowed there)

    # --- entry ------------------------------------------------------------
    def lower(self) -> ir.Definition | None:
        self._declare_params()
        lets = self._declare_lets()
        self._declare_tensors()
        self._check_name_clashes()
        self._check_reserved_names()
        params = tuple(self._lower_param(p) for p in self.decl.params)
        statements = self._lower_statements()
        self._check_iteratives(statements)
        self._check_duplicate_outputs()
        outputs = tuple(self._lower_output(o, statements) for o in self.decl.outputs)
        if any(p is None for p in params) or any(o is None for o in outputs):
            return None
        return ir.Definition(self.decl.name.name, params, lets, outputs, statements, loc=self.decl.loc)

    def _lower_statements(self) -> tuple[ir.Statement, ...]:
        out = []
        for s in self.decl.body:
            if isinstance(s, ast.EinsumStmt):
                st = self._lower_einsum(s)
                if st is None:
                    self.failed.add(s.tensor.name)
                else:
                    out.append(st)
        return tuple(out)

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
            value = self.size_expr(s.value, later=pending)  # pending still holds itself
            pending.discard(s.name.name)
            self._declare_rank(s.name)
            if value is not None and self._check_constant_size(s, value):
                lets.append(ir.SizeLet(s.name.name, value, loc=s.loc))
        return tuple(lets)

    def _check_constant_size(self, s: ast.LetStmt, value: sympy.Expr) -> bool:
        """A constant ``let`` must be a positive whole number (others are checked at the call)."""
        if not value.is_number or (value.is_integer and value > 0):
            return True
        self.errors.error(f"size '{s.name.name}' = {print_size(value)} is not a positive whole number",
                          _sloc(s.value))
        return False

    def _declare_tensors(self) -> None:
        for s in self.decl.body:
            if not isinstance(s, ast.EinsumStmt):
                continue
            name = s.tensor.name
            if name in self.scope.inputs:
                self.errors.error(f"'{name}' is an input and cannot be assigned", s.tensor.loc)
                continue
            ranks = tuple(self._lhs_rank(sub) for sub in s.subscripts)
            self._note_iterative_rank(s)
            known = self.scope.tensors.get(name)
            if known is None or (None in known and len(known) == len(ranks)):
                if known is not None:  # an init's '0' position: take the update's rank
                    ranks = tuple(r if r is not None else k for r, k in zip(ranks, known))
                self.scope.tensors[name] = ranks  # type: ignore[assignment]
                self.scope.tensor_locs.setdefault(name, s.tensor.loc)

    def _note_iterative_rank(self, s: ast.EinsumStmt) -> None:
        """Record ``T -> I`` for an update ``T[i+1, ...]`` before any statement is lowered."""
        for sub in s.subscripts:
            kind, var = _lhs_form(sub)
            rank = self.scope.index_vars().get(var) if kind == "update" else None
            if rank is not None:
                self.iter_ranks.setdefault(s.tensor.name, rank)

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

    def _check_reserved_names(self) -> None:
        """Names the generated Python module cannot use, and ranks whose index variable is taken."""
        for kind, names in (("tensor", self.scope.tensor_locs), ("parameter", self.scope.params)):
            for name, loc in names.items():
                if keyword.iskeyword(name):
                    self.errors.error(f"{kind} '{name}' is a Python keyword", loc,
                                      f"the generated Python function cannot use it; rename it "
                                      f"(e.g. '{name}_')")
        for rank, loc in self.scope.ranks.items():
            var = rank.lower()
            if keyword.iskeyword(var) or var in LANGUAGE_KEYWORDS or var in CONSTANTS:
                what = "a built-in constant" if var in CONSTANTS else "a reserved word"
                self.errors.error(f"rank '{rank}' cannot be used: its index variable '{var}' is "
                                  f"{what}", loc, "rename the rank")

    def _check_duplicate_outputs(self) -> None:
        seen: set[str] = set()
        for o in self.decl.outputs:
            if o.name.name in seen:
                self.errors.error(f"output '{o.name.name}' is listed twice", o.name.loc)
            seen.add(o.name.name)

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
                defined = set(self.scope.tensor_locs) - self.scope.inputs
                self.errors.error(f"output '{name}' is never defined", o.name.loc,
                                  suggest(name, defined))
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
            return _checked_size(self._size(e, later), e)
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
            raise self._not_a_size(e)
        if isinstance(e, ast.UnaryExpr) and e.op == "-":
            return -self._size(e.operand, later)
        if isinstance(e, ast.BinaryExpr) and e.op in ("+", "-", "*", "/", "//", "**"):
            a, b = self._size(e.left, later), self._size(e.right, later)
            if e.op == "**" and b.is_Number and abs(b) > MAX_SIZE_EXPONENT:
                raise _SizeError(f"exponent {b} is too large for a size", _sloc(e.right))
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
                         + "/".join(SIZE_FUNCS), _sloc(e))

    def _not_a_size(self, e: ast.Name) -> _SizeError:
        if e.name in self.scope.tensors:
            return _SizeError(f"tensor '{e.name}' cannot be used in a size", e.loc)
        if e.name in self.scope.params:
            return _SizeError(f"parameter '{e.name}' cannot be used in a size", e.loc,
                              "sizes and defaults may use only rank sizes and numbers")
        if e.name in self.scope.index_vars():
            return _SizeError(f"index '{e.name}' cannot be used in a size", e.loc,
                              f"did you mean the size {self.scope.index_vars()[e.name]}?")
        return _SizeError(f"unknown size '{e.name}'", e.loc, suggest(e.name, self.scope.ranks))

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
        role = "update" if iter_pos is not None and not init else "init" if init else "plain"
        for part in (expr, where):
            if part is not None:
                self._check_self_reads(part, s, role)
                self._check_iterative_reads(part, s, set(ranks), role)
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
            if kind != "update":
                self.errors.error(f"the '0' of '{name}' is not at the position of its update's "
                                  f"'i+1'", _sloc(s.subscripts[iter_pos]))
            return None
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
            elif updates and not inits and name not in self.failed:
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

    def _check_self_reads(self, e: ir.Expr, s: ast.EinsumStmt, role: str) -> None:
        """Only an update may read its own tensor (at the previous step)."""
        name = s.tensor.name
        if role == "update" or name not in accessed_tensors(e):
            return
        hint = (f"a recurrence needs an iterative rank: {name}[0, ...] = ... and "
                f"{name}[i+1, ...] = ... {name}[i, ...]") if role == "plain" else None
        self.errors.error(f"'{name}' reads itself", s.tensor.loc, hint)

    def _check_iterative_reads(self, e: ir.Expr, s: ast.EinsumStmt, lhs: set[str], role: str) -> None:
        for node in walk(e):
            if isinstance(node, ir.Access) and node.tensor in self.iter_ranks:
                own = node.tensor == s.tensor.name
                self._check_iterative_read(node, lhs, "own update" if own and role == "update" else
                                           "loop" if self.iter_ranks[node.tensor] in lhs else "outside")

    def _check_iterative_read(self, node: ir.Access, lhs: set[str], where: str) -> None:
        """At ``i`` in its own update; at ``i``, ``i+1`` or ``I`` in the loop; at ``I`` outside."""
        rank = self.iter_ranks[node.tensor]
        ranks = self.scope.tensors.get(node.tensor, ())
        if rank not in ranks or ranks.index(rank) >= len(node.subscripts):
            return
        sub = node.subscripts[ranks.index(rank)]
        v, name = rank.lower(), node.tensor
        allowed = {
            "own update": ((ir.Index(rank),), f"its own update can read '{name}' only at the "
                                              f"previous step, {name}[{v}, ...]"),
            "loop": ((ir.Index(rank), ir.Size(rank), ir.Binary("+", ir.Index(rank), ir.Num(1))),
                     f"iterative tensor '{name}' can be read only at {v}, {v}+1 or {rank}"),
            "outside": ((ir.Size(rank),), f"outside its loop, iterative tensor '{name}' can be "
                                          f"read only at its final step, {name}[{rank}, ...]"),
        }[where]
        if sub not in allowed[0]:
            self.errors.error(allowed[1], sub.loc or node.loc)

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
        if not math.isfinite(e.value):
            self.errors.error(f"number literal {e.value!r} is out of range", e.loc,
                              "write inf for infinity")
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
        cands = (list(self.scope.ranks) + list(self.scope.index_vars()) + list(self.scope.params)
                 + list(self.scope.tensors) + list(CONSTANTS))
        hint = suggest(n, cands)
        if n.islower() and len(n) <= 3 and hint is None:
            self._unknown_index(n, e.loc)
        else:
            self.errors.error(f"unknown name '{n}'", e.loc, hint)
        return ir.Num(0, loc=e.loc)

    def _unknown_index(self, name: str, loc: Loc) -> None:
        if name in self.scope.ranks:
            self.errors.error(f"'{name}' is a rank, not an index variable", loc,
                              f"write its index variable '{name.lower()}'")
            return
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
        else:
            self._check_size_subscripts(name, subs, ranks)
        return ir.Access(name, subs, loc=e.loc)

    def _check_size_subscripts(self, name: str, subs, ranks) -> None:
        """A size as a whole subscript, usually a case slip (``Q[p,E]`` for ``Q[p,e]``).
        In its own rank's position it reads one past the last element, so every read is
        absent: an error (an iterative tensor's own rank has one more element: ``RD[M1,p]``
        is its last).  Elsewhere it reads one fixed element: a warning."""
        for sub, rank in zip(subs, ranks):
            if not isinstance(sub, ir.Size) or rank is None:
                continue
            slip = f"write the index variable '{sub.rank.lower()}'"
            if sub.rank == rank and self.iter_ranks.get(name) != rank:
                self.errors.error(f"subscript '{sub.rank}' of '{name}' is the size of its rank "
                                  f"{rank}: it is one past the last element, so every read is "
                                  f"absent", sub.loc, slip)
            elif sub.rank != rank and sub.rank.lower() in self.scope.index_vars():
                self.errors.warning(f"subscript '{sub.rank}' of '{name}' (rank {rank}) is a "
                                    f"size: every element reads the one at {rank} = {sub.rank} "
                                    f"(absent when {sub.rank} >= {rank})", sub.loc,
                                    f"if you meant an index, {slip}")

    def _subscript(self, s: ast.SExpr) -> ir.Expr:
        self.subscript_depth += 1
        out = self._expr(s)
        self.subscript_depth -= 1
        fault = _non_affine(out)
        if fault:
            why, node = fault
            self.errors.error(f"subscript is not integer-affine: {why}", node.loc or _sloc(s))
        self._check_indirection(out)
        self._check_modulos(out)
        return out

    # --- indirect subscripts (one level of integer-tensor indirection) ----------------
    def _check_indirection(self, sub: ir.Expr) -> None:
        """Each tensor read in a subscript is an i32/i64 argument read at affine subscripts.

        Its own subscripts were checked when it was lowered; here only that they read no
        tensor again (the contract allows one level of indirection).
        """
        for node in _subscript_accesses(sub):
            self._check_index_tensor(node)
            for inner in (a for s in node.subscripts for a in _subscript_accesses(s)):
                self.errors.error(f"two levels of indirection: '{inner.tensor}' indexes "
                                  f"'{node.tensor}', which is itself used as an index",
                                  inner.loc, "a subscript may read one integer tensor at "
                                             "affine subscripts; compose the index tables first")

    def _check_index_tensor(self, node: ir.Access) -> None:
        arg = next((p for p in self.decl.params if isinstance(p, ast.TensorParamDecl)
                    and p.name.name == node.tensor), None)
        dtype = arg.dtype.name if arg is not None and arg.dtype is not None else None
        if dtype in ("i32", "i64"):
            return
        if arg is None:
            what, hint = "a computed (floating-point) tensor", "only an i32/i64 argument can index"
        else:
            what = f"declared {dtype}" if dtype else "a floating-point tensor (no dtype declared)"
            hint = f"declare it {node.tensor}[{','.join(d.name for d in arg.dims)}]: i32 (or i64)"
        self.errors.error(f"tensor '{node.tensor}' is used as an index but is {what}",
                          node.loc, hint)

    def _check_modulos(self, sub: ir.Expr) -> None:
        """``%`` in a subscript takes a provably positive size or constant on its right."""
        for node in walk(sub):
            if not (isinstance(node, ir.Binary) and node.op == "%") or _depends(node.right):
                continue
            value = _size_of(node.right)
            if value is None or value.is_positive is not True:
                shown = "" if value is None else f" ({print_size(value)})"
                self.errors.error(f"'%' must be by a positive size or constant{shown}", node.loc,
                                  "floor modulo, as Python's: the divisor must be > 0")

    def _expr_CallExpr(self, e: ast.CallExpr) -> ir.Expr:
        fn = e.fn.name
        args = tuple(self._expr(a) for a in e.args)
        if fn not in ir.FUNCTIONS and fn in self.scope.tensors:
            self.errors.error(f"tensor '{fn}' is not a function", e.fn.loc, f"write {fn}[...]")
            return ir.Num(0, loc=e.loc)
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
        if not e.ranks:
            self.errors.error(f"{op}[] lists no index variable", e.loc, f"write {op}[i](...)")
        ranks = self._reduction_ranks(e)  # a rank the body does not use is fine: sum[m](2) is M * 2
        return ir.Reduce(op, tuple(r for r, _ in ranks), body, loc=e.loc)

    def _reduction_ranks(self, e: ast.ReduceExpr) -> list[tuple[str, Loc]]:
        """The listed ranks with their locations; errors for anything else."""
        out: list[tuple[str, Loc]] = []
        index_vars = self.scope.index_vars()
        for r in e.ranks:
            if not isinstance(r, ast.Name):
                self.errors.error("a reduction lists index variables", _sloc(r))
            elif r.name not in index_vars:
                self._unknown_index(r.name, r.loc)
            elif index_vars[r.name] in (rank for rank, _ in out):
                self.errors.error(f"'{r.name}' is listed twice", r.loc)
            else:
                out.append((index_vars[r.name], r.loc))
        return out

    def _expr_UnaryExpr(self, e: ast.UnaryExpr) -> ir.Expr:
        return ir.Unary(e.op, self._expr(e.operand), loc=e.loc)

    def _expr_BinaryExpr(self, e: ast.BinaryExpr) -> ir.Expr:
        if e.op == "%" and not self.subscript_depth:
            self.errors.error("'%' is allowed only in a subscript", e.loc,
                              "the language has '%' for indices (T[m % PG, e]), not for values")
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


def _checked_size(value: sympy.Expr, src: ast.SExpr) -> sympy.Expr:
    """``value`` unless it is undefined (``1/0``) or not real (``sqrt(-1)``)."""
    if value.has(sympy.zoo, sympy.nan) or value.is_extended_real is False:
        raise _SizeError(f"this size expression is undefined or not real ({value})", _sloc(src),
                         "check for a division by zero or a root/log of a negative number")
    return value


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
    for c in children(e):
        yield from _reduction_scopes(c, outer)


def _depends(e: ir.Expr) -> bool:
    """``e`` varies: it uses an index variable or reads a tensor (an indirect term)."""
    return bool(free_ranks(e)) or any(isinstance(n, ir.Access) for n in walk(e))


def _subscript_accesses(e: ir.Expr):
    """The tensor reads of a subscript, not descending into their own subscripts."""
    if isinstance(e, ir.Access):
        yield e
        return
    for c in children(e):
        yield from _subscript_accesses(c)


def _size_of(e: ir.Expr) -> sympy.Expr | None:
    """An index-free subscript term (numbers, sizes, + - * //) as sympy; None otherwise."""
    if isinstance(e, ir.Num):
        return sympy.Integer(e.value) if isinstance(e.value, int) else None
    if isinstance(e, ir.Size):
        return ir.size_symbol(e.rank)
    if isinstance(e, ir.Unary) and e.op == "-":
        inner = _size_of(e.operand)
        return None if inner is None else -inner
    if isinstance(e, ir.Binary) and e.op in ("+", "-", "*", "//"):
        a, b = _size_of(e.left), _size_of(e.right)
        if a is None or b is None or (e.op == "//" and b == 0):
            return None
        if e.op == "//":
            return sympy.floor(a / b)
        return a + b if e.op == "+" else a - b if e.op == "-" else a * b
    return None


def _non_affine(e: ir.Expr) -> tuple[str, ir.Expr] | None:
    """Why ``e`` is not an integer-affine index expression and the node at fault, or None."""
    if isinstance(e, (ir.Index, ir.Size, ir.Access)):  # an Access: checked by _check_indirection
        return None
    if isinstance(e, ir.Num):
        return None if isinstance(e.value, int) else (f"'{e.value}' is not an integer", e)
    if isinstance(e, ir.Unary) and e.op == "-":
        return _non_affine(e.operand)
    if isinstance(e, ir.Binary) and e.op in ("+", "-"):
        return _non_affine(e.left) or _non_affine(e.right)
    if isinstance(e, ir.Binary) and e.op == "*" and _depends(e.left) and _depends(e.right):
        if any(isinstance(n, ir.Access) for n in walk(e)):
            return "a product of an index tensor's element and another varying term", e
        return "a product of two index variables", e
    if isinstance(e, ir.Binary) and e.op in ("//", "%") and _depends(e.right):
        return f"'{e.op}' must divide by a size or a constant", e
    if isinstance(e, ir.Binary) and e.op == "//" and e.right == ir.Num(0):
        return "division by zero", e
    if isinstance(e, ir.Binary) and e.op in ("*", "//", "%"):
        return _non_affine(e.left) or _non_affine(e.right)
    return _non_affine_leaf(e), e


def _non_affine_leaf(e: ir.Expr) -> str:
    if isinstance(e, ir.Binary) and e.op == "/":
        return "'/' is not integer division (use '//')"
    if isinstance(e, ir.Param):
        return f"parameter '{e.name}' is not a size"
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
        if keyword.iskeyword(d.name.name):
            errors.error(f"definition '{d.name.name}' is a Python keyword", d.name.loc,
                         "each definition becomes a Python function; rename it")
        out = DefinitionLowering(d, errors).lower()
        if out is not None:
            defs.append(out)
    if errors.diagnostics:
        return None
    return ir.Module(tuple(defs))
