"""Calibration for ``elsa convert --calibration``: text into token windows, and a model whose
weights stay memory-mapped in its safetensors files.

The model is built with its parameters on the ``meta`` device and its buffers real
(``accelerate.init_empty_weights``), then every parameter becomes a view of the file's
memory map: a forward pass touches each layer's pages as it runs and keeps no copy, so a
calibration or evaluation pass holds one layer's activations, not the model, in anonymous memory
(the page cache holds what the kernel keeps of the file). Text: Wanda (arXiv 2306.11695, sec. 4)
calibrates on 128 windows of one token stream; so does this.
"""
from __future__ import annotations

import ctypes
import json
import logging
import mmap
import os
import sys

import torch
from torch import nn

from ...errors import ELSAError
from ...format.file import _open_safetensors, _shards
from ...format.selection import model_tie_groups
from .checkpoint import architecture_class

logger = logging.getLogger("elsa_codec")

__all__ = ["read_texts", "token_windows", "mapped_model", "split_windows", "EVAL_SAMPLES"]

#: Windows held back from the calibration text for the quality report when no ``--eval`` file is given.
EVAL_SAMPLES = 16

#: Windows per forward call.
BATCH = 4

_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
if _LIBC is not None:
    _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def read_texts(path: str, what: str = "--calibration") -> list:
    """The documents of a text file: JSON lines with a ``"text"`` string each (``*.jsonl`` /
    ``*.json``, or a first line starting with ``{``), else plain text cut at blank lines.

    Raises:
        ELSAError: not a file, not UTF-8 text (or holding NUL bytes), a JSON line without a
            ``"text"`` string, no text at all.
    """
    if not os.path.isfile(path):
        raise ELSAError(f"{what} {path}: no such file")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ELSAError(f"{what} {path}: not a UTF-8 text file (byte {e.start})") from None
    if "\x00" in text:
        raise ELSAError(f"{what} {path}: not a text file (it holds NUL bytes)")
    lines = text.splitlines()
    first = next((ln.strip() for ln in lines if ln.strip()), "")
    if path.endswith((".jsonl", ".json")) or first.startswith("{"):
        docs = []
        for i, ln in enumerate(lines, start=1):
            if not ln.strip():
                continue
            try:
                rec = json.loads(ln)
            except ValueError as e:
                raise ELSAError(f"{what} {path}:{i}: not a JSON line ({e})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise ELSAError(f"{what} {path}:{i}: a JSON line needs a \"text\" string")
            docs.append(rec["text"])
    else:
        docs = text.split("\n\n")
    docs = [d.strip() for d in docs if d.strip()]
    if not docs:
        raise ELSAError(f"{what} {path}: empty (no text to calibrate on)")
    return docs


def token_windows(tokenizer, docs: list, seq_len: int, what: str) -> torch.Tensor:
    """``int64 [n, seq_len]``: the documents tokenized (no special tokens), joined by the
    tokenizer's end-of-sequence (else separator) token, cut into consecutive windows.

    Raises:
        ELSAError: fewer tokens than one window.
    """
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    ids = []
    for enc in tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]:
        ids.extend(enc)
        if sep is not None:
            ids.append(sep)
    n = len(ids) // seq_len
    if n < 1:
        raise ELSAError(f"{what}: {len(ids)} tokens, fewer than one sample of --seq-len {seq_len} tokens")
    return torch.tensor(ids[: n * seq_len], dtype=torch.int64).reshape(n, seq_len)


