"""The ELSA training procedure: sparsify, freeze (and encode), densify, repeat.

ELSA (Halvachi, Peste, Alistarh, Lampert, arXiv 2312.06872), sections 2.1-2.2. For each level
``t = 1..T`` (sparsest first):

1. *sparsify*: gradual magnitude pruning (Zhu & Gupta 2017) of the non-frozen weights of the
   prunable tensors, over the user's training steps, down to the level's target;
2. *freeze*: the level's surviving weights are frozen and encoded at once with their code
   ``t - 1`` (:func:`elsa_codec.bits.encode_tensor`), so the sparse network that was evaluated is
   bit-for-bit the one that ships;
3. *densify*: the pruned weights come back and only the non-frozen weights train.

The densify phase of the last level trains the dense network; its dense-only weights are then
encoded with code ``T``. The parameters that are not pruned (biases, norm affine; one copy serves
every level) are frozen together with level 1 by default (``freeze_shared``), so each extracted
level is bit-for-bit the network that was frozen. Finally the batch-norm running statistics are recalibrated for every
level (section 2.2: per-level statistics) and returned with the counters, so
``encode(model.state_dict(), result.counters, bn_stats=result.bn_stats)`` (or
``result.encode()``) writes the checkpoint.

Training stays yours: ``train_fn(model, phase)`` runs ``phase.steps`` steps of any
``torch.optim`` optimizer on any loss. While a phase runs, global optimizer step hooks (for the
optimizers that hold the model's prunable weights) zero the gradients of frozen and pruned
weights before each step and, after it, restore the frozen values bit for bit and re-apply the
pruning mask: masking the gradient alone is not enough, since weight decay and momentum move
weights whose gradient is zero.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from .bits import bits_view, check_code_bits, default_code_bits, encode_tensor
from .codec import Counters, ELSAStateDict, encode
from .errors import ELSAError
from .masks import Structure, parse_level
from .select import DEFAULT_SELECT, SELECT_POLICIES, select_weights, transposed_weights
from .sparsify import GMPSchedule, as_sparsifier, check_masks

__all__ = [
    "Phase",
    "ELSAResult",
    "embed_levels",
    "prune_gmp",
    "prunable_weights",
    "recalibrate_bn",
    "level_bn_stats",
    "parse_levels",
]


@dataclass(frozen=True)
class Phase:
    """One training phase, handed to ``train_fn(model, phase)``.

    Attributes:
        kind: ``"sparsify"`` (GMP towards level ``level``), ``"densify"`` (train the non-frozen
            weights after freezing level ``level``; with ``final`` it is the dense network's
            training), ``"gmp"`` (:func:`prune_gmp`) or ``"dense"`` (free for the user's own use).
        index: 0-based number of the phase within the run.
        steps: optimizer steps to run (the GMP ramp is laid out over them).
        level: the ELSA level ``1..T`` the phase belongs to (None for ``"gmp"``/``"dense"``).
        sparsity: the phase's target sparsity (fraction of zeros over the prunable tensors at the
            end of the phase; ``0.0`` for densify phases).
        structure: the level's structure (``"unstructured"``, ``"2:4"``, ``"block:4x4"``).
        seed: a seed derived from the run's seed and ``index`` (None without a seed); the global
            torch RNG is seeded with it at the phase start. Seed your data order with it.
        final: True for the last densify phase (training of the dense network).
    """

    kind: str
    index: int
    steps: int
    level: int | None = None
    sparsity: float = 0.0
    structure: str = "unstructured"
    seed: int | None = None
    final: bool = False

    @property
    def name(self) -> str:
        if self.kind == "sparsify":
            return f"level {self.level} sparsify -> {self.sparsity:.1%}"
        if self.kind == "densify":
            return "dense training" if self.final else f"level {self.level} densify"
        if self.kind == "gmp":
            return f"GMP -> {self.sparsity:.1%}"
        return self.kind


@dataclass
class ELSAResult:
    """What :func:`embed_levels` returns.

    Attributes:
        counters: :class:`elsa_codec.Counters` (uint8 tensors of the prunable weights' shapes,
            values ``1..T+1``) with ``num_levels`` and the level structures.
        bn_stats: ``{level (1..T+1): {bn_module_fqn: {"running_mean", "running_var",
            "num_batches_tracked": Tensor}}}``, or None without calibration data.
        code_bits: ``k`` used to encode the frozen weights.
        targets: the levels' target sparsities (fractions), sparsest first.
        sparsities: measured sparsity of each level over the prunable tensors (fraction of zeros).
        structures: the levels' structures.
        history: one dict per phase (``kind``, ``level``, ``steps``, ``steps_done`` (optimizer
            steps seen by the hooks), ``sparsity`` (measured at the phase end), ``seconds``).
        model: the trained model (dense level, weights already encoded, batch-norm buffers at the
            dense level's statistics).
        encode_dtype: the dtype the checkpoint ships in when it differs from the training dtype
            (:func:`embed_levels`), else None.
    """

    counters: Counters
    bn_stats: dict | None
    code_bits: int
    targets: list
    sparsities: list
    structures: list
    history: list = field(default_factory=list)
    model: nn.Module | None = field(default=None, repr=False)
    encode_dtype: torch.dtype | None = None

    @property
    def num_levels(self) -> int:
        return self.counters.num_levels

    def level_masks(self, level: int) -> dict[str, torch.Tensor]:
        """``name -> bool`` mask of the weights in level ``level`` (``counter <= level``)."""
        return {n: c <= level for n, c in self.counters.items()}

    def encode(self, state_dict: Mapping[str, torch.Tensor] | None = None, **kwargs) -> ELSAStateDict:
        """``encode(state_dict or model.state_dict(), counters, code_bits=k, bn_stats=bn_stats)``.

        The prunable weights are already encoded in the model, so this re-encoding leaves them
        bit-identical (the code rule is idempotent) and only builds the metadata. With an
        ``encode_dtype`` the floating-point tensors (and batch-norm statistics) are cast to it
        first; the encoded weights are exactly representable in it. Extra keyword arguments go to
        :func:`elsa_codec.encode`.
        """
        if state_dict is None:
            if self.model is None:
                raise ELSAError("ELSAResult.encode needs a state dict (the result holds no model)")
            state_dict = self.model.state_dict()
        bn = self.bn_stats
        if self.encode_dtype is not None:
            dt = self.encode_dtype
            cast = lambda v: v.to(dt) if v.is_floating_point() else v  # noqa: E731
            state_dict = {k: cast(v) for k, v in state_dict.items()}
            if bn:
                bn = {t: {m: {s: cast(v) for s, v in st.items()} for m, st in per.items()} for t, per in bn.items()}
        kwargs.setdefault("code_bits", self.code_bits)
        kwargs.setdefault("bn_stats", bn)
        return encode(state_dict, self.counters, **kwargs)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def prunable_weights(model: nn.Module, prunable=None) -> dict[str, nn.Parameter]:
    """The weights ELSA prunes: ``param_name -> Parameter`` (a tied Parameter once, under its first name).

    Args:
        model: any ``nn.Module``.
        prunable: None or a policy of :data:`elsa_codec.select.SELECT_POLICIES` (default
            ``"blocks"``: the weights of the Linear / Conv1d / Conv2d / transformers ``Conv1D``
            layers, without embeddings and the output head, as SparseGPT / Wanda prune
            transformers; :func:`elsa_codec.select.select_weights`), a predicate
            ``(module_name, module) -> bool`` called on every module with a ``weight`` Parameter,
            or an iterable of module names / parameter names (``"fc"`` or ``"fc.weight"``).

    Raises:
        ELSAError: no prunable layer; a listed name that is not in the model; unknown policy.
    """
    mods = {n: m for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), nn.Parameter)}
    if prunable is None or isinstance(prunable, str):
        if isinstance(prunable, str) and prunable not in SELECT_POLICIES:
            raise ELSAError(f"unknown prunable policy {prunable!r}: expected one of {SELECT_POLICIES}, a predicate or names")
        names = select_weights(model, prunable or DEFAULT_SELECT)
        sel = [n[: -len(".weight")] if n.endswith(".weight") else "" for n in names]
    elif callable(prunable):
        sel = [n for n, m in mods.items() if prunable(n, m)]
    else:
        sel = []
        for n in prunable:
            n = str(n)
            mn = n[: -len(".weight")] if n.endswith(".weight") else n
            if mn not in mods:
                raise ELSAError(f"{n}: no module with a weight Parameter of that name in the model")
            sel.append(mn)
    out, seen = {}, set()
    for n in sel:
        p = (mods[n] if n in mods else model.get_submodule(n)).weight
        if id(p) not in seen:  # a tied weight is one tensor: pruned and frozen once
            seen.add(id(p))
            out[f"{n}.weight" if n else "weight"] = p
    if not out:
        raise ELSAError(
            "the model has no prunable layer (no Linear / Conv / Conv1D weight selected); pass prunable= to choose tensors"
        )
    return out


def parse_levels(levels, structure="unstructured") -> list[tuple[float, Structure]]:
    """``levels`` (sparsest first) -> ``[(sparsity, Structure)]``.

    Args:
        levels: sparsities in (0, 1), strictly decreasing (``[0.9, 0.75, 0.5]``), or N:M patterns
            with increasing N and one M (``["1:4", "2:4"]``).
        structure: ``"unstructured"`` or ``"block:RxC"`` for fractional levels.

    Raises:
        ELSAError: empty, not sparsest first, outside (0, 1), mixed kinds, N:M with different M.
    """
    if isinstance(levels, (str, float, int)):
        levels = [levels]
    levels = list(levels)
    if not levels:
        raise ELSAError("levels must list at least one level (sparsest first), e.g. [0.9, 0.75, 0.5]")
    specs = [parse_level(lv, structure) for lv in levels]
    sps = [s for s, _ in specs]
    if len({st.kind == "nm" for _, st in specs}) > 1:
        raise ELSAError(f"levels {levels} mix N:M patterns and sparsities")
    if any(b >= a for a, b in zip(sps, sps[1:])):
        raise ELSAError(f"levels {levels} must be given sparsest first (strictly decreasing sparsity)")
    if specs[0][1].kind == "nm" and len({st.m for _, st in specs}) > 1:
        raise ELSAError(f"N:M levels {levels} must share the same M")
    return specs


def _cols(w: torch.Tensor, transposed: bool = False) -> int:
    """The input dimension N:M groups lie along: dim 0 of a transposed (transformers ``Conv1D``,
    `[in, out]`) weight, else the flattened `[in/groups * kh * kw]` of `[out, ...]`."""
    if transposed:
        return w.shape[0]
    return w[0].numel() if w.dim() >= 2 else w.numel()


def _batch_forward(model: nn.Module, batch):
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (list, tuple)):
        return model(batch[0])
    raise ELSAError(f"cannot feed a batch of type {type(batch).__name__} to the model; pass bn_forward=")


def _bn_modules(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None
    }


def _calibration_batches(batches, num_batches):
    if batches is None:
        return None
    if callable(batches) and not isinstance(batches, torch.Tensor):
        return batches
    if isinstance(batches, torch.Tensor):
        batches = [batches]
    try:
        it = iter(batches)
    except TypeError:
        raise ELSAError(f"bn_calibration must be an iterable of batches or a callable returning one, got {type(batches).__name__}") from None
    if it is batches:  # a one-shot iterator: keep the batches for every level
        out = []
        for b in it:
            out.append(b)
            if num_batches is not None and len(out) >= num_batches:
                break
        return out
    return batches


def recalibrate_bn(
    model: nn.Module,
    batches,
    *,
    num_batches: int | None = None,
    bn_forward: Callable | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """Recompute the batch-norm running statistics of ``model`` with its current weights.

    Resets every BatchNorm's running statistics, then runs forward passes in train mode without
    gradients over ``batches`` with a cumulative average (``momentum=None``), so the statistics
    are the exact mean over the batches. Module modes and momenta are restored afterwards; the new
    statistics stay in the model. ELSA section 2.2 (per-level batch-norm statistics).

    Args:
        model: any module; without BatchNorm layers nothing happens.
        batches: iterable of batches (``Tensor`` -> ``model(x)``; tuple/list -> ``model(b[0])``;
            dict -> ``model(**b)``), or a callable returning such an iterable.
        num_batches: use at most this many batches (None: all).
        bn_forward: ``fn(model, batch)`` to run one forward pass instead.

    Returns:
        ``{bn_module_fqn: {"running_mean", "running_var", "num_batches_tracked": Tensor}}`` (clones).

    Raises:
        ELSAError: no batch seen, or a batch the model cannot take.
    """
    bns = _bn_modules(model)
    if not bns:
        return {}
    src = batches() if callable(batches) else batches
    saved_mode = {n: m.training for n, m in model.named_modules()}
    saved_mom = {n: m.momentum for n, m in bns.items()}
    fwd = bn_forward or _batch_forward
    seen = 0
    try:
        for m in bns.values():
            m.reset_running_stats()
            m.momentum = None
        model.train()
        with torch.no_grad():
            for b in src:
                if num_batches is not None and seen >= num_batches:
                    break
                fwd(model, b)
                seen += 1
    finally:
        for n, m in bns.items():
            m.momentum = saved_mom[n]
        for n, m in model.named_modules():
            m.training = saved_mode.get(n, m.training)
    if seen == 0:
        raise ELSAError("batch-norm recalibration saw no batch: bn_calibration is empty")
    return {
        n: {
            "running_mean": m.running_mean.detach().clone(),
            "running_var": m.running_var.detach().clone(),
            "num_batches_tracked": m.num_batches_tracked.detach().clone(),
        }
        for n, m in bns.items()
    }


def level_bn_stats(
    model: nn.Module,
    counters: Mapping[str, torch.Tensor],
    batches,
    *,
    num_levels: int | None = None,
    num_batches: int | None = None,
    bn_forward: Callable | None = None,
    progress: bool = False,
) -> dict[int, dict]:
    """Per-level batch-norm statistics: for each level ``t = 1..T+1``, the weights named in
    ``counters`` are replaced by the level's network ``where(counter <= t, W, 0)`` and the
    statistics recalibrated (:func:`recalibrate_bn`). The weights are restored afterwards and the
    model's own statistics are left at the dense level's.

    Args:
        model: the model; ``counters`` names its parameters.
        counters: ``name -> integer Tensor`` of counters ``1..T+1``.
        batches, num_batches, bn_forward: as in :func:`recalibrate_bn`.
        num_levels: T (default ``counters.num_levels``).
        progress: a tqdm bar over the levels.

    Returns:
        ``{level: {bn_module_fqn: {stat: Tensor}}}`` for levels ``1..T+1`` (``{}`` without BatchNorm).
    """
    if not _bn_modules(model):
        return {}
    T = num_levels if num_levels is not None else counters.num_levels
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in counters}
    out = {}
    from tqdm.auto import tqdm

    try:
        for t in tqdm(range(1, T + 2), desc="batch-norm recalibration", unit="level", disable=not progress, leave=False):
            with torch.no_grad():
                for n, c in counters.items():
                    p = params[n]
                    p.copy_(torch.where(c.to(p.device) <= t, saved[n], torch.zeros((), dtype=p.dtype, device=p.device)))
            out[t] = recalibrate_bn(model, batches, num_batches=num_batches, bn_forward=bn_forward)
    finally:
        with torch.no_grad():
            for n in counters:
                params[n].copy_(saved[n])
    return out


# --------------------------------------------------------------------------------------------
# the engine: masks, frozen weights and the optimizer hooks
# --------------------------------------------------------------------------------------------
class _Engine:
    """Holds the prunable weights, their frozen masks and values, and the current pruning mask;
    runs phases with the optimizer step hooks installed."""

    def __init__(self, model, params, *, seed, progress, frozen=None):
        self.model = model
        self.params = params
        self.transposed = transposed_weights(model) & set(params)
        self.ids = {id(p) for p in params.values()}
        self.seed = seed
        self.progress = progress
        self.frozen = {
            n: (frozen[n].to(device=p.device, dtype=torch.bool).clone() if frozen is not None and n in frozen
                else torch.zeros(p.shape, dtype=torch.bool, device=p.device))
            for n, p in params.items()
        }
        self.ref = {n: p.detach().clone() for n, p in params.items()}
        self.mask = None  # None: everything allowed
        self.shared = {}  # frozen non-prunable parameters (freeze_shared): name -> Parameter
        self.shared_ref = {}
        self.trainable = {n: ~f for n, f in self.frozen.items()}
        self.phase_index = 0
        self.history = []
        # per-phase state
        self._phase = None
        self._sparsify = None  # (sparsifier, schedule, target, structure)
        self._updates = set()
        self.steps_done = 0
        self._final_reached = False
        self._pbar = None

    # ---- checks and restoration ----
    def _changed(self, n) -> int:
        p = self.params[n]
        diff = (bits_view(p.detach()) != bits_view(self.ref[n])) & self.frozen[n]
        return int(diff.sum())

    def freeze_shared(self, named) -> None:
        """Freeze whole non-prunable parameters (biases, norm affine): kept bit-identical from now on."""
        for n, p in named.items():
            if n in self.params or n in self.shared:
                continue
            self.shared[n] = p
            self.shared_ref[n] = p.detach().clone()
            self.ids.add(id(p))

    def check_frozen(self, where: str) -> None:
        for n, p in self.shared.items():
            if p.dtype in (torch.float32, torch.float16, torch.bfloat16):
                k = int((bits_view(p.detach()) != bits_view(self.shared_ref[n])).sum())
            else:
                k = int((p.detach() != self.shared_ref[n]).sum())
            if k:
                self.restore()
                raise ELSAError(
                    f"{n}: {k} values of this frozen shared parameter were changed {where} (freeze_shared keeps "
                    "it bit-identical; train only through a torch.optim optimizer); the frozen values have been restored"
                )
        for n in self.params:
            if not self.frozen[n].any():
                continue
            k = self._changed(n)
            if k:
                self.restore()
                raise ELSAError(
                    f"{n}: {k} frozen weights were changed {where} (frozen weights must stay bit-identical: "
                    "train only through a torch.optim optimizer, whose steps ELSA guards, and never write to the "
                    "weights directly); the frozen values have been restored"
                )

    def restore(self) -> None:
        with torch.no_grad():
            for n, p in self.shared.items():
                p.copy_(self.shared_ref[n])
            for n, p in self.params.items():
                f = self.frozen[n]
                if f.any():
                    p.copy_(torch.where(f, self.ref[n], p))
                if self.mask is not None:
                    p.masked_fill_(~self.mask[n], 0)

    def set_mask(self, mask) -> None:
        self.mask = mask
        if mask is None:
            self.trainable = {n: ~f for n, f in self.frozen.items()}
        else:
            self.trainable = {n: mask[n] & ~self.frozen[n] for n in self.params}
        self.restore()

    def sparsity(self) -> float:
        total = sum(p.numel() for p in self.params.values())
        zeros = sum(int((p.detach() == 0).sum()) for p in self.params.values())
        return zeros / max(total, 1)

    # ---- hooks ----
    def _concerns(self, opt) -> bool:
        for g in opt.param_groups:
            for p in g["params"]:
                if id(p) in self.ids:
                    return True
        return False

    def _pre_hook(self, opt, args, kwargs):
        if not self._concerns(opt):
            return
        self.check_frozen("by train_fn between optimizer steps")
        with torch.no_grad():
            for n, p in self.params.items():
                if p.grad is not None:
                    p.grad.masked_fill_(~self.trainable[n], 0)
            for p in self.shared.values():
                if p.grad is not None:
                    p.grad.zero_()

    def _post_hook(self, opt, args, kwargs):
        if not self._concerns(opt):
            return
        self.restore()
        self.steps_done += 1
        if self._sparsify is not None and self.steps_done in self._updates:
            s, final = self._schedule_sparsity(self.steps_done)
            self._prune_to(s, final=final)
        if self._pbar is not None:
            self._pbar.update(1)

    def _schedule_sparsity(self, step):
        spf, sched, target, st = self._sparsify
        s = sched.sparsity(step, self._phase.steps, target)
        if step >= max(self._updates, default=0):
            self._final_reached = True
            return target, True
        return s, False

    def _prune_to(self, sparsity, final=False):
        spf, sched, target, st = self._sparsify
        # transformers Conv1D weights are [in, out]: structured masks are laid on their transpose
        tr = self.transposed if str(st) != "unstructured" else set()

        def view(d):
            return {n: (v.t() if n in tr else v) for n, v in d.items()}

        weights = view({n: p.detach() for n, p in self.params.items()})
        frozen = view(self.frozen)
        masks = spf.masks(weights, frozen, float(sparsity), st)
        masks = check_masks(masks, weights, frozen, st if final else None)
        self.set_mask({n: (m.t().contiguous() if n in tr else m) for n, m in masks.items()})

    # ---- phases ----
    def run_phase(self, kind, train_fn, *, steps, level=None, sparsity=0.0, structure="unstructured",
                  final=False, sparsifier=None, schedule=None):
        seed = None if self.seed is None else int(self.seed) * 1_000_003 + 7919 * self.phase_index
        if seed is not None:
            torch.manual_seed(seed)
        phase = Phase(kind, self.phase_index, int(steps), level, float(sparsity), str(structure), seed, final)
        self.phase_index += 1
        self._phase = phase
        self.steps_done = 0
        self._final_reached = False
        if kind in ("sparsify", "gmp"):
            self._sparsify = (sparsifier, schedule, float(sparsity), structure)
            self._updates = set(schedule.update_steps(phase.steps))
            self.set_mask({n: torch.ones(p.shape, dtype=torch.bool, device=p.device) for n, p in self.params.items()})
            t0, n, dt = schedule.plan(phase.steps)
            if n == 0 or phase.steps == 0:
                # no ramp inside the phase: prune at once, then train at the target
                self._prune_to(float(sparsity), final=True)
                self._final_reached = True
                self._updates = set()
        else:
            self._sparsify = None
            self._updates = set()
            self.set_mask(None)
        from tqdm.auto import tqdm

        start = time.perf_counter()
        self._pbar = tqdm(total=phase.steps, desc=phase.name, unit="step", disable=not self.progress, leave=False)
        pre = register_optimizer_step_pre_hook(self._pre_hook)
        post = register_optimizer_step_post_hook(self._post_hook)
        try:
            train_fn(self.model, phase)
        except BaseException:
            self.restore()  # nothing lost: the frozen values come back whatever train_fn did
            raise
        finally:
            pre.remove()
            post.remove()
            self._pbar.close()
            self._pbar = None
        self.check_frozen("by train_fn")
        if phase.steps > 0 and self.steps_done == 0:
            warnings.warn(
                f"{phase.name}: train_fn ran no torch.optim optimizer step on the prunable weights "
                f"(expected {phase.steps}); the phase did not train",
                stacklevel=3,
            )
        if self._sparsify is not None and not self._final_reached:
            # Always end on the target mask, whatever number of steps train_fn ran.
            self._prune_to(float(sparsity), final=True)
        self.restore()
        self._sparsify = None
        self.history.append(
            dict(kind=kind, level=level, steps=phase.steps, steps_done=self.steps_done,
                 sparsity=self.sparsity(), seconds=time.perf_counter() - start)
        )
        return phase


def _check_prunable(params, specs, k, T, transposed=frozenset()):
    for n, p in params.items():
        cols = _cols(p, n in transposed)
        check_code_bits(p.dtype, k, T, name=n)
        if not torch.isfinite(p.detach()).all():
            raise ELSAError(f"{n}: weights must be finite before ELSA training")
        st = specs[-1][1]
        if st.kind == "nm" and cols % st.m:
            raise ELSAError(
                f"{n}: input dimension {cols} is not a multiple of M={st.m} for the {st} levels; "
                "leave this layer out with prunable="
            )


def _encode_as(p: torch.Tensor, code: int, k: int, name: str, dt) -> torch.Tensor:
    """``p`` encoded with ``code`` everywhere, in ``dt`` when given (returned in ``p``'s dtype, exactly)."""
    codes = torch.full(p.shape, code, dtype=torch.int32, device=p.device)
    if dt is None or dt == p.dtype:
        return encode_tensor(p.detach(), codes, k, name=name)
    return encode_tensor(p.detach().to(dt), codes, k, name=name).to(p.dtype)


def _check_encode_dtype(dt, params):
    if dt is None:
        return None
    if dt not in (torch.float32, torch.float16, torch.bfloat16):
        raise ELSAError(f"encode_dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dt!r}")
    for n, p in params.items():
        if p.dtype != dt and p.dtype != torch.float32:
            raise ELSAError(
                f"{n}: cannot ship {p.dtype} weights as {dt}: encode_dtype must equal the weights' dtype, or the "
                "weights must be float32 (master weights)"
            )
    return dt


def _check_train_fn(train_fn):
    if not callable(train_fn):
        raise ELSAError(f"train_fn must be a callable train_fn(model, phase), got {type(train_fn).__name__}")


def _check_steps(name, v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ELSAError(f"{name} must be a non-negative int, got {v!r}")


# --------------------------------------------------------------------------------------------
# public procedures
# --------------------------------------------------------------------------------------------
def embed_levels(
    model: nn.Module,
    levels,
    train_fn: Callable[[nn.Module, Phase], None],
    *,
    steps: int,
    densify_steps: int | None = None,
    final_steps: int | None = None,
    structure: str = "unstructured",
    sparsifier="uniform",
    schedule: GMPSchedule | None = None,
    densify_init: str = "zero",
    freeze_shared: bool = True,
    encode_dtype: torch.dtype | None = None,
    bn_calibration=None,
    bn_batches: int | None = None,
    bn_forward: Callable | None = None,
    prunable=None,
    code_bits: int | None = None,
    seed: int | None = None,
    progress: bool = True,
    on_freeze: Callable[[int, nn.Module], None] | None = None,
    on_phase_end: Callable[[Phase, nn.Module], None] | None = None,
) -> ELSAResult:
    """Embed ``T`` nested sparse networks in ``model`` with ELSA (arXiv 2312.06872, sec. 2.1-2.2).

    For each level ``t = 1..T`` (sparsest first): GMP of the non-frozen weights down to the level's
    target over ``steps`` optimizer steps (Zhu & Gupta 2017; ``schedule`` places the cubic ramp,
    the rest fine-tunes), then the level's weights are frozen and encoded with code ``t-1``, then
    ``densify_steps`` steps train the non-frozen weights (the pruned ones restart from zero, or
    from their values before the sparsify phase with ``densify_init="restore"``). The densify
    phase of level ``T`` trains the dense network (``final_steps``); its dense-only weights are
    encoded with code ``T``. Last, the batch-norm statistics of every level ``1..T+1`` are
    recalibrated on ``bn_calibration``.

    The model is changed in place: at the end it holds the dense network with every prunable
    weight encoded, so ``model.state_dict()`` is the dense level of the checkpoint and
    ``result.encode()`` (= ``encode(model.state_dict(), result.counters, code_bits=k,
    bn_stats=result.bn_stats)``) builds it.

    Args:
        model: a trained (or not) ``nn.Module``; prunable weights float32/float16/bfloat16.
        levels: sparsest first: sparsities in (0, 1) strictly decreasing (``[0.9, 0.75, 0.5]``) or
            N:M patterns with one M (``["1:4", "2:4"]``; gradual N:M: ``M:M -> ... -> N:M``).
        train_fn: ``train_fn(model, phase)`` runs ``phase.steps`` steps of a ``torch.optim``
            optimizer (any loss, any optimizer, created inside; see :class:`Phase`). It must not
            write to the weights other than through ``optimizer.step()``.
        steps: optimizer steps of each sparsify phase.
        densify_steps: steps of each densify phase but the last (default ``steps``).
        final_steps: steps of the last densify phase, the dense training (default ``densify_steps``).
        structure: ``"unstructured"`` or ``"block:RxC"`` for fractional levels.
        sparsifier: ``"uniform"``, ``"global"``, ``"erk"``, a :class:`elsa_codec.sparsify.Sparsifier`
            or a mask function ``(name, weight, frozen_mask, target) -> mask``.
        schedule: :class:`elsa_codec.sparsify.GMPSchedule` (default: ramp over the first 70% of
            the steps, 10 pruning steps).
        densify_init: ``"zero"`` or ``"restore"``.
        freeze_shared: also freeze every non-prunable parameter (biases, norm affine) once level 1
            is frozen, so each level's network is bit-for-bit the one frozen (batch-norm running
            statistics aside, which are recalibrated per level). Default True. With False the
            shared parameters keep training with the denser levels (one copy serves all levels),
            which helps the denser levels adapt but lets the sparser levels drift from what was
            evaluated when they were frozen.
        encode_dtype: the dtype the checkpoint ships in, when narrower than the float32 training
            weights (e.g. ``torch.bfloat16``: float32 master weights). Frozen weights are rounded to
            it and encoded in it at freeze time (and the shared parameters frozen with level 1 are
            rounded to it), so they are exactly representable and ship bit for bit;
            ``result.encode()`` casts the state dict to it. ``code_bits`` is checked against it.
        bn_calibration: batches for the per-level batch-norm statistics (iterable, re-iterated per
            level, or a callable returning one; a one-shot iterator is kept in memory); None: no
            per-level statistics (every level then uses the dense statistics).
        bn_batches: at most this many calibration batches per level.
        bn_forward: ``fn(model, batch)`` for one calibration forward pass (default: ``model(x)``
            for a tensor, ``model(b[0])`` for a tuple, ``model(**b)`` for a dict).
        prunable: which weights: see :func:`prunable_weights` (default ``"blocks"``: the Linear / Conv
            / Conv1D weights of the blocks; embeddings and the output head stay dense).
        code_bits: ``k`` (default ``max(1, ceil(log2(T+1)))``; at most 8/4/3 for fp32/fp16/bf16).
        seed: makes the run reproducible: each phase seeds the global torch RNG with a value derived
            from it (also in ``phase.seed``).
        progress: tqdm bars per phase (on stderr).
        on_freeze: ``fn(level, model)`` right after level ``level`` is frozen and encoded: the
            model then holds exactly the level's sparse network (training-time BN statistics).
        on_phase_end: ``fn(phase, model)`` after each phase.

    Returns:
        :class:`ELSAResult` (``counters``, ``bn_stats``, ``code_bits``, measured sparsities,
        per-phase history, and ``.encode()``).

    Raises:
        ELSAError: levels not sparsest first or outside (0, 1); a model with no prunable layer;
            a dtype whose code bits cannot hold ``T+1`` codes; an N:M level on a layer whose input
            dimension is not a multiple of M; non-finite weights; a sparsifier mask that drops
            frozen weights or whose frozen weights already exceed the target; a ``train_fn`` that
            changes frozen weights (names the tensor; the frozen values are restored first). All
            argument checks run before any weight changes.
    """
    specs = parse_levels(levels, structure)
    T = len(specs)
    _check_train_fn(train_fn)
    _check_steps("steps", steps)
    densify_steps = steps if densify_steps is None else densify_steps
    final_steps = densify_steps if final_steps is None else final_steps
    _check_steps("densify_steps", densify_steps)
    _check_steps("final_steps", final_steps)
    if densify_init not in ("zero", "restore"):
        raise ELSAError(f"densify_init must be 'zero' or 'restore', got {densify_init!r}")
    spf = as_sparsifier(sparsifier)
    schedule = schedule or GMPSchedule()
    params = prunable_weights(model, prunable)
    k = default_code_bits(T) if code_bits is None else code_bits
    _check_prunable(params, specs, k, T, transposed_weights(model))
    edt = _check_encode_dtype(encode_dtype, params)
    if edt is not None:
        for n in params:
            check_code_bits(edt, k, T, name=n)
    calib = _calibration_batches(bn_calibration, bn_batches)

    eng = _Engine(model, params, seed=seed, progress=progress)
    counters = {n: torch.full(p.shape, T + 1, dtype=torch.uint8, device=p.device) for n, p in params.items()}
    structs = [str(st) for _, st in specs]
    for t, (sp, st) in enumerate(specs, start=1):
        before = {n: p.detach().clone() for n, p in params.items()} if densify_init == "restore" else None
        ph = eng.run_phase("sparsify", train_fn, steps=steps, level=t, sparsity=sp, structure=st,
                           sparsifier=spf, schedule=schedule)
        # freeze + encode the level's new weights with code t-1
        with torch.no_grad():
            for n, p in params.items():
                new = eng.mask[n] & ~eng.frozen[n]
                enc = _encode_as(p, t - 1, k, n, edt)
                p.copy_(torch.where(new, enc, p))
                p.masked_fill_(~eng.mask[n], 0)
                counters[n][new] = t
                eng.frozen[n] = eng.mask[n].clone()
                eng.ref[n] = p.detach().clone()
        if freeze_shared and t == 1:
            shared = {n: p for n, p in model.named_parameters() if n not in params}
            if edt is not None:
                with torch.no_grad():
                    for p in shared.values():
                        if p.is_floating_point() and p.dtype != edt:
                            p.copy_(p.to(edt).to(p.dtype))
            eng.freeze_shared(shared)
        if on_phase_end is not None:
            on_phase_end(ph, model)
        if on_freeze is not None:
            on_freeze(t, model)
            eng.check_frozen("by on_freeze")
        # densify: the pruned weights come back (zero or their pre-sparsify values)
        eng.set_mask(None)
        if before is not None:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(torch.where(eng.frozen[n], p, before[n]))
            del before
        final = t == T
        ph = eng.run_phase("densify", train_fn, steps=final_steps if final else densify_steps, level=t,
                           sparsity=0.0, structure=st, final=final)
        if on_phase_end is not None:
            on_phase_end(ph, model)
    # encode the dense-only weights with code T
    with torch.no_grad():
        for n, p in params.items():
            new = ~eng.frozen[n]
            enc = _encode_as(p, T, k, n, edt)
            p.copy_(torch.where(new, enc, p))
            eng.frozen[n] = torch.ones_like(eng.frozen[n])
            eng.ref[n] = p.detach().clone()
    cnt = Counters(counters, T, structs, transposed=eng.transposed)

    bn_stats = None
    if calib is not None:
        if seed is not None:
            torch.manual_seed(int(seed) * 1_000_003 + 7919 * eng.phase_index)
        bn_stats = level_bn_stats(model, cnt, calib, num_levels=T, num_batches=bn_batches, bn_forward=bn_forward,
                                  progress=progress)
        if not bn_stats:
            bn_stats = None
        eng.check_frozen("during batch-norm recalibration")
    elif _bn_modules(model):
        warnings.warn(
            "embed_levels: the model has batch-norm layers but no bn_calibration was given; every level will "
            "use the dense network's statistics",
            stacklevel=2,
        )

    total = sum(p.numel() for p in params.values())
    sparsities = [1.0 - sum(int((c <= t).sum()) for c in counters.values()) / total for t in range(1, T + 1)]
    return ELSAResult(
        counters=cnt,
        bn_stats=bn_stats,
        code_bits=k,
        targets=[sp for sp, _ in specs],
        sparsities=sparsities,
        structures=structs,
        history=eng.history,
        model=model,
        encode_dtype=edt if edt is not None and any(p.dtype != edt for p in params.values()) else None,
    )


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
    prunable=None,
    seed: int | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Gradual magnitude pruning of one network (Zhu & Gupta 2017): the baseline of ELSA's
    experiments (one network per sparsity, trained and stored independently).

    Over ``steps`` optimizer steps run by ``train_fn(model, phase)`` the prunable weights are
    pruned along the cubic schedule to ``sparsity`` (``schedule`` places the ramp; the rest
    fine-tunes at the target). The model is changed in place: it ends with its pruned weights at
    zero. Batch-norm statistics are left as training made them (see :func:`recalibrate_bn`).

    Args:
        model: ``nn.Module``.
        sparsity: target (fraction in (0, 1)) or an ``"N:M"`` pattern.
        train_fn: as for :func:`embed_levels` (``phase.kind == "gmp"``).
        steps: optimizer steps.
        structure: ``"unstructured"`` or ``"block:RxC"`` for a fractional target.
        sparsifier: as for :func:`embed_levels`.
        schedule: :class:`elsa_codec.sparsify.GMPSchedule`.
        frozen: optional ``name -> bool`` masks of weights to keep unchanged (bit-identical).
        prunable: see :func:`prunable_weights`.
        seed: seeds the global torch RNG at the phase start.
        progress: a tqdm bar.

    Returns:
        ``name -> bool`` masks (``True`` = kept), the shapes of the prunable weights.

    Raises:
        ELSAError: a target outside (0, 1); no prunable layer; frozen weights that already exceed the
            target (names the tensor); a ``train_fn`` that changes frozen weights.
    """
    specs = parse_levels([sparsity], structure)
    sp, st = specs[0]
    _check_train_fn(train_fn)
    _check_steps("steps", steps)
    spf = as_sparsifier(sparsifier)
    schedule = schedule or GMPSchedule()
    params = prunable_weights(model, prunable)
    tr = transposed_weights(model)
    for n, p in params.items():
        cols = _cols(p, n in tr)
        if st.kind == "nm" and cols % st.m:
            raise ELSAError(f"{n}: input dimension {cols} is not a multiple of M={st.m} for {st}")
    if frozen is not None:
        for n in frozen:
            if n not in params:
                raise ELSAError(f"{n}: frozen mask given for a tensor that is not prunable")
            if tuple(frozen[n].shape) != tuple(params[n].shape):
                raise ELSAError(f"{n}: frozen mask has shape {tuple(frozen[n].shape)}, the weight has {tuple(params[n].shape)}")
    eng = _Engine(model, params, seed=seed, progress=progress, frozen=frozen)
    # Fail before training when the frozen weights already exceed the target.
    spf_check = {n: p.detach() for n, p in params.items()}
    check_masks(spf.masks(spf_check, eng.frozen, sp, st), spf_check, eng.frozen, st)
    eng.run_phase("gmp", train_fn, steps=steps, sparsity=sp, structure=st, sparsifier=spf, schedule=schedule)
    return {n: m.clone() for n, m in eng.mask.items()}
