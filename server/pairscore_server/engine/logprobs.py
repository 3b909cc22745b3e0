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
log-probs by a float32 log-softmax and a gather of the target column, so the
full [tokens x vocab] tensor is never materialised.

Rank and top-k (docs/scores.md): with a :class:`HeadDetail` the same chunks
also give each scored token's rank (1 + the number of vocabulary entries
whose float32 log-prob is strictly greater than the target's) and the k
largest log-probs with their ids, still one chunk at a time. The result is
then a float64 *detail matrix* [S x (2 + 2k)] instead of the [S] log-probs:
column 0 the log-prob (the same float32 value as without detail), column 1
the rank, then k ids and k log-probs (ids and ranks are exact in float64).
Every splitting and concatenation below works along dim 0, so the packed,
padded and shared-prompt paths carry either shape unchanged.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pairscore_server.engine.engine_limits import DEFAULT_CHUNK_BYTES
from pairscore_server.engine.interface import CausalLM
from pairscore_server.engine.packed_attention import SEGMENTS_KWARG
from pairscore_server.engine.packing import PackedRow, pack_row
from pairscore_server.engine.padding import Batch, make_batch, plan_padded_batches
from pairscore_server.engine.tries import Trie, build_tries, row_items


@dataclass(frozen=True)
class HeadDetail:
    """What the log-prob head computes beyond each target's log-prob: ``ranks``
    and the ``top_k`` most likely tokens (see the module docstring)."""

    ranks: bool = False
    top_k: int = 0

    @property
    def wanted(self) -> bool:
        return self.ranks or self.top_k > 0

    @property
    def columns(self) -> int:
        """Width of the detail matrix."""
        return 2 + 2 * self.top_k


#: No detail: the head returns the [S] float32 log-probs alone.
NO_DETAIL = HeadDetail()


def _chunked_target_logprobs(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: torch.nn.Module,
    chunk_rows: int,
    detail: HeadDetail = NO_DETAIL,
) -> torch.Tensor:
    """log_softmax(head(hidden))[targets] in float32 (float64 for a float64 model),
    ``chunk_rows`` rows at a time.

    One log-softmax kernel a chunk, reading the head's logits in the model's
    dtype and writing float32 (``log_softmax(dtype=)``: no float32 copy of the
    logits first; bf16: ~17 % faster than a copy and ``cross_entropy``, the same
    bits), then a gather of the target column (logsumexp and a gather were
    slower on CPU). With ``detail`` the same log-softmax gives ranks and
    top-k, and the result is the [S x detail.columns] float64 detail matrix.
    """
    rows = targets.shape[0]
    # float32, or float64 for a float64 model (reference-grade scores).
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    out = torch.empty(rows, dtype=dtype, device=hidden.device)
    extra = (
        torch.empty(rows, detail.columns, dtype=torch.float64, device=hidden.device)
        if detail.wanted
        else None
    )
    for start in range(0, rows, chunk_rows):
        stop = min(start + chunk_rows, rows)
        lps = torch.log_softmax(head(hidden[start:stop]), dim=-1, dtype=dtype)
        target = lps.gather(1, targets[start:stop, None])
        out[start:stop] = target[:, 0]
        if extra is not None:
            _chunk_detail(lps, target, detail, extra[start:stop])
    if extra is None:
        return out
    extra[:, 0] = out.double()
    return extra


def _chunk_detail(lps: torch.Tensor, target: torch.Tensor, detail: HeadDetail, into: torch.Tensor) -> None:
    """Fill columns 1.. of the detail matrix for one chunk of [rows x vocab] log-probs
    (``target``: each row's target column, [rows x 1])."""
    into[:, 1] = (lps > target).sum(dim=1).double() + 1  # ties share the better rank
    if detail.top_k:
        values, ids = lps.topk(detail.top_k, dim=1)
        into[:, 2 : 2 + detail.top_k] = ids.double()
        into[:, 2 + detail.top_k :] = values.double()


