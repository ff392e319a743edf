"""Small shared types: the progress callback and what a slide-like object offers.

Why one module: segmenters, ``model.predict`` and the pipeline report progress and read
slides through the same two contracts, so a callback or an in-memory slide written for
one works with all of them. Lowest layer: imports nothing from ``ghist_core``.
"""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import numpy as np

__all__ = ["ProgressCallback", "SlideLike", "ScaledReader"]

#: ``progress(fraction, message)``: ``fraction`` of the work done (0..1), ``message`` a short
#: plain-language note (e.g. "segmented 4 of 12 tiles"). Called by ``segment_slide``,
#: ``model.predict`` and each stage of the pipeline.
ProgressCallback = Callable[[float, str], None]


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
