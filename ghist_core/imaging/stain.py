"""H&E stain tools: colour deconvolution, Macenko and Reinhard normalisation, HED jitter.

Why: slides from different labs and scanners differ in colour. Models trained on one
hospital's stain see another's as out of distribution. Normalising every tile to a
reference stain (fit once on a reference image, apply tile by tile) or jittering the
stain during training makes them robust. All maths is vectorised numpy on whole tiles.

This module is the one home of stain maths: the classical segmenter, the HER2ST
baseline features and both training scripts call it. Four optical-density (OD)
conventions are in use, each kept because a bundled model or a recorded benchmark
depends on its exact numbers:

* the studio convention (``rgb_to_od``, ``hed_deconvolve``, ``hed_jitter``, Macenko):
  ``OD = -ln((I + 1) / 256)`` for 8-bit intensities ``I`` (white 255 -> 0, black 0 ->
  ln 256), back ``I = 256 * exp(-OD) - 1``; the +1 keeps black finite and makes the pair
  an exact inverse; unit-length stain vectors;
* ``haematoxylin_od``: ``-log10(max(I, 1) / 255)`` with the published (not unit-length)
  vectors, float32, clipped at 0; the classical segmenter's thresholds are in these units;
* ``hed_deconvolve(rgb, convention="skimage")``: scikit-image's ``rgb2hed`` numbers
  (the HER2ST ridge baseline's colour features);
* ``hed_jitter_torch``: the training-time version on device tensors, ``OD = -ln(max(x, 1/255))``
  for ``x`` in 0..1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import scipy.linalg

if TYPE_CHECKING:
    import torch

__all__ = [
    "RGB_FROM_HED",
    "HED_FROM_RGB",
    "rgb_to_od",
    "od_to_rgb",
    "hed_deconvolve",
    "hed_reconstruct",
    "hed_jitter",
    "hed_jitter_torch",
    "haematoxylin_od",
    "RUIFROK_RGB_FROM_HED",
    "MacenkoNormalizer",
    "ReinhardNormalizer",
    "macenko_stains",
    "macenko_restain",
    "stain_transform_torch",
]

#: Ruifrok & Johnston (2001) stain OD vectors as published (rows: haematoxylin, eosin,
#: DAB; rows not quite unit length): scikit-image's ``rgb_from_hed``.
RUIFROK_RGB_FROM_HED = np.array(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64
)
# scipy's inverse, as scikit-image computes it (numpy's differs in the last bit of float64)
_RUIFROK_HED_FROM_RGB = scipy.linalg.inv(RUIFROK_RGB_FROM_HED)
#: The same vectors normalised to unit length (the studio convention).
RGB_FROM_HED = RUIFROK_RGB_FROM_HED / np.linalg.norm(RUIFROK_RGB_FROM_HED, axis=1, keepdims=True)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)


def _as_float_image(rgb: np.ndarray) -> tuple[np.ndarray, bool]:
    """(float64 image in 0..255, was_uint8). Accepts uint8 or float in [0, 1]."""
    a = np.asarray(rgb)
    if a.shape[-1] != 3:
        raise ValueError(f"expected an RGB image with 3 channels last, got shape {a.shape}")
    if a.dtype == np.uint8:
        return a.astype(np.float64), True
    if np.issubdtype(a.dtype, np.floating):
        return np.clip(a.astype(np.float64), 0.0, 1.0) * 255.0, False
    raise ValueError(f"expected uint8 (0..255) or float (0..1) RGB, got dtype {a.dtype}")


def rgb_to_od(rgb: np.ndarray) -> np.ndarray:
    """Optical density ``-ln((I + 1) / 256)`` of an RGB image (uint8 or float 0..1)."""
    f, _ = _as_float_image(rgb)
    return -np.log((f + 1.0) / 256.0)


def od_to_rgb(od: np.ndarray) -> np.ndarray:
    """uint8 RGB from optical density (inverse of :func:`rgb_to_od`, clipped to 0..255)."""
    return np.clip(np.rint(256.0 * np.exp(-od) - 1.0), 0, 255).astype(np.uint8)


def hed_deconvolve(rgb: np.ndarray, *, convention: str = "studio") -> np.ndarray:
    """Haematoxylin, eosin, DAB concentrations (H x W x 3 float64) by colour deconvolution.

    ``convention="studio"`` (default): natural-log OD of ``(I + 1) / 256`` and unit stain
    vectors, not clipped at zero, so :func:`hed_reconstruct` inverts it exactly (up to uint8
    rounding). ``convention="skimage"``: the numbers of ``skimage.color.rgb2hed`` (OD scaled
    by ``-ln(1e-6)``, published vectors, clipped at zero), which the HER2ST baseline uses.
    """
    if convention == "studio":
        return rgb_to_od(rgb) @ HED_FROM_RGB
    if convention == "skimage":
        f, _ = _as_float_image(rgb)
        f = np.maximum(f * (1.0 / 255.0), 1e-6)
        return np.maximum((np.log(f) / np.log(1e-6)) @ _RUIFROK_HED_FROM_RGB, 0.0)
    raise ValueError(f"convention must be 'studio' or 'skimage', got {convention!r}")


def haematoxylin_od(rgb: np.ndarray) -> np.ndarray:
    """Haematoxylin optical density (float32 H x W, >= 0): the classical segmenter's input.

    log10 OD of ``max(I, 1) / 255`` with the published Ruifrok & Johnston vectors, in
    float32: the segmenter's thresholds (e.g. its 0.08 floor) are in exactly these units,
    so this convention must not follow changes to the studio one.
    """
    od = -np.log10(np.maximum(rgb.astype(np.float32), 1.0) / 255.0)
    h = od @ _RUIFROK_HED_FROM_RGB[:, 0].astype(np.float32)
    return np.maximum(h, 0.0)


def hed_reconstruct(hed: np.ndarray) -> np.ndarray:
    """uint8 RGB from HED concentrations (inverse of :func:`hed_deconvolve`)."""
    return od_to_rgb(np.asarray(hed, dtype=np.float64) @ RGB_FROM_HED)


def hed_jitter(
    rgb: np.ndarray,
    sigma: float = 0.05,
    bias: float = 0.05,
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """Random stain augmentation in HED space (Tellez et al., 2018).

    Each stain channel ``c`` becomes ``c * a + b`` with ``a ~ U(1 - sigma, 1 + sigma)``
    and ``b ~ U(-bias, bias)``, drawn once per image. ``rgb`` is one image (H x W x 3)
    or a batch (N x H x W x 3, one draw per image); uint8 in -> uint8 out, float (0..1)
    in -> float32 (0..1) out. ``sigma = bias = 0`` returns the input unchanged.
    """
    rng = np.random.default_rng(rng)
    a = np.asarray(rgb)
    if sigma == 0 and bias == 0:
        return a.copy()
    single = a.ndim == 3
    batch = a[None] if single else a
    if batch.ndim != 4:
        raise ValueError(f"expected H x W x 3 or N x H x W x 3, got shape {a.shape}")
    n = batch.shape[0]
    alpha = rng.uniform(1.0 - sigma, 1.0 + sigma, size=(n, 1, 1, 3))
    beta = rng.uniform(-bias, bias, size=(n, 1, 1, 3))
    out = hed_reconstruct(hed_deconvolve(batch) * alpha + beta)
    if a.dtype != np.uint8:
        out = out.astype(np.float32) / 255.0
    return out[0] if single else out


def hed_jitter_torch(x: "torch.Tensor", alpha: "torch.Tensor", beta: "torch.Tensor", *,
                     unit_vectors: bool = False) -> "torch.Tensor":
    """HED stain jitter of a device batch for training: ``c * alpha + beta`` per stain channel.

    ``x``: float (B, 3, H, W) RGB in 0..1; ``alpha``, ``beta``: (B, 3) per-image factors (the
    caller draws them from its own generator, so its random stream is unchanged). OD is
    ``-ln(max(x, 1/255))``; ``unit_vectors`` picks unit-length stain vectors (the
    segmentation trainer) or the published ones (the GHIST trainer). Returns ``exp(-OD)``,
    not clipped (callers apply colour jitter and clip once at the end).
    """
    import torch  # only training needs it; keep this module light

    m = RGB_FROM_HED if unit_vectors else RUIFROK_RGB_FROM_HED
    fwd = torch.as_tensor(m, dtype=torch.float32, device=x.device)
    inv = torch.as_tensor(_RUIFROK_HED_FROM_RGB if not unit_vectors else HED_FROM_RGB, dtype=torch.float32, device=x.device)
    b = x.shape[0]
    od = -torch.log(x.clamp(min=1 / 255.0)).permute(0, 2, 3, 1)
    hed = od @ inv
    od = (hed * alpha.reshape(b, 1, 1, 3) + beta.reshape(b, 1, 1, 3)) @ fwd
    return torch.exp(-od).permute(0, 3, 1, 2)


# --------------------------------------------------------------------------- Macenko
def _tissue_od(rgb: np.ndarray, od_threshold: float) -> np.ndarray:
    """N x 3 OD of pixels whose every channel has OD >= threshold (i.e. not glass)."""
    od = rgb_to_od(rgb).reshape(-1, 3)
    return od[np.all(od >= od_threshold, axis=1)]


@dataclass
class _MacenkoFit:
    stain_matrix: np.ndarray  # 2 x 3, rows H and E, unit OD vectors
    max_concentrations: np.ndarray  # (2,)


def _macenko_fit(od: np.ndarray, alpha: float) -> _MacenkoFit:
    """Macenko et al. (2009): stain vectors from the extreme angles in the OD plane."""
    cov = np.cov(od, rowvar=False)
    _, vecs = np.linalg.eigh(cov)  # ascending eigenvalues
    plane = vecs[:, [2, 1]]  # two largest
    plane = plane * np.where(plane.sum(axis=0) < 0, -1.0, 1.0)  # point into positive OD
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [alpha, 100.0 - alpha])
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    # haematoxylin absorbs more red than eosin does (it looks blue/purple)
    h, e = (v1, v2) if v1[0] > v2[0] else (v2, v1)
    stains = np.stack([h, e])
    stains = stains / np.linalg.norm(stains, axis=1, keepdims=True)
    conc = od @ np.linalg.pinv(stains)  # N x 2 least squares
    max_c = np.percentile(conc, 99, axis=0)
    return _MacenkoFit(stains, np.maximum(max_c, 1e-6))


def _fit_pooled(images, od_threshold: float, alpha: float, min_pixels: int) -> _MacenkoFit | None:
    """Macenko fit of the tissue pixels of ``images`` pooled; None when fewer than ``min_pixels``."""
    od = np.concatenate([_tissue_od(np.asarray(im), od_threshold) for im in images]) if images else np.zeros((0, 3))
    return _macenko_fit(od, alpha) if od.shape[0] >= min_pixels else None


class MacenkoNormalizer:
    """Macenko stain normalisation: fit on a reference image, transform tiles.

    Parameters
    ----------
    od_threshold
        Pixels with OD below this in any channel count as glass and are ignored.
    alpha
        Percentile of the angle distribution taken as the extreme stain directions.
    min_pixels
        A tile with fewer tissue pixels than this is returned unchanged (it is glass).

    Attributes
    ----------
    stain_matrix_ : (2, 3) unit OD vectors of haematoxylin (row 0) and eosin (row 1).
    max_concentrations_ : (2,) 99th-percentile stain concentrations of the reference.
    """

    def __init__(self, od_threshold: float = 0.15, alpha: float = 1.0, min_pixels: int = 100) -> None:
        self.od_threshold = od_threshold
        self.alpha = alpha
        self.min_pixels = min_pixels

    def __repr__(self) -> str:
        state = "fitted" if hasattr(self, "stain_matrix_") else "not fitted"
        return f"<MacenkoNormalizer {state}, od_threshold={self.od_threshold}, alpha={self.alpha}>"

    def _fit_image(self, rgb: np.ndarray) -> _MacenkoFit | None:
        return _fit_pooled([rgb], self.od_threshold, self.alpha, self.min_pixels)

    def fit(self, reference_rgb: np.ndarray) -> "MacenkoNormalizer":
        """Learn the reference's stain vectors and concentration scale; returns self."""
        got = self._fit_image(reference_rgb)
        if got is None:
            raise ValueError("The reference image has too little stained tissue to fit stain vectors.")
        self.stain_matrix_ = got.stain_matrix
        self.max_concentrations_ = got.max_concentrations
        return self

    def concentrations(self, rgb: np.ndarray) -> np.ndarray:
        """H x W x 2 haematoxylin/eosin concentrations of ``rgb`` under the fitted stain vectors."""
        if not hasattr(self, "stain_matrix_"):
            raise RuntimeError("MacenkoNormalizer.concentrations called before fit()")
        od = rgb_to_od(rgb)
        return od @ np.linalg.pinv(self.stain_matrix_)

    def transform(self, tile: np.ndarray) -> np.ndarray:
        """``tile`` (uint8 H x W x 3) recoloured to the reference stain; uint8 out."""
        if not hasattr(self, "stain_matrix_"):
            raise RuntimeError("MacenkoNormalizer.transform called before fit()")
        got = self._fit_image(tile)
        a = np.asarray(tile)
        if got is None:
            return a.astype(np.uint8, copy=True)
        od = rgb_to_od(a).reshape(-1, 3)
        conc = od @ np.linalg.pinv(got.stain_matrix)
        conc *= self.max_concentrations_ / got.max_concentrations
        return od_to_rgb(conc @ self.stain_matrix_).reshape(a.shape)


