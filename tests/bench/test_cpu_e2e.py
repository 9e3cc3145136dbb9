"""``python -m bench cpu-e2e`` (bench/cpu_e2e.py, cpu_e2e_report.py): the quick mode on tiny configs.

Checks the CSV's columns and rows (every cell has the stock model and the four levels, ratios to
the stock row of the same cell), the resident and switch rows, and that the report writes
tables.md and the PNG, also through ``python -m bench cpu-e2e report``. Never a latency
(benchmarks are not timed tests). About 15 s on the 2-core machine.
"""
import csv
import os

import pytest

pytest.importorskip("transformers")

from bench import cpu_e2e, cpu_e2e_report  # noqa: E402
from bench.__main__ import main as bench_main  # noqa: E402

LEVELS = {("stock", "dense"), ("elsa", "1"), ("elsa", "2"), ("elsa", "3"), ("elsa", "dense")}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cpu-e2e")
    rc = bench_main(["cpu-e2e", "--quick", "--out", str(out), "--quiet", "--threads", "1", "--dtypes", "float32,bfloat16"])
    assert rc == 0
    return out


def _rows(out):
    with open(os.path.join(out, cpu_e2e.CSV_NAME), newline="") as f:
        r = csv.reader(f)
        header = next(r)
        return header, [dict(zip(header, row)) for row in r]


def test_csv_columns_and_lm_cells(quick_run):
    """Columns; every LM cell has the stock model and the four levels; ratios and metrics consistent."""
    header, rows = _rows(quick_run)
    assert header == cpu_e2e.COLUMNS
    assert len({r["timestamp"] for r in rows}) == 1
    lm = [r for r in rows if r["op"] in ("prefill", "decode", "generate")]
    assert {r["model"] for r in lm} == {"gpt2-tiny", "llama-tiny"}
    assert {r["dtype"] for r in lm} == {"float32", "bfloat16"}
    cells = {(r["model"], r["dtype"], r["op"], r["batch"], r["prompt_len"], r["new_tokens"]) for r in lm}
    # batch 1: prefill 16 and 32, decode, generate; batch 2: prefill 16, decode
    assert {c[2:] for c in cells} == {("prefill", "1", "16", "0"), ("prefill", "1", "32", "0"), ("decode", "1", "16", "4"),
                                      ("generate", "1", "16", "3"), ("prefill", "2", "16", "0"), ("decode", "2", "16", "4")}
    for c in cells:
        sel = [r for r in lm if (r["model"], r["dtype"], r["op"], r["batch"], r["prompt_len"], r["new_tokens"]) == c]
        assert {(r["provider"], r["level"]) for r in sel} == LEVELS
        stock = next(r for r in sel if r["provider"] == "stock")
        for r in sel:
            p20, p50, p80 = float(r["p20_us"]), float(r["p50_us"]), float(r["p80_us"])
            assert 0 < p20 <= p50 <= p80
            assert float(r["ratio_vs_dense"]) == pytest.approx(p50 / float(stock["p50_us"]), rel=1e-4)
            assert r["threads"] == "1" and r["device"] and r["git_sha"]
    for r in lm:
        if r["op"] == "decode":
            assert r["metric"] == "tokens_per_s" and r["unit"] == "tok/s"
            want = int(r["batch"]) * int(r["new_tokens"]) / (float(r["p50_us"]) * 1e-6)
            assert float(r["value"]) == pytest.approx(want, rel=1e-4)
        else:
            assert r["unit"] == "ms" and float(r["value"]) == pytest.approx(float(r["p50_us"]) / 1e3, rel=1e-4)
    sparse = {r["level"]: float(r["sparsity"]) for r in lm if r["provider"] == "elsa"}
    assert sparse["1"] > sparse["2"] > sparse["3"] > sparse["dense"] == 0.0


