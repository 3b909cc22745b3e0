"""Right-padded batches: several sequences in one [B x T] batch, and which go together.

Sequences are right-padded to the longest with an attention mask and explicit
position ids 0..L-1, so real tokens never see padding (the numerics are in
:mod:`.logprobs`). The padded layout is CUDA's default; on CPU packed rows
(:mod:`.packing`) waste no positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Batch:
    """Right-padded model inputs for several sequences."""

    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] long, 1 = real token
    position_ids: torch.Tensor  # [B, T] long
    lengths: tuple[int, ...]

    @property
    def padded_tokens(self) -> int:
        return self.input_ids.numel()


def make_batch(sequences: Sequence[Sequence[int]], *, pad_id: int, device: torch.device) -> Batch:
    """Right-pad ``sequences`` (each at least one token) into one batch."""
    lengths = tuple(len(s) for s in sequences)
    width = max(lengths)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    positions = torch.arange(width, dtype=torch.long).expand(len(sequences), width)
    return Batch(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.contiguous().to(device),
        lengths=lengths,
    )


def plan_padded_batches(
    lengths: Sequence[int], *, max_tokens: int, min_efficiency: float = 0.0
) -> list[list[int]]:
    """Group sequence indices into right-padded batches, longest first.

    A batch closes when one more sequence would make rows x longest exceed
    ``max_tokens``, or push its padding efficiency (real tokens / padded
    tokens) below ``min_efficiency``. A sequence longer than the budget runs
    alone. On CPU, where padding is pure waste, a high ``min_efficiency``
    keeps batches to sequences of nearly equal length.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in order:
        if current:
            width = lengths[current[0]]
            padded = (len(current) + 1) * width
            if padded > max_tokens or (real + lengths[i]) < min_efficiency * padded:
                batches.append(current)
                current, real = [], 0
        current.append(i)
        real += lengths[i]
    if current:
        batches.append(current)
    return batches
