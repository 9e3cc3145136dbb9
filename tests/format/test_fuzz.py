"""Corruption fuzz: 1,000 seeded corruptions of an ELSA file and of a sharded checkpoint.

Each case (bit flips anywhere, byte overwrites, truncations, header-length lies, JSON that parses
but lies, with the header checksum stale, recomputed by a consistent liar, or removed) must
either raise ``ELSAFormatError`` naming the file, or load tensors, metadata and batch-norm
statistics identical to the original: never a crash, a hang, another exception type or a
different content (docs/FORMAT.md, "Readers must refuse"). ``elsa verify`` must agree on a
sample: exit 1 with one line for a refused file, exit 0 otherwise.

``pytest -s tests/format/test_fuzz.py`` prints the outcomes per kind. A new kind of corruption is one
line of ``KINDS``; a new lie about the document one line of ``DOC_LIES``.
"""
import collections
import contextlib
import io
import json
import math
import os
import random
import re
import signal
import time

import pytest
import torch

import elsa_codec as ec
from elsa_codec import ELSAFormatError
from elsa_codec.cli.commands import main
from elsa_codec.format.file import header_checksum, index_checksum
from elsa_codec.oneshot.masks import magnitude_mask

CASES = 1000
CASE_SECONDS = 10  # a case running longer is a hang
_SUM = "elsa_header_sha256"


# -- the checkpoint ------------------------------------------------------------------------------
def build() -> ec.ELSAStateDict:
    """float32 / bfloat16 / float16 encoded weights (Linear, Conv, a transposed Conv1D weight),
    a bias, a tied embedding + head (version 2), per-level batch-norm statistics; levels 1:4, 2:4
    and an unstructured level whose sparsity differs per tensor."""
    g = torch.Generator().manual_seed(2312)
    emb = torch.randn(20, 8, generator=g)
    sd = {
        "emb.weight": emb,
        "head.weight": emb,  # tied: one storage
        "fc.weight": torch.randn(16, 32, generator=g),
        "fc.bias": torch.randn(16, generator=g),
        "conv.weight": torch.randn(8, 4, 3, 3, generator=g).to(torch.bfloat16),
        "fc16.weight": torch.randn(8, 16, generator=g).to(torch.float16),
        "attn.c_attn.weight": torch.randn(32, 12, generator=g),  # Conv1D: [in, out]
        "bn.running_mean": torch.zeros(8),
        "bn.running_var": torch.ones(8),
        "bn.num_batches_tracked": torch.tensor(0),
    }
    last = {"emb.weight": 0.2, "fc.weight": 0.3, "conv.weight": 0.25, "fc16.weight": 0.1, "attn.c_attn.weight": 0.35}
    masks = {}
    for n, s3 in last.items():
        t = n == "attn.c_attn.weight"
        w = sd[n].float().t() if t else sd[n].float()
        m1 = magnitude_mask(w, 0.75, "1:4")
        m2 = magnitude_mask(w, 0.5, "2:4", m1)
        ms = [m1, m2, magnitude_mask(w, s3, "unstructured", m2)]
        masks[n] = [m.t().contiguous() for m in ms] if t else ms
    c = ec.counters_from_masks(masks, structures=["1:4", "2:4", "unstructured"])
    c.transposed = {"attn.c_attn.weight"}
    bn = {t: {"bn": {"running_mean": torch.full((8,), float(t)), "running_var": torch.full((8,), 1.0 + t),
                     "num_batches_tracked": torch.tensor(t)}} for t in range(1, 5)}
    return ec.encode(sd, c, bn_stats=bn)


# -- reading and writing the bytes ---------------------------------------------------------------
def split(raw: bytes):
    """(header dict, data bytes) of a safetensors file."""
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join(header: dict, data: bytes, mode: str) -> bytes:
    """A safetensors file; ``mode``: keep the header checksum (``stale``), recompute it
    (``rehashed``: a writer that lies consistently) or drop it (``unhashed``: an old file)."""
    md = header["__metadata__"]
    if mode == "rehashed":
        entries = {k: (v["dtype"], v["shape"]) for k, v in header.items() if k != "__metadata__"}
        md[_SUM] = header_checksum(md, entries)
    elif mode == "unhashed":
        md.pop(_SUM, None)
    hb = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    return len(hb).to_bytes(8, "little") + hb + data


