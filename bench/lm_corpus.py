"""Text for a small language model, made on this machine: the docstrings of Python's own
standard library (read with ``ast``, nothing imported or downloaded) plus the pydoc topics'
sentences, split train / held-out by a hash of each text, and a byte-level BPE tokenizer trained
on the train part only (``tokenizers``).

About 1.7 MB of English technical prose (CPython 3.11): enough that a 4-layer model trained for a
few minutes does not learn it by heart, so its held-out perplexity measures what pruning costs.
"""
from __future__ import annotations

import ast
import os
import sysconfig

__all__ = ["corpus", "bpe_tokenizer"]

#: Standard-library folders left out: tests and demos (code more than prose), third-party packages.
_SKIP = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3", "turtledemo"}


def _docstrings(min_chars: int) -> list:
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP)
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            try:
                with open(os.path.join(folder, f), encoding="utf-8") as fh:
                    tree = ast.parse(fh.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= min_chars:
                        out.append(" ".join(doc.split()))
    return out


def corpus(heldout: float = 0.1, min_chars: int = 200) -> tuple:
    """``(train, held_out)`` lists of texts: the standard library's docstrings of at least
    ``min_chars`` characters and the pydoc sentences, each held out by the hash rule of
    :func:`elsa_codec.examples.minilm.pydoc_text.split`, first occurrence kept."""
    from elsa_codec.examples.minilm import pydoc_text

    texts = list(dict.fromkeys(_docstrings(min_chars) + pydoc_text.sentences()))
    return pydoc_text.split(texts, heldout=heldout)


def bpe_tokenizer(texts: list, vocab: int = 4096):
    """A byte-level BPE tokenizer of ``vocab`` tokens trained on ``texts``
    (``[UNK]``, ``[CLS]``, ``[SEP]`` special tokens), as a transformers fast tokenizer."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab, special_tokens=["[UNK]", "[CLS]", "[SEP]"],
                                             show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")
