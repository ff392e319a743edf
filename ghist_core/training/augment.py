"""Stain-robust augmentation for nucleus segmentation training (issue #16).

One seeded, batched, device-agnostic (torch) augmentation of ``(image, instance map, type
map)`` samples, in two parts that never mix:

* **geometric** (:meth:`SegAugment.geometric`): the 8 symmetries of the square and scale
  jitter around the working µm/px (zoom, log-uniform, with a random shift). Every geometric
  step uses one sampling grid for the image (bilinear; outside the image is white glass)
  and for the instance and type maps (nearest; outside is background 0), so they stay
  aligned. HV targets are *recomputed* from the augmented instance map
  (``segmentation_data.hv_targets``), never transformed: flips change their signs.
* **colour** (:meth:`SegAugment.colour`): Macenko re-staining towards a random member of the
  stain bank (``weights/stain_bank.json``, role ``"train"``) at a random intensity, optionally
  towards a random stain sampled near the source stains (``p_stain_sample``), HED-space
  jitter (per-stain scale and shift, Tellez et al. 2018), brightness / contrast /
  saturation / hue, Gaussian blur and JPEG artefacts. Masks are untouched.

All stain maths is ``ghist_core.imaging.stain`` (``stain_transform_torch`` for re-staining,
``hed_jitter_torch`` for HED jitter). Images are
B x 3 x H x W float in 0..1, instance maps B x H x W integer, type maps B x H x W integer.

    aug = SegAugment()                                  # defaults below, bundled stain bank
    x, inst, types = aug(x, inst, types, np.random.default_rng(0))
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ghist_core.imaging.stain import hed_jitter_torch, stain_transform_torch
from ghist_core.training.stain_bank import StainBank, load_stain_bank

__all__ = ["AugmentConfig", "SegAugment", "augment_sample", "sample_stains"]


@dataclass
class AugmentConfig:
    """Probabilities and ranges; ``AugmentConfig.off()`` disables everything."""

    symmetries: bool = True                 # the 8 flips / 90° rotations
    p_scale: float = 0.5
    scale_range: tuple[float, float] = (0.8, 1.25)  # zoom factor (>1 magnifies), log-uniform
    p_restain: float = 0.5                  # Macenko re-staining to a bank member
    restain_intensity: tuple[float, float] = (0.6, 1.5)  # x the member's max concentrations
    p_hed: float = 0.8
    hed_sigma: float = 0.1                  # per-stain scale ~ U(1 - s, 1 + s)
    hed_bias: float = 0.03                  # per-stain shift ~ U(-b, b) (OD units)
    p_colour: float = 0.8
    brightness: float = 0.08                # + U(-b, b)
    contrast: float = 0.15                  # x U(1 - c, 1 + c) about the image mean
    saturation: float = 0.25                # x U(1 - s, 1 + s) about the luminance
    hue: float = 0.03                       # rotation, fraction of a full turn
    p_blur: float = 0.2
    blur_sigma: tuple[float, float] = (0.3, 1.2)  # px at the working resolution
    p_jpeg: float = 0.25
    jpeg_quality: tuple[int, int] = (35, 90)
    # sampled stains (preset "wide"; off by default so the recorded "stain" runs stay as they were):
    # re-staining to a random stain near the source stains (the images' own when the caller gives
    # them, else the bank's training reference), not only to the bank's few training stains
    p_stain_sample: float = 0.0
    stain_angle_deg: float = 20.0           # each stain vector turned by U(0, a) degrees, random direction
    stain_intensity: tuple[float, float] = (0.4, 2.5)  # x each stain's concentration, log-uniform, per stain

    @classmethod
    def off(cls, **on) -> "AugmentConfig":
        """Everything off, then ``on`` (e.g. ``AugmentConfig.off(p_scale=1.0)``)."""
        base = dict(symmetries=False, p_scale=0.0, p_restain=0.0, p_hed=0.0, p_colour=0.0, p_blur=0.0, p_jpeg=0.0)
        return cls(**{**base, **on})

    @classmethod
    def preset(cls, name: str) -> "AugmentConfig":
        """The named configurations of ``train_segmentation.py --augment`` (the batch sampler
        applies the 8 symmetries, so they are off here): ``"stain"`` (bank re-staining, HED,
        colour, blur, JPEG, scale x 0.8-1.25; the bundled ``nuclei-seg-stain``) and ``"wide"``
        (the same plus stains sampled near the source stains: vectors turned up to 20°, each
        stain's amount x 0.4-2.5;
        and nuclei from 0.67x to 2x their size, for large tumour nuclei and a mis-stated µm/px;
        spans set as physically plausible before any run, not from a benchmark)."""
        if name == "stain":
            return cls(symmetries=False)
        if name == "wide":
            return cls(symmetries=False, p_stain_sample=0.5, scale_range=(0.67, 2.0))
        raise ValueError(f"unknown augmentation preset {name!r}; choose 'stain' or 'wide'")

    def to_dict(self) -> dict:
        return asdict(self)


def sample_stains(matrix: np.ndarray, rng: np.random.Generator, n: int, max_angle_deg: float) -> np.ndarray:
    """``n`` stain matrices (n x k x 3) near ``matrix`` (k x 3 unit OD vectors, or n x k x 3, one per
    sample): each vector turned by an angle ~ U(0, max_angle_deg) towards a random direction
    perpendicular to it, then kept in the positive OD octant (a dye absorbs, it never adds light)
    and renormalised."""
    m = np.broadcast_to(np.asarray(matrix, dtype=np.float64), (n,) + np.shape(matrix)[-2:])
    k = m.shape[1]
    d = rng.normal(size=(n, k, 3))
    d -= np.sum(d * m, axis=-1, keepdims=True) * m  # perpendicular to each vector
    d /= np.maximum(np.linalg.norm(d, axis=-1, keepdims=True), 1e-12)
    ang = np.deg2rad(rng.uniform(0.0, max_angle_deg, size=(n, k, 1)))
    out = np.cos(ang) * m + np.sin(ang) * d
    out = np.maximum(out, 1e-3)
    return out / np.linalg.norm(out, axis=-1, keepdims=True)


def _pick(rng: np.random.Generator, b: int, p: float) -> np.ndarray:
    return np.flatnonzero(rng.random(b) < p) if p > 0 else np.zeros(0, int)


class SegAugment:
    """Seeded augmentation of training batches (see the module docstring).

    Parameters
    ----------
    config
        :class:`AugmentConfig`.
    bank
        Stain bank; ``None`` loads the bundled one. Only members with role ``"train"`` are
        re-staining targets (``"benchmark"`` members stay unseen by training).
    """

    def __init__(self, config: AugmentConfig | None = None, bank: StainBank | None = None) -> None:
        self.config = config or AugmentConfig()
        if bank is None and (self.config.p_restain > 0 or self.config.p_stain_sample > 0):
            bank = load_stain_bank()
        self.bank = bank
        if bank is not None:
            self.targets_, self.targets_max_ = bank.arrays("train")
            self.reference_ = (bank.reference.matrix, bank.reference.max_c)

    def __repr__(self) -> str:
        n = 0 if self.bank is None else len(self.targets_)
        return f"<SegAugment {n} bank stains, {self.config}>"

    def __call__(self, x: torch.Tensor, inst: torch.Tensor, types: torch.Tensor | None, rng: np.random.Generator,
                 *, source_stains: tuple[np.ndarray, np.ndarray] | None = None):
        """Geometric then colour augmentation; returns ``(x, inst, types)``.

        ``source_stains``: optional per-sample (B x 2 x 3 matrices, B x 2 max concentrations)
        of the images' own stains (e.g. their tiles' bank members); default: the training
        reference of the bank.
        """
        x, inst, types = self.geometric(x, inst, types, rng)
        return self.colour(x, rng, source_stains=source_stains), inst, types

    # --- geometry -------------------------------------------------------------------------
    def geometric(self, x: torch.Tensor, inst: torch.Tensor, types: torch.Tensor | None, rng: np.random.Generator):
        """Symmetries and zoom, applied with the same grid to image, instances and types."""
        c = self.config
        b, _, h, w = x.shape
        x, inst = x.clone(), inst.clone()
        types = None if types is None else types.clone()
        if c.symmetries:
            t = rng.integers(0, 8, size=b)
            if h != w:  # a quarter turn would change the shape: only 180° turns and flips
                t = t % 2 + 4 * (t // 2 % 2)
            for k in np.unique(t):
                idx = torch.from_numpy(np.flatnonzero(t == k)).to(x.device)
                for a in (x, inst) + (() if types is None else (types,)):
                    v = torch.rot90(a[idx], int(k) // 2, dims=(-2, -1))
                    a[idx] = torch.flip(v, dims=(-1,)) if k % 2 else v
        sel = _pick(rng, b, c.p_scale)
        if len(sel) and c.scale_range != (1.0, 1.0):
            lo, hi = np.log(c.scale_range[0]), np.log(c.scale_range[1])
            zoom = np.exp(rng.uniform(lo, hi, size=len(sel)))
            room = np.maximum(0.0, 1.0 - 1.0 / zoom)  # how far the window may move (zoom in)
            shift = rng.uniform(-1, 1, size=(len(sel), 2)) * room[:, None]
            theta = np.zeros((len(sel), 2, 3), np.float32)
            theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / zoom
            theta[:, :, 2] = shift
            grid = F.affine_grid(torch.from_numpy(theta).to(x.device), [len(sel), 1, h, w], align_corners=False)
            idx = torch.from_numpy(sel).to(x.device)
            # bilinear inside (border-clamped, so edge pixels are not mixed with glass) and white
            # exactly where the nearest-neighbour masks fall outside the image
            inside = F.grid_sample(torch.ones_like(x[idx, :1]).float(), grid, mode="nearest", padding_mode="zeros",
                                   align_corners=False) > 0.5
            moved = F.grid_sample(x[idx].float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
            x[idx] = torch.where(inside, moved, torch.ones_like(moved)).to(x.dtype)
            for a in (inst,) + (() if types is None else (types,)):
                a[idx] = F.grid_sample(a[idx].float()[:, None], grid, mode="nearest", padding_mode="zeros",
                                       align_corners=False)[:, 0].round().to(a.dtype)
        return x, inst, types

    # --- colour ---------------------------------------------------------------------------
    def colour(self, x: torch.Tensor, rng: np.random.Generator, *,
               source_stains: tuple[np.ndarray, np.ndarray] | None = None) -> torch.Tensor:
        """Stain, colour, blur and JPEG changes of the image only (float 0..1 out)."""
        c = self.config
        b = x.shape[0]
        x = x.float().clone()
        sel = _pick(rng, b, c.p_restain) if self.bank is not None else np.zeros(0, int)
        if len(sel):
            k = rng.integers(0, len(self.targets_), size=len(sel))
            tgt, tgt_max = self.targets_[k], self.targets_max_[k] * rng.uniform(*c.restain_intensity, (len(sel), 1))
            src, src_max = self._source(sel, source_stains)
            idx = torch.from_numpy(sel).to(x.device)
            x[idx] = stain_transform_torch(x[idx], src, tgt, scale=tgt_max / src_max)
        sel = _pick(rng, b, c.p_stain_sample) if self.bank is not None else np.zeros(0, int)
        if len(sel):  # a random stain near the source's; what the two stains do not explain is kept
            src, _ = self._source(sel, source_stains)
            tgt = sample_stains(src, rng, len(sel), c.stain_angle_deg)
            lo, hi = np.log(c.stain_intensity[0]), np.log(c.stain_intensity[1])
            scale = np.exp(rng.uniform(lo, hi, (len(sel), 2)))
            idx = torch.from_numpy(sel).to(x.device)
            x[idx] = stain_transform_torch(x[idx], src, tgt, scale=scale, keep_residual=True)
        sel = _pick(rng, b, c.p_hed)
        if len(sel):
            alpha = torch.from_numpy(rng.uniform(1 - c.hed_sigma, 1 + c.hed_sigma, (len(sel), 3))).float().to(x.device)
            beta = torch.from_numpy(rng.uniform(-c.hed_bias, c.hed_bias, (len(sel), 3))).float().to(x.device)
            idx = torch.from_numpy(sel).to(x.device)
            x[idx] = hed_jitter_torch(x[idx], alpha, beta, unit_vectors=True).clamp(0, 1)
        sel = _pick(rng, b, c.p_colour)
        if len(sel):
            idx = torch.from_numpy(sel).to(x.device)
            x[idx] = self._colour_jitter(x[idx], rng)
        sel = _pick(rng, b, c.p_blur)
        if len(sel):
            idx = torch.from_numpy(sel).to(x.device)
            x[idx] = _gaussian_blur(x[idx], rng.uniform(*c.blur_sigma, size=len(sel)))
        sel = _pick(rng, b, c.p_jpeg)
        if len(sel):
            q = rng.integers(c.jpeg_quality[0], c.jpeg_quality[1] + 1, size=len(sel))
            idx = torch.from_numpy(sel).to(x.device)
            x[idx] = _jpeg(x[idx], q)
        return x.clamp_(0, 1)

    def _source(self, sel: np.ndarray, source_stains) -> tuple[np.ndarray, np.ndarray]:
        """The stains (matrices, max concentrations) of the images ``sel`` are decomposed with: the
        caller's ``source_stains`` when given, else the bank's training reference."""
        if source_stains is None:
            return (np.broadcast_to(self.reference_[0], (len(sel), 2, 3)),
                    np.broadcast_to(self.reference_[1], (len(sel), 2)))
        return np.asarray(source_stains[0])[sel], np.asarray(source_stains[1])[sel]

    def _colour_jitter(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """Hue rotation and saturation (one 3 x 3 matrix per image in YIQ), contrast, brightness."""
        c = self.config
        n = x.shape[0]
        ang = rng.uniform(-c.hue, c.hue, n) * 2 * np.pi
        sat = rng.uniform(1 - c.saturation, 1 + c.saturation, n)
        yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
        rot = np.zeros((n, 3, 3))
        rot[:, 0, 0] = 1.0
        rot[:, 1, 1] = rot[:, 2, 2] = np.cos(ang) * sat
        rot[:, 1, 2] = -np.sin(ang) * sat
        rot[:, 2, 1] = np.sin(ang) * sat
        m = torch.from_numpy(np.linalg.inv(yiq) @ rot @ yiq).float().to(x.device)  # n x 3 x 3
        x = torch.einsum("bij,bjhw->bihw", m, x)
        con = torch.from_numpy(rng.uniform(1 - c.contrast, 1 + c.contrast, (n, 1, 1, 1))).float().to(x.device)
        bri = torch.from_numpy(rng.uniform(-c.brightness, c.brightness, (n, 1, 1, 1))).float().to(x.device)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return ((x - mean) * con + mean + bri).clamp(0, 1)


def _gaussian_blur(x: torch.Tensor, sigma: np.ndarray) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per image (grouped convolution, reflect padding)."""
    n, ch, h, w = x.shape
    r = int(np.ceil(3 * sigma.max()))
    r = min(r, h - 1, w - 1)
    off = np.arange(-r, r + 1)
    k = np.exp(-0.5 * (off[None, :] / sigma[:, None]) ** 2)
    k = torch.from_numpy(k / k.sum(axis=1, keepdims=True)).float().to(x.device)
    k = k.repeat_interleave(ch, dim=0)  # (n * ch) x (2r + 1)
    y = x.reshape(1, n * ch, h, w)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="reflect"), k[:, None, None, :], groups=n * ch)
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="reflect"), k[:, None, :, None], groups=n * ch)
    return y.reshape(n, ch, h, w)


