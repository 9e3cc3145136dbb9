"""The sm_90a compile gate (bench/static.py): every kernel config compiles for Hopper without a GPU,
fits (registers, shared memory), does not spill, and uses wgmma where it must.

A representative subset compiles here (one batch of clean worker subprocesses, ~15 s on two cores);
``elsa bench static`` runs the full sweep, whose committed table is checked against the configs the
launcher can pick today. The gate works whatever this process's ``TRITON_INTERPRET`` (conftest
sets it without a GPU): compilation runs in workers without it.
"""
import csv
import os

import pytest

triton = pytest.importorskip("triton")

from bench import static  # noqa: E402
from elsa_codec.kernels.triton import linear as linear_mod  # noqa: E402

SUBSET = static.subset_specs()
# A config the gate rejected (removed from AUTOTUNE_CONFIGS): 16x64x256 with 4 warps spills. It
# proves the gate can fail.
KNOWN_BAD = static.linear_spec("bfloat16", "bm16-bn64-bk256-g1-w4-s3-removed",
                               {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256, "GROUP_M": 1}, 4, 3, use_table=False)


@pytest.fixture(scope="module")
def gate_rows():
    rows = static.run_gate(SUBSET + [KNOWN_BAD])
    return {r["spec_id"]: r for r in rows}


def test_subset_covers_every_dtype_kernel_and_layout():
    assert {s.dtype for s in SUBSET} == set(static.DTYPES)
    assert {s.kernel for s in SUBSET} >= {"linear", "decode_level"}
    specs = " ".join(s.spec for s in SUBSET)
    for part in ("table", "notable", "evenk", "oddk", "unalignedk", "wt-evenk", "ieee", "tf32"):
        assert part in specs
    assert any(s.wgmma_required for s in SUBSET)


@pytest.mark.parametrize("spec", SUBSET, ids=lambda s: s.id)
def test_config_passes_the_gate(gate_rows, spec):
    row = gate_rows[spec.id]
    assert row["status"] == "pass", f"{spec.id}: {row['reasons']}"
    assert int(row["registers"]) <= static.MAX_REGS_PER_THREAD
    assert int(row["stack_bytes"]) == 0 and int(row["sass_local_ops"]) == 0 and int(row["ptx_local_ops"]) == 0
    assert int(row["smem_bytes"]) <= static.SMEM_PER_BLOCK
    if spec.wgmma_required:
        assert row["wgmma"] == "yes"
    assert 1 <= int(row["blocks_per_sm"]) <= static.MAX_BLOCKS_PER_SM


def test_gate_rejects_a_spilling_config(gate_rows):
    row = gate_rows[KNOWN_BAD.id]
    assert row["status"] == "FAIL"
    assert "spills" in row["reasons"] and int(row["stack_bytes"]) > 0


def test_removed_config_is_not_a_candidate():
    keys = {linear_mod._config_key(c) for c in linear_mod.AUTOTUNE_CONFIGS}
    assert (16, 64, 256, 1, 4, 3) not in keys


@pytest.mark.parametrize("dtype", static.DTYPES)
def test_launcher_picks_respect_the_gate_rules(dtype):
    """What the pruner lets through: table configs within 64x64 tiles, float32 only its own
    small-K family, unaligned K only small tiles."""
    fp32_keys = {linear_mod._config_key(c) for c in linear_mod.FP32_CONFIGS}
    for ieee in ((True, False) if dtype == "float32" else (False,)):
        for layout, _, aligned, _, wt in static.LAYOUTS:
            picks = static.linear_launch_configs(dtype, ieee=ieee, layout=layout)
            assert picks
            for label, kw, warps, stages, use_table in picks:
                key = (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], kw["GROUP_M"], warps, stages)
                assert (key in fp32_keys) == (dtype == "float32"), label
                if use_table:
                    assert kw["BLOCK_N"] <= 64 and kw["BLOCK_K"] <= 64, label
                if wt and key in fp32_keys:
                    assert kw["BLOCK_M"] == 16, label
                if (wt or not aligned) and key not in fp32_keys:  # a unit stride_wn counts as unaligned
                    elems = kw["BLOCK_M"] * kw["BLOCK_N"] + kw["BLOCK_K"] * (kw["BLOCK_M"] + kw["BLOCK_N"])
                    assert elems <= linear_mod._UNALIGNED_TILE_ELEMENTS * 32 * warps, label


@pytest.mark.parametrize(
    "regs, smem, warps, want",
    [
        (32, 0, 8, (8, 64, "warps")),  # full occupancy
        (134, 99328, 8, (1, 8, "registers")),  # 136 regs x 32 x 8 warps: one block of 64K registers
        (54, 11264, 4, (9, 36, "registers")),  # 56 x 32 = 1792 per warp: 36 warps
        (64, 197632, 4, (1, 4, "shared memory")),
        (255, 0, 4, (2, 8, "registers")),
    ],
    ids=["full", "regs-134-w8", "regs-54-w4", "smem-193k", "regs-255"],
)
def test_occupancy(regs, smem, warps, want):
    assert static.occupancy(regs, smem, warps) == want


@pytest.mark.parametrize("table", ["static.csv", "triton-3.6/static.csv"], ids=["triton-3.9", "triton-3.6"])
def test_committed_table_matches_the_launcher(table):
    """bench/results/static-sm90/static.csv (pinned triton) and triton-3.6/static.csv (what GPU
    machines have) are full sweeps of today's configs, all passing (rerun `elsa bench static`
    after changing a kernel or its configs; TRITON_VERSIONS.md has the 3.6 command)."""
    path = os.path.join(static.RESULTS_DIR, table)
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    have = {f"{r['kernel']}/{r['config']}/{r['dtype']}/{r['spec']}": r for r in rows}
    want = {s.id for s in static.all_specs()}
    assert set(have) == want, f"missing {sorted(want - set(have))[:5]}, stale {sorted(set(have) - want)[:5]}"
    failing = [i for i, r in have.items() if r["status"] != "pass"]
    assert not failing, failing[:5]


def test_gate_refuses_interpreted_kernels():
    from elsa_codec.kernels.triton import INTERPRET

    if not INTERPRET:
        pytest.skip("kernels compiled here (a GPU machine): nothing to refuse")
    with pytest.raises(RuntimeError, match="without TRITON_INTERPRET"):
        static.compile_spec(SUBSET[0])
