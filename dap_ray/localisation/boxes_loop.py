"""The compiled loop behind :func:`dap_ray.localisation.boxes.cam_to_boxes_batch` (numba).

A module of its own so that importing :mod:`dap_ray.localisation.boxes` (for its
configuration, or in Ray workers that only decode images) does not import numba, which
takes about 0.4 s. The first call in a process compiles the loop (about 5 s on 2 cores) and
caches it on disk where numba finds a writable place; later processes load it in about 0.5 s.
Callers check their inputs: this module trusts them.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["boxes_loop"]


def _compiled(function):
    """``numba.njit``, cached on disk where numba finds a writable place (this package's
    ``__pycache__``, else numba's user cache), so that a process loads rather than compiles."""
    try:
        return numba.njit(cache=True, nogil=True)(function)
    except RuntimeError:  # numba found no writable cache location: compile in each process
        return numba.njit(nogil=True)(function)


@_compiled
def boxes_loop(values, shapes, sizes, thresholds, bias, stride, scale, rectangle_size,
               rectangle_region, max_components, later_first, nms_iou):
    """All maps' boxes: float64 (N, 5) rows of xyxy box and score, grouped by map, and the
    int64 (B,) number of boxes of each map. ``values`` holds the float32 maps one after
    another, each row-major with the (h, w) of ``shapes``; ``sizes`` the images' float64 (W, H)."""
    num_maps = shapes.shape[0]
    largest = 1
    for i in range(num_maps):
        largest = max(largest, shapes[i, 0] * shapes[i, 1])
    labels = np.empty(largest, np.int32)
    pending_r = np.empty(largest, np.int64)  # the flood fill's stack of cells: rows
    pending_c = np.empty(largest, np.int64)  # and columns
    top = np.empty(largest + 1, np.int64)
    left = np.empty(largest + 1, np.int64)
    bottom = np.empty(largest + 1, np.int64)
    right = np.empty(largest + 1, np.int64)
    cells = np.empty(largest + 1, np.int64)
    keys = np.empty(largest, np.int64)
    map_boxes = np.empty((16, 5), np.float64)  # the map's boxes: x1, y1, x2, y2, area
    out = np.empty((4 * num_maps + 16, 5), np.float64)  # the kept boxes: x1, y1, x2, y2, score
    counts = np.zeros(num_maps, np.int64)
    num_out = 0
    start = 0
    for i in range(num_maps):
        h, w = shapes[i, 0], shapes[i, 1]
        cam = values[start : start + h * w]
        start += h * w
        img_w, img_h = sizes[i, 0], sizes[i, 1]
        cell = stride * min(img_w, img_h) / scale
        num_boxes = 0
        for t in thresholds:
            # Label the cells above t, components numbered in raster order of their first cell.
            labels[: h * w] = 0
            num_labels = 0
            for r0 in range(h):
                for c0 in range(w):
                    p = r0 * w + c0
                    if cam[p] <= t or labels[p] != 0:
                        continue
                    num_labels += 1
                    k = num_labels
                    labels[p] = k
                    pending_r[0], pending_c[0] = r0, c0
                    depth = 1
                    r_min, r_max, c_min, c_max, count = r0, r0, c0, c0, 0
                    while depth > 0:
                        depth -= 1
                        r, c = pending_r[depth], pending_c[depth]
                        q = r * w + c
                        count += 1
                        r_min, r_max = min(r_min, r), max(r_max, r)
                        c_min, c_max = min(c_min, c), max(c_max, c)
                        if r > 0 and labels[q - w] == 0 and cam[q - w] > t:
                            labels[q - w] = k
                            pending_r[depth], pending_c[depth] = r - 1, c
                            depth += 1
                        if r + 1 < h and labels[q + w] == 0 and cam[q + w] > t:
                            labels[q + w] = k
                            pending_r[depth], pending_c[depth] = r + 1, c
                            depth += 1
                        if c > 0 and labels[q - 1] == 0 and cam[q - 1] > t:
                            labels[q - 1] = k
                            pending_r[depth], pending_c[depth] = r, c - 1
                            depth += 1
                        if c + 1 < w and labels[q + 1] == 0 and cam[q + 1] > t:
                            labels[q + 1] = k
                            pending_r[depth], pending_c[depth] = r, c + 1
                            depth += 1
                    top[k], bottom[k], left[k], right[k], cells[k] = r_min, r_max, c_min, c_max, count
            if num_labels == 0:
                continue

            # Rank by size (ties: later label first, or earlier) and keep those at least half
            # the largest, up to max_components.
            biggest = 0
            span = num_labels + 1  # a key is -size * span + tie rank, tie rank in [1, span)
            for k in range(1, num_labels + 1):
                if rectangle_size:
                    cells[k] = (bottom[k] - top[k] + 1) * (right[k] - left[k] + 1)
                biggest = max(biggest, cells[k])
            num_ranked = 0
            for k in range(1, num_labels + 1):
                if 2 * cells[k] >= biggest:
                    keys[num_ranked] = -cells[k] * span + (span - k if later_first else k)
                    num_ranked += 1
            ranked = _stable_order(keys[:num_ranked])
            if max_components >= 0:
                num_ranked = min(num_ranked, max_components)
            for j in range(num_ranked):
                k = keys[ranked[j]] % span
                k = span - k if later_first else k

                # The moments of the component's weights (CAM + bias) over its cells, or over
                # every cell above t inside its rectangle.
                s0 = sc = scc = sr = srr = 0.0
                for r in range(top[k], bottom[k] + 1):
                    for c in range(left[k], right[k] + 1):
                        p = r * w + c
                        if (cam[p] > t) if rectangle_region else (labels[p] == k):
                            weight = np.float64(cam[p] + bias)
                            s0 += weight
                            sc += weight * c
                            scc += weight * c * c
                            sr += weight * r
                            srr += weight * r * r
                mean_c, mean_r = sc / s0, sr / s0
                side_c = max(1.0, np.sqrt(12.0 * max(scc / s0 - mean_c * mean_c, 0.0)))
                side_r = max(1.0, np.sqrt(12.0 * max(srr / s0 - mean_r * mean_r, 0.0)))
                x1 = mean_c + 0.5 - side_c / 2
                y1 = mean_r + 0.5 - side_r / 2
                # Cells to original-image pixels, clipped. A box clipped to nothing lay wholly in
                # the stride padding past the image's edge: detectors reject it, so drop it.
                bx1 = min(max(x1 * cell, 0.0), img_w - 1)
                by1 = min(max(y1 * cell, 0.0), img_h - 1)
                bx2 = min(max((x1 + side_c) * cell, 0.0), img_w - 1)
                by2 = min(max((y1 + side_r) * cell, 0.0), img_h - 1)
                if bx2 <= bx1 or by2 <= by1:
                    continue
                if num_boxes == len(map_boxes):
                    map_boxes = _grown(map_boxes, num_boxes)
                map_boxes[num_boxes, 0] = bx1
                map_boxes[num_boxes, 1] = by1
                map_boxes[num_boxes, 2] = bx2
                map_boxes[num_boxes, 3] = by2
                map_boxes[num_boxes, 4] = (bx2 - bx1) * (by2 - by1)
                num_boxes += 1
        if num_boxes == 0:
            continue

        # Score: area over the area of the map's first box (lowest threshold, top rank); then
        # greedy NMS, highest score first, ties in the order the boxes were made.
        scores = np.empty(num_boxes, np.float64)
        for a in range(num_boxes):
            scores[a] = map_boxes[a, 4] / map_boxes[0, 4]
        order = _stable_order(-scores)
        kept = np.empty(num_boxes, np.int64)
        num_kept = 0
        for a in order:
            keep = True
            for b in kept[:num_kept]:
                inter = (max(0.0, min(map_boxes[a, 2], map_boxes[b, 2]) - max(map_boxes[a, 0], map_boxes[b, 0]))
                         * max(0.0, min(map_boxes[a, 3], map_boxes[b, 3]) - max(map_boxes[a, 1], map_boxes[b, 1])))
                union = map_boxes[a, 4] + map_boxes[b, 4] - inter
                if union > 0 and inter / union > nms_iou:
                    keep = False
                    break
            if keep:
                kept[num_kept] = a
                num_kept += 1
        for a in kept[:num_kept]:
            if num_out == len(out):
                out = _grown(out, num_out)
            for j in range(4):
                out[num_out, j] = map_boxes[a, j]
            out[num_out, 4] = scores[a]
            num_out += 1
        counts[i] = num_kept
    return out[:num_out], counts


@_compiled
def _grown(rows, used):
    """A copy of the 2-D ``rows`` with twice the rows, the first ``used`` copied."""
    grown = np.empty((2 * rows.shape[0], rows.shape[1]), rows.dtype)
    for j in range(used):
        for k in range(rows.shape[1]):
            grown[j, k] = rows[j, k]
    return grown


@_compiled
def _stable_order(values):
    """Indices that sort ``values`` ascending, equal values in their given order (a merge sort:
    numba compiles this in a fraction of the time it takes for ``np.argsort``)."""
    n = len(values)
    order = np.arange(n)
    spare = np.empty(n, np.int64)
    width = 1
    while width < n:
        for lo in range(0, n, 2 * width):
            mid, hi = min(lo + width, n), min(lo + 2 * width, n)
            a, b = lo, mid
            for j in range(lo, hi):
                if b >= hi or (a < mid and values[order[a]] <= values[order[b]]):
                    spare[j] = order[a]
                    a += 1
                else:
                    spare[j] = order[b]
                    b += 1
        order, spare = spare, order
        width *= 2
    return order
