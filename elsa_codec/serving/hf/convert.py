"""``convert``: a Hugging Face ``save_pretrained`` directory -> an ELSA directory (``elsa convert``).

The weights are encoded streaming, chunk by chunk (:func:`elsa_codec.encode_file`: magnitude
levels, the input memory-mapped), the tensors to encode chosen on the model skeleton built on the
``meta`` device from ``config.json`` (:func:`elsa_codec.select_weights`: by default the linear
layers of the blocks; embeddings and the output head stay dense, as SparseGPT / Wanda do).
ELSA: Halvachi et al., arXiv 2312.06872 (one-shot magnitude levels, sec. 2.1).
"""
from __future__ import annotations

import os

import torch

from ...errors import ELSAError, ELSAFormatError
from ...format.amend import write_quality
from ...format.document import ELSAMeta
from ...format.file import _ITEM, _open_safetensors, _shards, read_meta
from ...format.selection import DEFAULT_SELECT, check_select_arg, model_tie_groups, select_weights, transposed_weights
from ...format.stream import _FLOAT_CODES
from ...format.structure import parse_levels
from ...oneshot.stream import encode_file
from .calibrate import mapped_model
from .checkpoint import architecture_class, check_out_dir, layout_path, weights_path
from .config import ELSAQuantizationConfig
from .convert_calibration import calibration_windows, check_method, quality_report, statistics
from .pretrained import _config_json, copy_files, remove_stale, write_json

__all__ = ["convert_pretrained"]

def _skeleton(config):
    """The model class of ``config.architectures`` built on the ``meta`` device (its names are
    the checkpoint's)."""
    cls = architecture_class(config, "convert")
    with torch.device("meta"):
        return cls(config)


def _selected(model, file_names: set, select: str, structures: list, calibrated: bool = False) -> list:
    """The names to encode: :func:`select_weights` mapped onto the file's names (a tied weight the
    file stores under another name of its group)."""
    group = {n: g for g in model_tie_groups(model) for n in g}
    out = []
    for n in select_weights(model, select):
        stored = n if n in file_names else next((m for m in group.get(n, []) if m in file_names), None)
        if stored is None:
            raise ELSAError(f"convert: the model's weight {n!r} is not in the checkpoint")
        if stored not in out:
            out.append(stored)
    odd = sorted(set(out) & transposed_weights(model))
    if odd and not calibrated and any(s != "unstructured" for s in structures):
        raise ELSAError(f"convert: {odd[0]!r} is a transformers Conv1D weight ([in, out]); structured levels on it need "
                        "the model in memory: elsa_codec.save_pretrained(model, out, elsa_codec.magnitude_counters("
                        "model.state_dict(), levels, structure=..., model=model))")
    return out


def _total_bytes(path: str, dtype: torch.dtype | None) -> int:
    """Bytes of the checkpoint's tensors once floats are converted to ``dtype``."""
    out = 0
    size = torch.empty((), dtype=dtype).element_size() if dtype is not None else None
    for shard, _ in _shards(path)[0]:
        f = _open_safetensors(shard, check_header=False)
        for n in f.keys():
            sl = f.get_slice(n)
            code, numel = sl.get_dtype(), 1
            for d in sl.get_shape():
                numel *= d
            out += numel * (size if size is not None and code in _FLOAT_CODES else _ITEM.get(code, 4))
    return out