def dumps(d) -> str:
    return json.dumps(d, sort_keys=True, separators=(",", ":"))


def header_len(raw: bytes) -> int:
    return 8 + int.from_bytes(raw[:8], "little")


# -- lies about the document ---------------------------------------------------------------------
def stored(d, r, two_d=False):
    """A stored (not tied) encoded tensor of the document ``d``."""
    tied = d.get("tied", {})
    names = [n for n in d["encoded"] if n not in tied and n not in tied.values()]
    return r.choice([n for n in names if not two_d or len(d["tensors"][n]["shape"]) == 2])


def relevel(d):
    """Recompute the level sparsities from the records (a liar that keeps the document consistent)."""
    own = [d["tensors"][n] for n in d["encoded"] if n not in d.get("tied", {})]
    total = sum(math.prod(v["shape"]) for v in own) or 1
    for t, lv in enumerate(d["levels"]):
        lv["sparsity"] = sum(v["sparsity"][t] * math.prod(v["shape"]) for v in own) / total


def nudge(s, r):
    """A sparsity visibly different from ``s``, still in [0, 1]."""
    d = r.uniform(0.01, 0.2)
    return s + d if s + d <= 1 else s - d


def drop_level(d, r):
    d["num_levels"] -= 1
    d["levels"].pop()
    for v in d["tensors"].values():
        v["sparsity"].pop()


def tensor_sparsity(d, r):
    n = stored(d, r)
    sp = d["tensors"][n]["sparsity"]
    t = r.randrange(len(sp))
    sp[t] = nudge(sp[t], r)
    sp[:] = sorted(sp, reverse=True)
    if d.get("tied", {}).get("head.weight") == n:
        d["tensors"]["head.weight"]["sparsity"] = list(sp)
    relevel(d)


def rename(d, r, new="nope.weight"):
    n = stored(d, r)
    d["encoded"][d["encoded"].index(n)] = new
    d["tensors"][new] = d["tensors"].pop(n)


def claim_plain(d, r):
    """fc.bias claimed encoded (its record copied from another tensor, levels recomputed)."""
    rec = dict(d["tensors"][stored(d, r)], shape=[16], dtype="float32")
    rec.pop("transposed", None)
    d["encoded"].append("fc.bias")
    d["tensors"]["fc.bias"] = rec
    relevel(d)


def ghost_record(d, r):
    """A tensor the file does not hold, with a copied record (levels recomputed)."""
    d["tensors"]["ghost.weight"] = dict(d["tensors"][stored(d, r)])
    d["encoded"].append("ghost.weight")
    relevel(d)


def drop_encoded(d, r):
    """An encoded tensor declared plain (levels not recomputed: their sparsity then disagrees)."""
    n = stored(d, r)
    d["encoded"].remove(n)
    del d["tensors"][n]


def dup_key(d, r):
    k = r.choice(sorted(d))
    other = r.choice([d[k], 4, "x", None])
    return "{" + f'"{k}":{dumps(other)},' + dumps(d)[1:]


def dup_record_key(d, r):
    n = stored(d, r)
    return dumps(d).replace(f'"{n}":{{', f'"{n}":{{"dtype":"float16",', 1)


def structure_false(d, r):
    t = r.randrange(3)
    d["levels"][t]["structure"] = r.choice([["block:2x2", "1:8", "1:16"], ["1:4", "2:8", "block:2x2"], ["2:4", "1:4", "3:4", "block:4x4"]][t])


def transposed_flip(d, r):
    n = stored(d, r)
    rec = d["tensors"][n]
    if rec.pop("transposed", False) is False:
        rec["transposed"] = True
    if n == "emb.weight":
        d["tensors"]["head.weight"] = dict(rec)


def record_dtype(d, r):
    rec = d["tensors"][stored(d, r)]
    rec["dtype"] = r.choice([t for t in ["float32", "float16", "bfloat16", "int8", "float64"] if t != rec["dtype"]])


def level(d, r, **kw):
    d["levels"][r.randrange(len(d["levels"]))].update(kw)


def record(d, r, **kw):
    d["tensors"][stored(d, r)].update(kw)


