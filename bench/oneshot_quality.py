"""``python -m bench oneshot-quality``: what one-shot nested levels keep, per level and per method.

Methods (``--methods``): ``magnitude`` (:func:`elsa_codec.magnitude_counters`), ``wanda`` and
``ria`` (:func:`elsa_codec.activation_counters`, calibrated on text disjoint from the evaluation
text). Level sets: the nested unstructured set ``[0.9, 0.7, 0.5]`` (sparsest first) and ``["2:4"]``.
For each (method, level set) the model's state dict is encoded (:func:`elsa_codec.encode`) and every
level ``t`` is served as ``ec.extract(enc, t)`` loaded into a copy of the model. Default selection
(``"blocks"``): the blocks' linear layers; embeddings and the output head stay dense.

Models, text from :mod:`elsa_codec.examples.minilm.pydoc_text` (``split(heldout=0.1)``):

- ``minilm``: the real pretrained all-MiniLM-L6-v2; calibration 128 sentences of the train part
  (padded batches of 16, at most 128 tokens), evaluation the held-out sentences (at most 400);
  metric the mean cosine of each sentence embedding (mean pooling + L2, :func:`embed`) to the
  original model's.
- ``lm``: a GPT-2-shaped causal LM (4 layers, 256 hidden, a 4096-token BPE vocabulary trained on
  the train text), random init under a fixed seed, trained briefly with AdamW on 128-token windows
  of the standard library's docstrings and the pydoc sentences (:mod:`bench.lm_corpus`, split by
  the same hash rule); calibration 64 of the train windows; metric the held-out perplexity
  ``exp(mean token CE)``.

Output (``--out``, default ``bench/results/oneshot-quality/``, overwritten): ``minilm.md``,
``lm.md``, ``results.csv``, ``quality.png``, ``COMMAND.txt``, ``run.log``.
"""
from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import math
import os
import random
import sys
import time

import torch

from . import common

OUT_DEFAULT = os.path.join(common.BENCH_DIR, "results", "oneshot-quality")
METHODS = ("magnitude", "wanda", "ria")
LEVEL_SETS = {"unstructured": [0.9, 0.7, 0.5], "2:4": ["2:4"]}
ROWS = ("0.9", "0.7", "0.5", "2:4", "dense")
CSV_FIELDS = ["model", "method", "level_set", "level", "sparsity", "metric", "value", "git_sha", "timestamp"]
SEED = 0


@dataclasses.dataclass
class Plan:
    """Sizes of one run (``quick``: a smoke test under a minute)."""

    eval_sentences: int = 400
    calib_sentences: int = 128
    calib_batch: int = 16
    lm_calib_windows: int = 64
    lm_eval_windows: int = 200
    train_steps: int = 2000
    train_batch: int = 8
    lr: float = 3e-3
    window: int = 128

    @classmethod
    def make(cls, quick: bool) -> "Plan":
        """The full plan, or the ``--quick`` one."""
        if quick:
            return cls(eval_sentences=32, calib_sentences=32, lm_calib_windows=16, lm_eval_windows=8, train_steps=12)
        return cls()


# ------------------------------------------------------------------------------------------------
# Counters and levels (shared by both models)
# ------------------------------------------------------------------------------------------------
def make_counters(model, method: str, levels: list, calib: list):
    """The :class:`elsa_codec.Counters` of ``method`` for ``levels`` (N:M strings imply their structure)."""
    import elsa_codec as ec

    kw = {} if isinstance(levels[0], str) else {"structure": "unstructured"}
    if method == "magnitude":
        return ec.magnitude_counters(model, levels, **kw)
    return ec.activation_counters(model, levels, calib, method=method, **kw)


def level_label(level) -> str:
    """``0.9`` -> ``"0.9"``, ``"2:4"`` -> ``"2:4"`` (the key of a level in tables and the CSV)."""
    return str(level) if isinstance(level, str) else f"{level:g}"


