"""Deterministic synthetic grounding benchmark: coloured shapes, VQA and referring expressions.

Every record is a pure function of (config, split, index): each record draws from its own
random stream `default_rng([seed, crc32(split), index, stream])`, so any record can be
regenerated alone and the train/val/test splits never share an image.

Boxes follow the RefCOCO convention of Qwen-style models: integers in [0, 1000) as
[x1, y1, x2, y2]. The model spells a box with four atomic coordinate tokens `<loc_0>` ..
`<loc_{bins-1}>`, one per coordinate, decoded to the bin centre.

Measured with the default config (32 bins, 96 px images, object sides 14-36 px) over every box
the generator can produce (82,854 boxes): the exact token answer always decodes to IoU >= 0.5
(worst 0.642, mean 0.863). With a one-bin error on a single edge (653,120 variants) 99.98% still
pass (worst 0.483): only the smallest objects fail, when the error moves an edge inwards. Smaller
objects or fewer bins would break the guarantee, so the tests check it exhaustively.
"""

import itertools
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .geometry import COORD_RANGE, Box, normalise_box

SPLITS = ("train", "val", "test")
LOC_TOKEN = "<loc_{}>"
LOC_PATTERN = re.compile(r"<loc_(\d+)>")
WORD_PATTERN = re.compile(r"\w+|[^\w\s]+")  # what HF `pre_tokenizers.Whitespace` splits on
ATTRIBUTES = ("size", "colour", "shape")  # the order words appear in a noun phrase

Description = tuple[tuple[str, str], ...]  # ((attribute, value), ...) in ATTRIBUTES order

# Independent random streams of one image, so e.g. changing the question mix keeps the layout.
_LAYOUT, _NOISE, _VQA, _GROUNDING, _CONVERSATION = range(5)
DISTINCT_QUESTION_DRAWS = 8  # draws tried per conversation turn for a question not asked before in it

TEMPLATES = {
    "colour": "what colour is {object}?",
    "shape": "what shape is {object}?",
    "count": "how many {things} are there?",
    "existence": "is there {object}?",
    "spatial": "what is {relation} {object}?",
    "relational": "{target} {relation} {anchor}",
}
VQA_KINDS = ("colour", "shape", "count", "existence", "spatial")
ALWAYS_ANSWERABLE = ("count", "existence")  # kinds that fit every image

# relation: (phrase, axis of the box, direction along it)
RELATIONS = {
    "left": ("to the left of", 0, -1),
    "right": ("to the right of", 0, 1),
    "above": ("above", 1, -1),
    "below": ("below", 1, 1),
}


def _as_tuples(value):
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


