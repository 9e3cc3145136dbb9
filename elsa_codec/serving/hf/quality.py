"""What each level of a converted checkpoint keeps: the quality report ``elsa convert
--calibration`` records in the checkpoint's document (docs/FORMAT.md, "quality").

Per level ``t`` in ``1..T+1``: the mean cosine, over the evaluation tokens, between the final
hidden states of the checkpoint served at level ``t`` and those of the original model; for a
causal LM also the perplexity (``exp`` of the mean next-token cross-entropy). Both models are
memory-mapped (:func:`~elsa_codec.serving.hf.calibrate.mapped_model`); level ``t`` of an encoded
weight is decoded just before its module runs and dropped after it, so one layer is decoded at a
time.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...format.bits import extract_level
from ...format.document import ELSAMeta
from .calibrate import batches

__all__ = ["LevelHooks", "measure_quality", "is_causal_lm"]


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers causal LM (``*ForCausalLM`` / ``*LMHeadModel``)."""
    name = type(model).__name__
    return name.endswith(("ForCausalLM", "LMHeadModel"))


class LevelHooks:
    """Serve ``model`` (memory-mapped encoded weights) at :attr:`level`: each module whose weight
    is encoded in ``meta`` gets, for the length of its forward, ``extract_level(weight, level)``
    (nothing for the dense level). :meth:`remove` takes the hooks off."""

    def __init__(self, model: nn.Module, meta: ELSAMeta):
        self.level, self._k, self._T = meta.num_levels + 1, meta.code_bits, meta.num_levels
        names = set(meta.tensors) | set(meta.tied)
        self._handles, self._stored = [], {}
        for fqn, m in model.named_modules(remove_duplicate=False):
            if isinstance(m._parameters.get("weight"), nn.Parameter) and (f"{fqn}.weight" if fqn else "weight") in names:
                self._handles.append(m.register_forward_pre_hook(self._decode))
                self._handles.append(m.register_forward_hook(self._restore))

    def _decode(self, m, args):
        if self.level <= self._T:
            w = m._parameters["weight"]
            self._stored[id(m)] = w
            m._parameters["weight"] = nn.Parameter(extract_level(w.detach(), self.level, self._k), requires_grad=False)

    def _restore(self, m, args, out):
        stored = self._stored.pop(id(m), None)
        if stored is not None:
            m._parameters["weight"] = stored

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _run(model, b: dict, causal: bool):
    """``(final hidden states float32, summed next-token loss or None)`` of one batch."""
    kw = dict(b, output_hidden_states=True)
    if causal:
        kw["labels"] = b["input_ids"]
    out = model(**kw)
    loss = None
    if causal:
        n = b["input_ids"].shape[0] * (b["input_ids"].shape[1] - 1)
        loss = float(out.loss) * n
    return out.hidden_states[-1].to(torch.float32), loss


def measure_quality(reference: nn.Module, served: nn.Module, meta: ELSAMeta, windows: torch.Tensor) -> tuple:
    """The per-level records of the report and the reference's perplexity.

    Args:
        reference: the original model (dense, memory-mapped).
        served: the checkpoint's model (encoded weights, memory-mapped).
        meta: the checkpoint's document (which weights are encoded, T, k).
        windows: ``int64 [n, seq_len]`` evaluation token windows.

    Returns:
        ``([{"level": t, "cosine": c, "perplexity": p or None} for t in 1..T+1], reference
        perplexity or None)``.
    """
    causal = is_causal_lm(served)
    T = meta.num_levels
    cos, loss, ref_loss, tokens, pairs = [0.0] * (T + 2), [0.0] * (T + 2), 0.0, 0, 0
    hooks = LevelHooks(served, meta)
    try:
        with torch.inference_mode():
            for b in batches(windows):
                h0, l0 = _run(reference, b, causal)
                ref_loss += l0 or 0.0
                pairs += b["input_ids"].shape[0] * max(b["input_ids"].shape[1] - 1, 1)
                tokens += h0.shape[0] * h0.shape[1]
                for t in range(1, T + 2):
                    hooks.level = t
                    h, lt = _run(served, b, causal)
                    cos[t] += float(F.cosine_similarity(h, h0, dim=-1).sum())
                    loss[t] += lt or 0.0
    finally:
        hooks.remove()

    def ppl(total):
        return round(math.exp(min(total / pairs, 700.0)), 4) if causal else None

    rows = [{"level": t, "cosine": round(min(1.0, max(-1.0, cos[t] / tokens)), 6), "perplexity": ppl(loss[t])}
            for t in range(1, T + 2)]
    return rows, ppl(ref_loss)
