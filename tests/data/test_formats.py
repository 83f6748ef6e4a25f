"""LLaVA / RefCOCO files: export round trip, validation of user files, skip mode, committed sample."""

import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from nuwa_train.data.formats import (
    LLAVA_FILE,
    REFCOCO_FILE,
    DatasetFormatError,
    export_split,
    load_llava_json,
    load_refcoco_json,
    parse_llava_json,
    parse_refcoco_json,
    write_sample,
)
from nuwa_train.data.synthetic import SyntheticConfig, generate_records, render

CONFIG = SyntheticConfig()
NUM_IMAGES = 12
BAD = 3  # index of the record the malformed cases break
SAMPLE_DIR = Path(__file__).resolve().parents[2] / "data" / "synthetic_sample"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    export_split(out, CONFIG, "val", NUM_IMAGES)
    return out


def _pixels(image):
    return np.asarray(image.convert("RGB"))


# ---------------------------------------------------------------------------------------------
# round trip


def test_export_then_load_gives_back_prompts_answers_boxes_and_images(exported):
    records = list(generate_records(CONFIG, "val", NUM_IMAGES))
    vqa = [r for r in records if r.task == "vqa"]
    grounding = [r for r in records if r.task == "grounding"]
    llava = load_llava_json(exported / LLAVA_FILE)
    refcoco = load_refcoco_json(exported / REFCOCO_FILE)
    assert isinstance(llava.features["image"], datasets.Image) and isinstance(refcoco.features["image"], datasets.Image)
    for dataset, expected, task in ((llava, vqa, "vqa"), (refcoco, grounding, "grounding")):
        assert len(dataset) == len(expected) == NUM_IMAGES
        for row, record in zip(dataset, expected):
            assert (row["id"], row["task"], row["prompt"], row["answer"]) == (
                record.id,
                task,
                record.prompt,
                record.answer,
            )
            assert row["box"] == (None if record.box is None else list(record.box))
            assert row["messages"] == [
                {"role": "user", "content": record.prompt},
                {"role": "assistant", "content": record.answer},
            ]
            assert np.array_equal(_pixels(row["image"]), _pixels(render(record.scene, CONFIG)))
    assert len(datasets.concatenate_datasets([llava, refcoco])) == 2 * NUM_IMAGES


def test_images_resolve_against_image_root_when_json_lives_elsewhere(exported, tmp_path):
    moved = tmp_path / "annotations" / "refcoco.json"
    moved.parent.mkdir()
    shutil.copy(exported / REFCOCO_FILE, moved)
    with pytest.raises(DatasetFormatError, match="field 'image': file not found"):
        load_refcoco_json(moved)
    assert len(load_refcoco_json(moved, image_root=exported)) == NUM_IMAGES


def test_llava_grounding_answers_multi_turn_and_integer_ids(exported, tmp_path):
    records = json.loads((exported / LLAVA_FILE).read_text())[:3]
    records[0]["conversations"][1]["value"] = "[123, 456, 789, 999]"
    records[1]["conversations"][1]["value"] = "<loc_3><loc_4><loc_20><loc_30>"
    records[2]["id"] = 7
    records[2]["conversations"] += [{"from": "human", "value": "and its shape?"}, {"from": "gpt", "value": "circle"}]
    path = tmp_path / "user.json"
    path.write_text(json.dumps(records))
    rows = load_llava_json(path, image_root=exported)
    assert (rows[0]["task"], rows[0]["box"]) == ("grounding", [123, 456, 789, 999])
    assert (rows[1]["task"], rows[1]["box"]) == ("grounding", [109, 140, 640, 953])  # bin centres
    assert (rows[2]["id"], rows[2]["task"], rows[2]["box"]) == ("7", "vqa", None)
    assert [m["role"] for m in rows[2]["messages"]] == ["user", "assistant", "user", "assistant"]
    assert rows[2]["messages"][2]["content"] == "and its shape?"


# ---------------------------------------------------------------------------------------------
# malformed records


def _set(path, value):
    """A mutation that sets record[path...] = value; None deletes the key."""

    def mutate(record, root):
        *parents, last = path
        for key in parents:
            record = record[key]
        if value is None:
            del record[last]
        else:
            record[last] = value

    return mutate


def _not_an_image(record, root):
    (root / "images" / "broken.png").write_text("not a png")
    record["image"] = "images/broken.png"


def _late_image_token(record, root):
    record["conversations"] += [{"from": "human", "value": "<image>\nagain?"}, {"from": "gpt", "value": "no"}]


