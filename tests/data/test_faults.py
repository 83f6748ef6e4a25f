"""Faults in users' data fail early, name the file and record, and nothing is dropped without a count."""

import json
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
from PIL import Image

from nuwa_train.data.collate import CollateError
from nuwa_train.data.formats import LLAVA_FILE, REFCOCO_FILE, DatasetFormatError, export_split, read_image
from nuwa_train.data.records import FileRecords
from nuwa_train.data.schema import ANSWER_TRUNCATED, PROMPT_TOO_LONG, PROMPT_UNKNOWN_TOKENS
from nuwa_train.data.synthetic import SyntheticConfig
from nuwa_train.lightning import NuwaDataModule, NuwaFineTuner
from nuwa_train.lightning.data import DATA_REPORT_NAME

NUM_IMAGES = 8


@pytest.fixture
def files(tmp_path):
    """A fresh copy of a small exported split per test (tests break it in their own ways)."""
    export_split(tmp_path, SyntheticConfig(), "val", NUM_IMAGES)
    return tmp_path


def records_of(path: Path) -> list[dict]:
    return json.loads(path.read_text())


def write_records(path: Path, records: list[dict]) -> None:
    path.write_text(json.dumps(records))


def truncate_image(files: Path, record: dict) -> Path:
    image = files / record["image"]
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    return image


# ----------------------------------------------------------------------------- nothing to train on
def test_an_empty_file_is_an_error_naming_it(files):
    write_records(files / LLAVA_FILE, [])
    with pytest.raises(DatasetFormatError, match=f"{files / LLAVA_FILE}.*no usable records"):
        FileRecords([str(files / LLAVA_FILE)], [str(files / REFCOCO_FILE)], "raise")


def test_a_file_whose_records_are_all_skipped_names_the_file_and_the_reasons_with_counts(files):
    shutil.rmtree(files / "images")  # the wrong image folder: every record points nowhere
    with pytest.raises(DatasetFormatError) as caught:
        FileRecords([str(files / LLAVA_FILE)], [], "skip")
    message = str(caught.value)
    assert str(files / LLAVA_FILE) in message and f"{NUM_IMAGES} x image: file not found" in message
    assert "val-000000-vqa" in message  # the first ids


