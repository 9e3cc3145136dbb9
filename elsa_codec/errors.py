"""Errors raised by elsa-codec."""


class ELSAError(ValueError):
    """Bad input to the codec, the file format, the serving layers or the training procedure.

    The message names the tensor (or module) and what is wrong with it.
    """


class ELSAFormatError(ELSAError):
    """A file that is not a valid ELSA checkpoint: truncated, corrupted, missing or malformed
    metadata, or a format version this library does not know."""
