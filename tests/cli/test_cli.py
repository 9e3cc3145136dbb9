"""The `elsa` command line: encode, inspect (--json), extract, verify, bad input."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file as st_load
from safetensors.torch import save_file as st_save

import elsa_codec as ec
from elsa_codec.cli.commands import main


@pytest.fixture
def ckpt(tmp_path):
    g = torch.Generator().manual_seed(3)
    sd = {"a.weight": torch.randn(40, 64, generator=g), "a.bias": torch.randn(40, generator=g), "c.weight": torch.randn(8, 4, 3, 3, generator=g)}
    p = str(tmp_path / "in.safetensors")
    st_save(sd, p)
    return p, sd


def run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize(
    "args, structs",
    [
        (["--levels", "0.9,0.75,0.5"], ["unstructured"] * 3),
        (["--levels", "0.75,0.5", "--structure", "block:8x8", "--distribution", "global"], ["block:8x8"] * 2),
        (["--levels", "1:4,2:4", "--dtype", "bfloat16"], ["1:4", "2:4"]),
    ],
    ids=["unstructured", "block-global", "nm-bf16"],
)
def test_encode_inspect_extract_verify(tmp_path, capsys, ckpt, args, structs):
    src, sd = ckpt
    out = str(tmp_path / "elsa.safetensors")
    rc, o, e = run(capsys, "encode", src, "-o", out, "-q", *args)
    assert rc == 0, e
    assert "encoded tensors" in o
    rc, o, _ = run(capsys, "inspect", out, "--json")
    d = json.loads(o)
    assert [lv["structure"] for lv in d["levels"][:-1]] == structs
    assert d["levels"][-1]["structure"] == "dense" and sorted(d["tensors"]) == ["a.weight", "c.weight"]
    rc, o, _ = run(capsys, "inspect", out)
    assert rc == 0 and "code bits" in o and "a.weight" in o
    rc, o, _ = run(capsys, "verify", out)
    assert rc == 0 and "OK" in o
    enc = ec.load_file(out)
    for lvl in ("1", "dense"):
        p = str(tmp_path / f"l{lvl}.safetensors")
        rc, o, e = run(capsys, "extract", out, "--level", lvl, "-o", p)
        assert rc == 0, e
        plain = st_load(p)
        ref = ec.extract(enc, lvl if lvl == "dense" else int(lvl))
        assert all(torch.equal(plain[k], ref[k]) for k in ref)


def test_verify_detects_broken_invariants(tmp_path, capsys, ckpt):
    src, sd = ckpt
    out = str(tmp_path / "elsa.safetensors")
    assert run(capsys, "encode", src, "-o", out, "-q", "--levels", "0.9,0.5")[0] == 0
    # rewrite a weight with a code out of range (3 > T=2) and a consistent checksum: verify must catch it
    enc = ec.load_file(out)
    w = enc["a.weight"].clone()
    w.view(torch.int32)[0, 0] |= 3
    bad = ec.ELSAStateDict({**enc, "a.weight": w}, enc.meta)
    ec.save_file(bad, out)
    rc, o, e = run(capsys, "verify", out)
    assert rc == 1 and "a.weight: code 3 is out of range 0..2" in e
    # wrong recorded sparsity
    enc.meta.levels[0].sparsity = 0.5
    ec.save_file(enc, out)
    rc, o, e = run(capsys, "verify", out)
    assert rc == 1 and "level 1: sparsity recorded 0.500000" in e


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["encode", "{src}", "-o", "{out}", "--levels", "0.5,0.9"], "sparsest first"),
        (["encode", "{src}", "-o", "{out}", "--levels", "0.9,abc"], "neither a sparsity"),
        (["encode", "{src}", "-o", "{src}", "--levels", "0.5"], "is the input file"),
        (["encode", "{out}", "-o", "{out2}", "--levels", "0.5"], "no such file"),
        (["extract", "{src}", "--level", "1", "-o", "{out}"], "not an ELSA checkpoint"),
        (["inspect", "{src}"], "not an ELSA checkpoint"),
    ],
    ids=["order", "not-a-number", "overwrite-input", "missing", "extract-plain", "inspect-plain"],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, ckpt, argv, msg):
    src, _ = ckpt
    out, out2 = str(tmp_path / "o.safetensors"), str(tmp_path / "o2.safetensors")
    before = open(src, "rb").read()
    rc, o, e = run(capsys, *[a.format(src=src, out=out, out2=out2) for a in argv])
    assert rc == 2 and msg in e
    assert not os.path.exists(out) and not os.path.exists(out2)
    assert open(src, "rb").read() == before


def test_extract_level_out_of_range(tmp_path, capsys, ckpt):
    src, _ = ckpt
    out = str(tmp_path / "elsa.safetensors")
    run(capsys, "encode", src, "-o", out, "-q", "--levels", "0.5")
    rc, o, e = run(capsys, "extract", out, "--level", "3", "-o", str(tmp_path / "x.safetensors"))
    assert rc == 2 and "level 3 is out of range" in e


@pytest.mark.parametrize("cmd", ["encode", "inspect", "extract", "verify"])
def test_help(capsys, cmd):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0 and "usage: elsa" in capsys.readouterr().out
