"""Write ELSA Hugging Face directories: ``convert`` (from a ``save_pretrained`` directory),
``save_pretrained`` (from a model), and ``pretrained_config`` / ``dequantize_`` for loading.

The bytes depend only on the content: the weights as :func:`elsa_codec.save_file` writes them
(byte-reproducible), ``config.json`` and ``generation_config.json`` as transformers serialises
them, other files copied. Every file is written atomically (temporary name, then rename).
ELSA: Halvachi et al., arXiv 2312.06872, sec. 2.2 (one file ships every level).
"""
from __future__ import annotations

import copy
import json
import os
import shutil

import torch
from torch import nn

from ...errors import ELSAError, ELSATypeError
from ...format.atomic import atomic
from ...format.encode import ELSAStateDict, encode
from ...format.file import save_file
from ...wrappers import unwrap_model
from ..base import ELSAModule
from ..swap import _replace, elsa_modules, elsa_state_dict
from .checkpoint import check_out_dir, layout_path, stale_weight_files
from .config import ELSAQuantizationConfig

__all__ = ["save_pretrained", "pretrained_config", "dequantize_", "write_json", "copy_files", "remove_stale"]

#: Files ``elsa convert`` never copies from the source directory: weights and the config it rewrites.
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth", ".ckpt", ".h5",
                    ".msgpack", ".gguf", ".onnx")