def served_levels(model, counters, levels: list):
    """Yield ``(label, measured sparsity, model copy at that level)`` for levels ``1..T`` of ``counters``."""
    import elsa_codec as ec

    enc = ec.encode(model.state_dict(), counters)
    work = copy.deepcopy(model)
    names = list(counters)
    for t, lv in enumerate(levels, start=1):
        sd = ec.extract(enc, t)
        res = work.load_state_dict(sd, strict=False)
        if res.missing_keys:
            raise RuntimeError(f"extract(enc, {t}) lacks {res.missing_keys[:5]} ({len(res.missing_keys)} keys)")
        if res.unexpected_keys:
            raise RuntimeError(f"extract(enc, {t}) has keys the model lacks: {res.unexpected_keys[:5]}")
        zeros = sum(int((sd[n] == 0).sum()) for n in names)
        total = sum(sd[n].numel() for n in names)
        yield level_label(lv), zeros / total, work


def sweep(ctx, model_name: str, model, calib: list, measure, metric: str) -> dict:
    """Every (method, level set, level) of ``model``: ``{(method, label): value}``, rows added to ``ctx.rows``."""
    out = {}
    for method in ctx.methods:
        for set_name, levels in LEVEL_SETS.items():
            t0 = time.perf_counter()
            torch.manual_seed(SEED)
            counters = make_counters(model, method, levels, calib)
            ctx.log(f"  {model_name} {method} {set_name}: counters of {len(counters)} tensors "
                    f"in {time.perf_counter() - t0:.1f} s")
            for label, sparsity, work in served_levels(model, counters, levels):
                value = measure(work)
                out[(method, label)] = value
                add_row(ctx, model_name, method, set_name, label, sparsity, metric, value)
    return out


def add_row(ctx, model_name, method, level_set, level, sparsity, metric, value) -> None:
    """Append one CSV row to ``ctx.rows`` and log it."""
    ctx.rows.append({"model": model_name, "method": method, "level_set": level_set, "level": level,
                     "sparsity": f"{sparsity:.4f}", "metric": metric, "value": f"{value:.6f}",
                     "git_sha": ctx.env.git_sha, "timestamp": ctx.env.timestamp})
    ctx.log(f"    {model_name:<7} {method:<10} {level_set:<13} level {level:<6} sparsity {sparsity:.4f}  "
            f"{metric} {value:.6f}")


# ------------------------------------------------------------------------------------------------
# MiniLM: cosine to the original embeddings
# ------------------------------------------------------------------------------------------------
def minilm_calibration(tok, sentences: list, plan: Plan) -> list:
    """Padded batches (``plan.calib_batch``, at most 128 tokens) of ``plan.calib_sentences`` sentences,
    a seeded sample sorted by length (less padding: a padded token counts in the activation norms)."""
    picked = sorted(random.Random(SEED).sample(sentences, plan.calib_sentences), key=lambda s: len(tok(s)["input_ids"]))
    out = []
    for i in range(0, len(picked), plan.calib_batch):
        b = tok(picked[i:i + plan.calib_batch], padding=True, truncation=True, max_length=128, return_tensors="pt")
        out.append(dict(b))
    return out


def run_minilm(ctx, train: list, test: list) -> dict:
    """The MiniLM sweep: ``{(method, level): mean cosine}``, ``("dense", "dense")`` = 1."""
    from transformers import AutoModel, AutoTokenizer

    from elsa_codec.examples.minilm.assets import minilm_dir
    from elsa_codec.examples.minilm.model import embed

    path = minilm_dir()
    model = AutoModel.from_pretrained(path).eval().float()
    tok = AutoTokenizer.from_pretrained(path)
    evals = test[:ctx.plan.eval_sentences]
    calib = minilm_calibration(tok, train, ctx.plan)
    ctx.log(f"minilm: {type(model).__name__} from {path}; {len(evals)} held-out sentences, calibration "
            f"{ctx.plan.calib_sentences} train sentences in {len(calib)} batches")
    ref = embed(model, tok, evals)
    add_row(ctx, "minilm", "dense", "-", "dense", 0.0, "cos_mean", 1.0)

    def measure(work) -> float:
        return float((embed(work, tok, evals) * ref).sum(1).mean())

    with torch.no_grad():
        out = sweep(ctx, "minilm", model, calib, measure, "cos_mean")
    out[("dense", "dense")] = 1.0
    return out


