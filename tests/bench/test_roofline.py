"""Roofline floor of the GPU grid (bench/roofline.py): bytes, FLOPs and floors, the analytic tile
counts against the benchmark's own synthetic weights, and the committed table."""
import csv
import math
import os

import pytest
import torch

from bench import roofline
from bench.weights import LEVEL_SETS, nested_counters


def tile_min_codes(counters: torch.Tensor) -> torch.Tensor:
    """Per-64x64-tile minimum code (the kernels' tile table) of counters `[N, K]` (N, K multiples of 64)."""
    n, k = counters.shape
    codes = (counters.to(torch.int32) - 1).view(n // 64, 64, k // 64, 64)
    return codes.amin(dim=(1, 3))


@pytest.mark.parametrize("set_name", [s[0] for s in LEVEL_SETS])
def test_analytic_tiles_match_synthetic_weights(set_name):
    """The tiles loaded per level, computed analytically, equal those of bench/weights.py's
    synthetic weights (where the kernel reads the tile table)."""
    n, k = 512, 1024
    _, levels, structure = next(s for s in LEVEL_SETS if s[0] == set_name)
    c, _ = nested_counters((n, k), levels, structure, generator=torch.Generator().manual_seed(1))
    tmin = tile_min_codes(c)
    analytic = [lv for lv in roofline.grid_levels(n, k) if lv.level_set == set_name]
    assert len(analytic) == len(levels)
    for lv in analytic:
        t = int(lv.level)
        nonempty = tmin < t
        assert float(nonempty.float().mean()) == pytest.approx(lv.tile_fraction, abs=1e-12)
        assert lv.table == bool((~nonempty).any())
        assert float(((c.to(torch.int32) - 1) < t).float().mean()) == pytest.approx(lv.density, abs=1e-9)
        if not lv.table:
            assert lv.x_fraction == 1.0


def test_block_x_columns_expectation():
    """x columns loaded at a block level: 1 - P(a column of tiles is empty), hypergeometric."""
    (lv,) = roofline.block_levels(4096, 4096, [0.1], "block:64x64", "block:64x64")
    tiles, kept = 64 * 64, round(0.1 * 64 * 64)
    p = math.comb(tiles - 64, kept) / math.comb(tiles, kept)
    assert lv.x_fraction == pytest.approx(1 - p, rel=1e-9)
    assert 0.99 < lv.x_fraction < 1.0


def test_dense_floor_numbers():
    """4096^3 bf16: 96 MiB moved, 2*4096^3 FLOPs; compute-bound on both GPUs."""
    nbytes, flops = roofline.dense_cost(4096, 4096, 4096, "bfloat16")
    assert nbytes == 3 * 4096 * 4096 * 2 and flops == 2 * 4096**3
    us, bound = roofline.floor_us(nbytes, flops, "H200")
    assert bound == "compute" and us == pytest.approx(2 * 4096**3 / 790e12 * 1e6)
    us, bound = roofline.floor_us(*roofline.dense_cost(1, 4096, 4096, "bfloat16"), "H100")
    assert bound == "memory" and us == pytest.approx((4096 + 4096 * 4096 + 4096) * 2 / 3.0e12 * 1e6)


def test_fused_costs_per_structure():
    m, n, k = 16, 4096, 11008
    rows = {(r["level_set"], r["level"]): r for r in roofline.grid_rows(("bfloat16",), (m,), ((n, k),))}
    dense = rows[("dense", "dense")]
    for key in [("unstructured", "1"), ("2:4", "2")]:  # no table: the whole encoded weight, dense FLOPs
        r = rows[key]
        assert r["table"] == "no" and r["weight_bytes"] == n * k * 2 and r["bytes"] == dense["bytes"]
        assert float(r["flops"]) == 2.0 * m * n * k
        assert r["h200_floor_vs_dense"] == "1.0000"
    r = rows[("block:64x64", "1")]  # 10% of the tiles, their FLOPs, plus the table
    tiles = (n // 64) * (k // 64)
    assert r["table"] == "yes" and r["table_bytes"] == tiles
    assert r["weight_bytes"] == round(0.1 * tiles) * 64 * 64 * 2
    assert float(r["flops"]) == pytest.approx(2.0 * m * n * k * round(0.1 * tiles) / tiles)
    assert 0.1 < float(r["h200_floor_vs_dense"]) < 0.12  # memory-bound at M = 16: ~ the weight share


def test_grid_size():
    rows = roofline.grid_rows()
    # 2 dtypes x 5 shapes x 4 M x (dense + 3 + 2 + 3 levels)
    assert len(rows) == 2 * 5 * 4 * 9
    assert {r["m"] for r in rows} == {1, 16, 128, 4096}


def test_committed_roofline_is_current():
    """bench/results/roofline/roofline.csv is what `elsa bench roofline` computes today."""
    path = os.path.join(roofline.RESULTS_DIR, "roofline.csv")
    with open(path, newline="", encoding="utf-8") as f:
        committed = list(csv.DictReader(f))
    fresh = [{k: str(v) for k, v in r.items()} for r in roofline.grid_rows()]
    assert committed == fresh


def test_cli_writes_csv_and_markdown(tmp_path):
    from bench.__main__ import main

    assert main(["roofline", "--out", str(tmp_path), "--m", "1", "--dtypes", "bfloat16"]) == 0
    text = (tmp_path / "roofline.md").read_text()
    assert "## H200, bfloat16" in text and "| 4096x4096 | 1 | block:64x64 | 0.100 |" in text
    with open(tmp_path / "roofline.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 5 * 9
    with open(tmp_path / "packed.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 5 * 9  # M = 1 only: 8 sparse levels + the 70% level
    assert "## Packed, H200, bfloat16" in text and "| 4096x4096 | unstructured-0.7 | 1 | unstructured | 0.300 | fused |" in text


# ------------------------------------------------------------------ packed levels (issue 33)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("set_name", ["unstructured", "2:4", "unstructured-0.7"])
def test_packed_bytes_match_pack_level(dtype, set_name):
    """The roofline's packed weight bytes (``packed_nbytes`` at ``default_tile_rows``) equal the
    resident bytes of ``pack_level`` on a synthetic weight of the benchmark's own method, on a
    shape that is not a whole number of tiles."""
    import elsa_codec as ec
    from elsa_codec.kernels.triton import default_tile_rows, pack_level

    n, k = 200, 320
    _, levels, structure = next(s for s in roofline.packed_level_sets() if s[0] == set_name)
    c, structs = nested_counters((n, k), levels, structure, generator=torch.Generator().manual_seed(3))
    kb = ec.default_code_bits(len(structs))
    w = torch.randn((n, k), generator=torch.Generator().manual_seed(4)).to(dtype)
    enc = ec.encode_tensor(w, c - 1, kb, name="roofline.packed")
    dname = str(dtype).replace("torch.", "")
    for lv in roofline.set_levels(n, k, set_name, levels, structure):
        p = pack_level(enc, int(lv.level), kb, tile_n=default_tile_rows(dtype))
        assert p.density == pytest.approx(lv.density, abs=1e-12)
        cost = roofline.packed_cost(16, n, k, dname, lv)
        assert cost["tile_n"] == p.tile_n and cost["packed_weight_bytes"] == p.nbytes
        assert cost["bytes"] == p.nbytes + 16 * (n + k) * p.values.element_size()


def test_packed_floors_vs_dense():
    """bf16 4096x4096: the packed floor is ~0.16x / 0.36x / 0.56x dense at 90 / 70 / 50% sparsity
    (M = 1 and 16, both GPUs); the router keeps every level on the fused kernel (the expansion's
    instructions, not its bytes, bound the packed kernel with the H200 model: route_times)."""
    rows = roofline.packed_rows(("bfloat16",), (1, 16), ((4096, 4096),))
    by = {(r["m"], r["level_set"], r["level"]): r for r in rows}
    for m in (1, 16):
        for key, want in ((("unstructured", "1"), 0.16), (("unstructured-0.7", "1"), 0.36), (("unstructured", "3"), 0.56)):
            r = by[(m, *key)]
            for g in ("h100", "h200"):
                assert float(r[f"{g}_packed_vs_dense"]) == pytest.approx(want, abs=0.01), (m, key, g)
                assert r[f"{g}_packed_bound"] == "memory"
            assert r["route"] == "fused"
        assert by[(m, "2:4", "2")]["route"] == "fused"
        assert all(by[(m, "block:64x64", t)]["route"] == "fused" for t in ("1", "2", "3"))
    r = by[(1, "unstructured", "1")]
    assert r["packed_weight_bytes"] == round(0.1 * 4096 * 4096) * 2 + 4096 * 64 * 8 + 64 * 64 * 4  # values, bitmap, bases
    assert float(r["flops"]) == 2.0 * 4096 * 4096


def test_packed_grid_size():
    rows = roofline.packed_rows()
    # 2 dtypes x 5 shapes x 4 M (1, 4, 16, 32) x (8 sparse levels + the 70% level); M > 32 left out
    assert len(rows) == 2 * 5 * 4 * 9
    assert {r["m"] for r in rows} == set(roofline.PACKED_M)
    assert roofline.packed_rows(("bfloat16",), (16, 128), ((4096, 4096),)) == roofline.packed_rows(
        ("bfloat16",), (16,), ((4096, 4096),))


def test_committed_packed_is_current():
    """bench/results/roofline/packed.csv is what `python -m bench roofline` computes today."""
    with open(os.path.join(roofline.RESULTS_DIR, "packed.csv"), newline="", encoding="utf-8") as f:
        committed = list(csv.DictReader(f))
    assert committed == [{k: str(v) for k, v in r.items()} for r in roofline.packed_rows()]
