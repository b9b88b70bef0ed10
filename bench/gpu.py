"""GPU check and benchmark, in one call: numerics of every example, then timings.

    python bench/gpu.py                 # on a CUDA machine; writes $OUT/gpu_results.md
    TRITON_INTERPRET=1 python bench/gpu.py --smoke    # the same code paths on the CPU

1. Numerics: every example compiled with the Triton backend and with the CUDA
   backend, on random inputs at ragged sizes with a batch dim, against the float64
   reference interpreter (f32 and bf16 inputs).  Both backends at once, each over
   ``--shards`` processes (kernel compiles are CPU work; the machine has 16 cores).
2. Prefill, B=4, H=16, D=128, bf16, N=4096 and 16384: full, causal, sliding window
   1024, ALiBi, softcap, softmax_1, sigmoid, differential — TFLOP/s of attnc's
   kernel, SDPA and torch.compile(flex_attention) wherever they express it, and
   the ratio to the best peer.  Then training: forward + backward through torch
   autograd (the derived backward program) for causal, ALiBi, softcap and sliding
   window against SDPA's and Flex's backward, with the gradients' bf16 and f32
   error against the float64 interpreter running the backward cascade.
3. Decode, GQA 32/8, D=128, B=1, context 8k/32k/128k — TB/s of K/V read for the
   launcher's choice and for each variant forced (streamed, split-K, stream-K),
   against SDPA, and against the measured copy bandwidth.  Then batched decode against
   a paged cache (B 8 and 32, pages of 16 and 64, ragged lengths) against SDPA on the
   un-paged cache and the copy bandwidth.
4. The linear family's chunked programs (retention, GLA) against flash-linear-attention's
   chunk kernels where fla-core imports, N = 4096 and 16384.
Each section survives the failure of another and stops at its limit (``--limits``,
about 5 minutes in all); the timings run alone on the GPU, side by side in this one
run (median of triton.testing.do_bench).
"""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from attnc.backends import compile_module, load_generated, write_atomic  # noqa: E402
from attnc.backends.check import random_call, random_sizes, relative_error  # noqa: E402
from attnc.backends.triton_backend import TritonUnsupported  # noqa: E402
from attnc.passes.tile import NotTileable  # noqa: E402
from attnc.einsum_ir.interpreter import interpret  # noqa: E402
from attnc.frontends import parse_file  # noqa: E402

EXAMPLES = ROOT / "examples"
LINES: list[str] = []
START = time.time()


def say(text: str = "") -> None:
    """Print a result line and append it to $OUT/gpu_results.md at once (survives a kill);
    a shard of a section appends to its own part file, which the driver merges."""
    print(text, flush=True)
    LINES.append(text)
    out = Path(os.environ.get("OUT", ROOT / "bench"))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / os.environ.get("ATTNC_BENCH_PART", "gpu_results.md"), "a") as f:
        f.write(text + "\n")


def examples(shard: tuple[int, int]) -> list[Path]:
    """This shard's share of the examples (every n-th, from the k-th)."""
    k, n = shard
    return sorted(EXAMPLES.rglob("*.attn"))[k::n]


def compile_triton(spec: Path, tile: int, tmp: Path, workers: int | None = None):
    module = parse_file(spec)
    names = None if workers is None else [
        "canonicalize", "defer-normalization", "reassociate", "online", "split-k"]
    _, files = compile_module(module, "triton", spec.stem, names, {"tile": tile, "workers": workers})
    path = tmp / f"{spec.stem}_t{tile}_w{workers}.py"
    write_atomic(path, files[f"{spec.stem}.py"])
    return module, load_generated(path)


def compile_cuda(spec: Path, tile: int, tmp: Path):
    module = parse_file(spec)
    _, files = compile_module(module, "cuda", spec.stem, None, {"tile": tile})
    for name, text in files.items():
        write_atomic(tmp / f"cu_{name}", text)
    (tmp / f"cu_{spec.stem}.cu").rename(tmp / f"{spec.stem}.cu")
    return module, load_generated(tmp / f"cu_{spec.stem}.py")


def numerics_cuda(tmp: Path, device: str, shard=(0, 1)) -> None:
    """The CUDA backend (bf16 and f32 inputs) against the interpreter."""
    if shard[1] == 1:
        for line in CUDA_HEADER:
            say(line)
    rng = np.random.default_rng(100 + shard[0])
    for spec in examples(shard):
        name = str(spec.relative_to(EXAMPLES))
        try:
            module, gen = compile_cuda(spec, 64, tmp)
        except NotTileable as err:
            say(f"| {name} | - | not compiled: {str(err)[:90]} |")
            continue
        except Exception as err:  # noqa: BLE001
            say(f"| {name} | - | COMPILE ERROR {type(err).__name__}: {str(err)[:80]} |")
            continue
        for defn in module.definitions:
            try:
                sizes = random_sizes(defn, rng, 17, 100)
                args, params = random_call(defn, rng, sizes, (2,), (2,))
                want = interpret(defn, *args, **params)
                want = want if isinstance(want, tuple) else (want,)
                errs = relative_errors(getattr(gen, defn.name), args, params, want, device,
                                       (torch.bfloat16, torch.float32))
                ok = errs[0] < 5e-2 and errs[1] < 1e-4
                say(f"| {name}:{defn.name} | {errs[0]:.1e} | {errs[1]:.1e} | {'ok' if ok else 'FAIL'} |")
            except Exception as err:  # noqa: BLE001
                say(f"| {name}:{defn.name} | - | - | RUN ERROR {type(err).__name__}: {str(err)[:80]} |")


