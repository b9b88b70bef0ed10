"""The chunked form as kernels: per-chunk states, a scan over chunks, the output kernel.

``chunked`` (tests/test_chunked.py) writes causal, softmax-free sums as chunk-local states
``LKV[m1,e,f]``, a scan ``SKV[m1+1] = decay * SKV[m1] + LKV[m1]`` whose every step is stored
(``PKV[m1,e,f]``), an output kernel per chunk (its queries against its keys and the state at
its start, as matrix products of tiles) and a last kernel that puts the queries back in
order.  Triton and CUDA run the same program.  Each is checked against the interpreter on
ragged lengths over several chunks, with a KV-cache offset (P < M) and batch dims.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")
import torch  # noqa: E402

from attnc.backends import compile_module, load_generated, lower_stages, write_atomic  # noqa: E402
from attnc.einsum_ir.interpreter import interpret  # noqa: E402
from attnc.einsum_ir.ir import Module  # noqa: E402
from attnc.frontends import parse_file  # noqa: E402
from attnc.passes.pipeline import run_pipeline  # noqa: E402

from conftest import EXAMPLES as EXAMPLES_DIR  # noqa: E402
from test_chunked import forced, inputs  # noqa: E402

LONG = {"P": 4096, "M": 4096, "E": 64, "F": 64}  # sizes at which the cost model chunks


def _module(name: str, chunk: int, backend: str, tmp_path):
    """The example compiled from its chunked form (chunks of ``chunk`` keys)."""
    defn = forced(name, chunk)
    _, files = compile_module(Module((defn,)), backend, name, names=["online", "stream-final"],
                              options={"tile": 16})
    for fname, text in files.items():
        write_atomic(tmp_path / fname, text)
    return getattr(load_generated(tmp_path / f"{name}.py"), defn.name), defn


@pytest.mark.parametrize("backend_env", ["triton", "cuda"], indirect=True)
@pytest.mark.parametrize("name", ["retention", "gla", "linear_causal", "rwkv"])
def test_chunked_kernels_match_the_interpreter(name, backend_env, tmp_path):
    fn, defn = _module(name, 16, backend_env, tmp_path)
    for P, M, batch, seed in [(37, 37, (), 0), (21, 53, (2,), 1), (16, 16, (), 2), (5, 70, (), 3)]:
        args = inputs(name, P, M, E=5, F=3, batch=batch, seed=seed)
        want = interpret(defn, *args)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = fn(*[torch.from_numpy(a).float() for a in args]).double().numpy()
        np.testing.assert_array_equal(got == 0, want == 0, err_msg=f"{name} P={P} M={M}")
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5 * np.abs(want).max(),
                                   err_msg=f"{name} P={P} M={M}")


@pytest.mark.parametrize("name", ["retention", "gla"])
def test_the_default_pipeline_runs_the_chunked_program_on_triton(name):
    module = parse_file(EXAMPLES_DIR / f"{name}.attn")
    options = {"tile": 64, "sizes": LONG}
    program = lower_stages(run_pipeline(module, None, None, None, options), "triton",
                           options).programs[0]
    scans = [k for k in program.kernels if k.roles.loop == "M1"]
    assert len(program.parts) >= 3 and len(scans) == 1
    assert "PKV" in {b.name for b in scans[0].writes}, "the scan stores the state of every chunk"
    per_chunk = [k for k in program.kernels if "LKV" in {b.name for b in k.writes}]
    assert per_chunk and per_chunk[0].roles.grid == ("M1",), "one program per chunk"


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_the_chunk_major_output_kernel_multiplies_tiles(backend):
    """The output kernel runs one program per chunk: its queries against the chunk's keys
    and the state at its start are matrix products of tiles (no per-query gathers), so
    CUDA's shared tiles hold it, and its queries are read back in order by a last kernel."""
    module = parse_file(EXAMPLES_DIR / "retention.attn")
    options = {"tile": 64, "sizes": LONG}
    program = lower_stages(run_pipeline(module, None, None, None, options), backend,
                           options).programs[0]
    assert not any("without 'reassociate'" in n for n in program.notes)
    out = next(k for k in program.kernels if "O_chunks" in {b.name for b in k.writes})
    assert out.roles.grid == ("M1",) and "P" not in out.roles.vector
    last = program.kernels[-1]
    assert [b.name for b in last.writes] == ["O"] and last.roles.row == "P"


CHUNK_GATHER = """
attention chunk_gather(Q[P,E], K[M,E], V[M,F]) -> O[P,F] {
  let M0 = 16
  S[p,m0] = Q[p,e] * K[p // M0 * M0 + m0, e]
  O[p,f] = S[p,m0] * V[p // M0 * M0 + m0, f]
}
"""


def test_cuda_refuses_a_gather_over_three_block_ranks(tmp_path):
    """Written per query, each query's chunk of keys is a rows × chunk × head-dim gather:
    Triton takes it, CUDA refuses it with the reason (its operands live in shared tiles)."""
    from attnc.frontends import parse

    module = parse(CHUNK_GATHER, "chunk_gather.attn")
    options = {"tile": 64}
    stages = run_pipeline(module, None, None, None, options)
    assert lower_stages(stages, "triton", options).programs[0].kernels
    with pytest.raises(Exception, match="gathers K over 3 block ranks"):
        lower_stages(stages, "cuda", options)

