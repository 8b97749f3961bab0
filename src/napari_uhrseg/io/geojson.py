"""Label images to GeoJSON polygons (QuPath annotations), exactly, with bounded memory.

Polygons follow pixel edges (pixel ``(r, c)`` is the square ``[c, c + 1] x [r, r + 1]`` in ``(x, y)``), so
rasterising them back by pixel centres gives the labels exactly. Each connected region (4-connectivity) of a
class is one Polygon feature with its holes as interior rings; pixels that touch only at a corner are separate
regions.

Memory: the image is read in horizontal strips; a strip yields the boundary edges it contains (the edges
between its rows and the row above come from the previous strip's last row), so there are no window seams to
merge: each region is traced once, whole. Memory then grows with the total boundary length, not the area.

Tracing: every boundary edge is directed with its region on the right (y down). Edges are linked end to start;
at a vertex where two regions of the class touch diagonally (two outgoing edges), the walk turns right, which
keeps the two pixels in separate rings. Rings with positive area are outer boundaries; negative ones are holes,
each given to the smallest outer ring of the same class that contains it.
"""
from __future__ import annotations

import json

import numpy as np

# Direction codes and their (dx, dy) steps, y down.
EAST, SOUTH, WEST, NORTH = 0, 1, 2, 3
_STEP = np.array([(1, 0), (0, 1), (-1, 0), (0, -1)])


class EdgeCollector:
    """Boundary edges of every class, accumulated strip by strip.

    All classes are handled in one pass: a boundary between pixels of classes ``a`` (above / left) and ``b``
    (below / right) gives one edge to each non-zero class, in opposite directions. Edges are stored per class as int32 rows
    ``(x0, y0, x1, y1, direction)``.
    """

    def __init__(self, width: int):
        self.width = int(width)
        self._chunks: dict[int, list[np.ndarray]] = {}
        self._previous_row: np.ndarray | None = None

    def add_strip(self, y0: int, strip: np.ndarray) -> None:
        """Labels rows ``[y0, y0 + len(strip))``; strips must come in order, top to bottom."""
        strip = np.asarray(strip)
        above = self._previous_row if self._previous_row is not None else np.zeros(self.width, strip.dtype)
        rows = np.vstack([above[None], strip])
        # Horizontal boundaries on the lines y = y0 .. y0 + n - 1 (the first one against the previous strip).
        self._add_horizontal(rows[:-1], rows[1:], y0)
        # Vertical boundaries on the lines x = 0 .. W, within the strip's rows (zeros outside the image).
        padded = np.zeros((strip.shape[0], self.width + 2), strip.dtype)
        padded[:, 1:-1] = strip
        left, right = padded[:, :-1].T, padded[:, 1:].T  # (W + 1, n): one row per line x = c
        line, s, e, a, b = _pair_runs(left, right)
        ys, ye = y0 + s, y0 + e
        self._keep(np.stack([line, ys, line, ye, np.full_like(s, SOUTH), a], axis=1), a)  # region on the left
        self._keep(np.stack([line, ye, line, ys, np.full_like(s, NORTH), b], axis=1), b)  # region on the right
        self._previous_row = strip[-1].copy()

    def _add_horizontal(self, upper: np.ndarray, lower: np.ndarray, y0: int) -> None:
        row, s, e, a, b = _pair_runs(upper, lower)
        y = y0 + row
        self._keep(np.stack([e, y, s, y, np.full_like(s, WEST), a], axis=1), a)  # region above the line
        self._keep(np.stack([s, y, e, y, np.full_like(s, EAST), b], axis=1), b)  # region below the line

    def _keep(self, edges: np.ndarray, classes: np.ndarray) -> None:
        # Kept per class as they come, so that finishing needs no global sort (peak = edges + one class).
        for k in np.unique(classes):
            if k != 0:
                self._chunks.setdefault(int(k), []).append(edges[classes == k, :5].astype(np.int32))

    def finish(self, height: int) -> None:
        """Close the regions touching the bottom of the image."""
        if self._previous_row is not None:
            last = self._previous_row[None]
            self._add_horizontal(last, np.zeros_like(last), height)
            self._previous_row = None

    def classes(self) -> list[int]:
        return sorted(self._chunks)

    def edges_of(self, k: int) -> np.ndarray:
        parts = self._chunks.get(k)
        return np.concatenate(parts) if parts else np.zeros((0, 5), np.int32)

    def release(self, k: int) -> None:
        """Forget the edges of class ``k`` (once its polygons are written)."""
        self._chunks.pop(k, None)


