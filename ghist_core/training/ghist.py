"""Training GHIST: spot-level (weak) and cell-level supervision, plus the ST-Net-style baseline.

Everything a batch needs lives on the device as tensors (``PatchData``), augmentation runs
on the device too (dihedral flips/rotations, HED stain jitter, brightness/contrast/
saturation), so a few thousand patches train in seconds per epoch on one GPU.

Losses (spot mode), per batch of spot patches:

* expression: ``pred_spot = log1p(Σ_{cells in spot} expr_cell)`` against
  ``log1p(CP10k)``; squared error divided by each gene's training variance (every gene
  counts the same, as in the mean-PCC metric) + ``w_pcc · (1 − Pearson r)`` per gene
  over the batch;
* cell type: KL(spot NNLS fractions ‖ mean type probability of the spot's cells);
* neighbourhood: KL(spot fractions ‖ each in-spot cell's neighbourhood head);
* morphology: squared error of standardised (log area, eccentricity, solidity), all cells.

Cell mode replaces the first three by per-cell ``log1p`` expression error and type
cross-entropy. Patch mode trains :class:`~.network.PatchRegressor` on the standardised
spot targets (plain MSE, as ST-Net).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ghist_core.imaging.stain import hed_jitter_torch
from ghist_core.model.network import GhistNet, PatchRegressor
from ghist_core.model.pooling import segment_mean

__all__ = ["TrainConfig", "PatchData", "Trainer", "FitResult", "augment", "dihedral", "fit_her2st", "make_synthetic_cells",
           "pearson_per_gene", "predict_spots"]

@dataclass
class TrainConfig:
    """Optimisation, augmentation and bookkeeping (recorded in the model card)."""

    mode: str = "spot"  # "spot" | "cell" | "patch"
    epochs: int = 30
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-2
    warmup_frac: float = 0.05
    time_budget_s: float = 0.0  # 0 = no wall-clock limit; else the schedule follows the clock
    amp: bool = True  # bf16 autocast on CUDA only
    seed: int = 0
    w_pcc: float = 0.5
    w_type: float = 0.5
    w_nbhd: float = 0.25
    w_morph: float = 0.1
    hed_sigma: float = 0.05  # multiplicative stain jitter per H/E/D channel
    hed_bias: float = 0.02
    brightness: float = 0.08
    contrast: float = 0.15
    saturation: float = 0.15
    augment: bool = True
    checkpoint_dir: str | None = None
    log_path: str | None = None


@dataclass
class PatchData:
    """Patches and their targets as device tensors.

    ``lut_*`` tables are indexed ``[patch, label]`` (label = value in ``instances``).
    """

    images: torch.Tensor  # (N, 3, H, W) uint8
    instances: torch.Tensor  # (N, H, W) int32
    spot_target: torch.Tensor | None = None  # (N, G) log1p CP10k
    fractions: torch.Tensor | None = None  # (N, K)
    lut_in_spot: torch.Tensor | None = None  # (N, L) bool
    lut_morph: torch.Tensor | None = None  # (N, L, M) standardised
    lut_morph_ok: torch.Tensor | None = None  # (N, L) bool
    lut_expr: torch.Tensor | None = None  # (N, L, G) cell-level expression (linear)
    lut_type: torch.Tensor | None = None  # (N, L) long, -1 = unknown
    lut_inputs: torch.Tensor | None = None  # (N, L, E) per-cell inputs (GhistConfig.cell_inputs)
    extras: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def to(self, device: torch.device) -> "PatchData":
        kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        kw["extras"] = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.extras.items()}
        return PatchData(**kw)

    @classmethod
    def from_pack(cls, pack, index: np.ndarray, images: np.ndarray, morph_mean: np.ndarray, morph_std: np.ndarray,
                  cell_inputs: tuple[str, ...] = ()) -> "PatchData":
        """Select spots ``index`` of a :class:`~.her2st.SpotPack` (``images`` = its decoded patches),
        with the pack's per-cell input columns ``cell_inputs`` as a lookup table."""
        index = np.asarray(index)
        remap = -np.ones(pack.n_spots, np.int64)
        remap[index] = np.arange(len(index))
        keep = remap[pack.cell_spot] >= 0
        cs, cl = remap[pack.cell_spot[keep]], pack.cell_label[keep].astype(np.int64)
        n_lab = int(pack.instances[index].max()) + 1 if len(index) else 1
        in_spot = np.zeros((len(index), n_lab), bool)
        in_spot[cs, cl] = pack.cell_in_spot[keep]
        morph = np.zeros((len(index), n_lab, pack.cell_morph.shape[1]), np.float32)
        morph[cs, cl] = (pack.cell_morph[keep] - morph_mean) / morph_std
        ok = np.zeros((len(index), n_lab), bool)
        ok[cs, cl] = True
        lut_inputs = None
        if cell_inputs:
            vals = pack.cell_input_columns(list(cell_inputs))
            lut = np.zeros((len(index), n_lab, vals.shape[1]), np.float32)
            lut[cs, cl] = vals[keep]
            lut_inputs = torch.from_numpy(lut)
        return cls(
            images=torch.from_numpy(np.ascontiguousarray(images[index].transpose(0, 3, 1, 2))),
            instances=torch.from_numpy(pack.instances[index].astype(np.int32)),
            spot_target=torch.from_numpy(pack.targets()[index]),
            fractions=torch.from_numpy(pack.fractions[index].astype(np.float32)),
            lut_in_spot=torch.from_numpy(in_spot),
            lut_morph=torch.from_numpy(morph),
            lut_morph_ok=torch.from_numpy(ok),
            lut_inputs=lut_inputs,
        )


