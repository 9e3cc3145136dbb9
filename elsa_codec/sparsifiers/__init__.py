"""Sparsification methods beyond magnitude pruning, each usable as ``embed_levels(..., sparsifier=...)``
and ``prune_gmp(..., sparsifier=...)`` (ELSA, arXiv 2312.06872, section 2.1: any sparsification
method can produce a level). One method per file; the base class, its phase hooks and magnitude
pruning live in :mod:`elsa_codec.sparsify`.

- :mod:`.random_pruning`: :class:`RandomSparsifier`, random pruning with uniform or
  Erdős-Rényi-Kernel layer-wise ratios (Liu et al. 2022; Evci et al. 2020);
- :mod:`.early_bird`: :class:`EarlyBirdSparsifier`, early-bird tickets (You et al. 2020);
- :mod:`.lottery_ticket`: :class:`LotteryTicketSparsifier`, iterative magnitude pruning with
  rewinding (Frankle et al. 2019).
"""
from .early_bird import EarlyBirdSparsifier
from .lottery_ticket import LotteryTicketSparsifier
from .random_pruning import RandomSparsifier

__all__ = ["RandomSparsifier", "EarlyBirdSparsifier", "LotteryTicketSparsifier"]
