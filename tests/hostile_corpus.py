"""Hostile and broken inputs for GHIST Studio, and a bounded runner for them.

Why: clinicians upload files from scanners and spreadsheets we have never seen, some cut
short by a dropped connection, some renamed, some built to hurt (decompression bombs,
formula injection). Every such file must end in a typed ``GhistError`` (a message the app
shows) or a correct result, within a time and memory bound: never a traceback, a dead
worker or a hung page.

``build_corpus(folder, svs_path)`` writes ≥ 50 cases (slides and clinical tables) and
returns their descriptions. ``run_corpus(cases, folder)`` runs them in a separate Python
process whose address space is capped with ``resource.setrlimit``; each case has a wall
clock bound, after which the process is killed and the case counted as a hang. A case
that raises anything but a ``GhistError`` (or kills the process) counts as a crash.

What a case exercises in the child:

* slides: ``open_slide`` → ``info`` → ``thumbnail(256)`` → ``read_region`` at the corner and
  ``read_region_mpp`` at the centre, then ``Project.add_slide`` into a fresh project (on a
  typed error the project must be left exactly as it was: no file, no row);
* clinical tables: ``read_clinical_table`` (path and bytes) → ``guess_mapping`` →
  ``validate_survival`` when a mapping was found → ``safe_csv_bytes`` (no cell of the
  export may start a spreadsheet formula) → ``Project.add_clinical_table``.

Run ``python tests/hostile_corpus.py`` to build the corpus in a temporary folder and
print the counts.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import random
import resource
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

Expect = Literal["ok", "error", "either"]
Outcome = Literal["ok", "typed_error", "wrong", "crash", "hang"]

#: Wall-clock bound of one case (seconds) and address-space bound of the runner (MiB).
CASE_TIMEOUT_S = 20.0
MEMORY_LIMIT_MB = 3072
_MARK = "@@HOSTILE@@ "


@dataclass
class Case:
    """One hostile input. ``file`` is relative to the corpus folder."""

    name: str
    kind: Literal["slide", "clinical"]
    file: str
    expect: Expect
    mpp: Any = None  # passed to open_slide / add_slide (may itself be hostile: NaN, -1, "abc")
    upload_name: str | None = None  # the name the browser would send (may be hostile)
    ref: str | None = None  # .npy of the expected level-0 RGB region (0, 0, 64, 64)
    dims: tuple[int, int] | None = None  # expected (width, height) at level 0
    rows: int | None = None  # expected data rows of a clinical table
    mapping: dict | None = None  # clinical column mapping to validate with (else guessed)
    note: str = ""


@dataclass
class Result:
    name: str
    outcome: Outcome
    errors: list[str] = field(default_factory=list)  # typed error classes seen (one per step)
    detail: str = ""
    seconds: float = 0.0
    peak_mb: float = 0.0  # peak resident memory of the case (its process, or a preview child it ran)

    @property
    def failed(self) -> bool:
        return self.outcome in ("wrong", "crash", "hang")


# ============================================================================ file builders
def _tiff_ifd_file(
    width: int,
    height: int,
    *,
    data: bytes,
    spp: int = 3,
    bps: int = 8,
    tile: tuple[int, int] | None = None,
    n_chunks: int = 1,
    chunk_bytes: int | None = None,
    rows_per_strip: int | None = None,
    resolution: tuple[int, int] | None = (20000, 1),
    unit: int = 3,
    description: str | None = None,
    next_ifd: int | None = None,
    compression: int = 1,
) -> bytes:
    """A little-endian classic TIFF with one IFD written by hand, so header fields can lie.

    All ``n_chunks`` strips/tiles point at ``data`` (one copy in the file) with byte count
    ``chunk_bytes`` (default ``len(data)``); ``next_ifd`` can point anywhere (loops, EOF).
    """
    SHORT, LONG, RATIONAL, ASCII = 3, 4, 5, 2
    header_len = 8
    desc = (description.encode("latin-1") + b"\0") if description is not None else None
    entries: list[tuple[int, int, int, bytes]] = []

    def add(tag: int, typ: int, values: list[int] | bytes) -> None:
        if typ == ASCII:
            payload = values  # type: ignore[assignment]
            count = len(payload)
        elif typ == SHORT:
            payload = struct.pack(f"<{len(values)}H", *values)
            count = len(values)
        elif typ == LONG:
            payload = struct.pack(f"<{len(values)}I", *values)
            count = len(values)
        else:  # RATIONAL: values is [num, den, num, den, ...]
            payload = struct.pack(f"<{len(values)}I", *values)
            count = len(values) // 2
        entries.append((tag, typ, count, payload))  # type: ignore[arg-type]

    cb = len(data) if chunk_bytes is None else chunk_bytes
    add(256, LONG, [width])
    add(257, LONG, [height])
    add(258, SHORT, [bps] * spp)
    add(259, SHORT, [compression])
    add(262, SHORT, [2 if spp >= 3 else 1])
    if desc is not None:
        add(270, ASCII, desc)
    offsets_tag, counts_tag = (324, 325) if tile else (273, 279)
    if not tile:
        add(273, LONG, [0] * n_chunks)  # patched below
    add(277, SHORT, [spp])
    if not tile:
        add(278, LONG, [rows_per_strip if rows_per_strip is not None else height])
        add(279, LONG, [cb] * n_chunks)
    if resolution is not None:
        add(282, RATIONAL, list(resolution))
        add(283, RATIONAL, list(resolution))
    add(284, SHORT, [1])
    if resolution is not None:
        add(296, SHORT, [unit])
    if tile:
        add(322, LONG, [tile[0]])
        add(323, LONG, [tile[1]])
        add(324, LONG, [0] * n_chunks)
        add(325, LONG, [cb] * n_chunks)
    entries.sort(key=lambda e: e[0])
    ifd_len = 2 + 12 * len(entries) + 4
    extra_start = header_len + ifd_len
    # lay out out-of-line values, then the pixel data
    layout: list[tuple[int, int, int, bytes, int | None]] = []
    pos = extra_start
    for tag, typ, count, payload in entries:
        if len(payload) > 4:
            layout.append((tag, typ, count, payload, pos))
            pos += len(payload) + (len(payload) & 1)
        else:
            layout.append((tag, typ, count, payload, None))
    data_off = pos
    # patch the offsets with the data position
    patched = []
    for tag, typ, count, payload, off in layout:
        if tag == offsets_tag:
            payload = struct.pack(f"<{count}I", *([data_off] * count))
        patched.append((tag, typ, count, payload, off))
    out = bytearray(b"II*\x00" + struct.pack("<I", header_len))
    out += struct.pack("<H", len(patched))
    for tag, typ, count, payload, off in patched:
        val = struct.pack("<I", off) if off is not None else payload.ljust(4, b"\0")
        out += struct.pack("<HHI", tag, typ, count) + val
    out += struct.pack("<I", 0 if next_ifd is None else next_ifd)
    for tag, typ, count, payload, off in patched:
        if off is not None:
            out += payload + (b"\0" if len(payload) & 1 else b"")
    assert len(out) == data_off, (len(out), data_off)
    out += data
    return bytes(out)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _png_bomb(width: int, height: int, *, rows_encoded: int = 64) -> bytes:
    """A PNG declaring ``width`` x ``height`` whose IDAT holds a few zero rows (kilobytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    raw_rows = rows_encoded * (1 + 3 * width)
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(b"\0" * min(raw_rows - i, 1 << 20)) for i in range(0, raw_rows, 1 << 20))
    body += comp.flush()
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")


