"""What the fused level GEMM compiles to on Hopper, read from its IR: ``python -m bench.ir_facts``.

No GPU is needed. The compile gate (bench/static.py) checks that every config compiles without
spills. This module reads, for a few representative configs, *how* the kernel moves data. The
figures come from ``triton.compile`` for sm_90a on the CPU: the TTGIR, the PTX and Triton's
shared-memory size. It reports:

- ``smem_bytes``: Triton's dynamic shared memory per program;
- ``buffers``: the multi-buffered shared allocations of the software pipeliner, as
  ``stages x rows x cols type``. No buffer means no pipelining: each K step waits for its loads;
- ``async_copies``: ``cp.async`` copies (``ttg.async_copy_global_to_local``) and ``sync_loads``:
  tile loads (``tt.load`` of a tensor) that the thread waits on;
- ``restaged``: tiles computed in registers and stored back to shared memory inside the loop
  (``ttg.local_alloc`` with an operand). For the weight this is the decoded tile, which goes
  shared -> registers (decode) -> shared before the MMA reads it;
- ``mma``: ``wgmma`` (``ttng.warp_group_dot``), with the ``pendings`` of its waits (in the loop
  first; 0: the warpgroup waits for each MMA before the next K step, so MMA and decode do not
  overlap; 1: one MMA stays in flight), or synchronous when the pipeliner left it alone; or
  ``mma.sync`` (``tt.dot``);
- ``branch``: ``scf.if`` inside the K loop (the tile table's skip);
- ``extsi``: integer widenings (the decode's ``i16 -> i32`` compare).

Next to the ELSA kernel, a plain Triton matmul of the same tile config (no decode) shows what
the decode changes. The table is bench/results/static-sm90/ir-facts.md; bench/GPU_NOTES.md reads
predictions from it. Run it like the compile gate: without ``TRITON_INTERPRET``. Its ``main``
re-runs itself in a clean subprocess when the variable is set.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

#: (label, tile kwargs, num_warps, num_stages, use_table): the autotuner's candidates for the three
#: regimes of the GPU grid (M <= 16 weight streaming, table-compatible M <= 16 for block levels,
#: M > 64 compute bound with and without a table).
CASES = [
    ("bm16-bn32-bk256-g1-w8-s4", dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, GROUP_M=1), 8, 4, False),
    ("bm16-bn32-bk64-g1-w4-s6", dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=1), 4, 6, True),
    ("bm128-bn128-bk64-g8-w8-s3", dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8), 8, 3, False),
    ("bm64-bn64-bk64-g8-w4-s4", dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8), 4, 4, True),
]
COLUMNS = ["kernel", "config", "table", "smem_bytes", "buffers", "async_copies", "sync_loads", "restaged", "mma",
           "branch", "extsi"]


def _plain_matmul_source():
    """A plain Triton matmul ``y = x @ w.T`` (no decode): the same tiling as the ELSA kernel."""
    import triton
    import triton.language as tl

    @triton.jit
    def plain_matmul_kernel(x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        pid_m, pid_n = pid // num_pid_n, pid % num_pid_n
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
        w_ptrs = w_ptr + offs_k[:, None] + offs_n[None, :] * stride_wn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in range(0, tl.cdiv(K, BLOCK_K)):
            x = tl.load(x_ptrs, mask=(offs_m < M)[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=(offs_n < N)[None, :], other=0.0)
            acc = tl.dot(x, w, acc)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(tl.bfloat16),
                 mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])

    return plain_matmul_kernel


def compile_plain(kw: dict, warps: int, stages: int):
    """The plain matmul compiled for sm_90a in bfloat16 with ``kw``'s BLOCK_M/N/K."""
    from .static import compile_sm90

    sig = {"x_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32",
           "stride_xm": "i32", "stride_wn": "i32", "stride_ym": "i32"}
    const = {k: kw[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
    aligned = ("x_ptr", "w_ptr", "y_ptr", "N", "K", "stride_xm", "stride_wn", "stride_ym")
    return compile_sm90(_plain_matmul_source(), sig, const, aligned, warps, stages)


def facts(ttgir: str, smem: int) -> dict:
    """The data-movement facts of one kernel's TTGIR (see the module doc)."""
    buffers = re.findall(r"ttg\.local_alloc : \(\) -> !ttg\.memdesc<(\d+x\d+x\d+x\w+)", ttgir)
    waits = re.findall(r"ttng\.warp_group_dot_wait .*?pendings = (\d+)", ttgir)
    if "ttng.warp_group_dot " in ttgir:
        mma = "wgmma, pendings " + ",".join(waits) if waits else "wgmma, synchronous (not isAsync)"
    else:
        mma = "mma.sync" if "tt.dot " in ttgir else "none"
    return {
        "smem_bytes": smem,
        "buffers": " + ".join(buffers) or "none",
        "async_copies": len(re.findall(r"ttg\.async_copy_global_to_local", ttgir)),
        "sync_loads": len(re.findall(r"= tt\.load [^\n]*: tensor<", ttgir)),
        "restaged": len(re.findall(r"ttg\.local_alloc %", ttgir)),
        "mma": mma,
        "branch": len(re.findall(r"\bscf\.if\b", ttgir)),
        "extsi": len(re.findall(r"\barith\.extsi\b", ttgir)),
    }


def collect(dtype: str = "bfloat16") -> list[dict]:
    """One row per case: the ELSA kernel, then the plain matmul of the same tiles (no table)."""
    from . import static

    rows = []
    for label, kw, warps, stages, use_table in CASES:
        spec = static.linear_spec(dtype, label, kw, warps, stages, use_table=use_table, has_bias=False)
        k = static.compile_spec(spec)
        rows.append({"kernel": "elsa_linear", "config": label, "table": "yes" if use_table else "no",
                     **facts(k.asm["ttgir"], int(k.metadata.shared))})
        if not use_table:
            p = compile_plain(kw, warps, stages)
            rows.append({"kernel": "plain matmul", "config": label, "table": "-",
                         **facts(p.asm["ttgir"], int(p.metadata.shared))})
    return rows


def render(rows: list[dict], command: str) -> str:
    import triton

    lines = ["# What the fused level GEMM compiles to on sm_90a", "",
             f"`{command}` (bench/ir_facts.py; triton {triton.__version__}, `GPUTarget(\"cuda\", 90, 32)`, bfloat16, "
             "no bias, K a multiple of BLOCK_K). Compiled on a CPU: nothing here ran or was timed. Columns: the "
             "module doc of bench/ir_facts.py.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ir_facts",
                                description="Data-movement facts of the fused level GEMM compiled for sm_90a (no GPU).")
    p.add_argument("--out", help="write the markdown table here (atomically) as well as to stdout")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    if os.environ.get("TRITON_INTERPRET"):  # the kernels were (or will be) imported interpreted: clean process
        from .static import worker_env

        res = subprocess.run([sys.executable, "-m", "bench.ir_facts"] + (["--out", a.out] if a.out else []),
                             env=worker_env())
        return res.returncode
    text = render(collect(), "python -m bench.ir_facts" + (f" --out {a.out}" if a.out else ""))
    print(text, end="")
    if a.out:
        tmp = a.out + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
