"""GHIST on frozen nucleus features: extract once per view, then train the heads on spots.

Why: with ~1,000 imaged HER2ST spots the encoder cannot be learnt from scratch, and a CPU
cannot afford it either. The nucleus segmenter's network (trained on other data) is
frozen (:mod:`.nuclear_features`); its per-nucleus features are computed once for a few
dihedral views (the views double as augmentation and as test-time averaging) and cached,
so every fold trains in a minute on a CPU. The ST-Net-style baseline gets the same frozen
network, the same views, the same loss on expression and the same epochs, reading the
patch's global features instead of its nuclei: the comparison isolates GHIST's cell-level
design (nucleus pooling, neighbourhood context, reference prior, multi-task heads).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .network import GhistConfig, GhistNet
from .pooling import segment_mean, segment_sum
from .train import _kl, dihedral, pearson_per_gene

__all__ = ["VIEWS", "FeatureBank", "extract_bank", "HeadTrainConfig", "PatchHead", "fit_heads", "predict_bank",
           "nuclear_ghist"]

#: dihedral views (see ``train.dihedral``): identity, 180°, flip, flip + 180°
VIEWS: tuple[int, ...] = (0, 2, 5, 7)


@dataclass
class FeatureBank:
    """Frozen features of every cell of a :class:`~.her2st.SpotPack`, per view.

    ``cell_feat[v, j]`` is pack cell ``j`` seen in view ``views[v]`` (float16);
    ``patch_feat[v, i]`` is spot ``i``'s patch.
    """

    views: np.ndarray
    cell_feat: np.ndarray
    patch_feat: np.ndarray

    def save(self, path: str | Path) -> None:
        from ghist_core.atomic import atomic_path

        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, views=self.views, cell_feat=self.cell_feat, patch_feat=self.patch_feat)

    @classmethod
    def load(cls, path: str | Path) -> "FeatureBank":
        with np.load(path, allow_pickle=False) as z:
            return cls(z["views"], z["cell_feat"], z["patch_feat"])


def nuclear_ghist(pack, seg_card: dict, **cfg_kw) -> GhistNet:
    """An untrained GHIST network over the frozen segmenter, with the segmenter's weights loaded."""
    cfg = GhistConfig(genes=[str(g) for g in pack.genes], cell_types=[str(c) for c in pack.cell_types],
                      mpp=float(pack.mpp), patch_px=int(pack.instances.shape[-1]), encoder="nuclei",
                      seg_arch=dict(seg_card["architecture"]), norm_mean=(0.0, 0.0, 0.0), norm_std=(1.0, 1.0, 1.0),
                      **cfg_kw)
    return GhistNet(cfg)


def _load_segmenter_into(net: GhistNet) -> dict:
    from ghist_core.segmentation.model import load_learned_segmenter

    seg = load_learned_segmenter(device="cpu")
    net.nuclear.seg.load_state_dict(seg.model.state_dict())
    return dict(seg.card)


