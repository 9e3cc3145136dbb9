"""Every bad input is a clear error before any work, and nothing is lost (issue: input hygiene).

One table for the Python API (``API_CASES``) and one for the ``elsa`` CLI (``CLI_CASES``): adding
a case is one line. Each API case gives the exception type and a pattern that names the argument;
after the failure the model and the input file are unchanged. Each CLI case exits 2 with one line
on stderr, no traceback, and leaves no output file (nor a temporary one) behind.
"""
from __future__ import annotations

import copy
import hashlib
import os

import numpy as np
import pytest
import torch
from torch import nn

import elsa_codec as ec
from elsa_codec import ELSAError
from elsa_codec.cli.commands import main as cli_main
from elsa_codec.errors import ELSATypeError


def make_model(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))


@pytest.fixture
def env(tmp_path):
    """A model, its encoded state dict and file, a plain checkpoint, and a swapped model."""
    model = make_model()
    sd = model.state_dict()
    counters = ec.magnitude_counters(sd, [0.75, 0.5])
    enc = ec.encode(sd, counters)
    path = str(tmp_path / "m.safetensors")
    ec.save_file(enc, path)
    plain = str(tmp_path / "plain.safetensors")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, plain)
    served = ec.load(path, make_model())
    return dict(model=model, sd=sd, counters=counters, enc=enc, path=path, plain=plain, served=served, tmp=tmp_path)


def _nm_lie(e):
    c = ec.magnitude_counters(e["sd"], [0.5])
    return ec.encode(e["sd"], c, structures=["2:4"])


def _meta_model():
    with torch.device("meta"):
        m = make_model()
    m.add_module("extra", nn.Linear(2, 2, device="meta"))
    return m


def _swap_twice(e):
    enc = ec.load_file(e["path"])
    ec.swap_(make_model(), enc)
    ec.swap_(e["model"], enc)


def _too_many(dtype, T):
    def f(e):
        w = torch.randn(64, 64).to(dtype)
        levels = [1 - (i + 1) / (T + 1) for i in range(T)]
        c = ec.magnitude_counters({"w": w}, levels, names=["w"])
        ec.encode({"w": w}, c)

    return f


