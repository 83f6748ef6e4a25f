"""Whole conversations: every assistant turn trains, and a pruned multi-turn forward is what turn-by-turn
cached inference computes (the image pruned once, stage 2 guided by the first question)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import make_images

from nuwa_train.data.collate import CollateError, VisionLanguageCollator
from nuwa_train.data.schema import IGNORE_INDEX, TURNS_DROPPED
from nuwa_train.models import attach_nuwa
from nuwa_train.pruning import NuwaConfig

TURNS = [
    ("what colour is the circle ?", "red"),
    ("how many blue square are there ?", "there are how many"),  # words of the tiny vocabulary
    ("is there the green triangle left of the circle ?", "no"),
]


def conversation(turns=TURNS, image=None, record_id="c0") -> dict:
    messages = []
    for question, answer in turns:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {
        "id": record_id,
        "image": image if image is not None else make_images(1)[0],
        "prompt": turns[0][0],
        "answer": turns[0][1],
        "messages": messages,
    }


def labelled_spans(labels: torch.Tensor) -> list[list[int]]:
    spans, current = [], []
    for value in labels.tolist():
        if value != IGNORE_INDEX:
            current.append(value)
        elif current:
            spans, current = spans + [current], []
    return spans + ([current] if current else [])


def per_token_losses(model, batch) -> list[torch.Tensor]:
    """Cross-entropy of every labelled token, one tensor per labelled span of row 0 (logits on the pruned sequence
    when Nüwa is attached: the handle aligns its labels)."""
    output = model(**batch)
    handle = getattr(model, "_nuwa", None)
    labels = handle.output_labels() if handle is not None else batch["labels"]
    losses = F.cross_entropy(output.logits[0, :-1].float(), labels[0, 1:], ignore_index=IGNORE_INDEX, reduction="none")
    spans, current = [], []
    for loss, label in zip(losses, labels[0, 1:].tolist()):
        if label != IGNORE_INDEX:
            current.append(loss)
        elif current:
            spans, current = spans + [torch.stack(current)], []
    return spans + ([torch.stack(current)] if current else [])


def test_every_answer_is_labelled_and_nothing_else(tiny_llava):
    _, processor = tiny_llava
    batch = VisionLanguageCollator(processor)([conversation()])
    tokenizer = processor.tokenizer
    expected = [
        tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for _, answer in TURNS
    ]
    assert labelled_spans(batch["labels"][0]) == expected
    text = tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()])
    for question, _ in TURNS:  # every question is in the sequence, unlabelled
        assert question.replace(" ?", "") in text


@pytest.mark.parametrize(
    "pruning",
    [None, NuwaConfig(budget=64, method="nuwa_stage1"), NuwaConfig(budget=64)],
    ids=["unpruned", "nuwa_stage1", "nuwa"],
)
def test_each_turns_losses_equal_a_record_holding_the_preceding_turns(tiny_llava, pruning):
    model, processor = tiny_llava
    collate = VisionLanguageCollator(processor)
    image = make_images(1, seed=3)[0]
    handle = attach_nuwa(model, pruning) if pruning is not None else None
    try:
        with torch.no_grad():
            whole = per_token_losses(model, collate([conversation(image=image)]))
            assert len(whole) == 3
            for number in range(1, 4):
                alone = per_token_losses(model, collate([conversation(TURNS[:number], image=image)]))
                torch.testing.assert_close(alone[-1], whole[number - 1], atol=1e-5, rtol=1e-5)
    finally:
        if handle is not None:
            handle.detach()


def test_a_pruned_conversation_forward_equals_turn_by_turn_cached_inference(tiny_llava):
    """Inference prunes the image once, at the first turn's prefill, and appends the later turns to that cache."""
    model, processor = tiny_llava
    batch = VisionLanguageCollator(processor)([conversation()])
    prompt = VisionLanguageCollator(processor, with_answer=False)([conversation()])
    start = prompt["input_ids"].shape[1]  # the first generation prompt: what the first prefill sees
    assert torch.equal(batch["input_ids"][:, :start], prompt["input_ids"])
    with attach_nuwa(model, NuwaConfig(budget=64)) as handle, torch.no_grad():
        trained = model(**batch).logits
        token_map = handle.kept.token_map()[0]
        first = model(**prompt, use_cache=True)
        cache, logits = first.past_key_values, [first.logits[0, -1]]
        rest = batch["input_ids"][:, start:]
        for step in range(rest.shape[1] - 1):  # teacher-forced, one token at a time, as generate feeds them
            mask = torch.ones(1, start + step + 1, dtype=torch.long)
            out = model(input_ids=rest[:, step : step + 1], attention_mask=mask, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits.append(out.logits[0, -1])
    cached = torch.stack(logits)  # predictions after unpruned positions start - 1 .. end - 2
    positions = {int(p): j for j, p in enumerate(token_map.tolist()) if p >= 0}
    expected = torch.stack([trained[0, positions[p]] for p in range(start - 1, batch["input_ids"].shape[1] - 1)])
    torch.testing.assert_close(cached, expected, atol=1e-4, rtol=1e-4)


def test_max_length_keeps_whole_turns_and_counts_the_dropped_ones(tiny_llava):
    _, processor = tiny_llava
    full = VisionLanguageCollator(processor)([conversation()])
    two_turns = VisionLanguageCollator(processor)([conversation(TURNS[:2])])
    length = two_turns["input_ids"].shape[1]
    assert length < full["input_ids"].shape[1]
    for max_length in (length, length + 3):  # room for two turns, and for two turns and part of the third
        collate = VisionLanguageCollator(processor, max_length=max_length)
        batch = collate([conversation()])
        assert torch.equal(batch["input_ids"], two_turns["input_ids"])
        assert len(labelled_spans(batch["labels"][0])) == 2
        assert collate.counts[TURNS_DROPPED] == 1


def test_a_conversation_out_of_turn_order_is_refused_naming_the_field(tiny_llava):
    _, processor = tiny_llava
    record = conversation()
    record["messages"][2]["role"] = "assistant"
    with pytest.raises(CollateError, match="c0.*'messages' must alternate user / assistant"):
        VisionLanguageCollator(processor)([record])
    record = conversation()
    record["messages"][3]["content"] = " "
    with pytest.raises(CollateError, match=r"messages\[3\].content must be a non-empty string"):
        VisionLanguageCollator(processor)([record])