def relative_errors(fn, args, params, want, device, dtypes) -> list[float]:
    """For each dtype: the floating inputs in it, the worst output's error against ``want``."""
    errs = []
    for dtype in dtypes:
        xs = [torch.from_numpy(a).to(device=device, dtype=dtype)
              if a.dtype == np.float64 else torch.from_numpy(a).to(device) for a in args]
        got = fn(*xs, **params)
        got = got if isinstance(got, tuple) else (got,)
        errs.append(max(relative_error(g.float().cpu().numpy(), w) for g, w in zip(got, want)))
    return errs


def bench_ms(fn) -> float:
    """Median milliseconds (triton.testing.do_bench on a GPU; one timed call on the CPU,
    where --smoke only exercises the code paths)."""
    if not torch.cuda.is_available():
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


# ----------------------------------------------------------------------------
# 1. numerics
# ----------------------------------------------------------------------------


NUMERICS_HEADER = ["## Numerics: every example vs the float64 interpreter",
                   "| example | f32 rel. error | bf16 (f16 on CPU) rel. error | status |",
                   "|---|---|---|---|"]
CUDA_HEADER = ["\n## Numerics, CUDA backend vs the float64 interpreter",
               "| example | bf16 rel. error | f32 rel. error | status |",
               "|---|---|---|---|"]


def numerics(tmp: Path, device: str, smoke: bool, shard=(0, 1)) -> None:
    if shard[1] == 1:
        for line in NUMERICS_HEADER:
            say(line)
    rng = np.random.default_rng(shard[0])
    lo, hi = (3, 20) if smoke else (17, 100)
    for spec in examples(shard):
        name = str(spec.relative_to(EXAMPLES))
        try:
            module, gen = compile_triton(spec, 16 if smoke else 64, tmp)
        except TritonUnsupported as err:
            say(f"| {name} | - | - | not compiled: {str(err)[:90]} |")
            continue
        except Exception as err:  # a compiler bug: record and go on
            say(f"| {name} | - | - | COMPILE ERROR {type(err).__name__}: {str(err)[:80]} |")
            continue
        for defn in module.definitions:
            try:
                sizes = random_sizes(defn, rng, lo, hi)
                args, params = random_call(defn, rng, sizes, (2,), (2,))
                want = interpret(defn, *args, **params)
                want = want if isinstance(want, tuple) else (want,)
                # the CPU interpreter's tl.dot is wrong for bf16 (triton 3.9): test f16 there
                half = torch.bfloat16 if device == "cuda" else torch.float16
                errs = relative_errors(getattr(gen, defn.name), args, params, want, device,
                                       (torch.float32, half))
                ok = errs[0] < 2e-3 and errs[1] < 5e-2
                say(f"| {name}:{defn.name} | {errs[0]:.1e} | {errs[1]:.1e} | {'ok' if ok else 'FAIL'} |")
            except Exception as err:
                say(f"| {name}:{defn.name} | - | - | RUN ERROR {type(err).__name__}: {str(err)[:80]} |")
                traceback.print_exc()


# ----------------------------------------------------------------------------
# 2. prefill
# ----------------------------------------------------------------------------


def visible_pairs(n: int, kind: str, window: int = 1024) -> int:
    if kind == "full":
        return n * n
    if kind == "window":
        return sum(min(p + 1, window) for p in range(n))
    return n * (n + 1) // 2


