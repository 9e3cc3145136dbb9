"""bench/ir_facts.py: the data-movement facts of the fused level GEMM compiled for sm_90a (no GPU),
which bench/GPU_NOTES.md reads its predictions from. The committed table must be what today's
kernel compiles to with the pinned triton, so the notes cannot go stale silently."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from bench import ir_facts  # noqa: E402
from bench.common import REPO_DIR  # noqa: E402
from bench.static import worker_env  # noqa: E402

COMMITTED = os.path.join(REPO_DIR, "bench", "results", "static-sm90", "ir-facts.md")

PIPELINED = """
    %x_48 = ttg.local_alloc : () -> !ttg.memdesc<3x128x64xbf16, #shared, #smem, mutable> loc(#loc1)
    %b_49 = ttg.local_alloc : () -> !ttg.memdesc<2x64x128xi16, #shared1, #smem, mutable> loc(#loc2)
    %acc = scf.for %i = %c0 to %n step %c1 iter_args(%a = %cst) -> (tensor<128x128xf32, #mma>) {
      %t = ttg.async_copy_global_to_local %p, %x mask %m : tensor<128x64x!tt.ptr<bf16>, #blocked1> -> <128x64xbf16>
      %w = arith.extsi %v : tensor<64x128xi16, #blocked> to tensor<64x128xi32, #blocked>
      %s = ttg.local_alloc %w2 : (tensor<64x128xbf16, #blocked>) -> !ttg.memdesc<64x128xbf16, #shared2, #smem>
      %d = ttng.warp_group_dot %x, %s, %a {inputPrecision = 0 : i32, isAsync = true} : !ttg.memdesc<128x64xbf16>
      %r:3 = ttng.warp_group_dot_wait %d, %x, %s {pendings = 0 : i32} : tensor<128x128xf32, #mma>
    }
"""
UNPIPELINED = """
    %acc = scf.for %i = %c0 to %n step %c1 iter_args(%a = %cst) -> (tensor<16x32xf32, #mma>) {
      %t = tt.load %tp : !tt.ptr<i8> loc(#loc3)
      %r = scf.if %c -> (tensor<16x32xf32, #mma>) {
        %x = tt.load %xp, %xm, %o : tensor<16x64x!tt.ptr<bf16>, #blocked1> loc(#loc4)
        %b = tt.load %wp, %wm, %o2 : tensor<64x32x!tt.ptr<i16>, #blocked> loc(#loc5)
        %y = tt.dot %xa, %wa, %a, inputPrecision = tf32 : tensor<16x64xbf16> * tensor<64x32xbf16> -> tensor<16x32xf32>
      }
    }
"""


def test_facts_of_a_pipelined_wgmma_loop():
    f = ir_facts.facts(PIPELINED, 98304)
    assert f == {"smem_bytes": 98304, "buffers": "3x128x64xbf16 + 2x64x128xi16", "async_copies": 1, "sync_loads": 0,
                 "restaged": 1, "mma": "wgmma, pendings 0", "branch": 0, "extsi": 1}


def test_facts_of_an_unpipelined_branching_loop():
    f = ir_facts.facts(UNPIPELINED, 6144)
    # the scalar table load is not a tile load; the two tile loads inside the branch are
    assert f == {"smem_bytes": 6144, "buffers": "none", "async_copies": 0, "sync_loads": 2, "restaged": 0,
                 "mma": "mma.sync", "branch": 1, "extsi": 0}


def _table_rows(text):
    return [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith("| kernel ")]


def test_committed_table_is_what_the_kernel_compiles_to(tmp_path):
    out = tmp_path / "ir-facts.md"
    res = subprocess.run([sys.executable, "-m", "bench.ir_facts", "--out", str(out)], env=worker_env(),
                         capture_output=True, text=True, timeout=600, cwd=REPO_DIR)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = _table_rows(out.read_text())
    assert len(rows) == len(ir_facts.CASES) + sum(1 for c in ir_facts.CASES if not c[4])
    plain = [r for r in rows if r.startswith("| plain matmul ")]
    assert plain and all(" | 0 | 0 | " in r for r in plain)  # no sync loads, nothing restaged without a decode
    with open(COMMITTED, encoding="utf-8") as f:
        assert _table_rows(f.read()) == rows, "regenerate: python -m bench.ir_facts --out " + COMMITTED
