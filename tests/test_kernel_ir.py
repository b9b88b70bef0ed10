"""The kernel IR and its lowering stages: types, rank roles, one tile-bound derivation
checked against brute force, variants, multi-kernel programs, the verifier, the CLI."""
from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnc.einsum_ir import ir
from attnc.einsum_ir.kernel import (ROW_FIRST, ROW_LAST, Buffer, KernelIRError, eval_int,
                                    print_program, verify)
from attnc.einsum_ir.types import BOOL, FLOAT, INT, TypeEnv
from attnc.frontends import parse_file
from attnc.frontends.cli import main
from attnc.passes.lowering import LOWERING_STAGES, TARGETS, lower
from attnc.passes.pipeline import run_pipeline
from attnc.passes.tile import NotTileable

from conftest import EXAMPLES, all_examples


def _lowered(path, backend="triton", tile=16, stop_after=None):
    module = parse_file(path)
    stages = run_pipeline(module, None, options={"tile": tile})
    names = [n for n, _ in stages]
    source = stages[names.index("online") - 1][1]
    d = stages[-1][1].definitions[0]
    return lower(d, TARGETS[backend], {"tile": tile}, source[d.name], stop_after=stop_after)


# --- types -------------------------------------------------------------------------------

def test_expression_types_follow_the_contract():
    defn = parse_file(EXAMPLES / "document_mask.attn").definitions[0]
    env = TypeEnv(defn)
    E, m, two = ir.Size("E"), ir.Index("M"), ir.Num(2)
    assert env.of(E) == INT and env.of(m) == INT and env.of(two) == INT
    assert env.of(ir.Call("sqrt", (E,))) == FLOAT
    assert env.of(ir.Binary("/", E, two)) == FLOAT, "true division"
    assert env.of(ir.Binary("//", E, two)) == INT
    assert env.of(ir.Binary("*", E, ir.Num(0.5))) == FLOAT
    assert env.of(ir.Binary("**", E, two)) == INT and env.of(ir.Binary("**", E, ir.Num(-1))) == FLOAT
    assert env.of(ir.Binary("<", m, E)) == BOOL
    assert env.of(ir.Access("DQ", (ir.Index("P"),))) == INT, "an i32 tensor's elements"
    assert env.of(ir.Access("Q", (ir.Index("P"), ir.Index("E")))) == FLOAT
    assert env.of(ir.Reduce("sum", ("M",), ir.Binary("<", m, E))) == INT, "a count"
    assert env.of(ir.Call("select", (ir.Binary("<", m, E), E, ir.Num(1.5)))) == FLOAT


# --- roles, bounds, variants ---------------------------------------------------------------

def test_gqa_heads_are_packed_for_triton_only():
    triton = _lowered(EXAMPLES / "gqa_decode.attn", "triton")
    cuda = _lowered(EXAMPLES / "gqa_decode.attn", "cuda")
    pk = triton.kernels[0].roles.packing
    assert pk is not None and (pk.rank, pk.group, pk.units) == ("H", "G", "HK")
    assert cuda.kernels[0].roles.packing is None
    assert [v.kind for v in triton.variants] == ["streamed", "split-k", "stream-k"]


@pytest.mark.parametrize("path", all_examples(), ids=lambda p: p.name)
def test_one_bound_derivation_for_every_target(path):
    """Triton and CUDA render the same tile bounds: one derivation (bound-tiles)."""
    try:
        a, b = (_lowered(path, t, stop_after="bound-tiles") for t in ("triton", "cuda"))
    except NotTileable:
        pytest.skip("not a kernel program")
    assert [k.bounds for k in a.kernels] == [k.bounds for k in b.kernels]


def _holds(cond, env):
    """Evaluate an affine/boolean guard over plain ints (index variables lowercase)."""
    if isinstance(cond, ir.Binary):
        a, b = _holds(cond.left, env), _holds(cond.right, env)
        return {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b, "//": lambda: a // b,
                "<": lambda: a < b, "<=": lambda: a <= b, ">": lambda: a > b, ">=": lambda: a >= b,
                "==": lambda: a == b, "!=": lambda: a != b, "and": lambda: a and b,
                "or": lambda: a or b}[cond.op]()
    if isinstance(cond, ir.Unary):
        x = _holds(cond.operand, env)
        return -x if cond.op == "-" else not x
    if isinstance(cond, ir.Num):
        return cond.value
    if isinstance(cond, ir.Index):
        return env["_" + cond.rank]
    if isinstance(cond, ir.Size):
        return env[cond.rank]
    if isinstance(cond, ir.Param):
        return env["param_" + cond.name]
    if isinstance(cond, ir.Access):  # a per-program element (L[b]): its value by its read
        return env[cond]
    raise TypeError(cond)


