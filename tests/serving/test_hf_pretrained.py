"""An ELSA checkpoint is a Hugging Face model (issue: HF-native).

Tiny configs (no downloads) of Llama, GPT-2 (tied head, ``Conv1D``), BERT and a BERT
sequence-classification head: ``save_pretrained`` -> ``convert_pretrained`` -> ``from_pretrained``
gives ELSA layers whose every level equals the stock model loaded from ``extract(file, t)``;
``save_pretrained`` writes the same bytes back; bad inputs fail before any weight loads.
"""
import json
import os
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

import elsa_codec as ec  # noqa: E402
from elsa_codec import ELSAError, ELSAFormatError  # noqa: E402
from elsa_codec.serving.hf.checkpoint import weights_path  # noqa: E402


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=123, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return transformers.LlamaForCausalLM(cfg), transformers.AutoModelForCausalLM, 123


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                                  eos_token_id=1, pad_token_id=1)
    return transformers.GPT2LMHeadModel(cfg), transformers.AutoModelForCausalLM, 96


def _bert():
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=40, max_position_embeddings=32)
    return transformers.BertModel(cfg), transformers.AutoModel, 97


def _bert_cls():
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=40, max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(cfg), transformers.AutoModelForSequenceClassification, 97


MODELS = {"llama": _llama, "gpt2": _gpt2, "bert": _bert, "bert-cls": _bert_cls}
LEVELS = [0.9, 0.5]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """``{arch: (source dir, ELSA dir, auto class, vocab)}``."""
    out = {}
    for name, build in MODELS.items():
        torch.manual_seed(0)
        model, auto, vocab = build()
        root = tmp_path_factory.mktemp(name)
        src, dst = str(root / "src"), str(root / "elsa")
        model.save_pretrained(src)
        with open(os.path.join(src, "tokenizer_config.json"), "w") as f:
            f.write('{"model_max_length": 64}\n')  # stands for the tokenizer files: copied byte for byte
        ec.convert_pretrained(src, dst, levels=LEVELS, progress=False)
        out[name] = (src, dst, auto, vocab)
    return out


def _reference(src, auto, state_dict):
    """The stock model of ``src`` with ``state_dict`` (one level, from ``extract``)."""
    model = auto.from_config(transformers.AutoConfig.from_pretrained(src))
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    assert not unexpected and set(missing) <= set(model.all_tied_weights_keys), missing
    model.tie_weights()
    return model.eval()


def _ids(vocab, seed=0, shape=(2, 9)):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", list(MODELS))
def test_every_level_equals_extract(dirs, arch):
    src, dst, auto, vocab = dirs[arch]
    model = auto.from_pretrained(dst)
    assert ec.elsa_modules(model), "from_pretrained returned no ELSA layer"
    assert type(model).__name__ == json.load(open(os.path.join(src, "config.json")))["architectures"][0]
    enc = ec.load_file(weights_path(dst))
    ids = _ids(vocab)
    for t in range(1, len(LEVELS) + 2):
        ec.set_level(model, t)
        ref = _reference(src, auto, ec.extract(enc, t))
        with torch.no_grad():
            got, want = model(input_ids=ids), ref(input_ids=ids)
        key = "logits" if "logits" in got else "last_hidden_state"
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5)
    assert [round(lv.sparsity, 2) for lv in ec.levels(model)] == [0.9, 0.5, 0.0]


def test_layers_replaced_on_meta_and_loaded_without_copy(dirs):
    """GPT-2's Conv1D weights are ELSA layers holding the file's mapped bytes; the tied head stays tied."""
    _, dst, auto, _ = dirs["gpt2"]
    model = auto.from_pretrained(dst)
    attn = model.transformer.h[0].attn.c_attn
    assert type(attn).__name__ == "ELSATransformersConv1D"
    assert model.lm_head.weight is model.transformer.wte.weight
    from elsa_codec.format.pages import _file_backed

    w = attn.weight
    assert _file_backed(w.data_ptr(), w.data_ptr() + w.numel() * w.element_size())


@pytest.mark.parametrize("arch", list(MODELS))
def test_round_trip_bytes(dirs, arch, tmp_path):
    _, dst, auto, _ = dirs[arch]
    model = auto.from_pretrained(dst, config=ec.pretrained_config(dst, level=1))  # a level at load changes no byte
    model.save_pretrained(str(tmp_path))
    for n in ("config.json", "model.safetensors"):
        assert open(os.path.join(dst, n), "rb").read() == open(os.path.join(tmp_path, n), "rb").read(), n
    if os.path.exists(os.path.join(dst, "generation_config.json")):
        assert open(os.path.join(dst, "generation_config.json"), "rb").read() == open(tmp_path / "generation_config.json", "rb").read()
    assert open(os.path.join(dst, "tokenizer_config.json")).read() == '{"model_max_length": 64}\n'


