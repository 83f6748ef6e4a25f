"""Multi-turn evaluation of a base: conversations about one test image, scored turn by turn.

Each test image is asked `turns` questions in one conversation (`make_conversation`: VQA questions and referring
expressions, the first turn being the image's single-turn question). Turn t is generated greedily after the gold
turns 1..t-1 (question and answer, as in training), and scored as the single-turn evaluation scores an answer.
The report gives the accuracy per turn, per turn and question kind, and for each later turn its gap to the first
turn on the same kinds of question: its accuracy minus what the first turn's per-kind accuracies would give on
its questions (goal of issue 30: no later turn more than 3 points below).
"""

from __future__ import annotations

from collections import defaultdict

import torch

from ..data.synthetic import Record, SyntheticConfig, generate_scene, make_conversation, render

TASKS = ("vqa", "grounding")


def conversation_messages(history: list[Record], question: Record) -> list[dict]:
    """Chat messages of the gold turns `history`, then the open `question`; the image in the first user turn."""
    messages = []
    for number, record in enumerate([*history, question]):
        text = [{"type": "text", "text": record.prompt}]
        messages.append({"role": "user", "content": [{"type": "image"}, *text] if number == 0 else text})
        if number < len(history):
            messages.append({"role": "assistant", "content": [{"type": "text", "text": record.answer}]})
    return messages


@torch.no_grad()
def evaluate_conversations(
    model,
    processor,
    config: SyntheticConfig,
    images: int,
    turns: int,
    grounding_share: float,
    batch_size: int,
    max_new_tokens: int | None = None,
) -> dict:
    """Score `images` test conversations of `turns` turns turn by turn (see the module docstring)."""
    from ..evaluation import generate_answers, question_collator, score_answer

    collator = question_collator(model, processor, synthetic_config=config)
    max_new_tokens = max_new_tokens or collator.box_format.max_answer_tokens
    tokenizer = processor.tokenizer
    conversations = []
    for index in range(images):
        scene = generate_scene(config, "test", index)
        conversations.append((render(scene, config), make_conversation(scene, config, turns, grounding_share)))
    correct: dict[tuple[int, str], list[bool]] = defaultdict(list)  # (turn, kind) -> scores
    tasks: dict[tuple[int, str], list[bool]] = defaultdict(list)  # (turn, task) -> scores
    kind_task = {}
    padding_side = tokenizer.padding_side
    was_training = model.training
    model.eval()
    try:
        tokenizer.padding_side = "left"  # generation continues every row from its last token
        for turn in range(turns):
            for first in range(0, images, batch_size):
                chunk = conversations[first : first + batch_size]
                texts = [
                    processor.apply_chat_template(
                        conversation_messages(list(records[:turn]), records[turn]),
                        add_generation_prompt=True,
                        tokenize=False,
                    )
                    for _, records in chunk
                ]
                batch = processor(images=[image for image, _ in chunk], text=texts, padding=True, return_tensors="pt")
                answers = generate_answers(model, tokenizer, dict(batch), max_new_tokens)
                for (image, records), text in zip(chunk, answers):
                    record = records[turn]
                    score = score_answer(record.as_row(image), text, collator).correct
                    correct[turn, record.kind].append(score)
                    tasks[turn, record.task].append(score)
                    kind_task[record.kind] = record.task
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return conversation_report(correct, tasks, kind_task, images, turns, grounding_share)


def _mean(values) -> float | None:
    return sum(values) / len(values) if values else None


def conversation_report(
    correct: dict, tasks: dict, kind_task: dict, images: int, turns: int, grounding_share: float
) -> dict:
    """Accuracy per turn (1-based) and task, per turn and kind, and each later turn's same-kind gap to turn 1."""
    first_turn = {kind: _mean(correct[0, kind]) for kind in kind_task if correct.get((0, kind))}
    per_turn = []
    for turn in range(turns):
        row = {"turn": turn + 1}
        for task in TASKS:
            row[task] = _mean(tasks.get((turn, task), []))
            row[f"num_{task}"] = len(tasks.get((turn, task), []))
            if turn:  # the accuracy turn 1 reaches on this turn's kinds of question, weighted as they occur here
                scored = [
                    (kind, len(correct[turn, kind]))
                    for kind, owner in kind_task.items()
                    if owner == task and correct.get((turn, kind)) and kind in first_turn
                ]
                total = sum(count for _, count in scored)
                if total:
                    asked = sum(count * _mean(correct[turn, kind]) for kind, count in scored) / total
                    expected = sum(count * first_turn[kind] for kind, count in scored) / total
                    row[f"{task}_gap_to_first_turn"] = asked - expected
        per_turn.append(row)
    per_turn_kind = {
        kind: [_mean(correct.get((turn, kind), [])) for turn in range(turns)] for kind in sorted(kind_task)
    }
    counts = {kind: [len(correct.get((turn, kind), [])) for turn in range(turns)] for kind in sorted(kind_task)}
    gaps = [row[key] for row in per_turn for key in row if key.endswith("_gap_to_first_turn")]
    return {
        "images": images,
        "turns": turns,
        "grounding_share": grounding_share,
        "per_turn": per_turn,
        "per_turn_kind": per_turn_kind,
        "per_turn_kind_count": counts,
        "worst_gap_to_first_turn": min(gaps) if gaps else None,
    }


def conversation_markdown(report: dict) -> list[str]:
    """The report's tables as Markdown lines."""
    turns = range(1, report["turns"] + 1)
    lines = [
        f"Multi-turn: {report['images']} test images, each asked {report['turns']} questions in one "
        f"conversation (referring expressions with probability {report['grounding_share']}); turn t is answered "
        f"after the gold turns before it. Gap: the turn's accuracy minus turn 1's on the same kinds of "
        f"question (goal >= -0.03).",
        "",
        "| turn | VQA exact match | questions | VQA gap | grounding Acc@0.5 | expressions | grounding gap |",
        "|---|---|---|---|---|---|---|",
    ]

    def number(value) -> str:
        return "-" if value is None else f"{value:.3f}"

    for row in report["per_turn"]:
        lines.append(
            f"| {row['turn']} | {number(row['vqa'])} | {row['num_vqa']} | "
            f"{number(row.get('vqa_gap_to_first_turn'))} | {number(row['grounding'])} | "
            f"{row['num_grounding']} | {number(row.get('grounding_gap_to_first_turn'))} |"
        )
    lines += ["", "| kind | " + " | ".join(f"turn {t}" for t in turns) + " |", "|---|" + "---|" * report["turns"]]
    for kind, values in report["per_turn_kind"].items():
        cells = [f"{number(v)} ({n})" for v, n in zip(values, report["per_turn_kind_count"][kind])]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    lines += ["", f"Worst later-turn gap to turn 1: {number(report['worst_gap_to_first_turn'])}", ""]
    return lines
