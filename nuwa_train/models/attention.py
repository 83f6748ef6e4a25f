"""Which LLM attention backends Nüwa runs on, and the fused form of soft selection's keep bias.

Soft selection keeps every token and adds log p_j (the keep probability of key j) to every query's attention score
for that key. As a (B, 1, L, L) float mask that needs a gradient, SDPA cannot use its fused kernels (none of them
returns a gradient for the mask) and falls back to materialising every attention matrix. But a bias that depends on
the key only is a dot product with a constant: widening each head by one dimension, 1 on the query and b_j / scale
on the key, adds exactly b_j to score (i, j), and the fused kernels' own key gradient carries its gradient back.

`attach_nuwa` therefore runs an sdpa language model through `KEY_BIAS_ATTENTION`, an entry of transformers'
`AttentionInterface` registry (its extension point: nothing existing is replaced). Without a bias it *is*
transformers' sdpa; detaching restores the model's own setting.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

from ..pruning import NuwaConfigError
from .base import Adapter

KEY_BIAS_ATTENTION = "nuwa_sdpa"  # registered name: transformers' sdpa plus a per-key additive bias
KEY_BIAS_KWARG = "nuwa_key_bias"  # (B, L_keys) bias a decoder layer passes down to its attention
# Extra width per head carrying the bias (1 column used, the rest zeros): head sizes stay multiples of 8, which
# the fused CPU and CUDA kernels vectorise over (measured on 606 tokens x 32 heads x 128, bf16, CPU: forward and
# backward 297 ms widened by 8 vs 623 ms with the differentiable float mask).
KEY_BIAS_HEAD_PAD = 8
# LLM attention backends Nüwa runs on (docs/attention_backends.md has the table). They read the explicit masks
# the pruned sequence needs: a 2-D mask beside gapped (original) position ids, and 4-D masks for stage 2's
# shorter cache (and the soft keep bias under eager). Flash-attention kernels drop an all-ones mask and then read
# gapped position ids as packed sequences (attention silently cut at every gap), and take no additive bias.
SUPPORTED_ATTENTION = ("sdpa", "eager")


def key_bias_sdpa(
    module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    **kwargs,
):
    """transformers' sdpa attention, plus `kwargs[KEY_BIAS_KWARG]` (B, L_keys) added to every score of each key."""
    bias = kwargs.pop(KEY_BIAS_KWARG, None)
    if bias is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    head_dim = query.shape[-1]
    scale = head_dim**-0.5 if scaling is None else scaling
    if bias.shape != (key.shape[0], key.shape[2]):
        raise ValueError(
            f"{KEY_BIAS_KWARG} has shape {tuple(bias.shape)}; attention needs one bias per key, "
            f"(batch, keys) = {(key.shape[0], key.shape[2])}"
        )
    query_column = query.new_zeros(*query.shape[:-1], KEY_BIAS_HEAD_PAD)
    query_column[..., 0] = 1
    key_column = F.pad((bias / scale).to(key.dtype)[:, None, :, None], (0, KEY_BIAS_HEAD_PAD - 1))
    key = torch.cat([key, key_column.expand(*key.shape[:-1], KEY_BIAS_HEAD_PAD)], dim=-1)
    query = torch.cat([query, query_column], dim=-1)
    value = F.pad(value, (0, KEY_BIAS_HEAD_PAD))  # equal head sizes keep the fused kernels
    output, weights = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scale, **kwargs)
    return output[..., :head_dim], weights


AttentionInterface.register(KEY_BIAS_ATTENTION, key_bias_sdpa)
AttentionMaskInterface.register(KEY_BIAS_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])  # same masks as sdpa


def adopt_key_bias_attention(adapter: Adapter) -> str | None:
    """Run an sdpa language model through KEY_BIAS_ATTENTION; returns the setting to restore (None: unchanged)."""
    config = adapter.language_model.config
    if config._attn_implementation != "sdpa":
        return None
    config._attn_implementation = KEY_BIAS_ATTENTION
    return "sdpa"


def restore_attention(adapter: Adapter, previous: str | None) -> None:
    """Undo `adopt_key_bias_attention` unless the backend was switched since."""
    config = adapter.language_model.config
    if previous is not None and config._attn_implementation == KEY_BIAS_ATTENTION:
        config._attn_implementation = previous


def takes_key_bias(adapter: Adapter) -> bool:
    """Whether the language model's attention takes the keep bias as KEY_BIAS_KWARG (else: a float mask)."""
    return adapter.language_model.config._attn_implementation == KEY_BIAS_ATTENTION


def check_attention_backend(adapter: Adapter) -> None:
    """Refuse an LLM attention backend that would silently attend wrongly on the pruned sequence."""
    backend = adapter.language_model.config._attn_implementation
    if backend is not None and backend not in (*SUPPORTED_ATTENTION, KEY_BIAS_ATTENTION):
        raise NuwaConfigError(
            f"attn_implementation={backend!r} (the language model's) is not supported by Nüwa pruning: kept vision "
            f"tokens keep their original, gapped position ids, which flash-attention kernels read as packed sequences "
            f"when there is no padding, and soft selection adds a bias inside attention that they cannot take. "
            f"Load the model with attn_implementation='sdpa' (or call model.set_attn_implementation('sdpa')); "
            f"supported: {', '.join(SUPPORTED_ATTENTION)}"
        )
