"""attnc's retention, gated linear attention and RWKV against flash-linear-attention's own
Triton kernels, an outside reference (the optional ``fla`` extra: ``pip install -e '.[fla]'``).

The references run under ``TRITON_INTERPRET=1`` at small sizes.  fla-core 0.6's chunked
kernels (``chunk_retention``, ``chunk_simple_gla``) do not run under Triton's interpreter
(``chunk_h.py`` calls ``.to`` on a loop counter, a Python int there), so the references are
its ``fused_recurrent_*`` kernels (the state recurrence, token by token) and, for retention
and simple GLA, its ``parallel_*`` kernels (the quadratic form) too.  attnc runs the
examples in their chunked form (chunks of 16 over ragged lengths) on numpy and through the
Triton interpreter.  Layouts: fla's ``[B, T, H, K]``; attnc's batch dims lead
(``Q[B,H,P,E]``), so heads move before time.  Conventions matched: fla scales queries by
``K ** -0.5`` unless ``scale=`` says otherwise (here 1); fla's retention decays head ``h``
by ``1 - 2 ** (-5 - h)`` (attnc's ``gamma`` per head); its gates are log-gates, as
``LG[m]`` is; RWKV-6's data-dependent log-decay ``w[t]`` is ``-exp(WD)`` at every step for
attnc's RWKV-4-style example, with its bonus ``u = U``.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

pytest.importorskip("triton")
torch = pytest.importorskip("torch")
pytest.importorskip("einops")  # fla-core imports it without declaring it
pytest.importorskip("fla")

from test_chunked_kernels import _module  # noqa: E402

B, H, T, K, V = 2, 2, 37, 8, 8


@pytest.fixture(autouse=True)
def _interpreted_autotune(monkeypatch):
    """fla's kernels are autotuned; the interpreter has no device to time configurations
    on, so every configuration ties and the first runs."""
    import triton.runtime.autotuner as autotuner

    monkeypatch.setattr(autotuner.Autotuner, "_bench", lambda self, *a, **k: [1.0, 1.0, 1.0])
    warnings.simplefilter("ignore")


def _attnc(name: str, backend: str, tmp_path):
    return _module(name, 16, backend, tmp_path)[0]


def _run(fn, backend: str, *args, **params):
    """``fn`` on float32 arrays (numpy) or tensors (Triton), as a float64 tensor."""
    if backend == "numpy":
        return torch.from_numpy(np.asarray(fn(*(a.double().numpy() for a in args), **params)))
    return fn(*(a.float() for a in args), **params).double()


def _heads_first(x):
    return x.transpose(1, 2)  # [B, T, H, ...] -> [B, H, T, ...]


def _qkv(seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, H, K, generator=g), torch.randn(B, T, H, K, generator=g),
            torch.randn(B, T, H, V, generator=g))


def _close(got, want):
    want = want.double()
    scale = want.abs().max()
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-4 * scale, float((got - want).abs().max() / scale)


@pytest.mark.parametrize("backend", ["numpy", "triton"])
def test_retention_matches_fla(backend, tmp_path):
    from fla.ops.retention import fused_recurrent_retention, parallel_retention

    fn = _attnc("retention", backend, tmp_path)
    q, k, v = _qkv(0)
    heads = [_run(fn, backend, _heads_first(q)[:, h], _heads_first(k)[:, h],
                  _heads_first(v)[:, h], gamma=1 - 2.0 ** (-5 - h)) for h in range(H)]
    got = torch.stack(heads, dim=2)  # [B, T, H, V]
    _close(got, fused_recurrent_retention(q, k, v, scale=1.0)[0])
    _close(got, parallel_retention(q, k, v, scale=1.0)[0])


@pytest.mark.parametrize("backend", ["numpy", "triton"])
def test_gated_linear_attention_matches_fla_simple_gla(backend, tmp_path):
    from fla.ops.simple_gla import fused_recurrent_simple_gla, parallel_simple_gla

    fn = _attnc("gla", backend, tmp_path)
    q, k, v = _qkv(1)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, generator=torch.Generator()
                                                   .manual_seed(2)) + 2)
    got = _run(fn, backend, _heads_first(q), _heads_first(k), _heads_first(v),
               g.transpose(1, 2)).transpose(1, 2)
    _close(got, fused_recurrent_simple_gla(q, k, v, g, scale=1.0)[0])
    _close(got, parallel_simple_gla(q, k, v, g, scale=1.0)[0])


@pytest.mark.parametrize("backend", ["numpy", "triton"])
def test_rwkv_matches_fla_rwkv6_with_a_constant_decay(backend, tmp_path):
    from fla.ops.rwkv6 import fused_recurrent_rwkv6

    fn = _attnc("rwkv", backend, tmp_path)
    r, k, v = _qkv(3)
    gen = torch.Generator().manual_seed(4)
    wd, u = torch.randn(H, K, generator=gen) - 1, torch.randn(H, K, generator=gen)
    heads = [_run(fn, backend, _heads_first(r)[:, h], _heads_first(k)[:, h],
                  _heads_first(v)[:, h], wd[h], u[h]) for h in range(H)]
    got = torch.stack(heads, dim=2)
    w = (-wd.exp()).expand(B, T, H, K).contiguous()  # the log-decay at every step
    _close(got, fused_recurrent_rwkv6(r, k, v, w, u, scale=1.0)[0])
