"""Second round of data faults (issues 27 and 31): boxes that are not boxes of their image, image modes and EXIF
orientation decoded right, links out of the data root, LLaMA-Factory registrations in the library loader, the
expected answer of predictions.jsonl, and the default recipe taking a user's files with the documented flags alone."""

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nuwa_train.data.boxes import box_format
from nuwa_train.data.collate import VisionLanguageCollator, as_image
from nuwa_train.data.formats import DatasetFormatError, parse_llava_json, parse_refcoco_json, read_image
from nuwa_train.data.geometry import to_box01
from nuwa_train.data.records import FileRecords
from nuwa_train.data.sharegpt import load_sharegpt_json, parse_sharegpt_json

SIDE = 96  # the test images' side


def grounding_record(record_id: str, bbox, bbox_type: str | None = "real", image: str = "images/a.png") -> dict:
    objects = {"ref": ["the red block"], "bbox": [bbox]}
    if bbox_type is not None:
        objects["bbox_type"] = bbox_type
    return {
        "id": record_id,
        "images": [image],
        "objects": objects,
        "messages": [
            {"role": "user", "content": "<image>Find <ref-object>"},
            {"role": "assistant", "content": "<bbox>"},
        ],
    }


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    (tmp_path / "images").mkdir()
    Image.new("RGB", (SIDE, SIDE), (30, 60, 90)).save(tmp_path / "images" / "a.png")
    return tmp_path


