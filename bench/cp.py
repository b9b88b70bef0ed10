"""Context parallelism on the CPU: a ring of processes (torch.distributed, gloo, loopback)
against one process, one thread each.

    python bench/cp.py                          # causal, P = M = 8192, E = F = 64, f32, 2 ranks
    python bench/cp.py --n 4096 --world 2 --spec examples/sliding_window.attn

One process runs the definition's own numpy function on the whole sequence; then ``world``
processes run the context-parallel launcher (``attnc.backends.context_parallel``) on their
shards, contiguous and zig-zag, timed between barriers (the slowest rank counts).  Every
process is pinned to one thread (BLAS and torch), so the ratio measures the split of the
work and what the ring adds (transfers, merges), not thread scaling.  The ring's outputs are
gathered and compared with the one-process result.  The issue's target: 2 ranks at
P = M = 8192 causal <= 0.65x the one-process time.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import socket
import sys
import tempfile
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy loads its BLAS: one thread per process

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from cpu import timed  # noqa: E402  (median of repeated calls after a warm-up)


def _inputs(defn, n: int, e: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    sizes = {}
    for a in defn.tensor_args:
        for r in a.ranks:
            sizes.setdefault(r, e)
    long = {a.ranks[0] for a in defn.tensor_args}
    sizes.update({r: n for r in long})
    return [rng.standard_normal(tuple(sizes[r] for r in a.ranks)).astype(np.float32)
            for a in defn.tensor_args]


def _worker(rank: int, world: int, port: int, opts, root: str) -> None:
    import torch.distributed as dist

    from attnc.backends.context_parallel import compile_context_parallel, zigzag_shard
    from attnc.frontends import parse_file

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        defn = parse_file(opts.spec).definitions[0]
        arrays = [torch.from_numpy(x) for x in _inputs(defn, opts.n, opts.e)]
        cp = compile_context_parallel(opts.spec, backend="numpy", tile=opts.tile,
                                      directory=Path(root) / f"gen{rank}")
        form = cp.form
        rows = {}
        for layout in ("contiguous", "zigzag"):
            local = []
            for a, x in zip(defn.tensor_args, arrays):
                rank_name = form.keys if a.name in form.key_inputs else (
                    form.queries if a.name in form.query_inputs else None)
                if rank_name is None:
                    local.append(x)
                    continue
                dim = x.dim() - len(a.ranks) + a.ranks.index(rank_name)
                local.append(zigzag_shard(x, dim, rank, world) if layout == "zigzag"
                             else torch.tensor_split(x, world, dim=dim)[rank])
            local = [x.contiguous() for x in local]

            def call():
                dist.barrier()
                return cp(*local, layout=layout)
            seconds = timed(call, opts.repeat)
            slowest = torch.tensor([seconds])
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            out = call()  # 2-D outputs, queries first (the examples this bench runs)
            sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
            dist.all_gather(sizes, torch.tensor([out.shape[0]]))
            padded = torch.zeros((max(int(s) for s in sizes),) + tuple(out.shape[1:]),
                                 dtype=out.dtype)
            padded[: out.shape[0]] = out
            pieces = [torch.empty_like(padded) for _ in range(world)]
            dist.all_gather(pieces, padded)
            if rank == 0:
                pieces = [p[: int(s)] for p, s in zip(pieces, sizes)]
                if layout == "zigzag":
                    from attnc.backends.context_parallel import zigzag_unshard
                    whole = zigzag_unshard(pieces, 0)
                else:
                    whole = torch.cat(pieces, 0)
                rows[layout] = (float(slowest), whole.numpy())
        if rank == 0:
            np.savez(Path(root) / "ring.npz",
                     **{f"{k}_t": np.array(v[0]) for k, v in rows.items()},
                     **{f"{k}_o": v[1] for k, v in rows.items()})
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=str(ROOT / "examples" / "causal.attn"))
    ap.add_argument("--n", type=int, default=8192, help="queries and keys (P = M)")
    ap.add_argument("--e", type=int, default=64, help="head dims (E = F)")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--tile", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    opts = ap.parse_args()

    from attnc.backends import compile_module, load_generated, write_atomic
    from attnc.frontends import parse_file

    torch.set_num_threads(1)
    module = parse_file(opts.spec)
    defn = module.definitions[0]
    arrays = _inputs(defn, opts.n, opts.e)
    with tempfile.TemporaryDirectory() as tmp:
        _, files = compile_module(module, "numpy", "one", options={"tile": opts.tile})
        for name, text in files.items():
            write_atomic(Path(tmp) / name, text)
        fn = getattr(load_generated(Path(tmp) / "one.py"), defn.name)
        one = timed(lambda: fn(*arrays), opts.repeat)
        want = fn(*arrays)
        torch.multiprocessing.spawn(_worker, args=(opts.world, _free_port(), opts, tmp),
                                    nprocs=opts.world, join=True)
        ring = np.load(Path(tmp) / "ring.npz")
        print(f"# context parallelism on the CPU: {datetime.date.today()}, {platform.node()}, "
              f"{os.cpu_count()} cores, Python {platform.python_version()}, torch "
              f"{torch.__version__}, numpy {np.__version__}")
        print(f"# {Path(opts.spec).name}, P = M = {opts.n}, E = F = {opts.e}, f32, tile "
              f"{opts.tile}, one thread per process, median of {opts.repeat}")
        print("| run | seconds | ratio to one process | max relative error |")
        print("|---|---:|---:|---:|")
        print(f"| one process | {one:.3f} | 1.00 | |")
        scale = float(np.max(np.abs(want)))
        for layout in ("contiguous", "zigzag"):
            t = float(ring[f"{layout}_t"])
            err = float(np.max(np.abs(ring[f"{layout}_o"] - want))) / scale
            print(f"| {opts.world} ranks, {layout} | {t:.3f} | {t / one:.2f} | {err:.1e} |")


if __name__ == "__main__":
    main()
