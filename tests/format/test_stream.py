"""Streaming encode (elsa_codec.format.stream): byte-identical to the in-memory save_file(encode(...)),
chunk by chunk (magnitude_stream), sharded input and output, --jobs."""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file as st_save

import elsa_codec as ec
from elsa_codec.cli.commands import main
from elsa_codec.errors import ELSAError
from elsa_codec.format import stream
from elsa_codec.format.stream import chunked
from elsa_codec.format.structure import parse_level
from elsa_codec.oneshot import stream_counters as ms
from elsa_codec.oneshot.magnitude import tensor_magnitude_counters
from elsa_codec.oneshot.thresholds import global_thresholds, global_thresholds_stream


def model_sd(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {
        "a.weight": torch.randn(48, 64, generator=g),
        "a.bias": torch.randn(48, generator=g),
        "b.weight": (torch.randint(-3, 4, (32, 48), generator=g) * 0.5).float(),  # many ties, zeros
        "c.weight": torch.randn(8, 4, 3, 3, generator=g),
        "d.table": torch.randn(16, 32, generator=g).double(),  # not encoded; converted by --dtype
        "steps": torch.tensor([3, 4], dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
    }
    return {n: (t.to(dtype) if t.dtype == torch.float32 else t) for n, t in sd.items()}


def read_sd(paths, dtype=None):
    """The state dict of safetensors files in the streaming encode's order, floats converted."""
    sd = {}
    for p in paths:
        with safe_open(p, "pt") as f:
            for n in f.keys():
                t = f.get_tensor(n)
                sd[n] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return sd


def reference(tmp_path, sd, out_name="ref.safetensors", *, levels=None, counters=None, **kw):
    if counters is None:
        counters = ec.magnitude_counters(sd, levels, **kw)
    p = str(tmp_path / out_name)
    ec.save_file(ec.encode(sd, counters), p)
    return p


def same_bytes(a, b):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        assert fa.read() == fb.read()


def no_temporaries(folder):
    assert not [p for p in os.listdir(folder) if p.endswith(".elsa-tmp")]


CASES = {
    "unstructured": dict(levels=[0.9, 0.75, 0.5]),
    "global": dict(levels=[0.9, 0.75, 0.5], distribution="global"),
    "nm": dict(levels=["1:4", "2:4"]),
    "nm-global": dict(levels=["1:4", "2:4"], distribution="global"),
    "block": dict(levels=[0.75, 0.5], structure="block:8x8"),
    "block-global": dict(levels=[0.75, 0.5], structure="block:8x8", distribution="global"),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["as-is", "to-bf16"])
def test_bytes_equal_in_memory(tmp_path, case, dtype):
    kw = CASES[case]
    src = str(tmp_path / "in.safetensors")
    st_save(model_sd(), src)
    out = str(tmp_path / "out.safetensors")
    meta = ec.encode_file(src, out, dtype=dtype, progress=False, **kw)
    ref = reference(tmp_path, read_sd([src], dtype), **kw)
    same_bytes(out, ref)
    assert meta.to_json() == ec.read_meta(ref).to_json()
    no_temporaries(tmp_path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_16bit_input(tmp_path, dtype):
    src = str(tmp_path / "in.safetensors")
    st_save(model_sd(dtype), src)
    out = str(tmp_path / "out.safetensors")
    ec.encode_file(src, out, levels=[0.9, 0.5], distribution="global", progress=False)
    same_bytes(out, reference(tmp_path, read_sd([src]), levels=[0.9, 0.5], distribution="global"))


def test_counters_file_and_mapping(tmp_path):
    src = str(tmp_path / "in.safetensors")
    sd = model_sd()
    st_save(sd, src)
    c = ec.magnitude_counters(sd, ["1:4", "2:4"])
    cp = str(tmp_path / "counters.safetensors")
    ec.save_counters(c, cp)
    ref = reference(tmp_path, read_sd([src]), counters=c)
    for i, given in enumerate([cp, c]):
        out = str(tmp_path / f"out{i}.safetensors")
        ec.encode_file(src, out, counters=given, progress=False)
        same_bytes(out, ref)


def test_bad_counters_name_the_tensor(tmp_path):
    src = str(tmp_path / "in.safetensors")
    sd = model_sd()
    st_save(sd, src)
    c = ec.magnitude_counters(sd, [0.5])
    c["a.weight"] = c["a.weight"].clone()
    c["a.weight"][0, 0] = 3
    with pytest.raises(ELSAError, match=r"a.weight: counters must lie in 1..2, got 1..3"):
        ec.encode_file(src, str(tmp_path / "o.safetensors"), counters=c, progress=False)
    c["a.weight"] = c["a.weight"][:2]
    with pytest.raises(ELSAError, match="a.weight: counters have shape"):
        ec.encode_file(src, str(tmp_path / "o.safetensors"), counters=c, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors"]


def test_nonfinite_names_the_tensor_and_leaves_nothing(tmp_path):
    src = str(tmp_path / "in.safetensors")
    sd = model_sd()
    sd["c.weight"][1, 1, 1, 1] = float("inf")
    st_save(sd, src)
    with pytest.raises(ELSAError, match="c.weight: weights must be finite"):
        ec.encode_file(src, str(tmp_path / "o.safetensors"), levels=[0.5], progress=False)
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors"]


def write_sharded_input(tmp_path, sd, groups):
    """A plain sharded checkpoint (safetensors shards + index) of ``sd``: ``groups`` of names."""
    folder = tmp_path / "in"
    folder.mkdir()
    wm = {}
    for i, names in enumerate(groups):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        st_save({n: sd[n] for n in names}, str(folder / shard))
        wm.update({n: shard for n in names})
    idx = folder / "model.safetensors.index.json"
    idx.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": dict(sorted(wm.items()))}))
    shards = [str(folder / f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors") for i in range(len(groups))]
    return str(idx), shards


@pytest.mark.parametrize("jobs", [1, 2])
@pytest.mark.parametrize("case", ["global", "nm", "counters"])
def test_sharded_input_jobs(tmp_path, jobs, case):
    sd = model_sd()
    idx, shards = write_sharded_input(tmp_path, sd, [["a.weight", "a.bias", "steps"], ["b.weight", "mask"], ["c.weight", "d.table"]])
    ref_sd = read_sd(shards, torch.bfloat16)
    if case == "counters":
        c = ec.magnitude_counters(ref_sd, [0.9, 0.5])
        cp = str(tmp_path / "counters.safetensors")
        ec.save_counters(c, cp)
        kw, ref = dict(counters=cp), reference(tmp_path, ref_sd, counters=c)
    else:
        kw = CASES[case]
        ref = reference(tmp_path, ref_sd, **kw)
    out = str(tmp_path / "out.safetensors")
    ec.encode_file(idx, out, dtype=torch.bfloat16, jobs=jobs, progress=False, **kw)
    same_bytes(out, ref)
    no_temporaries(tmp_path)


@pytest.mark.parametrize("jobs", [1, 2])
def test_sharded_output(tmp_path, jobs):
    sd = model_sd()
    idx, shards = write_sharded_input(tmp_path, sd, [["a.weight", "a.bias", "steps"], ["b.weight", "mask", "c.weight", "d.table"]])
    ref_sd = read_sd(shards)
    enc = ec.encode(ref_sd, ec.magnitude_counters(ref_sd, [0.9, 0.5]))
    (tmp_path / "ref").mkdir()
    (tmp_path / "out").mkdir()
    ec.save_file(enc, str(tmp_path / "ref" / "m.safetensors.index.json"), max_shard_size=9000)
    ec.encode_file(idx, str(tmp_path / "out" / "m.safetensors.index.json"), levels=[0.9, 0.5], jobs=jobs,
                   max_shard_size=9000, progress=False)
    files = sorted(os.listdir(tmp_path / "ref"))
    assert len(files) >= 3 and sorted(os.listdir(tmp_path / "out")) == files
    for f in files:
        same_bytes(str(tmp_path / "ref" / f), str(tmp_path / "out" / f))


def test_output_over_an_input_shard_is_refused(tmp_path):
    sd = model_sd()
    idx, shards = write_sharded_input(tmp_path, sd, [["a.weight", "a.bias"], ["b.weight"]])
    with pytest.raises(ELSAError, match="is the input file"):
        ec.encode_file(idx, shards[1], levels=[0.5], progress=False)
    with pytest.raises(ELSAError, match="jobs must be a positive int"):
        ec.encode_file(idx, str(tmp_path / "o.safetensors"), levels=[0.5], jobs=0, progress=False)


def test_multi_chunk_tensor_with_ties(tmp_path):
    """A tensor of more than one real chunk (4M elements), ties at the thresholds across chunks."""
    g = torch.Generator().manual_seed(1)
    n = stream.CHUNK + 123_457
    w = torch.randn(n, generator=g)
    w[: n // 3] = (torch.randint(-2, 3, (n // 3,), generator=g) * 0.25).float()  # ties spanning chunks
    sd = {"big.weight": w.reshape(-1, 1)[: (n // 7) * 7].reshape(-1, 7).contiguous(), "x.bias": torch.randn(5, generator=g)}
    src = str(tmp_path / "in.safetensors")
    st_save(sd, src)
    out = str(tmp_path / "out.safetensors")
    ec.encode_file(src, out, levels=[0.9, 0.6, 0.3], progress=False)
    same_bytes(out, reference(tmp_path, read_sd([src]), levels=[0.9, 0.6, 0.3]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("chunk", [1, 97, 1000, 10**6])
def test_unstructured_counters_equal_in_memory(dtype, chunk):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(2000, generator=g)
    w[::3] = (torch.randint(-2, 3, (667,), generator=g) * 0.5).float()
    w[5] = -0.0
    w = w.to(dtype)
    specs = [parse_level(s) for s in [0.99, 0.9, 0.5, 0.2]]
    src = lambda: chunked(w, chunk)  # noqa: E731
    for thr in (None, global_thresholds(lambda n: w, ["w"], [0.95, 0.7, 0.5, 0.1])):
        uc = ms.UnstructuredCounters(src, w.numel(), [s for s, _ in specs], thr)
        got = torch.cat([uc(ch) for ch in src()])
        assert torch.equal(got, tensor_magnitude_counters(w, specs, thr).reshape(-1))


def test_global_thresholds_stream_equal():
    g = torch.Generator().manual_seed(3)
    ts = {"a": torch.randn(300, 7, generator=g), "b": torch.randn(1000, generator=g).to(torch.bfloat16),
          "c": torch.zeros(50), "d": torch.randn(64, generator=g).half()}
    sps = [0.99, 0.9, 0.5, 0.1, 0.0]
    want = global_thresholds(ts.__getitem__, list(ts), sps)
    got = global_thresholds_stream(lambda: (ch for t in ts.values() for ch in chunked(t.reshape(-1), 33)), sps)
    assert got == want


def test_nm_row_blocks_equal_in_memory():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(37, 3, 4, 4, generator=g)
    specs = [parse_level(s) for s in ["1:4", "2:4", "3:4"]]
    full = tensor_magnitude_counters(w, specs).reshape(-1)
    rb = ms.RowBlockCounters(lambda a, b: w[a:b], list(w.shape), specs, "w", block_elems=100)
    got = torch.cat([rb(s, min(s + 61, w.numel())) for s in range(0, w.numel(), 61)])
    assert torch.equal(got.to(torch.int64), full.to(torch.int64))


def test_cli_jobs(tmp_path, capsys):
    sd = model_sd()
    idx, shards = write_sharded_input(tmp_path, sd, [["a.weight", "a.bias"], ["b.weight", "c.weight"]])
    out = str(tmp_path / "o.safetensors")
    assert main(["encode", idx, "-o", out, "--levels", "0.9,0.5", "--jobs", "2", "-q"]) == 0
    same_bytes(out, reference(tmp_path, read_sd(shards), levels=[0.9, 0.5]))
    assert "encoded tensors" in capsys.readouterr().out


def test_counters_must_hold_their_structures(tmp_path):
    src = str(tmp_path / "in.safetensors")
    sd = model_sd()
    st_save(sd, src)
    c = ec.magnitude_counters(sd, [0.75, 0.5])  # unstructured masks
    bad = ec.Counters(dict(c), 2, ["1:4", "2:4"])
    with pytest.raises(ELSAError, match=r"a.weight: structures say level 1 is 1:4"):
        ec.encode_file(src, str(tmp_path / "o.safetensors"), counters=bad, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors"]
    # transposed ([in, out]) weights: groups along dim 0; the record says so, as in memory
    t = ec.magnitude_counters({"a.weight": sd["a.weight"].t().contiguous()}, ["2:4"])
    good = ec.Counters({"a.weight": t["a.weight"].t().contiguous()}, 1, ["2:4"], transposed={"a.weight"})
    out = str(tmp_path / "o.safetensors")
    ec.encode_file(src, out, counters=good, progress=False)
    same_bytes(out, reference(tmp_path, read_sd([src]), counters=good))
    assert ec.read_meta(out).tensors["a.weight"].transposed


@pytest.mark.parametrize("levels", [[0.9, 0.5]], ids=["unstructured"])  # N:M: masks.py cannot view [0, 16] in 2-D
def test_empty_tensors(tmp_path, levels):
    sd = {"a.weight": torch.randn(8, 16), "e.weight": torch.zeros(0, 16), "e.bias": torch.zeros(0), "u8": torch.zeros(0, dtype=torch.uint8)}
    src = str(tmp_path / "in.safetensors")
    st_save(sd, src)
    out = str(tmp_path / "out.safetensors")
    ec.encode_file(src, out, levels=levels, progress=False)
    same_bytes(out, reference(tmp_path, read_sd([src]), levels=levels))
