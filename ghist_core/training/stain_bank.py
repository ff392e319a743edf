"""A bank of H&E stain matrices (Macenko) from every H&E image this project has.

Each member is one source image (or one source tile of a dataset): its two unit OD vectors
(haematoxylin, eosin) and 99th-percentile concentrations, estimated with
``ghist_core.imaging.stain.macenko_stains``. The bank is small JSON (``weights/stain_bank.json``)
with each member's source and licence; the numbers are derived statistics, not images.

Members have a ``role``:

* ``"train"``: for re-staining augmentation during training (CoNSeP and MoNuSeg *train*
  tiles, HER2ST patient C sections C2-C5);
* ``"benchmark"``: held out of the augmentation, used only by the stain-shift benchmark
  (``bench/segmentation.py --only stain_shift``): HER2ST B4 and C6, the CMU-1 SVS and the
  TIAToolbox target image, plus four synthetic extremes derived from the training
  reference (pale, over-stained haematoxylin, blue-shifted, pink-shifted);
* ``"reference"``: the median of the CoNSeP + MoNuSeg train members (test-time normalisation target);
* ``"excluded"``: train estimates more than 30° from the reference (a failed fit on a pale
  JPEG patch), kept for the record, never used.

Test splits (CoNSeP test, MoNuSeg test) are never read here.

    python -m ghist_core.training.stain_bank            # rebuild weights/stain_bank.json
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ghist_core.imaging.stain import macenko_stains
from ghist_core.paths import BUNDLED_WEIGHTS_DIR

BANK_PATH = BUNDLED_WEIGHTS_DIR / "stain_bank.json"

LICENCES = {
    "consep": "Warwick TIA research use (CoNSeP, Graham et al. 2019)",
    "monuseg": "CC BY-NC-SA 4.0 (MoNuSeg, Kumar et al. 2017/2020)",
    "her2st": "none stated by the authors (almaan/her2st; Andersson et al. 2021); derived statistics only",
    "cmu1": "OpenSlide test data, freely redistributable (CMU-1-Small-Region.svs)",
    "tiatoolbox": "BSD-3-Clause (TIAToolbox target image)",
    "synthetic": "derived here from the training reference",
}

#: train members whose H or E vector is further than this from the training reference are
#: marked ``"excluded"`` (failed estimates; kept in the file for the record)
MAX_ANGLE_DEG = 30.0

#: HER2ST sections held out of the augmentation bank for the benchmark (one per patient)
HER2ST_BENCHMARK = ("B4", "C6")


@dataclass
class StainMember:
    """One stain: unit OD rows (H, E) and the concentration scale."""

    name: str
    source: str
    licence: str
    role: str  # "train" | "benchmark" | "reference"
    stain_matrix: list  # 2 x 3
    max_concentrations: list  # 2

    @property
    def matrix(self) -> np.ndarray:
        return np.asarray(self.stain_matrix, dtype=np.float64)

    @property
    def max_c(self) -> np.ndarray:
        return np.asarray(self.max_concentrations, dtype=np.float64)


@dataclass
class StainBank:
    """Members plus the training reference (median of the CoNSeP + MoNuSeg train members)."""

    members: list[StainMember]
    params: dict

    def select(self, role: str) -> list[StainMember]:
        return [m for m in self.members if m.role == role]

    def get(self, name: str) -> StainMember:
        for m in self.members:
            if m.name == name:
                return m
        raise KeyError(f"no stain {name!r} in the bank")

    def arrays(self, role: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """(N x 2 x 3 stain matrices, N x 2 max concentrations) of one role."""
        sel = self.select(role)
        if not sel:
            raise ValueError(f"the stain bank has no members with role {role!r}")
        return np.stack([m.matrix for m in sel]), np.stack([m.max_c for m in sel])

    @property
    def reference(self) -> StainMember:
        return self.get("reference")

    def to_json(self) -> str:
        return json.dumps({"params": self.params, "members": [asdict(m) for m in self.members]}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "StainBank":
        d = json.loads(text)
        return cls([StainMember(**m) for m in d["members"]], d.get("params", {}))


def load_stain_bank(path: str | Path | None = None) -> StainBank:
    """The bundled bank (``weights/stain_bank.json``) or the one at ``path``."""
    return StainBank.from_json(Path(path or BANK_PATH).read_text())


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.maximum(v, 1e-3)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def synthetic_extremes(ref: StainMember) -> list[StainMember]:
    """Four stains well outside the training data, derived from the training reference.

    pale: both stains at 45 % concentration; hema-heavy: haematoxylin x 2.0; blue-shifted:
    both OD vectors absorb more red/green, less blue; pink-shifted: haematoxylin absorbs less
    red and eosin more green (redder/pinker image).
    """
    m, c = ref.matrix, ref.max_c
    lic = LICENCES["synthetic"]

    def mk(name: str, mat: np.ndarray, mc: np.ndarray, what: str) -> StainMember:
        return StainMember(name, f"synthetic: {what}", lic, "benchmark", _unit(mat).round(5).tolist(),
                           np.round(mc, 5).tolist())

    return [
        mk("synthetic-pale", m, c * 0.45, "reference stains at 0.45 x concentration"),
        mk("synthetic-hema-heavy", m, c * np.array([2.0, 1.0]), "haematoxylin concentration x 2"),
        mk("synthetic-blue", m * np.array([1.35, 1.15, 0.6]), c, "OD vectors x (1.35, 1.15, 0.6) per RGB channel"),
        mk("synthetic-pink", m * np.array([0.6, 1.2, 0.9]), c, "OD vectors x (0.6, 1.2, 0.9) per RGB channel"),
    ]


def _read_rgb(path: Path, step: int = 1) -> np.ndarray:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # our own data files (HER2ST JPEGs are ~ 100 Mpx)
    with Image.open(path) as im:
        if step > 1:
            im.draft("RGB", (im.width // step, im.height // step))  # JPEG: decode at reduced size
        return np.asarray(im.convert("RGB"))


def _member(name, source, licence, role, rgb) -> StainMember:
    mat, mc = macenko_stains(rgb)
    return StainMember(name, source, licence, role, np.round(mat, 5).tolist(), np.round(mc, 5).tolist())


def build_stain_bank(shared: Path) -> StainBank:
    """Estimate every member from the shared data folder (``../shared/data``)."""
    import re

    members: list[StainMember] = []
    nuclei = shared / "nuclei"
    for ds in ("consep", "monuseg"):
        files = sorted(p for p in (nuclei / ds / "train").iterdir() if p.suffix in (".png", ".jpg")
                       and not p.name.endswith(".inst.png"))
        tiles: dict[str, list[Path]] = {}
        for p in files:
            m = re.match(r"(.+)_\d{3}$", p.stem) if ds == "consep" else None
            tiles.setdefault(m.group(1) if m else p.stem, []).append(p)
        for tile, paths in tiles.items():
            rgb = np.concatenate([_read_rgb(p).reshape(-1, 1, 3) for p in paths])  # pixels of one tile
            members.append(_member(f"{ds}-{tile}", f"{ds}/train/{tile}*", LICENCES[ds], "train", rgb))
    for p in sorted((shared / "her2st" / "images").glob("*.jpg")):
        role = "benchmark" if p.stem in HER2ST_BENCHMARK else "train"
        members.append(_member(f"her2st-{p.stem}", f"her2st/images/{p.name} (decoded at 1/4 size)",
                               LICENCES["her2st"], role, _read_rgb(p, step=4)))
    from ghist_core.io.slide import open_slide

    with open_slide(shared / "slides" / "CMU-1-Small-Region.svs") as s:
        w, h = s.dimensions
        svs = np.asarray(s.read_region((0, 0), 0, (w, h)))[..., :3]
    members.append(_member("cmu1-svs", "slides/CMU-1-Small-Region.svs", LICENCES["cmu1"], "benchmark", svs))
    members.append(_member("tiatoolbox-target", "slides/tiatoolbox_target_image.png", LICENCES["tiatoolbox"],
                           "benchmark", _read_rgb(shared / "slides" / "tiatoolbox_target_image.png")))
    base = [m for m in members if m.name.startswith(("consep-", "monuseg-"))]
    ref_mat = _unit(np.median(np.stack([m.matrix for m in base]), axis=0))
    ref_c = np.median(np.stack([m.max_c for m in base]), axis=0)
    ref = StainMember("reference", "median of the CoNSeP + MoNuSeg train members", LICENCES["synthetic"],
                      "reference", np.round(ref_mat, 5).tolist(), np.round(ref_c, 5).tolist())
    for m in members:  # a Macenko estimate far from every H&E (e.g. on a pale JPEG patch) is not a stain
        if m.role == "train" and stain_angle_deg(m.matrix, ref_mat).max() > MAX_ANGLE_DEG:
            m.role = "excluded"
    members += [ref] + synthetic_extremes(ref)
    params = {"method": "Macenko (ghist_core.imaging.stain.macenko_stains), od_threshold 0.15, alpha 1",
              "od_convention": "OD = -ln((I + 1) / 256)",
              "roles": {"train": "re-staining augmentation", "benchmark": "stain-shift benchmark only",
                        "reference": "training-set median; target of test-time normalisation",
                        "excluded": f"train estimates > {MAX_ANGLE_DEG} degrees from the reference (failed fits)"}}
    return StainBank(members, params)


def image_stains(images):
    """The stains of one source image (Macenko over all its pieces: a lab's stain belongs to the whole
    slide, not to a 256 px patch), or None for glass, which is then left as it is."""
    try:
        return macenko_stains(images)
    except ValueError:
        return None


def restain_image(rgb: np.ndarray, target: StainMember, source) -> np.ndarray:
    """``rgb`` re-stained to ``target`` from its source image's stains (:func:`image_stains`), the optical
    density the two stains do not explain kept (the stain-shift benchmark's protocol 2); None: as it is."""
    from ghist_core.imaging.stain import macenko_restain

    return rgb if source is None else macenko_restain(rgb, target.matrix, target.max_c, source=source,
                                                      keep_residual=True)


def source_tile_stains(samples) -> dict:
    """:func:`image_stains` of each source tile. ``samples``: ``NucleiSample``-like (``source_tile``, ``rgb``)."""
    tiles: dict[str, list] = {}
    for s in samples:
        tiles.setdefault(s.source_tile, []).append(s.rgb)
    return {tile: image_stains(images) for tile, images in tiles.items()}


def restain_samples(samples, targets, own: dict) -> list:
    """``samples`` re-stained one to one to ``targets`` (members) with :func:`restain_image`, each from its
    source tile's own stains (``own``, :func:`source_tile_stains`)."""
    from dataclasses import replace

    return [replace(s, rgb=restain_image(s.rgb, m, own.get(s.source_tile))) for s, m in zip(samples, targets)]


def stain_angle_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angle in degrees between matching stain vectors of two (…, 2, 3) matrices."""
    cos = np.clip((_unit(a) * _unit(b)).sum(-1), -1, 1)
    return np.degrees(np.arccos(cos))


if __name__ == "__main__":
    from ghist_core.io.atomic import atomic_write_text
    from ghist_core.paths import shared_data_dir

    bank = build_stain_bank(shared_data_dir())
    atomic_write_text(BANK_PATH, bank.to_json())
    ref = bank.reference
    for m in bank.members:
        ang = stain_angle_deg(m.matrix, ref.matrix)
        print(f"{m.name:28s} {m.role:9s} H {np.round(m.matrix[0], 3)} E {np.round(m.matrix[1], 3)} "
              f"max {np.round(m.max_c, 2)} angle to ref H {ang[0]:.1f} E {ang[1]:.1f}")
