"""Costs of a canonical cascade, symbolic in the rank sizes (sympy), and their values at sizes.

Conventions (stated once, used by the report):

* **FLOPs.** Each operator (``+ - * / ** //``, unary ``-``, comparisons, ``and or not``) and
  each function call (``exp``, binary ``max``, ``select``, ...) counts one FLOP at every
  point of the iteration space where it is evaluated: the statement's left-side ranks
  outside a reduction, those plus the reduced ranks inside it.  A reduction over ranks
  ``R`` costs ``(|R| - 1)`` combining steps per output point.  So ``QK[p,m] =
  sum[e](Q[p,e] * K[m,e] * scale)`` costs ``2*P*M*E + P*M*(E - 1)``.  Subexpressions of
  numbers and sizes only (``-inf``, ``M - P``) are folded at compile time and cost
  nothing; subscripts are index arithmetic, not FLOPs; a ``where`` is a mask, not counted,
  and the count is dense (masked points are counted: an upper bound on the work done).
  An iterative update runs once per step (its iteration space includes the step rank); an
  init runs once.
* **Compulsory bytes.** Every tensor argument is read once and every output written once:
  elements times the element size of its dtype (``f16``/``bf16`` 2, ``f32``/``i32`` 4,
  ``f64``/``i64`` 8, ``bool`` 1; undeclared: 4).  An undeclared output takes the dtype of
  the first floating-point argument, as the language's dtype rule says.  Sizes are per
  core problem (leading batch dimensions multiply every cost alike).
* **Arithmetic intensity** is total FLOPs over compulsory bytes.
* **Live footprint** lower bound, per rank, in elements of one fiber: the whole fiber
  (the rank's size) for a symbolic rank traversed in more than one pass, since its data
  must stay live (or be fetched again) between passes; the tile (the rank's size) for a
  constant rank; one element for a 1-pass rank; nothing (1) for a rank no Einsum
  traverses.  The cascade's footprint is their product: the data one streaming unit keeps
  live.  Bytes use 4 per element (arithmetic is done in at least float32).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Mapping

import sympy

from ..einsum_ir.exprs import children, walk
from ..einsum_ir.ir import (FLOAT_DTYPES, Access, Binary, Call, Definition, Expr, Index,
                            IterativeEinsum, Param, Reduce, Statement, Unary, size_symbol)
from .passcount import PassAnalysis, RankPasses, constant_sizes, statement_label

DTYPE_BYTES = {"f16": 2, "bf16": 2, "f32": 4, "f64": 8, "i32": 4, "i64": 8, "bool": 1}
DEFAULT_DTYPE = "f32"
COMPUTE_BYTES = 4  # per element of a live intermediate: arithmetic is at least float32


@dataclass(frozen=True, slots=True)
class TensorTraffic:
    """One compulsory transfer: an argument read once or an output written once."""

    name: str
    role: str  # "input" or "output"
    dtype: str
    elements: sympy.Expr

    @property
    def bytes(self) -> sympy.Expr:
        return self.elements * DTYPE_BYTES[self.dtype]


@dataclass(frozen=True, slots=True)
class Footprint:
    """The live-footprint lower bound over one rank, in elements of one fiber."""

    rank: str
    elements: sympy.Expr
    reason: str


@dataclass(frozen=True)
class CascadeCosts:
    """Every cost of one canonical definition, as sympy expressions of rank sizes."""

    flops: Mapping[str, sympy.Expr]  # statement label -> FLOPs
    total_flops: sympy.Expr
    traffic: tuple[TensorTraffic, ...]
    compulsory_bytes: sympy.Expr
    intensity: sympy.Expr
    footprints: tuple[Footprint, ...]
    footprint_elements: sympy.Expr

    @property
    def footprint_bytes(self) -> sympy.Expr:
        return self.footprint_elements * COMPUTE_BYTES


# ----------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------


def space_size(ranks: tuple[str, ...] | list[str]) -> sympy.Expr:
    """The number of points of an iteration space: the product of its ranks' sizes."""
    return sympy.Mul(*(size_symbol(r) for r in ranks))


def _compile_time_ids(e: Expr) -> set[int]:
    """Ids of the subexpressions of ``e`` made of numbers and sizes only: folded by the
    compiler, so free.  One bottom-up pass (reversed pre-order puts children first)."""
    out: set[int] = set()
    for n in reversed(list(walk(e))):
        if not isinstance(n, (Access, Index, Param)) and all(id(c) in out for c in children(n)):
            out.add(id(n))
    return out


