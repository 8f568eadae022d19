"""The one exception the converters raise for bad input."""

from __future__ import annotations


class ConversionError(ValueError):
    """A checkpoint could not be converted: missing or unreadable file, unknown layout,
    shape mismatch, missing keys, non-finite values, ...

    The message is one self-contained paragraph naming the file and the problem; the
    command line prints it and exits with status 2.
    """
