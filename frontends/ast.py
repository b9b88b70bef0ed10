"""The surface syntax tree: what the grammar says, names not yet resolved.

``frontends.lower`` checks it and turns it into the Einsum IR.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from ..einsum_ir.ir import Loc


@dataclass(frozen=True)
class Name:
    name: str
    loc: Loc


@dataclass(frozen=True)
class Number:
    value: int | float
    loc: Loc


@dataclass(frozen=True)
class AccessExpr:
    name: Name
    subscripts: tuple["SExpr", ...]
    loc: Loc


@dataclass(frozen=True)
class CallExpr:
    fn: Name
    args: tuple["SExpr", ...]
    loc: Loc


@dataclass(frozen=True)
class ReduceExpr:
    op: Name
    ranks: tuple["SExpr", ...]  # each must be a plain Name (checked in lowering)
    body: "SExpr"
    loc: Loc


@dataclass(frozen=True)
class UnaryExpr:
    op: str
    operand: "SExpr"
    loc: Loc


@dataclass(frozen=True)
class BinaryExpr:
    op: str
    left: "SExpr"
    right: "SExpr"
    loc: Loc


@dataclass(frozen=True)
class CompareExpr:
    ops: tuple[str, ...]
    operands: tuple["SExpr", ...]
    loc: Loc


SExpr = Union[Name, Number, AccessExpr, CallExpr, ReduceExpr, UnaryExpr, BinaryExpr, CompareExpr]


@dataclass(frozen=True)
class TensorParamDecl:
    name: Name
    dims: tuple[Name, ...]
    dtype: Name | None
    loc: Loc


@dataclass(frozen=True)
class ScalarParamDecl:
    name: Name
    dtype: Name | None
    default: SExpr | None
    loc: Loc


@dataclass(frozen=True)
class OutputDecl:
    name: Name
    dims: tuple[Name, ...]
    dtype: Name | None
    loc: Loc


@dataclass(frozen=True)
class LetStmt:
    name: Name
    value: SExpr
    loc: Loc


@dataclass(frozen=True)
class EinsumStmt:
    tensor: Name
    subscripts: tuple[SExpr, ...]
    expr: SExpr
    where: SExpr | None
    loc: Loc


@dataclass(frozen=True)
class DefinitionDecl:
    name: Name
    params: tuple[TensorParamDecl | ScalarParamDecl, ...]
    outputs: tuple[OutputDecl, ...]
    body: tuple[LetStmt | EinsumStmt, ...]
    loc: Loc


@dataclass(frozen=True)
class FileDecl:
    definitions: tuple[DefinitionDecl, ...]
