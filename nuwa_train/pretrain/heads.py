"""The parts pre-training adds to the tiny base: position init, attention pooling and auxiliary heads (not exported)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half

from ..data.schema import IGNORE_INDEX
from ..models.scoring import clip_cls_attention
from ..models.tiny import TinyLlavaSpec
from .targets import TargetMaker

SINCOS_BASE = 10000  # wavelength base of the sine-cosine position table (as in the transformer paper)


def sincos_2d(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """(H*W, dim) 2-D sine-cosine position table: half the channels encode rows, half columns."""
    quarter = dim // 4
    omega = 1.0 / (SINCOS_BASE ** (torch.arange(quarter, dtype=torch.float32) / max(quarter, 1)))
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float32), torch.arange(grid[1], dtype=torch.float32), indexing="ij"
    )
    parts = []
    for coord in (rows.reshape(-1), cols.reshape(-1)):
        angles = coord[:, None] * omega[None]
        parts += [angles.sin(), angles.cos()]
    table = torch.cat(parts, dim=1)
    return F.pad(table, (0, dim - table.shape[1]))


def init_vision_positions(model, spec: TinyLlavaSpec, scale: float) -> None:
    """Vision position embeddings <- scale x 2-D sin-cos for the patches, zero for CLS; scale 0 keeps the init."""
    if scale <= 0:
        return
    embedding = model.model.vision_tower.embeddings.position_embedding
    with torch.no_grad():
        embedding.weight.zero_()
        embedding.weight[1:] = scale * sincos_2d(spec.grid, embedding.weight.shape[1])


def cls_attention_pool(layer: nn.Module, layer_input: torch.Tensor) -> torch.Tensor:
    """What the CLS query of one CLIP encoder layer reads, through that layer's own attention: (B, D).

    Attention-pooling as in CLIP's pooled output, minus the residual stream: a head reading this can
    only see what the layer's CLS attention selects (`clip_cls_attention`, the pruners' stage-1 score), so
    the "which objects are present" loss on it pushes that attention onto the objects.
    """
    attn = layer.self_attn
    probs = clip_cls_attention(layer, layer_input)  # (B, heads, L), fp32
    batch, heads, length = probs.shape
    values = attn.v_proj(layer.layer_norm1(layer_input)).view(batch, length, heads, attn.head_dim).transpose(1, 2)
    read = (probs.to(values.dtype).unsqueeze(2) @ values).squeeze(2)  # (B, heads, head_dim)
    return attn.out_proj(read.reshape(batch, heads * attn.head_dim))


def answer_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(A,) mean cross-entropy over each answer's tokens: an answer is a run of labelled tokens, so a conversation
    row gives one loss per assistant turn (every turn weighs as much as a single-turn record's answer). Answers
    are ordered by row, then by position in the row; 1-token answers weigh as much as 5-token boxes."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    token = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    valid = (shift_labels != IGNORE_INDEX).reshape(-1)
    # A new answer starts at a labelled token whose predecessor in the same row is not labelled.
    starts = shift_labels != IGNORE_INDEX
    starts[:, 1:] &= shift_labels[:, :-1] == IGNORE_INDEX
    answer = starts.reshape(-1).long().cumsum(0) - 1  # the answer index of every (labelled) token
    count = int(starts.sum())
    totals = token.new_zeros(count).index_add(0, answer[valid], token[valid])
    sizes = token.new_zeros(count).index_add(0, answer[valid], torch.ones_like(token[valid]))
    return totals / sizes


def answer_queries(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, positions) of the token before each answer (the one that predicts its first token), in the order of
    `answer_losses`."""
    labelled = labels != IGNORE_INDEX
    starts = labelled[:, 1:] & ~labelled[:, :-1]
    rows, positions = starts.nonzero(as_tuple=True)
    return rows, positions


