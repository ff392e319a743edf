"""The GHIST network in plain torch: CNN encoder → nucleus pooling → context → multi-task heads.

Idea (Fu et al., Nature Methods 2025, re-implemented from the paper's description only):
a cell's expression is read from the histology inside and around its nucleus; a
single-cell reference anchors it (expression = cell-type mixture of reference profiles +
a learned non-negative residual); cell type, neighbourhood composition and morphology are
predicted jointly so the small amount of supervision is shared.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ghist_core.model.pooling import pool_cells, radius_neighbour_mean, relabel_batch, segment_mean, segment_sum

__all__ = ["GhistConfig", "GhistNet", "PatchRegressor", "Encoder", "MORPH_FEATURES"]

#: Morphology targets of the morphology head (from the segmentation table).
MORPH_FEATURES: tuple[str, ...] = ("log_area_um2", "eccentricity", "solidity")


@dataclass
class GhistConfig:
    """Architecture and data contract of one GHIST model (saved in its JSON card)."""

    genes: list[str] = field(default_factory=list)
    cell_types: list[str] = field(default_factory=list)
    mpp: float = 0.5  # µm per pixel of the encoder's input
    patch_px: int = 256  # 128 µm at 0.5 µm/px: one 100 µm HER2ST spot fits inside
    widths: tuple[int, ...] = (32, 64, 128, 256)  # encoder stages at strides 4, 8, 16, 32
    fpn_dim: int = 96  # merged feature map (stride 4) that nuclei are pooled from
    fpn_smooth: bool = True  # a 3×3 conv over the merged map (False: ~35% less compute per patch)
    embed_dim: int = 128
    context_radius_um: float = 40.0  # neighbourhood context: mean embedding of cells this close
    nbhd_radius_um: float = 50.0  # neighbourhood composition head: fractions within this radius
    spot_radius_um: float = 50.0  # weak supervision: cell centres within this of a spot centre
    dropout: float = 0.1
    norm_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # on 0..1 RGB
    norm_std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    morph_features: tuple[str, ...] = MORPH_FEATURES
    use_reference: bool = True
    #: how a spot's cells make its prediction: "sum" (each cell a share of the spot's CP10k) or
    #: "mean" (each cell its own CP10k profile; a spot, being library-normalised, their mean)
    spot_aggregate: str = "sum"
    #: a direct path from the patch around a cell to every gene's log-level, so the model
    #: contains the patch regressor and its cell terms model each cell's deviation from it
    tissue_skip: bool = False
    #: per-nucleus columns of the segmentation table read as inputs besides the pixels, e.g. the
    #: learned segmenter's ``prob_<type>``: a nucleus-type call trained on many patients and organs
    #: (CoNSeP, MoNuSeg), which carries across patients better than features learned from a few
    #: HER2ST sections; each cell gets its own, each patch the mean over its cells
    cell_inputs: tuple[str, ...] = ()
    #: a per-gene log-linear term on statistics that carry across patients: the log number of
    #: nuclei within ``context_radius_um`` (cellularity) and, with ``cell_inputs``, the cell's own
    #: and its neighbours' mean inputs; starts at zero
    density_prior: bool = False
    #: training only: the share of patches whose image-derived log-expression terms are dropped,
    #: so the reference and density prior must predict alone there and stay useful on new patients
    image_dropout: float = 0.0

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    @property
    def n_types(self) -> int:
        return len(self.cell_types)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GhistConfig":
        known = {f for f in cls.__dataclass_fields__}
        kw = {k: (tuple(v) if isinstance(v, list) and k not in ("genes", "cell_types") else v)
              for k, v in d.items() if k in known}
        return cls(**kw)


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _Block(nn.Module):
    """Residual basic block (two 3×3 convs)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.skip = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if (stride != 1 or cin != cout) else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.b1(self.c1(x)), inplace=True)
        y = self.b2(self.c2(y))
        return F.relu(y + self.skip(x), inplace=True)