LLAVA_CASES = {
    "missing image file": (_set(["image"], "images/nope.png"), "image", "file not found"),
    "not an image": (_not_an_image, "image", "cannot read image"),
    "missing id": (_set(["id"], None), "id", "missing"),
    "missing conversations": (_set(["conversations"], None), "conversations", "missing"),
    "conversations not a list": (_set(["conversations"], "hi"), "conversations", "expected list"),
    "no answer turn": (
        _set(["conversations"], [{"from": "human", "value": "<image>\nhi?"}]),
        "conversations",
        "got 1 turns",
    ),
    "no image placeholder": (
        _set(["conversations", 0, "value"], "what colour is it?"),
        "conversations[0].value",
        "'<image>'",
    ),
    "non-alternating": (_set(["conversations", 1, "from"], "human"), "conversations[1].from", "expected 'gpt'"),
    "placeholder in a later turn": (_late_image_token, "conversations[2].value", "only the first turn"),
    "value not a string": (_set(["conversations", 1, "value"], 3), "conversations[1].value", "expected str"),
    "empty answer": (_set(["conversations", 1, "value"], "  "), "conversations[1].value", "empty answer"),
    "inverted box answer": (
        _set(["conversations", 1, "value"], "[500, 10, 400, 90]"),
        "conversations[1].value",
        "x1 >= x2",
    ),
    "zero-width token box": (
        _set(["conversations", 1, "value"], "<loc_3><loc_4><loc_3><loc_9>"),
        "conversations[1].value",
        "x1 >= x2",
    ),
    "five coordinate tokens": (
        _set(["conversations", 1, "value"], "<loc_1><loc_2><loc_3><loc_4><loc_5>"),
        "conversations[1].value",
        "exactly one box",
    ),
    "coordinate token out of range": (
        _set(["conversations", 1, "value"], "<loc_1><loc_2><loc_3><loc_40>"),
        "conversations[1].value",
        "32 bins",
    ),
}

REFCOCO_CASES = {
    "missing image field": (_set(["image"], None), "image", "missing"),
    "missing image file": (_set(["image"], "images/nope.png"), "image", "file not found"),
    "missing problem": (_set(["problem"], None), "problem", "missing"),
    "empty problem": (_set(["problem"], ""), "problem", "empty"),
    "missing box": (_set(["normalized_solution"], None), "normalized_solution", "missing"),
    "inverted x": (
        _set(["normalized_solution"], [10, 5, 3, 40]),
        "normalized_solution",
        "box [10, 5, 3, 40] has x1 >= x2",
    ),
    "zero-width box": (_set(["normalized_solution"], [10, 5, 10, 40]), "normalized_solution", "has x1 >= x2"),
    "inverted y": (_set(["normalized_solution"], [10, 50, 30, 40]), "normalized_solution", "has y1 >= y2"),
    "coordinate 1000": (_set(["normalized_solution"], [10, 5, 30, 1000]), "normalized_solution", "outside [0, 1000)"),
    "negative coordinate": (_set(["normalized_solution"], [-1, 5, 30, 40]), "normalized_solution", "outside [0, 1000)"),
    "float coordinates": (
        _set(["normalized_solution"], [10.5, 5, 30, 40]),
        "normalized_solution",
        "list of 4 integers",
    ),
    "three coordinates": (_set(["normalized_solution"], [10, 5, 30]), "normalized_solution", "list of 4 integers"),
    "width mismatch": (_set(["width"], 640), "width", "640 does not match the image's width 96"),
    "missing height": (_set(["height"], None), "height", "missing"),
}


def _broken_file(exported, tmp_path, name, mutate):
    """A copy of an exported file, next to copies of its images, with record BAD mutated."""
    shutil.copytree(exported / "images", tmp_path / "images")
    records = json.loads((exported / name).read_text())
    mutate(records[BAD], tmp_path)
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path, records


@pytest.mark.parametrize("case", LLAVA_CASES)
def test_malformed_llava_record_names_file_record_and_field(exported, tmp_path, case):
    mutate, field, reason = LLAVA_CASES[case]
    path, records = _broken_file(exported, tmp_path, LLAVA_FILE, mutate)
    with pytest.raises(DatasetFormatError) as error:
        load_llava_json(path)
    record_id = records[BAD].get("id")
    assert str(error.value).startswith(f"{path}: record {BAD} (id {record_id!r}): field '{field}': ")
    assert reason in str(error.value)
    assert (error.value.index, error.value.field) == (BAD, field)


@pytest.mark.parametrize("case", REFCOCO_CASES)
def test_malformed_refcoco_record_names_file_record_and_field(exported, tmp_path, case):
    mutate, field, reason = REFCOCO_CASES[case]
    path, records = _broken_file(exported, tmp_path, REFCOCO_FILE, mutate)
    with pytest.raises(DatasetFormatError) as error:
        load_refcoco_json(path)
    assert str(error.value).startswith(f"{path}: record {BAD} (id {records[BAD]['id']!r}): field '{field}': ")
    assert reason in str(error.value)