# --------------------------------------------------------------------------- Reinhard
# Reinhard et al. (2001) l-alpha-beta colour space: decorrelated channels where matching
# the mean and spread per channel transfers the colour "feel" of one image to another.
_RGB2LMS = np.array([[0.3811, 0.5783, 0.0402], [0.1967, 0.7244, 0.0782], [0.0241, 0.1288, 0.8444]])
_LMS2LAB = np.diag([1 / np.sqrt(3), 1 / np.sqrt(6), 1 / np.sqrt(2)]) @ np.array(
    [[1, 1, 1], [1, 1, -2], [1, -1, 0]], dtype=np.float64
)
_LAB2LMS = np.linalg.inv(_LMS2LAB)
_LMS2RGB = np.linalg.inv(_RGB2LMS)


def _rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    f, _ = _as_float_image(rgb)
    lms = np.log10(np.maximum(f @ _RGB2LMS.T, 1.0))  # 1.0 floor: log of black stays finite
    return lms @ _LMS2LAB.T


def _lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    lms = 10.0 ** (lab @ _LAB2LMS.T)
    return np.clip(np.rint(lms @ _LMS2RGB.T), 0, 255).astype(np.uint8)


class ReinhardNormalizer:
    """Reinhard colour transfer: match per-channel mean and std in l-alpha-beta space.

    Attributes
    ----------
    target_means_ : (3,) mean of the reference's l, alpha, beta channels.
    target_stds_ : (3,) standard deviation of the same.
    """

    def __repr__(self) -> str:
        state = "fitted" if hasattr(self, "target_means_") else "not fitted"
        return f"<ReinhardNormalizer {state}>"

    @staticmethod
    def _stats(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lab = _rgb_to_lab(rgb).reshape(-1, 3)
        return lab.mean(axis=0), np.maximum(lab.std(axis=0), 1e-6)

    def fit(self, reference_rgb: np.ndarray) -> "ReinhardNormalizer":
        """Learn the reference's l-alpha-beta means and stds; returns self."""
        self.target_means_, self.target_stds_ = self._stats(reference_rgb)
        return self

    def transform(self, tile: np.ndarray) -> np.ndarray:
        """``tile`` recoloured so its l-alpha-beta statistics match the reference; uint8 out."""
        if not hasattr(self, "target_means_"):
            raise RuntimeError("ReinhardNormalizer.transform called before fit()")
        lab = _rgb_to_lab(tile)
        mu = lab.reshape(-1, 3).mean(axis=0)
        sd = np.maximum(lab.reshape(-1, 3).std(axis=0), 1e-6)
        return _lab_to_rgb((lab - mu) / sd * self.target_stds_ + self.target_means_)


# --------------------------------------------------------------------------- stain matrices
# (appended for issue #16: stain bank, re-staining augmentation and the stain-shift benchmark)
def macenko_stains(
    rgb: np.ndarray | list[np.ndarray], *, od_threshold: float = 0.15, alpha: float = 1.0, min_pixels: int = 100
) -> tuple[np.ndarray, np.ndarray]:
    """``(stain_matrix (2, 3), max_concentrations (2,))`` of an H&E image by Macenko's method.

    The same estimate :class:`MacenkoNormalizer` fits. ``rgb`` may also be a list of images
    (the patches of one slide): their tissue pixels are pooled into one estimate, since a
    lab's stain belongs to the whole slide and a small patch holds too little of both stains
    for a stable fit. Raises ``ValueError`` when there are fewer than ``min_pixels`` stained
    (non-glass) pixels.
    """
    got = _fit_pooled(rgb if isinstance(rgb, (list, tuple)) else [rgb], od_threshold, alpha, min_pixels)
    if got is None:
        raise ValueError("The image has too little stained tissue to estimate stain vectors.")
    return got.stain_matrix, got.max_concentrations


def macenko_restain(
    rgb: np.ndarray, stain_matrix: np.ndarray, max_concentrations: np.ndarray, *,
    source: tuple[np.ndarray, np.ndarray] | None = None, keep_residual: bool = False, **fit_kw
) -> np.ndarray:
    """``rgb`` (uint8) re-stained to a given stain matrix and concentration scale (uint8 out).

    The image's own stains (``source``: ``(stain_matrix, max_concentrations)`` as
    :func:`macenko_stains` gives, e.g. fitted once on the whole slide; default: estimated on
    ``rgb`` itself) give its concentrations, which are scaled to ``max_concentrations`` and
    recomposed with ``stain_matrix``. ``keep_residual`` adds back the part of the optical
    density the two stain vectors do not explain (scanner tint, pigment, a third dye), which
    a change of H&E stain leaves as it is; without it that part is dropped, so even a
    re-staining to the image's own stains changes it. Glass (too few stained pixels) is
    returned unchanged when the stains are estimated here; ``fit_kw`` (``MacenkoNormalizer``'s
    settings) only matter then.
    """
    a = np.asarray(rgb)
    if source is None:
        got = MacenkoNormalizer(**fit_kw)._fit_image(a)
        if got is None:
            return a.astype(np.uint8, copy=True)
        src, src_max = got.stain_matrix, got.max_concentrations
    else:
        src, src_max = (np.asarray(v, dtype=np.float64) for v in source)
    od = rgb_to_od(a).reshape(-1, 3)
    conc = od @ np.linalg.pinv(src)
    new_od = (conc * (np.asarray(max_concentrations, dtype=np.float64) / src_max)) @ np.asarray(
        stain_matrix, dtype=np.float64)
    if keep_residual:
        new_od += od - conc @ src
    return od_to_rgb(new_od).reshape(a.shape)


def stain_transform_torch(x, source_matrix, target_matrix, scale=None, bias=None, *, keep_residual: bool = False):
    """Batched re-staining in torch: concentrations under ``source_matrix``, ``* scale + bias``,
    recomposed with ``target_matrix``.

    ``x``: B x 3 x H x W float in 0..1 (any device); matrices: (k, 3) or (B, k, 3) OD vectors
    of k stains (k = 2 Macenko H/E, k = 3 HED); ``scale``/``bias``: (k,) or (B, k) or None.
    Same OD convention as :func:`rgb_to_od` (``x * 255`` as 8-bit intensity). Macenko
    re-staining is ``scale = target_max / source_max``; HED jitter (Tellez) is
    ``source = target = RGB_FROM_HED`` with a random per-image scale and bias. ``keep_residual``
    adds back the OD the ``k`` source stains do not explain (as :func:`macenko_restain`; only
    meaningful for k < 3). Float out, 0..1.
    """
    import torch

    b = x.shape[0]
    dev, dt = x.device, torch.float32
    src = torch.as_tensor(np.array(source_matrix) if not torch.is_tensor(source_matrix) else source_matrix,
                          dtype=dt, device=dev)
    tgt = torch.as_tensor(np.array(target_matrix) if not torch.is_tensor(target_matrix) else target_matrix,
                          dtype=dt, device=dev)
    src = src.expand(b, *src.shape[-2:]) if src.ndim == 2 else src
    tgt = tgt.expand(b, *tgt.shape[-2:]) if tgt.ndim == 2 else tgt
    od = -torch.log((x.float().clamp(0, 1) * 255.0 + 1.0) / 256.0)  # B x 3 x H x W
    conc0 = torch.einsum("bchw,bck->bkhw", od, torch.linalg.pinv(src))  # pinv: B x 3 x k
    k = src.shape[-2]
    conc = conc0
    if scale is not None:
        conc = conc * torch.as_tensor(np.array(scale), dtype=dt, device=dev).reshape(-1, k, 1, 1)
    if bias is not None:
        conc = conc + torch.as_tensor(np.array(bias), dtype=dt, device=dev).reshape(-1, k, 1, 1)
    od2 = torch.einsum("bkhw,bkc->bchw", conc, tgt)
    if keep_residual:
        od2 = od2 + od - torch.einsum("bkhw,bkc->bchw", conc0, src)
    return ((256.0 * torch.exp(-od2) - 1.0) / 255.0).clamp(0, 1)