BOUNDED = ["causal.attn", "sliding_window.attn", "sinks_window.attn", "prefix_lm.attn",
           "alibi.attn", "mqa_decode.attn"]


@settings(max_examples=60, deadline=None)
@given(which=st.sampled_from(BOUNDED), P=st.integers(1, 40), M=st.integers(1, 70),
       block=st.sampled_from([4, 16]), first=st.integers(0, 39), tile=st.sampled_from([4, 16]),
       number=st.one_of(st.integers(0, 80).map(float), st.floats(0.0, 80.0)))
def test_live_and_full_tiles_agree_with_brute_force(which, P, M, block, first, tile, number):
    """Live tiles contain every tile some update may change; full tiles need no mask.
    A parameter (a window, a sink count) is ``number``: whole and fractional, so that a
    float bound falls on tile edges and inside tiles."""
    program = _lowered(EXAMPLES / which, "triton", tile=tile, stop_after="bound-tiles")
    k = program.kernels[0]
    r = k.roles
    first = min(first, P - 1)
    last = min(first + block, P) - 1
    keys = {"M": M, "P": P}[k.tiles.stream_rank]  # prefix_lm's keys are its queries (let M = P)
    env = {"M": keys, "P": P, "H": 2, "E": 8, "F": 8, r.tile: tile, r.loop: -(-keys // tile),
           ROW_FIRST: first, ROW_LAST: last, f"BLOCK_{r.tile}": tile}
    _check_tile_ranges(which, k, env, number, range(first, last + 1), first_tile=0)


@settings(max_examples=60, deadline=None)
@given(which=st.sampled_from(["paged_decode.attn", "paged_prefill.attn"]),
       P=st.integers(1, 20), NB=st.integers(1, 6), PG=st.sampled_from([1, 3, 16]),
       length=st.integers(-3, 110), block=st.sampled_from([4, 16]), first=st.integers(0, 19),
       tile=st.sampled_from([4, 16]))
def test_tile_ranges_from_a_sequence_length_agree_with_brute_force(which, P, NB, PG, length,
                                                                    block, first, tile):
    """A sequence's length ``L[b]`` (one value per program) bounds its tiles: live tiles
    hold every key ``m < L[b]`` (decode) or ``m <= L[b] - P + p`` (prefill) of the block,
    full ones only keys inside the cache's pages where the ``where`` holds, for lengths
    past the pages, 0 and negative."""
    program = _lowered(EXAMPLES / which, "triton", tile=tile, stop_after="bound-tiles")
    k = program.kernels[0]
    r = k.roles
    elements = dict(k.bounds.elements)
    assert list(elements) == ["L[b]"], "the length bounds the tiles (no per-tile probe)"
    assert not k.bounds.live_probes and not k.bounds.full_probes
    rows = range(min(first, P - 1), min(min(first, P - 1) + block, P)) if r.row == "P" else [0]
    M = NB * PG
    env = {"M": M, "NB": NB, "PG": PG, "P": P, "H": 2, "HK": 1, "G": 2, "E": 8, "F": 8,
           r.tile: tile, r.loop: -(-M // tile), ROW_FIRST: rows[0], ROW_LAST: rows[-1],
           f"BLOCK_{r.tile}": tile, "_L[b]": length, elements["L[b]"]: length}
    _check_tile_ranges(which, k, env, 1.0, rows, first_tile=0)


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 90), start=st.integers(0, 40), length=st.integers(-3, 60),
       block=st.sampled_from([4, 16]), first=st.integers(0, 89), tile=st.sampled_from([4, 16]))
