"""One-shot magnitude levels: counters without training, in memory and streamed.

- :mod:`.thresholds`: the exact k-th magnitude selection (one tie rule: lowest index first);
- :mod:`.masks`: one tensor's magnitude mask for a level (unstructured, N:M, block);
- :mod:`.magnitude`: :func:`magnitude_counters` of a state dict or model;
- :mod:`.stream_counters`, :mod:`.stream`: the same counters chunk by chunk, and
  :func:`encode_file` (a checkpoint on disk to an ELSA file).
"""
