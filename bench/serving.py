"""Serving-layer ratios of :class:`elsa_codec.ELSALinear` against ``nn.Linear`` (the serving issue).

For each case (M, N, K): an ``nn.Linear`` with bias, and ``ELSALinear.from_encoded`` of its weight
encoded by :func:`elsa_codec.encode_tensor` (T = 3 nested random unstructured levels, 0.9 / 0.75 /
0.5 sparsity), under ``torch.inference_mode``:

- ``serving_forward`` at level ``dense``: ``ELSALinear`` vs ``nn.Linear``. Target: equal within
  noise.
- ``serving_forward`` at each sparse level, after the first call (decoded weight cached on the
  CPU; fused kernel on CUDA) vs ``nn.Linear``.
  ``nn.Linear`` and one ``ELSALinear`` per level (all sharing the one encoded weight) are timed in
  interleaved rounds (``round_robin``; on the CPU 5 rounds, >= 20 blocks each), so that a change
  of the machine's load hits all alike.
- ``serving_switch``: one level switch, ``set_level`` + the first forward (which decodes on the
  CPU), measured by alternating levels 1 and 2 (the row's level is 2); against ``serving_decode``,
  one decode of the weight (``elsa_codec.extract_level``, the CPU serving path's decode; the
  Triton ``decode_level`` on CUDA) and the steady forward.
"""
from __future__ import annotations

import torch
from torch import nn

import elsa_codec as ec

from .weights import nested_counters

CPU_CASES = [(128, 1536, 384), (16, 4096, 4096)]  # (M, N, K)
QUICK_CASES = [(16, 1536, 384)]
GPU_CASES = [(16, 4096, 4096), (128, 11008, 4096), (4096, 4096, 4096)]
LEVELS = [0.9, 0.75, 0.5]


def run(ctx) -> None:
    cases = QUICK_CASES if ctx.quick else (GPU_CASES if ctx.gpu else CPU_CASES)
    ctx.log(f"== serving: ELSALinear vs nn.Linear, cases (M, N, K) {cases}, dtype {str(ctx.dtypes[0]).replace('torch.', '')}")
    g = torch.Generator().manual_seed(2)
    for m, n, k in cases:
        _run_case(ctx, m, n, k, ctx.dtypes[0], g)


def _run_case(ctx, m, n, k, dtype, g) -> None:
    log, timer, res, dev = ctx.log, ctx.timer, ctx.results, ctx.device
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
    lin = nn.Linear(k, n, bias=True).to(dtype=dtype, device=dev).eval()
    c, _ = nested_counters((n, k), LEVELS, "unstructured", generator=g, device=dev)
    T = len(LEVELS)
    kb = ec.default_code_bits(T)
    enc = ec.encode_tensor(lin.weight.detach(), c - 1, kb, name="serving.weight")
    del c
    # One module per level, all sharing the one encoded weight (from_encoded does not copy).
    els = {lv: ec.ELSALinear.from_encoded(enc, lin.bias, num_levels=T, code_bits=kb, level=lv).eval()
           for lv in ["dense", *range(1, T + 1)]}
    sw_el = ec.ELSALinear.from_encoded(enc, lin.bias, num_levels=T, code_bits=kb).eval()
    x = torch.randn((m, k), generator=g).to(dtype=dtype, device=dev)
    shape = f"{m}x{n}x{k}"
    figs = dict(nbytes=(m * k + n * k + m * n) * x.element_size(), flops=2.0 * m * n * k)
    sps = els["dense"].sparsities
    with torch.inference_mode():
        for e in els.values():
            e(x)  # first call: decode (CPU) / tile table (CUDA)
        # 1. nn.Linear vs ELSALinear at every level, interleaved.
        names = ["nn.Linear", *els]
        # a ratio "within noise" needs many samples: 5 rounds, >= 20 blocks each (CPU)
        more = {} if ctx.quick else dict(rounds=5, min_blocks=20, min_run_time=1.0)
        stats = timer.round_robin([lambda: lin(x)] + [(lambda e=e: e(x)) for e in els.values()], **more)
        base = stats[0]
        res.add("serving_forward", "nn.Linear", shape, dtype, "dense", "dense", 1.0, base, **figs)
        for lv, st in zip(names[1:], stats[1:]):
            sparse = lv != "dense"
            res.add("serving_forward", "ELSALinear", shape, dtype, lv, "unstructured" if sparse else "dense",
                    1.0 - sps[lv - 1] if sparse else 1.0, st, **figs,
                    note=f"backend {els[lv].backend}, ratio vs nn.Linear {st.p50_us / base.p50_us:.3f}")

        # 2. level switch (set_level + first forward) vs one decode and the steady forward.
        def switch():
            sw_el.set_level(1)
            sw_el(x)
            sw_el.set_level(2)
            sw_el(x)

        w = enc
        if ctx.kernels is not None:
            kern = ctx.kernels
            decode, prov = (lambda: kern.decode_level(w, 2, kb)), "triton"
        else:
            decode, prov = (lambda: ec.extract_level(w, 2, kb, T)), "extract_level"
        sw, dec, steady = timer.round_robin([switch, decode, lambda: els[2](x)])
        sw = sw.scaled(0.5)
        dens2 = 1.0 - sps[1]
        res.add("serving_switch", "ELSALinear", shape, dtype, 2, "unstructured", dens2, sw,
                note=f"backend {sw_el.backend}")
        res.add("serving_decode", prov, shape, dtype, 2, "unstructured", dens2, dec,
                nbytes=2 * w.numel() * w.element_size())
        log(f"  level switch {sw.p50_us:.1f} us = {sw.p50_us / dec.p50_us:.2f} x one decode ({dec.p50_us:.1f} us); "
            f"(switch - steady forward) / decode = {(sw.p50_us - steady.p50_us) / dec.p50_us:.2f}; "
            f"steady forward at level 2 {steady.p50_us:.1f} us")
