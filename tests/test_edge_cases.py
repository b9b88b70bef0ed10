"""Edge cases that once crashed or changed meaning (issue 16): one regression test per class.

The numpy backends (fused and ``-O0``) on scalar outputs, zero sizes, multi-tile reversed
reads, deep expressions and bool inputs; the front end's limits (depth, literal size),
defaults, encodings and "did you mean"; the CLI's exit codes and file modes; NaN and Inf.
"""
from __future__ import annotations

import os
import time

import numpy as np
import pytest

from attnc.backends import load_generated
from attnc.backends.check import random_call
from attnc.einsum_ir.interpreter import interpret
from attnc.einsum_ir.sizes import evaluate_lets
from attnc.frontends import SpecError, parse, parse_file
from attnc.frontends.cli import main
from attnc.frontends.limits import MAX_EXPR_DEPTH, MAX_INT_DIGITS

from conftest import EXAMPLES, all_examples

EXAMPLE_IDS = [str(p.relative_to(EXAMPLES)) for p in all_examples()]
FORMS = {"fused": [], "O0": ["-O0"]}


def compile_spec(path, out, *flags):
    """Compile ``path`` with the CLI into ``out``; the imported module."""
    assert main(["compile", str(path), "-o", str(out), *flags]) == 0
    return load_generated(out / f"{path.stem}.py")


def compile_text(text: str, tmp_path, *flags, stem: str = "spec"):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{stem}.attn"
    path.write_text(text)
    return parse(text).definitions[0], compile_spec(path, tmp_path / "out", *flags)


