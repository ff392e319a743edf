"""HER2ST (Andersson et al. 2021) for GHIST: sections, genes, spot patches, targets, packs.

Data: ``shared/data/her2st`` (no licence stated by the authors: research use, cite the
paper). Only sections B4, C2–C6 (patients B and C) have H&E images, at ≈0.688 µm/px.

Rules stated once here and recorded in the model card:

* **Genes** (:func:`select_genes`): among genes present in all 36 count matrices and detected
  (count > 0) in ≥ 10 % of the spots of the 30 sections *without* an image, the 250 with the
  largest variance of ``log1p(CP10k)`` over those spots. The image sections (the ones we
  train and evaluate on) never influence the choice. Clinical markers present in all six
  imaged sections are appended (predicted by the bundled model, not part of the evaluation).
* **Spot target**: ``log1p(1e4 · counts / spot total over all genes)`` (CP10k, log1p).
* **Cells of a spot**: nucleus centroid within 50 µm of the spot centre.
* **Patches**: 256 × 256 px at 0.5 µm/px (128 µm) centred on each spot, bilinear resampling.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "spot_covariates",
    "imageless_log_expression",
    "IMAGE_SECTIONS",
    "HER2ST_MPP",
    "PROTOCOL_SEGMENTER",
    "UNRECORDED_PACK_SEGMENTER",
    "PROTOCOL_PACK",
    "spot_means",
    "CLINICAL_MARKERS",
    "list_sections",
    "load_counts",
    "load_section",
    "select_genes",
    "log_cp10k",
    "extract_patch",
    "spot_regions",
    "SpotPack",
    "PackSegmenterError",
    "nucleus_type_inputs",
]

IMAGE_SECTIONS: tuple[str, ...] = ("B4", "C2", "C3", "C4", "C5", "C6")
#: The learned segmenter whose nucleus types the clean protocol's packs hold (and so the bundled
#: ghist-her2st was trained on): scripts/prepare_her2st.py's default; the default segmenter since
#: session 10 (docs/DECISIONS.md: the switch rule).
PROTOCOL_SEGMENTER = "nuclei-seg-stain"
#: The segmenter of packs made before the pack recorded it (sessions 4-9 all used this one).
UNRECORDED_PACK_SEGMENTER = "nuclei-seg"
#: Where scripts/prepare_her2st.py writes the protocol's pack (git-ignored), and the scripts read it.
PROTOCOL_PACK = ".gpu_data/her2st/pack_stain.npz"
HER2ST_MPP = 0.688  # from the 200 µm spot pitch ≈ 290.8 px (README of the data)
#: Clinically used markers appended to the HVGs when present in HER2ST.
CLINICAL_MARKERS: tuple[str, ...] = (
    "ERBB2", "GRB7", "ESR1", "PGR", "MKI67", "TOP2A", "EPCAM", "KRT5", "KRT14", "KRT17",
    "KRT8", "KRT18", "CD3E", "CD4", "CD8A", "MS4A1", "CD19", "CD68", "CD163", "PTPRC",
    "FOXP3", "PDCD1", "CD274", "FOXA1", "GATA3", "AR", "VIM", "ACTA2", "PECAM1", "COL1A1",
)


def list_sections(root: str | Path) -> list[str]:
    """All section ids with a count matrix (A1 … H3)."""
    return sorted(p.name.split(".")[0] for p in (Path(root) / "counts").glob("*.tsv.gz"))


def load_counts(root: str | Path, section: str) -> pd.DataFrame:
    """Spots × genes integer counts of one section (index ``<x>x<y>``)."""
    return pd.read_csv(Path(root) / "counts" / f"{section}.tsv.gz", sep="\t", index_col=0)


def load_section(root: str | Path, section: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Counts and spot coordinates aligned by the ``x``/``y`` array position (not row order)."""
    counts = load_counts(root, section)
    spots = pd.read_csv(Path(root) / "spots" / f"{section}_selection.tsv", sep="\t")
    spots.index = spots["x"].astype(int).astype(str) + "x" + spots["y"].astype(int).astype(str)
    spots = spots[~spots.index.duplicated()]
    common = counts.index.intersection(spots.index)
    return counts.loc[common], spots.loc[common]