def _crop_to(cache, length: int) -> None:
    """Drop a key/value cache's positions after ``length`` (transformers 5's ``crop``
    takes how many to remove, as a negative number)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


class LogprobComputer:
    """Runs a causal LM on a batch and returns each sequence's scored-token log-probs.

    ``split_head=True`` runs the transformer body (``model.base_model``) and
    projects only the scored rows through ``model.get_output_embeddings()``.
    Models whose logits are more than that projection (soft-capping,
    scaling) must use ``split_head=False``: then the model's own logits are
    used, still turned into log-probs chunk by chunk in float32.
    :meth:`head_is_plain` tells which applies, and :meth:`use_full_logits`
    switches to the full-logits path.
    """

    def __init__(
        self, model: CausalLM, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES, split_head: bool = True
    ) -> None:
        self.model = model
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.chunk_rows = max(1, chunk_bytes // (4 * self.vocab_size))
        self.split_head = split_head
        # transformers 5.x renamed past_key_values to cache (argument and output).
        params = inspect.signature(model.base_model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def use_full_logits(self) -> None:
        """Use the model's own logits from now on (for heads that are not a plain projection)."""
        self.split_head = False

    def _hidden(self, batch: Batch) -> torch.Tensor:
        out = self.model.base_model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        )
        return out.last_hidden_state

    def _project(
        self, hidden: torch.Tensor, targets: torch.Tensor, detail: HeadDetail = NO_DETAIL
    ) -> torch.Tensor:
        return _chunked_target_logprobs(
            hidden, targets, self.model.get_output_embeddings(), self.chunk_rows, detail
        )

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
    def __call__(self, batch: Batch, detail: HeadDetail = NO_DETAIL) -> list[torch.Tensor]:
        """Float32 log-probs of tokens 1..L-1 of each sequence (see the diagram above);
        detail matrices with ``detail``."""
        rows = torch.cat(
            [
                torch.arange(length - 1) + b * batch.input_ids.shape[1]
                for b, length in enumerate(batch.lengths)
            ]
        ).to(self.device)
        targets = batch.input_ids.reshape(-1)[rows + 1]
        if self.split_head:
            hidden = self._hidden(batch)
            lps = self._project(hidden.reshape(-1, hidden.shape[-1])[rows], targets, detail)
        else:
            logits = self.model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
            ).logits
            logits = logits.reshape(-1, logits.shape[-1])[rows]
            lps = _chunked_target_logprobs(logits, targets, torch.nn.Identity(), self.chunk_rows, detail)
        return list(lps.split([length - 1 for length in batch.lengths]))

    @torch.inference_mode()
    def packed(self, row: PackedRow, detail: HeadDetail = NO_DETAIL) -> torch.Tensor:
        """Float32 log-probs of a packed row's scored tokens (layout in packing.py).

        Needs the model switched to packed attention (packed_attention.py).
        The all-ones attention mask keeps transformers from building a
        [T x T] mask that the segments make unnecessary.
        """
        hidden = self.model.base_model(
            input_ids=row.input_ids,
            attention_mask=torch.ones_like(row.input_ids),
            position_ids=row.position_ids,
            use_cache=False,
            **{SEGMENTS_KWARG: row.segments},
        ).last_hidden_state[0]
        return self._project(hidden[row.score_rows], row.targets, detail)

    @torch.inference_mode()
    def packing_agrees(self) -> bool:
        """Whether packed rows reproduce padded batches on a probe: a lone sequence
        and a prompt with two responses, packed into one row, against each
        sequence run alone. Catches models that drop the segments on the way
        to their attention function."""
        vocab = self.vocab_size
        lone = [(7 * k + 3) % vocab for k in range(9)]
        prompt = [(5 * k + 1) % vocab for k in range(6)]
        responses = [[(11 * k + 2) % vocab for k in range(5)], [(13 * k + 4) % vocab for k in range(3)]]
        singles = [lone, prompt + responses[0], prompt + responses[1]]
        tries = build_tries(singles, [len(lone), len(prompt), len(prompt)], min_shared=None)
        row = pack_row([item for t in tries for item in row_items(t, 10**9)], device=self.device)
        packed = dict(row.split(self.packed(row)))
        dtype = next(self.model.parameters()).dtype
        atol = 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2
        for i, seq in enumerate(singles):
            [alone] = self(make_batch([seq], pad_id=0, device=self.device))
            if not torch.allclose(packed[i].float(), alone.float(), atol=atol, rtol=0):
                return False
        return True

    @torch.inference_mode()
    def trie(
        self,
        trie: Trie,
        *,
        max_batch_tokens: int,
        min_efficiency: float = 0.0,
        detail: HeadDetail = NO_DETAIL,
    ) -> tuple[list[torch.Tensor], int]:
        """Score the sequences of a trie (tries.py), running each node once on a
        key/value cache of its ancestors.

        The root runs alone and keeps its cache; a node with children runs on
        its parent's cache (extending it, cropped back afterwards) and its
        children in turn; the leaves under one node run in padded batches on
        copies of that node's cache. Returns each node's block of log-probs
        (the root's tokens 1.., any other node's tokens 0..: its token 0 is
        predicted by the parent's last hidden state, as in the diagram above),
        so that a sequence's log-probs are its path's blocks end to end; and
        the token positions run through the model (padding included).
        """
        root = trie.nodes[0]
        batch = make_batch([root.tokens], pad_id=0, device=self.device)
        out = self.model.base_model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=True,
        )
        cache = getattr(out, "cache", None) or out.past_key_values
        hidden = out.last_hidden_state[0]
        blocks: list[torch.Tensor | None] = [None] * len(trie.nodes)
        blocks[0] = self._project(hidden[:-1], batch.input_ids[0, 1:], detail)
        positions = len(root.tokens) + self._children_on_cache(
            trie, 0, hidden[-1], cache, len(root.tokens), blocks, max_batch_tokens, min_efficiency, detail
        )
        return blocks, positions  # type: ignore[return-value]

    def _children_on_cache(
        self,
        trie: Trie,
        parent: int,
        last_hidden: torch.Tensor,
        cache,
        ctx_len: int,
        blocks: list[torch.Tensor | None],
        max_batch_tokens: int,
        min_efficiency: float,
        detail: HeadDetail,
    ) -> int:
        """Fill the blocks of ``parent``'s subtree below it; ``cache`` holds its
        ``ctx_len`` ancestors' and its own keys and values. Returns positions run."""
        device = self.device
        nodes = trie.nodes
        children = nodes[parent].children
        firsts = self._project(
            last_hidden[None].expand(len(children), -1),
            torch.tensor([nodes[c].tokens[0] for c in children], dtype=torch.long, device=device),
            detail,
        )
        for k, c in enumerate(children):
            blocks[c] = firsts[k : k + 1]
        positions = 0
        for c in children:
            node = nodes[c]
            if not node.children:
                continue
            n = len(node.tokens)
            hidden = self.model.base_model(
                input_ids=torch.tensor([node.tokens], dtype=torch.long, device=device),
                attention_mask=torch.ones(1, ctx_len + n, dtype=torch.long, device=device),
                position_ids=torch.arange(ctx_len, ctx_len + n, device=device)[None],
                use_cache=True,
                **{self._cache_arg: cache},
            ).last_hidden_state[0]
            targets = torch.tensor(node.tokens[1:], dtype=torch.long, device=device)
            blocks[c] = torch.cat([blocks[c], self._project(hidden[:-1], targets, detail)])  # type: ignore[list-item]
            positions += n + self._children_on_cache(
                trie, c, hidden[-1], cache, ctx_len + n, blocks, max_batch_tokens, min_efficiency, detail
            )
            _crop_to(cache, ctx_len)  # back to the parent's keys and values
        leaves = [c for c in children if len(nodes[c].tokens) > 1 and not nodes[c].children]
        lengths = [len(nodes[c].tokens) for c in leaves]
        for group in plan_padded_batches(lengths, max_tokens=max_batch_tokens, min_efficiency=min_efficiency):
            rows = self._responses_on_cache(cache, ctx_len, [nodes[leaves[j]].tokens for j in group], detail)
            positions += len(group) * lengths[group[0]]
            for j, lps in zip(group, rows, strict=True):
                c = leaves[j]
                blocks[c] = torch.cat([blocks[c], lps])  # type: ignore[list-item]
        return positions

    def _responses_on_cache(
        self, cache, p_len: int, responses: Sequence[Sequence[int]], detail: HeadDetail = NO_DETAIL
    ) -> list[torch.Tensor]:
        device = self.device
        batch = make_batch(responses, pad_id=0, device=device)
        width = batch.input_ids.shape[1]
        mask = torch.cat(
            [torch.ones(len(responses), p_len, dtype=torch.long, device=device), batch.attention_mask],
            dim=1,
        )
        if len(responses) > 1:
            group_cache = copy.deepcopy(cache)
            group_cache.batch_repeat_interleave(len(responses))
        else:
            group_cache = cache  # cropped back to the prompt below
        hidden = self.model.base_model(
            input_ids=batch.input_ids,
            attention_mask=mask,
            position_ids=batch.position_ids + p_len,
            use_cache=True,
            **{self._cache_arg: group_cache},
        ).last_hidden_state
        if group_cache is cache:
            _crop_to(cache, p_len)  # drop the response tokens: back to the prompt alone
        rows = torch.cat([torch.arange(length - 1) + b * width for b, length in enumerate(batch.lengths)]).to(
            device
        )
        targets = batch.input_ids.reshape(-1)[rows + 1]
        lps = self._project(hidden.reshape(-1, hidden.shape[-1])[rows], targets, detail)
        return list(lps.split([length - 1 for length in batch.lengths]))
