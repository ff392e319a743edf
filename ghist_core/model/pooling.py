"""Per-cell pooling, star-contour rasterisation, spot sums and neighbourhoods, all vectorised.

GHIST's unit of prediction is the cell: encoder feature maps are averaged inside each
nucleus mask. Doing that with one ``index_add_`` over the foreground pixels of a whole
batch (instead of a Python loop over cells) is what makes slide-scale inference fast;
``bench/pooling.py`` measures the gap.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "relabel_batch",
    "pool_cells",
    "segment_sum",
    "segment_mean",
    "radius_neighbour_mean",
    "rasterise_stars",
    "N_RAYS",
]

#: Number of rays in the segmentation contract's star-convex contours (``ray_00`` .. ``ray_15``).
N_RAYS = 16


def relabel_batch(instances: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Give every nucleus in a batch of instance maps one global id (1-based, 0 = background).

    Parameters
    ----------
    instances
        ``(B, H, W)`` integer maps, 0 = background, any positive labels per image.

    Returns
    -------
    global_map
        ``(B, H, W)`` int64 with ids ``1..N`` unique across the batch (0 = background).
    cell_batch
        ``(N,)`` int64, the image each cell belongs to.
    cell_label
        ``(N,)`` int64, each cell's original label within its image.
    """
    inst = instances.long()
    b = inst.shape[0]
    stride = int(inst.max().item()) + 1 if inst.numel() else 1
    # key = image * stride + label is unique per (image, label); a bincount marks the keys
    # present and a cumulative sum numbers them in image, then label order (no sort).
    key = (inst + torch.arange(b, device=inst.device).view(b, 1, 1) * stride).reshape(-1)
    present = torch.bincount(key, minlength=b * stride) > 0
    present[::stride] = False  # label 0 = background
    gid = torch.cumsum(present, 0)
    global_map = torch.where(inst.reshape(-1) > 0, gid[key], torch.zeros_like(key)).view_as(inst)
    uniq = torch.nonzero(present).flatten()
    return global_map, uniq // stride, uniq % stride


def pool_cells(
    features: torch.Tensor,
    global_map: torch.Tensor,
    n_cells: int,
    *,
    reduce: str = "mean",
    centroids: bool = False,
):
    """Average (or max, or both) feature vectors over every nucleus mask, in one scatter.

    Parameters
    ----------
    features
        ``(B, C, h, w)`` feature maps; they may be coarser than the masks (nearest lookup).
    global_map
        ``(B, H, W)`` global cell ids from :func:`relabel_batch` (0 = background).
    n_cells
        Number of cells ``N`` (ids run 1..N).
    reduce
        ``"mean"``, ``"max"`` or ``"mean+max"`` (``(N, 2C)``, both from one pass over the pixels).

    Returns
    -------
    pooled
        ``(N, C)`` (``(N, 2C)`` for ``"mean+max"``); a cell with no pixel gets zeros.
    n_pixels
        ``(N,)`` mask pixels per cell (at mask resolution).
    centroid
        ``(N, 2)`` mean pixel ``(x, y)`` of each mask (only when ``centroids=True``).
    """
    if reduce not in ("mean", "max", "mean+max"):
        raise ValueError(f"reduce must be 'mean', 'max' or 'mean+max', not {reduce!r}")
    bsz, c, h, w = features.shape
    _, hh, ww = global_map.shape
    bi, yy, xx = torch.nonzero(global_map > 0, as_tuple=True)
    ids = global_map[bi, yy, xx] - 1
    pix_ids = ids
    fy = torch.div(yy * h, hh, rounding_mode="floor")
    fx = torch.div(xx * w, ww, rounding_mode="floor")
    fidx = bi * (h * w) + fy * w + fx
    n_pix = torch.zeros(n_cells, dtype=features.dtype, device=features.device)
    if features.device.type == "cpu" and (h, w) != (hh, ww):
        # CPU: memory traffic dominates, so first merge the pixels of a cell that read the same
        # feature pixel (~16 per stride-4 pixel): one sort, then a gather of the unique pairs only
        span = bsz * h * w
        uk, cnt = torch.unique(ids * span + fidx, return_counts=True)
        ids = torch.div(uk, span, rounding_mode="floor")
        fu = uk - ids * span
        bu = torch.div(fu, h * w, rounding_mode="floor")
        vals = features.reshape(bsz, c, h * w)[bu, :, fu - bu * (h * w)]
        weight = cnt.to(features.dtype)
    else:
        vals = features.permute(0, 2, 3, 1).reshape(bsz * h * w, c)[fidx]
        weight = torch.ones_like(ids, dtype=features.dtype)
    n_pix.index_add_(0, ids, weight)
    outs = []
    if reduce in ("mean", "mean+max"):
        out = torch.zeros(n_cells, c, dtype=features.dtype, device=features.device)
        out.index_add_(0, ids, vals * weight.unsqueeze(1))
        outs.append(out / n_pix.clamp(min=1).unsqueeze(1))
    if reduce in ("max", "mean+max"):
        mx = torch.full((n_cells, c), float("-inf"), dtype=features.dtype, device=features.device)
        mx = mx.scatter_reduce(0, ids.unsqueeze(1).expand(-1, c), vals, reduce="amax")
        outs.append(torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx)))
    pooled = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
    if not centroids:
        return pooled, n_pix
    cen = torch.zeros(n_cells, 2, dtype=features.dtype, device=features.device)
    cen.index_add_(0, pix_ids, torch.stack([xx, yy], 1).to(features.dtype))
    return pooled, n_pix, cen / n_pix.clamp(min=1).unsqueeze(1)


