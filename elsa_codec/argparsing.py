"""The argument parser of every ``elsa`` subcommand and example: one-line errors, exit status 2.

Used by :mod:`elsa_codec.cli` and by the apps it dispatches to (:mod:`elsa_codec.examples`), which
sit above and below it in the layers; so it lives here, beside :mod:`elsa_codec.errors`.
"""
from __future__ import annotations

import argparse

__all__ = ["Parser"]


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``elsa encode: error: ...``, exit 2), no usage block.

    Example::

        >>> p = Parser(prog="elsa demo")
        >>> _ = p.add_argument("--levels")
        >>> p.parse_args(["--levels", "0.9"]).levels
        '0.9'
    """

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
