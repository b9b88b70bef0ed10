"""Paged decode against the same spec on a contiguous cache, statically (no GPU): every
fused kernel compiled for sm_90 as the launcher configures it, and its full-tile loop
counted from the SASS (issue 14's target: the same instructions per tile plus a page-table
read per page).  docs/performance.md records a run.

    python bench/paged_static.py [--batch 8] [--keys 32768] [--pages 1,16,64]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from attnc.backends.kernel_report import kernel_report

ROOT = Path(__file__).resolve().parents[1]

# examples/paged_decode.attn with the cache contiguous per sequence (the same where)
DENSE = """\
attention dense_decode(Q[B,H,E], K[B,M,HK,E], V[B,M,HK,F], L[B]: i32,
                       scale = 1/sqrt(E)) -> O[B,H,F] {
  let G = H / HK
  S[b,h,m] = Q[b,h,e] * K[b, m, h // G, e] * scale   where m < L[b]
  O[b,h,f] = (exp(S[b,h,m] - max[m](S[b,h,m])) * V[b, m, h // G, f]
              / sum[m](exp(S[b,h,m] - max[m](S[b,h,m]))))
}
"""


def fused(spec: str, sizes: dict) -> tuple[int, int, int]:
    (report,) = kernel_report(spec, sizes, "bf16", 90, variants=("fused",))
    return report.main_loop.path, report.main_loop.instructions, report.main_loop.global_loads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--keys", type=int, default=32768)
    ap.add_argument("--pages", default="1,16,64")
    args = ap.parse_args()
    head = dict(B=args.batch, H=32, HK=8, E=128, F=128)
    with tempfile.TemporaryDirectory() as tmp:
        dense = Path(tmp) / "dense_decode.attn"
        dense.write_text(DENSE)
        base = fused(str(dense), dict(head, M=args.keys))
    print("| spec | page size | full-tile SASS | ratio | loads | whole loop |")
    print("|---|---|---|---|---|---|")
    print(f"| dense_decode (contiguous) | — | {base[0]} | 1 | {base[2]} | {base[1]} |")
    for pg in (int(x) for x in args.pages.split(",")):
        nb = args.keys // pg
        got = fused(str(ROOT / "examples" / "paged_decode.attn"),
                    dict(head, NP=nb * args.batch, PG=pg, NB=nb))
        print(f"| paged_decode | {pg} | {got[0]} | {got[0] / base[0]:.2f} | {got[2]} | {got[1]} |")


if __name__ == "__main__":
    main()
