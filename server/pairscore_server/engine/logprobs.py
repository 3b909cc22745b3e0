r"""One batched forward pass -> the log-probability of every scored token.

The token shift
---------------

A causal LM's output at position i is its prediction for the token at
position i + 1. For one sequence of L tokens t_0 = p (the prefix), t_1..t_m
(prompt), t_m+1..t_L-1 (response)::

    position i           0     1     2    ...   m      m+1   ...  L-2     L-1
    input token t_i      p     x_1   x_2  ...   x_m    y_1   ...  y_n-1   y_n
    hidden h_i predicts  x_1   x_2   x_3  ...   y_1    y_2   ...  y_n     (unused)
                         \_______ prompt _____/ \________ response _______/

    logprob(t_j) = log_softmax(head(h_{j-1}))[t_j]          for j = 1 .. L-1

so ``targets = ids[1:]`` and ``hidden = h[:-1]``: scored token k (0-based,
prefix excluded) reads hidden row k. Rows 0..m-1 give the prompt's m
log-probs, rows m..L-2 the response's n. The last hidden state (and every
padded position) is never projected.

Numerics: rows of several sequences are right-padded into one batch with an
attention mask and explicit position ids 0..L-1, so real tokens never see
padding and a sequence's scores do not depend on its neighbours. Only the
rows that are scored go through the output layer, in chunks whose
[rows x vocab] float32 logits fit ``chunk_bytes``; each chunk is turned into
log-probs with a float32 logsumexp and a gather of the target column, so the
full [tokens x vocab] tensor is never materialised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

#: Default memory for one chunk of float32 logits.
DEFAULT_CHUNK_BYTES = 64 * 2**20


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


def _chunked_target_logprobs(
    hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, chunk_rows: int
) -> torch.Tensor:
    """log_softmax(head(hidden))[targets] in float32, ``chunk_rows`` rows at a time."""
    out = torch.empty(targets.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, targets.shape[0], chunk_rows):
        stop = min(start + chunk_rows, targets.shape[0])
        logits = head(hidden[start:stop]).float()
        lse = torch.logsumexp(logits, dim=-1)
        picked = logits.gather(1, targets[start:stop, None]).squeeze(1)
        out[start:stop] = picked - lse
    return out


class LogprobComputer:
    """Runs a causal LM on a batch and returns each sequence's scored-token log-probs.

    ``split_head=True`` runs the transformer body (``model.base_model``) and
    projects only the scored rows through ``model.get_output_embeddings()``.
    Models whose logits are more than that projection (soft-capping,
    scaling) must use ``split_head=False``: then the model's own logits are
    used, still turned into log-probs chunk by chunk in float32.
    :meth:`head_is_plain` tells which applies.
    """

    def __init__(self, model: torch.nn.Module, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 split_head: bool = True) -> None:
        self.model = model
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.chunk_rows = max(1, chunk_bytes // (4 * self.vocab_size))
        self.split_head = split_head

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _hidden(self, batch: Batch) -> torch.Tensor:
        out = self.model.base_model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        )
        return out.last_hidden_state

    @torch.inference_mode()
    def head_is_plain(self) -> bool:
        """Whether head(base_model(x)) reproduces the model's logits on a probe input."""
        ids = torch.arange(1, 9, device=self.device).remainder(self.vocab_size)[None]
        batch = make_batch([ids[0].tolist()], pad_id=0, device=self.device)
        full = self.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        ).logits.float()
        split = self.model.get_output_embeddings()(self._hidden(batch)).float()
        return bool(torch.allclose(full, split, rtol=1e-3, atol=1e-3))

    @torch.inference_mode()
    def __call__(self, batch: Batch) -> list[torch.Tensor]:
        """Float32 log-probs of tokens 1..L-1 of each sequence (see the diagram above)."""
        rows = torch.cat(
            [torch.arange(length - 1) + b * batch.input_ids.shape[1]
             for b, length in enumerate(batch.lengths)]
        ).to(self.device)
        targets = batch.input_ids.reshape(-1)[rows + 1]
        if self.split_head:
            hidden = self._hidden(batch)
            hidden = hidden.reshape(-1, hidden.shape[-1])[rows]
            lps = _chunked_target_logprobs(
                hidden, targets, self.model.get_output_embeddings(), self.chunk_rows
            )
        else:
            logits = self.model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
            ).logits
            logits = logits.reshape(-1, logits.shape[-1])[rows]
            lps = _chunked_target_logprobs(logits, targets, torch.nn.Identity(), self.chunk_rows)
        return list(lps.split([length - 1 for length in batch.lengths]))
