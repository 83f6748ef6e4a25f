"""Pre-training an image-first base (issue 30): conversations in the batches, one loss per answer, init_from."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from test_pretrain import _log, _recipe

from nuwa_train.data.schema import IGNORE_INDEX
from nuwa_train.data.synthetic import SyntheticConfig, generate_scene, make_conversation, make_grounding, make_vqa
from nuwa_train.io import load_tensor_tree
from nuwa_train.models.tiny import load_tiny_llava
from nuwa_train.pretrain import TinyBasePretrainer
from nuwa_train.pretrain.cli import main
from nuwa_train.pretrain.data import BatchMaker, conversation_turns
from nuwa_train.pretrain.heads import answer_losses
from nuwa_train.pretrain.init import InitFromError, load_initial_weights
from nuwa_train.pretrain.phases import Phase
from nuwa_train.pretrain.state import LOG_NAME, STATE_NAME

CONVERSATIONS = {"conversation_fraction": 0.5, "conversation_turns": [2, 4], "conversation_grounding": 0.3}


def _image_first(recipe: Path, init_from: str | None = None, steps: int | None = None) -> Path:
    """The small test recipe with the image first, conversations in its text phase and no referred head."""
    settings = yaml.safe_load(recipe.read_text())
    model = settings["model"]
    model["spec"]["image_after_text"] = False
    model["phases"][1].update(referred_weight=0.0, retrieval_weight=0.5, **CONVERSATIONS)
    model["retrieval_layer"] = 1
    if steps is not None:
        model["phases"][1]["steps"] = steps
    settings["trainer"]["callbacks"][3]["init_args"]["conversation_turns"] = 2
    if init_from is not None:
        model["init_from"] = init_from
        model["phases"] = model["phases"][1:]  # continue with the text phase only
    recipe.write_text(yaml.safe_dump(settings))
    return recipe


def _module(recipe: Path, **changes) -> TinyBasePretrainer:
    return TinyBasePretrainer(**{**yaml.safe_load(recipe.read_text())["model"], **changes})


# ------------------------------------------------------------------------------------------ the data
def test_a_conversation_asks_distinct_questions_and_starts_with_the_single_question():
    config = SyntheticConfig()
    mixed = set()
    for index in range(30):
        scene = generate_scene(config, "train", index)
        records = make_conversation(scene, config, 5, 0.3)
        assert records == make_conversation(scene, config, 5, 0.3)  # a pure function of the scene
        assert len(records) == 5 and all(r.scene == scene for r in records)
        assert len({r.prompt for r in records}) == 5
        first = {"vqa": make_vqa(scene, config), "grounding": make_grounding(scene, config)}[records[0].task]
        assert records[0] == first  # the image's single-turn record of that task
        mixed.add(tuple(r.task for r in records))
    assert len(mixed) > 3  # grounding turns at various positions
    scene = generate_scene(config, "train", 0)
    assert {r.task for r in make_conversation(scene, config, 4, 0.0)} == {"vqa"}
    assert {r.task for r in make_conversation(scene, config, 4, 1.0)} == {"grounding"}
    with pytest.raises(ValueError, match="turns >= 1"):
        make_conversation(scene, config, 0, 0.3)


def test_conversation_settings_are_checked_by_name():
    with pytest.raises(ValueError, match=r"model.phases \('a'\): conversation_turns=\[3, 2\]"):
        Phase("a", 1, 2, 1e-3, conversation_turns=(3, 2))
    with pytest.raises(ValueError, match=r"conversation_fraction=1.5 must be in \[0, 1\]"):
        Phase("a", 1, 2, 1e-3, conversation_fraction=1.5)
    with pytest.raises(ValueError, match="conversation_fraction needs train: all"):
        Phase("a", 1, 2, 1e-3, train="vision", conversation_fraction=0.5)


def test_the_referred_head_is_refused_with_the_image_first(tmp_path):
    recipe = _recipe(tmp_path, "referred", 2)
    spec = {**yaml.safe_load(recipe.read_text())["model"]["spec"], "image_after_text": False}
    with pytest.raises(
        ValueError,
        match=r"model.phases.1 \('all'\): referred_weight=0.5 needs "
        r"model.spec.image_after_text: true",
    ):
        _module(recipe, spec=spec)


def test_batches_mix_conversations_and_single_records(tmp_path):
    module = _module(_image_first(_recipe(tmp_path, "mix", 2)))
    module.position = module.position.next_phase()  # the text phase
    phase = module.phase
    make_batch = BatchMaker(module.phases, module.synthetic, module.processor, module.targets)
    batch = make_batch(module.position)
    turns = [conversation_turns(phase, 0, i) for i in range(phase.images_per_step)]
    assert turns == [conversation_turns(phase, 0, i) for i in range(phase.images_per_step)]
    rows = sum(1 if t else 2 for t in turns)
    assert batch["input_ids"].shape[0] == rows == len(batch["image_of_record"])
    assert batch["pixel_values"].shape[0] == phase.images_per_step
    assert len(batch["kinds"]) == len(batch["turn_index"]) == sum(t or 2 for t in turns)
    # every answer is one labelled run of tokens: the per-answer losses line up with the kinds
    logits = torch.zeros(*batch["input_ids"].shape, len(module.processor.tokenizer))
    assert len(answer_losses(logits, batch["labels"])) == len(batch["kinds"])
    tokenizer = module.processor.tokenizer
    text = tokenizer.decode(batch["input_ids"][0])
    assert text.startswith("<s> user : <image>") and "assistant :" in text  # the image first
    # over many images about half come as conversations of 2..4 turns
    counts = [conversation_turns(phase, 0, i) for i in range(400)]
    assert 0.4 < np.mean([c > 0 for c in counts]) < 0.6 and {c for c in counts if c} == {2, 3, 4}
    without = Phase("single", 1, 4, 1e-3)
    assert all(conversation_turns(without, 0, i) == 0 for i in range(50))


def test_answer_losses_are_one_per_answer():
    torch.manual_seed(0)
    logits = torch.randn(2, 9, 5)
    labels = torch.full((2, 9), IGNORE_INDEX)
    labels[0, 2:4] = torch.tensor([1, 2])  # first turn of a conversation
    labels[0, 6:8] = torch.tensor([3, 4])  # its second turn
    labels[1, 3:6] = torch.tensor([0, 1, 2])  # a single record
    expected = []
    for row, span in ((0, slice(2, 4)), (0, slice(6, 8)), (1, slice(3, 6))):
        positions = torch.arange(span.start, span.stop)
        expected.append(F.cross_entropy(logits[row, positions - 1], labels[row, positions]))
    assert torch.allclose(answer_losses(logits, labels), torch.stack(expected), atol=1e-6)
    labels[0, 4:6] = torch.tensor([0, 0])  # joined into one answer: one loss over its six tokens
    assert len(answer_losses(logits, labels)) == 2


# ------------------------------------------------------------------------------------------ init_from
@pytest.fixture(scope="module")
def question_first_run(tmp_path_factory):
    """A few steps of the (question-first) test recipe: a run state and an export to start from."""
    tmp_path = tmp_path_factory.mktemp("source")
    assert main([str(_recipe(tmp_path, "source", 3))]) == 0
    return tmp_path / "source"


def test_init_from_a_run_state_copies_model_and_heads(tmp_path, question_first_run):
    recipe = _image_first(_recipe(tmp_path, "copy", 2), init_from=str(question_first_run / "run" / STATE_NAME))
    module = _module(recipe)
    source = load_tensor_tree(question_first_run / "run" / STATE_NAME)["state_dict"]
    state = module.state_dict()
    assert set(source) == set(state)
    for name, value in source.items():
        assert torch.equal(state[name], value), name
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    assert module.processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False).startswith(
        "user : <image> hi"
    )


def test_init_from_an_export_copies_the_model_and_grows_identity_layers(tmp_path, question_first_run):
    recipe = _recipe(tmp_path, "grow", 2)
    spec = yaml.safe_load(recipe.read_text())["model"]["spec"]
    source, _ = load_tiny_llava(question_first_run / "export")
    grown = _module(recipe, spec={**spec, "text_layers": spec["text_layers"] + 1})
    report = load_initial_weights(grown, str(question_first_run / "export"))
    assert report.new_layers == [spec["text_layers"]] and report.loaded == len(source.state_dict())
    assert {name.split(".")[0] for name in report.fresh} == {"heads"}  # an export has no auxiliary heads
    for name, value in source.state_dict().items():
        assert torch.equal(grown.model.state_dict()[name], value), name
    new_layer = grown.model.model.language_model.layers[-1]
    assert not new_layer.self_attn.o_proj.weight.any() and not new_layer.mlp.down_proj.weight.any()
    assert new_layer.self_attn.q_proj.weight.any()  # the rest initialised as usual: the layer can learn
    ids = torch.tensor([[2, 5, 6, 7, 8]])
    with torch.no_grad():  # the grown LLM computes what the source's did
        expected = source.model.language_model(input_ids=ids).last_hidden_state
        assert torch.allclose(grown.model.model.language_model(input_ids=ids).last_hidden_state, expected, atol=1e-5)


def test_init_from_refuses_what_does_not_fit(tmp_path, question_first_run):
    recipe = _recipe(tmp_path, "misfit", 2)
    spec = yaml.safe_load(recipe.read_text())["model"]["spec"]
    state = str(question_first_run / "run" / STATE_NAME)
    with pytest.raises(
        InitFromError,
        match=r"model.init_from=.*weights differ in shape .*text_hidden|"
        r"model.init_from=.*differ in shape",
    ):
        _module(recipe, spec={**spec, "text_hidden": 64, "text_heads": 2}, init_from=state)
    with pytest.raises(InitFromError, match="have no place in the recipe's model"):
        _module(recipe, spec={**spec, "text_layers": 1}, init_from=state)
    with pytest.raises(InitFromError, match="no such file or directory"):
        _module(recipe, init_from=str(tmp_path / "nowhere.safetensors"))
    with pytest.raises(InitFromError, match="has no model.safetensors"):
        _module(recipe, init_from=str(tmp_path))


def test_image_first_conversations_continue_from_a_base_and_learn(tmp_path, question_first_run):
    """From the question-first source, the image-first run with conversations lowers its answer loss (later
    turns included), exports an image-first base and resumes from its state."""
    recipe = _image_first(_recipe(tmp_path, "first", 30), init_from=str(question_first_run / "run" / STATE_NAME))
    assert main([str(recipe)]) == 0
    rows = _log(tmp_path / "first/run" / LOG_NAME)
    assert len(rows) == 30 and {r["phase"] for r in rows} == {"all"}
    first, last = (np.mean([float(r["lm"]) for r in part]) for part in (rows[:5], rows[-5:]))
    assert last < first - 0.5, (first, last)
    later = [float(r["lm_later_turns"]) for r in rows if r.get("lm_later_turns")]
    assert len(later) > 10 and np.mean(later[-5:]) < np.mean(later[:5])
    retrieval = [float(r["retrieval"]) for r in rows]  # the retrieval loss trains (and is logged) every step
    assert all(np.isfinite(retrieval)) and np.mean(retrieval[-5:]) < np.mean(retrieval[:5])
    model, processor = load_tiny_llava(tmp_path / "first/export")
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    assert processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False).startswith(
        "user : <image> hi"
    )
    report = json.loads((tmp_path / "first/export/eval_report.json").read_text())
    assert report["final"] and report["step"] == 30
    assert report["recipe"]["model"]["init_from"] == str(question_first_run / "run" / STATE_NAME)
    conversations = report["conversations"]  # the export scores test conversations turn by turn
    assert [row["turn"] for row in conversations["per_turn"]] == [1, 2] and conversations["images"] == 2
    assert "Multi-turn: 2 test images" in (tmp_path / "first/export/eval_report.md").read_text()
    readme = (tmp_path / "first/export/README.md").read_text()  # says what this base is and how to resume it
    assert f"continued from `{question_first_run / 'run' / STATE_NAME}`" in readme and "the image first" in readme
    assert f"pretrain {recipe}" in readme and f"resumes from `{tmp_path / 'first/run'}/last.safetensors`" in readme
    source_readme = (question_first_run / "export/README.md").read_text()
    assert "trained from scratch" in source_readme and "the question before the image" in source_readme


# ------------------------------------------------------------------------------------------ multi-turn evaluation
def test_the_first_turn_of_a_test_conversation_is_scored_as_the_single_turn_evaluation():
    """On the shipped base: turn 1 of each conversation is the image's single-turn question, and scores as
    `evaluate` scores it; later turns see the gold turns before them."""
    from nuwa_train.evaluation import evaluate
    from nuwa_train.pretrain.conversations import conversation_messages, evaluate_conversations

    root = Path(__file__).resolve().parents[2]
    model, processor = load_tiny_llava(root / "data/tiny_base")
    config, images, turns = SyntheticConfig(), 12, 3
    report = evaluate_conversations(model, processor, config, images, turns, 0.3, batch_size=8)
    firsts = [make_conversation(generate_scene(config, "test", i), config, turns, 0.3)[0] for i in range(images)]
    single = evaluate(model, processor, firsts, synthetic_config=config, batch_size=8, progress=False)
    first_turn = report["per_turn"][0]
    assert first_turn["num_vqa"] == single.num_vqa and first_turn["num_grounding"] == single.num_grounding
    assert first_turn["vqa"] == pytest.approx(single.vqa_exact_match)
    assert first_turn["grounding"] == pytest.approx(single.grounding_acc50)
    assert [row["turn"] for row in report["per_turn"]] == [1, 2, 3]
    assert sum(row["num_vqa"] + row["num_grounding"] for row in report["per_turn"]) == images * turns
    assert sum(sum(counts) for counts in report["per_turn_kind_count"].values()) == images * turns
    records = make_conversation(generate_scene(config, "test", 0), config, turns, 0.3)
    messages = conversation_messages(list(records[:2]), records[2])
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert (
        messages[1]["content"][0]["text"] == records[0].answer
        and messages[4]["content"][0]["text"] == records[2].prompt
    )
    assert [part["type"] for part in messages[0]["content"]] == ["image", "text"]
    assert [part["type"] for part in messages[2]["content"]] == ["text"]


def test_later_turns_are_compared_with_the_first_on_the_same_kinds():
    from nuwa_train.pretrain.conversations import conversation_markdown, conversation_report

    # turn 1: colour 1.0 (2 asked), count 0.5 (2 asked); turn 2: colour 1.0 (1), count 0.0 (3)
    correct = {
        (0, "colour"): [True, True],
        (0, "count"): [True, False],
        (1, "colour"): [True],
        (1, "count"): [False, False, False],
        (0, "attribute"): [True],
        (1, "attribute"): [True, False],
    }
    tasks = {
        (0, "vqa"): [True, True, True, False],
        (1, "vqa"): [True, False, False, False],
        (0, "grounding"): [True],
        (1, "grounding"): [True, False],
    }
    kinds = {"colour": "vqa", "count": "vqa", "attribute": "grounding"}
    report = conversation_report(correct, tasks, kinds, images=5, turns=2, grounding_share=0.3)
    second = report["per_turn"][1]
    assert second["vqa"] == 0.25 and second["num_vqa"] == 4
    # turn 1's accuracies on turn 2's questions: (1 x 1.0 + 3 x 0.5) / 4 = 0.625; turn 2 got 0.25
    assert second["vqa_gap_to_first_turn"] == pytest.approx(0.25 - 0.625)
    assert second["grounding_gap_to_first_turn"] == pytest.approx(0.5 - 1.0)
    assert "vqa_gap_to_first_turn" not in report["per_turn"][0]
    assert report["worst_gap_to_first_turn"] == pytest.approx(-0.5)
    assert report["per_turn_kind"]["count"] == [0.5, 0.0] and report["per_turn_kind_count"]["count"] == [2, 3]
    text = "\n".join(conversation_markdown(report))
    assert "| 2 | 0.250 | 4 | -0.375 | 0.500 | 2 | -0.500 |" in text and "| count | 0.500 (2) | 0.000 (3) |" in text


def test_the_image_first_recipe_resumes_its_committed_state():
    """recipes/tiny_base_image_first.yaml builds the model its committed run state (runs/tiny_base_image_first,
    trained in the background over sessions) was saved from, image first, and the run's log reaches its step."""
    root = Path(__file__).resolve().parents[2]
    recipe = yaml.safe_load((root / "recipes/tiny_base_image_first.yaml").read_text())
    model = recipe["model"]
    assert model["init_from"] == "runs/tiny_base/last.safetensors" and not model["spec"]["image_after_text"]
    module = TinyBasePretrainer(**{**model, "init_from": str(root / model["init_from"])})
    state = load_tensor_tree(root / "runs/tiny_base_image_first" / STATE_NAME)
    module.load_state_dict(state["state_dict"])  # strict: every weight fits
    module.on_load_checkpoint(state)
    assert module.position.step == state["global_step"] > 0
    assert module.phase.name in [phase["name"] for phase in model["phases"]]
    log = _log(root / "runs/tiny_base_image_first" / LOG_NAME)
    # the log may run ahead of the state (a resume drops those rows), never behind it by more than a row
    logged = [int(row["step"]) for row in log]
    assert logged == sorted(logged) and logged[-1] > module.position.step - recipe["trainer"]["log_every_n_steps"]
    text = module.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert text.startswith("user : <image> hi")