def log_cp10k(counts: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """The spot target: ``log1p(1e4 · counts / total)`` with the total over *all* genes."""
    return np.log1p(1e4 * np.asarray(counts, dtype=np.float64) / np.maximum(np.asarray(totals, dtype=np.float64), 1.0)[:, None])


def select_genes(
    root: str | Path,
    n_hvg: int = 250,
    min_detect: float = 0.10,
    markers: tuple[str, ...] = CLINICAL_MARKERS,
) -> tuple[list[str], list[str]]:
    """The evaluated HVGs and the clinical markers added for the bundled model (see module doc).

    Returns ``(hvgs, extra_markers)``; markers already among the HVGs are not repeated.
    """
    sections = list_sections(root)
    mats = {s: load_counts(root, s) for s in sections}
    shared = set.intersection(*(set(m.columns) for m in mats.values()))
    genes = sorted(shared)
    select_from = [s for s in sections if s not in IMAGE_SECTIONS]
    x = np.concatenate([mats[s].reindex(columns=genes).to_numpy(np.float64) for s in select_from])
    tot = np.concatenate([mats[s].to_numpy(np.float64).sum(1) for s in select_from])
    detect = (x > 0).mean(0)
    y = log_cp10k(x, tot)
    var = y.var(0)
    var[detect < min_detect] = -np.inf
    order = np.argsort(-var, kind="stable")[:n_hvg]
    hvgs = [genes[i] for i in order]
    imaged = set.intersection(*(set(mats[s].columns) for s in IMAGE_SECTIONS if s in mats))
    extra = [g for g in markers if g in imaged and g not in hvgs]
    return hvgs, extra


def imageless_log_expression(root: str | Path, genes: list[str] | np.ndarray) -> np.ndarray:
    """log1p CP10k of ``genes`` over every spot of the sections *without* an image (30 of 36):
    data no held-out image ever came from, to learn which genes go together (0 where a
    section lacks a gene)."""
    genes = [str(g) for g in genes]
    out = []
    for s in list_sections(root):
        if s in IMAGE_SECTIONS:
            continue
        m = load_counts(root, s)
        out.append(log_cp10k(m.reindex(columns=genes, fill_value=0).to_numpy(np.float64), m.to_numpy(np.float64).sum(1)))
    if not out:
        raise FileNotFoundError(f"no HER2ST count matrix without an image under {root}")
    return np.concatenate(out).astype(np.float32)


def extract_patch(image, x_px: float, y_px: float, src_mpp: float, mpp: float = 0.5, size: int = 256) -> np.ndarray:
    """A ``size``² RGB patch at ``mpp`` centred on ``(x_px, y_px)`` of a PIL image at ``src_mpp``."""
    from PIL import Image

    half = size * mpp / src_mpp / 2.0
    box = (x_px - half, y_px - half, x_px + half, y_px + half)
    return np.asarray(image.transform((size, size), Image.Transform.EXTENT, box, Image.Resampling.BILINEAR, fillcolor=(255, 255, 255)))


def spot_regions(root: str | Path, per_section: int, mpp: float = 0.5, size: int = 256,
                 sections: tuple[str, ...] = IMAGE_SECTIONS):
    """(section, RGB region) for ``per_section`` evenly spaced spots (by array position) of each imaged
    section (of ``sections``): ``size`` px at ``mpp`` centred on the spot; each section decoded once."""
    from PIL import Image

    from ghist_core.io.tiles import evenly_spaced

    root = Path(root)
    Image.MAX_IMAGE_PIXELS = None  # the sections are large, trusted research images
    for section in sections:
        _, table = load_section(root, section)
        table = table.sort_index()
        with Image.open(root / "images" / f"{section}.jpg") as im:
            img = im.convert("RGB")
        for i in evenly_spaced(len(table), per_section):
            yield section, extract_patch(img, table["pixel_x"].iloc[i], table["pixel_y"].iloc[i], HER2ST_MPP, mpp, size)


def encode_jpeg(rgb: np.ndarray, quality: int = 92) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


class PackSegmenterError(ValueError):
    """A spot pack holds another segmenter's nucleus types than a model or a protocol result needs."""


@dataclass
class SpotPack:
    """Everything training needs, in plain arrays (saved as one ``.npz``, no pickle).

    Per spot ``i``: ``jpeg`` bytes ``jpeg_buf[jpeg_off[i]:jpeg_off[i+1]]``, ``instances[i]``
    (uint16 label map, star contours rasterised), ``counts[i]`` (genes), ``totals[i]`` (all
    genes), ``fractions[i]`` (NNLS cell-type fractions), ``features[i]`` (colour/texture for
    the ridge baseline), ``section[i]``, ``patient[i]``, ``array_xy[i]``.
    Per cell ``j``: ``cell_spot[j]``, ``cell_label[j]`` (value in the instance map),
    ``cell_xy_px[j]``, ``cell_in_spot[j]``, ``cell_morph[j]`` (log area µm², eccentricity, solidity),
    and optionally ``cell_inputs[j]``: per-nucleus columns of the segmentation table that a
    model may read (named by ``cell_input_names``, e.g. the learned segmenter's ``prob_<type>``).
    """

    genes: np.ndarray
    n_hvg: int
    cell_types: np.ndarray
    mpp: float
    jpeg_buf: np.ndarray
    jpeg_off: np.ndarray
    instances: np.ndarray
    counts: np.ndarray
    totals: np.ndarray
    fractions: np.ndarray
    features: np.ndarray
    section: np.ndarray
    patient: np.ndarray
    array_xy: np.ndarray
    cell_spot: np.ndarray
    cell_label: np.ndarray
    cell_xy_px: np.ndarray
    cell_in_spot: np.ndarray
    cell_morph: np.ndarray
    cell_inputs: np.ndarray | None = None
    cell_input_names: np.ndarray | None = None
    #: the learned segmenter (bundled weights name) that gave ``cell_inputs``; packs made before it
    #: was recorded all used UNRECORDED_PACK_SEGMENTER
    cell_input_segmenter: str = ""

    def save(self, path: str | Path) -> None:
        from ghist_core.io.atomic import atomic_path

        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                fields = {k: getattr(self, k) for k in self.__dataclass_fields__}
                np.savez_compressed(fh, **{k: v for k, v in fields.items() if v is not None and not (
                    isinstance(v, str) and v == "")})  # unset optional fields are left out, as old packs lack them

    @classmethod
    def load(cls, path: str | Path) -> "SpotPack":
        with np.load(path, allow_pickle=False) as z:
            kw = {k: z[k] for k in cls.__dataclass_fields__ if k in z.files}  # older packs lack cell_inputs
        kw["n_hvg"] = int(kw["n_hvg"])
        kw["mpp"] = float(kw["mpp"])
        if "cell_input_segmenter" in kw:
            kw["cell_input_segmenter"] = str(kw["cell_input_segmenter"])
        elif kw.get("cell_inputs") is not None:
            kw["cell_input_segmenter"] = UNRECORDED_PACK_SEGMENTER
        return cls(**kw)

    def require_segmenter(self, wanted: str | None, *, path, wanted_by: str) -> None:
        """Raise :class:`PackSegmenterError` when this pack's nucleus types come from another
        segmenter than ``wanted`` (a model's training segmenter, or the one a protocol scored), or
        it has none; the model reads those types, so the two must match. ``None``/empty
        ``wanted`` claims nothing."""
        if wanted and self.cell_input_segmenter != wanted:
            have = f"{self.cell_input_segmenter}'s" if self.cell_input_segmenter else "no"
            raise PackSegmenterError(f"{path} holds {have} nucleus types; {wanted_by} {wanted}'s: "
                                     f"pass the --pack made with {wanted}")

    @property
    def n_spots(self) -> int:
        return int(self.counts.shape[0])

    def cell_input_columns(self, names) -> np.ndarray:
        """The ``cell_inputs`` columns ``names`` (n_cells × len(names)); a clear error when absent."""
        have = [str(n) for n in (self.cell_input_names if self.cell_input_names is not None else [])]
        missing = [n for n in names if n not in have]
        if missing or self.cell_inputs is None:
            raise KeyError(f"the pack has no per-cell input(s) {missing}; it has {have} "
                           "(rebuild it with scripts/prepare_her2st.py)")
        return np.ascontiguousarray(self.cell_inputs[:, [have.index(n) for n in names]], dtype=np.float32)

    def images(self) -> np.ndarray:
        """All patches decoded, ``(S, H, W, 3)`` uint8."""
        return np.stack([decode_jpeg(self.jpeg_buf[self.jpeg_off[i]:self.jpeg_off[i + 1]].tobytes()) for i in range(self.n_spots)])

    def coarsened(self, images: np.ndarray, factor: int) -> tuple["SpotPack", np.ndarray]:
        """The pack and its decoded patches at ``factor``× the µm/px (box-averaged pixels, nuclei
        sampled at block centres), for training at a coarser scale at a fraction of the compute."""
        if factor == 1:
            return self, images
        s, h, w, _ = images.shape
        if h % factor or w % factor:
            raise ValueError(f"patch size {h}x{w} is not divisible by {factor}")
        small = images.reshape(s, h // factor, factor, w // factor, factor, 3).mean((2, 4))
        c = factor // 2
        pack = replace(self, instances=np.ascontiguousarray(self.instances[:, c::factor, c::factor]),
                       mpp=self.mpp * factor, cell_xy_px=self.cell_xy_px / factor)
        return pack, np.round(small).astype(np.uint8)

    def targets(self) -> np.ndarray:
        """``log1p(CP10k)`` spot targets (S, G)."""
        return log_cp10k(self.counts, self.totals).astype(np.float32)


def nucleus_type_inputs(pack: SpotPack, images: np.ndarray, segmenter, batch: int = 16,
                        progress=None) -> tuple[np.ndarray, list[str]]:
    """Each pack nucleus' type probabilities under a learned segmenter, exactly as its cell table
    gives them (``prob_<type>``: mean over the nucleus' pixels, renormalised over the types).

    ``images`` are the pack's patches at the segmenter's µm/px; returns (n_cells × types, names).
    """
    from ghist_core.segmentation.features import label_type_probabilities

    n = pack.n_spots
    n_lab = int(pack.instances.max()) + 1
    per_key = np.zeros((n * n_lab, len(segmenter.type_names)))  # row = patch * n_lab + label
    starts = range(0, n, batch)
    for s in (progress(starts) if progress else starts):
        _, _, tp = segmenter.predict_batch(images[s:s + batch])
        b = tp.shape[0]
        key = pack.instances[s:s + b].astype(np.int64) + np.arange(b)[:, None, None] * n_lab
        per_key[s * n_lab:(s + b) * n_lab] = label_type_probabilities(key, tp.transpose(1, 0, 2, 3), b * n_lab)
    v = per_key[pack.cell_spot.astype(np.int64) * n_lab + pack.cell_label.astype(np.int64)]
    return v.astype(np.float32), [f"prob_{t}" for t in segmenter.type_names]


def spot_means(spot: np.ndarray, values: np.ndarray, n_spots: int) -> np.ndarray:
    """Mean of per-cell rows ``values`` (cells × columns) over the cells of each spot (``spot``: each
    cell's spot index), float64, 0 for a spot without cells. One bincount per column, not per cell."""
    spot = np.asarray(spot, np.int64)
    vals = np.asarray(values, np.float64)
    n = np.bincount(spot, minlength=n_spots).astype(np.float64)
    sums = np.stack([np.bincount(spot, weights=vals[:, j], minlength=n_spots) for j in range(vals.shape[1])], 1)
    return sums / np.maximum(n, 1)[:, None]


def spot_covariates(pack: SpotPack, cell_inputs: tuple[str, ...] | list[str] = ()) -> tuple[np.ndarray, list[str]]:
    """What GHIST reads besides the pixels, summarised per spot (S × (1 + E)): the log of
    1 + the number of nuclei within the spot, and the mean of their ``cell_inputs`` columns
    (0 for a spot without nuclei). The baselines get exactly these, so they see the same inputs."""
    sel = pack.cell_in_spot
    spot = pack.cell_spot[sel].astype(np.int64)
    n = np.bincount(spot, minlength=pack.n_spots).astype(np.float64)
    cols = [np.log1p(n)]
    names = ["log1p_nuclei_in_spot"]
    if cell_inputs:
        cols.append(spot_means(spot, pack.cell_input_columns(list(cell_inputs))[sel], pack.n_spots))
        names += [f"mean_{c}" for c in cell_inputs]
    return np.column_stack(cols).astype(np.float32), names


def patch_features(rgb: np.ndarray) -> np.ndarray:
    """Colour and texture descriptors of one patch (the ridge baseline's input, 60 numbers).

    RGB and HED (colour deconvolution) mean/sd/10-50-90th percentiles, grey-level
    co-occurrence statistics at 1/2/4 px (4 angles averaged), uniform-LBP histogram and
    gradient magnitude mean/sd.
    """
    from skimage.color import rgb2gray

    from ghist_core.imaging.stain import hed_deconvolve
    from skimage.feature import graycomatrix, graycoprops, local_binary_pattern
    from skimage.filters import sobel

    def stats(a: np.ndarray) -> list[float]:
        a = a.reshape(-1, a.shape[-1])
        q = np.percentile(a, [10, 50, 90], axis=0)
        return [*a.mean(0), *a.std(0), *q.ravel()]

    f: list[float] = []
    f += stats(rgb.astype(np.float64) / 255.0)
    f += stats(hed_deconvolve(rgb, convention="skimage"))
    grey = rgb2gray(rgb)
    q = np.clip((grey * 32).astype(np.uint8), 0, 31)
    glcm = graycomatrix(q, distances=[1, 2, 4], angles=[0, np.pi / 4, np.pi / 2, 3 * np.pi / 4], levels=32,
                        symmetric=True, normed=True)
    for prop in ("contrast", "dissimilarity", "homogeneity", "energy", "correlation", "ASM"):
        f += list(graycoprops(glcm, prop).mean(1))
    lbp = local_binary_pattern((grey * 255).astype(np.uint8), P=8, R=1, method="uniform")
    f += list(np.bincount(lbp.astype(np.int64).ravel(), minlength=10)[:10] / lbp.size)
    g = sobel(grey)
    f += [float(g.mean()), float(g.std())]
    return np.asarray(f, dtype=np.float32)
