"""Sentence-embedding distillation for a Hugging Face encoder: teacher targets, the loss, a ``train_fn``.

The pieces of an ordinary user training loop that :mod:`.minilm_elsa` hands to
:func:`elsa_codec.embed_levels` and :func:`elsa_codec.prune_gmp`: nothing in here knows about ELSA.

- :class:`TeacherBatches`: the training sentences tokenised once into length-sorted batches (little
  padding), each with the frozen teacher's last hidden states and sentence embeddings;
- :func:`mean_pool`: the all-MiniLM-L6-v2 model card's sentence embedding;
- :func:`distill_loss`: ``1 - cos`` on the sentence embeddings plus a hidden-state term;
- :func:`make_train_fn`: ``train_fn(model, phase)``: AdamW, linear warm-up then cosine decay over
  the phase, the batch order seeded by ``phase.seed``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TeacherBatches", "mean_pool", "distill_loss", "warmup_cosine", "make_train_fn"]


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` `[B, L, H]` over the tokens where ``attention_mask`` `[B, L]` is 1,
    L2-normalised: `[B, H]` float32 (sentence-transformers' mean pooling)."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    e = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return F.normalize(e.float(), p=2, dim=1)


class TeacherBatches:
    """Fixed, length-sorted batches of tokenised sentences with the teacher's outputs.

    Sentences are sorted by token count and cut into batches of ``batch_size``, so a batch pads
    to about its own length; each phase visits the batches in an order drawn from its seed.

    Args:
        teacher: the frozen encoder (``model(**batch).last_hidden_state`` `[B, L, H]`).
        tokenizer: its tokenizer.
        sentences: training sentences.
        batch_size: sentences per batch.
        max_length: tokens per sentence at most (longer ones are truncated).

    Attributes:
        batches: list of ``(encoding, hidden, embedding)``: the tokenizer's dict (``input_ids``,
            ``attention_mask``, ... `[B, L]` int64), the teacher's last hidden states `[B, L, H]`
            float32 and its sentence embeddings `[B, H]` float32.

    Raises:
        ValueError: no sentence, or ``batch_size`` below 1.
    """

    def __init__(self, teacher: nn.Module, tokenizer, sentences, *, batch_size: int = 32, max_length: int = 64):
        if not sentences:
            raise ValueError("TeacherBatches: no training sentence")
        if batch_size < 1:
            raise ValueError(f"TeacherBatches: batch_size must be at least 1, got {batch_size}")
        lengths = [len(tokenizer(s, truncation=True, max_length=max_length)["input_ids"]) for s in sentences]
        order = sorted(range(len(sentences)), key=lambda i: (lengths[i], i))
        self.batches = []
        with torch.no_grad():
            for i in range(0, len(order), batch_size):
                enc = tokenizer([sentences[j] for j in order[i : i + batch_size]], padding=True, truncation=True,
                                max_length=max_length, return_tensors="pt")
                h = teacher(**enc).last_hidden_state.float()
                self.batches.append((dict(enc), h, mean_pool(h, enc["attention_mask"])))

    def __len__(self) -> int:
        return len(self.batches)

    def stream(self, steps: int, seed: int | None):
        """``steps`` batches: epochs over the batches, each in a fresh order drawn from ``seed``."""
        g = torch.Generator().manual_seed(0 if seed is None else int(seed))
        perm, pos = torch.randperm(len(self), generator=g), 0
        for _ in range(steps):
            if pos == len(perm):
                perm, pos = torch.randperm(len(self), generator=g), 0
            yield self.batches[int(perm[pos])]
            pos += 1


def distill_loss(model: nn.Module, batch, *, hidden_weight: float = 1.0) -> torch.Tensor:
    """``mean(1 - cos(student, teacher))`` over the batch's sentence embeddings, plus
    ``hidden_weight`` times the squared error of the last hidden states over the real tokens,
    relative to the teacher's squared norm (so the term is about 1 for an all-zero student).

    Args:
        model: the student encoder.
        batch: one ``(encoding, hidden, embedding)`` of :class:`TeacherBatches`.

    Returns:
        A scalar float32 tensor.
    """
    enc, h_t, e_t = batch
    h = model(**enc).last_hidden_state.float()
    loss = (1.0 - (mean_pool(h, enc["attention_mask"]) * e_t).sum(1)).mean()
    if hidden_weight:
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        loss = loss + hidden_weight * (((h - h_t) ** 2) * m).sum() / ((h_t ** 2) * m).sum()
    return loss


def warmup_cosine(step: int, steps: int, warmup: float = 0.05) -> float:
    """Learning-rate factor at optimizer step ``step`` of ``steps``: linear from ``1 / w`` to 1
    over the first ``w = max(1, int(warmup * steps))`` steps, then a cosine down to 0."""
    w = max(1, int(warmup * steps))
    if step < w:
        return (step + 1) / w
    return 0.5 * (1.0 + math.cos(math.pi * min(step - w, steps - w) / max(steps - w, 1)))


def make_train_fn(batches: TeacherBatches, *, lr: float = 1e-4, warmup: float = 0.05, hidden_weight: float = 1.0,
                  on_step=None, final_lr: float | None = None):
    """A ``train_fn(model, phase)``: ``phase.steps`` AdamW steps (no weight decay) of
    :func:`distill_loss` on the trainable parameters, the learning rate rising linearly over the
    first ``warmup`` share of the phase to ``lr`` (``final_lr`` in an ELSA run's final dense phase,
    when given) and then falling to 0 along a cosine; batches from
    ``batches.stream(phase.steps, phase.seed)``. Dropout is off (the model stays in eval mode):
    the student imitates the teacher's deterministic outputs. ``on_step(phase, step, loss)`` is
    called after each step when given."""

    def train_fn(model, phase):
        params = [p for p in model.parameters() if p.requires_grad]
        peak = final_lr if final_lr is not None and getattr(phase, "final", False) else lr
        opt = torch.optim.AdamW(params, lr=peak, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, phase.steps, warmup))
        model.eval()
        for step, batch in enumerate(batches.stream(phase.steps, phase.seed)):
            loss = distill_loss(model, batch, hidden_weight=hidden_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if on_step is not None:
                on_step(phase, step, float(loss))

    return train_fn