#: (name, lie): ``lie(doc, rng)`` changes the parsed document in place, or returns the new text.
DOC_LIES = [
    ("T", lambda d, r: d.update(num_levels=d["num_levels"] + r.choice([-1, 1, 2]))),
    ("T-and-levels", drop_level),
    ("k", lambda d, r: d.update(code_bits=r.choice([0, 1, 3, 4, 8, 9, -1, "2", True, 2.5, None]))),
    ("level-sparsity-out-of-range", lambda d, r: level(d, r, sparsity=r.choice([-0.25, 1.5, float("nan"), float("inf"), "0.5", None, True]))),
    ("level-sparsity-other", lambda d, r: level(d, r, sparsity=nudge(d["levels"][0]["sparsity"], r))),
    ("tensor-sparsity-other", tensor_sparsity),
    ("tensor-sparsity-out-of-range", lambda d, r: d["tensors"][stored(d, r)]["sparsity"].__setitem__(r.randrange(3), r.choice([-0.1, 1.2, float("nan")]))),
    ("sparsities-increase", lambda d, r: (d["tensors"][stored(d, r)]["sparsity"].reverse(), relevel(d))),
    ("name-that-does-not-exist", rename),
    ("ghost-name-in-encoded", lambda d, r: d["encoded"].append("ghost.weight")),
    ("ghost-record", ghost_record),
    ("plain-claimed-encoded", claim_plain),
    ("encoded-dropped", drop_encoded),
    ("duplicated-name", lambda d, r: d["encoded"].append(r.choice(d["encoded"]))),
    ("duplicated-key", dup_key),
    ("duplicated-record-key", dup_record_key),
    ("structure-false", structure_false),
    ("structure-invalid", lambda d, r: level(d, r, structure=r.choice(["4:2", "2:0", "foo", "block:0x4", "2:04", " 2:4", "dense", 5, None]))),
    ("level-number", lambda d, r: level(d, r, level=r.choice([0, 4, "1", 1.0, True]))),
    ("transposed-flip", transposed_flip),
    ("transposed-4d", lambda d, r: d["tensors"]["conv.weight"].update(transposed=True)),
    ("record-shape", lambda d, r: record(d, r, shape=r.choice([[16, 16], [4], [], [-1, 8], "16x32"]))),
    ("record-dtype", record_dtype),
    ("record-max-ulp", lambda d, r: record(d, r, max_ulp=r.choice([-1.0, "2", float("nan"), True]))),
    ("record-sqnr", lambda d, r: record(d, r, sqnr_db=r.choice(["Infinity", "nan", "x", float("nan")]))),
    ("record-unknown-key", lambda d, r: record(d, r, sparsities=[0.5])),
    ("tied-nowhere", lambda d, r: d["tied"].update({"head.weight": "nope.weight"})),
    ("tied-self-or-chain", lambda d, r: d["tied"].update(r.choice([{"head.weight": "head.weight"}, {"emb.weight": "head.weight"}]))),
    ("tied-also-stored", lambda d, r: d["tied"].update({r.choice(["fc.bias", "fc.weight"]): "emb.weight"})),
    ("tied-removed", lambda d, r: d.pop("tied")),
    ("tied-to-other", lambda d, r: d["tied"].update({"head.weight": r.choice(["fc.weight", "fc.bias", "__elsa_bn__.1.bn.running_mean"])})),
    ("bn-prefix", lambda d, r: d.update(bn_prefix=r.choice(["__bn__.", "", None]))),
    ("bn-modules", lambda d, r: d.update(bn_modules=r.choice([[], ["bn", "bn2"], ["bn2"], ["bn", "bn"], "bn"]))),
    ("version", lambda d, r: d.update(version=r.choice([0, 1, 3, "2", None, 2.0]))),
    ("format", lambda d, r: d.update(format=r.choice(["elsa", "", None]))),
    ("unknown-key", lambda d, r: d.update({r.choice(["extra", "levelz", "bn_module"]): 1})),
    ("missing-key", lambda d, r: d.pop(r.choice(["levels", "encoded", "tensors", "num_levels", "code_bits", "version", "format", "bn_modules"]))),
    ("training", lambda d, r: d.update(training=r.choice([5, "x", []]))),
    ("not-an-object", lambda d, r: r.choice(["[]", "null", '"elsa"', "{", "", "NaN"])),
]