# id, call (gets the env dict), exception type, pattern the message must match
API_CASES = [
    ("load-swapped-args", lambda e: ec.load(e["model"], e["path"]), ELSATypeError, r"swapped.*load\(path, model\)"),
    ("load-not-a-model", lambda e: ec.load(e["path"], e["sd"]), ELSATypeError, r"model must be a torch.nn.Module"),
    ("encode-a-model", lambda e: ec.encode(e["model"], e["counters"]), ELSATypeError, r"state_dict.*model.state_dict\(\)"),
    ("encode-counters-a-model", lambda e: ec.encode(e["sd"], e["model"]), ELSATypeError, r"counters must be a mapping"),
    ("encode-empty-counters", lambda e: ec.encode(e["sd"], {}), ELSAError, r"counters is empty"),
    ("encode-code-bits-str", lambda e: ec.encode(e["sd"], e["counters"], code_bits="2"), ELSATypeError, r"code_bits must be an int"),
    ("encode-structures-str", lambda e: ec.encode(e["sd"], e["counters"], structures="2:4"), ELSATypeError, r"structures must be a list"),
    ("encode-structure-lie", _nm_lie, ELSAError, r"0.weight: structures say level 1 is 2:4"),
    ("levels-one-string", lambda e: ec.magnitude_counters(e["sd"], "0.9,0.5"), ELSATypeError, r"levels must be a list.*\[0.9"),
    ("names-one-string", lambda e: ec.magnitude_counters(e["sd"], [0.5], names="0.weight"), ELSATypeError, r"names must be a list"),
    ("names-not-str", lambda e: ec.magnitude_counters(e["sd"], [0.5], names=[0]), ELSATypeError, r"names: 0 is a int"),
    ("levels-not-sparsest-first", lambda e: ec.magnitude_counters(e["sd"], [0.5, 0.9]), ELSAError, r"sparsest first"),
    ("sd-with-non-tensor", lambda e: ec.magnitude_counters({"w": [1.0]}, [0.5]), ELSATypeError, r"state_dict\['w'\] is a list"),
    ("masks-not-lists", lambda e: ec.counters_from_masks({"w": torch.ones(2, 2, dtype=torch.bool)}), ELSATypeError, r"masks\['w'\] must be a list"),
    ("save-swapped-args", lambda e: ec.save_file(e["path"], e["enc"]), ELSATypeError, r"encoded must be an ELSAStateDict"),
    ("save-plain-dict", lambda e: ec.save_file(dict(e["sd"]), str(e["tmp"] / "o.safetensors")), ELSATypeError, r"plain mapping"),
    ("save-path-not-path", lambda e: ec.save_file(e["enc"], 3), ELSATypeError, r"path must be a path"),
    ("shard-size-negative", lambda e: ec.save_file(e["enc"], str(e["tmp"] / "o.safetensors"), max_shard_size=-1), ELSAError, r"max_shard_size must be at least 1 byte"),
    ("shard-size-zero", lambda e: ec.save_file(e["enc"], str(e["tmp"] / "o.safetensors"), max_shard_size="0MB"), ELSAError, r"max_shard_size"),
    ("shard-size-words", lambda e: ec.save_file(e["enc"], str(e["tmp"] / "o.safetensors"), max_shard_size="big"), ELSAError, r"max_shard_size='big' is not a size"),
    ("shard-size-float", lambda e: ec.save_file(e["enc"], str(e["tmp"] / "o.safetensors"), max_shard_size=1.5), ELSATypeError, r"max_shard_size must be a number"),
    ("load-file-a-model", lambda e: ec.load_file(e["model"]), ELSATypeError, r"path must be a path.*swapped"),
    ("load-file-a-directory", lambda e: ec.load_file(str(e["tmp"])), ec.ELSAFormatError, r"is a directory"),
    ("extract-swapped-args", lambda e: ec.extract(1, e["enc"]), ELSATypeError, r"encoded must be an ELSAStateDict"),
    ("extract-level-out-of-range", lambda e: ec.extract(e["enc"], 4), ELSAError, r"level 4 is out of range"),
    ("extract-level-word", lambda e: ec.extract(e["enc"], "densest"), ELSAError, r"'densest' is not an integer"),
    ("swap-swapped-args", lambda e: ec.swap_(e["path"], e["model"]), ELSATypeError, r"swapped.*swap_\(model, encoded\)"),
    ("swap-model-for-encoded", lambda e: ec.swap_(e["model"], make_model()), ELSATypeError, r"swapped"),
    ("swap-one-dict-two-models", _swap_twice, ELSAError, r"already serves a Sequential"),
    ("meta-model-missing-tensor", lambda e: ec.swap_(_meta_model(), ec.load_file(e["path"]), strict=False), ELSAError, r"'extra.weight'.*meta device"),
    ("set-level-swapped-args", lambda e: ec.set_level(2, e["served"]), ELSATypeError, r"swapped|model must be"),
    ("set-level-out-of-range", lambda e: ec.set_level(e["served"], 9), ELSAError, r"level 9 is out of range"),
    ("set-level-plain-model", lambda e: ec.set_level(e["model"], 1), ELSAError, r"no ELSA module"),
    ("set-sparsity-word", lambda e: ec.set_sparsity(e["served"], "half"), ELSAError, r"sparsity must be a number"),
    ("save-counters-swapped", lambda e: ec.save_counters(str(e["tmp"] / "c.safetensors"), e["counters"]), ELSATypeError, r"counters must be a Counters"),
    ("embed-levels-swapped", lambda e: ec.embed_levels([0.5], e["model"], lambda m, p: None, steps=2), ELSATypeError, r"embed_levels: model must be"),
    ("embed-levels-one-string", lambda e: ec.embed_levels(e["model"], "0.9,0.5", lambda m, p: None, steps=2), ELSATypeError, r"levels must be a list.*'0.9', '0.5'"),
    ("embedder-swapped", lambda e: ec.LevelEmbedder(ec.ELSAConfig(levels=[0.5], steps=2), e["model"]), ELSATypeError, r"swapped.*LevelEmbedder\(model, config\)"),
    ("embedder-config-dict", lambda e: ec.LevelEmbedder(e["model"], {"levels": [0.5]}), ELSATypeError, r"config must be an ELSAConfig.*ELSAConfig\(\*\*config\)"),
    ("recalibrate-not-a-model", lambda e: ec.recalibrate_bn("model", []), ELSATypeError, r"recalibrate_bn: model must be"),
    ("levels-of-a-state-dict", lambda e: ec.elsa_state_dict(e["sd"]), ELSATypeError, r"model must be a torch.nn.Module"),
    ("set-sparsity-swapped", lambda e: ec.set_sparsity(0.5, e["served"]), ELSATypeError, r"set_sparsity: model must be"),
    ("swap-filter-fn-not-callable", lambda e: ec.swap_(make_model(), ec.load_file(e["path"]), filter_fn="0"), ELSATypeError, r"filter_fn must be a callable"),
    ("save-counters-not-encoded", lambda e: ec.save_file(e["counters"], str(e["tmp"] / "o.safetensors")), ELSATypeError, r"got Counters: encode them first"),
    ("encode-file-a-state-dict", lambda e: ec.encode_file(e["sd"], str(e["tmp"] / "o.safetensors"), levels=[0.5]), ELSATypeError, r"in_path must be a path.*swapped"),
    ("encode-file-levels-string", lambda e: ec.encode_file(e["plain"], str(e["tmp"] / "o.safetensors"), levels="0.9,0.5"), ELSATypeError, r"levels must be a list"),
    ("too-many-levels-float32", _too_many(torch.float32, 256), ELSAError, r"at most 255 levels"),
    ("too-many-levels-float16", _too_many(torch.float16, 16), ELSAError, r"at most 15 levels"),
    ("too-many-levels-bfloat16", _too_many(torch.bfloat16, 8), ELSAError, r"at most 7 levels"),
    ("encode-meta-weights", lambda e: ec.encode(_meta_model().state_dict(), e["counters"]), ELSAError,
     r"encode: state_dict\['0.weight'\] is a meta tensor.*hold no data.*to_empty"),
    ("encode-meta-counters", lambda e: ec.encode(e["sd"], {k: v.to("meta") for k, v in e["counters"].items()}), ELSAError,
     r"encode: counters\['0.weight'\] is a meta tensor.*hold no data"),
    ("magnitude-counters-meta-model", lambda e: ec.magnitude_counters(_meta_model(), [0.5]), ELSAError,
     r"magnitude_counters: state_dict\['0.weight'\] is a meta tensor.*hold no data"),
    ("set-level-bool", lambda e: ec.set_level(e["served"], True), ELSAError, r"level True is not an integer"),
    ("set-level-float", lambda e: ec.set_level(e["served"], 2.0), ELSAError, r"level 2.0 is not an integer"),
    ("set-level-numpy-float", lambda e: ec.set_level(e["served"], np.float64(2.0)), ELSAError, r"is not an integer"),
    ("set-level-numpy-bool", lambda e: ec.set_level(e["served"], np.bool_(True)), ELSAError, r"is not an integer"),
    ("set-level-float-tensor", lambda e: ec.set_level(e["served"], torch.tensor(2.0)), ELSAError, r"level tensor\(2.\) is not an integer"),
    ("set-level-bool-tensor", lambda e: ec.set_level(e["served"], torch.tensor(True)), ELSAError, r"is not an integer"),
    ("set-level-1d-tensor", lambda e: ec.set_level(e["served"], torch.tensor([2])), ELSAError, r"a tensor of shape \(1,\).*is not an integer"),
    ("set-level-numpy-out-of-range", lambda e: ec.set_level(e["served"], np.int64(9)), ELSAError, r"level 9 is out of range"),
    ("extract-level-tensor-out-of-range", lambda e: ec.extract(e["enc"], torch.tensor(0)), ELSAError, r"level 0 is out of range"),
    ("load-level-float", lambda e: ec.load(e["path"], make_model(), level=2.0), ELSAError, r"level 2.0 is not an integer"),
]