def test_packed_sequences_visit_only_their_causal_tiles(T, start, length, block, first, tile):
    """Packed variable-length prefill: the sequence's offsets ``CU[b]`` and ``CU[b + 1]``
    are one value per program (inside ``CU[C]``, as ``let B = C - 1`` shows), so the causal
    atom bounds the tiles and ``p < CU[b + 1] - CU[b]`` leaves a block of rows past its
    sequence no tile: every tile an update may change is live, every full tile holds the
    ``where``, whatever the offsets (lengths 0 and negative included)."""
    from attnc.einsum_ir.exprs import walk

    program = _lowered(EXAMPLES / "varlen_prefill.attn", "triton", tile=tile,
                       stop_after="bound-tiles")
    k = program.kernels[0]
    r = k.roles
    assert k.bounds.live is not None, "the causal atom bounds the tiles"
    first = min(first, T - 1)
    rows = range(first, min(first + block, T))
    env = {"M": T, "P": T, "T": T, "H": 2, "HK": 1, "G": 2, "E": 8, "F": 8, r.tile: tile,
           r.loop: -(-T // tile), ROW_FIRST: rows[0], ROW_LAST: rows[-1],
           f"BLOCK_{r.tile}": tile}
    for _, guards in k.tiles.guards:
        for g in guards:
            for n in walk(g.cond):
                if isinstance(n, ir.Access) and n.tensor == "CU":
                    env[n] = start + (length if n.subscripts[0] != ir.Index("B") else 0)
    for name, acc in k.bounds.elements:  # CU[b] and CU[b + 1]: one value per program
        env["_" + name] = env[acc]
    assert {name for name, _ in k.bounds.elements} == {"CU[b]", "CU[b + 1]"}
    _check_tile_ranges("varlen_prefill.attn", k, env, 1.0, rows, first_tile=0)


def _check_tile_ranges(which, k, env, number, rows, first_tile: int) -> None:
    """Brute force over every tile, key and row of one row block: the live range holds
    every tile an update may change, the full range only tiles inside the keys (tile
    ``first_tile + t`` of them) where every ``where`` holds.  A parameter without a
    default over sizes takes ``number``."""
    r, tp = k.roles, k.tiles
    tile = env[r.tile]
    for q in tp.cascade.scalar_params:  # defaults over sizes (1/sqrt(E)), else ``number``
        sized = q.default is not None and q.default.free_symbols
        value = q.default.subs({s: env[s.name] for s in q.default.free_symbols}) if sized else number
        env[f"param_{q.name}"] = float(value)
    tiles = env[r.loop]
    affine = [[g for g in gs if g.exists <= {r.tile}] for _, gs in tp.guards]
    live = set()
    for t in range(tiles):
        for m0, p in itertools.product(range(tile), rows):
            point = dict(env, **{"_" + r.loop: t, "_" + r.tile: m0, "_" + r.row: p})
            if any(all(_holds(g.cond, point) for g in gs) for gs in affine):
                live.add(t)
                break
    b = k.bounds
    if b.live is not None:
        lo, hi = eval_int(b.live.lo, env), eval_int(b.live.hi, env)
        assert live <= set(range(lo, hi)), (which, lo, hi, sorted(live))
    if b.full is not None and not b.full_probes:
        lo, hi = eval_int(b.full.lo, env), eval_int(b.full.hi, env)
        for t in range(max(lo, 0), min(hi, tiles)):
            for m0, p in itertools.product(range(tile), rows):
                point = dict(env, **{"_" + r.loop: t, "_" + r.tile: m0, "_" + r.row: p})
                assert (first_tile + t) * tile + m0 < env["M"], "a full tile lies inside the keys"
                assert all(_holds(w, point) for w in b.full_holds), (which, t, m0, p)


_FULLY_LOWERED: dict = {}


@settings(max_examples=60, deadline=None)
@given(which=st.sampled_from(BOUNDED + ["mha.attn"]), P=st.integers(1, 40),
       M=st.integers(1, 90), block=st.sampled_from([4, 16]), first=st.integers(0, 39),
       tile=st.sampled_from([4, 16]), workers=st.integers(1, 5), worker=st.integers(0, 4),
       number=st.one_of(st.integers(0, 80).map(float), st.floats(0.0, 80.0)))
def test_split_worker_tiles_agree_with_brute_force(which, P, M, block, first, tile, workers,
                                                    worker, number):
    """A split-K worker's tile ``mt`` is tile ``w*MT + mt`` of the keys: its live range
    holds every tile an update of its rows may change, its full range only tiles inside
    the keys where every ``where`` holds, at the worker's own offset."""
    key = (which, tile)
    if key not in _FULLY_LOWERED:
        _FULLY_LOWERED[key] = _lowered(EXAMPLES / which, "triton", tile=tile)
    program = _FULLY_LOWERED[key]
    split = next(v for v in program.variants if v.kind == "split-k")
    k = next(x for x in program.kernels if x.name == split.kernels[0])
    r = k.roles
    assert r.tile is not None, "the worker streams tiles of keys"
    first, worker = min(first, P - 1), min(worker, workers - 1)
    last = min(first + block, P) - 1
    M = {"M": M, "P": P}[k.tiles.stream_rank]  # prefix_lm's keys are its queries
    m1 = -(-M // tile)
    env = {"M": M, "P": P, "H": 2, "E": 8, "F": 8, r.tile: tile, "M1": m1, "W": workers,
           r.loop: -(-m1 // workers), "_" + r.grid[0]: worker, ROW_FIRST: first,
           ROW_LAST: last, f"BLOCK_{r.tile}": tile}
    _check_tile_ranges(which, k, env, number, range(first, last + 1),
                       first_tile=worker * env[r.loop])


@pytest.mark.parametrize("spec,extra", [("sliding_window", {}), ("sinks_window", {"sinks": 5.0}),
                                        ("sinks_window", {"sinks": 20.5})],
                         ids=["window", "sinks5", "sinks20.5"])
@pytest.mark.parametrize("backend", ["numpy", "triton", "cuda"])
def test_windows_wider_than_a_tile_run_their_full_tiles_unmasked_and_right(backend, spec, extra,
                                                                           monkeypatch):
    """Windows of 33 to 47.25 keys over tiles of 16: every row block has tiles wholly
    inside its window (the unmasked loop) between masked ones at both ends; fractional and
    whole windows, ragged P and M, against the interpreter.  With sink keys (`m < sinks
    or` the window) the window's tiles run unmasked and the sink tiles masked."""
    import shutil
    import warnings

    import numpy as np

    torch = pytest.importorskip("torch")
    import attnc
    from attnc.backends.check import relative_error
    from attnc.einsum_ir.interpreter import interpret

    if backend == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    if backend == "cuda":
        if not (shutil.which("g++") or shutil.which("c++")):
            pytest.skip("no C++ compiler for the CUDA host emulation")
        monkeypatch.setenv("ATTNC_CUDA_EMULATE", "1")
    path = EXAMPLES / f"{spec}.attn"
    defn = parse_file(path).definitions[0]
    fn = getattr(attnc.compile(str(path), backend=backend, tile=16), spec)
    rng = np.random.default_rng(9)
    for P, M, window in ((90, 101, 33.0), (77, 77, 40.5), (64, 130, 47.25), (100, 100, 32.0)):
        Q, K, V = (rng.standard_normal((n, 8)) for n in (P, M, M))
        want = interpret(defn, Q, K, V, window=window, **extra)
        args = [torch.from_numpy(x).float() for x in (Q, K, V)] if backend != "numpy" else (Q, K, V)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = fn(*args, window=window, **extra)
        got = got.double().numpy() if backend != "numpy" else got
        assert relative_error(got, want) < 1e-5, (P, M, window)


# --- multi-kernel programs ------------------------------------------------------------------

def test_linear_attention_is_two_kernels_joined_by_small_buffers():
    p = _lowered(EXAMPLES / "linear.attn", "cuda")
    assert len(p.parts) == 2
    assert {b.name for b in p.buffers} == {"KV", "KS", "KV_present", "KS_present"}
    assert all(set(b.ranks) <= {"E", "F"} for b in p.buffers), "no buffer over a long rank"
    first, second = p.parts
    assert first.kernels[0].tiles.stream_rank == "M" and second.kernels[0].roles.row == "P"
    assert "split-k" in [v.kind for v in first.variants], "K^T V splits over workers"
    text = print_program(p)
    assert "program linear_attention__k0" in text and "KV_read" in text and "KV_present" in text


def test_two_kernel_program_keeps_absence_across_the_buffer(tmp_path):
    """M = 0: K^T V is absent, so the output is 0 (the contract), not 0/0."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    from attnc.backends import compile_module, load_generated, write_atomic

    spec = tmp_path / "linear_m0.attn"  # its own name: one custom op per compiled IR and process
    spec.write_text((EXAMPLES / "linear.attn").read_text().replace("linear_attention", "linear_m0"))
    _, files = compile_module(parse_file(spec), "triton", "linear_m0")
    for name, text in files.items():
        write_atomic(tmp_path / name, text)
    gen = load_generated(tmp_path / "linear_m0.py")
    Q = torch.randn(3, 8)
    out = gen.linear_m0(Q, torch.randn(0, 8), torch.randn(0, 5))
    assert out.shape == (3, 5) and not torch.isnan(out).any() and (out == 0).all()
    K, V = torch.randn(7, 8), torch.randn(7, 5)
    got = gen.linear_m0(Q, K, V)
    phi = lambda x: torch.where(x > 0, x + 1, torch.exp(x))  # noqa: E731
    want = (phi(Q) @ (phi(K).T @ V)) / (phi(Q) @ phi(K).sum(0))[:, None]
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_form_the_target_cannot_take_is_replaced_visibly(capsys, monkeypatch):
    """A target that runs no multi-kernel programs cannot take causal linear attention's
    chunked form (a program of kernels): the form without reassociate is compiled, and
    every output says so (Triton and CUDA run the chunked program:
    tests/test_chunked_kernels.py)."""
    import dataclasses

    from attnc.passes import lowering

    one_kernel = dataclasses.replace(lowering.TARGETS["cuda"], multi_kernel=False)
    monkeypatch.setitem(lowering.TARGETS, "cuda", one_kernel)
    path = str(EXAMPLES / "linear_causal.attn")
    assert main(["compile", path, "--backend", "cuda", "--emit", "kernel"]) == 0
    out = capsys.readouterr().out
    assert "cannot take the reassociated form" in out and "compiling the cascade without" in out
    assert main(["compile", path, "--backend", "cuda", "--emit", "ir"]) == 0
    ir_text = capsys.readouterr().out
    assert "PFKV" not in ir_text and "RAV_sum" in ir_text, "--emit ir prints the compiled form"
    assert main(["compile", path, "--backend", "triton", "--emit", "ir"]) == 0
    assert "PFKV" in capsys.readouterr().out


# --- the verifier and the CLI ---------------------------------------------------------------

def test_the_verifier_rejects_broken_programs():
    p = dataclasses.replace(_lowered(EXAMPLES / "causal.attn"), variants=())
    k = p.kernels[0]
    bad = dataclasses.replace(k, writes=(Buffer("NOPE", ("P",), "output"),))
    with pytest.raises(KernelIRError, match="never computes"):
        verify(dataclasses.replace(p, kernels=(bad,)))
    with pytest.raises(KernelIRError, match="share a name"):
        verify(dataclasses.replace(p, kernels=(k, k)))
    roles = dataclasses.replace(k.roles, grid=("P",))
    with pytest.raises(KernelIRError, match="both grid and vector"):
        verify(dataclasses.replace(p, kernels=(dataclasses.replace(k, roles=roles),)))


@pytest.mark.parametrize("stage", LOWERING_STAGES)
def test_cli_stops_after_each_lowering_stage(stage, capsys):
    assert main(["compile", str(EXAMPLES / "causal.attn"), "--backend", "triton",
                 "--stop-after", stage]) == 0
    out = capsys.readouterr().out
    assert out.startswith("program causal_softmax:")
    assert ("grid (" in out) == (stage != "tile")
    assert ("live tiles" in out) == (stage in ("bound-tiles", "variants"))
    assert ("variant split-k" in out) == (stage == "variants")


def test_print_after_all_shows_cascade_and_lowering_stages(capsys):
    assert main(["compile", str(EXAMPLES / "causal.attn"), "--backend", "cuda",
                 "--print-after-all", "--emit", "kernel"]) == 0
    out = capsys.readouterr().out
    order = ["after canonicalize", "after online", "after tile", "after map-ranks",
             "after bound-tiles", "after variants"]
    positions = [out.index(f"# ---- {s} ----") for s in order]
    assert positions == sorted(positions)


@pytest.mark.parametrize("path", all_examples(), ids=lambda p: p.name)
def test_emit_kernel_for_every_example(path, capsys):
    code = main(["compile", str(path), "--backend", "triton", "--emit", "kernel"])
    out = capsys.readouterr()
    if code != 0:
        assert "cannot compile" in out.err, out.err
        return
    assert out.out.startswith("program ") and "kernel " in out.out


# --- numpy renders the kernel program ----------------------------------------------------

def test_numpy_runs_a_multi_kernel_program_part_by_part(tmp_path):
    """Linear attention on numpy is the same two-kernel program as on the GPUs (K^T V
    first, O(M)): one function per part and a chain; float64 stays float64 across the
    buffer, and M = 0 gives 0, not 0/0."""
    import numpy as np

    from attnc.backends import compile_module, load_generated, write_atomic

    _, files = compile_module(parse_file(EXAMPLES / "linear.attn"), "numpy", "linear_np")
    text = files["linear_np.py"]
    assert "def linear_attention__k0(" in text and "def linear_attention__k1(" in text
    write_atomic(tmp_path / "linear_np.py", text)
    gen = load_generated(tmp_path / "linear_np.py")
    rng = np.random.default_rng(0)
    Q, K, V = rng.standard_normal((2, 5, 8)), rng.standard_normal((2, 300, 8)), rng.standard_normal((2, 300, 3))
    phi = lambda x: np.where(x > 0, x + 1, np.exp(x))  # noqa: E731
    want = (phi(Q) @ (np.swapaxes(phi(K), -1, -2) @ V)) / (phi(Q) @ phi(K).sum(-2)[..., None])
    got = gen.linear_attention(Q, K, V)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-12)
    empty = gen.linear_attention(Q, K[:, :0], V[:, :0])
    assert not np.isnan(empty).any() and (empty == 0).all()


def test_no_backend_derives_bounds_or_roles_of_its_own():
    """Tile bounds, rank roles and variant plans come from the lowering stages: no
    backend imports the derivations (``attnc.passes.tile``'s guard algebra, map-ranks'
    classification, the variant builders)."""
    import ast

    import attnc.backends as backends

    derivations = {"atom_bound", "conjunctions", "update_guards", "classify_ranks",
                   "head_packing", "build_variants", "combine_program", "tile_program"}
    for path in Path(backends.__file__).parent.glob("*.py"):
        imported = {a.name for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, ast.ImportFrom) for a in node.names}
        assert not imported & derivations, (path.name, sorted(imported & derivations))


def test_a_part_that_cannot_size_its_loop_is_not_a_kernel(tmp_path):
    """Gated linear attention's chunked cumulative gate: the part computing the prefix over
    T (let T = M) reads only the chunk states, which do not give T's size: no multi-kernel
    program (numpy runs it per Einsum, exactly; it crashed with an unbound T before)."""
    import numpy as np

    from attnc.backends import compile_module, load_generated, write_atomic
    from attnc.backends.check import check_definition
    from attnc.frontends import parse

    spec = """
attention gla_parts(Q[P,E], K[M,E], V[M,F], LG[M]) -> O[P,F] {
  let T = M
  CG[t]   = sum[m](LG[m])   where m <= t
  S[p,m]  = Q[p,e] * K[m,e] * exp(CG[p + M - P] - CG[m])   where m <= p + M - P
  O[p,f]  = S[p,m] * V[m,f]
}"""
    module = parse(spec, "gla_parts.attn")
    with pytest.raises(NotTileable, match="would iterate T"):
        # small sizes: the cost model keeps the quadratic form (not the chunked scan)
        run = run_pipeline(module, options={"tile": 4, "sizes": {"P": 16, "M": 16}})
        stages = [n for n, _ in run]
        lower(run[-1][1].definitions[0], TARGETS["cuda"], {"tile": 4},
              run[stages.index("online") - 1][1].definitions[0])
    _, files = compile_module(module, "numpy", "gla_parts", options={"tile": 4})
    write_atomic(tmp_path / "gla_parts.py", files["gla_parts.py"])
    fn = load_generated(tmp_path / "gla_parts.py").gla_parts
    assert all(r.ok for r in check_definition(module.definitions[0], fn, seed=2))
    assert np.isfinite(fn(np.ones((2, 3)), np.ones((5, 3)), np.ones((5, 2)), -np.ones(5))).all()


def test_a_head_dim_the_kernel_contracts_is_held_whole_not_split_into_row_blocks(tmp_path):
    """A key-major kernel over a saved ``D[P,M]`` (``M`` innermost: a head dim by the
    argument-layout rule, so one key per program) took the head dim ``e`` as its row:
    each program summed the scores ``S = sum[e](Q * K)`` over its block of ``e`` only,
    wrong once E exceeded a row block (E = 40 here; 32-row blocks on the CPU).  A row
    rank a statement contracts is now held whole (no row rank), and the Triton
    interpreter agrees with the Einsum interpreter."""
    import numpy as np

    pytest.importorskip("torch")
    from attnc.backends import compile_module, load_generated, write_atomic
    from attnc.backends.check import random_call, torch_caller
    from attnc.einsum_ir.interpreter import interpret
    from attnc.frontends import parse

    spec = """
attention keys_by_head(Q[P,E], K[M,E], D[P,M]) -> dK[M,E] {
  S[p,m] = Q[p,e] * K[m,e]
  dS[p,m] = D[p,m] * S[p,m]   where m <= p
  dK[m,e] = dS[p,m] * Q[p,e]
}"""
    module = parse(spec, "keys_by_head.attn")
    lowered = []
    _, files = compile_module(module, "triton", "keys_by_head", options={"tile": 16},
                              after_lowering=lambda stage, p: lowered.append(p))
    program = lowered[-1].programs[0] if hasattr(lowered[-1], "programs") else lowered[-1]
    roles = program.kernels[0].roles
    assert roles.row is None and "E" in roles.vector, roles
    for fname, text in files.items():
        write_atomic(tmp_path / fname, text)
    fn = load_generated(tmp_path / "keys_by_head.py").keys_by_head
    defn = module.definitions[0]
    args, _ = random_call(defn, np.random.default_rng(0), {"P": 37, "M": 29, "E": 40})
    got = torch_caller(fn, "cpu")(*args)
    want = interpret(defn, *args)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


OUTPUT_BEFORE_THE_LOOP = """
attention d(Q[E], K[E,P]) -> (T4, T1) {
  T1 = min[p](K[0, p] * 2)
  T4 = min[e](K[e, 0] * Q[e])
}
"""


@pytest.mark.parametrize("backend", ["numpy", "triton", "cuda"])
def test_an_output_made_before_the_loop_is_stored_by_the_combine(backend, monkeypatch):
    """``T1`` reads no tile of the loop over ``e``: the prologue makes it.  The split and
    stream-K combines store every output, so they recompute it (before: 'kernel
    d_split_combine stores T1, which it never computes', a KernelIRError found by
    ``python -m tests.fuzz``).  Each backend's variants against the interpreter."""
    import tempfile

    from attnc.backends import compile_module, load_generated, write_atomic
    from attnc.backends.check import check_definition, torch_caller
    from attnc.frontends import parse

    if backend != "numpy":
        pytest.importorskip("torch")
    monkeypatch.setenv("ATTNC_CUDA_EMULATE", "1")
    module = parse(OUTPUT_BEFORE_THE_LOOP)
    program = lower(run_pipeline(module, None, options={"tile": 16})[-1][1].definitions[0],
                    TARGETS[backend if backend != "numpy" else "triton"], {"tile": 16})
    combine = next(k for k in program.kernels if k.role == "combine")
    assert "T1" in {st.tensor for st in combine.tiles.prologue}
    with tempfile.TemporaryDirectory() as tmp:
        _, files = compile_module(module, backend, "mod", options={"tile": 16})
        for name, text in files.items():
            write_atomic(Path(tmp) / name, text)
        fn = load_generated(Path(tmp) / "mod.py").d
        if backend != "numpy":
            fn = torch_caller(fn, "cpu")
        for variant in (None, ("ATTNC_SPLIT", "3"), ("ATTNC_STREAM_K", "5")):
            if variant:
                monkeypatch.setenv(*variant)
            rows = check_definition(module.definitions[0], fn, seed=4,
                                    tolerance=1e-9 if backend == "numpy" else 1e-4)
            assert all(r.ok for r in rows), [(r.output, r.rel_error) for r in rows]
