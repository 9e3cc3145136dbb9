"""Errors raised by elsa-codec."""


class ELSAError(ValueError):
    """Bad input to the codec, the file format, the serving layers or the training procedure.

    The message names the tensor (or module) and what is wrong with it.
    """


class ELSAFormatError(ELSAError):
    """A file that is not a valid ELSA checkpoint: truncated, corrupted, missing or malformed
    metadata, or a format version this library does not know."""


class ELSATypeError(ELSAError, TypeError):
    """An argument of the wrong type (a model where a state dict is expected, one string where a
    list is expected, arguments in another order): both an :class:`ELSAError` and a ``TypeError``."""
