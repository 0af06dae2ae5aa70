"""Figures drawn straight to files, for reports, the LR range test and the studies alike: each a
matplotlib Figure with an Agg canvas of its own, so no display and no pyplot state are involved
(pyplot's global figure list would keep every figure of a long report alive)."""

from __future__ import annotations

import math
from collections.abc import Iterable

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def figure(ncols: int = 1, nrows: int = 1, width: float = 5.0, height: float = 3.6):
    """A figure and its axes as a (nrows, ncols) array, one panel of ``width`` x ``height`` inches each."""
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def clamp_top(ax, values: Iterable[float], factor: float = 2.0) -> None:
    """End the y axis at ``factor`` times the largest finite of ``values``: a diverging loss can
    reach 1e30, and the curve up to that point is what matters."""
    finite = [v for v in values if math.isfinite(v)]
    if finite:
        ax.set_ylim(top=factor * max(finite))
