"""What the kernel backends (Triton, CUDA) cannot compile yet, found before they render.

Their loads compute addresses from affine subscripts.  An indirect subscript (an index
tensor's element used as a number, ``KC[PT[b, m // PG], m % PG, e]``) needs a gather, and
``%`` needs floor-modulo arithmetic (C's and Triton's ``%`` truncate toward zero), neither
of which they emit yet.  They refuse such a cascade, naming the access and where it is
written, rather than miscompile it; the numpy backends compile it exactly.
"""
from __future__ import annotations

from ..einsum_ir.exprs import walk
from ..einsum_ir.ir import Access, Binary, Definition
from ..einsum_ir.printer import print_expr


def unsupported_subscript(defn: Definition) -> tuple[Access, str, str] | None:
    """The first access of ``defn`` with an indirect or ``%`` subscript: (access, what it
    is, what the kernel backends lack)."""
    for st in defn.statements:
        for part in (st.expr, st.where):
            for node in walk(part) if part is not None else ():
                if not isinstance(node, Access):
                    continue
                inner = [n for s in node.subscripts for n in walk(s)]
                if any(isinstance(n, Access) for n in inner):
                    return node, "indirect subscript", "does not gather yet"
                if any(isinstance(n, Binary) and n.op == "%" for n in inner):
                    return node, "'%' subscript", "does not compute floor modulo yet"
    return None


def refuse_unsupported_subscripts(module, backend: str, error: type[Exception]) -> None:
    """Raise ``error`` for the first unsupported subscript in ``module``: a Module, or a
    kernel module whose programs carry the cascade they were lowered from."""
    definitions = getattr(module, "definitions", None)
    if definitions is None:
        definitions = [p.cascade for p in module.programs]
    for defn in definitions:
        found = unsupported_subscript(defn)
        if found is not None:
            access, what, lack = found
            where = f" at {access.loc}" if access.loc is not None else ""
            raise error(f"{what} {print_expr(access)}{where}: the {backend} backend {lack}; "
                        f"use --backend numpy")
