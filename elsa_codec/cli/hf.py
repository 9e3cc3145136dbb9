"""``elsa convert`` and ``elsa levels``: Hugging Face model directories (``pip install elsa-codec[hf]``).

``elsa convert HF_DIR -o OUT_DIR --levels 0.9,0.75,0.5`` writes the ELSA directory that
``from_pretrained`` loads; ``elsa levels OUT_DIR`` times every level on this machine and names the
densest one that fits a latency or memory budget (the deployment choice of arXiv 2312.06872:
one file, each machine picks its level).
"""
from __future__ import annotations

import json
import sys
import time

import torch

from ..errors import ELSAError
from .messages import safe_lines, safe_text
from .options import DTYPES as _DTYPES
from .options import levels_arg as _levels


def cmd_convert(a) -> int:
    from ..serving.hf import convert_pretrained

    t0 = time.perf_counter()
    meta = convert_pretrained(a.input, a.output, levels=_levels(a.levels), structure=a.structure, select=a.select,
                              distribution=a.distribution, dtype=_DTYPES[a.dtype] if a.dtype else None,
                              code_bits=a.code_bits, max_shard_size=a.max_shard_size,
                              default_level=_level_arg(a.default_level), progress=not a.quiet,
                              calibration=a.calibration, method=a.method, eval_file=a.eval,
                              calibration_samples=a.calibration_samples, seq_len=a.seq_len)
    levels = ", ".join(f"{lv.level}: {lv.structure} {lv.sparsity:.1%}" for lv in meta.levels)
    print(f"{a.output}: {len(meta.tensors)} tensors encoded, T={meta.num_levels}, k={meta.code_bits} "
          f"({levels}) in {time.perf_counter() - t0:.1f} s")
    if meta.quality is not None:
        print(quality_lines(meta.quality))
    return 0


def quality_lines(q: dict) -> str:
    """A quality report (the document's ``quality``) as text lines (``elsa convert``, ``elsa inspect``)."""
    ev = q.get("eval") or {}
    where = "held-out calibration text" if ev.get("held_out") else f"{safe_text(str(ev.get('file')))}"
    head = (f"quality ({safe_text(str(q.get('method')))} levels; {ev.get('samples')} samples, {ev.get('tokens')} tokens "
            f"of {where}): cosine of the final hidden states to the original model")
    ref = (q.get("reference") or {}).get("perplexity")
    lines = [head + (f"; perplexity (original {ref:.4g})" if isinstance(ref, (int, float)) else "")]
    for r in q["levels"]:
        ppl = r.get("perplexity")
        lines.append(f"  level {r['level']}: cosine {r['cosine']:.4f}" + (f", perplexity {ppl:.4g}" if ppl else ""))
    return "\n".join(lines)


def _level_arg(text):
    if text is None:
        return None
    if text.strip().lower() == "dense":
        return "dense"
    try:
        return int(text)
    except ValueError:
        raise ELSAError(f"--default-level: {text!r} is neither a level number nor 'dense'") from None


def cmd_levels(a) -> int:
    import os

    from ..serving.chooser import choose_level

    if not os.path.isdir(a.dir):
        raise ELSAError(f"{a.dir}: not a directory (give an ELSA model directory written by `elsa convert`)")
    if a.tokens < 1 or a.batch < 1:
        raise ELSAError(f"--tokens and --batch must be >= 1, got {a.tokens} and {a.batch}")
    from ..serving.hf import pretrained_config
    from ..serving.hf.checkpoint import architecture_class

    cfg = pretrained_config(a.dir)  # ELSAError unless config.json names quant_method 'elsa'
    model = architecture_class(cfg, "levels").from_pretrained(a.dir, config=cfg)
    vocab = int(getattr(cfg.get_text_config(), "vocab_size", 2) or 2)
    ids = torch.randint(0, vocab, (a.batch, a.tokens), generator=torch.Generator().manual_seed(0))
    try:
        table = choose_level(model, {"input_ids": ids}, max_latency_ms=a.max_latency_ms,
                             max_memory_mib=a.max_memory_mib, min_quality=a.min_quality, runs=a.runs)
    except ELSAError as e:  # no level fits: the measured table on stdout, the reason as the error line
        if getattr(e, "table", None) is not None:
            print(json.dumps(e.table.to_dict(), indent=1, sort_keys=True) if a.json else safe_lines(e.table))
            raise ELSAError(str(e).split(". The model stays")[0] + " (table above)") from None
        raise
    if a.json:
        json.dump(table.to_dict(), sys.stdout, indent=1, sort_keys=True)
        print()
    else:
        print(safe_lines(table))
    return 0