def write_json(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def copy_files(src: str, dst: str) -> list:
    """Copy every regular top-level file of ``src`` except weights and ``config.json`` (the
    tokenizer, generation and processor files) byte for byte into ``dst``; returns their names."""
    out = []
    for n in sorted(os.listdir(src)):
        p = os.path.join(src, n)
        if n == "config.json" or n.endswith(_WEIGHT_SUFFIXES) or n.startswith(".") or not os.path.isfile(p):
            continue
        with atomic(os.path.join(dst, n)) as tmp:
            shutil.copyfile(p, tmp)
        out.append(n)
    return out


def _config_json(model_config, qcfg: ELSAQuantizationConfig) -> str:
    """``config.json`` of ``model_config`` with ``qcfg`` as its ``quantization_config`` (the
    model's config object is not modified)."""
    cfg = copy.deepcopy(model_config)
    cfg.quantization_config = qcfg
    return cfg.to_json_string(use_diff=True)


def _write_weights(enc: ELSAStateDict, folder: str, max_shard_size) -> set:
    """The weights of ``enc`` into ``folder`` in the layout of :func:`layout_path`; removes the
    weight files of an earlier checkpoint there. Returns the written names."""
    total = sum(t.numel() * t.element_size() for n, t in enc.items() if n not in enc.meta.tied)  # a tied tensor is stored once
    path, limit = layout_path(folder, total, max_shard_size)
    save_file(enc, path, max_shard_size=limit)
    return remove_stale(path)


def remove_stale(path: str) -> set:
    """Remove the weight files of an earlier checkpoint beside the one just written at ``path``
    (a ``model.safetensors`` or an index); returns the names the new one uses."""
    folder = os.path.dirname(os.path.abspath(path))
    keep = {os.path.basename(path)}
    if path.endswith(".index.json"):
        with open(path, encoding="utf-8") as f:
            keep |= set(json.load(f)["weight_map"].values())
    for p in stale_weight_files(folder, keep):
        os.unlink(p)
    return keep


def save_pretrained(model: nn.Module, save_directory, counters=None, *, max_shard_size=None, is_main_process: bool = True,
                    state_dict=None, safe_serialization: bool = True, variant=None, push_to_hub: bool = False,
                    **kwargs) -> None:
    """Write ``model`` as an ELSA Hugging Face directory that ``from_pretrained`` loads (ELSA, sec. 2.2).

    A model loaded from an ELSA directory has this as its ``save_pretrained``: the checkpoint
    written back is byte-identical to the one loaded when nothing changed (same
    ``max_shard_size``). A plain transformers model is encoded first with ``counters``.

    Args:
        model: a transformers ``PreTrainedModel``: served by ELSA layers (``counters`` None), or
            plain with ``counters`` (:class:`~elsa_codec.format.encode.Counters`, e.g. from
            :func:`elsa_codec.magnitude_counters` or training; tensor name -> integer tensor of
            the weight's shape, values ``1..T+1``).
        save_directory: the output directory (created; earlier weight files in it are replaced).
        max_shard_size: bytes per weights file (int or ``"5GB"``; default ``"5GB"``): one
            ``model.safetensors`` when the weights fit, else shards plus
            ``model.safetensors.index.json``.
        is_main_process: False writes nothing (distributed runs: rank 0 writes).
        state_dict, safe_serialization: accepted for the Trainer's call; the model's own tensors
            are written, always as safetensors.

    Example::

        counters = ec.magnitude_counters(model.state_dict(), [0.9, 0.5], model=model)
        ec.save_pretrained(model, "out", counters)
        model = AutoModelForCausalLM.from_pretrained("out")      # ELSA layers, every level

    Raises:
        ELSAError: not a transformers model; no ELSA module and no counters; ELSA modules and
            counters both; ``variant`` or ``push_to_hub`` (not supported); the errors of
            :func:`elsa_codec.encode` / :func:`elsa_codec.save_file`.
    """
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise ELSATypeError(f"save_pretrained: model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if variant is not None or push_to_hub:
        raise ELSAError("save_pretrained: variant= and push_to_hub= are not supported for ELSA checkpoints; "
                        "write the directory, then upload it with huggingface_hub")
    if not safe_serialization:
        raise ELSAError("save_pretrained: ELSA checkpoints are safetensors only (safe_serialization=False)")
    bare = unwrap_model(model)
    folder = check_out_dir(save_directory, "save_pretrained")
    enc = _encoded(bare, counters)
    if not is_main_process:
        return
    old = getattr(bare.config, "quantization_config", None)
    default = old.default_level if isinstance(old, ELSAQuantizationConfig) else None
    qcfg = ELSAQuantizationConfig.from_meta(enc.meta, default_level=default)
    os.makedirs(folder, exist_ok=True)
    _write_weights(enc, folder, max_shard_size)
    write_json(os.path.join(folder, "config.json"), _config_json(bare.config, qcfg))
    gen = getattr(bare, "generation_config", None)
    if gen is not None and callable(getattr(bare, "can_generate", None)) and bare.can_generate():
        write_json(os.path.join(folder, "generation_config.json"), gen.to_json_string(use_diff=True))


def _encoded(model: nn.Module, counters) -> ELSAStateDict:
    served = bool(elsa_modules(model))
    if served and counters is not None:
        raise ELSAError("save_pretrained: the model is already served by ELSA layers (its levels are in its weights); "
                        "counters= is for a plain model")
    if not served and counters is None:
        raise ELSAError(f"save_pretrained: {type(model).__name__} has no ELSA layer; pass counters= (e.g. "
                        "elsa_codec.magnitude_counters(model.state_dict(), [0.9, 0.5], model=model)) to encode it")
    enc = elsa_state_dict(model) if served else encode(model.state_dict(), counters)
    quantizer = getattr(model, "hf_quantizer", None)
    if served and getattr(quantizer, "meta", None) is not None:  # loaded from an ELSA directory: its order
        pos = {n: i for i, n in enumerate(quantizer.meta.tensors)}
        enc.meta.tensors = dict(sorted(enc.meta.tensors.items(), key=lambda kv: pos.get(kv[0], len(pos))))
        pos = {n: i for i, n in enumerate(quantizer.stored_order())}
        enc = ELSAStateDict(dict(sorted(enc.items(), key=lambda kv: pos.get(kv[0], len(pos)))), enc.meta, enc.bn_stats)
    # transformers' convention: a weight it ties at load (lm_head.weight to the token embedding) is not stored
    for alias, target in dict(getattr(model, "all_tied_weights_keys", None) or {}).items():
        if alias in enc and target in enc and (alias not in enc.meta.tensors or target in enc.meta.tensors):
            del enc[alias]
            enc.meta.tensors.pop(alias, None)
            enc.meta.tied.pop(alias, None)
    return enc


def pretrained_config(path, *, level=None, resident=None, **kwargs):
    """The model config of the ELSA directory ``path`` with the level to serve at load (and what
    the CPU layers keep packed): pass it as
    ``from_pretrained(path, config=...)`` (transformers merges a ``quantization_config`` given to
    ``from_pretrained`` only for its own methods, so the level is chosen through the config).

    Example::

        model = AutoModelForCausalLM.from_pretrained(d, config=ec.pretrained_config(d, level=1, resident="all"))

    Args:
        level: ``1..T``, ``T+1`` or ``"dense"``; None: the checkpoint's default level.
        resident: ``"one"`` (None: the default) or ``"all"``: every sparse level packed once at
            load, so that ``set_level`` costs almost nothing (:func:`elsa_codec.set_resident`).
        kwargs: passed to ``AutoConfig.from_pretrained``.

    Raises:
        ELSAError: ``path`` is not an ELSA directory (no ``quant_method: "elsa"`` in its
            ``config.json``); ``level`` out of range; ``resident`` not ``"one"`` / ``"all"``.
    """
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path, **kwargs)
    q = getattr(cfg, "quantization_config", None)
    q = q.to_dict() if isinstance(q, ELSAQuantizationConfig) else q
    if not isinstance(q, dict) or q.get("quant_method") != "elsa":
        raise ELSAError(f"pretrained_config: {path}/config.json has no quantization_config of quant_method 'elsa' "
                        "(not an ELSA directory: write one with `elsa convert`)")
    ELSAQuantizationConfig(level=level, resident=resident, **q)  # checks both before anything loads
    cfg.quantization_config = {**q, "level": level, "resident": resident}
    return cfg


def _plain_module(m: ELSAModule, weight: nn.Parameter) -> nn.Module:
    """The stock module ``m`` replaces, holding ``weight`` (the dense level) and ``m``'s bias."""
    kind = m.elsa_kind
    with torch.device("meta"):
        if kind == "linear":
            new = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        elif kind == "conv1d_t":
            from transformers.pytorch_utils import Conv1D

            new = Conv1D(m.nf, m.nx)
        elif kind == "embedding":
            new = nn.Embedding(m.num_embeddings, m.embedding_dim, m.padding_idx, m.max_norm, m.norm_type,
                               m.scale_grad_by_freq, m.sparse)
        else:
            cls = m._conv_cls
            new = cls(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                      m.bias is not None, m.padding_mode)
    new.weight = weight
    if getattr(m, "bias", None) is not None:
        new.bias = m.bias
    new.train(m.training)
    return new


def dequantize_(model: nn.Module) -> nn.Module:
    """Replace, in place, every ELSA layer of ``model`` by the stock module holding its encoded
    weight as a trainable ``Parameter`` (the dense level; no copy; tied weights stay one
    ``Parameter``); the cast guard and ELSA ``save_pretrained`` are removed. Used by
    ``PreTrainedModel.dequantize()`` of a loaded ELSA model, e.g. before ELSA training again.

    Raises:
        ELSAError: the model has no ELSA layer.
    """
    mods = elsa_modules(model)
    if not mods:
        raise ELSAError(f"dequantize: {type(model).__name__} has no ELSA layer")
    params: dict[int, nn.Parameter] = {}
    for fqn, m in mods:
        w = params.setdefault(id(m.weight), nn.Parameter(m.weight.detach(), requires_grad=True))
        _replace(model, fqn, _plain_module(m, w))
    for attr in ("_apply", "save_pretrained"):
        model.__dict__.pop(attr, None)
    return model
