"""The synthetic benchmark: determinism, unambiguity, box precision and tokenizer coverage."""

import hashlib
import re
from dataclasses import replace

import numpy as np
import pytest

from nuwa_train.data.geometry import iou, normalise_box
from nuwa_train.data.records import SyntheticRecords
from nuwa_train.data.synthetic import (
    SPLITS,
    SyntheticConfig,
    box_to_tokens,
    coordinate_tokens,
    generate_records,
    generate_scene,
    make_grounding,
    make_vqa,
    render,
    tokens_to_box,
    vocabulary,
)

CONFIG = SyntheticConfig()
NUM_IMAGES = 1500  # 3000 records: enough to hit every question kind and relation many times
SIZES = {name for name, _, _ in CONFIG.sizes}
PHRASES = {"to the left of": "left", "to the right of": "right", "above": "above", "below": "below"}
WHITESPACE_PRETOKENIZER = re.compile(r"\w+|[^\w\s]+")


@pytest.fixture(scope="module")
def records():
    return list(generate_records(CONFIG, "train", NUM_IMAGES))


# ---------------------------------------------------------------------------------------------
# an independent reading of the generated text, recomputed from the object list


def _referents(noun_phrase, objects):
    """Objects matching e.g. 'small red object' or 'circle'."""
    *modifiers, noun = noun_phrase.split()
    wanted = {} if noun == "object" else {"shape": noun}
    for word in modifiers:
        wanted["size" if word in SIZES else "colour"] = word
    return wanted, [o for o in objects if all(getattr(o, k) == v for k, v in wanted.items())]


def _side(obj, anchor, relation):
    """(centre on that side, entirely on that side)."""
    (ox, oy), (ax, ay) = obj.centre, anchor.centre
    x1, y1, x2, y2 = obj.box
    a1, b1, a2, b2 = anchor.box
    return {
        "left": (ox < ax, x2 <= a1),
        "right": (ox > ax, x1 >= a2),
        "above": (oy < ay, y2 <= b1),
        "below": (oy > ay, y1 >= b2),
    }[relation]


def _only_one_on_side(candidates, anchor, relation):
    """The single candidate on that side of the anchor, if it is the only one and clearly there."""
    on_side = [o for o in candidates if _side(o, anchor, relation)[0]]
    assert len(on_side) == 1, f"{len(on_side)} objects are {relation} of the anchor"
    assert _side(on_side[0], anchor, relation)[1], "the object overlaps the anchor along the axis"
    return on_side[0]


def _unique(noun_phrase, objects):
    _, found = _referents(noun_phrase, objects)
    assert len(found) == 1, f"'the {noun_phrase}' matches {len(found)} objects"
    return found[0]


def _oracle_answer(prompt, objects):
    if m := re.fullmatch(r"what colour is the (.+)\?", prompt):
        assert "colour" not in _referents(m[1], objects)[0], "the question gives the answer away"
        return _unique(m[1], objects).colour
    if m := re.fullmatch(r"what shape is the (.+)\?", prompt):
        assert "shape" not in _referents(m[1], objects)[0], "the question gives the answer away"
        return _unique(m[1], objects).shape
    if m := re.fullmatch(r"how many (.+) are there\?", prompt):
        return str(len(_referents(m[1].removesuffix("s"), objects)[1]))  # "red objects" -> "red object"
    if m := re.fullmatch(r"is there a (.+)\?", prompt):
        return "yes" if _referents(m[1], objects)[1] else "no"
    if m := re.fullmatch(r"what is (to the left of|to the right of|above|below) the (.+)\?", prompt):
        anchor = _unique(m[2], objects)
        found = _only_one_on_side([o for o in objects if o is not anchor], anchor, PHRASES[m[1]])
        return f"{found.colour} {found.shape}"
    raise AssertionError(f"unexpected question {prompt!r}")


def _oracle_referent(prompt, objects):
    expression = re.fullmatch(r"locate (.+)\.", prompt)[1]
    if m := re.fullmatch(r"the (.+?) (to the left of|to the right of|above|below) the (.+)", expression):
        anchor = _unique(m[3], objects)
        _, targets = _referents(m[1], objects)
        return _only_one_on_side([o for o in targets if o is not anchor], anchor, PHRASES[m[2]])
    return _unique(re.fullmatch(r"the (.+)", expression)[1], objects)


# ---------------------------------------------------------------------------------------------
# determinism and splits


def _image_digest(scene, config=CONFIG):
    return hashlib.sha256(render(scene, config).tobytes()).hexdigest()