def prefill_setup(smoke: bool):
    """SDPA, torch.compile(flex_attention) and create_block_mask (None, None when Flex is
    missing), the shape (B, H, D) and the dtype of the prefill and training sections."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        flex = torch.compile(flex_attention)
    except Exception:  # noqa: BLE001 - flex is optional
        flex, create_block_mask = None, None
    shape = (1, 2, 64) if smoke else (4, 16, 128)
    return sdpa, flex, create_block_mask, shape, torch.float32 if smoke else torch.bfloat16


def prefill(tmp: Path, device: str, sizes: list[int], smoke: bool) -> None:
    sdpa, flex, create_block_mask, (B, H, D), dt = prefill_setup(smoke)
    say("\n## Prefill: TFLOP/s (B=%d, H=%d, D=%d, %s)" % (B, H, D, str(dt).split(".")[-1]))
    say("| variant | N | attnc | SDPA | Flex | attnc / best peer |")
    say("|---|---|---|---|---|---|")
    window = 1024

    def causal_mask(b, h, q, k):
        return k <= q

    def window_mask(b, h, q, k):
        return (k <= q) & (q - k < window)

    variants = [
        ("full", "fusemax/cascade4.attn", "full", {}),
        ("causal", "causal.attn", "causal", {}),
        ("sliding window 1024", "sliding_window.attn", "window", {"window": float(window)}),
        ("ALiBi", "alibi.attn", "causal", {}),
        ("softcap", "softcap.attn", "causal", {"cap": 50.0}),
        ("softmax_1", "softmax1.attn", "causal", {}),
        ("sigmoid", "sigmoid.attn", "full", {}),
        ("differential", "differential.attn", "causal", {"lam": 0.5}),
    ]
    for n in sizes:
        if smoke:
            n = 96
        g = torch.Generator(device="cpu").manual_seed(n)

        def rand(*shape):
            return torch.randn(*shape, generator=g).to(device=device, dtype=dt)

        q, k, v = rand(B, H, n, D), rand(B, H, n, D), rand(B, H, n, D)
        q2, k2 = rand(B, H, n, D), rand(B, H, n, D)
        slopes = torch.tensor([2 ** (-8 * (i + 1) / H) for i in range(H)], device=device)
        for label, spec, kind, params in variants:
            if time.time() - START > 200:
                say(f"| {label} | {n} | skipped: time budget | | | |")
                continue
            pairs = visible_pairs(n, kind, window)
            flops = 4 * B * H * D * pairs * (1.5 if label == "differential" else 1.0)
            row = {"attnc": None, "SDPA": None, "Flex": None}
            try:
                _, gen = compile_triton(EXAMPLES / spec, 64, tmp)
                fn = getattr(gen, parse_file(EXAMPLES / spec).definitions[0].name)
                if label == "ALiBi":
                    call = lambda: fn(q, k, v, slopes)  # noqa: E731
                elif label == "differential":
                    call = lambda: fn(q, k, q2, k2, v, **params)  # noqa: E731
                else:
                    call = lambda: fn(q, k, v, **params)  # noqa: E731
                row["attnc"] = bench_ms(call)
            except Exception as err:  # noqa: BLE001
                row["attnc_error"] = f"{type(err).__name__}: {str(err)[:60]}"
            if label in ("full", "causal") and device == "cuda":
                try:
                    _, cgen = compile_cuda(EXAMPLES / spec, 64, tmp)
                    cfn = getattr(cgen, parse_file(EXAMPLES / spec).definitions[0].name)
                    row["cuda"] = bench_ms(lambda: cfn(q, k, v))
                except Exception as err:  # noqa: BLE001
                    row["cuda_error"] = f"{type(err).__name__}: {str(err)[:60]}"
            try:
                if label in ("full", "causal"):
                    row["SDPA"] = bench_ms(lambda: sdpa(q, k, v, is_causal=kind == "causal"))
                elif label == "sliding window 1024" and n <= 16384:
                    i = torch.arange(n, device=device)
                    mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
                    row["SDPA"] = bench_ms(lambda: sdpa(q, k, v, attn_mask=mask))
                elif label == "ALiBi" and n <= 4096:
                    i = torch.arange(n, device=device)
                    bias = -(slopes[:, None, None] * (i[:, None] - i[None, :])).to(dt)
                    bias = bias.masked_fill(i[None, :] > i[:, None], float("-inf"))
                    row["SDPA"] = bench_ms(lambda: sdpa(q, k, v, attn_mask=bias))
                elif label == "differential":
                    row["SDPA"] = bench_ms(lambda: sdpa(q, k, v, is_causal=True)
                                           - 0.5 * sdpa(q2, k2, v, is_causal=True))
            except Exception as err:  # noqa: BLE001
                row["sdpa_error"] = str(err)[:60]
            try:
                if flex is not None and label in ("full", "causal", "sliding window 1024", "ALiBi",
                                                  "softcap", "differential"):
                    mod = window_mask if label.startswith("sliding") else causal_mask
                    bm = None if label == "full" else create_block_mask(mod, None, None, n, n, device=device)
                    if label == "ALiBi":
                        def score(s, b, h, qi, ki):
                            return s - slopes[h] * (qi - ki)
                        row["Flex"] = bench_ms(lambda: flex(q, k, v, score_mod=score, block_mask=bm))
                    elif label == "softcap":
                        def score(s, b, h, qi, ki):
                            return 50.0 * torch.tanh(s / 50.0)
                        row["Flex"] = bench_ms(lambda: flex(q, k, v, score_mod=score, block_mask=bm))
                    elif label == "differential":
                        row["Flex"] = bench_ms(lambda: flex(q, k, v, block_mask=bm)
                                               - 0.5 * flex(q2, k2, v, block_mask=bm))
                    else:
                        row["Flex"] = bench_ms(lambda: flex(q, k, v, block_mask=bm))
            except Exception as err:  # noqa: BLE001
                row["flex_error"] = str(err)[:60]

            def tf(ms):
                return "-" if ms is None else f"{flops / ms / 1e9:.0f}"

            peers = [row[x] for x in ("SDPA", "Flex") if row[x] is not None]
            if label in ("softmax_1", "sigmoid") and "causal_sdpa" in row:
                peers = []
            ratio = "-" if row["attnc"] is None or not peers else f"{min(peers) / row['attnc']:.2f}"
            if label in ("full", "causal") and row["attnc"] is not None:
                try:
                    mine = call().float()
                    theirs = sdpa(q, k, v, is_causal=kind == "causal").float()
                    err = ((mine - theirs).norm() / theirs.norm()).item()
                    ratio += f" (vs SDPA: rel. diff {err:.1e})"
                except Exception as e:  # noqa: BLE001
                    ratio += f" (compare failed: {str(e)[:40]})"
            note = row.get("attnc_error", "")
            if "cuda" in row or "cuda_error" in row:
                note += f" (cuda backend: {tf(row['cuda']) if row.get('cuda') else row.get('cuda_error')})"
            say(f"| {label} | {n} | {tf(row['attnc']) if row['attnc'] else ''}{note} | {tf(row['SDPA'])} | "
                f"{tf(row['Flex'])} | {ratio} |")


# ----------------------------------------------------------------------------
# 2b. training: forward + backward
# ----------------------------------------------------------------------------


def compile_grad(spec: Path, tile: int | None, tmp: Path):
    """The Triton module with its backward program (NAME differentiable); ``tile`` None:
    the defaults (64 for the forward, 32 for the backward's gradient stages)."""
    module = parse_file(spec)
    _, files = compile_module(module, "triton", spec.stem, None, {"tile": tile}, backward=True)
    path = tmp / f"{spec.stem}_grad_t{tile}.py"
    write_atomic(path, files[f"{spec.stem}.py"])
    return module, load_generated(path)


def grad_errors(module, gen, device: str, dtype) -> float:
    """NAME_backward on ``dtype`` inputs against the float64 interpreter running the
    derived backward cascade, at small ragged sizes with a batch dim: the worst gradient's
    relative error."""
    from attnc.passes.backward import backward

    defn = module.definitions[0]
    rng = np.random.default_rng(7)
    sizes = random_sizes(defn, rng, 17, 90)
    args, params = random_call(defn, rng, sizes, (2,), (2,))
    outs = interpret(defn, *args, **params)
    outs = outs if isinstance(outs, tuple) else (outs,)
    douts = [rng.standard_normal(o.shape) for o in outs]
    bw = backward(defn)
    want = interpret(bw, *args, *douts, **params)
    want = want if isinstance(want, tuple) else (want,)
    xs = [torch.from_numpy(a).to(device=device, dtype=dtype) if a.dtype == np.float64
          else torch.from_numpy(a).to(device) for a in list(args) + douts]
    got = getattr(gen, f"{defn.name}_backward")(*xs, **params)
    got = got if isinstance(got, tuple) else (got,)
    return max(relative_error(g.float().cpu().numpy(), w) for g, w, o in zip(got, want, bw.outputs)
               if o.ranks and g is not None)


def train(tmp: Path, device: str, sizes: list[int], smoke: bool) -> None:
    """Forward + backward (torch autograd through the derived backward) against SDPA's and
    Flex's, and the gradients' error in bf16 (f16 on the CPU interpreter) and f32."""
    sdpa, flex, create_block_mask, (B, H, D), dt = prefill_setup(smoke)
    half = torch.bfloat16 if device == "cuda" else torch.float16
    window = 1024 if not smoke else 32
    say("\n## Training: forward + backward, TFLOP/s (B=%d, H=%d, D=%d, %s; 3.5x the forward's "
        "FLOPs, FA2's count)" % (B, H, D, str(dt).split(".")[-1]))
    say("| variant | N | attnc | SDPA | Flex | attnc / best peer | grads rel. error %s / f32 |"
        % str(half).split(".")[-1])
    say("|---|---|---|---|---|---|---|")
    variants = [("causal", "causal.attn", "causal", {}), ("ALiBi", "alibi.attn", "causal", {}),
                ("softcap", "softcap.attn", "causal", {"cap": 50.0}),
                ("sliding window", "sliding_window.attn", "window", {"window": float(window)})]
    errors = {}
    for n in sizes:
        n = 96 if smoke else n
        g = torch.Generator(device="cpu").manual_seed(n)

        def rand(*shape, grad=True):
            return torch.randn(*shape, generator=g).to(device=device, dtype=dt).requires_grad_(grad)

        q, k, v = rand(B, H, n, D), rand(B, H, n, D), rand(B, H, n, D)
        do = rand(B, H, n, D, grad=False)
        slopes = torch.tensor([2 ** (-8 * (i + 1) / H) for i in range(H)], device=device)
        for label, spec, kind, params in variants:
            if time.time() - START > 240:
                say(f"| {label} | {n} | skipped: time budget | | | | |")
                continue
            flops = 3.5 * 4 * B * H * D * visible_pairs(n, kind, window)
            row, note = {}, ""
            try:
                module, gen = compile_grad(EXAMPLES / spec, None if not smoke else 16, tmp)
                fn = getattr(gen, module.definitions[0].name)
                if label not in errors:
                    errors[label] = (grad_errors(module, gen, device, half),
                                     grad_errors(module, gen, device, torch.float32))
                extra = (slopes,) if label == "ALiBi" else ()
                row["attnc"] = bench_ms(lambda: torch.autograd.grad(
                    fn(q, k, v, *extra, **params), (q, k, v), do))
            except Exception as err:  # noqa: BLE001
                note = f"{type(err).__name__}: {str(err)[:60]}"
            try:
                if label == "causal":
                    row["SDPA"] = bench_ms(lambda: torch.autograd.grad(
                        sdpa(q, k, v, is_causal=True), (q, k, v), do))
                elif label == "sliding window" and n <= 16384:
                    i = torch.arange(n, device=device)
                    mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
                    row["SDPA"] = bench_ms(lambda: torch.autograd.grad(
                        sdpa(q, k, v, attn_mask=mask), (q, k, v), do))
            except Exception as err:  # noqa: BLE001
                note += f" (SDPA: {str(err)[:40]})"
            try:
                if flex is not None:
                    def causal_mask(b, h, qi, ki):
                        return ki <= qi

                    def window_mask(b, h, qi, ki):
                        return (ki <= qi) & (qi - ki < window)

                    def alibi(s, b, h, qi, ki):
                        return s - slopes[h] * (qi - ki)

                    def softcap(s, b, h, qi, ki):
                        return 50.0 * torch.tanh(s / 50.0)

                    bm = create_block_mask(window_mask if kind == "window" else causal_mask,
                                           None, None, n, n, device=device)
                    score = {"ALiBi": alibi, "softcap": softcap}.get(label)
                    row["Flex"] = bench_ms(lambda: torch.autograd.grad(
                        flex(q, k, v, score_mod=score, block_mask=bm), (q, k, v), do))
            except Exception as err:  # noqa: BLE001
                note += f" (Flex: {str(err)[:40]})"

            def tf(ms):
                return "-" if ms is None else f"{flops / ms / 1e9:.0f}"

            peers = [row[x] for x in ("SDPA", "Flex") if row.get(x) is not None]
            ratio = "-" if row.get("attnc") is None or not peers else \
                f"{min(peers) / row['attnc']:.2f}"
            e = errors.get(label)
            err_text = "-" if e is None else f"{e[0]:.1e} / {e[1]:.1e}"
            say(f"| {label} | {n} | {tf(row.get('attnc'))}{note} | {tf(row.get('SDPA'))} | "
                f"{tf(row.get('Flex'))} | {ratio} | {err_text} |")


# ----------------------------------------------------------------------------
# 3. decode
# ----------------------------------------------------------------------------


def copy_bandwidth(device: str) -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ms = bench_ms(lambda: y.copy_(x))
    return 2 * x.numel() / ms / 1e9


class forced_env:
    """Set environment variables for the duration of a block (the launchers read them per call)."""

    def __init__(self, **env):
        self.env, self.saved = env, {}

    def __enter__(self):
        for k, v in self.env.items():
            self.saved[k] = os.environ.get(k)
            os.environ[k] = v

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def timed_runs(what: str, runs) -> tuple[dict, dict]:
    """(outputs as float32, ms) of each ``(label, fn)`` (None: skipped); a failure is a
    result line, not the end of the section."""
    outs, times = {}, {}
    for label, fn in runs:
        if fn is None:
            continue
        try:
            outs[label] = fn().float()
            times[label] = bench_ms(fn)
        except Exception as err:  # noqa: BLE001
            say(f"{what} ({label}) failed: {str(err)[:200]}")
    return outs, times


def both_backends(example: str, tmp: Path, device: str):
    """An example's Triton module (tile 64) and, on a GPU, its CUDA function (None where
    the CUDA backend fails, which the results say)."""
    _, gen = compile_triton(EXAMPLES / f"{example}.attn", 64, tmp)
    cuda_fn = None
    if device == "cuda":
        try:
            cuda_fn = getattr(compile_cuda(EXAMPLES / f"{example}.attn", 64, tmp)[1], example)
        except Exception as err:  # noqa: BLE001
            say(f"cuda backend: {type(err).__name__}: {str(err)[:200]}")
    return gen, cuda_fn


def decode(tmp: Path, device: str, smoke: bool) -> None:
    """GQA decode: the launcher's own choice, then each variant forced (streamed kernel,
    split-K, stream-K), side by side with SDPA and the copy bandwidth."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    H, HK, D = (4, 2, 64) if smoke else (32, 8, 128)
    dt = torch.float32 if smoke else torch.bfloat16
    copy = copy_bandwidth(device) if not smoke else float("nan")
    sms = torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 4
    # B=1 and packed heads: HK programs of one row block each
    forced = {"auto": {}, "streamed": {"ATTNC_SPLIT": "1"},
              "split-K": {"ATTNC_SPLIT": str(-(-2 * sms // HK))},
              "stream-K": {"ATTNC_STREAM_K": str(2 * sms)}}
    say(f"\n## Decode: GQA {H}/{HK}, D={D}, B=1, {dt} — TB/s of K/V read (copy: {copy:.2f} TB/s)")
    say("auto = the launcher's heuristic; split-K with " + forced["split-K"]["ATTNC_SPLIT"]
        + " workers per K/V head, stream-K with " + forced["stream-K"]["ATTNC_STREAM_K"] + " workers")
    say("| context | " + " | ".join(f"attnc {k}" for k in forced)
        + " | attnc cuda (auto) | SDPA | best attnc / SDPA | best attnc / copy |")
    say("|---|" + "---|" * (len(forced) + 4))
    gen, cuda_fn = both_backends("gqa_decode", tmp, device)
    for n in ((300,) if smoke else (8192, 32768, 131072)):
        q = torch.randn(1, H, 1, D, device=device, dtype=dt)
        k = torch.randn(1, HK, n, D, device=device, dtype=dt)
        v = torch.randn(1, HK, n, D, device=device, dtype=dt)
        nbytes = 2 * HK * n * D * k.element_size()
        times = {}
        for label, env in forced.items():
            try:
                with forced_env(**env):
                    times[label] = bench_ms(lambda: gen.gqa_decode(q, k, v))
            except Exception as err:  # noqa: BLE001
                say(f"attnc decode ({label}) failed: {str(err)[:200]}")
        cuda_ms = None
        if cuda_fn is not None:
            try:
                cuda_ms = bench_ms(lambda: cuda_fn(q, k, v))
            except Exception as err:  # noqa: BLE001
                say(f"cuda decode failed: {str(err)[:200]}")
        ref = None
        try:
            ref = bench_ms(lambda: sdpa(q, k, v, enable_gqa=True))
        except Exception as err:  # noqa: BLE001
            say(f"SDPA decode failed: {err}")

        def tb(ms):
            return "-" if ms is None else f"{nbytes / ms / 1e9:.2f}"

        best = min(list(times.values()) + ([cuda_ms] if cuda_ms else [])) if times or cuda_ms else None
        ratio = "-" if best is None or ref is None else f"{ref / best:.2f}"
        frac = "-" if best is None else f"{nbytes / best / 1e9 / copy:.2f}"
        say(f"| {n} | " + " | ".join(tb(times.get(k)) for k in forced)
            + f" | {tb(cuda_ms)} | {tb(ref)} | {ratio} | {frac} |")


def paged(tmp: Path, device: str, smoke: bool) -> None:
    """Batched decode against a paged KV cache (issue 14): B sequences of ragged lengths
    (half the context to all of it), pages of PG keys scattered over a shuffled cache.
    TB/s of K/V read (the keys each sequence attends to) by attnc's Triton and CUDA
    kernels, against SDPA on the un-paged equivalent (the pages gathered into a padded
    dense cache, lengths as a mask; the gather not timed) and the copy bandwidth, with
    attnc's error against SDPA's output."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    H, HK, D = (4, 2, 16) if smoke else (32, 8, 128)
    dt = torch.float32 if smoke else torch.bfloat16
    copy = copy_bandwidth(device) if not smoke else float("nan")
    say(f"\n## Paged batch decode: GQA {H}/{HK}, D={D}, {dt}, ragged lengths — TB/s of K/V read "
        f"(copy: {copy:.2f} TB/s)")
    gen, cuda_fn = both_backends("paged_decode", tmp, device)
    try:
        import flashinfer  # noqa: F401
        say("(flashinfer imports here; its batch decode is not wired into this table yet)")
    except ImportError:
        say("(flashinfer is not installed here: SDPA on the un-paged cache is the peer)")
    say("| B | context | page | attnc triton | attnc cuda | SDPA (dense, masked) "
        "| attnc / SDPA | attnc / copy | max error vs SDPA |")
    say("|---|---|---|---|---|---|---|---|---|")
    cases = ((2, 300, 16),) if smoke else ((8, 32768, 16), (8, 32768, 64), (32, 8192, 16))
    for B, ctx, PG in cases:
        gen_rng = torch.Generator().manual_seed(B * ctx + PG)
        lengths = torch.randint(ctx // 2, ctx + 1, (B,), generator=gen_rng)
        lengths[0] = ctx
        NB = -(-ctx // PG)
        NP = B * NB
        PT = torch.randperm(NP, generator=gen_rng).view(B, NB).to(torch.int32).to(device)
        KC = torch.randn(NP, PG, HK, D, generator=gen_rng).to(device, dt)
        VC = torch.randn(NP, PG, HK, D, generator=gen_rng).to(device, dt)
        q = torch.randn(B, H, D, generator=gen_rng).to(device, dt)
        L = lengths.to(torch.int32).to(device)
        nbytes = 2 * HK * D * KC.element_size() * int(lengths.sum())
        # the un-paged equivalent: [B, HK, NB * PG, D] and a mask of each sequence's keys
        dense_k = KC[PT.long()].reshape(B, NB * PG, HK, D).transpose(1, 2).contiguous()
        dense_v = VC[PT.long()].reshape(B, NB * PG, HK, D).transpose(1, 2).contiguous()
        mask = (torch.arange(NB * PG, device=device)[None, :] < L[:, None])[:, None, None, :]
        qs = q[:, :, None, :]
        outs, times = timed_runs("paged decode", (
            ("triton", lambda: gen.paged_decode(q, KC, VC, PT, L)),
            ("cuda", (lambda: cuda_fn(q, KC, VC, PT, L)) if cuda_fn else None),
            ("sdpa", lambda: sdpa(qs, dense_k, dense_v, attn_mask=mask,
                                  enable_gqa=True)[:, :, 0, :])))

        def tb(label):
            ms = times.get(label)
            return "-" if ms is None else f"{nbytes / ms / 1e9:.2f}"

        ours = [times[k] for k in ("triton", "cuda") if k in times]
        best = min(ours) if ours else None
        ratio = "-" if best is None or "sdpa" not in times else f"{times['sdpa'] / best:.2f}"
        frac = "-" if best is None else f"{nbytes / best / 1e9 / copy:.2f}"
        err = "-"
        if "sdpa" in outs and ours:
            err = f"{max(float((outs[k] - outs['sdpa']).abs().max()) for k in outs if k != 'sdpa'):.1e}"
        say(f"| {B} | {ctx} | {PG} | {tb('triton')} | {tb('cuda')} | {tb('sdpa')} | {ratio} | "
            f"{frac} | {err} |")


def linear(tmp: Path, device: str, sizes: list[int], smoke: bool) -> None:
    """The linear family's chunked programs (issue 13): retention and GLA, forward, against
    flash-linear-attention's chunk kernels where fla-core imports (``chunk_simple_gla``
    with a constant log-gate is retention with that decay), with the max error against
    fla's output; causal SDPA on the same shape for scale (another computation)."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    B, H, D = (1, 2, 16) if smoke else (4, 16, 128)
    dt = torch.float32 if smoke else torch.bfloat16
    try:
        import warnings

        warnings.simplefilter("ignore")
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as err:  # noqa: BLE001
        chunk_simple_gla = None
        say(f"(fla-core does not import here: {type(err).__name__}: {str(err)[:120]})")
    say(f"\n## Linear family, chunked: B={B}, H={H}, D={D}, {dt} — ms per forward")
    say("| spec | N | attnc triton | attnc cuda | fla chunk | SDPA causal | fla / attnc "
        "| max error vs fla |")
    say("|---|---|---|---|---|---|---|---|")
    for name in ("retention", "gla"):
        gen, cuda_fn = both_backends(name, tmp, device)
        fn = getattr(gen, name)
        for n in ((100,) if smoke else sizes):
            q, k, v = (torch.randn(B, H, n, D, device=device, dtype=dt) for _ in range(3))
            if name == "retention":
                gamma = 0.96875
                extra, kw = (), {"gamma": gamma}
                g = torch.full((B, n, H), float(np.log(gamma)), device=device)
            else:
                lg = torch.nn.functional.logsigmoid(torch.randn(B, H, n, device=device) + 4)
                extra, kw, g = (lg,), {}, lg.transpose(1, 2).contiguous()
            runs = (("triton", lambda: fn(q, k, v, *extra, **kw)),
                    ("cuda", (lambda: cuda_fn(q, k, v, *extra, **kw)) if cuda_fn else None),
                    ("fla", (lambda: chunk_simple_gla(*(x.transpose(1, 2) for x in (q, k, v)), g,
                                                      scale=1.0)[0].transpose(1, 2))
                     if chunk_simple_gla else None),
                    ("sdpa", lambda: sdpa(q, k, v, is_causal=True)))
            outs, times = timed_runs(name, runs)

            def ms(label):
                return "-" if label not in times else f"{times[label]:.3f}"

            ours = [times[x] for x in ("triton", "cuda") if x in times]
            ratio = "-" if not ours or "fla" not in times else f"{times['fla'] / min(ours):.2f}"
            err = "-"
            if "fla" in outs and any(x in outs for x in ("triton", "cuda")):
                scale = float(outs["fla"].abs().max())
                worst = max(float((outs[x] - outs["fla"]).abs().max())
                            for x in ("triton", "cuda") if x in outs)
                err = f"{worst / scale:.1e}"
            say(f"| {name} | {n} | {ms('triton')} | {ms('cuda')} | {ms('fla')} | {ms('sdpa')} "
                f"| {ratio} | {err} |")


def run_section(section: str, limit: int, args, out: Path, shards: int = 1) -> None:
    """Run a section in subprocesses (``shards`` at once, each a share of the examples),
    each stopped at ``limit`` seconds; merge the shards' rows into the results file."""
    procs = []
    for k in range(shards):
        cmd = [sys.executable, __file__, "--section", section, "--sizes", args.sizes,
               "--shard", f"{k}/{shards}"] + (["--smoke"] if args.smoke else [])
        env = dict(os.environ, ATTNC_BENCH_PART=f"part_{section}_{k}.md") if shards > 1 else None
        procs.append(subprocess.Popen(cmd, env=env))
    start = time.time()
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, limit - (time.time() - start)))
        except subprocess.TimeoutExpired:
            proc.kill()
            with open(out / "gpu_results.md", "a") as f:
                f.write(f"\n(a {section} process stopped at the {limit} s limit)\n")


def merge_parts(section: str, header: list[str], shards: int, out: Path) -> None:
    rows, notes = [], []
    for k in range(shards):
        part = out / f"part_{section}_{k}.md"
        if part.exists():
            for line in part.read_text().splitlines():
                (rows if line.startswith("| ") else notes).append(line)
            part.unlink()
    with open(out / "gpu_results.md", "a") as f:
        f.write("\n".join(header + sorted(rows) + [n for n in notes if n.strip()]) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CPU under TRITON_INTERPRET=1)")
    ap.add_argument("--sizes", default="4096,16384")
    ap.add_argument("--skip", default="",
                    help="comma list of sections to skip: "
                    "numerics,prefill,train,decode,paged,linear,cuda")
    ap.add_argument("--section", choices=("numerics", "prefill", "train", "decode", "paged",
                                          "linear", "cuda"))
    ap.add_argument("--shard", default="0/1", help="k/n: this process runs every n-th example from the k-th")
    ap.add_argument("--shards", type=int, default=6,
                    help="processes per numerics section (Triton and nvcc compiles are CPU-bound)")
    ap.add_argument("--limits", type=lambda t: [int(x) for x in t.split(",")],
                    default=[100, 150, 90, 45, 40, 40], help="seconds for the numerics sections "
                    "(run together), prefill, train, decode, paged decode, linear; about 8 "
                    "minutes in all")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    import triton

    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter)"
    out = Path(os.environ.get("OUT", ROOT / "bench"))
    out.mkdir(parents=True, exist_ok=True)
    if args.section is None:  # the driver: sections in subprocesses, with time limits
        (out / "gpu_results.md").write_text(
            f"# attnc GPU run — {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n"
            f"{name}; torch {torch.__version__}; triton {triton.__version__}\n\n")
        skip = args.skip.split(",")
        # 1. numerics, both backends at once: compiles are CPU work, shared over the cores
        checks = [s for s in ("numerics", "cuda") if s not in skip]
        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(lambda s: run_section(s, args.limits[0], args, out, args.shards), checks))
        for section, header in (("numerics", NUMERICS_HEADER), ("cuda", CUDA_HEADER)):
            if section in checks:
                merge_parts(section, header, args.shards, out)
        # 2. timings, alone on the GPU
        for section, limit in (("prefill", args.limits[1]), ("train", args.limits[2]),
                               ("decode", args.limits[3]), ("paged", args.limits[4]),
                               ("linear", args.limits[5])):
            if section not in skip:
                run_section(section, limit, args, out)
        print((out / "gpu_results.md").read_text())
        return
    k, n = (int(x) for x in args.shard.split("/"))
    sections = {"numerics": lambda: numerics(Path(tmp), device, args.smoke, (k, n)),
                "prefill": lambda: prefill(Path(tmp), device, [int(x) for x in args.sizes.split(",")],
                                           args.smoke),
                "train": lambda: train(Path(tmp), device, [int(x) for x in args.sizes.split(",")],
                                       args.smoke),
                "decode": lambda: decode(Path(tmp), device, args.smoke),
                "paged": lambda: paged(Path(tmp), device, args.smoke),
                "linear": lambda: linear(Path(tmp), device, [int(x) for x in args.sizes.split(",")],
                                         args.smoke),
                "cuda": lambda: numerics_cuda(Path(tmp), device, (k, n))}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            sections[args.section]()
        except Exception:  # noqa: BLE001
            say(f"section {args.section} failed:\n```\n{traceback.format_exc()[-1500:]}\n```")
    say(f"\n({args.section} {args.shard}: {time.time() - START:.0f} s)")


if __name__ == "__main__":
    main()