def extract_bank(pack, images: np.ndarray, net: GhistNet, *, views: tuple[int, ...] = VIEWS, batch_size: int = 16,
                 device: str | torch.device = "cpu", cache_dir: str | Path | None = None,
                 progress: Callable[[float, str], None] | None = None) -> FeatureBank:
    """Frozen features of all pack cells for each view; each finished view is cached (resumable)."""
    dev = torch.device(device)
    ext = net.nuclear.to(dev).eval()
    n_lab = int(pack.instances.max()) + 1
    lut = -np.ones((pack.n_spots, n_lab), np.int64)
    lut[pack.cell_spot, pack.cell_label] = np.arange(len(pack.cell_spot))
    cells, patches = [], []
    total = len(views) * pack.n_spots
    for vi, k in enumerate(views):
        cache = Path(cache_dir) / f"view{k}.npz" if cache_dir else None
        if cache is not None and cache.exists():
            with np.load(cache, allow_pickle=False) as z:
                cells.append(z["cell"])
                patches.append(z["patch"])
            continue
        cf = np.zeros((len(pack.cell_spot), ext.cell_dim), np.float16)
        pf = np.zeros((pack.n_spots, ext.patch_dim), np.float32)
        with torch.no_grad():
            for s in range(0, pack.n_spots, batch_size):
                sl = slice(s, min(s + batch_size, pack.n_spots))
                img = torch.from_numpy(np.ascontiguousarray(images[sl].transpose(0, 3, 1, 2))).to(dev)
                inst = torch.from_numpy(pack.instances[sl].astype(np.int32)).to(dev)
                out = ext(dihedral(img, k).float() / 255.0, dihedral(inst, k))
                rows = lut[s + out["cell_batch"].cpu().numpy(), out["cell_label"].cpu().numpy()]
                ok = rows >= 0
                cf[rows[ok]] = out["cell_feat"].cpu().numpy()[ok].astype(np.float16)
                pf[sl] = out["patch_feat"].cpu().numpy()
                if progress is not None:
                    progress((vi * pack.n_spots + sl.stop) / total, f"view {vi + 1}/{len(views)}: {sl.stop}/{pack.n_spots} patches")
        if cache is not None:
            from ghist_core.atomic import atomic_path

            cache.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(cache) as tmp:
                with open(tmp, "wb") as fh:
                    np.savez(fh, cell=cf, patch=pf)
        cells.append(cf)
        patches.append(pf)
    return FeatureBank(np.asarray(views), np.stack(cells), np.stack(patches))


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
@dataclass
class HeadTrainConfig:
    """Optimisation of the heads (recorded in the model card)."""

    epochs: int = 60
    batch_size: int = 32  # spots per step
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_frac: float = 0.05
    feat_noise: float = 0.1  # Gaussian noise on the standardised frozen features (augmentation)
    w_pcc: float = 0.5
    w_type: float = 0.5
    w_nbhd: float = 0.25
    w_morph: float = 0.1
    seed: int = 0


class PatchHead(nn.Module):
    """ST-Net-style baseline on the frozen network: the patch's global features → spot expression."""

    def __init__(self, in_dim: int, n_genes: int, hidden: int = 128, dropout: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.GELU(),
                                 nn.Dropout(dropout), nn.Linear(hidden, n_genes))
        for name, dim in (("feat_mean", in_dim), ("target_mean", n_genes)):
            self.register_buffer(name, torch.zeros(dim))
        for name, dim in (("feat_std", in_dim), ("target_sd", n_genes)):
            self.register_buffer(name, torch.ones(dim))

    def forward(self, patch_feat: torch.Tensor) -> torch.Tensor:
        """Raw patch features → ``log1p(CP10k)`` of every gene."""
        z = self.net((patch_feat.float() - self.feat_mean) / self.feat_std)
        return z * self.target_sd + self.target_mean