def lie_text(text: str, r) -> tuple:
    """(lie name, the lying document) for the document ``text``."""
    name, fn = r.choice(DOC_LIES)
    d = json.loads(text)
    out = fn(d, r)
    out = out if isinstance(out, str) else dumps(d)
    assert out != text, f"the lie {name} changed nothing"
    return name, out


# -- corruptions of the single file --------------------------------------------------------------
def spot(raw: bytes, r, header_share=0.5) -> int:
    """A byte position, in the header with probability ``header_share`` (the header is small)."""
    h = header_len(raw)
    return r.randrange(h) if r.random() < header_share else r.randrange(h, len(raw))


def flip(raw: bytes, r, bits: int, header_share: float) -> bytes:
    b = bytearray(raw)
    for _ in range(bits):
        b[spot(raw, r, header_share)] ^= 1 << r.randrange(8)
    return bytes(b)


def overwrite(raw: bytes, r) -> bytes:
    b = bytearray(raw)
    i = spot(raw, r, 0.6)
    n = min(r.randint(1, 32), len(b) - i)
    b[i : i + n] = bytes(r.randrange(256) for _ in range(n))
    return bytes(b)


def truncate(raw: bytes, r) -> bytes:
    return raw[: spot(raw, r, 0.5)]


def length_lie(raw: bytes, r) -> bytes:
    n = int.from_bytes(raw[:8], "little")
    new = r.choice([n + r.choice([-64, -8, -1, 1, 8, 64]), 0, r.randrange(1 << 64), len(raw), n - (n % 8) - 8, 1 << 62])
    return (new % (1 << 64)).to_bytes(8, "little") + raw[8:]


def doc_lie(raw: bytes, r, mode: str) -> tuple:
    h, data = split(raw)
    what, h["__metadata__"]["elsa"] = lie_text(h["__metadata__"]["elsa"], r)
    return join(h, data, mode), what


def header_lie(raw: bytes, r, mode: str) -> tuple:
    """A lie in the safetensors header: a tensor renamed, a checksum entry changed or added, an
    encoded tensor's dtype."""
    h, data = split(raw)
    md = h["__metadata__"]
    crcs = json.loads(md["elsa_checksums"])
    what = r.choice(["bn-level", "rename", "crc-entry", "crc-extra", "crc-table", "dtype"])
    if what in ("bn-level", "rename"):
        old = r.choice([n for n in h if n.startswith("__elsa_bn__.2.")]) if what == "bn-level" else "fc.weight"
        new = old.replace(".2.", r.choice([".7.", ".02.", ".0.", ".\u00b2."]), 1) if what == "bn-level" else "fc.weightx"
        h[new], crcs[new] = h.pop(old), crcs.pop(old)
    elif what == "crc-entry":
        n = r.choice(sorted(crcs))
        crcs[n] = f"{(int(crcs[n], 16) + r.randint(1, 1 << 31)) % (1 << 32):08x}"
    elif what == "crc-extra":
        crcs["ghost.weight"] = "00000000"
    elif what == "dtype":
        h["fc.weight"]["dtype"] = r.choice(["I32", "U8", "F16"])
    md["elsa_checksums"] = dumps(crcs) if what != "crc-table" else r.choice(["[1]", "5", '{"fc.weight":5}', "{"])
    return join(h, data, mode), what


# -- corruptions of the sharded checkpoint -------------------------------------------------------
def write_index(index) -> str:
    return json.dumps(index, indent=1, sort_keys=True) + "\n"


