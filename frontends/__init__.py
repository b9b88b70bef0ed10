"""Frontends: ``.attn`` text -> Einsum IR (``parse``, ``parse_file``)."""
from __future__ import annotations

from pathlib import Path

from typing import TYPE_CHECKING

from ..einsum_ir.diagnostics import Collector, Diagnostic, SpecError, SpecWarning

if TYPE_CHECKING:
    from ..einsum_ir.ir import Module

__all__ = ["parse", "parse_file", "SpecError", "SpecWarning"]


def parse(text: str, filename: str = "<string>") -> Module:
    """Parse and check ``.attn`` source; raises :class:`SpecError` with every error of a phase."""
    from .limits import recursion_room

    with recursion_room():  # a UTF-8 byte-order mark is white space
        return _parse(text.removeprefix("\ufeff"), filename)


def _parse(text: str, filename: str) -> Module:
    # the parser, the lowering and sympy load on the first parse, not with the package:
    # attnc.compile imports a cached module without them
    from ..einsum_ir.schedule import check_schedules
    from .lower import lower_file
    from .parser import parse_syntax

    errors = Collector({filename: text})
    tree = parse_syntax(text, filename, errors)
    errors.raise_if_any()
    module = lower_file(tree, errors)
    errors.raise_if_any()
    check_schedules(module, errors)
    errors.raise_if_any()
    errors.issue_warnings()
    return module


def parse_file(path: str | Path) -> Module:
    """Parse an ``.attn`` file; an unreadable file is a :class:`SpecError` too."""
    return parse(read_spec(path), str(path))


def read_spec(path: str | Path) -> str:
    """An ``.attn`` file's text; unreadable or not UTF-8, a located :class:`SpecError`."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise _io_error(path, err) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _decode_error(path, data, err) from None


def _decode_error(path: Path, data: bytes, err: UnicodeDecodeError) -> SpecError:
    """Where the first byte that is not UTF-8 sits (columns count characters before it)."""
    from ..einsum_ir.ir import Loc

    before = data[:err.start]
    line_start = before.rfind(b"\n") + 1
    col = len(before[line_start:].decode("utf-8", "replace")) + 1
    loc = Loc(str(path), before.count(b"\n") + 1, col)
    return SpecError([Diagnostic(f"not UTF-8: byte 0x{data[err.start]:02x} cannot start a "
                                 f"character here", loc, "save the file as UTF-8")])


def _io_error(path: Path, err: Exception) -> SpecError:
    reason = getattr(err, "strerror", None) or str(err)
    return SpecError([Diagnostic(f"cannot read {path}: {reason}")])
