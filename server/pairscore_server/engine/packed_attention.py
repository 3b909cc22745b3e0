"""Attention over a packed row, segment by segment, as a transformers attention function.

Registered under :data:`PACKED_ATTENTION` in transformers' attention
interface. A forward call that passes ``pairscore_segments=`` (a tuple of
:class:`~.packing.Segment`) gets per-segment scaled-dot-product attention:
a trie's root node attends causally to itself, any other node to its
ancestors' rows and then causally to itself (the segment's ``keys`` and
``mask``). Any other call (padded batches, the key/value cache path) is plain
SDPA with the usual mask, so one model serves both.

Only the segments' own blocks are computed (several nodes below a shared run
share one call within a bounded waste: packing.attention_groups): the cost is
about that of the sequences run one by one, not of the row's full T x T square.
"""

from __future__ import annotations

import logging

import torch
from torch.nn.functional import scaled_dot_product_attention

from pairscore_server.engine.interface import CausalLM
from pairscore_server.engine.packing import SegmentBatch

log = logging.getLogger(__name__)

PACKED_ATTENTION = "pairscore_packed"
SEGMENTS_KWARG = "pairscore_segments"


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: [B, H, T, D] in, [B, T, H, D] out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    segments = kwargs.pop(SEGMENTS_KWARG, None)
    if segments is None:
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    gqa = getattr(module, "num_key_value_groups", 1) > 1
    out = query.new_empty(*query.shape[:3], value.shape[-1])
    for seg in segments:
        if isinstance(seg, SegmentBatch):
            _batched_calls(out, query, key, value, seg, scaling, gqa)
            continue
        q = query[:, :, seg.start : seg.stop]
        if seg.mask is None:
            out[:, :, seg.start : seg.stop] = scaled_dot_product_attention(
                q,
                key[:, :, seg.start : seg.stop],
                value[:, :, seg.start : seg.stop],
                is_causal=True,
                scale=scaling,
                enable_gqa=gqa,
            )
        else:
            keys = [key[:, :, a:b] for a, b in seg.keys]
            values = [value[:, :, a:b] for a, b in seg.keys]
            out[:, :, seg.start : seg.stop] = scaled_dot_product_attention(
                q,
                torch.cat(keys, dim=2) if len(keys) > 1 else keys[0],
                torch.cat(values, dim=2) if len(values) > 1 else values[0],
                attn_mask=seg.mask,
                scale=scaling,
                enable_gqa=gqa,
            )
    return out.transpose(1, 2).contiguous(), None


def _rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` ([m x n]) of a [1, H, T, D] tensor as a contiguous [m, H, n, D] batch."""
    m, n = rows.shape
    picked = x[0].index_select(1, rows.reshape(-1))  # [H, m*n, D]
    return picked.view(x.shape[1], m, n, x.shape[3]).transpose(0, 1).contiguous()


def _batched_calls(
    out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    seg: SegmentBatch,
    scaling: float | None,
    gqa: bool,
) -> None:
    """One SDPA call for a batch of single-node calls of one shape, written back to ``out``."""
    got = scaled_dot_product_attention(
        _rows(query, seg.queries),
        _rows(key, seg.keys),
        _rows(value, seg.keys),
        attn_mask=seg.mask,
        scale=scaling,
        enable_gqa=gqa,
    )  # [m, H, n, D]
    heads, dim = got.shape[1], got.shape[3]
    out[0].index_copy_(1, seg.queries.reshape(-1), got.transpose(0, 1).reshape(heads, -1, dim))


def enable_packed_attention(model: CausalLM) -> str | None:
    """Switch ``model`` (an SDPA model) to :data:`PACKED_ATTENTION`.

    Returns None on success, else why packing cannot be used. The switch
    keeps every unpacked call exactly SDPA; whether the model honours the
    segments (passes attention kwargs through to its attention function) is
    for the caller to probe.
    """
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    config = model.config
    current = getattr(config, "_attn_implementation", None)
    if current == PACKED_ATTENTION:
        return None
    if current != "sdpa":
        return f"the model's attention implementation is {current!r}; packing needs 'sdpa'"
    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)
    try:
        model.set_attn_implementation(PACKED_ATTENTION)
    except (ValueError, AttributeError, NotImplementedError) as exc:
        return f"the model does not accept a custom attention function: {exc}"
    if config._attn_implementation != PACKED_ATTENTION:
        return "the model kept its attention implementation"
    return None


def disable_packed_attention(model: CausalLM) -> None:
    """Back to plain SDPA (after a failed probe)."""
    if getattr(model.config, "_attn_implementation", None) == PACKED_ATTENTION:
        model.set_attn_implementation("sdpa")