def index_lie(files: dict, r, mode: str) -> str:
    """A lie in the index: total size, weight map, document, checksum table, keys."""
    index = json.loads(files[INDEX])
    md, wm = index["metadata"], index["weight_map"]
    shard_names = sorted(set(wm.values()))
    what = r.choice(["total_size", "drop-name", "move-name", "ghost-name", "outside", "doc", "crc", "unknown-key",
                     "not-objects", "duplicated-key"])
    if what == "total_size":
        md["total_size"] = r.choice([md["total_size"] + r.choice([-4, 1, 8, 1000]), "9568", True, None])
    elif what == "drop-name":
        del wm[r.choice(sorted(wm))]
    elif what == "move-name":
        n = r.choice(sorted(wm))
        wm[n] = r.choice([s for s in shard_names if s != wm[n]])
    elif what == "ghost-name":
        wm["ghost.weight"] = r.choice(shard_names)
    elif what == "outside":
        wm[r.choice(sorted(wm))] = r.choice(["../" + shard_names[0], "/" + shard_names[0], "", "."])
    elif what == "doc":
        what, md["elsa"] = lie_text(md["elsa"], r)
    elif what == "crc":
        crcs = json.loads(md["elsa_checksums"])
        n = r.choice(sorted(crcs))
        r.choice([lambda: crcs.pop(n), lambda: crcs.update({n: "0badc0de"}), lambda: crcs.update({"ghost.weight": "00000000"})])()
        md["elsa_checksums"] = dumps(crcs)
    elif what == "unknown-key":
        md["extra"] = "1"
    elif what == "not-objects":
        index[r.choice(["metadata", "weight_map"])] = r.choice([[], None, "x"])
    if mode == "rehashed" and isinstance(index.get("metadata"), dict):
        index["metadata"][_SUM] = index_checksum(index)
    text = write_index(index)
    if what == "duplicated-key":
        text = text.replace('"metadata": {', '"metadata": {\n  "total_size": 5,', 1)
    files[INDEX] = text.encode()
    return what


def shard_names(files) -> list:
    return sorted(n for n in files if n != INDEX)


def shard_flip(files, r):
    s = r.choice(shard_names(files))
    files[s] = flip(files[s], r, r.choice([1, 1, 2, 4]), 0.7)


def shard_truncate(files, r):
    s = r.choice(shard_names(files))
    files[s] = truncate(files[s], r)


def shard_doc_lie(files, r):
    s = r.choice(shard_names(files))
    files[s], what = doc_lie(files[s], r, "rehashed")
    return what


def shard_swap(files, r):
    a, b = r.sample(shard_names(files), 2)
    if r.random() < 0.5:
        files[a] = files[b]
    else:
        del files[a]


def index_flip(files, r):
    b = bytearray(files[INDEX])
    for _ in range(r.choice([1, 1, 2, 3])):
        b[r.randrange(len(b))] ^= 1 << r.randrange(8)
    files[INDEX] = bytes(b)


def lie_everywhere(files, r):
    """The same lie in the index and every shard, every checksum recomputed."""
    index = json.loads(files[INDEX])
    what, text = lie_text(index["metadata"]["elsa"], r)
    index["metadata"]["elsa"] = text
    index["metadata"][_SUM] = index_checksum(index)
    files[INDEX] = write_index(index).encode()
    for s in shard_names(files):
        h, data = split(files[s])
        h["__metadata__"]["elsa"] = text
        files[s] = join(h, data, "rehashed")
    return what


def single(fn):
    """A corruption of the single file as a case: ``fn(raw, rng)`` -> bytes or (bytes, what)."""
    def case(r):
        out = fn(SINGLE[FILE], r)
        return ({FILE: out[0]}, out[1]) if isinstance(out, tuple) else ({FILE: out}, None)
    return case


def sharded(fn):
    """A corruption of the sharded checkpoint: ``fn(files, rng)`` changes the dict of files."""
    def case(r):
        files = dict(SHARDED)
        what = fn(files, r)
        return files, what
    return case


