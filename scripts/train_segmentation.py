"""Train the HoVer-Net-style nucleus model on the CoNSeP + MoNuSeg *train* splits.

The validation part is held out of train by source tile; test splits are never read here.
Checkpoints every epoch (``last.safetensors`` + ``last.json`` with step, epoch, best score, log and
the random generators' states; ``last.optim.safetensors`` with AdamW's moments, no pickles), so a
run stopped at an epoch's end and resumed continues as the unbroken run would have (same batches,
same optimizer state; a resume says why when it cannot, see ``resume_notes``);
``best.safetensors`` by validation AJI, a JSON-lines log of losses and validation scores.
After training, the watershed thresholds are tuned on the validation split.

    python scripts/train_segmentation.py --out runs/seg --mpp 0.5 --time-budget 480
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ghist_core.io.atomic import atomic_write_text  # noqa: E402
from ghist_core.imaging.stain import hed_jitter_torch  # noqa: E402
from ghist_core.device import autocast_for, pick_device  # noqa: E402
from ghist_core.paths import shared_data_dir  # noqa: E402
from ghist_core.training.segmentation_data import (DATA_MPP, VALIDATION_FRACTION, load_split, split_by_tile,  # noqa: E402
                                                    hv_targets)
from ghist_core.training.segmentation_metrics import SegCounts, seg_counts  # noqa: E402
from ghist_core.segmentation.model import LearnedSegmenter, SegNet, SegNetConfig  # noqa: E402
from ghist_core.segmentation.postprocess import PostProcessConfig  # noqa: E402

IGNORE = 255


@dataclass
class TrainConfig:
    """Everything that defines a run (saved with every checkpoint)."""

    data_root: str = str(shared_data_dir() / "nuclei")
    out: str = "runs/seg"
    mpp: float = 0.5
    crop_um: float = 64.0          # 256 px at 0.25 µm/px = one CoNSeP patch
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    steps_per_epoch: int = 250
    max_epochs: int = 200
    max_steps: int = 0             # 0 = no limit (smoke runs set a few)
    time_budget_s: float = 0.0     # wall-clock budget for the training loop; 0 = none
    val_fraction: float = VALIDATION_FRACTION
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    tune_postprocess: bool = True
    workers: int = 4
    arch: dict = field(default_factory=dict)
    init: str = ""                 # start from these weights (safetensors), e.g. an earlier run
    augment: str = "hed"           # "hed": HED jitter (Tellez); "stain": training.augment.SegAugment (bank
                                   # re-staining, HED, colour, blur, JPEG, scale jitter; weights/stain_bank.json);
                                   # "wide": that plus sampled stains and a wider scale range (AugmentConfig.preset)
    val_restain: int = 0           # also validate on the validation images re-stained to the k training-role
                                   # bank members farthest from the reference; "best" = mean AJI over all copies
    type_weights: str = ""         # "": plain type cross-entropy; "balanced": each nucleus type weighted by
                                   # 1/sqrt of its share of the training nucleus pixels (rare "other" counts more)
    teacher: str = ""              # distil from these weights (safetensors, card beside when its architecture
                                   # differs): each crop's maps before colour and zoom changes, warped with the
                                   # crop's zoom, are soft targets for the student on the changed crop
    distill_weight: float = 0.0    # weight of that loss next to the supervised one (0 = off)
    unlabelled_her2st: int = 0     # spots per HER2ST section (the her2st folder beside data_root) of a
                                   # training-role stain (C2-C5) read as unlabelled
                                   # breast crops: the student on each crop, recoloured and zoomed, matches the
                                   # teacher's maps of it as sampled (consistency in the users' domain; needs
                                   # --teacher); 0 = off
    unlabelled_weight: float = 1.0  # weight of that consistency loss
    unlabelled_batch: int = 0      # unlabelled crops per step (0: half the batch)
    ema: float = 0.0               # decay of an exponential moving average of the weights (BatchNorm statistics
                                   # included), updated every step; validation, "best" and final are the average's
                                   # (0 = off: the weights as trained)


# --- data on the device ---------------------------------------------------------------
class DeviceData:
    """All training images at the working µm/px as device tensors; batches are cropped there."""

    def __init__(self, samples, cfg: TrainConfig, device: torch.device) -> None:
        self.crop = int(round(cfg.crop_um / cfg.mpp))
        self.device = device
        if cfg.augment not in ("hed", "stain", "wide"):
            raise ValueError(f"augment must be 'hed', 'stain' or 'wide', got {cfg.augment!r}")
        self.augment = None
        if cfg.augment != "hed":  # the batch already applies the 8 symmetries
            from ghist_core.training.augment import AugmentConfig, SegAugment

            self.augment = SegAugment(AugmentConfig.preset(cfg.augment))
        self.groups = []  # (rgb uint8 N3HW, inst int32 NHW, type uint8 NHW, pixel weight)
        by_size: dict[tuple, list] = {}
        for s in samples:
            by_size.setdefault((s.dataset,) + s.inst.shape, []).append(s)
        for (dataset, h, w), group in by_size.items():
            rgb = torch.from_numpy(np.stack([g.rgb for g in group])).permute(0, 3, 1, 2).contiguous()
            inst = torch.from_numpy(np.stack([g.inst for g in group]).astype(np.int32))
            tmap = np.stack([g.type_map if g.types is not None else np.full(g.inst.shape, IGNORE) for g in group])
            self.groups.append((rgb.to(device), inst.to(device), torch.from_numpy(tmap.astype(np.uint8)).to(device),
                                float(len(group) * max(h, self.crop) * max(w, self.crop))))
        weights = np.array([g[3] for g in self.groups])
        self.p = weights / weights.sum()

    def class_weights(self, n_classes: int, rule: str) -> torch.Tensor | None:
        """Type cross-entropy weights (background 1): None for plain, or ``balanced_type_weights``."""
        if not rule:
            return None
        if rule != "balanced":
            raise ValueError(f"type_weights must be '' or 'balanced', got {rule!r}")
        pixels = sum(torch.bincount(t[t != IGNORE].long().flatten(), minlength=256)[:IGNORE].cpu()
                     for _, _, t, _ in self.groups)  # per type id, over the training images
        return balanced_type_weights(pixels[:n_classes].numpy()).to(self.device)

    def batch(self, n: int, rng: np.random.Generator, teacher: torch.nn.Module | None = None):
        """``n`` random crops; gathers and the 8 flips/rotations run per group, not per sample.
        ``(x, inst, types)``, plus ``soft`` (:func:`teacher_targets` and a validity channel) with a ``teacher``."""
        c = self.crop
        imgs, insts, types = [], [], []
        counts = np.bincount(rng.choice(len(self.groups), size=n, p=self.p), minlength=len(self.groups))
        for g, k in enumerate(counts):
            if k == 0:
                continue
            rgb, inst, tmap, _ = self.groups[g]
            h, w = inst.shape[-2:]
            idx = torch.from_numpy(rng.integers(len(rgb), size=k)).to(self.device)
            if h <= c and w <= c:  # whole patches: one gather, pad if smaller than the crop
                im, la, ty = rgb[idx], inst[idx], tmap[idx]
                ph, pw = c - h, c - w
                if ph or pw:
                    im = F.pad(im, (0, pw, 0, ph), value=255)
                    la = F.pad(la, (0, pw, 0, ph), value=0)
                    ty = F.pad(ty, (0, pw, 0, ph), value=0)
            else:  # random windows of big tiles: gather with an index grid
                ys = torch.from_numpy(rng.integers(0, h - c + 1, size=k)).to(self.device)
                xs = torch.from_numpy(rng.integers(0, w - c + 1, size=k)).to(self.device)
                ar = torch.arange(c, device=self.device)
                rows = (ys[:, None] + ar[None, :])[:, :, None]
                cols = (xs[:, None] + ar[None, :])[:, None, :]
                b = idx[:, None, None]
                la = inst[b, rows, cols]
                ty = tmap[b, rows, cols]
                im = rgb.permute(0, 2, 3, 1)[b, rows, cols].permute(0, 3, 1, 2)
            imgs.append(im)
            insts.append(la)
            types.append(ty)
        im, la, ty = torch.cat(imgs), torch.cat(insts), torch.cat(types)
        perm = torch.from_numpy(rng.permutation(n)).to(self.device)
        im, la, ty = im[perm], la[perm], ty[perm]
        # the 8 symmetries of the square, each on one slice of the batch; a batch that is not a
        # multiple of 8 starts at a random one (else a batch of 4 would only ever be rotated)
        parts = np.array_split(np.arange(n), 8)
        first = int(rng.integers(8)) if n % 8 else 0
        out = [[], [], []]
        for k, sl in enumerate(parts):
            if len(sl) == 0:
                continue
            t = (k + first) % 8
            a, b_, d = im[sl[0]:sl[-1] + 1], la[sl[0]:sl[-1] + 1], ty[sl[0]:sl[-1] + 1]
            a, b_, d = (torch.rot90(x, t % 4, dims=(-2, -1)) for x in (a, b_, d))
            if t >= 4:
                a, b_, d = (torch.flip(x, dims=(-1,)) for x in (a, b_, d))
            for lst, x in zip(out, (a, b_, d)):
                lst.append(x)
        x = torch.cat(out[0]).float() / 255.0
        inst_b, types_b = torch.cat(out[1]).contiguous(), torch.cat(out[2]).long()
        if teacher is not None:
            return self._distil_batch(x, inst_b, types_b, rng, teacher)
        if self.augment is not None:
            x, inst_b, types_b = self.augment(x, inst_b, types_b, rng)
            return x, inst_b.contiguous(), types_b.long()
        return hed_jitter(x, rng), inst_b, types_b

    def _distil_batch(self, x: torch.Tensor, inst: torch.Tensor, types: torch.Tensor, rng: np.random.Generator,
                      teacher: torch.nn.Module):
        """The teacher reads each crop as sampled (its own stains, nuclei at their size: where it is
        good); its maps ride through the zoom with the image as extra channels (bilinear, as the image),
        so they stay aligned with the zoomed crop and the masks; only the image then gets the colour
        changes. HV maps are offsets normalised per nucleus, so a zoom leaves their values valid. A
        last all-zero channel comes out 1 where the zoom fell outside the crop (the image's white
        fill): those pixels get no soft target. (Zoomed in, a nucleus cut by the window keeps the
        teacher's HV of the whole nucleus while the supervised HV is recomputed on its visible part:
        the two disagree along the window's edge, a few pixels.)"""
        if self.augment is not None and self.augment.config.symmetries:
            raise ValueError("distillation needs the augmentation's own symmetries off (the batch applies them before "
                             "the teacher reads it): a flip or turn would move the HV channels without swapping them")
        maps = teacher_targets(teacher, x)
        if self.augment is None:
            return hed_jitter(x, rng), inst, types, torch.cat([maps, torch.ones_like(maps[:, :1])], dim=1)
        stacked = torch.cat([x, maps, torch.zeros_like(x[:, :1])], dim=1)
        stacked, inst, types = self.augment.geometric(stacked, inst, types, rng)
        x = self.augment.colour(stacked[:, :3], rng)
        soft = torch.cat([stacked[:, 3:-1], (stacked[:, -1:] < 0.5).float()], dim=1)
        return x, inst.contiguous(), types.long(), soft


@torch.no_grad()
def teacher_targets(teacher: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """B x (1 + 2 + K) maps of the teacher on ``x``: nucleus probability, HV, type probabilities
    (background included). The batch appends a validity channel: the soft targets of
    :func:`distill_losses`."""
    np_logit, hv, tp = (o.float() for o in teacher(x))
    return torch.cat([torch.sigmoid(np_logit), hv, torch.softmax(tp, dim=1)], dim=1)


def distill_losses(out, soft: torch.Tensor) -> dict[str, torch.Tensor]:
    """The student's maps against the teacher's (``soft``: :func:`teacher_targets`, zoomed with the
    crop, plus the validity channel): nucleus BCE to the teacher's probability everywhere valid (its floor is the teacher's own
    entropy, not 0); HV squared error (summed over the two channels) and type KL divergence weighted
    by the teacher's nucleus probability (they only mean something in nuclei)."""
    np_logit, hv, tp = (o.float() for o in out)
    p_t, hv_t, tp_t, valid = soft[:, :1], soft[:, 1:3], soft[:, 3:-1], soft[:, -1:]
    n_valid = valid.sum().clamp_min(1)
    bce = (F.binary_cross_entropy_with_logits(np_logit, p_t.clamp(0, 1), reduction="none") * valid).sum() / n_valid
    w = p_t * valid
    n_w = w.sum().clamp_min(1)
    hv_se = (((hv - hv_t) ** 2).sum(1, keepdim=True) * w).sum() / n_w
    tp_t = tp_t.clamp_min(1e-6)
    kl = ((tp_t * (tp_t.log() - torch.log_softmax(tp, dim=1))).sum(1, keepdim=True) * w).sum() / n_w
    return {"kd_np": bce, "kd_hv": hv_se, "kd_tp": kl}


def add_distillation(ls: dict[str, torch.Tensor], out, soft: torch.Tensor, weight: float, prefix: str = "") -> None:
    """:func:`distill_losses` of ``out`` against ``soft`` into the step's losses ``ls``: their sum times
    ``weight`` onto ``total``, each term logged under ``prefix`` (labelled crops "", unlabelled "u_")."""
    kd = distill_losses(out, soft)
    ls["total"] = ls["total"] + weight * (kd["kd_np"] + kd["kd_hv"] + kd["kd_tp"])
    ls.update({prefix + k: v for k, v in kd.items()})


def hed_jitter(x: torch.Tensor, rng: np.random.Generator, sigma: float = 0.08, bias: float = 0.02) -> torch.Tensor:
    """Stain augmentation (Tellez et al. 2018): scale/shift each HED channel, then brightness/contrast."""
    b = x.shape[0]
    alpha = torch.from_numpy(rng.uniform(1 - sigma, 1 + sigma, (b, 3, 1, 1))).float().to(x.device)
    beta = torch.from_numpy(rng.uniform(-bias, bias, (b, 3, 1, 1))).float().to(x.device)
    y = hed_jitter_torch(x, alpha, beta, unit_vectors=True)
    contrast = torch.from_numpy(rng.uniform(0.9, 1.1, (b, 1, 1, 1))).float().to(x.device)
    bright = torch.from_numpy(rng.uniform(-0.04, 0.04, (b, 1, 1, 1))).float().to(x.device)
    return ((y - 0.5) * contrast + 0.5 + bright).clamp(0, 1)


# --- losses ---------------------------------------------------------------------------
def _sobel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device) / 4.0
    gx = F.conv2d(x, k.view(1, 1, 3, 3), padding=1)
    gy = F.conv2d(x, k.t().contiguous().view(1, 1, 3, 3), padding=1)
    return gx, gy


def balanced_type_weights(pixels: np.ndarray) -> torch.Tensor:
    """Weights for classes ``0..K-1`` (0 = background, kept at 1): each nucleus type 1/sqrt of its share
    of the nucleus pixels, scaled to mean 1 over the types present (so at most the number of types);
    absent types get 1."""
    pixels = np.asarray(pixels, dtype=np.float64)
    w = np.ones(len(pixels))
    nuc = pixels[1:]
    present = nuc > 0
    if present.any():
        share = nuc[present] / nuc[present].sum()
        raw = 1.0 / np.sqrt(share)
        w[1:][present] = raw / raw.mean()
    return torch.tensor(w, dtype=torch.float32)


def losses(out, inst: torch.Tensor, types: torch.Tensor, class_weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """HoVer-Net losses: NP (BCE + Dice), HV (MSE + 2 x gradient MSE in nuclei), TP (CE + Dice);
    ``class_weights`` (per type, optional) weight the type cross-entropy."""
    np_logit, hv, tp = (o.float() for o in out)
    fg = (inst > 0).float()[:, None]
    hv_t = hv_targets(inst)
    p = torch.sigmoid(np_logit)
    l_bce = F.binary_cross_entropy_with_logits(np_logit, fg)
    l_dice = 1 - (2 * (p * fg).sum() + 1) / (p.sum() + fg.sum() + 1)
    l_mse = F.mse_loss(hv, hv_t)
    gxp, _ = _sobel(hv[:, :1])
    _, gyp = _sobel(hv[:, 1:])
    gxt, _ = _sobel(hv_t[:, :1])
    _, gyt = _sobel(hv_t[:, 1:])
    l_msge = (((gxp - gxt) ** 2 + (gyp - gyt) ** 2) * fg).sum() / fg.sum().clamp_min(1)
    valid = types != IGNORE
    target = torch.where(valid, types, 0)
    l_ce = F.cross_entropy(tp, target, weight=class_weights, reduction="none")
    norm = valid.float() if class_weights is None else class_weights[target] * valid
    l_ce = (l_ce * valid).sum() / norm.sum().clamp_min(1)
    prob = torch.softmax(tp, dim=1)
    onehot = F.one_hot(target, tp.shape[1]).permute(0, 3, 1, 2).float() * valid[:, None]
    prob = prob * valid[:, None]
    inter = (prob * onehot).sum(dim=(0, 2, 3))
    l_tdice = (1 - (2 * inter + 1) / (prob.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3)) + 1)).mean()
    total = l_bce + l_dice + l_mse + 2 * l_msge + l_ce + l_tdice
    return {"total": total, "np_bce": l_bce, "np_dice": l_dice, "hv_mse": l_mse, "hv_msge": l_msge,
            "tp_ce": l_ce, "tp_dice": l_tdice}


