"""Exports for the tools researchers already use, and regions back in.

* ``.h5ad`` for scanpy/squidpy with the H&E overview (:func:`write_h5ad`)
* cells × genes tables, CSV (formula-safe) and Parquet (:func:`write_csv`, :func:`write_parquet`)
* nuclei as QuPath detections, GeoJSON in level-0 pixels (:func:`write_geojson`)
* QuPath annotations → a boolean mask over cells (:func:`read_regions`, :func:`region_mask`)
* a project's slides in one call (:func:`export_slide`, :func:`export_project`)
* files prepared on disk for a browser download (:func:`prepare_slide_download`, :func:`prepare_project_zip`)
* a composition restricted to regions (:func:`region_composition`)
"""

from __future__ import annotations

from ghist_core.export.geojson import nucleus_polygons, write_geojson
from ghist_core.export.h5ad import prepare_h5ad, write_h5ad
from ghist_core.export.regions import MAX_REGION_BYTES, Region, cells_in_regions, read_regions, region_mask
from ghist_core.export.downloads import (HOW_TO_OPEN, Download, discard_download, human_size,
                                         prepare_project_zip, prepare_slide_download, write_project_zip)
from ghist_core.export.region_stats import RegionComposition, region_composition
from ghist_core.export.slides import FORMATS, export_project, export_slide, finished_slides
from ghist_core.export.table import cell_table, iter_cell_table, write_csv, write_parquet

__all__ = [
    "write_h5ad", "prepare_h5ad", "cell_table", "iter_cell_table", "write_csv", "write_parquet",
    "nucleus_polygons", "write_geojson", "Region", "read_regions", "cells_in_regions", "region_mask",
    "MAX_REGION_BYTES", "FORMATS", "export_slide", "export_project", "finished_slides",
    "Download", "HOW_TO_OPEN", "prepare_slide_download", "prepare_project_zip", "write_project_zip",
    "discard_download", "human_size", "RegionComposition", "region_composition",
]