def _digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _snapshot(model):
    return [(n, type(m).__name__) for n, m in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("call, exc, pattern", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_bad_input(env, call, exc, pattern):
    before_file = _digest(env["path"])
    before_model = _snapshot(env["model"])
    with pytest.raises(exc, match=pattern):
        call(env)
    assert _digest(env["path"]) == before_file, "the input file changed"
    mods, sd = _snapshot(env["model"])
    assert mods == before_model[0], "the model was (half-)swapped"
    assert all(torch.equal(sd[k], before_model[1][k]) for k in sd), "the model's tensors changed"


INTEGER_LIKE = [np.int64(2), np.int32(2), np.uint8(2), torch.tensor(2), torch.tensor(2, dtype=torch.uint8)]


@pytest.mark.parametrize("level", INTEGER_LIKE, ids=lambda v: f"{type(v).__module__}.{type(v).__name__}-{getattr(v, 'dtype', '')}")
def test_integer_like_levels_are_accepted(env, level):
    """A numpy integer scalar or a 0-d integer tensor is a level (operator.index), as an int is."""
    assert ec.set_level(env["served"], level) == 2
    assert all(torch.equal(a, b) for a, b in zip(ec.extract(env["enc"], level).values(), ec.extract(env["enc"], 2).values()))
    m = ec.load(env["path"], make_model(), level=level)
    ref = ec.load(env["path"], make_model(), level=2)
    x = torch.randn(3, 16)
    assert torch.equal(m(x), ref(x))
    from elsa_codec.format.encode import resolve_level

    assert type(resolve_level(level, 2)) is int


def test_type_errors_are_both_elsa_and_type_errors(env):
    with pytest.raises(TypeError):
        ec.encode(env["model"], env["counters"])
    with pytest.raises(ValueError):
        ec.encode(env["model"], env["counters"])


LONG = "n" * (255 - len(".safetensors")) + ".safetensors"  # a legal 255-byte name
TOO_LONG = "n" * 256 + ".safetensors"

# id, argv (format keys: in = ELSA file, plain = plain checkpoint, tmp = folder), pattern on stderr
CLI_CASES = [
    ("encode-out-is-dir", ["encode", "{plain}", "-o", "{tmp}", "--levels", "0.5"], r"is a directory"),
    ("encode-out-missing-parent", ["encode", "{plain}", "-o", "{tmp}/nope/o.safetensors", "--levels", "0.5"], r"does not exist"),
    ("encode-out-unwritable", ["encode", "{plain}", "-o", "/proc/elsa-test.safetensors", "--levels", "0.5"], r"cannot write in the folder"),
    ("encode-out-name-too-long", ["encode", "{plain}", "-o", "{tmp}/" + TOO_LONG, "--levels", "0.5"], r"file name is \d+ bytes long"),
    ("encode-out-is-input", ["encode", "{plain}", "-o", "{plain}", "--levels", "0.5"], r"is the input file"),
    ("encode-missing-input", ["encode", "{tmp}/none.safetensors", "-o", "{tmp}/o.safetensors", "--levels", "0.5"], r"no such file"),
    ("encode-levels-words", ["encode", "{plain}", "-o", "{tmp}/o.safetensors", "--levels", "0.9,half"], r"'half' is neither a sparsity"),
    ("encode-levels-order", ["encode", "{plain}", "-o", "{tmp}/o.safetensors", "--levels", "0.5,0.9"], r"sparsest first"),
    ("encode-levels-empty", ["encode", "{plain}", "-o", "{tmp}/o.safetensors", "--levels", ","], r"lists no level"),
    ("encode-code-bits-word", ["encode", "{plain}", "-o", "{tmp}/o.safetensors", "--levels", "0.5", "--code-bits", "two"], r"invalid int value"),
    ("encode-no-levels", ["encode", "{plain}", "-o", "{tmp}/o.safetensors"], r"one of the arguments --levels --counters is required"),
    ("encode-too-many-bf16", ["encode", "{plain}", "-o", "{tmp}/o.safetensors", "--dtype", "bfloat16", "--levels",
                              "0.9,0.8,0.7,0.6,0.5,0.4,0.3,0.2"], r"at most 7 levels"),
    ("extract-level-99", ["extract", "{in}", "--level", "99", "-o", "{tmp}/x.safetensors"], r"level 99 is out of range"),
    ("extract-level-word", ["extract", "{in}", "--level", "densest", "-o", "{tmp}/x.safetensors"], r"'densest' is not an integer"),
    ("extract-out-is-dir", ["extract", "{in}", "--level", "1", "-o", "{tmp}"], r"is a directory"),
    ("extract-out-is-input", ["extract", "{in}", "--level", "1", "-o", "{in}"], r"is the input file"),
    ("extract-not-elsa", ["extract", "{plain}", "--level", "1", "-o", "{tmp}/x.safetensors"], r"not an ELSA checkpoint"),
    ("inspect-missing", ["inspect", "{tmp}/none.safetensors"], r"no such file"),
    ("unknown-command", ["frobnicate"], r"invalid choice"),
]


@pytest.mark.parametrize("argv, pattern", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(env, capsys, argv, pattern):
    fmt = {"in": env["path"], "plain": env["plain"], "tmp": str(env["tmp"])}
    argv = [a.format(**fmt) for a in argv]
    before = sorted(os.listdir(env["tmp"]))
    digests = {p: _digest(p) for p in (env["path"], env["plain"])}
    with pytest.raises(SystemExit) if argv[0] == "frobnicate" or "--code-bits" in argv or "--levels" not in argv and argv[0] == "encode" else _no_raise():
        code = cli_main(argv)
        assert code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    assert "Traceback" not in err
    import re

    assert re.search(pattern, lines[0]), lines[0]
    assert sorted(os.listdir(env["tmp"])) == before, "a file was left behind"
    assert {p: _digest(p) for p in digests} == digests, "an input file changed"


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_cli_argparse_errors_exit_2(env, capsys):
    with pytest.raises(SystemExit) as ei:
        cli_main(["encode", env["plain"], "-o", str(env["tmp"] / "o.safetensors")])
    assert ei.value.code == 2


def test_longest_legal_names_work(env, capsys):
    """A 255-byte target name is legal, so the temporary name beside it must be short."""
    out = str(env["tmp"] / LONG)
    ec.save_file(env["enc"], out)
    assert ec.load_file(out).meta.to_json() == env["enc"].meta.to_json()
    os.unlink(out)
    assert cli_main(["encode", env["plain"], "-o", out, "--levels", "0.5", "-q"]) == 0
    assert cli_main(["extract", out, "--level", "DENSE", "-o", str(env["tmp"] / ("x" * 250))]) == 0


def test_extract_level_any_case(env, capsys):
    out = str(env["tmp"] / "d.safetensors")
    assert cli_main(["extract", env["path"], "--level", "DENSE", "-o", out]) == 0
    assert ec.extract(env["enc"], "Dense").keys() == ec.load_file(env["path"]).keys()


def test_second_model_gets_its_own_copy(env):
    """The documented way to serve one ELSAStateDict twice: a deep copy for the second model."""
    enc = ec.load_file(env["path"])
    a = ec.swap_(make_model(), enc)
    b = ec.swap_(make_model(), copy.deepcopy(enc))
    assert a[0].weight.data_ptr() != b[0].weight.data_ptr()
    ec.swap_(a, enc)  # the same model again is fine


def test_meta_model_is_materialised_from_the_file(env):
    """A model built on the meta device (as large models are, before loading) gets every tensor from the file."""
    with torch.device("meta"):
        m = make_model()
    ec.load(env["path"], m)
    assert not any(t.is_meta for t in m.state_dict().values())
    ref = ec.load(env["path"], make_model())
    x = torch.randn(3, 16)
    for t in (1, 2, 3):
        ec.set_level(m, t)
        ec.set_level(ref, t)
        assert torch.equal(m(x), ref(x))


def test_meta_model_with_tied_weights(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 16)
            self.body = nn.Linear(16, 16)
            self.head = nn.Linear(16, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, i):
            return self.head(torch.relu(self.body(self.emb(i))))

    torch.manual_seed(0)
    src = Tied()
    enc = ec.encode(src.state_dict(), ec.magnitude_counters(src.state_dict(), [0.5], names=["body.weight"]))
    p = str(tmp_path / "t.safetensors")
    ec.save_file(enc, p)
    with torch.device("meta"):
        m = Tied()
    ec.load(p, m)
    assert m.head.weight is m.emb.weight and not m.emb.weight.is_meta
    i = torch.arange(10)
    assert torch.equal(m(i), ec.load(p, Tied())(i))


def test_stale_temporary_is_removed_by_the_next_write(env):
    from elsa_codec.format.atomic import stale_temporaries
    from elsa_codec.format.atomic import tmp_prefix as _tmp_prefix

    out = str(env["tmp"] / "o.safetensors")
    stale = os.path.join(env["tmp"], f"{_tmp_prefix(out)}999999999-abcdefgh.elsa-tmp")  # no such pid
    with open(stale, "wb") as f:
        f.write(b"half a file")
    assert stale_temporaries(out) == [stale]
    ec.save_file(env["enc"], out)
    assert not os.path.exists(stale) and stale_temporaries(out) == []


def test_temporary_removed_on_error(env, monkeypatch):
    import elsa_codec.format.file as io

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(io, "write_tensors", boom)
    with pytest.raises(RuntimeError):
        ec.save_file(env["enc"], str(env["tmp"] / "o.safetensors"))
    assert not [n for n in os.listdir(env["tmp"]) if n.endswith(".elsa-tmp")]


def test_verify_reports_a_stale_temporary(env, capsys):
    from elsa_codec.format.atomic import tmp_prefix as _tmp_prefix

    stale = os.path.join(env["tmp"], f"{_tmp_prefix(env['path'])}999999999-abcdefgh.elsa-tmp")
    with open(stale, "wb") as f:
        f.write(b"half")
    assert cli_main(["verify", env["path"]]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "temporary file left by a killed write" in err[0]
    os.unlink(stale)
    assert cli_main(["verify", env["path"]]) == 0


def test_all_zero_tensor_records_minus_inf_sqnr(tmp_path):
    """An all-zero weight whose codes move it off zero has SQNR -inf; the file must say -inf."""
    import math

    sd = {"w": torch.zeros(8, 8)}
    c = ec.Counters({"w": torch.randint(1, 4, (8, 8), dtype=torch.uint8)}, 2)
    enc = ec.encode(sd, c)
    assert enc.meta.tensors["w"].sqnr_db == -math.inf
    p = str(tmp_path / "z.safetensors")
    ec.save_file(enc, p)
    assert ec.load_file(p).meta.tensors["w"].sqnr_db == -math.inf


def test_empty_weight_with_nm_levels(tmp_path):
    """A [0, K] weight (an empty layer) is a valid N:M tensor: nothing to keep, nothing to refuse,
    on encode and on load (the loader's structure check skips it)."""
    sd = {"w": torch.zeros(0, 16), "v": torch.randn(8, 16)}
    enc = ec.encode(sd, ec.magnitude_counters(sd, ["1:4", "2:4"], names=["w", "v"]))
    assert enc["w"].shape == (0, 16)
    assert [round(s, 6) for s in enc.meta.sparsities()] == [0.75, 0.5]  # the empty tensor weighs nothing
    p = str(tmp_path / "e.safetensors")
    ec.save_file(enc, p)
    assert ec.load_file(p)["w"].shape == (0, 16)