@dataclass(frozen=True)
class SyntheticConfig:
    """Every knob of the benchmark. Changing any field changes the data, so keep it with results."""

    seed: int = 0
    width: int = 96
    height: int = 96
    object_count: tuple[int, int] = (2, 4)  # inclusive range for images that are not single-object
    single_object_fraction: float = 0.25  # curriculum knob: share of images with exactly one object
    shapes: tuple[str, ...] = ("circle", "square", "triangle")
    colours: tuple[tuple[str, tuple[int, int, int]], ...] = (
        ("red", (220, 40, 40)),
        ("green", (40, 160, 60)),
        ("blue", (40, 80, 220)),
        ("yellow", (235, 200, 30)),
    )
    # (name, min side, max side) in pixels. At 32 bins on 96 px a side of 9 px can decode below
    # IoU 0.5; from 14 px up the worst exact answer is 0.64, leaving room for one-bin errors.
    sizes: tuple[tuple[str, int, int], ...] = (("small", 14, 20), ("large", 26, 36))
    margin: int = 2  # pixels between an object and the border
    gap: int = 3  # pixels between two objects
    background: int = 200  # light grey level
    noise_std: float = 6.0  # gaussian noise on the background, in grey levels
    coordinate_bins: int = 32
    vqa_mix: tuple[tuple[str, float], ...] = tuple((kind, 1.0) for kind in VQA_KINDS)
    relational_fraction: float = 0.3  # share of grounding records using "x left of y" when possible
    grounding_template: str = "locate {expression}."
    placement_attempts: int = 100  # random positions tried per object before re-drawing the layout
    layout_attempts: int = 100  # layouts tried before giving up on an impossible config

    @classmethod
    def from_dict(cls, values: dict) -> "SyntheticConfig":
        """From YAML/JSON, where tuples arrive as lists (nested tuples included)."""
        return cls(**{key: _as_tuples(value) for key, value in values.items()})

    def __post_init__(self):
        low, high = self.object_count
        combos = len(self.shapes) * len(self.colours) * len(self.sizes)
        weights = dict(self.vqa_mix)
        side_fits = all(0 < lo <= hi <= min(self.width, self.height) - 2 * self.margin for _, lo, hi in self.sizes)
        _require(
            1 <= low <= high < combos, f"object_count {self.object_count} must satisfy 1 <= low <= high < {combos}"
        )
        _require(0 <= self.single_object_fraction <= 1, "single_object_fraction must be in [0, 1]")
        _require(0 <= self.relational_fraction <= 1, "relational_fraction must be in [0, 1]")
        _require(set(self.shapes) <= set(_DRAWERS), f"shapes must be among {sorted(_DRAWERS)}")
        _require(side_fits, "every size range must be positive and fit inside the image")
        _require(
            set(weights) <= set(VQA_KINDS) and min(weights.values()) >= 0,
            f"vqa_mix kinds must be in {VQA_KINDS} with weights >= 0",
        )
        _require(
            any(weights.get(kind, 0) > 0 for kind in ALWAYS_ANSWERABLE),
            f"vqa_mix needs weight on one of {ALWAYS_ANSWERABLE} so every image gets a question",
        )
        _require(1 <= self.coordinate_bins <= COORD_RANGE, f"coordinate_bins must be in [1, {COORD_RANGE}]")
        _require("{expression}" in self.grounding_template, "grounding_template must contain '{expression}'")


def _require(ok: bool, message: str):
    if not ok:
        raise ValueError(f"SyntheticConfig: {message}")


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    box: Box  # pixels, x2/y2 exclusive

    @property
    def centre(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)


@dataclass(frozen=True)
class Scene:
    split: str
    index: int
    width: int
    height: int
    objects: tuple[SceneObject, ...]

    @property
    def image_name(self) -> str:
        return f"{self.split}-{self.index:06d}.png"


@dataclass(frozen=True)
class Record:
    """One question or referring expression about one scene, with its target text."""

    id: str
    task: str  # "vqa" or "grounding"
    kind: str  # a VQA kind, or "attribute" / "relational" for grounding
    prompt: str
    answer: str
    scene: Scene
    expression: str | None = None  # grounding only: the bare referring expression
    box: Box | None = None  # grounding only: ground truth, normalised to [0, 1000)
    # Indices into scene.objects of the objects the prompt is about (the answer's evidence): the target of an
    # expression, the object asked about, the objects counted or found; empty when the answer is "no" / "0".
    referred: tuple[int, ...] = ()

    def as_row(self, image) -> dict:
        """The dataset row the collator and the scorers read (`image`: the rendered scene or its pixels)."""
        return dict(
            id=self.id,
            image=image,
            prompt=self.prompt,
            answer=self.answer,
            task=self.task,
            box=self.box,
            kind=self.kind,
            expression=self.expression,
        )


# ---------------------------------------------------------------------------------------------
# coordinate tokens


