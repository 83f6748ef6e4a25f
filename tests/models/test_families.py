"""A model family is one place: the collator, evaluation, the lmms-eval model and loading ask the family entry or
the box format's own methods, and never a type or class name of a family's object."""

import re
from pathlib import Path

import pytest
from PIL import Image

from nuwa_train.data.boxes import BoxFormat, ImageFrame, LlavaBox, box_format
from nuwa_train.data.collate import VisionLanguageCollator, needed_image_side
from nuwa_train.data.geometry import Box01
from nuwa_train.models import families
from nuwa_train.models.families import FAMILIES, ModelFamily, family_of, image_side, processor_classes
from nuwa_train.models.loading import load_processor
from nuwa_train.models.qwen2_vl import Qwen2VLImageProcessorOnly

ROOT = Path(__file__).resolve().parents[2]
# Who may name a family's classes: the families' own modules and the box formats; every other module asks.
OWNERS = ("nuwa_train/models/", "nuwa_train/data/boxes.py")
ASKING_FILES = sorted(
    str(path.relative_to(ROOT))
    for path in (ROOT / "nuwa_train").rglob("*.py")
    if not str(path.relative_to(ROOT)).startswith(OWNERS)
)
FAMILY_NAMES = re.compile(
    r"LlavaBox|Qwen25VLBox|Qwen2VLBox|Qwen3VLBox|LocTokens|Qwen2VL|Qwen2_5_VL|Qwen3VL|"
    r"in\s+type\([^)]*\)\.__name__|\.__name__\s*(==|!=|in\b)|"
    r"isinstance\([^)]*(Box|Format|Codec|Processor)"
)
WORDS = ["the", "red", "circle"]


class FramedBox(BoxFormat):
    """A format no module knows by name: boxes in fractions of the image shrunk to half its size, inside a frame
    that only its own methods describe. The collator must use them (it used to test for LLaVA/Qwen classes)."""

    name = "framed"
    max_answer_tokens = 32
    prompt_template = "where is {expression}"

    def image_frame(self, image, image_processor):
        return ImageFrame(*image.size, model_size=(image.width // 2, image.height // 2))

    def native_image(self, image, image_processor):
        return image.resize((image.width // 2, image.height // 2))

    def render_coordinates(self, box: Box01, frame: ImageFrame) -> str:
        return "<" + ",".join(str(round(v * frame.model_size[0])) for v in box) + ">"

    def parse(self, text, frame):
        return None


def test_the_collator_asks_the_box_format_for_its_frame_and_image():
    _, processor = FAMILIES["llava"].build_tiny(words=WORDS)
    collate = VisionLanguageCollator(processor, box_format=FramedBox())
    image = Image.new("RGB", (120, 80))
    assert collate.image_frame(image) == ImageFrame(120, 80, (60, 40))
    assert collate.native_image(image).size == (60, 40)
    checked = collate.validate(
        {
            "id": "g",
            "image": image,
            "task": "grounding",
            "prompt": "p",
            "answer": "a",
            "box": [100, 250, 500, 750],
            "expression": "the red circle",
        },
        0,
    )
    assert checked.image.size == (60, 40) and checked.prompt == "where is the red circle"
    assert checked.answer == "<6,15,30,45>"  # the format's frame (60 px wide), not the image's 120
    # no box format: the image as it is
    plain = VisionLanguageCollator(processor)
    assert plain.image_frame(image) == ImageFrame(120, 80) and plain.native_image(image) is image


def test_llava_box_owns_its_padded_square_and_its_way_back_to_the_image():
    _, processor = FAMILIES["llava"].build_tiny(words=WORDS)
    codec, image = LlavaBox(), Image.new("RGB", (120, 60), (0, 0, 255))
    square = codec.native_image(image, processor.image_processor)
    assert square.size == (120, 120)
    assert square.getpixel((0, 0)) == tuple(round(255 * m) for m in processor.image_processor.image_mean)
    assert codec.native_image(image, None).getpixel((0, 0)) == (128, 128, 128)  # no processor mean: mid grey
    frame = ImageFrame(120, 60)
    answer = codec.render((0.25, 0.1, 0.75, 0.9), frame)
    assert answer == "[0.25, 0.30, 0.75, 0.70]"  # on the square
    assert codec.answer_on_image(answer, frame) == "[0.25, 0.10, 0.75, 0.90]"  # on the image
    assert codec.answer_on_image("a cat", frame) == "a cat"
    assert codec.is_own_question(codec.prompt("the cat") + " Answer briefly.")
    assert not codec.is_own_question("What is in the image?")
    for name in ("qwen2_vl", "qwen2_5_vl", "loc_tokens"):  # frames equal to the image's: answers unchanged
        assert box_format(name).answer_on_image("[0.1, 0.2, 0.3, 0.4]", frame) == "[0.1, 0.2, 0.3, 0.4]"
        assert box_format(name).native_image(image, processor.image_processor) is image


def test_qwen_processor_quirks_are_declared_by_the_family(tmp_path):
    _, processor = FAMILIES["qwen2_vl"].build_tiny(words=WORDS)
    area = processor.image_processor.size["longest_edge"]
    assert FAMILIES["qwen2_vl"].image_side(processor) == image_side(processor, "qwen2_vl") == int(area**0.5)
    assert needed_image_side(processor) == area  # read as a side, the area is wrong: hence the family's flag
    assert not FAMILIES["llava"].image_sizes_are_areas
    assert processor_classes()["Qwen2VLImageProcessorOnly"] is Qwen2VLImageProcessorOnly
    processor.save_pretrained(tmp_path)
    assert isinstance(load_processor(tmp_path), Qwen2VLImageProcessorOnly)
    for family in ("qwen2_vl", "qwen2_5_vl"):
        assert FAMILIES[family].image_sizes_are_areas


def test_a_family_is_one_registry_entry(monkeypatch, tmp_path):
    """A new entry alone makes a model found, its processor loaded in its own class and its boxes its format's."""

    class RenamedQwenProcessor(Qwen2VLImageProcessorOnly):
        pass

    llava = FAMILIES["llava"]
    entry = ModelFamily(
        "llava",
        llava.adapter,
        llava.model_class,
        "qwen2_vl",
        llava.tiny_builder,
        {"LlavaProcessor": RenamedQwenProcessor},
    )
    monkeypatch.setitem(families.FAMILIES, "llava", entry)
    model, processor = entry.build_tiny(words=WORDS)
    assert family_of(model) is entry
    assert families.box_format_for("llava", processor.tokenizer).name == "qwen2_vl"
    assert "<|box_start|>" in processor.tokenizer.get_vocab()  # the tiny tokenizer spells the entry's format
    processor.save_pretrained(tmp_path)
    monkeypatch.setattr(RenamedQwenProcessor, "from_pretrained", classmethod(lambda cls, path, **kw: ("loaded", cls)))
    assert load_processor(tmp_path) == ("loaded", RenamedQwenProcessor)


def test_every_family_is_found_by_its_class_and_models_of_two_families_sharing_an_adapter_are_told_apart():
    for name, family in FAMILIES.items():
        model, _ = family.build_tiny()
        assert family_of(model) is family, name
        assert model.config.model_type == name


@pytest.mark.parametrize("path", ASKING_FILES)
def test_the_asking_layers_name_no_family_class(path):
    source = (ROOT / path).read_text()
    assert not FAMILY_NAMES.findall(source), f"{path} checks a family's type or class name"
