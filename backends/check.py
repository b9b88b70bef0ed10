"""``attnc check``: run generated code on random inputs and compare with the interpreter."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..einsum_ir.interpreter import interpret
from ..einsum_ir.ir import Definition
from ..einsum_ir.sizes import evaluate_lets

# (smallest size, largest size, batch dims per argument: first argument, the others)
SHAPE_PLANS = (
    (1, 6, (), ()),
    (2, 11, (2,), (2,)),
    (3, 37, (2, 1), (3,)),
    (20, 90, (), ()),
)
TOLERANCE = 1e-9


@dataclass(frozen=True)
class CheckRow:
    definition: str
    output: str
    sizes: dict
    batch: tuple
    rel_error: float
    tolerance: float = TOLERANCE

    @property
    def ok(self) -> bool:
        return self.rel_error <= self.tolerance


def input_ranks(defn: Definition) -> list[str]:
    return list(dict.fromkeys(r for a in defn.tensor_args for r in a.ranks))


def random_sizes(defn: Definition, rng: np.random.Generator, lo: int, hi: int) -> dict[str, int]:
    """Sizes for the input ranks such that every ``let`` divides exactly."""
    for _ in range(500):
        sizes = {r: int(rng.integers(lo, hi + 1)) for r in input_ranks(defn)}
        try:
            evaluate_lets(defn, sizes)
            return sizes
        except ValueError:
            continue
    raise ValueError(f"{defn.name}: found no sizes in [{lo}, {hi}] for which every let divides")


def random_tensor(rng, shape, dtype: str | None) -> np.ndarray:
    if dtype in ("i32", "i64"):
        return rng.integers(0, 3, size=shape).astype(np.int32 if dtype == "i32" else np.int64)
    if dtype == "bool":
        return rng.random(shape) < 0.7
    return rng.standard_normal(shape)


def random_call(defn: Definition, rng, sizes: dict[str, int], first_batch=(), other_batch=()):
    """Positional arrays and keyword parameters for one call."""
    args = []
    for k, a in enumerate(defn.tensor_args):
        batch = first_batch if k == 0 else other_batch
        args.append(random_tensor(rng, tuple(batch) + tuple(sizes[r] for r in a.ranks), a.dtype))
    params = {p.name: float(rng.uniform(1.0, 4.0)) for p in defn.scalar_params if p.default is None}
    return args, params


def relative_error(got, want) -> float:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return float("inf")
    if not np.all(np.isfinite(got) == np.isfinite(want)):
        return float("inf")
    finite = np.isfinite(want)
    diff = np.linalg.norm((got - want)[finite])
    scale = np.linalg.norm(want[finite])
    return float(diff / scale) if scale > 0 else float(diff)


def torch_caller(fn, device: str):
    """Call a torch-based generated function (Triton, CUDA) on numpy arrays, in float32."""
    import torch

    def call(*args, **params):
        import warnings

        xs = [torch.from_numpy(np.asarray(a, dtype=np.float32) if np.asarray(a).dtype.kind == "f"
                               else np.asarray(a)).to(device) for a in args]
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")  # Triton's CPU interpreter computes masked lanes too
            out = fn(*xs, **params)
        if isinstance(out, tuple):
            return tuple(o.float().cpu().numpy() for o in out)
        return out.float().cpu().numpy()
    return call


def check_definition(defn: Definition, fn, seed: int = 0,
                     tolerance: float = TOLERANCE) -> list[CheckRow]:
    """Compare ``fn`` (generated) with the interpreter over the shape plans."""
    rng = np.random.default_rng(seed)
    rows = []
    for lo, hi, first, other in SHAPE_PLANS:
        sizes = random_sizes(defn, rng, lo, hi)
        args, params = random_call(defn, rng, sizes, first, other)
        want = interpret(defn, *args, **params)
        got = fn(*args, **params)
        if len(defn.outputs) == 1:
            want, got = (want,), (got,)
        batch = np.broadcast_shapes(tuple(first), tuple(other))
        for out, g, w in zip(defn.outputs, got, want):
            rows.append(CheckRow(defn.name, out.name, sizes, batch, relative_error(g, w), tolerance))
    return rows
