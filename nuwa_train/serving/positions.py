"""Position ids of a served prompt whose images were replaced by K placeholders each (pure tensors).

vLLM expands every image of a prompt into the plan's K placeholders before the model runs, so the sequence it
schedules is the pruned one. Nüwa keeps each kept token at the position it would have had with all N tokens
(image start + its raster index) and shifts the text after an image by N - K, so that the text and the decoded
tokens keep their unpruned positions (NUWA_METHOD.md, "Positions"). Which raster indices are kept is known only
once the image has been encoded; until then each placeholder holds image start + its rank (the compact
numbering inside the image), which `kept_positions` then replaces.
"""

from __future__ import annotations

import torch


def prompt_positions(
    input_ids: torch.Tensor, image_token_id: int, kept: int, full: int, original: bool = True
) -> tuple[torch.Tensor, int]:
    """(positions (L,), decode delta) of a prompt holding `kept` placeholders per image.

    `original`: text after each image is shifted by `full - kept` (its unpruned position) and decoding continues
    there (delta = shift x images); otherwise the sequence is numbered 0..L-1 (compact, delta 0).
    """
    is_image = (input_ids == image_token_id).long()
    placeholders = int(is_image.sum())
    if placeholders % kept:
        raise ValueError(
            f"the prompt holds {placeholders} image placeholders, not a multiple of the plan's {kept} per image"
        )
    shift = full - kept if original else 0
    images_before = (is_image.cumsum(0) - is_image) // kept  # whole images that end before each token
    positions = torch.arange(len(input_ids), dtype=torch.long) + shift * images_before
    return positions, shift * (placeholders // kept)


def kept_positions(
    positions: torch.Tensor,
    input_ids: torch.Tensor,
    image_token_id: int,
    kept: int,
    first: int,
    raster_indices: torch.Tensor,
) -> torch.Tensor:
    """`positions` (from `prompt_positions`) with the placeholders from index `first` on, in order, moved to
    image start + their kept raster index (`raster_indices`, one per placeholder).

    `positions` must be `prompt_positions`' own (each placeholder at image start + rank): recomputing them for
    every chunk makes a chunk, or a preempted request, processed again get the same positions.
    """
    is_image = input_ids == image_token_id
    slots = is_image.nonzero().squeeze(1)
    slots = slots[slots >= first][: len(raster_indices)]
    if len(slots) != len(raster_indices):
        raise ValueError(f"{len(raster_indices)} image embeddings for {len(slots)} placeholders from token {first}")
    rank = (is_image.long().cumsum(0) - 1)[slots] % kept  # rank of each placeholder inside its image
    positions = positions.clone()
    positions[slots] = positions[slots] - rank + raster_indices.to(positions.dtype)
    return positions