# ------------------------------------------------------------------------------------------------
# The causal LM: trained briefly, perplexity on held-out text
# ------------------------------------------------------------------------------------------------
def windows(tok, sentences: list, length: int) -> torch.Tensor:
    """The sentences tokenized (no special tokens), joined by ``[SEP]``, cut into ``[N, length]`` windows."""
    ids = []
    for s in sentences:
        ids += tok(s, add_special_tokens=False)["input_ids"] + [tok.sep_token_id]
    n = len(ids) // length
    return torch.tensor(ids[:n * length]).view(n, length)


def new_lm(vocab: int, tok):
    """The GPT-2-shaped model (no dropout: the training is short), random init under :data:`SEED`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab, n_layer=4, n_embd=256, n_head=4, n_positions=256, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    torch.manual_seed(SEED)
    return GPT2LMHeadModel(cfg)


def train_lm(ctx, model, data: torch.Tensor) -> None:
    """AdamW, linear warm-up then cosine decay, gradient clipping 1.0; batches of random windows."""
    plan = ctx.plan
    opt = torch.optim.AdamW(model.parameters(), lr=plan.lr, weight_decay=0.01)
    warm = max(1, plan.train_steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, 0.5 * (1 + math.cos(
        math.pi * max(0, s - warm) / max(1, plan.train_steps - warm)))))
    g = torch.Generator().manual_seed(SEED)
    model.train()
    t0 = time.perf_counter()
    for step in range(plan.train_steps):
        x = data[torch.randint(len(data), (plan.train_batch,), generator=g)]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == plan.train_steps - 1:
            ctx.log(f"  train step {step:4d}  loss {loss.item():.4f}  {time.perf_counter() - t0:.0f} s")
    model.eval()


def zeroed(model):
    """A copy of ``model`` with every weight the levels cover (the blocks' linear weights) zeroed:
    what the blocks' weights are worth (the embeddings, head and biases stay)."""
    import elsa_codec as ec

    work = copy.deepcopy(model)
    sd = model.state_dict()
    work.load_state_dict({n: torch.zeros_like(sd[n]) for n in ec.magnitude_counters(model, [0.5])}, strict=False)
    return work


@torch.no_grad()
def perplexity(model, data: torch.Tensor, batch: int = 16) -> float:
    """``exp`` of the mean token cross-entropy of ``data`` ``[N, L]`` (``labels=input_ids``)."""
    total, count = 0.0, 0
    for i in range(0, len(data), batch):
        x = data[i:i + batch]
        n = x.numel() - x.shape[0]  # predicted tokens: L - 1 per window
        total += float(model(input_ids=x, labels=x).loss) * n
        count += n
    return math.exp(total / count)


def run_lm(ctx) -> dict:
    """The LM sweep: ``{(method, level): perplexity}``, ``("dense", "dense")`` the trained model's."""
    from .lm_corpus import bpe_tokenizer, corpus

    train, test = corpus()
    tok = bpe_tokenizer(train)
    ctx.log(f"lm text: {len(train)} train texts, {len(test)} held out (bench/lm_corpus.py); BPE vocabulary {len(tok)}")
    plan = ctx.plan
    data, evals = windows(tok, train, plan.window), windows(tok, test, plan.window)[:plan.lm_eval_windows]
    ctx.n_lm = len(evals)
    model = new_lm(len(tok), tok)
    ctx.log(f"lm: GPT2LMHeadModel {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters; "
            f"train {len(data)} windows of {plan.window}, {plan.train_steps} steps of {plan.train_batch}; "
            f"held-out {len(evals)} windows")
    t0 = time.perf_counter()
    train_lm(ctx, model, data)
    ctx.log(f"  trained in {time.perf_counter() - t0:.1f} s")
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(SEED + 1))[:plan.lm_calib_windows]
    calib = [{"input_ids": data[idx[i:i + 16]]} for i in range(0, len(idx), 16)]
    dense = perplexity(model, evals)
    add_row(ctx, "lm", "dense", "-", "dense", 0.0, "perplexity", dense)
    out = sweep(ctx, "lm", model, calib, lambda w: perplexity(w, evals), "perplexity")
    out[("dense", "dense")] = dense
    out[("zeroed", "all")] = perplexity(zeroed(model), evals)
    add_row(ctx, "lm", "zeroed", "-", "all", 1.0, "perplexity", out[("zeroed", "all")])
    return out