def test_sharded_round_trip_and_missing_shard(dirs, tmp_path):
    src, _, auto, vocab = dirs["llama"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    ec.convert_pretrained(src, a, levels=LEVELS, max_shard_size="20KB", progress=False)
    shards = sorted(n for n in os.listdir(a) if n.startswith("model-"))
    assert len(shards) > 1 and os.path.exists(os.path.join(a, "model.safetensors.index.json"))
    model = auto.from_pretrained(a)
    ec.set_level(model, 1)
    model.save_pretrained(b, max_shard_size="20KB")
    assert sorted(os.listdir(a)) == sorted(os.listdir(b) + ["tokenizer_config.json"])  # a model writes no tokenizer
    for n in os.listdir(b):
        assert open(os.path.join(a, n), "rb").read() == open(os.path.join(b, n), "rb").read(), n
    model.save_pretrained(b)  # one file now: the earlier shards and index go
    assert "model.safetensors.index.json" not in os.listdir(b) and not any(n.startswith("model-") for n in os.listdir(b))
    os.unlink(os.path.join(a, shards[-1]))
    with pytest.raises((ELSAFormatError, OSError), match="missing|not find|No such"):
        auto.from_pretrained(a)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_at_a_sparse_level(dirs, arch):
    src, dst, auto, vocab = dirs[arch]
    model = auto.from_pretrained(dst, config=ec.pretrained_config(dst, level=1))
    assert {m.level for _, m in ec.elsa_modules(model)} == {1}
    ref = _reference(src, auto, ec.extract(ec.load_file(weights_path(dst)), 1))
    ids = _ids(vocab, 1, (1, 5))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=1)
    assert torch.equal(model.generate(ids, **kw), ref.generate(ids, **kw))
    ec.set_level(model, "dense")
    dense = _reference(src, auto, ec.extract(ec.load_file(weights_path(dst)), "dense"))
    assert torch.equal(model.generate(ids, **kw), dense.generate(ids, **kw))


def test_default_level_and_level_at_load(dirs, tmp_path):
    src, _, auto, _ = dirs["llama"]
    d = str(tmp_path / "d")
    ec.convert_pretrained(src, d, levels=LEVELS, default_level=2, progress=False)
    assert json.load(open(os.path.join(d, "config.json")))["quantization_config"]["default_level"] == 2
    assert {m.level for _, m in ec.elsa_modules(auto.from_pretrained(d))} == {2}
    assert {m.level for _, m in ec.elsa_modules(auto.from_pretrained(d, config=ec.pretrained_config(d, level="dense")))} == {3}
    with pytest.raises(ELSAError, match="out of range"):
        ec.pretrained_config(d, level=4)


def test_dtype_that_holds_the_codes_is_reencoded(dirs):
    src, dst, auto, vocab = dirs["llama"]
    model = auto.from_pretrained(dst, dtype=torch.bfloat16)
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight.dtype == torch.bfloat16 and model.model.norm.weight.dtype == torch.bfloat16
    f32 = auto.from_pretrained(dst)
    for t in (1, 2):
        m32 = dict(f32.named_modules())["model.layers.0.self_attn.q_proj"]
        assert torch.equal(q.decoded_weight(t) != 0, m32.decoded_weight(t) != 0)  # every level kept


def test_bad_inputs_fail_before_any_weight_loads(dirs, tmp_path, monkeypatch):
    src, dst, auto, _ = dirs["llama"]
    loads = []
    import transformers.modeling_utils as mu

    real = mu.PreTrainedModel._load_pretrained_model
    monkeypatch.setattr(mu.PreTrainedModel, "_load_pretrained_model",
                        classmethod(lambda cls, *a, **k: (loads.append(1), real.__func__(cls, *a, **k))[1]))
    # config.json claims elsa, the weights are plain
    fake = str(tmp_path / "fake")
    shutil.copytree(src, fake)
    cfg = json.load(open(os.path.join(fake, "config.json")))
    cfg["quantization_config"] = json.load(open(os.path.join(dst, "config.json")))["quantization_config"]
    json.dump(cfg, open(os.path.join(fake, "config.json"), "w"))
    with pytest.raises(ELSAFormatError, match="plain weights"):
        auto.from_pretrained(fake)
    # an ELSA config on a plain checkpoint
    with pytest.raises(ELSAError, match="elsa convert"):
        auto.from_pretrained(src, quantization_config=ec.ELSAQuantizationConfig(level=1))
    # another method's config on an ELSA directory
    from transformers import GPTQConfig

    with pytest.raises(ValueError, match="ELSAQuantizationConfig"):
        auto.from_pretrained(dst, quantization_config=GPTQConfig(bits=4))
    # a level out of range (written into the config by hand)
    bad = str(tmp_path / "bad")
    shutil.copytree(dst, bad)
    cfg = json.load(open(os.path.join(bad, "config.json")))
    cfg["quantization_config"]["default_level"] = 9
    json.dump(cfg, open(os.path.join(bad, "config.json"), "w"))
    with pytest.raises(ELSAError, match="out of range"):
        auto.from_pretrained(bad)
    assert loads == []


