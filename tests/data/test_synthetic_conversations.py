"""The synthetic benchmark's multi-turn variant: an image's questions in one conversation, its grounding turns
written in any family's box format (loc_tokens: exactly the single-turn records' text)."""

import pytest

from nuwa_train.data.boxes import box_format
from nuwa_train.data.collate import VisionLanguageCollator
from nuwa_train.data.geometry import box_iou, to_box01
from nuwa_train.data.records import SyntheticRecords
from nuwa_train.data.schema import IGNORE_INDEX
from nuwa_train.data.synthetic import SyntheticConfig
from nuwa_train.models import load_processor
from nuwa_train.models.families import FAMILIES

CONFIG = SyntheticConfig()
PER_IMAGE = (3, 2)  # vqa, grounding: turns vqa, grounding, vqa, grounding, vqa


def singles_and_conversations(images: int = 4):
    singles = SyntheticRecords(CONFIG, "train", images, *PER_IMAGE)
    conversations = SyntheticRecords(CONFIG, "train", images, *PER_IMAGE, conversation=True)
    return singles, conversations


def test_each_image_is_one_conversation_of_its_records_in_order():
    singles, conversations = singles_and_conversations()
    per_image = sum(PER_IMAGE)
    assert len(conversations) == 4 and len(singles) == 4 * per_image
    for image in range(4):
        row = conversations[image]
        records = [singles[image * per_image + k] for k in range(per_image)]
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"] * per_image
        assert [(r["task"], r["box"]) for r in records if r["task"] == "grounding"] == [
            ("grounding", tuple(int(v) for v in b)) for b in row["objects"]["bbox"]
        ]
        assert row["objects"]["ref"] == [r["expression"] for r in records if r["task"] == "grounding"]
        assert (row["task"], row["box"], row["kind"]) == (records[0]["task"], records[0]["box"], records[0]["kind"])


def test_in_loc_tokens_the_turns_are_the_single_turn_records_text_token_for_token(tiny_base_dir):
    processor = load_processor(tiny_base_dir)
    collate = VisionLanguageCollator(processor, box_format=box_format("loc_tokens", bins=CONFIG.coordinate_bins))
    singles, conversations = singles_and_conversations()
    per_image = sum(PER_IMAGE)
    for image in range(4):
        records = [singles[image * per_image + k] for k in range(per_image)]
        assert collate.validate(conversations[image], 0).turns == [(r["prompt"], r["answer"]) for r in records]
    batch = collate([conversations[i] for i in range(4)])
    answers = batch["labels"] != IGNORE_INDEX
    starts = (answers[:, 1:] & ~answers[:, :-1]).sum(1) + answers[:, 0]
    assert starts.tolist() == [per_image] * 4  # every answer of every conversation is labelled


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_grounding_turn_is_written_in_the_familys_format_and_parses_back_to_its_box(family):
    _, processor = FAMILIES[family].build_tiny()
    codec = box_format(FAMILIES[family].box_format)
    collate = VisionLanguageCollator(processor, box_format=codec)
    _, conversations = singles_and_conversations(2)
    for image in range(2):
        row = conversations[image]
        checked = collate.validate(row, 0)
        frame = collate.image_frame(row["image"])
        grounding = [answer for (_, answer), m in zip(checked.turns, row["messages"][1::2]) if m["content"] == "<bbox>"]
        assert len(grounding) == PER_IMAGE[1]
        for answer, box in zip(grounding, row["objects"]["bbox"]):
            assert answer == codec.render_coordinates(to_box01(box), frame)
            assert box_iou(codec.parse(answer, frame), to_box01(box)) > 0.9  # the format's quantisation only
        questions = [question for question, _ in checked.turns]
        assert all("<ref-object>" not in q for q in questions)
        assert any(codec.render_ref(ref) in q for ref in row["objects"]["ref"] for q in questions)


def test_the_exported_sharegpt_file_batches_exactly_like_the_in_memory_conversations_and_trains(
    tiny_base_dir, tmp_path
):
    import lightning as L
    import torch

    from nuwa_train.data.records import export_conversations
    from nuwa_train.lightning import NuwaDataModule, NuwaFineTuner

    path = export_conversations(tmp_path / "data", CONFIG, "train", 4, *PER_IMAGE)
    files = NuwaDataModule(processor_path=tiny_base_dir, train_files={"sharegpt": [str(path)]}, batch_size=2)
    memory = NuwaDataModule(
        processor_path=tiny_base_dir,
        train_conversations=True,
        train_images=4,
        train_vqa_per_image=PER_IMAGE[0],
        train_grounding_per_image=PER_IMAGE[1],
    )
    from_files = files.collator()([files.dataset("train")[i] for i in range(4)])
    in_memory = memory.collator()([memory.dataset("train")[i] for i in range(4)])
    for key in ("input_ids", "attention_mask", "labels", "pixel_values"):
        assert torch.equal(from_files[key], in_memory[key]), key
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        default_root_dir=tmp_path / "run",
    )
    trainer.fit(NuwaFineTuner(model_path=tiny_base_dir), files)
    assert trainer.global_step == 2
