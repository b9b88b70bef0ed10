"""``torch.compile(dynamic=True, fullgraph=True)`` of a generated Triton function: sizes
and lets stay symbolic (integer arithmetic, templates/common/sizes.py.jinja), so new
sequence lengths neither break the graph nor recompile it (Triton's interpreter, CPU)."""
from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import attnc  # noqa: E402
from attnc.einsum_ir.interpreter import interpret  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
LENGTHS = (7, 19, 33, 70)  # ceil(M/64) takes the values 1 and 2: the same kernel


@pytest.fixture
def dynamo():
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    yield counters
    torch._dynamo.reset()


def _causal(n):
    return torch.randn(2, n, 16), torch.randn(2, n, 16), torch.randn(2, n, 8)


def _gqa(n):  # H = 8 query heads over HK = 2 KV heads: let G = H / HK
    return torch.randn(3, 8, 1, 16), torch.randn(3, 2, n, 16), torch.randn(3, 2, n, 8)


def _run(fn, lengths, inputs=_causal, **params):
    return [(x, fn(*x, **params)) for x in map(inputs, lengths)]


@pytest.mark.parametrize("example, inputs", [("causal", _causal), ("gqa_decode", _gqa)])
def test_over_several_lengths_without_breaks_or_recompiles(example, inputs, dynamo, tmp_path,
                                                           monkeypatch):
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))
    mod = attnc.compile(EXAMPLES / f"{example}.attn", backend="triton")
    fn = getattr(mod, mod.spec.definitions[0].name)
    compiled = torch.compile(fn, dynamic=True, fullgraph=True)
    defn = mod.spec.definitions[0]
    for x, out in _run(compiled, LENGTHS, inputs, scale=0.25):
        want = interpret(defn, *(t.double().numpy() for t in x), scale=0.25)
        assert out.shape == want.shape
        assert torch.allclose(out.double(), torch.from_numpy(want), rtol=1e-4, atol=1e-5)
    assert dict(dynamo["graph_break"]) == {}
    assert dynamo["stats"]["unique_graphs"] == 1  # one graph for every length
    assert not dynamo["recompiles"]


def test_a_default_parameter_under_dynamic_shapes(dynamo, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))
    mod = attnc.compile(EXAMPLES / "causal.attn", backend="triton")
    _run(torch.compile(mod.causal_softmax, dynamic=True, fullgraph=True), LENGTHS[:2])
