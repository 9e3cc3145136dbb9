"""Sparsification methods beyond magnitude pruning, each usable as ``embed_levels(..., sparsifier=...)``
and ``prune_gmp(..., sparsifier=...)`` (ELSA, arXiv 2312.06872, section 2.1: any sparsification
method can produce a level). One method per file; the base class, its phase hooks and magnitude
pruning live in :mod:`elsa_codec.training.sparsifiers.base`.

- :mod:`.random_pruning`: :class:`RandomSparsifier`, random pruning with uniform or
  Erdős-Rényi-Kernel layer-wise ratios (Liu et al. 2022; Evci et al. 2020);
- :mod:`.early_bird`: :class:`EarlyBirdSparsifier`, early-bird tickets (You et al. 2020);
- :mod:`.lottery_ticket`: :class:`LotteryTicketSparsifier`, iterative magnitude pruning with
  rewinding (Frankle et al. 2019);
- :mod:`.l0`: :class:`L0Sparsifier`, hard-concrete gates and the expected-L0 penalty (Louizos et
  al. 2018);
- :mod:`.variational_dropout`: :class:`VariationalDropoutSparsifier`, sparse variational dropout
  (Molchanov et al. 2017);
- :mod:`.pipeline`: :class:`PruningPipeline`, the end-to-end pruning pipeline with sparsity
  enforcement (arXiv 2312.01653): ZerO initialisation (:mod:`.zero_init`), a learned mask, mask-guided
  magnitude pruning, and post-pruning label smoothing, soft activations and soft skips
  (:mod:`.soft_training`, :func:`label_smoothing`);
- :mod:`.gates`: what the methods that add parameters share; :func:`sparsity_penalty`, the loss term
  ``train_fn`` adds.
"""
from .early_bird import EarlyBirdSparsifier
from .gates import sparsity_penalty
from .l0 import L0Sparsifier
from .lottery_ticket import LotteryTicketSparsifier
from .pipeline import PruningPipeline
from .random_pruning import RandomSparsifier
from .soft_training import label_smoothing
from .variational_dropout import VariationalDropoutSparsifier
from .zero_init import zero_init_

__all__ = ["RandomSparsifier", "EarlyBirdSparsifier", "LotteryTicketSparsifier", "L0Sparsifier",
           "VariationalDropoutSparsifier", "PruningPipeline", "sparsity_penalty", "label_smoothing", "zero_init_"]
