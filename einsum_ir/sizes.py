"""Binding rank sizes and scalar parameters at a call (shared by the interpreter and tools)."""
from __future__ import annotations

import numpy as np
import sympy

from .ir import Definition, size_symbol
from .printer import print_size


def evaluate_lets(defn: Definition, sizes: dict[str, int]) -> dict[str, int]:
    """Extend argument sizes with every ``let``; a let must come out a whole number."""
    out = dict(sizes)
    for let in defn.lets:
        text = f"let {let.name} = {print_size(let.value)}"
        value = sympy.nsimplify(let.value.subs({size_symbol(k): v for k, v in out.items()}))
        if not (value.is_number and value.is_integer):
            if value.is_number and value.is_rational:
                raise ValueError(
                    f"{text}: does not divide exactly at "
                    + ", ".join(f"{k}={v}" for k, v in out.items() if size_symbol(k) in let.value.free_symbols))
            raise ValueError(f"{text} is not a whole number ({value})")
        if value < 0:
            raise ValueError(f"{text} is negative ({value})")
        out[let.name] = int(value)
    return out


def bind_sizes(defn: Definition, core_shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Sizes of every rank from the arguments' core shapes; ValueError names the bad argument."""
    sizes: dict[str, int] = {}
    source: dict[str, str] = {}
    for arg in defn.tensor_args:
        shape = tuple(core_shapes[arg.name])
        if len(shape) != len(arg.ranks):
            raise ValueError(f"argument '{arg.name}' has {len(shape)} core dims, expected "
                             f"{len(arg.ranks)} [{','.join(arg.ranks)}]")
        for rank, n in zip(arg.ranks, shape):
            if rank in sizes and sizes[rank] != n:
                raise ValueError(f"argument '{arg.name}': rank {rank} has size {n} but "
                                 f"'{source[rank]}' gives {sizes[rank]}")
            sizes.setdefault(rank, int(n))
            source.setdefault(rank, arg.name)
    return evaluate_lets(defn, sizes)


def param_values(defn: Definition, sizes: dict[str, int], given: dict[str, float]) -> dict[str, float]:
    """Scalar parameters: given values, else declared defaults evaluated at ``sizes``."""
    unknown = set(given) - {p.name for p in defn.scalar_params}
    if unknown:
        raise TypeError(f"unknown parameter(s): {', '.join(sorted(unknown))}")
    out = {}
    for p in defn.scalar_params:
        if p.name in given:
            out[p.name] = float(given[p.name])
        elif p.default is not None:
            out[p.name] = _default_value(p.default, sizes)
        else:
            raise TypeError(f"missing required parameter '{p.name}'")
    return out


def _default_value(default: sympy.Expr, sizes: dict[str, int]) -> float:
    """A default evaluated exactly; where that is not a finite real (``-log(M)`` at M = 0,
    ``1/sqrt(E)`` at E = 0) it takes IEEE float semantics, as generated code would."""
    exact = default.subs({size_symbol(k): v for k, v in sizes.items()})
    if exact.is_real and exact.is_finite:
        return float(exact)
    symbols = sorted(default.free_symbols, key=str)
    fn = sympy.lambdify(symbols, default, modules="numpy")
    with np.errstate(all="ignore"):
        return float(fn(*(np.float64(sizes[str(s)]) for s in symbols)))
