"""Real input: the pretrained all-MiniLM-L6-v2 encoded with three magnitude levels per dtype."""
import os
import time

import pytest
import torch
from safetensors.torch import load_file as st_load

import elsa_codec as ec
import elsa_codec.cli.commands
from elsa_codec.examples.minilm.assets import minilm_dir

# Floor on the SQNR of the whole dense level (all encoded tensors) per dtype, k = 2 code bits.
SQNR_FLOOR_DB = {torch.float32: 130.0, torch.float16: 55.0, torch.bfloat16: 38.0}


def overall_sqnr(orig, enc):
    names = list(enc.meta.tensors)
    return ec.sqnr_db(torch.cat([orig[n].double().reshape(-1) for n in names]), torch.cat([enc[n].double().reshape(-1) for n in names]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_minilm_three_levels(tmp_path, dtype):
    src = os.path.join(minilm_dir(), "model.safetensors")
    out = str(tmp_path / "minilm.safetensors")
    t0 = time.perf_counter()
    meta = ec.encode_file(src, out, levels=[0.9, 0.75, 0.5], dtype=dtype, progress=False)
    dt = time.perf_counter() - t0
    orig = {k: v.to(dtype) if v.is_floating_point() else v for k, v in st_load(src).items()}
    enc = ec.load_file(out)
    assert len(meta.tensors) == 36 + 1  # 6 layers x 6 Linear weights + the pooler
    assert [round(s, 3) for s in meta.sparsities()] == [0.9, 0.75, 0.5]
    sq = overall_sqnr(orig, enc)
    print(f"\nMiniLM {dtype}: dense-level SQNR {sq:.1f} dB, encode {dt:.2f} s")
    assert sq >= SQNR_FLOOR_DB[dtype]
    for n, info in enc.meta.tensors.items():
        assert info.max_ulp <= 3.0, n  # k = 2: below 2**k ulp everywhere (2 ulp away from zero, see test_bits)
    assert ec.cli.commands.verify_file(out) == []
