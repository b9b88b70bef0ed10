"""``did you mean``: ``frontends.lower.suggest`` on difflib's alignment of two names."""
from __future__ import annotations

import pytest

from attnc.frontends.lower import MAX_SUGGEST_LENGTH, name_distance, suggest

FUNCTIONS = ("exp", "exp2", "log", "log2", "sqrt", "rsqrt", "tanh", "sigmoid", "abs", "relu",
             "max", "min", "select")


@pytest.mark.parametrize("a,b,slips", [
    ("exq", "exp", 1),          # one replaced letter
    ("scal", "scale", 1),       # one missing
    ("bf61", "bf16", 1),        # neighbours swapped: one slip, not two
    ("Kx", "QK", 2),            # a shifted K is no swap: insert Q, delete x
    ("Scale", "scale", 0.5),    # a case slip is half of one
    ("mMin", "min", 1),         # an extra letter, not a case slip and an extra letter
])
def test_name_distance(a, b, slips):
    assert name_distance(a, b) == slips


@pytest.mark.parametrize("name,candidates,hint", [
    ("q", ("Q", "K", "V"), "did you mean Q?"),              # one letter: a case slip only
    ("x", ("Q", "K", "V"), None),
    ("Scale", ("scale", "Q"), "did you mean scale?"),
    ("SCALE", ("scale", "Q"), None),                        # five case slips: too far
    ("bf61", ("f16", "bf16", "f32"), "did you mean bf16?"),
    ("exp3", FUNCTIONS, "did you mean exp2 or exp?"),       # a tie: the same length first
    ("ceiling", ("ceil", "floor"), "did you mean ceil?"),   # a prefix is near
    ("softplus", FUNCTIONS, None),
    ("Kx", ("Q", "K", "V", "QK"), "did you mean K?"),
])
def test_suggest(name, candidates, hint):
    assert suggest(name, candidates) == hint


def test_suggest_skips_names_past_the_length_limit():
    long = "Q" * (MAX_SUGGEST_LENGTH + 1)
    assert suggest(long, [long + "x"]) is None
    assert suggest("Qx", [long, "Q"]) == "did you mean Q?"
