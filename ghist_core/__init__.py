"""GHIST Studio core: slide I/O, segmentation, expression prediction, cohort analysis.

Everything the app shows is computed here; this package never imports Streamlit.
The public API is re-exported here (imported lazily, so ``import ghist_core`` stays cheap)::

    from ghist_core import open_slide, load_segmenter, load_ghist, predict_slide, Project
"""

from __future__ import annotations

__version__ = "0.1.0"

_PUBLIC = {
    "open_slide": "ghist_core.io.slide",
    "Slide": "ghist_core.io.slide",
    "Project": "ghist_core.project",
    "predict_slide": "ghist_core.pipeline.blocks",
    "load_prediction": "ghist_core.pipeline.blocks",
    "load_segmenter": "ghist_core.segmentation",
    "load_ghist": "ghist_core.model",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'ghist_core' has no attribute {name!r}")
