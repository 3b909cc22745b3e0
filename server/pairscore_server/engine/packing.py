r"""Packed rows: sequences end to end in one row, shared prefixes computed once.

Padding a batch to its longest sequence computes positions that are thrown
away, and a run of tokens that several sequences begin with (a few-shot
preamble, a system prompt, a prompt with several responses) is computed once
per pair. A packed row does neither. It holds *tries* over token ids: a
node is a run of tokens that every sequence below it begins with; it is
computed once and each child attends to its ancestors' keys and values and
then causally to itself. Sharing is decided on token ids, so it is exact by
construction. Each segment (the part of one node that is fed to the model)
has its own position ids, and attention runs segment by segment
(:mod:`.packed_attention`), so no token sees another trie::

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

Where the trie is cut (:func:`build_tries`): where sequences part after a
shared run of at least ``min_shared`` tokens (shorter runs are not worth an
extra attention call per layer), and at every pair's prompt end (p ⊕ x).
Identical prompts are always shared (whatever their length) and identical
sequences run once.

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

import torch

#: Fewest shared tokens worth a trie node below a whole prompt (identical
#: prompts are shared at any length). A node costs one more attention call
#: and key/value concatenation per layer; measured in docs/performance.md.
MIN_SHARED_TOKENS = 16


@dataclass(frozen=True)
class Node:
    """A run of token ids at positions ``depth .. depth + len(tokens) - 1`` of every
    sequence below it; ``parent`` is -1 for a root."""

    tokens: tuple[int, ...]
    depth: int
    parent: int
    children: tuple[int, ...]

    @property
    def inputs(self) -> int:
        """Tokens fed to the model: all if a child needs the last one's prediction,
        else all but the last (it is a target only)."""
        return len(self.tokens) if self.children else len(self.tokens) - 1


@dataclass(frozen=True)
class Member:
    """A distinct sequence of the trie: the indices of the sequences equal to it
    (identical pairs run once) and its path of node ids, root first."""

    indices: tuple[int, ...]
    path: tuple[int, ...]
    length: int


@dataclass(frozen=True)
class Trie:
    """Nodes in depth-first preorder (node 0 is the root) and the sequences they make."""

    nodes: tuple[Node, ...]
    members: tuple[Member, ...]

    @property
    def size(self) -> int:
        return sum(n.inputs for n in self.nodes)

    @property
    def sequences(self) -> int:
        return sum(len(m.indices) for m in self.members)


class _Building:
    """A mutable node while a trie is built: tokens are ``seq[start:stop]``."""

    __slots__ = ("seq", "start", "stop", "parent", "children")

    def __init__(self, seq: tuple[int, ...], start: int, stop: int, parent: _Building | None) -> None:
        self.seq, self.start, self.stop, self.parent = seq, start, stop, parent
        self.children: list[_Building] = []


def _shared_depth(
    a: tuple[int, ...], b: tuple[int, ...], a_prompts: set[int], b_prompts: set[int], min_shared: int | None
) -> int:
    """How many leading tokens two adjacent (sorted) sequences may share: their common
    run if it reaches ``min_shared``, else their prompt if it is the same, else none."""
    n = min(len(a), len(b))
    lcp = 0
    while lcp < n and a[lcp] == b[lcp]:
        lcp += 1
    if min_shared is not None and lcp >= min_shared:
        return lcp
    common = [q for q in a_prompts & b_prompts if q <= lcp]
    return max(common, default=0)


def build_tries(
    sequences: Sequence[Sequence[int]],
    prompt_lengths: Sequence[int],
    *,
    share_prompts: bool = True,
    min_shared: int | None = MIN_SHARED_TOKENS,
    cut_prompts: bool = True,
) -> list[Trie]:
    """The tries of ``sequences`` (each at least one token, the prefix p first).

    ``prompt_lengths[i]`` counts p and the prompt of sequence i. Sequences
    share a node when their common leading run is at least ``min_shared``
    tokens (``None``: never below a whole prompt), or when their prompts are
    identical (a sequence whose prompt is shorter than ``min_shared`` shares
    only with sequences of the same prompt). ``cut_prompts`` also cuts every
    sequence at its prompt end, so
    that a pair alone is laid out as prompt + response (batch invariance).
    Without ``share_prompts`` each sequence is a one-node trie.
    """
    if not share_prompts:
        return [
            Trie((Node(tuple(s), 0, -1, ()),), (Member((i,), (0,), len(s)),)) for i, s in enumerate(sequences)
        ]
    distinct: dict[tuple[int, ...], tuple[list[int], set[int]]] = {}
    for i, (seq, plen) in enumerate(zip(sequences, prompt_lengths, strict=True)):
        entry = distinct.setdefault(tuple(seq), ([], set()))
        entry[0].append(i)
        entry[1].add(plen)

    # Sorted, sequences that may share come next to each other. A prompt shorter than
    # min_shared is shared only whole, so such sequences sort among those with the
    # same prompt (else other prompts that begin with it would come between them).
    def group(seq: tuple[int, ...]) -> tuple[int, ...]:
        plen = min(distinct[seq][1])
        return seq[:plen] if min_shared is None or plen < min_shared else ()

    order = sorted(distinct, key=lambda seq: (group(seq), seq))
    # A stack walk over the sorted sequences and the depth each may share with the
    # one before it: the stack holds the previous sequence's path; a sequence hangs
    # below the node holding its last shared token, which is split where they part.
    roots: list[_Building] = []
    end: dict[tuple[int, ...], _Building] = {}
    stack: list[_Building] = []
    previous: tuple[int, ...] = ()
    for seq in order:
        shared = 0
        if previous and group(previous) == group(seq):
            shared = _shared_depth(previous, seq, distinct[previous][1], distinct[seq][1], min_shared)
        previous = seq
        while stack and stack[-1].start >= shared:
            stack.pop()
        parent: _Building | None = None
        if stack:
            parent = stack[-1]
            if parent.stop > shared:  # parts inside this node
                parent = _split(parent, shared, roots)
                stack[-1] = parent
        leaf = _Building(seq, shared, len(seq), parent)
        (parent.children if parent is not None else roots).append(leaf)
        stack.append(leaf)
        end[seq] = leaf
    if cut_prompts:
        for seq, (_, prompts) in distinct.items():
            for plen in prompts:
                node: _Building | None = end[seq]
                while node is not None and node.start >= plen:
                    node = node.parent
                if node is not None and node.stop > plen:
                    _split(node, plen, roots)
    return _freeze(roots, distinct, end)


def _split(node: _Building, depth: int, roots: list[_Building]) -> _Building:
    """Cut ``node`` at ``depth``: a new upper node takes ``node``'s place and the tokens
    before ``depth``; ``node`` keeps the rest, its children and the sequences ending in
    it. Returns the upper node."""
    upper = _Building(node.seq, node.start, depth, node.parent)
    siblings = node.parent.children if node.parent is not None else roots
    siblings[siblings.index(node)] = upper
    upper.children = [node]
    node.parent = upper
    node.start = depth
    return upper


def _freeze(
    roots: list[_Building],
    distinct: dict[tuple[int, ...], tuple[list[int], set[int]]],
    end: dict[tuple[int, ...], _Building],
) -> list[Trie]:
    ids: dict[int, tuple[int, int]] = {}  # id(node) -> (trie, index in preorder)
    flats: list[list[_Building]] = []
    for t, root in enumerate(roots):
        flat: list[_Building] = []
        todo = [root]
        while todo:
            node = todo.pop()
            ids[id(node)] = (t, len(flat))
            flat.append(node)
            todo.extend(reversed(node.children))
        flats.append(flat)
    members: list[list[Member]] = [[] for _ in roots]
    for seq, at in end.items():
        path = []
        walk: _Building | None = at
        while walk is not None:
            path.append(ids[id(walk)][1])
            walk = walk.parent
        members[ids[id(at)][0]].append(Member(tuple(distinct[seq][0]), tuple(reversed(path)), len(seq)))
    tries = []
    for flat, mine in zip(flats, members, strict=True):
        nodes = tuple(
            Node(
                tuple(n.seq[n.start : n.stop]),
                n.start,
                ids[id(n.parent)][1] if n.parent is not None else -1,
                tuple(ids[id(c)][1] for c in n.children),
            )
            for n in flat
        )
        tries.append(Trie(nodes, tuple(sorted(mine, key=lambda m: m.indices[0]))))
    return sorted(tries, key=lambda t: t.members[0].indices[0])


@dataclass(frozen=True)
class RowItem:
    """What one row holds of a trie: ``nodes`` (preorder, closed under ancestors)
    and the ``members`` (indices into ``trie.members``) whose log-probs it gives.
    A trie too large for a row is split into several items, each with its own
    copy of the ancestors they share."""

    trie: Trie
    nodes: tuple[int, ...]
    members: tuple[int, ...]
    #: positions each node of ``nodes`` takes: its last token is an input only
    #: when a child of it is in the item
    inputs: tuple[int, ...]

    @property
    def size(self) -> int:
        return sum(self.inputs)

    @property
    def reused_tokens(self) -> int:
        """Positions not computed again: every sequence's tokens, less the item's nodes."""
        members = self.trie.members
        everyone = sum(members[m].length * len(members[m].indices) for m in self.members)
        return everyone - sum(len(self.trie.nodes[i].tokens) for i in self.nodes)


def row_items(trie: Trie, capacity: int) -> list[RowItem]:
    """``trie`` as items of at most ``capacity`` positions where it can be cut: children
    that do not fit beside their ancestors go to further items, first fit, largest
    first, each with a copy of the ancestors. A node too large alone stays whole."""
    nodes = trie.nodes
    subtree = [n.inputs for n in nodes]
    for i in range(len(nodes) - 1, -1, -1):  # children come after their parent in preorder
        for c in nodes[i].children:
            subtree[i] += subtree[c]
    groups: list[list[int]] = []

    def below(i: int) -> list[int]:
        out, todo = [], [i]
        while todo:
            j = todo.pop()
            out.append(j)
            todo.extend(nodes[j].children)
        return out

    todo: list[tuple[int, list[int], int]] = [(0, [], 0)]  # (node, ancestors, their positions)
    while todo:
        i, path, cost = todo.pop()
        if cost + subtree[i] <= capacity or not nodes[i].children:
            groups.append(path + below(i))
            continue
        path, cost = [*path, i], cost + len(nodes[i].tokens)
        open_: list[tuple[list[int], int]] = []
        for c in sorted(nodes[i].children, key=lambda c: -subtree[c]):
            if cost + subtree[c] > capacity:
                todo.append((c, path, cost))
                continue
            for k, (chosen, used) in enumerate(open_):
                if used + subtree[c] <= capacity:
                    chosen.append(c)
                    open_[k] = (chosen, used + subtree[c])
                    break
            else:
                open_.append(([c], cost + subtree[c]))
        groups += [path + [j for c in chosen for j in below(c)] for chosen, _ in open_]
    owner: dict[int, int] = {}
    for g, group in enumerate(groups):
        for j in group:
            owner.setdefault(j, g)
    mine: list[list[int]] = [[] for _ in groups]
    for m, member in enumerate(trie.members):
        mine[owner[member.path[-1]]].append(m)
    items = []
    for group, ms in zip(groups, mine, strict=True):
        included = set(group)
        order = tuple(sorted(included))
        inputs = tuple(
            len(nodes[j].tokens) - (0 if any(c in included for c in nodes[j].children) else 1) for j in order
        )
        items.append(RowItem(trie, order, tuple(ms), inputs))
    return items


def group_by_prompt(
    sequences: Sequence[Sequence[int]], prompt_lengths: Sequence[int]
) -> dict[tuple[int, ...], list[int]]:
    """Sequence indices by their prompt ids (the first ``prompt_lengths[i]``
    tokens of sequence i: prefix and prompt), in order of first appearance."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (seq, plen) in enumerate(zip(sequences, prompt_lengths, strict=True)):
        groups.setdefault(tuple(seq[:plen]), []).append(i)
    return groups