# --- validation -----------------------------------------------------------------------
def restained_validation(val, k: int) -> dict[str, list]:
    """The validation images as they are, plus re-stained to the ``k`` *training*-role stain-bank
    members with the largest mean stain angle to the reference (benchmark members stay unseen),
    so "best" rewards stain robustness without looking at any test image."""
    from dataclasses import replace

    from ghist_core.imaging.stain import macenko_restain
    from ghist_core.training.stain_bank import load_stain_bank, stain_angle_deg

    sets = {"original": list(val)}
    if k <= 0:
        return sets
    bank = load_stain_bank()
    far = sorted(bank.select("train"), key=lambda m: -float(stain_angle_deg(m.matrix, bank.reference.matrix).mean()))
    for m in far[:k]:
        sets[m.name] = [replace(s, rgb=macenko_restain(s.rgb, m.matrix, m.max_c)) for s in val]
    return sets


def evaluate_sets(maps: dict[str, list], seg: LearnedSegmenter, post: PostProcessConfig, pool) -> dict:
    """``evaluate`` on each validation copy's maps; ``aji`` etc. are means over the copies, per copy AJI kept."""
    per = {name: evaluate(m, seg, post, pool) for name, m in maps.items()}
    out = {key: float(np.mean([r[key] for r in per.values()])) for key in ("aji", "pq", "dice", "aji_mean")}
    if len(per) > 1:
        out.update({f"aji_{name}": r["aji"] for name, r in per.items()})
    return out