def same_outputs(got, want) -> None:
    """Equal up to rounding, with NaN and Inf at the same positions."""
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    for g, w in zip(got, want, strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert g.shape == w.shape
        np.testing.assert_array_equal(np.isnan(g), np.isnan(w))
        np.testing.assert_array_equal(np.isposinf(g), np.isposinf(w))
        np.testing.assert_array_equal(np.isneginf(g), np.isneginf(w))
        finite = np.isfinite(w)
        np.testing.assert_allclose(g[finite], w[finite], rtol=1e-9, atol=1e-9)


# --- numpy backends -----------------------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
def test_scalar_outputs_and_scalar_state(form, tmp_path):
    """A rank-0 output and a rank-0 running state (the fused loop's ``_update_rows``)."""
    defn, gen = compile_text("attention f(X[M], Y[M,E]) -> (T, S) {\n"
                             "  T = sum[m](X[m])\n  S = max[m](X[m] * Y[m,e])\n}\n",
                             tmp_path, "--tile", "4", *FORMS[form])
    rng = np.random.default_rng(0)
    for m in (0, 3, 9):
        x, y = rng.standard_normal((2, m)), rng.standard_normal((m, 3))
        same_outputs(gen.f(x, y), interpret(defn, x, y))


@pytest.mark.parametrize("rel", EXAMPLE_IDS)
def test_zero_sizes_match_the_interpreter(rel, tmp_path):
    """Each input rank in turn of size 0, the others small: fused and -O0 alike."""
    defn = parse_file(EXAMPLES / rel).definitions[0]
    gens = [compile_spec(EXAMPLES / rel, tmp_path / form, *flags) for form, flags in FORMS.items()]
    rng = np.random.default_rng(1)
    ranks = list(dict.fromkeys(r for a in defn.tensor_args for r in a.ranks))
    for zero in ranks:
        sizes = {r: 0 if r == zero else 3 for r in ranks}
        try:
            evaluate_lets(defn, sizes)
        except (ValueError, ZeroDivisionError):
            continue  # a let that does not divide: the call fails like any other
        call, params = random_call(defn, rng, sizes)
        want = interpret(defn, *call, **params)
        for gen in gens:
            same_outputs(getattr(gen, defn.name)(*call, **params), want)


@pytest.mark.parametrize("form", FORMS)
def test_reversed_offset_reads_with_a_filter_over_several_tiles(form, tmp_path):
    """A ``where`` on the tile rank with a reversed read: index arrays made under the
    full-tile test are used after it (an UnboundLocalError once M spanned two tiles)."""
    defn, gen = compile_text("attention f(X[M,P]) -> T[P] {\n"
                             "  T[p] = sum[m](X[M - 1 - m, p] + X[m + 1, p]) where p <= m\n}\n",
                             tmp_path, "--tile", "4", *FORMS[form])
    x = np.random.default_rng(2).standard_normal((11, 6))
    same_outputs(gen.f(x), interpret(defn, x))


def test_deep_expressions_generate_importable_code(tmp_path):
    """Python's parser stops at 200 nested brackets; the generated code splits deep
    expressions into temporaries (unary, binary, calls, subscripts, both forms)."""
    body = "-(" * 150 + "tanh(" * 150 + "X[p] * 2 + " * 150 + "X[p" + " + 1" * 250 + " - 250]"
    body += ")" * 300
    for form, flags in FORMS.items():
        defn, gen = compile_text(f"attention f(X[P]) -> T[P] {{\n  T[p] = {body}\n}}\n",
                                 tmp_path / form, *flags)
        x = np.linspace(-1, 1, 5)
        same_outputs(gen.f(x), interpret(defn, x))


def test_integer_and_bool_inputs_are_numbers_in_sums(tmp_path):
    """np.einsum over bools is a logical or: -O0 once gave 1 for a sum of three Trues."""
    text = ("attention f(Q[P,E]: bool, K[M,E]: i32) -> T[P,M] {\n"
            "  T[p,m] = Q[p,e] * K[m,e]\n}\n")
    for form, flags in FORMS.items():
        defn, gen = compile_text(text, tmp_path / form, *flags)
        q, k = np.ones((2, 3), bool), np.full((4, 3), 2, np.int32)
        np.testing.assert_array_equal(gen.f(q, k), np.full((2, 4), 6.0))
        same_outputs(gen.f(q, k), interpret(defn, q, k))


def test_comparisons_used_as_numbers_are_numbers(tmp_path):
    """numpy computes comparisons as bools: True + True is True, -True raises, exp(True) is a
    float16.  The language's comparisons are 1 and 0."""
    text = ("attention f(X[P], B[P]: bool) -> T[P] {\n"
            "  T[p] = (X[p] > 0) + (X[p] > -1) - (not X[p] > 1) + exp(X[p] > 0)"
            " + max(X[p] > 0, X[p] > 2) * B[p] + B[p] + B[p]\n}\n")
    for form, flags in FORMS.items():
        defn, gen = compile_text(text, tmp_path / form, *flags)
        x, b = np.array([-2.0, -0.5, 0.5, 3.0]), np.array([True, True, False, True])
        same_outputs(gen.f(x, b), interpret(defn, x, b))


@pytest.mark.parametrize("form", FORMS)
def test_reductions_whose_body_does_not_use_their_rank(form, tmp_path):
    """The contract allows ``sum[m](2)``: it is ``M * 2``, absent (so 0) when M is 0."""
    defn, gen = compile_text("attention f(X[P], Y[M]) -> (T[P], U[P]) {\n"
                             "  T[p] = sum[m](2) + X[p]\n  U[p] = max[m](X[p])\n}\n",
                             tmp_path, "--tile", "2", *FORMS[form])
    x = np.array([1.0, -2.0])
    for m in (0, 5):
        t, u = gen.f(x, np.zeros(m))
        np.testing.assert_array_equal(t, x + 2 * m if m else np.zeros(2))  # empty: absent
        np.testing.assert_array_equal(u, x if m else np.zeros(2))
        same_outputs((t, u), interpret(defn, x, np.zeros(m)))


@pytest.mark.parametrize("form", FORMS)
def test_a_read_at_a_computed_index_is_no_tile(form, tmp_path):
    """``T0[f // 2, f]`` in a loop over F is not a tile read: re-indexing T0 and T5 by f
    (as split-K's blocked loads are by their tile) broke the fused form (found by fuzzing)."""
    defn, gen = compile_text("attention d(V[F,P]) -> T5[P] {\n  T0[p,f] = p + f\n"
                             "  T1[0] = 0\n  T1[f+1] = T1[f] * 0.5 + T0[f // 2, f]\n"
                             "  T5[p] = V[0, p] + T1[F]\n}\n", tmp_path, "--tile", "2",
                             *FORMS[form])
    v = np.random.default_rng(5).standard_normal((5, 3))
    same_outputs(gen.d(v), interpret(defn, v))


@pytest.mark.parametrize("form", FORMS)
def test_a_per_tile_tensor_read_before_the_loop(form, tmp_path):
    """``T0[m]`` is computed in the loop over m, but the init ``T1[0,e] = T0[e]`` reads it
    before the loop (an UnboundLocalError in the fused form; found by fuzzing)."""
    defn, gen = compile_text("attention d(Q[E,M]) -> T2[E] {\n  T0[m] = m + Q[0,m]\n"
                             "  T1[0,e] = T0[e]\n  T1[m+1,e] = T1[m,e] * 3 + Q[e,m]\n"
                             "  T2[e] = T1[M,e]\n}\n",
                             tmp_path, "--tile", "2", *FORMS[form])
    q = np.random.default_rng(6).standard_normal((4, 5))
    same_outputs(gen.d(q), interpret(defn, q))


def test_a_default_that_divides_by_a_zero_size_is_inf(tmp_path):
    """``beta = 1/L0`` at ``L0 = 0``: IEEE inf as in the interpreter, not ZeroDivisionError."""
    for form, flags in FORMS.items():
        defn, gen = compile_text("attention d(X[H], beta = 1/H) -> T {\n"
                                 "  T = sum[h](X[h]) + beta\n}\n", tmp_path / form, *flags)
        with np.errstate(divide="ignore"):
            for h in (0, 3):
                same_outputs(gen.d(np.ones(h)), interpret(defn, np.ones(h)))


def test_split_k_on_the_fused_form_falls_back_instead_of_crashing(tmp_path, capsys):
    """Split-K's blocked loads are read at ``w * MT + mt``, not at the loop's own step: the
    fused renderer declines (it raised ValueError "'MT' is not in list")."""
    passes = "canonicalize,defer-normalization,online,split-k"
    assert main(["check", str(EXAMPLES / "causal.attn"), "--passes", passes, "--tile", "4"]) == 0
    assert "FAIL" not in capsys.readouterr().out


# --- NaN and Inf --------------------------------------------------------------------------


@pytest.mark.parametrize("rel", EXAMPLE_IDS)
def test_nan_and_inf_propagate_alike_at_every_level(rel, tmp_path):
    """NaN and Inf in the inputs land at the same output positions in the interpreter, in
    -O0's per-Einsum code and in the default (one-pass, fused) code (docs/language.md)."""
    defn = parse_file(EXAMPLES / rel).definitions[0]
    gens = [compile_spec(EXAMPLES / rel, tmp_path / form, "--tile", "4", *flags)
            for form, flags in FORMS.items()]
    rng = np.random.default_rng(4)
    ranks = list(dict.fromkeys(r for a in defn.tensor_args for r in a.ranks))
    call, params = random_call(defn, rng, {r: 6 for r in ranks})
    for x in call:
        if x.dtype.kind == "f":
            x.flat[rng.choice(x.size, 2, replace=False)] = (np.nan, np.inf)
    same = [(call, params)]
    if defn.scalar_params:  # a NaN scale too
        same.append((call, {**params, defn.scalar_params[0].name: np.nan}))
    for args, kwargs in same:
        want = interpret(defn, *args, **kwargs)
        for gen in gens:
            same_outputs(getattr(gen, defn.name)(*args, **kwargs), want)


# --- front end ----------------------------------------------------------------------------


def _located(text: str, message: str) -> SpecError:
    with pytest.raises(SpecError) as info:
        parse(text, "deep.attn")
    (d,) = info.value.diagnostics
    assert message in d.message and d.loc is not None and d.loc.line == 2 and d.loc.col >= 1
    return info.value


@pytest.mark.parametrize("kind", ["neg", "pow", "sum", "compare", "call", "flat"])
def test_depth_limit_is_stated_and_located(kind):
    """Past the limit a located error; below it, with recursion to spare, a module."""
    def deep(n):
        return {"neg": "-" * n + "X[p]", "pow": " ** ".join(["X[p]"] * n),
                "sum": "sum[e](Y[p,e] * " * n + "X[p]" + ")" * n,
                "compare": "X[p] < (" * n + "X[p]" + ")" * n,
                "call": "exp(" * n + "X[p]" + ")" * n, "flat": " + ".join(["X[p]"] * n)}[kind]

    spec = "attention f(X[P], Y[P,E]) -> T[P] {{\n  T[p] = {}\n}}\n"
    _located(spec.format(deep(MAX_EXPR_DEPTH + 1)), f"more than {MAX_EXPR_DEPTH} levels")
    _located(spec.format(deep(3 * MAX_EXPR_DEPTH)), f"more than {MAX_EXPR_DEPTH} levels")
    assert parse(spec.format(deep(MAX_EXPR_DEPTH // 4))).definitions[0].name == "f"


def test_parentheses_alone_add_no_depth():
    assert parse("attention f(X[P]) -> T[P] {\n  T[p] = " + "(" * 20_000 + "X[p]" + ")" * 20_000
                 + "\n}\n")


def test_integer_literals_have_a_size_limit():
    ok = "1" * MAX_INT_DIGITS
    spec = "attention f(X[P]) -> T[P] {{\n  T[p] = X[p] * {}\n}}\n"
    assert parse(spec.format(ok))
    for digits in (MAX_INT_DIGITS + 1, 310, 5000):
        _located(spec.format("7" * digits), f"integer literal of {digits} digits")
    assert parse(spec.format("1." + "0" * 5000 + "1"))  # a float literal just rounds


@pytest.mark.parametrize("default,value", [("-inf", -np.inf), ("exp(1)", np.e),
                                           ("-exp(2) * pi", -np.exp(2) * np.pi)])
def test_parameter_defaults_that_are_constants(default, value, tmp_path):
    for form, flags in FORMS.items():
        defn, gen = compile_text(f"attention f(X[P], s = {default}) -> T[P] {{\n"
                                 f"  T[p] = max(X[p], s)\n}}\n", tmp_path / form, *flags)
        x = np.array([-1.0, 3.0])
        np.testing.assert_array_equal(gen.f(x), np.maximum(x, value))


def test_did_you_mean_is_fast_on_long_names():
    name = "Q" * 3000
    text = (f"attention f(Q[P,E], {name}x[P,E]) -> T[P] {{\n"
            f"  T[p] = {name}[p,e] + {name}y[p,e] + Qx[p,e]\n}}\n")
    start = time.perf_counter()
    with pytest.raises(SpecError) as info:
        parse(text)
    assert time.perf_counter() - start < 2
    assert "did you mean" in info.value.format()  # a short name still gets one


def test_a_thousand_term_expression_compiles_and_reports_quickly(tmp_path, capsys):
    """Compile and report stay near-linear in the spec's size (once quadratic or worse)."""
    terms = " + ".join(f"X[p,e] * Y[m,e] * {i % 7 + 1}" for i in range(1000))
    path = tmp_path / "wide.attn"
    path.write_text(f"attention f(X[P,E], Y[M,E]) -> T[P,M] {{\n  T[p,m] = {terms}\n}}\n")
    start = time.perf_counter()
    assert main(["compile", str(path), "-o", str(tmp_path / "out")]) == 0
    assert main(["report", str(path)]) == 0
    assert time.perf_counter() - start < 30  # about 5 s on a loaded 2-core runner
    x, y = np.ones((2, 3)), np.ones((4, 3))
    gen = load_generated(tmp_path / "out" / "wide.py")
    want = 3.0 * sum(i % 7 + 1 for i in range(1000))
    np.testing.assert_allclose(gen.f(x, y), np.full((2, 4), want))


def test_utf8_bom_is_accepted_and_other_encodings_are_located(tmp_path, capsys):
    good = (EXAMPLES / "causal.attn").read_bytes()
    bom = tmp_path / "bom.attn"
    bom.write_bytes(b"\xef\xbb\xbf" + good)
    assert parse_file(bom) == parse_file(EXAMPLES / "causal.attn")
    latin = tmp_path / "latin.attn"
    latin.write_bytes(good.replace(b"# M: keys", b"# M: cl\xe9s", 1) if b"# M: keys" in good
                      else b"# caf\xe9\n" + good)
    with pytest.raises(SpecError) as info:
        parse_file(latin)
    (d,) = info.value.diagnostics
    assert d.loc is not None and d.loc.line >= 1 and d.loc.col >= 1 and "UTF-8" in d.message
    assert main(["compile", str(latin), "--emit", "ir"]) == 2
    assert f"{latin}:{d.loc.line}:{d.loc.col}: error" in capsys.readouterr().err


# --- exit codes and files -----------------------------------------------------------------


@pytest.mark.parametrize("target", ["file", "devnull", "dot"])
def test_unwritable_outputs_are_user_errors(target, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    spec = str(EXAMPLES / "causal.attn")
    argv = {"file": ["compile", spec, "-o", str(blocker / "sub")],
            "devnull": ["compile", spec, "-o", os.devnull],
            "dot": ["report", spec, "--dot", str(blocker / "x.dot")]}[target]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnc: error: cannot write ") and err.count("\n") == 1


def test_internal_errors_exit_70_and_never_pass_as_user_errors(monkeypatch, capsys):
    """A ValueError inside a pass is a bug (70, a report request), not a bad option (2)."""
    from attnc.passes import pipeline

    def broken(defn, **options):
        raise ValueError("'MT' is not in list")

    stage = pipeline.Stage("online", broken, "broken on purpose", ("tile",))
    monkeypatch.setitem(pipeline.PASSES, "online", stage)
    for argv in (["compile", str(EXAMPLES / "causal.attn"), "--emit", "ir"],
                 ["report", str(EXAMPLES / "causal.attn")]):
        assert main(argv) == 70
        err = capsys.readouterr().err
        assert "bug in attnc" in err and "please report" in err


@pytest.mark.parametrize("argv,message", [
    (["--passes", "canonicalize,nope"], "unknown pass 'nope'"),
    (["--stop-after", "nope"], "--stop-after 'nope'"),
    (["--size", "M=0"], "positive integer"),
    (["--size", "Z=3"], "--size names Z"),
])
def test_bad_options_are_user_errors(argv, message, capsys):
    assert main(["report", str(EXAMPLES / "causal.attn"), *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_generated_files_get_the_umask_mode(umask, tmp_path):
    old = os.umask(umask)
    try:
        assert main(["compile", str(EXAMPLES / "causal.attn"), "-o", str(tmp_path)]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "causal.py").stat().st_mode & 0o777 == 0o666 & ~umask
