"""The two kinds of errors.

Wrong arguments or configuration raise ``ValueError`` at the boundary. Bad data is an
outcome: a :class:`QualityError` carries a one-line reason and metadata; the nightly
flow catches it and writes a ``failed`` row. One bad frame never stops a night.
"""
from __future__ import annotations


class QualityError(Exception):
    """A frame (or one detector of it) cannot be measured.

    Parameters
    ----------
    reason
        One line a person can act on, e.g. ``"truncated FITS: ..."``.
    **metadata
        Extra facts for the row or the log (``hdu=3``, ``n_sources=0``...).
    """

    def __init__(self, reason: str, **metadata):
        super().__init__(reason)
        self.reason = " ".join(str(reason).split())  # one line
        self.metadata = metadata


class RunEnvironmentError(Exception):
    """The run itself cannot be done here: an out-root that is not writable or is full.

    Not a fault of the data nor of the configuration; the command line exits with
    :attr:`exit_code` and the one-line message.
    """

    exit_code = 3


class NightLocked(RunEnvironmentError):
    """Another run is processing the same night into the same out-root."""

    exit_code = 4


def exception_text(error: Exception, limit_chars: int = 200) -> str:
    """An exception's message on one line, at most ``limit_chars`` long (its type name
    when it has no message), for a reason a person reads."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:limit_chars]
