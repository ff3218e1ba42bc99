"""FAISS memory bank, index factory and versioned artifact store (numpy + faiss only).

- ``index``: ``IndexSpec``, ``build_index``, ``search`` (exact / IVF-Flat / IVF-PQ / HNSW, GPU when seen)
- ``bank``: ``MemoryBank`` with exclusions, quality flags, MMR, add / remove
- ``store``: ``ArtifactStore`` (versioned, checksummed, atomic ``current`` pointer)
- ``holder``: ``BankHolder`` and ``validate_bank`` for swaps under live traffic
"""

from retriever.bank import MemoryBank, SearchResult
from retriever.errors import (
    ArtifactCorrupted,
    ArtifactMismatch,
    DimensionMismatch,
    EmptyBank,
    InvalidParameter,
    InvalidVectors,
    RetrieverError,
    UnknownEntries,
    UnknownVersion,
    ValidationFailed,
)
from retriever.holder import BankHolder, validate_bank
from retriever.index import BuiltIndex, IndexSpec, build_index, normalize, search
from retriever.store import ArtifactStore

__all__ = [
    "ArtifactCorrupted",
    "ArtifactMismatch",
    "ArtifactStore",
    "BankHolder",
    "BuiltIndex",
    "DimensionMismatch",
    "EmptyBank",
    "IndexSpec",
    "InvalidParameter",
    "InvalidVectors",
    "MemoryBank",
    "RetrieverError",
    "SearchResult",
    "UnknownEntries",
    "UnknownVersion",
    "ValidationFailed",
    "build_index",
    "normalize",
    "search",
    "validate_bank",
]