def _zlib_zero_rows(row: bytes, n_rows: int) -> bytes:
    """A valid zlib stream of ``row`` repeated ``n_rows`` times, built in milliseconds.

    Each row is compressed after a full flush, so every row's bytes are identical and are
    simply repeated; the Adler-32 trailer is computed over the real data.
    """
    c = zlib.compressobj(9)
    first = c.compress(row) + c.flush(zlib.Z_FULL_FLUSH)
    again = c.compress(row) + c.flush(zlib.Z_FULL_FLUSH)
    adler = 1
    for _ in range(n_rows):
        adler = zlib.adler32(row, adler)
    return first + again * (n_rows - 1) + b"\x03\x00" + struct.pack(">I", adler & 0xFFFFFFFF)


def _png_big_blank(width: int, height: int) -> bytes:
    """A real ``width`` x ``height`` black RGB PNG (every row present), about 70 bytes per row."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = _zlib_zero_rows(b"\0" * (1 + 3 * width), height)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _tiff_page_chain(n_pages: int) -> bytes:
    """A classic TIFF of ``n_pages`` 4 x 4 grey pages in one IFD chain (a stack, not a slide)."""
    ifd_len = 2 + 12 * 9 + 4
    data_off = 8 + n_pages * ifd_len
    out = bytearray(b"II*\x00" + struct.pack("<I", 8))
    for i in range(n_pages):
        nxt = 8 + (i + 1) * ifd_len if i + 1 < n_pages else 0
        tags = [(256, 3, 4), (257, 3, 4), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, data_off),
                (277, 3, 1), (278, 3, 4), (279, 4, 16)]
        out += struct.pack("<H", len(tags))
        for tag, typ, val in tags:
            out += struct.pack("<HHI", tag, typ, 1) + (struct.pack("<HH", val, 0) if typ == 3 else struct.pack("<I", val))
        out += struct.pack("<I", nxt)
    return bytes(out + bytes(16))


def _bitflip(data: bytes, seed: int, n_flips: int, lo: int = 0, hi: int | None = None) -> bytes:
    rng = random.Random(seed)
    b = bytearray(data)
    hi = len(b) if hi is None else hi
    for _ in range(n_flips):
        i = rng.randrange(lo, hi)
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def _he_image(w: int, h: int, seed: int = 0) -> np.ndarray:
    """Small H&E-like RGB (pink stroma, purple dots on glass): content for generated slides."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 245, np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    tissue = (xx > w // 8) & (xx < 7 * w // 8) & (yy > h // 8) & (yy < 7 * h // 8)
    img[tissue] = (225, 130, 175)
    nuclei = tissue & ((np.sin(xx / 5.0) * np.cos(yy / 6.0)) > 0.8)
    img[nuclei] = (80, 50, 140)
    noise = rng.integers(-5, 6, size=img.shape)
    return np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)


