"""The learned nucleus segmenter: a compact residual U-Net with HoVer-Net's three heads.

Heads (at full working resolution): nuclear pixel (NP, 1 logit), horizontal/vertical
distance maps (HV, 2 values in -1..1) and nucleus type (TP, background + CoNSeP's 4 types).
One shared decoder keeps it fast enough for whole slides; post-processing is the marker
watershed of ``postprocess.py``. Plain PyTorch, trained from random initialisation here
(``scripts/train_segmentation.py``); weights load from safetensors only, never pickle.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import numbers
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from ghist_core._keys import OBS_NUCLEUS_SCALE
from ghist_core.device import autocast_for, pick_device
from ghist_core.errors import ModelInputError, WeightsFormatError, WeightsNotFoundError
from ghist_core.paths import BUNDLED_WEIGHTS_DIR, DEFAULT_SEGMENTER
from ghist_core.segmentation.features import (check_type_merge, measure_instances, merge_type_names,
                                              relabel_sequential)
from ghist_core.segmentation.postprocess import PostProcessConfig, hv_watershed
from ghist_core.segmentation.scale_picker import ScalePicker, foreground_certainty, scale_picker_features
from ghist_core.segmentation.type_refiner import TypeRefiner, nucleus_type_features
from ghist_core._types import ProgressCallback, SlideLike
from ghist_core.io.slide import check_mpp
from ghist_core.segmentation.tiling import (check_rgb, is_featureless, resample_labels, resample_rgb, run_tiled,
                     warn_if_far, working_shape)

#: ``nucleus_scale="auto"`` (``segment_tile``, and per tile ``segment_slide``): the factors tried, the foreground-certainty gain a
#: factor other than 1 needs, and the median nucleus area (working px, at factor 1) below which
#: nuclei are not large and nothing is tried. Chosen on the validation split (66 images of the
#: training tiles, zoomed x0.67-x2, as they are and in 6 other stains) before this design's
#: test run: docs/DECISIONS.md, session 12 (the second design).
SCALE_FACTORS = (1.0, 2.0 / 3.0)
SCALE_MARGIN = 0.01
SCALE_MIN_AREA_PX = 60.0
#: the scale probe (``LearnedSegmenter.scale_probe``): its window is at least this many working px a side,
#: and is scored without this many working px at each edge (the window's own pass has no context there).
#: Fixed before any accuracy number: docs/DECISIONS.md, session 14
PROBE_MIN_PX = 256
PROBE_EDGE_PX = 16
#: the same rule as a record (a benchmark stamps it on the rows it ran with it)
SCALE_RULE = {"factors": list(SCALE_FACTORS), "margin": SCALE_MARGIN, "min_area_px": SCALE_MIN_AREA_PX,
              "statistic": "foreground_certainty"}


def check_nucleus_scale(scale: object) -> float | str:
    """``"auto"`` or a factor between 0.1 and 10 (as a float), else a ModelInputError."""
    if isinstance(scale, str) and scale == "auto":
        return scale
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not 0.1 <= float(scale) <= 10.0:
        raise ModelInputError(f"nucleus_scale must be 'auto' or a number between 0.1 and 10, not {scale!r}.")
    return float(scale)


def nucleus_scale_is_large(cells: pd.DataFrame, work_mpp: float, min_area_px: float = SCALE_MIN_AREA_PX) -> bool:
    """True when the median nucleus (``area_um2``) is at least ``min_area_px`` working px: only then
    does the scale check try another factor."""
    return bool(len(cells)) and float(cells["area_um2"].median()) / work_mpp ** 2 >= min_area_px


#: test-time views as (transpose, flip left-right, flip up-down); the first k are used for k copies
TTA_VIEWS = ((False, False, False), (False, True, False), (False, False, True), (False, True, True),
             (True, False, False), (True, True, False), (True, False, True), (True, True, True))
TTA_COPIES = (1, 2, 4, 8)


def _view(x: torch.Tensor, view: tuple[bool, bool, bool]) -> torch.Tensor:
    """An image batch (B x C x H x W) transposed and/or flipped."""
    transpose, flip_lr, flip_ud = view
    if transpose:
        x = x.transpose(-1, -2)
    if flip_lr:
        x = x.flip(-1)
    if flip_ud:
        x = x.flip(-2)
    return x


def _unview_maps(npp: torch.Tensor, hv: torch.Tensor, tp: torch.Tensor, view: tuple[bool, bool, bool]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Maps made on ``_view(x, view)`` back in ``x``'s frame: a flip also negates the HV channel
    along it (channel 0 is x, 1 is y) and a transpose swaps the two."""
    transpose, flip_lr, flip_ud = view
    if flip_ud:
        npp, hv, tp = npp.flip(-2), hv.flip(-2), tp.flip(-2)
        hv = torch.stack([hv[:, 0], -hv[:, 1]], dim=1)
    if flip_lr:
        npp, hv, tp = npp.flip(-1), hv.flip(-1), tp.flip(-1)
        hv = torch.stack([-hv[:, 0], hv[:, 1]], dim=1)
    if transpose:
        npp, tp = npp.transpose(-1, -2), tp.transpose(-1, -2)
        hv = torch.stack([hv[:, 1], hv[:, 0]], dim=1).transpose(-1, -2)
    return npp, hv, tp


