"""``elsa convert --calibration`` (issue 45): the streamed, memory-mapped calibration gives the
counters of the in-memory ``ec.activation_counters``; the quality report per level is in the
document and shown by ``elsa inspect`` / ``elsa levels``; ``choose_level(min_quality=)``; every
refusal writes nothing.
"""
import contextlib
import io
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import elsa_codec as ec  # noqa: E402
from elsa_codec import ELSAError, ELSAFormatError  # noqa: E402
from elsa_codec.cli.commands import main  # noqa: E402
from elsa_codec.format.amend import write_quality  # noqa: E402
from elsa_codec.serving.hf import convert_pretrained  # noqa: E402
from elsa_codec.serving.hf.calibrate import batches, token_windows  # noqa: E402

WORDS = ("the a model level weight sparse dense one file each machine picks its own code bits low mantissa "
         "serve load encode ship train prune keep drop row column input output layer block head").split()


def _text(seed: int, n: int) -> str:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(WORDS), (n,), generator=g).tolist()
    return "\n\n".join(" ".join(WORDS[i] for i in idx[k:k + 40]) for k in range(0, n, 40))


def _tokenizer():
    vocab = {w: i for i, w in enumerate(["[UNK]", "[EOS]", *WORDS])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=len(WORDS) + 2, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=1, eos_token_id=1)
    return transformers.GPT2LMHeadModel(cfg)


def _bert():
    cfg = transformers.BertConfig(vocab_size=len(WORDS) + 2, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=64)
    return transformers.BertModel(cfg)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """``{arch: (source dir, model)}`` with a tokenizer, plus the calibration and eval files."""
    root = tmp_path_factory.mktemp("calib")
    out = {}
    for name, build in (("gpt2", _gpt2), ("bert", _bert)):
        torch.manual_seed(0)
        model = build().eval()
        d = str(root / name)
        model.save_pretrained(d)
        _tokenizer().save_pretrained(d)
        out[name] = (d, model)
    (root / "calib.txt").write_text(_text(1, 3000))
    (root / "eval.jsonl").write_text("\n".join(json.dumps({"text": _text(s, 200)}) for s in (2, 3)))
    out["calib"], out["eval"] = str(root / "calib.txt"), str(root / "eval.jsonl")
    return out


@pytest.mark.parametrize("arch, method", [("gpt2", "wanda"), ("bert", "ria")])
def test_streamed_convert_gives_the_in_memory_counters(src, tmp_path, arch, method):
    d, model = src[arch]
    out = str(tmp_path / "elsa")
    meta = convert_pretrained(d, out, levels=[0.75, 0.5], calibration=src["calib"], method=method, seq_len=32,
                              calibration_samples=20, progress=False)
    windows = token_windows(_tokenizer(), open(src["calib"]).read().split("\n\n"), 32, "calib")[:20]
    want = ec.activation_counters(model, [0.75, 0.5], batches(windows), method=method)
    enc = ec.load_file(os.path.join(out, "model.safetensors"))
    for n, c in want.items():
        assert torch.equal(ec.decode_counters(enc[n], enc.meta.code_bits), c.to(torch.int64)), n
    q = meta.quality
    assert enc.meta.version == 3 and q["method"] == method and [r["level"] for r in q["levels"]] == [1, 2, 3]
    assert q["eval"]["held_out"] and q["calibration"]["samples"] == 20
    assert q["levels"][-1]["cosine"] > 0.999 and q["levels"][0]["cosine"] < q["levels"][1]["cosine"] <= 1.0
    assert (q["levels"][0]["perplexity"] is not None) == (arch == "gpt2")


def _cli(*args) -> tuple:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return rc, out.getvalue(), err.getvalue()


def test_cli_convert_inspect_levels_and_min_quality(src, tmp_path):
    d, _ = src["gpt2"]
    out = str(tmp_path / "elsa")
    rc, text, err = _cli("convert", d, "-o", out, "--levels", "0.9,0.5", "--calibration", src["calib"], "--eval",
                         src["eval"], "--seq-len", "32", "-q")
    assert rc == 0, err
    assert "quality (wanda levels; 12 samples, 384 tokens of eval.jsonl)" in text and "level 3: cosine 1.0000" in text
    rc, text, _ = _cli("inspect", os.path.join(out, "model.safetensors"))
    assert rc == 0 and "perplexity (original" in text and "level 1: cosine" in text
    q = ec.read_meta(os.path.join(out, "model.safetensors")).quality["levels"]
    bound = (q[0]["cosine"] + q[1]["cosine"]) / 2  # level 1 misses it, level 2 meets it
    rc, text, _ = _cli("levels", out, "--min-quality", f"{bound}", "--tokens", "8", "--runs", "1")
    assert rc == 0 and "cosine >=" in text and "chosen: level 3" in text
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    table = ec.choose_level(model, {"input_ids": torch.zeros(1, 8, dtype=torch.int64)}, min_quality=bound,
                            max_memory_mib=1e6, runs=1)
    assert table.row(1).cosine == q[0]["cosine"] and table.row(2).perplexity == q[1]["perplexity"]
    with pytest.raises(ELSAError, match=r"(?s)no level meets the budget.*cosine >= 1"):
        ec.choose_level(model, {"input_ids": torch.zeros(1, 8, dtype=torch.int64)}, min_quality=1.0,
                        max_latency_ms=1e-9, runs=1)


