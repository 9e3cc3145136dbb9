"""Build and load the CPU kernels: ``elsa_codec/kernels/cpu/elsa_cpu.cpp`` (the ``sparse-cpu`` backend, with
``elsa_cpu_mm.cpp`` and ``elsa_cpu_nested.cpp`` in the same shared object) and
``elsa_codec/format/elsa_rule.c`` (the code rule: encode, extract a level, decode codes; used by
:mod:`elsa_codec.format.bits`). Two separate shared objects: the code rule never waits for the big C++
source.

Each source is compiled on first use (never at ``import elsa_codec``) with the system compiler
(``elsa_cpu.cpp``: ``$CXX``, else ``g++``, ``c++``, ``clang++``; ``elsa_rule.c``: ``$CC``, else
``gcc``, ``cc``, ``clang``) into a per-user cache folder, and loaded with ``ctypes``:

- flags ``-O3 -fopenmp`` plus ``-mavx2 -mfma -mf16c`` when the CPU has AVX2, FMA and F16C (read
  from ``/proc/cpuinfo``); elsewhere the same sources build their portable scalar paths. The C
  source, plain loops that gcc vectorises, adds 512-bit AVX-512 where the CPU has it
  (:func:`rule_flags`);
- each shared object is named by a hash of its source, the flags and the compiler, written to a
  temporary name and renamed (atomic: concurrent first uses never load a half-written file);
- folder ``$ELSA_CPU_CACHE`` or ``~/.cache/elsa_codec/cpu``; ``ELSA_CPU_KERNELS=0`` turns both off;
- at run time the sparse kernels pick the best instruction set the CPU has (:func:`cpu_isa`);
  ``ELSA_CPU_ISA=avx2`` (or ``scalar``) caps it, e.g. to measure the AVX2 path on an AVX-512 CPU.

Where Python's headers are installed, ``elsa_rule.c`` is compiled with ``-DELSA_RULE_PYTHON`` and
the same shared object is also the CPython module ``_elsa_rule`` (``rule_kernels().python_module``):
its functions take the same arguments without ctypes' argument conversion (0.1 us a call instead
of 0.8 us; a ``copy_`` of a 64x64 tensor takes about 1 us). Without the headers, plain C and ctypes.

Cold build times on the project's 2-core machine (gcc 12): ``elsa_rule.c`` 1.0-1.3 s with the
CPython module, 0.8-1.1 s without (the path ``elsa encode`` takes: its first ``encode_tensor``),
``elsa_cpu.cpp`` about 9 s.

Why ctypes and not ``torch.utils.cpp_extension``: the kernels take raw pointers and need nothing
from ATen, so a plain shared object builds in about 9 s on the project's 2-core machine, against
39 s for an empty ``torch.utils.cpp_extension.load_inline`` module (``#include
<torch/extension.h>``, measured on the same machine); the threads are OpenMP's
(the same ``libgomp`` the PyTorch wheel loads), sized by ``torch.get_num_threads()`` per call
(``elsa_rule.c`` reads that count itself: ``omp_get_max_threads()`` of the shared ``libgomp``).

If a build fails (no compiler, a read-only cache), :func:`cpu_kernels` (:func:`rule_kernels`)
returns None: the ``sparse-cpu`` backend is unavailable and sparse levels run the reference PyTorch
path (decoded weight + ``F.linear``), and the code rule runs its PyTorch reference in
:mod:`elsa_codec.format.bits` (same bits, slower); :func:`cpu_kernels_error` (:func:`rule_kernels_error`)
says why, and one warning says it once (none when ``ELSA_CPU_KERNELS=0`` turned the code rule's
kernels off).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from dataclasses import dataclass, field

__all__ = [
    "cpu_kernels", "cpu_kernels_error", "cpu_kernels_source", "cpu_kernels_build_id", "cpu_flags", "cpu_isa",
    "cpu_model", "l2_cache_bytes", "cache_dir", "ISAS",
    "rule_kernels", "rule_kernels_error", "rule_kernels_source", "rule_flags",
]

#: Instruction sets of the kernels, lowest first (``cpu_isa``): the bitmask product at M = 1 runs
#: AVX-512 (masked expand-loads) where the CPU has AVX-512 F/BW/VL/DQ + VBMI2; everything else AVX2.
ISAS = ("scalar", "avx2", "avx512")

_P, _I64, _I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


@dataclass
class _Library:
    """One kernel source, its build recipe and its load state (``lib``: None before the first use,
    the ``ctypes.CDLL`` after, False after a failed build)."""

    stem: str  # shared object prefix and source name (without extension)
    ext: str  # "cpp" or "c"
    folder: str  # the source's folder, relative to this package
    compilers: tuple  # environment variable first, then the names tried
    signatures: dict  # exported name -> (argtypes, restype)
    abi: int  # what <stem>_abi() must return
    extra: tuple = ()  # further translation units in the same folder, compiled into the same object
    includes: tuple = ()  # files the sources include (part of the build's hash)
    lib: object = None
    path: str | None = None  # the loaded shared object
    error: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


#: ctypes signatures of the sparse kernels (see the comments in elsa_cpu.cpp).
_CPU_SIGNATURES = {
    "elsa_cpu_abi": [],
    "elsa_cpu_avx2": [],
    "elsa_cpu_isa": [],
    "elsa_cpu_set_isa": [_I],
    "elsa_count_rows": [_P, _I, _I64, _I64, _I64, _I64, _I, _I, _P, _I],
    "elsa_pack_csr": [_P, _I, _I64, _I64, _I64, _I64, _I, _I, _P, _P, _I, _P, _I],
    "elsa_pack_bitmask": [_P, _I, _I64, _I64, _I64, _I64, _I, _I, _P, _P, _I64, _P, _I],
    "elsa_bsr_blocks": [_P, _I, _I64, _I64, _I64, _I64, _I, _I, _I64, _I64, _P, _P, _I],
    "elsa_pack_bsr": [_P, _I, _I64, _I64, _I64, _I64, _I, _I, _I64, _I64, _I64, _P, _P, _P, _P, _I],
    "elsa_bitmask_to_csr": [_I64, _I64, _P, _P, _P, _I, _P, _P, _I, _P, _I],
    # csr kernels: (..., rowptr, rowend, nseg, ld, col, ...): row n's entries [rowptr[g ld + n], rowend[g ld + n])
    # of each segment g < nseg (plain csr: rowptr + 1, one segment; level t of a nested csr: t segments)
    "elsa_unpack_csr": [_I64, _I64, _P, _P, _I, _I64, _P, _I, _P, _I, _P, _I],
    "elsa_unpack_bitmask": [_I64, _I64, _I64, _P, _P, _P, _I, _P, _I],
    "elsa_unpack_bsr": [_I64, _I64, _I64, _I64, _I64, _P, _P, _P, _I, _P, _I],
    "elsa_csr_mv": [_I64, _P, _P, _I, _I64, _P, _I, _P, _I, _P, _P, _P, _I],
    "elsa_bitmask_mv": [_I64, _I64, _P, _P, _P, _I, _P, _P, _P, _I],
    "elsa_bsr_mv": [_I64, _I64, _I64, _I64, _P, _P, _P, _I, _P, _P, _P, _I],
    "elsa_pack_nm": [_P, _I, _I64, _I64, _I64, _I64, _I, _I, _I, _I, _I64, _P, _P, _I],
    "elsa_unpack_nm": [_I64, _I64, _I64, _I, _I, _P, _P, _I, _P, _I],
    "elsa_nm_mv": [_I64, _I64, _I, _I, _P, _P, _I, _P, _P, _P, _I],
    # elsa_cpu_mm.cpp: x as panels [P, Kp, W]; (N, M, W, Kp, <format arrays>, dt, xp, bias, y, ldy, threads)
    "elsa_csr_mm": [_I64, _I64, _I64, _I64, _P, _P, _I, _I64, _P, _I, _P, _I, _P, _P, _P, _I64, _I],
    "elsa_bitmask_mm": [_I64, _I64, _I64, _I64, _I64, _P, _P, _P, _I, _P, _P, _P, _I64, _I],
    "elsa_nm_mm": [_I64, _I64, _I64, _I64, _I64, _I, _I, _P, _P, _I, _P, _P, _P, _I64, _I],
    "elsa_bsr_mm": [_I64, _I64, _I64, _I64, _I64, _I64, _I64, _P, _P, _P, _I, _P, _P, _P, _I64, _I],
    # elsa_cpu_nested.cpp: every sparse level in one nested csr (w, es, N, K, rs, cs, k, T, ...)
    "elsa_count_codes": [_P, _I, _I64, _I64, _I64, _I64, _I, _I, _P, _I],
    "elsa_pack_csr_nested": [_P, _I, _I64, _I64, _I64, _I64, _I, _I, _P, _P, _I64, _P, _I, _P, _I],
}
_CPU_RESTYPE = {"elsa_pack_nm": ctypes.c_int64}
_CPU_SIGNATURES = {n: (a, _CPU_RESTYPE.get(n, ctypes.c_int if n.startswith("elsa_cpu_") else None))
                   for n, a in _CPU_SIGNATURES.items()}

#: ctypes signatures of the code rule (see the comments in elsa_rule.c): encoders
#: ``(x, codes, k, out, n) -> status``, extract ``(x, k, t, out, n)``, decode ``(x, k, out, n)``;
#: their threads are PyTorch's (the shared libgomp's ``omp_get_max_threads()``).
_RULE_SIGNATURES = {
    "elsa_rule_abi": ([], ctypes.c_int),
    **{f"elsa_encode_{d}_{c}": ([_P, _P, _I, _P, _I64], ctypes.c_int)
       for d in ("f32", "bf16", "f16") for c in ("u8", "i16", "i32", "i64")},
    **{f"elsa_extract_u{w}": ([_P, _I, _I64, _P, _I64], None) for w in (32, 16)},
    **{f"elsa_decode_codes_u{w}": ([_P, _I, _P, _I64], None) for w in (32, 16)},
}

_CPU = _Library("elsa_cpu", "cpp", "kernels/cpu", ("CXX", "g++", "c++", "clang++"), _CPU_SIGNATURES, abi=7,
                extra=("elsa_cpu_mm.cpp", "elsa_cpu_nested.cpp"), includes=("elsa_cpu_mm.inc", "elsa_cpu_common.h"))
_RULE = _Library("elsa_rule", "c", "format", ("CC", "gcc", "cc", "clang"), _RULE_SIGNATURES, abi=2)


def _source(lib: _Library) -> str:
    """Path of a kernel source (package data: ``kernels/cpu/elsa_cpu.cpp``, ``format/elsa_rule.c``)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), *lib.folder.split("/"), f"{lib.stem}.{lib.ext}")


