"""Box arithmetic with no format, model or image in it: the two frames boxes are held in, and their overlap.

Records hold boxes as integers on a 0-1000 grid of the image (`Box`, RefCOCO-style); the box formats and
evaluation work in fractions of the image (`Box01`). Everything here is pure: the synthetic data, the box formats
(data/boxes.py), the collator and evaluation build on it.
"""

from __future__ import annotations

COORD_RANGE = 1000  # RefCOCO/Qwen convention: normalised integer coordinates in [0, 1000)

Box = tuple[int, int, int, int]  # (x1, y1, x2, y2) integers: pixels, or the 0-1000 grid of the image
Box01 = tuple[float, float, float, float]  # (x1, y1, x2, y2) as fractions of the original width / height


def normalise_box(box: Box, width: int, height: int) -> Box:
    """Pixel box -> integer [0, 1000) coordinates, rounding half up."""
    sizes = (width, height, width, height)
    return tuple(min(COORD_RANGE - 1, (2 * v * COORD_RANGE + s) // (2 * s)) for v, s in zip(box, sizes))


def to_box01(box: Box) -> Box01:
    """A record's 0-1000 integer box -> fractions."""
    return tuple(v / COORD_RANGE for v in box)


def to_grid(box: Box01) -> Box:
    """Fractions -> the records' 0-1000 integer frame (what `box` fields and evaluation hold)."""
    return tuple(min(COORD_RANGE - 1, max(0, round(v * COORD_RANGE))) for v in box)


def area(box: Box) -> int:
    """Area of an integer box; a degenerate box (x2 <= x1 or y2 <= y1) has area 0."""
    return max(0, box[2] - box[0]) * max(0, box[3] - box[1])


def iou(box_a: Box, box_b: Box) -> float:
    """Intersection over union of two [x1, y1, x2, y2] boxes; degenerate boxes have area 0."""
    ix = max(0, min(box_a[2], box_b[2]) - max(box_a[0], box_b[0]))
    iy = max(0, min(box_a[3], box_b[3]) - max(box_a[1], box_b[1]))
    inter = ix * iy
    union = area(box_a) + area(box_b) - inter
    return inter / union if union > 0 else 0.0


def box_iou(a: Box01, b: Box01) -> float:
    """Intersection over union of two boxes (any common frame: IoU does not change when an axis is scaled)."""
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
