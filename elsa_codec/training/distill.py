"""Distillation toward the original network: the term that keeps ELSA's dense level the model it began as.

ELSA (Halvachi et al., arXiv 2312.06872, section 2.1) claims that densification recovers the
original dense accuracy. Trained on the task loss alone, the densify phases and the final dense
phase do not: the frozen weights drifted while the sparse levels trained, and the dense-only
weights relearn the task rather than the original function. Knowledge distillation toward the
original network's outputs (Hinton, Vinyals, Dean 2015, "Distilling the Knowledge in a Neural
Network") gives those phases the original as a target:

- :class:`DistillConfig`: the term's weight, temperature, loss, which output, in which phases,
  where the original's outputs come from; a field of :class:`elsa_codec.ELSAConfig`;
- :class:`Teacher`: the original network as a copy of the model's parameters and buffers taken
  when the embedder is built, run with ``torch.func.functional_call`` on the model's own modules
  (eval mode, no gradient);
- :func:`distill_term`: the loss between a student and a teacher output;
- :class:`DistillHooks`: forward hooks that add the term to every grad-enabled forward of the
  model (to its ``loss`` when the output carries one, otherwise to the output's gradient), so the
  Hugging Face ``Trainer``, Lightning and ``embed_levels`` need no change to their loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ELSAError

__all__ = ["DistillConfig", "Teacher", "distill_term", "select_output", "DistillHooks", "DISTILL_LOSSES",
           "DISTILL_PHASES", "DISTILL_TEACHERS"]

#: ``"kl"``: ``T**2 * KL(softmax(t / T) || softmax(s / T))`` over the last dimension (logits; Hinton
#: et al. 2015); ``"mse"``: mean squared error; ``"cosine"``: mean of ``1 - cos`` along the last dimension.
DISTILL_LOSSES = ("kl", "mse", "cosine")
#: ``"densify"``: every densify phase and the final dense phase; ``"final"``: the final dense phase
#: only; ``"all"``: the sparsify phases too.
DISTILL_PHASES = ("densify", "final", "all")
#: ``"copy"``: the embedder keeps a copy of the original parameters and buffers and runs it on each
#: batch; ``"given"``: the caller passes the original's outputs (e.g. computed once and cached).
DISTILL_TEACHERS = ("copy", "given")
#: Output fields tried, in order, when ``DistillConfig.output`` is None and the output is not a tensor.
_FIELDS = ("logits", "last_hidden_state")


@dataclass
class DistillConfig:
    """The distillation term toward the original network (``ELSAConfig(distill=...)``).

    Attributes:
        weight: the term's factor (``loss + weight * term``), >= 0.
        temperature: ``T`` of the ``"kl"`` loss, > 0 (the term is scaled by ``T**2`` so its
            gradient keeps its size across temperatures).
        loss: one of :data:`DISTILL_LOSSES`.
        output: which part of the model's output is compared: None (the output itself when it is a
            tensor; else its ``logits``, else its ``last_hidden_state``; the first element of a
            tuple), or the name of a field / key (``"logits"``, ``"last_hidden_state"``).
        phases: one of :data:`DISTILL_PHASES` (default ``"densify"``).
        teacher: one of :data:`DISTILL_TEACHERS`. ``"copy"`` costs one more copy of the model's
            parameters and buffers in memory for the whole run and one forward pass of the
            original per training forward in the phases the term is on (about a third of a
            training step); ``"given"`` costs nothing, the caller supplies the outputs.
        hooks: with ``teacher="copy"``, add the term by forward hooks on the model (True, the
            default: nothing in the training loop changes; the term is added to the output's
            ``loss`` when it has one, else to the output's gradient) or leave it to the caller's
            ``loss = loss + embedder.distill_loss(outputs, *inputs)`` (False).

    Raises:
        ELSAError: a field out of range, naming it.
    """

    weight: float = 1.0
    temperature: float = 1.0
    loss: str = "kl"
    output: str | None = None
    phases: str = "densify"
    teacher: str = "copy"
    hooks: bool = True

    def __post_init__(self):
        for name in ("weight", "temperature"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v == v or v < 0 or (
                    name == "temperature" and v == 0):
                raise ELSAError(f"DistillConfig.{name} must be a number {'> 0' if name == 'temperature' else '>= 0'}, "
                                f"got {v!r}")
            setattr(self, name, float(v))
        for name, allowed in (("loss", DISTILL_LOSSES), ("phases", DISTILL_PHASES), ("teacher", DISTILL_TEACHERS)):
            if getattr(self, name) not in allowed:
                raise ELSAError(f"DistillConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.output is not None and not isinstance(self.output, str):
            raise ELSAError(f"DistillConfig.output must be None or a field name, got {self.output!r}")
        if not isinstance(self.hooks, bool):
            raise ELSAError(f"DistillConfig.hooks must be a bool, got {self.hooks!r}")
        if self.hooks and self.teacher == "given":
            raise ELSAError("DistillConfig: teacher='given' needs hooks=False (the caller passes the original's "
                            "outputs to LevelEmbedder.distill_loss)")

    def active(self, phase) -> bool:
        """Whether the term is on in ``phase`` (a :class:`elsa_codec.Phase` or None)."""
        if phase is None or phase.kind not in ("sparsify", "densify"):
            return False
        return self.phases == "all" or (phase.kind == "densify" and (self.phases == "densify" or phase.final))


def select_output(out, field: str | None, what: str = "output"):
    """The tensor of ``out`` the term compares (see :attr:`DistillConfig.output`).

    Returns:
        ``(tensor, key)``: ``key`` is the field / key name, ``0`` for a tuple's first element, or
        None when ``out`` is the tensor.

    Raises:
        ELSAError: no such field, or nothing tensor-like in ``out`` (names what it found).
    """
    if torch.is_tensor(out) and field is None:
        return out, None
    if isinstance(out, (tuple, list)) and not hasattr(out, "keys") and field is None:
        if out and torch.is_tensor(out[0]):
            return out[0], 0
    keys = list(out.keys()) if hasattr(out, "keys") else [k for k in _FIELDS if hasattr(out, k)]
    for k in ([field] if field is not None else _FIELDS):
        v = out.get(k) if hasattr(out, "get") else getattr(out, k, None)
        if torch.is_tensor(v):
            return v, k
    want = repr(field) if field is not None else f"a tensor, or a field among {_FIELDS}"
    raise ELSAError(f"distillation: the model's {what} ({type(out).__name__}, fields {keys}) has no {want}; "
                    "set DistillConfig(output='<field>')")


def distill_term(student: torch.Tensor, teacher: torch.Tensor, config: DistillConfig) -> torch.Tensor:
    """``config.weight`` times the loss between ``student`` and ``teacher`` (same shape, any float
    dtype; computed in float32; the teacher carries no gradient).

    Args:
        student: e.g. logits ``[batch, ..., classes]`` or hidden states ``[batch, tokens, hidden]``.
        teacher: the original network's tensor of the same shape.
        config: :class:`DistillConfig`.

    Returns:
        A float32 scalar. ``"kl"`` and ``"cosine"`` average over every position of the leading
        dimensions, ``"mse"`` over every element.

    Raises:
        ELSAError: the shapes differ.
    """
    if tuple(student.shape) != tuple(teacher.shape):
        raise ELSAError(f"distillation: the student's output has shape {tuple(student.shape)}, the original's "
                        f"{tuple(teacher.shape)}; both must come from the same inputs")
    s, t = student.float(), teacher.detach().float()
    if config.loss == "kl":
        T = config.temperature
        ls, lt = F.log_softmax(s / T, dim=-1), F.log_softmax(t / T, dim=-1)
        term = (lt.exp() * (lt - ls)).sum(-1).mean() * (T * T)
    elif config.loss == "mse":
        term = F.mse_loss(s, t)
    else:
        term = (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()
    return config.weight * term


class Teacher:
    """The original network: a copy of ``model``'s parameters and buffers, run on its own modules.

    Built before training changes anything; memory: one copy of every parameter and buffer.
    :meth:`__call__` runs ``torch.func.functional_call`` with the copies in eval mode without
    gradient (the modules' own modes come back afterwards), so the original's outputs never
    depend on dropout or on the student's batch-norm statistics.

    Args:
        model: the bare ``nn.Module`` (not a DDP wrapper).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        copies: dict[int, torch.Tensor] = {}  # tied tensors (one storage, several names) copied once
        self.tensors = {}
        for n, t in model.state_dict(keep_vars=True).items():
            if torch.is_tensor(t):
                self.tensors[n] = copies.setdefault(id(t), t.detach().clone())
        self.running = False  # True while the original runs (the hooks skip that forward)

    def state_dict(self) -> dict:
        """``name -> clone`` of the copy (tied names share one clone, so ``torch.save`` writes it once)."""
        clones: dict[int, torch.Tensor] = {}
        return {n: clones.setdefault(id(t), t.clone()) for n, t in self.tensors.items()}

    @property
    def nbytes(self) -> int:
        """Bytes the copy holds."""
        return sum(t.numel() * t.element_size() for t in {id(t): t for t in self.tensors.values()}.values())

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        modes = [(m, m.training) for m in self.model.modules()]
        self.running = True
        try:
            self.model.eval()
            return torch.func.functional_call(self.model, self.tensors, args, kwargs, tie_weights=True, strict=False)
        finally:
            self.running = False
            for m, mode in modes:
                m.training = mode


class _AddGrad(torch.autograd.Function):
    """Identity forward; backward adds a fixed gradient ``g`` (the distillation term's)."""

    @staticmethod
    def forward(ctx, x, g):
        ctx.save_for_backward(g)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (g,) = ctx.saved_tensors
        return grad + g.to(grad.dtype), None


def _with_term(out, t_out, config: DistillConfig):
    """``out`` with the term added: to its ``loss`` when it has one, else to its tensor's gradient.
    Returns ``(new output, term value)``."""
    s, key = select_output(out, config.output)
    t, _ = select_output(t_out, config.output, "original's output")
    loss = out.get("loss") if hasattr(out, "get") else None
    if torch.is_tensor(loss) and loss.requires_grad:
        term = distill_term(s, t, config)
        out["loss"] = loss + term.to(loss.dtype)
        return out, term.detach()
    with torch.enable_grad():
        leaf = s.detach().requires_grad_(True)
        term = distill_term(leaf, t, config)
        (g,) = torch.autograd.grad(term, leaf)
    s2 = _AddGrad.apply(s, g)
    if key is None:
        return s2, term.detach()
    if key == 0:
        rest = list(out[1:])
        if hasattr(out, "_fields"):  # a namedtuple
            return type(out)(s2, *rest), term.detach()
        return (tuple if isinstance(out, tuple) else list)([s2, *rest]), term.detach()
    out[key] = s2
    return out, term.detach()


class DistillHooks:
    """Forward hooks on ``model`` adding the distillation term while ``active()`` is true.

    A forward counts when gradients are enabled and its selected output requires them (so
    evaluation under ``torch.no_grad()`` costs nothing). The original runs on the same positional
    and keyword arguments. The last term's value is kept in :attr:`last` (detached, or None) and
    the number of forwards that got it in :attr:`calls`.

    Args:
        model: the bare module whose forward the training loop calls.
        teacher: :class:`Teacher` of it.
        config: :class:`DistillConfig`.
        active: ``() -> bool``.
    """

    def __init__(self, model: nn.Module, teacher: Teacher, config: DistillConfig, active):
        self.teacher, self.config, self.active = teacher, config, active
        self.last, self.calls = None, 0
        self.handle = model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, out):
        if self.teacher.running or not torch.is_grad_enabled() or not self.active():
            return None
        s, _ = select_output(out, self.config.output)
        if not s.requires_grad:
            return None
        new, self.last = _with_term(out, self.teacher(*args, **kwargs), self.config)
        self.calls += 1
        return new

    def remove(self) -> None:
        """Remove the hook."""
        self.handle.remove()
