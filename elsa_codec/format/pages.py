"""Memory-mapped weights: hand their resident pages back to the OS (``ec.load(path, model, level=t, mmap=True)``).

A tensor read with ``elsa_codec.load_file(path, mmap=True)`` is a view of the file, mapped
privately: its pages become resident as they are read (the CRC check, packing a level) and count
in the process's RSS (``RssFile``). :func:`release_pages` asks the kernel to reclaim them; the bytes
stay valid and are read again from the file on the next access (so a file changed in place since
shows through, and a truncated one raises SIGBUS). Tensors read without ``mmap`` (the default) are
in memory the process owns: :func:`release_pages` leaves them alone.
"""
from __future__ import annotations

import ctypes
import mmap
import sys

import torch

__all__ = ["release_pages"]

_MADV_PAGEOUT = 21  # Linux 5.4+: reclaim now; never discards data (a dirty private page is swapped or kept)


def _file_backed(start: int, end: int) -> bool:
    """Whether [start, end) lies inside one file-backed mapping of this process (/proc/self/maps)."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                lo, hi = (int(v, 16) for v in parts[0].split("-"))
                if lo <= start and end <= hi:
                    return len(parts) == 6 and parts[5].strip().startswith("/")
    except OSError:
        return False
    return False


def release_pages(t: torch.Tensor) -> bool:
    """Hand the resident pages of ``t``'s bytes back to the OS when ``t`` is memory-mapped from a
    file (``madvise(MADV_PAGEOUT)``, Linux 5.4+): the bytes stay valid and are read again from the
    file on the next access; nothing is lost (modified private pages are never discarded). A
    no-op (False) for tensors in ordinary memory, on other systems, or on older kernels.

    Returns:
        True when the pages were handed back.
    """
    if not sys.platform.startswith("linux") or t.device.type != "cpu" or t.numel() == 0:
        return False
    page = mmap.PAGESIZE
    begin = t.data_ptr()
    end = begin + t.numel() * t.element_size()
    lo, hi = -(-begin // page) * page, end // page * page
    if hi <= lo or not _file_backed(begin, end):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise(lo, hi - lo, _MADV_PAGEOUT) == 0