# ------------------------------------------------------------------------------------------------
# Report: markdown, CSV, PNG
# ------------------------------------------------------------------------------------------------
def markdown(title: str, values: dict, methods: list, fmt: str) -> str:
    """Rows :data:`ROWS` (level), columns ``methods``; the dense row spans every column."""
    names = {"0.9": "90 %", "0.7": "70 %", "0.5": "50 %", "2:4": "2:4", "dense": "dense"}
    lines = [title, "", "| level | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
    for r in ROWS:
        if r == "dense":
            cells = [format(values[("dense", "dense")], fmt)] * len(methods)
        else:
            cells = [format(values[(m, r)], fmt) if (m, r) in values else "-" for m in methods]
        lines.append(f"| {names[r]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def error_ratios(values: dict, methods: list) -> list:
    """``(1 - cos[m]) / (1 - cos[magnitude])`` at 50 % and 2:4, one line per activation method."""
    out = []
    for m in methods:
        if m == "magnitude" or ("magnitude", "0.5") not in values:
            continue
        parts = [f"{lab} {(1 - values[(m, lv)]) / (1 - values[('magnitude', lv)]):.3f}"
                 for lv, lab in (("0.5", "50 %"), ("2:4", "2:4")) if (m, lv) in values]
        out.append(f"1 - cosine of {m} / that of magnitude: " + ", ".join(parts))
    return out


def plot(path: str, minilm: dict, lm: dict, methods: list) -> None:
    """Two panels: MiniLM cosine and LM perplexity vs sparsity, one line per method, 2:4 as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, values, ylab in ((axes[0], minilm, "MiniLM mean cosine to dense"), (axes[1], lm, "LM held-out perplexity")):
        for i, m in enumerate(methods):
            xs = [0.0] + [s for s in (0.5, 0.7, 0.9) if (m, f"{s:g}") in values]
            ys = [values[("dense", "dense")]] + [values[(m, f"{s:g}")] for s in xs[1:]]
            line = ax.plot(xs, ys, marker="o", label=m)[0]
            if (m, "2:4") in values:
                ax.plot([0.5], [values[(m, "2:4")]], marker="*", ms=13, ls="none", color=line.get_color(),
                        label=f"{m} 2:4")
        ax.set_xlabel("sparsity of the blocks' linear weights")
        ax.set_ylabel(ylab)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].set_yscale("log")
    fig.suptitle("one-shot nested levels: unstructured 90/70/50 % (lines) and 2:4 (stars)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(ctx, out: str, minilm: dict, lm: dict) -> None:
    """``minilm.md``, ``lm.md``, ``results.csv``, ``quality.png`` in ``out``."""
    ms = ctx.methods
    md = markdown(f"# all-MiniLM-L6-v2: mean cosine to the dense model ({ctx.n_minilm} held-out sentences)",
                  minilm, ms, ".4f")
    md += "".join(f"\n{line}\n" for line in error_ratios(minilm, ms))
    lm_md = markdown(f"# GPT-2-shaped LM (trained {ctx.plan.train_steps} steps): held-out perplexity "
                     f"({ctx.n_lm} windows of {ctx.plan.window} tokens)", lm, ms, ".2f")
    lm_md += (f"\nEvery weight the levels cover zeroed (the blocks' linear weights; embeddings, head, biases and "
              f"layer norms kept): perplexity {lm[('zeroed', 'all')]:.2f}.\n")
    for name, text in (("minilm.md", md), ("lm.md", lm_md)):
        with open(os.path.join(out, name), "w", encoding="utf-8") as f:
            f.write(text)
        ctx.log("\n" + text)
    with open(os.path.join(out, "results.csv"), "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(ctx.rows)
    plot(os.path.join(out, "quality.png"), minilm, lm, ms)
    ctx.log(f"wrote {len(ctx.rows)} rows, minilm.md, lm.md, quality.png to {out}")


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The options: ``--out``, ``--quick``, ``--methods``, ``--threads``."""
    p = argparse.ArgumentParser(prog="python -m bench oneshot-quality", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=OUT_DEFAULT, help=f"results folder (default {OUT_DEFAULT}; files overwritten)")
    p.add_argument("--quick", action="store_true", help="smoke test: 32 sentences, 12 train steps, 8 windows")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list of magnitude, wanda, ria")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: the CPUs this process may use)")
    return p


def _setup(a) -> argparse.Namespace | None:
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        print(f"python -m bench oneshot-quality: unknown methods {bad}; expected {', '.join(METHODS)}", file=sys.stderr)
        return None
    import elsa_codec as ec

    if any(m != "magnitude" for m in methods) and not hasattr(ec, "activation_counters"):
        print("python -m bench oneshot-quality: elsa_codec.activation_counters is missing (wanda / ria); "
              "use --methods magnitude", file=sys.stderr)
        return None
    threads = a.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    os.makedirs(a.out, exist_ok=True)
    env = common.Env.detect(torch.device("cpu"), threads)
    open(os.path.join(a.out, "run.log"), "w").close()
    log = common.Log(os.path.join(a.out, "run.log"))
    return argparse.Namespace(methods=methods, plan=Plan.make(a.quick), env=env, log=log, rows=[], n_minilm=0, n_lm=0)


def main(argv=None) -> int:
    """``python -m bench oneshot-quality [--out DIR] [--quick] [--methods ...] [--threads N]``."""
    a = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    saved = torch.get_num_threads()
    ctx = _setup(a)
    if ctx is None:
        return 2
    try:
        return _run(ctx, a)
    finally:
        torch.set_num_threads(saved)
        ctx.log.close()


def _run(ctx, a) -> int:
    from elsa_codec.examples.minilm import pydoc_text

    from .cpu_sparse import machine_line

    t0 = time.perf_counter()
    torch.use_deterministic_algorithms(True, warn_only=True)
    cmd, mline = common.command_line(), machine_line(ctx.env)
    with open(os.path.join(a.out, common.COMMAND_NAME), "w", encoding="utf-8") as f:
        f.write(f"{ctx.env.timestamp}  cd {common.REPO_DIR} && OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} "
                f"{cmd}\n    machine: {mline}; threads {ctx.env.threads}\n")
    ctx.log(f"python -m bench oneshot-quality: {ctx.env.timestamp}\ncommand: {cmd}\nmachine: {mline}")
    ctx.log(f"methods {ctx.methods}; level sets {LEVEL_SETS}; threads {ctx.env.threads}; {ctx.plan}")
    train, test = pydoc_text.split(pydoc_text.sentences(), heldout=0.1)
    ctx.log(f"pydoc text: {len(train)} train sentences, {len(test)} held out")
    ctx.n_minilm = min(len(test), ctx.plan.eval_sentences)
    t1 = time.perf_counter()
    minilm = run_minilm(ctx, train, test)
    ctx.log(f"-- minilm: {time.perf_counter() - t1:.1f} s")
    t1 = time.perf_counter()
    lm = run_lm(ctx)
    ctx.log(f"-- lm: {time.perf_counter() - t1:.1f} s")
    write_outputs(ctx, a.out, minilm, lm)
    ctx.log(f"total {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
