"""Context parallelism: ring attention over torch.distributed (gloo, loopback, 2-3 processes).

Every example with a derivable combine is sharded along its queries and keys with uneven
lengths (an empty shard, a shard past every visible key), run as a ring of processes, and
the gathered outputs are compared with the interpreter on the whole inputs (and, in f32 on
Triton, with one process's result to 1e-6).  The pieces (partial, merge, finish) are numpy
modules or Triton kernels under the interpreter; the ring and its transfers are torch.
"""
from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest

from attnc.frontends import parse_file
from attnc.passes.context_parallel import ContextParallelUnsupported, sharded_form

from conftest import EXAMPLES
from example_refs import EXAMPLES as REFS

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.xdist_group("context_parallel")

# (example, size case, query cuts, key cuts): the last cut takes the rest
CASES = {
    (3, "numpy"): [("causal.attn", 0, (2, 0), (0, 30)), ("alibi.attn", 0, (1, 3), (9, 2)),
        ("document_mask.attn", 1, (4, 4), (3, 5)), ("sliding_window.attn", 0, (3, 1), (20, 4)),
        ("softmax1.attn", 1, (3, 3), (2, 2)), ("sink_logit.attn", 0, (2, 2), (5, 5)),
        ("lse.attn", 0, (1, 1), (12, 12)), ("sigmoid.attn", 0, (2, 2), (10, 10)),
        ("gqa_decode.attn", 0, (1, 1), (7, 0))],
    (2, "numpy"): [("causal.attn", 2, (1,), (11,)), ("softpick.attn", 0, (3,), (18,)),
                   ("differential.attn", 0, (2,), (20,)), ("cosine.attn", 0, (2,), (15,)),
                   ("fusemax/cascade4.attn", 0, (3,), (20,)),
                   ("fusemax/deferred_2pass.attn", 1, (1,), (30,)),
                   ("key_padding.attn", 0, (2,), (17,)), ("linear_causal.attn", 0, (3,), (25,)),
                   ("mha.attn", 0, (2,), (5,)), ("mqa_decode.attn", 0, (1,), (12,)),
                   ("retention.attn", 2, (5,), (6,)), ("sinks_window.attn", 0, (4,), (18,)),
                   ("softcap.attn", 0, (2,), (19,)), ("sqa.attn", 0, (3,), (6,))],
    (4, "numpy"): [("causal.attn", 0, (1, 0, 3), (10, 0, 20)),
                   ("document_mask.attn", 1, (2, 2, 0), (3, 1, 2))],
    # the partial as Triton kernels (interpreter), float32 inputs and states
    (2, "triton"): [("causal.attn", 0, (2,), (21,)), ("document_mask.attn", 1, (5,), (4,))],
}


def _cuts(cuts, total: int, world: int) -> list[int]:
    out = list(cuts)[: world - 1]
    out.append(total - sum(out))
    assert out[-1] >= 0
    return out


def _shard(x: np.ndarray, ranks, rank_name: str, cuts: list[int], k: int) -> np.ndarray:
    axis = x.ndim - len(ranks) + ranks.index(rank_name)
    start = sum(cuts[:k])
    return np.ascontiguousarray(np.take(x, range(start, start + cuts[k]), axis=axis))


