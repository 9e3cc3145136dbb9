"""Which tensors of a model carry levels: module kinds, the selection policy and tied weights.

One generic walker over ``named_modules`` (no per-model code) classifies every weight-bearing
module by type (docs/DESIGN.md, "Serving"):

- ``"linear"``: ``nn.Linear`` (and subclasses that keep its ``forward``), weight `[out, in]`;
- ``"conv"``: ``nn.Conv1d`` / ``nn.Conv2d``, weight `[out, in/groups, *kernel]`;
- ``"conv1d_t"``: ``transformers.pytorch_utils.Conv1D`` (GPT-2 family), weight `[in, out]`
  (transposed: its input dimension is dim 0);
- ``"embedding"``: ``nn.Embedding``, weight `[num_embeddings, embedding_dim]`.

The default selection follows the field's convention for pruning transformers (SparseGPT,
Frantar & Alistarh 2023; Wanda, Sun et al. 2023): the linear layers of the blocks carry levels;
the token/position embeddings and the output head stay dense. :data:`SELECT_POLICIES` names the
choices; one argument (``select=``) changes it.

Tied weights (one ``nn.Parameter`` used by several modules, e.g. a Llama ``lm_head`` and the token
embedding) are found by storage: :func:`tie_groups` on a state dict, :func:`model_tie_groups` on
a model. A tie group is selected, encoded and served as ONE tensor.

Modules pruned with ``torch.nn.utils.prune`` (``weight_orig`` Parameter, ``weight_mask`` buffer,
``weight`` recomputed by a forward pre-hook: :func:`pruned_tensors`) are refused, never skipped:
:func:`select_weights` / :func:`transposed_weights` on such a model and :func:`tie_groups` on
its state dict (which :func:`elsa_codec.encode` and ``magnitude_counters`` call) raise an
ELSAError naming the module and the fix, ``torch.nn.utils.prune.remove(module, "weight")``.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Mapping

import torch
from torch import nn

from ..errors import ELSAError

__all__ = [
    "SELECT_POLICIES",
    "DEFAULT_SELECT",
    "module_kind",
    "is_hf_conv1d",
    "output_head",
    "select_weights",
    "tie_groups",
    "model_tie_groups",
    "transposed_weights",
    "check_select_arg",
    "group_of",
    "pruned_tensors",
    "check_not_pruned",
    "pruned_error",
]

logger = logging.getLogger("elsa_codec")

#: The selection policies of :func:`select_weights`:
#: ``"blocks"`` (default): Linear / Conv1d / Conv2d / transformers ``Conv1D`` weights, without the
#: output head and without anything tied to an embedding (SparseGPT / Wanda convention);
#: ``"blocks+head"``: also the output head (``model.get_output_embeddings()``; with a tied head the
#: embedding comes along, it is the same tensor); ``"all"``: also every ``nn.Embedding``.
SELECT_POLICIES = ("blocks", "blocks+head", "all")
DEFAULT_SELECT = "blocks"


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a ``transformers.pytorch_utils.Conv1D`` (weight `[in, out]`) with its
    stock ``forward``. Never imports ``transformers``."""
    mod = sys.modules.get("transformers.pytorch_utils")
    cls = getattr(mod, "Conv1D", None) if mod is not None else None
    return cls is not None and isinstance(module, cls) and type(module).forward is cls.forward


def module_kind(module: nn.Module, parent: nn.Module | None = None) -> str | None:
    """``"linear"``, ``"conv"``, ``"conv1d_t"``, ``"embedding"`` or None (not servable).

    ELSA modules report the kind they serve. A ``nn.Linear`` inside ``nn.MultiheadAttention``
    (its ``out_proj``) is None: the attention reads ``out_proj.weight`` directly in
    ``F.multi_head_attention_forward`` and never calls the module, so no module swap can serve a
    level there. Subclasses that override ``forward`` are None (their forward may not be a plain
    product with the weight).
    """
    kind = getattr(module, "elsa_kind", None)
    if kind is not None:
        return kind
    if isinstance(parent, nn.MultiheadAttention):
        return None
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        return "linear"
    for cls in (nn.Conv1d, nn.Conv2d):
        if isinstance(module, cls) and type(module).forward is cls.forward:
            return "conv"
    if is_hf_conv1d(module):
        return "conv1d_t"
    if isinstance(module, nn.Embedding) and type(module).forward is nn.Embedding.forward:
        return "embedding"
    return None