# ============================================================================ the corpus
def build_corpus(folder: str | os.PathLike, svs_path: str | os.PathLike) -> list[Case]:
    """Write every hostile case into ``folder`` and return their descriptions (≥ 50)."""
    import tifffile
    from PIL import Image

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []

    def put(name: str, data: bytes) -> str:
        p = root / name
        p.write_bytes(data)
        return name

    def slide(name: str, file: str, expect: Expect, **kw: Any) -> None:
        cases.append(Case(name=name, kind="slide", file=file, expect=expect, **kw))

    def clin(name: str, file: str, expect: Expect, **kw: Any) -> None:
        cases.append(Case(name=name, kind="clinical", file=file, expect=expect, **kw))

    # ---------------------------------------------------------------- the real SVS
    svs = Path(svs_path).read_bytes()
    n = len(svs)
    import openslide

    with openslide.OpenSlide(str(svs_path)) as o:
        svs_dims = tuple(int(v) for v in o.dimensions)
        ref = np.asarray(o.read_region((0, 0), 0, (64, 64)).convert("RGB"))
    np.save(root / "svs_ref.npy", ref)
    slide("svs_control", put("control.svs", svs), "ok", ref="svs_ref.npy", dims=svs_dims)
    slide("svs_named_tif", put("scan.tif", svs), "ok", ref="svs_ref.npy", dims=svs_dims)
    slide("svs_named_png", put("scan_png.png", svs), "ok", ref="svs_ref.npy", dims=svs_dims)
    slide("svs_named_jpg", put("scan_jpg.jpg", svs), "ok", ref="svs_ref.npy", dims=svs_dims)
    slide("svs_no_extension", put("scan_noext", svs), "ok", ref="svs_ref.npy", dims=svs_dims)
    for frac in (0.0001, 0.003, 0.05, 0.3, 0.6, 0.9, 0.999):
        cut = max(1, int(n * frac))
        slide(f"svs_truncated_{frac:g}", put(f"trunc_{frac:g}.svs", svs[:cut]), "error", note=f"first {cut} bytes")
    slide("svs_truncated_minus1", put("trunc_m1.svs", svs[:-1]), "error")
    slide("svs_tail_zeroed", put("tail_zero.svs", svs[: n // 2] + b"\0" * (n - n // 2)), "either")
    slide("svs_flip_magic", put("flip_magic.svs", b"JJ" + svs[2:]), "error")
    slide("svs_flip_header", put("flip_header.svs", _bitflip(svs, 1, 8, 0, 4096)), "either")
    # bit flips in the first tiles' JPEG data (offset 16 .. 200 kB) and across the whole file
    for seed in (2, 3, 4):
        slide(f"svs_flip_tiles_{seed}", put(f"flip_tiles_{seed}.svs", _bitflip(svs, seed, 40, 16, 200_000)), "either")
    for seed in (5, 6):
        slide(f"svs_flip_anywhere_{seed}", put(f"flip_any_{seed}.svs", _bitflip(svs, seed, 200)), "either")
    # the first IFD offset points past the end / at itself
    slide("svs_ifd_past_eof", put("ifd_eof.svs", svs[:4] + struct.pack("<I", n + 1000) + svs[8:]), "error")

    # ---------------------------------------------------------------- generated TIFFs
    img = _he_image(512, 384)
    np.save(root / "gen_ref.npy", img[:64, :64])
    tifffile.imwrite(root / "gen_flat.tif", img, photometric="rgb", resolution=(20000, 20000), resolutionunit="CENTIMETER")
    slide("tiff_flat_control", "gen_flat.tif", "ok", ref="gen_ref.npy", dims=(512, 384))
    tifffile.imwrite(root / "gen_tiled.tif", img, photometric="rgb", tile=(128, 128), compression="zlib",
                     resolution=(20000, 20000), resolutionunit="CENTIMETER")
    slide("tiff_tiled_control", "gen_tiled.tif", "ok", ref="gen_ref.npy", dims=(512, 384))
    tiled = (root / "gen_tiled.tif").read_bytes()
    for frac in (0.02, 0.5, 0.95):
        slide(f"tiff_truncated_{frac:g}", put(f"gen_trunc_{frac:g}.tif", tiled[: int(len(tiled) * frac)]), "error")
    for seed in (11, 12, 13):
        slide(f"tiff_bitflip_{seed}", put(f"gen_flip_{seed}.tif", _bitflip(tiled, seed, 30)), "either")
    slide("tiff_named_svs", put("gen_as.svs", tiled), "ok", ref="gen_ref.npy", dims=(512, 384))
    # NaN / negative / zero / absurd µm per pixel, in the file and from the user
    tifffile.imwrite(root / "gen_nompp.tif", img, photometric="rgb")
    slide("tiff_no_mpp", "gen_nompp.tif", "error", note="MissingMppError")
    slide("tiff_no_mpp_user_mpp", "gen_nompp.tif", "ok", mpp=0.5, ref="gen_ref.npy", dims=(512, 384))
    for label, m in (("nan", float("nan")), ("negative", -0.5), ("zero", 0.0), ("inf", float("inf")), ("text", "abc"), ("huge", 1e300)):
        slide(f"user_mpp_{label}", "gen_nompp.tif", "error" if label != "huge" else "either", mpp=m)
    put("gen_zero_res.tif", _tiff_ifd_file(64, 64, data=img[:64, :64].tobytes(), resolution=(0, 0)))
    slide("tiff_resolution_0_over_0", "gen_zero_res.tif", "error", note="NaN µm/px in the file")
    tifffile.imwrite(root / "gen_ome_nan.ome.tif", img, photometric="rgb", ome=True,
                     metadata={"axes": "YXS", "PhysicalSizeX": float("nan"), "PhysicalSizeY": float("nan")})
    slide("ome_physical_size_nan", "gen_ome_nan.ome.tif", "error")
    tifffile.imwrite(root / "gen_ome_neg.ome.tif", img, photometric="rgb", ome=True,
                     metadata={"axes": "YXS", "PhysicalSizeX": -0.25, "PhysicalSizeY": -0.25})
    slide("ome_physical_size_negative", "gen_ome_neg.ome.tif", "error")
    for label, mppval in (("nan", "nan"), ("negative", "-0.25"), ("huge", "1e308")):
        desc = f"Aperio Image Library v10.0.50\r\n512x384 [0,0 512x384] -> 512x384 JPEG/RGB Q=70|AppMag = 20|MPP = {mppval}"
        tifffile.imwrite(root / f"aperio_mpp_{label}.svs", img, photometric="rgb", tile=(128, 128), description=desc)
        slide(f"aperio_mpp_{label}", f"aperio_mpp_{label}.svs", "error", note="MissingMppError")
    # pixel formats
    tifffile.imwrite(root / "gen_16bit.tif", (img.astype(np.uint16) * 257), photometric="rgb",
                     resolution=(20000, 20000), resolutionunit="CENTIMETER")
    slide("tiff_16bit", "gen_16bit.tif", "ok", ref="gen_ref.npy", dims=(512, 384), note="scaled by 65535")
    tifffile.imwrite(root / "gen_float.tif", img.astype(np.float32) / 255, photometric="rgb",
                     resolution=(20000, 20000), resolutionunit="CENTIMETER")
    slide("tiff_float32", "gen_float.tif", "error")
    tifffile.imwrite(root / "gen_5ch.tif", np.zeros((5, 64, 64), np.uint8), photometric="minisblack",
                     planarconfig="separate", resolution=(20000, 20000), resolutionunit="CENTIMETER")
    slide("tiff_5_channels", "gen_5ch.tif", "error")
    tifffile.imwrite(root / "gen_stack.tif", np.zeros((7, 64, 64, 3), np.uint8), photometric="rgb",
                     resolution=(20000, 20000), resolutionunit="CENTIMETER")
    slide("tiff_z_stack", "gen_stack.tif", "either")
    # hand-written TIFFs whose header lies
    small = bytes(48)
    put("huge_dims.tif", _tiff_ifd_file(200_000, 200_000, data=small))
    slide("tiff_huge_dims_tiny_file", "huge_dims.tif", "error", note="declares 40 Gpx, holds 48 bytes")
    put("huge_dims_strips.tif", _tiff_ifd_file(1_000_000, 1_000_000, data=small, n_chunks=1000, rows_per_strip=1000))
    slide("tiff_huge_dims_many_strips", "huge_dims_strips.tif", "error")
    put("huge_dims_tiles.tif", _tiff_ifd_file(4_000_000, 4_000_000, data=small, tile=(256, 256), n_chunks=1))
    slide("tiff_huge_dims_tile_count_mismatch", "huge_dims_tiles.tif", "error")
    put("absurd_tile.tif", _tiff_ifd_file(256, 256, data=small, tile=(1 << 30, 1 << 30), n_chunks=1))
    slide("tiff_absurd_tile_size", "absurd_tile.tif", "error")
    put("zero_tile.tif", _tiff_ifd_file(256, 256, data=small, tile=(0, 0), n_chunks=1))
    slide("tiff_zero_tile_size", "zero_tile.tif", "error")
    tiles_1x1 = _tiff_ifd_file(16384, 16384, data=small, tile=(16, 16), n_chunks=(16384 // 16) ** 2, chunk_bytes=48)
    put("many_tiny_tiles.tif", tiles_1x1)
    slide("tiff_1M_tiny_tiles_declared", "many_tiny_tiles.tif", "error", note="1024 x 1024 tiles, all aliasing 48 bytes")
    # a real decompression bomb: 100k x 100k zlib tiles that all point at one 256 x 256 white tile
    white = zlib.compress(np.full((256, 256, 3), 255, np.uint8).tobytes(), 9)
    n_t = (100_000 // 256 + 1) ** 2
    put("zlib_bomb.tif", _tiff_ifd_file(100_000, 100_000, data=white, tile=(256, 256), n_chunks=n_t, compression=8))
    slide("tiff_zlib_bomb_10gpx_no_pyramid", "zlib_bomb.tif", "error", note=f"{n_t} tiles aliasing {len(white)} bytes")
    put("zero_dims.tif", _tiff_ifd_file(0, 0, data=small))
    slide("tiff_zero_dims", "zero_dims.tif", "error")
    put("ifd_loop.tif", _tiff_ifd_file(4, 4, data=bytes(48), next_ifd=8))
    slide("tiff_ifd_loop", "ifd_loop.tif", "either", note="next-IFD offset points at itself")
    put("bad_compression.tif", _tiff_ifd_file(16, 16, data=bytes(768), compression=60000))
    slide("tiff_unknown_compression", "bad_compression.tif", "error")
    put("bigtiff_header_only.tif", b"II+\x00\x08\x00\x00\x00" + struct.pack("<Q", 16))
    slide("bigtiff_header_only", "bigtiff_header_only.tif", "error")
    put("tiff_magic_only.svs", b"II*\x00")
    slide("tiff_magic_only", "tiff_magic_only.svs", "error")

    # ---------------------------------------------------------------- issue #20: limits before decoding
    put("pages_50000.tif", _tiff_page_chain(50_000))
    slide("tiff_50000_pages", "pages_50000.tif", "error", note="refused by a bounded IFD walk (was 953 s)")
    strip = _zlib_zero_rows(bytes(3 * 20_000), 20_000)
    put("zlib_one_strip_20k.tif", _tiff_ifd_file(20_000, 20_000, data=strip, compression=8))
    slide("tiff_zlib_single_strip_20k", "zlib_one_strip_20k.tif", "error",
          note=f"one 1.2 GB strip in {len(strip):,} bytes (was 1.9 GB, ~35 min)")
    white_tile = zlib.compress(np.full((256, 256, 3), 230, np.uint8).tobytes(), 9)
    n_t20 = (20_480 // 256) ** 2
    put("mpp40_20k.tif", _tiff_ifd_file(20_480, 20_480, data=white_tile, tile=(256, 256), n_chunks=n_t20,
                                        compression=8, resolution=(250, 1)))
    slide("tiff_mpp_40um_20k", "mpp40_20k.tif", "error", note="40 µm/px on 20k px = 82 cm: MissingMppError")
    slide("tiff_mpp_40um_20k_user_40", "mpp40_20k.tif", "error", mpp=40.0, note="InvalidMppError")
    # colours: each read back against the reference (the runner compares pixels exactly)
    tifffile.imwrite(root / "cmyk.tif", np.concatenate([255 - img, np.zeros(img.shape[:2] + (1,), np.uint8)], 2),
                     photometric="separated", resolution=(20000, 20000), resolutionunit="CENTIMETER")
    slide("tiff_cmyk", "cmyk.tif", "ok", ref="gen_ref.npy", dims=(512, 384), note="was read as RGBA (mean |d| 51)")
    pal = Image.fromarray(img).quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    idx = np.asarray(pal)
    palette = np.array((pal.getpalette() + [0] * 768)[:768], np.uint16).reshape(256, 3)
    np.save(root / "pal_ref.npy", palette[idx[:64, :64]].astype(np.uint8))
    tifffile.imwrite(root / "palette.tif", idx, photometric="palette", colormap=(palette.T * 257).astype(np.uint16),
                     resolution=(20000, 20000), resolutionunit="CENTIMETER")
    slide("tiff_palette", "palette.tif", "ok", ref="pal_ref.npy", dims=(512, 384), note="was grey indices")
    grey = img[..., 1]
    np.save(root / "miw_ref.npy", np.repeat(grey[:64, :64, None], 3, axis=2))
    tifffile.imwrite(root / "miniswhite.tif", 255 - grey, photometric="miniswhite",
                     resolution=(20000, 20000), resolutionunit="CENTIMETER")
    slide("tiff_miniswhite", "miniswhite.tif", "ok", ref="miw_ref.npy", dims=(512, 384), note="was inverted")
    twelve = np.rint(img.astype(np.float64) * 4095 / 255).astype(np.uint16)
    tifffile.imwrite(root / "rgb12.tif", twelve, photometric="rgb", extratags=[(281, 3, 1, 4095, True)],
                     resolution=(20000, 20000), resolutionunit="CENTIMETER")
    slide("tiff_12bit_max_sample_value", "rgb12.tif", "ok", ref="gen_ref.npy", dims=(512, 384))
    import imagecodecs

    put("rgb12.png", imagecodecs.png_encode(twelve))
    slide("png_12bit_in_16bit", "rgb12.png", "ok", mpp=0.5, ref="gen_ref.npy", dims=(512, 384),
          note="was cut to <= 15")
    tifffile.imwrite(root / "cielab.tif", img, photometric="cielab", resolution=(20000, 20000),
                     resolutionunit="CENTIMETER")
    slide("tiff_cielab", "cielab.tif", "error")
    put("png_big_22k.png", _png_big_blank(22_000, 22_000))
    slide("png_22k_blank_under_cap", "png_big_22k.png", "either",
          mpp=0.25, note="484 Mpx in 1.5 MB (was 4.7 GB in the app process; now over the 256 Mpx plain-image cap)")
    png_tall = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 517_821, 8, 2, 0, 0, 0))
                + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b""))
    slide("png_1x517821_declared", put("tall.png", png_tall), "error", mpp=0.5, note="once 24 GiB")

    # ---------------------------------------------------------------- PNG / JPEG / others
    Image.fromarray(img).save(root / "ok.png")
    slide("png_control", "ok.png", "ok", mpp=0.5, ref="gen_ref.npy", dims=(512, 384))
    slide("png_named_svs", put("png_as.svs", (root / "ok.png").read_bytes()), "ok", mpp=0.5, ref="gen_ref.npy", dims=(512, 384))
    slide("png_without_mpp", "ok.png", "error", note="MissingMppError")
    put("bomb.png", _png_bomb(100_000, 100_000))
    slide("png_decompression_bomb_10gpx", "bomb.png", "error", mpp=0.5)
    put("bomb_wide.png", _png_bomb(2_000_000, 300, rows_encoded=2))
    slide("png_decompression_bomb_wide", "bomb_wide.png", "error", mpp=0.5)
    png = (root / "ok.png").read_bytes()
    slide("png_truncated", put("trunc.png", png[: len(png) // 3]), "error", mpp=0.5)
    slide("png_bad_crc", put("bad_crc.png", png[:29] + bytes([png[29] ^ 0xFF]) + png[30:]), "error", mpp=0.5)
    Image.fromarray(img).save(root / "ok.jpg", quality=90)
    jpg = (root / "ok.jpg").read_bytes()
    slide("jpeg_truncated", put("trunc.jpg", jpg[: len(jpg) // 2]), "either", mpp=0.5)
    slide("jpeg_bitflip", put("flip.jpg", _bitflip(jpg, 21, 30, 600)), "either", mpp=0.5)
    Image.fromarray((img[..., 0].astype(np.uint16) * 257)).save(root / "grey16.png")
    np.save(root / "grey_ref.npy", np.repeat(img[:64, :64, :1], 3, axis=2))
    slide("png_16bit_grey", "grey16.png", "ok", mpp=0.5, ref="grey_ref.npy", dims=(512, 384))
    Image.fromarray(img).save(root / "ok.gif")
    slide("gif_image", "ok.gif", "error", mpp=0.5)

    for ext in ("svs", "tif", "png", "ndpi"):
        slide(f"zero_bytes_{ext}", put(f"empty.{ext}", b""), "error")
    slide("text_named_svs", put("notes.svs", b"Patient Jane Doe, MRN 12345: biopsy 3 March\n" * 20), "error")
    slide("html_named_tif", put("error_page.tif", b"<!DOCTYPE html><html><body>502 Bad Gateway</body></html>"), "error")
    slide("zip_named_svs", put("archive.svs", b"PK\x03\x04" + bytes(200)), "error")
    slide("pdf_named_ndpi", put("report.ndpi", b"%PDF-1.7\n" + bytes(300)), "error")
    slide("elf_named_svs", put("program.svs", Path(sys.executable).resolve().read_bytes()[:65536]), "error")
    slide("random_bytes_mrxs", put("noise.mrxs", random.Random(7).randbytes(100_000)), "error")
    (root / "folder.svs").mkdir(exist_ok=True)
    slide("folder_named_svs", "folder.svs", "error")

    # ---------------------------------------------------------------- hostile upload names
    for i, bad in enumerate(("../../outside.svs", "/etc/passwd", "..", "C:\\Windows\\x.svs",
                             "slide\u202egpj.svs", "a\x00b.svs", "")):
        slide(f"name_refused_{i}", "gen_tiled.tif", "error", upload_name=bad, note=repr(bad))
    for i, odd in enumerate(("CON.svs", "Müller, Hans 1961-03-02.tif", ".hidden.tif", "x" * 500 + ".tif",
                             "tumour (copy 2)..tif", "\uff0e\uff0e\uff0fslide.tif")):
        slide(f"name_sanitised_{i}", "gen_tiled.tif", "either", upload_name=odd, ref="gen_ref.npy",
              dims=(512, 384), note=repr(odd))

    # ---------------------------------------------------------------- clinical tables
    rows = [("patient_id", "os_days", "vital_status", "grade")]
    rows += [(f"P{i:03d}", str(100 + 7 * i), "dead" if i % 3 == 0 else "alive", str(1 + i % 3)) for i in range(30)]

    def table(rows_: list[tuple[str, ...]], delim: str = ",") -> str:
        buf = io.StringIO()
        csv.writer(buf, delimiter=delim, lineterminator="\n").writerows(rows_)
        return buf.getvalue()

    good = table(rows)
    clin("csv_control", put("clin_ok.csv", good.encode()), "ok", rows=30)
    clin("csv_utf8_bom", put("clin_bom.csv", b"\xef\xbb\xbf" + good.encode()), "ok", rows=30)
    clin("csv_utf16_bom", put("clin_utf16.csv", good.encode("utf-16")), "ok", rows=30)
    clin("csv_utf16_no_bom", put("clin_utf16le.csv", good.encode("utf-16-le")), "error")
    accented = good.replace("P001", "Zoë-001").replace("P002", "Åsa-002")
    clin("csv_cp1252", put("clin_cp1252.csv", accented.encode("cp1252")), "ok", rows=30)
    clin("csv_broken_utf8", put("clin_broken.csv", good.encode().replace(b"P004", b"P\xc3\x28\xa0\xa1")), "ok", rows=30)
    clin("csv_semicolon_decimal_comma", put("clin_semi.csv", table(rows, ";").replace("100", "100,5").encode()), "ok", rows=30)
    inj = [rows[0]] + [r for r in rows[1:6]]
    inj += [("=cmd|' /C calc'!A0", "200", "dead", "=1+1"), ("+SUM(A1:A9)", "300", "alive", "@SUM(1)"),
            ("-2+3+cmd|' /C calc'!A0", "400", "dead", "\t=HYPERLINK(\"http://x\")"), ("@foo", "500", "alive", "-A1")]
    clin("csv_formula_injection", put("clin_inject.csv", table(inj).encode()), "ok", rows=9)
    clin("csv_formula_after_cr", put("clin_inject_cr.csv", table(inj + [("P9", "9", "dead", "\r=2")]).encode()), "either")
    clin("csv_formula_in_header", put("clin_inject_hdr.csv", table([("=cmd|' /C calc'!A0", "os_days", "vital_status")]
                                                                   + [(f"P{i}", "10", "dead") for i in range(5)]).encode()), "ok", rows=5)
    wide = ",".join(f"c{i}" for i in range(100_000)) + "\n" + ",".join("1" for _ in range(100_000)) + "\n"
    clin("csv_100k_columns", put("clin_wide.csv", wide.encode()), "either")
    wide_dup = ",".join("c" for _ in range(100_000)) + "\n" + ",".join("1" for _ in range(100_000)) + "\n"
    clin("csv_100k_duplicate_columns", put("clin_wide_dup.csv", wide_dup.encode()), "error")
    clin("csv_empty", put("clin_empty.csv", b""), "error")
    clin("csv_whitespace", put("clin_ws.csv", b"  \n\n\t \n"), "error")
    clin("csv_header_only", put("clin_hdr.csv", b"patient_id,os_days,vital_status\n"), "error")
    clin("csv_one_column", put("clin_onecol.csv", b"patient\nA\nB\n"), "error")
    clin("csv_binary", put("clin_bin.csv", bytes(range(256)) * 40), "error")
    clin("csv_xls_magic", put("clin_old.xls", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(500)), "error")
    clin("xlsx_corrupt_zip", put("clin_bad.xlsx", b"PK\x03\x04" + random.Random(3).randbytes(2000)), "error")
    clin("csv_unbalanced_quotes", put("clin_quote.csv", b'patient_id,os_days,vital_status\n"P1,10,dead\nP2,20,alive\n'), "either")
    clin("csv_ragged_rows", put("clin_ragged.csv", b"patient_id,os_days,vital_status\nP1,10\nP2,20,alive,extra,more\nP3,5,dead\n"), "either")
    clin("csv_duplicate_headers", put("clin_duphdr.csv", b"id,id,time\n1,2,3\n4,5,6\n"), "error")
    bad_vals = [rows[0]] + [("P1", "nan", "dead", "1"), ("P2", "-5", "alive", "2"), ("P3", "inf", "dead", "1"),
                            ("P4", "1e400", "alive", "3"), ("P5", "12", "dead", "1"), ("P6", "30", "alive", "2"),
                            ("P7", "-inf", "dead", "1"), ("P8", "40", "maybe", "2")]
    clin("csv_nan_negative_inf_times", put("clin_badvals.csv", table(bad_vals).encode()), "ok", rows=8,
         mapping={"patient_id": "patient_id", "time": "os_days", "event": "vital_status"})
    clin("csv_10mb_cell", put("clin_bigcell.csv", b"patient_id,os_days,vital_status\nP1,10," + b"x" * 10_000_000 + b"\nP2,5,dead\n"), "either")
    clin("csv_over_50mb", put("clin_huge.csv", b"a,b\n" + b"1,2\n" * 13_200_000), "error")
    clin("csv_null_bytes", put("clin_nul.csv", good.encode().replace(b"P003", b"P\x00\x003")), "error")
    clin("csv_name_traversal", "clin_ok.csv", "error", upload_name="../../../etc/cron.d/x.csv")
    clin("csv_many_rows_one_col_delim", put("clin_pipes.csv", ("a|b|c\n" + "1|2|3\n" * 50_000).encode()), "ok", rows=50_000)

    (root / "cases.json").write_text(json.dumps([asdict(c) for c in cases], indent=1))
    return cases


# ============================================================================ the child
def _snapshot(project: Any) -> tuple[list[str], int, int]:
    files = sorted(str(p.relative_to(project.folder)) for p in project.folder.rglob("*")
                   if p.is_file() and p.name not in ("project.sqlite", "project.sqlite-wal", "project.sqlite-shm"))
    c = project._conn()
    return files, c.execute("SELECT COUNT(*) FROM slides").fetchone()[0], c.execute("SELECT COUNT(*) FROM clinical_tables").fetchone()[0]


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(what)


@contextlib.contextmanager
def _fresh_project(work: Path, typed: list[str], what: str) -> Iterator[Any]:
    """An empty project in ``work/project`` (removed after). A ``GhistError`` in the block is the
    case's typed refusal: its name goes to ``typed`` and the project must be left as it was."""
    from ghist_core.errors import GhistError
    from ghist_core.project.store import Project

    project_dir = work / "project"
    shutil.rmtree(project_dir, ignore_errors=True)
    with Project.create(project_dir) as p:
        before = _snapshot(p)
        try:
            yield p
        except GhistError as e:
            typed.append(type(e).__name__)
            _check(_snapshot(p) == before, f"a refused {what} left files or rows in the project")
    shutil.rmtree(project_dir, ignore_errors=True)


def _run_slide_case(case: Case, root: Path, work: Path) -> list[str]:
    from ghist_core.errors import GhistError
    from ghist_core.io.slide import open_slide

    typed: list[str] = []
    path = root / case.file
    try:
        with open_slide(path, mpp=case.mpp) as s:
            info = s.info
            w, h = s.dimensions
            _check(w > 0 and h > 0 and s.mpp > 0, f"bad dimensions/mpp {w}x{h} {s.mpp}")
            if case.dims is not None:
                _check((w, h) == tuple(case.dims), f"dimensions {w}x{h}, expected {case.dims}")
            th = s.thumbnail(256)
            _check(th.dtype == np.uint8 and th.ndim == 3 and th.shape[2] == 3 and max(th.shape[:2]) <= 256,
                   f"thumbnail {th.dtype} {th.shape}")
            reg = s.read_region((0, 0), 0, (64, 64))
            _check(reg.shape == (64, 64, 3) and reg.dtype == np.uint8, f"region {reg.dtype} {reg.shape}")
            if case.ref:
                want = np.load(root / case.ref)
                _check(np.array_equal(reg, want), "region (0,0,64,64) differs from the reference pixels")
            mid = s.read_region_mpp((w / 2, h / 2), (32, 32), s.mpp * 2)
            _check(mid.shape == (32, 32, 3) and mid.dtype == np.uint8, f"mpp region {mid.shape}")
    except GhistError as e:
        typed.append(type(e).__name__)
    with _fresh_project(work, typed, "slide") as p:
        name = case.upload_name if case.upload_name is not None else Path(case.file).name
        rec = p.add_slide(path, original_name=name, mpp=case.mpp)
        stored = (p.folder / rec.path).resolve()
        _check(stored.is_file() and stored.parent == (p.folder / "slides").resolve(),
               f"slide stored outside slides/: {rec.path}")
        _check(".." not in rec.path and not rec.path.startswith("/"), f"unsafe stored path {rec.path}")
        if case.dims is not None:
            _check((rec.width, rec.height) == tuple(case.dims), "stored dimensions differ")
    return typed


_FORMULA = ("=", "+", "@", "\t", "\r")


def _is_formula(cell: str) -> bool:
    if cell.startswith(_FORMULA):
        return True
    if cell.startswith("-"):
        try:
            float(cell)
            return False
        except ValueError:
            return True
    return False


def _run_clinical_case(case: Case, root: Path, work: Path) -> list[str]:
    from ghist_core.analysis.clinical import ColumnMapping, guess_mapping, read_clinical_table, safe_csv_bytes, validate_survival
    from ghist_core.errors import GhistError

    typed: list[str] = []
    path = root / case.file
    name = case.upload_name if case.upload_name is not None else Path(case.file).name
    try:
        df = read_clinical_table(path, filename=name)
        if case.rows is not None:
            _check(len(df) == case.rows, f"{len(df)} rows, expected {case.rows}")
        df2 = read_clinical_table(path.read_bytes(), filename=name)
        _check(df.shape == df2.shape, "path and bytes give different tables")
        out = safe_csv_bytes(df).decode("utf-8")
        bad = [c for r in csv.reader(io.StringIO(out)) for c in r if _is_formula(c)]
        _check(not bad, f"export keeps formula cells: {bad[:3]}")
        m = ColumnMapping(**case.mapping) if case.mapping else guess_mapping(df)
        if m.patient_id and m.time and m.event:
            st = validate_survival(df, m)
            _check(len(st.table) + len(st.dropped) >= 1, "validation lost every row silently")
            _check(np.isfinite(st.table["time"].to_numpy(float)).all() and (st.table["time"] >= 0).all(),
                   "non-finite or negative time kept")
            out = safe_csv_bytes(st.table).decode("utf-8")
            bad = [c for r in csv.reader(io.StringIO(out)) for c in r if _is_formula(c)]
            _check(not bad, f"validated export keeps formula cells: {bad[:3]}")
    except GhistError as e:
        typed.append(type(e).__name__)
    with _fresh_project(work, typed, "table") as p:
        tid = p.add_clinical_table(path, name="clinical", original_name=name)
        stored, _ = p.get_clinical_table(tid)
        _check(stored.resolve().parent == (p.folder / "clinical").resolve(), f"stored outside clinical/: {stored}")
    return typed


def _reset_peak() -> int:
    """Reset this process's peak RSS (Linux ``clear_refs`` 5); returns the children's peak so far (KiB)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss


def _peak_mb(kids_before: int) -> float:
    """Peak RSS (MiB) since ``_reset_peak``: this process's, or a child's (a preview subprocess) if higher."""
    own = 0
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                own = int(line.split()[1])
    except OSError:
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(own, kids if kids > kids_before else 0) / 1024.0, 1)


def _child_main(root: Path) -> None:
    """Serve cases: one JSON case per stdin line, one marked JSON result per stdout line."""
    work = Path(tempfile.mkdtemp(prefix="hostile_work_"))
    import warnings

    warnings.simplefilter("ignore")
    for line in sys.stdin:
        if not line.strip():
            continue
        case = Case(**json.loads(line))
        kids_before = _reset_peak()
        t0 = time.perf_counter()
        try:
            runner = _run_slide_case if case.kind == "slide" else _run_clinical_case
            typed = runner(case, root, work)
            outcome = "typed_error" if typed else "ok"
            res = Result(case.name, outcome, typed)
        except AssertionError as e:
            res = Result(case.name, "wrong", [], str(e)[:500])
        except BaseException as e:  # noqa: BLE001 - the point is to catch what should not escape
            tb = traceback.format_exc(limit=6)
            res = Result(case.name, "crash", [], f"{type(e).__name__}: {str(e)[:300]}\n{tb[-1500:]}")
        res.seconds = time.perf_counter() - t0
        res.peak_mb = _peak_mb(kids_before)
        sys.stdout.write(_MARK + json.dumps(asdict(res)) + "\n")
        sys.stdout.flush()
    shutil.rmtree(work, ignore_errors=True)


# ============================================================================ the parent
def _limit_memory(mb: int) -> Any:
    def apply() -> None:
        lim = mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


class _Child:
    def __init__(self, root: Path, memory_mb: int) -> None:
        env = dict(os.environ)
        env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join([str(REPO), str(HERE), env.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve", str(root)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env=env, preexec_fn=_limit_memory(memory_mb), cwd=str(REPO),
        )

    def ask(self, case: Case, timeout_s: float) -> Result:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        t0 = time.perf_counter()
        try:
            self.proc.stdin.write(json.dumps(asdict(case)) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return Result(case.name, "crash", [], f"runner died (exit {self.proc.poll()})")
        return self._wait_for(case.name, timeout_s, t0)

    def _wait_for(self, name: str, timeout_s: float, t0: float | None = None) -> Result:
        """The child's answer for case ``name``; a hang after ``timeout_s`` (the child is killed)."""
        assert self.proc.stdout is not None
        t0 = time.perf_counter() if t0 is None else t0
        deadline = t0 + timeout_s
        fd = self.proc.stdout.fileno()
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                self.kill()
                return Result(name, "hang", [], f"no answer within {timeout_s:.0f} s", time.perf_counter() - t0)
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            line = self.proc.stdout.readline()
            if not line:  # EOF: the process died (signal, abort, out of memory kill)
                rc = self.proc.wait()
                return Result(name, "crash", [], f"runner died (exit {rc})", time.perf_counter() - t0)
            if line.startswith(_MARK):
                return Result(**json.loads(line[len(_MARK):]))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


def run_corpus(
    cases: list[Case], folder: str | os.PathLike, *, timeout_s: float = CASE_TIMEOUT_S,
    memory_mb: int = MEMORY_LIMIT_MB,
) -> list[Result]:
    """Run every case in a memory-capped child process; restart it after a crash or hang."""
    root = Path(folder)
    results: list[Result] = []
    child: _Child | None = None
    try:
        for case in cases:
            if child is None or child.proc.poll() is not None:
                child = _Child(root, memory_mb)
            # the first case of a fresh child also pays its imports: allow for that
            res = child.ask(case, timeout_s + (15.0 if not results or results[-1].outcome in ("crash", "hang") else 0.0))
            results.append(res)
    finally:
        if child is not None:
            child.close()
    return results


def expectation_met(case: Case, res: Result) -> bool:
    """Typed error or correct result as the case expects (crashes and hangs never are)."""
    if res.failed:
        return False
    if case.expect == "ok":
        return res.outcome == "ok"
    if case.expect == "error":
        return res.outcome == "typed_error"
    return True


def summarise(results: list[Result]) -> dict[str, int]:
    """The ``hostile_files`` block of ``bench/results/robustness.json``.

    A wrong result (a read that succeeded with wrong pixels, sizes or an unsafe export) is
    counted with the crashes: both are failures the user would not be told about.
    """
    return {
        "cases": len(results),
        "typed_errors": sum(r.outcome == "typed_error" for r in results),
        "correct_results": sum(r.outcome == "ok" for r in results),
        "crashes": sum(r.outcome in ("crash", "wrong") for r in results),
        "hangs": sum(r.outcome == "hang" for r in results),
    }


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--svs", type=Path, default=None)
    ap.add_argument("--only", default=None, help="run only cases whose name contains this")
    args = ap.parse_args(argv)
    if args.serve is not None:
        _child_main(args.serve)
        return 0
    sys.path.insert(0, str(REPO))
    from ghist_core.paths import shared_data_dir

    svs = args.svs or shared_data_dir() / "slides" / "CMU-1-Small-Region.svs"
    with tempfile.TemporaryDirectory(prefix="hostile_") as tmp:
        cases = build_corpus(tmp, svs)
        if args.only:
            cases = [c for c in cases if args.only in c.name]
        t0 = time.perf_counter()
        results = run_corpus(cases, tmp)
        for c, r in zip(cases, results):
            flag = "" if expectation_met(c, r) else "  <-- UNEXPECTED"
            print(f"{r.outcome:12s} {r.seconds:6.2f}s {r.peak_mb:7.0f}MB {c.name:40s} {','.join(r.errors)} {r.detail[:300]}{flag}")
        print(json.dumps(summarise(results)), f"{time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
