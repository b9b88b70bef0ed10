"""The reference interpreter: the living definition of the ``.attn`` semantics.

float64 throughout; every value is a pair ``(value, present)`` of arrays.  It
is deliberately plain (no fast paths, one batch element at a time) because it
is the oracle every pass and backend is compared with.

The three rules, as implemented here:

1. Input elements are present; a subscript outside its rank reads an absent
   element (:meth:`_Eval.access`).
2. A point is computed only if the ``where`` holds at that level and every
   element it reads is present; a reduction over a fiber with no computed
   point is absent; an iterative update not computed carries the state.
3. Absent output elements materialise as 0.

Evaluation: the iteration space of a statement is a grid with one axis per LHS
rank; a reduction appends one axis per reduced rank (a fresh axis, so a
reduction's variable shadows an outer use of the same rank) and removes them
again.  The ``where`` is applied at every level whose scope holds all of its
variables.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .exprs import free_ranks
from .ir import (Access, Binary, Call, Const, Definition, Expr, Index, IterativeEinsum,
                 Num, Param, Reduce, Size, Unary)
from .schedule import Loop, schedule
from .sizes import bind_sizes, param_values


@dataclass
class Value:
    val: np.ndarray
    present: np.ndarray


@dataclass(frozen=True)
class Axis:
    pos: int
    start: int
    extent: int


def _unary(fn: str, x: np.ndarray) -> np.ndarray:
    if fn == "exp":
        return np.exp(x)
    if fn == "exp2":
        return np.exp2(x)
    if fn == "log":
        return np.log(x)
    if fn == "log2":
        return np.log2(x)
    if fn == "sqrt":
        return np.sqrt(x)
    if fn == "rsqrt":
        return 1.0 / np.sqrt(x)
    if fn == "tanh":
        return np.tanh(x)
    if fn == "sigmoid":
        return 1.0 / (1.0 + np.exp(-x))
    if fn == "abs":
        return np.abs(x)
    if fn == "relu":
        return np.maximum(x, 0.0)
    raise NotImplementedError(fn)


def _binary(op: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    match op:
        case "+": return a + b
        case "-": return a - b
        case "*": return a * b
        case "/": return a / b
        case "**": return np.power(a, b)
        case "//": return np.floor_divide(a, b)
        case "%": return np.mod(a, b)  # floor modulo, as Python's
        case "<": return (a < b).astype(np.float64)
        case "<=": return (a <= b).astype(np.float64)
        case ">": return (a > b).astype(np.float64)
        case ">=": return (a >= b).astype(np.float64)
        case "==": return (a == b).astype(np.float64)
        case "!=": return (a != b).astype(np.float64)
        case "and": return ((a != 0) & (b != 0)).astype(np.float64)
        case "or": return ((a != 0) | (b != 0)).astype(np.float64)
    raise NotImplementedError(op)


class _Eval:
    """Evaluates the expressions of one statement over its grid."""

    def __init__(self, defn, sizes, params, store, where):
        self.defn, self.sizes, self.params, self.store, self.where = defn, sizes, params, store, where

    def grid(self, axes: dict[str, Axis]) -> int:
        return max((a.pos for a in axes.values()), default=-1) + 1

    def lift(self, x, nd: int) -> np.ndarray:
        x = np.asarray(x)
        return x.reshape(x.shape + (1,) * (nd - x.ndim))

    def filter_at(self, axes: dict[str, Axis], nd: int) -> np.ndarray | None:
        """The where-mask at a level with these axes, if all its variables are in scope.

        A reduction inside the ``where`` itself is not filtered by it (that would
        be circular): the condition is evaluated by a where-less evaluator.
        """
        if self.where is None or not free_ranks(self.where) <= set(axes):
            return None
        plain = _Eval(self.defn, self.sizes, self.params, self.store, None)
        c = plain.eval(self.where, axes)
        return self.lift(c.present & (c.val != 0), nd)

    def eval(self, e: Expr, axes: dict[str, Axis]) -> Value:
        nd = self.grid(axes)
        ones = np.ones((1,) * nd, dtype=bool)
        if isinstance(e, Num):
            return Value(self.lift(float(e.value), nd), ones)
        if isinstance(e, Const):
            return Value(self.lift(np.inf if e.name == "inf" else np.pi, nd), ones)
        if isinstance(e, Size):
            return Value(self.lift(float(self.sizes[e.rank]), nd), ones)
        if isinstance(e, Param):
            return Value(self.lift(self.params[e.name], nd), ones)
        if isinstance(e, Index):
            a = axes[e.rank]
            shape = [1] * nd
            shape[a.pos] = a.extent
            return Value(np.arange(a.start, a.start + a.extent, dtype=np.float64).reshape(shape), ones)
        if isinstance(e, Access):
            return self.access(e, axes)
        if isinstance(e, Unary):
            x = self.eval(e.operand, axes)
            val = -x.val if e.op == "-" else (x.val == 0).astype(np.float64)
            return Value(val, x.present)
        if isinstance(e, Binary):
            a, b = self.eval(e.left, axes), self.eval(e.right, axes)
            return Value(_binary(e.op, a.val, b.val), a.present & b.present)
        if isinstance(e, Call):
            return self.call(e, axes)
        if isinstance(e, Reduce):
            return self.reduce(e, axes)
        raise TypeError(e)

    def call(self, e: Call, axes) -> Value:
        args = [self.eval(a, axes) for a in e.args]
        present = args[0].present
        for a in args[1:]:
            present = present & a.present
        if e.fn == "select":
            return Value(np.where(args[0].val != 0, args[1].val, args[2].val), present)
        if e.fn in ("max", "min") and len(args) == 2:
            f = np.maximum if e.fn == "max" else np.minimum
            return Value(f(args[0].val, args[1].val), present)
        return Value(_unary(e.fn, args[0].val), present)

    def access(self, e: Access, axes) -> Value:
        nd = self.grid(axes)
        stored = self.store[e.tensor]
        if not e.subscripts:
            return Value(self.lift(stored.val, nd), self.lift(stored.present, nd))
        subs = [self.eval(s, axes) for s in e.subscripts]
        idx = np.broadcast_arrays(*(s.val.astype(np.int64) for s in subs))
        inside = np.ones(idx[0].shape, dtype=bool)
        for s in subs:  # absent where an index element read is, or where a subscript has no
            inside = inside & s.present & np.isfinite(s.val)  # value (// or % by a zero size)
        clipped = []
        for i, n in zip(idx, stored.val.shape):
            inside &= (i >= 0) & (i < n)
            clipped.append(np.clip(i, 0, max(n - 1, 0)))
        if any(n == 0 for n in stored.val.shape):
            return Value(np.zeros(idx[0].shape), np.zeros(idx[0].shape, dtype=bool))
        val = stored.val[tuple(clipped)]
        present = stored.present[tuple(clipped)] & inside
        return Value(val, present)

    def reduce(self, e: Reduce, axes) -> Value:
        nd = self.grid(axes)
        inner = dict(axes)
        for k, r in enumerate(e.ranks):
            inner[r] = Axis(nd + k, 0, self.sizes[r])
        full = (1,) * nd + tuple(self.sizes[r] for r in e.ranks)
        body = self.eval(e.body, inner)
        mask = np.broadcast_to(body.present, np.broadcast_shapes(body.present.shape, body.val.shape, full))
        flt = self.filter_at(inner, nd + len(e.ranks))
        if flt is not None:
            mask = mask & flt
        val = np.broadcast_to(body.val, mask.shape)
        red = tuple(range(nd, nd + len(e.ranks)))
        present = mask.any(axis=red)
        if e.op == "sum":
            out = np.where(mask, val, 0.0).sum(axis=red)
        elif e.op == "max":
            out = np.where(mask, val, -np.inf).max(axis=red, initial=-np.inf)
        else:
            out = np.where(mask, val, np.inf).min(axis=red, initial=np.inf)
        return Value(np.where(present, out, 0.0), present)


class Interpreter:
    """Runs one definition on core-shaped float64 inputs (no batch dims)."""

    def __init__(self, defn: Definition):
        self.defn = defn
        self.steps = schedule(defn)

    def _allocate(self, sizes) -> dict[str, Value]:
        store: dict[str, Value] = {}
        iterative = self.defn.iterative_tensors
        for st in self.defn.statements:
            shape = tuple(sizes[r] + (1 if iterative.get(st.tensor) == r else 0) for r in st.lhs)
            store.setdefault(st.tensor, Value(np.zeros(shape), np.zeros(shape, dtype=bool)))
        return store

    def run(self, inputs: dict[str, np.ndarray], params: dict[str, float] | None = None,
            sizes: dict[str, int] | None = None) -> dict[str, Value]:
        """Evaluate every tensor; returns name -> Value (inputs included)."""
        if sizes is None:
            sizes = bind_sizes(self.defn, {k: np.shape(v) for k, v in inputs.items()})
        params = param_values(self.defn, sizes, params or {})
        store = self._allocate(sizes)
        for arg in self.defn.tensor_args:
            a = np.asarray(inputs[arg.name], dtype=np.float64)
            store[arg.name] = Value(a, np.ones(a.shape, dtype=bool))
        with np.errstate(all="ignore"):
            for step in self.steps:
                if isinstance(step, Loop):
                    for i in range(sizes[step.rank]):
                        for st in step.body:
                            self._statement(st, sizes, params, store, (step.rank, i))
                else:
                    self._statement(step, sizes, params, store)
        return store

    def _statement(self, st, sizes, params, store, step: tuple[str, int] | None = None) -> None:
        """Evaluate ``st`` over its grid; inside a loop, ``step`` is (loop rank, i)."""
        ev = _Eval(self.defn, sizes, params, store, st.where)
        axes: dict[str, Axis] = {}
        for r in st.lhs:
            if isinstance(st, IterativeEinsum) and st.init and r == st.iter_rank:
                continue
            if step is not None and r == step[0]:
                axes[r] = Axis(len(axes), step[1], 1)
            else:
                axes[r] = Axis(len(axes), 0, sizes[r])
        nd = len(axes)
        shape = tuple(a.extent for a in axes.values())
        out = ev.eval(st.expr, axes)
        present = np.broadcast_to(out.present, np.broadcast_shapes(out.present.shape, out.val.shape, shape))
        flt = ev.filter_at(axes, nd)
        if flt is not None:
            present = present & flt
        val = np.broadcast_to(out.val, present.shape)
        self._write(st, store[st.tensor], val, present, step)

    def _write(self, st, target: Value, val, present, step: tuple[str, int] | None) -> None:
        if not isinstance(st, IterativeEinsum):
            if step is None:
                target.val[...] = np.where(present, val, 0.0)
                target.present[...] = present
                return
            rank, i = step
            sl = (slice(None),) * st.lhs.index(rank) + (slice(i, i + 1),)
            target.val[sl] = np.where(present, val, 0.0)
            target.present[sl] = present
            return
        pos = st.iter_pos
        if st.init:
            sl = (slice(None),) * pos + (0,)
            target.val[sl] = np.where(present, val, 0.0)
            target.present[sl] = present
            return
        i = step[1]
        before = (slice(None),) * pos + (slice(i, i + 1),)
        after = (slice(None),) * pos + (slice(i + 1, i + 2),)
        target.val[after] = np.where(present, val, target.val[before])
        target.present[after] = present | target.present[before]


def _batch_split(defn: Definition, args: list) -> tuple[tuple[int, ...], dict[str, np.ndarray]]:
    arrays = {}
    batches = []
    for arg, x in zip(defn.tensor_args, args):
        x = np.asarray(x)
        if x.ndim < len(arg.ranks):
            raise ValueError(f"argument '{arg.name}' needs at least {len(arg.ranks)} dims "
                             f"[{','.join(arg.ranks)}], got shape {x.shape}")
        arrays[arg.name] = x
        batches.append(x.shape[: x.ndim - len(arg.ranks)])
    try:
        batch = np.broadcast_shapes(*batches) if batches else ()
    except ValueError:
        shown = ", ".join(f"'{a.name}' {b}" for a, b in zip(defn.tensor_args, batches))
        raise ValueError(f"{defn.name}: leading (batch) dims do not broadcast: {shown}") from None
    return batch, arrays


def _core(defn: Definition, arrays: dict[str, np.ndarray], batch, b) -> dict[str, np.ndarray]:
    """The core-shaped slices of the inputs at batch index ``b`` (broadcast like numpy)."""
    core = {}
    for arg in defn.tensor_args:
        x = arrays[arg.name]
        nb = x.ndim - len(arg.ranks)
        full = np.broadcast_to(x, batch[len(batch) - nb:] + x.shape[nb:])
        core[arg.name] = full[b[len(batch) - nb:]] if nb else x
    return core


def interpret(defn: Definition, *args, **params):
    """Run ``defn`` like the generated function: batch dims broadcast; float64 results."""
    if len(args) != len(defn.tensor_args):
        raise TypeError(f"{defn.name} takes {len(defn.tensor_args)} tensors, got {len(args)}")
    batch, arrays = _batch_split(defn, list(args))
    core_shapes = {a.name: arrays[a.name].shape[arrays[a.name].ndim - len(a.ranks):]
                   for a in defn.tensor_args}
    sizes = bind_sizes(defn, core_shapes)  # checks core sizes even when the batch is empty
    param_values(defn, sizes, params)  # checks parameters even when the batch is empty
    interp = Interpreter(defn)
    results: list[list[np.ndarray]] = [[] for _ in defn.outputs]
    for b in np.ndindex(*batch):
        store = interp.run(_core(defn, arrays, batch, b), params, sizes)
        for k, out in enumerate(defn.outputs):
            v = store[out.name]
            results[k].append(np.where(v.present, v.val, 0.0))
    outs = []
    for k, out in enumerate(defn.outputs):
        core = tuple(sizes[r] for r in out.ranks)
        stacked = np.stack(results[k]) if results[k] else np.zeros((0,) + core)
        outs.append(stacked.reshape(batch + core))
    return outs[0] if len(outs) == 1 else tuple(outs)