def plan_rows(sizes: Sequence[int], *, capacity: int) -> list[list[int]]:
    """First-fit decreasing: item indices grouped into rows of at most ``capacity``
    positions. An item larger than the capacity gets a row of its own; items
    of size 0 are left out."""
    order = sorted((i for i in range(len(sizes)) if sizes[i] > 0), key=lambda i: -sizes[i])
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        for r, room in enumerate(free):
            if sizes[i] <= room:
                rows[r].append(i)
                free[r] -= sizes[i]
                break
        else:
            rows.append([i])
            free.append(capacity - sizes[i])
    return rows


@dataclass(frozen=True)
class Segment:
    """Rows ``start:stop`` of a packed row, attending first to all of the rows in
    ``context`` (their ancestors' ``(start, stop)`` ranges, in order) and then
    causally to themselves. ``mask`` is that pattern as a boolean
    [queries x (context + queries)] matrix, None without context."""

    start: int
    stop: int
    context: tuple[tuple[int, int], ...] = ()
    mask: torch.Tensor | None = None


@dataclass(frozen=True)
class PackedRow:
    """Model inputs for one packed row, and where each sequence's log-probs land."""

    input_ids: torch.Tensor  # [1, T] long
    position_ids: torch.Tensor  # [1, T] long
    segments: tuple[Segment, ...]
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
    segments: list[Segment] = []
    score_rows: list[int] = []
    targets: list[int] = []
    pieces: list[tuple[int, tuple[tuple[int, int], ...]]] = []
    for item in items:
        nodes = item.trie.nodes
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
                segments.append(_segment(start, start + n, context[i], device))
        for m in item.members:
            member = item.trie.members[m]
            slices = tuple(blocks[i] for i in member.path)
            pieces += [(i, slices) for i in member.indices]
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


def _segment(start: int, stop: int, context: tuple[tuple[int, int], ...], device: torch.device) -> Segment:
    if not context:
        return Segment(start, stop)
    n, ctx = stop - start, sum(b - a for a, b in context)
    mask = torch.ones(n, ctx + n, dtype=torch.bool, device=device)
    mask[:, ctx:] = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    return Segment(start, stop, context, mask)
