"""Ahead-of-time compile gate for Hopper (sm_90a), no GPU needed: ``python -m bench static``.

Every kernel in ``kernels/`` is compiled with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32))`` for every configuration its launcher can pick (each autotune
config that the launcher's own pruner keeps for some M bucket, x float32 / float16 / bfloat16, x the
constexpr specialisations the launcher produces: ``HAS_BIAS``, ``USE_TABLE``, ``EVEN_K``,
``INT64``, ``IEEE``, the code mask), and each compiled kernel is checked:

- it compiles (Triton -> PTX -> cubin through the ``ptxas`` shipped in the Triton wheel);
- registers <= 255 per thread and no spills: ``cuobjdump --dump-resource-usage`` ``REG`` and
  ``STACK`` (the per-thread local memory Triton reports as ``n_spills`` on a GPU) and no
  ``LDL`` / ``STL`` instruction in the SASS;
- no local-memory traffic in the PTX (``ld.local`` / ``st.local``);
- shared memory (Triton's dynamic ``shared`` + the cubin's static ``SHARED``) within the H100 /
  H200 per-block limit of 227 KiB (232448 bytes);
- float16 / bfloat16 GEMM tiles with ``BLOCK_M >= 64`` use ``wgmma.mma_async`` (PTX).

It also derives the theoretical occupancy (resident warps per SM) from registers (65536 per SM,
allocated per warp in units of 256), shared memory (228 KiB per SM, plus 1 KiB reserved per
block), at most 64 warps and 32 blocks per SM.

What it does not do: run anything, time anything, or check a result; the arithmetic is checked by
the interpreter tests and, on a GPU, by ``bench/gpu_check.sh``.

Argument specialisation: a GPU launch specialises integer arguments (value 1 becomes a constant,
multiples of 16 get a divisibility hint) and pointers (16-byte aligned). The gate compiles the
specialisation of the layouts the launcher sees: contiguous tensors (unit strides are constants),
16-byte aligned pointers, and ``N``, ``K`` and the row strides multiples of 16 when ``EVEN_K``
(every Llama / MiniLM shape); with ``EVEN_K=False`` (``K`` not a multiple of ``BLOCK_K``) ``K``
and the strides that equal it carry no hint (the worst case). ``M``, ``level`` and the table
sizes carry none.

Compilation runs in worker subprocesses without ``TRITON_INTERPRET`` (the kernels module decides
at import time whether its ``@triton.jit`` functions are interpreted; the test suite sets the
interpreter on), each with a fresh, deleted ``TRITON_CACHE_DIR``: nothing is cached across runs.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

#: Hopper limits (H100 / H200, compute capability 9.0).
MAX_REGS_PER_THREAD = 255
REGS_PER_SM = 65536
REG_ALLOC_UNIT = 256  # registers, per warp
SMEM_PER_BLOCK = 232448  # 227 KiB: the opt-in per-block maximum
SMEM_PER_SM = 233472  # 228 KiB
SMEM_RESERVED_PER_BLOCK = 1024  # the driver reserves 1 KiB per resident block
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32

DTYPES = ("float32", "float16", "bfloat16")
_ELT = {"float32": 4, "float16": 2, "bfloat16": 2}
_TRITON_TY = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
_INT_TY = {"float32": "i32", "float16": "i16", "bfloat16": "i16"}
_MAX_CODE_BITS = {"float32": 8, "float16": 4, "bfloat16": 3}

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "static-sm90")
CSV_COLUMNS = [
    "kernel", "config", "dtype", "spec", "num_warps", "num_stages", "status", "reasons",
    "registers", "stack_bytes", "sass_local_ops", "ptx_local_ops", "smem_bytes", "wgmma", "wgmma_required",
    "blocks_per_sm", "warps_per_sm", "occupancy", "limiter", "compile_s", "triton",
]


# ------------------------------------------------------------------------------------------------
# What to compile
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Spec:
    """One compilation: a kernel, a launch config, a dtype and a full argument specialisation.

    ``signature`` maps every non-constexpr argument to its Triton type (``*bf16``, ``i32``, ...);
    ``constexprs`` every constexpr argument (and every integer specialised to 1) to its value;
    ``aligned`` names the arguments carrying ``tt.divisibility = 16``.
    """

    kernel: str  # "linear", "decode_level", "decode_counters", "packed_linear", "unpack_level"
    config: str  # launch config label, e.g. "bm128-bn64-bk64-g8-w4-s4"
    dtype: str  # "float32" / "float16" / "bfloat16"
    spec: str  # specialisation label, e.g. "bias-table-evenk-i32-k3"
    num_warps: int
    num_stages: int
    signature: tuple  # ((name, type), ...)
    constexprs: tuple  # ((name, value), ...)
    aligned: tuple  # (name, ...)
    block_m: int = 0  # GEMM tile rows (0: not a GEMM)

    @property
    def id(self) -> str:
        """Readable id: ``linear/bm128-bn64-bk64-g8-w4-s4/bfloat16/bias-table-evenk-i32-k3``."""
        return f"{self.kernel}/{self.config}/{self.dtype}/{self.spec}"

    @property
    def wgmma_required(self) -> bool:
        """float16 / bfloat16 GEMM tiles of 64 rows or more must use Hopper's wgmma."""
        return self.block_m >= 64 and self.dtype in ("float16", "bfloat16")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Spec":
        d = dict(d)
        for key in ("signature", "constexprs"):
            d[key] = tuple(tuple(x) for x in d[key])
        d["aligned"] = tuple(d["aligned"])
        return cls(**d)


