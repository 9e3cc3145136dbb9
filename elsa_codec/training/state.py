"""Mask state of an ELSA run: pruning masks, frozen masks and values.

Per prunable weight (one entry per Parameter, tied weights once) the state holds, on the bit
patterns of the weight (:func:`elsa_codec.format.bits.bits_view`):

- ``keep``: all-ones bits where the weight trains (in the current pruning mask and not frozen),
  zero elsewhere;
- ``base``: the frozen value's bits where the weight is frozen, zero elsewhere (a pruned weight
  is +0.0).

The per-step work on them (mask the gradients, restore the bits, zero optimizer moments) is
:class:`elsa_codec.training.guard.StepGuard`'s; this module holds the masks and ``keep`` / ``base``,
and restores everything at once when the masks change (``(bits & keep) | base``: frozen weights
come back bit for bit and pruned weights to +0.0; ``torch.where`` and ``masked_fill`` with a bool
mask are several times slower on CPU).
"""
from __future__ import annotations

import torch

from ..errors import ELSAError
from ..format.bits import bits_view
from .distributed import is_dtensor, local_tensor

__all__ = ["MaskState"]


def _ones_bits(bits: torch.Tensor) -> torch.Tensor:
    return torch.full(bits.shape, -1, dtype=bits.dtype, device=bits.device)