def cpu_kernels_source() -> str:
    """Path of ``elsa_cpu.cpp``."""
    return _source(_CPU)


def rule_kernels_source() -> str:
    """Path of ``elsa_rule.c``."""
    return _source(_RULE)


def _cpu_features() -> set:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _isa_flags() -> list[str]:
    """``-mavx2 -mfma -mf16c`` where the CPU has avx2, fma and f16c, else none."""
    return ["-mavx2", "-mfma", "-mf16c"] if {"avx2", "fma", "f16c"} <= _cpu_features() else []


def cpu_flags() -> list[str]:
    """Compiler flags of ``elsa_cpu.cpp`` for this CPU: the AVX2 path where the CPU has it."""
    return ["-O3", "-fopenmp", "-fPIC", "-shared", "-std=c++17", *_isa_flags()]


def _python_include() -> str | None:
    """The folder of this Python's ``Python.h``, None where the headers are not installed."""
    import sysconfig

    inc = sysconfig.get_paths().get("include")
    return inc if inc and os.path.exists(os.path.join(inc, "Python.h")) else None


def rule_flags() -> list[str]:
    """Compiler flags of ``elsa_rule.c`` for this CPU: the AVX2 flags where the CPU has them, and
    512-bit AVX-512 vectors where it has AVX-512 F/BW/VL/DQ (the rule's loop runs 2.5x faster
    there than in AVX2: mask registers make its seven compares and selects cheap)."""
    flags = ["-O3", "-fopenmp", "-fPIC", "-shared", "-std=c11", *_isa_flags()]
    if flags[-1:] == ["-mf16c"] and {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= _cpu_features():
        flags += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mprefer-vector-width=512"]
    inc = _python_include()
    if inc:  # also the CPython module _elsa_rule: calls without ctypes' argument conversion
        flags += ["-DELSA_RULE_PYTHON", f"-I{inc}"]
    return flags


def _compiler(lib: _Library) -> str | None:
    env, *names = lib.compilers
    for c in (os.environ.get(env), *names):
        if c and shutil.which(c):
            return c
    return None


def _cache_dir() -> str:
    d = os.environ.get("ELSA_CPU_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "elsa_codec", "cpu")
    os.makedirs(d, exist_ok=True)
    return d


def _build(lib: _Library) -> str:
    """Compile ``lib``'s source if its shared object is not cached yet; returns the .so path."""
    src = _source(lib)
    folder = os.path.dirname(src)
    srcs = [src, *(os.path.join(folder, f) for f in lib.extra)]
    cc = _compiler(lib)
    if cc is None:
        raise RuntimeError(f"no {'C++' if lib.ext == 'cpp' else 'C'} compiler found (set {lib.compilers[0]}, or install {lib.compilers[1]})")
    flags = cpu_flags() if lib is _CPU else rule_flags()
    text = b""
    for path in (*srcs, *(os.path.join(folder, f) for f in lib.includes)):
        with open(path, "rb") as f:
            text += f.read()
    key = hashlib.sha256(text + " ".join([cc, *flags]).encode()).hexdigest()[:16]
    out = os.path.join(_cache_dir(), f"{lib.stem}_{key}.so")
    if os.path.exists(out):
        return out
    fd, tmp = tempfile.mkstemp(prefix=f".{lib.stem}_", suffix=".so", dir=os.path.dirname(out))
    os.close(fd)
    try:
        r = subprocess.run([cc, *flags, "-o", tmp, *srcs], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{cc} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _load(lib: _Library, path: str):
    import torch  # noqa: F401  (loads PyTorch's libgomp first, so the kernels share its thread pool)

    dll = ctypes.CDLL(path)
    for name, (args, res) in lib.signatures.items():
        fn = getattr(dll, name)
        fn.argtypes = args
        fn.restype = res
    got = getattr(dll, f"{lib.stem}_abi")()
    if got != lib.abi:
        raise RuntimeError(f"{path}: ABI {got}, expected {lib.abi}")
    return dll


def _load_cpu(path: str):
    dll = _load(_CPU, path)
    cap = os.environ.get("ELSA_CPU_ISA")
    if cap:
        if cap not in ISAS:
            raise RuntimeError(f"ELSA_CPU_ISA={cap!r}: expected one of {ISAS}")
        dll.elsa_cpu_set_isa(ISAS.index(cap))
    return dll


def _turned_off() -> bool:
    return os.environ.get("ELSA_CPU_KERNELS", "1") in ("0", "off", "false")


def _get(lib: _Library, load, warning: str, warn_when_off: bool):
    """``lib`` loaded (built on first use), or None; warns once on failure. Thread-safe."""
    if lib.lib is None:
        with lib.lock:
            if lib.lib is None:
                off = _turned_off()
                try:
                    if off:
                        raise RuntimeError("turned off by ELSA_CPU_KERNELS=0")
                    path = _build(lib)
                    lib.lib, lib.path = load(path), path
                except Exception as e:  # no compiler, compile error, unwritable cache...
                    lib.lib, lib.error = False, f"{type(e).__name__}: {e}"
                    if warn_when_off or not off:
                        warnings.warn(f"elsa_codec: {warning.format(error=lib.error)}", RuntimeWarning, stacklevel=4)
    return lib.lib or None


def cpu_kernels():
    """The loaded CPU sparse kernels (a ``ctypes.CDLL``), building them on first use; None when
    they cannot be built or are turned off (``ELSA_CPU_KERNELS=0``). Thread-safe; never raises."""
    return _get(_CPU, _load_cpu, "the CPU sparse kernels are unavailable ({error}); sparse levels run the "
                "slower reference path (decoded weight + F.linear)", warn_when_off=True)


def _load_rule(path: str):
    dll = _load(_RULE, path)
    dll.python_module = None
    if "-DELSA_RULE_PYTHON" in rule_flags():
        import importlib.machinery

        try:
            loader = importlib.machinery.ExtensionFileLoader("_elsa_rule", path)
            mod = importlib.util.module_from_spec(importlib.util.spec_from_loader("_elsa_rule", loader))
            loader.exec_module(mod)
            dll.python_module = mod
        except ImportError:  # the ctypes functions of the same object still serve
            pass
    return dll


def rule_kernels():
    """The loaded code-rule kernels of ``elsa_rule.c`` (a ``ctypes.CDLL``; its attribute
    ``python_module`` is the same object's CPython module ``_elsa_rule`` where Python's headers were
    there to build it, else None), building them on first use (about 1 s); None when they cannot be
    built or are turned off (``ELSA_CPU_KERNELS=0``, no warning then). Thread-safe; never raises."""
    return _get(_RULE, _load_rule, "the C code-rule kernels are unavailable ({error}); "
                "encode_tensor / extract_level / decode_codes run their PyTorch reference (same bits, slower)",
                warn_when_off=False)


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


def cpu_kernels_build_id() -> str | None:
    """The loaded sparse kernels' build (the shared object's name: a hash of the sources, flags and
    compiler), None without kernels: what a cached measurement of them is keyed by."""
    if cpu_kernels() is None:
        return None
    return os.path.splitext(os.path.basename(_CPU.path))[0]


def cpu_model() -> str:
    """This CPU's model name, family, model and stepping from ``/proc/cpuinfo`` (``platform.processor()``
    where that cannot be read)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                k = k.strip()
                if k in ("model name", "cpu family", "model", "stepping") and k not in fields:
                    fields[k] = v.strip()
                if not line.strip() and fields:
                    break
    except OSError:
        pass
    if not fields:
        import platform

        return platform.processor() or platform.machine()
    return " / ".join(fields.get(k, "?") for k in ("model name", "cpu family", "model", "stepping"))


#: L2 bytes per core assumed where sysfs does not say (the smaller L2 of the project's machines).
DEFAULT_L2_BYTES = 512 * 1024


@functools.cache
def l2_cache_bytes() -> int:
    """Bytes of the level-2 cache of CPU 0 (one core's), read once from
    ``/sys/devices/system/cpu/cpu0/cache/index*/`` (``level`` 2, ``size`` such as ``2048K``);
    :data:`DEFAULT_L2_BYTES` where that cannot be read."""
    return _read_l2() or DEFAULT_L2_BYTES


def _read_l2() -> int | None:
    import glob

    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    for d in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
        try:
            with open(os.path.join(d, "level")) as f:
                if f.read().strip() != "2":
                    continue
            with open(os.path.join(d, "size")) as f:
                size = f.read().strip()
            return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
        except (OSError, ValueError):
            continue
    return None


def cache_dir() -> str:
    """The per-user folder of the built kernels and their measurements (``$ELSA_CPU_CACHE``, else
    ``~/.cache/elsa_codec/cpu``), created if missing.

    Raises:
        OSError: it cannot be created.
    """
    return _cache_dir()


def cpu_kernels_error() -> str | None:
    """Why :func:`cpu_kernels` returned None (None if it has not failed)."""
    return _CPU.error


def rule_kernels_error() -> str | None:
    """Why :func:`rule_kernels` returned None (None if it has not failed)."""
    return _RULE.error