#: CoNSeP's four nucleus classes, in the order of the type head's channels 1..4.
CONSEP_TYPES = ("other", "inflammatory", "epithelial", "spindle-shaped")


@dataclass
class SegNetConfig:
    """Architecture; saved in the weights card so the loader rebuilds the same network."""

    widths: tuple[int, ...] = (16, 32, 64, 128, 256)
    blocks: tuple[int, ...] = (1, 1, 2, 3, 2)
    head_width: int = 16
    n_types: int = 5  # background + types
    mpp: float = 0.5
    type_names: tuple[str, ...] = CONSEP_TYPES

    @classmethod
    def from_dict(cls, d: dict) -> "SegNetConfig":
        d = dict(d)
        for k in ("widths", "blocks", "type_names"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def to_dict(self) -> dict:
        return asdict(self)


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                                  nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x), inplace=True)


class SegNet(nn.Module):
    """Residual U-Net encoder/decoder; ``forward`` returns NP logit, HV and TP logits."""

    def __init__(self, cfg: SegNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.widths
        self.register_buffer("mean", torch.tensor([0.70, 0.55, 0.70]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.18, 0.20, 0.15]).view(1, 3, 1, 1), persistent=False)
        self.stem = _conv_bn(3, w[0])
        self.down = nn.ModuleList()
        self.enc = nn.ModuleList()
        for i, c in enumerate(w):
            self.down.append(nn.Identity() if i == 0 else _conv_bn(w[i - 1], c, stride=2))
            self.enc.append(nn.Sequential(*[ResBlock(c) for _ in range(cfg.blocks[i])]))
        self.fuse = nn.ModuleList()
        self.dec = nn.ModuleList()
        for i in range(len(w) - 1, 0, -1):
            self.fuse.append(_conv_bn(w[i] + w[i - 1], w[i - 1]))
            self.dec.append(ResBlock(w[i - 1]))
        hw = cfg.head_width

        def head(cout: int) -> nn.Sequential:
            return nn.Sequential(_conv_bn(w[0], hw), nn.Conv2d(hw, cout, 1))

        self.np_head = head(1)
        self.hv_head = head(2)
        self.tp_head = head(cfg.n_types)

    @property
    def stride(self) -> int:
        return 2 ** (len(self.cfg.widths) - 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x``: B x 3 x H x W in 0..1 (H, W multiples of ``stride``)."""
        x = (x - self.mean) / self.std
        x = self.stem(x)
        skips = []
        for down, enc in zip(self.down, self.enc):
            x = enc(down(x))
            skips.append(x)
        x = skips.pop()
        for fuse, dec in zip(self.fuse, self.dec):
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = dec(fuse(torch.cat([x, skip], dim=1)))
        return self.np_head(x), self.hv_head(x), self.tp_head(x)


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Fold every eval-mode ``Conv2d → BatchNorm2d`` pair of a Sequential into one convolution (in place)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for child in module.children():
        if isinstance(child, nn.Sequential):
            for i in range(len(child) - 1):
                if isinstance(child[i], nn.Conv2d) and isinstance(child[i + 1], nn.BatchNorm2d):
                    child[i] = fuse_conv_bn_eval(child[i], child[i + 1])
                    child[i + 1] = nn.Identity()
        fold_batchnorm(child)
    return module


class LearnedSegmenter:
    """HoVer-Net-style nucleus segmentation and typing with the common segmenter API.

    Attributes
    ----------
    cfg : SegNetConfig        architecture, working µm/px and type names
    post : PostProcessConfig  watershed thresholds (tuned on the validation split)
    card : dict               the weights' JSON card (data, metrics, sha256)
    """

    def __init__(self, model: SegNet, post: PostProcessConfig | None = None, *, device: str = "auto",
                 card: dict | None = None, tile_px: int = 512, workers: int | None = None) -> None:
        self.device = pick_device(device)
        # inference only: BatchNorm folded into its convolution and NHWC layout (~2x on a CPU,
        # outputs equal to 1e-4); a copy, so a model still being trained is left as it is
        self.model = fold_batchnorm(copy.deepcopy(model).eval()).to(self.device).to(memory_format=torch.channels_last)
        self.cfg = model.cfg
        self.post = post or PostProcessConfig()
        self.card = card or {}
        self.tile_px = tile_px
        self.workers = workers if workers is not None else min(8, max(1, (os.cpu_count() or 1) // 2))
        self._pool: ThreadPoolExecutor | None = None
        self.name = self.card.get("name", "learned")
        #: the default ``nucleus_scale`` of ``segment_tile`` and ``segment_slide`` ("auto": the scale
        #: check, adopted by the rules in docs/DECISIONS.md, sessions 12 and 13; 1.0: as stated)
        self.nucleus_scale: float | str = "auto"
        #: copies ``segment_tile`` averages its maps over (:data:`TTA_VIEWS`; ``segment_slide`` always
        #: makes one pass, for speed)
        self.tta: int = 1
        #: the scale check's area gate (working px; :data:`SCALE_MIN_AREA_PX`) and the factor-1 foreground
        #: certainty at or above which no other factor is tried (inf: always tried)
        self.scale_min_area_px: float = SCALE_MIN_AREA_PX
        self.scale_max_certainty: float = float("inf")
        #: ``segment_slide`` only: before reading a whole tile at another factor, read a window of this
        #: share of the tile's side (:meth:`_probe_moves`) and go on only if another factor wins there
        #: (the full check then decides as before); 0: no probe
        self.scale_probe: float = 0.0
        #: the card's learned scale-check decision (``scale_picker``; docs/DECISIONS.md, session 18), or
        #: None: the hand rule (area gate, certainty margin; sessions 12-13)
        self.scale_picker: ScalePicker | None = None
        #: the card's nucleus-level type decision (``type_refiner``; docs/DECISIONS.md, session 14), or
        #: None: ``type`` is the argmax of the weighted mean type probabilities
        self.type_refiner: TypeRefiner | None = None

    #: the pipeline hands whole blocks (with their margin) to one forward pass
    one_tile_per_block = True

    @property
    def stride(self) -> int:
        return self.model.stride

    @property
    def batch_size(self) -> int:
        """Tiles per ``segment_slide`` forward pass: 8 on CUDA; 1 elsewhere, where a batch of 8
        1024 px tiles overflows a CPU's caches (1.05 vs 1.62 Mpx/s on 2 cores, the same nuclei:
        bench/results/segmentation.json, speed.cpu.batch_8_on_cpu)."""
        return 8 if self.device.type == "cuda" else 1

    @property
    def mpp(self) -> float:
        return self.cfg.mpp

    @property
    def weights_sha256(self) -> str:
        """The sha256 of the weights (from the sealed card; "" for a network built in code), so a run
        records which segmenter made its cells."""
        return str((self.card or {}).get("sha256", ""))

    @property
    def type_names(self) -> tuple[str, ...]:
        return self.cfg.type_names

    def __repr__(self) -> str:
        return f"<LearnedSegmenter {self.name!r} at {self.mpp} µm/px on {self.device}>"

    # --- network maps -------------------------------------------------------------------
    @torch.inference_mode()
    def predict_batch(self, tiles: np.ndarray, *, tta: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Maps for a batch of same-size working tiles (B x H x W x 3 uint8).

        Returns NP probability (B x H x W), HV (B x 2 x H x W) and type probabilities
        (B x C x H x W), float32 numpy. ``tta`` (1, 2, 4 or 8): the maps averaged over that many
        flipped / transposed copies (:data:`TTA_VIEWS`), each mapped back (HV signs and axes too).
        """
        if tta not in TTA_COPIES:
            raise ModelInputError(f"tta must be one of {TTA_COPIES}, not {tta!r}.")
        b, h, w, _ = tiles.shape
        s = self.model.stride
        ph, pw = (-h) % s, (-w) % s
        x = torch.from_numpy(np.array(tiles, dtype=np.uint8, copy=True)).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        if ph or pw:
            mode = "reflect" if (ph < h and pw < w) else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        np_sum = hv_sum = tp_sum = None
        for view in TTA_VIEWS[:tta]:
            with autocast_for(self.device):
                np_logit, hv, tp = self.model(_view(x, view).contiguous(memory_format=torch.channels_last))
            np_prob, hv, tp = _unview_maps(torch.sigmoid(np_logit.float()), hv.float(), torch.softmax(tp.float(), dim=1),
                                           view)
            np_sum = np_prob if np_sum is None else np_sum + np_prob
            hv_sum = hv if hv_sum is None else hv_sum + hv
            tp_sum = tp if tp_sum is None else tp_sum + tp
        np_prob = (np_sum / tta)[:, 0, :h, :w]
        hv = (hv_sum / tta)[:, :, :h, :w].clamp_(-1, 1)
        tp = (tp_sum / tta)[:, :, :h, :w]
        return np_prob.cpu().numpy(), hv.cpu().numpy(), tp.cpu().numpy()

    def predict_maps(self, rgb_work: np.ndarray, *, margin: int = 32, batch_size: int | None = None,
                     tta: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Maps of one working-resolution image of any size (tiled with ``margin`` px of context;
        ``batch_size`` None: the device's :attr:`batch_size`; ``tta`` None: :attr:`tta`)."""
        batch_size = batch_size or self.batch_size
        tta = self.tta if tta is None else tta
        h, w = rgb_work.shape[:2]
        t = self.tile_px
        if h <= t and w <= t:
            pad_h, pad_w = max(0, 32 - h), max(0, 32 - w)  # smaller than the field: pad with glass
            img = np.pad(rgb_work, ((0, pad_h), (0, pad_w), (0, 0)), constant_values=255) if (pad_h or pad_w) else rgb_work
            npp, hv, tp = self.predict_batch(img[None], tta=tta)
            return npp[0, :h, :w], hv[0, :, :h, :w], tp[0, :, :h, :w]
        core = t - 2 * margin
        ny, nx = math.ceil(h / core), math.ceil(w / core)
        padded = np.pad(rgb_work, ((margin, ny * core - h + margin), (margin, nx * core - w + margin), (0, 0)),
                        mode="reflect")
        np_out = np.zeros((ny * core, nx * core), np.float32)
        hv_out = np.zeros((2, ny * core, nx * core), np.float32)
        tp_out = np.zeros((self.cfg.n_types, ny * core, nx * core), np.float32)
        boxes = [(iy * core, ix * core) for iy in range(ny) for ix in range(nx)]
        for i in range(0, len(boxes), batch_size):
            chunk = boxes[i:i + batch_size]
            batch = np.stack([padded[y:y + t, x:x + t] for y, x in chunk])
            npp, hv, tp = self.predict_batch(batch, tta=tta)
            for k, (y, x) in enumerate(chunk):
                sl = (slice(y, y + core), slice(x, x + core))
                np_out[sl] = npp[k, margin:margin + core, margin:margin + core]
                hv_out[(slice(None),) + sl] = hv[k, :, margin:margin + core, margin:margin + core]
                tp_out[(slice(None),) + sl] = tp[k, :, margin:margin + core, margin:margin + core]
        return np_out[:h, :w], hv_out[:, :h, :w], tp_out[:, :h, :w]

    # --- public API -----------------------------------------------------------------------
    def segment_tile(self, rgb: np.ndarray, mpp: float, *, nucleus_scale: float | str | None = None
                     ) -> tuple[np.ndarray, pd.DataFrame]:
        """Instances (int32, same H x W as ``rgb``) and one row per nucleus.

        The image is resampled to the model's µm/px (a warning beyond 2x). When the input is
        finer than the model, the maps are upsampled before the watershed, so boundaries keep
        the input's detail.

        ``nucleus_scale`` (None: :attr:`nucleus_scale`, ``"auto"`` unless set) segments as if the
        pixels were ``nucleus_scale`` x ``mpp``: below 1, nuclei reach the network smaller, as
        for nuclei that look larger than the training nuclei (large tumour nuclei, a mis-stated
        µm/px). Measurements stay in the true ``mpp``. ``"auto"`` keeps 1.0 unless the nuclei
        found at 1.0 are not small (median >= :data:`SCALE_MIN_AREA_PX` working px) and another
        of :data:`SCALE_FACTORS` raises the network's foreground certainty by more than
        :data:`SCALE_MARGIN` (rule chosen on the validation split, docs/DECISIONS.md). The factor
        used is in ``cells.attrs["nucleus_scale"]``.
        """
        rgb = check_rgb(rgb)
        mpp = check_mpp(mpp)
        warn_if_far(mpp, self.mpp, "The nucleus model")
        scale = check_nucleus_scale(self.nucleus_scale if nucleus_scale is None else nucleus_scale)
        auto = scale == "auto"
        f = 1.0 if auto else float(scale)
        hw = rgb.shape[:2]
        if is_featureless(rgb):
            return self._empty(hw, mpp, f)
        if auto:
            return self._segment_auto(rgb, hw, mpp)
        maps = self._maps_at(rgb, mpp * f)
        if maps is None:
            return self._empty(hw, mpp, f)
        inst, cells = self._instances(maps, hw, mpp, mpp * f, rgb)
        cells.attrs["nucleus_scale"] = f
        return inst, cells

    def _segment_auto(self, rgb: np.ndarray, hw: tuple[int, int], mpp: float) -> tuple[np.ndarray, pd.DataFrame]:
        """The scale check: factor 1 first; when its nuclei are not small, each other factor's
        maps, kept only if their foreground certainty beats factor 1's by :data:`SCALE_MARGIN`."""
        maps1 = self._maps_at(rgb, mpp)
        if maps1 is None:
            return self._empty(hw, mpp)
        inst, cells = self._instances(maps1, hw, mpp, mpp, rgb)
        cells.attrs["nucleus_scale"] = 1.0
        if self.scale_picker is not None:
            f = self.scale_picker.factor
            if len(cells) == 0 or (maps_f := self._maps_at(rgb, mpp * f)) is None:  # nothing found: as stated
                return inst, cells
            inst_f, cells_f = self._instances(maps_f, hw, mpp, mpp * f, rgb)
            if not self._picker_moves(rgb, mpp, (maps1[0], cells), (maps_f[0], cells_f)):
                return inst, cells
            cells_f.attrs["nucleus_scale"] = f
            return inst_f, cells_f
        if (cert1 := self._certainty_if_trying(cells, maps1[0])) is None:
            return inst, cells
        best, best_maps = self._better_scale(rgb, mpp, cert1, self._maps_at)
        if best_maps is None:
            return inst, cells
        inst, cells = self._instances(best_maps, hw, mpp, mpp * best, rgb)
        cells.attrs["nucleus_scale"] = best
        return inst, cells

    def _picker_moves(self, rgb: np.ndarray, mpp: float, *readings: tuple[np.ndarray, pd.DataFrame]) -> bool:
        """The :attr:`scale_picker`'s decision for a tile ``rgb`` at ``mpp`` from its two readings,
        each ``(nuclear probability map, cells)``: factor 1's, then the picker's factor's."""
        return self.scale_picker.moves(scale_picker_features(rgb, mpp, self.mpp, readings))

    def _certainty_if_trying(self, cells: pd.DataFrame, np_prob_at_1: np.ndarray) -> float | None:
        """The factor-1 foreground certainty when the scale check tries the other factors (the nuclei
        found at factor 1 are not small and the network is not already sure enough,
        :attr:`scale_max_certainty`); None when it does not."""
        if not nucleus_scale_is_large(cells, self.mpp, self.scale_min_area_px):
            return None
        certainty = foreground_certainty(np_prob_at_1)
        return certainty if certainty < self.scale_max_certainty else None

    @staticmethod
    def _better_scale(rgb: np.ndarray, mpp: float, certainty_at_1: float, maps_at) -> tuple[float, tuple | None]:
        """The scale check's choice among :data:`SCALE_FACTORS` other than 1: ``(factor, its maps)``,
        or ``(1.0, None)`` when none beats ``certainty_at_1`` by :data:`SCALE_MARGIN`.
        ``maps_at(rgb, seg_mpp)`` makes the maps (None when the image would be too small)."""
        best, best_cert, best_maps = 1.0, certainty_at_1 + SCALE_MARGIN, None
        for f in SCALE_FACTORS:
            if f == 1.0 or (maps := maps_at(rgb, mpp * f)) is None:
                continue
            if (cert := foreground_certainty(maps[0])) > best_cert:
                best, best_cert, best_maps = f, cert, maps
        return best, best_maps

    def _maps_at(self, rgb: np.ndarray, seg_mpp: float) -> tuple | None:
        """Network maps of ``rgb`` read as ``seg_mpp`` µm/px (None when that is under 4 working px)."""
        work_hw = working_shape(rgb.shape[:2], seg_mpp, self.mpp)
        if min(work_hw) < 4:
            return None
        return self.predict_maps(resample_rgb(rgb, work_hw))

    def _block_maps_at(self, rgb: np.ndarray, seg_mpp: float) -> tuple | None:
        """As :meth:`_maps_at` in one forward pass when the tile does not grow (``segment_slide``'s tiles
        are sized for one pass; a factor above 1 enlarges them, so those are tiled)."""
        work_hw = working_shape(rgb.shape[:2], seg_mpp, self.mpp)
        if min(work_hw) < 4:
            return None
        if max(work_hw) > max(rgb.shape[:2]):
            return self._maps_at(rgb, seg_mpp)
        npp, hv, tp = self.predict_batch(resample_rgb(rgb, work_hw)[None])
        return npp[0], hv[0], tp[0]

    def _instances(self, maps: tuple, hw: tuple[int, int], mpp: float, seg_mpp: float, rgb: np.ndarray | None = None
                   ) -> tuple[np.ndarray, pd.DataFrame]:
        """Instances at the input's H x W from maps made at ``seg_mpp``; cells measured at ``mpp``
        (``rgb``: the input, for the type refiner's stain features)."""
        npp, hv, tp = maps
        work_hw = npp.shape
        if work_hw != hw and seg_mpp < self.mpp:
            up = lambda a: F.interpolate(torch.from_numpy(a)[None], size=hw, mode="bilinear",
                                         align_corners=False)[0].numpy()
            npp, hv, tp = up(npp[None])[0], up(hv), up(tp)
            inst = hv_watershed(npp, hv, seg_mpp, self._post_at(seg_mpp))
            cells = self._measure(inst, mpp, tp, rgb)
        else:
            inst_w = hv_watershed(npp, hv, self.mpp, self.post)
            if work_hw == hw:
                inst = inst_w
                cells = self._measure(inst, mpp, tp, rgb)
            else:  # coarser input: measure at the input's scale, types from the working map
                rgb_work = resample_rgb(rgb, work_hw) if self.type_refiner is not None and rgb is not None else None
                work_cells = self._measure(inst_w, self.mpp, tp, rgb_work)
                inst = resample_labels(inst_w, hw)
                kept = np.unique(inst)
                kept = kept[kept > 0]  # the ids that survive resampling (label 0 may be absent)
                inst = relabel_sequential(inst)
                cells = measure_instances(inst, mpp, type_names=())
                prob_cols = [f"prob_{n}" for n in self.type_names]
                lookup = work_cells.set_index("id").loc[kept]
                cells["type"] = lookup["type"].to_numpy()
                for c in prob_cols:
                    cells[c] = lookup[c].to_numpy()
        return inst, self._finish(cells, mpp)

    def _measure(self, inst: np.ndarray, mpp: float, tp: np.ndarray, rgb: np.ndarray | None = None) -> pd.DataFrame:
        """``measure_instances`` with this model's type names and the card's type weights; with a
        :attr:`type_refiner` and the image (``rgb``, same H x W as ``inst``), ``type`` is the
        refiner's (the ``prob_<type>`` columns stay the network's)."""
        cells = measure_instances(inst, mpp, type_probs=tp, type_names=self.type_names,
                                  type_weights=self.post.type_weights, type_merge=self.post.type_merge)
        if self.type_refiner is not None and rgb is not None and len(cells):
            features = nucleus_type_features(rgb, inst, cells, mpp, self.type_names)
            names = np.asarray(self.type_names, dtype=object)[self.type_refiner.predict(features) - 1]
            cells["type"] = merge_type_names(names, self.post.type_merge)
        return cells

    def _empty(self, hw: tuple[int, int], mpp: float, factor: float = 1.0) -> tuple[np.ndarray, pd.DataFrame]:
        inst = np.zeros(hw, np.int32)
        cells = self._finish(measure_instances(inst, mpp, type_names=self.type_names), mpp, empty=True)
        cells.attrs["nucleus_scale"] = factor
        return inst, cells

    def _post_at(self, mpp: float) -> PostProcessConfig:
        """Thresholds for maps upsampled to ``mpp``: gradients shrink with the scale, sigma grows."""
        f = self.mpp / mpp
        p = self.post
        return dataclasses.replace(p, marker_threshold=p.marker_threshold / f, sigma_px=p.sigma_px * f)

    def _finish(self, cells: pd.DataFrame, mpp: float, empty: bool = False) -> pd.DataFrame:
        cells.insert(1, "cell_id", cells["id"].to_numpy())
        cells["x_um"] = cells["x_px"] * mpp
        cells["y_um"] = cells["y_px"] * mpp
        for name in self.type_names:
            if f"prob_{name}" not in cells:
                cells[f"prob_{name}"] = np.zeros(len(cells))
        return cells

    def _post_one(self, item: tuple[np.ndarray, np.ndarray, np.ndarray, float, np.ndarray]) -> pd.DataFrame:
        npp, hv, tp, mpp, tile = item
        inst = hv_watershed(npp, hv, mpp, self.post)
        return self._measure(inst, mpp, tp, tile)

    def _segment_batch(self, tiles: list[np.ndarray], mpp: float, nucleus_scale: float | str = 1.0
                       ) -> list[pd.DataFrame]:
        """One table per working tile (``x_px``/``y_px`` in the tile's pixels), each cell with the
        ``nucleus_scale`` it was segmented at; ``"auto"``: the scale check per tile, as in
        :meth:`segment_tile`."""
        if nucleus_scale not in ("auto", 1.0):  # a fixed factor: every tile read at f x mpp
            f = float(nucleus_scale)
            return [self._tile_at(t, mpp, f, None if is_featureless(t) else self._block_maps_at(t, mpp * f))
                    for t in tiles]
        npp, hv, tp = self.predict_batch(np.stack(tiles))
        flat = [k for k, t in enumerate(tiles) if is_featureless(t)]
        if flat:  # a uniform tile (black, white, one colour) holds no nuclei whatever the network says
            npp[flat] = 0.0
        items = [(npp[k], hv[k], tp[k], mpp, tiles[k]) for k in range(len(tiles))]
        if self.workers > 1 and len(items) > 1:  # scipy / skimage release the GIL in their C loops
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers)
            tables = list(self._pool.map(self._post_one, items))
        else:
            tables = [self._post_one(it) for it in items]
        for k, table in enumerate(tables):
            table[OBS_NUCLEUS_SCALE] = np.float32(1.0)
            if nucleus_scale == "auto" and k not in flat and self.scale_picker is not None:
                f = self.scale_picker.factor
                if len(table) and (maps := self._block_maps_at(tiles[k], mpp * f)) is not None:
                    table_f = self._tile_at(tiles[k], mpp, f, maps)
                    if self._picker_moves(tiles[k], mpp, (npp[k], table), (maps[0], table_f)):
                        tables[k] = table_f
                continue
            if nucleus_scale == "auto" and k not in flat and (cert1 := self._certainty_if_trying(table, npp[k])) is not None:
                if self.scale_probe and not self._probe_moves(tiles[k], npp[k], mpp):
                    continue
                f, maps = self._better_scale(tiles[k], mpp, cert1, self._block_maps_at)
                if maps is not None:
                    tables[k] = self._tile_at(tiles[k], mpp, f, maps)
        return tables

    def _probe_moves(self, tile: np.ndarray, np_prob_at_1: np.ndarray, mpp: float) -> bool:
        """The scale check on a window only (:attr:`scale_probe` of the tile's side, at least
        :data:`PROBE_MIN_PX`, placed on a 3 x 3 grid where the factor-1 map has the most nucleus
        pixels): True when another factor wins there. Both readings are scored on the window's inner
        part, away from the edge the window's own pass lacks context at, so the probe costs about
        ``scale_probe`` squared of the full check."""
        h, w = np_prob_at_1.shape
        wh, ww = (min(n, max(PROBE_MIN_PX, int(round(n * self.scale_probe)))) for n in (h, w))
        if wh >= h and ww >= w:  # the window would be the tile: the full check is the probe
            return True
        fg = np.pad((np_prob_at_1 > 0.5).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        ys = np.unique(np.linspace(0, h - wh, 3).round().astype(int))
        xs = np.unique(np.linspace(0, w - ww, 3).round().astype(int))
        Y, X = np.meshgrid(ys, xs, indexing="ij")
        count = fg[Y + wh, X + ww] - fg[Y, X + ww] - fg[Y + wh, X] + fg[Y, X]
        y0, x0 = int(Y.flat[count.argmax()]), int(X.flat[count.argmax()])
        trim = lambda a, m: a[m:a.shape[0] - m, m:a.shape[1] - m] if min(a.shape) > 4 * m else a
        m1 = PROBE_EDGE_PX
        cert1 = foreground_certainty(trim(np_prob_at_1[y0:y0 + wh, x0:x0 + ww], m1))
        window = tile[y0:y0 + wh, x0:x0 + ww]
        for f in SCALE_FACTORS:
            if f == 1.0 or (maps := self._block_maps_at(window, mpp * f)) is None:
                continue
            if foreground_certainty(trim(maps[0], max(1, int(round(m1 * f))))) > cert1 + SCALE_MARGIN:
                return True
        return False

    def _tile_at(self, tile: np.ndarray, mpp: float, f: float, maps: tuple | None) -> pd.DataFrame:
        """The table of one working tile from its ``maps`` made at factor ``f`` (as ``_segment_batch``'s;
        None: no maps, as for a featureless tile or one too small at ``f``)."""
        if maps is None:
            _, cells = self._empty(tile.shape[:2], mpp, f)
        else:
            _, cells = self._instances(maps, tile.shape[:2], mpp, mpp * f, tile)
        cells[OBS_NUCLEUS_SCALE] = np.float32(f)
        return cells[self._tile_columns]  # in _post_one's order, whichever branch measured them

    @functools.cached_property
    def _tile_columns(self) -> list[str]:
        """``_segment_batch``'s table columns: ``measure_instances``' order, then the factor."""
        empty = measure_instances(np.zeros((1, 1), np.int32), 1.0, type_probs=np.zeros((len(self.type_names) + 1, 1, 1)),
                                  type_names=self.type_names)
        return [*empty.columns, OBS_NUCLEUS_SCALE]

    def segment_slide(self, slide: SlideLike, *, progress: ProgressCallback | None = None, tile_px: int = 1024,
                      overlap_px: int = 96, batch_size: int | None = None, device: str | None = None,
                      nucleus_scale: float | str | None = None) -> pd.DataFrame:
        """Cell table of a whole slide, centroids in µm (tiles batched on the device, AMP on CUDA;
        ``batch_size`` None: the device's :attr:`batch_size`).

        ``overlap_px`` (working px; 96 px = 48 µm at 0.5 µm/px) must exceed the largest
        nucleus diameter for seams to be exact (see ``tiling.py``) and gives the network
        context, so nuclei near a seam come out as in one pass (two neighbouring tiles the scale
        check reads at different factors can cut a seam nucleus differently: the larger view is
        kept). ``nucleus_scale`` (None:
        :attr:`nucleus_scale`): as in :meth:`segment_tile`, decided per tile (in the app, per
        block; adopted by the rule in docs/DECISIONS.md, session 13); column ``nucleus_scale``
        says which factor each cell was segmented at.
        """
        nucleus_scale = check_nucleus_scale(self.nucleus_scale if nucleus_scale is None else nucleus_scale)
        if device is not None and device != "auto" and pick_device(device) != self.device:
            self.device = pick_device(device)
            self.model = self.model.to(self.device)
        s = self.model.stride
        tile_px = max(s * 4, int(math.ceil(tile_px / s) * s))
        segment = lambda tiles, mpp: self._segment_batch(tiles, mpp, nucleus_scale)
        return run_tiled(slide, self.mpp, segment, tile_px=tile_px, overlap_px=overlap_px,
                         batch_size=batch_size or self.batch_size, progress=progress)


def segmenter_weights_path(model_id: str | None) -> Path:
    """Where ``load_segmenter(model_id)`` looks for the weights (their card lies beside them)."""
    if model_id is None:
        return BUNDLED_WEIGHTS_DIR / f"{DEFAULT_SEGMENTER}.safetensors"
    p = Path(model_id)
    if p.suffix == ".safetensors" or p.exists():
        return p
    return BUNDLED_WEIGHTS_DIR / f"{model_id}.safetensors"


@functools.lru_cache(maxsize=None)
def default_working_mpp() -> float:
    """The µm/px the default segmenter reads slides at, from its card (no weights loaded): the
    finest scale the default analysis reads, so the coarsest slide it can take is
    ``MAX_UPSAMPLE_FACTOR`` x this (checked when a slide is uploaded, not only when it runs)."""
    from ghist_core.weights.card import read_card

    return float(read_card(segmenter_weights_path(None).with_suffix(".json"))["mpp"])


def load_learned_segmenter(model_id: str | None = None, device: str = "auto") -> LearnedSegmenter:
    """Build the model from ``<name>.safetensors`` + ``<name>.json`` (sealed card with config and sha256)."""
    from ghist_core.weights.resolve import load_state_dict, resolve_file

    path = segmenter_weights_path(model_id)
    card_path = path.with_suffix(".json")
    if not path.exists() or not card_path.exists():
        raise WeightsNotFoundError(
            f"No nucleus-segmentation weights at {path} (and its card {card_path.name}). Train them with "
            "scripts/train_segmentation.py, or use load_segmenter(kind='classical') for the classical detector.")
    resolved = resolve_file(path)  # card read safely, seal and sha256 checked: unverified weights never load
    card = resolved.card
    try:
        model = SegNet(SegNetConfig.from_dict(card.get("architecture", {})))
        post = PostProcessConfig.from_card(card.get("postprocess", {}))  # the merge from its own record only
        record = card.get("type_merge") or {}  # docs/DECISIONS.md, session 17
        if not isinstance(record, dict):
            raise ValueError("type_merge must be a record with a 'merge' mapping")
        post.type_merge = check_type_merge(record.get("merge"), model.cfg.type_names) or None
        refiner = (TypeRefiner.from_dict(card["type_refiner"], model.cfg.type_names)
                   if card.get("type_refiner") is not None else None)
        picker = ScalePicker.from_dict(card["scale_picker"]) if card.get("scale_picker") is not None else None
    except (TypeError, ValueError, IndexError, KeyError, ZeroDivisionError, OverflowError, RuntimeError) as exc:
        raise WeightsFormatError(f"The card {card_path.name} describes no usable segmentation network "
                                 f"({str(exc)[:200]}).") from None
    state = load_state_dict(resolved)  # safetensors only, re-hashed as it is parsed
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsFormatError(f"{path.name} does not fit the architecture in its card: {exc}") from exc
    seg = LearnedSegmenter(model, post, device=device, card=card)
    seg.type_refiner = refiner
    seg.scale_picker = picker
    return seg