#: (kind, number of cases, case generator ``rng -> ({file name: bytes}, detail)``).
KINDS = [
    ("flip-1-bit-header", 100, single(lambda raw, r: flip(raw, r, 1, 1.0))),
    ("flip-1-bit-data", 60, single(lambda raw, r: flip(raw, r, 1, 0.0))),
    ("flip-2-16-bits", 60, single(lambda raw, r: flip(raw, r, r.randint(2, 16), 0.5))),
    ("overwrite-bytes", 50, single(overwrite)),
    ("truncate", 50, single(truncate)),
    ("append-bytes", 20, single(lambda raw, r: raw + bytes(r.randrange(256) for _ in range(r.randint(1, 64))))),
    ("header-length-lie", 40, single(length_lie)),
    ("doc-lie-stale-checksum", 100, single(lambda raw, r: doc_lie(raw, r, "stale"))),
    ("doc-lie-rehashed", 100, single(lambda raw, r: doc_lie(raw, r, "rehashed"))),
    ("doc-lie-no-checksum", 50, single(lambda raw, r: doc_lie(raw, r, "unhashed"))),
    ("header-lie-stale-checksum", 20, single(lambda raw, r: header_lie(raw, r, "stale"))),
    ("header-lie-rehashed", 30, single(lambda raw, r: header_lie(raw, r, "rehashed"))),
    ("shard-flip-bits", 60, sharded(shard_flip)),
    ("shard-truncate", 20, sharded(shard_truncate)),
    ("shard-doc-lie-rehashed", 30, sharded(shard_doc_lie)),
    ("shard-swapped-or-missing", 20, sharded(shard_swap)),
    ("index-flip-bits", 40, sharded(index_flip)),
    ("index-lie-stale-checksum", 50, sharded(lambda f, r: index_lie(f, r, "stale"))),
    ("index-lie-rehashed", 60, sharded(lambda f, r: index_lie(f, r, "rehashed"))),
    ("lie-everywhere-rehashed", 40, sharded(lie_everywhere)),
]
assert sum(n for _, n, _ in KINDS) == CASES

FILE = "m.safetensors"
INDEX = "model.safetensors.index.json"
SINGLE: dict = {}
SHARDED: dict = {}
DETAIL: collections.Counter = collections.Counter()  # (kind, detail, outcome), with ELSA_FUZZ_DETAIL=1


# -- the oracle ----------------------------------------------------------------------------------
def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def identical(got: ec.ELSAStateDict, ref: ec.ELSAStateDict) -> str:
    """'' if ``got`` has ``ref``'s tensors (bit patterns), metadata and batch-norm statistics, else
    what differs."""
    if sorted(got) != sorted(ref):
        return f"names {sorted(set(got) ^ set(ref))}"
    for n, t in ref.items():
        g = got[n]
        if g.dtype != t.dtype or g.shape != t.shape or not torch.equal(bits(g), bits(t)):
            return f"tensor {n}"
    if got.meta.to_json() != ref.meta.to_json() or got.meta.version != ref.meta.version:
        return "metadata"
    flat = lambda bn: {(lv, m, s): v for lv, per in bn.items() for m, st in per.items() for s, v in st.items()}  # noqa: E731
    a, b = flat(got.bn_stats), flat(ref.bn_stats)
    if sorted(a) != sorted(b) or any(a[k].dtype != b[k].dtype or not torch.equal(bits(a[k]), bits(b[k])) for k in b):
        return "batch-norm statistics"
    return ""


REASONS = [  # (reason, words of the message), first match
    ("checksum", ("SHA-256",)),
    ("crc", ("CRC-32", "checksum table", "has no checksum")),
    ("safetensors", ("not a readable safetensors", "truncated file", "cannot read tensor")),
    ("measured", ("measured", "out of range 0..", "breaks its structure")),
    ("index", ("index", "total_size", "shard")),
]


def reason(msg: str) -> str:
    return next((r for r, words in REASONS if any(w in msg for w in words)), "document")


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang(f"a case ran over {CASE_SECONDS} s")


def load_outcome(path: str, folder: str, ref) -> str:
    """'identical' or 'refused:<reason>'; AssertionError on a different content or a message
    that does not name the file; any other exception propagates."""
    try:
        got = ec.load_file(path)
    except ELSAFormatError as e:
        msg = str(e)
        assert folder in msg, f"the message does not name the file: {msg}"
        return "refused:" + reason(re.sub(re.escape(folder) + r"\S*", "", msg))
    diff = identical(got, ref)
    assert not diff, f"loaded a different content ({diff})"
    return "identical"


def verify_outcome(path: str) -> tuple:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["verify", path])
    return rc, err.getvalue()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """Write the checkpoint once (a single file and 5 shards) and keep its bytes."""
    d = tmp_path_factory.mktemp("pristine")
    enc = build()
    ec.save_file(enc, str(d / FILE))
    ec.save_file(enc, str(d / "s" / INDEX), max_shard_size=900)
    SINGLE[FILE] = (d / FILE).read_bytes()
    SHARDED.update({n: (d / "s" / n).read_bytes() for n in os.listdir(d / "s")})
    assert len(SHARDED) == 6
    ref = ec.load_file(str(d / FILE))
    assert not identical(ref, enc) and not identical(ec.load_file(str(d / "s" / INDEX)), enc)
    assert ref.meta.version == 2 and ref.meta.tied == {"head.weight": "emb.weight"} and sorted(ref.bn_stats) == [1, 2, 3, 4]
    return ref


