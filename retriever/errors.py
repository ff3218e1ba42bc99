"""Exceptions raised by the retriever.

Every error is a ``RetrieverError`` (a ``ValueError``), so callers at the edge
(the API, the CLI) can catch one type and still show a message that names the
problem.
"""

from __future__ import annotations

__all__ = [
    "ArtifactCorrupted",
    "ArtifactMismatch",
    "DimensionMismatch",
    "EmptyBank",
    "InvalidParameter",
    "InvalidVectors",
    "RetrieverError",
    "UnknownEntries",
    "UnknownVersion",
    "ValidationFailed",
]


class RetrieverError(ValueError):
    """Base class of every retriever error."""


class DimensionMismatch(RetrieverError):
    """Vectors or queries whose dimension differs from the bank's."""


class InvalidVectors(RetrieverError):
    """Vectors that are not a finite, non-zero float matrix of the right shape."""


class InvalidParameter(RetrieverError):
    """A bad argument: k out of range, unknown index kind, bad payload length, ..."""


class EmptyBank(RetrieverError):
    """A search or build over a bank with no (live) entries."""


class UnknownEntries(RetrieverError):
    """Entry ids that the bank never held."""


class ArtifactCorrupted(RetrieverError):
    """A stored artifact that is truncated, altered or inconsistent with its manifest."""


class ArtifactMismatch(ArtifactCorrupted):
    """An intact artifact made by another producer (e.g. a different model checksum)."""


class UnknownVersion(RetrieverError):
    """A version name that the artifact store does not hold."""


class ValidationFailed(RetrieverError):
    """A bank that failed the checks run before it may serve (size, dim, recall)."""
