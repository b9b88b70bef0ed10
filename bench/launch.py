"""Launcher overhead: the Python a generated function spends per call, kernels stubbed out.

    python bench/launch.py                  # every example, Triton and CUDA, 2000 calls each
    python bench/launch.py --calls 500 causal.attn gqa_decode.attn

The kernels are replaced by no-ops (Triton: each ``@triton.jit`` function; CUDA: the
compiled entry), so what is timed is the launcher alone: argument checks, size binding,
the variant choice, allocations and the launch calls.  Each example runs twice in the
same process, on small CPU tensors of one shape (float32; Triton's launcher on CPU
tensors under TRITON_INTERPRET=1, CUDA's under ATTNC_CUDA_EMULATE=1):

* ``first``: every call takes the slow path (launch recipes disabled);
* ``replay``: later calls of the class replay the recipe the first call recorded.

The public function is timed (the Triton one through its torch custom op).  Both columns
are medians over ``--calls`` calls after a warm-up; allocations of CPU tensors are part of
both.  The issue's target is replay <= 50 us per call.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("ATTNC_CUDA_EMULATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from attnc.backends import compile_module, load_generated, write_atomic  # noqa: E402
from attnc.backends.check import random_call, random_sizes  # noqa: E402
from attnc.frontends import parse_file  # noqa: E402

EXAMPLES = ROOT / "examples"


class _NoKernel:
    """A ``@triton.jit`` function whose launches do nothing."""

    def __getitem__(self, grid):
        return self

    def __call__(self, *args, **kwargs):
        return None


def stub_triton(gen) -> None:
    for name in dir(gen):
        if name.startswith("_") and name.endswith("_kernel"):
            setattr(gen, name, _NoKernel())


def stub_cuda(gen) -> None:
    def entry(*args):
        return 0

    gen._library = lambda *a, **k: (entry, None, None)


def per_call_us(fn, args, params, calls: int) -> float:
    for _ in range(20):
        fn(*args, **params)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn(*args, **params)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def measure(spec: Path, backend: str, tmp: Path, calls: int):
    module = parse_file(spec)
    defn = module.definitions[0]
    stem = f"{spec.stem}_{backend}_launch"
    _, files = compile_module(module, backend, stem, options={})
    for name, text in files.items():
        write_atomic(tmp / name, text)
    gen = load_generated(tmp / f"{stem}.py")
    (stub_triton if backend == "triton" else stub_cuda)(gen)
    rng = np.random.default_rng(0)
    arrays, params = random_call(defn, rng, random_sizes(defn, rng, 8, 24))
    args = [torch.from_numpy(np.asarray(a, np.float32)) if a.dtype.kind == "f"
            else torch.from_numpy(a) for a in arrays]
    fn = getattr(gen, defn.name)
    key = gen._call_key
    gen._call_key = lambda *a: None  # recipes off: every call the slow path
    first = per_call_us(fn, args, params, calls)
    gen._call_key = key
    gen._RECIPES.clear()
    replay = per_call_us(fn, args, params, calls)
    return first, replay, len(gen._RECIPES)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("examples", nargs="*", help="example files (default: all)")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--backends", default="triton,cuda")
    opts = ap.parse_args()
    specs = ([EXAMPLES / e for e in opts.examples] if opts.examples
             else sorted(EXAMPLES.rglob("*.attn")))
    print(f"# launcher overhead, kernels stubbed: {datetime.date.today()}, {platform.node()}, "
          f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, "
          f"torch {torch.__version__}")
    print("| example | backend | slow path (us/call) | replay (us/call) | ratio |")
    print("|---|---|---:|---:|---:|")
    replays = []
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for spec in specs:
            for backend in opts.backends.split(","):
                try:
                    first, replay, recorded = measure(spec, backend, Path(tmp), opts.calls)
                except Exception as err:  # a spec this backend refuses: say so, go on
                    print(f"| {spec.relative_to(EXAMPLES)} | {backend} | refused: "
                          f"{str(err).splitlines()[0][:60]} | | |")
                    continue
                note = "" if recorded else " (not recorded)"
                replays.append(replay)
                print(f"| {spec.relative_to(EXAMPLES)} | {backend} | {first:.1f} | "
                      f"{replay:.1f}{note} | {first / replay:.1f}x |", flush=True)
    if replays:
        print(f"\nreplay: median {statistics.median(replays):.1f} us, max {max(replays):.1f} us "
              f"over {len(replays)} launchers")


if __name__ == "__main__":
    main()
