"""Any Hugging Face model served right (issue: any-model serving).

Tiny ``transformers`` configs (no downloads): BertModel, GPT2LMHeadModel (``Conv1D``, tied head),
LlamaForCausalLM tied and untied, ViTModel (Conv2d patch embedding), ResNetModel (Conv2d +
BatchNorm2d). Each is encoded with the model-aware defaults (and with every weight), swapped,
and every level compared with the same model loaded from ``extract(encoded, t)``: max abs
difference 0 in float32 on the CPU (the ELSA path runs the same op on the same decoded weight).
"""
import copy

import pytest
import torch
from safetensors import safe_open
from torch import nn

transformers = pytest.importorskip("transformers")

import elsa_codec as ec  # noqa: E402
from elsa_codec import ELSAError  # noqa: E402
from elsa_codec.format.bits import level_mask  # noqa: E402
from elsa_codec.format.selection import select_weights  # noqa: E402
from elsa_codec.format.structure import mask_structure_ok  # noqa: E402


def _bert():
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=40, max_position_embeddings=32)
    return transformers.BertModel(cfg), lambda g: {"input_ids": torch.randint(0, 97, (2, 7), generator=g)}


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg), lambda g: {"input_ids": torch.randint(0, 96, (2, 9), generator=g)}


def _llama(tied):
    def build():
        cfg = transformers.LlamaConfig(vocab_size=123, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                                       max_position_embeddings=32)
        return transformers.LlamaForCausalLM(cfg), lambda g: {"input_ids": torch.randint(0, 123, (2, 9), generator=g)}
    return build


def _vit():
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=40)
    return transformers.ViTModel(cfg), lambda g: {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}


def _resnet():
    cfg = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                    layer_type="basic")
    return transformers.ResNetModel(cfg), lambda g: {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)}


MODELS = {"bert": _bert, "gpt2": _gpt2, "llama-tied": _llama(True), "llama-untied": _llama(False),
          "vit": _vit, "resnet": _resnet}


def _out(o):
    if hasattr(o, "logits"):
        return o.logits
    return o.last_hidden_state


def build(name, seed=0):
    torch.manual_seed(seed)
    model, inputs = MODELS[name]()
    return model.eval(), inputs(torch.Generator().manual_seed(seed + 1))


def extract_model(model, enc, t):
    m = copy.deepcopy(model)
    m.load_state_dict(ec.extract(enc, t))
    return m


def _same_level(got, want, model):
    """Bit for bit where no ELSA module runs the packed sparse-cpu products, else within float32
    summation-order tolerance (they sum in another order than F.linear)."""
    if not any(m.backend == "sparse-cpu" for _, m in ec.elsa_modules(model)):
        assert torch.equal(got, want), f"max abs diff {(got - want).abs().max()}"
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("select", ["blocks", "all"])
@pytest.mark.parametrize("name", list(MODELS))
def test_every_level_equals_extract(name, select):
    model, x = build(name)
    counters = ec.magnitude_counters(model, [0.9, 0.5], select=select)
    enc = ec.encode(model.state_dict(), counters)
    with torch.no_grad():
        want = {t: _out(extract_model(model, enc, t)(**x)) for t in (1, 2, 3)}
        ec.swap_(model, enc)
        for t in (1, 2, 3):
            ec.set_level(model, t)
            got = _out(model(**x))
            if t == 3 or not any(m.backend == "sparse-cpu" for _, m in ec.elsa_modules(model)):
                assert torch.equal(got, want[t]), f"{name} level {t}: max abs diff {(got - want[t]).abs().max()}"
            else:  # the packed products sum in another order than F.linear (register-blocked partial sums)
                torch.testing.assert_close(got, want[t], rtol=1e-5, atol=1e-5)
    assert [lv.level for lv in ec.levels(model)] == [1, 2, 3]


def test_default_selection_follows_sparsegpt_convention():
    gpt2, _ = build("gpt2")
    sel = select_weights(gpt2)
    assert "lm_head.weight" not in sel and "transformer.wte.weight" not in sel and "transformer.wpe.weight" not in sel
    assert "transformer.h.0.attn.c_attn.weight" in sel and "transformer.h.1.mlp.c_proj.weight" in sel
    llama, _ = build("llama-untied")
    sel = select_weights(llama)
    assert "lm_head.weight" not in sel and "model.embed_tokens.weight" not in sel and len(sel) == 14
    assert "lm_head.weight" in select_weights(llama, "blocks+head")
    assert "model.embed_tokens.weight" in select_weights(llama, "all")
    # a tied head brings the embedding along (one tensor)
    tied, _ = build("llama-tied")
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(select_weights(tied, "blocks+head"))
    # MultiheadAttention.out_proj is never selected (the attention reads its weight directly)
    layer = nn.TransformerEncoderLayer(16, 2, 32)
    assert "self_attn.out_proj.weight" not in select_weights(layer, "all")
    with pytest.raises(ELSAError, match="unknown selection"):
        select_weights(layer, "everything")