def retrieval_loss(
    layer: nn.Module,
    layer_input: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    rows: torch.Tensor,
    positions: torch.Tensor,
    targets: torch.Tensor,
    head: int,
) -> torch.Tensor:
    """-log of the attention mass that one head of an LLM decoder layer puts, from each answer's query token, on
    the patches of the objects its question is about (`targets` (A, L) bool over the row's positions).

    With the image first the vision tokens cannot see the question (the question-first referred head has nothing
    to read): this supervises the retrieval itself, the query reading the right patches. Answers without a
    target (e.g. "no") are left out. Recomputes that head's causal attention scores from the layer's input.
    """
    attn = layer.self_attn
    keep = targets.any(1)
    if not keep.any():
        return layer_input.new_zeros(())
    rows, positions, targets = rows[keep], positions[keep], targets[keep]
    normed = layer.input_layernorm(layer_input)
    dim = attn.head_dim
    query = attn.q_proj(normed[rows, positions]).view(len(rows), -1, dim)[:, head]  # (A, d)
    key = attn.k_proj(normed).view(*normed.shape[:2], -1, dim)[:, :, head // attn.num_key_value_groups]  # (B, L, d)
    cos, sin = position_embeddings
    query = query * cos[rows, positions] + rotate_half(query) * sin[rows, positions]
    key = (key * cos + rotate_half(key) * sin)[rows]  # (A, L, d)
    scores = (key @ query.unsqueeze(-1)).squeeze(-1).float() * attn.scaling  # (A, L)
    later = torch.arange(scores.shape[1], device=scores.device)[None] > positions[:, None]
    log_probs = scores.masked_fill(later, float("-inf")).log_softmax(-1)
    return -log_probs.masked_fill(~targets, float("-inf")).logsumexp(-1).mean()


class AuxHeads(nn.Module):
    """Linear read-outs whose losses shape the representations (dropped at export)."""

    def __init__(self, vision_dim: int, text_dim: int, targets: TargetMaker, referred_pos_weight: float):
        super().__init__()
        self.referred_pos_weight = referred_pos_weight
        self.count_slots, self.count_values, self.bins = targets.count_slots, targets.count_values, targets.bins
        self.patch_norm = nn.LayerNorm(vision_dim)
        self.cls_norm = nn.LayerNorm(vision_dim)
        self.patch_class = nn.Linear(vision_dim, targets.num_classes)
        self.patch_box = nn.Linear(vision_dim, 4 * targets.bins)
        self.patch_count = nn.Linear(vision_dim, self.count_slots * self.count_values)
        self.presence = nn.Linear(vision_dim, len(targets.triples))
        self.referred = nn.Linear(text_dim, 1)

    def vision_losses(
        self, features: torch.Tensor, batch: dict, pooled: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """features (B, 1 + N, D) of the feature layer, CLS first; `pooled` (B, D) replaces the CLS output
        as the input of the presence head (see `cls_attention_pool`)."""
        patches = self.patch_norm(features[:, 1:].float())
        cls = self.cls_norm((features[:, 0] if pooled is None else pooled).float())
        b, n, _ = patches.shape
        losses = {
            "class": F.cross_entropy(self.patch_class(patches).reshape(b * n, -1), batch["classes"].reshape(-1)),
            "count": F.cross_entropy(
                self.patch_count(patches).reshape(b * n * self.count_slots, self.count_values),
                batch["counts"][:, None, :].expand(b, n, -1).reshape(-1),
            ),
            "presence": F.binary_cross_entropy_with_logits(self.presence(cls), batch["presence"]),
        }
        boxes = batch["boxes"].reshape(-1)
        if (boxes != IGNORE_INDEX).any():
            losses["box"] = F.cross_entropy(
                self.patch_box(patches).reshape(b * n * 4, self.bins), boxes, ignore_index=IGNORE_INDEX
            )
        return losses

    def referred_loss(self, hidden: torch.Tensor, is_image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """BCE of 'this vision token is part of the referred object' on the LLM's vision tokens."""
        logits = self.referred(hidden[is_image].float()).squeeze(-1)
        return F.binary_cross_entropy_with_logits(
            logits, target.reshape(-1), pos_weight=torch.tensor(self.referred_pos_weight)
        )
