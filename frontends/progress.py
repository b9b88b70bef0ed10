"""A status line on stderr for long work (compiling, building), only on a terminal.

Quiet when stderr is not a TTY (pipes, CI logs, pytest), so output stays deterministic.
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager


class Status:
    """One rewritable line: ``update(text)`` replaces it, ``close()`` erases it."""

    def __init__(self, stream=None, enabled: bool | None = None):
        self.stream = stream or sys.stderr
        self.enabled = _is_tty(self.stream) if enabled is None else enabled
        self.start = time.monotonic()
        self.width = 0

    def update(self, text: str) -> None:
        if not self.enabled:
            return
        line = f"attnc: {text} ({time.monotonic() - self.start:.0f}s)"
        self.stream.write("\r" + line.ljust(self.width))
        self.stream.flush()
        self.width = len(line)

    def close(self) -> None:
        if self.enabled and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0


@contextmanager
def status(text: str, stream=None, enabled: bool | None = None):
    """``with status("compiling x.attn") as s: ... s.update("after online")``."""
    line = Status(stream, enabled)
    line.update(text)
    try:
        yield line
    finally:
        line.close()


def _is_tty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
