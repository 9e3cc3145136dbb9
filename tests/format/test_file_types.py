"""File-type mistakes are named (issue 32, finding 3): a FIFO, a device, a symlink loop, a
torch.save zip or pickle under a ``.safetensors`` name, a tensor named twice, JSON nested too deep.

One table (``CASES``): each makes a file in a temporary folder and gives the reader to call and a
pattern the one-line ELSAFormatError must match; the message names the file. Nothing blocks: a
FIFO is refused from ``os.stat`` before it is opened.
"""
from __future__ import annotations

import json
import os
import pickle
import signal

import pytest
import torch
from torch import nn

import elsa_codec as ec
from elsa_codec.format.file import load_counters, read_meta

DEEP = 100_000  # far past Python's recursion limit: json alone would raise RecursionError


def _encoded():
    torch.manual_seed(0)
    sd = nn.Linear(8, 4).state_dict()
    return ec.encode(sd, ec.magnitude_counters(sd, [0.5]))


def _raw(header, data: bytes = b"") -> bytes:
    hb = (header if isinstance(header, str) else json.dumps(header)).encode()
    return len(hb).to_bytes(8, "little") + hb + data


def _write(path, blob: bytes) -> str:
    with open(path, "wb") as f:
        f.write(blob)
    return str(path)


def fifo(d):
    p = str(d / "pipe.safetensors")
    os.mkfifo(p)
    return p


def loop(d):
    os.symlink(d / "b.safetensors", d / "a.safetensors")
    os.symlink(d / "a.safetensors", d / "b.safetensors")
    return str(d / "a.safetensors")


def dangling(d):
    os.symlink(d / "gone.safetensors", d / "a.safetensors")
    return str(d / "a.safetensors")


def zipped(d):
    p = str(d / "m.safetensors")
    torch.save(nn.Linear(2, 2).state_dict(), p)
    return p


def legacy_pickle(d):
    p = str(d / "m.safetensors")
    torch.save(nn.Linear(2, 2).state_dict(), p, _use_new_zipfile_serialization=False)
    return p


def plain_pickle(protocol):
    return lambda d: _write(d / "m.safetensors", pickle.dumps({"w": [1.0] * 4}, protocol=protocol))


def duplicated(d):
    e = '{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'
    return _write(d / "m.safetensors", _raw('{"w":' + e + ',"w":' + e + "}", bytes(8)))


def deep_header(d):
    return _write(d / "m.safetensors", _raw('{"x":' + "[" * DEEP + "]" * DEEP + "}"))


def _rewritten(d, fn) -> str:
    """An ELSA file whose metadata ``fn`` changed (its header checksum dropped)."""
    p = str(d / "m.safetensors")
    ec.save_file(_encoded(), p)
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(p, "pt") as f:
        md, ts = dict(f.metadata()), {n: f.get_tensor(n) for n in f.keys()}
    md.pop("elsa_header_sha256")
    fn(md)
    save_file(ts, p, metadata=md)
    return p


def deep_document(d):
    return _rewritten(d, lambda md: md.update(elsa="[" * DEEP + "]" * DEEP))


def deep_checksums(d):
    return _rewritten(d, lambda md: md.update(elsa_checksums="{\"a\":" + "[" * DEEP + "]" * DEEP + "}"))


def deep_index(d):
    return _write(d / "m.safetensors.index.json", ('{"weight_map":{},"metadata":' + "[" * DEEP + "]" * DEEP + "}").encode())


def index_fifo(d):
    p = str(d / "m.safetensors.index.json")
    os.mkfifo(p)
    return p


def deep_counters(d):
    from safetensors.torch import save_file

    p = str(d / "c.safetensors")
    save_file({"w": torch.zeros(2, dtype=torch.uint8)}, p, metadata={"elsa_counters": "[" * DEEP + "]" * DEEP})
    return p


def huge_header(d):
    return _write(d / "m.safetensors", (200 * 1024 * 1024).to_bytes(8, "little") + b"{" + bytes(64))


# id, make the file (gets the folder), reader, pattern the message must match
CASES = [
    ("fifo", fifo, ec.load_file, r"is a FIFO \(named pipe\), not a regular file"),
    ("fifo-read-meta", fifo, read_meta, r"is a FIFO"),
    ("fifo-counters", fifo, load_counters, r"is a FIFO"),
    ("index-fifo", index_fifo, ec.load_file, r"is a FIFO .*an index file"),
    ("dev-zero", lambda d: "/dev/zero", ec.load_file, r"/dev/zero: is a character device, not a regular file"),
    ("symlink-loop", loop, ec.load_file, r"symlink loop"),
    ("dangling-symlink", dangling, ec.load_file, r"no such file \(a dangling symlink\)"),
    ("torch-save-zip", zipped, ec.load_file, r"is a torch.save zip file.*torch.load.*elsa encode"),
    ("torch-save-legacy", legacy_pickle, ec.load_file, r"is a pickle.*torch.load.*elsa encode"),
    ("pickle-protocol-2", plain_pickle(2), ec.load_file, r"is a pickle"),
    ("pickle-protocol-5", plain_pickle(5), read_meta, r"is a pickle"),
    ("duplicated-tensor", duplicated, ec.load_file, r"tensor 'w' is named twice in the header"),
    ("deep-header", deep_header, ec.load_file, r"nested deeper than 64 levels"),
    ("deep-document", deep_document, ec.load_file, r"metadata document is not valid JSON \(nested deeper than 64"),
    ("deep-checksums", deep_checksums, ec.load_file, r"malformed checksum table \(nested deeper than 64"),
    ("deep-index", deep_index, ec.load_file, r"malformed index file \(nested deeper than 64"),
    ("deep-counters", deep_counters, load_counters, r"not an ELSA counters file"),
    ("huge-header", huge_header, ec.load_file, r"over the 100 MB limit"),
]


def _alarm(signum, frame):
    raise TimeoutError("the reader blocked")


@pytest.mark.parametrize("make, reader, pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_file_type_is_named(tmp_path, make, reader, pattern):
    path = make(tmp_path)
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(10)
    try:
        with pytest.raises(ec.ELSAFormatError, match=pattern) as ei:
            reader(path)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    msg = str(ei.value)
    assert path in msg and "\n" not in msg, msg


def test_fifo_with_a_writer_is_never_read(tmp_path):
    """A FIFO that has a writer is still refused without reading from it."""
    p = fifo(tmp_path)
    fd = os.open(p, os.O_RDWR | os.O_NONBLOCK)  # a writer end that keeps the FIFO open
    try:
        os.write(fd, _raw({"__metadata__": {}}))
        with pytest.raises(ec.ELSAFormatError, match="FIFO"):
            ec.load_file(p)
        assert os.read(fd, 100)[:8] == _raw({"__metadata__": {}})[:8]  # the bytes are still there
    finally:
        os.close(fd)


def test_header_of_0x380_bytes_is_not_a_pickle(tmp_path):
    """A safetensors header of 896 bytes starts with 0x80 0x03, as a pickle does: still read."""
    md = {"pad": "x" * 850}
    hb = json.dumps({"__metadata__": md, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    hb += b" " * (0x380 - len(hb))
    p = _write(tmp_path / "p.safetensors", len(hb).to_bytes(8, "little") + hb + bytes(4))
    from elsa_codec.format.file import _open_safetensors

    with _open_safetensors(p) as f:
        assert f.keys() == ["w"] and torch.equal(f.get_tensor("w"), torch.zeros(1))