class Encoder(nn.Module):
    """Small ResNet; returns the stage outputs at strides 4, 8, 16, 32."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 256)) -> None:
        super().__init__()
        w0 = widths[0]
        self.stem = nn.Sequential(_conv_bn(3, w0 // 2, 2), _conv_bn(w0 // 2, w0, 1), nn.MaxPool2d(2))
        stages = []
        cin = w0
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(_Block(cin, w, stride), _Block(w, w, 1)))
            cin = w
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outs = []
        for s in self.stages:
            x = s(x)
            outs.append(x)
        return outs


class PatchRegressor(nn.Module):
    """ST-Net-style baseline: the same encoder, global pooling, linear regression of spot expression.

    With ``n_covariates`` it also reads per-patch numbers (e.g. the log nucleus count and the mean
    nucleus type probabilities), standardised by ``cov_mean``/``cov_sd`` and concatenated to the
    pooled image feature, so that it sees the same inputs as GHIST.
    """

    def __init__(self, n_genes: int, widths: tuple[int, ...] = (32, 64, 128, 256), dropout: float = 0.1,
                 n_covariates: int = 0) -> None:
        super().__init__()
        self.encoder = Encoder(widths)
        self.drop = nn.Dropout(dropout)
        self.n_covariates = int(n_covariates)
        self.head = nn.Linear(widths[-1] + self.n_covariates, n_genes)
        self.register_buffer("norm_mean", torch.full((1, 3, 1, 1), 0.5))
        self.register_buffer("norm_std", torch.full((1, 3, 1, 1), 0.25))
        self.register_buffer("cov_mean", torch.zeros(self.n_covariates))
        self.register_buffer("cov_sd", torch.ones(self.n_covariates))

    def forward(self, rgb: torch.Tensor, covariates: torch.Tensor | None = None) -> torch.Tensor:
        """Patches (uint8 or 0..1 float RGB) [+ covariates (B, C)] → standardised expression of every gene."""
        x = rgb.float() / 255.0 if rgb.dtype == torch.uint8 else rgb.float()
        x = (x - self.norm_mean) / self.norm_std
        f = self.drop(self.encoder(x)[-1].mean((2, 3)))
        if self.n_covariates:
            if covariates is None:
                raise ValueError(f"this regressor reads {self.n_covariates} covariates per patch; none were given")
            f = torch.cat([f, (covariates.float() - self.cov_mean) / self.cov_sd], 1)
        return self.head(f)


class GhistNet(nn.Module):
    """Per-cell multi-task GHIST network.

    A cell's expression is ``exp(r_g)`` with the log-residual ``r`` = image terms (cell, context,
    patch) + gene level + the density prior (when configured); with ``use_reference`` it is
    ``exp(ref_scale_g) * (p @ reference)_g + exp(r_g)`` with ``p`` the cell's type probabilities
    and ``reference`` (K × G, non-negative, a buffer saved with the weights), so the type head
    and the reference shape every gene.
    """

    def __init__(self, cfg: GhistConfig, reference: torch.Tensor | None = None,
                 gene_init: torch.Tensor | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        k, g, d = cfg.n_types, cfg.n_genes, cfg.embed_dim
        e = len(cfg.cell_inputs)
        tissue_dim = cfg.widths[-1] + e  # the patch's global feature + the mean of its cells' inputs
        self.encoder = Encoder(cfg.widths)
        self.lateral = nn.ModuleList(nn.Conv2d(w, cfg.fpn_dim, 1) for w in cfg.widths)
        self.smooth = _conv_bn(cfg.fpn_dim, cfg.fpn_dim) if cfg.fpn_smooth else nn.Identity()
        self.cell_mlp = nn.Sequential(
            nn.Linear(cfg.fpn_dim * 2 + 1 + e, d), nn.LayerNorm(d), nn.GELU(), nn.Linear(d, d), nn.GELU()
        )
        self.ctx_mlp = nn.Sequential(nn.Linear(d + 1, d), nn.GELU())
        self.patch_mlp = nn.Sequential(nn.Linear(tissue_dim, d), nn.GELU())
        self.trunk = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(3 * d, d), nn.LayerNorm(d), nn.GELU())
        if cfg.spot_aggregate not in ("sum", "mean"):
            raise ValueError(f"spot_aggregate must be 'sum' or 'mean', not {cfg.spot_aggregate!r}")
        if cfg.tissue_skip:  # starts at zero: training begins from the cell model alone
            self.tissue_head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(tissue_dim, g))
            nn.init.zeros_(self.tissue_head[-1].weight)
            nn.init.zeros_(self.tissue_head[-1].bias)
        if cfg.density_prior:
            # standardised inputs (running statistics saved with the weights): with Adam a weight moves
            # ~lr per step, so a raw log count (~3 ± 0.5) would need more steps than training has
            self.prior_norm = nn.BatchNorm1d(1 + 2 * e, affine=False)
            self.prior_head = nn.Linear(1 + 2 * e, g)
            nn.init.zeros_(self.prior_head.weight)
            nn.init.zeros_(self.prior_head.bias)
        self.type_head = nn.Linear(d, k)
        self.nbhd_head = nn.Linear(d, k)
        self.morph_head = nn.Linear(d, len(cfg.morph_features))
        self.resid_head = nn.Linear(d, g)
        ref = torch.zeros(k, g) if reference is None else reference.detach().float().clone()
        self.register_buffer("reference", ref)
        self.ref_scale = nn.Parameter(torch.full((g,), math.log(0.5) if gene_init is not None else 0.0))
        self.register_buffer("norm_mean", torch.tensor(cfg.norm_mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("norm_std", torch.tensor(cfg.norm_std, dtype=torch.float32).view(1, 3, 1, 1))
        with torch.no_grad():  # start at the training mean: half reference mixture, half residual
            self.resid_head.weight.mul_(0.1)
            if gene_init is not None:
                self.resid_head.bias.copy_(torch.log(0.5 * gene_init.float().clamp(min=1e-4)))
            else:
                self.resid_head.bias.fill_(-2.0)

    # ---- image side -----------------------------------------------------------------
    def normalise(self, rgb: torch.Tensor) -> torch.Tensor:
        """RGB (B,3,H,W), uint8 or float in 0..1 → standardised float."""
        x = rgb.float() / 255.0 if rgb.dtype == torch.uint8 else rgb.float()
        return (x - self.norm_mean) / self.norm_std

    def feature_map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Multi-scale features merged at stride 4 (B, fpn_dim, H/4, W/4) and the patch's global feature."""
        feats = self.encoder(x)
        top = self.lateral[-1](feats[-1])
        for i in range(len(feats) - 2, -1, -1):
            top = F.interpolate(top, size=feats[i].shape[-2:], mode="nearest") + self.lateral[i](feats[i])
        return self.smooth(top), feats[-1].float().mean((2, 3))

    def cell_embeddings(self, x: torch.Tensor, instances: torch.Tensor,
                        cell_inputs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Pool the feature map inside every nucleus of a batch of patches.

        ``cell_inputs`` (B, L, E): the ``cfg.cell_inputs`` columns of the cell with label ``l``
        in patch ``b`` (needed when the config names any). Returns ``emb`` (N, D),
        ``cell_batch``, ``cell_label``, ``centroid_px`` (N, 2: x, y) and ``patch_feat``.
        """
        fmap, patch_feat = self.feature_map(x)
        fmap = fmap.float()  # pool in fp32 even under autocast
        gmap, cell_batch, cell_label = relabel_batch(instances)
        n = int(cell_batch.numel())
        # one pass over the nucleus pixels: features (mean and max) and mask centroids
        both, n_pix, cen = pool_cells(fmap, gmap, n, reduce="mean+max", centroids=True)
        c = fmap.shape[1]
        mean, mx = both[:, :c], both[:, c:]
        area = (n_pix * self.cfg.mpp**2).clamp(min=1e-3).log().unsqueeze(1) / 4.0
        parts = [mean.float(), mx.float(), area]
        if self.cfg.cell_inputs:
            if cell_inputs is None:
                raise ValueError(f"this model reads per-cell inputs {list(self.cfg.cell_inputs)}; none were given")
            extra = cell_inputs[cell_batch, cell_label].float()
            parts.append(extra)
            patch_feat = torch.cat([patch_feat, segment_mean(extra, cell_batch, x.shape[0])], 1)
        emb = self.cell_mlp(torch.cat(parts, 1))
        out = {"emb": emb, "cell_batch": cell_batch, "cell_label": cell_label, "centroid_px": cen, "patch_feat": patch_feat}
        if self.cfg.cell_inputs:
            out["inputs"] = extra
        return out

    # ---- cell side ------------------------------------------------------------------
    def heads(self, emb: torch.Tensor, ctx: torch.Tensor, ctx_count: torch.Tensor, patch_feat: torch.Tensor,
              inputs: torch.Tensor | None = None, ctx_inputs: torch.Tensor | None = None,
              patch_of_cell: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """All per-cell outputs from a cell's embedding, its neighbourhood and its patch (one row per cell).

        ``inputs``/``ctx_inputs``: the cell's ``cell_inputs`` and their neighbourhood mean (when
        configured); ``patch_of_cell``: the patch index of each cell, for ``image_dropout`` in training.
        """
        density = torch.log1p(ctx_count).unsqueeze(1) / 3.0
        c = self.ctx_mlp(torch.cat([ctx, density], 1))
        h = self.trunk(torch.cat([emb, c, self.patch_mlp(patch_feat.float())], 1))
        type_logits = self.type_head(h)
        p = type_logits.float().softmax(1)
        log_img = F.linear(h, self.resid_head.weight).float()  # the image-derived part; the bias is the gene's level
        if self.cfg.tissue_skip:
            log_img = log_img + self.tissue_head(patch_feat.float()).float()
        if self.training and self.cfg.image_dropout > 0 and patch_of_cell is not None:
            n_patch = int(patch_of_cell.max()) + 1 if patch_of_cell.numel() else 0
            keep = (torch.rand(n_patch, device=log_img.device) >= self.cfg.image_dropout)[patch_of_cell]
            log_img = log_img * keep.unsqueeze(1).to(log_img.dtype)
        log_resid = log_img + self.resid_head.bias.float()
        if self.cfg.density_prior:
            z = [density.float()]
            if self.cfg.cell_inputs:
                if inputs is None or ctx_inputs is None:
                    raise ValueError("the density prior of this model needs the cells' inputs and their neighbourhood mean")
                z += [inputs.float(), ctx_inputs.float()]
            log_resid = log_resid + self.prior_head(self.prior_norm(torch.cat(z, 1))).float()
        resid = torch.exp(log_resid.clamp(-15.0, 10.0))  # log-linear per cell
        if self.cfg.use_reference:
            expr = (p @ self.reference) * self.ref_scale.exp() + resid
        else:
            expr = resid
        return {
            "type_logits": type_logits.float(),
            "type_prob": p,
            "nbhd_logits": self.nbhd_head(h).float(),
            "morph": self.morph_head(h).float(),
            "expr": expr,
        }

    def spot_expression(self, expr: torch.Tensor, spot: torch.Tensor, n_spots: int) -> torch.Tensor:
        """A spot's expression from its cells' (``spot`` < 0: not in a spot), per ``spot_aggregate``."""
        return (segment_mean if self.cfg.spot_aggregate == "mean" else segment_sum)(expr, spot, n_spots)

    def context(self, emb: torch.Tensor, xy_um: torch.Tensor, group: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean embedding of the cells within ``context_radius_um`` (same group only)."""
        return radius_neighbour_mean(xy_um, emb, self.cfg.context_radius_um, group=group)

    def forward(self, rgb: torch.Tensor, instances: torch.Tensor,
                cell_inputs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Patches (uint8 or 0..1 float RGB) and their nucleus maps (+ per-cell inputs) → per-cell outputs."""
        x = self.normalise(rgb)
        out = self.cell_embeddings(x, instances, cell_inputs)
        emb = out["emb"].float()
        xy_um = out["centroid_px"].float() * self.cfg.mpp
        inputs = out.get("inputs")
        d = emb.shape[1]
        ctx_all, cnt = self.context(emb if inputs is None else torch.cat([emb, inputs], 1), xy_um, out["cell_batch"])
        out.update(self.heads(emb, ctx_all[:, :d], cnt, out["patch_feat"][out["cell_batch"]], inputs,
                              None if inputs is None else ctx_all[:, d:], out["cell_batch"]))
        return out


def count_parameters(m: nn.Module) -> int:
    return int(sum(p.numel() for p in m.parameters()))
