"""The project's fuzzers: differential on valid cascades, mutational on the front end.

* **cascades**: random valid cascades (``strategies.definitions`` with data-dependent
  masks, ``strategies.attention_cascades``) through every pass prefix, rendered by both
  numpy forms (fused tile loop and per-Einsum) with a small tile, run on random shapes
  (zero sizes included) and compared with the interpreter on the *source* cascade: equal up
  to rounding, with NaN and Inf at the same positions;
* **mutants**: mutants of every example and of the contract's blocks (``test_fuzz.mutate``)
  must parse to a module that compiles on both numpy forms and imports, or fail with a
  located :class:`SpecError`; never another exception, never a hang.

CI runs a bounded sample (``tests/test_fuzz.py``).  The long run::

    python -m tests.fuzz --budget 600            # seconds, split between the two fuzzers
    python -m tests.fuzz --budget 60 --seed 7 --only mutants

prints what it ran and every finding (the spec and how to reproduce it); exit 1 on any.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # strategies, test_fuzz, conftest

import numpy as np  # noqa: E402

from attnc.backends.check import random_call  # noqa: E402
from attnc.backends.numpy_backend import render_module  # noqa: E402
from attnc.einsum_ir.interpreter import interpret  # noqa: E402
from attnc.einsum_ir.ir import Module  # noqa: E402
from attnc.einsum_ir.printer import print_ir  # noqa: E402
from attnc.einsum_ir.sizes import evaluate_lets  # noqa: E402
from attnc.passes.pipeline import DEFAULT_PIPELINE, run_pipeline  # noqa: E402

PREFIXES = tuple(DEFAULT_PIPELINE[:k] for k in range(1, len(DEFAULT_PIPELINE) + 1)) + (
    ("canonicalize", "defer-normalization", "online", "split-k"),
    ("canonicalize", "defer-normalization", "online", "stream-k"),
)
TILES = (1, 2, 3, 4)
SLOW_SECONDS = 20  # one case taking longer than this is reported as a hang


# ---------------------------------------------------------------------------------------------
# Differential: valid cascades on every path
# ---------------------------------------------------------------------------------------------


def load_text(text: str, name: str = "fuzzed"):
    """Execute a generated module's text; its namespace."""
    namespace: dict = {"__name__": name}
    exec(compile(text, f"<{name}>", "exec"), namespace)
    return namespace


def compiled_forms(defn, names, tile: int):
    """``(label, function)`` for both numpy forms of ``defn`` after the passes ``names``."""
    stages = run_pipeline(Module((defn,)), list(names), options={"tile": tile, "workers": 2})
    out = []
    for fused in (True, False):
        text = render_module(stages[-1][1], "fuzzed.attn", fused=fused)
        label = f"{'fused' if fused else 'per-einsum'} after {','.join(names)} tile={tile}"
        out.append((label, load_text(text)[defn.name]))
    return out


def fuzz_sizes(defn, rng: np.random.Generator) -> dict[str, int] | None:
    """Input sizes 0..9 (a zero one time in five) for which every ``let`` divides."""
    ranks = list(dict.fromkeys(r for a in defn.tensor_args for r in a.ranks))
    for _ in range(50):
        sizes = {r: int(rng.integers(0 if rng.random() < 0.2 else 1, 10)) for r in ranks}
        try:
            evaluate_lets(defn, sizes)
            return sizes
        except (ValueError, ZeroDivisionError):
            continue
    return None


def same_values(got, want, label: str) -> None:
    """Equal up to rounding (relative to the output's magnitude); NaN and Inf alike."""
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert g.shape == w.shape, f"{label}: output {k} shape {g.shape} != {w.shape}"
        for what, test in (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)):
            assert np.array_equal(test(g), test(w)), f"{label}: output {k}: {what} positions differ"
        finite = np.isfinite(w)
        scale = 1.0 + (np.abs(w[finite]).max() if finite.any() else 0.0)
        err = np.abs(g[finite] - w[finite]).max() if finite.any() else 0.0
        assert err <= 1e-7 * scale, f"{label}: output {k}: error {err:.3g} (scale {scale:.3g})"