def test_raw_state_dict_keeps_working_and_says_what_it_selected(caplog):
    model, _ = build("llama-tied")
    with caplog.at_level("INFO", logger="elsa_codec"):
        c = ec.magnitude_counters(model.state_dict(), [0.5])
    assert "magnitude_counters: 14 tensors selected by default_prunable" in caplog.text
    assert "lm_head.weight" not in c  # tied to the embedding, which the default leaves dense
    with pytest.raises(ELSAError, match="needs the model"):
        ec.magnitude_counters(model.state_dict(), [0.5], select="all")


def test_conv1d_nm_levels_lie_along_the_input_dimension():
    model, x = build("gpt2")
    counters = ec.magnitude_counters(model, ["1:4", "2:4"])
    enc = ec.encode(model.state_dict(), counters)
    w = enc["transformer.h.0.attn.c_attn.weight"]  # [in, out]
    for t, st, density in ((1, "1:4", 0.25), (2, "2:4", 0.5)):
        m = level_mask(w, t, enc.code_bits)
        assert mask_structure_ok(m.t(), st) and m.float().mean().item() == density
    with torch.no_grad():
        want = _out(extract_model(model, enc, 1)(**x))
        ec.swap_(model, enc)
        ec.set_level(model, 1)
        assert torch.equal(_out(model(**x)), want)


@pytest.mark.parametrize("name,head,emb", [("gpt2", "lm_head", "transformer.wte"), ("llama-tied", "lm_head", "model.embed_tokens")])
def test_tied_weights_stay_tied_through_swap_state_dict_and_file(tmp_path, name, head, emb):
    model, x = build(name)
    enc = ec.encode(model.state_dict(), ec.magnitude_counters(model, [0.9, 0.5], select="all"))
    assert enc[f"{head}.weight"] is enc[f"{emb}.weight"]  # encoded once
    fresh = copy.deepcopy(model)
    ec.swap_(model, enc)
    hm, em = model.get_submodule(head), model.get_submodule(emb)
    assert hm.weight is em.weight and type(em).__name__ == "ELSAEmbedding"
    rebuilt = ec.elsa_state_dict(model)
    assert rebuilt[f"{head}.weight"].data_ptr() == rebuilt[f"{emb}.weight"].data_ptr()
    path = str(tmp_path / "m.safetensors")
    ec.save_file(rebuilt, path)
    with safe_open(path, "pt") as f:  # stored once, the other name an alias in the document
        stored = set(f.keys())
    assert (f"{head}.weight" in stored) != (f"{emb}.weight" in stored)
    back = ec.load_file(path)
    assert back[f"{head}.weight"] is back[f"{emb}.weight"] and back.meta.version == 2
    assert set(back.meta.tied.items()) <= {(f"{head}.weight", f"{emb}.weight"), (f"{emb}.weight", f"{head}.weight")}
    ec.load(path, fresh)
    assert fresh.get_submodule(head).weight is fresh.get_submodule(emb).weight
    with torch.no_grad():
        for t in (1, 2, 3):
            ec.set_level(model, t)
            ec.set_level(fresh, t)
            assert torch.equal(_out(fresh(**x)), _out(model(**x)))
            _same_level(_out(fresh(**x)), _out(extract_model(build(name)[0], enc, t)(**x)), fresh)


def test_tied_weight_errors_name_both():
    model, _ = build("llama-tied")
    sd = model.state_dict()
    c = ec.magnitude_counters(model, [0.5], select="all")
    first = "model.embed_tokens.weight"
    other = torch.ones_like(c[first])
    bad = ec.Counters({**c, "lm_head.weight": other}, 1)
    with pytest.raises(ELSAError, match=r"'model\.embed_tokens\.weight' and 'lm_head\.weight' are one tied tensor.*counters differ"):
        ec.encode(sd, bad)
    enc = ec.encode(sd, c)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ELSAError, match="one tied parameter: filter_fn keeps"):
        ec.swap_(model, enc, filter_fn=lambda m, fqn: fqn != "lm_head")
    # a checkpoint from the untied model into the tied one: two different tensors for one parameter
    untied, _ = build("llama-untied")
    enc_u = ec.encode(untied.state_dict(), ec.magnitude_counters(untied, [0.5], select="all"))
    with pytest.raises(ELSAError, match="one tied parameter in the model, but the checkpoint holds different tensors"):
        ec.swap_(model, enc_u)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert type(model.lm_head) is nn.Linear