def test_the_retrieval_loss_is_the_layers_own_attention_on_the_asked_objects(tmp_path):
    """retrieval_loss recomputes one head's attention from each answer's query token: it equals -log of the mass
    the model's own (eager) attention puts on the patches of the objects the question is about."""
    from nuwa_train.pretrain.heads import answer_queries
    from nuwa_train.pretrain.targets import COVER_THRESHOLD

    recipe = _image_first(_recipe(tmp_path, "retrieval", 2))
    spec = {**yaml.safe_load(recipe.read_text())["model"]["spec"], "attn_implementation": "eager"}
    module = _module(recipe, spec=spec, retrieval_layer=1, retrieval_head=1)
    module.position = module.position.next_phase()
    batch = BatchMaker(module.phases, module.synthetic, module.processor, module.targets)(module.position)
    model = module.model
    ids = batch["input_ids"]
    is_image = ids == model.config.image_token_index
    features = model.model.vision_tower(batch["pixel_values"]).last_hidden_state
    image_features = model.model.multi_modal_projector(features[batch["image_of_record"], 1:])
    embeds = model.get_input_embeddings()(ids.masked_fill(is_image, 0)).masked_scatter(
        is_image.unsqueeze(-1), image_features
    )
    language_model = model.model.language_model
    with torch.no_grad():
        out = language_model(
            inputs_embeds=embeds,
            attention_mask=batch["attention_mask"],
            output_hidden_states=True,
            output_attentions=True,
        )
        loss = module._retrieval_loss(language_model, out.hidden_states, embeds, is_image, batch)
    rows, positions = answer_queries(batch["labels"])
    assert len(rows) == len(batch["kinds"])  # one query per answer
    assert (batch["labels"][rows, positions] == IGNORE_INDEX).all()
    assert (batch["labels"][rows, positions + 1] != IGNORE_INDEX).all()
    probs = out.attentions[1][rows, 1, positions]  # (A, L): head 1 of layer 1, from each query token
    wanted = torch.zeros_like(probs, dtype=torch.bool)
    wanted[is_image[rows]] = (batch["answer_referred"] >= COVER_THRESHOLD).reshape(-1)
    keep = wanted.any(1)
    assert 0 < keep.sum() < len(keep)  # "no" answers are left out
    expected = -(probs * wanted).sum(1)[keep].log().mean()
    assert torch.allclose(loss, expected, atol=1e-4), (loss, expected)
    with pytest.raises(ValueError, match="model.retrieval_layer=2 / model.retrieval_head=0 must name a layer < 2"):
        _module(recipe, retrieval_layer=2)
