"""``LevelEmbedder``: ELSA training driven by the optimizer steps of the user's own loop.

ELSA (Halvachi, Peste, Alistarh, Lampert, arXiv 2312.06872), sections 2.1-2.2, in the style of
torch.ao.pruning's ``prepare`` / ``step`` / ``squash_mask``::

    emb = ec.LevelEmbedder(model, ec.ELSAConfig(levels=[0.9, 0.75, 0.5], steps=1000))
    emb.attach(optimizer)                     # hooks on this optimizer only
    for step in range(emb.total_steps):       # one LR schedule over the whole run
        loss(model, next(batches)).backward(); optimizer.step(); optimizer.zero_grad()
    result = emb.finalize(bn_calibration=batches)   # ELSAResult; result.encode() -> the file

Each optimizer step advances the plan (:attr:`LevelEmbedder.plan`): the GMP ramp of a sparsify
phase, the freeze + encode of a level at its end, the densify phase, the dense training.
:meth:`LevelEmbedder.state_dict` / :meth:`LevelEmbedder.load_state_dict` resume a run bit for bit.
"""
from __future__ import annotations

import time
import warnings
from typing import Callable

import torch
from torch import nn

from ..errors import ELSAError, ELSATypeError
from ..format.bits import default_code_bits
from ..format.encode import Counters, counter_dtype
from ..format.structure import parse_levels
from ..wrappers import unwrap_model
from .binding import OptimizerBinding
from .bn import bn_modules, calibration_batches, level_bn_stats
from .config import ELSAConfig
from .distill import DistillHooks, Teacher, distill_term, select_output
from .distributed import ShardedMagnitude, check_sharded_supported, dist_context
from .freeze import check_encode_dtype, check_prunable, encode_dense_rest, freeze_level, round_shared
from .gmp import GMPControl
from .guard import StepGuard
from .phases import Phase, build_plan
from .result import ELSAResult
from .schedule import GMPSchedule
from .sparsifiers.base import as_sparsifier
from .state import MaskState
from .weights import model_transposed, prunable_weights, shared_parameters

__all__ = ["LevelEmbedder"]

_STATE_VERSION = 1