def segment_sum(values: torch.Tensor, segment: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Sum rows of ``values`` into ``n_segments`` groups; rows with ``segment < 0`` are dropped.

    This is the spot aggregation of weak supervision: the predicted expression of the
    cells inside a spot is summed into that spot.
    """
    keep = segment >= 0
    out = torch.zeros((n_segments,) + tuple(values.shape[1:]), dtype=values.dtype, device=values.device)
    out.index_add_(0, segment[keep], values[keep])
    return out


def segment_mean(values: torch.Tensor, segment: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Mean of rows per group (empty groups give zeros)."""
    s = segment_sum(values, segment, n_segments)
    keep = segment >= 0
    n = torch.bincount(segment[keep], minlength=n_segments).to(values.dtype)
    return s / n.clamp(min=1).view(-1, *([1] * (values.dim() - 1)))


def radius_neighbour_mean(xy, values, radius: float, *, group=None):
    """Mean of ``values`` over the cells within ``radius`` of each cell (itself included).

    The one neighbourhood definition, shared by training (``GhistNet.context``, torch,
    differentiable in ``values``) and slide inference (``model.predict``, numpy): pairs
    closer than ``radius`` (inclusive, float64 distances) from a k-d tree, so memory grows
    with the number of pairs, never with N². Cells in different ``group`` s (e.g.
    different training patches) are never neighbours.

    Parameters
    ----------
    xy
        ``(N, 2)`` positions (µm); numpy or torch.
    values
        ``(N, C)``; numpy in -> float32 numpy out (scipy sparse product), torch in -> torch
        out on the same device and dtype (``index_add_``).
    group
        ``(N,)`` integer group of each cell, or None (all one group).

    Returns
    -------
    mean
        ``(N, C)`` neighbourhood means.
    count
        ``(N,)`` number of neighbours (itself included), float32 / ``values.dtype``.
    """
    from scipy.spatial import cKDTree

    is_torch = isinstance(values, torch.Tensor)
    pts = (xy.detach().cpu().double().numpy() if isinstance(xy, torch.Tensor) else np.asarray(xy, dtype=np.float64))
    n = len(pts)
    if group is not None and n:
        g = group.detach().cpu().numpy() if isinstance(group, torch.Tensor) else np.asarray(group)
        # a third coordinate that puts different groups further apart than the radius
        pts = np.column_stack([pts, (g.astype(np.float64) - g.min()) * (3.0 * float(radius) + 1.0)])
    pairs = cKDTree(pts).query_pairs(radius, output_type="ndarray") if n else np.zeros((0, 2), np.int64)
    i = np.concatenate([pairs[:, 0], pairs[:, 1]])
    j = np.concatenate([pairs[:, 1], pairs[:, 0]])
    if not is_torch:
        from scipy.sparse import csr_matrix, identity

        a = csr_matrix((np.ones(len(i), np.float32), (i, j)), shape=(n, n)) + identity(n, dtype=np.float32, format="csr")
        cnt = np.asarray(a.sum(1)).ravel().astype(np.float32)
        return ((a @ values) / cnt[:, None]).astype(np.float32), cnt
    dev = values.device
    ti = torch.from_numpy(np.concatenate([i, np.arange(n)])).to(dev)
    tj = torch.from_numpy(np.concatenate([j, np.arange(n)])).to(dev)
    out = torch.zeros_like(values).index_add_(0, ti, values[tj])
    cnt = torch.bincount(ti, minlength=n).to(values.dtype)
    return out / cnt.clamp(min=1).unsqueeze(1), cnt


def rasterise_stars(
    centres_px: np.ndarray,
    rays_px: np.ndarray,
    shape: tuple[int, int],
    labels: np.ndarray | None = None,
) -> np.ndarray:
    """Draw star-convex nuclei (the segmentation table's ``ray_00..ray_15``) into a label image.

    Every cell is evaluated on one shared local grid, so the work is a few array operations
    whatever the number of cells. Where two stars overlap the pixel goes to the cell whose
    contour it lies deeper inside (smallest distance / ray length).

    Parameters
    ----------
    centres_px
        ``(N, 2)`` centroids ``(x, y)`` in pixels of the output image.
    rays_px
        ``(N, 16)`` ray lengths in pixels at angles ``2πk/16`` from +x towards +y.
    shape
        ``(H, W)`` of the output.
    labels
        ``(N,)`` positive labels to draw (default ``1..N``).
    """
    h, w = shape
    out = np.zeros((h, w), dtype=np.int32)
    n = len(centres_px)
    if n == 0:
        return out
    centres_px = np.asarray(centres_px, dtype=np.float64)
    rays = np.clip(np.asarray(rays_px, dtype=np.float64), 0.0, None)
    labels = np.arange(1, n + 1, dtype=np.int32) if labels is None else np.asarray(labels, dtype=np.int32)
    k = rays.shape[1]
    r = int(np.ceil(rays.max())) + 1 if rays.size else 1
    r = max(1, min(r, max(h, w)))
    off = np.arange(-r, r + 1)
    oy, ox = np.meshgrid(off, off, indexing="ij")
    cx = np.round(centres_px[:, 0]).astype(np.int64)
    cy = np.round(centres_px[:, 1]).astype(np.int64)
    # pixel centres relative to the (sub-pixel) centroid
    dx = (cx[:, None, None] + ox[None]) - centres_px[:, 0, None, None]
    dy = (cy[:, None, None] + oy[None]) - centres_px[:, 1, None, None]
    dist = np.hypot(dx, dy)
    ang = np.mod(np.arctan2(dy, dx), 2 * np.pi) * (k / (2 * np.pi))
    i0 = np.floor(ang).astype(np.int64) % k
    i1 = (i0 + 1) % k
    f = ang - np.floor(ang)
    rows = np.arange(n)[:, None, None]
    rad = rays[rows, i0] * (1 - f) + rays[rows, i1] * f
    depth = dist / np.maximum(rad, 1e-6)
    inside = (depth <= 1.0) | (dist <= 0.75)  # the centroid pixel always belongs to its cell
    yy = cy[:, None, None] + oy[None]
    xx = cx[:, None, None] + ox[None]
    inside &= (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
    sel = np.nonzero(inside)
    pix = yy[sel] * w + xx[sel]
    d = depth[sel]
    lab = labels[sel[0]]
    # deepest cell wins: sort by depth descending so the smallest depth is written last
    order = np.lexsort((-d, pix))
    pix, lab, d = pix[order], lab[order], d[order]
    last = np.r_[pix[1:] != pix[:-1], True]
    flat = out.reshape(-1)
    flat[pix[last]] = lab[last]
    return out
