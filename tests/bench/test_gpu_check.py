"""bench/gpu_check.sh (the one command of a GPU stretch) and its grid runner, without a GPU: the dry
run says what each step would run and writes the grid CSV with floors and no timing; the pieces
the GPU run relies on (source-tree shim, floor lookup, synthetic counters, the test-device guard,
the hypothesis stand-in) are checked here."""
import csv
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch

from bench import gpu_grid, roofline
from bench.common import REPO_DIR
from bench.weights import nested_counters

SCRIPT = os.path.join(REPO_DIR, "bench", "gpu_check.sh")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    env = dict(os.environ, PYTHON=sys.executable)
    res = subprocess.run(["bash", SCRIPT, "--dry-run", "--archive", f"{out}.tar.gz", str(out)], env=env,
                         capture_output=True, text=True, timeout=300)
    return out, res


def test_dry_run_succeeds_and_reports_each_step(dry_run):
    out, res = dry_run
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["env.txt", "grid.csv", "grid.log", "summary.txt", "tests.log"]
    summary = (out / "summary.txt").read_text()
    assert "tests: would run:" in summary and "test_kernels_linear.py" in summary
    assert "static: would run:" in summary and "--subset" in summary
    assert "grid: rc=0" in summary
    assert "codec: would run:" in summary and "--only codec --device cuda" in summary
    assert "targets: would run:" in summary and "--grid" in summary
    env = (out / "env.txt").read_text()
    assert "torch " in env and "triton " in env and "dry run: 1" in env
    # the package came from the checkout itself (no install on a GPU machine)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert f"elsa_codec from {os.path.join(repo, 'elsa_codec', '__init__.py')}" in env