def _config_label(kw: dict, warps: int, stages: int) -> str:
    return f"bm{kw['BLOCK_M']}-bn{kw['BLOCK_N']}-bk{kw['BLOCK_K']}-g{kw['GROUP_M']}-w{warps}-s{stages}"


class _FakeTensor:
    """What ``_prune_configs`` reads of ``x``: its element size."""

    def __init__(self, element_size: int):
        self._e = element_size

    def element_size(self) -> int:
        return self._e


#: Argument layouts of the linear kernel: (label, EVEN_K, K a multiple of 16, the K the pruner is
#: asked about: a multiple of every BLOCK_K; a multiple of 16 only; not a multiple of 16, weight
#: transposed). ``wt-*``: the weight is the view ``W.t()`` of a `[K, N]` tensor (strides ``(1, N)``:
#: ``stride_wn`` is the constant 1, ``stride_wk = N`` a multiple of 16), as ``ELSATransformersConv1D`` serves a
#: ``transformers`` ``Conv1D`` (GPT-2 family: K in {768, 3072, ...}).
LAYOUTS = (("evenk", True, True, 4096, False), ("oddk", False, True, 4112, False),
           ("unalignedk", False, False, 4100, False), ("wt-evenk", True, True, 4096, True),
           ("wt-oddk", False, True, 4112, True))


