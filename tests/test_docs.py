"""Every documented command runs: the README's and docs/*.md's code blocks.

A ``sh`` block's ``attnc ...`` commands (also after ``&&``, and ``$ attnc ...`` lines of a
plain block, whose other lines are shown output) run through the CLI in-process and must
exit 0; a ``python`` block runs as a script.  The blocks of one document run in order in
one scratch folder that sees ``examples/`` (so the README's ``-o build`` feeds its Python
block).  A block whose info string says ``no-run`` (```` ```sh no-run ````) is shown only:
a block that needs a GPU or minutes.  Other commands (``pip``, ``pytest``, the fuzzers) are
CI's own steps.
"""
from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.M | re.S)


def blocks(path: Path) -> list[tuple[str, str, int]]:
    """(kind, code, line) of each runnable block: kind "sh" (the attnc commands, one a
    line) or "python"."""
    text = path.read_text()
    out = []
    for m in FENCE.finditer(text):
        info, body = m.group(1).split(), m.group(2)
        line = text.count("\n", 0, m.start()) + 1
        if "no-run" in info:
            continue
        if info[:1] == ["python"]:
            out.append(("python", body, line))
        elif info[:1] in (["sh"], ["bash"], []):
            commands = attnc_commands(body, prompt_only=not info)
            if commands:
                out.append(("sh", "\n".join(commands), line))
    return out


def attnc_commands(body: str, prompt_only: bool) -> list[str]:
    """The ``attnc`` commands of a shell block (``prompt_only``: the ``$ `` lines only)."""
    commands = []
    for raw in body.splitlines():
        line = raw.strip()
        if prompt_only and not line.startswith("$ "):
            continue
        line = line.removeprefix("$ ")
        for part in line.split("&&"):
            words = shlex.split(part, comments=True)
            if words[:1] == ["attnc"]:
                commands.append(shlex.join(words))
    return commands


# one worker, in order: a document's blocks build on each other (the README's python block
# imports the module its sh block wrote)
pytestmark = pytest.mark.xdist_group("docs")

CASES = [pytest.param(doc, i, id=f"{doc.relative_to(ROOT)}:{line}")
         for doc in DOCUMENTS for i, (_, _, line) in enumerate(blocks(doc))]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """One folder per document, made on its first block."""
    made = {}

    def folder(doc: Path) -> Path:
        if doc not in made:
            made[doc] = tmp_path_factory.mktemp(doc.stem)
            (made[doc] / "examples").symlink_to(ROOT / "examples")
        return made[doc]
    return folder


def test_documents_have_runnable_blocks():
    assert len(blocks(ROOT / "README.md")) >= 4


@pytest.mark.parametrize("doc, index", CASES)
def test_documented_block_runs(doc, index, scratch, monkeypatch, capsys, tmp_path):
    from attnc.frontends.cli import main

    kind, code, line = blocks(doc)[index]
    monkeypatch.chdir(scratch(doc))
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("ATTNC_CUDA_EMULATE", "1")
    if kind == "python":
        monkeypatch.setattr(sys, "path", list(sys.path))  # a block may add "build"
        before = set(sys.modules)
        try:
            exec(compile(code, f"{doc.name}:{line}", "exec"), {"__name__": "__main__"})
        finally:
            for name in set(sys.modules) - before:  # the block's generated modules
                if not name.startswith(("attnc", "torch", "triton", "numpy", "sympy")):
                    sys.modules.pop(name)
        return
    for command in code.splitlines():
        rc = main(shlex.split(command)[1:])
        assert rc == 0, f"{doc.name}:{line}: `{command}` exited {rc}:\n{capsys.readouterr().err}"