def split_windows(calib: torch.Tensor, samples: int, evaluation: torch.Tensor | None) -> tuple:
    """``(calibration windows, evaluation windows)``: without an evaluation set, the last
    ``min(EVAL_SAMPLES, n // 8)`` windows (at least 1) are held back, disjoint from the first
    ``samples`` used for calibration.

    Raises:
        ELSAError: one window only and no evaluation set.
    """
    if evaluation is not None:
        return calib[:samples], evaluation[:EVAL_SAMPLES]
    n = calib.shape[0]
    if n < 2:
        raise ELSAError("--calibration: one sample of --seq-len tokens only; the quality report holds back at least "
                        "one more (give more text, a shorter --seq-len, or --eval FILE)")
    held = max(1, min(EVAL_SAMPLES, n // 8))
    return calib[: min(samples, n - held)], calib[n - held:]


def batches(windows: torch.Tensor) -> list:
    """The model keyword arguments of ``windows`` in groups of :data:`BATCH`."""
    return [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows.split(BATCH)]


def check_seq_len(config, seq_len: int) -> None:
    """ELSAError unless ``seq_len`` fits the model's positions."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    most = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    if seq_len < 1:
        raise ELSAError(f"--seq-len must be >= 1, got {seq_len}")
    if most is not None and seq_len > most:
        raise ELSAError(f"--seq-len {seq_len} is longer than the model's {most} positions")


def mapped_model(config, path: str) -> nn.Module:
    """The model of ``config`` (in eval mode) with every parameter a view of the memory map of the
    safetensors checkpoint ``path`` (a file or an index): nothing is copied. Tied parameters stay
    one Parameter; one the file lacks but ties to a stored one takes it.

    Raises:
        ELSAError: a parameter the checkpoint does not hold (nor a tied name of it).
    """
    from accelerate import init_empty_weights

    cls = architecture_class(config, "convert")
    with init_empty_weights(include_buffers=False):
        model = cls(config)
    groups = {n: g for g in model_tie_groups(model) for n in g}
    stored, maps = {}, []
    for shard, names in _shards(path)[0]:
        f = _open_safetensors(shard, mmap=True)
        if f._mm is not None and len(f._mm):
            base = torch.frombuffer(f._mm, dtype=torch.uint8).data_ptr()
            maps.append((base, base + len(f._mm)))
        for n in names if names is not None else f.keys():
            stored[n] = f.get_tensor(n)
    for name, p in list(model.named_parameters(remove_duplicate=False)):
        src = next((m for m in [name, *groups.get(name, [])] if m in stored), None)
        if src is None:
            continue  # a tied weight the file stores once: tie_weights below
        t = stored[src]
        if tuple(t.shape) != tuple(p.shape):
            raise ELSAError(f"convert: {src} in {path} has shape {tuple(t.shape)}, the model's {name} {tuple(p.shape)}")
        _set_param(model, name, nn.Parameter(t, requires_grad=False))
    _retie(model, groups)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # transformers: the output head onto the input embedding, as from_pretrained does
    missing = [n for n, p in model.named_parameters(remove_duplicate=False) if p.is_meta]
    if missing:
        raise ELSAError(f"convert: the model's parameter {missing[0]!r} is not in {path} (from_pretrained would "
                        "initialise it at random; calibration runs the model the checkpoint holds)")
    for m in model.modules():
        own = [p for p in m.parameters(recurse=False) if _inside(p, maps)]
        if own:
            m.register_forward_hook(lambda m, args, out, own=own: _drop_pages(own))
    return model.eval()


def _inside(t: torch.Tensor, maps: list) -> bool:
    """Whether ``t``'s bytes lie in one of the file maps (a misaligned tensor was copied out)."""
    lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    return any(a <= lo and hi <= b for a, b in maps)


_MADV_DONTNEED = 4


def _drop_pages(params: list) -> None:
    """After a module's forward: unmap the resident pages of its parameters, views of a private
    file map that nothing writes (the next access maps them again from the page cache), so a pass
    over the model holds one layer of it in RSS at a time. Only tensors inside the map are given
    (``MADV_DONTNEED`` would zero anonymous memory). Linux only; elsewhere nothing."""
    if _LIBC is None:
        return
    page = mmap.PAGESIZE
    for p in params:
        begin = p.data_ptr()
        lo, hi = -(-begin // page) * page, (begin + p.numel() * p.element_size()) // page * page
        if hi > lo:
            _LIBC.madvise(lo, hi - lo, _MADV_DONTNEED)


def _set_param(model: nn.Module, name: str, p: nn.Parameter) -> None:
    mod, _, attr = name.rpartition(".")
    (model.get_submodule(mod) if mod else model)._parameters[attr] = p


def _retie(model: nn.Module, groups: dict) -> None:
    """Every name of a tie group on the first name's Parameter (the skeleton's ties)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, g in groups.items():
        _set_param(model, name, params[g[0]])