class _CellsBySpot:
    """The pack's cells grouped by patch, so a batch of spots gathers its cells without a loop."""

    def __init__(self, cell_spot: np.ndarray, n_spots: int) -> None:
        self.order = np.argsort(cell_spot, kind="stable")
        self.bounds = np.searchsorted(cell_spot[self.order], np.arange(n_spots + 1))

    def gather(self, spots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pack cell rows of ``spots`` and, per row, its position in ``spots``."""
        start, stop = self.bounds[spots], self.bounds[spots + 1]
        n = stop - start
        local = np.repeat(np.arange(len(spots)), n)
        offs = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        return self.order[np.repeat(start, n) + offs], local


def _lr_at(cfg: HeadTrainConfig, progress: float) -> float:
    if progress < cfg.warmup_frac:
        return cfg.lr * progress / cfg.warmup_frac
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _ghist_cells(net: GhistNet, pack, bank: FeatureBank, cells: _CellsBySpot, spots: np.ndarray, views: np.ndarray,
                 noise: float = 0.0, gen: torch.Generator | None = None) -> tuple[dict, np.ndarray, np.ndarray]:
    """GHIST's per-cell outputs for the cells of ``spots`` (spot ``i`` seen in view index ``views[i]``)."""
    rows, local = cells.gather(spots)
    feat = torch.from_numpy(bank.cell_feat[views[local], rows].astype(np.float32))
    if noise:
        feat = feat + noise * net.cell_feat_std * torch.randn(feat.shape, generator=gen)
    emb = net.embed_cells(feat)
    grp = torch.from_numpy(local)
    ctx, cnt = net.context(emb, torch.from_numpy(pack.cell_xy_px[rows] * pack.mpp).float(), grp)
    patch = net.standardise_patch(torch.from_numpy(bank.patch_feat[views, spots]))
    return net.heads(emb, ctx, cnt, patch[grp]), rows, local


def _aggregate(net: GhistNet, expr: torch.Tensor, seg: torch.Tensor, n: int) -> torch.Tensor:
    """A spot's expression from its cells (see ``GhistConfig.spot_aggregate``)."""
    return (segment_mean if net.cfg.spot_aggregate == "mean" else segment_sum)(expr, seg, n)


def fit_heads(pack, bank: FeatureBank, train_idx: np.ndarray, *, kind: str = "ghist", seg_card: dict | None = None,
              hcfg: HeadTrainConfig | None = None, net_kw: dict | None = None,
              log: Callable[[str], None] | None = print):
    """Train GHIST's heads (``kind="ghist"``) or the matched patch baseline (``"stnet"``) on spots ``train_idx``.

    Everything estimated from data (feature standardisation, morphology standardisation,
    reference profiles, target scale) uses the training spots only.
    """
    from .train import FitResult, reference_prior

    hcfg = hcfg or HeadTrainConfig()
    torch.manual_seed(hcfg.seed)
    gen = torch.Generator().manual_seed(hcfg.seed)
    rng = np.random.default_rng(hcfg.seed)
    train_idx = np.asarray(train_idx)
    y_all = torch.from_numpy(pack.targets())
    y_mean, y_var = y_all[train_idx].mean(0), y_all[train_idx].var(0).clamp(min=1e-3)
    cells = _CellsBySpot(pack.cell_spot, pack.n_spots)
    tr_rows, _ = cells.gather(train_idx)
    n_views = len(bank.views)
    pf = bank.patch_feat[:, train_idx].reshape(-1, bank.patch_feat.shape[-1])
    p_mean, p_std = torch.from_numpy(pf.mean(0)), torch.from_numpy(pf.std(0) + 1e-4)
    cfg_extra: dict = {}
    if kind == "stnet":
        model: nn.Module = PatchHead(bank.patch_feat.shape[-1], len(pack.genes))
        model.feat_mean.copy_(p_mean)
        model.feat_std.copy_(p_std)
        model.target_mean.copy_(y_mean)
        model.target_sd.copy_(y_var.sqrt())
    elif kind == "ghist":
        if seg_card is None:
            raise ValueError("kind='ghist' needs the segmenter's card (its architecture)")
        ref, gene_init, n_per_spot = reference_prior(pack, train_idx)
        net = nuclear_ghist(pack, seg_card, **(net_kw or {}))
        if net.cfg.spot_aggregate == "mean":  # per-cell CP10k profiles, not shares of the spot
            ref, gene_init = ref * n_per_spot, gene_init * n_per_spot
        net.reference.copy_(ref)
        with torch.no_grad():  # as GhistNet's own init with a prior: half reference mixture, half residual
            net.ref_scale.fill_(math.log(0.5))
            net.resid_head.bias.copy_(torch.log(0.5 * gene_init.clamp(min=1e-4)))
        cf = bank.cell_feat[:, tr_rows].reshape(-1, bank.cell_feat.shape[-1]).astype(np.float32)
        net.cell_feat_mean.copy_(torch.from_numpy(cf.mean(0)))
        net.cell_feat_std.copy_(torch.from_numpy(cf.std(0) + 1e-3))
        del cf
        net.patch_feat_mean.copy_(p_mean)
        net.patch_feat_std.copy_(p_std)
        mm = pack.cell_morph[tr_rows].mean(0)
        ms = pack.cell_morph[tr_rows].std(0) + 1e-6
        morph_z = torch.from_numpy((pack.cell_morph - mm) / ms).float()
        frac = torch.from_numpy(pack.fractions.astype(np.float32))
        in_spot_all = torch.from_numpy(pack.cell_in_spot)
        cfg_extra = {"morph_mean": mm.tolist(), "morph_std": ms.tolist(), "mean_cells_per_spot": n_per_spot}
        model = net
    else:
        raise ValueError(f"kind must be 'ghist' or 'stnet', not {kind!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=hcfg.lr, weight_decay=hcfg.weight_decay)
    steps = max(1, math.ceil(len(train_idx) / hcfg.batch_size))
    history = []
    t0 = time.time()
    for epoch in range(hcfg.epochs):
        model.train()
        perm = rng.permutation(train_idx)
        sums: dict[str, float] = {}
        for step in range(steps):
            spots = np.sort(perm[step * hcfg.batch_size:(step + 1) * hcfg.batch_size])
            if len(spots) < 3:
                continue
            for g in opt.param_groups:
                g["lr"] = _lr_at(hcfg, (epoch + step / steps) / hcfg.epochs)
            views = rng.integers(0, n_views, len(spots))
            y = y_all[spots]
            terms: dict[str, torch.Tensor] = {}
            if kind == "stnet":
                feat = torch.from_numpy(bank.patch_feat[views, spots])
                feat = feat + hcfg.feat_noise * p_std * torch.randn(feat.shape, generator=gen)
                pred, has = model(feat), torch.ones(len(spots), dtype=torch.bool)
            else:
                out, rows, local = _ghist_cells(model, pack, bank, cells, spots, views, hcfg.feat_noise, gen)
                grp = torch.from_numpy(local)
                ins = in_spot_all[rows]
                seg = torch.where(ins, grp, torch.full_like(grp, -1))
                has = torch.bincount(grp[ins], minlength=len(spots)) > 0
                pred = torch.log1p(_aggregate(model, out["expr"], seg, len(spots)))
                q = segment_mean(out["type_prob"], seg, len(spots))[has]
                terms["type"] = hcfg.w_type * _kl(frac[spots][has], q.clamp(min=1e-6).log()).mean()
                if ins.any():
                    terms["nbhd"] = hcfg.w_nbhd * _kl(frac[spots][grp[ins]], F.log_softmax(out["nbhd_logits"][ins], 1)).mean()
                terms["morph"] = hcfg.w_morph * ((out["morph"] - morph_z[rows]) ** 2).mean()
            terms["expr"] = (((pred[has] - y[has]) ** 2) / y_var).mean()
            if hcfg.w_pcc and int(has.sum()) > 2:
                terms["pcc"] = hcfg.w_pcc * (1 - pearson_per_gene(pred[has], y[has])).mean()
            loss = sum(terms.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / steps
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) / steps
        sums.update(epoch=epoch + 1, elapsed=round(time.time() - t0, 1))
        history.append(sums)
        if log is not None and ((epoch + 1) % 10 == 0 or epoch == 0):
            log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sums.items()))
    model.eval()
    config = {"kind": kind, **(model.cfg.to_dict() if kind == "ghist" else {}), **cfg_extra}
    return FitResult(model, config, asdict(hcfg), int(len(train_idx)), history)