def test_dtype_that_cannot_hold_the_codes(dirs, tmp_path):
    src, _, auto, _ = dirs["llama"]
    d = str(tmp_path / "k4")
    ec.convert_pretrained(src, d, levels=LEVELS, code_bits=4, progress=False)
    with pytest.raises(ELSAError, match="at most 3 code bits"):
        auto.from_pretrained(d, dtype=torch.bfloat16)


def test_corrupted_tensor_is_refused(dirs, tmp_path):
    _, dst, auto, _ = dirs["llama"]
    d = str(tmp_path / "c")
    shutil.copytree(dst, d)
    p = os.path.join(d, "model.safetensors")
    raw = bytearray(open(p, "rb").read())
    raw[-5] ^= 0x40  # a byte of the last tensor's data
    open(p, "wb").write(bytes(raw))
    with pytest.raises(ELSAFormatError, match="CRC-32|codes|sparsity"):
        auto.from_pretrained(d)


def test_save_pretrained_of_a_plain_model_with_counters(tmp_path):
    torch.manual_seed(0)
    model, auto, vocab = _gpt2()
    counters = ec.magnitude_counters(model.state_dict(), LEVELS, model=model)
    ec.save_pretrained(model, str(tmp_path / "o"), counters)
    loaded = auto.from_pretrained(str(tmp_path / "o"))
    assert len(ec.elsa_modules(loaded)) == len(counters)
    with pytest.raises(ELSAError, match="counters"):
        ec.save_pretrained(model, str(tmp_path / "p"))
    with pytest.raises(ELSAError, match="already served"):
        ec.save_pretrained(loaded, str(tmp_path / "p"), counters)


def test_convert_refuses(dirs, tmp_path):
    src, dst, _, _ = dirs["gpt2"]
    with pytest.raises(ELSAError, match="input directory"):
        ec.convert_pretrained(src, src, levels=LEVELS)
    with pytest.raises(ELSAError, match="already"):
        ec.convert_pretrained(dst, str(tmp_path / "x"), levels=LEVELS)
    with pytest.raises(ELSAError, match="Conv1D"):
        ec.convert_pretrained(src, str(tmp_path / "y"), levels=["2:4"])
    with pytest.raises(ELSAError, match="config.json"):
        ec.convert_pretrained(str(tmp_path), str(tmp_path / "z"), levels=LEVELS)


def test_trainer_fine_tunes_a_loaded_model_levels_kept(dirs, tmp_path):
    _, dst, auto, vocab = dirs["llama"]
    model = auto.from_pretrained(dst)
    before = {n: m.weight.detach().clone() for n, m in ec.elsa_modules(model)}
    norm = model.model.norm.weight.detach().clone()
    ds = [{"input_ids": _ids(vocab, i, (8,)), "labels": _ids(vocab, i, (8,))} for i in range(6)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "t"), max_steps=3, per_device_train_batch_size=2,
                                          learning_rate=1e-2, report_to=[], save_strategy="steps", save_steps=3,
                                          use_cpu=True)
    transformers.Trainer(model=model, args=args, train_dataset=ds).train()
    for n, m in ec.elsa_modules(model):
        assert torch.equal(m.weight.view(torch.int32), before[n].view(torch.int32)), n
    assert not torch.equal(model.model.norm.weight, norm)
    again = auto.from_pretrained(str(tmp_path / "t" / "checkpoint-3"))  # the Trainer's checkpoint is an ELSA directory
    assert len(ec.elsa_modules(again)) == len(before) and torch.equal(again.model.norm.weight, model.model.norm.weight)