def linear_launch_configs(dtype: str, *, ieee: bool | None = None, layout: str = "evenk"
                          ) -> list[tuple[str, dict, int, int, bool]]:
    """Every ``(label, kwargs, num_warps, num_stages, use_table)`` the autotuned launcher of
    :func:`elsa_codec.kernels.triton.elsa_linear` can pick for ``dtype``: the configs its own pruner
    (``kernels.linear._prune_configs``) keeps for some M bucket (1, 2, 4, ..., 4096), with and
    without a tile table, for a contiguous problem with the ``K`` of ``layout`` (:data:`LAYOUTS`).
    ``ieee=None``: the launcher's default (float32: True). ``INTERPRETER_CONFIG`` is not among them:
    on a GPU it runs only when a caller forces a config (``_launch_linear(..., _config=...)``, the
    tests)."""
    from elsa_codec.kernels.triton import linear as lin

    if ieee is None:
        ieee = dtype == "float32"
    k, transposed = {name: (kk, wt) for name, _, _, kk, wt in LAYOUTS}[layout]
    out, seen = [], set()
    buckets = [1 << i for i in range(13)]
    for use_table in (False, True):
        for mb in buckets:
            args = {"M_BUCKET": mb, "x_ptr": _FakeTensor(_ELT[dtype]), "K": k, "stride_xm": k,
                    "stride_wn": 1 if transposed else k, "stride_wk": 4096 if transposed else 1}
            kept = lin._prune_configs(lin.AUTOTUNE_CONFIGS, args, USE_TABLE=use_table, IEEE=ieee)
            for c in kept:
                kw = {k_: c.kwargs[k_] for k_ in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
                key = (tuple(kw.items()), c.num_warps, c.num_stages, use_table)
                if key not in seen:
                    seen.add(key)
                    out.append((_config_label(kw, c.num_warps, c.num_stages), kw, c.num_warps, c.num_stages, use_table))
    return out


def linear_spec(dtype: str, label: str, kw: dict, warps: int, stages: int, *, use_table: bool, has_bias: bool = True,
                even_k: bool = True, aligned_k: bool = True, int64: bool = False, ieee: bool | None = None,
                code_bits: int = 2, w_transposed: bool = False) -> Spec:
    """The :class:`Spec` of one ``_elsa_linear_kernel`` compilation (see the module doc for the
    argument specialisation). ``even_k``: ``K`` a multiple of ``BLOCK_K``; ``aligned_k``: ``K`` (and
    the row strides of ``x`` and ``w``, which equal it) a multiple of 16 (always true with
    ``even_k``). ``ieee=None``: what the launcher passes by default (float32 with TF32 off,
    torch's default: ``True``; float16 / bfloat16: ``False``). ``w_transposed``: the weight is a
    transposed view (``stride_wn`` the constant 1, ``stride_wk`` a multiple of 16; see :data:`LAYOUTS`)."""
    aligned_k = aligned_k or even_k
    if ieee is None:
        ieee = dtype == "float32"
    fty, ity = _TRITON_TY[dtype], _INT_TY[dtype]
    sig = [("x_ptr", f"*{fty}"), ("w_ptr", f"*{ity}"), ("b_ptr", f"*{fty}"), ("y_ptr", f"*{fty}"), ("tt_ptr", "*u8"),
           ("M", "i32"), ("N", "i32"), ("K", "i32"), ("level", "i32"),
           ("stride_xm", "i32"), ("stride_wn", "i32"), ("stride_ym", "i32"), ("stride_tr", "i32"),
           ("TT_ROWS", "i32"), ("TT_COLS", "i32"), ("M_BUCKET", "i32")]
    if not use_table:  # the launcher passes y as tt_ptr, zero strides and sizes (int 0: a multiple of 16)
        sig = [(n, "*" + fty if n == "tt_ptr" else t) for n, t in sig] + [("stride_tc", "i32")]
    unit_w = "stride_wn" if w_transposed else "stride_wk"
    if w_transposed:
        sig = [("stride_wk", t) if n == "stride_wn" else (n, t) for n, t in sig]
    const = dict(
        stride_xk=1, stride_yn=1, **{unit_w: 1},  # unit strides are specialised to 1
        CODE_MASK=(1 << code_bits) - 1, HAS_BIAS=has_bias, USE_TABLE=use_table, UPCAST=False, IEEE=ieee,
        INT64=int64, ROUND_BF16=False, **kw, EVEN_K=even_k,
        TT_R=max(kw["BLOCK_N"] // 64, 1), TT_C=max(kw["BLOCK_K"] // 64, 1),
    )
    aligned = ["x_ptr", "w_ptr", "b_ptr", "y_ptr", "tt_ptr", "N", "stride_ym"]
    if use_table:
        const["stride_tc"] = 1  # contiguous table
    else:
        aligned += ["stride_tr", "stride_tc", "TT_ROWS", "TT_COLS"]
    if aligned_k:
        aligned += ["K", "stride_xm"] + ([] if w_transposed else ["stride_wn"])
    if w_transposed:
        aligned.append("stride_wk")  # = N, a multiple of 16
    names = {n for n, _ in sig}
    parts = ["bias" if has_bias else "nobias", "table" if use_table else "notable",
             ("wt-" if w_transposed else "") + ("evenk" if even_k else ("oddk" if aligned_k else "unalignedk")),
             "i64" if int64 else "i32"]
    if dtype == "float32":
        parts.append("ieee" if ieee else "tf32")
    parts.append(f"k{code_bits}")
    return Spec("linear", label, dtype, "-".join(parts), warps, stages, tuple(sig), tuple(const.items()),
                tuple(a for a in aligned if a in names), block_m=kw["BLOCK_M"])


def decode_specs(dtype: str, *, full: bool = True) -> list[Spec]:
    """``_decode_level_kernel`` and ``_decode_counters_kernel`` as their launchers compile them on a
    GPU (``BLOCK = 16384 // element_size``, 8 warps), ``INT64`` off / on, ``n_elements`` a multiple
    of 16 or not; code bits: the dtype's widest (``full`` adds 1)."""
    from elsa_codec.kernels.triton import decode as dec

    elt = _ELT[dtype]
    block, warps = 16384 // elt, 8
    if hasattr(dec, "_block_size") and not dec.INTERPRET:
        block, warps = dec._block_size(elt)
    ity = _INT_TY[dtype]
    out = []
    bits = [_MAX_CODE_BITS[dtype]] + ([1] if full else [])
    for kernel, dst in (("decode_level", f"*{ity}"), ("decode_counters", "*u8")):
        for int64 in (False, True):
            for even in ((True, False) if full else (True,)):
                for k in bits:
                    sig = [("src_ptr", f"*{ity}"), ("dst_ptr", dst), ("n_elements", "i64" if int64 else "i32")]
                    if kernel == "decode_level":
                        sig.append(("level", "i32"))
                    const = (("CODE_MASK", (1 << k) - 1), ("BLOCK", block), ("INT64", int64))
                    aligned = ("src_ptr", "dst_ptr") + (("n_elements",) if even else ())
                    spec = f"{'i64' if int64 else 'i32'}-{'n16' if even else 'nodd'}-k{k}"
                    out.append(Spec(kernel, f"block{block}-w{warps}", dtype, spec, warps, 1, tuple(sig), const,
                                    aligned))
    return out


def linear_specs(dtype: str) -> list[Spec]:
    """Every ``_elsa_linear_kernel`` compilation the launcher can make for ``dtype``: for each
    precision (float32: IEEE and TF32) and layout (:data:`LAYOUTS`), the configs the pruner keeps
    crossed with HAS_BIAS x INT64, code bits 2 (the benchmark's ``T = 3``); and the other code-bit
    widths 1..max on one specialisation per config (the mask is one immediate operand)."""
    out, seen = [], set()
    ieees = (True, False) if dtype == "float32" else (False,)
    for ieee in ieees:
        for layout, even_k, aligned_k, _, wt in LAYOUTS:
            for label, kw, warps, stages, use_table in linear_launch_configs(dtype, ieee=ieee, layout=layout):
                for has_bias in (True, False):
                    for int64 in (False, True):
                        out.append(linear_spec(dtype, label, kw, warps, stages, use_table=use_table, has_bias=has_bias,
                                               even_k=even_k, aligned_k=aligned_k, int64=int64, ieee=ieee,
                                               w_transposed=wt))
                if even_k and not wt and (label, use_table) not in seen:
                    seen.add((label, use_table))
                    for k in range(1, _MAX_CODE_BITS[dtype] + 1):
                        if k != 2:
                            out.append(linear_spec(dtype, label, kw, warps, stages, use_table=use_table, ieee=ieee,
                                                   code_bits=k))
    return out


def packed_spec(dtype: str, block_m: int, tile_n: int, warps: int, stages: int, *, has_bias: bool = True,
                split: bool = False, aligned_k: bool = True, ieee: bool | None = None) -> Spec:
    """The :class:`Spec` of one ``_packed_linear_kernel`` compilation (the packed level GEMM,
    ``elsa_codec/kernels/triton/packed_linear.py``): ``split``: split K (float32 partials, the bias
    added after); ``aligned_k``: ``K`` and ``x``'s row stride a multiple of 16."""
    if ieee is None:
        ieee = dtype == "float32"
    fty, ity = _TRITON_TY[dtype], _INT_TY[dtype]
    yty = "*fp32" if split else f"*{fty}"
    sig = [("x_ptr", f"*{fty}"), ("vals_ptr", f"*{ity}"), ("bm_ptr", "*i32"), ("base_ptr", "*i32"),
           ("b_ptr", f"*{fty}" if has_bias else yty), ("y_ptr", yty),
           ("M", "i32"), ("N", "i32"), ("K", "i32"), ("KT", "i32"), ("TILES_PER_SPLIT", "i32"),
           ("stride_xm", "i32"), ("stride_ys", "i32"), ("stride_ym", "i32")]
    const = dict(stride_xk=1, stride_yn=1, HAS_BIAS=has_bias, SPLIT=split, UPCAST=False, IEEE=ieee, ROUND_BF16=False,
                 BLOCK_M=block_m, BLOCK_N=tile_n)
    aligned = ["x_ptr", "vals_ptr", "bm_ptr", "base_ptr", "b_ptr", "y_ptr", "N", "stride_ys", "stride_ym"]
    if aligned_k:
        aligned += ["K", "stride_xm"]
    parts = ["bias" if has_bias else "nobias", "split" if split else "nosplit", "alignedk" if aligned_k else "unalignedk"]
    if dtype == "float32":
        parts.append("ieee" if ieee else "tf32")
    return Spec("packed_linear", f"bm{block_m}-tn{tile_n}-w{warps}-s{stages}", dtype, "-".join(parts), warps, stages,
                tuple(sig), tuple(const.items()), tuple(aligned), block_m=block_m)


def unpack_spec(dtype: str, tile_n: int) -> Spec:
    """``_unpack_kernel`` (``packed_unpack.py``) for ``tile_n`` rows per tile, 4 warps."""
    ity = _INT_TY[dtype]
    sig = [("vals_ptr", f"*{ity}"), ("bm_ptr", "*i32"), ("base_ptr", "*i32"), ("out_ptr", f"*{ity}"),
           ("N", "i32"), ("K", "i32"), ("KT", "i32")]
    return Spec("unpack_level", f"tn{tile_n}-w4", dtype, "i32", 4, 3, tuple(sig), (("BLOCK_N", tile_n),),
                ("vals_ptr", "bm_ptr", "base_ptr", "out_ptr"))


def packed_specs(dtype: str) -> list[Spec]:
    """Every packed-level compilation the launchers can make for ``dtype``: each of
    ``PACKED_CONFIGS`` x HAS_BIAS x split K x aligned / unaligned K (float32: IEEE and TF32), and
    the unpack kernel per tile height."""
    from elsa_codec.kernels.triton.packed_linear import PACKED_CONFIGS

    configs = PACKED_CONFIGS["float32" if dtype == "float32" else "16-bit"]
    out = []
    for ieee in ((True, False) if dtype == "float32" else (None,)):
        for bm, tn, warps, stages in configs:
            for has_bias in (True, False):
                for split in (False, True):
                    for aligned_k in (True, False):
                        out.append(packed_spec(dtype, bm, tn, warps, stages, has_bias=has_bias, split=split,
                                               aligned_k=aligned_k, ieee=ieee))
    tiles = sorted({tn for _, tn, _, _ in configs})
    return out + [unpack_spec(dtype, tn) for tn in tiles]


def all_specs(dtypes=DTYPES) -> list[Spec]:
    """The full sweep of ``python -m bench static``."""
    out = []
    for dt in dtypes:
        out += linear_specs(dt) + decode_specs(dt) + packed_specs(dt)
    return out


#: The subset the test suite compiles, per precision: ((BLOCK_M, BLOCK_N, BLOCK_K, num_warps,
#: num_stages, use_table), layout). 16-bit: GEMV-like with a table, the 64x64 table config with
#: K not a multiple of BLOCK_K, the large compute-bound tile, and unaligned K. float32 (its own
#: small-K configs): IEEE (FMA) and TF32.
SUBSET_LINEAR = {
    "16-bit": [((16, 64, 64, 4, 6, True), "evenk"), ((64, 64, 64, 4, 4, True), "oddk"),
               ((128, 128, 64, 8, 3, False), "evenk"), ((64, 64, 64, 4, 4, False), "unalignedk"),
               ((16, 64, 64, 4, 6, True), "wt-evenk")],
    "float32-ieee": [((32, 64, 16, 4, 4, True), "evenk"), ((16, 64, 16, 4, 4, False), "unalignedk")],
    "float32-tf32": [((64, 64, 16, 8, 4, False), "evenk")],
}


def subset_specs(dtypes=DTYPES) -> list[Spec]:
    """A representative subset (the test suite): per dtype the linear configs of
    :data:`SUBSET_LINEAR` (with bias, int32 offsets, code bits 2), each checked to be one the
    launcher can pick, and the decode kernel with the dtype's widest code."""
    out = []
    layouts = {name: (even, aligned, wt) for name, even, aligned, _, wt in LAYOUTS}
    for dt in dtypes:
        groups = [("float32-ieee", True), ("float32-tf32", False)] if dt == "float32" else [("16-bit", False)]
        for group, ieee in groups:
            for key, layout in SUBSET_LINEAR[group]:
                even_k, aligned_k, wt = layouts[layout]
                pick = {(kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], w, s, t): (label, kw, w, s, t)
                        for label, kw, w, s, t in linear_launch_configs(dt, ieee=ieee, layout=layout)}
                if key not in pick:
                    raise ValueError(f"subset config {key} ({group}, {layout}) is not one the launcher can pick "
                                     f"for {dt}")
                label, kw, w, s, t = pick[key]
                out.append(linear_spec(dt, label, kw, w, s, use_table=t, even_k=even_k, aligned_k=aligned_k, ieee=ieee,
                                       w_transposed=wt))
        out += [s for s in decode_specs(dt, full=False) if s.kernel == "decode_level" and "i32" in s.spec]
        if dt == "float32":
            packed = [packed_spec(dt, 16, 32, 8, 2), packed_spec(dt, 32, 16, 8, 2, split=True, aligned_k=False, ieee=False),
                      unpack_spec(dt, 32)]
        else:
            packed = [packed_spec(dt, 16, 64, 4, 2), packed_spec(dt, 32, 128, 8, 2, split=True, aligned_k=False),
                      unpack_spec(dt, 64)]
        pickable = {s.id for s in packed_specs(dt)}
        for s in packed:
            if s.id not in pickable:
                raise ValueError(f"subset spec {s.id} is not one the packed launchers can pick")
        out += packed
    return out


# ------------------------------------------------------------------------------------------------
# Compile and check (worker side: TRITON_INTERPRET unset)
# ------------------------------------------------------------------------------------------------
def _jit_function(kernel: str):
    """The ``triton.runtime.jit.JITFunction`` behind ``kernel`` (unwrapping autotune / heuristics)."""
    import triton

    from elsa_codec.kernels.triton import _common

    if _common.INTERPRET:
        raise RuntimeError("the compile gate needs the kernels imported without TRITON_INTERPRET "
                           "(run it through run_gate(), which uses a clean subprocess)")
    if kernel == "linear":
        from elsa_codec.kernels.triton.linear import _elsa_linear_kernel as fn
    elif kernel == "decode_level":
        from elsa_codec.kernels.triton.decode import _decode_level_kernel as fn
    elif kernel == "decode_counters":
        from elsa_codec.kernels.triton.decode import _decode_counters_kernel as fn
    elif kernel == "packed_linear":
        from elsa_codec.kernels.triton.packed_linear import _packed_linear_kernel as fn
    elif kernel == "unpack_level":
        from elsa_codec.kernels.triton.packed_unpack import _unpack_kernel as fn
    else:
        raise ValueError(f"unknown kernel {kernel!r}")
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn
    return fn


def nvidia_tool(name: str) -> str:
    """Path of ``cuobjdump`` / ``ptxas`` shipped in the Triton wheel (else the one on PATH)."""
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if os.path.exists(path):
        return path
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found in the Triton wheel ({path}) nor on PATH")
    return found


def compile_sm90(fn, signature: dict, constexprs: dict, aligned, num_warps: int, num_stages: int):
    """``triton.compile`` the ``@triton.jit`` function ``fn`` for sm_90a (``GPUTarget("cuda", 90,
    32)``): ``signature`` maps each runtime argument to its Triton type (``"*bf16"``, ``"i32"``),
    ``constexprs`` gives the constexpr values, and the arguments named in ``aligned`` carry the
    16-divisibility hint. Returns the ``CompiledKernel`` (``.asm["ttgir"]``, ``.asm["ptx"]``,
    ``.asm["cubin"]``, ``.metadata.shared``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {name: "constexpr" if name in constexprs else signature[name] for name in fn.arg_names}
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def compile_spec(spec: Spec):
    """:func:`compile_sm90` of ``spec``'s kernel with its signature, constexprs and hints."""
    return compile_sm90(_jit_function(spec.kernel), dict(spec.signature), dict(spec.constexprs), spec.aligned,
                        spec.num_warps, spec.num_stages)


_RES_RE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def resource_usage(cubin: bytes, workdir: str) -> dict:
    """``cuobjdump --dump-resource-usage`` and the SASS's local-memory instructions of a cubin:
    ``{"registers", "stack_bytes", "static_smem", "local_bytes", "sass_local_ops", "hgmma"}``."""
    path = os.path.join(workdir, "k.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    cuobjdump = nvidia_tool("cuobjdump")
    res = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
    m = _RES_RE.search(res)
    if not m:
        raise RuntimeError(f"cannot parse cuobjdump --dump-resource-usage output:\n{res}")
    sass = subprocess.run([cuobjdump, "--dump-sass", path], capture_output=True, text=True, check=True).stdout
    return {
        "registers": int(m.group(1)), "stack_bytes": int(m.group(2)), "static_smem": int(m.group(3)),
        "local_bytes": int(m.group(4)),
        "sass_local_ops": len(re.findall(r"\b(?:LDL|STL)(?:\.\w+)*\b", sass)),
        "hgmma": len(re.findall(r"\bHGMMA\b", sass)),
    }


def occupancy(registers: int, smem_bytes: int, num_warps: int) -> tuple[int, int, str]:
    """Theoretical ``(blocks_per_sm, warps_per_sm, limiter)`` on sm_90.

    Registers: ``ceil(regs * 32 / 256) * 256`` per warp out of 65536 per SM; shared memory:
    ``smem + 1 KiB`` (reserved) per block out of 228 KiB; at most 64 warps and 32 blocks per SM.
    ``limiter`` names the binding limit (``warps``, ``blocks``, ``registers``, ``shared memory``).
    """
    per_warp = -(-max(registers, 1) * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by = {  # on a tie the first named is the limiter: "warps" means full occupancy
        "warps": MAX_WARPS_PER_SM // num_warps,
        "blocks": MAX_BLOCKS_PER_SM,
        "registers": (REGS_PER_SM // per_warp) // num_warps,
        "shared memory": SMEM_PER_SM // (smem_bytes + SMEM_RESERVED_PER_BLOCK),
    }
    limiter = min(by, key=lambda k: (by[k], list(by).index(k)))
    blocks = by[limiter]
    return blocks, blocks * num_warps, limiter


def check_spec(spec: Spec, workdir: str) -> dict:
    """Compile ``spec`` and check it; returns one row (:data:`CSV_COLUMNS`) with ``status``
    ``pass`` / ``FAIL`` and the failed checks in ``reasons``."""
    import triton

    row = {c: "" for c in CSV_COLUMNS}
    row.update(kernel=spec.kernel, config=spec.config, dtype=spec.dtype, spec=spec.spec, num_warps=spec.num_warps,
               num_stages=spec.num_stages, wgmma_required="yes" if spec.wgmma_required else "no",
               triton=triton.__version__)
    t0 = time.perf_counter()
    try:
        k = compile_spec(spec)
    except Exception as e:  # noqa: BLE001 - any compiler error is a gate failure, reported
        first = (str(e).strip().splitlines() or [""])[0][:200]
        row.update(status="FAIL", reasons=f"does not compile: {type(e).__name__}: {first}",
                   compile_s=f"{time.perf_counter() - t0:.2f}")
        return row
    row["compile_s"] = f"{time.perf_counter() - t0:.2f}"
    ru = resource_usage(k.asm["cubin"], workdir)
    ptx = k.asm["ptx"]
    ptx_local = len(re.findall(r"\b(?:ld|st)\.local\b", ptx))
    wgmma = len(re.findall(r"\bwgmma\.mma_async\b", ptx))
    smem = int(k.metadata.shared) + ru["static_smem"]
    blocks, warps, limiter = occupancy(ru["registers"], smem, spec.num_warps)
    reasons = []
    if ru["registers"] > MAX_REGS_PER_THREAD:
        reasons.append(f"{ru['registers']} registers > {MAX_REGS_PER_THREAD}")
    if ru["stack_bytes"] or ru["local_bytes"] or ru["sass_local_ops"]:
        reasons.append(f"spills: {ru['stack_bytes']} B stack, {ru['sass_local_ops']} LDL/STL in SASS")
    if ptx_local:
        reasons.append(f"{ptx_local} ld.local/st.local in PTX")
    if smem > SMEM_PER_BLOCK:
        reasons.append(f"shared memory {smem} B > {SMEM_PER_BLOCK} B")
    if spec.wgmma_required and not wgmma:
        reasons.append("no wgmma.mma_async (BLOCK_M >= 64, 16-bit dtype)")
    if blocks < 1:
        reasons.append("no block fits on an SM")
    row.update(
        status="FAIL" if reasons else "pass", reasons="; ".join(reasons), registers=ru["registers"],
        stack_bytes=ru["stack_bytes"], sass_local_ops=ru["sass_local_ops"], ptx_local_ops=ptx_local, smem_bytes=smem,
        wgmma="yes" if wgmma else "no", blocks_per_sm=blocks, warps_per_sm=warps,
        occupancy=f"{warps / MAX_WARPS_PER_SM:.3f}", limiter=limiter,
    )
    return row


def _worker(argv: list[str]) -> int:
    """``python -m bench.static --worker``: read specs (JSON list) on stdin, print one
    JSON row per spec on stdout as each finishes."""
    import warnings

    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    specs = [Spec.from_json(d) for d in json.load(sys.stdin)]
    workdir = tempfile.mkdtemp(prefix="elsa-static-")
    try:
        for s in specs:
            print(json.dumps({"id": s.id, "row": check_spec(s, workdir)}), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


# ------------------------------------------------------------------------------------------------
# Driver (any process, interpreter on or off)
# ------------------------------------------------------------------------------------------------
def worker_env() -> dict:
    """Environment of a gate worker: no ``TRITON_INTERPRET``, a fresh ``TRITON_CACHE_DIR``, the
    kernels importable as in this process (``sys.path`` passed as ``PYTHONPATH``)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="elsa-static-cache-")
    env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")]).strip(os.pathsep)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default on every version the kernels support
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_gate(specs: list[Spec], *, jobs: int | None = None, progress=None, timeout: float = 3600.0) -> list[dict]:
    """Compile and check every spec in ``jobs`` clean worker subprocesses (default: the CPUs this
    process may use); returns the rows in the order of ``specs``. ``progress(done, total, row)`` is
    called as rows arrive. Raises RuntimeError when a worker dies (its stderr is in the message)."""
    if not specs:
        return []
    if jobs is None:
        try:
            jobs = len(os.sched_getaffinity(0))
        except AttributeError:
            jobs = os.cpu_count() or 1
    jobs = max(1, min(jobs, len(specs)))
    # Balance: the linear kernel compiles far slower than decode; deal round-robin.
    shards = [specs[i::jobs] for i in range(jobs)]
    procs = []
    for shard in shards:
        env = worker_env()
        p = subprocess.Popen([sys.executable, "-m", "bench.static", "--worker"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        p.stdin.write(json.dumps([s.to_json() for s in shard]))
        p.stdin.close()
        procs.append((p, env["TRITON_CACHE_DIR"]))
    rows: dict[str, dict] = {}
    import selectors

    sel = selectors.DefaultSelector()
    for p, _ in procs:
        sel.register(p.stdout, selectors.EVENT_READ, p)
    deadline = time.monotonic() + timeout
    open_streams = len(procs)
    try:
        while open_streams:
            if time.monotonic() > deadline:
                raise RuntimeError(f"compile gate: workers still running after {timeout:.0f} s")
            for key, _ in sel.select(timeout=5):
                line = key.fileobj.readline()
                if not line:
                    sel.unregister(key.fileobj)
                    open_streams -= 1
                    continue
                msg = json.loads(line)
                rows[msg["id"]] = msg["row"]
                if progress:
                    progress(len(rows), len(specs), msg["row"])
        for p, _ in procs:
            p.wait(timeout=60)
            if p.returncode:
                raise RuntimeError(f"compile gate worker exited with {p.returncode}:\n{p.stderr.read()[-4000:]}")
    finally:
        for p, cache in procs:
            if p.poll() is None:
                p.kill()
            shutil.rmtree(cache, ignore_errors=True)
    missing = [s.id for s in specs if s.id not in rows]
    if missing:
        raise RuntimeError(f"compile gate: no result for {len(missing)} specs, e.g. {missing[:3]}")
    return [dict(rows[s.id], spec_id=s.id) for s in specs]


# ------------------------------------------------------------------------------------------------
# Outputs
# ------------------------------------------------------------------------------------------------
def write_csv(rows: list[dict], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def _int(v) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return -1


def render_markdown(rows: list[dict], *, command: str, seconds: float) -> str:
    """``static.md``: counts, then one line per (kernel, config, dtype) with the worst values over
    its specialisations (most registers, largest stack / smem, lowest occupancy), then failures."""
    import triton

    n_fail = sum(r["status"] != "pass" for r in rows)
    lines = [
        "# Compile gate for sm_90a (H100 / H200), no GPU",
        "",
        f"Command: `{command}` ({seconds:.0f} s on this machine's CPU; triton {triton.__version__}, "
        f"target `GPUTarget(\"cuda\", 90, 32)`). Columns and checks: bench/README.md, \"Compile gate\".",
        "",
        f"**{len(rows)} compilations, {len(rows) - n_fail} pass, {n_fail} fail.** Limits: <= {MAX_REGS_PER_THREAD} "
        f"registers, no spill (stack 0, no LDL/STL), no ld.local/st.local, shared memory <= {SMEM_PER_BLOCK} B, "
        "wgmma for float16/bfloat16 tiles with BLOCK_M >= 64.",
        "",
        "Static figures only: nothing ran, nothing was timed, no result was checked on hardware.",
        "",
        "| kernel | config | dtype | specs | pass | max regs | max stack B | max smem B | wgmma | min warps/SM "
        "| limiter |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["config"], r["dtype"]), []).append(r)
    for (kernel, config, dtype), rs in groups.items():
        ok = sum(r["status"] == "pass" for r in rs)
        compiled = [r for r in rs if r["registers"] != ""]
        wg = {r["wgmma"] for r in compiled}
        wg_s = "yes" if wg == {"yes"} else ("no" if wg == {"no"} else ("mixed" if wg else "-"))
        worst = min(compiled, key=lambda r: _int(r["warps_per_sm"])) if compiled else None
        lines.append(
            f"| {kernel} | {config} | {dtype} | {len(rs)} | {ok} | "
            f"{max((_int(r['registers']) for r in compiled), default='-')} | "
            f"{max((_int(r['stack_bytes']) for r in compiled), default='-')} | "
            f"{max((_int(r['smem_bytes']) for r in compiled), default='-')} | {wg_s} | "
            f"{worst['warps_per_sm'] if worst else '-'} | {worst['limiter'] if worst else '-'} |"
        )
    fails = [r for r in rows if r["status"] != "pass"]
    if fails:
        lines += ["", "## Failures", "", "| kernel | config | dtype | spec | reasons |", "|---|---|---|---|---|"]
        lines += [f"| {r['kernel']} | {r['config']} | {r['dtype']} | {r['spec']} | {r['reasons']} |" for r in fails]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m bench static [--out DIR] [--subset] [--jobs N] [--dtypes ...]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return _worker(argv[1:])
    p = argparse.ArgumentParser(prog="python -m bench static",
                                description="Compile every kernel config for sm_90a (no GPU) and check registers, "
                                            "spills, shared memory and wgmma; writes static.csv + static.md.")
    p.add_argument("--out", default=RESULTS_DIR, help="results folder (default bench/results/static-sm90/)")
    p.add_argument("--subset", action="store_true", help="the test suite's representative subset only")
    p.add_argument("--jobs", type=int, help="worker processes (default: the CPUs this process may use)")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="comma list of float32, float16, bfloat16")
    p.add_argument("--kernels", default="linear,decode_level,decode_counters,packed_linear,unpack_level",
                   help="comma list of kernels")
    a = p.parse_args(argv)
    dtypes = [d.strip() for d in a.dtypes.split(",") if d.strip()]
    for d in dtypes:
        if d not in DTYPES:
            print(f"python -m bench static: unknown dtype {d!r}; expected {', '.join(DTYPES)}", file=sys.stderr)
            return 2
    kernels = {k.strip() for k in a.kernels.split(",") if k.strip()}
    specs = subset_specs(dtypes) if a.subset else all_specs(dtypes)
    specs = [s for s in specs if s.kernel in kernels]
    t0 = time.perf_counter()
    print(f"python -m bench static: {len(specs)} compilations for sm_90a", flush=True)

    def progress(done, total, row):
        if row["status"] != "pass" or done % 25 == 0 or done == total:
            tag = "" if row["status"] == "pass" else f"  FAIL: {row['reasons']}"
            print(f"  [{done}/{total}] {row['kernel']}/{row['config']}/{row['dtype']}/{row['spec']}: "
                  f"regs {row['registers']} stack {row['stack_bytes']} smem {row['smem_bytes']} "
                  f"wgmma {row['wgmma']}{tag}",
                  flush=True)

    rows = run_gate(specs, jobs=a.jobs, progress=progress)
    secs = time.perf_counter() - t0
    os.makedirs(a.out, exist_ok=True)
    write_csv(rows, os.path.join(a.out, "static.csv"))
    cmd = "python -m bench static " + " ".join(argv) if argv else "python -m bench static"
    with open(os.path.join(a.out, "static.md"), "w", encoding="utf-8") as f:
        f.write(render_markdown(rows, command=cmd.strip(), seconds=secs))
    n_fail = sum(r["status"] != "pass" for r in rows)
    print(f"python -m bench static: {len(rows)} compiled in {secs:.0f} s: {len(rows) - n_fail} pass, {n_fail} fail; "
          f"wrote {a.out}/static.csv and static.md", flush=True)
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