def set_maps(seg: LearnedSegmenter, sets: dict[str, list]) -> dict[str, list]:
    """``val_maps`` of every validation copy (the network once per copy; the watershed runs per setting)."""
    return {name: val_maps(seg, val) for name, val in sets.items()}


def _post_counts(args) -> SegCounts:
    from ghist_core.segmentation.postprocess import hv_watershed

    npp, hv, gt, mpp, post = args
    return seg_counts(gt, hv_watershed(npp, hv, mpp, post))


def val_maps(seg: LearnedSegmenter, val) -> list[tuple]:
    """Network maps of each validation image at its native 0.25 µm/px (as ``segment_tile`` uses them)."""
    out = []
    for s in val:
        h, w = s.inst.shape
        work_hw = (int(round(h * DATA_MPP / seg.mpp)), int(round(w * DATA_MPP / seg.mpp)))
        from ghist_core.segmentation.tiling import resample_rgb

        npp, hv, _ = seg.predict_maps(resample_rgb(s.rgb, work_hw))
        if work_hw != (h, w):
            up = lambda a: F.interpolate(torch.from_numpy(a)[None], size=(h, w), mode="bilinear",
                                         align_corners=False)[0].numpy()
            npp, hv = up(npp[None])[0], up(hv)
        out.append((npp, hv, s.inst))
    return out


