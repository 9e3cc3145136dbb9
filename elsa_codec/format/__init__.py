"""The format layer: everything an ELSA file is, and nothing that decides levels.

- :mod:`.bits`: the code rule (ELSA arXiv 2312.06872, section 2.2; docs/DESIGN.md, "The code
  rule"): encode / decode the level code in the low mantissa bits, bit-exact for float32, float16
  and bfloat16; ``elsa_rule.c`` is its C kernel (built by :mod:`elsa_codec.native`);
- :mod:`.structure`: level structures (unstructured, N:M, block) and the level list (``parse_levels``);
- :mod:`.selection`: which weights of a model carry levels (policies, tie groups, transposed weights);
- :mod:`.document`: the metadata document (:class:`ELSAMeta`), its schema and its checks;
- :mod:`.encode`: :func:`encode` / :func:`extract` / :class:`Counters` of a state dict;
- :mod:`.file`: the ELSA file on disk (safetensors, shards, index, checksums, atomic writes);
- :mod:`.stream`: the chunked streaming encode of a checkpoint on disk, given its counters or a
  level source (:mod:`elsa_codec.oneshot.stream` supplies magnitude levels);
- :mod:`.pages`: releasing the pages of a memory map once read.
"""
