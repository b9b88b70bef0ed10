"""The static kernel report (attnc kernels): SASS loop detection, and one real compile."""
from __future__ import annotations

import json

import pytest

from attnc.backends.kernel_report import main_loop_counts, sass_loops

from conftest import EXAMPLES

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], RZ ;
        /*0030*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0040*/                   MUFU.EX2 R5, R5 ;
        /*0050*/              @!P0 BRA 0x10 ;
        /*0060*/                   FFMA R8, R12, R16, R8 ;
        /*0070*/                   DEPBAR.LE SB0, 0x0 ;
        /*0080*/               @P1 BRA 0x60 ;
        /*0090*/                   EXIT ;
"""


def test_the_main_loop_is_the_backward_branch_with_the_most_mma():
    assert [(a, b) for a, b, _ in sass_loops(SASS)] == [(0x10, 0x50), (0x60, 0x80)]
    loop = main_loop_counts(SASS)
    assert (loop.instructions, loop.mma, loop.mufu, loop.wgmma_waits, loop.global_loads) == \
        (5, 1, 1, 1, 1)


@pytest.mark.xdist_group("sm90")
def test_attnc_kernels_compiles_for_sm90_without_a_gpu(capsys):
    pytest.importorskip("triton")
    from attnc.frontends.cli import main

    assert main(["kernels", str(EXAMPLES / "causal.attn"), "--size", "P=256,M=256,E=64,F=64",
                 "--json"]) == 0
    reports = {r["kernel"]: r for r in json.loads(capsys.readouterr().out)}
    fused = reports["_causal_softmax_kernel"]
    assert fused["variant"] == "fused" and fused["blocks"]["BLOCK_M0"] == 64
    assert 0 < fused["registers"] <= 255 and fused["shared_bytes"] > 0
    assert fused["main_loop"]["mma"] > 0 and fused["main_loop"]["instructions"] > 50
    assert {"split", "stream"} <= {r["variant"] for r in reports.values()}
