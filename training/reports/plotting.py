"""What both reports share: their errors and the lazy matplotlib import (the ``report`` extra)."""

from __future__ import annotations

from typing import Any


class ReportError(ValueError):
    """A run folder's files are present but cannot be read as a run (corrupt, empty, wrong shape)."""


class ReportFileNotFoundError(FileNotFoundError):
    """The run folder or its ``metrics.jsonl`` does not exist."""


class ReportDependencyError(ImportError):
    """matplotlib (the ``report`` extra) is not installed."""


def _matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        raise ReportDependencyError(
            "ragrec report needs matplotlib, which is in the 'report' extra: "
            "pip install 'ragrec[report]' (or pip install matplotlib)") from e
    matplotlib.use("Agg")  # files only, never a window
    return matplotlib


def figure_class() -> Any:
    """matplotlib's ``Figure`` (no pyplot state); ReportDependencyError without matplotlib."""
    _matplotlib()
    from matplotlib.figure import Figure

    return Figure


def pyplot() -> Any:
    _matplotlib()
    import matplotlib.pyplot as plt

    return plt
