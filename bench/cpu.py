"""CPU benchmark: the fused numpy form against the per-Einsum form and torch SDPA.

    python bench/cpu.py                 # causal, P=M=4096, E=F=64, f32, one head
    python bench/cpu.py --big           # also P=M=65536, fused only (peak memory)
    python bench/cpu.py --backward      # forward + backward: fused stages against SDPA
    python bench/cpu.py --backward --n 16384 --repeat 1   # the backward memory target

Each row is timed in the same run (median of --repeat runs after a warm-up);
peak memory is numpy's traced peak for one call (tracemalloc sees numpy's
allocations).  Ratios are against the per-Einsum form and against SDPA.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from attnc.backends import compile_module, load_generated, write_atomic  # noqa: E402
from attnc.frontends import parse_file  # noqa: E402


def compile_spec(spec: Path, passes, fused: bool, tmp: Path, tag: str, tile: int | None):
    module = parse_file(spec)
    _, files = compile_module(module, "numpy", spec.stem, passes, {"tile": tile}, fused=fused)
    path = tmp / f"{spec.stem}_{tag}.py"
    write_atomic(path, files[f"{spec.stem}.py"])
    return getattr(load_generated(path), module.definitions[0].name)


def timed(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_bytes(fn) -> int:
    tracemalloc.start()
    tracemalloc.reset_peak()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def sdpa(q, k, v):
    import torch

    Q, K, V = (torch.from_numpy(x)[None, None] for x in (q, k, v))
    return lambda: torch.nn.functional.scaled_dot_product_attention(Q, K, V, is_causal=True)


def compile_grad(spec: Path, tmp: Path, tile: int):
    """The numpy module with its backward program (``NAME_with_stats``, ``NAME_backward``)."""
    module = parse_file(spec)
    _, files = compile_module(module, "numpy", spec.stem, None, {"tile": tile}, backward=True)
    path = tmp / f"{spec.stem}_grad.py"
    write_atomic(path, files[f"{spec.stem}.py"])
    return load_generated(path), module.definitions[0].name


def sdpa_train(q, k, v, do):
    """SDPA forward + backward on the CPU (torch autograd)."""
    import torch

    Q, K, V = (torch.from_numpy(x)[None, None].requires_grad_() for x in (q, k, v))
    dO = torch.from_numpy(do)[None, None]

    def step():
        out = torch.nn.functional.scaled_dot_product_attention(Q, K, V, is_causal=True)
        return torch.autograd.grad(out, (Q, K, V), dO)
    return step


def backward_rows(args, q, k, v) -> None:
    """Forward + backward of causal attention: the fused numpy stages (the forward saving
    its row statistics, the backward skipping the stages that make them) against SDPA's
    CPU autograd, and the backward's peak numpy memory against one P x M float32 tensor."""
    n, d = q.shape
    rng = np.random.default_rng(1)
    do = rng.standard_normal((n, d)).astype(np.float32)
    spec = ROOT / "examples" / "causal.attn"
    with tempfile.TemporaryDirectory() as tmp:
        mod, name = compile_grad(spec, Path(tmp), args.tile)
        forward = getattr(mod, f"{name}_with_stats")
        backward = getattr(mod, f"{name}_backward")
        saved_names = ("GM", "SD")

        def train():
            out, *stats = forward(q, k, v)
            return backward(q, k, v, do, saved=dict(zip(saved_names, stats)), scalars=False)

        t_fwd = timed(lambda: forward(q, k, v), args.repeat)
        t_train = timed(train, args.repeat)
        m_train = peak_bytes(train)
        grads = train()
        try:
            import torch

            t_sdpa = timed(sdpa_train(q, k, v, do), args.repeat)
            ref = sdpa_train(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64),
                             do.astype(np.float64))()
            err = max(float(np.abs(g - r[0, 0].numpy()).max() / np.abs(r.numpy()).max())
                      for g, r in zip(grads[:3], ref))
        except ImportError:
            t_sdpa, err = float("nan"), float("nan")
    pm = n * n * 4
    print(f"# causal attention forward + backward, P=M={n}, E=F={d}, f32, one head, "
          f"tile {args.tile} — {datetime.date.today()}")
    print(f"# {platform.processor() or platform.machine()}, {platform.python_version()}, "
          f"numpy {np.__version__}; gradients vs float64 SDPA autograd: max relative "
          f"error {err:.1e}")
    print("| form | time (ms) | peak numpy memory (MiB) | time / SDPA fwd+bwd |")
    print("|---|---|---|---|")
    print(f"| fused numpy forward (with stats) | {t_fwd * 1e3:.1f} | - | {t_fwd / t_sdpa:.2f} |")
    print(f"| fused numpy forward + backward | {t_train * 1e3:.1f} | {m_train / 2**20:.1f} | "
          f"{t_train / t_sdpa:.2f} |")
    print(f"| torch SDPA forward + backward (CPU) | {t_sdpa * 1e3:.1f} | - | 1.00 |")
    print(f"\nforward + backward peak numpy memory / one P x M float32 tensor "
          f"({pm / 2**20:.0f} MiB) = {m_train / pm:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--big", action="store_true", help="also run P=M=65536 (fused)")
    ap.add_argument("--backward", action="store_true",
                    help="forward + backward (the derived backward program) against SDPA")
    args = ap.parse_args()
    spec = ROOT / "examples" / "causal.attn"
    rng = np.random.default_rng(0)
    n, d = args.n, args.d
    q, k, v = (rng.standard_normal((n, d)).astype(np.float32) for _ in range(3))
    if args.backward:
        return backward_rows(args, q, k, v)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dense = compile_spec(spec, ["canonicalize"], False, Path(tmp), "O0", None)
        fused = compile_spec(spec, None, True, Path(tmp), "fused", args.tile)
        ref = dense(q, k, v)
        err = float(np.abs(fused(q, k, v) - ref).max() / np.abs(ref).max())
        t_dense = timed(lambda: dense(q, k, v), args.repeat)
        t_fused = timed(lambda: fused(q, k, v), args.repeat)
        m_dense = peak_bytes(lambda: dense(q, k, v))
        m_fused = peak_bytes(lambda: fused(q, k, v))
        try:
            t_sdpa = timed(sdpa(q, k, v), args.repeat)
        except ImportError:
            t_sdpa = float("nan")
        rows.append(("per-Einsum numpy (-O0)", t_dense, m_dense))
        rows.append((f"fused numpy (tile {args.tile})", t_fused, m_fused))
        rows.append(("torch SDPA (CPU)", t_sdpa, None))
        big = None
        if args.big:
            nb = 65536
            qb, kb, vb = (rng.standard_normal((nb, d)).astype(np.float32) for _ in range(3))
            t0 = time.perf_counter()
            mb = peak_bytes(lambda: fused(qb, kb, vb))
            big = (time.perf_counter() - t0, mb)
    print(f"# causal attention, P=M={n}, E=F={d}, f32, one head — {datetime.date.today()}")
    print(f"# {platform.processor() or platform.machine()}, {platform.python_version()}, "
          f"numpy {np.__version__}; fused vs dense max relative error {err:.1e}")
    print("| form | time (ms) | peak numpy memory (MiB) | time / per-Einsum | time / SDPA |")
    print("|---|---|---|---|---|")
    for name, t, m in rows:
        mem = f"{m / 2**20:.1f}" if m is not None else "-"
        print(f"| {name} | {t * 1e3:.1f} | {mem} | {t / t_dense:.2f} | {t / t_sdpa:.2f} |")
    if m_dense:
        print(f"\nfused peak memory / per-Einsum peak memory = {m_fused / m_dense:.3f}")
    if big:
        print(f"P=M=65536 fused: {big[0]:.1f} s, peak numpy memory {big[1] / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
