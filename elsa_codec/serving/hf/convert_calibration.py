"""The calibration steps of :func:`~elsa_codec.serving.hf.convert.convert_pretrained`: the
arguments checked, the token windows, the activation statistics and the quality report.
"""
from __future__ import annotations

import logging
import os

from ...errors import ELSAError
from ...format.document import ELSAMeta
from ...oneshot.activation import weight_statistics
from ...oneshot.scores import METHODS
from ...progress import progress_bar
from .calibrate import batches, check_seq_len, mapped_model, read_texts, split_windows, token_windows
from .quality import measure_quality

logger = logging.getLogger("elsa_codec")

__all__ = ["check_method", "calibration_windows", "statistics", "quality_report", "CONVERT_METHODS"]

#: The ``--method`` choices of ``elsa convert``.
CONVERT_METHODS = ("magnitude", *METHODS)


def check_method(method, calibration, eval_file) -> str:
    """The one-shot method: ``wanda`` by default with a calibration file, else ``magnitude``.

    Raises:
        ELSAError: an unknown method; ``wanda`` / ``ria`` or ``eval_file`` without ``calibration``.
    """
    if method is None:
        method = "wanda" if calibration is not None else "magnitude"
    if method not in CONVERT_METHODS:
        raise ELSAError(f"--method must be one of {', '.join(CONVERT_METHODS)}, got {method!r}")
    if calibration is None and method != "magnitude":
        raise ELSAError(f"--method {method} weighs weights by their activations and needs --calibration FILE")
    if calibration is None and eval_file is not None:
        raise ELSAError("--eval needs --calibration FILE (the report compares levels on text)")
    return method


#: Files one of which a saved tokenizer has (transformers builds an empty one from a folder with none).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")


def _tokenizer(src: str):
    from transformers import AutoTokenizer

    why = "no tokenizer file"
    if any(os.path.isfile(os.path.join(src, f)) for f in TOKENIZER_FILES):
        try:
            tok = AutoTokenizer.from_pretrained(src)
            if len(tok) > 1:
                return tok
            why = "an empty vocabulary"
        except (OSError, ValueError, TypeError, KeyError) as e:
            why = type(e).__name__
    raise ELSAError(f"--calibration: {src} has no tokenizer transformers can load ({why}); save the tokenizer "
                    "beside the model (tokenizer.save_pretrained)")


def calibration_windows(src: str, config, calibration, eval_file, samples: int, seq_len: int):
    """``(calibration windows, evaluation windows)`` (``int64 [n, seq_len]``), or None without
    ``calibration``; every refusal before any work.

    Raises:
        ELSAError: ``samples`` or ``seq_len`` < 1 or longer than the model's positions, no
            tokenizer, as :func:`read_texts` / :func:`token_windows` / :func:`split_windows`.
    """
    if calibration is None:
        return None
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ELSAError(f"--calibration-samples must be an int >= 1, got {samples!r}")
    check_seq_len(config, seq_len)
    calib_docs = read_texts(os.fspath(calibration), "--calibration")
    eval_docs = read_texts(os.fspath(eval_file), "--eval") if eval_file is not None else None
    tok = _tokenizer(src)
    calib = token_windows(tok, calib_docs, seq_len, f"--calibration {calibration}")
    ev = token_windows(tok, eval_docs, seq_len, f"--eval {eval_file}") if eval_docs is not None else None
    out = split_windows(calib, samples, ev)
    if out[0].shape[0] < samples:
        logger.warning("--calibration: %d samples of %d tokens (the text holds no more)", out[0].shape[0], seq_len)
    return out


def statistics(model, names: list, windows, progress: bool) -> dict:
    """``{stored name: float32 [groups, in_features]}``: one forward pass of the memory-mapped
    source ``model`` (:func:`~elsa_codec.serving.hf.calibrate.mapped_model`) over the calibration
    windows (:func:`~elsa_codec.oneshot.activation.weight_statistics`)."""
    feed = batches(windows)
    bar = progress_bar(total=len(feed), desc="calibration", unit="batch", enabled=progress)
    try:
        stats, tokens, n = weight_statistics(model, names, feed, progress=lambda i: bar.update(1))
    finally:
        bar.close()
    logger.info("calibration: %d batches, %d tokens per layer, %d of %d weights scored", n, tokens, len(stats), len(names))
    return stats


def quality_report(source, config, path: str, meta: ELSAMeta, method: str, windows, calibration, eval_file) -> dict:
    """The ``quality`` document of the written checkpoint ``path`` against the memory-mapped
    ``source`` model."""
    calib, ev = windows
    rows, ref_ppl = measure_quality(source, mapped_model(config, path), meta, ev)
    return {
        "method": method,
        "metric": "mean cosine of the final hidden states to the original model's, over the evaluation tokens",
        "calibration": {"file": os.path.basename(os.fspath(calibration)), "samples": int(calib.shape[0]),
                        "seq_len": int(calib.shape[1])},
        "eval": {"file": os.path.basename(os.fspath(eval_file)) if eval_file is not None else None,
                 "held_out": eval_file is None, "samples": int(ev.shape[0]), "tokens": int(ev.numel())},
        "reference": {"perplexity": ref_ppl},
        "levels": rows,
    }
