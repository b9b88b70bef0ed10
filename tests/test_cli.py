"""The attnc command line: outputs, exit codes, and clean errors for user mistakes."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from attnc.backends import BACKENDS, Backend
from attnc.frontends.cli import main

from conftest import EXAMPLES

CAUSAL = EXAMPLES / "causal.attn"


def run_cli(*args, cwd=None):
    """Run ``python -m attnc`` in a subprocess: what a user sees, exit code included."""
    proc = subprocess.run([sys.executable, "-m", "attnc", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def test_compile_writes_module_deterministically(tmp_path):
    assert main(["compile", str(CAUSAL), "-o", str(tmp_path / "a")]) == 0
    assert main(["compile", str(CAUSAL), "-o", str(tmp_path / "b")]) == 0
    a, b = (tmp_path / "a" / "causal.py").read_bytes(), (tmp_path / "b" / "causal.py").read_bytes()
    assert a == b and b"def causal_softmax(" in a
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["causal.py"]


def test_emit_ir_prints_the_final_cascade(capsys):
    assert main(["compile", str(CAUSAL), "--emit", "ir", "--tile", "32"]) == 0
    out = capsys.readouterr().out
    assert "let M0 = 32" in out and "RM[m1+1,p] = max(RM[m1,p], LM[m1,p])" in out
    from attnc.frontends import parse
    parse(out)


def test_emit_ir_prints_the_canonical_cascade(capsys):
    assert main(["compile", str(CAUSAL), "--emit", "ir", "--stop-after", "canonicalize"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("attention causal_softmax(")
    assert "QK[p,m] = sum[e](Q[p,e] * K[m,e] * scale)   where m <= p + M - P" in out
    from attnc.frontends import parse
    parse(out)  # the printed IR is valid .attn


def test_emit_code_prints_the_module(capsys):
    assert main(["compile", str(CAUSAL), "--emit", "code"]) == 0
    assert "def causal_softmax(Q, K, V, *, scale=None):" in capsys.readouterr().out


def test_check_passes_and_reports_errors(capsys):
    assert main(["check", str(CAUSAL)]) == 0
    out = capsys.readouterr().out
    assert "causal_softmax" in out and "AV" in out and "ok" in out


def test_check_exits_1_on_a_mismatch(capsys, monkeypatch):
    real = BACKENDS["numpy"]

    def broken(module, stem, fused=True, **lowering):
        files = real.render(module, stem, fused=fused, **lowering)
        return {k: v.replace("return _output(", "return 1.0001 * _output(") for k, v in files.items()}

    monkeypatch.setitem(BACKENDS, "broken", Backend("broken", broken, "test"))
    assert main(["check", str(CAUSAL), "--backend", "broken"]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_run_prints_a_checkable_result():
    code, out, err = run_cli("run", CAUSAL, "--size", "P=3,M=5,E=4,F=2")
    assert code == 0, err
    assert "AV[3, 2]" in out and "relative error vs the interpreter" in out


@pytest.mark.parametrize("text, needle", [
    ("attention f(Q[P,E]) -> O[P] {\n  O[p] = Q[p,e] +\n}\n", "bad.attn:2:"),
    ("attention f(Q[P,E]) -> O[P] {\n  O[p] = sum[e](Qx[p,e])\n}\n", "unknown tensor 'Qx'"),
    ("attention f(Q[P,E]) -> O[P] {\n  O[p] = sum[e](exq(Q[p,e]))\n}\n", "did you mean exp"),
])
def test_spec_errors_exit_2_without_traceback(tmp_path, text, needle):
    spec = tmp_path / "bad.attn"
    spec.write_text(text)
    for cmd in ("compile", "check", "report", "run"):
        code, out, err = run_cli(cmd, spec, cwd=tmp_path)
        assert code == 2, (cmd, err)
        assert needle in err and "Traceback" not in err
        assert "^" in err  # the caret under the source line


def test_all_errors_of_a_phase_at_once(tmp_path):
    spec = tmp_path / "two.attn"
    spec.write_text("attention f(Q[P,E]) -> O[P] {\n  A[p] = sum[e](Xa[p,e])\n"
                    "  O[p] = sum[e](Xb[p,e]) + A[p]\n}\n")
    code, _, err = run_cli("compile", spec)
    assert code == 2
    assert "two.attn:2:" in err and "two.attn:3:" in err


@pytest.mark.parametrize("args, needle", [
    (["compile", "missing.attn"], "cannot read"),
    (["compile", CAUSAL, "--backend", "fortran"], "valid backends are"),
    (["compile", CAUSAL, "--passes", "canonicalise"], "valid passes are"),
    (["report", CAUSAL, "--size", "M=lots"], "--size expects"),
    (["run", CAUSAL, "--size", "Z=3"], "not input ranks"),
])
def test_usage_errors_exit_2(args, needle, tmp_path):
    code, _, err = run_cli(*args, cwd=tmp_path)
    assert code == 2 and needle in err and "Traceback" not in err


def test_report_json_has_stages(capsys):
    assert main(["report", str(CAUSAL), "--json", "--size", "M=64,P=64,E=16,F=16"]) == 0
    report = json.loads(capsys.readouterr().out)
    text = json.dumps(report)
    assert "causal_softmax" in text and "stages" in text


def test_print_after_all_and_stop_after(capsys):
    assert main(["compile", str(CAUSAL), "--emit", "ir", "--print-after-all",
                 "--stop-after", "canonicalize"]) == 0
    out = capsys.readouterr().out
    assert "# ---- after canonicalize ----" in out


def test_check_refuses_a_lowering_stop_as_a_usage_error(capsys):
    assert main(["check", str(CAUSAL), "--backend", "triton", "--stop-after", "variants"]) == 2
    err = capsys.readouterr().err
    assert "attnc compile --stop-after variants" in err and "internal" not in err


def test_check_with_the_triton_backend(capsys):
    pytest.importorskip("triton")
    assert main(["check", str(EXAMPLES / "gqa_decode.attn"), "--backend", "triton"]) == 0
    out = capsys.readouterr().out
    assert "gqa_decode" in out and "ok" in out


def test_run_with_a_torch_backend_passes_tensors(capsys, monkeypatch):
    """`attnc run --backend triton` (was: 'must be a torch.Tensor, got ndarray', exit 70)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert main(["run", str(CAUSAL), "--backend", "triton", "--size", "P=4,M=6,E=8,F=3"]) == 0
    out = capsys.readouterr().out
    err = float(out.split("relative error vs the interpreter ")[1].split()[0])
    assert "AV[4, 3] float32" in out and err < 1e-5


def test_check_cuda_runs_emulated_or_says_how(capsys, monkeypatch, tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU: the check runs on it")
    monkeypatch.delenv("ATTNC_CUDA_EMULATE", raising=False)
    assert main(["check", str(CAUSAL), "--backend", "cuda"]) == 2
    assert "set ATTNC_CUDA_EMULATE=1" in capsys.readouterr().err
    monkeypatch.setenv("ATTNC_CUDA_EMULATE", "1")
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))
    assert main(["check", str(CAUSAL), "--backend", "cuda"]) == 0
    assert "causal_softmax" in capsys.readouterr().out
