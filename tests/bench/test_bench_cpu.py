"""``elsa bench cpu`` (bench/cpu_sparse.py, cpu_memory.py, cpu_report.py): the code path with tiny
shapes and almost no timing. Checks the CSV columns, the provider names and the files; never a
latency (benchmarks are not timed tests)."""
import csv
import os

import pytest
import torch

from bench import cpu_report, cpu_sparse
from elsa_codec.native import cpu_kernels

pytestmark = pytest.mark.skipif(cpu_kernels() is None, reason="the sparse-cpu kernels did not build")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cpu")
    rc = cpu_sparse.main([
        "--quick", "--out", str(out), "--quiet", "--only", "grid,memory", "--shapes", "64x128",
        "--dtypes", "float32,bfloat16", "--threads", "1", "--m", "1,8", "--forced-m", "1", "--baseline-m", "1",
        "--level-sets", "unstructured,block:16x16,n:m", "--min-run-time", "0.002", "--rounds", "1",
        "--mem-shape", "64x128", "--mem-cases", "plain,1",
    ])
    assert rc == 0
    return out


def _rows(out):
    with open(os.path.join(out, cpu_sparse.CSV_NAME), newline="") as f:
        r = csv.reader(f)
        header = next(r)
        return header, [dict(zip(header, row)) for row in r]


def test_csv_columns_and_providers(tiny_run):
    header, rows = _rows(tiny_run)
    assert header == cpu_sparse.COLUMNS
    assert len({r["timestamp"] for r in rows}) == 1
    lin = [r for r in rows if r["op"] == "linear"]
    provs = {r["provider"] for r in lin}
    assert {"dense", "elsa-decoded", "forced-csr", "forced-bitmask", "forced-bsr", "torch-csr", "scipy-csr",
            "torch-bsr"} <= provs
    # the default module's rows name the format that ran (or the fallback)
    auto = [r for r in lin if r["provider"] in ("elsa-csr", "elsa-bitmask", "elsa-bsr", "elsa-reference")]
    assert auto and all(r["target"] and r["met"] in ("yes", "no") for r in auto)
    assert all(r["format"] == r["provider"][5:] for r in auto)
    assert {r["structure"] for r in lin} >= {"dense", "unstructured", "block:16x16", "1:4", "2:4"}
    # baselines only at M = 1, forced only at M = 1 here; torch sparse has no bfloat16 CPU kernel
    assert {r["m"] for r in lin if r["provider"] in ("scipy-csr", "forced-csr")} == {"1"}
    assert not any(r["provider"] in ("torch-csr", "torch-bsr") and r["dtype"] == "bfloat16" for r in lin)
    for r in lin:
        assert 0 < float(r["p20_us"]) <= float(r["p50_us"]) <= float(r["p80_us"])
        assert float(r["bytes"]) > 0 and float(r["floor_us"]) > 0 and float(r["ratio_vs_dense"]) > 0
        assert r["threads"] == "1" and r["m"] in ("1", "8")
        assert r["shape"] == f"{r['m']}x64x128"
    assert all(float(r["ratio_vs_dense"]) == 1.0 for r in lin if r["provider"] == "dense")
    assert any(r["op"] == "read_bandwidth" and float(r["value"]) > 0 for r in rows)


def test_memory_rows(tiny_run):
    _, rows = _rows(tiny_run)
    mem = [r for r in rows if r["op"] == "memory"]
    cases = {(r["provider"], r["level"]) for r in mem}
    assert cases == {("plain-load", "dense"), ("ec.load", "1")}
    metrics = {r["metric"] for r in mem}
    assert {"resident_beyond_floor", "peak_ru_maxrss", "tracemalloc_peak", "packed_bytes", "after_forward.FileMapRss"} <= metrics
    packed = [r for r in mem if r["metric"] == "packed_bytes" and r["level"] == "1"]
    assert packed and all(int(float(r["value"])) > 0 for r in packed)
    sw = [r for r in rows if r["op"] == "switch"]
    assert {r["provider"] for r in sw} == {"ec.set_level", "read-encoded"}
    assert all(r["met"] in ("yes", "no") for r in sw if r["provider"] == "ec.set_level")


def test_report_files(tiny_run):
    tables = open(os.path.join(tiny_run, "tables.md")).read()
    assert "CPU latency at M = 8 (1 thread)" in tables and "Resident memory" in tables
    assert os.path.getsize(os.path.join(tiny_run, "latency_vs_density.png")) > 0
    log = open(os.path.join(tiny_run, "bench.log")).read()
    assert "machine:" in log and "load average" in log
    cmd = open(os.path.join(tiny_run, "COMMAND.txt")).read()
    assert "machine:" in cmd and torch.__version__ in cmd
    # the separate steps read the CSV back
    csv_path = os.path.join(tiny_run, cpu_sparse.CSV_NAME)
    assert cpu_report.main(["tables", csv_path, "-o", os.path.join(tiny_run, "t2.md")]) == 0
    assert "CPU latency at M = 8 (1 thread)" in open(os.path.join(tiny_run, "t2.md")).read()


def test_targets():
    assert cpu_sparse.target_for("unstructured", 0.1, 1)[0] == 0.35
    assert cpu_sparse.target_for("unstructured", 0.25, 1)[0] == 0.6
    assert cpu_sparse.target_for("2:4", 0.5, 1)[0] == 0.8 and cpu_sparse.target_for("1:4", 0.25, 1)[0] == 0.5
    assert cpu_sparse.target_for("block:32x32", 0.1, 1)[0] == pytest.approx(0.13)
    assert cpu_sparse.target_for("unstructured", 0.1, 8)[0] == 1.0
