"""Frontends: ``.attn`` text -> Einsum IR (``parse``, ``parse_file``)."""
from __future__ import annotations

from pathlib import Path

from ..einsum_ir.diagnostics import Collector, Diagnostic, SpecError
from ..einsum_ir.ir import Module
from ..einsum_ir.schedule import check_schedules
from .lower import lower_file
from .parser import parse_syntax

__all__ = ["parse", "parse_file", "SpecError"]


def parse(text: str, filename: str = "<string>") -> Module:
    """Parse and check ``.attn`` source; raises :class:`SpecError` with every error of a phase."""
    errors = Collector({filename: text})
    tree = parse_syntax(text, filename, errors)
    errors.raise_if_any()
    module = lower_file(tree, errors)
    errors.raise_if_any()
    check_schedules(module, errors)
    errors.raise_if_any()
    return module


def parse_file(path: str | Path) -> Module:
    """Parse an ``.attn`` file; an unreadable file is a :class:`SpecError` too."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise _io_error(path, err) from None
    return parse(text, str(path))


def _io_error(path: Path, err: Exception) -> SpecError:
    reason = getattr(err, "strerror", None) or str(err)
    return SpecError([Diagnostic(f"cannot read {path}: {reason}")])