def _ring_worker(rank: int, world: int, backend: str, port: int, root: str) -> None:
    import os

    import torch.distributed as dist

    from attnc.backends.context_parallel import compile_context_parallel

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    if backend == "triton":
        os.environ["TRITON_INTERPRET"] = "1"
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for i, (path, case, qcuts, kcuts) in enumerate(CASES[world, backend]):
            ref = REFS[path]
            module = parse_file(EXAMPLES / path)
            defn = module[ref.definition]
            data = np.load(Path(root) / f"in{i}.npz")
            arrays = [data[a.name] for a in defn.tensor_args]
            params = {k[2:]: float(data[k]) for k in data.files if k.startswith("p_")}
            cp = compile_context_parallel(module, ref.definition, backend, tile=4 if backend ==
                                          "numpy" else 16, directory=Path(root) / f"gen{rank}_{i}")
            form = cp.form
            local = []
            for a, x in zip(defn.tensor_args, arrays):
                if a.name in form.key_inputs:
                    cuts = _cuts(kcuts, x.shape[x.ndim - len(a.ranks) + a.ranks.index(form.keys)], world)
                    x = _shard(x, a.ranks, form.keys, cuts, rank)
                elif a.name in form.query_inputs:
                    cuts = _cuts(qcuts, x.shape[x.ndim - len(a.ranks) + a.ranks.index(form.queries)], world)
                    x = _shard(x, a.ranks, form.queries, cuts, rank)
                if backend != "numpy" and x.dtype == np.float64:
                    x = x.astype(np.float32)
                local.append(torch.from_numpy(x))
            out = cp(*local, **params)
            out = out if isinstance(out, tuple) else (out,)
            np.savez(Path(root) / f"out{i}_{rank}.npz", *[o.numpy() for o in out])
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world,backend", sorted(CASES))
def test_ring_matches_one_process(world, backend, tmp_path):
    from attnc.einsum_ir.interpreter import interpret

    mp = pytest.importorskip("torch.multiprocessing")
    wants = []
    if backend == "triton":
        pytest.importorskip("triton")
    for i, (path, case, _, _) in enumerate(CASES[world, backend]):
        ref = REFS[path]
        defn = parse_file(EXAMPLES / path)[ref.definition]
        arrays, params = ref.make_inputs(np.random.default_rng(case), ref.sizes[case])
        np.savez(tmp_path / f"in{i}.npz", **{a.name: x for a, x in zip(defn.tensor_args, arrays)},
                 **{f"p_{k}": v for k, v in params.items()})
        want = interpret(defn, *arrays, **params)
        wants.append(want if isinstance(want, tuple) else (want,))
    mp.spawn(_ring_worker, args=(world, backend, _free_port(), str(tmp_path)), nprocs=world,
             join=True)
    tol = 1e-12 if backend == "numpy" else 2e-5
    for i, (path, _, _, _) in enumerate(CASES[world, backend]):
        ref = REFS[path]
        defn = parse_file(EXAMPLES / path)[ref.definition]
        form = sharded_form(defn, {"tile": 4}, None)
        parts = [np.load(tmp_path / f"out{i}_{r}.npz") for r in range(world)]
        one = _one_process_f32(path, tmp_path / f"in{i}.npz", tmp_path) \
            if backend != "numpy" else None
        for k, (want, out) in enumerate(zip(wants[i], defn.outputs)):
            pieces = [p[f"arr_{k}"] for p in parts]
            if form.queries and form.queries in out.ranks:
                axis = want.ndim - len(out.ranks) + out.ranks.index(form.queries)
                got = np.concatenate(pieces, axis=axis)
            else:
                got = pieces[0]
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=f"{path} {out.name}")
            if one is not None:  # the bar: f32 results across world sizes, 1e-6 relative
                scale = max(float(np.max(np.abs(one[k]))), 1e-30)
                assert float(np.max(np.abs(got - one[k]))) / scale <= 1e-6, (path, out.name)


def _one_process_f32(path: str, inputs: Path, tmp_path: Path) -> tuple:
    """The whole definition on the Triton backend in one process, float32 inputs."""
    from attnc.backends import compile_module, load_generated, write_atomic

    ref = REFS[path]
    module = parse_file(EXAMPLES / path)
    defn = module[ref.definition]
    data = np.load(inputs)
    _, files = compile_module(module, "triton", "one", options={"tile": 16})
    for name, text in files.items():
        write_atomic(tmp_path / "one" / name, text)
    fn = getattr(load_generated(tmp_path / "one" / "one.py"), ref.definition)
    params = {k[2:]: float(data[k]) for k in data.files if k.startswith("p_")}
    arrays = [data[a.name] for a in defn.tensor_args]
    out = fn(*[torch.from_numpy(x.astype(np.float32) if x.dtype == np.float64 else x)
               for x in arrays], **params)
    return tuple(o.numpy() for o in (out if isinstance(out, tuple) else (out,)))


def test_shards_at_global_positions():
    """The partial reads its shard locally and compares global positions."""
    from attnc.einsum_ir.printer import print_definition

    form = sharded_form(parse_file(EXAMPLES / "causal.attn").definitions[0], {"tile": 4})
    text = print_definition(form.partial)
    assert "m_offset" in text and "p_offset" in text and "M_total - P_total" in text
    assert form.key_inputs == ("K", "V") and form.query_inputs == ("Q",)
    assert [a.name for a in form.merge.tensor_args] == ["RM_state", "RD_state", "RNV_state"]