def evaluate(maps, seg: LearnedSegmenter, post: PostProcessConfig, pool) -> dict:
    seg.post = post
    post_native = seg._post_at(DATA_MPP)
    jobs = [(npp, hv, gt, DATA_MPP, post_native) for npp, hv, gt in maps]
    counts = list(pool.map(_post_counts, jobs)) if pool else [_post_counts(j) for j in jobs]
    pooled = sum(counts, SegCounts())
    return {"aji": pooled.aji, "pq": pooled.pq, "dice": pooled.dice,
            "aji_mean": float(np.mean([c.aji for c in counts]))}


# --- checkpoints ----------------------------------------------------------------------
def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, step: int) -> None:
    """One safetensors file, written whole or not at all, tagged with the training step it holds."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"step": str(step)})
    os.replace(tmp, path)


def _saved_step(path: Path) -> int | None:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        step = (fh.metadata() or {}).get("step")
    return int(step) if step is not None else None


def _tensors_of_step(path: Path, step: int) -> dict[str, torch.Tensor] | None:
    """What :func:`_save_tensors` wrote at ``path``, if it holds ``step``; None when it is missing or of
    another step (a checkpoint cut between its files, or one from before the file existed)."""
    from safetensors.torch import load_file

    if not path.exists() or _saved_step(path) != step:
        return None
    return load_file(str(path))


def save_state(model: SegNet, path: Path, meta: dict) -> None:
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    _save_tensors(state, path, meta["state"]["step"])
    atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=1))


def optimizer_path(last: Path) -> Path:
    return last.with_name(last.stem + ".optim.safetensors")


def save_optimizer(opt: torch.optim.Optimizer, path: Path, step: int) -> None:
    """AdamW's per-parameter moments and step counts, plus torch's generator states (CPU and each
    CUDA device), as tensors (written before the weights and ``last.json``, which says which step is whole)."""
    tensors = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda_rng.{i}": g for i, g in enumerate(torch.cuda.get_rng_state_all())})
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            tensors[f"{i}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
    _save_tensors(tensors, path, step)


def load_optimizer(opt: torch.optim.Optimizer, path: Path, step: int) -> dict[str, torch.Tensor] | None:
    """Restore AdamW's state that :func:`save_optimizer` wrote, if it holds ``step``, and return the
    saved generator states (for :func:`restore_generators`); None (the optimizer starts afresh from
    the saved weights, as before this file existed) when it is missing or of another step."""
    if (tensors := _tensors_of_step(path, step)) is None:
        return None
    generators = {k: tensors.pop(k) for k in list(tensors) if k == "torch_rng" or k.startswith("cuda_rng.")}
    sd = opt.state_dict()
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = v  # load_state_dict moves the moments to each parameter's device
    opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
    return generators


def restore_generators(generators: dict[str, torch.Tensor]) -> None:
    """torch's generators as :func:`save_optimizer` saved them (just before the training loop, after
    anything that draws while setting up, such as a teacher's construction)."""
    torch.set_rng_state(generators["torch_rng"])
    cuda = [generators[k] for k in sorted((k for k in generators if k.startswith("cuda_rng.")),
                                          key=lambda k: int(k.split(".")[1]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


class WeightAverage:
    """An exponential moving average of a network's whole state (weights and BatchNorm statistics),
    updated after every optimizer step (``--ema``): averaging the late iterates of a fine-tune is a
    cheap way to a flatter solution, which tends to hold better off the training stains."""

    def __init__(self, model: SegNet, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"--ema must lie in (0, 1), got {decay}")
        self.decay = decay
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: SegNet) -> None:
        for k, v in model.state_dict().items():
            avg = self.state[k]
            if avg.is_floating_point():
                avg.lerp_(v.detach(), 1.0 - self.decay)
            else:
                avg.copy_(v)

    def network(self, like: SegNet) -> SegNet:
        """A copy of ``like`` holding the average (for validation and checkpoints)."""
        net = copy.deepcopy(like)
        net.load_state_dict(self.state)
        return net

    def save(self, path: Path, step: int) -> None:
        _save_tensors({k: v.detach().cpu().contiguous() for k, v in self.state.items()}, path, step)

    def load(self, path: Path, step: int) -> bool:
        """The average a checkpoint of ``step`` saved; False (it restarts from the current weights) otherwise."""
        if (saved := _tensors_of_step(path, step)) is None:
            return False
        with torch.no_grad():
            for k, v in self.state.items():
                v.copy_(saved[k])
        return True


def average_path(last: Path) -> Path:
    return last.with_name(last.stem + ".ema.safetensors")


def resume_notes(cfg: TrainConfig, state: dict, weights_step: int | None, has_rng: bool, optimizer_restored: bool,
                 average_restored: bool = True) -> list[str]:
    """Why a resumed run will not retrace the unbroken run step for step (empty when it will)."""
    notes = []
    if not average_restored:
        notes.append("the weight average (--ema) restarts from the saved weights (no average of this step)")
    if weights_step is not None and weights_step != state["step"]:
        notes.append(f"last.safetensors holds step {weights_step} but last.json step {state['step']} (stopped "
                     "between writing them): the next epoch is trained again from the later weights")
    if not optimizer_restored:
        notes.append("AdamW restarts from the saved weights (no optimizer state of this step: a checkpoint "
                     "from before optimizer states were saved, or cut between its files)")
    if not has_rng:
        notes.append("the batches differ from an unbroken run's (a checkpoint from before generator states were saved)")
    if state["step"] != state["epoch"] * cfg.steps_per_epoch:
        notes.append("the run stopped inside an epoch (--max-steps or --time-budget), which counted as a whole one")
    if cfg.time_budget_s:
        notes.append("with --time-budget the learning rate follows wall-clock time")
    return notes


def load_state(model: SegNet, path: Path | str) -> None:
    """Weights from a safetensors file into ``model`` (a checkpoint, ``--init`` or a teacher; a bundled
    model's fp16 tensors are widened to float)."""
    from safetensors.torch import load_file

    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()})


