"""Codec throughput: encode / extract against a tensor copy of the same bytes.

Rows (``gbps`` = bytes read + written over p50, ``2 * numel * element_size`` for all of them, so
the ratios of gbps are the inverse ratios of latency); all rows of one shape and dtype are timed
in interleaved rounds:

- ``copy`` / ``clone``: ``w.clone()`` (a new tensor, like every codec op returns), the baseline;
  ``copy`` / ``copy_``: ``dst.copy_(w)`` into a preallocated tensor (no allocation), for reference.
- ``encode`` / ``encode_tensor``: :func:`elsa_codec.encode_tensor` (the code rule) of a weight with
  given codes (T = 3, k = 2).
- ``extract`` / ``extract_level``: :func:`elsa_codec.extract_level` at level 2 (what the CPU
  serving layer runs at a level switch; on the CPU the C kernel of ``elsa_codec/format/elsa_rule.c``).
- CPU only: ``decode`` / ``decode_codes``: :func:`elsa_codec.decode_codes` (run on load to check
  the codes).
- GPU only: ``decode`` / ``triton``: :func:`elsa_codec.kernels.triton.decode_level` (the Triton decode
  kernel) at level 2, against ``copy`` / ``clone`` (device-to-device copy).

CPU shapes run from 64x64 to 8192x8192; ``python -m bench.codec_copy`` times the same
operations against ``copy_`` in its own interleaved rounds and writes the ratio table
(``bench/results/codec-copy/``).
"""
from __future__ import annotations

import gc

import torch

import elsa_codec as ec

from .codec_copy import SHAPES as CPU_SHAPES
from .weights import nested_counters, random_weight

QUICK_SHAPES = [(64, 64), (1536, 384)]
GPU_SHAPES = [(4096, 4096), (11008, 4096), (14336, 4096)]
LEVELS = [0.9, 0.75, 0.5]
LEVEL = 2  # the level extracted / decoded


def run(ctx) -> None:
    log = ctx.log
    shapes = QUICK_SHAPES if ctx.quick else (GPU_SHAPES if ctx.gpu else CPU_SHAPES)
    dtypes = ctx.codec_dtypes
    log(f"== codec: encode / extract{' / decode kernel' if ctx.gpu else ''} vs copy, shapes {shapes}, "
        f"dtypes {[str(d).replace('torch.', '') for d in dtypes]}")
    g = torch.Generator().manual_seed(1)
    for (n, k) in shapes:
        for dtype in dtypes:
            _run_one(ctx, n, k, dtype, g)
            gc.collect()
            if ctx.gpu:
                torch.cuda.empty_cache()


def _run_one(ctx, n, k, dtype, g) -> None:
    timer, res, dev = ctx.timer, ctx.results, ctx.device
    w = random_weight((n, k), dtype, dev, g)
    c, _ = nested_counters((n, k), LEVELS, "unstructured", generator=g, device=dev)
    T = len(LEVELS)
    kb = ec.default_code_bits(T)
    codes = c - 1
    enc = ec.encode_tensor(w, codes, kb)
    dens = float((ec.decode_codes(enc, kb) < LEVEL).float().mean())
    nbytes = 2 * w.numel() * w.element_size()
    shape = f"{n}x{k}"
    dst = torch.empty_like(w)
    rows = [
        ("copy", "clone", "dense", "dense", 1.0, lambda: w.clone()),
        ("copy", "copy_", "dense", "dense", 1.0, lambda: dst.copy_(w)),
        ("encode", "encode_tensor", "-", "unstructured", 1.0, lambda: ec.encode_tensor(w, codes, kb)),
        ("extract", "extract_level", LEVEL, "unstructured", dens, lambda: ec.extract_level(enc, LEVEL, kb, T)),
    ]
    if not ctx.gpu:
        rows.append(("decode", "decode_codes", "-", "unstructured", 1.0, lambda: ec.decode_codes(enc, kb)))
    if ctx.kernels is not None:
        kern = ctx.kernels
        rows.append(("decode", "triton", LEVEL, "unstructured", dens, lambda: kern.decode_level(enc, LEVEL, kb)))
    stats = timer.round_robin([r[-1] for r in rows])
    for (op, prov, level, struct, d, _), st in zip(rows, stats):
        res.add(op, prov, shape, dtype, level, struct, d, st, nbytes=nbytes)
    w = c = codes = enc = dst = rows = None  # drop the tensors before the next shape
