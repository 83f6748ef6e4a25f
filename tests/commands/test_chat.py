"""`nuwa-train chat`: an answer from the command line, computed as evaluation computes it; conversations; errors."""

import io
from pathlib import Path

import pytest
from PIL import Image

from nuwa_train.cli import main
from nuwa_train.commands.chat import ChatSession, load_chat_model
from nuwa_train.data.geometry import box_iou, to_box01
from nuwa_train.data.synthetic import SyntheticConfig, generate_scene, make_grounding, make_vqa, render
from nuwa_train.evaluation import evaluate
from nuwa_train.pruning import NuwaConfig

SHIPPED_BASE = Path(__file__).resolve().parents[2] / "data" / "tiny_base"
ANSWER_TOKENS = 8  # what evaluation allows a loc-token answer: the same cap makes the answers comparable
SCENES = 3


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """(image path, VQA record, grounding record) of three synthetic test scenes, saved as PNG files."""
    folder, config = tmp_path_factory.mktemp("scenes"), SyntheticConfig()
    found = []
    for index in range(SCENES):
        scene = generate_scene(config, "test", index)
        path = folder / f"scene{index}.png"
        render(scene, config).save(path)
        found.append((path, make_vqa(scene, config), make_grounding(scene, config)))
    return found


def ask(capsys, *argv: str) -> tuple[list[str], str]:
    main(["chat", *argv])
    captured = capsys.readouterr()
    return captured.out.splitlines(), captured.err


def test_one_question_is_answered_as_evaluation_answers_it(tiny_base_dir, scenes, capsys, tmp_path):
    model, processor, _, _ = load_chat_model(tiny_base_dir)
    for path, vqa, grounding in scenes:
        for record in (vqa, grounding):
            overlay = tmp_path / f"{record.id}.png"
            lines, err = ask(
                capsys,
                tiny_base_dir,
                "--image",
                str(path),
                "--prompt",
                record.prompt,
                "--max-new-tokens",
                str(ANSWER_TOKENS),
                "--overlay",
                str(overlay),
            )
            row = {
                "id": record.id,
                "image": Image.open(path).convert("RGB"),
                "prompt": record.prompt,
                "answer": record.answer,
                "task": record.task,
                "box": record.box,
                "expression": record.expression,
            }
            expected = (
                evaluate(model, processor, [row], pruning=NuwaConfig(), max_new_tokens=ANSWER_TOKENS, progress=False)
                .predictions[0]
                .prediction
            )
            assert lines[-1] == expected  # the answer is stdout's last line
            assert "nuwa at budget 64 (defaults)" in err and f"kept tokens: {overlay}" in err
            assert overlay.stat().st_size > 0


def test_the_shipped_base_answers_and_gives_the_box_in_pixels(scenes, capsys):
    path, vqa, grounding = scenes[0]
    lines, _ = ask(capsys, str(SHIPPED_BASE), "--image", str(path), "--prompt", vqa.prompt, "--no-overlay")
    assert lines[-1] == vqa.answer
    lines, err = ask(capsys, str(SHIPPED_BASE), "--image", str(path), "--prompt", grounding.prompt, "--no-overlay")
    assert lines[-1].count("<loc_") == 4  # the model's own box format: four coordinate tokens
    box_line = next(line for line in err.splitlines() if line.startswith("box: "))
    pixels = tuple(int(v) for v in box_line.split("(")[1].split(")")[0].split(","))
    width, height = Image.open(path).size
    assert "of the 96x96 input image" in box_line
    answered = (pixels[0] / width, pixels[1] / height, pixels[2] / width, pixels[3] / height)
    assert box_iou(answered, to_box01(grounding.box)) > 0.5


def test_a_conversation_reads_stdin_keeps_its_turns_and_stops_at_exit(tiny_base_dir, scenes, capsys, monkeypatch):
    path, vqa, grounding = scenes[1]
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{vqa.prompt}\n\n{grounding.prompt}\nexit\nnever asked\n"))
    lines, err = ask(
        capsys, tiny_base_dir, "--image", str(path), "--max-new-tokens", str(ANSWER_TOKENS), "--no-overlay"
    )
    assert len(lines) == 2  # two answers: the blank line is skipped, nothing after "exit" is asked
    assert "ask for a box as: 'locate <expression>.'" in err

    model, processor, _, _ = load_chat_model(tiny_base_dir)
    session = ChatSession(model, processor, Image.open(path).convert("RGB"), ANSWER_TOKENS)
    first = session.ask(vqa.prompt)
    second = session.ask(grounding.prompt)
    assert [first.text, second.text] == lines  # the same answers as the command gave
    third = scenes[0][1].prompt  # words the tiny vocabulary knows
    following = session.inputs(third)["input_ids"][0]
    image_token = model.config.image_token_id
    assert int((following == image_token).sum()) == model.config.image_seq_length  # the image once, first turn
    text = processor.tokenizer.decode(following[following != image_token])
    asked = [text.index(question.rstrip("?.")) for question in (vqa.prompt, grounding.prompt, third)]
    assert asked == sorted(asked) and text.index(first.text) < asked[1]  # the first answer before the next turn


@pytest.mark.parametrize("content", [None, b"not an image"])
def test_a_bad_image_is_a_clear_error_before_the_model_loads(tiny_base_dir, tmp_path, content, capsys):
    path = tmp_path / "photo.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SystemExit) as stop:
        main(["chat", str(tmp_path / "missing-model"), "--image", str(path), "--prompt", "what colour?"])
    message = str(stop.value.code)
    assert message.startswith("nuwa-train chat: error: --image ") and str(path) in message
    assert ("no such file" if content is None else "cannot be read as an image") in message
    assert "Traceback" not in capsys.readouterr().err


def test_an_empty_prompt_is_refused(tiny_base_dir, scenes):
    with pytest.raises(SystemExit, match="--prompt is empty"):
        main(["chat", tiny_base_dir, "--image", str(scenes[0][0]), "--prompt", "  "])