def _pair_runs(first: np.ndarray, second: np.ndarray):
    """Runs along the rows of two label arrays where they differ with the same pair of classes.

    Returns (row, start, stop, class_in_first, class_in_second); ``stop`` is exclusive. A zero column padded
    on both sides of every row keeps runs from crossing rows in the flattened arrays.
    """
    n, w = first.shape
    f = np.zeros((n, w + 2), first.dtype)
    g = np.zeros((n, w + 2), first.dtype)
    f[:, 1:-1], g[:, 1:-1] = first, second
    f, g = f.ravel(), g.ravel()
    d = f != g
    change = (d[1:] != d[:-1]) | (d[1:] & ((f[1:] != f[:-1]) | (g[1:] != g[:-1])))
    idx = np.flatnonzero(change) + 1  # first index of each new run (boundary or not)
    starts = idx[d[idx]]
    stops = idx[np.searchsorted(idx, starts, side="right")]  # the padding guarantees a next change
    rows = starts // (w + 2)
    offset = rows * (w + 2) + 1
    return rows, starts - offset, stops - offset, f[starts].astype(np.int64), g[starts].astype(np.int64)

def trace_rings(edges: np.ndarray, width: int) -> list[np.ndarray]:
    """Link directed edges into closed rings; each ring is an ``(n, 2)`` array of (x, y) corners, not repeated."""
    if not len(edges):
        return []
    nxt = _successors(edges, width)
    ring, order = _rings_in_order(nxt)
    edges, ring = edges[order], ring[order]
    # Corners: edges whose direction differs from the previous edge of the same ring (cyclically).
    starts = np.flatnonzero(np.r_[True, ring[1:] != ring[:-1]])
    ends = np.r_[starts[1:], len(ring)]
    previous = np.arange(len(ring)) - 1
    previous[starts] = ends - 1
    direction = edges[:, 4]
    corner = direction != direction[previous]
    ring_of_corner = ring[corner]
    points = edges[corner][:, :2]
    cuts = np.flatnonzero(np.r_[True, ring_of_corner[1:] != ring_of_corner[:-1]])
    return np.split(points, cuts[1:])


def _successors(edges: np.ndarray, width: int) -> np.ndarray:
    """Index of the edge that follows each edge: the one starting where it ends; at a vertex with two
    (regions of the class touching diagonally) the right turn, which keeps them apart."""
    key = np.int64(width + 1)  # vertex id = y * (W + 1) + x, in int64 (int32 overflows past ~46k x 46k)
    start = edges[:, 1].astype(np.int64) * key + edges[:, 0]
    end = edges[:, 3].astype(np.int64) * key + edges[:, 2]
    order = np.argsort(start, kind="stable")
    sorted_start = start[order]
    first = np.searchsorted(sorted_start, end, side="left")
    count = np.searchsorted(sorted_start, end, side="right") - first
    if np.any(count == 0) or np.any(count > 2):
        raise RuntimeError("Boundary edges do not close into rings (internal error).")
    nxt = order[first]
    saddle = np.flatnonzero(count == 2)
    if len(saddle):
        a, b = order[first[saddle]], order[first[saddle] + 1]
        right = (edges[saddle, 4] + 1) % 4
        nxt[saddle] = np.where(edges[a, 4] == right, a, b)
    return nxt


