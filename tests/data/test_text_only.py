"""Text-only records (no image; a large share of LLaVA-665K): loaded, batched next to image records, trained."""

import json

import pytest
import torch
from conftest import make_images

from nuwa_train.data import load_llava_json
from nuwa_train.data.collate import CollateError, VisionLanguageCollator
from nuwa_train.data.formats import TEXT_ONLY_SKIPPED, DatasetFormatError, parse_llava_json
from nuwa_train.data.schema import IGNORE_INDEX, TEXT_TASK
from nuwa_train.models import attach_nuwa
from nuwa_train.pruning import NuwaConfig


@pytest.fixture
def mixed_file(tmp_path):
    make_images(1)[0].save(tmp_path / "a.png")
    records = [
        {
            "id": "img",
            "image": "a.png",
            "conversations": [
                {"from": "human", "value": "<image>\nwhat colour is the circle ?"},
                {"from": "gpt", "value": "red"},
            ],
        },
        {
            "id": "txt",
            "conversations": [
                {"from": "human", "value": "how many are there ?"},
                {"from": "gpt", "value": "there are how many"},
            ],
        },
    ]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(records))
    return path


def test_text_only_records_are_kept_as_text_or_skipped_and_counted(mixed_file):
    kept = load_llava_json(mixed_file)
    assert [row["task"] for row in kept] == ["vqa", TEXT_TASK] and kept[1]["image"] is None
    rows, report = parse_llava_json(mixed_file, text_only="skip")  # on_error stays "raise": a choice, not an error
    assert [row["id"] for row in rows] == ["img"]
    assert report.by_reason == {TEXT_ONLY_SKIPPED: 1} and report.first_ids[TEXT_ONLY_SKIPPED] == ["txt"]
    with pytest.raises(ValueError, match="data.text_only='drop' must be one of keep, skip"):
        parse_llava_json(mixed_file, text_only="drop")


def test_an_image_placeholder_without_an_image_is_refused_naming_the_turn(mixed_file):
    records = json.loads(mixed_file.read_text())
    records[1]["conversations"][0]["value"] = "<image>\nhow many are there ?"
    mixed_file.write_text(json.dumps(records))
    with pytest.raises(DatasetFormatError, match=r"record 1 \(id 'txt'\).*conversations\[0\].value.*placeholder"):
        load_llava_json(mixed_file)


def test_a_mixed_batch_holds_the_image_of_the_image_record_only(tiny_llava, mixed_file):
    _, processor = tiny_llava
    rows = list(load_llava_json(mixed_file))
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    batch = VisionLanguageCollator(processor)(rows)
    assert batch["pixel_values"].shape[0] == 1
    assert (batch["input_ids"][0] == image_token).sum() == 144 and (batch["input_ids"][1] == image_token).sum() == 0
    answer = processor.tokenizer("there are how many", add_special_tokens=False)["input_ids"]
    labels = batch["labels"][1]
    assert labels[labels != IGNORE_INDEX].tolist() == answer + [processor.tokenizer.eos_token_id]
    assert "pixel_values" not in VisionLanguageCollator(processor)(rows[1:])  # all text: no image at all
    with pytest.raises(CollateError, match="text-only record.*must not have an image"):
        VisionLanguageCollator(processor)([{**rows[1], "image": rows[0]["image"]}])


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_a_text_record_trains_the_same_next_to_an_image_record_as_alone(tiny_llava, mixed_file, mode):
    model, processor = tiny_llava
    rows = list(load_llava_json(mixed_file))
    collate = VisionLanguageCollator(processor)  # right padding: the text row's positions do not move
    with attach_nuwa(model, NuwaConfig(budget=64)) as handle:
        handle.set_selection(mode, temperature=0.5)
        batch = collate(rows)
        output = model(**batch)
        token_map = handle.kept.token_map()[1]  # output column -> the text row's unpruned position
        alone_batch = collate(rows[1:])
        alone = model(**alone_batch).logits[0]
        length = int(alone_batch["attention_mask"].sum())
        columns = [j for j, p in enumerate(token_map.tolist()) if 0 <= p < length]
        assert len(columns) == length
        torch.testing.assert_close(output.logits[1, columns], alone[:length], atol=1e-5, rtol=1e-5)
        assert torch.isfinite(output.loss)
        output.loss.backward()
    model.zero_grad()