# --- the recurrent decode step: one token, the state in and out -------------------------------

STEPS = """
attention retention_step(Q[E], K[E], V[F], ST[F,E], gamma = 0.96875) -> (O[F], STN[F,E]) {
  STN[f,e] = gamma * ST[f,e] + K[e] * V[f]
  O[f] = Q[e] * STN[f,e]
}

attention gla_step(Q[E], K[E], V[F], LG, ST[F,E]) -> (O[F], STN[F,E]) {
  STN[f,e] = exp(LG) * ST[f,e] + K[e] * V[f]
  O[f] = Q[e] * STN[f,e]
}

attention rwkv_step(R[E], K[E], V[F], WD[E], U[E], ST[F,E]) -> (O[F], STN[F,E]) {
  O[f] = R[e] * (ST[f,e] + U[e] * K[e] * V[f])
  STN[f,e] = exp(-exp(WD[e])) * ST[f,e] + K[e] * V[f]
}
"""


def _steps(backend: str, tmp_path):
    from attnc.frontends import parse

    _, files = compile_module(parse(STEPS, "steps.attn"), backend, "steps", options={"tile": 16})
    for fname, text in files.items():
        write_atomic(tmp_path / fname, text)
    return load_generated(tmp_path / "steps.py")


@pytest.mark.parametrize("backend", ["numpy", "triton", "cuda"])
def test_decode_steps_token_by_token_give_the_parallel_form(backend, tmp_path, monkeypatch):
    """A one-token step (the state before the token in, after it out) run over a sequence,
    the state carried, equals the example's parallel form at every query: retention, GLA
    (its gate a scalar parameter per call) and RWKV (the bonus on the current token).  The
    state is ``ST[F,E]``, the head dim it sums over innermost: kernels block the value dim
    into rows (as flash-linear-attention's recurrent kernels split V) and hold E whole."""
    if backend == "cuda":
        monkeypatch.setenv("ATTNC_CUDA_EMULATE", "1")
        monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path / "cache"))
    steps = _steps(backend, tmp_path)
    T, E, F = 9, 5, 3
    to = (lambda a: a) if backend == "numpy" else (lambda a: torch.from_numpy(a).float())
    back = (lambda x: np.asarray(x)) if backend == "numpy" else (lambda x: x.double().numpy())
    for name in ("retention", "gla", "rwkv"):
        args = inputs(name, T, T, E=E, F=F, seed=5)
        want = interpret(parse_file(EXAMPLES_DIR / f"{name}.attn").definitions[0], *args)
        fn, state, got = getattr(steps, f"{name}_step"), to(np.zeros((F, E))), []
        for t in range(T):
            token = [to(np.ascontiguousarray(a[t])) for a in args[:3]]
            if name == "gla":
                o, state = fn(*token, state, LG=float(args[3][t]))
            elif name == "rwkv":
                o, state = fn(*token, to(args[3]), to(args[4]), state)
            else:
                o, state = fn(*token, state)
            got.append(back(o))
        np.testing.assert_allclose(np.stack(got), want, rtol=2e-5,
                                   atol=2e-6 * np.abs(want).max(), err_msg=name)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_infini_attention_runs_its_memory_by_segments_and_streams_its_segment(backend):
    """examples/infini.attn: the compressive memory's two sums become per-segment states
    (chunks of the let L, one program per segment), and the local softmax one streamed
    kernel whose live key tiles are the query block's segment (tests/test_triton_backend.py
    and tests/test_cuda_backend.py run it against its reference)."""
    module = parse_file(EXAMPLES_DIR / "infini.attn")
    options = {"tile": 16}
    program = lower_stages(run_pipeline(module, None, None, None, options), backend,
                           options).programs[0]
    lets = {let.name: let.value for let in program.cascade.lets}
    chunks = [k for k in program.kernels if any(b.name.endswith("_chunks") for b in k.writes)]
    assert len(chunks) == 2
    for k in chunks:  # M1 = ceil(M/M0) with M0 = L: one program per segment
        (count,) = k.roles.grid
        (size,) = [s.name for s in lets[count].free_symbols if s.name != "M"]
        assert str(lets[size]) == "L", lets
    (local,) = [k for k in program.kernels if k.role == "streamed"
                and [b.name for b in k.writes] == ["O"]]
    assert local.roles.row == "P" and local.bounds.live is not None


def test_a_decode_step_with_the_summed_rank_outer_is_refused_with_the_way_out():
    """``ST[E,F]`` beside ``Q[E]``: kernels read Q as a row statistic of the state, so E is a
    sequence rank whose sum has no loop; the reason names it and the layout that compiles
    (numpy compiles either)."""
    from attnc.frontends import parse

    text = STEPS.split("\n\n")[0].replace("ST[F,E]", "ST[E,F]").replace("STN[F,E]", "STN[E,F]")
    text = text.replace("STN[f,e]", "STN[e,f]").replace("ST[f,e]", "ST[e,f]")
    module = parse(text, "step.attn")
    compile_module(module, "numpy", "step")
    for backend in ("triton", "cuda"):
        with pytest.raises(Exception, match=r"O sums over E, which kernels take for a sequence "
                           r"rank: Q\[E\] reads as a row statistic of ST\[E,F\]"):
            compile_module(module, backend, "step")
