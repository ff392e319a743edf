"""Exports for the tools researchers already use, and regions back in.

* ``.h5ad`` for scanpy/squidpy with the H&E overview (:func:`write_h5ad`)
* cells × genes tables, CSV (formula-safe) and Parquet (:func:`write_csv`, :func:`write_parquet`)
* nuclei as QuPath detections, GeoJSON in level-0 pixels (:func:`write_geojson`)
* QuPath annotations → a boolean mask over cells (:func:`read_regions`, :func:`region_mask`)
* a project's slides in one call (:func:`export_slide`, :func:`export_project`)
"""

from __future__ import annotations

from ghist_core.export.geojson import nucleus_polygons, write_geojson
from ghist_core.export.h5ad import prepare_h5ad, write_h5ad
from ghist_core.export.regions import MAX_REGION_BYTES, Region, cells_in_regions, read_regions, region_mask
from ghist_core.export.slides import FORMATS, export_project, export_slide, finished_slides
from ghist_core.export.table import cell_table, iter_cell_table, write_csv, write_parquet

__all__ = [
    "write_h5ad", "prepare_h5ad", "cell_table", "iter_cell_table", "write_csv", "write_parquet",
    "nucleus_polygons", "write_geojson", "Region", "read_regions", "cells_in_regions", "region_mask",
    "MAX_REGION_BYTES", "FORMATS", "export_slide", "export_project", "finished_slides",
]