def test_any_record_regenerates_alone_from_seed_split_and_index(records):
    vqa, grounding = records[2 * 37], records[2 * 37 + 1]
    scene = generate_scene(CONFIG, "train", 37)
    assert scene == vqa.scene == grounding.scene
    assert make_vqa(scene, CONFIG) == vqa and make_grounding(scene, CONFIG) == grounding
    assert np.array_equal(np.asarray(render(scene, CONFIG)), np.asarray(render(vqa.scene, CONFIG)))
    other_seed = replace(CONFIG, seed=1)
    assert generate_scene(other_seed, "train", 37) != scene
    assert _image_digest(scene, other_seed) != _image_digest(scene)


def test_more_records_per_image_keep_the_first_and_draw_new_ones():
    one = SyntheticRecords(CONFIG, "train", 40)
    three = SyntheticRecords(CONFIG, "train", 40, vqa_per_image=3, grounding_per_image=2)
    assert len(three) == 5 * 40 and len(one) == 2 * 40 and three.records_per_image == 5
    for image in range(40):
        group = [three[5 * image + k] for k in range(5)]
        assert group[0] == one[2 * image] and group[1] == one[2 * image + 1]  # draw 0 is the one-question data
        assert [r["task"] for r in group] == ["vqa", "grounding", "vqa", "grounding", "vqa"]
        assert all(np.array_equal(np.asarray(r["image"]), np.asarray(group[0]["image"])) for r in group)
    rows = [three[i] for i in range(len(three))]
    assert len({r["id"] for r in rows}) == len(rows)
    vqa = [(r["prompt"], r["answer"]) for r in rows if r["task"] == "vqa"]
    assert len(set(vqa)) > 0.6 * len(vqa)  # later draws are mostly new questions, not copies of the first
    only_vqa = SyntheticRecords(CONFIG, "train", 40, grounding_per_image=0)
    assert len(only_vqa) == 40 and {only_vqa[i]["task"] for i in range(40)} == {"vqa"}
    with pytest.raises(ValueError, match="vqa_per_image=-1"):
        SyntheticRecords(CONFIG, "train", 40, vqa_per_image=-1)
    with pytest.raises(ValueError, match="both 0"):
        SyntheticRecords(CONFIG, "train", 40, vqa_per_image=0, grounding_per_image=0)


def test_splits_never_share_an_image():
    digests = {split: {_image_digest(generate_scene(CONFIG, split, i)) for i in range(100)} for split in SPLITS}
    assert all(len(d) == 100 for d in digests.values())
    assert (
        not digests["train"] & digests["val"]
        and not digests["train"] & digests["test"]
        and not digests["val"] & digests["test"]
    )
    layouts = {split: generate_scene(CONFIG, split, 5).objects for split in SPLITS}
    assert len(set(layouts.values())) == len(SPLITS)


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError, match="unknown split"):
        generate_scene(CONFIG, "validation", 0)


# ---------------------------------------------------------------------------------------------
# scenes and images


def test_objects_fit_with_margin_and_gap_and_have_distinct_attributes(records):
    high = CONFIG.object_count[1]
    for record in records[::2]:
        objects = record.scene.objects
        assert 1 <= len(objects) <= high
        assert len({(o.size, o.colour, o.shape) for o in objects}) == len(objects)
        for i, o in enumerate(objects):
            x1, y1, x2, y2 = o.box
            _, lo, hi = next(s for s in CONFIG.sizes if s[0] == o.size)
            assert x2 - x1 == y2 - y1 and lo <= x2 - x1 <= hi
            assert CONFIG.margin <= x1 and x2 <= CONFIG.width - CONFIG.margin
            assert CONFIG.margin <= y1 and y2 <= CONFIG.height - CONFIG.margin
            for p in objects[i + 1 :]:
                apart = (
                    x2 + CONFIG.gap <= p.box[0]
                    or p.box[2] + CONFIG.gap <= x1
                    or y2 + CONFIG.gap <= p.box[1]
                    or p.box[3] + CONFIG.gap <= y1
                )
                assert apart, f"{o} and {p} are closer than the gap"


def test_each_shape_exactly_fills_its_box_in_its_colour():
    config = replace(CONFIG, noise_std=0.0, single_object_fraction=1.0)
    palette = dict(config.colours)
    seen = set()
    for index in range(60):
        scene = generate_scene(config, "val", index)
        (obj,) = scene.objects
        pixels = np.asarray(render(scene, config)).astype(int)
        ys, xs = np.nonzero((pixels != config.background).any(axis=2))
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == obj.box
        cx, cy = (int(c) for c in obj.centre)
        assert tuple(pixels[cy, cx]) == palette[obj.colour]
        seen.add(obj.shape)
    assert seen == set(config.shapes)


