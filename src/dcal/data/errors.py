"""Errors raised while reading datasets from disk."""

from __future__ import annotations


class DatasetFormatError(ValueError):
    """A dataset folder does not match the layout its reader expects.

    Raised at construction time (before any training starts) for a missing index file, a malformed line or an
    image listed in an index but absent on disk. The message names the file and what was expected.
    """
