"""Box formats: how each model family spells a bounding box in its answers, one codec per format.

Every box in nuwa-train is held one way, `Box01`: (x1, y1, x2, y2) as fractions of the ORIGINAL image's width
and height. A `BoxFormat` renders such a box into the answer text a family was trained on, parses answer text
back, and knows the prompt that asks for one. What differs between formats is the frame the numbers refer to:

- `loc_tokens`  the tiny base's four `<loc_k>` tokens, k = bin of the original frame (bin centres decode);
- `llava`       LLaVA-1.5 / LLaVA-NeXT: "[0.39, 0.57, 0.52, 0.88]", two decimals of the image PADDED TO A SQUARE
                (LLaVA's `expand2square`, image centred), as in LLaVA-665K's RefCOCO part;
- `qwen2_vl`    `<|object_ref_start|>ref<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>`, 0-1000
                integers of the image;
- `qwen2_5_vl`  JSON `[{"bbox_2d": [x1, y1, x2, y2], "label": ref}]` in absolute pixels of the image AFTER the
                processor's resize (`ImageFrame.model_size`);
- `qwen3_vl`    the same JSON, in 0-1000 integers of the image (Qwen3-VL went back to relative coordinates).

Parsing is honest: the first well-formed box wins, anything else is None (scored IoU 0 and counted as
unparseable by evaluation, never dropped).
"""

from __future__ import annotations

import json
import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass

from PIL import Image

from .geometry import COORD_RANGE, Box01, to_grid
from .synthetic import SyntheticConfig

DEFAULT_IMAGE_MEAN = (0.5, 0.5, 0.5)  # padding colour when an image processor states no mean
FLOAT_SLACK = 1e-9  # far below any format's resolution, above float error of a k / 1000 fraction


@dataclass(frozen=True)
class ImageFrame:
    """An image as a model sees it: its original size and, for formats in resized pixels, the model's size."""

    width: int
    height: int
    model_size: tuple[int, int] | None = None  # (width, height) after the processor's resize (Qwen2.5-VL)

    def __post_init__(self):
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"image size {self.width}x{self.height} must be positive")


class BoxFormat(ABC):
    """Render a `Box01` into answer text, parse answer text into one, and ask for one."""

    name: str
    prompt_template: str  # the grounding question, with "{expression}" for the referring expression

    def __init__(self, prompt_template: str | None = None):
        if prompt_template is not None:
            if "{expression}" not in prompt_template:
                raise ValueError(f"prompt_template {prompt_template!r} must contain {{expression}}")
            self.prompt_template = prompt_template

    def prompt(self, expression: str) -> str:
        return self.prompt_template.format(expression=expression)

    # New tokens generation allows for an answer: a box in this format with its label, on tokenizers that spell
    # digits one by one (Llama, Qwen), plus slack; short VQA answers stop at end-of-sequence long before it.
    max_answer_tokens: int
    answer_words: tuple[str, ...] = ()  # words of its answers besides digits and punctuation
    special_tokens: tuple[str, ...] = ()  # tokens its answers use that a real tokenizer holds whole

    def vocabulary(self) -> tuple[list[str], list[str]]:
        """(words, special tokens) a tokenizer needs to spell this format's prompts and answers (tiny models)."""
        template = self.prompt_template.replace("{expression}", " ")
        for token in self.special_tokens:
            template = template.replace(token, " ")
        return re.findall(r"[^\W_]+", template) + list(self.answer_words), list(self.special_tokens)

    def image_frame(self, image: Image.Image, image_processor) -> ImageFrame:
        """The frame this format renders and parses boxes of `image` in (`image_processor`: the model's)."""
        return ImageFrame(*image.size)

    def native_image(self, image: Image.Image, image_processor) -> Image.Image:
        """The image as the model should see it so that its boxes mean what this format says (default: as is)."""
        return image

    def is_own_question(self, text: str) -> bool:
        """Whether `text` asks for a box in this format's own grounding wording (e.g. an lmms-eval task's context)."""
        return self.prompt_template.split("{expression}")[0] in text

    def answer_on_image(self, text: str, frame: ImageFrame) -> str:
        """An answer with its box measured on the image itself rather than on the model's own frame (what a generic
        task asked in this format's wording scores); unchanged when the two frames are the same (the default)."""
        return text

    @abstractmethod
    def render_coordinates(self, box: Box01, frame: ImageFrame) -> str:
        """The box alone, as this format spells it inside a sentence (what a `<bbox>` placeholder becomes)."""

    def render_ref(self, ref: str) -> str:
        """A referring expression as this format marks it inside a sentence (what `<ref-object>` becomes)."""
        return ref

    def render(self, box: Box01, frame: ImageFrame, label: str = "") -> str:
        """The answer a model of this format gives for `box` (`label`: the referring expression, if it names it)."""
        return self.render_coordinates(box, frame)

    @abstractmethod
    def parse(self, text: str, frame: ImageFrame) -> Box01 | None:
        """The first well-formed box in `text`, in the original frame; None if there is none."""