def test_corruption_fuzz(tmp_path, pristine):
    """1,000 seeded corruptions: each refused (ELSAFormatError naming the file) or identical;
    ``elsa verify`` agrees on every 10th (exit 1 and one line, or exit 0)."""
    counts = collections.defaultdict(collections.Counter)
    failures = []
    old = signal.signal(signal.SIGALRM, _alarm)
    t0 = time.perf_counter()
    slowest = 0.0
    seed = 0
    try:
        for kind, n, gen in KINDS:
            for _ in range(n):
                r = random.Random(seed)
                folder = str(tmp_path / f"case{seed:04d}")
                os.makedirs(folder)
                files, what = gen(r)
                for name, data in files.items():
                    with open(os.path.join(folder, name), "wb") as f:
                        f.write(data)
                path = os.path.join(folder, FILE if FILE in files else INDEX)
                label = f"{kind}#{seed}" + (f" ({what})" if what else "")
                c0 = time.perf_counter()
                signal.alarm(CASE_SECONDS)
                try:
                    out = load_outcome(path, folder, pristine)
                    if seed % 10 == 0:
                        rc, err = verify_outcome(path)
                        want = 0 if out == "identical" else 1
                        assert rc == want and len(err.splitlines()) == want and err.count("\n") == want, \
                            f"elsa verify: exit {rc}, stderr {err!r}, load {out}"
                        counts[kind]["verified"] += 1
                    counts[kind][out] += 1
                    if os.environ.get("ELSA_FUZZ_DETAIL"):
                        DETAIL[(kind, what, out)] += 1
                except BaseException as e:  # noqa: B902 - the point is to catch anything
                    if isinstance(e, KeyboardInterrupt):
                        raise
                    failures.append(f"{label}: {type(e).__name__}: {e}")
                    counts[kind]["FAILED"] += 1
                finally:
                    signal.alarm(0)
                slowest = max(slowest, time.perf_counter() - c0)
                seed += 1
    finally:
        signal.signal(signal.SIGALRM, old)
    total = time.perf_counter() - t0
    print(f"\ncorruption fuzz: {seed} cases in {total:.1f} s (slowest {slowest * 1000:.0f} ms)")
    for kind, c in counts.items():
        print(f"  {kind:<28} " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
    for (kind, what, out), v in sorted(DETAIL.items(), key=str):
        print(f"    {kind:<28} {str(what):<30} {out:<22} {v}")
    assert seed == CASES
    assert not failures, f"{len(failures)} of {CASES} cases failed:\n" + "\n".join(failures[:40])
    assert total < 120, f"the fuzz took {total:.0f} s"


@pytest.mark.parametrize("structure", ["1:2", "1:4", "2:4", "3:4", "2:8", "7:8", "1:3", "block:2x2"])
def test_fast_structure_check_agrees(structure):
    """The N:M check the loader runs (M mask bytes read as one integer) agrees with the sum over
    each group of M (the reference, and the path of other devices)."""
    from elsa_codec.format.structure import _nm_ok_by_groups, mask_structure_ok, parse_structure
    from elsa_codec.oneshot.masks import _as_2d

    def _reference(mm, structure):
        st, m2 = parse_structure(structure), _as_2d(mm)
        if st.kind != "nm" or m2.shape[1] % st.m:
            return mask_structure_ok(mm, structure)
        return _nm_ok_by_groups(m2, st)

    g = torch.Generator().manual_seed(0)
    for i in range(200):
        shape = [[8, 16], [4, 4, 2, 2], [16], [3, 8], [8, 6], [1, 8], [2, 3, 4]][i % 7]
        m = torch.rand(shape, generator=g) < [0.1, 0.3, 0.5, 0.7][i % 4]
        for mm in (m, m.t()) if m.dim() == 2 else (m,):
            assert mask_structure_ok(mm, structure) == _reference(mm, structure), (shape, structure)
    empty = torch.zeros(0, 8, dtype=torch.bool)
    assert mask_structure_ok(empty, structure) == _reference(empty, structure)
