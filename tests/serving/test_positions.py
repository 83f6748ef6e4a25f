"""Served positions and settings, without vLLM: the pure parts of nuwa_train/serving."""

import pytest
import torch

from nuwa_train.pruning import NuwaConfig
from nuwa_train.serving.positions import kept_positions, prompt_positions
from nuwa_train.serving.settings import (
    SERVED_ARCHITECTURE,
    ServingError,
    config_from_overrides,
    hf_overrides,
    served_pruning,
)

IMAGE = 7  # placeholder id
KEPT, FULL = 3, 9  # a 3x3 grid keeping 3


def ids(*tokens):
    return torch.tensor(tokens)


def test_text_after_an_image_keeps_its_unpruned_position_and_decoding_continues_there():
    prompt = ids(1, 5, IMAGE, IMAGE, IMAGE, 6, 8)
    positions, delta = prompt_positions(prompt, IMAGE, KEPT, FULL)
    # unpruned: 1 at 0, 5 at 1, nine image tokens at 2..10, 6 at 11, 8 at 12; decoding at index + 6
    assert positions.tolist() == [0, 1, 2, 3, 4, 11, 12]
    assert delta == FULL - KEPT
    kept = kept_positions(positions, prompt, IMAGE, KEPT, 0, torch.tensor([0, 4, 8]))
    assert kept.tolist() == [0, 1, 2, 6, 10, 11, 12]
    assert positions.tolist() == [0, 1, 2, 3, 4, 11, 12]  # not modified in place


def test_compact_positions_number_the_pruned_sequence():
    prompt = ids(1, IMAGE, IMAGE, IMAGE, 6)
    positions, delta = prompt_positions(prompt, IMAGE, KEPT, FULL, original=False)
    assert positions.tolist() == [0, 1, 2, 3, 4] and delta == 0


def test_two_images_and_a_chunk_boundary_inside_an_image():
    prompt = ids(1, IMAGE, IMAGE, IMAGE, 5, IMAGE, IMAGE, IMAGE, 6)
    positions, delta = prompt_positions(prompt, IMAGE, KEPT, FULL)
    assert positions.tolist() == [0, 1, 2, 3, 10, 11, 12, 13, 20] and delta == 2 * (FULL - KEPT)
    # the second chunk starts at token 3: the first image's last placeholder and the whole second image
    moved = kept_positions(positions, prompt, IMAGE, KEPT, 3, torch.tensor([8, 1, 2, 5]))
    assert moved.tolist() == [0, 1, 2, 1 + 8, 10, 11 + 1, 11 + 2, 11 + 5, 20]
    with pytest.raises(ValueError, match="4 image embeddings for 3 placeholders"):
        kept_positions(positions, prompt, IMAGE, KEPT, 4, torch.tensor([8, 1, 2, 5]))


def test_a_partial_image_is_refused():
    with pytest.raises(ValueError, match="not a multiple of the plan's 3"):
        prompt_positions(ids(1, IMAGE, IMAGE, 6), IMAGE, KEPT, FULL)


def test_a_plain_model_is_served_with_stage1_nuwa_at_the_budget():
    served = served_pruning(None, 128)
    assert served.config == NuwaConfig(method="nuwa_stage1", budget=128) and served.note == ""
    assert served_pruning(None).config.budget == NuwaConfig().budget


def test_a_two_stage_export_is_served_stage1_only_with_a_note_naming_the_difference():
    trained = NuwaConfig(method="nuwa", budget=64, distance=100.0)
    served = served_pruning(trained)
    assert served.config == NuwaConfig(method="nuwa_stage1", budget=64, distance=100.0)
    assert "two-stage" in served.note and "served stage-1-only as 'nuwa_stage1' at budget 64" in served.note
    stage1 = served_pruning(NuwaConfig(method="nuwa_stage1", budget=192), 64)
    assert stage1.config.budget == 64 and stage1.note == ""
    with pytest.raises(ServingError, match="method='visionzip'.*serve the plain model"):
        served_pruning(NuwaConfig(method="visionzip"))


def test_overrides_round_trip_and_declare_one_dimensional_mrope():
    config = NuwaConfig(method="nuwa_stage1", budget=32, position_mode="compact")
    overrides = hf_overrides(config, head_dim=32)
    assert overrides["architectures"] == [SERVED_ARCHITECTURE]
    assert overrides["mrope_section"] == [16, 0, 0]  # every rotary frequency on the first row: 1-D RoPE

    class LoadedConfig:
        pass

    loaded = LoadedConfig()
    loaded.nuwa_pruning = overrides["nuwa_pruning"]
    assert config_from_overrides(loaded) == config
    with pytest.raises(ServingError, match="nuwa-train serve MODEL_DIR"):
        config_from_overrides(LoadedConfig())
    loaded.nuwa_pruning = {**overrides["nuwa_pruning"], "method": "nuwa"}
    with pytest.raises(ServingError, match="serves 'nuwa_stage1' only"):
        config_from_overrides(loaded)
