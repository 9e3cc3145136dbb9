"""The ELSA training procedure driven by a ``train_fn``: sparsify, freeze (and encode), densify, repeat.

ELSA (Halvachi, Peste, Alistarh, Lampert, arXiv 2312.06872), sections 2.1-2.2. For each level
``t = 1..T`` (sparsest first):

1. *sparsify*: gradual magnitude pruning (Zhu & Gupta 2017) of the non-frozen weights of the
   prunable tensors, over the user's training steps, down to the level's target;
2. *freeze*: the level's surviving weights are frozen and encoded at once with their code
   ``t - 1`` (:func:`elsa_codec.format.bits.encode_tensor`), so the sparse network that was evaluated is
   bit-for-bit the one that ships;
3. *densify*: the pruned weights come back and only the non-frozen weights train.

:func:`embed_levels` is a thin wrapper over :class:`elsa_codec.LevelEmbedder` (the step-driven
core, for the user's own loop, the Hugging Face ``Trainer`` and Lightning): it calls
``train_fn(model, phase)`` once per phase and attaches the embedder to the optimizers that
``train_fn`` creates. :func:`prune_gmp` is the one-network GMP baseline. The engine lives in
:mod:`elsa_codec.training` (mask state, GMP control, optimizer binding, batch norm).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Mapping

import torch
from torch import nn

from ..checks import check_module, check_removed
from ..errors import ELSAError, ELSATypeError
from ..format.structure import parse_levels
from ..progress import progress_bar
from .binding import OptimizerBinding, auto_attach
from .bn import level_bn_stats, recalibrate_bn
from .config import ELSAConfig
from .embedder import LevelEmbedder
from .freeze import input_dim
from .gmp import GMPControl
from .guard import StepGuard
from .phases import Phase, phase_seed
from .result import ELSAResult
from .schedule import GMPSchedule
from .sparsifiers.base import as_sparsifier, check_masks
from .state import MaskState
from .weights import model_transposed, prunable_weights

__all__ = [
    "Phase",
    "ELSAResult",
    "embed_levels",
    "prune_gmp",
    "prunable_weights",
    "recalibrate_bn",
    "level_bn_stats",
]


def _check_train_fn(train_fn) -> None:
    if not callable(train_fn):
        raise ELSAError(f"train_fn must be a callable train_fn(model, phase), got {type(train_fn).__name__}")


#: Keywords removed in 0.2 (CHANGELOG.md), each with its replacement.
_REMOVED = {
    "prunable": "select= (a policy of SELECT_POLICIES or a list of names) or filter_fn=(module, fqn) -> bool",
}


def _config(fn: str, levels, fields: dict) -> ELSAConfig:
    """The :class:`ELSAConfig` of a run: ``levels`` itself, or ``ELSAConfig(levels=levels, **fields)``.

    Raises:
        ELSATypeError: a removed keyword (names its replacement), a keyword that is not a config
            field, or config fields beside a given config.
    """
    names = {f.name for f in dataclasses.fields(ELSAConfig)}
    check_removed(fn, {k: v for k, v in fields.items() if k not in names}, _REMOVED)
    if isinstance(levels, ELSAConfig):
        if fields:
            raise ELSATypeError(f"{fn}: a config was given, so {sorted(fields)} belong inside it "
                                "(dataclasses.replace(config, ...))")
        return levels
    return ELSAConfig(levels=levels, **fields)


def _run_phases(emb: LevelEmbedder, train_fn, progress: bool) -> None:
    """Call ``train_fn(model, phase)`` for each phase of the plan; a phase ends when it returns."""
    emb._hold = True
    while not emb.done:
        ph = emb.phase
        bar = progress_bar(total=ph.steps, desc=ph.name, unit="step", enabled=progress, leave=False)
        emb._ensure_started()
        try:
            with auto_attach(emb._binding, emb._model_ids, emb.attach):
                train_fn(emb.model, ph)
        except BaseException:
            if emb._gmp is not None:
                emb._gmp.abort(emb.state)  # parameters a sparsifier added come off
            emb.state.restore()  # nothing lost: the frozen values come back whatever train_fn did
            raise
        finally:
            emb.detach()
            bar.update(emb._local)
            bar.close()
        _check_same_parameters(emb)
        emb.end_phase()
    emb._hold = False


def _check_same_parameters(emb: LevelEmbedder) -> None:
    """After ``train_fn``: the prunable Parameters are still the model's (FSDP2's ``fully_shard``
    inside ``train_fn`` replaces them by DTensor Parameters the hooks never saw).

    Raises:
        ELSAError: naming the first replaced weight.
    """
    ids = {id(p) for p in emb.model.parameters()}
    for n, p in emb.params.items():
        if id(p) not in ids:
            raise ELSAError(
                f"{n}: train_fn replaced the model's parameters (fully_shard / FSDP applied inside train_fn?), so "
                "ELSA's hooks never saw its optimizer steps; apply fully_shard to the model before embed_levels "
                "(wrapping in DistributedDataParallel inside train_fn is fine)")


def embed_levels(
    model: nn.Module,
    levels,
    train_fn: Callable[[nn.Module, Phase], None],
    *,
    bn_calibration=None,
    bn_forward: Callable | None = None,
    progress: bool = True,
    on_freeze: Callable[[int, nn.Module], None] | None = None,
    on_phase_end: Callable[[Phase, nn.Module], None] | None = None,
    **config,
) -> ELSAResult:
    """Embed ``T`` nested sparse networks in ``model`` with ELSA (arXiv 2312.06872, sec. 2.1-2.2).

    A wrapper over :class:`elsa_codec.LevelEmbedder` with ``ELSAConfig(levels, **config)`` (the
    config's fields are this call's keywords, with the config's defaults), or with ``levels``
    itself when it is an :class:`elsa_codec.ELSAConfig`:
    ``train_fn(model, phase)`` is called once per phase and runs ``phase.steps`` steps of any
    ``torch.optim`` optimizer it creates (the embedder attaches to it at its first step); the
    phase ends when ``train_fn`` returns. For each level, sparsest first: GMP to the level's
    target over ``steps`` steps, freeze + encode with code ``t-1``, ``densify_steps`` steps of
    the non-frozen weights; the last densify phase trains the dense network (``final_steps``),
    whose dense-only weights get code ``T``; then the per-level batch-norm statistics.

    The model is changed in place: it ends as the dense network with every prunable weight
    encoded; ``result.encode()`` builds the checkpoint (``result.save(path)`` writes it, once).

    Several processes (``torch.distributed``, docs/SCALE.md): call it on every rank. DDP:
    pass the bare model and wrap it in ``DistributedDataParallel`` inside ``train_fn`` (or pass the
    DDP model). FSDP2: pass the model after ``fully_shard`` (never shard inside ``train_fn``).
    Masks, counters and frozen values are the same on every rank; ``result.save`` writes on rank 0.

    Args:
        model: ``nn.Module``; prunable weights float32/float16/bfloat16.
        levels: the levels, sparsest first (``[0.9, 0.75, 0.5]`` or ``["1:4", "2:4"]``), or an
            :class:`elsa_codec.ELSAConfig` (then no config keywords).
        train_fn: ``train_fn(model, phase)``; it must not write to the weights other than
            through ``optimizer.step()``.
        bn_calibration, bn_forward: see :meth:`elsa_codec.LevelEmbedder.finalize`.
        progress: tqdm bars per phase (on stderr; one line per phase when it is not a terminal).
        on_freeze: ``fn(level, model)`` right after level ``level`` is frozen and encoded.
        on_phase_end: ``fn(phase, model)`` after each phase.
        **config: the fields of :class:`elsa_codec.ELSAConfig` (``steps=`` is required): which
            weights (``select=`` a policy or names, ``filter_fn=(module, fqn) -> bool``), the
            schedule, the sparsifier, ``verify=`` (default ``"phase_end"``; ``"step"`` compares the
            frozen bits before every step, so a ``train_fn`` writing to them is caught at once).

    Returns:
        :class:`ELSAResult`.

    Raises:
        ELSAError: a bad config (names the field) or one that does not suit the model (no
            prunable layer, code bits, N:M, non-finite weights, ``encode_dtype``); a sparsifier
            mask that drops frozen weights; a ``train_fn`` that changes frozen weights (names the
            tensor; the frozen values are restored first). All checks on arguments run before
            any weight changes.
    """
    check_module(model, "model", "embed_levels", order="embed_levels(model, levels, train_fn)")
    _check_train_fn(train_fn)
    config = _config("embed_levels", levels, config)
    emb = LevelEmbedder(model, config, on_phase_end=on_phase_end, on_freeze=on_freeze)
    _run_phases(emb, train_fn, progress)
    return emb.finalize(bn_calibration, bn_forward=bn_forward, progress=progress)


def _check_frozen_arg(frozen, params) -> None:
    for n in frozen or {}:
        if n not in params:
            raise ELSAError(f"{n}: frozen mask given for a tensor that is not prunable")
        if tuple(frozen[n].shape) != tuple(params[n].shape):
            raise ELSAError(f"{n}: frozen mask has shape {tuple(frozen[n].shape)}, the weight has {tuple(params[n].shape)}")


def _gmp_setup(model, sparsity, structure, sparsifier, schedule, frozen, select, filter_fn, steps):
    """Checks (nothing changed on error) and the mask state + GMP control of :func:`prune_gmp`."""
    (sp, st), = parse_levels([sparsity], structure)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ELSAError(f"steps must be a non-negative int, got {steps!r}")
    spf = as_sparsifier(sparsifier)
    params = prunable_weights(model, select, filter_fn=filter_fn)
    tr = model_transposed(model, params)
    for n, p in params.items():
        if st.kind == "nm" and input_dim(p, n in tr) % st.m:
            raise ELSAError(f"{n}: input dimension {input_dim(p, n in tr)} is not a multiple of M={st.m} for {st}")
    _check_frozen_arg(frozen, params)
    state = MaskState(params, frozen)
    weights = {n: p.detach() for n, p in params.items()}
    check_masks(spf.masks(weights, state.frozen, sp, st), weights, state.frozen, st)  # frozen over target: fail now
    return state, GMPControl(spf, schedule or GMPSchedule(), sp, st, steps, tr), Phase(
        "gmp", 0, steps, None, sp, str(st), None, False)


def prune_gmp(
    model: nn.Module,
    sparsity,
    train_fn: Callable[[nn.Module, Phase], None],
    *,
    steps: int,
    structure: str = "unstructured",
    sparsifier="uniform",
    schedule: GMPSchedule | None = None,
    frozen: Mapping[str, torch.Tensor] | None = None,
    select=None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    seed: int | None = None,
    progress: bool = True,
    **removed,
) -> dict[str, torch.Tensor]:
    """Gradual magnitude pruning of one network (Zhu & Gupta 2017): the baseline of ELSA's
    experiments (one network per sparsity, trained and stored independently).

    Over ``steps`` optimizer steps run by ``train_fn(model, phase)`` (``phase.kind == "gmp"``)
    the prunable weights are pruned along the cubic schedule to ``sparsity``; the rest of the
    steps fine-tune at the target. In place: the model ends with its pruned weights at zero.

    Args:
        model: ``nn.Module``.
        sparsity: target (fraction in (0, 1)) or an ``"N:M"`` pattern.
        train_fn: as for :func:`embed_levels`.
        steps: optimizer steps.
        structure, sparsifier, schedule: as :class:`elsa_codec.ELSAConfig`.
        frozen: optional ``name -> bool`` masks of weights to keep unchanged (bit-identical).
        select, filter_fn: which weights: as :class:`elsa_codec.ELSAConfig` (a policy or names;
            ``(module, fqn) -> bool``).
        seed: offered as ``phase.seed`` (the global RNG is not seeded).
        progress: a tqdm bar (one line on stderr when it is not a terminal).

    Returns:
        ``name -> bool`` masks (``True`` = kept), the shapes of the prunable weights.

    Raises:
        ELSAError: a target outside (0, 1); no prunable layer; frozen weights that already exceed
            the target (names the tensor); a ``train_fn`` that changes frozen weights.
        ELSATypeError: ``prunable=`` (removed in 0.2: names ``select=`` / ``filter_fn=``).
    """
    check_removed("prune_gmp", removed, _REMOVED)
    check_module(model, "model", "prune_gmp", order="prune_gmp(model, sparsity, train_fn)")
    _check_train_fn(train_fn)
    select = "blocks" if select is None else select
    _check_not_sharded(model, select, filter_fn)
    state, ctl, phase = _gmp_setup(model, sparsity, structure, sparsifier, schedule, frozen, select, filter_fn, steps)
    phase = Phase("gmp", 0, phase.steps, None, phase.sparsity, phase.structure, phase_seed(seed, 0))
    done = _train_gmp(model, state, ctl, train_fn, phase, progress)
    if steps > 0 and done < steps:
        warnings.warn(f"{phase.name}: train_fn ran {done} of {steps} optimizer steps ({steps - done} missing"
                      + ("; no torch.optim optimizer step" if done == 0 else "") + ")", stacklevel=2)
    ctl.end(state)
    ctl.finish(state)
    return {n: m.clone() for n, m in state.mask.items()}


def _check_not_sharded(model, select, filter_fn) -> None:
    """prune_gmp runs on replicated weights (one process or DDP), not on FSDP2 shards."""
    from .distributed import dist_context

    params = prunable_weights(model, select, filter_fn=filter_fn)
    ctx = dist_context(model, params)
    if ctx is not None and ctx.sharded:
        raise ELSAError("prune_gmp does not support sharded (FSDP2 / DTensor) weights; use embed_levels with one "
                        "level, or DDP")


def _train_gmp(model, state: MaskState, ctl: GMPControl, train_fn, phase: Phase, progress: bool) -> int:
    """Run ``train_fn`` under the GMP hooks; returns the optimizer steps seen."""
    state.set_mask(None)
    ctl.start(state, model)
    steps = [0]

    def pre(key, ids):
        state.check("by train_fn between optimizer steps")

    def post(key, ids):
        guard.post(key)
        steps[0] += 1
        if steps[0] <= ctl.steps:
            ctl.after_step(state, steps[0])

    binding = OptimizerBinding(pre, post, lambda key: guard.loaded(key), lambda key: guard.grads(key))
    guard = StepGuard(state, binding.optimizers)
    ids = {id(p) for p in model.parameters()}
    bar = progress_bar(total=phase.steps, desc=phase.name, unit="step", enabled=progress, leave=False)
    try:
        with auto_attach(binding, ids, lambda opt: binding.attach(opt, ids)):
            train_fn(model, phase)
    except BaseException:
        ctl.abort(state)
        state.restore()
        raise
    finally:
        binding.detach()
        bar.update(steps[0])
        bar.close()
    state.check("by train_fn")
    return steps[0]
