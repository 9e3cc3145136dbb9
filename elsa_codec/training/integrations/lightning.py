"""ELSA inside one Lightning ``Trainer.fit()``: ``ELSALightningCallback`` (``pip install elsa-codec[lightning]``).

::

    cfg = ec.ELSAConfig(levels=[0.9, 0.75, 0.5], steps=2000)
    trainer = L.Trainer(max_steps=cfg.total_steps, callbacks=[ELSALightningCallback(cfg)])
    trainer.fit(module, loader)            # or trainer.fit(module, loader, ckpt_path="last.ckpt")

At ``on_train_start`` the callback builds a :class:`elsa_codec.LevelEmbedder` on the
LightningModule and attaches it to every optimizer of the trainer; its state travels in the
Lightning checkpoint (``on_save_checkpoint`` / ``on_load_checkpoint``, key ``"elsa"``); the phase
and the measured sparsity are logged (``elsa_phase``, ``elsa_level``, ``elsa_sparsity``) every
``log_every_n_steps``; ``on_train_end`` finalizes and writes the ELSA file. Works with the
``lightning`` package or the older ``pytorch_lightning``.
"""
from __future__ import annotations

import os
from typing import Callable

try:
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - the older package name
    from pytorch_lightning import Callback

from ...errors import ELSAError
from ...format.file import save_file
from ..config import ELSAConfig
from ..embedder import LevelEmbedder

__all__ = ["ELSALightningCallback"]


class ELSALightningCallback(Callback):
    """Run ELSA (arXiv 2312.06872) inside Lightning's ``Trainer.fit()``.

    Args:
        config: :class:`elsa_codec.ELSAConfig`; ``Trainer(max_steps=config.total_steps)``.
        bn_calibration, bn_forward: see :meth:`elsa_codec.LevelEmbedder.finalize`.
        output: the ELSA file written at the end (default
            ``<trainer.default_root_dir>/model.elsa.safetensors``; None: not written).
        on_phase_end, on_freeze: as :class:`elsa_codec.LevelEmbedder`.

    Attributes:
        embedder, result, path: as :class:`elsa_codec.training.integrations.transformers.ELSATrainerCallback`.

    Raises (from ``trainer.fit()``):
        ELSAError: ``max_steps`` differs from ``config.total_steps``; the checkpoint's ELSA state
            does not fit (another config, step); anything :class:`elsa_codec.LevelEmbedder` raises.
    """

    def __init__(self, config: ELSAConfig, *, bn_calibration=None, bn_forward: Callable | None = None,
                 output: str | None = "", on_phase_end: Callable | None = None, on_freeze: Callable | None = None):
        if not isinstance(config, ELSAConfig):
            raise ELSAError(f"ELSALightningCallback needs an ELSAConfig, got {type(config).__name__}")
        self.config, self.bn_calibration, self.bn_forward, self.output = config, bn_calibration, bn_forward, output
        self.on_phase_end, self.on_freeze = on_phase_end, on_freeze
        self.embedder: LevelEmbedder | None = None
        self.result = None
        self.path: str | None = None
        self._pending: dict | None = None

    def on_train_start(self, trainer, pl_module):
        if trainer.max_steps != self.config.total_steps:
            raise ELSAError(
                f"ELSALightningCallback: Trainer(max_steps={trainer.max_steps}) but the ELSA plan needs "
                f"total_steps={self.config.total_steps}; set Trainer(max_steps=config.total_steps)"
            )
        self.embedder = LevelEmbedder(pl_module, self.config, on_phase_end=self.on_phase_end, on_freeze=self.on_freeze)
        if self._pending is not None:
            self.embedder.load_state_dict(self._pending)
            self._pending = None
            if self.embedder.step != trainer.global_step:
                raise ELSAError(f"ELSALightningCallback: the ELSA state is at step {self.embedder.step}, the trainer "
                                f"at {trainer.global_step}")
        for opt in trainer.optimizers:
            self.embedder.attach(opt)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if self.embedder is not None:
            checkpoint["elsa"] = self.embedder.state_dict()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        if "elsa" not in checkpoint:
            raise ELSAError("ELSALightningCallback: the checkpoint holds no ELSA state (key 'elsa')")
        self._pending = checkpoint["elsa"]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        emb = self.embedder
        every = max(1, int(getattr(trainer, "log_every_n_steps", 50) or 50))
        if emb is None or trainer.global_step % every:
            return
        ph = emb.phase
        pl_module.log("elsa_phase", float(ph.index if ph is not None else len(emb.plan)))
        pl_module.log("elsa_level", float(ph.level if ph is not None else emb.num_levels + 1))
        pl_module.log("elsa_sparsity", float(emb.sparsity()))

    def on_train_end(self, trainer, pl_module):
        if self.embedder is None or self.result is not None:
            return
        self.result = self.embedder.finalize(self.bn_calibration, bn_forward=self.bn_forward)
        if self.output is None or not trainer.is_global_zero:
            return
        self.path = self.output or os.path.join(trainer.default_root_dir, "model.elsa.safetensors")
        save_file(self.result.encode(), self.path)
