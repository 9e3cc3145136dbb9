"""The ELSA training engine, split by concern (arXiv 2312.06872, sections 2.1-2.2).

- :mod:`.phases`: levels, the :class:`Phase` record and the run's plan (phases with step ranges);
- :mod:`.weights`: which weights are pruned (``filter_fn`` / policies), tied weights by identity,
  wrapper prefixes (DDP, FSDP, ``torch.compile``) stripped from the names;
- :mod:`.state`: mask state: pruning masks, frozen masks and values, the per-step restore, the
  frozen-bit check, its ``state_dict``;
- :mod:`.gmp`: GMP control: when the mask is recomputed inside a sparsify phase, and how;
- :mod:`.binding`: optimizer binding: step pre/post hooks on the optimizers given to ``attach``;
- :mod:`.bn`: per-level batch-norm statistics (section 2.2);
- :mod:`.distill`: the distillation term toward the original network (:class:`DistillConfig`,
  the kept copy of the original, the forward hooks that add the term);
- :mod:`.result`: :class:`ELSAResult`.
- :mod:`.distributed`: several processes (DDP, FSDP2 ``fully_shard``): thresholds over shards,
  agreement across ranks, the file written once (docs/SCALE.md).

The public entry points are :class:`elsa_codec.LevelEmbedder` (step-driven) and
:func:`elsa_codec.embed_levels` / :func:`elsa_codec.prune_gmp` (``train_fn`` driven).
"""
