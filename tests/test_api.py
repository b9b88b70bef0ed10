"""The Python API (``attnc.compile``, ``attnc.load``), its content cache, and the lints."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import attnc
from attnc.einsum_ir.interpreter import interpret
from attnc.frontends import parse
from attnc.frontends.api import CompiledModule, cache_dir
from attnc.frontends.progress import Status

ROOT = Path(__file__).resolve().parent.parent
CAUSAL = ROOT / "examples" / "causal.attn"
RELU = """attention relu_attn(Q[P,E], K[M,E], V[M,F], scale = 1/sqrt(E)) -> AV[P,F] {
  S[p,m]  = Q[p,e] * K[m,e] * scale
  AV[p,f] = max(S[p,m], 0) * V[m,f] / M
}
"""


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _qkv(rng, p=5, m=9, e=8, f=4, batch=(2,)):
    return (rng.standard_normal(batch + (p, e)), rng.standard_normal(batch + (m, e)),
            rng.standard_normal(batch + (m, f)))


def test_import_is_cheap():
    code = "import sys, attnc; print(any(m in sys.modules for m in ('sympy', 'lark', 'jinja2', 'numpy')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


def test_compile_a_path_returns_the_module_with_its_ir_and_report(cache):
    mod = attnc.compile(CAUSAL)
    assert isinstance(mod, CompiledModule) and mod.backend == "numpy"
    assert mod.path.parent.parent == cache and mod.path.name == "causal.py"
    q, k, v = _qkv(np.random.default_rng(0))
    want = interpret(mod.spec.definitions[0], q, k, v)
    assert np.allclose(mod.causal_softmax(q, k, v), want, rtol=1e-12, atol=1e-12)
    assert list(mod.ir) == [n for n, _ in mod.stages] and mod.stages[0][0] == "input"
    assert mod.ir["stream-final"].startswith("attention causal_softmax(")
    assert mod.report["definitions"][0]["name"] == "causal_softmax"
    assert mod.kernels is None and mod.files == [mod.path]


def test_compile_for_a_kernel_backend_exposes_the_kernel_program(cache):
    pytest.importorskip("torch")
    mod = attnc.compile(CAUSAL, backend="cuda")
    assert [f.name for f in mod.files] == ["causal.cu", "causal.py"]
    assert str(mod.kernels).startswith("program causal_softmax:")
    assert list(mod.lowering) == ["tile", "map-ranks", "bound-tiles", "variants"]
    assert mod.lowering["variants"] in str(mod.kernels)


def test_a_mistyped_path_cannot_be_read(cache):
    with pytest.raises(attnc.SpecError, match="cannot read examples/casual.attn"):
        attnc.compile("examples/casual.attn")


def test_compile_source_text_with_options(cache):
    mod = attnc.compile(RELU, tile=4, passes="canonicalize,online")
    assert mod.path.name == "relu_attn.py" and [n for n, _ in mod.stages] == ["input", "canonicalize", "online"]
    q, k, v = _qkv(np.random.default_rng(1))
    want = interpret(parse(RELU).definitions[0], q, k, v)
    assert np.allclose(mod.relu_attn(q, k, v), want, rtol=1e-12, atol=1e-12)


def test_the_cache_is_keyed_by_content(cache):
    a = attnc.compile(RELU)
    assert attnc.compile(RELU) is a  # same content, same process: the same module
    assert attnc.compile(RELU, tile=8).path != a.path
    assert attnc.compile(RELU.replace("/ M", "/ P")).path != a.path
    assert attnc.compile(RELU, name="other-name").path.name == "other-name.py"
    folders = sorted(p.name for p in cache.iterdir())
    assert len(folders) == 4 and all((cache / f / "attnc.json").is_file() for f in folders)


def test_a_cached_module_loads_in_a_fresh_process_without_compiling(cache):
    first = attnc.compile(RELU)
    stamp = first.path.stat().st_mtime_ns
    code = (f"import sys, attnc; m = attnc.compile({RELU!r}); "
            "print(m.path, 'sympy' in sys.modules or 'lark' in sys.modules, len(m.stages), "
            "m.relu_attn.__name__)")
    env = dict(os.environ, ATTNC_CACHE_DIR=str(cache), PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True)
    # no parsing, no pipeline: the IR is recomputed only when asked for
    assert out.stdout.split() == [str(first.path), "False", str(len(first.stages)), "relu_attn"]
    assert first.path.stat().st_mtime_ns == stamp  # not rewritten


def test_load_a_generated_module(cache, tmp_path):
    mod = attnc.compile(RELU)
    assert attnc.load(mod.path) is mod  # a cache folder: the compiled module itself
    out = tmp_path / "out"
    from attnc.frontends.cli import main

    assert main(["compile", str(CAUSAL), "-o", str(out)]) == 0
    plain = attnc.load(out / "causal.py")
    assert callable(plain.causal_softmax) and not isinstance(plain, CompiledModule)
    with pytest.raises(ValueError, match="is a spec"):
        attnc.load(CAUSAL)
    with pytest.raises(FileNotFoundError):
        attnc.load(tmp_path / "missing.py")


def test_a_bad_spec_raises_a_located_error(cache):
    with pytest.raises(attnc.SpecError) as err:
        attnc.compile(RELU.replace("Q[p,e]", "Q[p,E]"))
    text = str(err.value)
    assert text.startswith("<string>:2:17: error: subscript 'E' of 'Q' is the size of its rank E")
    assert "      ^" in text and "write the index variable 'e'" in text
    with pytest.raises(attnc.SpecError, match=r"cannot read"):
        attnc.compile("missing.attn")


@pytest.mark.parametrize("options, error, match", [
    (dict(bogus=1), TypeError, "unknown option 'bogus'; valid options are passes"),
    (dict(tile=0), ValueError, "tile=0: expected a positive integer"),
    (dict(passes="nope"), ValueError, "unknown pass 'nope'; valid passes are"),
    (dict(stop_after="tile"), ValueError, "not in the pipeline"),
    (dict(backend="tpu"), ValueError, "unknown backend 'tpu'; valid backends are cuda, numpy, triton"),
    (dict(name="a/b"), ValueError, "must be a plain file name"),
])
def test_bad_options_name_the_option(cache, options, error, match):
    with pytest.raises(error, match=match):
        attnc.compile(RELU, **options)


def test_cache_dir_default(monkeypatch, tmp_path):
    monkeypatch.delenv("ATTNC_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "attnc"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "attnc"


# --- lints --------------------------------------------------------------------------


def test_size_in_its_own_rank_position_is_an_error():
    with pytest.raises(attnc.SpecError, match="one past the last element"):
        parse(RELU.replace("K[m,e]", "K[M,e]"))


def test_an_iterative_tensors_last_element_is_no_slip():
    parse((ROOT / "examples" / "fusemax" / "cascade5.attn").read_text())  # RD[M1,p]: fine


def test_size_in_another_rank_position_is_a_located_warning():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        parse(RELU.replace("Q[p,e]", "Q[E,e]"), "w.attn")
    [w] = [w for w in seen if issubclass(w.category, attnc.SpecWarning)]
    assert str(w.message).startswith("w.attn:2:15: warning: subscript 'E' of 'Q' (rank P)")


def test_every_example_parses_without_lints():
    with warnings.catch_warnings():
        warnings.simplefilter("error", attnc.SpecWarning)
        for path in sorted((ROOT / "examples").rglob("*.attn")):
            parse(path.read_text(), str(path))


def test_cli_prints_lints_on_stderr(tmp_path, capsys):
    from attnc.frontends.cli import main

    spec = tmp_path / "w.attn"
    spec.write_text(RELU.replace("Q[p,e]", "Q[E,e]"))
    assert main(["compile", str(spec), "--emit", "ir"]) == 0
    assert f"{spec}:2:15: warning: subscript 'E'" in capsys.readouterr().err
    spec.write_text(RELU.replace("Q[p,e]", "Q[p,E]"))
    assert main(["check", str(spec)]) == 2
    assert f"{spec}:2:17: error: subscript 'E' of 'Q'" in capsys.readouterr().err


# --- progress ------------------------------------------------------------------------


class _Tty:
    def __init__(self, tty):
        self.tty, self.text = tty, ""

    def isatty(self):
        return self.tty

    def write(self, s):
        self.text += s

    def flush(self):
        pass


def test_status_line_only_on_a_terminal():
    quiet = _Tty(False)
    s = Status(quiet)
    s.update("compiling")
    s.close()
    assert quiet.text == ""
    tty = _Tty(True)
    s = Status(tty)
    s.update("compiling x.attn")
    s.close()
    assert tty.text.startswith("\rattnc: compiling x.attn (0s)") and tty.text.endswith("\r")


# --- integer parameters ----------------------------------------------------------------

INT_PARAM = """attention scaled(Q[P,E], K[M,E], V[M,F], W: i32) -> AV[P,F] {
  S[p,m]  = Q[p,e] * K[m,e] * W
  AV[p,f] = S[p,m] * V[m,f]
}
"""


def test_an_integer_parameter_refuses_a_fraction_numpy(cache):
    mod = attnc.compile(INT_PARAM)
    q, k, v = _qkv(np.random.default_rng(2))
    assert np.allclose(mod.scaled(q, k, v, W=3), 3 * mod.scaled(q, k, v, W=1))
    assert np.allclose(mod.scaled(q, k, v, W=2.0), mod.scaled(q, k, v, W=2))
    with pytest.raises(TypeError, match=r"parameter 'W' is declared i32: expected a whole "
                                        r"number, got 2\.5"):
        mod.scaled(q, k, v, W=2.5)


def test_check_draws_whole_numbers_for_an_integer_parameter(tmp_path, capsys):
    from attnc.frontends.cli import main

    spec = tmp_path / "scaled.attn"
    spec.write_text(INT_PARAM)
    assert main(["check", str(spec)]) == 0
    assert main(["run", str(spec)]) == 0


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_an_integer_parameter_refuses_a_fraction_gpu(backend):
    """The torch launchers share the check (templates/common/sizes.py.jinja); the call
    site passes the declared dtype when the renderer gives it."""
    from attnc.backends import compile_module

    _, files = compile_module(parse(INT_PARAM), backend, "scaled")
    assert '_scalar(W, "W", "i32")' in files["scaled.py"]
