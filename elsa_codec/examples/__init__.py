"""Worked examples on real models and real data (nothing is downloaded).

- :mod:`.pydoc_text`: English sentences from the documentation that ships with Python
  (``pydoc_data.topics``), with a fixed held-out split;
- :mod:`.minilm_elsa`: all-MiniLM-L6-v2 distilled into nested sparse ELSA levels, against one-shot
  magnitude pruning and a separately distilled GMP student per level
  (``python -m elsa_codec.examples.minilm.run`` or ``elsa demo --model minilm``).
"""
