"""The file format: round trips, shards, streaming encode, the golden file and bad files."""
import hashlib
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file as st_load
from safetensors.torch import save_file as st_save

import elsa_codec as ec
from elsa_codec import ELSAError, ELSAFormatError
from elsa_codec.format.file import header_checksum

DATA = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data")


def model_sd(dtype=torch.float32):
    g = torch.Generator().manual_seed(7)
    return {
        "l1.weight": torch.randn(64, 32, generator=g).to(dtype),
        "l1.bias": torch.randn(64, generator=g).to(dtype),
        "l2.weight": torch.randn(10, 64, generator=g).to(dtype),
        "bn.running_mean": torch.zeros(64),
        "bn.running_var": torch.ones(64),
        "bn.num_batches_tracked": torch.tensor(0),
    }


def bn_stats(T):
    return {t: {"bn": {"running_mean": torch.full((64,), float(t)), "running_var": torch.full((64,), 2.0 * t), "num_batches_tracked": torch.tensor(t)}} for t in range(1, T + 2)}


@pytest.fixture
def encoded():
    sd = model_sd()
    return ec.encode(sd, ec.magnitude_counters(sd, [0.9, 0.75, 0.5]), bn_stats=bn_stats(3))


def same(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_roundtrip_bit_exact(tmp_path, dtype):
    sd = model_sd(dtype)
    enc = ec.encode(sd, ec.magnitude_counters(sd, [0.9, 0.5]), bn_stats=bn_stats(2))
    p = str(tmp_path / "m.safetensors")
    ec.save_file(enc, p)
    got = ec.load_file(p)
    same(got, enc)
    assert got.meta.to_json() == enc.meta.to_json()
    assert sorted(got.bn_stats) == [1, 2, 3]
    assert torch.equal(got.bn_stats[2]["bn"]["running_var"], enc.bn_stats[2]["bn"]["running_var"])
    # any safetensors loader reads it; a plain load gives the dense model (bn stats under a prefix)
    plain = st_load(p)
    assert torch.equal(plain["l1.weight"], enc["l1.weight"])
    assert any(k.startswith(ec.BN_PREFIX) for k in plain)
    with safe_open(p, "pt") as f:
        doc = json.loads(f.metadata()["elsa"])
    assert doc["format"] == "elsa-codec" and doc["version"] == 1 and doc["num_levels"] == 2


def test_sharded_roundtrip(tmp_path, encoded):
    idx = str(tmp_path / "model.safetensors.index.json")
    ec.save_file(encoded, idx, max_shard_size=3000)
    shards = sorted(p for p in os.listdir(tmp_path) if p.endswith(".safetensors"))
    assert len(shards) >= 2 and shards[0].startswith("model-00001-of-")
    got = ec.load_file(idx)
    same(got, encoded)
    assert ec.read_meta(idx).num_levels == 3


@pytest.mark.parametrize("distribution", ["uniform", "global"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["as-is", "to-bf16"])
def test_streaming_encode_equals_in_memory(tmp_path, distribution, dtype):
    sd = model_sd()
    src = str(tmp_path / "in.safetensors")
    st_save(sd, src)
    out = str(tmp_path / "out.safetensors")
    meta = ec.encode_file(src, out, levels=[0.9, 0.75, 0.5], distribution=distribution, dtype=dtype, progress=False)
    ref_sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in sd.items()}
    ref = ec.encode(ref_sd, ec.magnitude_counters(ref_sd, [0.9, 0.75, 0.5], distribution=distribution))
    same(ec.load_file(out), ref)
    assert meta.sparsities() == ref.meta.sparsities()


def test_streaming_from_counters_file(tmp_path):
    sd = model_sd()
    src = str(tmp_path / "in.safetensors")
    st_save(sd, src)
    c = ec.magnitude_counters(sd, ["1:4", "2:4"])
    cp = str(tmp_path / "counters.safetensors")
    ec.save_counters(c, cp)
    out = str(tmp_path / "out.safetensors")
    ec.encode_file(src, out, counters=cp, progress=False)
    same(ec.load_file(out), ec.encode(sd, c))


def test_golden_file_reads_the_same():
    """A file written by format version 1 must read the same forever (tests/data/make_golden.py)."""
    with open(os.path.join(DATA, "golden_v1.json")) as f:
        expect = json.load(f)
    enc = ec.load_file(os.path.join(DATA, "golden_v1.safetensors"))
    assert enc.meta.version == 1 and enc.meta.num_levels == 3 and enc.meta.code_bits == 2
    assert enc.meta.sparsities() == expect["sparsities"]
    for t, digest in expect["levels"].items():
        sd = ec.extract(enc, int(t))
        h = hashlib.sha256()
        for n in sorted(sd):
            h.update(n.encode())
            h.update(sd[n].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        assert h.hexdigest() == digest, f"level {t}"


def test_atomic_write_leaves_nothing_on_failure(tmp_path, encoded):
    p = tmp_path / "m.safetensors"
    p.write_bytes(b"previous")
    bad = ec.ELSAStateDict({**encoded, "x": "not a tensor"}, encoded.meta)
    with pytest.raises(ELSAError, match="x: expected a tensor"):
        ec.save_file(bad, str(p))
    assert p.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_streaming_refuses_to_overwrite_input(tmp_path):
    src = str(tmp_path / "in.safetensors")
    st_save(model_sd(), src)
    before = open(src, "rb").read()
    with pytest.raises(ELSAError, match="is the input file"):
        ec.encode_file(src, src, levels=[0.5], progress=False)
    with pytest.raises(ELSAError, match="l1.weight: weights must be finite"):
        sd = model_sd()
        sd["l1.weight"][3, 3] = float("nan")
        st_save(sd, src)
        before = open(src, "rb").read()
        ec.encode_file(src, str(tmp_path / "o.safetensors"), levels=[0.5], progress=False)
    assert open(src, "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors"]


def _write(tmp_path, encoded):
    p = str(tmp_path / "m.safetensors")
    ec.save_file(encoded, p)
    return p, bytearray(open(p, "rb").read())


def test_truncated_file(tmp_path, encoded):
    p, raw = _write(tmp_path, encoded)
    for cut in (4, 100, len(raw) - 10):
        open(p, "wb").write(raw[:cut])
        with pytest.raises(ELSAFormatError, match="truncated|not a readable"):
            ec.load_file(p)


def test_byte_flipped_data(tmp_path, encoded):
    p, raw = _write(tmp_path, encoded)
    raw[-5] ^= 0x40
    open(p, "wb").write(raw)
    with pytest.raises(ELSAFormatError, match="fails its CRC-32 check"):
        ec.load_file(p)


def test_byte_flipped_header(tmp_path, encoded):
    p, raw = _write(tmp_path, encoded)
    i = raw.index(b'"num_levels')
    raw[i + 1] = ord("X")
    open(p, "wb").write(raw)
    with pytest.raises(ELSAFormatError):
        ec.load_file(p)


def _rewrite_meta(tmp_path, encoded, fn):
    p = str(tmp_path / "m.safetensors")
    ec.save_file(encoded, p)
    with safe_open(p, "pt") as f:
        md = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    fn(md)
    # a writer that lies consistently: the header checksum matches the lie, so the semantic
    # checks must catch it
    md["elsa_header_sha256"] = header_checksum(md, {n: (_code(t), list(t.shape)) for n, t in tensors.items()})
    st_save(tensors, p, metadata=md)
    return p


def _code(t):
    from elsa_codec.format.file import _DTYPES

    return _DTYPES[t.dtype]


@pytest.mark.parametrize(
    "fn, msg",
    [
        (lambda md: md.pop("elsa"), "not an ELSA checkpoint"),
        (lambda md: md.update(elsa="{not json"), "not valid JSON"),
        (lambda md: md.update(elsa=md["elsa"].replace('"version":1', '"version":99')), "format version 99 is newer"),
        (lambda md: md.update(elsa=md["elsa"].replace('"format":"elsa-codec"', '"format":"other"')), "format is 'other'"),
        (lambda md: md.update(elsa=md["elsa"].replace('"num_levels":3', '"num_levels":4')), "levels"),
        (lambda md: md.update(elsa=md["elsa"].replace('"code_bits":2', '"code_bits":1')), "do not fit"),
    ],
    ids=["missing", "malformed", "future-version", "other-format", "T-mismatch", "k-too-small"],
)
def test_bad_metadata(tmp_path, encoded, fn, msg):
    p = _rewrite_meta(tmp_path, encoded, fn)
    with pytest.raises(ELSAFormatError, match=msg):
        ec.load_file(p)


def test_missing_file(tmp_path):
    with pytest.raises(ELSAFormatError, match="no such file"):
        ec.load_file(str(tmp_path / "nope.safetensors"))


def test_streaming_unknown_name(tmp_path):
    src = str(tmp_path / "in.safetensors")
    st_save(model_sd(), src)
    with pytest.raises(ELSAError, match="nope.weight: not in"):
        ec.encode_file(src, str(tmp_path / "o.safetensors"), levels=[0.5], names=["nope.weight"], progress=False)
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors"]


def _tied_encoded():
    torch.manual_seed(0)
    emb, head = torch.nn.Embedding(20, 8), torch.nn.Linear(8, 20, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head, "fc": torch.nn.Linear(8, 8)})
    return ec.encode(model.state_dict(), ec.magnitude_counters(model, [0.5], select="all"))


def test_tied_tensor_stored_once_and_restored(tmp_path):
    enc = _tied_encoded()
    p = str(tmp_path / "t.safetensors")
    ec.save_file(enc, p)
    with safe_open(p, "pt") as f:
        assert sorted(f.keys()) == ["emb.weight", "fc.bias", "fc.weight"]
        doc = json.loads(f.metadata()["elsa"])
    assert doc["version"] == 2 and doc["tied"] == {"head.weight": "emb.weight"}
    back = ec.load_file(p)
    assert back["head.weight"] is back["emb.weight"] and torch.equal(back["emb.weight"], enc["emb.weight"])
    sharded = str(tmp_path / "s.safetensors.index.json")
    ec.save_file(enc, sharded, max_shard_size=400)
    back = ec.load_file(sharded)
    assert back["head.weight"] is back["emb.weight"] and back.meta.tied == {"head.weight": "emb.weight"}


@pytest.mark.parametrize(
    "fn, msg",
    [
        (lambda md: md.update(elsa=md["elsa"].replace('"tied":{"head.weight":"emb.weight"}', '"tied":{"head.weight":"nope.weight"}')),
         "tied tensor 'head.weight' points to 'nope.weight', which the file does not hold"),
        (lambda md: md.update(elsa=md["elsa"].replace('"tied":{"head.weight":"emb.weight"}', '"tied":{"fc.weight":"emb.weight"}')),
         "tied tensor 'fc.weight' is also stored"),
        (lambda md: md.update(elsa=md["elsa"].replace('"version":2', '"version":4')), "format version 4 is newer"),
    ],
    ids=["dangling-alias", "alias-also-stored", "future-version"],
)
def test_bad_tied_metadata(tmp_path, fn, msg):
    p = _rewrite_meta(tmp_path, _tied_encoded(), fn)
    with pytest.raises(ELSAFormatError, match=msg):
        ec.load_file(p)
