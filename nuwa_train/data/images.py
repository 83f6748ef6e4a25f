"""Decoded images as a model sees them: upright (EXIF orientation applied) and 8-bit RGB whatever the file's mode.

Every path that turns a file or a PIL image into model input (the file loaders, the collator, evaluation) goes
through `upright` and `to_rgb`, so a record's boxes and its pixels always share one frame, the one photo viewers
and annotation tools show.
"""

from __future__ import annotations

import numpy as np
from PIL import ExifTags, Image, ImageOps

# Transparent pixels are composited on white, as transformers' `convert_to_rgb` and Qwen-VL's `qwen_vl_utils` do
# before their processors (dropping the alpha channel would show whatever colour the transparent pixels hold).
TRANSPARENT_BACKGROUND = (255, 255, 255)
ALPHA_MODES = ("RGBA", "RGBa", "LA", "PA")
# Integer grey deeper than 8 bits (16-bit PNG / TIFF; PIL opens them as "I;16*", older PIL as "I"): the high byte.
DEEP_GREY_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")
DEEP_GREY_SHIFT = 8  # a 16-bit sample >> 8 is its 8-bit level (65535 -> 255)
DEEP_GREY_MAX = 2**16 - 1  # mode "I" holds 32-bit integers: clipped to the 16-bit range first
ROTATED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations whose displayed image swaps width and height
TRANSPOSED_ORIENTATIONS = (2, 3, 4, *ROTATED_ORIENTATIONS)  # 1 (or none): stored as displayed


def orientation(image: Image.Image) -> int:
    """The image's EXIF orientation (1: stored upright; see `ImageOps.exif_transpose`)."""
    value = image.getexif().get(ExifTags.Base.Orientation, 1)
    return value if value in TRANSPOSED_ORIENTATIONS else 1


def displayed_size(size: tuple[int, int], exif_orientation: int) -> tuple[int, int]:
    """(width, height) of an image stored as `size`, as shown once its EXIF orientation is applied."""
    return (size[1], size[0]) if exif_orientation in ROTATED_ORIENTATIONS else tuple(size)


def upright(image: Image.Image) -> Image.Image:
    """The image as displayed: its EXIF orientation applied (and removed), or the image itself if it has none.

    Boxes are drawn on the displayed photo (viewers, browsers and annotation tools rotate it), so the pixels must
    be turned the same way or every box of a rotated photo points at the wrong place.
    """
    return ImageOps.exif_transpose(image) if orientation(image) != 1 else image


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB of any mode PIL reads: palette and 1-bit as their colours, 16-bit grey by its high byte (PIL's
    own conversion clips it at 255: white), transparency composited on `TRANSPARENT_BACKGROUND`, CMYK, YCbCr,
    LAB, HSV and float ("F", PIL's 0-255 levels) through PIL's conversions."""
    if image.mode == "RGB":
        return image
    if image.mode in DEEP_GREY_MODES:
        levels = np.clip(np.asarray(image).astype(np.int64), 0, DEEP_GREY_MAX) >> DEEP_GREY_SHIFT
        return Image.fromarray(levels.astype(np.uint8)).convert("RGB")
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", image.size, TRANSPARENT_BACKGROUND)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")
