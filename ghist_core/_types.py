"""Small shared types: the progress callbacks and what a slide-like object offers.

Why one module: segmenters, ``model.predict``, the pipeline's stages and the weights download
report progress and read slides through the same contracts, so a callback or an in-memory
slide written for one works with all of them. Lowest layer: imports nothing from ``ghist_core``.

Two progress shapes, one definition each:

* :data:`ProgressCallback` ``(fraction, message)``: one piece of work (a segmenter's tiles,
  ``model.predict``'s batches, one pipeline stage, ``weights.pull``'s files).
* :data:`ProgressEventCallback` ``(ProgressEvent)``: a whole pipeline run, whose events add
  the stage, the overall fraction and the time left (``predict_slide(progress=...)``, the
  CLI's tqdm bar, the worker). The pipeline builds each event from its stages'
  ``ProgressCallback`` calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import numpy as np

__all__ = ["ProgressCallback", "ProgressEvent", "ProgressEventCallback", "SlideLike", "ScaledReader"]

#: ``progress(fraction, message)``: ``fraction`` of the work done (0..1), ``message`` a short
#: plain-language note (e.g. "segmented 4 of 12 tiles"). Called by ``segment_slide``,
#: ``model.predict`` and each stage of the pipeline.
ProgressCallback = Callable[[float, str], None]


@dataclass
class ProgressEvent:
    """One progress report of a pipeline run.

    ``eta_s`` is the best estimate of the seconds left and ``eta_low_s``/``eta_high_s`` its
    range (``ghist_core.pipeline.eta``: from measured seconds per tissue area, never rising while
    a block runs); all None while there is nothing to go on.
    """

    stage: str
    fraction: float          # within the stage, 0..1
    overall: float           # whole run, 0..1
    message: str = ""
    eta_s: float | None = None
    eta_low_s: float | None = None
    eta_high_s: float | None = None


#: ``progress(event)``: called by ``predict_slide`` for each :class:`ProgressEvent`.
ProgressEventCallback = Callable[[ProgressEvent], None]


@runtime_checkable
class SlideLike(Protocol):
    """What the segmenters and ``model.predict`` need from a slide (``Slide`` and ``ArraySlide`` offer it)."""

    dimensions: tuple[int, int]
    mpp: float

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray: ...


@runtime_checkable
class ScaledReader(Protocol):
    """A slide that resamples itself (``Slide.read_region_mpp``); others are read at level 0 and resized."""

    def read_region_mpp(self, location_xy_level0: tuple[float, float], size_wh_at_target: tuple[int, int],
                        target_mpp: float) -> np.ndarray: ...
