"""Parity: a spec the numpy backend compiles compiles and matches on Triton (interpreter)
and CUDA (host emulation), or is refused with a reason — on random attention variants and
random cascades, not only on ``examples/``.

The attention variants are drawn as ``.attn`` text, the way a user writes them: integer
sizes inside float functions (``/ sqrt(E)``, ``rsqrt(E)``, ``log(M)``), score mods
(softcap, ALiBi, distance biases), masks (causal, windows over a float parameter,
document ids), three normalisers (softmax, softmax_1, sigmoid), GQA, an extra LSE output,
linear attention (a two-kernel program on the GPU backends).  Each is checked by
``attnc check`` (ragged shapes, broadcast batch dims, tiles of 16 so loops run several
tiles) against the interpreter.  Long runs: ``ATTNC_PARITY_EXAMPLES=200 pytest
tests/test_parity.py``.
"""
from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

pytest.importorskip("torch")
pytest.importorskip("triton")

from attnc.backends import compile_module  # noqa: E402
from attnc.frontends import parse_file  # noqa: E402
from attnc.frontends.cli import main  # noqa: E402
from attnc.passes.tile import NotTileable  # noqa: E402

from conftest import EXAMPLES as EXAMPLES_DIR  # noqa: E402
from strategies import definitions  # noqa: E402

EXAMPLES = int(os.environ.get("ATTNC_PARITY_EXAMPLES", "0"))