def test_single_object_fraction_is_a_curriculum_knob():
    def single_share(fraction, n=400):
        config = replace(CONFIG, single_object_fraction=fraction)
        return np.mean([len(generate_scene(config, "train", i).objects) == 1 for i in range(n)])

    assert single_share(1.0) == 1.0
    assert single_share(0.0) == 0.0
    assert 0.18 < single_share(CONFIG.single_object_fraction, 1000) < 0.32


def test_background_is_noisy_light_grey():
    config = replace(CONFIG, single_object_fraction=1.0)
    pixels = np.asarray(render(generate_scene(config, "train", 0), config)).astype(float)
    corner = pixels[: CONFIG.margin, :, 0]  # objects never reach the margin
    assert abs(corner.mean() - CONFIG.background) < 3
    assert 0.5 * CONFIG.noise_std < corner.std() < 1.5 * CONFIG.noise_std


# ---------------------------------------------------------------------------------------------
# questions and referring expressions


def test_every_vqa_answer_follows_from_the_objects_and_is_unambiguous(records):
    vqa = [r for r in records if r.task == "vqa"]
    for record in vqa:
        assert _oracle_answer(record.prompt, record.scene.objects) == record.answer, record
    assert {r.kind for r in vqa} == {"colour", "shape", "count", "existence", "spatial"}
    asked = {
        re.sub(r"(to the left of|to the right of|above|below).*", r"\1", r.prompt) for r in vqa if r.kind == "spatial"
    }
    assert asked == {f"what is {p}" for p in PHRASES}


def test_every_referring_expression_names_exactly_its_object(records):
    grounding = [r for r in records if r.task == "grounding"]
    for record in grounding:
        target = _oracle_referent(record.prompt, record.scene.objects)
        assert record.box == normalise_box(target.box, CONFIG.width, CONFIG.height), record
        assert record.answer == box_to_tokens(record.box, CONFIG.coordinate_bins)
    relational = np.mean([r.kind == "relational" for r in grounding])
    assert 0.1 < relational < CONFIG.relational_fraction


def test_existence_questions_are_balanced(records):
    answers = [r.answer for r in records if r.kind == "existence"]
    assert len(answers) > 200
    assert 0.42 < answers.count("yes") / len(answers) < 0.58


def test_vqa_mix_controls_question_kinds():
    only_count = replace(CONFIG, vqa_mix=(("count", 1.0),))
    assert {make_vqa(generate_scene(only_count, "val", i), only_count).kind for i in range(50)} == {"count"}
    no_spatial = replace(CONFIG, vqa_mix=(("spatial", 0.0), ("colour", 1.0), ("existence", 1.0)))
    kinds = {make_vqa(generate_scene(no_spatial, "val", i), no_spatial).kind for i in range(100)}
    assert kinds == {"colour", "existence"}


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"vqa_mix": (("spatial", 1.0),)}, "every image gets a question"),
        ({"vqa_mix": (("weather", 1.0), ("count", 1.0))}, "vqa_mix kinds"),
        ({"sizes": (("small", 14, 95),)}, "fit inside the image"),
        ({"shapes": ("circle", "star")}, "shapes"),
        ({"object_count": (3, 2)}, "object_count"),
        ({"grounding_template": "locate it."}, "grounding_template"),
    ],
)
def test_config_rejects_settings_that_cannot_work(overrides, message):
    with pytest.raises(ValueError, match=message):
        replace(CONFIG, **overrides)


# ---------------------------------------------------------------------------------------------
# boxes and coordinate tokens


def _worst_exact_iou(config):
    """Worst IoU of the exact token answer over every square box the generator can place.

    x and y are quantised independently, so decode every 1-D interval once and combine all
    (x, y) pairs with numpy.
    """
    worst = 1.0
    m, bins = config.margin, config.coordinate_bins
    for _, lo, hi in config.sizes:
        for side in range(lo, hi + 1):

            def intervals(extent, axis, side=side):
                truth, decoded = [], []
                for p in range(m, extent - m - side + 1):
                    pixel_box = (p, m, p + side, m + side) if axis == 0 else (m, p, m + side, p + side)
                    box = normalise_box(pixel_box, config.width, config.height)
                    truth.append(box[axis::2])
                    decoded.append(tokens_to_box(box_to_tokens(box, bins), bins)[axis::2])
                return np.array(truth), np.array(decoded)

            (tx, dx), (ty, dy) = intervals(config.width, 0), intervals(config.height, 1)
            ix = np.clip(np.minimum(tx[:, 1], dx[:, 1]) - np.maximum(tx[:, 0], dx[:, 0]), 0, None)
            iy = np.clip(np.minimum(ty[:, 1], dy[:, 1]) - np.maximum(ty[:, 0], dy[:, 0]), 0, None)
            inter = np.outer(ix, iy)
            union = (
                np.outer(tx[:, 1] - tx[:, 0], ty[:, 1] - ty[:, 0])
                + np.outer(dx[:, 1] - dx[:, 0], dy[:, 1] - dy[:, 0])
                - inter
            )
            worst = min(worst, float((inter / union).min()))
    return worst