class LevelEmbedder:
    """Embed ``T`` nested sparse levels in ``model`` while the user's loop trains it.

    Args:
        model: ``nn.Module`` (bare, or wrapped by DDP / FSDP / ``torch.compile``: names are the
            bare model's). Prunable weights float32 / float16 / bfloat16, finite.
        config: :class:`elsa_codec.ELSAConfig`.
        on_phase_end: ``fn(phase, model)`` after each phase (after the freeze for a sparsify phase).
        on_freeze: ``fn(level, model)`` right after level ``level`` is frozen and encoded: the
            model then holds exactly the level's sparse network.

    Attributes:
        plan: the ``2T`` :class:`Phase` records with their step ranges (``start``, ``end``).
        total_steps: optimizer steps of the whole run (set ``max_steps`` to it).
        step: optimizer steps done.
        counters: ``name -> uint8 Tensor`` (values ``1..T+1``; int16 for T = 255), filled as levels freeze.
        generator: the embedder's own ``torch.Generator`` (the global RNG is never re-seeded).
        history: one dict per finished phase (``kind``, ``level``, ``steps``, ``steps_done``,
            ``sparsity``, ``seconds``).
        hook_seconds: wall time spent in the embedder's optimizer hooks (the step overhead).
        guard: the :class:`elsa_codec.training.guard.StepGuard` doing the per-step work (grad mode
            for the element-wise torch optimizers without weight decay on frozen weights, else
            restore mode); ``guard.plans`` shows which.
        teacher: with ``config.distill`` and ``teacher="copy"``, the original network
            (:class:`elsa_codec.training.distill.Teacher`: a copy of the model's parameters and
            buffers taken here, before any change); else None. See :meth:`distill_loss`.

    Raises:
        ELSAError: bad config for this model (no prunable layer, code bits that do not fit the
            dtype, N:M on a layer whose input dimension is not a multiple of M, non-finite
            weights, an ``encode_dtype`` narrower weights cannot ship in, ``distill`` with
            ``teacher="copy"`` on sharded FSDP2 parameters). Nothing changes then.
    """

    def __init__(self, model: nn.Module, config: ELSAConfig, *, on_phase_end: Callable | None = None,
                 on_freeze: Callable | None = None):
        if isinstance(model, ELSAConfig) and isinstance(config, nn.Module):
            raise ELSATypeError("LevelEmbedder: the arguments look swapped: the order is LevelEmbedder(model, config)")
        if not isinstance(config, ELSAConfig):
            hint = "; build one: ELSAConfig(**config)" if isinstance(config, dict) else ""
            raise ELSATypeError(f"LevelEmbedder: config must be an ELSAConfig, got {type(config).__name__}{hint}")
        if not isinstance(model, nn.Module):
            raise ELSATypeError(f"LevelEmbedder: model must be an nn.Module, got {type(model).__name__}")
        self.model, self.config = model, config
        self.specs = parse_levels(config.levels, config.structure)
        self.num_levels = T = len(self.specs)
        params = prunable_weights(model, config.select, filter_fn=config.filter_fn)
        self.dist = dist_context(model, params, shared_parameters(model, params))  # None: one process
        self.code_bits = default_code_bits(T) if config.code_bits is None else config.code_bits
        self.transposed = model_transposed(model, params)
        self.sparsifier = self._checks(params)
        self.schedule = config.schedule or GMPSchedule()
        self.state = MaskState(params)
        self.plan = build_plan(self.specs, steps=config.steps, densify_steps=config.densify,
                               final_steps=config.final, seed=config.seed)
        self.total_steps = config.total_steps
        self.counters = {n: torch.full(self.state.local(n).shape, T + 1, dtype=counter_dtype(T), device=p.device)
                         for n, p in params.items()}  # local shards when sharded (FSDP2)
        self.generator = torch.Generator()
        seed = config.seed if config.seed is not None else int(torch.seed()) % 2**62
        self.generator.manual_seed(seed if self.dist is None else self.dist.broadcast_int(seed))
        self.on_phase_end, self.on_freeze = on_phase_end, on_freeze
        self.step, self.history, self.hook_seconds = 0, [], 0.0
        self._index, self._local, self._started, self._finalized = 0, 0, False, False
        self._gmp: GMPControl | None = None
        self._before: dict | None = None
        self._hold = False  # embed_levels: a phase ends when train_fn returns, not at its step count
        self._t0 = time.perf_counter()
        self._binding = OptimizerBinding(self._pre_step, self._post_step, self._loaded, self._grads)
        self.guard = StepGuard(self.state, self._binding.optimizers)
        self._opt_steps: dict[int, int] = {}
        self._model_ids = {id(p) for p in model.parameters()}
        self.teacher, self._distill_hooks = self._teacher()

    def _teacher(self):
        """The original network's copy and the distillation hooks (None, None without them)."""
        d = self.config.distill
        if d is None or d.teacher != "copy":
            return None, None
        if self.dist is not None and self.dist.sharded:
            raise ELSAError("ELSAConfig.distill: teacher='copy' cannot copy sharded (FSDP2) parameters; use "
                            "DistillConfig(teacher='given', hooks=False) and pass the original's outputs to "
                            "LevelEmbedder.distill_loss")
        bare = unwrap_model(self.model)
        teacher = Teacher(bare)
        hooks = DistillHooks(bare, teacher, d, lambda: self.distilling) if d.hooks else None
        return teacher, hooks

    def _checks(self, params):
        """The checks before any change (agreed across ranks in a multi-process run); the sparsifier."""
        err, sp = None, None
        try:
            check_prunable(params, self.specs, self.code_bits, self.num_levels, self.transposed)
            self.encode_dtype = check_encode_dtype(self.config.encode_dtype, params, self.code_bits, self.num_levels)
            sp = as_sparsifier(self.config.sparsifier)
            if self.dist is not None and self.dist.sharded:
                check_sharded_supported(sp, self.specs, self.transposed, list(params))
                sp = ShardedMagnitude(sp.distribution, {n: tuple(p.shape) for n, p in params.items()}, self.dist.comm)
        except ELSAError as e:
            err = e
        if self.dist is not None:
            self.dist.agree(err)
        if err is not None:
            raise err
        return sp

    # ------------------------------------------------------------------ plan
    @property
    def params(self) -> dict[str, nn.Parameter]:
        """``name -> Parameter``: the prunable weights (one per Parameter; tied weights once)."""
        return self.state.params

    @property
    def phase(self) -> Phase | None:
        """The current phase (None once every phase has ended)."""
        return self.plan[self._index] if self._index < len(self.plan) else None

    @property
    def done(self) -> bool:
        """True when every phase of the plan has ended."""
        return self._index >= len(self.plan)

    def sparsity(self) -> float:
        """Measured fraction of exact zeros over the prunable weights (a full pass: log, don't loop;
        with sharded weights a collective: call it on every rank)."""
        if self.dist is None or not self.dist.sharded:
            return self.state.sparsity()
        zeros, total = self.dist.sum(self.state.zeros())
        return zeros / max(total, 1)

    # ------------------------------------------------------------------ distillation
    @property
    def distilling(self) -> bool:
        """True while the distillation term is on (``config.distill`` set, the current phase one of
        ``config.distill.phases``, the run not finalized)."""
        d = self.config.distill
        return d is not None and not self._finalized and d.active(self.phase)

    def teacher_outputs(self, *args, **kwargs):
        """The original network's outputs for the model's inputs ``*args, **kwargs`` (no gradient,
        eval mode; ``config.distill.teacher == "copy"``).

        Raises:
            ELSAError: no copy of the original is kept (no ``distill``, or ``teacher="given"``).
        """
        if self.teacher is None:
            raise ELSAError("teacher_outputs: this run keeps no copy of the original network (set "
                            "ELSAConfig(distill=DistillConfig(teacher='copy')))")
        return self.teacher(*args, **kwargs)

    def distill_loss(self, outputs, *args, teacher=None, **kwargs) -> torch.Tensor:
        """The distillation term for one batch, to add to the loss (``hooks=False``)::

            out = model(x)
            loss = F.cross_entropy(out, y) + emb.distill_loss(out, x)

        Args:
            outputs: the model's outputs for the batch (a tensor, a ``ModelOutput`` or a tuple;
                ``config.distill.output`` picks the tensor).
            *args, **kwargs: the model's inputs for the batch; the kept copy of the original runs on
                them (``teacher="copy"``).
            teacher: the original's outputs for the batch instead (required with ``teacher="given"``).

        Returns:
            A float32 scalar: ``weight * loss`` in the phases the term is on, else ``0``.

        Raises:
            ELSAError: no ``distill`` config; hooks already add the term; ``teacher="given"`` and no
                ``teacher=``; outputs without the configured field; shapes that differ.
        """
        d = self.config.distill
        if d is None:
            raise ELSAError("distill_loss: the config has no distill (ELSAConfig(distill=DistillConfig(...)))")
        if self._distill_hooks is not None:
            raise ELSAError("distill_loss: DistillConfig(hooks=True) already adds the term in the model's forward; "
                            "set hooks=False to add it yourself")
        s, _ = select_output(outputs, d.output)
        if not self.distilling:
            return torch.zeros((), device=s.device)
        if teacher is None:
            if self.teacher is None:
                raise ELSAError("distill_loss: DistillConfig(teacher='given') needs teacher=<the original network's "
                                "outputs for this batch>")
            teacher = self.teacher(*args, **kwargs)
        return distill_term(s, select_output(teacher, d.output, "original's output")[0], d)

    # ------------------------------------------------------------------ optimizers
    def attach(self, optimizer) -> "LevelEmbedder":
        """Hook ``optimizer`` (a ``torch.optim.Optimizer``, or accelerate / Lightning's wrapper of
        one): its steps now drive the plan. Call once per optimizer; several may share the model
        (the run advances when each has stepped). Starts the run's first phase.

        Raises:
            ELSAError: the run is finalized; not an optimizer; one holding no parameter of the model.
        """
        if self._finalized:
            raise ELSAError("attach: the LevelEmbedder is finalized")
        if self.sparsifier.adds_parameters and not self._hold:
            raise ELSAError(f"attach: the sparsifier {self.sparsifier!r} adds parameters in each sparsify phase, which "
                            "an optimizer made before the phase never trains; use embed_levels / prune_gmp with a "
                            "train_fn that creates its optimizer")
        key = self._binding.attach(optimizer, self._model_ids)
        self.guard.stale.add(key)
        self._opt_steps.setdefault(key, self.step)
        self._ensure_started()
        return self

    def detach(self) -> None:
        """Remove the hooks from every attached optimizer (the state stays)."""
        self._binding.detach()
        self._opt_steps.clear()
        self.guard.plans.clear()

    def _pre_step(self, key, ids) -> None:
        t0 = time.perf_counter()
        self._ensure_started()
        if self.config.verify == "step":
            self.state.check("between optimizer steps")
        self.hook_seconds += time.perf_counter() - t0

    def _grads(self, key) -> None:
        t0 = time.perf_counter()
        self.guard.grads(key)
        self.hook_seconds += time.perf_counter() - t0

    def _loaded(self, key) -> None:
        self.guard.loaded(key)

    def _post_step(self, key, ids) -> None:
        t0 = time.perf_counter()
        self.guard.post(key)
        self._opt_steps[key] = self._opt_steps.get(key, self.step) + 1
        if min(self._opt_steps.values()) > self.step and not self.done:
            self._advance()
        self.hook_seconds += time.perf_counter() - t0

    # ------------------------------------------------------------------ phases
    def _ensure_started(self) -> None:
        if not self._started:
            self._started = True
            self._begin()

    def _begin(self) -> None:
        """Set up the current phase (masks, GMP control, densify init); end empty phases at once."""
        ph = self.phase
        if ph is None:
            return
        self._local, self._t0 = 0, time.perf_counter()
        if ph.kind == "sparsify":
            if self.config.densify_init == "restore":
                self._before = {n: w.clone() for n, w in self.state.local_weights().items()}
            self._gmp = GMPControl(self.sparsifier, self.schedule, ph.sparsity, self.specs[ph.level - 1][1],
                                   ph.steps, self.transposed)
            self.state.set_mask(None)
            self._gmp.start(self.state, self.model)
        else:
            self._gmp = None
            self.state.set_mask(None)
            self._densify_init()
        if ph.steps == 0 and not self._hold:
            self._end()

    @torch.no_grad()
    def _densify_init(self) -> None:
        if self._before is not None:
            for n, p in self.state.local_weights().items():
                p.copy_(torch.where(self.state.frozen[n], p, self._before[n]))
            self._before = None

    def _advance(self) -> None:
        """One optimizer step done: GMP ramp, and the phase's end when its steps are done."""
        self.step += 1
        self._local += 1
        if self._gmp is not None and self._local <= self._gmp.steps:
            self._gmp.after_step(self.state, self._local)
        if self._local >= self.phase.steps and not self._hold:
            self._end()

    def end_phase(self) -> Phase:
        """End the current phase now (freeze + encode after a sparsify phase), warning or raising
        (``config.on_short``) if it ran fewer steps than planned; returns the phase that ended.

        Raises:
            ELSAError: no phase left; a short phase with ``on_short="raise"``; frozen weights changed.
        """
        ph = self.phase
        if ph is None:
            raise ELSAError("end_phase: every phase of the plan has ended")
        self._ensure_started()
        if self._local < ph.steps:
            self._short(f"{ph.name} (phase {ph.index}) ran {self._local} of {ph.steps} optimizer steps "
                        f"({ph.steps - self._local} missing)" + (
                            "; no torch.optim optimizer step on the prunable weights" if self._local == 0 else ""))
        self._end()
        return ph

    def _short(self, msg: str) -> None:
        msg += ": the GMP ramp was cut short or the phase did not train" if "sparsify" in msg else ""
        if self.config.on_short == "raise":
            raise ELSAError(msg)
        warnings.warn(msg, stacklevel=4)

    def _check_distilled(self, ph: Phase) -> None:
        """Warn when the hooks never added the term in a phase that trained with it on."""
        h = self._distill_hooks
        if h is not None and self.config.distill.active(ph) and self._local > 0 and h.calls == 0:
            warnings.warn(f"{ph.name}: the distillation term was never added: no forward of the model ran with "
                          "gradients (does the loop call a submodule instead of the model given to ELSA, e.g. a "
                          "LightningModule's training_step calling self.net?); give ELSA that module, or set "
                          "DistillConfig(hooks=False) and add LevelEmbedder.distill_loss to the loss", stacklevel=4)
        if h is not None:
            h.calls = 0

    def _end(self) -> None:
        ph = self.phase
        self._check_distilled(ph)
        if self.config.verify != "off":
            self.state.check(f"during {ph.name}")
        if ph.kind == "sparsify":
            self._gmp.end(self.state)
            self._gmp.finish(self.state)
            self._freeze(ph.level)
        self.history.append(dict(kind=ph.kind, level=ph.level, steps=ph.steps, steps_done=self._local,
                                 sparsity=self.sparsity(), seconds=time.perf_counter() - self._t0))
        self._gmp = None
        if self.on_phase_end is not None:
            self.on_phase_end(ph, self.model)
        if ph.kind == "sparsify" and self.on_freeze is not None:
            self.on_freeze(ph.level, self.model)
            if self.config.verify != "off":
                self.state.check("by on_freeze")
        self._index += 1
        self._begin()

    def _freeze(self, t: int) -> None:
        freeze_level(self.state, self.counters, t, self.code_bits, self.encode_dtype)
        if self.config.freeze_shared and t == 1:
            shared = shared_parameters(self.model, self.params)
            round_shared(shared, self.encode_dtype)
            self.state.freeze_shared(shared)
        if self.dist is not None and not self.dist.sharded:  # DDP: replicated, so equal on every rank
            self.dist.fingerprint({**{f"counters of {n}": c for n, c in self.counters.items()}, **self.params})

    # ------------------------------------------------------------------ the end
    def finalize(self, bn_calibration=None, *, bn_forward: Callable | None = None,
                 progress: bool = False) -> ELSAResult:
        """End the run: encode the dense-only weights with code ``T``, recalibrate the batch-norm
        statistics of every level (ELSA sec. 2.2), detach, and return the :class:`ELSAResult`.

        A run finalized before its last step ends its remaining phases at once (each sparsify
        phase at its target) after one warning (or ELSAError, ``on_short="raise"``) naming the
        phases and the missing steps.

        Args:
            bn_calibration: batches for the per-level batch-norm statistics (iterable, re-iterated
                per level, or a callable returning one); None: none (a model with batch norm warns).
            bn_forward: ``fn(model, batch)`` for one calibration forward pass.
            progress: a tqdm bar over the levels (one line when stderr is not a terminal).

        Raises:
            ELSAError: finalized twice; steps missing with ``on_short="raise"``; frozen weights changed.
        """
        if self._finalized:
            raise ELSAError("finalize: the LevelEmbedder is already finalized")
        self._ensure_started()
        if self.config.verify != "off":
            self.state.check("after the last phase")
        if not self.done:
            self._finish_early()
        encode_dense_rest(self.state, self.num_levels, self.code_bits, self.encode_dtype)
        self._finalized = True
        self.detach()
        if self._distill_hooks is not None:
            self._distill_hooks.remove()
        full = dict(self.counters) if self.dist is None else self.dist.full_counters(self.counters, self.params)
        cnt = Counters(full, self.num_levels, [str(st) for _, st in self.specs], transposed=self.transposed)
        if self.dist is not None:
            self.dist.sync_buffers(self.model)
            self.dist.fingerprint({**{f"counters of {n}": c for n, c in full.items()},
                                   **({} if self.dist.sharded else self.params)})
        bn_stats = self._bn_stats(cnt, bn_calibration, bn_forward, progress)
        if self.config.verify != "off":
            self.state.check("during batch-norm recalibration")
        return self._result(cnt, bn_stats)

    def _finish_early(self) -> None:
        left = [ph for ph in self.plan[self._index:]]
        missing = self.total_steps - self.step
        names = ", ".join(f"{ph.name} {self._local if ph is self.phase else 0}/{ph.steps}" for ph in left)
        self._short(f"finalize: {missing} of the plan's {self.total_steps} optimizer steps are missing "
                    f"(phases, steps run/planned: {names})")
        hold, self._hold = self._hold, True
        try:
            while not self.done:
                self._end()
        finally:
            self._hold = hold

    def _bn_stats(self, cnt, batches, bn_forward, progress):
        calib = calibration_batches(batches, self.config.bn_batches)
        if calib is None:
            if bn_modules(self.model):
                warnings.warn("LevelEmbedder.finalize: the model has batch-norm layers but no bn_calibration was "
                              "given; every level will use the dense network's statistics", stacklevel=3)
            return None
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        sharded = self.dist is not None and self.dist.sharded  # calibrate on the local shards (forward gathers)
        with torch.random.fork_rng(devices=[]):  # dropout in train mode: reproducible, global RNG untouched
            torch.manual_seed(seed)
            stats = level_bn_stats(self.model, self.counters if sharded else cnt, calib, num_levels=self.num_levels,
                                   num_batches=self.config.bn_batches, bn_forward=bn_forward, progress=progress,
                                   params=self.state.local_weights() if sharded else self.params)
        if self.dist is not None:
            stats = self.dist.sync_bn_stats(stats, self.model, self.num_levels)
        return stats or None

    def _result(self, cnt, bn_stats) -> ELSAResult:
        T = self.num_levels
        total = sum(p.numel() for p in self.params.values())
        sparsities = [1.0 - sum(int((c <= t).sum()) for c in cnt.values()) / total for t in range(1, T + 1)]
        edt = self.encode_dtype
        return ELSAResult(
            counters=cnt, bn_stats=bn_stats, code_bits=self.code_bits, targets=[sp for sp, _ in self.specs],
            sparsities=sparsities, structures=[str(st) for _, st in self.specs], history=list(self.history),
            model=self.model, config=self.config.to_dict(),
            encode_dtype=edt if edt is not None and any(p.dtype != edt for p in self.params.values()) else None,
        )

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Everything needed to resume bit for bit: step, phase, counters, masks, frozen values,
        the densify-init snapshot, the GMP progress, the generator state, the history and the
        config (JSON). Tensors are clones (on the weights' devices); save with ``torch.save``."""
        return {
            "version": _STATE_VERSION,
            "config": self.config.to_json(),
            "step": self.step, "index": self._index, "local": self._local, "started": self._started,
            "finalized": self._finalized,
            "gmp_final_reached": bool(self._gmp is not None and self._gmp.final_reached),
            "counters": {n: c.clone() for n, c in self.counters.items()},
            "masks": self.state.state_dict(),
            "before": None if self._before is None else {n: v.clone() for n, v in self._before.items()},
            "generator": self.generator.get_state(),
            "history": [dict(h) for h in self.history],
            "teacher": None if self.teacher is None else self.teacher.state_dict(),
        }

    def load_state_dict(self, sd: dict) -> None:
        """Resume from :meth:`state_dict` (the model's weights and the optimizer's state must be
        restored by the caller, from the same step). Hooks already attached stay attached.

        Raises:
            ELSAError: another state version, a config that differs (names the fields), tensors
                that do not match the model's prunable weights (names them).
        """
        if sd.get("version") != _STATE_VERSION:
            raise ELSAError(f"load_state_dict: ELSA state version {sd.get('version')!r}, expected {_STATE_VERSION}")
        saved = ELSAConfig.from_json(sd["config"], sparsifier=self.config.sparsifier, filter_fn=self.config.filter_fn)
        diff = self.config.diff(saved)
        if diff:
            raise ELSAError(f"load_state_dict: the saved run has another config (fields {', '.join(diff)})")
        self._check_resumable(int(sd["index"]), int(sd["local"]), bool(sd["started"]))
        self._load_counters(sd["counters"])
        self.state.load_state_dict(sd["masks"], shared_parameters(self.model, self.params))
        self.step, self._index, self._local = int(sd["step"]), int(sd["index"]), int(sd["local"])
        self._started, self._finalized = bool(sd["started"]), bool(sd["finalized"])
        self._before = None if sd["before"] is None else {
            n: v.to(self.params[n].device) for n, v in sd["before"].items()}
        self.generator.set_state(sd["generator"])
        self.history = [dict(h) for h in sd["history"]]
        self._load_teacher(sd.get("teacher"))
        self._gmp, self._t0 = None, time.perf_counter()
        ph = self.phase
        if self._started and ph is not None and ph.kind == "sparsify":
            self._gmp = GMPControl(self.sparsifier, self.schedule, ph.sparsity, self.specs[ph.level - 1][1],
                                   ph.steps, self.transposed)
            self._gmp.final_reached = bool(sd["gmp_final_reached"])
        self._opt_steps = {k: self.step for k in self._opt_steps}

    def _check_resumable(self, index: int, local: int, started: bool) -> None:
        """A sparsifier with its own bookkeeping (``gradual = False``) resumes only at a phase boundary."""
        ph = self.plan[index] if index < len(self.plan) else None
        if started and local > 0 and ph is not None and ph.kind == "sparsify" and not self.sparsifier.gradual:
            raise ELSAError(f"load_state_dict: the state was saved inside {ph.name} (step {local} of {ph.steps}) and "
                            f"the sparsifier {self.sparsifier!r} keeps its own bookkeeping for the phase; resume "
                            "from a state saved at a phase boundary")

    def _load_teacher(self, saved) -> None:
        """The original network's copy from the state (the model being resumed is no longer it)."""
        if self.teacher is None:
            return
        mine = self.teacher.tensors
        if saved is None or set(saved) != set(mine):
            raise ELSAError("load_state_dict: the ELSA state holds no copy of the original network for distill "
                            f"(teacher='copy'); missing: {sorted(set(mine) - set(saved or {}))[:3]}")
        for n, t in mine.items():
            if tuple(saved[n].shape) != tuple(t.shape):
                raise ELSAError(f"{n}: the ELSA state's original has shape {tuple(saved[n].shape)}, the model "
                                f"{tuple(t.shape)}")
            t.copy_(saved[n])

    def _load_counters(self, counters: dict) -> None:
        for n, c in self.counters.items():
            got = counters.get(n)
            if got is None or tuple(got.shape) != tuple(c.shape):
                raise ELSAError(f"{n}: the ELSA state has no counters of shape {tuple(c.shape)} for this weight")
            c.copy_(got)
