"""The ``elsa`` command: ``encode``, ``inspect``, ``extract``, ``verify`` (the codec), and the apps
that register a subcommand (``demo``, ``compare``: :mod:`elsa_codec.examples`)."""
from .commands import main

__all__ = ["main"]
