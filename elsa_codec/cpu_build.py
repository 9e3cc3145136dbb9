"""Build and load the CPU kernels of ``kernels/cpu/elsa_cpu.cpp`` (the ``sparse-cpu`` backend).

The source is compiled on first use (never at ``import elsa_codec``) with the system C++ compiler
(``$CXX``, else ``g++``, else ``c++``) into a per-user cache folder, and loaded with ``ctypes``:

- flags ``-O3 -fopenmp`` plus ``-mavx2 -mfma -mf16c`` when the CPU has AVX2, FMA and F16C (read
  from ``/proc/cpuinfo``); elsewhere the same source builds its portable scalar path;
- the shared object is named by a hash of the source, the flags and the compiler, written to a
  temporary name and renamed (atomic: concurrent first uses never load a half-written file);
- folder ``$ELSA_CPU_CACHE`` or ``~/.cache/elsa_codec/cpu``; ``ELSA_CPU_KERNELS=0`` turns the
  backend off;
- at run time the kernels pick the best instruction set the CPU has (:func:`cpu_isa`);
  ``ELSA_CPU_ISA=avx2`` (or ``scalar``) caps it, e.g. to measure the AVX2 path on an AVX-512 CPU.

Why ctypes and not ``torch.utils.cpp_extension``: the kernels take raw pointers and need nothing
from ATen, so a plain shared object builds in about 9 s on the project's 2-core machine, against
39 s for an empty ``torch.utils.cpp_extension.load_inline`` module (``#include
<torch/extension.h>``, measured on the same machine); the threads are OpenMP's
(the same ``libgomp`` the PyTorch wheel loads), sized by ``torch.get_num_threads()`` per call.

If the build fails (no compiler, a read-only cache), :func:`cpu_kernels` returns None, the
``sparse-cpu`` backend is unavailable and sparse levels run the reference PyTorch path (decoded
weight + ``F.linear``); :func:`cpu_kernels_error` says why, and one warning says it once.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import shutil
import subprocess
import tempfile
import threading
import warnings

__all__ = ["cpu_kernels", "cpu_kernels_error", "cpu_kernels_source", "cpu_flags", "cpu_isa", "ISAS"]

#: Instruction sets of the kernels, lowest first (``cpu_isa``): the bitmask product at M = 1 runs
#: AVX-512 (masked expand-loads) where the CPU has AVX-512 F/BW/VL/DQ + VBMI2; everything else AVX2.
ISAS = ("scalar", "avx2", "avx512")

_LIB = None  # the loaded ctypes library, False after a failed build
_ERROR: str | None = None
_LOCK = threading.Lock()

_P, _I64, _I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
#: ctypes signatures of the exported functions (see the comments in elsa_cpu.cpp).
_SIGNATURES = {
    "elsa_cpu_abi": [],
    "elsa_cpu_avx2": [],
    "elsa_cpu_isa": [],
    "elsa_cpu_set_isa": [_I],
    "elsa_count_rows": [_P, _I, _I64, _I64, _I64, _I, _I, _P, _I],
    "elsa_pack_csr": [_P, _I, _I64, _I64, _I64, _I, _I, _P, _P, _I, _P, _I],
    "elsa_pack_bitmask": [_P, _I, _I64, _I64, _I64, _I, _I, _P, _P, _I64, _P, _I],
    "elsa_bsr_blocks": [_P, _I, _I64, _I64, _I64, _I, _I, _I64, _I64, _P, _P, _I],
    "elsa_pack_bsr": [_P, _I, _I64, _I64, _I64, _I, _I, _I64, _I64, _I64, _P, _P, _P, _P, _I],
    "elsa_unpack_csr": [_I64, _I64, _P, _P, _I, _P, _I, _P, _I],
    "elsa_unpack_bitmask": [_I64, _I64, _I64, _P, _P, _P, _I, _P, _I],
    "elsa_unpack_bsr": [_I64, _I64, _I64, _I64, _I64, _P, _P, _P, _I, _P, _I],
    "elsa_csr_mv": [_I64, _P, _P, _I, _P, _I, _P, _P, _P, _I],
    "elsa_bitmask_mv": [_I64, _I64, _P, _P, _P, _I, _P, _P, _P, _I],
    "elsa_bsr_mv": [_I64, _I64, _I64, _I64, _P, _P, _P, _I, _P, _P, _P, _I],
    "elsa_csr_mm": [_I64, _I64, _I64, _P, _P, _I, _P, _I, _P, _P, _P, _I64, _I],
    "elsa_bitmask_mm": [_I64, _I64, _I64, _I64, _P, _P, _P, _I, _P, _P, _P, _I64, _I],
    "elsa_bsr_mm": [_I64, _I64, _I64, _I64, _I64, _I64, _P, _P, _P, _I, _P, _P, _P, _I64, _I],
}
_ABI = 2


def cpu_kernels_source() -> str:
    """Path of ``elsa_cpu.cpp`` (package data of ``elsa_codec.kernels``; found without importing
    that package, which would import Triton)."""
    spec = importlib.util.find_spec("elsa_codec.kernels")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the elsa_codec.kernels package is not installed")
    return os.path.join(list(spec.submodule_search_locations)[0], "cpu", "elsa_cpu.cpp")


def cpu_flags() -> list[str]:
    """Compiler flags for this CPU: the AVX2 path where ``/proc/cpuinfo`` lists avx2, fma and f16c."""
    flags = ["-O3", "-fopenmp", "-fPIC", "-shared", "-std=c++17"]
    try:
        with open("/proc/cpuinfo") as f:
            have = set()
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        have = set()
    if {"avx2", "fma", "f16c"} <= have:
        flags += ["-mavx2", "-mfma", "-mf16c"]
    return flags


def _compiler() -> str | None:
    for c in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if c and shutil.which(c):
            return c
    return None


def _cache_dir() -> str:
    d = os.environ.get("ELSA_CPU_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "elsa_codec", "cpu")
    os.makedirs(d, exist_ok=True)
    return d


def _build() -> str:
    """Compile the source if its shared object is not cached yet; returns the .so path."""
    src = cpu_kernels_source()
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    flags = cpu_flags()
    with open(src, "rb") as f:
        text = f.read()
    key = hashlib.sha256(text + " ".join([cxx, *flags]).encode()).hexdigest()[:16]
    out = os.path.join(_cache_dir(), f"elsa_cpu_{key}.so")
    if os.path.exists(out):
        return out
    fd, tmp = tempfile.mkstemp(prefix=".elsa_cpu_", suffix=".so", dir=os.path.dirname(out))
    os.close(fd)
    try:
        r = subprocess.run([cxx, *flags, "-o", tmp, src], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{cxx} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _load(path: str):
    import torch  # noqa: F401  (loads PyTorch's libgomp first, so the kernels share its thread pool)

    lib = ctypes.CDLL(path)
    for name, args in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = ctypes.c_int if name.startswith("elsa_cpu_") else None
    if lib.elsa_cpu_abi() != _ABI:
        raise RuntimeError(f"{path}: ABI {lib.elsa_cpu_abi()}, expected {_ABI}")
    cap = os.environ.get("ELSA_CPU_ISA")
    if cap:
        if cap not in ISAS:
            raise RuntimeError(f"ELSA_CPU_ISA={cap!r}: expected one of {ISAS}")
        lib.elsa_cpu_set_isa(ISAS.index(cap))
    return lib


def cpu_kernels():
    """The loaded CPU kernels (a ``ctypes.CDLL``), building them on first use; None when they
    cannot be built or are turned off (``ELSA_CPU_KERNELS=0``). Thread-safe; never raises."""
    global _LIB, _ERROR
    if _LIB is None:
        with _LOCK:
            if _LIB is None:
                try:
                    if os.environ.get("ELSA_CPU_KERNELS", "1") in ("0", "off", "false"):
                        raise RuntimeError("turned off by ELSA_CPU_KERNELS=0")
                    _LIB = _load(_build())
                except Exception as e:  # no compiler, compile error, unwritable cache...
                    _LIB, _ERROR = False, f"{type(e).__name__}: {e}"
                    warnings.warn(
                        f"elsa_codec: the CPU sparse kernels are unavailable ({_ERROR}); sparse levels run the "
                        "slower reference path (decoded weight + F.linear)", RuntimeWarning, stacklevel=3)
    return _LIB or None


def cpu_isa(cap: str | None = None) -> str | None:
    """The instruction set the kernels use (``"avx512"``, ``"avx2"``, ``"scalar"``), None without
    kernels. With ``cap``, first cap it there (never above what the CPU has; process-wide).

    Raises:
        ValueError: ``cap`` not in :data:`ISAS`.
    """
    lib = cpu_kernels()
    if lib is None:
        return None
    if cap is not None:
        if cap not in ISAS:
            raise ValueError(f"cpu_isa: cap must be one of {ISAS}, got {cap!r}")
        lib.elsa_cpu_set_isa(ISAS.index(cap))
    return ISAS[lib.elsa_cpu_isa()]


def cpu_kernels_error() -> str | None:
    """Why :func:`cpu_kernels` returned None (None if it has not failed)."""
    return _ERROR
