"""QuPath annotations (GeoJSON) back in: which cells lie inside a drawn region.

A researcher outlines tumour, stroma or an invasive margin in QuPath and exports the
annotations (File ▸ Export objects ▸ GeoJSON). :func:`read_regions` reads them (Polygon and
MultiPolygon, holes kept, level-0 pixels); :func:`cells_in_regions` gives a boolean mask over
the prediction's cells, so compositions or expression can be restricted to a region.
Detections (nuclei, cells, tiles, e.g. the app's own GeoJSON export) are never regions: they
are skipped, and a file holding only detections is refused with a plain message.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from matplotlib.path import Path as MplPath

from ghist_core import _keys as K
from ghist_core.errors import RegionFileError
from ghist_core.export._common import slide_mpp

__all__ = ["Region", "Regions", "read_regions", "cells_in_regions", "region_mask", "MAX_REGION_BYTES", "MAX_REGION_VERTICES"]

#: largest region file read (bytes): annotation files are kilobytes to a few megabytes; a
#: file of detections for a whole slide is not an annotation file and would only fill memory
MAX_REGION_BYTES = 64 * 1024 * 1024
#: most vertices over all regions of a file
MAX_REGION_VERTICES = 2_000_000
_POLYGONAL = ("Polygon", "MultiPolygon")
#: QuPath's detection kinds: ``properties.objectType`` since QuPath 0.3, the feature's ``id``
#: before; cells and tiles are detections too. Thousands of nucleus outlines are not a region.
_DETECTION_TYPES = frozenset({"detection", "cell", "tile", "PathDetectionObject", "PathCellObject", "PathTileObject"})


@dataclass
class Region:
    """One annotation: its name, class and polygons (each a list of rings, exterior first; (k, 2) px)."""

    name: str
    classification: str
    polygons: list[list[np.ndarray]] = field(default_factory=list)

    def __repr__(self) -> str:
        n_vertices = sum(len(r) for p in self.polygons for r in p)
        return f"<Region {self.name or '(unnamed)'} [{self.classification or 'no class'}]: {len(self.polygons)} polygon(s), {n_vertices} vertices>"


class Regions(list):
    """The regions of a file (a list of :class:`Region`) and, in ``notes``, what was left out of
    it in words, so the reader learns that a mixed file's detections were ignored."""

    def __init__(self, regions: Iterable[Region] = (), *, notes: Sequence[str] = (), n_detections_ignored: int = 0):
        super().__init__(regions)
        self.notes = list(notes)
        self.n_detections_ignored = int(n_detections_ignored)


def _is_detection(feat: dict) -> bool:
    props = feat.get("properties")
    kind = props.get("objectType") if isinstance(props, dict) else None
    legacy_id = feat.get("id")
    return any(isinstance(v, str) and v in _DETECTION_TYPES for v in (kind, legacy_id))


def _ring(raw: Any, where: str) -> np.ndarray:
    try:
        ring = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise RegionFileError(f"{where}: a polygon ring is not a list of [x, y] numbers.") from exc
    if ring.ndim != 2 or ring.shape[1] < 2 or len(ring) < 4:
        raise RegionFileError(f"{where}: a polygon ring needs at least 4 [x, y] positions (closed), got {ring.shape}.")
    if not np.isfinite(ring[:, :2]).all():
        raise RegionFileError(f"{where}: a polygon has coordinates that are not finite numbers.")
    return ring[:, :2]


def _polygons(geometry: Any, where: str) -> list[list[np.ndarray]]:
    if not isinstance(geometry, dict) or "type" not in geometry:
        raise RegionFileError(f"{where}: the geometry is missing or has no 'type'.")
    kind = geometry["type"]
    if kind == "GeometryCollection":
        return [p for g in geometry.get("geometries") or [] if isinstance(g, dict) and g.get("type") in _POLYGONAL
                for p in _polygons(g, where)]
    coords = geometry.get("coordinates")
    if not isinstance(coords, list):
        raise RegionFileError(f"{where}: the {kind} has no 'coordinates' list.")
    polys = [coords] if kind == "Polygon" else coords
    out = []
    for poly in polys:
        if not isinstance(poly, list) or not poly:
            raise RegionFileError(f"{where}: a {kind} has an empty or malformed polygon.")
        out.append([_ring(r, where) for r in poly])
    return out


def _features(doc: Any) -> list[dict]:
    """Features of a FeatureCollection, a single Feature, a bare geometry, or a JSON list of
    features (what older QuPath versions wrote)."""
    if isinstance(doc, list):
        return [f for f in doc if isinstance(f, dict)]
    if not isinstance(doc, dict) or "type" not in doc:
        raise RegionFileError("This is JSON but not GeoJSON: expected a FeatureCollection, a Feature or a geometry.")
    if doc["type"] == "FeatureCollection":
        feats = doc.get("features")
        if not isinstance(feats, list):
            raise RegionFileError("The FeatureCollection has no 'features' list.")
        return [f for f in feats if isinstance(f, dict)]
    if doc["type"] == "Feature":
        return [doc]
    return [{"type": "Feature", "geometry": doc, "properties": {}}]