def test_exact_answer_of_every_possible_box_has_iou_at_least_half():
    assert _worst_exact_iou(CONFIG) >= 0.5
    # the check is sensitive: too few bins for the smallest objects breaks the guarantee
    assert _worst_exact_iou(replace(CONFIG, coordinate_bins=8)) < 0.5


def test_every_generated_answer_decodes_to_iou_at_least_half(records):
    scores = [iou(tokens_to_box(r.answer, CONFIG.coordinate_bins), r.box) for r in records if r.task == "grounding"]
    assert len(scores) == NUM_IMAGES and min(scores) >= 0.5
    boxes = [normalise_box(o.box, CONFIG.width, CONFIG.height) for r in records[::2] for o in r.scene.objects]
    scores = [iou(tokens_to_box(box_to_tokens(b, CONFIG.coordinate_bins), CONFIG.coordinate_bins), b) for b in boxes]
    assert len(scores) > 3000 and min(scores) >= 0.5


def test_box_tokens_round_trip_to_bin_centres():
    assert normalise_box((0, 48, 96, 95), 96, 96) == (0, 500, 999, 990)
    assert box_to_tokens((0, 500, 999, 31), 32) == "<loc_0><loc_16><loc_31><loc_0>"
    assert tokens_to_box("<loc_0><loc_16><loc_31><loc_0>", 32) == (15, 515, 984, 15)
    assert tokens_to_box("<loc_0> <loc_16> <loc_31> <loc_1>", 32) == (15, 515, 984, 46)


@pytest.mark.parametrize(
    "text, box",
    [
        ("[123, 456, 789, 999]", (123, 456, 789, 999)),
        ("(123,456),(789,999)", (123, 456, 789, 999)),
        ("the box is [1, 2, 3, 4].", (1, 2, 3, 4)),
        ("<loc_1><loc_2><loc_3>", None),  # too few coordinates
        ("<loc_1><loc_2><loc_3><loc_4><loc_5>", None),  # too many
        ("<loc_1><loc_2><loc_3><loc_32>", None),  # beyond 32 bins
        ("[123, 456, 789, 1000]", None),  # outside [0, 1000)
        ("a red circle", None),
    ],
)
def test_tokens_to_box_reads_tokens_and_plain_integers(text, box):
    assert tokens_to_box(text, 32) == box


def test_iou():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
    assert iou((5, 5, 5, 9), (0, 0, 10, 10)) == 0.0  # degenerate answer


# ---------------------------------------------------------------------------------------------
# tokenizer compatibility


def test_vocabulary_covers_every_prompt_and_answer(records):
    words, locs = set(vocabulary(CONFIG)), set(coordinate_tokens(CONFIG))
    assert vocabulary(CONFIG) == sorted(words) and not words & locs
    assert len(locs) == CONFIG.coordinate_bins
    used = set()
    for record in records:
        for text in (record.prompt, record.answer):
            assert text == text.lower()
            assert set(re.findall(r"<loc_\d+>", text)) <= locs
            pieces = WHITESPACE_PRETOKENIZER.findall(re.sub(r"<loc_\d+>", " ", text))
            assert set(pieces) <= words, f"{text!r} has pieces outside the vocabulary: {set(pieces) - words}"
            used.update(pieces)
    assert used == words, f"listed but never generated: {words - used}"


def test_records_name_the_objects_they_are_about(records):
    """`Record.referred`: what the generator knew the prompt was about, checked against the answer."""
    for record in records[:600]:
        objects = [record.scene.objects[i] for i in record.referred]
        if record.task == "grounding":
            assert [normalise_box(o.box, record.scene.width, record.scene.height) for o in objects] == [record.box]
        elif record.kind == "count":
            assert len(objects) == int(record.answer), record.prompt
        elif record.kind == "existence":
            assert bool(objects) == (record.answer == "yes"), record.prompt
        elif record.kind == "spatial":
            assert [f"{o.colour} {o.shape}" for o in objects] == [record.answer], record.prompt
        else:
            assert [getattr(objects[0], record.kind)] == [record.answer] and len(objects) == 1, record.prompt
