"""Shared fixtures: golden files (``--update-golden`` refreshes them)."""
from __future__ import annotations

import os
from pathlib import Path

# The Triton backend is tested on CPU tensors through Triton's interpreter; the
# variable must be set before triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
GOLDEN = Path(__file__).resolve().parent / "golden"

settings.register_profile("ci", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=30, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite golden files instead of comparing with them")


def all_examples() -> list[Path]:
    return sorted(EXAMPLES.rglob("*.attn"))


@pytest.fixture
def golden(request):
    """``golden(text, name=None)`` compares with tests/golden/<module>/<test>[-name].txt."""
    update = request.config.getoption("--update-golden")
    module = Path(request.node.fspath).stem
    test = request.node.name.replace("/", "_").replace("[", "-").replace("]", "")

    def check(text: str, name: str | None = None) -> None:
        path = GOLDEN / module / (f"{test}-{name}.txt" if name else f"{test}.txt")
        if update or not path.exists():
            if not update and os.environ.get("CI"):
                pytest.fail(f"golden file {path} is missing (run pytest --update-golden)")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            return
        expected = path.read_text()
        assert text == expected, f"output differs from {path} (run pytest --update-golden if intended)"

    return check