def expr_flops(e: Expr, space: tuple[str, ...]) -> sympy.Expr:
    """FLOPs of ``e`` evaluated at every point of ``space`` (see the module's convention)."""
    terms: list[sympy.Expr] = []
    _flops(e, space, _compile_time_ids(e), terms)
    return sympy.Add(*terms)  # one Add: summing term by term is quadratic in sympy


def _flops(e: Expr, space: tuple[str, ...], free: set[int], terms: list[sympy.Expr]) -> None:
    if isinstance(e, Reduce):
        inner = space + tuple(r for r in e.ranks if r not in space)
        terms.append(space_size(space) * (space_size(e.ranks) - 1))
        _flops(e.body, inner, free, terms)
    elif isinstance(e, (Unary, Binary, Call)) and id(e) not in free:
        terms.append(space_size(space))
        for c in children(e):
            _flops(c, space, free, terms)


def statement_space(st: Statement) -> tuple[str, ...]:
    """The ranks a statement's right side is evaluated over, outside its reductions."""
    if isinstance(st, IterativeEinsum) and st.init:
        return tuple(r for r in st.lhs if r != st.iter_rank)
    return st.lhs


def statement_flops(st: Statement) -> sympy.Expr:
    return sympy.expand(expr_flops(st.expr, statement_space(st)))


# ----------------------------------------------------------------------------
# Compulsory traffic
# ----------------------------------------------------------------------------


def output_dtype(defn: Definition, name: str) -> str:
    """A declared output dtype, else the first floating-point argument's, else f32."""
    out = next(o for o in defn.outputs if o.name == name)
    if out.dtype:
        return out.dtype
    floats = (a.dtype for a in defn.tensor_args if a.dtype in FLOAT_DTYPES)
    return next(floats, DEFAULT_DTYPE)


def compulsory_traffic(defn: Definition) -> tuple[TensorTraffic, ...]:
    """Every argument read once, every output written once."""
    reads = tuple(TensorTraffic(a.name, "input", a.dtype or DEFAULT_DTYPE, space_size(a.ranks))
                  for a in defn.tensor_args)
    writes = tuple(TensorTraffic(o.name, "output", output_dtype(defn, o.name), space_size(o.ranks))
                   for o in defn.outputs)
    return reads + writes


# ----------------------------------------------------------------------------
# Footprints
# ----------------------------------------------------------------------------


def rank_footprint(rp: RankPasses) -> Footprint:
    """How much of a fiber of ``rp.rank`` must stay live (see the module's convention)."""
    if rp.count == 0:
        return Footprint(rp.rank, sympy.Integer(1), "not traversed")
    if rp.constant:
        return Footprint(rp.rank, size_symbol(rp.rank), "tile (constant rank)")
    if rp.count > 1:
        return Footprint(rp.rank, size_symbol(rp.rank), f"whole fiber ({rp.count} passes)")
    return Footprint(rp.rank, sympy.Integer(1), "one element (1 pass)")


# ----------------------------------------------------------------------------
# All together
# ----------------------------------------------------------------------------


def cascade_costs(analysis: PassAnalysis) -> CascadeCosts:
    """Costs of the analysed (canonical) definition."""
    defn = analysis.definition
    flops = {statement_label(st): statement_flops(st) for st in defn.statements}
    total = sympy.expand(sum(flops.values(), sympy.Integer(0)))
    traffic = compulsory_traffic(defn)
    nbytes = sympy.expand(sum((t.bytes for t in traffic), sympy.Integer(0)))
    feet = tuple(rank_footprint(rp) for rp in analysis.ranks)
    return CascadeCosts(flops=flops, total_flops=total, traffic=traffic, compulsory_bytes=nbytes,
                        intensity=total / nbytes if nbytes != 0 else sympy.zoo,
                        footprints=feet,
                        footprint_elements=sympy.Mul(*(f.elements for f in feet)))


# ----------------------------------------------------------------------------
# Sizes
# ----------------------------------------------------------------------------


