"""Helpers tests import by name (a unique module name: ``from conftest import`` is ambiguous once
sub-folders have their own conftest.py). Fixtures stay in conftest.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from ghist_core.paths import shared_data_dir

#: µm/px of the 700 × 700 px demo crop (``small_slide_png``) that several tests predict.
SMALL_SLIDE_MPP = 0.499

SHARED = shared_data_dir()


def load_repo_script(relpath: str):
    """A script of the repo (``bench/…``, ``scripts/…``: not a package) imported as a module."""
    import importlib.util

    import sys

    path = Path(__file__).resolve().parents[1] / relpath
    name = f"_repo_script_{path.parent.name}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while the script runs
    spec.loader.exec_module(mod)
    return mod


def require_shared(*parts: str) -> Path:
    """``<shared data>/<parts>``, or skip the calling test naming the missing folder or file."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        shown = "/".join(("../shared/data", *parts))
        pytest.skip(f"needs {shown} (not present at {path}; set GHIST_SHARED_DATA to the shared data folder)")
    return path


def make_tiny_ghist(folder: Path, seed: int = 0, members: int = 1, **config) -> Path:
    """A small, randomly initialised but real GHIST model saved as safetensors + card.

    Used where the bundled weights would make a test slow; predictions are
    meaningless but every code path (pooling, heads, writing) is the real one.
    ``members`` > 1 adds ensemble members (seeds ``seed + k``) in the same file.
    """
    import torch

    from ghist_core.model import GhistConfig, GhistNet
    from ghist_core.model.predict import save_ghist

    torch.manual_seed(seed)
    cfg = GhistConfig(
        genes=["ERBB2", "ESR1", "CD3E", "KRT5", "MKI67"],
        cell_types=["Malignant", "T", "Fibroblast"],
        widths=(8, 16, 32, 64),
        fpn_dim=16,
        embed_dim=16,
        patch_px=128,
        use_reference=False,
        **config,
    )
    net = GhistNet(cfg)
    others = []
    for k in range(1, members):
        torch.manual_seed(seed + k)
        others.append(GhistNet(cfg))
    return save_ghist(net, folder, {"training": {"data": "none: random weights for tests"}}, members=others)


def nuclei_samples_from_slide(demo_slide, n_tiles: int = 2, side: int = 256, origin: tuple[int, int] = (600, 900)):
    """Labelled training samples cut from the demo slide (truth: the classical segmenter; types cycle
    through 1-4), named like CoNSeP patches."""
    import numpy as np

    from ghist_core.io.slide import open_slide
    from ghist_core.segmentation import ClassicalSegmenter
    from ghist_core.training.segmentation_data import NucleiSample

    classical, out = ClassicalSegmenter(), []
    with open_slide(demo_slide) as s:
        for k in range(n_tiles):
            rgb = np.ascontiguousarray(s.read_region((origin[0] + 300 * k, origin[1]), 0, (side, side))[..., :3])
            inst = classical.segment_tile(rgb, 0.5)[0].astype(np.int32)
            types = np.zeros(int(inst.max()) + 1, np.int64)
            types[1:] = 1 + np.arange(int(inst.max())) % 4
            out.append(NucleiSample(f"train_{k}_000", "consep", f"train_{k}", rgb, inst, types))
    return out


def tiny_nuclei_split(demo_slide, root):
    """A nuclei folder (CoNSeP 4 patches with types, MoNuSeg 2 tiles) cut from the demo slide, truth
    from the classical segmenter: enough for a two-step training run."""
    import json

    import numpy as np
    from PIL import Image

    for ds, n in (("consep", 4), ("monuseg", 2)):
        folder = root / ds / "train"
        folder.mkdir(parents=True)
        for s in nuclei_samples_from_slide(demo_slide, n_tiles=n):
            name = s.name if ds == "consep" else f"TCGA-{s.source_tile}"
            Image.fromarray(s.rgb).save(folder / f"{name}.png")
            Image.fromarray(s.inst.astype(np.uint16)).save(folder / f"{name}.inst.png")
            if ds == "consep":
                (folder / f"{name}.type.json").write_text(json.dumps({str(i): int(s.types[i])
                                                                       for i in range(1, len(s.types))}))
    return root