def load_teacher(path: str, arch: SegNetConfig, device: torch.device) -> SegNet:
    """A frozen network to distil from: the architecture of its card when one lies beside it (a
    bigger teacher), else the student's. It must work at the student's µm/px (the maps are compared
    pixel for pixel)."""
    card = Path(path).with_suffix(".json")
    if card.exists():
        t_arch = SegNetConfig.from_dict(json.loads(card.read_text())["architecture"])
    else:
        print(f"no card beside {path}: the teacher is assumed to have the student's architecture", flush=True)
        t_arch = arch
    if (abs(t_arch.mpp - arch.mpp) > 1e-9 or tuple(t_arch.type_names) != tuple(arch.type_names)
            or t_arch.n_types != arch.n_types):
        raise ValueError(f"the teacher works at {t_arch.mpp} µm/px with types {list(t_arch.type_names)}; the student "
                         f"at {arch.mpp} µm/px with {list(arch.type_names)}: distillation compares their maps pixel "
                         "for pixel and type for type")
    teacher = SegNet(t_arch).to(device)
    load_state(teacher, path)
    teacher.eval()
    for prm in teacher.parameters():
        prm.requires_grad_(False)
    return teacher


def write_final(model: SegNet, out: Path, result: dict) -> Path:
    """``final.safetensors`` (fp16, small enough to ship) + ``final.json`` card the loader reads."""
    from safetensors.torch import save_file

    from ghist_core.io.hashing import sha256_file
    from ghist_core.weights.card import seal_card

    state = {k: (v.detach().half() if v.is_floating_point() else v.detach()).cpu().contiguous()
             for k, v in model.state_dict().items()}
    path = out / "final.safetensors"
    save_file(state, str(path))
    card = {"name": out.resolve().name, "kind": "segmentation", "architecture": result["architecture"], "postprocess": result["postprocess"],
            "mpp": result["architecture"]["mpp"], "type_names": result["architecture"]["type_names"],
            "validation": result["best_val"], "train_config": result["train_config"],
            "val_tiles": result["val_tiles"], "trained_on": result["device"]}
    card = seal_card(card, sha256_file(path))  # sha256 + card_sha256 + integrity: the loader refuses unsealed cards
    atomic_write_text(out / "final.json", json.dumps(card, indent=1))
    return path


