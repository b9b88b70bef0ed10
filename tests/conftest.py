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


# A cascade that stays 2-pass (the second traversal is masked, the first is not, so the
# stream-final pass must not fold it): the kernel backends decline it with a reason.
TWO_PASS = """
attention two_pass(Q[P,E], K[M,E], V[M,F]) -> AV[P,F] {
  let M0 = 16
  let M1 = ceil(M / M0)
  BK[m1,m0,e]  = K[m1*M0 + m0, e]
  BV[m1,m0,f]  = V[m1*M0 + m0, f]
  RM[0,p]      = -inf
  RD[0,p]      = 0
  BQK[m1,m0,p] = Q[p,e] * BK[m1,m0,e]
  LM[m1,p]     = max[m0](BQK[m1,m0,p])
  RM[m1+1,p]   = max(RM[m1,p], LM[m1,p])
  SLD[m1,p]    = sum[m0](exp(BQK[m1,m0,p] - RM[m1+1,p]))
  RD[m1+1,p]   = SLD[m1,p] + RD[m1,p] * exp(RM[m1,p] - RM[m1+1,p])
  A[m1,m0,p]   = exp(BQK[m1,m0,p] - RM[M1,p]) / RD[M1,p]   where m1*M0 + m0 <= p + M - P
  AV[p,f]      = sum[m1,m0](A[m1,m0,p] * BV[m1,m0,f])
}
"""


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


@pytest.hookimpl(tryfirst=True)  # before xdist's loadgroup reads the groups
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (``-n``), the tests that share an expensive module-scoped fixture
    (every example compiled by nvcc, every kernel compiled for sm_90) run on one worker, so
    the fixture is built once; the others spread over the workers (``--dist loadgroup``)."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None:
            continue
        shared = sorted(name for name, defs in info.name2fixturedefs.items()
                        if defs and defs[-1].scope == "module")
        if shared:
            item.add_marker(pytest.mark.xdist_group(f"{item.module.__name__}:{shared[0]}"))


@pytest.fixture
def backend_env(request, monkeypatch, tmp_path_factory):
    """A kernel backend on the CPU (parametrize indirectly with "triton" or "cuda"): Triton
    under its interpreter, CUDA as host C++ with its own library cache; no variant forced."""
    import shutil

    backend = request.param
    if backend == "triton":
        pytest.importorskip("triton")  # (TRITON_INTERPRET=1 is set above for every test)
    else:
        if not (shutil.which("g++") or shutil.which("c++")):
            pytest.skip("no C++ compiler for the CUDA host emulation")
        monkeypatch.setenv("ATTNC_CUDA_EMULATE", "1")
        monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path_factory.mktemp("cuda_cache")))
    for var in ("ATTNC_SPLIT", "ATTNC_STREAM_K"):
        monkeypatch.delenv(var, raising=False)
    return backend
