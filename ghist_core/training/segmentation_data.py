"""The nuclei datasets (CoNSeP, MoNuSeg) and HoVer-Net training targets.

Layout and licences: ``../shared/data/nuclei/README.md`` (CoNSeP: Warwick TIA research use;
MoNuSeg: CC BY-NC-SA 4.0). Only train splits are used for training and model selection;
the validation part is held out *by source tile*, so patches of one tile never sit on
both sides. Test splits are read only by the benchmark.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ghist_core.segmentation.tiling import resample_labels, resample_rgb

DATA_MPP = 0.25  # both datasets are 40x scans
from ghist_core.segmentation.model import CONSEP_TYPES  # noqa: F401  (the segmenter owns its class names)


@dataclass
class NucleiSample:
    """One image with its instance map; ``types[id]`` is the class int (0 = unknown / no classes)."""

    name: str
    dataset: str
    source_tile: str
    rgb: np.ndarray
    inst: np.ndarray
    types: np.ndarray | None

    @property
    def type_map(self) -> np.ndarray | None:
        return None if self.types is None else self.types[self.inst]


def _source_tile(dataset: str, name: str) -> str:
    m = re.match(r"(.+)_\d{3}$", name) if dataset == "consep" else None
    return m.group(1) if m else name


def load_split(root: str | Path, dataset: str, split: str, *, mpp: float = DATA_MPP) -> list[NucleiSample]:
    """All images of ``root/dataset/split`` resampled to ``mpp`` (images antialiased, labels nearest)."""
    folder = Path(root) / dataset / split
    samples = []
    for inst_path in sorted(folder.glob("*.inst.png")):
        stem = inst_path.name[: -len(".inst.png")]
        img_path = next((folder / f"{stem}{ext}" for ext in (".png", ".jpg") if (folder / f"{stem}{ext}").exists()), None)
        if img_path is None:
            continue
        rgb = np.asarray(Image.open(img_path).convert("RGB"))
        inst = np.asarray(Image.open(inst_path)).astype(np.int32)
        types = None
        tj = folder / f"{stem}.type.json"
        if tj.exists():
            mapping = {int(k): int(v) for k, v in json.loads(tj.read_text()).items()}
            types = np.zeros(int(inst.max()) + 1, np.int64)
            if mapping:
                types[np.fromiter(mapping.keys(), int)] = np.fromiter(mapping.values(), int)
        if abs(mpp - DATA_MPP) > 1e-6:
            hw = (int(round(rgb.shape[0] * DATA_MPP / mpp)), int(round(rgb.shape[1] * DATA_MPP / mpp)))
            rgb = resample_rgb(rgb, hw)
            inst = resample_labels(inst, hw)
        samples.append(NucleiSample(stem, dataset, _source_tile(dataset, stem), rgb, inst, types))
    return samples


#: the share of each training set's source tiles held out for validation (training script default)
VALIDATION_FRACTION = 0.15


def validation_samples(root: str | Path, datasets: tuple[str, ...] = ("consep", "monuseg"), *,
                       val_fraction: float = VALIDATION_FRACTION, seed: int = 0) -> list[NucleiSample]:
    """The training script's validation images (whole source tiles of each ``train`` split, held out
    by :func:`split_by_tile`), for choices that must never see a test image."""
    out: list[NucleiSample] = []
    for ds in datasets:
        out += split_by_tile(load_split(root, ds, "train"), val_fraction, seed)[1]
    return out


def her2st_unlabelled(root: str | Path, per_section: int, mpp: float, size: int = 256) -> list[NucleiSample]:
    """Breast H&E without nucleus labels for consistency training: ``per_section`` spot-centred regions
    of each HER2ST section whose stain is a *training* member of the stain bank (the benchmark's
    sections, B4 and C6, stay unseen), ``size`` px at ``mpp``; ``inst`` empty, ``types`` None."""
    from ghist_core.training.her2st import spot_regions
    from ghist_core.training.stain_bank import load_stain_bank

    sections = tuple(sorted(m.name.removeprefix("her2st-") for m in load_stain_bank().select("train")
                            if m.name.startswith("her2st-")))
    empty = np.zeros((size, size), np.int32)
    return [NucleiSample(f"{section}_{i:03d}", "her2st", section, rgb, empty, None)
            for i, (section, rgb) in enumerate(spot_regions(root, per_section, mpp, size, sections))]


def split_by_tile(samples: list[NucleiSample], val_fraction: float, seed: int = 0
                  ) -> tuple[list[NucleiSample], list[NucleiSample]]:
    """(train, validation), whole source tiles to one side, chosen by a seeded shuffle."""
    tiles = sorted({s.source_tile for s in samples})
    rng = np.random.default_rng(seed)
    rng.shuffle(tiles)
    n_val = max(1, int(round(val_fraction * len(tiles))))
    val_tiles = set(tiles[:n_val])
    return ([s for s in samples if s.source_tile not in val_tiles], [s for s in samples if s.source_tile in val_tiles])


def hv_targets(inst: torch.Tensor) -> torch.Tensor:
    """HoVer-Net horizontal/vertical maps for a batch of instance maps (B x H x W, ids unique per image).

    Each pixel gets its x (y) offset from its nucleus' centroid, divided by the largest offset
    on that side, so values run from -1 to +1 across every nucleus; background is 0.
    Runs on whatever device ``inst`` is on (the GPU during training).
    """
    b, h, w = inst.shape
    dev = inst.device
    offs = torch.arange(b, device=dev).view(b, 1, 1) * (int(inst.max().item()) + 1 if inst.numel() else 1)
    gid = torch.where(inst > 0, inst.long() + offs, torch.zeros((), dtype=torch.long, device=dev))
    flat = gid.reshape(-1)
    uniq, idx = torch.unique(flat, return_inverse=True)
    n = uniq.numel()
    ys = torch.arange(h, device=dev, dtype=torch.float32).view(1, h, 1).expand(b, h, w).reshape(-1)
    xs = torch.arange(w, device=dev, dtype=torch.float32).view(1, 1, w).expand(b, h, w).reshape(-1)
    cnt = torch.bincount(idx, minlength=n).float().clamp_min(1)
    cx = torch.bincount(idx, weights=xs, minlength=n) / cnt
    cy = torch.bincount(idx, weights=ys, minlength=n) / cnt
    out = []
    for coord, centre in ((xs, cx), (ys, cy)):
        d = coord - centre[idx]
        big = torch.full((n,), 0.0, device=dev)
        dmax = big.scatter_reduce(0, idx, d, reduce="amax", include_self=True).clamp_min(1e-6)
        dmin = big.scatter_reduce(0, idx, d, reduce="amin", include_self=True).clamp_max(-1e-6)
        val = torch.where(d >= 0, d / dmax[idx], d / (-dmin[idx]))
        val = torch.where(flat > 0, val, torch.zeros_like(val))
        out.append(val.view(b, h, w))
    return torch.stack(out, dim=1)
