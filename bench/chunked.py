"""CPU benchmark: the linear family's chunked forms scale linearly with the sequence.

    python bench/chunked.py                   # N = 4096, 16384, 65536; E = F = 16; f32
    python bench/chunked.py --n 2048 8192 --repeat 3

For each example (retention, GLA, causal linear attention, RWKV) the numpy module the
default pipeline compiles at that N (the cost model picks the form: chunked at these
sizes) is timed at each N, median of --repeat runs after a warm-up, with numpy's traced
peak memory for one call.  The ratio column is time(4N) / time(N): the issue's target
is at most 4.5 (O(N) time).  The quadratic form's time at the smallest N is printed beside
it for scale.  One process, one thread (OMP/MKL threads as the environment sets them).
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from attnc.backends import compile_module, load_generated, write_atomic  # noqa: E402
from attnc.frontends import parse_file  # noqa: E402
from cpu import peak_bytes, timed  # noqa: E402

NAMES = ("retention", "gla", "linear_causal", "rwkv")


def module_for(name: str, n: int, tmp: Path, passes=None):
    spec = ROOT / "examples" / f"{name}.attn"
    module = parse_file(spec)
    sizes = {"P": n, "M": n, "E": 16, "F": 16}
    _, files = compile_module(module, "numpy", name, passes, {"sizes": sizes})
    path = tmp / f"{name}_{n}_{'q' if passes else 'c'}.py"
    write_atomic(path, files[f"{name}.py"])
    return getattr(load_generated(path), module.definitions[0].name)


def inputs(name: str, n: int, rng) -> list:
    args = [rng.standard_normal((n, 16)).astype(np.float32) for _ in range(3)]
    if name == "gla":
        args.append(np.log(rng.uniform(0.9, 1.0, n)).astype(np.float32))
    if name == "rwkv":
        args += [rng.standard_normal(16).astype(np.float32) for _ in range(2)]
    return args


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"# {datetime.date.today()}  {platform.processor() or platform.machine()}  "
          f"numpy {np.__version__}  E = F = 16, float32")
    print(f"{'spec':<14}{'N':>7}{'time s':>10}{'x prev':>8}{'peak MB':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in NAMES:
            prev = None
            for n in args.n:
                fn = module_for(name, n, Path(tmp))
                xs = inputs(name, n, rng)
                t = timed(lambda: fn(*xs), args.repeat)
                peak = peak_bytes(lambda: fn(*xs)) / 2 ** 20
                ratio = f"{t / prev:8.2f}" if prev else f"{'':>8}"
                print(f"{name:<14}{n:>7}{t:>10.4f}{ratio}{peak:>9.1f}")
                prev = t
            n = args.n[0]
            quad = module_for(name, n, Path(tmp), ["canonicalize", "defer-normalization",
                                                   "online", "stream-final"])
            xs = inputs(name, n, rng)
            print(f"{name + ' quadratic':<14}{n:>7}{timed(lambda: quad(*xs), 1):>10.4f}")


if __name__ == "__main__":
    main()