# ----------------------------------------------------------------------------- 1. pixel boxes outside the image
@pytest.mark.parametrize("bbox_type", ["real", None])  # None: no bbox_type, which means "real" (ms-swift)
@pytest.mark.parametrize("bbox", [[500, 500, 900, 900], [50, 50, 300, 300], [10, 10, 98, 40]])
def test_a_pixel_box_outside_its_image_is_an_error_naming_file_record_and_field(folder, bbox, bbox_type):
    path = write_jsonl(
        folder / "data.jsonl",
        [grounding_record("ok", [10, 10, 40, 40], bbox_type), grounding_record("far", bbox, bbox_type)],
    )
    with pytest.raises(DatasetFormatError) as caught:  # the image read at load: checked at once
        load_sharegpt_json(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: record 1 (id 'far'): field 'objects.bbox[0]'")
    assert f"outside the {SIDE}x{SIDE} image" in message and "norm_1000" in message  # the likely mix-up, named

    data = FileRecords([], [], "raise", sharegpt_files=[str(path)])  # images read when used: checked then
    assert data[0]["objects"]["bbox"] == [[10 / SIDE, 10 / SIDE, 40 / SIDE, 40 / SIDE]]
    with pytest.raises(DatasetFormatError, match=r"record 1 \(id 'far'\): field 'objects.bbox\[0\]'.*outside"):
        data[1]


def test_with_skip_an_outside_box_is_left_out_and_counted(folder):
    path = write_jsonl(
        folder / "data.jsonl", [grounding_record("far", [500, 500, 900, 900]), grounding_record("ok", [10, 10, 40, 40])]
    )
    rows, report = parse_sharegpt_json(path, on_error="skip")
    assert [row["id"] for row in rows] == ["ok"] and report.skipped == 1
    assert report.by_reason == {"objects.bbox[]: outside the image (bbox_type 'real')": 1}
    data = FileRecords([], [], "skip", sharegpt_files=[str(path)])
    assert data[0]["id"] == "ok"  # the next readable record stands in
    access = data.access_reports[str(path)]
    assert access.skipped == 1 and access.first_ids == {"objects.bbox[]: outside the image (bbox_type 'real')": ["far"]}


@pytest.mark.parametrize(
    "bbox, expected",
    [
        ([0, 0, SIDE, SIDE], (0.0, 0.0, 1.0, 1.0)),  # edges on the border: inside
        ([48, 0, SIDE + 0.6, SIDE + 1], (0.5, 0.0, 1.0, 1.0)),  # overhang of rounding (x + w): clamped
        ([0.5, 24, 48, 72.25], (0.5 / SIDE, 0.25, 0.5, 72.25 / SIDE)),
    ],
)
def test_pixel_boxes_on_the_border_or_within_rounding_are_inside(folder, bbox, expected):
    path = write_jsonl(folder / "data.jsonl", [grounding_record("edge", bbox)])
    assert load_sharegpt_json(path)[0]["objects"]["bbox"][0] == pytest.approx(list(expected))
    assert FileRecords([], [], "raise", sharegpt_files=[str(path)])[0]["objects"]["bbox"][0] == pytest.approx(
        list(expected)
    )


def test_a_box_below_one_grid_cell_is_counted_and_named(folder, tiny_base_dir, caplog):
    from nuwa_train.data.schema import BOX_BELOW_GRID
    from nuwa_train.models.loading import load_processor

    path = write_jsonl(
        folder / "data.jsonl",
        [
            grounding_record("large", [10, 10, 60, 60]),
            grounding_record("thin", [10, 10, 11, 60]),  # 1 px of 96: < 1/32
            grounding_record("dot", [10, 10, 10.05, 10.05]),
        ],
    )  # < 1/1000
    data = FileRecords([], [], "raise", sharegpt_files=[str(path)])
    rows = [data[i] for i in range(len(data))]
    collator = VisionLanguageCollator(load_processor(tiny_base_dir), box_format=box_format("loc_tokens", bins=32))
    with caplog.at_level(logging.WARNING):
        collator(rows[:1])
        assert collator.counts[BOX_BELOW_GRID] == 0
        batch = collator(rows)
    assert collator.counts[BOX_BELOW_GRID] == 2 and batch["input_ids"].shape[0] == 3  # counted, kept
    warned = [r.getMessage() for r in caplog.records if BOX_BELOW_GRID in r.getMessage()]
    assert len(warned) == 1 and f"{path}: record 1 (id 'thin')" in warned[0]  # the first one, named


# ----------------------------------------------------------------------------- 2. NaN and Infinity in a box
@pytest.mark.parametrize("bbox_type", ["real", "norm_1000", "norm_1"])
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_in_a_box_are_a_field_error_and_skippable(folder, bbox_type, value):
    good = grounding_record("good", [0.1, 0.1, 0.5, 0.5] if bbox_type == "norm_1" else [10, 10, 50, 50], bbox_type)
    bad = json.dumps(grounding_record("bad", [1, 2, 3, 4], bbox_type)).replace("[1, 2, 3, 4]", f"[1, 2, {value}, 4]")
    path = folder / "data.jsonl"
    path.write_text(json.dumps(good) + "\n" + bad + "\n")
    for check_images in (True, False):
        with pytest.raises(
            DatasetFormatError,
            match=rf"{path}: record 1 \(id 'bad'\): field 'objects.bbox\[0\]': "
            rf"box .* not a finite number",
        ):
            parse_sharegpt_json(path, check_images=check_images)
        rows, report = parse_sharegpt_json(path, on_error="skip", check_images=check_images)
        assert [row["id"] for row in rows] == ["good"]
        assert report.by_reason == {"objects.bbox[]: not a finite number": 1}
    assert FileRecords([], [], "skip", sharegpt_files=[str(path)])[0]["id"] == "good"


# ----------------------------------------------------------------------------- 3. every image mode decoded right
def _gradient(height: int, width: int, top: int) -> np.ndarray:
    """Values 0..top over the image, different in every pixel row and column."""
    ramp = np.linspace(0, 1, height * width).reshape(height, width)
    return np.round(ramp * top)


def _composited(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None].astype(np.float64) / 255
    return rgb * a + 255 * (1 - a)


def mode_image(mode: str, height: int, width: int) -> tuple[Image.Image, np.ndarray]:
    """An image of `mode` and the 8-bit RGB it shows (computed here with numpy, not with PIL's conversions)."""
    grey = _gradient(height, width, 255).astype(np.uint8)
    alpha = _gradient(height, width, 255)[::-1].astype(np.uint8)
    rgb = np.stack([grey, grey[::-1], np.full_like(grey, 200)], axis=-1)
    if mode == "P":
        palette = np.arange(256, dtype=np.uint8)
        colours = np.stack([palette, 255 - palette, palette // 2], axis=-1)
        indexed = Image.frombytes("P", (width, height), grey.tobytes())  # the grey levels as palette indices
        indexed.putpalette(colours.flatten().tolist())
        return indexed, colours[grey]
    if mode == "1":
        bits = grey > 127
        return Image.fromarray(bits), np.repeat(bits[..., None] * 255, 3, axis=-1)
    if mode == "L":
        return Image.fromarray(grey), np.repeat(grey[..., None], 3, axis=-1)
    if mode == "LA":
        image = Image.merge("LA", (Image.fromarray(grey), Image.fromarray(alpha)))
        return image, _composited(np.repeat(grey[..., None], 3, axis=-1), alpha)
    if mode == "RGBA":
        image = Image.fromarray(np.concatenate([rgb, alpha[..., None]], axis=-1))
        return image, _composited(rgb, alpha)
    if mode in ("I;16", "I"):
        deep = _gradient(height, width, 65535)
        image = Image.fromarray(deep.astype(np.uint16 if mode == "I;16" else np.int32))
        return image, np.repeat((deep.astype(np.int64) >> 8)[..., None], 3, axis=-1)
    if mode == "F":
        levels = _gradient(height, width, 255 * 4).astype(np.float32) / 4  # fractional 8-bit levels
        return Image.fromarray(levels), np.repeat(np.round(levels)[..., None], 3, axis=-1)
    if mode == "CMYK":
        cmyk = np.stack([grey, grey[::-1], np.full_like(grey, 40), np.full_like(grey, 30)], axis=-1).astype(np.float64)
        shown = (255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) / 255
        return Image.frombytes("CMYK", (width, height), cmyk.astype(np.uint8).tobytes()), shown
    raise ValueError(mode)


MODES = ("P", "1", "L", "LA", "I;16", "I", "F", "CMYK", "RGBA")
SAVED_AS = {"I": "TIFF", "F": "TIFF", "CMYK": "TIFF"}  # PNG holds the other modes
PROCESSOR_SIDE = 24


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", [(30, 20), (2 * PROCESSOR_SIDE, 2 * PROCESSOR_SIDE + 8), (100, 75)])
def test_every_mode_decodes_to_the_rgb_it_shows_small_and_reduced(tmp_path, mode, size):
    width, height = size
    image, shown = mode_image(mode, height, width)
    path = tmp_path / f"image.{SAVED_AS.get(mode, 'PNG').lower()}"
    image.save(path, SAVED_AS.get(mode, "PNG"))
    with Image.open(path) as reopened:
        assert reopened.mode == image.mode  # the file really holds that mode
    full = np.asarray(read_image(str(path))).astype(int)
    assert full.shape == (height, width, 3)
    assert np.abs(full - shown).max() <= 1, f"{mode}: decoded {full[-1, -1]} vs {shown[-1, -1]}"
    factor = min(size) // PROCESSOR_SIDE
    reduced = np.asarray(read_image(str(path), min_side=PROCESSOR_SIDE)).astype(int)
    if factor >= 2:  # decoded reduced: the box average of what the image shows
        expected = np.asarray(Image.fromarray(np.round(shown).astype(np.uint8)).reduce(factor)).astype(int)
        assert reduced.shape == expected.shape and np.abs(reduced - expected).max() <= 2
    else:
        assert np.array_equal(reduced, full)
    with Image.open(path) as opened:  # a PIL image in its own mode, as a `datasets` Image column gives it
        assert np.abs(np.asarray(as_image(opened, "record 0")).astype(int) - shown).max() <= 1
    assert np.abs(np.asarray(as_image(str(path), "record 0")).astype(int) - shown).max() <= 1


def test_a_16_bit_gradient_is_not_decoded_white(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(_gradient(64, 64, 65535).astype(np.uint16)).save(path)
    decoded = np.asarray(read_image(str(path), min_side=16))[..., 0].astype(int)
    assert decoded.min() < 10 and decoded.max() > 245 and 120 < decoded.mean() < 135  # reduced 4x: box averages
    assert (np.diff(decoded.ravel()) >= 0).all()  # still a gradient, row by row


# ----------------------------------------------------------------------------- 4. EXIF orientation
ORIENTATION_TAG = 0x0112
DISPLAYED = (40, 60)  # (width, height) of the photo as shown
RED_BOX = (25, 40, 38, 58)  # pixels of the displayed photo: where the red block is


def rotated_jpeg(path: Path, orientation: int) -> Path:
    """A JPEG stored sideways whose EXIF orientation turns it back into the displayed photo (red block at RED_BOX)."""
    displayed = Image.new("RGB", DISPLAYED, (0, 0, 255))
    displayed.paste((255, 0, 0), RED_BOX)
    stored = displayed.transpose({6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}[orientation])
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    stored.save(path, "JPEG", quality=95, exif=exif.tobytes())
    return path


def _red_inside(image: Image.Image, box) -> float:
    pixels = np.asarray(image).astype(int)
    x1, y1, x2, y2 = (round(v) for v in box)
    inner = pixels[y1 + 2 : y2 - 2, x1 + 2 : x2 - 2]
    return float(((inner[..., 0] > 200) & (inner[..., 2] < 60)).mean())


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_orientation_turns_image_and_box_frame_as_shown(folder, orientation):
    rotated_jpeg(folder / "images" / "photo.jpg", orientation)
    with Image.open(folder / "images" / "photo.jpg") as stored:
        assert stored.size == DISPLAYED[::-1]  # the file is stored sideways
    image = read_image(str(folder / "images" / "photo.jpg"))
    assert image.size == DISPLAYED and _red_inside(image, RED_BOX) > 0.95

    path = write_jsonl(folder / "data.jsonl", [grounding_record("photo", list(RED_BOX), image="images/photo.jpg")])
    for row in (FileRecords([], [], "raise", sharegpt_files=[str(path)])[0], load_sharegpt_json(path)[0]):
        shown = as_image(row["image"], "record 0")
        box = np.array(row["objects"]["bbox"][0]) * (DISPLAYED * 2)  # fractions of the shown photo -> its pixels
        assert shown.size == DISPLAYED and box == pytest.approx(RED_BOX)
        assert _red_inside(shown, box) > 0.95  # the box lies on the red block
    with Image.open(folder / "images" / "photo.jpg") as opened:  # a PIL image handed to the collator
        assert as_image(opened, "record 0").size == DISPLAYED


def test_a_declared_size_is_the_shown_one_and_a_stored_one_is_explained(folder):
    rotated_jpeg(folder / "images" / "photo.jpg", 6)
    record = {
        "id": "r",
        "image": "images/photo.jpg",
        "problem": "the red block",
        "normalized_solution": [625, 666, 950, 966],
        "width": DISPLAYED[0],
        "height": DISPLAYED[1],
    }
    path = folder / "refcoco.json"
    path.write_text(json.dumps([record]))
    assert parse_refcoco_json(path)[1].loaded == 1
    assert FileRecords([], [str(path)], "raise")[0]["image"].size == DISPLAYED
    path.write_text(json.dumps([{**record, "width": DISPLAYED[1], "height": DISPLAYED[0]}]))
    with pytest.raises(DatasetFormatError, match=r"field 'width': 60 does not match the image's width 40"):
        parse_refcoco_json(path)
    with pytest.raises(DatasetFormatError, match=r"is 40x60 \(stored 60x40, shown turned by its EXIF orientation 6"):
        FileRecords([], [str(path)], "raise")[0]


# ----------------------------------------------------------------------------- 5. links out of the data root
def llava_record(record_id: str, image: str) -> dict:
    return {
        "id": record_id,
        "image": image,
        "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "blue"}],
    }


@pytest.fixture
def linked(folder, tmp_path_factory) -> Path:
    """A data root with a file link and a folder link pointing outside it, and a link pointing inside it."""
    outside = tmp_path_factory.mktemp("outside")
    Image.new("RGB", (8, 8)).save(outside / "secret.png")
    os.symlink(outside / "secret.png", folder / "images" / "file_link.png")
    os.symlink(outside, folder / "folder_link")
    os.symlink(folder / "images" / "a.png", folder / "images" / "inside_link.png")
    os.symlink(folder / "images", folder / "images_alias")
    return folder


@pytest.mark.parametrize("image", ["images/file_link.png", "folder_link/secret.png"])
def test_a_link_in_the_root_pointing_outside_is_refused_unless_allowed(linked, image):
    path = linked / "llava.json"
    path.write_text(json.dumps([llava_record("out", image)]))
    for check_images in (True, False):
        with pytest.raises(
            DatasetFormatError,
            match=r"record 0 \(id 'out'\): field 'image': path .* symbolic link"
            r".*outside the dataset root",
        ):
            parse_llava_json(path, check_images=check_images)
        rows, report = parse_llava_json(path, on_error="skip", check_images=check_images)
        assert not rows and report.by_reason == {"image: link outside the root": 1}
        assert len(parse_llava_json(path, allow_outside_root=True, check_images=check_images)[0]) == 1


@pytest.mark.parametrize("image", ["images/inside_link.png", "images_alias/a.png", "images/a.png"])
def test_links_that_stay_inside_the_root_still_work(linked, image):
    path = linked / "llava.json"
    path.write_text(json.dumps([llava_record("in", image)]))
    assert parse_llava_json(path)[0][0]["image"] == str(linked / image)
    assert FileRecords([str(path)], [], "raise")[0]["image"].size == (SIDE, SIDE)


def test_a_root_reached_through_a_link_is_its_own_inside(linked, tmp_path_factory):
    """The data root itself may be a link (e.g. /data -> /mnt/disk/data): its own images stay inside."""
    link_to_root = tmp_path_factory.mktemp("elsewhere") / "root_link"
    os.symlink(linked, link_to_root)
    (linked / "llava.json").write_text(json.dumps([llava_record("in", "images/a.png")]))
    assert parse_llava_json(link_to_root / "llava.json")[1].loaded == 1


# ----------------------------------------------------------------------------- 6. dataset_info.json in the library
def test_load_sharegpt_json_reads_a_dataset_info_registration(folder):
    records = [
        {
            "id": "c1",
            "dialog": [{"speaker": "me", "text": "<image>What colour?"}, {"speaker": "bot", "text": "blue"}],
            "pictures": ["images/a.png"],
        }
    ]
    write_jsonl(folder / "mine.jsonl", records)
    info = {
        "mine": {
            "file_name": "mine.jsonl",
            "formatting": "sharegpt",
            "columns": {"messages": "dialog", "images": "pictures"},
            "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "me", "assistant_tag": "bot"},
        }
    }
    (folder / "dataset_info.json").write_text(json.dumps(info))
    spec = f"{folder / 'dataset_info.json'}:mine"
    data = load_sharegpt_json(spec)
    assert len(data) == 1 and data[0]["prompt"] == "What colour?" and data[0]["answer"] == "blue"
    rows, report = parse_sharegpt_json(spec)
    assert report.path == str(folder / "mine.jsonl") and rows[0]["source"] == report.path
    with pytest.raises(DatasetFormatError, match="has no dataset 'other' \\(it has: mine\\)"):
        load_sharegpt_json(f"{folder / 'dataset_info.json'}:other")


# ----------------------------------------------------------------------------- 7. expected answers of predictions
@pytest.mark.parametrize("format_name", ["loc_tokens", "qwen2_vl", "llava"])
def test_a_prediction_shows_the_expected_box_as_the_model_is_trained_to_answer(folder, tiny_base_dir, format_name):
    from nuwa_train.evaluation import score_answer
    from nuwa_train.models.loading import load_processor

    path = write_jsonl(folder / "data.jsonl", [grounding_record("g", [12, 24, 60, 72])])
    row = FileRecords([], [], "raise", sharegpt_files=[str(path)])[0]
    processor = load_processor(tiny_base_dir)
    codec = box_format(format_name)
    trained = VisionLanguageCollator(processor, box_format=codec).validate(row, 0).answer
    asking = VisionLanguageCollator(processor, padding_side="left", with_answer=False, box_format=codec)
    prediction = score_answer(row, "no idea", asking)
    assert prediction.answer == trained and "<bbox>" not in prediction.answer
    frame = asking.image_frame(row["image"])
    assert codec.parse(prediction.answer, frame) == pytest.approx((0.125, 0.25, 0.625, 0.75), abs=1 / 32)
    perfect = score_answer(row, trained, asking)  # the expected answer, generated, scores as a hit
    assert perfect.correct and perfect.iou > 0.85  # loc_tokens: bin centres of 32 bins

    refcoco_row = {
        "id": "r",
        "image": row["image"],
        "task": "grounding",
        "prompt": "Where is the block?",
        "answer": "<loc_1><loc_2><loc_3><loc_4>",
        "box": [125, 250, 625, 750],
        "expression": "the block",
    }
    expected = VisionLanguageCollator(processor, box_format=codec).validate(refcoco_row, 0).answer
    assert score_answer(refcoco_row, "", asking).answer == expected
    assert codec.parse(expected, frame) == pytest.approx(to_box01((125, 250, 625, 750)), abs=1 / 32)


def test_eval_writes_the_expected_box_into_predictions_jsonl(tiny_base_dir, tmp_path):
    from nuwa_train.cli import main
    from nuwa_train.data.records import export_conversations
    from nuwa_train.data.synthetic import SyntheticConfig

    conversations = export_conversations(tmp_path / "swift", SyntheticConfig(), "val", 2, 0, 1)  # 2 grounding
    main(
        [
            "eval",
            "--model",
            tiny_base_dir,
            "--method",
            "none",
            "--out",
            str(tmp_path / "out"),
            "--data",
            f"sharegpt={conversations}",
        ]
    )
    predictions = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    boxes = [json.loads(line)["objects"]["bbox"][0] for line in conversations.read_text().splitlines()]
    assert [p["task"] for p in predictions] == ["grounding", "grounding"]
    codec = box_format("loc_tokens", bins=SyntheticConfig().coordinate_bins)  # the tiny base's format
    for prediction, box in zip(predictions, boxes):
        assert prediction["answer"] == codec.render(to_box01(tuple(box)), None)  # not "<bbox>"


# ----------------------------------------------------------------------------- 8. the default recipe takes files
def test_the_default_recipe_trains_on_files_with_the_documented_flags_alone(tiny_base_dir, tmp_path, monkeypatch):
    from nuwa_train.data.records import export_conversations
    from nuwa_train.data.synthetic import SyntheticConfig
    from nuwa_train.lightning import NuwaDataModule, NuwaFineTuner
    from nuwa_train.lightning.cli import NuwaCLI

    recipe = Path(__file__).parents[2] / "recipes" / "default.yaml"
    conversations = export_conversations(tmp_path / "my_data", SyntheticConfig(), "train", 4)
    monkeypatch.chdir(tmp_path)  # the recipe's run directories land here
    cli = NuwaCLI(
        NuwaFineTuner,
        NuwaDataModule,
        run=False,
        args=[
            "--config",
            str(recipe),
            "--model.model_path",
            tiny_base_dir,
            "--data.train_files",
            json.dumps({"sharegpt": [str(conversations)]}),
            "--trainer.max_steps",
            "1",
            "--data.batch_size",
            "2",
            "--trainer.limit_val_batches",
            "0",
        ],
    )
    assert cli.datamodule.hparams.group_by_image  # the recipe's synthetic setting, still there, does not apply
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 1
    assert isinstance(cli.datamodule.dataset("train"), FileRecords) and len(cli.datamodule.dataset("train")) == 4