def check_cascade(defn, tile: int, seed: int) -> None:
    """Every pass prefix × both numpy forms equals the interpreter on the source cascade;
    a failure names the cascade (as ``.attn``), the path and the shapes."""
    try:
        _check_cascade(defn, tile, seed)
    except Exception as err:
        raise AssertionError(f"{type(err).__name__}: {err}\non\n{print_ir(defn)}") from err


def _check_cascade(defn, tile: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    calls = []
    for _ in range(2):
        sizes = fuzz_sizes(defn, rng)
        if sizes is not None:
            calls.append(random_call(defn, rng, sizes, (2,) if rng.random() < 0.3 else ()))
    for names in PREFIXES:
        for label, fn in compiled_forms(defn, names, tile):
            for args, params in calls:
                with np.errstate(all="ignore"):
                    want = interpret(defn, *args, **params)
                    got = fn(*args, **params)
                same_values(got, want, f"{label} sizes={[a.shape for a in args]}")


# ---------------------------------------------------------------------------------------------
# Mutational: the front end and the compiler behind it
# ---------------------------------------------------------------------------------------------


def check_mutant(text: str) -> str:
    """'rejected' (a located SpecError), 'compiled' (both numpy forms import), else raises."""
    from test_fuzz import check_frontend

    module = check_frontend(text)
    if module is None:
        return "rejected"
    for fused in (True, False):
        names = None if fused else ["canonicalize"]
        stages = run_pipeline(module, names, options={"tile": 4})
        load_text(render_module(stages[-1][1], "mutant.attn", fused=fused), "mutant")
    return "compiled"


# ---------------------------------------------------------------------------------------------
# The long run
# ---------------------------------------------------------------------------------------------


def run_mutants(seconds: float, seed: int, findings: list[str]) -> int:
    """Mutants of every source, round robin, until the time is up; returns how many ran."""
    from test_fuzz import SOURCES, mutate

    rng, n, deadline = random.Random(seed), 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        name, source = SOURCES[n % len(SOURCES)]
        mutant = mutate(rng, source)
        start = time.monotonic()
        try:
            check_mutant(mutant)
        except Exception as err:  # noqa: BLE001 - every other exception is a finding
            findings.append(f"mutant {n} of {name}: {type(err).__name__}: {err}\n{mutant}")
        if time.monotonic() - start > SLOW_SECONDS:
            findings.append(f"mutant {n} of {name} took {time.monotonic() - start:.0f} s\n{mutant}")
        n += 1
    return n


def run_cascades(seconds: float, seed: int, findings: list[str]) -> int:
    """Hypothesis-drawn cascades in batches until the time is up; returns how many ran."""
    from hypothesis import HealthCheck, Phase, given, settings, strategies as st
    from hypothesis import seed as seeded

    from strategies import attention_cascades, definitions

    count, batch, deadline = [0], 0, time.monotonic() + seconds
    cascades = st.one_of(attention_cascades(), definitions(data_masks=True))
    while time.monotonic() < deadline:
        # no shrinking: a cascade takes a second, shrinking one takes minutes; the finding
        # prints the cascade as .attn, which is the reproducer
        @settings(max_examples=5, deadline=None, database=None, phases=[Phase.generate],
                  report_multiple_bugs=False, suppress_health_check=list(HealthCheck))
        @seeded(seed * 1000 + batch)
        @given(cascades, st.sampled_from(TILES), st.integers(0, 2**32 - 1))
        def prop(defn, tile, case_seed):
            count[0] += 1
            check_cascade(defn, tile, case_seed)

        try:
            prop()
        except Exception as err:  # noqa: BLE001 - hypothesis re-raises the shrunk failure
            findings.append(f"cascade (batch {batch}, seed {seed}): {type(err).__name__}: {err}")
        batch += 1
        print(f"cascades: {count[0]} run, {len(findings)} findings", file=sys.stderr, flush=True)
    return count[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=600, help="seconds in all (default 600)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=("cascades", "mutants"))
    args = p.parse_args(argv)
    findings: list[str] = []
    share = args.budget if args.only else args.budget / 2
    ran = {}
    if args.only != "mutants":
        ran["cascades"] = run_cascades(share, args.seed, findings)
    if args.only != "cascades":
        ran["mutants"] = run_mutants(share, args.seed, findings)
    for f in findings:
        print(f"FINDING: {f}\n")
    print(", ".join(f"{n} {what}" for what, n in ran.items()) + f"; {len(findings)} findings")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