def convert_pretrained(src_dir, out_dir, *, levels, structure: str = "unstructured", select: str = DEFAULT_SELECT,
            distribution: str = "uniform", dtype: torch.dtype | None = None, code_bits: int | None = None,
            max_shard_size=None, default_level=None, progress: bool = True, calibration=None,
            method: str | None = None, eval_file=None, calibration_samples: int = 128, seq_len: int = 512) -> ELSAMeta:
    """Encode the Hugging Face model directory ``src_dir`` into the ELSA directory ``out_dir``.

    ``out_dir`` gets the ELSA weights (``model.safetensors``, or shards plus
    ``model.safetensors.index.json`` beyond ``max_shard_size``), ``config.json`` with its
    ``quantization_config`` (:class:`~elsa_codec.serving.hf.config.ELSAQuantizationConfig`), and
    every tokenizer, generation and processor file copied. The bytes depend only on the input and
    the arguments. ``from_pretrained(out_dir)`` then returns ELSA layers (``import elsa_codec``).

    Args:
        src_dir: a directory written by ``save_pretrained`` (``config.json`` with
            ``architectures``; safetensors weights).
        out_dir: the new directory (its parent must exist), never ``src_dir``.
        levels: sparsest first: ``[0.9, 0.75, 0.5]`` or ``["1:4", "2:4"]``.
        structure, distribution: as :func:`elsa_codec.magnitude_counters`.
        select: ``"blocks"`` (default), ``"blocks+head"`` or ``"all"`` (:data:`elsa_codec.SELECT_POLICIES`).
        dtype: convert floating tensors first (``config.json``'s ``dtype`` follows).
        code_bits, max_shard_size: as :func:`elsa_codec.encode_file` (default shard size ``"5GB"``).
        default_level: the level a plain ``from_pretrained`` serves (default dense).
        progress: progress output on stderr.
        calibration: a text file (plain text, or JSON lines with a ``"text"`` field) tokenized
            with ``src_dir``'s own tokenizer into windows of ``seq_len`` tokens: the first
            ``calibration_samples`` calibrate activation-aware levels, and the quality report is
            measured on ``eval_file`` or else on windows held back from the end
            (:func:`~elsa_codec.serving.hf.calibrate.split_windows`).
        method: ``"wanda"`` (the default with ``calibration``), ``"ria"`` or ``"magnitude"`` (the
            default without; with ``calibration`` the text then serves the report only).
        eval_file: the evaluation text of the quality report (needs ``calibration``).
        calibration_samples, seq_len: windows used for calibration, tokens per window.

    With ``calibration`` both models are memory-mapped, not loaded: one calibration forward pass
    over the windows (forward hooks keep one ``[in_features]`` float32 vector per layer), the
    streaming encode (one weight's scores at a time), then the report: per level ``1..T+1`` the
    mean cosine of the final hidden states to the original model's and, for a causal LM, the
    perplexity, on the evaluation windows, recorded in the document (format version 3; shown by
    ``elsa inspect`` and ``elsa levels``, read by :func:`elsa_codec.choose_level`'s
    ``min_quality``). Wanda: Sun et al., arXiv 2306.11695; RIA: Zhang et al., ICLR 2024
    (:mod:`elsa_codec.oneshot.scores`).

    Returns:
        The written :class:`~elsa_codec.format.document.ELSAMeta`.

    Raises:
        ELSAError: no ``config.json`` or no safetensors weights in ``src_dir``; an already
            quantized model; an unknown architecture; bad levels or selection; ``out_dir`` exists
            as a file, is ``src_dir``, or its parent is missing; an unknown ``method``, one that
            needs ``calibration`` without it; an empty or non-text calibration file, no tokenizer
            in ``src_dir``, fewer tokens than one window; NaN or Inf activations (naming the
            layer). All before anything is written. ELSAFormatError: unreadable weights.
    """
    src = os.fspath(src_dir)
    wpath, out, config = _check_source(src, out_dir)
    check_select_arg(select)
    structures = [str(st) for _, st in parse_levels(levels, structure, distribution)]
    method = check_method(method, calibration, eval_file)
    windows = calibration_windows(src, config, calibration, eval_file, calibration_samples, seq_len)
    model = _skeleton(config)
    names = _selected(model, set(_stored_names(wpath)), select, structures, calibrated=method != "magnitude")
    source = mapped_model(config, wpath) if windows is not None else None  # calibration and the report
    stats = statistics(source, names, windows[0], progress) if method != "magnitude" else None
    path, limit = layout_path(out, _total_bytes(wpath, dtype), max_shard_size)
    os.makedirs(out, exist_ok=True)
    meta = encode_file(wpath, path, levels=levels, structure=structure, distribution=distribution, dtype=dtype,
                       code_bits=code_bits, names=names, progress=progress, max_shard_size=limit,
                       transposed=sorted(transposed_weights(model) & set(names)), statistics=stats,
                       method=method if stats is not None else "wanda")
    if windows is not None:
        meta = write_quality(path, quality_report(source, config, path, meta, method, windows, calibration, eval_file),
                             max_shard_size=limit)
    remove_stale(path)
    copy_files(src, out)
    if dtype is not None:
        config.dtype = str(dtype).replace("torch.", "")
    write_json(os.path.join(out, "config.json"), _config_json(config, ELSAQuantizationConfig.from_meta(meta, default_level=default_level)))
    return meta


def _check_source(src: str, out_dir) -> tuple:
    """``(weights path, out_dir, config)`` of a convert, every refusal before any work."""
    from transformers import AutoConfig

    if not os.path.isfile(os.path.join(src, "config.json")):
        raise ELSAError(f"convert: {src} has no config.json (give a directory written by save_pretrained)")
    wpath = weights_path(src)
    if wpath is None:
        raise ELSAError(f"convert: {src} holds no model.safetensors nor model.safetensors.index.json (save the model "
                        "with save_pretrained(..., safe_serialization=True))")
    out = check_out_dir(out_dir, "convert", source=src)
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise ELSAError(f"convert: the parent folder of {out} does not exist")
    config = AutoConfig.from_pretrained(src)
    if getattr(config, "quantization_config", None) is not None:
        q = config.quantization_config
        method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", "?")
        raise ELSAError(f"convert: {src} is already quantized (quant_method {method!r}); convert the unquantized model")
    try:
        read_meta(wpath)
        raise ELSAError(f"convert: {wpath} is already ELSA-encoded")
    except ELSAFormatError as e:
        if "not an ELSA checkpoint" not in str(e):
            raise
    return wpath, out, config


def _stored_names(path: str) -> list:
    out = []
    for shard, names in _shards(path)[0]:
        out += names if names is not None else list(_open_safetensors(shard, check_header=False).keys())
    return out