def predict_bank(model: nn.Module, pack, bank: FeatureBank, spots: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
    """Spot predictions (``log1p(CP10k)``) averaged over the bank's views.

    GHIST: each cell's expression is averaged over the views, then the cells inside a spot
    are summed; the patch baseline averages its outputs.
    """
    model.eval()
    spots = np.asarray(spots)
    cells = _CellsBySpot(pack.cell_spot, pack.n_spots)
    in_spot = torch.from_numpy(pack.cell_in_spot)
    outs = []
    with torch.no_grad():
        for s in range(0, len(spots), batch_size):
            sp = spots[s:s + batch_size]
            if isinstance(model, PatchHead):
                outs.append(torch.stack([model(torch.from_numpy(bank.patch_feat[v, sp])) for v in range(len(bank.views))]).mean(0))
                continue
            acc = None
            for v in range(len(bank.views)):
                out, rows, local = _ghist_cells(model, pack, bank, cells, sp, np.full(len(sp), v))
                acc = out["expr"] if acc is None else acc + out["expr"]
            grp = torch.from_numpy(local)
            seg = torch.where(in_spot[rows], grp, torch.full_like(grp, -1))
            outs.append(torch.log1p(_aggregate(model, acc / len(bank.views), seg, len(sp))))
    return torch.cat(outs).numpy() if outs else np.zeros((0, len(pack.genes)), np.float32)