def output_head(model: nn.Module) -> nn.Module | None:
    """The output head: ``model.get_output_embeddings()`` where the model has it (every
    ``transformers`` model), else None (no head is singled out)."""
    get = getattr(model, "get_output_embeddings", None)
    if not callable(get):
        return None
    try:
        head = get()
    except Exception:  # some models raise NotImplementedError
        return None
    return head if isinstance(head, nn.Module) else None


def pruned_tensors(model: nn.Module) -> list[tuple[str, str]]:
    """``[(module fqn, tensor name)]`` of the tensors reparametrised by ``torch.nn.utils.prune``:
    a pruning forward pre-hook (:class:`~torch.nn.utils.prune.BasePruningMethod`) names it, or the
    module holds a ``<name>_orig`` Parameter beside a ``<name>_mask`` buffer. Never imports
    ``torch.nn.utils.prune`` (no pruning hook exists before it is imported)."""
    prune = sys.modules.get("torch.nn.utils.prune")
    base = getattr(prune, "BasePruningMethod", None)
    out = []
    for fqn, m in model.named_modules():
        names = {p[: -len("_orig")] for p in m._parameters if p.endswith("_orig") and f"{p[: -len('_orig')]}_mask" in m._buffers}
        if base is not None:
            names.update(h._tensor_name for h in m._forward_pre_hooks.values()
                         if isinstance(h, base) and isinstance(getattr(h, "_tensor_name", None), str))
        out.extend((fqn, n) for n in sorted(names))
    return out


def pruned_error(fqn: str, tname: str, how: str | None = None, *, why: str = "ELSA would silently skip it (no levels)",
                 then: str = ", then encode / train (elsa_codec.encode, magnitude_counters, LevelEmbedder) on the model "
                             "or its new state_dict()") -> ELSAError:
    """The ELSAError for tensor ``tname`` of module ``fqn`` pruned with ``torch.nn.utils.prune``:
    ``how`` it is pruned (default: the module's forward pre-hook), ``why`` that is refused, and the
    fix (``prune.remove``) followed by ``then``."""
    how = how or f"{tname!r} is recomputed from {tname}_orig * {tname}_mask by a forward pre-hook"
    where = f"module {fqn!r}" if fqn else "the model itself"
    call = f"model.get_submodule({fqn!r})" if fqn else "model"
    return ELSAError(f"{where} is pruned with torch.nn.utils.prune ({how}): {why}. Fold the pruning into the weight "
                     f"first: torch.nn.utils.prune.remove({call}, {tname!r}){then}")


def check_not_pruned(model: nn.Module) -> None:
    """ELSAError unless no module of ``model`` is pruned with ``torch.nn.utils.prune`` (:func:`pruned_tensors`).

    Raises:
        ELSAError: the first pruned module, named, with the fix (``torch.nn.utils.prune.remove``).
    """
    found = pruned_tensors(model)
    if found:
        fqn, tname = found[0]
        raise pruned_error(fqn, tname)


def _check_state_dict_not_pruned(state_dict: Mapping) -> None:
    """ELSAError for a state dict of a pruned model: ``<p>_orig`` beside a ``<p>_mask`` of its shape."""
    for name, t in state_dict.items():
        if not name.endswith("_orig"):
            continue
        stem = name[: -len("_orig")]
        mask = state_dict.get(f"{stem}_mask")
        if isinstance(mask, torch.Tensor) and isinstance(t, torch.Tensor) and tuple(mask.shape) == tuple(t.shape):
            fqn, _, tname = stem.rpartition(".")
            raise pruned_error(fqn, tname, f"the state dict holds {name!r} and {stem + '_mask'!r} instead of {stem!r}")


