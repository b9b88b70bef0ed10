"""User-facing errors: ``file:line:col: message``, the source line, a caret.

A phase collects every :class:`Diagnostic` it finds and raises them together
as one :class:`SpecError`.  Anything else that escapes is a compiler bug.  A lint
that may be intended is a warning: collected the same way, issued as a Python
:class:`SpecWarning` (``warnings.warn``) when the spec parses, printed by the CLI.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: importing diagnostics stays cheap (no sympy)
    from .ir import Loc


@dataclass(frozen=True)
class Diagnostic:
    message: str
    loc: Loc | None = None
    hint: str | None = None
    severity: str = "error"  # or "warning"

    def format(self, sources: dict[str, str] | None = None) -> str:
        kind = self.severity
        head = f"{self.loc}: {kind}: {self.message}" if self.loc else f"{kind}: {self.message}"
        lines = [head]
        text = (sources or {}).get(self.loc.file) if self.loc else None
        if text is not None and self.loc.line >= 1:
            src_lines = text.splitlines()
            if self.loc.line <= len(src_lines):
                src = src_lines[self.loc.line - 1].expandtabs(1)
                lines.append(f"  {src}")
                lines.append("  " + " " * max(self.loc.col - 1, 0) + "^")
        if self.hint:
            lines.append(f"  note: {self.hint}")
        return "\n".join(lines)


class SpecError(Exception):
    """One or more user mistakes in a spec (or in arguments to the compiler)."""

    def __init__(self, diagnostics: list[Diagnostic], sources: dict[str, str] | None = None):
        self.diagnostics = list(diagnostics)
        self.sources = dict(sources or {})
        super().__init__(self.format())

    def format(self) -> str:
        return "\n".join(d.format(self.sources) for d in self.diagnostics)


class SpecWarning(UserWarning):
    """A located lint of a spec (``str()`` is the formatted diagnostic with its caret)."""

    def __init__(self, diagnostic: Diagnostic, sources: dict[str, str] | None = None):
        self.diagnostic = diagnostic
        super().__init__(diagnostic.format(sources))


class Collector:
    """Accumulates the diagnostics of one phase; ``raise_if_any`` ends the phase."""

    def __init__(self, sources: dict[str, str] | None = None):
        self.diagnostics: list[Diagnostic] = []
        self.warnings: list[Diagnostic] = []
        self.sources = sources or {}

    def error(self, message: str, loc: Loc | None = None, hint: str | None = None) -> None:
        d = Diagnostic(message, loc, hint)
        if d not in self.diagnostics:
            self.diagnostics.append(d)

    def warning(self, message: str, loc: Loc | None = None, hint: str | None = None) -> None:
        d = Diagnostic(message, loc, hint, "warning")
        if d not in self.warnings:
            self.warnings.append(d)

    def issue_warnings(self) -> None:
        """Each warning as a :class:`SpecWarning`, in source order."""
        import warnings

        for d in sorted(self.warnings, key=_position):
            warnings.warn(SpecWarning(d, self.sources), stacklevel=2)

    def raise_if_any(self) -> None:
        if self.diagnostics:
            raise SpecError(sorted(self.diagnostics, key=_position), self.sources)


def _position(d: Diagnostic):
    return (d.loc.file, d.loc.line, d.loc.col) if d.loc else ("", 0, 0)
