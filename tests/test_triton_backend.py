"""The Triton backend under TRITON_INTERPRET=1: every example against the interpreter."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from attnc.backends import compile_module as compile_triton  # noqa: E402
from attnc.backends import load_generated, write_atomic  # noqa: E402
from attnc.backends.check import random_call, random_sizes, relative_error  # noqa: E402
from attnc.backends.triton_backend import TritonUnsupported, render_module  # noqa: E402
from attnc.passes.lowering import TARGETS, lower_module  # noqa: E402
from attnc.einsum_ir.interpreter import interpret  # noqa: E402
from attnc.frontends import parse, parse_file  # noqa: E402
from attnc.passes.pipeline import run_pipeline  # noqa: E402

from conftest import EXAMPLES, TWO_PASS, all_examples  # noqa: E402

EXAMPLE_IDS = [str(p.relative_to(EXAMPLES)) for p in all_examples()]
# Examples the Triton backend declines, and why (a regression shows up as a change here).
EXPECTED_UNSUPPORTED: dict[str, str] = {}
# Examples whose grids (a program per sequence and head) are too many programs for the
# interpreter at these sizes; checked at small sizes elsewhere.
SMALL_SIZES_ONLY = {rel: "tests/test_indirect_gpu.py runs it at small sizes" for rel in (
    "paged_decode.attn", "paged_prefill.attn", "varlen_prefill.attn")}
TILE = 16


def compile_module(module, name: str, tmp_path: Path):
    _, files = compile_triton(module, "triton", Path(name).stem, options={"tile": TILE})
    path = tmp_path / f"{Path(name).stem}_triton.py"
    write_atomic(path, files[f"{Path(name).stem}.py"])
    return load_generated(path)


def to_torch(a: np.ndarray, dtype):
    t = torch.from_numpy(a)
    return t.to(dtype) if t.is_floating_point() else t


def run_and_compare(defn, fn, rng, lo, hi, batch, dtype):
    sizes = random_sizes(defn, rng, lo, hi)
    args, params = random_call(defn, rng, sizes, batch[0], batch[1])
    want = interpret(defn, *args, **params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the interpreter warns on masked lanes' garbage
        got = fn(*[to_torch(a, dtype) for a in args], **params)
    want = want if isinstance(want, tuple) else (want,)
    got = got if isinstance(got, tuple) else (got,)
    for g, w in zip(got, want):
        assert tuple(g.shape) == w.shape
        assert g.dtype == (dtype if any(a.dtype.kind == "f" for a in args) else torch.float32)
    return max(relative_error(g.float().numpy(), w) for g, w in zip(got, want))


@pytest.mark.parametrize("rel", EXAMPLE_IDS)
def test_example_matches_interpreter(rel, tmp_path):
    module = parse_file(EXAMPLES / rel)
    try:
        gen = compile_module(module, rel, tmp_path)
    except TritonUnsupported as err:
        assert rel in EXPECTED_UNSUPPORTED and EXPECTED_UNSUPPORTED[rel] in str(err), str(err)
        return
    assert rel not in EXPECTED_UNSUPPORTED, "now supported: update EXPECTED_UNSUPPORTED"
    if rel in SMALL_SIZES_ONLY:
        pytest.skip(SMALL_SIZES_ONLY[rel])
    rng = np.random.default_rng(7)
    for defn in module.definitions:
        fn = getattr(gen, defn.name)
        assert run_and_compare(defn, fn, rng, 1, 7, ((), ()), torch.float32) < 1e-5
        assert run_and_compare(defn, fn, rng, 9, 40, ((2, 1), (3,)), torch.float32) < 1e-5
        assert run_and_compare(defn, fn, rng, 5, 30, ((2,), (2,)), torch.float16) < 5e-3


def test_two_pass_cascades_are_declined_with_the_reason():
    with pytest.raises(TritonUnsupported, match="reduction over a grid rank in AV_sum"):
        compile_triton(parse(TWO_PASS, "two_pass.attn"), "triton", "two_pass")


@pytest.mark.parametrize("rel", ["causal.attn", "gqa_decode.attn", "bigbird.attn"])
def test_generated_triton_golden(rel, golden):
    module = parse_file(EXAMPLES / rel)
    final = run_pipeline(module, None, options={"tile": 64})[-1][1]
    golden(render_module(lower_module(final, TARGETS["triton"], {"tile": 64}), rel))


CAUSAL = (EXAMPLES / "causal.attn").read_text()


@pytest.fixture(scope="module")
def causal_module(tmp_path_factory):
    return compile_module(parse(CAUSAL, "causal.attn"), "causal.attn", tmp_path_factory.mktemp("t"))


def test_fully_masked_rows_give_zero(causal_module):
    Q, K, V = torch.randn(6, 8), torch.randn(3, 8), torch.randn(3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = causal_module.causal_softmax(Q, K, V)
    assert torch.all(out[:3] == 0) and torch.isfinite(out).all()


@pytest.mark.parametrize("args, message", [
    (lambda: (torch.randn(5, 4), torch.randn(7, 3), torch.randn(7, 2)), "argument 'K': rank E"),
    (lambda: (torch.randn(4), torch.randn(7, 4), torch.randn(7, 2)), "argument 'Q' needs at least 2"),
    (lambda: (torch.randn(5, 4, dtype=torch.float64), torch.randn(7, 4), torch.randn(7, 2)),
     "argument 'Q': dtype torch.float64"),
    (lambda: (torch.randn(2, 5, 4), torch.randn(3, 7, 4), torch.randn(7, 2)), "argument 'K': leading dims"),
])
def test_validation_names_the_argument(causal_module, args, message):
    with pytest.raises(ValueError, match=message):
        causal_module.causal_softmax(*args())


def test_cpu_tensors_need_the_interpreter(causal_module, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="argument 'Q' is on cpu"):
        causal_module.causal_softmax(torch.randn(5, 4), torch.randn(7, 4), torch.randn(7, 2))


def test_custom_op_traces_without_graph_breaks(causal_module):
    Q, K, V = torch.randn(2, 5, 8), torch.randn(2, 9, 8), torch.randn(2, 9, 4)
    op = causal_module.causal_softmax

    def model(q, k, v):
        return op(q * 2.0, k, v).sum(-1)

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(compiled(Q, K, V), model(Q, K, V))
    assert any(n.startswith("attnc_causal_") for n in dir(torch.ops))


def test_two_compilations_of_one_spec_keep_their_own_kernels(tmp_path):
    """torch registers a custom op once per process: modules compiled with different tile
    sizes get different op names, so each runs its own kernels."""
    module = parse(CAUSAL, "causal.attn")
    code = {}
    for tile in (16, 32):
        _, files = compile_triton(module, "triton", "causal", options={"tile": tile})
        code[tile] = files["causal.py"]
        path = tmp_path / f"causal_{tile}.py"
        write_atomic(path, code[tile])
        gen = load_generated(path)
        calls = []
        launch = gen._launch
        gen._launch = lambda kernel, *a, **k: (calls.append(k), launch(kernel, *a, **k))[1]
        Q, K, V = torch.randn(40, 8), torch.randn(40, 8), torch.randn(40, 4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gen.causal_softmax(Q, K, V)
        assert calls, f"tile {tile}: the op ran another module's launcher"
    ns = [next(ln for ln in c.splitlines() if "qualified = f\"" in ln) for c in code.values()]
    assert ns[0] != ns[1]


def test_strided_inputs(causal_module):
    """Non-contiguous inputs: strides are passed through, nothing is copied."""
    Q = torch.randn(5, 12)[:, ::2]                            # (5, 6), strides (12, 2)
    K = torch.randn(6, 7).t()                                 # (7, 6), strides (1, 7)
    V = torch.randn(3, 7).t()                                 # (7, 3), strides (1, 7)
    assert not (Q.is_contiguous() or K.is_contiguous() or V.is_contiguous())
    d = parse(CAUSAL).definitions[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = causal_module.causal_softmax(Q, K, V).numpy()
    want = interpret(d, Q.numpy(), K.numpy(), V.numpy())
    assert relative_error(got, want) < 1e-5


def decode_call(defn, P=2, M=77, seed=3, batch=(2,)):
    rng = np.random.default_rng(seed)
    sizes = {r: int(rng.integers(2, 6)) for a in defn.tensor_args for r in a.ranks}
    sizes.update({"P": P, "M": M})
    if "HK" in sizes:
        sizes["H"] = 2 * sizes["HK"]
    args, params = random_call(defn, rng, sizes, batch, batch)
    want = interpret(defn, *args, **params)
    return args, params, (want if isinstance(want, tuple) else (want,))


def launched_kernels(gen, monkeypatch) -> list[str]:
    """Record the name of every kernel the generated module launches."""
    names, launch = [], gen._launch

    def spy(kernel, *args, **kwargs):
        names.append(kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__)
        return launch(kernel, *args, **kwargs)
    monkeypatch.setattr(gen, "_launch", spy)
    return names


def call_and_compare(gen, defn, args, params, want, what) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = getattr(gen, defn.name)(*[to_torch(a, torch.float32) for a in args], **params)
    got = got if isinstance(got, tuple) else (got,)
    for g, w in zip(got, want):
        assert relative_error(g.numpy(), w) < 1e-5, what


SPLIT_EXAMPLES = ["gqa_decode.attn", "mqa_decode.attn", "softmax1.attn", "lse.attn",
                  "differential.attn", "sinks_window.attn"]


@pytest.mark.parametrize("rel", SPLIT_EXAMPLES)
def test_split_k_decode_matches_for_any_worker_count(rel, tmp_path, monkeypatch):
    """The split-K variant (workers + derived combine kernel) for 1, 2, 3 and 7 workers."""
    module = parse_file(EXAMPLES / rel)
    gen = compile_module(module, rel, tmp_path)
    defn = module.definitions[0]
    args, params, want = decode_call(defn)
    launched = launched_kernels(gen, monkeypatch)
    for workers in (1, 2, 3, 7):
        monkeypatch.setenv("ATTNC_SPLIT", str(workers))
        launched.clear()
        call_and_compare(gen, defn, args, params, want, workers)
        split = [n for n in launched if "_split_" in n]
        assert len(split) == (2 if workers > 1 else 0), launched


@pytest.mark.parametrize("rel", SPLIT_EXAMPLES + ["causal.attn", "alibi.attn", "bigbird.attn"])
@pytest.mark.parametrize("P, M", [(2, 77), (37, 45)])
def test_stream_k_matches_for_any_worker_count(rel, P, M, tmp_path, monkeypatch):
    """Stream-K: persistent workers over the flattened (unit, tile) space cross unit
    boundaries (several heads, batch elements and row blocks), merge in the split combine."""
    module = parse_file(EXAMPLES / rel)
    gen = compile_module(module, rel, tmp_path)
    defn = module.definitions[0]
    if rel == "bigbird.attn":
        P, M = max(P, M), max(P, M)
    args, params, want = decode_call(defn, P, M, seed=P + M)
    launched = launched_kernels(gen, monkeypatch)
    for workers in (1, 2, 3, 7, 13, 10_000):
        monkeypatch.setenv("ATTNC_STREAM_K", str(workers))
        launched.clear()
        call_and_compare(gen, defn, args, params, want, workers)
        assert any(n.endswith("_stream_kernel") for n in launched), launched
        assert any(n.endswith("_split_combine_kernel") for n in launched), launched


def test_split_variants_are_rendered_with_a_shared_combine_kernel():
    module = parse_file(EXAMPLES / "gqa_decode.attn")
    _, files = compile_triton(module, "triton", "gqa_decode", options={"tile": 64})
    code = files["gqa_decode.py"]
    for kernel in ("_gqa_decode_kernel", "_gqa_decode_split_kernel", "_gqa_decode_stream_kernel",
                   "_gqa_decode_split_combine_kernel"):
        assert code.count(f"def {kernel}(") == 1, kernel
    assert '_variant(programs, M1, device, ["fused", "split", "stream"])' in code


def test_variant_heuristic_follows_the_grid_and_the_sm_count(causal_module, monkeypatch):
    """Under the interpreter a 'GPU' has 4 SMs: a grid of >= 4 programs streams as is."""
    choose, cpu = causal_module._variant, torch.device("cpu")
    kinds = ["fused", "split", "stream"]
    assert choose(8, 100, cpu, kinds) == ("fused", 1)
    assert choose(2, 3, cpu, kinds) == ("fused", 1)          # too few tiles to share
    assert choose(2, 100, cpu, kinds) == ("stream", 8)       # two programs per SM
    assert choose(2, 5, cpu, kinds) == ("stream", 5)         # at least 2 tiles each
    assert choose(2, 100, cpu, ["fused", "split"]) == ("split", 4)
    assert choose(2, 100, cpu, ["fused"]) == ("fused", 1)
    monkeypatch.setenv("ATTNC_SPLIT", "3")
    assert choose(64, 100, cpu, kinds) == ("split", 3)
    monkeypatch.setenv("ATTNC_STREAM_K", "5")
    assert choose(64, 100, cpu, kinds) == ("stream", 5)


def _slot(w, unit, tiles, n_tiles, workers):
    """The stream-K kernel's slot formula: w - (first worker of unit)."""
    return w + 1 - ((unit * tiles + 1) * workers + n_tiles - 1) // n_tiles


