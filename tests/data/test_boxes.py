"""Box formats: every family's spelling of a box renders, parses back and scores, on its own frame."""

import itertools

import pytest
import torch

from nuwa_train.data.boxes import (
    BOX_FORMATS,
    ImageFrame,
    LlavaBox,
    box_format,
    qwen_model_size,
)
from nuwa_train.data.geometry import box_iou
from nuwa_train.models.tiny_qwen import TinyQwenSpec, build_processor

FRAMES = [ImageFrame(120, 80, (112, 80)), ImageFrame(64, 96, (64, 96)), ImageFrame(100, 100, (96, 96))]


def grid_boxes(name: str, frame: ImageFrame) -> list[tuple[float, ...]]:
    """Boxes whose every coordinate sits exactly on the format's quantisation grid, inside the image."""
    if name == "loc_tokens":
        centres = [(2 * k + 1) * 1000 // 64 / 1000 for k in range(32)]
        return [
            (a, b, c, d)
            for a, c in itertools.combinations(centres[::5], 2)
            for b, d in itertools.combinations(centres[::7], 2)
        ]
    if name == "llava":
        side, dx, dy = LlavaBox.square(frame)
        xs = [(k / 100 * side - dx) / frame.width for k in range(101) if 0 <= k / 100 * side - dx <= frame.width]
        ys = [(k / 100 * side - dy) / frame.height for k in range(101) if 0 <= k / 100 * side - dy <= frame.height]
    elif name in ("qwen2_vl", "qwen3_vl"):
        xs = ys = [k / 1000 for k in range(0, 1001, 37)]
    else:
        width, height = frame.model_size
        xs, ys = [k / width for k in range(0, width + 1, 7)], [k / height for k in range(0, height + 1, 5)]
    return [(a, b, c, d) for a, c in itertools.combinations(xs[::3], 2) for b, d in itertools.combinations(ys[::3], 2)]


@pytest.mark.parametrize("frame", FRAMES, ids=lambda f: f"{f.width}x{f.height}")
@pytest.mark.parametrize("name", list(BOX_FORMATS))
def test_render_then_parse_is_the_identity_on_the_grid_and_a_perfect_answer_scores_iou_1(name, frame):
    codec = box_format(name)
    boxes = grid_boxes(name, frame)
    assert len(boxes) > 20
    for box in boxes:
        text = codec.render(box, frame, label="the red circle")
        parsed = codec.parse(text, frame)
        assert parsed == pytest.approx(box, abs=1e-9), text
        assert codec.render(parsed, frame, label="the red circle") == text  # and the text is stable
        assert box_iou(parsed, box) == pytest.approx(1.0)


@pytest.mark.parametrize("name", list(BOX_FORMATS))
def test_any_box_is_recovered_within_the_formats_resolution(name):
    codec, frame = box_format(name), FRAMES[0]
    resolution = {
        "loc_tokens": 1 / 32,
        "llava": 0.01 * 120 / 80,
        "qwen2_vl": 1e-3,
        "qwen2_5_vl": 1 / 80,
        "qwen3_vl": 1e-3,
    }[name]
    for box in [(0.1234, 0.2345, 0.5678, 0.9012), (0.0, 0.0, 1.0, 1.0), (0.333, 0.05, 0.334, 0.06)]:
        parsed = codec.parse(codec.render(box, frame), frame)
        if parsed is None:  # only a box thinner than the grid collapses
            assert box[2] - box[0] < resolution
            continue
        assert max(abs(p - b) for p, b in zip(parsed, box)) <= resolution


@pytest.mark.parametrize(
    "name, text, expected",
    [
        ("llava", "It is at [0.10, 0.20, 0.30, 0.40] or maybe [0.5, 0.5, 0.6, 0.6]", (0.10, 0.20, 0.30, 0.40)),
        ("llava", "[0.30, 0.20, 0.10, 0.40] then [0.5, 0.5, 0.6, 0.6]", (0.5, 0.5, 0.6, 0.6)),  # inverted: next one
        ("llava", "[0.1, 0.2, 0.3]", None),
        ("llava", "no box here", None),
        ("qwen2_vl", "<|box_start|>(100,200),(300,400)<|box_end|> and (1,2),(3,4)", (0.1, 0.2, 0.3, 0.4)),
        ("qwen2_vl", "(100, 200), (300, 400)", (0.1, 0.2, 0.3, 0.4)),  # spaces are tolerated
        ("qwen2_vl", "(100,200)", None),
        ("qwen2_5_vl", '```json\n[{"bbox_2d": [10, 20, 50, 40], "label": "x"}]\n```', (0.1, 0.2, 0.5, 0.4)),
        ("qwen2_5_vl", '{"bbox_2d": [10, 20, 50]}', None),
        ("qwen3_vl", '```json\n[{"bbox_2d": [100, 200, 500, 400], "label": "x"}]\n```', (0.1, 0.2, 0.5, 0.4)),
        ("qwen3_vl", '[{"bbox_2d": [100, 200, 1500, 400]}]', (0.1, 0.2, 1.0, 0.4)),  # clipped to the image
        ("loc_tokens", "<loc_1><loc_2><loc_3><loc_4>", tuple((2 * k + 1) * 1000 // 64 / 1000 for k in (1, 2, 3, 4))),
        (
            "loc_tokens",
            "<loc_1><loc_2><loc_40><loc_4><loc_5><loc_6><loc_7>",
            tuple((2 * k + 1) * 1000 // 64 / 1000 for k in (4, 5, 6, 7)),
        ),
        ("loc_tokens", "<loc_1><loc_2><loc_3>", None),
    ],
)
def test_parsing_takes_the_first_well_formed_box_and_nothing_else(name, text, expected):
    frame = ImageFrame(100, 100, (100, 100))
    parsed = box_format(name).parse(text, frame)
    assert parsed == (None if expected is None else pytest.approx(expected))


def test_llava_boxes_refer_to_the_image_padded_to_a_centred_square():
    frame = ImageFrame(200, 100)  # padded to 200x200: the image occupies y in [50, 150)
    whole = box_format("llava").render((0.0, 0.0, 1.0, 1.0), frame)
    assert whole == "[0.00, 0.25, 1.00, 0.75]"
    pixels = (40, 30, 120, 90)  # a box in original pixels maps back exactly
    box = (pixels[0] / 200, pixels[1] / 100, pixels[2] / 200, pixels[3] / 100)
    parsed = box_format("llava").parse(box_format("llava").render(box, frame), frame)
    assert [round(v * s) for v, s in zip(parsed, (200, 100, 200, 100))] == list(pixels)


def test_qwen25_pixel_frame_is_the_processors_resized_image():
    processor = build_processor(TinyQwenSpec())
    image_processor = processor.image_processor
    from PIL import Image

    for width, height in [(120, 80), (64, 200), (33, 47)]:
        outputs = image_processor(images=[Image.new("RGB", (width, height))], return_tensors="pt")
        _, grid_h, grid_w = outputs["image_grid_thw"][0].tolist()
        patch = image_processor.patch_size
        assert qwen_model_size(image_processor, width, height) == (grid_w * patch, grid_h * patch)
    with pytest.raises(ValueError, match="needs model_size"):
        box_format("qwen2_5_vl").render((0.1, 0.1, 0.2, 0.2), ImageFrame(10, 10))


def test_unknown_format_and_prompt_without_expression_are_refused_by_name():
    with pytest.raises(ValueError, match="'llava2' is not one of loc_tokens, llava"):
        box_format("llava2")
    with pytest.raises(ValueError, match="must contain"):
        box_format("llava", prompt_template="find it")
    assert box_format("qwen2_vl", prompt_template="box of {expression}").prompt("the cat") == "box of the cat"


# ---------------------------------------------------------------------------------------------
# the formats in the data path


def test_the_tiny_base_answers_in_its_coordinate_tokens_and_its_records_do_not_change(tiny_base_dir):
    """The default recipe's world: re-rendering synthetic grounding records in `loc_tokens` changes no token."""
    from nuwa_train.data.collate import VisionLanguageCollator
    from nuwa_train.data.records import SyntheticRecords
    from nuwa_train.data.synthetic import SyntheticConfig
    from nuwa_train.lightning import NuwaDataModule

    data = NuwaDataModule(processor_path=tiny_base_dir, train_images=40)
    data.setup()
    assert data.box_codec.name == "loc_tokens" and data.box_codec.bins == SyntheticConfig().coordinate_bins
    synthetic = SyntheticRecords(SyntheticConfig(), "train", 40)
    records = [synthetic[i] for i in range(len(synthetic)) if synthetic[i]["task"] == "grounding"]
    native, plain = data.collator(), VisionLanguageCollator(data.processor)
    for first in range(0, len(records), 8):
        chunk = records[first : first + 8]
        a, b = native(chunk), plain(chunk)
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"])
def test_each_familys_tiny_tokenizer_spells_its_prompts_and_answers_exactly(family):
    from nuwa_train.models.families import FAMILIES, box_format_for

    _, processor = FAMILIES[family].build_tiny(words=["the", "red", "circle", "left", "of", "square"])
    tokenizer, codec = processor.tokenizer, box_format_for(family, processor.tokenizer)
    frame = FRAMES[0]
    texts = [codec.prompt("the red circle left of the square")]
    texts += [codec.render(box, frame, label="the red circle") for box in grid_boxes(codec.name, frame)[::50]]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids, text
        assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"])
def test_each_family_is_asked_and_answered_in_its_own_format(family):
    from PIL import Image

    from nuwa_train.data.collate import VisionLanguageCollator
    from nuwa_train.data.schema import IGNORE_INDEX
    from nuwa_train.models.families import FAMILIES, box_format_for

    _, processor = FAMILIES[family].build_tiny(words=["the", "red", "circle"])
    codec = box_format_for(family, processor.tokenizer)
    assert codec.name == FAMILIES[family].box_format
    image = Image.new("RGB", (120, 80), (0, 0, 0))
    record = {
        "id": "g",
        "image": image,
        "task": "grounding",
        "prompt": "locate the red circle.",
        "answer": "<loc_1><loc_2><loc_3><loc_4>",
        "box": [100, 250, 500, 750],
        "expression": "the red circle",
    }
    collate = VisionLanguageCollator(processor, box_format=codec)
    checked = collate.validate(record, 0)
    prompt, answer = checked.prompt, checked.answer
    assert prompt == codec.prompt("the red circle")
    frame = ImageFrame(120, 80, qwen_model_size(processor.image_processor, 120, 80) if family == "qwen2_5_vl" else None)
    assert answer == codec.render((0.1, 0.25, 0.5, 0.75), frame, label="the red circle")
    assert codec.parse(answer, frame) == pytest.approx((0.1, 0.25, 0.5, 0.75), abs=0.01)
    batch = collate([record])
    assert (batch["labels"] != IGNORE_INDEX).any()


def test_llava_grounding_images_are_padded_so_a_box_maps_back_to_the_original_pixels():
    from PIL import Image, ImageDraw

    from nuwa_train.data.boxes import pad_to_square
    from nuwa_train.data.collate import VisionLanguageCollator
    from nuwa_train.models.families import FAMILIES

    _, processor = FAMILIES["llava"].build_tiny(words=["the", "red", "circle"])
    image = Image.new("RGB", (120, 60), (0, 0, 255))
    pixels = (30, 6, 90, 54)  # in the 120x120 square: (30, 36, 90, 84), on LLaVA's two-decimal grid
    ImageDraw.Draw(image).rectangle((pixels[0], pixels[1], pixels[2] - 1, pixels[3] - 1), fill=(255, 0, 0))
    record = {
        "id": "g",
        "image": image,
        "task": "grounding",
        "prompt": "x",
        "answer": "x",
        "box": [250, 100, 750, 900],
        "expression": "the red circle",
    }
    codec = box_format("llava")
    checked = VisionLanguageCollator(processor, box_format=codec).validate(record, 0)
    padded, answer = checked.image, checked.answer
    assert padded.size == (120, 120)  # the square the model sees, original centred
    mean = tuple(round(255 * m) for m in processor.image_processor.image_mean)
    assert padded.getpixel((0, 0)) == mean and padded.getpixel((60, 31)) == (0, 0, 255)
    square = [round(float(v) * 120) for v in answer.strip("[]").split(",")]  # the answer's box in the square
    region = padded.crop(tuple(square))
    assert region.size == (60, 48) and set(region.getdata()) == {(255, 0, 0)}  # exactly the red rectangle
    assert pad_to_square(image, mean).crop((0, 30, 120, 90)).tobytes() == image.tobytes()


def test_coordinate_tokens_score_exactly_as_the_integer_boxes_of_the_records():
    from nuwa_train.data.geometry import iou
    from nuwa_train.data.synthetic import tokens_to_box

    codec, frame = box_format("loc_tokens"), FRAMES[0]
    truth = (130, 250, 610, 880)
    for bins in itertools.product(range(0, 32, 3), repeat=2):
        text = f"<loc_{bins[0]}><loc_7><loc_{max(bins[1], bins[0] + 1)}><loc_29>"
        legacy = tokens_to_box(text)
        assert codec.parse(text, frame) == pytest.approx(tuple(v / 1000 for v in legacy), abs=1e-12)
        assert box_iou(codec.parse(text, frame), tuple(v / 1000 for v in truth)) == pytest.approx(iou(legacy, truth))