def _archived(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_archive_holds_the_whole_out_dir(dry_run):
    """--archive: the device tool returns at most 8 files, so OUT_DIR travels back as one .tar.gz
    whose files are byte-for-byte those of OUT_DIR, under OUT_DIR's own name."""
    out, res = dry_run
    assert res.returncode == 0, res.stderr[-3000:]
    files = _archived(f"{out}.tar.gz")
    assert files == {f"{out.name}/{n}": (out / n).read_bytes() for n in os.listdir(out)}
    assert not os.path.exists(f"{out}.tar.gz.tmp")


def test_archive_survives_a_kill_mid_run(tmp_path):
    """A run killed (SIGKILL to its process group, as at the device tool's limit) while the grid runs
    still leaves an archive with the steps finished before it (here the environment)."""
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/bash\ncase " $* " in *" bench.gpu_grid "*) exec sleep 60 ;; esac\nexec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    out, archive = tmp_path / "gpu-check", tmp_path / "back" / "gpu-check.tar.gz"
    proc = subprocess.Popen(["bash", SCRIPT, "--dry-run", "--archive", str(archive), str(out)],
                            env=dict(os.environ, PYTHON=str(fake)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        summary = out / "summary.txt"  # the tests step is the last one before the grid
        while (proc.poll() is None and time.monotonic() < deadline
               and not (summary.exists() and "tests: would run" in summary.read_text())):
            time.sleep(0.1)
        time.sleep(1.0)  # the grid's (fake, sleeping) python has started
        assert proc.poll() is None, "the run ended before the grid step"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    files = _archived(archive)
    assert b"env: rc=0" in files["gpu-check/summary.txt"] and b"grid" not in files["gpu-check/summary.txt"]
    assert b"torch " in files["gpu-check/env.txt"]


@pytest.mark.parametrize("args, message", [
    (["--archive", "x.zip", "OUT"], "--archive needs a FILE.tar.gz"),
    (["--archive", "OUT/a.tar.gz", "OUT"], "is inside OUT_DIR"),
    (["--bogus"], "usage:"),
    (["--dry-run", "OUT", "extra"], "usage:"),
])
def test_bad_arguments_exit_2_before_any_step(tmp_path, args, message):
    args = [a.replace("OUT", str(tmp_path / "o")) for a in args]
    res = subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert not (tmp_path / "o" / "summary.txt").exists()


def test_dry_run_grid_has_floors_and_no_timing(dry_run):
    out, _ = dry_run
    with open(out / "grid.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    (floor_row,) = [r for r in rows if r["provider"] == "launch-floor"]  # one untimed launch in a dry run
    assert floor_row["max_rel_err"] == "0" and floor_row["timing"] == "none (dry run)" and floor_row["p50_us"] == ""
    rows = [r for r in rows if r is not floor_row and r["stage"] == "grid"]
    assert len(rows) == len(roofline.GRID_DTYPES) * len(gpu_grid.DRY_M) * 9
    floors = roofline.lookup(roofline.grid_rows(roofline.GRID_DTYPES, gpu_grid.DRY_M, gpu_grid.DRY_SHAPES))
    for r in rows:
        assert r["timing"] == "none (dry run)" and r["p50_us"] == "" and r["measured_vs_floor"] == ""
        assert r["floor_gpu"] == "H200"
        want = floors[(r["dtype"], int(r["m"]), int(r["n"]), int(r["k"]), r["level_set"], r["level"])]
        assert r["floor_us"] == want["h200_floor_us"] and float(r["floor_us"]) > 0
        assert float(r["max_rel_err"]) < 2e-2, r
        assert r["provider"] == ("dense" if r["level"] == "dense" else "elsa-fused")
        assert r["table"] == ("yes" if r["level_set"] == "block:64x64" else "no")


def test_dry_run_packed_stage_rows(dry_run):
    """The packed stage ran in the dry run (issue 33): per dtype and M, dense, then for every
    sparse level of the packed level sets (the grid's and the 70% level) elsa-fused and
    elsa-packed; every packed row checked against F.linear, with its packed floor and no timing."""
    out, _ = dry_run
    with open(out / "grid.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["stage"] == "packed"]
    n_levels = len(roofline.packed_levels(*gpu_grid.DRY_SHAPES[0]))
    assert n_levels == 9
    assert len(rows) == len(roofline.GRID_DTYPES) * len(gpu_grid.DRY_PACKED_M) * (1 + 2 * n_levels)
    packed = [r for r in rows if r["provider"] == "elsa-packed"]
    assert len(packed) == len(roofline.GRID_DTYPES) * len(gpu_grid.DRY_PACKED_M) * n_levels
    assert {r["dtype"] for r in packed} == set(roofline.GRID_DTYPES)
    assert {r["level_set"] for r in packed} == {s[0] for s in roofline.packed_level_sets()}
    floors = roofline.lookup(roofline.packed_rows(roofline.GRID_DTYPES, gpu_grid.DRY_PACKED_M, gpu_grid.DRY_SHAPES))
    for r in packed:
        assert r["timing"] == "none (dry run)" and r["p50_us"] == "" and r["measured_vs_floor"] == ""
        assert r["latency_vs_dense"] == "" and r["latency_vs_fused"] == ""
        want = floors[(r["dtype"], int(r["m"]), int(r["n"]), int(r["k"]), r["level_set"], r["level"])]
        assert r["floor_gpu"] == "H200" and r["floor_us"] == want["h200_packed_floor_us"] and float(r["floor_us"]) > 0
        assert r["floor_vs_dense"] == want["h200_packed_vs_dense"]
        assert float(r["max_rel_err"]) < 2e-2, r
        assert r["autotune_config"] == f"tile_n=64; route={want['route']}"
    fused = {(r["dtype"], r["m"], r["level_set"], r["level"]): r for r in rows if r["provider"] == "elsa-fused"}
    for r in packed:  # each packed row beside the fused row of the same level
        f = fused[(r["dtype"], r["m"], r["level_set"], r["level"])]
        assert float(f["max_rel_err"]) < 2e-2 and f["floor_us"] and f["timing"] == "none (dry run)"
        if r["structure"] == "unstructured":  # the packed level reads less than the whole encoded weight
            assert float(r["floor_us"]) < float(f["floor_us"])
    log = (out / "grid.log").read_text()
    assert "-- packed stage bfloat16 128x256" in log and "elsa-packed" in log


def test_grid_refuses_to_time_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert gpu_grid.main(["--out", str(tmp_path)]) == 2


@pytest.mark.parametrize("name, want", [("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H200", "H200"),
                                        ("NVIDIA H100 PCIe", "H100"), ("NVIDIA A100-SXM4-80GB", None)])
def test_floor_gpu(name, want):
    assert gpu_grid.floor_gpu(name) == want


@pytest.mark.parametrize("set_name", [s[0] for s in roofline.level_sets()])
def test_grid_counters_exact_nested_levels(set_name):
    """The grid's counters (bench/weights.py's nested_counters) match the roofline's levels:
    nested, exact density per level."""
    n, k = 128, 256
    _, levels, structure = next(s for s in roofline.level_sets() if s[0] == set_name)
    c, structs = nested_counters((n, k), levels, structure, generator=torch.Generator().manual_seed(0))
    lv = {x.level: x for x in roofline.grid_levels(n, k) if x.level_set == set_name}
    codes = c.to(torch.int64) - 1
    assert int(codes.min()) >= 0 and int(codes.max()) <= len(levels)
    for t, st in enumerate(structs, start=1):
        kept = codes < t
        if ":" in st and not st.startswith("block"):
            per_group = kept.view(n, k // 4, 4).sum(-1)
            assert (per_group == int(st.split(":")[0])).all()
        else:
            assert float(kept.float().mean()) == pytest.approx(lv[str(t)].density, abs=1e-9)


def test_conftest_insists_on_cuda_when_asked():
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    env = dict(os.environ, ELSA_TEST_DEVICE="cuda")
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", os.path.join(REPO_DIR, "tests",
                          "test_roofline.py")], env=env, capture_output=True, text=True, timeout=120, cwd=REPO_DIR)
    assert res.returncode != 0
    assert "ELSA_TEST_DEVICE=cuda but torch.cuda.is_available() is False" in res.stdout + res.stderr


def test_hypothesis_stand_in_skips_with_reason():
    import conftest

    hyp, st = conftest._hypothesis_stub()

    @hyp.settings(max_examples=5, deadline=None)
    @hyp.given(st.integers(1, 5).map(lambda v: v * 2), st.lists(st.floats(allow_nan=False)))
    def test_prop(a, b):
        raise AssertionError("must not run")

    (mark,) = [m for m in test_prop.pytestmark if m.name == "skip"]
    assert mark.kwargs["reason"] == conftest.HYPOTHESIS_MISSING


class FakeTimer:
    """Stands for common.GpuTimer on the CPU: calls the function once, reports fixed figures."""

    graphs, graph_below_us = "auto", 50.0

    def __init__(self):
        self.calls = []

    def __call__(self, fn, graphs=False):
        from bench.common import Stats

        fn()
        self.calls.append(graphs)
        return Stats(10.0, 20.0, 30.0, 5, "do_bench_cudagraph" if graphs else "do_bench")


def test_timed_path_rows_carry_measured_over_floor(tmp_path):
    """The GPU path of the grid runner, with a fake timer on the CPU: every row has its p50, the
    H200 floor and measured / floor = p50 / floor; the dense p50 (20 us < 50 us) turns graphs on."""
    grid = gpu_grid.Grid(str(tmp_path), dry_run=True, budget_s=60, rep_ms=1)
    grid.dry, grid.gpu, grid.timer = False, "H200", FakeTimer()
    try:
        grid.run(["bfloat16"], gpu_grid.DRY_SHAPES, (16,))
    finally:
        grid.close()
    with open(tmp_path / "grid.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    floor_rows = [r for r in rows if r["provider"] == "launch-floor"]
    assert [r["timing"] for r in floor_rows] == ["do_bench_cudagraph", "do_bench"]
    assert all(r["p50_us"] == "20.000" and r["max_rel_err"] == "0" and r["shape"] == "4 programs" for r in floor_rows)
    rows = rows[2:]
    assert len(rows) == 9
    for r in rows:
        assert r["p50_us"] == "20.000" and r["floor_gpu"] == "H200"
        assert float(r["measured_vs_floor"]) == pytest.approx(20.0 / float(r["floor_us"]), rel=1e-3)
        assert r["dense_p50_us"] == "20.000" and r["speedup_vs_dense"] == "1.000"
        assert r["timing"] == "do_bench_cudagraph"
    assert grid.timer.calls[:2] == [True, False]  # the launch floor, with graphs and without
    assert grid.timer.calls[2] is False and all(grid.timer.calls[3:])  # plain dense first, then graphs


def test_timed_packed_stage_rows(tmp_path):
    """The packed stage's GPU path with a fake timer: packed rows carry p50, the packed floor,
    latency vs dense and vs the fused row of the same level; a 1 ms packed budget still runs the
    first group and skips the rest."""
    grid = gpu_grid.Grid(str(tmp_path), dry_run=True, budget_s=0, rep_ms=1)
    grid.dry, grid.gpu, grid.timer = False, "H200", FakeTimer()
    try:
        grid.run(["bfloat16", "float16"], gpu_grid.DRY_SHAPES, (1,), packed_shapes=gpu_grid.DRY_SHAPES,
                 packed_ms=(4,), packed_budget_s=1e-3)
    finally:
        grid.close()
    with open(tmp_path / "grid.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    log = (tmp_path / "grid.log").read_text()
    assert "packed stage: budget of 0 s spent" in log and "skipping float16 128x256" in log
    assert "skipping bfloat16 128x256 and the rest" in log  # the grid's own budget (0 s) is spent too
    packed = [r for r in rows if r["provider"] == "elsa-packed"]
    assert len(packed) == 9 and {r["stage"] for r in rows[2:]} == {"packed"} and {r["m"] for r in packed} == {"4"}
    floors = roofline.lookup(roofline.packed_rows(("bfloat16",), (4,), gpu_grid.DRY_SHAPES))
    for r in packed:
        want = floors[(r["dtype"], 4, int(r["n"]), int(r["k"]), r["level_set"], r["level"])]
        assert r["floor_us"] == want["h200_packed_floor_us"] and r["p50_us"] == "20.000"
        assert float(r["measured_vs_floor"]) == pytest.approx(20.0 / float(r["floor_us"]), rel=1e-3)
        assert r["latency_vs_dense"] == "1.000" and r["fused_p50_us"] == "20.000" and r["latency_vs_fused"] == "1.000"
        assert float(r["max_rel_err"]) < 2e-2


def _grid_row(m, level, structure, density, provider, p50, dtype="bfloat16", n=4096, k=4096):
    r = {c: "" for c in gpu_grid.COLUMNS}
    r.update(dtype=dtype, m=m, n=n, k=k, shape=f"{m}x{n}x{k}", level_set=structure, level=level, structure=structure,
             density=f"{density:.6f}", provider=provider, p20_us=f"{p50 * 0.9:.3f}", p50_us=f"{p50:.3f}",
             p80_us=f"{p50 * 1.1:.3f}", timing="do_bench_cudagraph", device="NVIDIA H200", torch="t", triton="tr",
             timestamp="2026-12-01T00:00:00Z")
    return r


def _write_csv(path, columns, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)


def test_targets_judge_grid_and_codec(tmp_path, capsys):
    """Step 5 of gpu_check.sh: ``elsa bench targets CODEC_CSV --grid GRID_CSV`` judges the fused
    GEMM on the grid's rows and the decode kernel on the codec's; untimed grid rows are left out."""
    from bench import common, targets

    grid_rows = [
        _grid_row(1, "dense", "dense", 1.0, "dense", 10.0),
        _grid_row(1, "1", "block:64x64", 0.1, "elsa-fused", 2.0),  # 2.0 x density x dense: not met
        _grid_row(1, "3", "unstructured", 0.5, "elsa-fused", 10.5),  # 0.95x dense: met
        _grid_row(1, "2", "2:4", 0.5, "elsa-fused", 10.0),
        _grid_row(1, "2", "2:4", 0.5, "semi-structured", 8.0),
        dict(_grid_row(1, "-", "-", 0.0, "launch-floor", 2.5), shape="132 programs", density=""),
        dict(_grid_row(16, "3", "unstructured", 0.5, "elsa-fused", 0.0), p50_us="", timing="failed"),
    ]
    _write_csv(tmp_path / "grid.csv", gpu_grid.COLUMNS, grid_rows)
    codec = []
    for op, prov, gbps in (("copy", "clone", 4000.0), ("decode", "triton", 3000.0)):
        r = {c: "" for c in common.COLUMNS}
        r.update(op=op, provider=prov, shape="4096x4096", dtype="bfloat16", level="2", structure="unstructured",
                 density="0.25", p20_us="1", p50_us="1", p80_us="1", gbps=str(gbps), device="NVIDIA H200",
                 timestamp="2026-12-01T00:01:00Z")
        codec.append(r)
    _write_csv(tmp_path / "results.csv", common.COLUMNS, codec)

    assert targets.main([str(tmp_path / "results.csv"), "--grid", str(tmp_path / "grid.csv")]) == 0
    md = capsys.readouterr().out
    fused, block, decode, *packed = (ln for ln in md.splitlines() if ln.startswith("| GPU:"))
    assert len(packed) == 3 and all(ln.endswith("| not measured |") for ln in packed)  # no elsa-packed rows
    assert "0.95x (worst)" in fused and fused.endswith("| MET |")
    assert "2.00 (worst)" in block and block.endswith("| NOT MET |")
    assert "75% (worst)" in decode and decode.endswith("| NOT MET |")
    assert "2:4 level 2 1x4096x4096 bfloat16: elsa-fused 10.0 us vs semi-structured 8.0 us (1.25x" in md
    assert "empty kernel (132 programs, do_bench_cudagraph): 2.50 us" in md

    # the codec step failed: the grid alone, the decode target not measured
    assert targets.main([str(tmp_path / "missing.csv"), "--grid", str(tmp_path / "grid.csv")]) == 0
    out = capsys.readouterr()
    assert "decode target not measured" in out.err
    assert [ln for ln in out.out.splitlines() if ln.startswith("| GPU: decode")][0].endswith("| not measured |")

    # packed rows (issue 33), each paired with the dense row of its own stage
    n2 = 11008
    prow = [
        dict(_grid_row(1, "dense", "dense", 1.0, "dense", 20.0), stage="packed"),  # the grid's dense is 10 us
        dict(_grid_row(1, "1", "unstructured", 0.1, "elsa-fused", 21.0), stage="packed"),
        dict(_grid_row(1, "1", "unstructured", 0.1, "elsa-packed", 6.0), stage="packed"),  # 0.30x: met
        dict(_grid_row(1, "1", "unstructured", 0.3, "elsa-packed", 13.0), stage="packed"),  # 0.65x: not met
        dict(_grid_row(16, "dense", "dense", 1.0, "dense", 30.0, n=n2), stage="packed"),
        dict(_grid_row(16, "3", "unstructured", 0.5, "elsa-packed", 24.0, n=n2), stage="packed"),  # 0.80x: met
        dict(_grid_row(1, "2", "2:4", 0.5, "elsa-packed", 12.0), stage="packed"),  # no target: info
    ]
    _write_csv(tmp_path / "grid2.csv", gpu_grid.COLUMNS, grid_rows + prow)
    assert targets.main([str(tmp_path / "results.csv"), "--grid", str(tmp_path / "grid2.csv")]) == 0
    md = capsys.readouterr().out
    lines = [ln for ln in md.splitlines() if ln.startswith("| GPU: elsa-packed")]
    assert len(lines) == 3
    assert "90% sparsity" in lines[0] and "0.30x (worst)" in lines[0] and lines[0].endswith("| MET |")
    assert "70% sparsity" in lines[1] and "0.65x (worst)" in lines[1] and lines[1].endswith("| NOT MET |")
    assert "50% sparsity" in lines[2] and "0.80x (worst)" in lines[2] and lines[2].endswith("| MET |")
    assert "1x4096x4096 bfloat16 level 1 (unstructured, density 0.100): 0.30x cuBLAS latency (6.0 vs 20.0 us; " \
           "elsa-fused 21.0 us, packed / fused 0.29)" in md
    assert "2:4, density 0.500): 0.60x cuBLAS latency" in md and "(no packed target)" in md
    fused = [ln for ln in md.splitlines() if ln.startswith("| GPU: elsa-fused")][0]
    assert "0.95x (worst)" in fused  # the packed stage's fused row (20/21) paired with its own dense

    # a dry-run grid has no timed row
    _write_csv(tmp_path / "dry.csv", gpu_grid.COLUMNS, [grid_rows[-1]])
    assert targets.main([str(tmp_path / "missing.csv"), "--grid", str(tmp_path / "dry.csv")]) == 2
    assert "no timed rows" in capsys.readouterr().err