def _clip01(values) -> Box01 | None:
    box = tuple(min(1.0, max(0.0, float(v))) for v in values)
    return box if box[0] < box[2] and box[1] < box[3] else None


_NUMBER = r"\s*(-?\d+(?:\.\d+)?)\s*"


def _first_box(pattern: re.Pattern, text: str, to_fractions) -> Box01 | None:
    """The first match of `pattern` (four numbers) whose `to_fractions(x1, y1, x2, y2)` is a valid box."""
    for match in pattern.finditer(text):
        box = _clip01(to_fractions(*(float(v) for v in match.groups())))
        if box is not None:
            return box
    return None


class LocTokens(BoxFormat):
    """Four atomic tokens `<loc_k>`, k in [0, bins): one per coordinate, the bin of the original frame.

    A bin decodes to its centre on the records' 0-1000 integer frame (floor(1000 (2k + 1) / 2 bins) / 1000), so
    scores equal those computed on the integer boxes the synthetic records hold.
    """

    name = "loc_tokens"
    max_answer_tokens = 8  # four <loc_k> tokens and end-of-sequence
    prompt_template = SyntheticConfig.grounding_template  # the synthetic benchmark's grounding question
    pattern = re.compile(r"<loc_(\d+)>")

    @staticmethod
    def bins_in(vocabulary) -> int:
        """How many coordinate tokens <loc_0> .. <loc_{n-1}> a vocabulary holds (0: it answers otherwise)."""
        bins = 0
        while f"<loc_{bins}>" in vocabulary:
            bins += 1
        return bins

    def __init__(self, bins: int = 32, prompt_template: str | None = None):
        super().__init__(prompt_template)
        if bins < 1:
            raise ValueError(f"bins={bins} must be >= 1")
        self.bins = bins

    def render_coordinates(self, box: Box01, frame: ImageFrame) -> str:
        # FLOAT_SLACK: a record's k / 1000 on a bin edge must land in the bin k * bins // 1000 says
        return "".join(f"<loc_{min(self.bins - 1, math.floor(v * self.bins + FLOAT_SLACK))}>" for v in box)

    def parse(self, text: str, frame: ImageFrame) -> Box01 | None:
        found = self.pattern.findall(text)
        for start in range(0, len(found) - 3):
            bins = [int(v) for v in found[start : start + 4]]
            if max(bins) < self.bins:
                box = _clip01((2 * b + 1) * COORD_RANGE // (2 * self.bins) / COORD_RANGE for b in bins)
                if box is not None:
                    return box
        return None


class LlavaBox(BoxFormat):
    """LLaVA-1.5's "[x1, y1, x2, y2]": two decimals of the image padded to a centred square."""

    name = "llava"
    max_answer_tokens = 32  # "[0.39, 0.57, 0.52, 0.88]" is ~25 Llama tokens (digits split)
    prompt_template = "Please provide the bounding box coordinate of the region this sentence describes: {expression}"
    pattern = re.compile(r"\[" + ",".join([_NUMBER] * 4) + r"\]")
    decimals = 2

    @staticmethod
    def square(frame: ImageFrame) -> tuple[int, int, int]:
        """(side, x offset, y offset) of the original image inside LLaVA's padded square."""
        side = max(frame.width, frame.height)
        return side, (side - frame.width) // 2, (side - frame.height) // 2

    def render_coordinates(self, box: Box01, frame: ImageFrame) -> str:
        side, dx, dy = self.square(frame)
        x1, y1, x2, y2 = box
        values = (
            (x1 * frame.width + dx) / side,
            (y1 * frame.height + dy) / side,
            (x2 * frame.width + dx) / side,
            (y2 * frame.height + dy) / side,
        )
        return "[" + ", ".join(f"{v:.{self.decimals}f}" for v in values) + "]"

    def native_image(self, image: Image.Image, image_processor) -> Image.Image:
        """LLaVA-1.5 trained on padded squares (the frame of its boxes), filled with the processor's mean colour; HF's
        CLIP processor would otherwise centre-crop a non-square image and cut objects at its edges away."""
        mean = getattr(image_processor, "image_mean", None) or DEFAULT_IMAGE_MEAN
        return pad_to_square(image, tuple(round(255 * m) for m in mean))

    def answer_on_image(self, text: str, frame: ImageFrame) -> str:
        """The padded square's box re-spelled as fractions of the image itself (the square of a 1x1 image has no
        padding); text without a box is returned as it is."""
        box = self.parse(text, frame)
        return text if box is None else self.render_coordinates(box, ImageFrame(1, 1))

    def parse(self, text: str, frame: ImageFrame) -> Box01 | None:
        side, dx, dy = self.square(frame)
        return _first_box(
            self.pattern,
            text,
            lambda x1, y1, x2, y2: (
                (x1 * side - dx) / frame.width,
                (y1 * side - dy) / frame.height,
                (x2 * side - dx) / frame.width,
                (y2 * side - dy) / frame.height,
            ),
        )


class Qwen2VLBox(BoxFormat):
    """Qwen2-VL's reference and box tokens around "(x1,y1),(x2,y2)", integers on 0-1000 of the image."""

    name = "qwen2_vl"
    max_answer_tokens = 48  # the reference, two box tokens and 12 digits
    special_tokens = ("<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>")
    prompt_template = "Find the bounding box of <|object_ref_start|>{expression}<|object_ref_end|>"
    pattern = re.compile(r"\(" + _NUMBER + "," + _NUMBER + r"\)\s*,\s*\(" + _NUMBER + "," + _NUMBER + r"\)")

    def render_coordinates(self, box: Box01, frame: ImageFrame) -> str:
        x1, y1, x2, y2 = (min(COORD_RANGE, round(v * COORD_RANGE)) for v in box)
        return f"<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>"

    def render_ref(self, ref: str) -> str:
        return f"<|object_ref_start|>{ref}<|object_ref_end|>"

    def render(self, box: Box01, frame: ImageFrame, label: str = "") -> str:
        return (self.render_ref(label) if label else "") + self.render_coordinates(box, frame)

    def parse(self, text: str, frame: ImageFrame) -> Box01 | None:
        return _first_box(self.pattern, text, lambda *values: [v / COORD_RANGE for v in values])


class Qwen25VLBox(BoxFormat):
    """Qwen2.5-VL's JSON `[{"bbox_2d": [...], "label": ...}]` in pixels of the processor's resized image."""

    name = "qwen2_5_vl"
    max_answer_tokens = 64  # the JSON list with "bbox_2d" and "label"
    answer_words = ("bbox", "d", "label", "json")
    prompt_template = "Locate {expression} in the image and output its bbox coordinates in JSON format."
    # the JSON's "bbox_2d" list, or a bare [x1, y1, x2, y2] (what an ms-swift `<bbox>` alone becomes)
    pattern = re.compile(r"(?:\"bbox_2d\"\s*:\s*)?\[" + ",".join([_NUMBER] * 4) + r"\]")

    def image_frame(self, image: Image.Image, image_processor) -> ImageFrame:
        return ImageFrame(*image.size, qwen_model_size(image_processor, *image.size))

    @staticmethod
    def model_size(frame: ImageFrame) -> tuple[int, int]:
        if frame.model_size is None:
            raise ValueError(
                "qwen2_5_vl boxes are in pixels of the resized image: the ImageFrame needs model_size "
                "(see qwen_model_size)"
            )
        return frame.model_size

    def _pixels(self, box: Box01, frame: ImageFrame) -> list[int]:
        width, height = self.model_size(frame)
        x1, y1, x2, y2 = box
        return [round(x1 * width), round(y1 * height), round(x2 * width), round(y2 * height)]

    def render_coordinates(self, box: Box01, frame: ImageFrame) -> str:
        return json.dumps(self._pixels(box, frame))

    def render(self, box: Box01, frame: ImageFrame, label: str = "") -> str:
        return json.dumps([{"bbox_2d": self._pixels(box, frame), "label": label}], ensure_ascii=False)

    def parse(self, text: str, frame: ImageFrame) -> Box01 | None:
        width, height = self.model_size(frame)
        return _first_box(self.pattern, text, lambda x1, y1, x2, y2: (x1 / width, y1 / height, x2 / width, y2 / height))


class Qwen3VLBox(BoxFormat):
    """Qwen3-VL's JSON `[{"bbox_2d": [...], "label": ...}]` in integers on 0-1000 of the image (relative, no longer
    Qwen2.5-VL's resized pixels: the QwenLM/Qwen3-VL cookbooks, e.g. spatial_understanding and 2D grounding, read
    the boxes as x / 1000 * width)."""

    name = "qwen3_vl"
    max_answer_tokens = 64  # the JSON list with "bbox_2d" and "label"
    answer_words = Qwen25VLBox.answer_words
    prompt_template = Qwen25VLBox.prompt_template
    pattern = Qwen25VLBox.pattern

    @staticmethod
    def _thousandths(box: Box01) -> list[int]:
        return [min(COORD_RANGE, round(v * COORD_RANGE)) for v in box]

    def render_coordinates(self, box: Box01, frame: ImageFrame) -> str:
        return json.dumps(self._thousandths(box))

    def render(self, box: Box01, frame: ImageFrame, label: str = "") -> str:
        return json.dumps([{"bbox_2d": self._thousandths(box), "label": label}], ensure_ascii=False)

    def parse(self, text: str, frame: ImageFrame) -> Box01 | None:
        return _first_box(self.pattern, text, lambda *values: [v / COORD_RANGE for v in values])


BOX_FORMATS: dict[str, type[BoxFormat]] = {
    cls.name: cls for cls in (LocTokens, LlavaBox, Qwen2VLBox, Qwen25VLBox, Qwen3VLBox)
}


def box_format(name: str, **settings) -> BoxFormat:
    """The codec called `name` (e.g. `box_format("loc_tokens", bins=32)`)."""
    if name not in BOX_FORMATS:
        raise ValueError(f"box format {name!r} is not one of {', '.join(BOX_FORMATS)}")
    return BOX_FORMATS[name](**settings)


def answer_box_format(
    tokenizer, name: str | None = None, family_format: str | None = None, loc_prompt_template: str | None = None
) -> BoxFormat | None:
    """The box format a model answers in: `name` when given (the recipe key data.box_format), else coordinate
    tokens when its vocabulary has them (the tiny base was trained on them), else `family_format` (its family's);
    None when neither is known (then the records' own answers are used as they are). `loc_prompt_template`: the
    grounding question of coordinate-token models (the synthetic data's own wording); the other formats keep their
    own."""
    bins = LocTokens.bins_in(tokenizer.get_vocab())
    if name is None:
        name = LocTokens.name if bins else family_format
    if name is None:
        return None
    if name != LocTokens.name:
        return box_format(name)
    return box_format(name, prompt_template=loc_prompt_template, **({"bins": bins} if bins else {}))


def qwen_model_size(image_processor, width: int, height: int) -> tuple[int, int]:
    """(width, height) of a `width` x `height` image after a Qwen-VL image processor's resize (its own smart
    resize: sides multiples of patch x merge, area within its pixel bounds): Qwen2.5-VL's box frame."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    size = image_processor.size
    resized_height, resized_width = smart_resize(
        height,
        width,
        factor=image_processor.patch_size * image_processor.merge_size,
        min_pixels=size["shortest_edge"],
        max_pixels=size["longest_edge"],
    )
    return resized_width, resized_height


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """The image centred on a square of `fill` (LLaVA's `expand2square`), the frame of `llava` boxes.

    HF's CLIP processor would otherwise centre-crop a non-square image and cut objects at its edges away.
    """
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), fill)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


# ms-swift's `objects.bbox_type`: what a ShareGPT grounding record's numbers are (default "real")
BBOX_TYPES = {"real": None, "norm_1000": COORD_RANGE, "norm_1": 1}  # name -> scale (None: the image's pixels)
# A pixel box may overhang its image by this much and is clamped to it: the rounding of x + w in COCO-style
# boxes. A box further out is an error: its numbers are not pixels of this image (0-1000 boxes need "norm_1000").
PIXEL_SLACK = 1.0


class BoxError(ValueError):
    """A box that is not a box of its image; the message says why, the caller says where (file, record, field)."""

    def __init__(self, reason: str, kind: str):
        super().__init__(reason)
        self.kind = kind  # the reason without the box's own numbers, for counting


def check_numbers(bbox) -> list[float]:
    """[x1, y1, x2, y2] as floats: four finite numbers (JSON readers accept NaN and Infinity) with x1 < x2, y1 < y2,
    none negative."""
    if (
        not isinstance(bbox, (list, tuple))
        or len(bbox) != 4
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
    ):
        raise BoxError(f"expected [x1, y1, x2, y2] numbers, got {bbox!r}", "not four numbers")
    if not all(math.isfinite(v) for v in bbox):
        raise BoxError(f"box {list(bbox)} holds a value that is not a finite number", "not a finite number")
    if bbox[0] >= bbox[2] or bbox[1] >= bbox[3]:
        raise BoxError(f"box {list(bbox)} needs x1 < x2 and y1 < y2", "x1 >= x2 or y1 >= y2")
    if min(bbox) < 0:
        raise BoxError(f"box {list(bbox)} has a negative coordinate", "negative coordinate")
    return [float(v) for v in bbox]


def object_box01(bbox, bbox_type: str, size: tuple[int, int] | None) -> Box01:
    """An `objects.bbox` entry as fractions of its image, checked (`BoxError`); "real" boxes need the displayed
    image's full (width, height) and must lie in it (within `PIXEL_SLACK`, clamped)."""
    x1, y1, x2, y2 = check_numbers(bbox)
    scale = BBOX_TYPES[bbox_type]
    if scale is not None:
        if x2 > scale or y2 > scale:
            raise BoxError(
                f"box {[x1, y1, x2, y2]} is outside [0, {scale}] (bbox_type {bbox_type!r})", f"outside [0, {scale}]"
            )
        return (x1 / scale, y1 / scale, x2 / scale, y2 / scale)
    if size is None:
        raise ValueError("bbox_type 'real' boxes are pixels: the image's size is needed")
    width, height = size
    if x1 >= width or y1 >= height or x2 > width + PIXEL_SLACK or y2 > height + PIXEL_SLACK:
        hint = " (0-1000 boxes need bbox_type 'norm_1000')" if max(x2, y2) <= COORD_RANGE else ""
        raise BoxError(
            f"box {[x1, y1, x2, y2]} is outside the {width}x{height} image (bbox_type 'real': pixels of "
            f"the image as shown){hint}",
            "outside the image (bbox_type 'real')",
        )
    return (x1 / width, y1 / height, min(x2, width) / width, min(y2, height) / height)


def below_grid(codec: BoxFormat, box: Box01, frame: ImageFrame) -> bool:
    """Whether `box` is smaller than one cell of `codec`'s grid or of the records' 0-1000 grid: its answer, or the
    0-1000 box it is scored against, has no area (the model would learn a box that reads back as none)."""
    x1, y1, x2, y2 = to_grid(box)
    return x1 >= x2 or y1 >= y2 or codec.parse(codec.render_coordinates(box, frame), frame) is None