@pytest.mark.parametrize("path,why", [
    ("linear.attn", "streams E, a head dim"),
    ("bigbird.attn", "would need its neighbours"),
    ("prefix_lm.attn", "queries and keys are the same rank"),
])
def test_what_cannot_be_sharded_is_refused_with_the_reason(path, why):
    with pytest.raises(ContextParallelUnsupported, match=why):
        sharded_form(parse_file(EXAMPLES / path).definitions[0])


def test_backward_over_the_ring_is_refused_until_it_exists(tmp_path):
    from attnc.backends.context_parallel import compile_context_parallel

    cp = compile_context_parallel(EXAMPLES / "causal.attn", directory=tmp_path)
    q = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(NotImplementedError, match="derived backward"):
        cp(q, torch.randn(5, 4), torch.randn(5, 2))


@pytest.mark.parametrize("path", sorted(REFS))
def test_every_example_shards_or_says_why(path):
    """Every example either has a sharded form (partial, merge, finish over its states) or
    is refused with a reason; none fails otherwise."""
    defn = parse_file(EXAMPLES / path)[REFS[path].definition]
    try:
        form = sharded_form(defn, {"tile": 4})
    except ContextParallelUnsupported as why:
        assert str(why)
        return
    assert form.states and form.key_inputs
    assert [o.name for o in form.finish.outputs] == [o.name for o in defn.outputs]


def test_every_example_that_shards_runs_on_a_ring():
    """The ring tests above cover every example with a sharded form (a new one joins them)."""
    ringed = {path for cases in CASES.values() for path, *_ in cases}
    for path in sorted(REFS):
        try:
            sharded_form(parse_file(EXAMPLES / path)[REFS[path].definition], {"tile": 4})
        except ContextParallelUnsupported:
            continue
        assert path in ringed, f"{path} shards but no ring test runs it"


def test_shared_prefix_merged_with_each_suffix(tmp_path):
    """FlashInfer's merge_state, derived: the attention of a batch's queries over one shared
    prefix (computed once) merged with each sequence's own suffix equals attention over the
    concatenation; the merged state merges again (associative)."""
    from attnc.backends.context_parallel import compile_context_parallel
    from attnc.einsum_ir.interpreter import interpret

    path = EXAMPLES / "causal.attn"
    cp = compile_context_parallel(path, directory=tmp_path)
    rng = np.random.default_rng(3)
    P, prefix, E, F = 4, 9, 5, 3
    K0, V0 = rng.standard_normal((prefix, E)), rng.standard_normal((prefix, F))
    t = torch.from_numpy
    for suffix in (0, 1, 6):
        Q = rng.standard_normal((P, E))
        K1, V1 = rng.standard_normal((suffix, E)), rng.standard_normal((suffix, F))
        total = prefix + suffix
        a = cp.states(t(Q), t(K0), t(V0), key_offset=0, key_total=total)
        b = cp.states(t(Q), t(K1), t(V1), key_offset=prefix, key_total=total)
        got = cp.finish_states(cp.merge_states(a, b), t(Q), key_total=total)
        want = interpret(parse_file(path).definitions[0], Q, np.concatenate([K0, K1]),
                         np.concatenate([V0, V1]))
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-13)
        halves = cp.states(t(Q), t(K0[:4]), t(V0[:4]), key_total=total), \
            cp.states(t(Q), t(K0[4:]), t(V0[4:]), key_offset=4, key_total=total)
        again = cp.merge_states(cp.merge_states(*halves), b)
        np.testing.assert_allclose(cp.finish_states(again, t(Q), key_total=total).numpy(), want,
                                   rtol=1e-12, atol=1e-13)


# --- zig-zag (load-balanced causal) sharding ---------------------------------------------------

ZIGZAG = [("causal.attn", 0), ("sliding_window.attn", 0), ("document_mask.attn", 1),
          ("alibi.attn", 0), ("softmax1.attn", 1)]


