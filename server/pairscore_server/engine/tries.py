r"""Tries over token ids: which runs of tokens a batch computes once, and what goes in a row.

Padding a batch to its longest sequence computes positions that are thrown
away, and a run of tokens that several sequences begin with (a few-shot
preamble, a system prompt, a prompt with several responses) is computed once
per pair. A packed row does neither. It holds *tries* over token ids: a
node is a run of tokens that every sequence below it begins with; it is
computed once and each child attends to its ancestors' keys and values and
then causally to itself. Sharing is decided on token ids, so it is exact by
construction. How a row lays the nodes out and how they attend:
:mod:`.packing` and :mod:`.packed_attention`.

Where the trie is cut (:func:`build_tries`): where sequences part after a
shared run of at least ``min_shared`` tokens (shorter runs are not worth an
extra attention call per layer), and at every pair's prompt end (p ⊕ x).
Identical prompts are always shared (whatever their length) and identical
sequences run once.

This module plans on ids only (no torch): tries, the items a row holds
(:func:`row_items`) and rows of items (:func:`plan_rows`); the size of a
call as its sequences are added (what the batcher closes batches by) is
:mod:`.call_size`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
    #: its prefix and prompt (the shortest, when identical sequences have several)
    prompt_length: int = 0


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


def _common_run(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """The length of the run of ids ``a`` and ``b`` begin with (slice comparisons run in C)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def shared_depth(
    a: tuple[int, ...], b: tuple[int, ...], a_prompts: set[int], b_prompts: set[int], min_shared: int | None
) -> int:
    """How many leading tokens two adjacent (sorted) sequences may share: their common
    run if it reaches ``min_shared``, else their prompt if it is the same, else none."""
    lcp = _common_run(a, b)
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
            Trie((Node(tuple(s), 0, -1, ()),), (Member((i,), (0,), len(s), plen),))
            for i, (s, plen) in enumerate(zip(sequences, prompt_lengths, strict=True))
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
            shared = shared_depth(previous, seq, distinct[previous][1], distinct[seq][1], min_shared)
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
        indices, prompts = distinct[seq]
        members[ids[id(at)][0]].append(Member(tuple(indices), tuple(reversed(path)), len(seq), min(prompts)))
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