@pytest.mark.isolated  # its own process: tests/conftest.py, "process isolation"
def test_torch_compile_gpt2_every_level():
    model, x = build("gpt2")
    enc = ec.encode(model.state_dict(), ec.magnitude_counters(model, [0.9, 0.5], select="all"))
    ec.swap_(model, enc)
    compiled = torch.compile(model)
    with torch.no_grad():
        for t in (1, 3, 2):
            ec.set_level(model, t)
            torch.testing.assert_close(_out(compiled(**x)), _out(model(**x)), rtol=1e-5, atol=1e-5)


def test_save_pretrained_and_from_pretrained_round_trip(tmp_path):
    model, x = build("gpt2")
    orig = copy.deepcopy(model)
    enc = ec.encode(model.state_dict(), ec.magnitude_counters(model, [0.9, 0.5]))
    path = str(tmp_path / "gpt2.elsa.safetensors")
    ec.save_file(enc, path)
    ec.swap_(model, enc)
    model.save_pretrained(tmp_path / "swapped")
    plain = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "swapped").eval()
    for n in enc.meta.tensors:  # the encoded weights survive save_pretrained bit for bit
        assert torch.equal(plain.state_dict()[n].view(torch.int32), enc[n].view(torch.int32)), n
    orig.save_pretrained(tmp_path / "orig")
    pre = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "orig").eval()
    ec.load(path, pre)
    ec.load(path, plain)
    with torch.no_grad():
        for t in (1, 2, 3):
            ec.set_level(pre, t)
            ec.set_level(plain, t)
            ec.set_level(model, t)
            assert torch.equal(_out(pre(**x)), _out(model(**x)))
            assert torch.equal(_out(plain(**x)), _out(model(**x)))


def test_file_records_transposed_and_tied_and_verify_passes(tmp_path, capsys):
    from elsa_codec.cli.commands import main

    model, _ = build("gpt2")
    enc = ec.encode(model.state_dict(), ec.magnitude_counters(model, ["1:4", "2:4"], select="all"))
    info = enc.meta.tensors
    assert info["transformer.h.0.mlp.c_fc.weight"].transposed and not info["lm_head.weight"].transposed
    assert enc.meta.tied == {"lm_head.weight": "transformer.wte.weight"}
    # the tied tensor counts once in each level's sparsity
    own = [n for n in info if n != "lm_head.weight"]
    total = sum(enc[n].numel() for n in own)
    assert enc.meta.levels[0].sparsity == pytest.approx(sum(info[n].sparsity[0] * enc[n].numel() for n in own) / total)
    path = str(tmp_path / "gpt2.elsa.safetensors")
    ec.save_file(enc, path)
    assert main(["verify", path]) == 0, capsys.readouterr()
    capsys.readouterr()
    assert main(["inspect", path]) == 0
    shown = capsys.readouterr().out
    assert "elsa-codec v2" in shown and "tied to transformer.wte.weight (stored once)" in shown and "[in, out]" in shown
    back = ec.load_file(path)
    assert back.meta.tensors["transformer.h.0.mlp.c_fc.weight"].transposed
    ec.swap_(model, back)
    assert ec.elsa_state_dict(model).meta.to_json() == back.meta.to_json()


def test_embed_levels_on_gpt2_nm_levels_along_the_input_dimension():
    model, x = build("gpt2")
    ids = x["input_ids"]

    def train_fn(m, phase):
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        m.train()
        for _ in range(phase.steps):
            loss = m(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()

    res = ec.embed_levels(model, ["1:4", "2:4"], train_fn, steps=4, progress=False, seed=0)
    enc = res.encode()
    names = select_weights(model)
    assert set(res.counters) == set(names) and "lm_head.weight" not in names
    assert res.counters.transposed == {n for n in names if ".attn." in n or ".mlp." in n}
    for n in names:
        for t, st in ((1, "1:4"), (2, "2:4")):
            assert mask_structure_ok(level_mask(enc[n], t, enc.code_bits).t(), st), (n, t)


def test_cast_and_copy_of_a_served_hf_model_keep_levels_and_tie():
    from elsa_codec.format.bits import decode_counters

    model, x = build("gpt2")
    enc = ec.encode(model.state_dict(), ec.magnitude_counters(model, [0.9, 0.5], select="all"))
    ec.swap_(model, enc)
    twin = copy.deepcopy(model)
    twin.to(torch.bfloat16)  # PreTrainedModel.to -> the model-level check, then every ELSA layer re-encodes
    assert twin.lm_head.weight is twin.transformer.wte.weight and twin.lm_head.weight.dtype == torch.bfloat16
    assert model.lm_head.weight.dtype == torch.float32  # the copy has its own check and tensors
    for n in enc.meta.tensors:
        w = twin.get_submodule(n[: -len(".weight")]).weight
        assert torch.equal(decode_counters(w, enc.code_bits), decode_counters(enc[n], enc.code_bits)), n
    with pytest.raises(ELSAError, match="would drop its level codes"):
        model.double()
    assert all(p.dtype == torch.float32 for p in model.parameters())