@given(units=st.integers(1, 40), tiles=st.integers(1, 40), workers=st.integers(1, 300))
def test_stream_k_slots_are_distinct_ordered_and_bounded(causal_module, units, tiles, workers):
    """Against the IR pass's schedule: each unit's segments get slots 0, 1, ... in worker
    order, below the launcher's slot count."""
    from attnc.passes.split_k import stream_k_schedule

    n_tiles = units * tiles
    workers = min(workers, n_tiles)
    slots = causal_module._stream_slots(n_tiles, workers, tiles)
    seen: dict[int, list[int]] = {}
    for w, segments in enumerate(stream_k_schedule(units, tiles, workers)):
        assert segments, "every worker has a tile when workers <= tiles"
        for unit, first, end in segments:
            seen.setdefault(unit, []).append(_slot(w, unit, tiles, n_tiles, workers))
    for unit, got in seen.items():
        assert got == list(range(len(got))) and len(got) <= slots, (unit, got, slots)


@pytest.mark.parametrize("rel, params", [
    ("causal.attn", {}), ("sliding_window.attn", {"window": 21.0}),
    ("sinks_window.attn", {"window": 17.0, "sinks": 3.0}), ("prefix_lm.attn", {}),
    ("alibi.attn", {}), ("document_mask.attn", {}),
])
@pytest.mark.parametrize("P, M", [(70, 70), (90, 40), (30, 100)])
def test_tile_skipping_and_unmasked_full_tiles(rel, params, P, M, tmp_path):
    """Many tiles: skipped tiles, partial tiles with masks and full tiles without."""
    module = parse_file(EXAMPLES / rel)
    gen = compile_module(module, rel, tmp_path)
    defn = module.definitions[0]
    if rel == "prefix_lm.attn":
        M = P
    rng = np.random.default_rng(P + M)
    sizes = {r: 3 for a in defn.tensor_args for r in a.ranks}
    sizes.update({"P": P, "M": M, "E": 8, "F": 4})
    args, defaults = random_call(defn, rng, sizes)
    params = {k: v for k, v in params.items() if k in {p.name for p in defn.scalar_params}}
    params = {**defaults, **params}
    want = interpret(defn, *args, **params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = getattr(gen, defn.name)(*[to_torch(a, torch.float32) for a in args], **params)
    assert relative_error(got.numpy(), want) < 1e-5


def test_mixed_input_dtypes_accumulate_in_f32(causal_module):
    rng = np.random.default_rng(9)
    Q, K, V = rng.standard_normal((2, 9, 8)), rng.standard_normal((2, 13, 8)), rng.standard_normal((13, 4))
    d = parse(CAUSAL).definitions[0]
    want = interpret(d, Q, K, V)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = causal_module.causal_softmax(torch.from_numpy(Q).float(), torch.from_numpy(K).half(),
                                           torch.from_numpy(V).float())
    assert got.dtype == torch.float32  # the first floating-point tensor passed
    assert relative_error(got.numpy(), want) < 5e-3


def test_head_dims_that_are_not_powers_of_two(causal_module):
    rng = np.random.default_rng(10)
    Q, K, V = rng.standard_normal((7, 24)), rng.standard_normal((19, 24)), rng.standard_normal((19, 40))
    d = parse(CAUSAL).definitions[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = causal_module.causal_softmax(*[torch.from_numpy(x).float() for x in (Q, K, V)])
    assert relative_error(got.numpy(), interpret(d, Q, K, V)) < 1e-5


@pytest.mark.parametrize("rel", ["bigbird.attn", "document_mask.attn", "key_padding.attn"])
def test_data_dependent_masks_skip_dead_tiles(rel, tmp_path):
    """Per tile, a block-mask probe skips dead tiles and finds full ones (the mask holds at
    every point: the body runs without it); results still match the interpreter."""
    module = parse_file(EXAMPLES / rel)
    _, files = compile_triton(module, "triton", Path(rel).stem, options={"tile": TILE})
    assert "if live_" in files[f"{Path(rel).stem}.py"]
    assert "if full_" in files[f"{Path(rel).stem}.py"]
    gen = compile_module(module, rel, tmp_path)
    rng = np.random.default_rng(12)
    defn = module.definitions[0]
    assert run_and_compare(defn, getattr(gen, defn.name), rng, 20, 60, ((2,), (2,)), torch.float32) < 1e-5


GQA_PER_HEAD = """
attention gqa_per_head(Q[H,P,E], K[HK,M,E], V[HK,M,F], SLOPE[H], scale = 1/sqrt(E)) -> AV[H,P,F] {
  let G = H / HK
  B[h]      = SLOPE[h] * (h + 1)
  S[h,p,m]  = Q[h,p,e] * K[h // G, m, e] * scale - B[h] * (p + M - P - m)   where m + h <= p + M - P + H
  GM[h,p]   = max[m](S[h,p,m])
  SN[h,p,m] = exp(S[h,p,m] - GM[h,p])
  SD[h,p]   = sum[m](SN[h,p,m])
  AV[h,p,f] = SN[h,p,m] * V[h // G, m, f] / SD[h,p]
}
"""


@pytest.mark.parametrize("rel, packed", [
    ("gqa_decode.attn", "idx_pk = (pid % HK)"), ("sqa.attn", "idx_pk = (pid % HKV)"),
    ("mqa_decode.attn", "idx_pk = (pid % 1)"), ("mha.attn", None), ("alibi.attn", None),
])
def test_query_heads_sharing_keys_are_packed_into_rows(rel, packed):
    """GQA/SQA read K/V at h // G, MQA not at all: those heads share a program (one K/V
    load per tile for the whole group); MHA and ALiBi read K at h and are not packed."""
    module = parse_file(EXAMPLES / rel)
    _, files = compile_triton(module, "triton", Path(rel).stem, options={"tile": 64})
    code = files[f"{Path(rel).stem}.py"]
    if packed:
        assert packed in code and "pk_p = offs_p % P" in code
    else:
        assert "idx_pk" not in code


@pytest.mark.parametrize("P", [1, 5, 21, 40])
@pytest.mark.parametrize("variant", [None, ("ATTNC_SPLIT", "3"), ("ATTNC_STREAM_K", "7")])
def test_packed_heads_match_interpreter(P, variant, tmp_path, monkeypatch):
    """Packed rows (g, p) straddle row blocks and groups; a per-head statement (B[h]), h in
    arithmetic and in a where, and the split variants, all against the interpreter."""
    module = parse(GQA_PER_HEAD, "gqa_per_head.attn")
    gen = compile_module(module, "gqa_per_head.attn", tmp_path)
    assert "idx_pk = (pid % HK)" in Path(gen.__file__).read_text()
    defn = module.definitions[0]
    rng = np.random.default_rng(P)
    sizes = {"H": 6, "HK": 2, "P": P, "M": 50, "E": 8, "F": 5}
    args, params = random_call(defn, rng, sizes, (2,), (2,))
    want = interpret(defn, *args, **params)
    if variant:
        monkeypatch.setenv(*variant)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = gen.gqa_per_head(*[to_torch(a, torch.float32) for a in args], **params)
    assert relative_error(got.numpy(), want) < 1e-5


DECODE_WITHOUT_QUERIES = """
attention decode(Q[B,H,E], K[B,M,HK,E], V[B,M,HK,F], L[B]: i32, SLOPE[H],
                 scale = 1/sqrt(E)) -> O[B,H,F] {
  let G = H / HK
  S[b,h,m] = Q[b,h,e] * K[b, m, h // G, e] * scale + SLOPE[h] * m   where m < L[b]
  O[b,h,f] = (exp(S[b,h,m] - max[m](S[b,h,m])) * V[b, m, h // G, f]
              / sum[m](exp(S[b,h,m] - max[m](S[b,h,m]))))
}
"""


@pytest.mark.parametrize("H, HK", [(8, 2), (40, 2), (20, 20), (6, 1)])
@pytest.mark.parametrize("variant", [None, ("ATTNC_SPLIT", "3"), ("ATTNC_STREAM_K", "5")])
def test_a_decode_without_query_rank_packs_the_group_heads_as_rows(H, HK, variant, tmp_path,
                                                                   monkeypatch):
    """With no query rank the value dim f was the row: rows of (g, f) pairs recomputed each
    head's scores for every f and summed P·V element-wise.  The rows are now the group's
    heads (``map_ranks._rows_of_a_group``): two products per tile, K and V tiles in one
    layout.  Groups of 4, of 20 (two row blocks of 16), MHA (one head per group) and MQA,
    a per-head slope, lengths from 0, against the interpreter."""
    module = parse(DECODE_WITHOUT_QUERIES, "decode.attn")
    gen = compile_module(module, "decode.attn", tmp_path)
    code = Path(gen.__file__).read_text()
    assert "pk_h = idx_pk * G + offs_h" in code and "pk_f" not in code
    assert "(offs_f)[:, None]" not in code  # V read [M0, F], as K is read [M0, E]
    defn = module.definitions[0]
    rng = np.random.default_rng(H + HK)
    sizes = {"B": 3, "H": H, "HK": HK, "M": 45, "E": 8, "F": 5}
    args, params = random_call(defn, rng, sizes)
    args[3] = np.array([0, 45, 17], dtype=np.int32)
    want = interpret(defn, *args, **params)
    if variant:
        monkeypatch.setenv(*variant)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = gen.decode(*[to_torch(a, torch.float32) for a in args], **params)
    assert np.all(got.numpy()[0] == 0)
    assert relative_error(got.numpy(), want) < 1e-5


def test_autotune_measures_each_shape_class_once(causal_module, monkeypatch):
    """ATTNC_AUTOTUNE=1: every configuration is timed the first time a shape class (rows,
    tiles and programs as powers of two, head dims, dtypes) is seen; the fastest is reused."""
    gen = causal_module
    monkeypatch.setattr(gen, "_can_tune", lambda device: True)
    monkeypatch.setattr(gen, "_TUNED", {})
    timed = []

    def fake_bench(fn):
        fn()                      # the configuration really runs (here, interpreted)
        timed.append(1)
        return 100.0 - len(timed)  # the last configuration tried is the "fastest"

    monkeypatch.setattr(gen, "_bench_ms", fake_bench)
    rng = np.random.default_rng(4)
    d = parse(CAUSAL).definitions[0]

    def call(P):
        Q, K, V = rng.standard_normal((P, 8)), rng.standard_normal((P, 8)), rng.standard_normal((P, 4))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # the launcher itself: the custom op may belong to an identical module loaded first
            got = gen.causal_softmax_launch(*[torch.from_numpy(x).float() for x in (Q, K, V)],
                                            8 ** -0.5, [])  # no plan
        assert relative_error(got.numpy(), interpret(d, Q, K, V)) < 1e-5

    call(20)
    assert len(timed) == len(gen._CONFIGS) and len(gen._TUNED) == 1
    assert list(gen._TUNED.values()) == [gen._CONFIGS[-1]]
    call(27)                      # same class (rows and tiles round to 32): no new timing
    assert len(timed) == len(gen._CONFIGS) and len(gen._TUNED) == 1
    call(40)                      # a new class
    assert len(timed) == 2 * len(gen._CONFIGS) and len(gen._TUNED) == 2


@pytest.mark.parametrize("P, M", [(70, 70), (45, 83)])
def test_document_mask_with_contiguous_documents(P, M, tmp_path):
    """Realistic document ids (runs of one id): most live tiles are full and take the
    unmasked branch, the others the masked one; both against the interpreter."""
    module = parse_file(EXAMPLES / "document_mask.attn")
    gen = compile_module(module, "document_mask.attn", tmp_path)
    defn = module.definitions[0]
    rng = np.random.default_rng(P * M)
    docs = np.sort(rng.integers(0, 3, size=M)).astype(np.int32)
    Q, K, V = rng.standard_normal((2, P, 8)), rng.standard_normal((2, M, 8)), rng.standard_normal((2, M, 5))
    DQ, DK = docs[M - P:], docs
    want = interpret(defn, Q, K, V, DQ, DK)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = gen.document_mask(*[torch.from_numpy(x).float() for x in (Q, K, V)],
                                torch.from_numpy(DQ), torch.from_numpy(DK))
    assert relative_error(got.numpy(), want) < 1e-5


def test_power_of_a_negative_base_is_c_pow(tmp_path):
    """``W ** (p - m)`` with W < 0 and an integer exponent keeps its sign, and ``x ** 0`` is
    1, as numpy's and C's pow (exp2(b * log2(a)) alone gives NaN there)."""
    from attnc.frontends import parse

    spec = """
attention negpow(W[M], V[M,F], Q[P,F]) -> O[P,F] {
  O[p,f] = W[m] ** (p - m) * V[m,f] + 0 * Q[p,f]   where m <= p
}"""
    module = parse(spec, "negpow.attn")
    gen = compile_module(module, "negpow.attn", tmp_path)
    W = np.array([-2.0, -0.5, 0.0, 3.0, -1.0])
    V = np.arange(10.0).reshape(5, 2)
    Q = np.ones((4, 2))
    want = interpret(module.definitions[0], W, V, Q)
    got = gen.negpow(*[torch.from_numpy(a).float() for a in (W, V, Q)])
    assert np.all(np.isfinite(got.numpy()))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)