# --------------------------------------------------------------------------------------------
# augmentation (device side, vectorised over the batch)
# --------------------------------------------------------------------------------------------
def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """One of the 8 rotations/flips of the last two dims (k in 0..7)."""
    if k >= 4:
        x = x.flip(-1)
    return torch.rot90(x, k % 4, dims=(-2, -1))


def augment(rgb: torch.Tensor, inst: torch.Tensor, cfg: TrainConfig, gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random dihedral transform (image and nuclei together), HED jitter, colour jitter.

    ``rgb`` uint8 (B,3,H,W) → float 0..1.
    """
    dev = rgb.device
    b = rgb.shape[0]
    x = rgb.float() / 255.0
    ks = torch.randint(0, 8, (b,), generator=gen, device="cpu")
    xo, io = torch.empty_like(x), torch.empty_like(inst)
    for k in range(8):  # 8 transforms, not a loop over cells or pixels
        sel = torch.nonzero(ks == k).flatten().to(dev)
        if sel.numel():
            xo[sel] = dihedral(x[sel], k)
            io[sel] = dihedral(inst[sel], k)
    x, inst = xo, io
    r = lambda *s: torch.rand(*s, generator=gen, device="cpu").to(dev)  # noqa: E731
    # HED stain jitter in optical-density space
    alpha = 1 + (r(b, 1, 1, 3) * 2 - 1) * cfg.hed_sigma
    beta = (r(b, 1, 1, 3) * 2 - 1) * cfg.hed_bias
    x = hed_jitter_torch(x, alpha, beta)
    # brightness / contrast / saturation
    mean = x.mean((1, 2, 3), keepdim=True)
    c = 1 + (r(b, 1, 1, 1) * 2 - 1) * cfg.contrast
    br = (r(b, 1, 1, 1) * 2 - 1) * cfg.brightness
    x = (x - mean) * c + mean + br
    grey = x.mean(1, keepdim=True)
    s = 1 + (r(b, 1, 1, 1) * 2 - 1) * cfg.saturation
    x = grey + (x - grey) * s
    return x.clamp(0, 1), inst


# --------------------------------------------------------------------------------------------
# losses and metrics
# --------------------------------------------------------------------------------------------
def pearson_per_gene(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson r of every column (gene) over rows (spots or cells)."""
    p = pred - pred.mean(0, keepdim=True)
    t = target - target.mean(0, keepdim=True)
    return (p * t).sum(0) / (p.norm(dim=0) * t.norm(dim=0) + eps)


def _kl(target: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    t = target.clamp(min=1e-6)
    return (t * (t.log() - log_q)).sum(1)


def predict_spots(model: nn.Module, data: PatchData, *, batch_size: int = 32, tta: bool = True,
                  types: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Spot predictions on the ``log1p(CP10k)`` scale for every patch of ``data``.

    GHIST: sum or mean (``spot_aggregate``) of the predicted expression of the cells inside the spot (TTA: cell outputs
    averaged over the 8 dihedral views); patch regressor: its output (TTA-averaged). ``types=True`` (GHIST only)
    also returns each spot's predicted type composition: the mean type probability of its cells (S × K).
    """
    if types and isinstance(model, PatchRegressor):
        raise TypeError("the patch regressor predicts no cell types")
    model.eval()
    dev = data.images.device
    outs = []
    comp = []
    ks = range(8) if tta else range(1)
    with torch.no_grad():
        for s in range(0, len(data), batch_size):
            img = data.images[s : s + batch_size]
            if isinstance(model, PatchRegressor):
                cov = data.extras.get("covariates")
                cov = cov[s : s + batch_size] if cov is not None else None
                z = torch.stack([model(dihedral(img, k), cov) for k in ks]).mean(0)
                outs.append((z * model.target_sd + model.target_mean).float().cpu())
                continue
            inst = data.instances[s : s + batch_size]
            lut = data.lut_inputs[s : s + batch_size] if data.lut_inputs is not None else None
            acc = pacc = None
            for k in ks:
                o = model(dihedral(img, k).float() / 255.0, dihedral(inst, k), lut)
                acc = o["expr"] if acc is None else acc + o["expr"]
                pacc = o["type_prob"] if pacc is None else pacc + o["type_prob"]
            expr = acc / len(ks)
            cb, cl = o["cell_batch"], o["cell_label"]
            in_spot = data.lut_in_spot[s + cb, cl]
            seg = torch.where(in_spot, cb, torch.full_like(cb, -1))
            outs.append(torch.log1p(model.spot_expression(expr, seg, img.shape[0])).float().cpu())
            if types:
                comp.append(segment_mean(pacc / len(ks), seg, img.shape[0]).float().cpu())
    del dev
    if types:
        return torch.cat(outs).numpy(), torch.cat(comp).numpy()
    return torch.cat(outs).numpy()


# --------------------------------------------------------------------------------------------
# trainer
# --------------------------------------------------------------------------------------------
class Trainer:
    """Fits a :class:`GhistNet` (spot or cell mode) or a :class:`PatchRegressor` (patch mode).

    Attributes
    ----------
    history_ : list of per-epoch dicts (loss terms, seconds, learning rate)
    """

    def __init__(self, cfg: TrainConfig, device: torch.device | str = "cpu", log: Callable[[str], None] | None = print) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.log = log or (lambda m: None)
        self.history_: list[dict] = []

    # -- bookkeeping ------------------------------------------------------------------
    def _ckpt_path(self) -> Path | None:
        return Path(self.cfg.checkpoint_dir) / "last.pt" if self.cfg.checkpoint_dir else None

    def _save_ckpt(self, model: nn.Module, opt: torch.optim.Optimizer, epoch: int, elapsed: float) -> None:
        path = self._ckpt_path()
        if path is None:
            return
        from ghist_core.io.atomic import atomic_path

        state = {"model": model.state_dict(), "opt": opt.state_dict(), "epoch": epoch, "elapsed": elapsed,
                 "history": json.dumps(self.history_)}
        with atomic_path(path) as tmp:
            torch.save(state, tmp)

    def _load_ckpt(self, model: nn.Module, opt: torch.optim.Optimizer) -> tuple[int, float]:
        path = self._ckpt_path()
        if path is None or not path.exists():
            return 0, 0.0
        state = torch.load(path, map_location=self.device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        self.history_ = json.loads(state["history"])
        self.log(f"resumed from {path} at epoch {state['epoch']}")
        return int(state["epoch"]), float(state["elapsed"])

    def _write_log(self, rec: dict) -> None:
        if self.cfg.log_path:
            with open(self.cfg.log_path, "a") as fh:
                fh.write(json.dumps(rec) + "\n")

    # -- losses -------------------------------------------------------------------------
    def _loss_ghist(self, model: GhistNet, data: PatchData, idx: torch.Tensor, x: torch.Tensor, inst: torch.Tensor,
                    stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        out = model(x, inst, data.lut_inputs[idx] if data.lut_inputs is not None else None)
        cb, cl = out["cell_batch"], out["cell_label"]
        pidx = idx[cb]
        terms: dict[str, torch.Tensor] = {}
        zero = x.sum() * 0.0
        if data.lut_morph is not None:
            ok = data.lut_morph_ok[pidx, cl]
            tgt = data.lut_morph[pidx, cl]
            terms["morph"] = ((out["morph"] - tgt) ** 2).mean(1)[ok].mean() if ok.any() else zero
        if cfg.mode == "spot":
            b = x.shape[0]
            in_spot = data.lut_in_spot[pidx, cl]
            seg = torch.where(in_spot, cb, torch.full_like(cb, -1))
            n_in = torch.bincount(cb[in_spot], minlength=b)
            has = n_in > 0
            pred = torch.log1p(model.spot_expression(out["expr"], seg, b))[has]
            y = data.spot_target[idx][has]
            terms["expr"] = (((pred - y) ** 2) / stats["var"]).mean() if has.any() else zero
            if has.sum() > 2 and cfg.w_pcc:
                terms["pcc"] = cfg.w_pcc * (1 - pearson_per_gene(pred, y)).mean()
            frac = data.fractions[idx]
            q = segment_mean(out["type_prob"], seg, b)[has]
            terms["type"] = cfg.w_type * _kl(frac[has], q.clamp(min=1e-6).log()).mean() if has.any() else zero
            if in_spot.any():
                terms["nbhd"] = cfg.w_nbhd * _kl(frac[cb[in_spot]], F.log_softmax(out["nbhd_logits"][in_spot], 1)).mean()
        elif cfg.mode == "cell":
            tgt = data.lut_expr[pidx, cl]
            terms["expr"] = (((torch.log1p(out["expr"]) - torch.log1p(tgt)) ** 2) / stats["var"]).mean()
            lab = data.lut_type[pidx, cl]
            if (lab >= 0).any():
                terms["type"] = cfg.w_type * F.cross_entropy(out["type_logits"][lab >= 0], lab[lab >= 0])
        else:
            raise ValueError(f"unknown mode {cfg.mode!r}")
        if "morph" in terms:
            terms["morph"] = cfg.w_morph * terms["morph"]
        return terms

    # -- main loop ----------------------------------------------------------------------
    def fit(self, model: nn.Module, data: PatchData) -> nn.Module:
        """Train ``model`` on ``data`` (moved to the trainer's device); returns the model."""
        cfg = self.cfg
        dev = self.device
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        model.to(dev)
        data = data.to(dev)
        stats: dict[str, torch.Tensor] = {}
        if cfg.mode == "spot" or cfg.mode == "patch":
            stats["mean"] = data.spot_target.mean(0)
            stats["var"] = data.spot_target.var(0).clamp(min=1e-3)
        else:
            le = torch.log1p(data.lut_expr.reshape(-1, data.lut_expr.shape[-1]))
            stats["var"] = le.var(0).clamp(min=1e-3)
        if isinstance(model, PatchRegressor):
            model.register_buffer("target_mean", stats["mean"].clone())
            model.register_buffer("target_sd", stats["var"].sqrt().clone())
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        start_epoch, prev_elapsed = self._load_ckpt(model, opt)
        use_amp = cfg.amp and dev.type == "cuda"
        n = len(data)
        steps_per_epoch = max(1, math.ceil(n / cfg.batch_size))
        t0 = time.time() - prev_elapsed
        for epoch in range(start_epoch, cfg.epochs):
            model.train()
            perm = torch.randperm(n, generator=gen).to(dev)
            sums: dict[str, float] = {}
            te = time.time()
            for step in range(steps_per_epoch):
                idx = perm[step * cfg.batch_size : (step + 1) * cfg.batch_size]
                if idx.numel() < 2:
                    continue
                progress = (epoch + step / steps_per_epoch) / cfg.epochs
                if cfg.time_budget_s:
                    progress = max(progress, (time.time() - t0) / cfg.time_budget_s)
                lr = cfg.lr * (min(1.0, progress / cfg.warmup_frac) if progress < cfg.warmup_frac
                               else 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
                for g in opt.param_groups:
                    g["lr"] = lr
                img, inst = data.images[idx], data.instances[idx]
                if cfg.augment:
                    x, inst = augment(img, inst, cfg, gen)
                else:
                    x = img.float() / 255.0
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                    if isinstance(model, PatchRegressor):
                        cov = data.extras.get("covariates")
                        z = model(x, cov[idx] if cov is not None else None).float()
                        y = (data.spot_target[idx] - stats["mean"]) / stats["var"].sqrt()
                        terms = {"expr": F.mse_loss(z, y)}
                    else:
                        terms = self._loss_ghist(model, data, idx, x, inst, stats)
                loss = sum(terms.values())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), 5.0)
                opt.step()
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            rec = {k: v / steps_per_epoch for k, v in sums.items()}
            rec.update(epoch=epoch + 1, seconds=round(time.time() - te, 2), lr=lr, elapsed=round(time.time() - t0, 1))
            self.history_.append(rec)
            self._write_log(rec)
            self.log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))
            self._save_ckpt(model, opt, epoch + 1, time.time() - t0)
            if cfg.time_budget_s and time.time() - t0 > cfg.time_budget_s:
                self.log(f"stopping at epoch {epoch + 1}: time budget {cfg.time_budget_s:.0f} s used")
                break
        model.eval()
        return model

    def config_dict(self) -> dict:
        return asdict(self.cfg)


# --------------------------------------------------------------------------------------------
# HER2ST recipe (used by scripts/train_ghist.py and bench/her2st.py)
# --------------------------------------------------------------------------------------------
@dataclass
class FitResult:
    """A trained model with what is needed to describe it in a card."""

    model: nn.Module
    config: dict
    train_config: dict
    n_train_spots: int
    history: list


def reference_prior(pack, train_idx: np.ndarray, spot_aggregate: str = "sum") -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per-cell type profiles (K × G) and per-gene starting level, from the training spots only.

    Profiles: NNLS of the spots' CP10k on their type fractions; the starting level is the
    spots' mean CP10k. With ``spot_aggregate="sum"`` both are divided by the mean number of
    nuclei per spot (a spot's cells sum to its CP10k); with "mean" each cell is a whole profile.
    """
    from ghist_core.training.reference import fit_gene_profiles

    train_idx = np.asarray(train_idx)
    in_spot = pack.cell_in_spot & np.isin(pack.cell_spot, train_idx)
    n_per_spot = max(float(np.bincount(pack.cell_spot[in_spot], minlength=pack.n_spots)[train_idx].mean()), 1.0)
    lin = 1e4 * pack.counts[train_idx] / np.maximum(pack.totals[train_idx], 1)[:, None]
    per_cell = n_per_spot if spot_aggregate == "sum" else 1.0
    ref = fit_gene_profiles(pack.fractions[train_idx], lin) / per_cell
    return (torch.tensor(ref, dtype=torch.float32), torch.tensor(lin.mean(0) / per_cell, dtype=torch.float32),
            n_per_spot)


def fit_her2st(pack, images: np.ndarray, train_idx: np.ndarray, *, kind: str = "ghist", tcfg: TrainConfig | None = None,
               net_kw: dict | None = None, device: str | torch.device = "cpu",
               log: Callable[[str], None] | None = print) -> FitResult:
    """Train GHIST (``kind="ghist"``, spot mode) or the ST-Net-style baseline (``"stnet"``) on spots ``train_idx``.

    Everything estimated from data (pixel normalisation, morphology standardisation, the
    per-gene reference profiles from NNLS fractions) uses the training spots only.
    """
    tcfg = tcfg or TrainConfig()
    net_kw = dict(net_kw or {})
    train_idx = np.asarray(train_idx)
    timg = images[train_idx]
    mean = (timg.reshape(-1, 3).mean(0) / 255.0).tolist()
    std = (timg.reshape(-1, 3).astype(np.float32).std(0) / 255.0).tolist()
    cell_sel = np.isin(pack.cell_spot, train_idx)
    mm = pack.cell_morph[cell_sel].mean(0)
    ms = pack.cell_morph[cell_sel].std(0) + 1e-6
    cell_inputs = tuple(net_kw.get("cell_inputs", ()))
    data = PatchData.from_pack(pack, train_idx, images, mm, ms, cell_inputs if kind != "stnet" else ())
    if kind == "stnet":
        widths = tuple(net_kw.get("widths", (32, 64, 128, 256)))
        n_cov = 0
        if net_kw.get("covariates"):  # the same inputs as GHIST: nucleus count + mean type probabilities
            from ghist_core.training.her2st import spot_covariates

            cov, _ = spot_covariates(pack, cell_inputs)
            data.extras["covariates"] = torch.from_numpy(cov[train_idx])
            n_cov = cov.shape[1]
        model: nn.Module = PatchRegressor(len(pack.genes), widths, n_covariates=n_cov)
        model.norm_mean.copy_(torch.tensor(mean).view(1, 3, 1, 1))
        model.norm_std.copy_(torch.tensor(std).view(1, 3, 1, 1))
        if n_cov:
            model.cov_mean.copy_(torch.from_numpy(cov[train_idx].mean(0)))
            model.cov_sd.copy_(torch.from_numpy(cov[train_idx].std(0) + 1e-6))
        cfg_dict = {"kind": "stnet", "widths": list(widths), "covariates": bool(n_cov), "cell_inputs": list(cell_inputs)}
        tcfg = TrainConfig(**{**asdict(tcfg), "mode": "patch"})
    else:
        from ghist_core.model.network import GhistConfig

        cfg = GhistConfig(genes=[str(g) for g in pack.genes], cell_types=[str(c) for c in pack.cell_types],
                          mpp=float(pack.mpp), patch_px=int(pack.instances.shape[-1]),
                          norm_mean=tuple(mean), norm_std=tuple(std), **net_kw)
        ref, gene_init, n_per_spot = reference_prior(pack, train_idx, cfg.spot_aggregate)
        model = GhistNet(cfg, ref, gene_init)
        cfg_dict = cfg.to_dict()
        cfg_dict["morph_mean"] = mm.tolist()
        cfg_dict["morph_std"] = ms.tolist()
        cfg_dict["mean_cells_per_spot"] = n_per_spot
        tcfg = TrainConfig(**{**asdict(tcfg), "mode": "spot"})
    trainer = Trainer(tcfg, device=device, log=log)
    trainer.fit(model, data)
    return FitResult(model, cfg_dict, asdict(tcfg), int(len(train_idx)), trainer.history_)


def make_synthetic_cells(n_patches: int = 16, size: int = 64, n_genes: int = 6, n_types: int = 3,
                         cells_per_patch: int = 8, seed: int = 0) -> tuple[PatchData, np.ndarray]:
    """Generated cell-level data: expression is a known function of each nucleus' colour.

    Nuclei are discs of random colour on a pale background; gene ``g`` of a cell is
    ``exp(2 · w_g · (colour − 0.5))`` (``w`` fixed, returned) and its type is the index of the
    largest of the first ``n_types`` colour mixtures. Used to test cell-level training.
    """
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(n_genes, 3))
    yy, xx = np.mgrid[0:size, 0:size]
    imgs = np.empty((n_patches, size, size, 3), np.uint8)
    inst = np.zeros((n_patches, size, size), np.int32)
    L = cells_per_patch + 1
    lut_expr = np.zeros((n_patches, L, n_genes), np.float32)
    lut_type = -np.ones((n_patches, L), np.int64)
    lut_morph = np.zeros((n_patches, L, 3), np.float32)
    ok = np.zeros((n_patches, L), bool)
    mix = rng.normal(size=(n_types, 3))
    for p in range(n_patches):  # a handful of generated patches
        img = np.empty((size, size, 3), np.float64)
        img[:] = (0.92, 0.80, 0.88)
        img += rng.normal(0, 0.02, img.shape)
        cen = rng.uniform(6, size - 6, size=(cells_per_patch, 2))
        rad = rng.uniform(2.5, 4.5, size=cells_per_patch)
        col = rng.uniform(0.15, 0.85, size=(cells_per_patch, 3))
        d = np.hypot(xx[None] - cen[:, 0, None, None], yy[None] - cen[:, 1, None, None]) / rad[:, None, None]
        d_min = d.min(0)
        owner = d.argmin(0)
        m = d_min <= 1.0
        inst[p][m] = owner[m] + 1
        img[m] = col[owner[m]]
        imgs[p] = np.clip(img * 255, 0, 255).astype(np.uint8)
        present = np.unique(inst[p][inst[p] > 0])
        lut_expr[p, present] = np.exp(2 * (col[present - 1] - 0.5) @ w.T)
        lut_type[p, present] = ((col[present - 1] - 0.5) @ mix.T).argmax(1)
        area = np.bincount(inst[p].ravel(), minlength=L)[present] * 0.25
        lut_morph[p, present, 0] = (np.log(area) - 3.0)
        ok[p, present] = True
    data = PatchData(
        images=torch.from_numpy(imgs.transpose(0, 3, 1, 2).copy()), instances=torch.from_numpy(inst),
        lut_expr=torch.from_numpy(lut_expr), lut_type=torch.from_numpy(lut_type),
        lut_morph=torch.from_numpy(lut_morph), lut_morph_ok=torch.from_numpy(ok),
    )
    return data, w