def _rings_in_order(nxt: np.ndarray):
    """(ring id of each edge, edge order walking each ring from its smallest index), by pointer jumping.

    ``nxt`` is a permutation made of cycles. The ring id is the smallest edge index on the cycle (doubling the
    jump each round: log2(longest ring) rounds); the position is found by list ranking on the cycle cut just
    before that edge.
    """
    n = len(nxt)
    label, jump = np.arange(n), nxt.copy()
    while True:
        new = np.minimum(label, label[jump])
        jump = jump[jump]
        if np.array_equal(new, label):
            break
        label = new
    last = nxt == label  # the edge whose successor is the ring's first edge
    succ = np.where(last, np.arange(n), nxt)
    dist = (~last).astype(np.int64)  # steps to the ring's last edge
    while True:
        dist = dist + dist[succ] * (succ != np.arange(n))
        nsucc = succ[succ]
        if np.array_equal(nsucc, succ):
            break
        succ = nsucc
    order = np.lexsort((-dist, label))
    return label, order


def ring_area(ring: np.ndarray) -> float:
    """Signed area (shoelace, y down): positive for outer rings (region on the right), negative for holes."""
    x, y = ring[:, 0].astype(np.float64), ring[:, 1].astype(np.float64)
    return 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


def _contains(ring: np.ndarray, px: float, py: float) -> bool:
    """Even-odd point-in-polygon for a point that is never on an edge (pixel centres vs integer corners)."""
    x0, y0 = ring[:, 0], ring[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    crosses = (y0 > py) != (y1 > py)
    with np.errstate(divide="ignore", invalid="ignore"):
        xcross = x0 + (py - y0) * (x1 - x0) / (y1 - y0)
    return bool(np.count_nonzero(crosses & (px < xcross)) % 2)


def polygons_of_class(edges: np.ndarray, width: int) -> list[list[np.ndarray]]:
    """Polygons (outer ring first, then holes) of one class from its boundary edges."""
    rings = trace_rings(edges, width)
    if not rings:
        return []
    areas = np.array([ring_area(r) for r in rings])
    outer = np.flatnonzero(areas > 0)
    polygons = {int(i): [rings[i]] for i in outer}
    boxes = np.array([[r[:, 0].min(), r[:, 1].min(), r[:, 0].max(), r[:, 1].max()] for r in rings])[outer]
    outer_area = areas[outer]
    for h in np.flatnonzero(areas < 0):
        hole = rings[h]
        # The centre of the region pixel beside the hole's first unit edge: the walk keeps the region on its
        # right, so step half a pixel along the edge and half a pixel to the right.
        x, y = hole[0]
        dx, dy = np.sign(hole[1] - hole[0])
        px, py = x + 0.5 * dx - 0.5 * dy, y + 0.5 * dy + 0.5 * dx
        inside = np.flatnonzero((boxes[:, 0] <= px) & (px <= boxes[:, 2]) & (boxes[:, 1] <= py) & (py <= boxes[:, 3]))
        for j in inside[np.argsort(outer_area[inside])]:  # smallest first: the innermost container wins
            if _contains(rings[outer[j]], px, py):
                polygons[int(outer[j])].append(hole)
                break
    return list(polygons.values())


def feature(polygon: list[np.ndarray], name: str, color, scale=(1.0, 1.0)) -> dict:
    """A QuPath-style GeoJSON Feature. ``scale`` = (dy, dx) multiplies coordinates (labels → level-0 pixels)."""
    sy, sx = scale
    rings = []
    for ring in polygon:
        pts = np.column_stack([ring[:, 0] * sx, ring[:, 1] * sy])
        pts = np.vstack([pts, pts[:1]])  # GeoJSON rings are closed
        integral = np.all(pts == np.round(pts))
        rings.append(pts.astype(np.int64).tolist() if integral else np.round(pts, 6).tolist())
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": rings},
        "properties": {
            "objectType": "annotation",
            "classification": {"name": name, "color": [int(c) for c in list(color)[:3]]},
        },
    }


def write_feature_collection(fh, features, *, properties: dict | None = None) -> int:
    """Stream a FeatureCollection to an open text file, one feature at a time; returns the feature count."""
    fh.write('{"type": "FeatureCollection"')
    if properties:
        fh.write(', "properties": ' + json.dumps(properties))
    fh.write(', "features": [')
    n = 0
    for f in features:
        fh.write((",\n" if n else "\n") + json.dumps(f, separators=(",", ":")))
        n += 1
    fh.write("\n]}\n")
    return n