def known_sizes(defn: Definition, sizes: Mapping[str, int] | None) -> dict[str, int]:
    """Rank sizes known for ``defn``: given ones (names of other definitions ignored),
    constant lets, and lets computable from those.

    A given let must agree with its value; a let that does not come out a whole number,
    or a size that is not a positive integer, is a ``ValueError``.
    """
    given = {k: _positive_int(k, v) for k, v in (sizes or {}).items() if k in defn.ranks}
    known = {k: v for k, v in given.items() if k not in {let.name for let in defn.lets}}
    known |= {k: int(v) for k, v in constant_sizes(defn).items() if v.is_integer}
    for let in defn.lets:
        value = sympy.nsimplify(let.value.subs({size_symbol(k): v for k, v in known.items()}))
        if value.is_number:
            known[let.name] = _whole(defn, let.name, let.value, value, known)
            if let.name in given and given[let.name] != known[let.name]:
                raise ValueError(f"size {let.name}={given[let.name]} contradicts "
                                 f"'let {let.name} = {let.value}' = {known[let.name]}")
        elif let.name in given:
            known[let.name] = given[let.name]
    return known


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, sympy.Integer)) \
            or int(value) < 1:
        raise ValueError(f"size {name}={value!r}: a size must be a positive integer")
    return int(value)


def _whole(defn: Definition, name: str, formula, value, known: dict[str, int]) -> int:
    if value.is_integer:
        return int(value)
    used = ", ".join(f"{k}={v}" for k, v in known.items() if size_symbol(k) in formula.free_symbols)
    raise ValueError(f"definition '{defn.name}': let {name} = {formula} is {value} at {used}, "
                     f"not a whole number")


def evaluate(expr: sympy.Expr, known: Mapping[str, int]) -> int | float | None:
    """The value of ``expr`` at ``known`` sizes: an int, a float, or None if still symbolic."""
    value = sympy.sympify(expr).subs({size_symbol(k): v for k, v in known.items()})
    if not value.is_number or not value.is_finite:
        return None
    return int(value) if value.is_integer else float(value)


# ----------------------------------------------------------------------------
# Comparing forms: FLOPs plus sequential steps
# ----------------------------------------------------------------------------

# What one step of an iterative rank costs beyond its FLOPs, in FLOPs: the steps of a loop
# run one after another, each paying a fixed latency (a Python iteration of numpy calls,
# about 20 µs at a few GFLOP/s; a GPU's scan step, a synchronisation and a state round
# trip).  It is what makes a chunked form choose chunks of 16-128 rather than of one key.
STEP_FLOPS = 2 ** 17


def sequential_steps(defn: Definition) -> sympy.Expr:
    """The steps a definition runs one after another: the sizes of its iterative ranks."""
    return sympy.Add(*(size_symbol(r) for r in defn.iterative_ranks))


def at_sizes(defn: Definition, sizes: Mapping[str, float]) -> dict[str, float]:
    """``sizes`` extended with every ``let`` of ``defn`` it does not give (evaluated)."""
    known = dict(sizes)
    for let in defn.lets:
        if let.name not in known:
            value = sympy.sympify(let.value).subs({size_symbol(k): v for k, v in known.items()})
            if value.is_number:
                known[let.name] = float(value)
    return known


def form_cost(defn: Definition, sizes: Mapping[str, float]) -> float:
    """FLOPs plus ``STEP_FLOPS`` per sequential step, at ``sizes`` (argument ranks; lets
    follow): how the ``chunked`` pass compares a form with another and picks a chunk size."""
    known = {size_symbol(k): v for k, v in at_sizes(defn, sizes).items()}
    flops = sum((statement_flops(st) for st in defn.statements), sympy.Integer(0))
    total = flops + STEP_FLOPS * sequential_steps(defn)
    return float(sympy.sympify(total).subs(known))


def stored_elements(defn: Definition) -> sympy.Expr:
    """Elements of the intermediate tensors an Einsum-by-Einsum run keeps (outputs and
    arguments excluded; an iterative tensor keeps its ``I + 1`` steps): what a form stores,
    next to the live footprint that a fused one-pass loop would need."""
    outputs = {o.name for o in defn.outputs}
    seen: dict[str, sympy.Expr] = {}
    for st in defn.statements:
        if st.tensor in outputs or st.tensor in seen:
            continue
        steps = sympy.Integer(1)
        if isinstance(st, IterativeEinsum):
            steps = size_symbol(st.iter_rank) + 1
        seen[st.tensor] = steps * space_size(tuple(r for r in st.lhs
                                                   if not isinstance(st, IterativeEinsum)
                                                   or r != st.iter_rank))
    return sympy.expand(sympy.Add(*seen.values()))
