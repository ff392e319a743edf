"""Nucleus segmentation and classification.

``load_segmenter()`` gives the learned HoVer-Net-style model trained on CoNSeP + MoNuSeg
(bundled weights: ``nuclei-seg-stain``, the stain-robust fine-tune of ``nuclei-seg``; see
``ghist_core.paths.DEFAULT_SEGMENTER``); ``load_segmenter(kind="classical")`` the QuPath-style baseline. Both offer
``segment_tile(rgb, mpp) -> (instances, cells)`` and ``segment_slide(slide, ...) -> cells``.
The learned model also checks the nucleus scale by default (``nucleus_scale="auto"``: where
nuclei look larger than its training nuclei it segments the image shrunk to 2/3);
``segment_tile``'s ``cells.attrs["nucleus_scale"]`` and ``segment_slide``'s column
``nucleus_scale`` say which factor it used.
"""

from __future__ import annotations

from ghist_core.segmentation.classical import ClassicalConfig, ClassicalSegmenter
from ghist_core.segmentation.tiling import ArraySlide, MppWarning

__all__ = ["load_segmenter", "ClassicalSegmenter", "ClassicalConfig", "ArraySlide", "MppWarning"]


def load_segmenter(model_id: str | None = None, device: str = "auto", kind: str = "learned"):
    """The segmenter to use: ``kind="learned"`` (bundled or given weights) or ``"classical"``.

    ``model_id`` may be a path to a ``.safetensors`` file (its JSON card beside it) or a
    weights name in the bundled ``weights/`` folder; ``None`` means ``ghist_core.paths.DEFAULT_SEGMENTER``.
    Raises ``WeightsNotFoundError`` when no learned weights can be found.
    """
    if kind == "classical":
        return ClassicalSegmenter()
    if kind != "learned":
        raise ValueError(f"kind must be 'learned' or 'classical', got {kind!r}")
    from ghist_core.segmentation.model import load_learned_segmenter

    return load_learned_segmenter(model_id, device=device)