def read_regions(source: str | os.PathLike | bytes, *, classification: str | Sequence[str] | None = None,
                 max_bytes: int = MAX_REGION_BYTES) -> Regions:
    """Polygonal annotations of a QuPath GeoJSON file (or its bytes), in level-0 pixels.

    ``classification`` keeps only regions of those classes (e.g. ``"Tumor"``). Point and
    line annotations are skipped, and so are detections (QuPath ``objectType`` detection,
    cell or tile: nucleus outlines are not regions); ``.notes`` says how many detections were
    ignored. Raises ``RegionFileError`` for a file over ``max_bytes``, text that is not
    GeoJSON, malformed polygons, a file of detections only, or no polygon at all.
    """
    if isinstance(source, (bytes, bytearray)):
        size, data = len(source), bytes(source)
    else:
        path = Path(source)
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise RegionFileError(f"Cannot read the region file {path.name}: {exc.strerror or exc}.") from exc
        data = None
    if size > max_bytes:
        raise RegionFileError(f"The region file is {size / 2**20:.1f} MiB; region files over {max_bytes / 2**20:.0f} MiB "
                              "are refused. Export only the annotations (not the detections) from QuPath.")
    if data is None:
        data = path.read_bytes()
    try:
        doc = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise RegionFileError(f"The region file is not valid JSON ({type(exc).__name__}). Export it from QuPath as GeoJSON.") from exc
    wanted = {classification} if isinstance(classification, str) else (set(classification) if classification else None)
    regions, n_vertices, n_detections = [], 0, 0
    for i, feat in enumerate(_features(doc)):
        if _is_detection(feat):
            n_detections += 1
            continue
        geometry = feat.get("geometry")
        if not isinstance(geometry, dict) or geometry.get("type") not in (*_POLYGONAL, "GeometryCollection"):
            continue
        props = feat.get("properties") if isinstance(feat.get("properties"), dict) else {}
        cls = props.get("classification")
        cls_name = str(cls.get("name", "")) if isinstance(cls, dict) else (str(cls) if cls else "")
        if wanted is not None and cls_name not in wanted:
            continue
        region = Region(str(props.get("name") or ""), cls_name, _polygons(geometry, f"Feature {i}"))
        n_vertices += sum(len(r) for p in region.polygons for r in p)
        if n_vertices > MAX_REGION_VERTICES:
            raise RegionFileError(f"The region file has more than {MAX_REGION_VERTICES:,} vertices; simplify the annotations in QuPath.")
        if region.polygons:
            regions.append(region)
    which = f" of class {', '.join(sorted(wanted))}" if wanted else ""
    if not regions and n_detections:
        raise RegionFileError(
            f"This file holds {n_detections:,} detection(s) (nucleus or cell outlines) and no Polygon annotation"
            f"{which}: detections are not regions. Export annotations from QuPath instead: select them "
            "(Objects ▸ Select ▸ Select annotations), then File ▸ Export objects ▸ GeoJSON with the selected "
            "objects only.")
    if not regions:
        raise RegionFileError(f"The file has no Polygon or MultiPolygon annotation{which}.")
    notes = [f"{n_detections:,} detection(s) (nucleus or cell outlines) in the file were ignored: only "
             "annotations are regions."] if n_detections else []
    return Regions(regions, notes=notes, n_detections_ignored=n_detections)


def cells_in_regions(xy_px: np.ndarray, regions: Iterable[Region]) -> np.ndarray:
    """Boolean mask over points (level-0 px): inside any region's polygon and outside its holes.

    Each ring tests only the points inside its bounding box (``Path.contains_points``, vectorised)."""
    xy = np.asarray(xy_px, dtype=np.float64).reshape(-1, 2)
    mask = np.zeros(len(xy), dtype=bool)

    def inside(ring: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        lo, hi = ring.min(0), ring.max(0)
        pts = xy[candidates]
        box = np.all((pts >= lo) & (pts <= hi), axis=1)
        hit = np.zeros(len(candidates), dtype=bool)
        if box.any():
            hit[box] = MplPath(ring, closed=True).contains_points(pts[box])
        return candidates[hit]

    everyone = np.arange(len(xy))
    for region in regions:
        for rings in region.polygons:
            found = inside(rings[0], everyone)
            for hole in rings[1:]:
                if found.size:
                    found = np.setdiff1d(found, inside(hole, found), assume_unique=True)
            mask[found] = True
    return mask


def region_mask(adata: Any, source: str | os.PathLike | bytes | Sequence[Region], *, mpp: float | None = None,
                classification: str | Sequence[str] | None = None) -> np.ndarray:
    """Boolean mask over ``adata``'s cells inside the regions of ``source`` (a GeoJSON file, its
    bytes, or regions already read); centroids µm → level-0 px with the slide's ``mpp``.

    ``adata[mask]`` then restricts compositions or expression to the region."""
    regions = source if isinstance(source, (list, tuple)) else read_regions(source, classification=classification)
    xy_px = np.asarray(adata.obsm[K.OBSM_SPATIAL], dtype=np.float64) / slide_mpp(adata, mpp)
    return cells_in_regions(xy_px, regions)
