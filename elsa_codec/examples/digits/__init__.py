"""The handwritten-digits examples (scikit-learn's digits, nothing downloaded): ``elsa demo``
(:mod:`.demo`: ELSA against one GMP network per level) and ``elsa compare`` (:mod:`.compare`:
every sparsifier as ELSA levels and as separate networks)."""
