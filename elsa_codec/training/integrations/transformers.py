"""ELSA inside one Hugging Face ``Trainer.train()``: ``ELSATrainerCallback`` (``pip install elsa-codec[hf]``).

::

    cfg = ec.ELSAConfig(levels=[0.9, 0.75, 0.5], steps=2000, densify_steps=1000)
    args = TrainingArguments(output_dir="out", max_steps=cfg.total_steps, ...)   # one LR schedule
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[ELSATrainerCallback(cfg)])
    trainer.train()                       # or trainer.train(resume_from_checkpoint=True)
    # out/model.elsa.safetensors: every level in one file

The callback builds a :class:`elsa_codec.LevelEmbedder` at ``on_train_begin`` and attaches it to
the trainer's optimizer (learning-rate schedule, warm-up, gradient accumulation, mixed precision
and DDP stay the trainer's), saves the embedder's state in every checkpoint folder
(``elsa_state.pt``) and restores it on resume, adds ``elsa_phase`` / ``elsa_level`` /
``elsa_sparsity`` to the trainer's logs, and at ``on_train_end`` finalizes and writes the file.
"""
from __future__ import annotations

import os
from typing import Callable

import torch
from transformers import TrainerCallback

from ...errors import ELSAError
from ...format.file import save_file
from ..config import ELSAConfig
from ..embedder import LevelEmbedder

__all__ = ["ELSATrainerCallback", "STATE_FILE"]

#: Name of the embedder's state inside each ``checkpoint-N`` folder.
STATE_FILE = "elsa_state.pt"


class ELSATrainerCallback(TrainerCallback):
    """Run ELSA (arXiv 2312.06872) inside ``Trainer.train()``.

    Args:
        config: :class:`elsa_codec.ELSAConfig`; ``TrainingArguments.max_steps`` must equal
            ``config.total_steps``.
        bn_calibration: batches for the per-level batch-norm statistics (see
            :meth:`elsa_codec.LevelEmbedder.finalize`), or None.
        bn_forward: ``fn(model, batch)`` for a calibration forward pass.
        output: the ELSA file to write at the end (default ``<output_dir>/model.elsa.safetensors``;
            None disables writing: use ``callback.result``).
        on_phase_end, on_freeze: as :class:`elsa_codec.LevelEmbedder`.

    Attributes:
        embedder: the :class:`elsa_codec.LevelEmbedder` (after ``on_train_begin``).
        result: the :class:`elsa_codec.ELSAResult` (after ``on_train_end``).
        path: the file written, or None.

    Raises (from ``trainer.train()``):
        ELSAError: ``max_steps`` differs from ``config.total_steps``; a resumed run whose
            checkpoint has no ELSA state; anything :class:`elsa_codec.LevelEmbedder` raises.
    """

    def __init__(self, config: ELSAConfig, *, bn_calibration=None, bn_forward: Callable | None = None,
                 output: str | None = "", on_phase_end: Callable | None = None, on_freeze: Callable | None = None):
        if not isinstance(config, ELSAConfig):
            raise ELSAError(f"ELSATrainerCallback needs an ELSAConfig, got {type(config).__name__}")
        self.config, self.bn_calibration, self.bn_forward, self.output = config, bn_calibration, bn_forward, output
        self.on_phase_end, self.on_freeze = on_phase_end, on_freeze
        self.embedder: LevelEmbedder | None = None
        self.result = None
        self.path: str | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.max_steps != self.config.total_steps:
            raise ELSAError(
                f"ELSATrainerCallback: the trainer runs max_steps={state.max_steps} optimizer steps but the ELSA plan "
                f"needs total_steps={self.config.total_steps} ({self.config.num_levels} levels: steps, densify_steps, "
                "final_steps); set TrainingArguments(max_steps=config.total_steps)"
            )
        if optimizer is None:
            raise ELSAError("ELSATrainerCallback: the trainer gave no optimizer at on_train_begin")
        self.embedder = LevelEmbedder(model, self.config, on_phase_end=self.on_phase_end, on_freeze=self.on_freeze)
        if state.global_step > 0:
            self._resume(args, state)
        self.embedder.attach(optimizer)

    def _resume(self, args, state) -> None:
        path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE)
        if not os.path.exists(path):
            raise ELSAError(
                f"ELSATrainerCallback: resuming at step {state.global_step} but {path} does not exist (the checkpoint was "
                "not written with this callback, or lies outside output_dir)"
            )
        sd = torch.load(path, map_location="cpu", weights_only=True)
        self.embedder.load_state_dict(sd)
        if self.embedder.step != state.global_step:
            raise ELSAError(f"ELSATrainerCallback: the ELSA state is at step {self.embedder.step}, the trainer at "
                            f"{state.global_step}")

    def on_save(self, args, state, control, **kwargs):
        if self.embedder is None or not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        os.makedirs(folder, exist_ok=True)
        torch.save(self.embedder.state_dict(), os.path.join(folder, STATE_FILE))

    def on_log(self, args, state, control, logs=None, **kwargs):
        emb = self.embedder
        if emb is None or logs is None:
            return
        ph = emb.phase
        extra = {"elsa_phase": ph.index if ph is not None else len(emb.plan),
                 "elsa_level": (ph.level if ph is not None else emb.num_levels + 1),
                 "elsa_sparsity": round(emb.sparsity(), 6)}
        logs.update(extra)
        if state.log_history:
            state.log_history[-1].update(extra)

    def on_train_end(self, args, state, control, **kwargs):
        if self.embedder is None or self.result is not None:
            return
        self.result = self.embedder.finalize(self.bn_calibration, bn_forward=self.bn_forward)
        if self.output is None or not state.is_world_process_zero:
            return
        self.path = self.output or os.path.join(args.output_dir, "model.elsa.safetensors")
        save_file(self.result.encode(), self.path)