def _zigzag_worker(rank: int, world: int, port: int, root: str) -> None:
    import os

    import torch.distributed as dist

    from attnc.backends.context_parallel import compile_context_parallel, zigzag_shard

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for i, (path, _) in enumerate(ZIGZAG):
            ref = REFS[path]
            module = parse_file(EXAMPLES / path)
            defn = module[ref.definition]
            data = np.load(Path(root) / f"in{i}.npz")
            params = {k[2:]: float(data[k]) for k in data.files if k.startswith("p_")}
            cp = compile_context_parallel(module, ref.definition, "numpy", tile=4,
                                          directory=Path(root) / f"gen{rank}_{i}")
            form, local = cp.form, []
            for a in defn.tensor_args:
                x = torch.from_numpy(data[a.name])
                along = form.keys if a.name in form.key_inputs else (
                    form.queries if a.name in form.query_inputs else None)
                if along is not None:
                    x = zigzag_shard(x, x.dim() - len(a.ranks) + a.ranks.index(along), rank, world)
                local.append(x)
            out = cp(*local, layout="zigzag", **params)
            out = out if isinstance(out, tuple) else (out,)
            np.savez(Path(root) / f"out{i}_{rank}.npz", *[o.numpy() for o in out])
            if i == 0 and rank == 0:  # no positions where zig-zag gives this rank some
                bad = [x[:0] if a.name in form.key_inputs + form.query_inputs else x
                       for a, x in zip(defn.tensor_args, local)]
                try:
                    cp(*bad, layout="zigzag", **params)
                except ValueError as err:
                    (Path(root) / "refused.txt").write_text(str(err))
            elif i == 0:
                try:  # the peer's all-gather of lengths still happens once
                    cp(*local, layout="zigzag", **params)
                except ValueError:
                    pass
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_zigzag_ring_matches_one_process(world, tmp_path):
    """Each process holds chunks r and 2W-1-r of the sequence (uneven chunk lengths: the
    sizes are not multiples of 2W); the outputs, un-zig-zagged, equal the interpreter's on
    the whole inputs, across causal, window, document-mask, ALiBi and softmax_1 cascades."""
    from attnc.backends.context_parallel import zigzag_unshard
    from attnc.einsum_ir.interpreter import interpret

    mp = pytest.importorskip("torch.multiprocessing")
    wants = []
    for i, (path, case) in enumerate(ZIGZAG):
        ref = REFS[path]
        defn = parse_file(EXAMPLES / path)[ref.definition]
        arrays, params = ref.make_inputs(np.random.default_rng(case + world), ref.sizes[case])
        np.savez(tmp_path / f"in{i}.npz", **{a.name: x for a, x in zip(defn.tensor_args, arrays)},
                 **{f"p_{k}": v for k, v in params.items()})
        want = interpret(defn, *arrays, **params)
        wants.append(want if isinstance(want, tuple) else (want,))
    mp.spawn(_zigzag_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    for i, (path, _) in enumerate(ZIGZAG):
        defn = parse_file(EXAMPLES / path)[REFS[path].definition]
        form = sharded_form(defn, {"tile": 4}, None)
        parts = [np.load(tmp_path / f"out{i}_{r}.npz") for r in range(world)]
        for k, (want, out) in enumerate(zip(wants[i], defn.outputs)):
            pieces = [torch.from_numpy(p[f"arr_{k}"]) for p in parts]
            if form.queries and form.queries in out.ranks:
                axis = want.ndim - len(out.ranks) + out.ranks.index(form.queries)
                got = zigzag_unshard(pieces, axis).numpy()
            else:
                got = pieces[0].numpy()
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=f"{path} {out.name}")
    refused = (tmp_path / "refused.txt").read_text()
    assert "zig-zag shard" in refused and "argument '" in refused


@pytest.mark.parametrize("total,world", [(13, 2), (5, 3), (24, 4), (0, 2)])
def test_zigzag_shards_round_trip(total, world):
    from attnc.backends.context_parallel import _pieces, zigzag_shard, zigzag_unshard

    x = torch.arange(total * 2).reshape(total, 2)
    shards = [zigzag_shard(x, 0, r, world) for r in range(world)]
    assert torch.equal(zigzag_unshard(shards, 0), x)
    pieces = _pieces([s.shape[0] for s in shards], "zigzag", "K", "M")
    for r, s in enumerate(shards):  # each piece's global offset addresses its rows
        rows = torch.cat([x[o:o + n] for o, n in pieces[r]])
        assert torch.equal(rows, s)


