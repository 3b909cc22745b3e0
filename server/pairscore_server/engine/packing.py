r"""Packed rows: the nodes of tries (:mod:`.tries`) end to end in one row, as model inputs.

Each segment (the part of one node that is fed to the model) has its own position ids,
and attention runs segment by segment (:mod:`.packed_attention`), so no token sees
another trie::

    row        | p  s1 s2 s3 | x1 x2 | y1 y2 | x1'| y1'| p  z1  z2 | ...
    positions  | 0  1  2  3  | 4  5  | 6  7  | 4  | 5  | 0  1   2  |
    node       | shared run  | prompt| resp  |... | ...| lone pair (last
    attends to | causal      | run, then causal (its ancestors first) | token not an input)

The token shift of :mod:`.logprobs` holds node by node: row k of a node
predicts the node's token k+1; a node's last row predicts the first token of
each of its children (the parent's last token is always an input). A
sequence's last token is a target only, never an input, so a leaf node feeds
all its tokens but the last. A sequence's log-probs are its path's node
blocks end to end.

Batch invariance: a pair that shares no run of ``min_shared`` tokens with
its batch mates, beyond its whole prompt, is laid out as prompt + response
segments whatever else is in the call, and its scores are bit for bit the
same as alone (the row is filled to a multiple of ROW_ALIGN positions, small
GEMMs are padded: kernels.RowStableLinear). A pair whose sequence is cut
elsewhere by a batch mate runs its attention as two or more calls, which
rounds differently: its scores then move by float32 attention rounding only
(measured bound in tests/test_engine_math.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from pairscore_server.engine.tries import RowItem


@dataclass(frozen=True)
class Segment:
    """Rows ``start:stop`` of a packed row and the rows they attend to: with no
    ``keys``, causally to themselves (a trie's root); else to the rows of ``keys``
    (``(start, stop)`` ranges, in order) as the boolean [queries x keys] ``mask`` says.
    One node: its ancestors' rows, then its own rows causally. Several nodes of one
    trie (:func:`attention_groups`): each query its own node's pattern, in one call."""

    start: int
    stop: int
    keys: tuple[tuple[int, int], ...] = ()
    mask: torch.Tensor | None = None


@dataclass(frozen=True)
class SegmentBatch:
    """Single-node calls of one shape run as one batched SDPA call: call i's queries
    are rows ``queries[i]`` ([m x n]), its keys rows ``keys[i]`` ([m x k]), all with
    ``mask`` ([n x k]: the ancestors' rows, then its own causally). Each call of the
    batch computes bit for bit what it computes alone (the kernel blocks by its
    lengths, not by the batch), so a pair's scores do not depend on how many calls
    of its shape its batch mates bring; it saves a concatenation and a kernel call a
    node and layer (four short answers to one prompt: four calls)."""

    queries: torch.Tensor
    keys: torch.Tensor
    mask: torch.Tensor


class NodeRows(NamedTuple):
    """Where one node's inputs lie in a row, ``start:stop``, and its ancestors' rows."""

    start: int
    stop: int
    context: tuple[tuple[int, int], ...]


#: Nodes of one trie below a shared run (few-shot exemplars, a system prompt) that lie
#: next to each other in a row run their attention as one call (:func:`attention_groups`)
#: while the call's [queries x keys] square stays within this factor of the nodes' own
#: blocks, plus GROUP_SLACK_SCORES a node: one call a node and layer was most of the
#: time of a call of many short continuations (docs/performance.md).
GROUP_WASTE = 1.5
GROUP_SLACK_SCORES = 2048


@dataclass(frozen=True)
class PackedRow:
    """Model inputs for one packed row, and where each sequence's log-probs land."""

    input_ids: torch.Tensor  # [1, T] long
    position_ids: torch.Tensor  # [1, T] long
    segments: tuple[Segment | SegmentBatch, ...]
    score_rows: torch.Tensor  # [S] hidden rows that predict a scored token
    targets: torch.Tensor  # [S] the token each of them predicts
    # per sequence: (sequence index, slices of the scored log-probs, end to end)
    pieces: tuple[tuple[int, tuple[tuple[int, int], ...]], ...]
    reused_tokens: int
    filler_tokens: int = 0  # positions of the filler segment (see ROW_ALIGN)

    @property
    def tokens(self) -> int:
        return self.input_ids.shape[1]

    def split(self, logprobs: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """Each sequence's log-probs of tokens 1..L-1, from the row's scored log-probs."""
        out = []
        for i, slices in self.pieces:
            parts = [logprobs[a:b] for a, b in slices if b > a]
            out.append((i, torch.cat(parts) if len(parts) > 1 else parts[0] if parts else logprobs[:0]))
        return out


#: Packed rows are filled up to a multiple of this many positions (a filler
#: segment, never scored). Elementwise kernels (RoPE's cos/sin, activations)
#: run vectorized except on the last elements of a tensor, which take a scalar
#: path that can round differently; with the row a multiple of 16 positions
#: no element of a [positions x width] tensor is left for it (for widths that
#: are even), whichever place a pair takes in the row.
ROW_ALIGN = 16


def pack_row(items: Sequence[RowItem], *, device: torch.device, align: int = 1) -> PackedRow:
    """Lay ``items`` end to end in one row (see the module docstring), filled up to a
    multiple of ``align`` positions with a causal filler segment that is not scored."""
    ids: list[int] = []
    positions: list[int] = []
    score_rows: list[int] = []
    targets: list[int] = []
    pieces: list[tuple[int, tuple[tuple[int, int], ...]]] = []
    nodes_of_row: list[tuple[NodeRows, bool]] = []
    for item in items:
        nodes = item.trie.nodes
        lone = _lone_responses(item)
        where: dict[int, tuple[int, int]] = {}  # node -> its rows
        blocks: dict[int, tuple[int, int]] = {}  # node -> its tokens' scored log-probs
        context: dict[int, tuple[tuple[int, int], ...]] = {}  # node -> its ancestors' rows
        for i, n in zip(item.nodes, item.inputs, strict=True):
            node = nodes[i]
            start = len(ids)
            ids += node.tokens[:n]
            positions += range(node.depth, node.depth + n)
            where[i] = (start, start + n)
            first = len(targets)
            if node.parent >= 0:
                parent_rows = where[node.parent]
                score_rows.append(parent_rows[1] - 1)  # the parent's last row predicts token 0
                targets.append(node.tokens[0])
                context[i] = _merged(context[node.parent], parent_rows)
            else:
                context[i] = ()
            score_rows += range(start, start + len(node.tokens) - 1)
            targets += node.tokens[1:]
            blocks[i] = (first, len(targets))
            if n:
                nodes_of_row.append(
                    (NodeRows(start, start + n, context[i]), node.parent >= 0 and i not in lone)
                )
        for m in item.members:
            member = item.trie.members[m]
            slices = tuple(blocks[i] for i in member.path)
            pieces += [(i, slices) for i in member.indices]
    segments = attention_groups(nodes_of_row, device)
    filler = -len(ids) % align
    if filler and ids:
        segments.append(Segment(len(ids), len(ids) + filler))
        ids += [ids[0]] * filler
        positions += range(filler)
    return PackedRow(
        input_ids=torch.tensor([ids], dtype=torch.long).to(device),
        position_ids=torch.tensor([positions], dtype=torch.long).to(device),
        segments=tuple(segments),
        score_rows=torch.tensor(score_rows, dtype=torch.long).to(device),
        targets=torch.tensor(targets, dtype=torch.long).to(device),
        pieces=tuple(pieces),
        reused_tokens=sum(t.reused_tokens for t in items),
        filler_tokens=filler if ids else 0,
    )


def _merged(ranges: tuple[tuple[int, int], ...], more: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    """``ranges`` followed by ``more``, adjacent ranges joined."""
    if ranges and ranges[-1][1] == more[0]:
        return (*ranges[:-1], (ranges[-1][0], more[1]))
    return (*ranges, more)


def _lone_responses(item: RowItem) -> set[int]:
    """The response nodes of the item's pairs laid out as alone (prompt + response:
    the trie's root is the whole prompt, the response a leaf below it). They keep
    their own attention call, so their scores stay bit for bit the same as alone."""
    nodes = item.trie.nodes
    lone = set()
    for m in item.members:
        member = item.trie.members[m]
        if len(member.path) == 2:
            root, leaf = member.path
            if len(nodes[root].tokens) == member.prompt_length and not nodes[leaf].children:
                lone.add(leaf)
    return lone


def attention_groups(
    nodes: Sequence[tuple[NodeRows, bool]], device: torch.device
) -> list[Segment | SegmentBatch]:
    """The attention calls of a row's nodes (each its rows and whether it is
    groupable, in row order). A root attends causally to itself; any other node to
    its ancestors' rows, then causally to itself, in a call of its own, or, when
    groupable (below a shared run, not laid out as alone), with the groupable nodes
    after it that have the same root, while the call stays within GROUP_WASTE of their
    own blocks (plus GROUP_SLACK_SCORES a node). Grouping rounds attention differently
    (keys in other places of the call), as sharing a run below the prompt already does.
    The nodes left with a call of their own run batched by shape (:class:`SegmentBatch`)."""
    out: list[Segment | SegmentBatch] = []
    alone: dict[tuple[int, int], list[NodeRows]] = {}
    group: list[NodeRows] = []
    own_scores = 0

    def close() -> None:
        if len(group) == 1:
            start, stop, context = node = group[0]
            alone.setdefault((stop - start, sum(b - a for a, b in context)), []).append(node)
        elif group:
            out.append(_grouped(group, device))
        group.clear()

    for node, groupable in nodes:
        start, stop, context = node
        if not context:
            close()
            out.append(Segment(start, stop))
            continue
        scores = (stop - start) * (stop - start + sum(b - a for a, b in context))
        if group and groupable and context[0][0] == group[0].context[0][0]:
            trial = [*group, node]
            width = sum(b - a for a, b in _union(trial))
            if (stop - group[0].start) * width <= GROUP_WASTE * (
                own_scores + scores
            ) + GROUP_SLACK_SCORES * len(trial):
                group.append(node)
                own_scores += scores
                continue
        close()
        group.append(node)
        own_scores = scores
        if not groupable:
            close()
    close()
    out += [_batch_of_calls(calls, device) for calls in alone.values()]
    return out


def _union(group: Sequence[NodeRows]) -> tuple[tuple[int, int], ...]:
    """The rows any node of ``group`` attends to, as sorted, merged ranges."""
    ranges = sorted(r for start, stop, context in group for r in (*context, (start, stop)))
    merged: list[tuple[int, int]] = []
    for a, b in ranges:
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
        else:
            merged.append((a, b))
    return tuple(merged)


def _batch_of_calls(calls: Sequence[NodeRows], device: torch.device) -> SegmentBatch:
    """Single-node calls of one shape (``n`` own rows after ``ctx`` ancestors' rows) as
    one batch: each its ancestors' rows, then its own rows causally."""
    start, stop, context = calls[0]
    n, ctx = stop - start, sum(b - a for a, b in context)
    mask = torch.ones(n, ctx + n, dtype=torch.bool)
    mask[:, ctx:] = torch.ones(n, n, dtype=torch.bool).tril()
    queries = [list(range(a, b)) for a, b, _ in calls]
    keys = [[k for x, y in (*c, (a, b)) for k in range(x, y)] for a, b, c in calls]
    return SegmentBatch(
        torch.tensor(queries, dtype=torch.long).to(device),
        torch.tensor(keys, dtype=torch.long).to(device),
        mask.to(device),
    )


def _grouped(group: Sequence[NodeRows], device: torch.device) -> Segment:
    """Consecutive nodes' calls as one: each query sees its own node's ancestors and,
    causally, its own node's rows, among the union of the keys."""
    keys = _union(group)
    key_rows = torch.cat([torch.arange(a, b) for a, b in keys])
    first, last = group[0].start, group[-1].stop
    query_rows = torch.arange(first, last)
    mask = torch.zeros(last - first, len(key_rows), dtype=torch.bool)
    for start, stop, context in group:
        seen = torch.zeros(len(key_rows), dtype=torch.bool)
        for a, b in context:
            seen |= (key_rows >= a) & (key_rows < b)
        own = (key_rows >= start) & (key_rows[None, :] <= query_rows[start - first : stop - first, None])
        mask[start - first : stop - first] = seen | own
    return Segment(first, last, keys, mask.to(device))