def _jpeg(x: torch.Tensor, quality: np.ndarray) -> torch.Tensor:
    """JPEG round trip per image (Pillow on the CPU; 4:2:0 chroma as most scanners write)."""
    from PIL import Image

    arr = (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = np.empty_like(arr)
    for i, (im, q) in enumerate(zip(arr, quality)):
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=int(q))
        buf.seek(0)
        out[i] = np.asarray(Image.open(buf).convert("RGB"))
    return torch.from_numpy(out).permute(0, 3, 1, 2).to(x.device).float() / 255.0


def augment_sample(rgb: np.ndarray, inst: np.ndarray, types: np.ndarray | None, rng: np.random.Generator | int | None,
                   aug: SegAugment | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One numpy sample (uint8 H x W x 3, H x W instance / type maps) through :class:`SegAugment`."""
    aug = aug or SegAugment()
    rng = np.random.default_rng(rng)
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float() / 255.0
    li = torch.from_numpy(np.ascontiguousarray(inst).astype(np.int64))[None]
    lt = None if types is None else torch.from_numpy(np.ascontiguousarray(types).astype(np.int64))[None]
    x, li, lt = aug(x, li, lt, rng)
    out = (x[0].permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    return out, li[0].numpy().astype(inst.dtype), None if lt is None else lt[0].numpy().astype(types.dtype)