def test_min_quality_needs_a_report(src, tmp_path):
    d, _ = src["bert"]
    convert_pretrained(d, str(tmp_path / "plain"), levels=[0.5], progress=False)
    model = transformers.AutoModel.from_pretrained(str(tmp_path / "plain"))
    with pytest.raises(ELSAError, match="min_quality= needs the checkpoint's quality report"):
        ec.choose_level(model, {"input_ids": torch.zeros(1, 4, dtype=torch.int64)}, min_quality=0.9)


def _write(tmp_path, name, data) -> str:
    p = tmp_path / name
    p.write_bytes(data) if isinstance(data, bytes) else p.write_text(data)
    return str(p)


@pytest.mark.parametrize("case, match", [
    ("empty", "empty"),
    ("binary", "not a UTF-8 text file"),
    ("jsonl", "needs a \"text\" string"),
    ("short", "fewer than one sample of --seq-len 32"),
    ("no-tokenizer", "has no tokenizer"),
    ("method", "--method wanda weighs weights by their activations and needs --calibration"),
    ("samples", "--calibration-samples must be an int >= 1"),
    ("seq-len", "--seq-len 1000 is longer than the model's 64 positions"),
])
def test_refusals_write_nothing(src, tmp_path, case, match):
    d, model = src["gpt2"]
    calib = {"empty": _write(tmp_path, "e.txt", "\n \n"), "binary": _write(tmp_path, "b.txt", b"\xff\xfe\x00abc"),
             "jsonl": _write(tmp_path, "j.jsonl", '{"txt": "a"}\n'), "short": _write(tmp_path, "s.txt", "the model")}
    kw = dict(levels=[0.5], calibration=calib.get(case, src["calib"]), seq_len=32, progress=False)
    if case == "no-tokenizer":
        d = str(tmp_path / "bare")
        model.save_pretrained(d)
    if case == "method":
        kw.update(calibration=None, method="wanda")
    if case == "samples":
        kw.update(calibration_samples=0)
    if case == "seq-len":
        kw.update(seq_len=1000)
    out = tmp_path / "out"
    with pytest.raises(ELSAError, match=match):
        convert_pretrained(d, str(out), **kw)
    assert not out.exists()


def test_nan_activations_name_the_layer(src, tmp_path):
    torch.manual_seed(0)
    model = _gpt2()
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.bias[0] = float("nan")
    d = str(tmp_path / "nan")
    model.save_pretrained(d)
    _tokenizer().save_pretrained(d)
    with pytest.raises(ELSAError, match=r"transformer\.h\.0\.attn\.c_proj: NaN or Inf in the input activations"):
        convert_pretrained(d, str(tmp_path / "out"), levels=[0.5], calibration=src["calib"], seq_len=32, progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as e:  # argparse: the usage line and one error line
        _cli("convert", src["gpt2"][0], "-o", str(tmp_path / "o2"), "--levels", "0.5", "--method", "sparsegpt")
    assert e.value.code == 2 and not (tmp_path / "o2").exists()


def test_quality_report_is_checked_and_versioned(tmp_path):
    sd = {"fc.weight": torch.randn(16, 16)}
    path = str(tmp_path / "m.safetensors")
    ec.save_file(ec.encode(sd, ec.magnitude_counters(sd, [0.5])), path)
    good = {"method": "wanda", "levels": [{"level": 1, "cosine": 0.9, "perplexity": 3.0}, {"level": 2, "cosine": 1.0}]}
    before = ec.load_file(path)
    assert write_quality(path, good).version == 3 and ec.read_meta(path).level_quality(1)["perplexity"] == 3.0
    after = ec.load_file(path)
    assert torch.equal(after["fc.weight"].view(torch.int32), before["fc.weight"].view(torch.int32))
    for bad in ({"levels": [{"level": 1, "cosine": 0.9}]}, {"levels": [{"level": 1, "cosine": 2.0}, {"level": 2, "cosine": 1}]},
                {"levels": [{"level": 1, "cosine": 0.9, "perplexity": -1}, {"level": 2, "cosine": 1}]}):
        with pytest.raises(ELSAError, match="quality report does not fit"):
            write_quality(path, bad)
    doc = json.loads(ec.read_meta(path).to_json())
    doc["version"] = 2
    with pytest.raises(ELSAFormatError, match="a version 2 document has 'quality'"):
        ec.ELSAMeta.from_json(json.dumps(doc))
    assert write_quality(path, None).version == 1


def test_mapped_model_is_the_model_pass_after_pass(src):
    from elsa_codec.serving.hf.calibrate import mapped_model
    from elsa_codec.serving.hf.checkpoint import weights_path

    d, model = src["gpt2"]
    mapped = mapped_model(model.config, weights_path(d))
    assert mapped.lm_head.weight is mapped.transformer.wte.weight  # the tie, as from_pretrained keeps it
    ids = torch.randint(0, len(WORDS), (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = model(input_ids=ids).logits
        for _ in range(2):  # the second pass reads the pages the first one handed back
            assert torch.equal(mapped(input_ids=ids).logits, want)


def test_sharded_output_carries_the_report(src, tmp_path):
    d, _ = src["bert"]
    out = tmp_path / "sharded"
    convert_pretrained(d, str(out), levels=[0.5], calibration=src["calib"], seq_len=32, calibration_samples=8,
                       max_shard_size=40_000, progress=False)
    index = out / "model.safetensors.index.json"
    assert index.exists() and len(list(out.glob("model-*.safetensors"))) > 1
    meta = ec.read_meta(str(index))
    assert meta.version == 3 and meta.quality["method"] == "wanda" and len(meta.quality["levels"]) == 2
    ec.load_file(str(index))  # every shard and checksum still holds
    model = transformers.AutoModel.from_pretrained(str(out))
    assert next(m for _, m in ec.elsa_modules(model)).quality == meta.quality