@pytest.mark.parametrize("total,world", [(13, 2), (24, 4), (8192, 2), (100, 4), (1001, 3)])
def test_zigzag_balances_causal_work(total, world):
    """The causal work of a rank (visible (query, key) pairs: q + 1 for the query at q) is
    the same on every rank when 2W divides the sequence, and within a quarter of the
    contiguous layout's spread otherwise."""
    from attnc.backends.context_parallel import _pieces, _zigzag_chunks

    def loads(layout, lengths):
        return [sum(o + i + 1 for o, n in pieces for i in range(n))
                for pieces in _pieces(lengths, layout, "Q", "P")]

    contiguous = [len(a) for a in np.array_split(np.arange(total), world)]
    chunks = _zigzag_chunks(total, world)
    lengths = [chunks[r][1] + chunks[2 * world - 1 - r][1] for r in range(world)]
    zz, cont = loads("zigzag", lengths), loads("contiguous", contiguous)
    spread = max(zz) - min(zz)
    if total % (2 * world) == 0:
        assert spread == 0
    assert spread * 4 <= max(cont) - min(cont)


# --- the merge of two states on the device ------------------------------------------------------

@pytest.mark.parametrize("path", sorted(REFS))
def test_pair_merge_is_the_stacked_merge_written_out(path):
    """The merge of two states with W written out (``pair_merge``) equals the derived
    stacked merge on the interpreter, on states of rows that saw no key (the init states,
    max -inf) beside rows that did."""
    from attnc.einsum_ir.interpreter import interpret
    from attnc.passes.unroll import unrolled_name

    defn = parse_file(EXAMPLES / path)[REFS[path].definition]
    try:
        form = sharded_form(defn, {"tile": 4}, None)
    except ContextParallelUnsupported:
        return
    assert form.pair_merge is not None, form.pair_merge_refused
    rng = np.random.default_rng(5)
    sizes = {r: 3 for a in form.merge.tensor_args for r in a.ranks}
    sizes[form.merge.tensor_args[0].ranks[0]] = 2
    stacked = []
    for a in form.merge.tensor_args:
        x = rng.standard_normal(tuple(sizes[r] for r in a.ranks))
        if a.ranks[-1] != a.ranks[0] and len(a.ranks) >= 2:
            x[0, ..., 0] = -np.inf if a.name.startswith("RM") else 0.0  # slot 0 saw no key
        stacked.append(x)
    want = interpret(form.merge, *stacked)
    named = {}
    for a, x in zip(form.merge.tensor_args, stacked):
        named[unrolled_name(a.name, 0)], named[unrolled_name(a.name, 1)] = x[0], x[1]
    got = interpret(form.pair_merge, *[named[a.name] for a in form.pair_merge.tensor_args])
    for w, g in zip(want if isinstance(want, tuple) else (want,),
                    got if isinstance(got, tuple) else (got,)):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("backend_env", ["triton", "cuda"], indirect=True)
def test_merge_and_finish_run_on_the_backend(backend_env, tmp_path):
    """On Triton and CUDA the pair merge and the finish are the backend's own kernels (no
    host round trip); merged and finished states equal attention over the concatenation,
    including a key shard that no query sees (causal, keys after the queries)."""
    from attnc.backends.context_parallel import compile_context_parallel
    from attnc.einsum_ir.interpreter import interpret

    path = EXAMPLES / "causal.attn"
    cp = compile_context_parallel(path, backend=backend_env, tile=16, directory=tmp_path)
    assert cp.merge_on == backend_env
    rng = np.random.default_rng(4)
    P, E, F = 19, 8, 8
    cut, M = 11, 40
    Q, K, V = (rng.standard_normal(s).astype(np.float32) for s in ((P, E), (M, E), (M, F)))
    t = torch.from_numpy
    a = cp.states(t(Q), t(K[:cut]), t(V[:cut]), key_offset=0, key_total=M)
    b = cp.states(t(Q), t(K[cut:]), t(V[cut:]), key_offset=cut, key_total=M)
    got = cp.finish_states(cp.merge_states(a, b), t(Q), key_total=M)
    want = interpret(parse_file(path).definitions[0], Q.astype(np.float64),
                     K.astype(np.float64), V.astype(np.float64))
    np.testing.assert_allclose(got.numpy(), want, rtol=2e-5, atol=2e-5)
    assert np.isfinite(got.numpy()).all()
