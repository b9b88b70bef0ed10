"""Ten attention variants of our own (tests/grad_variants/, none in examples/) train: the
derived backward matches finite differences in float64, the numpy module's backward
program and the Triton one (interpreter, several tiles) match the interpreted backward
cascade, or the Triton backward is refused with the stage and reason below; and a few
optimiser steps through torch autograd lower a loss."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from attnc.backends import compile_module, load_generated, write_atomic
from attnc.frontends import parse_file
from attnc.passes.tile import NotTileable

from test_backward import directional_errors
from test_backward_program import _check_module

VARIANTS = Path(__file__).parent / "grad_variants"
NAMES = sorted(p.name for p in VARIANTS.glob("*.attn"))
# Triton refuses these backward programs, with these reasons (talking heads' sum over the
# mixed heads is pushed into its readers: passes/head_partials.py)
TRITON_REFUSED: dict[str, str] = {}


def _definition(name):
    return parse_file(VARIANTS / name).definitions[0]


def _compiled(tmp_path, name, backend, **options):
    module = parse_file(VARIANTS / name)
    _, files = compile_module(module, backend, "mod", options=options, backward=True)
    for fname, text in files.items():
        write_atomic(tmp_path / fname, text)
    return module.definitions[0], load_generated(tmp_path / "mod.py")


def test_there_are_ten_variants_none_in_examples():
    from conftest import EXAMPLES

    assert len(NAMES) == 10
    assert not set(NAMES) & {p.name for p in EXAMPLES.glob("*.attn")}


@pytest.mark.parametrize("name", NAMES)
def test_the_backward_matches_finite_differences(name):
    for seed in (0, 1):
        errors = directional_errors(_definition(name), seed)
        assert max(errors.values(), default=0) < 1e-6, errors


@pytest.mark.parametrize("name", NAMES)
def test_the_numpy_backward_program_matches_the_cascade(tmp_path, name):
    d, mod = _compiled(tmp_path, name, "numpy", tile=8)
    _check_module(mod, d, "numpy", seeds=(0,))


@pytest.mark.parametrize("name", NAMES)
def test_the_triton_backward_matches_the_cascade_or_is_refused(tmp_path, name):
    if name in TRITON_REFUSED:
        with pytest.raises(NotTileable, match=TRITON_REFUSED[name]):
            _compiled(tmp_path, name, "triton", tile=16)
        return
    pytest.importorskip("torch")
    d, mod = _compiled(tmp_path, name, "triton", tile=16)
    _check_module(mod, d, "triton", seeds=(0,))


def test_a_learned_temperature_and_alibi_slopes_train_through_torch_autograd(tmp_path):
    """Adam on the Triton modules (interpreter): the loss against a fixed target falls and
    the per-head parameters move."""
    torch = pytest.importorskip("torch")
    for name, param in (("head_temperature.attn", "TAU"), ("learned_alibi.attn", "SL")):
        d, mod = _compiled(tmp_path / name, name, "triton", tile=16)
        fn = getattr(mod, d.name)
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(2, 24, 16, generator=gen) for _ in range(3))
        q.requires_grad_()
        theta = torch.full((2,), 0.25, requires_grad=True)
        target = torch.randn(2, 24, 16, generator=gen)
        opt = torch.optim.Adam([q, theta], lr=0.05)
        losses = []
        for _ in range(6):
            opt.zero_grad()
            loss = (fn(q, k, v, theta) - target).square().mean()
            loss.backward()
            assert theta.grad is not None and torch.isfinite(theta.grad).all(), param
            opt.step()
            losses.append(float(loss))
        assert losses[-1] < losses[0], (name, losses)
        assert not torch.allclose(theta.detach(), torch.full((2,), 0.25)), param