class MaskState:
    """Masks and frozen values of the prunable weights ``params`` (``name -> Parameter``).

    With sharded (FSDP2, DTensor) parameters every tensor of the state is of the LOCAL shard's
    shape and the hooks touch only the local shard (:func:`.distributed.local_tensor`).

    Attributes:
        params: ``name -> Parameter`` (one per Parameter identity).
        sharded: True when a parameter is a DTensor (FSDP2).
        frozen: ``name -> bool Tensor`` (weight shape): weights of the levels already embedded.
        mask: ``name -> bool Tensor`` (pruning mask, ``True`` = kept) or None (no pruning).
        shared: ``name -> Parameter`` frozen whole (``freeze_shared``), with ``shared_ref``.
        keep / base: ``name -> int Tensor`` (the weight's bit dtype) for the weights with entries that
            must not move: all-ones bits where the weight trains / the frozen value's bits.
        restore_names: those weights; ``frozen_names`` / ``pruned_names``: the ones with a frozen /
            a pruned entry.
        generation: bumped whenever the masks change (the guard rebuilds its plans then).
    """

    def __init__(self, params: dict[str, torch.nn.Parameter], frozen=None):
        self.params = params
        self.sharded = any(is_dtensor(p) for p in params.values())
        self._t = local_tensor if self.sharded else torch.Tensor.detach  # the tensor this rank stores (C call: no
        # Python frame per tensor and step in one process)
        self.name_of = {id(p): n for n, p in params.items()}
        self.frozen = {
            n: (frozen[n].to(device=p.device, dtype=torch.bool).clone() if frozen is not None and n in frozen
                else torch.zeros(self.local(n).shape, dtype=torch.bool, device=p.device))
            for n, p in params.items()
        }
        self.mask = None
        self.shared: dict[str, torch.nn.Parameter] = {}
        self.shared_ref: dict[str, torch.Tensor] = {}
        self.values = {n: self.local(n).clone() for n in params}  # frozen values (where frozen)
        self._derive()

    def local(self, name: str) -> torch.Tensor:
        """The weight ``name`` as this rank stores it (detached; the local shard of a DTensor)."""
        return self._t(self.params[name])

    def local_weights(self) -> dict[str, torch.Tensor]:
        """``name -> local tensor`` of every prunable weight (writes go to the weights)."""
        return {n: self._t(p) for n, p in self.params.items()}

    # ---- derived per-step tensors ----
    def _derive(self) -> None:
        """Rebuild ``keep`` / ``base`` / the lists of weights the hooks touch from the masks."""
        self.keep, self.base, self.restore_names, self.pruned_names, self.frozen_names = {}, {}, [], set(), set()
        self.generation = getattr(self, "generation", 0) + 1
        for n, p in self.params.items():
            f = self.frozen[n]
            trainable = ~f if self.mask is None else self.mask[n] & ~f
            if bool(trainable.all()):
                continue
            bits = bits_view(self._t(p))
            self.keep[n] = torch.where(trainable, _ones_bits(bits), torch.zeros((), dtype=bits.dtype, device=p.device))
            self.base[n] = torch.where(f, bits_view(self.values[n]), torch.zeros((), dtype=bits.dtype, device=p.device))
            self.restore_names.append(n)
            if bool(f.any()):
                self.frozen_names.add(n)  # else base is all zero: the OR pass is skipped
            if self.mask is not None and bool((~self.mask[n]).any()):
                self.pruned_names.add(n)
        self.restore()

    def set_mask(self, mask) -> None:
        """Set the pruning mask (``name -> bool``, containing the frozen masks; None: no pruning)
        and apply it to the weights at once."""
        self.mask = mask
        self._derive()

    def freeze(self, frozen: dict[str, torch.Tensor]) -> None:
        """Freeze the weights of ``frozen`` (``name -> bool``) at their current values."""
        for n, p in self.params.items():
            self.frozen[n] = frozen[n].clone()
            self.values[n] = self._t(p).clone()
        self._derive()

    def freeze_shared(self, named: dict[str, torch.nn.Parameter]) -> None:
        """Freeze whole non-prunable parameters (biases, norm affine): bit-identical from now on."""
        for n, p in named.items():
            if id(p) in self.name_of or n in self.shared:
                continue
            self.shared[n] = p
            self.shared_ref[n] = local_tensor(p).clone()
        self.generation += 1

    @torch.no_grad()
    def restore(self, names=None, shared=None) -> None:
        """Frozen weights back to their values bit for bit (``(bits & keep) | base``), pruned
        weights to +0.0, frozen shared parameters to their values.

        Args:
            names: the weights to restore (default: every one with a frozen or pruned entry,
                ``restore_names``); the step guard passes its plan's restore-mode weights.
            shared: the shared parameters to copy back (default: all of them).
        """
        for n in self.restore_names if names is None else names:
            bits = bits_view(self.local(n)).bitwise_and_(self.keep[n])
            if n in self.frozen_names:
                bits.bitwise_or_(self.base[n])
        for n in self.shared if shared is None else shared:
            p = self.shared[n]
            (local_tensor(p) if self.sharded else p).copy_(self.shared_ref[n])

    def changed(self) -> tuple[str, int, bool] | None:
        """``(name, count, shared)`` of the first tensor whose frozen values differ, or None."""
        for n, p in self.shared.items():
            a, b = local_tensor(p), self.shared_ref[n]
            k = int((bits_view(a) != bits_view(b)).sum()) if a.dtype in (torch.float32, torch.float16, torch.bfloat16) \
                else int((a != b).sum())
            if k:
                return n, k, True
        for n, p in self.params.items():
            f = self.frozen[n]
            if f.any():
                k = int(((bits_view(self._t(p)) != bits_view(self.values[n])) & f).sum())
                if k:
                    return n, k, False
        return None

    def check(self, where: str) -> None:
        """Raise (after restoring) if a frozen weight or frozen shared parameter changed.

        Raises:
            ELSAError: names the tensor, the number of changed values and ``where``.
        """
        bad = self.changed()
        if bad is None:
            return
        n, k, shared = bad
        self.restore()
        what = "values of this frozen shared parameter" if shared else "frozen weights"
        raise ELSAError(
            f"{n}: {k} {what} were changed {where} (frozen weights must stay bit-identical: train only through "
            "a torch.optim optimizer, whose steps ELSA guards, and never write to the weights directly); "
            "the frozen values have been restored"
        )

    def zeros(self) -> tuple[int, int]:
        """``(exact zeros, weights)`` over this rank's prunable weights (its shards when sharded)."""
        ws = self.local_weights().values()
        return sum(int((w == 0).sum()) for w in ws), sum(w.numel() for w in ws)

    def sparsity(self) -> float:
        """Fraction of exact zeros over the prunable weights (this rank's shards when sharded)."""
        zeros, total = self.zeros()
        return zeros / max(total, 1)

    # ---- checkpoint ----
    def state_dict(self) -> dict:
        """Tensors needed to resume: frozen masks and values (packed), the pruning mask, shared values."""
        return {
            "frozen": {n: f.clone() for n, f in self.frozen.items()},
            "frozen_values": {n: self.values[n][self.frozen[n]].clone() for n in self.params},
            "mask": None if self.mask is None else {n: m.clone() for n, m in self.mask.items()},
            "shared": {n: v.clone() for n, v in self.shared_ref.items()},
        }

    def load_state_dict(self, sd: dict, shared_params: dict) -> None:
        """Inverse of :meth:`state_dict` (``shared_params``: the model's shared parameters by name).

        Raises:
            ELSAError: a tensor missing, unknown or of another shape (names it).
        """
        for n, p in self.params.items():
            f, shape = sd["frozen"].get(n), tuple(self.local(n).shape)
            if f is None or tuple(f.shape) != shape:
                raise ELSAError(f"{n}: the ELSA state has no frozen mask of shape {shape} for this weight")
            self.frozen[n] = f.to(device=p.device, dtype=torch.bool)
            self.values[n] = self.local(n).clone()
            self.values[n][self.frozen[n]] = sd["frozen_values"][n].to(device=p.device, dtype=p.dtype)
        m = sd["mask"]
        self.mask = None if m is None else {n: m[n].to(device=p.device) for n, p in self.params.items()}
        self.shared, self.shared_ref = {}, {}
        for n, v in sd["shared"].items():
            if n not in shared_params:
                raise ELSAError(f"{n}: the ELSA state freezes this shared parameter, the model has none of that name")
            self.shared[n] = shared_params[n]
            self.shared_ref[n] = v.to(device=shared_params[n].device)
        self._derive()
