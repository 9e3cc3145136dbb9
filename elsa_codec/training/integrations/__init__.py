"""Optional integrations of :class:`elsa_codec.LevelEmbedder` with training frameworks.

- :mod:`elsa_codec.training.integrations.transformers`: ``ELSATrainerCallback`` for the Hugging Face
  ``Trainer`` (``pip install elsa-codec[hf]``);
- :mod:`elsa_codec.training.integrations.lightning`: ``ELSALightningCallback`` for Lightning
  (``pip install elsa-codec[lightning]``).

Importing this package imports neither framework; each submodule imports its own.
"""