def test_resident_minilm_and_switch_rows(quick_run):
    """Resident bytes per level, MiniLM forwards, the switch providers per level."""
    _, rows = _rows(quick_run)
    res = [r for r in rows if r["op"] == "resident"]
    for model in ("gpt2-tiny", "llama-tiny", "minilm-tiny"):
        sel = [r for r in res if r["model"] == model and not r["metric"].endswith("_after_switch")]
        assert {(r["level"], r["metric"]) for r in sel if r["dtype"] == "float32"} == {
            (lv, m) for lv in ("1", "2", "3", "dense") for m in ("cached_bytes", "rss_anon_delta")}
        assert all(float(r["value"]) == 0 for r in sel if r["level"] == "dense" and r["metric"] == "cached_bytes")
    assert {r["metric"] for r in res if r["model"] == "gpt2-tiny"} >= {"cached_bytes_after_switch", "rss_anon_delta_after_switch"}
    fw = [r for r in rows if r["op"] == "forward"]
    assert {r["batch"] for r in fw} == {"1", "2"} and {(r["provider"], r["level"]) for r in fw} == LEVELS
    sw = [r for r in rows if r["op"] == "switch"]
    for dtype in ("float32", "bfloat16"):
        got = {(r["provider"], r["level"]) for r in sw if r["dtype"] == dtype}
        provs = ("set_level-cold", "set_level-warm", "set_level-lru", "set_level-all", "own-file-load")
        assert got == {(p, lv) for p in provs for lv in "123"} | {("encoded-copy_", "-")}
        assert {r["model"] for r in sw if r["dtype"] == dtype} == {"gpt2-tiny", "llama-tiny"}  # every causal LM
    every = [r for r in res if r["provider"] == "elsa-resident-all" and r["metric"] == "cached_bytes_after_switch"]
    assert {r["level"] for r in every} == {"1", "2", "3"} and len({r["value"] for r in every if r["model"] == "gpt2-tiny"
                                                                     and r["dtype"] == "float32"}) == 1  # one form
    assert all(float(r["ratio_vs_dense"]) == 1.0 for r in sw if r["provider"] == "own-file-load")
    assert all(float(r["value"]) > 0 for r in sw)


def test_report_files(quick_run, tmp_path):
    """tables.md, the PNG, the log's estimate and machine line; ``report`` as a separate step."""
    tables = open(os.path.join(quick_run, cpu_e2e_report.TABLES_NAME)).read()
    for s in ("## Causal LMs", "## MiniLM", "## Level switch", "Command: `", "machine: ", "git ", "stock (unencoded)",
              "decode tok/s", "set_level cold"):
        assert s in tables, s
    png = os.path.join(quick_run, cpu_e2e_report.PNG_NAME)
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    log = open(os.path.join(quick_run, "bench.log")).read()
    assert "estimate:" in log and "machine:" in log
    assert "machine:" in open(os.path.join(quick_run, "COMMAND.txt")).read()
    # the separate step
    rc = bench_main(["cpu-e2e", "report", os.path.join(quick_run, cpu_e2e.CSV_NAME), "-o", str(tmp_path)])
    assert rc == 0
    assert os.path.getsize(tmp_path / "tables.md") > 0 and os.path.getsize(tmp_path / "tokens_per_s.png") > 0


def test_head_levels_are_timed_beside_the_blocks_levels(tmp_path):
    """``--head``: levels 1-3 of a second file encoded with select="blocks+head" (provider
    ``elsa+head``) in every LM cell, in the same rounds; their packed head adds resident bytes (GPT-2's
    tied head packs the token embedding's tensor, the Llama-style head its own); tables.md lists them."""
    rc = bench_main(["cpu-e2e", "--quick", "--only", "lm", "--head", "--out", str(tmp_path), "--quiet", "--threads", "1",
                     "--dtypes", "float32"])
    assert rc == 0
    _, rows = _rows(tmp_path)
    lm = [r for r in rows if r["op"] in ("prefill", "decode", "generate")]
    cells = {(r["model"], r["op"], r["batch"], r["prompt_len"], r["new_tokens"]) for r in lm}
    for c in cells:
        got = {(r["provider"], r["level"]) for r in lm if (r["model"], r["op"], r["batch"], r["prompt_len"], r["new_tokens"]) == c}
        assert got == LEVELS | {("elsa+head", lv) for lv in "123"}, c
    res = {(r["model"], r["provider"], r["level"]): float(r["value"]) for r in rows
           if r["op"] == "resident" and r["metric"] == "cached_bytes"}
    for model in ("gpt2-tiny", "llama-tiny"):
        for lv in "123":
            assert res[(model, "elsa+head", lv)] > res[(model, "elsa", lv)], (model, lv)
    assert "1 (90% sparse, head too)" in open(tmp_path / cpu_e2e_report.TABLES_NAME).read()