def test_elsa_callback_trains_a_dequantized_model(dirs, tmp_path):
    _, dst, auto, vocab = dirs["llama"]
    from elsa_codec.training.integrations.transformers import ELSATrainerCallback

    model = auto.from_pretrained(dst)
    model.dequantize()
    assert not ec.elsa_modules(model) and model.model.layers[0].mlp.up_proj.weight.requires_grad
    cfg = ec.ELSAConfig(levels=[0.5], steps=2, final_steps=1)
    ds = [{"input_ids": _ids(vocab, i, (8,)), "labels": _ids(vocab, i, (8,))} for i in range(6)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "t"), max_steps=cfg.total_steps,
                                          per_device_train_batch_size=2, report_to=[], save_strategy="no", use_cpu=True)
    cb = ELSATrainerCallback(cfg)
    transformers.Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb]).train()
    meta = ec.read_meta(cb.path)
    assert meta.num_levels == 1 and abs(meta.levels[0].sparsity - 0.5) < 0.01


def test_choose_level_on_a_loaded_model(dirs):
    _, dst, auto, vocab = dirs["llama"]
    model = auto.from_pretrained(dst)
    table = ec.choose_level(model, {"input_ids": _ids(vocab)}, runs=2)
    assert table.chosen == 3 and [r.level for r in table.rows] == [1, 2, 3]
    assert "unstructured" in repr(table)


def test_cli_convert_and_levels(dirs, tmp_path, capsys):
    from elsa_codec.cli import main

    src, _, _, _ = dirs["llama"]
    out = str(tmp_path / "cli")
    assert main(["convert", src, "-o", out, "--levels", "0.9,0.5", "-q"]) == 0
    assert os.path.exists(os.path.join(out, "model.safetensors"))
    capsys.readouterr()
    assert main(["levels", out, "--runs", "2", "--tokens", "4", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["chosen"] == 3 and len(doc["rows"]) == 3
    assert main(["levels", out, "--runs", "2", "--max-latency-ms", "1e-9"]) == 2
    err = capsys.readouterr().err
    assert "closest is level" in err
    assert main(["convert", src, "-o", str(tmp_path / "nope" / "x"), "--levels", "0.5", "-q"]) == 2


def test_peak_rss_of_from_pretrained(tmp_path):
    """peak - floor <= 1.15 x the weights file (bench/hf_load.py, in child processes)."""
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from bench.hf_load import build, measure

    d, nbytes = build(str(tmp_path), 256, 2, 2000)
    warm, _ = build(str(tmp_path), 64, 1, 256, name="warm")
    for level in ("dense", 1):
        m = measure(d, warm, level)
        assert m["peak"] - m["floor"] <= 1.15 * nbytes, (level, m, nbytes)
    assert m["after"] - m["floor"] < 0.8 * nbytes  # level 1 packed, the file's pages handed back


def test_tied_head_serves_the_embedding_level(dirs, tmp_path):
    """--select all on GPT-2: the token embedding carries levels and the head tied to it serves the same level."""
    src, _, auto, vocab = dirs["gpt2"]
    d = str(tmp_path / "all")
    ec.convert_pretrained(src, d, levels=LEVELS, select="all", progress=False)
    model = auto.from_pretrained(d)
    assert type(model.lm_head).__name__ == "ELSALinear" and model.lm_head.weight is model.transformer.wte.weight
    enc = ec.load_file(weights_path(d))
    ids = _ids(vocab)
    for t in (1, 2, 3):
        ec.set_level(model, t)
        ref = _reference(src, auto, ec.extract(enc, t))
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    model.save_pretrained(str(tmp_path / "rt"))
    assert open(os.path.join(d, "model.safetensors"), "rb").read() == open(tmp_path / "rt" / "model.safetensors", "rb").read()


def test_device_map_is_respected(dirs):
    _, dst, auto, vocab = dirs["llama"]
    model = auto.from_pretrained(dst, device_map={"": "cpu"}, config=ec.pretrained_config(dst, level=1))
    assert ec.elsa_modules(model) and all(p.device.type == "cpu" for p in model.parameters())
    assert {m.level for _, m in ec.elsa_modules(model)} == {1}


def test_pickled_pretrained_model_keeps_the_cast_guard_and_load_check(dirs):
    """A from_pretrained ELSA model (the quantizer installs the guards) pickled and restored: a
    cast that cannot keep the levels and plain weights given to load_state_dict are refused, no
    tensor changed."""
    import pickle

    src, dst, auto, _ = dirs["llama"]
    model = pickle.loads(pickle.dumps(auto.from_pretrained(dst)))
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(ELSAError, match="Nothing was converted"):
        model.double()
    plain = auto.from_pretrained(src).state_dict()
    with pytest.raises(ELSAError, match="Nothing was loaded"):
        model.load_state_dict(plain, strict=False)
    after = model.state_dict()
    assert all(after[n].dtype == t.dtype and torch.equal(after[n], t) for n, t in before.items())
