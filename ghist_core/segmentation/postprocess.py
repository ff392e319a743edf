"""From network maps to an instance map: marker-controlled watershed on the HV gradients.

As in HoVer-Net, the horizontal/vertical maps run from -1 to +1 across each nucleus, so
their derivative is positive inside a nucleus and strongly negative where two nuclei touch
(the map jumps from +1 back to -1). Markers are the nuclear pixels where both derivatives
exceed ``marker_threshold`` (HoVer-Net's "1 - normalised Sobel < 0.4", without the
per-image min-max normalisation, so a tile's result does not depend on its neighbours);
a watershed on the negated derivative grows the markers back to the full mask.
Everything is whole-array scipy/skimage work; nothing loops over nuclei.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import watershed

from ghist_core.segmentation.features import relabel_sequential


@dataclass
class PostProcessConfig:
    """Thresholds at the model's working resolution (areas in µm² so they survive a change of mpp)."""

    np_threshold: float = 0.5
    marker_threshold: float = 0.04  # HV gradient per working px that marks a nucleus interior
    sigma_px: float = 1.0
    min_area_um2: float = 4.0
    min_marker_um2: float = 1.0
    #: a nucleus' type is the argmax of its mean type probabilities times these weights (one per
    #: type; None: unweighted), a class-prior correction chosen on the validation split
    #: (scripts/choose_on_validation.py type-weights); the probabilities themselves are not changed
    type_weights: tuple[float, ...] | None = None
    #: {type: the type it joins}: a merged type is never a nucleus' ``type`` (its probability joins
    #: its target's; its ``prob_<type>`` column stays), e.g. CoNSeP's "other" (docs/DECISIONS.md,
    #: session 17). Read from the card's own ``type_merge`` record, not from its ``postprocess``
    type_merge: dict[str, str] | None = None

    #: the settings a card's ``postprocess`` holds (the merge is recorded apart, with its reason)
    CARD_FIELDS = ("np_threshold", "marker_threshold", "sigma_px", "min_area_um2", "min_marker_um2", "type_weights")

    def to_dict(self) -> dict:
        """The card's ``postprocess``."""
        return {k: v for k, v in asdict(self).items() if k in self.CARD_FIELDS}

    @classmethod
    def from_card(cls, postprocess: dict) -> "PostProcessConfig":
        """From a card's ``postprocess`` (keys it does not hold, such as a merge, are not read from it)."""
        return cls(**{k: v for k, v in postprocess.items() if k in cls.CARD_FIELDS})


def _remove_small(labels: np.ndarray, min_px: int) -> np.ndarray:
    if min_px <= 1 or labels.max() == 0:
        return labels
    area = np.bincount(labels.ravel())
    small = area < min_px
    small[0] = True
    out = labels.copy()
    out[small[labels]] = 0
    return out


def hv_watershed(np_prob: np.ndarray, hv: np.ndarray, mpp: float,
                 config: PostProcessConfig | None = None) -> np.ndarray:
    """Instance map (int32, 1..N) from nuclear probability (H x W) and HV maps (2 x H x W)."""
    c = config or PostProcessConfig()
    fg = np_prob > c.np_threshold
    if not fg.any():
        return np.zeros(np_prob.shape, np.int32)
    px_area = mpp * mpp
    comps, _ = ndi.label(fg)
    comps = _remove_small(comps, int(round(c.min_area_um2 / px_area)))
    fg = comps > 0
    if not fg.any():
        return np.zeros(np_prob.shape, np.int32)
    h = hv[0].astype(np.float32)
    v = hv[1].astype(np.float32)
    dh = ndi.gaussian_filter(h, c.sigma_px, order=(0, 1))  # d h / d x
    dv = ndi.gaussian_filter(v, c.sigma_px, order=(1, 0))  # d v / d y
    inner = np.minimum(dh, dv)
    markers_mask = fg & (inner > c.marker_threshold)
    markers_mask = ndi.binary_opening(markers_mask, structure=ndi.generate_binary_structure(2, 1))
    markers, _ = ndi.label(markers_mask)
    markers = _remove_small(markers, max(1, int(round(c.min_marker_um2 / px_area))))
    inst = watershed(-inner, markers, mask=fg).astype(np.int64)
    # mask components that got no marker (tiny or very elongated) stay as one nucleus each
    orphan = fg & (inst == 0)
    if orphan.any():
        extra, _ = ndi.label(orphan)
        inst = np.where(orphan, extra + inst.max(), inst)
    inst = _remove_small(inst, int(round(c.min_area_um2 / px_area)))
    return relabel_sequential(inst)