def box_to_tokens(box: Box, bins: int = SyntheticConfig.coordinate_bins) -> str:
    """The model's spelling of a [0, 1000) box: one coordinate token per coordinate."""
    return "".join(LOC_TOKEN.format(v * bins // COORD_RANGE) for v in box)


def tokens_to_box(text: str, bins: int = SyntheticConfig.coordinate_bins) -> Box | None:
    """Read a box from a model answer: coordinate tokens (decoded to bin centres) or plain integers.

    Accepts "<loc_3><loc_5><loc_20><loc_30>", "[123, 456, 789, 999]" or "(123,456),(789,999)".
    Returns None unless the text holds exactly four coordinates in range: a wrong number of
    coordinates is a wrong answer, not something to guess around.
    """
    tokens = LOC_PATTERN.findall(text)
    if tokens:
        values = [int(t) for t in tokens]
        if len(values) != 4 or max(values) >= bins:
            return None
        return tuple((2 * v + 1) * COORD_RANGE // (2 * bins) for v in values)
    values = [int(v) for v in re.findall(r"\d+", text)]
    if len(values) != 4 or max(values) >= COORD_RANGE:
        return None
    return tuple(values)


def coordinate_tokens(config: SyntheticConfig) -> list[str]:
    """The atomic tokens to register with the tokenizer, in bin order."""
    return [LOC_TOKEN.format(i) for i in range(config.coordinate_bins)]


def vocabulary(config: SyntheticConfig) -> list[str]:
    """Every word/punctuation piece the generator can emit in prompts and answers (no coordinate tokens)."""
    texts = [*TEMPLATES.values(), config.grounding_template, "the a object objects yes no"]
    texts += [f"{s} {s}s" for s in config.shapes]
    texts += [name for name, _ in config.colours] + [name for name, _, _ in config.sizes]
    texts += [phrase for phrase, _, _ in RELATIONS.values()]
    texts += [str(n) for n in range(config.object_count[1] + 1)]
    words = set()
    for text in texts:
        words.update(WORD_PATTERN.findall(re.sub(r"\{\w+\}", " ", text)))
    return sorted(words)


# ---------------------------------------------------------------------------------------------
# scenes


def _rng(config: SyntheticConfig, split: str, index: int, stream: int, draw: int = 0) -> np.random.Generator:
    """`draw` > 0: another question about the same image (draw 0 is the image's first, unchanged)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}, expected one of {SPLITS}")
    entropy = [config.seed, zlib.crc32(split.encode()), index, stream] + ([draw] if draw else [])
    return np.random.default_rng(entropy)


def _apart(a: Box, b: Box, gap: int) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _place(sides: list[int], config: SyntheticConfig, rng: np.random.Generator) -> list[Box] | None:
    """Random non-overlapping square boxes, or None if one did not fit in its attempts."""
    boxes = []
    for side in sides:
        for _ in range(config.placement_attempts):
            x = int(rng.integers(config.margin, config.width - config.margin - side + 1))
            y = int(rng.integers(config.margin, config.height - config.margin - side + 1))
            box = (x, y, x + side, y + side)
            if all(_apart(box, other, config.gap) for other in boxes):
                boxes.append(box)
                break
        else:
            return None
    return boxes


def generate_scene(config: SyntheticConfig, split: str, index: int) -> Scene:
    """The layout of image `index` of `split`: 1..N objects with distinct (size, colour, shape).

    Distinct attribute triples guarantee that every object has at least one unique description.
    """
    rng = _rng(config, split, index, _LAYOUT)
    if rng.random() < config.single_object_fraction:
        count = 1
    else:
        count = int(rng.integers(config.object_count[0], config.object_count[1] + 1))
    combos = list(itertools.product(config.sizes, config.colours, config.shapes))
    for _ in range(config.layout_attempts):
        picked = [combos[i] for i in rng.choice(len(combos), size=count, replace=False)]
        picked.sort(key=lambda c: -c[0][2])  # place large objects first: they are the hard ones
        sides = [int(rng.integers(lo, hi + 1)) for (_, lo, hi), _, _ in picked]
        boxes = _place(sides, config, rng)
        if boxes is not None:
            objects = tuple(
                SceneObject(shape, colour, size, box) for ((size, _, _), (colour, _), shape), box in zip(picked, boxes)
            )
            return Scene(split, index, config.width, config.height, objects)
    raise RuntimeError(
        f"could not place {count} objects in {config.layout_attempts} layouts: enlarge the image or shrink the objects"
    )


def _draw_circle(draw: ImageDraw.ImageDraw, corners: tuple[int, int, int, int], fill: tuple[int, int, int]):
    draw.ellipse(corners, fill=fill)


def _draw_square(draw: ImageDraw.ImageDraw, corners: tuple[int, int, int, int], fill: tuple[int, int, int]):
    draw.rectangle(corners, fill=fill)


def _draw_triangle(draw: ImageDraw.ImageDraw, corners: tuple[int, int, int, int], fill: tuple[int, int, int]):
    x1, y1, x2, y2 = corners
    draw.polygon([(x1, y2), (x2, y2), ((x1 + x2) / 2, y1)], fill=fill)


_DRAWERS = {"circle": _draw_circle, "square": _draw_square, "triangle": _draw_triangle}


def draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, fill) -> None:
    """Draw `obj` so that its shape exactly fills its box; `render` and the pre-training masks share it."""
    x1, y1, x2, y2 = obj.box
    _DRAWERS[obj.shape](draw, (x1, y1, x2 - 1, y2 - 1), fill)  # PIL corners are inclusive


def render(scene: Scene, config: SyntheticConfig) -> Image.Image:
    """Draw the scene on a noisy light-grey background; each shape exactly fills its box."""
    rng = _rng(config, scene.split, scene.index, _NOISE)
    grey = rng.normal(config.background, config.noise_std, size=(scene.height, scene.width, 1))
    pixels = np.repeat(np.clip(np.rint(grey), 0, 255).astype(np.uint8), 3, axis=2)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    palette = dict(config.colours)
    for obj in scene.objects:
        draw_object(draw, obj, palette[obj.colour])
    return image


# ---------------------------------------------------------------------------------------------
# descriptions, questions and referring expressions

_SUBSETS = [s for r in range(1, len(ATTRIBUTES) + 1) for s in itertools.combinations(ATTRIBUTES, r)]


def _describe(obj: SceneObject, attributes: tuple[str, ...]) -> Description:
    return tuple((a, getattr(obj, a)) for a in attributes)


def _matches(obj: SceneObject, description: Description) -> bool:
    return all(getattr(obj, a) == v for a, v in description)


def _phrase(description: Description, article: str = "the") -> str:
    values = dict(description)
    words = [values[a] for a in ("size", "colour") if a in values] + [values.get("shape", "object")]
    return " ".join([article, *words])


def _unique_descriptions(obj: SceneObject, objects: tuple[SceneObject, ...], leave_out: str = "") -> list[Description]:
    """Descriptions (not mentioning `leave_out`) that match `obj` and nothing else."""
    found = []
    for subset in _SUBSETS:
        if leave_out not in subset:
            description = _describe(obj, subset)
            if sum(_matches(o, description) for o in objects) == 1:
                found.append(description)
    return found


def _on_side(obj: SceneObject, anchor: SceneObject, relation: str) -> bool:
    """Centre strictly on that side: anything that a reader could call 'left of' the anchor."""
    _, axis, direction = RELATIONS[relation]
    return direction * (obj.centre[axis] - anchor.centre[axis]) > 0


def _clearly_on_side(obj: SceneObject, anchor: SceneObject, relation: str) -> bool:
    """Entirely on that side, with no overlap along the axis: nobody would dispute it."""
    _, axis, direction = RELATIONS[relation]
    if direction < 0:
        return obj.box[axis + 2] <= anchor.box[axis]
    return obj.box[axis] >= anchor.box[axis + 2]


Question = tuple[str, str, tuple[int, ...]]  # (prompt, answer, indices of the objects it is about)


def _indices(scene: Scene, wanted) -> tuple[int, ...]:
    return tuple(i for i, obj in enumerate(scene.objects) if wanted(obj))


def _colour_questions(scene: Scene) -> list[Question]:
    return [
        (TEMPLATES["colour"].format(object=_phrase(d)), obj.colour, (index,))
        for index, obj in enumerate(scene.objects)
        for d in _unique_descriptions(obj, scene.objects, leave_out="colour")
    ]


def _shape_questions(scene: Scene) -> list[Question]:
    return [
        (TEMPLATES["shape"].format(object=_phrase(d)), obj.shape, (index,))
        for index, obj in enumerate(scene.objects)
        for d in _unique_descriptions(obj, scene.objects, leave_out="shape")
    ]


def _count_questions(scene: Scene, config: SyntheticConfig) -> list[Question]:
    def count(things: str, attribute: str | None = None, value: str | None = None) -> Question:
        counted = _indices(scene, lambda o: attribute is None or getattr(o, attribute) == value)
        return TEMPLATES["count"].format(things=things), str(len(counted)), counted

    questions = [count("objects")]
    questions += [count(f"{s}s", "shape", s) for s in config.shapes]
    questions += [count(f"{c} objects", "colour", c) for c, _ in config.colours]
    return questions


def _existence_questions(scene: Scene, config: SyntheticConfig, rng: np.random.Generator) -> list[Question]:
    """Yes or no with probability 1/2; 'no' includes near misses such as the wrong size."""
    if rng.random() < 0.5:
        descriptions = [_describe(o, s) for o in scene.objects for s in (("colour", "shape"), ATTRIBUTES)]
        answer = "yes"
    else:
        pairs = itertools.product(config.colours, config.shapes)
        candidates = [(("colour", c), ("shape", s)) for (c, _), s in pairs]
        candidates += [(("size", z),) + d for (z, _, _) in config.sizes for d in candidates]
        descriptions = [d for d in candidates if not any(_matches(o, d) for o in scene.objects)]
        answer = "no"
    return [
        (
            TEMPLATES["existence"].format(object=_phrase(d, article="a")),
            answer,
            _indices(scene, lambda o, d=d: _matches(o, d)),
        )
        for d in descriptions
    ]


def _spatial_questions(scene: Scene) -> list[Question]:
    """'What is left of X?' only when exactly one object is on that side, and clearly so (it is the answer)."""
    questions = []
    for anchor in scene.objects:
        for description in _unique_descriptions(anchor, scene.objects):
            for relation, (phrase, _, _) in RELATIONS.items():
                side = [o for o in scene.objects if _on_side(o, anchor, relation)]
                if len(side) == 1 and _clearly_on_side(side[0], anchor, relation):
                    question = TEMPLATES["spatial"].format(relation=phrase, object=_phrase(description))
                    questions.append((question, f"{side[0].colour} {side[0].shape}", (scene.objects.index(side[0]),)))
    return questions


def make_vqa(scene: Scene, config: SyntheticConfig, draw: int = 0) -> Record:
    """One unambiguous question about the scene, its kind drawn from `config.vqa_mix`.

    Kinds that cannot be asked unambiguously about this image (e.g. spatial with one object)
    are dropped and the remaining weights renormalised. `draw` k > 0 is an independent k-th question.
    """
    rng = _rng(config, scene.split, scene.index, _VQA, draw)
    candidates = {
        "colour": _colour_questions(scene),
        "shape": _shape_questions(scene),
        "count": _count_questions(scene, config),
        "existence": _existence_questions(scene, config, rng),
        "spatial": _spatial_questions(scene),
    }
    kinds = [(kind, weight) for kind, weight in config.vqa_mix if weight > 0 and candidates[kind]]
    weights = np.array([w for _, w in kinds])
    kind = kinds[rng.choice(len(kinds), p=weights / weights.sum())][0]
    prompt, answer, referred = candidates[kind][rng.integers(len(candidates[kind]))]
    return Record(
        f"{scene.split}-{scene.index:06d}-vqa{draw or ''}", "vqa", kind, prompt, answer, scene, referred=referred
    )


def _referring_expressions(scene: Scene) -> dict[SceneObject, dict[str, list[str]]]:
    """For each object, its unambiguous expressions by kind ("attribute", "relational")."""
    found = {o: {"attribute": [], "relational": []} for o in scene.objects}
    for obj in scene.objects:
        found[obj]["attribute"] = [_phrase(d) for d in _unique_descriptions(obj, scene.objects)]
    for anchor in scene.objects:
        anchor_phrases = found[anchor]["attribute"]
        for relation, (phrase, _, _) in RELATIONS.items():
            side = [o for o in scene.objects if _on_side(o, anchor, relation)]
            for target in side:
                if not _clearly_on_side(target, anchor, relation):
                    continue
                for subset in _SUBSETS:
                    description = _describe(target, subset)
                    if [o for o in side if _matches(o, description)] == [target]:
                        found[target]["relational"] += [
                            TEMPLATES["relational"].format(target=_phrase(description), relation=phrase, anchor=a)
                            for a in anchor_phrases
                        ]
    return found


def make_grounding(scene: Scene, config: SyntheticConfig, draw: int = 0) -> Record:
    """One unambiguous referring expression for a uniformly chosen object, answered with its box.

    `draw` k > 0 is an independent k-th expression about the same scene.
    """
    rng = _rng(config, scene.split, scene.index, _GROUNDING, draw)
    expressions = _referring_expressions(scene)
    target = scene.objects[rng.integers(len(scene.objects))]
    wants_relation = rng.random() < config.relational_fraction
    kind = "relational" if wants_relation and expressions[target]["relational"] else "attribute"
    options = expressions[target][kind]
    expression = options[rng.integers(len(options))]
    box = normalise_box(target.box, scene.width, scene.height)
    prompt = config.grounding_template.format(expression=expression)
    answer = box_to_tokens(box, config.coordinate_bins)
    record_id = f"{scene.split}-{scene.index:06d}-grounding{draw or ''}"
    return Record(
        record_id, "grounding", kind, prompt, answer, scene, expression, box, referred=(scene.objects.index(target),)
    )


def generate_records(config: SyntheticConfig, split: str, num_images: int, start: int = 0) -> Iterator[Record]:
    """For each image index in [start, start + num_images): its VQA record, then its grounding record."""
    for index in range(start, start + num_images):
        scene = generate_scene(config, split, index)
        yield make_vqa(scene, config)
        yield make_grounding(scene, config)


def make_conversation(scene: Scene, config: SyntheticConfig, turns: int, grounding_share: float) -> tuple[Record, ...]:
    """`turns` questions about one scene in the order asked: each turn a referring expression with probability
    `grounding_share`, else a VQA question (both drawn as `make_vqa` / `make_grounding` draw them).

    The first turn of each task is its draw 0, the image's single-question record, so a conversation's first
    turn is the question a single-turn evaluation asks. A question already asked in the conversation is re-drawn
    (up to DISTINCT_QUESTION_DRAWS times: a later turn should not be answerable by copying an earlier answer).
    """
    if turns < 1:
        raise ValueError(f"a conversation needs turns >= 1, got {turns}")
    if not 0 <= grounding_share <= 1:
        raise ValueError(f"grounding_share={grounding_share} must be in [0, 1]")
    rng = _rng(config, scene.split, scene.index, _CONVERSATION)
    makers = {"vqa": make_vqa, "grounding": make_grounding}
    next_draw = dict.fromkeys(makers, 0)
    records, asked = [], set()
    for _ in range(turns):
        task = "grounding" if rng.random() < grounding_share else "vqa"
        for _ in range(DISTINCT_QUESTION_DRAWS):
            record = makers[task](scene, config, next_draw[task])
            next_draw[task] += 1
            if record.prompt not in asked:
                break
        records.append(record)
        asked.add(record.prompt)
    return tuple(records)
