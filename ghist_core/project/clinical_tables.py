"""Clinical tables kept in the project exactly as uploaded, with their column mapping (JSON)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from ghist_core.errors import StoreError
from ghist_core.io.hashing import sha256_file
from ghist_core.project.db import ProjectDB, to_json, utc_now
from ghist_core.project.files import copy_verified, sanitize_filename, unlink_quiet

__all__ = ["add_clinical_table", "set_clinical_mapping", "list_clinical_tables", "get_clinical_table"]


def add_clinical_table(db: ProjectDB, source_path: str | os.PathLike, *, name: str,
                       mapping: Mapping[str, Any] | None = None, original_name: str | None = None) -> int:
    """Keep an unchanged copy of a clinical table plus its column mapping (JSON); returns its id."""
    src = Path(source_path)
    display = original_name if original_name is not None else src.name
    safe = sanitize_filename(display)
    if not src.is_file():
        raise StoreError(f"The clinical table '{src.name}' was not found.")
    digest = sha256_file(src)
    rel = f"clinical/{digest[:12]}_{safe}"
    target = db.abspath(rel)
    created = not target.exists()
    if created:
        copy_verified(src, target, digest, display)
    try:
        with db.tx() as c:
            cur = c.execute(
                "INSERT INTO clinical_tables(name, path, original_name, sha256, size_bytes, mapping, added_at) "
                "VALUES (?,?,?,?,?,?,?)",
                (str(name), rel, display, digest, src.stat().st_size, to_json(dict(mapping or {})), utc_now()))
            return int(cur.lastrowid)
    except BaseException:
        if created:
            unlink_quiet(target)
        raise


def set_clinical_mapping(db: ProjectDB, table_id: int, mapping: Mapping[str, Any]) -> None:
    with db.tx() as c:
        if c.execute("UPDATE clinical_tables SET mapping = ? WHERE table_id = ?",
                     (to_json(dict(mapping)), int(table_id))).rowcount == 0:
            raise StoreError(f"There is no clinical table {table_id} in this project.")


def list_clinical_tables(db: ProjectDB) -> pd.DataFrame:
    cur = db.conn().execute(
        "SELECT table_id, name, original_name, path, sha256, size_bytes, mapping, added_at FROM clinical_tables "
        "ORDER BY table_id")
    df = pd.DataFrame([tuple(r) for r in cur.fetchall()], columns=[d[0] for d in cur.description])
    df["mapping"] = [json.loads(m) for m in df["mapping"]]
    return df


def get_clinical_table(db: ProjectDB, table_id: int) -> tuple[Path, dict]:
    """``(absolute path of the unchanged file, mapping)``."""
    row = db.conn().execute("SELECT path, mapping FROM clinical_tables WHERE table_id = ?", (int(table_id),)).fetchone()
    if row is None:
        raise StoreError(f"There is no clinical table {table_id} in this project.")
    return db.abspath(row["path"]), json.loads(row["mapping"])
