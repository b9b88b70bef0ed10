"""``unroll_rank``: a rank of size 2 written out equals the cascade over it (interpreter),
and what a '+' cannot say exactly is refused."""
from __future__ import annotations

import numpy as np
import pytest

from attnc.einsum_ir.interpreter import interpret
from attnc.frontends import parse
from attnc.passes.unroll import NotUnrollable, unroll_rank, unrolled_name

SPEC = """
attention mixed(X[W,Q,F], Y[W,P], Z[P]) -> (A[P], B[P,F], C[P]) {
  T[w,p] = exp(Y[w,p] - Z[p]) * w + W
  A[p] = max[w](Y[w,p])
  B[p,f] = sum[w,q](X[w,q,f] * T[w,p])
  C[p] = min[w](T[w,p]) + sum[w](Y[w,p] * Z[p])
}
"""


def test_unrolled_cascade_equals_the_cascade():
    defn = parse(SPEC, "mixed.attn").definitions[0]
    out = unroll_rank(defn, "W", 2)
    assert "W" not in {r for a in out.tensor_args for r in a.ranks}
    rng = np.random.default_rng(0)
    X, Y, Z = rng.standard_normal((2, 4, 3)), rng.standard_normal((2, 5)), rng.standard_normal(5)
    want = interpret(defn, X, Y, Z)
    named = {"Z": Z}
    for name, x in (("X", X), ("Y", Y)):
        named[unrolled_name(name, 0)], named[unrolled_name(name, 1)] = x[0], x[1]
    got = interpret(out, *[named[a.name] for a in out.tensor_args])
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-14)


@pytest.mark.parametrize("body,why", [
    ("A[p] = sum[w](Y[w,p])   where Y[w,p] > 0", "where"),
    ("A[p] = sum[w](Y[1 - w,p])", "another index"),
])
def test_what_a_plus_cannot_say_is_refused(body, why):
    text = f"attention bad(Y[W,P]) -> A[P] {{\n  {body}\n}}\n"
    with pytest.raises(NotUnrollable, match=why):
        unroll_rank(parse(text, "bad.attn").definitions[0], "W", 2)
