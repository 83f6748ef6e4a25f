"""ShareGPT-style records (LLaMA-Factory, ms-swift): read from JSON, JSONL, save_to_disk folders and a
dataset_info.json entry alike; grounding placeholders are written in each family's own box format."""

import json
import re

import datasets
import pytest
from PIL import Image, ImageDraw

from nuwa_train.data.boxes import ImageFrame, box_format, qwen_model_size
from nuwa_train.data.collate import CollateError, VisionLanguageCollator
from nuwa_train.data.formats import DatasetFormatError
from nuwa_train.data.geometry import box_iou
from nuwa_train.data.records import FileRecords
from nuwa_train.data.schema import IGNORE_INDEX
from nuwa_train.data.sharegpt import load_sharegpt_json, parse_sharegpt_json, sharegpt_source
from nuwa_train.evaluation import _score
from nuwa_train.models.families import FAMILIES

WIDTH, HEIGHT = 200, 100
SHEEP = [40.0, 20.0, 120.0, 80.0]  # pixels of the 200x100 original
DOG = [130.0, 10.0, 190.0, 60.0]
WORDS = ["find", "the", "sheep", "dog", "and", "are", "here", "what", "colour", "is", "it", "white", "you", "help"]


def swift_records() -> list[dict]:
    """ms-swift's documented shapes: a grounding question, a dense answer with two objects, a VQA and a text turn."""
    return [
        {
            "messages": [
                {"role": "user", "content": "<image>find the <ref-object>"},
                {"role": "assistant", "content": "<bbox>"},
                {"role": "user", "content": "what colour is it"},
                {"role": "assistant", "content": "white"},
            ],
            "images": ["images/field.png"],
            "objects": {"ref": ["sheep"], "bbox": [SHEEP]},
        },
        {
            "messages": [
                {"role": "user", "content": "<image>what are here"},
                {"role": "assistant", "content": "<ref-object><bbox> and <ref-object><bbox>"},
            ],
            "images": ["images/field.png"],
            "objects": {"ref": ["the sheep", "the dog"], "bbox": [SHEEP, DOG]},
        },
        {
            "id": "norm",
            "messages": [
                {"role": "user", "content": "<image>find the <ref-object>"},
                {"role": "assistant", "content": "<bbox>"},
            ],
            "images": ["images/field.png"],
            "objects": {
                "ref": ["dog"],
                "bbox": [[v / s * 1000 for v, s in zip(DOG, (WIDTH, HEIGHT) * 2)]],
                "bbox_type": "norm_1000",
            },
        },
        {"messages": [{"role": "user", "content": "help"}, {"role": "assistant", "content": "you"}]},
    ]


