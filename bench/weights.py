"""Synthetic encoded weights for the layer and codec benchmarks.

A weight is ``randn`` (seeded). Its counters are nested random masks of EXACT density per level
(for i.i.d. weights, magnitude masks are such random masks, so the timing is the same, at a
fraction of ``elsa_codec.magnitude_counters``' set-up cost on Llama-sized tensors; the model
benchmark uses the real magnitude counters on real weights):

- ``unstructured``: one random ranking of all weights; level ``t`` keeps the first
  ``round(density_t * numel)``.
- ``N:M`` (e.g. levels ``1:4``, ``2:4``): a random ranking inside every group of ``M`` consecutive
  weights along the input dimension; level ``t`` keeps the first ``N_t`` of each group.
- ``block:RxC``: one random ranking of the ``R x C`` tiles; level ``t`` keeps whole tiles.

Encoded with :func:`elsa_codec.encode_tensor` (the code rule), ``k = default_code_bits(T)``.
"""
from __future__ import annotations

import dataclasses

import torch

import elsa_codec as ec
from elsa_codec.format.structure import parse_level

#: The level sets of the layer benchmark: (name, levels sparsest first, structure).
LEVEL_SETS = [
    ("unstructured", [0.9, 0.75, 0.5], "unstructured"),
    ("2:4", ["1:4", "2:4"], "unstructured"),
    ("block:64x64", [0.9, 0.75, 0.5], "block:64x64"),
]


@dataclasses.dataclass
class EncodedWeight:
    """One encoded weight `[N, K]` and its levels."""

    encoded: torch.Tensor
    num_levels: int
    code_bits: int
    structures: list  # per level 1..T, e.g. ["1:4", "2:4"]
    densities: list  # measured from the codes, per level 1..T


def nested_counters(shape: tuple[int, int], levels, structure: str, *, generator: torch.Generator,
                    device="cpu") -> tuple[torch.Tensor, list]:
    """Counters (uint8 `[N, K]`, values ``1..T+1``) of nested random masks of exact density; and the
    structures. Drawn on ``generator``'s device (a CUDA generator keeps the GPU grid's large shapes
    off the CPU), returned on ``device``."""
    n, k = shape
    gdev = generator.device
    specs = [parse_level(lv, structure) for lv in levels]
    dens = [1.0 - s for s, _ in specs]
    st = specs[0][1]
    if st.kind == "nm":
        m = st.m
        if k % m:
            raise ValueError(f"in_features={k} is not a multiple of {m} for N:M levels")
        # rank of every weight inside its group of m (a random permutation per group)
        r = torch.rand((n, k // m, m), generator=generator, device=gdev).argsort(-1).argsort(-1).reshape(n, k)
        keep = [s.n for _, s in specs]
    elif st.kind == "block":
        tr, tc = -(-n // st.r), -(-k // st.c)
        rt = torch.randperm(tr * tc, generator=generator, device=gdev).reshape(tr, tc)
        r = rt.repeat_interleave(st.r, 0)[:n].repeat_interleave(st.c, 1)[:, :k]
        keep = [round(d * tr * tc) for d in dens]
    else:
        r = torch.randperm(n * k, generator=generator, device=gdev).reshape(n, k)
        keep = [round(d * n * k) for d in dens]
    c = torch.ones((n, k), dtype=torch.uint8, device=gdev)
    for kv in keep:
        c += (r >= kv).to(torch.uint8)
    del r
    return c.to(device), [str(s) for _, s in specs]


def make_encoded(w: torch.Tensor, levels, structure: str, *, generator: torch.Generator) -> EncodedWeight:
    """Encode the dense weight ``w`` `[N, K]` with nested random levels (see the module doc)."""
    c, structs = nested_counters(tuple(w.shape), levels, structure, generator=generator, device=w.device)
    T = len(structs)
    k = ec.default_code_bits(T)
    enc = ec.encode_tensor(w, c - 1, k, name="bench.weight")
    codes = ec.decode_codes(enc, k)
    dens = [float((codes < t).float().mean()) for t in range(1, T + 1)]
    del c, codes
    return EncodedWeight(enc, T, k, structs, dens)


def random_weight(shape, dtype, device, generator: torch.Generator) -> torch.Tensor:
    """``randn(shape) / sqrt(in_features)`` in ``dtype`` on ``device`` (made on the CPU, seeded)."""
    w = torch.randn(shape, generator=generator) / (shape[-1] ** 0.5)
    return w.to(dtype=dtype, device=device)