def rasterize(features: list[dict], shape, class_names: list[str], scale=(1.0, 1.0)) -> np.ndarray:
    """Labels from polygon features by pixel centres (the inverse of the export, for checks and imports).

    ``scale`` = (dy, dx) divides the coordinates (level-0 → label pixels). Class values come from the position of
    each feature's classification name in ``class_names``. Later features overwrite earlier ones.

    Pixel-edge polygons (what the export writes: axis-parallel edges on whole label pixels) are filled by
    even-odd parity of their vertical edges over the feature's bounding box, in time linear in the box;
    any other polygon goes through ``skimage.draw.polygon``.
    """
    out = np.zeros(shape, np.uint16 if len(class_names) > 256 else np.uint8)
    index = {n: i for i, n in enumerate(class_names)}
    for f in features:
        k = index[f["properties"]["classification"]["name"]]
        rings = [np.asarray(ring, np.float64) / (scale[1], scale[0]) for ring in f["geometry"]["coordinates"]]
        rings = [r for r in rings if len(r)]
        if not rings:
            continue
        filled = _fill_pixel_edge_rings(rings, shape)
        if filled is None:
            filled = _fill_rings(rings, shape)
        (y0, x0), mask = filled
        out[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]][mask] = k
    return out


def _fill_rings(rings, shape):
    """((0, 0), mask): the outer ring filled by pixel centres, holes cleared (skimage, any polygon)."""
    from skimage.draw import polygon as fill

    mask = np.zeros(shape, bool)
    for i, pts in enumerate(rings):
        rr, cc = fill(pts[:, 1] - 0.5, pts[:, 0] - 0.5, shape)
        mask[rr, cc] = i == 0  # outer ring fills, holes clear
    return (0, 0), mask


def _fill_pixel_edge_rings(rings, shape):
    """((y0, x0), mask over the outer ring's box) by even-odd parity, or None when an edge is not axis-parallel
    on whole pixels. A pixel centre (r + 1/2, c + 1/2) is inside when an odd number of vertical edges at x <= c
    span row r; holes are rings too, so they come out by the same rule."""
    starts, ends = [], []
    for r in rings:
        closed = r if (r[0] == r[-1]).all() else np.vstack([r, r[:1]])
        starts.append(closed[:-1])
        ends.append(closed[1:])
    a, b = np.concatenate(starts), np.concatenate(ends)
    if not ((a == np.round(a)).all() and ((a[:, 0] == b[:, 0]) | (a[:, 1] == b[:, 1])).all()):
        return None
    h, w = shape
    outer = rings[0]
    y0, y1 = int(max(0, outer[:, 1].min())), int(min(h, outer[:, 1].max()))
    x0, x1 = int(max(0, outer[:, 0].min())), int(min(w, outer[:, 0].max()))
    if y1 <= y0 or x1 <= x0:
        return (0, 0), np.zeros((0, 0), bool)
    vertical = (a[:, 0] == b[:, 0]) & (a[:, 1] != b[:, 1])
    a, b = a[vertical], b[vertical]
    xs = np.clip(a[:, 0] - x0, 0, x1 - x0).astype(np.int64)
    lo = np.clip(np.minimum(a[:, 1], b[:, 1]) - y0, 0, y1 - y0).astype(np.int64)
    hi = np.clip(np.maximum(a[:, 1], b[:, 1]) - y0, 0, y1 - y0).astype(np.int64)
    marks = np.zeros((y1 - y0 + 1, x1 - x0 + 1), np.int32)
    np.add.at(marks, (lo, xs), 1)  # an edge toggles rows lo..hi-1 at its column
    np.add.at(marks, (hi, xs), 1)
    toggles = np.cumsum(marks, axis=0) & 1
    inside = (np.cumsum(toggles, axis=1) & 1).astype(bool)
    return (y0, x0), inside[: y1 - y0, : x1 - x0]
