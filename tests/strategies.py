"""Shared test inputs: the contract's example blocks and random valid definitions.

``definitions()`` is a hypothesis strategy for random VALID ``ir.Definition``s,
built directly in IR: tensor arguments over 2–4 ranks, ``let`` sizes (``ceil``,
``//``, copies, constants), scalar parameters with defaults, a chain of 2–6
Einsums over earlier tensors, and sometimes an iterative rank (init + update,
read later at its final step).  Every index variable that is not on an LHS is
bound by an explicit reduction, so lowering adds no implicit sum and
``parse(print_ir(d)) == d`` must hold.

With ``safe=True`` (the default) the cascades are numerically tame, so backends
can be compared with the interpreter:

* functions: ``tanh sigmoid abs relu`` and binary ``max min`` directly;
  ``exp``/``exp2`` only of a ``tanh(...)``; ``sqrt log log2 rsqrt`` only of
  ``1 + abs(...)``;
* ``/`` only by ``1 + abs(...)``; ``**`` only with exponent ``2``; no ``//``
  outside subscripts; no ``inf``;
* comparisons, ``select`` conditions and ``where`` clauses only compare index
  variables, sizes and integers (no data comparisons, so float32 rounding cannot
  flip a mask).

Values stay finite but may grow (products of sums): compare with a tolerance
relative to the output's magnitude.  ``safe=False`` also draws ``inf``, data
comparisons, and any function, ``/``, ``//`` or ``**``.  ``data_masks=True`` lets
``where`` clauses also compare an *argument's* elements with 0 (exact inputs, so no
rounding can flip the mask between backends).

``attention_cascades()`` draws softmax-attention cascades, the online pass's and the
fused tile loop's input: masks (affine, reversed, windowed, data-dependent over
``i32`` document ids), keys and values read reversed or offset, score modifiers,
extra outputs (a scalar, a per-row log-sum-exp), sometimes no normaliser at all.
``sample_sizes(..., low=0)`` draws zero sizes; a small ``tile`` option forces many
tiles (tests/fuzz.py).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import sympy
from hypothesis import strategies as st

from attnc.einsum_ir import ir
from attnc.einsum_ir.exprs import children, free_ranks
from attnc.einsum_ir.sizes import evaluate_lets

ROOT = Path(__file__).resolve().parent.parent
CONTRACT = ROOT.parent / "shared" / "attn-language.md"

ARG_RANKS = ("M", "P", "E", "F", "H")
ARG_NAMES = ("Q", "K", "V", "W")
PARAM_NAMES = ("alpha", "beta")
SAFE_FUNCS = ("tanh", "sigmoid", "abs", "relu")
BOUNDED_INPUT_FUNCS = ("exp", "exp2")  # safe only of tanh(...)
POSITIVE_INPUT_FUNCS = ("sqrt", "log", "log2", "rsqrt")  # safe only of 1 + abs(...)
MAX_DEPTH = 3


def contract_blocks() -> list[str]:
    """Every ```attn block of the language contract (none when the contract is absent)."""
    if not CONTRACT.exists():
        return []
    return re.findall(r"```attn\n(.*?)```", CONTRACT.read_text(), re.S)


def require_contract() -> list[str]:
    """The contract's blocks, or skip the calling test when the contract is not checked out."""
    blocks = contract_blocks()
    if not blocks:
        pytest.skip(f"the language contract is not at {CONTRACT}")
    return blocks


# ---------------------------------------------------------------------------------------------
# Expressions
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Env:
    """What the expressions of one statement may refer to."""

    ranks: tuple[str, ...]
    tensors: tuple[tuple[str, tuple[str, ...]], ...]  # readable tensors and their ranks
    finals: tuple[tuple[str, str], ...]  # iterative tensor -> its rank (read at the final step)
    params: tuple[str, ...]
    safe: bool
    data_masks: bool = False
    args: tuple[tuple[str, tuple[str, ...]], ...] = ()  # the tensor arguments and their ranks


def _num(draw) -> ir.Num:
    return ir.Num(draw(st.sampled_from((0, 1, 2, 3, 0.5, 0.25, 1.5))))


def _index_like(draw, env: Env, scope: frozenset[str]) -> ir.Expr:
    """An integer-valued term: an index variable (maybe shifted), a size or a small integer."""
    options = ["size", "int"] + (["index", "shifted"] if scope else [])
    kind = draw(st.sampled_from(options))
    if kind == "size":
        return ir.Size(draw(st.sampled_from(env.ranks)))
    if kind == "int":
        return ir.Num(draw(st.integers(0, 4)))
    var = ir.Index(draw(st.sampled_from(sorted(scope))))
    return var if kind == "index" else ir.Binary(draw(st.sampled_from("+-")), var,
                                                 ir.Num(draw(st.integers(1, 3))))


def conditions(draw, env: Env, scope: frozenset[str], depth: int = 1) -> ir.Expr:
    """A comparison of index-like terms, maybe combined with ``and``/``or``/``not``."""
    kinds = ("compare", "compare", "and", "or", "not") if depth else ("compare",)
    kind = draw(st.sampled_from(kinds + ("data",) * (env.data_masks and bool(env.args))))
    if kind == "data":  # an argument's element against 0: exact, so the same mask everywhere
        name, ranks = draw(st.sampled_from(env.args))
        access = ir.Access(name, tuple(_subscript(draw, r, scope) for r in ranks))
        return ir.Binary(draw(st.sampled_from((">", "<="))), access, ir.Num(0))
    if kind == "compare":
        op = draw(st.sampled_from(ir.COMPARE_OPS))
        return ir.Binary(op, _index_like(draw, env, scope), _index_like(draw, env, scope))
    if kind == "not":
        return ir.Unary("not", conditions(draw, env, scope, depth - 1))
    return ir.Binary(kind, conditions(draw, env, scope, depth - 1),
                     conditions(draw, env, scope, depth - 1))


def _subscript(draw, rank: str, scope: frozenset[str]) -> ir.Expr:
    """An integer-affine subscript along ``rank``: ``v``, ``v + 1``, ``v // 2``, ``R - 1 - v``, ``0``."""
    if not scope:
        return ir.Num(draw(st.integers(0, 1)))
    own = rank in scope and draw(st.booleans())
    var = ir.Index(rank if own else draw(st.sampled_from(sorted(scope))))
    return draw(st.sampled_from((
        var, var, ir.Binary("+", var, ir.Num(1)), ir.Binary("//", var, ir.Num(2)),
        ir.Binary("-", ir.Binary("-", ir.Size(rank), ir.Num(1)), var), ir.Num(0),
    )))


def _access(draw, env: Env, scope: frozenset[str]) -> ir.Expr:
    name, ranks = draw(st.sampled_from(env.tensors))
    final = dict(env.finals).get(name)
    subs = tuple(ir.Size(r) if r == final else _subscript(draw, r, scope) for r in ranks)
    return ir.Access(name, subs)


def _leaf(draw, env: Env, scope: frozenset[str]) -> ir.Expr:
    kinds = ["num", "access", "access", "size"] + ["index"] * bool(scope) + ["param"] * bool(env.params)
    kinds += ["const"]
    kind = draw(st.sampled_from(kinds))
    if kind == "num":
        return _num(draw)
    if kind == "access":
        return _access(draw, env, scope)
    if kind == "size":
        return ir.Size(draw(st.sampled_from(env.ranks)))
    if kind == "index":
        return ir.Index(draw(st.sampled_from(sorted(scope))))
    if kind == "param":
        return ir.Param(draw(st.sampled_from(env.params)))
    return ir.Const(draw(st.sampled_from(("pi",) if env.safe else ("pi", "inf"))))


def _reduce(draw, env: Env, scope: frozenset[str], depth: int) -> ir.Expr:
    ranks = tuple(draw(st.lists(st.sampled_from(env.ranks), min_size=1, max_size=2, unique=True)))
    body = expressions(draw, env, scope | frozenset(ranks), depth - 1)
    for r in ranks:  # usually use every variable it binds; sum[m](2) is M * 2 otherwise
        if r not in free_ranks(body) and draw(st.booleans()):
            body = ir.Binary("+", body, ir.Index(r))
    return ir.Reduce(draw(st.sampled_from(ir.REDUCE_OPS)), ranks, body)


def _one_plus_abs(x: ir.Expr) -> ir.Expr:
    return ir.Binary("+", ir.Num(1), ir.Call("abs", (x,)))


def _call(draw, env: Env, scope: frozenset[str], depth: int) -> ir.Expr:
    def sub() -> ir.Expr:
        return expressions(draw, env, scope, depth - 1)

    fn = draw(st.sampled_from(ir.FUNCTIONS))
    if fn == "select":
        return ir.Call(fn, (conditions(draw, env, scope), sub(), sub()))
    if fn in ir.BINARY_FUNCS and draw(st.booleans()):
        return ir.Call(fn, (sub(), sub()))
    if fn in ir.BINARY_FUNCS:
        fn = draw(st.sampled_from(SAFE_FUNCS))
    if env.safe and fn in BOUNDED_INPUT_FUNCS:
        return ir.Call(fn, (ir.Call("tanh", (sub(),)),))
    if env.safe and fn in POSITIVE_INPUT_FUNCS:
        return ir.Call(fn, (_one_plus_abs(sub()),))
    return ir.Call(fn, (sub(),))


def _arith(draw, env: Env, scope: frozenset[str], depth: int) -> ir.Expr:
    op = draw(st.sampled_from(("+", "-", "*", "*", "/", "**") + ("//",) * (not env.safe)))
    left = expressions(draw, env, scope, depth - 1)
    if env.safe and op == "**":
        return ir.Binary("**", left, ir.Num(2))
    right = expressions(draw, env, scope, depth - 1)
    if env.safe and op == "/":
        return ir.Binary("/", left, _one_plus_abs(right))
    return ir.Binary(op, left, right)


def _compare_value(draw, env: Env, scope: frozenset[str], depth: int) -> ir.Expr:
    if env.safe:
        return conditions(draw, env, scope)
    return ir.Binary(draw(st.sampled_from(ir.COMPARE_OPS)), expressions(draw, env, scope, depth - 1),
                     expressions(draw, env, scope, depth - 1))


def expressions(draw, env: Env, scope: frozenset[str], depth: int) -> ir.Expr:
    """A random expression whose free index variables all lie in ``scope``."""
    if depth <= 0:
        return _leaf(draw, env, scope)
    kind = draw(st.sampled_from(("leaf", "access", "neg", "arith", "arith", "call", "reduce",
                                 "reduce", "compare")))
    if kind == "leaf":
        return _leaf(draw, env, scope)
    if kind == "access":
        return _access(draw, env, scope)
    if kind == "neg":
        return ir.Unary("-", expressions(draw, env, scope, depth - 1))
    if kind == "arith":
        return _arith(draw, env, scope, depth)
    if kind == "call":
        return _call(draw, env, scope, depth)
    if kind == "reduce":
        return _reduce(draw, env, scope, depth)
    return _compare_value(draw, env, scope, depth)


# ---------------------------------------------------------------------------------------------
# Declarations and statements
# ---------------------------------------------------------------------------------------------


def _tensor_args(draw) -> tuple[ir.TensorArg, ...]:
    ranks = draw(st.lists(st.sampled_from(ARG_RANKS), min_size=2, max_size=4, unique=True))
    n_args = draw(st.integers(1, 3))
    dims = [draw(st.lists(st.sampled_from(ranks), min_size=1, max_size=3, unique=True))
            for _ in range(n_args)]
    uncovered = [r for r in ranks if not any(r in d for d in dims)]
    if uncovered:
        dims[-1] = list(dict.fromkeys(dims[-1] + uncovered))
    dtypes = st.sampled_from((None,) + ir.FLOAT_DTYPES)
    return tuple(ir.TensorArg(ARG_NAMES[i], tuple(d), draw(dtypes)) for i, d in enumerate(dims))


def _let_value(draw, earlier: list[str]) -> sympy.Expr:
    size = ir.size_symbol(draw(st.sampled_from(earlier)))
    k = draw(st.integers(2, 4))
    return draw(st.sampled_from((
        sympy.Integer(k), size, sympy.ceiling(size / k), sympy.floor(size / k) + 1,
    )))


def _lets(draw, arg_ranks: list[str]) -> tuple[ir.SizeLet, ...]:
    lets: list[ir.SizeLet] = []
    for i in range(draw(st.integers(0, 2))):
        lets.append(ir.SizeLet(f"L{i}", _let_value(draw, arg_ranks + [x.name for x in lets])))
    return tuple(lets)


def _scalar_params(draw, ranks: list[str]) -> tuple[ir.ScalarParam, ...]:
    names = draw(st.lists(st.sampled_from(PARAM_NAMES), max_size=2, unique=True))
    defaults = st.sampled_from((sympy.Float(0.5), sympy.Integer(2),
                                1 / sympy.sqrt(ir.size_symbol(ranks[0])),
                                sympy.Integer(1) / ir.size_symbol(ranks[-1])))
    return tuple(ir.ScalarParam(n, draw(defaults), draw(st.sampled_from((None, "f32"))))
                 for n in names)


def _lhs(draw, ranks: tuple[str, ...], exclude: tuple[str, ...] = ()) -> tuple[str, ...]:
    pool = [r for r in ranks if r not in exclude]
    return tuple(draw(st.lists(st.sampled_from(pool), max_size=min(3, len(pool)), unique=True)))


def _levels(e: ir.Expr, outer: frozenset[str]):
    """The variables in scope at each reduction of ``e`` (its own plus the enclosing ones)."""
    if isinstance(e, ir.Reduce):
        outer = outer | frozenset(e.ranks)
        yield outer
    for c in children(e):
        yield from _levels(c, outer)


def _where(draw, env: Env, lhs: tuple[str, ...], expr: ir.Expr) -> ir.Expr | None:
    """Sometimes a condition over the variables of one level of the statement."""
    if draw(st.integers(0, 3)) != 0:
        return None
    scope = draw(st.sampled_from([frozenset(lhs)] + list(_levels(expr, frozenset(lhs)))))
    return conditions(draw, env, scope)


def _einsum(draw, env: Env, name: str) -> ir.Einsum:
    lhs = _lhs(draw, env.ranks)
    expr = expressions(draw, env, frozenset(lhs), MAX_DEPTH)
    return ir.Einsum(name, lhs, expr, _where(draw, env, lhs, expr))


def _iterative(draw, env: Env, name: str) -> tuple[ir.IterativeEinsum, ir.IterativeEinsum]:
    """``R[0, ...] = e0`` and ``R[i+1, ...] = R[i, ...] * c + e1`` over an iterative rank."""
    rank = draw(st.sampled_from(env.ranks))
    others = _lhs(draw, env.ranks, exclude=(rank,))
    pos = draw(st.integers(0, len(others)))
    lhs = others[:pos] + (rank,) + others[pos:]
    init = expressions(draw, env, frozenset(others), 1)
    state = ir.Access(name, tuple(ir.Index(r) for r in lhs))
    step = expressions(draw, env, frozenset(lhs), MAX_DEPTH - 1)
    update = ir.Binary("+", ir.Binary("*", state, _num(draw)), step)
    return (ir.IterativeEinsum(name, lhs, rank, True, init),
            ir.IterativeEinsum(name, lhs, rank, False, update))


def _statements(draw, env: Env) -> tuple[ir.Statement, ...]:
    """2–6 statements ``T0, T1, ...``, each reading arguments and earlier statements."""
    out: list[ir.Statement] = []
    n = draw(st.integers(2, 6))
    iterative_at = draw(st.one_of(st.none(), st.integers(0, n - 2)))
    for i in range(n):
        name = f"T{i}"
        if i == iterative_at:
            init, update = _iterative(draw, env, name)
            out += [init, update]
            env = replace(env, tensors=env.tensors + ((name, init.lhs),),
                          finals=env.finals + ((name, init.iter_rank),))
            continue
        stmt = _einsum(draw, env, name)
        out.append(stmt)
        env = replace(env, tensors=env.tensors + ((name, stmt.lhs),))
    return tuple(out)


def _outputs(draw, statements: tuple[ir.Statement, ...]) -> tuple[ir.Output, ...]:
    plain = [s for s in statements if isinstance(s, ir.Einsum)]
    chosen = [plain[-1]] + [s for s in plain[:-1] if draw(st.integers(0, 3)) == 0][:1]
    dtypes = st.sampled_from((None, None, "f32", "f64"))
    return tuple(ir.Output(s.tensor, s.lhs, draw(dtypes)) for s in chosen)


@st.composite
def definitions(draw, safe: bool = True, data_masks: bool = False) -> ir.Definition:
    """A random valid definition (see the module docstring for ``safe`` and ``data_masks``)."""
    args = _tensor_args(draw)
    arg_ranks = list(dict.fromkeys(r for a in args for r in a.ranks))
    lets = _lets(draw, arg_ranks)
    ranks = tuple(arg_ranks + [x.name for x in lets])
    params = _scalar_params(draw, list(ranks))
    arg_tensors = tuple((a.name, a.ranks) for a in args)
    env = Env(ranks, arg_tensors, (), tuple(p.name for p in params), safe, data_masks, arg_tensors)
    statements = _statements(draw, env)
    return ir.Definition("d", args + params, lets, _outputs(draw, statements), statements)


# ---------------------------------------------------------------------------------------------
# Attention cascades (text, parsed): what the online pass and the fused loop transform
# ---------------------------------------------------------------------------------------------

KEY_READS = ("K[m,e]", "K[M - 1 - m, e]", "K[m + 1, e]", "K[m // 2, e]")
VALUE_READS = ("V[m,f]", "V[M - 1 - m, f]", "V[m + 2, f]")
MASKS = (None, "m <= p + M - P", "m <= p", "p <= m", "M - 1 - m <= p",
         "m >= p - 2 and m <= p + 1", "DQ[p] == DK[m]", "DQ[p] == DK[m] and m <= p + M - P",
         "DK[m] > 0")
SCORES = ("{qk} * scale", "3 * tanh({qk} * scale / 3)", "{qk} * scale - 0.5 * (p - m)",
          "{qk} * scale + B[m]")
NORMALISERS = ("softmax", "softmax", "sum", "sigmoid")
EXTRAS = ("", "LSE[p] = GM[p] + log(SD[p])", "Z = sum[p,f](AV[p,f])", "N[p] = max[m](S[p,m])")


def _attention_text(score: str, mask: str | None, value: str, norm: str, extra: str) -> str:
    """The body of an attention cascade and its outputs."""
    where = f"   where {mask}" if mask else ""
    lines = [f"S[p,m] = {score}{where}"]
    if norm == "softmax":
        lines += ["GM[p] = max[m](S[p,m])", "SN[p,m] = exp(S[p,m] - GM[p])",
                  "SD[p] = sum[m](SN[p,m])", f"AV[p,f] = SN[p,m] * {value} / SD[p]"]
    elif norm == "sum":  # normalised by a plain sum (no max): the online pass's sum-only form
        lines += [f"AV[p,f] = sigmoid(S[p,m]) * {value} / sum[m](sigmoid(S[p,m]))"]
    else:
        lines += [f"AV[p,f] = sigmoid(S[p,m]) * {value}"]
    if extra and (norm == "softmax" or not extra.startswith("LSE")):
        lines.append(extra)
    return "\n  ".join(lines)


@st.composite
def attention_cascades(draw) -> ir.Definition:
    """A random attention cascade over Q[P,E], K[M,E], V[M,F] (see the module docstring)."""
    mask = draw(st.sampled_from(MASKS))
    score = draw(st.sampled_from(SCORES)).format(qk=f"Q[p,e] * {draw(st.sampled_from(KEY_READS))}")
    norm, extra = draw(st.sampled_from(NORMALISERS)), draw(st.sampled_from(EXTRAS))
    body = _attention_text(score, mask, draw(st.sampled_from(VALUE_READS)), norm, extra)
    args = ["Q[P,E]", "K[M,E]", "V[M,F]"]
    args += ["DQ[P]: i32", "DK[M]: i32"] if mask and "D" in mask else []
    args += ["B[M]"] if "B[m]" in score else []
    outs = ["AV[P,F]"] + [x.split(" = ")[0].replace("[p]", "[P]") for x in (extra,) if x
                          and (norm == "softmax" or not x.startswith("LSE"))]
    out = outs[0] if len(outs) == 1 else "(" + ", ".join(outs) + ")"
    text = (f"attention a({', '.join(args)}, scale = 1/sqrt(E)) -> {out} {{\n"
            f"  {body}\n}}\n")
    from attnc.frontends import parse

    return parse(text, "attention.attn").definitions[0]


# ---------------------------------------------------------------------------------------------
# Inputs for a definition
# ---------------------------------------------------------------------------------------------


def sample_sizes(defn: ir.Definition, rng: np.random.Generator, low: int = 1,
                 high: int = 5) -> dict[str, int]:
    """Random sizes (``low..high``) for the argument ranks, with every ``let`` evaluated."""
    sizes = {r: int(rng.integers(low, high + 1)) for a in defn.tensor_args for r in a.ranks}
    return evaluate_lets(defn, sizes)


def sample_inputs(defn: ir.Definition, rng: np.random.Generator,
                  sizes: dict[str, int] | None = None) -> list[np.ndarray]:
    """Standard-normal float64 arrays for the tensor arguments, in declaration order."""
    sizes = sizes or sample_sizes(defn, rng)
    return [rng.standard_normal(tuple(sizes[r] for r in a.ranks)) for a in defn.tensor_args]