def add_parsers(sub) -> None:
    """``convert`` and ``levels`` on the ``elsa`` command's subparsers."""
    c = sub.add_parser("convert", help="encode a Hugging Face model directory into an ELSA model directory",
                       description="Encode a save_pretrained directory (config.json + safetensors) into an ELSA directory "
                       "that from_pretrained loads (with elsa_codec imported): weights, config.json with its "
                       "quantization_config, tokenizer and generation files.")
    c.add_argument("input", help="the source model directory (save_pretrained output)")
    c.add_argument("-o", "--output", required=True, help="the new ELSA model directory (its parent must exist)")
    c.add_argument("--levels", required=True, help="sparsest first: sparsities '0.9,0.75,0.5' or N:M patterns '1:4,2:4'")
    c.add_argument("--structure", default="unstructured", help="for fractional levels: 'unstructured' or 'block:RxC'")
    c.add_argument("--select", default="blocks", choices=["blocks", "blocks+head", "all"],
                   help="which weights carry levels: the blocks' linear layers (default), plus the output head, or all")
    c.add_argument("--distribution", default="uniform", choices=["uniform", "global"])
    c.add_argument("--dtype", choices=sorted(_DTYPES), help="convert floating tensors to this dtype first")
    c.add_argument("--code-bits", type=int, help="k, default max(1, ceil(log2(T+1)))")
    c.add_argument("--max-shard-size", help="bytes per weights file (default 5GB): one model.safetensors when they fit, "
                   "else shards plus model.safetensors.index.json")
    c.add_argument("--default-level", help="the level a plain from_pretrained serves (default: dense)")
    c.add_argument("--calibration", metavar="FILE", help="text (plain, or JSON lines with a 'text' field) for "
                   "activation-aware levels and the quality report per level, tokenized with the directory's tokenizer")
    c.add_argument("--method", choices=["wanda", "ria", "magnitude"],
                   help="one-shot scores: wanda (default with --calibration; arXiv 2306.11695), ria (ICLR 2024) or "
                   "magnitude (default without)")
    c.add_argument("--eval", metavar="FILE", help="evaluation text of the quality report (default: held back from "
                   "the end of the --calibration text)")
    c.add_argument("--calibration-samples", type=int, default=128, help="windows used for calibration (default 128)")
    c.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    c.set_defaults(func=cmd_convert)

    v = sub.add_parser("levels", help="time every level of an ELSA model directory here; pick one for a budget",
                       description="Load an ELSA model directory, time one forward of a dummy input at every level, "
                       "and select the densest level within the budget (exit 2 naming the closest level if none fits).")
    v.add_argument("dir", help="an ELSA model directory (elsa convert output)")
    v.add_argument("--max-latency-ms", type=float, help="latency budget of one forward, milliseconds")
    v.add_argument("--max-memory-mib", type=float, help="memory budget of the served weights, MiB")
    v.add_argument("--min-quality", type=float, help="least cosine to the original model, from the checkpoint's "
                   "quality report (elsa convert --calibration)")
    v.add_argument("--tokens", type=int, default=16, help="dummy input length (default 16)")
    v.add_argument("--batch", type=int, default=1, help="dummy batch size (default 1)")
    v.add_argument("--runs", type=int, default=5, help="timed runs per level (default 5; the median is reported)")
    v.add_argument("--json", action="store_true", help="machine-readable output")
    v.set_defaults(func=cmd_levels)