def _settings(n: int):
    # no shrinking: each example is seconds of interpreter time, and the message prints the spec
    return settings(max_examples=EXAMPLES or n, deadline=None, derandomize=not EXAMPLES,
                    phases=(Phase.explicit, Phase.reuse, Phase.generate),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


SCALES = ("Q{q} * K{k} / sqrt(E)", "Q{q} * K{k} * rsqrt(E)", "Q{q} * K{k} * scale",
          "Q{q} * K{k} * (1 / sqrt(E + 0))")
MODS = ("{s}", "cap * tanh(({s}) / cap)", "{s} - (p + M - P - m) / M", "{s} + log(M) - log(P + M)",
        "{s} - SLOPE[h] * (p + M - P - m)")
MASKS = ("", "m <= p + M - P", "m <= p + M - P and m > p + M - P - W", "DQ[p] == DK[m]",
         "m <= M - 1 - p // 3", "m >= 2 or m == p")


@st.composite
def attention_specs(draw) -> str:
    """A random attention variant as ``.attn`` source."""
    heads = draw(st.sampled_from(("none", "mha", "gqa")))
    mod = draw(st.sampled_from(MODS if heads != "none" else MODS[:-1]))
    mask = draw(st.sampled_from(MASKS))
    norm = draw(st.sampled_from(("softmax", "softmax1", "sigmoid")))
    lse = norm == "softmax" and draw(st.booleans())
    h = "h," if heads != "none" else ""
    hq = "H," if heads != "none" else ""
    hk = {"none": "", "mha": "H,", "gqa": "HK,"}[heads]
    kv = {"none": "", "mha": "h,", "gqa": "h // G,"}[heads]
    args = [f"Q[{hq}P,E]", f"K[{hk}M,E]", f"V[{hk}M,F]"]
    if "DQ" in mask:
        args += ["DQ[P]: i32", "DK[M]: i32"]
    if "SLOPE" in mod:
        args.append("SLOPE[H]")
    params = ["scale = 1/sqrt(E)"] if "scale" in draw(st.sampled_from(SCALES)) else []
    score = draw(st.sampled_from(SCALES)).format(q=f"[{h}p,e]", k=f"[{kv}m,e]")
    if "scale" in score and not params:
        params = ["scale = 1/sqrt(E)"]
    if "cap" in mod:
        params.append("cap = 20")
    if "W" in mask:
        params.append("W = 6")
    outs = f"AV[{hq}P,F]" + (f", LSE[{hq}P]" if lse else "")
    lines = [f"attention rand({', '.join(args + params)}) -> {'(' + outs + ')' if lse else outs} {{"]
    if heads == "gqa":
        lines.append("  let G = H / HK")
    where = f"   where {mask}" if mask else ""
    lines.append(f"  S[{h}p,m] = {mod.format(s=score)}{where}")
    if norm == "sigmoid":
        lines.append(f"  AV[{h}p,f] = sigmoid(S[{h}p,m] - log(M)) * V[{kv}m,f]")
    else:
        extra = f" + exp(-GM[{h}p])" if norm == "softmax1" else ""
        lines += [f"  GM[{h}p] = max[m](S[{h}p,m])",
                  f"  SD[{h}p] = sum[m](exp(S[{h}p,m] - GM[{h}p])){extra}",
                  f"  AV[{h}p,f] = exp(S[{h}p,m] - GM[{h}p]) * V[{kv}m,f] / SD[{h}p]"]
        if lse:
            lines.append(f"  LSE[{h}p] = GM[{h}p] + log(SD[{h}p])")
    lines.append("}")
    return "\n".join(lines) + "\n"


LINEAR = """attention linear_rand(Q[P,E], K[M,E], V[M,F]) -> AV[P,F] {
  FQ[p,e] = {phi_q}
  FK[m,e] = {phi_k}
  S[p,m]  = FQ[p,e] * FK[m,e]
  AV[p,f] = S[p,m] * V[m,f] / {den}
}
"""
PHIS = ("select({x} > 0, {x} + 1, exp({x}))", "relu({x}) + 1 / sqrt(E)", "exp({x} - 1) * (E - 1 + 1) / E")


@st.composite
def linear_specs(draw) -> str:
    phi_q, phi_k = (draw(st.sampled_from(PHIS)) for _ in range(2))
    den = draw(st.sampled_from(("sum[m](S[p,m])", "(M + 0.5)", "sqrt(M)")))
    return (LINEAR.replace("{phi_q}", phi_q.format(x="Q[p,e]"))
            .replace("{phi_k}", phi_k.format(x="K[m,e]")).replace("{den}", den))


def _check(tmp_path, text: str, backend: str, *extra: str) -> None:
    spec = tmp_path / "rand.attn"
    spec.write_text(text)
    code = main(["check", str(spec), "--backend", backend, *extra])
    assert code == 0, f"{backend} does not match the interpreter on\n{text}"


@_settings(6)
@given(text=attention_specs(), tile=st.sampled_from(("16", "64")))
def test_random_attention_matches_on_triton(tmp_path_factory, text, tile):
    tmp = tmp_path_factory.mktemp("parity")
    _check(tmp, text, "numpy", "--tile", tile)
    _check(tmp, text, "triton", "--tile", tile)


@_settings(3)
@given(text=attention_specs())
def test_random_attention_matches_on_cuda_emulation(tmp_path_factory, text, monkeypatch):
    monkeypatch.setenv("ATTNC_CUDA_EMULATE", "1")
    _check(tmp_path_factory.mktemp("parity"), text, "cuda", "--tile", "16")


@_settings(4)
@given(text=linear_specs())
def test_linear_attention_compiles_to_kernels_and_matches(tmp_path_factory, text):
    tmp = tmp_path_factory.mktemp("linear")
    _check(tmp, text, "triton", "--tile", "16")


@_settings(25)
@given(defn=definitions())
def test_random_cascade_compiles_or_is_refused_with_a_reason(defn):
    """Every random cascade either lowers and renders on both GPU backends or is refused
    with a message that names the definition (never another exception)."""
    from attnc.einsum_ir.ir import Module

    for backend in ("triton", "cuda"):
        try:
            compile_module(Module((defn,)), backend, "rand")
        except NotTileable as err:
            assert defn.name in str(err) and len(str(err)) > len(defn.name) + 10, str(err)


def test_the_issue_specs_pass_check_on_every_backend(tmp_path, monkeypatch):
    """Ten specs written from the contract, not in examples/ (tests/specs11)."""
    from pathlib import Path

    monkeypatch.setenv("ATTNC_CUDA_EMULATE", "1")
    specs = sorted((Path(__file__).parent / "specs11").glob("*.attn"))
    assert len(specs) == 10
    for spec in specs:
        for backend in ("numpy", "triton"):
            assert main(["check", str(spec), "--backend", backend]) == 0, (spec.name, backend)


# --- crash classes of the fuzzing issue that lived in the GPU backends ----------------------

EDGE_SPECS = {
    # a where on the rows around a sum over another rank (CUDA read the row index in the loop)
    "row_where_around_sum": "attention a(Z[E], X[P]) -> T[P] {\n  T[p] = abs(Z[e]) where p >= 1\n}\n",
    # a scalar output of two reductions (Triton: KeyError 'T_sum')
    "scalar_of_two_sums": "attention b(Y[P], X[M]) -> T {\n  T = Y[p] + X[m]\n}\n",
    # a sum whose body is over the summed rank only, under a where over another rank
    # (the kernels reduced an (m0) block masked by a (t, m0) where: a broadcast error)
    "cumulative_sum": "attention c(LG[M], X[P]) -> C[P] {\n"
                      "  C[p] = X[p] * sum[m](LG[m])   where m <= p\n}\n",
    # a buffer of an earlier kernel read at shifted positions (GLA's cumulative gate; the
    # kernels declined 'read with a shifted subscript'), absent where its fiber was empty
    "shifted_buffer_reads": "attention d(Q[P,E], K[M,E], V[M,F], LG[M]) -> O[P,F] {\n  let T = M\n"
                            "  CG[t] = sum[m](LG[m])   where m <= t - 2\n"
                            "  S[p,m] = Q[p,e] * K[m,e] * exp(CG[p + 1] - CG[m])   where m <= p\n"
                            "  O[p,f] = S[p,m] * V[m,f]\n}\n",
    # an atom without the keys (p >= 3) beside a causal one: it bounds a row block's tiles
    # all or none (Max/Min in the tile bounds, rendered by every backend)
    "rows_without_keys": "attention e(Q[P,E], K[M,E], V[M,F]) -> O[P,F] {\n"
                         "  S[p,m] = Q[p,e] * K[m,e]   where m <= p + M - P and p >= 3\n"
                         "  O[p,f] = exp(S[p,m] - max[m](S[p,m])) * V[m,f] "
                         "/ sum[m](exp(S[p,m] - max[m](S[p,m])))\n}\n",
}


@pytest.mark.parametrize("name", sorted(EDGE_SPECS))
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_backends_compile_and_match_edge_cascades(name, backend, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNC_CUDA_EMULATE", "1")
    _check(tmp_path, EDGE_SPECS[name], backend)


def test_a_tile_triton_cannot_block_is_refused_with_the_reason(tmp_path, capsys):
    """A hand-written tile of 48 keys: Triton blocks are powers of two, so it is declined
    (exit 2, the tile named), where it used to fail inside Triton at run time."""
    text = (EXAMPLES_DIR / "fusemax" / "cascade5.attn").read_text().replace("let M0 = 64", "let M0 = 48")
    assert "let M0 = 48" in text
    spec = tmp_path / "t48.attn"
    spec.write_text(text)
    assert main(["check", str(spec), "--backend", "triton"]) == 2
    assert "M0 = 48 is not a power of two" in capsys.readouterr().err
    assert main(["check", str(spec), "--backend", "numpy"]) == 0


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_a_default_dividing_by_a_zero_size_is_ieee_not_an_error(backend, tmp_path, monkeypatch):
    """``scale = 1/sqrt(E)`` at E = 0: the launcher computes inf (as numpy does) instead of
    raising ZeroDivisionError; every score is then absent and the output is 0."""
    import torch

    from attnc.backends import load_generated, write_atomic

    monkeypatch.setenv("ATTNC_CUDA_EMULATE", "1")
    # a name of its own: torch keeps one custom op per compiled IR and process, and the
    # module that registered causal_softmax's may be collected before another test loads it
    spec = tmp_path / "causal_e0.attn"
    spec.write_text((EXAMPLES_DIR / "causal.attn").read_text().replace("causal_softmax", "causal_e0"))
    _, files = compile_module(parse_file(spec), backend, "causal_e0")
    for name, text in files.items():
        write_atomic(tmp_path / name, text)
    gen = load_generated(tmp_path / "causal_e0.py")
    out = gen.causal_e0(torch.randn(3, 0), torch.randn(4, 0), torch.randn(4, 2))
    assert out.shape == (3, 2) and (out == 0).all()