#: settings a resumed run may change: how long it runs and on what, not what it learns
RESUMABLE_CHANGES = ("max_epochs", "time_budget_s", "max_steps", "workers", "device", "out", "data_root")


def config_changes(saved: dict | None, cfg: TrainConfig) -> list[str]:
    """The settings in which ``cfg`` differs from a checkpoint's ``train_config`` (a setting the
    checkpoint predates counts as its default), leaving out :data:`RESUMABLE_CHANGES`."""
    if saved is None:
        return []
    now, default = asdict(cfg), asdict(TrainConfig())
    return sorted(k for k, v in now.items() if k not in RESUMABLE_CHANGES and saved.get(k, default[k]) != v)


def train(cfg: TrainConfig) -> dict:
    t_start = time.time()
    # fork the post-processing workers before CUDA starts (they only run numpy/scipy)
    pool = ProcessPoolExecutor(cfg.workers) if cfg.workers > 1 else None
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = pick_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    arch = SegNetConfig.from_dict({**cfg.arch, "mpp": cfg.mpp})
    model = SegNet(arch).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)

    train_s, val_s, val_native = [], [], []
    for ds, frac in (("consep", cfg.val_fraction), ("monuseg", cfg.val_fraction)):
        native = load_split(cfg.data_root, ds, "train")
        tr, va = split_by_tile(native, frac, cfg.seed)
        val_native += va
        names = {s.name for s in tr}
        train_s += [s for s in load_split(cfg.data_root, ds, "train", mpp=cfg.mpp) if s.name in names]
    data = DeviceData(train_s, cfg, device)
    type_w = data.class_weights(arch.n_types, cfg.type_weights)
    if type_w is not None:
        print(f"type cross-entropy weights {[round(float(v), 3) for v in type_w]}", flush=True)
    print(f"train images {len(train_s)}, validation images {len(val_native)} "
          f"({sorted({s.source_tile for s in val_native})}), crop {data.crop}px at {cfg.mpp} µm/px", flush=True)

    val_sets = restained_validation(val_native, cfg.val_restain)
    if cfg.val_restain:
        print(f"validation also re-stained to {list(val_sets)[1:]}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = {"epoch": 0, "step": 0, "best_aji": -1.0, "elapsed_s": 0.0, "log": []}
    generators = None
    if cfg.init:
        load_state(model, cfg.init)
        print(f"initialised from {cfg.init}", flush=True)
    last = out / "last.safetensors"
    if last.exists():  # resume
        saved = json.loads(last.with_suffix(".json").read_text())
        changed = config_changes(saved.get("train_config"), cfg)
        if changed:
            raise ValueError(f"{out} holds a run with other settings ({', '.join(changed)}): resume it with its own "
                             f"command (its last.json has them), or give --out a new folder")
        load_state(model, last)
        state = saved["state"]
        generators = load_optimizer(opt, optimizer_path(last), state["step"])
        if "rng" in saved:
            rng.bit_generator.state = saved["rng"]
        average = WeightAverage(model, cfg.ema) if cfg.ema else None
        averaged = average is None or average.load(average_path(last), state["step"])
        notes = resume_notes(cfg, state, _saved_step(last), "rng" in saved, generators is not None, averaged)
        print(f"resumed at epoch {state['epoch']} step {state['step']}"
              + "".join(f"\n  not exact: {n}" for n in notes), flush=True)
    else:
        average = WeightAverage(model, cfg.ema) if cfg.ema else None
    if average is not None:
        print(f"validating and keeping a moving average of the weights (decay {cfg.ema} per step)", flush=True)
    unlabelled = None
    if cfg.unlabelled_her2st > 0:
        if not cfg.teacher:
            raise ValueError("--unlabelled-her2st needs --teacher: the unlabelled crops' targets are its maps")
        from ghist_core.training.segmentation_data import her2st_unlabelled

        u_samples = her2st_unlabelled(Path(cfg.data_root).parent / "her2st", cfg.unlabelled_her2st, cfg.mpp)
        unlabelled = DeviceData(u_samples, cfg, device)
        print(f"unlabelled HER2ST crops from {len(u_samples)} regions of {sorted({u.source_tile for u in u_samples})} "
              f"(weight {cfg.unlabelled_weight})", flush=True)
    needs_teacher = cfg.teacher and (cfg.distill_weight > 0 or unlabelled is not None)
    teacher = load_teacher(cfg.teacher, arch, device) if needs_teacher else None
    labelled_teacher = teacher if cfg.distill_weight > 0 else None
    if labelled_teacher is not None:
        print(f"distilling from {cfg.teacher} (weight {cfg.distill_weight})", flush=True)
    n_unlabelled = cfg.unlabelled_batch or max(1, cfg.batch_size // 2)
    log_path = out / "log.jsonl"
    budget = cfg.time_budget_s or float("inf")
    if generators:
        restore_generators(generators)
    elapsed0 = state["elapsed_s"]
    t0 = time.time()
    stop = False
    while state["epoch"] < cfg.max_epochs and not stop:
        model.train()
        sums: dict[str, float] = {}
        n = 0
        for _ in range(cfg.steps_per_epoch):
            el = elapsed0 + time.time() - t0
            frac = min(1.0, el / budget) if math.isfinite(budget) else state["epoch"] / cfg.max_epochs
            warm = min(1.0, (state["step"] + 1) / 200)
            for g in opt.param_groups:
                g["lr"] = cfg.lr * warm * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * frac)))
            x, inst, types, *soft = data.batch(cfg.batch_size, rng, labelled_teacher)
            n_lab = len(x)
            if unlabelled is not None:  # one forward pass over both (BatchNorm sees both domains)
                x_u, _, _, soft_u = unlabelled.batch(n_unlabelled, rng, teacher)
                x = torch.cat([x, x_u])
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast_for(device) if cfg.amp else torch.autocast(device.type, enabled=False):
                outs_all = model(x)
            outs = tuple(o[:n_lab] for o in outs_all)
            ls = losses(outs, inst, types, type_w)
            if soft:
                add_distillation(ls, outs, soft[0], cfg.distill_weight)
            if unlabelled is not None:
                add_distillation(ls, tuple(o[n_lab:] for o in outs_all), soft_u, cfg.unlabelled_weight, prefix="u_")
            opt.zero_grad(set_to_none=True)
            ls["total"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            if average is not None:
                average.update(model)
            state["step"] += 1
            n += 1
            for k, v in ls.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            if (cfg.max_steps and state["step"] >= cfg.max_steps) or elapsed0 + time.time() - t0 >= budget:
                stop = True
                break
        state["epoch"] += 1
        model.eval()
        net = average.network(model) if average is not None else model  # what is validated, kept and shipped
        # LearnedSegmenter folds BatchNorm into a *copy* of the network, so it must be made
        # from the current weights at each validation (one made before training kept scoring
        # the initial weights, and "best" never moved past epoch 1)
        seg = LearnedSegmenter(net, device=str(device))
        scores = evaluate_sets(set_maps(seg, val_sets), seg, PostProcessConfig(), pool)
        state["elapsed_s"] = elapsed0 + time.time() - t0
        rec = {"epoch": state["epoch"], "step": state["step"], "elapsed_s": round(state["elapsed_s"], 1),
               **{k: round(v / max(n, 1), 5) for k, v in sums.items()}, **{f"val_{k}": round(v, 4) for k, v in scores.items()}}
        state["log"].append(rec)
        with open(log_path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)
        meta = {"state": state, "train_config": asdict(cfg), "architecture": arch.to_dict(),
                "rng": rng.bit_generator.state}
        if scores["aji"] > state["best_aji"]:
            state["best_aji"] = scores["aji"]
            save_state(net, out / "best.safetensors", meta)
        save_optimizer(opt, optimizer_path(last), state["step"])
        if average is not None:
            average.save(average_path(last), state["step"])
        save_state(model, last, meta)  # the weights as trained: a resume continues from them

    # tune the watershed on the validation split with the best weights
    load_state(model, out / "best.safetensors")
    model.eval()
    seg = LearnedSegmenter(model, device=str(device))  # a copy of the best weights (see above)
    maps = set_maps(seg, val_sets)
    best_post, best_scores, grid = PostProcessConfig(), None, []
    if cfg.tune_postprocess:
        for npt in (0.4, 0.5, 0.6):
            for mt in (0.0, 0.02, 0.04, 0.06):
                post = PostProcessConfig(np_threshold=npt, marker_threshold=mt)
                sc = evaluate_sets(maps, seg, post, pool)
                grid.append({"np_threshold": npt, "marker_threshold": mt, **{k: round(v, 4) for k, v in sc.items()}})
                print("post", grid[-1], flush=True)
                if best_scores is None or sc["aji"] > best_scores["aji"]:
                    best_post, best_scores = post, sc
    else:
        best_scores = evaluate_sets(maps, seg, best_post, pool)
    if pool:
        pool.shutdown()
    result = {"best_val": best_scores, "postprocess": best_post.to_dict(), "grid": grid, "state": state,
              "train_config": asdict(cfg), "architecture": arch.to_dict(),
              "val_tiles": sorted({s.source_tile for s in val_native}),
              "wall_s": round(time.time() - t_start, 1), "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"}
    atomic_write_text(out / "result.json", json.dumps(result, indent=1))
    write_final(model, out, result)
    print("result", json.dumps({k: result[k] for k in ("best_val", "postprocess", "wall_s")}), flush=True)
    return result


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """The run's ``TrainConfig`` from a command line (``package_segmentation.run_command`` writes one back)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = TrainConfig()
    ap.add_argument("--data-root", default=d.data_root)
    ap.add_argument("--out", default=d.out)
    ap.add_argument("--mpp", type=float, default=d.mpp)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--steps-per-epoch", type=int, default=d.steps_per_epoch)
    ap.add_argument("--max-epochs", type=int, default=d.max_epochs)
    ap.add_argument("--max-steps", type=int, default=d.max_steps)
    ap.add_argument("--time-budget", type=float, default=d.time_budget_s)
    ap.add_argument("--device", default=d.device)
    ap.add_argument("--workers", type=int, default=d.workers)
    ap.add_argument("--no-tune", action="store_true")
    ap.add_argument("--init", default="", help="start from these weights (safetensors)")
    ap.add_argument("--augment", choices=("hed", "stain", "wide"), default=d.augment,
                    help="colour/scale augmentation: HED jitter, the stain-bank augmentation of training.augment, "
                         "or that plus sampled stains and nuclei 0.67-2x their size (AugmentConfig.preset)")
    ap.add_argument("--val-restain", type=int, default=d.val_restain,
                    help="also validate on k re-stained copies of the validation images (training-role stains)")
    ap.add_argument("--type-weights", choices=("", "balanced"), default=d.type_weights,
                    help="weight the type cross-entropy: 'balanced' = 1/sqrt of each type's share of nucleus pixels")
    ap.add_argument("--teacher", default=d.teacher,
                    help="distil from these weights (safetensors): soft targets from each crop before its colour "
                         "and zoom changes, warped with the zoom (for the labelled crops with --distill-weight > 0; "
                         "for the unlabelled ones with --unlabelled-her2st)")
    ap.add_argument("--distill-weight", type=float, default=d.distill_weight,
                    help="weight of the distillation loss next to the supervised one (0 = off)")
    ap.add_argument("--unlabelled-her2st", type=int, default=d.unlabelled_her2st, metavar="SPOTS",
                    help="spots per HER2ST section of a training-role stain read as unlabelled crops, matched to "
                         "--teacher's maps under the augmentation (0 = off)")
    ap.add_argument("--unlabelled-weight", type=float, default=d.unlabelled_weight)
    ap.add_argument("--unlabelled-batch", type=int, default=d.unlabelled_batch,
                    help="unlabelled crops per step (0: half the batch)")
    ap.add_argument("--ema", type=float, default=d.ema, metavar="DECAY",
                    help="validate, keep and ship a moving average of the weights with this decay per step "
                         "(e.g. 0.999; 0 = off)")
    ap.add_argument("--arch", default="{}", help="JSON overrides of SegNetConfig, e.g. '{\"widths\": [8,16,32,64,128]}'")
    a = ap.parse_args(argv)
    cfg = TrainConfig(data_root=a.data_root, out=a.out, mpp=a.mpp, batch_size=a.batch_size, lr=a.lr,
                      steps_per_epoch=a.steps_per_epoch, max_epochs=a.max_epochs, max_steps=a.max_steps,
                      time_budget_s=a.time_budget, device=a.device, workers=a.workers,
                      tune_postprocess=not a.no_tune, arch=json.loads(a.arch), init=a.init,
                      augment=a.augment, val_restain=a.val_restain, type_weights=a.type_weights,
                      teacher=a.teacher, distill_weight=a.distill_weight, unlabelled_her2st=a.unlabelled_her2st,
                      unlabelled_weight=a.unlabelled_weight, unlabelled_batch=a.unlabelled_batch, ema=a.ema)
    return cfg


def main(argv: list[str] | None = None) -> None:
    train(parse_config(argv))


if __name__ == "__main__":
    main()