def test_error_message_reads_like_the_documented_example(exported, tmp_path):
    path, _ = _broken_file(exported, tmp_path, REFCOCO_FILE, _set(["normalized_solution"], [10, 5, 3, 40]))
    with pytest.raises(DatasetFormatError) as error:
        load_refcoco_json(path)
    assert (
        str(error.value)
        == f"{path}: record 3 (id 'val-000003-grounding'): field 'normalized_solution': box [10, 5, 3, 40] has x1 >= x2"
    )


def test_record_that_is_not_an_object(exported, tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps(["just a string"]))
    with pytest.raises(DatasetFormatError, match=r"record 0 \(id None\): field '<record>': expected a JSON object"):
        load_llava_json(path)


@pytest.mark.parametrize("text, reason", [("{not json", "not valid UTF-8 JSON"), ('{"id": 1}', "expected a JSON list")])
def test_file_that_is_not_a_list_of_records(tmp_path, text, reason):
    path = tmp_path / "x.json"
    path.write_text(text)
    for load in (load_llava_json, load_refcoco_json):
        with pytest.raises(DatasetFormatError, match=reason):
            load(path)


def test_skip_mode_drops_and_counts_every_bad_record(exported, tmp_path):
    shutil.copytree(exported / "images", tmp_path / "images")
    broken = (
        {1: "missing image file", 4: "inverted box answer", 9: "no image placeholder"},
        {1: "missing image file", 4: "inverted x", 9: "width mismatch"},
    )
    for name, parse, load, cases, breaks in (
        (LLAVA_FILE, parse_llava_json, load_llava_json, LLAVA_CASES, broken[0]),
        (REFCOCO_FILE, parse_refcoco_json, load_refcoco_json, REFCOCO_CASES, broken[1]),
    ):
        records = json.loads((exported / name).read_text())
        for index, case in breaks.items():
            cases[case][0](records[index], tmp_path)
        path = tmp_path / name
        path.write_text(json.dumps(records))
        rows, report = parse(path, on_error="skip")
        assert (report.loaded, report.skipped, len(rows)) == (NUM_IMAGES - 3, 3, NUM_IMAGES - 3)
        assert [f": record {i} " in reason for i, reason in zip(breaks, report.reasons)] == [True] * 3
        dataset = load(path, on_error="skip")
        assert dataset["id"] == [r["id"] for i, r in enumerate(records) if i not in breaks]
        with pytest.raises(DatasetFormatError, match="record 1 "):
            load(path)
        with pytest.raises(ValueError, match="on_error"):
            load(path, on_error="ignore")


def test_skip_mode_with_nothing_left_keeps_the_schema(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps([{"id": "a"}]))
    dataset = load_refcoco_json(path, on_error="skip")
    assert len(dataset) == 0 and dataset.features == load_llava_json(SAMPLE_DIR / LLAVA_FILE).features


# ---------------------------------------------------------------------------------------------
# committed sample


def test_committed_sample_regenerates_exactly(tmp_path):
    write_sample(tmp_path)
    for name in (LLAVA_FILE, REFCOCO_FILE, "README.md"):
        assert (tmp_path / name).read_bytes() == (SAMPLE_DIR / name).read_bytes(), name
    images = sorted(p.name for p in (SAMPLE_DIR / "images").iterdir())
    assert images == sorted(p.name for p in (tmp_path / "images").iterdir())
    for name in images:  # compare pixels: PNG bytes may differ across zlib builds
        assert np.array_equal(
            _pixels(Image.open(tmp_path / "images" / name)), _pixels(Image.open(SAMPLE_DIR / "images" / name))
        )
    assert len(load_llava_json(SAMPLE_DIR / LLAVA_FILE)) == len(load_refcoco_json(SAMPLE_DIR / REFCOCO_FILE)) == 24
    assert sum(p.stat().st_size for p in SAMPLE_DIR.rglob("*") if p.is_file()) < 500_000


@pytest.mark.parametrize("name", [LLAVA_FILE, REFCOCO_FILE])
def test_a_json_lines_file_loads_the_same_records_as_its_json_list(exported, tmp_path, name):
    load = load_llava_json if name == LLAVA_FILE else load_refcoco_json
    records = json.loads((exported / name).read_text())
    lines = tmp_path / name.replace(".json", ".jsonl")
    lines.write_text("\n".join(json.dumps(r) for r in records[:2]) + "\n\n" + json.dumps(records[2]) + "\n")
    from_lines = load(lines, image_root=exported)
    from_list = load(exported / name)
    assert len(from_lines) == 3
    for a, b in zip(from_lines, from_list):
        assert (a["id"], a["prompt"], a["answer"], a["box"]) == (b["id"], b["prompt"], b["answer"], b["box"])
    lines.write_text(json.dumps(records[0]) + "\n{broken\n")
    with pytest.raises(DatasetFormatError, match="line 2 is not valid JSON"):
        load(lines, image_root=exported)
