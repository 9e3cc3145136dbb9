"""Worked examples on real models and real data (nothing is downloaded): :mod:`.digits`
(``elsa demo``, ``elsa compare``) and :mod:`.minilm` (MiniLM distilled into ELSA levels)."""