def _storage_key(t: torch.Tensor):
    if not isinstance(t, torch.Tensor) or t.numel() == 0 or t.layout != torch.strided:
        return None
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # meta / fake tensors
        return None
    return (t.device, ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def tie_groups(state_dict: Mapping[str, torch.Tensor]) -> list[list[str]]:
    """Groups (2+ names, in state-dict order) of tensors that are the same tensor: same storage,
    offset, shape, strides and dtype, as ``model.state_dict()`` gives for tied parameters.

    Raises:
        ELSAError: the state dict of a model pruned with ``torch.nn.utils.prune`` (``x.weight_orig``
            beside ``x.weight_mask``): names the module and the fix (``prune.remove``).
    """
    _check_state_dict_not_pruned(state_dict)
    by_key: dict = {}
    for name, t in state_dict.items():
        key = _storage_key(t)
        if key is not None:
            by_key.setdefault(key, []).append(name)
    return [names for names in by_key.values() if len(names) > 1]


def model_tie_groups(model: nn.Module) -> list[list[str]]:
    """Groups (2+ names) of parameter names that are one ``nn.Parameter`` in ``model``."""
    by_id: dict = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def _weighted_modules(model: nn.Module) -> dict[str, tuple[nn.Module, str | None]]:
    """``fqn -> (module, kind)`` for every module with a ``weight`` Parameter (duplicates kept);
    ELSAError for a module pruned with ``torch.nn.utils.prune`` (:func:`check_not_pruned`)."""
    check_not_pruned(model)
    mods = dict(model.named_modules(remove_duplicate=False))
    out = {}
    for fqn, m in mods.items():
        if isinstance(getattr(m, "weight", None), nn.Parameter):
            parent = mods.get(fqn.rpartition(".")[0]) if fqn else None
            out[fqn] = (m, module_kind(m, parent))
    return out


def _wname(fqn: str) -> str:
    return f"{fqn}.weight" if fqn else "weight"


def transposed_weights(model: nn.Module) -> set[str]:
    """Names of the weights stored `[in, out]` (transformers ``Conv1D``): their input dimension,
    along which N:M groups and block tiles are laid, is dim 0.

    Raises:
        ELSAError: a module pruned with ``torch.nn.utils.prune`` (:func:`check_not_pruned`).
    """
    return {_wname(fqn) for fqn, (_, kind) in _weighted_modules(model).items() if kind == "conv1d_t"}


def select_weights(model: nn.Module, select=DEFAULT_SELECT) -> list[str]:
    """The weight names of ``model`` that carry levels, in ``state_dict`` order.

    Args:
        model: any ``nn.Module``.
        select: a policy of :data:`SELECT_POLICIES` (default ``"blocks"``: the SparseGPT / Wanda
            convention), or a predicate ``(fqn, module) -> bool`` called on every module with a
            ``weight`` Parameter.

    Every name of a tie group is listed when one is selected (one tensor). A module the swap cannot
    serve (``MultiheadAttention.out_proj``, a subclass with its own ``forward``) is never
    selected by a policy. Logs (INFO) what was selected and what was left dense.

    Returns:
        ``["layer.0.fc.weight", ...]``.

    Raises:
        ELSAError: unknown policy; nothing selected; a module pruned with ``torch.nn.utils.prune``
            (named, with the fix: ``torch.nn.utils.prune.remove(module, "weight")``).
    """
    check_select_arg(select)
    mods = _weighted_modules(model)
    head = output_head(model)
    groups = {n: g for g in model_tie_groups(model) for n in g}
    emb_tied = {n for fqn, (_, kind) in mods.items() if kind == "embedding" for n in groups.get(_wname(fqn), [])}
    sel: set[str] = set()
    for fqn, (m, kind) in mods.items():
        name = _wname(fqn)
        if callable(select):
            ok = bool(select(fqn, m))
        elif kind is None:
            ok = False
        elif kind == "embedding":
            ok = select == "all"
        elif head is not None and m is head:
            ok = select != "blocks"
        else:
            ok = select != "blocks" or name not in emb_tied
        if ok:
            sel.update(groups.get(name, [name]))
    order = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    out = [n for n in order if n in sel]
    if not out:
        raise ELSAError(
            f"no prunable layer: no weight of the model ({type(model).__name__}) selected with select={select!r} "
            f"(policies: {SELECT_POLICIES}); the model has no servable Linear / Conv / Conv1D / Embedding"
        )
    left = [_wname(f) for f, (_, k) in mods.items() if k is not None and _wname(f) not in sel]
    logger.info("select=%r: %d weights carry levels; left dense: %s", select, len(out), ", ".join(left) or "none")
    return out


def check_select_arg(select) -> None:
    """ELSAError unless ``select`` is a policy name or a callable."""
    if not (callable(select) or select in SELECT_POLICIES):
        raise ELSAError(f"unknown selection {select!r}: expected one of {SELECT_POLICIES} or a predicate (fqn, module) -> bool")


def group_of(groups: list[list[str]]) -> dict[str, list[str]]:
    """``name -> its tie group`` for every name in ``groups``."""
    return {n: g for g in groups for n in g}