# ----------------------------------------------------------------------------- images read when used
def test_start_up_opens_no_image(files, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an image was opened at start-up")

    monkeypatch.setattr(Image, "open", refuse)
    data = FileRecords([str(files / LLAVA_FILE)], [str(files / REFCOCO_FILE)], "raise")
    assert len(data) == 2 * NUM_IMAGES


def test_a_truncated_image_fails_when_read_naming_the_file_and_record(files):
    bad = records_of(files / REFCOCO_FILE)[3]
    truncate_image(files, bad)
    data = FileRecords([], [str(files / REFCOCO_FILE)], "raise")
    with pytest.raises(
        DatasetFormatError,
        match=f"{files / REFCOCO_FILE}: record 3 \\(id '{bad['id']}'\\): field 'image': cannot read image",
    ):
        data[3]


def test_a_truncated_image_is_skipped_and_counted_with_on_error_skip(files):
    bad = records_of(files / LLAVA_FILE)[2]
    truncate_image(files, bad)
    data = FileRecords([str(files / LLAVA_FILE)], [], "skip")
    assert data[2]["id"] == records_of(files / LLAVA_FILE)[3]["id"]  # the next readable record stands in
    assert data[2]["id"] == data[3]["id"]
    report = data.access_reports[str(files / LLAVA_FILE)]
    assert report.skipped == 1 and report.first_ids == {"image: cannot be decoded": [bad["id"]]}


def test_a_bad_image_met_in_training_names_its_file_and_record_id(files, tiny_base_dir):
    bad = records_of(files / LLAVA_FILE)[0]
    truncate_image(files, bad)
    data = NuwaDataModule(processor_path=tiny_base_dir, train_files={"llava": [str(files / LLAVA_FILE)]}, batch_size=4)
    records = [data.dataset("train")[i] for i in range(1, 4)]
    assert "source" in records[0]  # records know their file, so collate errors can name it
    with pytest.raises(DatasetFormatError, match=f"{files / LLAVA_FILE}: record 0 \\(id '{bad['id']}'\\)"):
        data.dataset("train")[0]


def test_a_declared_size_that_does_not_match_the_image_is_reported_when_read(files):
    records = records_of(files / REFCOCO_FILE)
    records[1]["width"] += 1
    write_records(files / REFCOCO_FILE, records)
    data = FileRecords([], [str(files / REFCOCO_FILE)], "raise")
    with pytest.raises(DatasetFormatError, match="record 1 .*but the record declares width"):
        data[1]


# ----------------------------------------------------------------------------- paths
@pytest.mark.parametrize("path", ["../../etc/passwd", "/etc/passwd", "images/../../outside.png"])
def test_image_paths_outside_the_dataset_root_are_refused_unless_allowed(files, path):
    records = records_of(files / LLAVA_FILE)
    records[0]["image"] = path
    write_records(files / LLAVA_FILE, records)
    with pytest.raises(DatasetFormatError, match="record 0.*leaves the dataset root.*data.allow_outside_root"):
        FileRecords([str(files / LLAVA_FILE)], [], "raise")


def test_allow_outside_root_reads_an_image_beside_the_root(files, tmp_path_factory):
    outside = tmp_path_factory.mktemp("elsewhere") / "picture.png"
    records = records_of(files / LLAVA_FILE)
    shutil.copy(files / records[0]["image"], outside)
    records[0]["image"] = str(outside)
    write_records(files / LLAVA_FILE, records)
    data = FileRecords([str(files / LLAVA_FILE)], [], "raise", allow_outside_root=True)
    assert data[0]["image"].size == Image.open(outside).size


# ----------------------------------------------------------------------------- large images
@pytest.mark.parametrize("kind", ["JPEG", "PNG"])
def test_a_large_image_is_decoded_reduced_but_never_below_what_the_processor_needs(tmp_path, kind):
    rng = np.random.default_rng(0)
    path = tmp_path / f"large.{kind.lower()}"
    Image.fromarray(rng.integers(0, 255, (1800, 2400, 3), dtype=np.uint8)).save(path, kind)
    for needed in (224, 336, 900):
        image = read_image(str(path), min_side=needed)
        assert needed <= min(image.size) < 2 * needed + 1 and image.size[0] / image.size[1] == pytest.approx(
            4 / 3, 1e-2
        )
    assert read_image(str(path)).size == (2400, 1800)  # no processor size known: decoded in full


# ----------------------------------------------------------------------------- text the model cannot train on
def vqa_record(prompt: str, answer: str = "red") -> dict:
    return {
        "id": "long-1",
        "source": "train.json",
        "index": 7,
        "image": Image.new("RGB", (96, 96)),
        "prompt": prompt,
        "answer": answer,
    }


def test_the_models_context_is_the_default_max_length_and_an_over_long_prompt_is_refused(tiny_base_dir):
    data = NuwaDataModule(processor_path=tiny_base_dir)
    collate = data.collator()
    assert data.max_length == 1024  # the tiny base's max_position_embeddings
    long_prompt = " ".join(["what colour is the circle ?"] * 700)  # ~4000 tokens
    with pytest.raises(
        CollateError, match="train.json: record 7 \\(id 'long-1'\\): the prompt alone has \\d+ tokens.*max_length=1024"
    ):
        collate([vqa_record(long_prompt)])


def test_with_skip_refused_records_leave_the_batch_and_truncation_and_unknown_text_are_counted(tiny_base_dir):
    data = NuwaDataModule(processor_path=tiny_base_dir, on_error="skip", max_length=200)
    collate = data.collator()
    long_prompt = " ".join(["what colour is the circle ?"] * 100)
    batch = collate(
        [
            vqa_record("what colour is the circle ?"),
            vqa_record(long_prompt),
            vqa_record("what colour is the 🙂 circle ?"),
            vqa_record("what colour is the circle ?" + " ?" * 44, answer="red " * 30),
        ]
    )
    assert batch["input_ids"].shape[0] == 3  # the over-long prompt was left out
    assert batch["input_ids"].shape[1] <= 200
    assert collate.counts == {PROMPT_TOO_LONG: 1, PROMPT_UNKNOWN_TOKENS: 1, ANSWER_TRUNCATED: 1}
    report = data.data_report()
    assert report["batches"] == dict(collate.counts) and report["max_length"] == 200


def test_fit_writes_the_data_report_with_skips_per_file_and_reason(files, tiny_base_dir, tmp_path):
    records = records_of(files / LLAVA_FILE)
    records[1]["image"] = "images/missing.png"
    write_records(files / LLAVA_FILE, records)
    truncate_image(files, records_of(files / REFCOCO_FILE)[0])
    module = NuwaFineTuner(model_path=tiny_base_dir)
    data = NuwaDataModule(
        processor_path=tiny_base_dir,
        on_error="skip",
        batch_size=4,
        train_files={"llava": [str(files / LLAVA_FILE)], "refcoco": [str(files / REFCOCO_FILE)]},
    )
    run_dir = tmp_path / "run"
    L.Trainer(
        accelerator="cpu",
        max_steps=4,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        default_root_dir=run_dir,
    ).fit(module, data)
    report = json.loads((run_dir / DATA_REPORT_NAME).read_text())
    llava, refcoco = report["files"][str(files / LLAVA_FILE)], report["files"][str(files / REFCOCO_FILE)]
    assert llava["at_start"]["skipped_by_reason"] == {"image: file not found": 1}
    assert llava["at_start"]["first_ids"] == {"image: file not found": [records[1]["id"]]}
    assert refcoco["when_read"]["skipped_by_reason"] == {"image: cannot be decoded": 1}


def test_a_truncated_image_fails_even_after_a_library_turned_truncated_loading_on(files, monkeypatch):
    """lmms-eval sets PIL's global LOAD_TRUNCATED_IMAGES at import; the loaders' promise must not depend on it."""
    from PIL import ImageFile

    from nuwa_train.data.formats import FieldError, read_image

    bad = truncate_image(files, records_of(files / REFCOCO_FILE)[0])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(FieldError, match="cannot read image"):
        read_image(str(bad))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # put back as it was
