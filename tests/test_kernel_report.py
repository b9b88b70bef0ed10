"""The static kernel report (attnc kernels): SASS loop detection (Triton's main loop, the CUDA
kernels' tile loop), and one real compile per backend."""
from __future__ import annotations

import json
import shutil

import pytest

from attnc.backends.kernel_report import (code_loops, main_loop_counts, sass_loops, tile_loop,
                                          tile_loop_counts)

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


# A CUDA kernel's shape: a tile loop (0x10-0xd0) whose MMA all sit in a wmma k-loop
# (0x40-0x70), and an out-of-line shuffle slow path after the EXIT jumping back into it.
NESTED = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E.U16 R2, desc[UR4][R4.64] ;
        /*0020*/                   STS.U16 [R3], R2 ;
        /*0030*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0040*/                   LDS R6, [R3] ;
        /*0050*/                   HMMA.16816.F32.BF16 R8, R12, R14, R8 ;
        /*0060*/                   HMMA.16816.F32.BF16 R10, R12, R16, R10 ;
        /*0070*/               @P0 BRA 0x40 ;
        /*0080*/                   MUFU.EX2 R5, R5 ;
        /*0090*/                   LDSM.16.M88.4 R20, [R3] ;
        /*00a0*/                   LD.E R7, desc[UR4][R4.64] ;
        /*00b0*/                   FFMA R8, R20, R14, R8 ;
        /*00c0*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*00d0*/               @P1 BRA 0x10 ;
        /*00e0*/                   EXIT ;
        /*00f0*/                   SHFL.BFLY PT, R5, R5, 0x1, 0x1f ;
        /*0100*/                   BRA 0x50 ;
        /*0110*/                   BRA 0x110 ;
"""


def test_the_cuda_tile_loop_is_the_outermost_loop_with_mma():
    # the Triton rule takes the innermost loop with the most MMA: the k-loop
    assert main_loop_counts(NESTED).instructions == 4
    assert (0x50, 0x100) in [(a, b) for a, b, _ in sass_loops(NESTED)]
    assert [(a, b) for a, b, _ in code_loops(NESTED)] == [(0x40, 0x70), (0x10, 0xd0)]
    assert tile_loop(NESTED)[:2] == (0x10, 0xd0)
    assert tile_loop(NESTED, depth=1)[:2] == (0x40, 0x70)  # (a stream-K worker's unit loop)
    loop = tile_loop_counts(NESTED)
    assert (loop.instructions, loop.inner_loops, loop.mma, loop.mufu, loop.bar_syncs) == \
        (13, 1, 2, 1, 2)
    assert (loop.shared_loads, loop.shared_stores, loop.generic_memory, loop.global_loads) == \
        (2, 1, 1, 1)


def test_without_mma_the_cuda_tile_loop_is_the_outermost_loop_with_a_barrier():
    fma = NESTED.replace("HMMA.16816.F32.BF16", "FFMA")  # f32 inputs: exact FMA loops
    assert tile_loop(fma)[:2] == (0x10, 0xd0)


def test_a_cuda_kernel_without_an_mma_loop_is_counted_whole():
    loop = tile_loop_counts(SASS.replace("HGMMA.64x64x16.F32.BF16", "FFMA"))
    assert (loop.instructions, loop.inner_loops, loop.mma) == (10, 2, 0)


@pytest.mark.xdist_group("sm90")
def test_attnc_kernels_backend_cuda_compiles_for_sm90_without_a_gpu(capsys):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not installed")
    pytest.importorskip("torch")  # the generated launcher picks the blocks
    if shutil.which("cuobjdump") is None:
        pytest.importorskip("triton")  # its bundled cuobjdump
    from attnc.frontends.cli import main

    assert main(["kernels", str(EXAMPLES / "causal.attn"), "--backend", "cuda",
                 "--size", "P=256,M=256,E=64,F=64", "--json"]) == 0
    reports = {r["kernel"]: r for r in json.loads(capsys.readouterr().out)}
    fused = reports["causal_softmax_kernel"]
    assert fused["variant"] == "fused" and fused["backend"] == "cuda" and fused["threads"] == 128
    assert fused["blocks"]["BLOCK_M0"] == 64 and fused["num_warps"] == 4
    assert fused["registers"] > 0 and fused["shared_bytes"] > 0
    loop = fused["main_loop"]
    assert loop["mma"] > 0 and loop["inner_loops"] > 0 and loop["bar_syncs"] > 0
    combine = reports.get("causal_softmax_split_combine_kernel")
    if combine is not None:
        assert combine["main_loop"]["mma"] == 0


def test_the_backward_report_is_tritons(capsys):
    """`attnc kernels --grad` reports the Triton backward stages; with the CUDA backend it
    is a usage error (exit 2), said before anything compiles."""
    from attnc.frontends.cli import main

    assert main(["kernels", str(EXAMPLES / "causal.attn"), "--size", "P=64,M=64,E=16,F=16",
                 "--backend", "cuda", "--grad"]) == 2
    assert "--grad" in capsys.readouterr().err
