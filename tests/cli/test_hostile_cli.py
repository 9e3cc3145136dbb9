"""The `elsa` command against hostile files and CLI users: names that would forge a table, API
hints a CLI user cannot follow, an index name for a single-file output."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file as st_save

import elsa_codec as ec
from elsa_codec.cli.commands import main
from elsa_codec.cli.messages import cli_message, one_line, safe_text

# Names safetensors accepts (any UTF-8) that would move the cursor, colour, clear, break a line
# or reverse the text of the table they are printed in.
HOSTILE = [
    "x\n\x1b[31mfake.weight",  # a newline and an ANSI colour
    "y\r\x1b[2Kspoof.weight",  # carriage return, erase line
    "z\x7f\x9b2J.weight",  # DEL and the C1 control sequence introducer
    "u\u2028v\u2029w.weight",  # line and paragraph separators
    "r\u202egnp.weight",  # right-to-left override
    "i\u2066j\u2069\u200f.weight",  # bidi isolate and a right-to-left mark
]
PLAIN = ["ok.weight", "gewicht_ü.weight", "层.weight", "back\\slash.weight"]  # printable: printed as they are
RAW = ("\x1b", "\n", "\r", "\x7f", "\x9b", "\u2028", "\u2029", "\u202e", "\u2066", "\u2069", "\u200f")


def run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture
def hostile(tmp_path):
    """An ELSA file whose encoded tensors have the HOSTILE and PLAIN names (via ec.save_file)."""
    g = torch.Generator().manual_seed(0)
    sd = {n: torch.randn(8, 8, generator=g) for n in HOSTILE + PLAIN}
    enc = ec.encode(sd, ec.magnitude_counters(sd, [0.75, 0.5], names=list(sd)))
    p = str(tmp_path / "hostile.safetensors")
    ec.save_file(enc, p)
    return p, enc


def _no_raw(text, *, lines_ok=False):
    """No raw control character in ``text`` (``lines_ok``: but the line breaks of a table)."""
    bad = [c for c in RAW if c in (text.replace("\n", "") if lines_ok else text)]
    assert not bad, f"raw control characters {bad!r} printed: {text!r}"


def test_inspect_escapes_control_characters_in_names(capsys, hostile):
    path, enc = hostile
    rc, out, err = run(capsys, "inspect", path)
    assert rc == 0, err
    _no_raw(out, lines_ok=True)
    lines = out.split("\n")
    rows = lines[lines.index("") + 2 : -1]  # after the blank line and the tensor header
    assert len(rows) == len(HOSTILE) + len(PLAIN), "a name broke a line of the table"
    names = [r.split(" ")[0] for r in rows]
    assert names == [safe_text(n) for n in HOSTILE + PLAIN]
    assert names[0] == "x\\n\\x1b[31mfake.weight" and names[4] == "r\\u202egnp.weight"
    assert names[len(HOSTILE):] == PLAIN  # plain names unchanged


def test_inspect_json_keeps_the_names_exact(capsys, hostile):
    path, _ = hostile
    rc, out, _ = run(capsys, "inspect", path, "--json")
    assert rc == 0
    _no_raw(out, lines_ok=True)
    assert sorted(json.loads(out)["tensors"]) == sorted(HOSTILE + PLAIN)


def _broken(path, enc, name):
    """Rewrite ``path`` with a code out of range in tensor ``name`` (load_file refuses it, naming it)."""
    w = enc[name].clone()
    w.view(torch.int32)[0, 0] |= 3
    ec.save_file(ec.ELSAStateDict({**enc, name: w}, enc.meta), path)


@pytest.mark.parametrize("argv", [["verify", "{p}"], ["extract", "{p}", "--level", "1", "-o", "{out}"]], ids=["verify", "extract"])
def test_errors_naming_a_hostile_tensor_are_one_escaped_line(tmp_path, capsys, hostile, argv):
    path, enc = hostile
    _broken(path, enc, HOSTILE[0])
    out = str(tmp_path / "x.safetensors")
    rc, o, e = run(capsys, *[a.format(p=path, out=out) for a in argv])
    assert rc == (1 if argv[0] == "verify" else 2)
    assert len(e.strip().split("\n")) == 1, e
    _no_raw(e.strip())
    assert "\\x1b[31mfake.weight: code 3 is out of range" in e
    assert not os.path.exists(out)


def test_safe_text_and_one_line():
    assert safe_text("a.weight") == "a.weight" and safe_text("层 ü\\") == "层 ü\\"
    assert safe_text("a\x1b[0m\x00\x7f\x85\x9b") == "a\\x1b[0m\\x00\\x7f\\x85\\x9b"
    assert safe_text("\u2028\u2029\u202e\u200b\xa0") == "\\u2028\\u2029\\u202e\\u200b\\xa0"
    assert safe_text("\U000e0001") == "\\U000e0001"  # a tag character (format, invisible)
    assert one_line("first line\n  second\tline\x1b[2K") == "first line second line\\x1b[2K"


@pytest.fixture
def plain(tmp_path):
    def make(sd, name="in.safetensors"):
        p = str(tmp_path / name)
        st_save(sd, p)
        return p

    return make


def test_no_selectable_tensor_names_the_cli_option(tmp_path, capsys, plain):
    src = plain({"a.bias": torch.randn(8), "b.bias": torch.randn(8)})
    out = str(tmp_path / "o.safetensors")
    rc, _, e = run(capsys, "encode", src, "-o", out, "--levels", "0.5", "-q")
    assert rc == 2 and "no tensor selected" in e
    assert "names=" not in e and "--counters" in e
    assert not os.path.exists(out)


def test_float64_checkpoint_hints_dtype(tmp_path, capsys, plain):
    src = plain({"a.weight": torch.randn(16, 16, dtype=torch.float64)})
    out = str(tmp_path / "o.safetensors")
    rc, _, e = run(capsys, "encode", src, "-o", out, "--levels", "0.5", "-q")
    assert rc == 2 and "float64" in e and "--dtype float32" in e
    assert not os.path.exists(out)
    rc, o, e = run(capsys, "encode", src, "-o", out, "--levels", "0.5", "-q", "--dtype", "float32")  # the hint works
    assert rc == 0, e
    assert ec.load_file(out)["a.weight"].dtype == torch.float32


@pytest.mark.parametrize(
    "extra, say, not_say",
    [
        (["--code-bits", "9"], "--code-bits 9 is outside 1..8", "code_bits="),
        (["--max-shard-size", "big"], "--max-shard-size 'big' is not a size", "max_shard_size"),
        (["--max-shard-size", "0"], "--max-shard-size must be at least 1 byte", "save_file"),
        (["--jobs", "0"], "--jobs must be a positive int", "jobs="),
        (["--structure", "2:4"], "not as --structure", "structure="),
    ],
    ids=["code-bits", "shard-size-word", "shard-size-zero", "jobs", "nm-structure"],
)
def test_errors_name_cli_options_not_api_arguments(tmp_path, capsys, plain, extra, say, not_say):
    src = plain({"a.weight": torch.randn(16, 16)})
    out = str(tmp_path / "o.safetensors")
    rc, _, e = run(capsys, "encode", src, "-o", out, "--levels", "0.5", "-q", *extra)
    assert rc == 2 and say in e and not_say not in e, e
    assert len(e.strip().split("\n")) == 1


def test_cli_message_other_commands_unchanged():
    msg = "pass names= and code_bits=2"
    assert cli_message(msg, "inspect") == msg
    assert "--select all" in cli_message("no tensor selected (pass names=)", "convert")


@pytest.mark.parametrize("name", ["x.safetensors.index.json", "x.INDEX.JSON", "model.index.json"])
def test_extract_refuses_an_index_name(tmp_path, capsys, hostile, plain, name):
    path, _ = hostile
    out = str(tmp_path / name)
    before = sorted(os.listdir(tmp_path))
    rc, o, e = run(capsys, "extract", path, "--level", "1", "-o", out)
    assert rc == 2 and "writes one safetensors file, not shards plus an index" in e
    assert len(e.strip().split("\n")) == 1 and "Traceback" not in e
    assert sorted(os.listdir(tmp_path)) == before
    # before any work: a plain (not ELSA) input is not even read
    rc, o, e = run(capsys, "extract", plain({"a": torch.zeros(2)}, "p.safetensors"), "--level", "1", "-o", out)
    assert rc == 2 and "not shards plus an index" in e and "not an ELSA" not in e
