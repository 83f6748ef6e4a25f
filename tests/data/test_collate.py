"""The general (image, prompt, answer) collator: answer-only labels, padding sides, clear errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from nuwa_train.data import SyntheticConfig, coordinate_tokens, vocabulary
from nuwa_train.data.collate import CollateError, VisionLanguageCollator
from nuwa_train.models.tiny import (
    CHAT_TEMPLATE_IMAGE_LAST,
    TinyLlavaSpec,
    build_processor,
)

CONFIG = SyntheticConfig()


def _image(seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (96, 96, 3), dtype=np.uint8))


RECORDS = [
    {"id": "a", "image": _image(0), "prompt": "what colour is the circle?", "answer": "red"},
    {
        "id": "b",
        "image": _image(1),
        "prompt": "locate the small blue square to the left of the red circle.",
        "answer": "<loc_3><loc_5><loc_20><loc_30>",
    },
    {"id": "c", "image": _image(2), "prompt": "what is above the triangle?", "answer": "green circle"},
]


@pytest.fixture(scope="module", params=[False, True], ids=["image-first", "image-after-text"])
def processor(request):
    return build_processor(TinyLlavaSpec(image_after_text=request.param), vocabulary(CONFIG), coordinate_tokens(CONFIG))


@pytest.mark.parametrize("side", ["left", "right"])
def test_labels_are_the_answer_only(processor, side):
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    batch = VisionLanguageCollator(processor, padding_side=side)(RECORDS)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape and ids.shape[0] == 3
    assert batch["pixel_values"].shape == (3, 3, 96, 96)
    lengths = mask.sum(1)
    assert len(set(lengths.tolist())) > 1  # the batch really needs padding
    for row, record in enumerate(RECORDS):
        real = mask[row].bool()
        # padding sits on the requested side only, and is ignored by the loss
        positions = real.nonzero().squeeze(1)
        assert positions.tolist() == list(range(int(positions[0]), int(positions[-1]) + 1))
        assert (positions[-1] == ids.shape[1] - 1) if side == "left" else (positions[0] == 0)
        assert (ids[row][~real] == tokenizer.pad_token_id).all() and (labels[row][~real] == -100).all()
        # the answer is the tail of the real tokens and ends with </s>; nothing else is labelled
        answer = tokenizer(" " + record["answer"] + " </s>", add_special_tokens=False)["input_ids"]
        labelled = labels[row] != -100
        assert labels[row][labelled].tolist() == answer
        assert ids[row][real][-len(answer) :].tolist() == answer
        assert labelled.nonzero().squeeze(1).tolist() == positions[-len(answer) :].tolist()
        assert labels[row][ids[row] == image_id].eq(-100).all()
        assert int((ids[row] == image_id).sum()) == 144
        # the unlabelled part is exactly the generation prompt evaluation will feed
        prompt = processor(
            images=[record["image"]],
            text=[
                processor.apply_chat_template(
                    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": record["prompt"]}]}],
                    add_generation_prompt=True,
                    tokenize=False,
                )
            ],
        )["input_ids"][0]
        assert ids[row][real][: -len(answer)].tolist() == list(prompt)


def test_image_placement_follows_the_template(processor):
    batch = VisionLanguageCollator(processor, padding_side="right")(RECORDS[:1])
    ids = batch["input_ids"][0]
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    colour_id = processor.tokenizer.convert_tokens_to_ids("colour")
    image_at = int((ids == image_id).nonzero()[0])
    colour_at = int((ids == colour_id).nonzero()[0])
    after_text = processor.chat_template == CHAT_TEMPLATE_IMAGE_LAST
    assert (image_at > colour_at) == after_text


def test_prompts_only_for_generation(processor):
    batch = VisionLanguageCollator(processor, padding_side="left", with_answer=False)(RECORDS)
    assert "labels" not in batch
    last = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][:, -1].tolist())
    assert last == [":"] * 3  # every row ends with "assistant :" (left padding)


def test_max_length_truncates_the_answer_never_the_prompt(processor):
    full = VisionLanguageCollator(processor)(RECORDS[1:2])
    length = int(full["attention_mask"].sum())
    short = VisionLanguageCollator(processor, max_length=length - 2)(RECORDS[1:2])
    assert short["input_ids"].shape[1] == length - 2
    assert int((short["labels"] != -100).sum()) == int((full["labels"] != -100).sum()) - 2
    with pytest.raises(CollateError, match="max_length"):
        VisionLanguageCollator(processor, max_length=20)(RECORDS[1:2])


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"answer": None}, "record 1 \\(id 'b'\\): field 'answer' is missing"),
        ({"prompt": "  "}, "record 1 \\(id 'b'\\): field 'prompt' must be a non-empty"),
        ({"prompt": "<image> what?"}, "must not contain '<image>'"),
        ({"image": 42}, "record 1 \\(id 'b'\\): field 'image' must be"),
        ({"image": np.zeros((4, 4))}, "HxWx3"),
        ({"answer": "purple"}, "record 1 \\(id 'b'\\): the answer 'purple' has words the tokenizer does not know"),
    ],
)
def test_bad_record_names_the_record(processor, bad, message):
    records = [dict(RECORDS[0]), {**RECORDS[1], **bad}]
    with pytest.raises(CollateError, match=message):
        VisionLanguageCollator(processor)(records)


def test_rejects_bad_settings(processor):
    with pytest.raises(ValueError, match="padding_side"):
        VisionLanguageCollator(processor, padding_side="middle")
    with pytest.raises(CollateError, match="empty batch"):
        VisionLanguageCollator(processor)([])


def test_image_paths_and_arrays(processor, tmp_path):
    path = tmp_path / "x.png"
    RECORDS[0]["image"].save(path)
    as_path = VisionLanguageCollator(processor)([{**RECORDS[0], "image": str(path)}])
    as_array = VisionLanguageCollator(processor)([{**RECORDS[0], "image": np.asarray(RECORDS[0]["image"])}])
    reference = VisionLanguageCollator(processor)(RECORDS[:1])
    for batch in (as_path, as_array):
        assert torch.equal(batch["input_ids"], reference["input_ids"])
        assert torch.allclose(batch["pixel_values"], reference["pixel_values"])
