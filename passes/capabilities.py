"""What the kernel backends (Triton, CUDA) cannot compile yet, found before they render.

Both now gather indirect subscripts (``KC[PT[b, m // PG], m % PG, e]``: the index
tensor's elements for the tile, then the addressed rows, each masked so that an absent
index element, or one that addresses no row, reads an absent element) and compute ``%``
and ``//`` in subscripts as floor operations; see :mod:`attnc.backends.kernel_common`.
:data:`LIMITS` lists, per backend, the kinds of subscript it still lacks (none today); a
cascade using one is refused naming the access, where it is written and what is missing,
rather than miscompiled.  Indirect reads the kernels cannot express for other reasons
(a computed tensor read at an index, ``A[b, t - CU[b], f]``) are refused by the tile
stages with their own reasons.
"""
from __future__ import annotations

from ..einsum_ir.exprs import walk
from ..einsum_ir.ir import Access, Binary, Definition
from ..einsum_ir.printer import print_expr

# backend -> {kind of subscript: what the backend lacks}; kinds: "indirect", "modulo"
LIMITS: dict[str, dict[str, str]] = {"triton": {}, "cuda": {}}
_WHAT = {"indirect": "indirect subscript", "modulo": "'%' subscript"}


def subscript_kind(access: Access) -> str | None:
    """``indirect`` when a subscript of ``access`` reads an index tensor, ``modulo`` when
    one uses ``%``, else None."""
    inner = [n for s in access.subscripts for n in walk(s)]
    if any(isinstance(n, Access) for n in inner):
        return "indirect"
    if any(isinstance(n, Binary) and n.op == "%" for n in inner):
        return "modulo"
    return None


def unsupported_subscript(defn: Definition, backend: str | None = None
                          ) -> tuple[Access, str, str] | None:
    """The first access of ``defn`` with a subscript ``backend`` cannot compile: (access,
    what it is, what the backend lacks); ``backend`` None: any kernel backend."""
    limits = LIMITS.get(backend, {}) if backend else {k: v for d in LIMITS.values()
                                                     for k, v in d.items()}
    for st in defn.statements:
        for part in (st.expr, st.where):
            for node in walk(part) if part is not None else ():
                kind = subscript_kind(node) if isinstance(node, Access) else None
                if kind in limits:
                    return node, _WHAT[kind], limits[kind]
    return None


def refuse_unsupported_subscripts(module, backend: str, error: type[Exception]) -> None:
    """Raise ``error`` for the first subscript in ``module`` that ``backend`` cannot
    compile: a Module, or a kernel module whose programs carry the cascade they were
    lowered from."""
    definitions = getattr(module, "definitions", None)
    if definitions is None:
        definitions = [p.cascade for p in module.programs]
    for defn in definitions:
        found = unsupported_subscript(defn, backend)
        if found is not None:
            access, what, lack = found
            where = f" at {access.loc}" if access.loc is not None else ""
            raise error(f"{what} {print_expr(access)}{where}: the {backend} backend {lack}; "
                        f"use --backend numpy")