def as_llama_factory(record: dict) -> dict:
    """The same record in LLaMA-Factory's sharegpt default tags (conversations / from / value / human / gpt)."""
    turns = [
        {"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]} for m in record["messages"]
    ]
    return {**{k: v for k, v in record.items() if k != "messages"}, "conversations": turns}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharegpt")
    (root / "images").mkdir()
    image = Image.new("RGB", (WIDTH, HEIGHT), (0, 90, 0))
    draw = ImageDraw.Draw(image)
    draw.rectangle([int(v) for v in SHEEP[:2]] + [int(v) - 1 for v in SHEEP[2:]], fill=(255, 255, 255))
    draw.rectangle([int(v) for v in DOG[:2]] + [int(v) - 1 for v in DOG[2:]], fill=(120, 60, 0))
    image.save(root / "images" / "field.png")
    (root / "swift.json").write_text(json.dumps(swift_records()))
    (root / "swift.jsonl").write_text("\n".join(json.dumps(r) for r in swift_records()) + "\n")
    (root / "factory.json").write_text(json.dumps([as_llama_factory(r) for r in swift_records()]))
    return root


def comparable(rows):
    return [{k: v for k, v in row.items() if k not in ("source", "image")} for row in rows]


def test_json_jsonl_llama_factory_and_dataset_info_read_the_same_rows(folder):
    rows, report = parse_sharegpt_json(folder / "swift.json")
    assert report.loaded == 4 and report.skipped == 0
    assert [row["task"] for row in rows] == ["grounding", "vqa", "grounding", "text"]
    assert rows[0]["box"] == [200, 200, 600, 800] and rows[0]["expression"] == "sheep"
    assert rows[2]["box"] == [650, 100, 950, 600] and rows[2]["id"] == "norm"
    assert [len(row["messages"]) for row in rows] == [4, 2, 2, 2]
    for other in ("swift.jsonl", "factory.json"):
        assert comparable(parse_sharegpt_json(folder / other)[0]) == comparable(rows)
    info = folder / "dataset_info.json"
    renamed = [
        {
            **{k: v for k, v in r.items() if k not in ("conversations", "images")},
            "chat": r["conversations"],
            "pictures": r.get("images"),
        }
        for r in (as_llama_factory(r) for r in swift_records())
    ]
    for record in renamed:
        for turn in record["chat"]:
            turn["speaker"], turn["text"] = {"human": "asker", "gpt": "bot"}[turn.pop("from")], turn.pop("value")
    (folder / "renamed.json").write_text(json.dumps(renamed))
    info.write_text(
        json.dumps(
            {
                "field": {
                    "file_name": "renamed.json",
                    "formatting": "sharegpt",
                    "columns": {"messages": "chat", "images": "pictures"},
                    "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "asker", "assistant_tag": "bot"},
                }
            }
        )
    )
    path, layout = sharegpt_source(f"{info}:field")
    assert comparable(parse_sharegpt_json(path, layout=layout)[0]) == comparable(rows)


def test_a_save_to_disk_folder_with_embedded_images_reads_the_same_rows(folder, tmp_path):
    records = [r for r in swift_records() if "images" in r]
    table = datasets.Dataset.from_dict(
        {
            "messages": [r["messages"] for r in records],
            "images": [[str(folder / "images" / "field.png")] for _ in records],
            "objects": [json.dumps(r["objects"]) for r in records],
        },
        features=datasets.Features(
            {
                "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
                "images": datasets.List(datasets.Image()),
                "objects": datasets.Value("string"),
            }
        ),
    )
    table = table.map(lambda r: r)  # embeds the image bytes, as a hub download does
    table.save_to_disk(str(tmp_path / "saved"))
    rows, _ = parse_sharegpt_json(tmp_path / "saved")
    expected = [row for row in parse_sharegpt_json(folder / "swift.json")[0] if row["task"] != "text"]
    assert comparable(rows) == [{**row, "id": str(i)} for i, row in enumerate(comparable(expected))]
    from nuwa_train.data.formats import EmbeddedImage

    lazy = FileRecords([], [], "raise", sharegpt_files=[str(tmp_path / "saved")])
    assert all(isinstance(row["image"], EmbeddedImage) for row in lazy.parts[0])  # no image bytes held at start-up
    original = Image.open(folder / "images" / "field.png").convert("RGB")
    for number, row in enumerate(expected):
        read = lazy[number]
        assert read["image"].tobytes() == original.tobytes() and read["box"] == row["box"]
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(DatasetFormatError, match="splits train: name one split's folder"):
        parse_sharegpt_json(tmp_path / "splits")


def test_pixel_boxes_of_unread_images_are_resolved_when_the_record_is_read(folder):
    checked = parse_sharegpt_json(folder / "swift.json")[0]
    lazy = FileRecords([], [], "raise", sharegpt_files=[str(folder / "swift.json")])
    assert lazy.parts[0][0]["box"] is None  # start-up opens no image: the size is not known yet
    for number, row in enumerate(checked):
        read = lazy[number]
        assert read["box"] == row["box"] and read["objects"] == row["objects"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_placeholders_are_written_in_each_familys_format_and_score_as_the_original_box(folder, family):
    model, processor = FAMILIES[family].build_tiny(words=WORDS)
    codec = box_format(FAMILIES[family].box_format)
    rows = [
        {**row, "image": row["image"] and Image.open(row["image"]).convert("RGB")}
        for row in parse_sharegpt_json(folder / "swift.json")[0]
    ]
    collate = VisionLanguageCollator(processor, box_format=codec)
    frame = collate.image_frame(rows[0]["image"])
    sheep, dog = ([v / s for v, s in zip(box, (WIDTH, HEIGHT) * 2)] for box in (SHEEP, DOG))
    first, dense = collate.validate(rows[0], 0), collate.validate(rows[1], 1)
    assert first.turns == [
        (f"find the {codec.render_ref('sheep')}", codec.render_coordinates(sheep, frame)),
        ("what colour is it", "white"),
    ]
    assert dense.answer == (
        f"{codec.render_ref('the sheep')}{codec.render_coordinates(sheep, frame)} and "
        f"{codec.render_ref('the dog')}{codec.render_coordinates(dog, frame)}"
    )
    parsed = codec.parse(first.answer, frame)
    assert box_iou(parsed, sheep) > 0.97  # the format's quantisation only
    batch = collate(rows)
    assert (batch["labels"] != IGNORE_INDEX).sum(1).gt(0).all()
    prompts = VisionLanguageCollator(processor, box_format=codec, with_answer=False)  # as evaluation asks
    assert prompts.validate(rows[0], 0).turns == [(first.prompt, None)]
    graded = [
        _score({**row, "kind": row["task"]}, written, 32, prompts)
        for row, written in ((rows[0], first.answer), (rows[1], dense.answer), (rows[2], "no box"))
    ]
    assert [p.correct for p in graded] == [True, True, False]
    assert graded[0].iou == pytest.approx(box_iou(parsed, sheep)) and graded[2].iou is None  # unparseable
    if family == "qwen2_5_vl":
        assert frame.model_size == qwen_model_size(processor.image_processor, WIDTH, HEIGHT)
    if family.startswith("llava"):
        assert first.image.size == (WIDTH, WIDTH)  # padded to the square its boxes refer to


@pytest.mark.parametrize(
    "record, field, reason",
    [
        (
            {
                "messages": [
                    {"role": "user", "content": "<image>find <ref-object>"},
                    {"role": "assistant", "content": "<bbox>"},
                ],
                "images": ["images/field.png"],
                "objects": {"ref": ["a"], "bbox": []},
            },
            "objects.bbox",
            "1 <bbox> placeholders",
        ),
        (
            {
                "messages": [{"role": "user", "content": "<image>x"}, {"role": "assistant", "content": "<bbox>"}],
                "images": ["images/field.png"],
                "objects": {"bbox": [[1, 2, 3, 4]], "bbox_type": "pixels"},
            },
            "objects.bbox_type",
            "'pixels' is not one of real, norm_1000, norm_1",
        ),
        (
            {
                "messages": [{"role": "user", "content": "<image>x"}, {"role": "assistant", "content": "<bbox>"}],
                "images": ["images/field.png"],
                "objects": {"bbox": [[0.5, 0.2, 0.4, 0.9]], "bbox_type": "norm_1"},
            },
            "objects.bbox[0]",
            "needs x1 < x2",
        ),
        (
            {
                "messages": [{"role": "user", "content": "<image>x"}, {"role": "assistant", "content": "y"}],
                "images": ["images/field.png", "images/field.png"],
            },
            "images",
            "2 images",
        ),
        (
            {
                "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "<bbox>"}],
                "objects": {"bbox": [[1, 2, 3, 4]]},
            },
            "messages",
            "placeholders need the record's image",
        ),
        (
            {
                "messages": [{"role": "user", "content": "<image>x"}, {"role": "user", "content": "y"}],
                "images": ["images/field.png"],
            },
            "messages[1].role",
            "expected 'assistant'",
        ),
    ],
    ids=["too-few-boxes", "bbox-type", "reversed-box", "two-images", "no-image", "roles"],
)
def test_a_malformed_record_is_refused_naming_the_field(folder, tmp_path, record, field, reason):
    path = folder / f"bad-{field}.json"
    path.write_text(json.dumps([record]))
    with pytest.raises(DatasetFormatError, match=rf"record 0 .*field '{re.escape(field)}.*{re.escape(reason)}"):
        parse_sharegpt_json(path)
    rows, report = parse_sharegpt_json(path, on_error="skip")
    assert rows == [] and report.skipped == 1


def test_a_system_prompt_reaches_a_template_with_a_system_role_and_is_refused_by_one_without(folder):
    record = {"messages": [{"role": "system", "content": "be brief"}, *swift_records()[3]["messages"]]}
    path = folder / "system.json"
    path.write_text(json.dumps([record]))
    row = load_sharegpt_json(path)[0]
    assert row["system"] == "be brief" and row["task"] == "text"
    _, tiny = FAMILIES["llava"].build_tiny(words=WORDS)
    with pytest.raises(CollateError, match="system prompt but the processor's chat template has no system role"):
        VisionLanguageCollator(tiny)([row])
    _, qwen = FAMILIES["qwen2_vl"].build_tiny(words=WORDS + ["be", "brief", "system"])
    qwen.chat_template = qwen.chat_template.replace(  # a template with a system role, as real Qwen-VL ones have
        "{% if message['role'] == 'user' %}",
        "{% if message['role'] == 'system' %}system : {{ message['content'][0]['text'] }} "
        "{% elif message['role'] == 'user' %}",
    )
    checked = VisionLanguageCollator(qwen).validate(row, 0)
    assert checked.system == "be brief"
    batch = VisionLanguageCollator(qwen)([row])
    assert qwen.tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True).startswith("system : be brief user")
    assert qwen.tokenizer.decode(batch["input_ids"][0][batch["labels"][0] != IGNORE_INDEX]).split()[0] == "you"


def test_placeholders_without_a_box_format_are_refused(folder):
    _, processor = FAMILIES["llava"].build_tiny(words=WORDS)
    row = {**parse_sharegpt_json(folder / "swift.json")[0][0]}
    row["image"] = Image.open(row["image"])
    with pytest.raises(CollateError, match="needs a box format"):
        VisionLanguageCollator(processor)([row])


def test_the_frame_of_qwen25_boxes_is_the_resized_image(folder):
    _, processor = FAMILIES["qwen2_5_vl"].build_tiny(words=WORDS)
    codec = box_format("qwen2_5_vl")
    row = {**parse_sharegpt_json(folder / "swift.json")[0][0]}
    row["image"] = Image.open(row["image"]).convert("RGB")
    answer = VisionLanguageCollator(processor, box_format=codec).validate(row, 0).answer
    width, height = qwen_model_size(processor.image_processor, WIDTH, HEIGHT)
    assert json.loads(answer) == [round(v * s) for v, s in zip((0.2, 0.2, 0.6, 0.8), (width, height) * 2)]
    assert ImageFrame(WIDTH, HEIGHT, (width, height)).model_size == (width, height)
