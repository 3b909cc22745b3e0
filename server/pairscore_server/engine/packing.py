r"""Packed rows: sequences end to end in one row, prompts shared inside the row.

Padding a batch to its longest sequence computes positions that are thrown
away, and a prompt shared by several responses is computed once per pair.
A packed row does neither. It holds *trees*: a tree is a prompt P = p ⊕ x
and the responses scored on it; a pair whose prompt no other pair shares is
a tree without responses; identical pairs share one tree and one response
segment. Each segment of the row has its own position ids,
and attention runs segment by segment (:mod:`.packed_attention`), so no
token sees another tree and a response sees only its own prompt::

    row        | p  x1 x2 x3 | y1 y2 | y1'| p  x1' x2' | ...
    positions  | 0  1  2  3  | 4  5  | 4  | 0  1   2   |
    segment    | prompt A    | resp  |resp| lone pair B (no y: its last
    attends to | causal      | A, then causal | token is not an input)

The token shift of :mod:`.logprobs` holds segment by segment: prompt row
k < P-1 predicts prompt token k+1; the prompt's last row predicts every
response's y_1; response row k predicts y_{k+2}. A response's last token and
a lone pair's last token are targets only, never inputs. The scores of a
pair do not depend on what else is in its row, bit for bit on CPU: a pair
with a response is always laid out as prompt + response segments (B above
is a pair without y), the row is filled to a multiple of ROW_ALIGN
positions, and small GEMMs are padded (kernels.RowStableLinear); see
tests/test_engine_math.py and tests/test_smollm2.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tree:
    """A prompt (p ⊕ x ids) and the pairs scored on it.

    ``members`` are (pair index, response ids y_1..y_n). A lone pair is a
    tree whose prompt is its whole sequence and whose one member has no
    response ids.
    """

    prompt: tuple[int, ...]
    members: tuple[tuple[int, tuple[int, ...]], ...]

    @property
    def prompt_inputs(self) -> int:
        """Prompt tokens fed to the model: all of them if a response needs the
        last one's prediction, else all but the last (it is only a target)."""
        if any(response for _, response in self.members):
            return len(self.prompt)
        return len(self.prompt) - 1

    @property
    def size(self) -> int:
        """Token positions this tree takes in a row (a response given by several
        members, i.e. identical pairs, runs once)."""
        return self.prompt_inputs + sum(max(len(r) - 1, 0) for r in self.distinct_responses)

    @property
    def distinct_responses(self) -> set[tuple[int, ...]]:
        return {r for _, r in self.members}

    @property
    def reused_tokens(self) -> int:
        """Positions not computed again: the prompt for every member but one, and
        each repeated response (identical pairs) for every repeat."""
        everyone = len(self.prompt) * len(self.members) + sum(len(r) for _, r in self.members)
        return everyone - len(self.prompt) - sum(len(r) for r in self.distinct_responses)


def group_by_prompt(
    sequences: Sequence[Sequence[int]], prompt_lengths: Sequence[int]
) -> dict[tuple[int, ...], list[int]]:
    """Sequence indices by their prompt ids (the first ``prompt_lengths[i]``
    tokens of sequence i: prefix and prompt), in order of first appearance."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (seq, plen) in enumerate(zip(sequences, prompt_lengths, strict=True)):
        groups.setdefault(tuple(seq[:plen]), []).append(i)
    return groups


def build_trees(
    sequences: Sequence[Sequence[int]],
    prompt_lengths: Sequence[int],
    *,
    share_prompts: bool,
    capacity: int,
) -> list[Tree]:
    """One tree per distinct prompt (pairs sharing p ⊕ x exactly), else one per pair.

    With ``share_prompts`` every pair is a member of its prompt's tree, even a
    pair alone on its prompt: so a pair's attention calls, and its scores bit
    for bit, do not depend on what else is in the call.

    ``prompt_lengths[i]`` counts the prefix and the prompt of sequence i. A
    shared prompt whose responses do not fit ``capacity`` together is split
    into several trees, each with its own copy of the prompt.
    """
    if not share_prompts:
        return [Tree(tuple(s), ((i, ()),)) for i, s in enumerate(sequences)]
    trees: list[Tree] = []
    for prompt, indices in group_by_prompt(sequences, prompt_lengths).items():
        # A pair is laid out as prompt segment + response segment even when no
        # other pair shares its prompt: its numbers then go through the same
        # attention calls whether it is alone, duplicated or shares its prompt
        # (one causal segment over p ⊕ x ⊕ y rounds differently).
        members = sorted(((i, tuple(sequences[i][len(prompt) :])) for i in indices), key=lambda m: -len(m[1]))
        chunk: list[tuple[int, tuple[int, ...]]] = []
        used = len(prompt)
        for member in members:
            extra = max(len(member[1]) - 1, 0)
            if chunk and used + extra > capacity:
                trees.append(Tree(prompt, tuple(chunk)))
                chunk, used = [], len(prompt)
            chunk.append(member)
            used += extra
        trees.append(Tree(prompt, tuple(chunk)))
    return trees


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
    """Rows ``start:stop`` of a packed row, attending causally to themselves
    and, when ``context_stop > context_start``, first to all of the rows
    ``context_start:context_stop`` (their prompt). ``mask`` is that pattern
    as a boolean [queries x (context + queries)] matrix, built once per row."""

    start: int
    stop: int
    context_start: int = 0
    context_stop: int = 0
    mask: torch.Tensor | None = None


@dataclass(frozen=True)
class PackedRow:
    """Model inputs for one packed row, and where each pair's log-probs land."""

    input_ids: torch.Tensor  # [1, T] long
    position_ids: torch.Tensor  # [1, T] long
    segments: tuple[Segment, ...]
    score_rows: torch.Tensor  # [S] hidden rows that predict a scored token
    targets: torch.Tensor  # [S] the token each of them predicts
    # per pair: (pair index, prompt log-probs slice, response log-probs slice)
    pieces: tuple[tuple[int, int, int, int, int], ...]
    reused_tokens: int
    filler_tokens: int = 0  # positions of the filler segment (see ROW_ALIGN)

    @property
    def tokens(self) -> int:
        return self.input_ids.shape[1]

    def split(self, logprobs: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """Each pair's log-probs of tokens 1..L-1, from the row's scored log-probs."""
        return [
            (i, torch.cat([logprobs[a:b], logprobs[c:d]]) if d > c else logprobs[a:b])
            for i, a, b, c, d in self.pieces
        ]


#: Packed rows are filled up to a multiple of this many positions (a filler
#: segment, never scored). Elementwise kernels (RoPE's cos/sin, activations)
#: run vectorized except on the last elements of a tensor, which take a scalar
#: path that can round differently; with the row a multiple of 16 positions
#: no element of a [positions x width] tensor is left for it (for widths that
#: are even), whichever place a pair takes in the row.
ROW_ALIGN = 16


def pack_row(trees: Sequence[Tree], *, device: torch.device, align: int = 1) -> PackedRow:
    """Lay ``trees`` end to end in one row (see the module docstring), filled up to a
    multiple of ``align`` positions with a causal filler segment that is not scored."""
    ids: list[int] = []
    positions: list[int] = []
    segments: list[Segment] = []
    score_rows: list[int] = []
    targets: list[int] = []
    pieces: list[tuple[int, int, int, int, int]] = []
    for tree in trees:
        start, plen = len(ids), len(tree.prompt)
        n_inputs = tree.prompt_inputs
        ids += tree.prompt[:n_inputs]
        positions += range(n_inputs)
        if n_inputs:
            segments.append(Segment(start, start + n_inputs))
        prompt_lps = (len(targets), len(targets) + plen - 1)
        score_rows += range(start, start + plen - 1)
        targets += tree.prompt[1:]
        done: dict[tuple[int, ...], tuple[int, int]] = {}
        for pair, response in tree.members:
            if response in done:  # an identical pair: same log-probs, computed once
                pieces.append((pair, *prompt_lps, *done[response]))
                continue
            first = len(targets)
            if response:
                score_rows.append(start + plen - 1)  # the prompt's last row predicts y_1
                targets.append(response[0])
            if len(response) > 1:
                r_start = len(ids)
                ids += response[:-1]
                positions += range(plen, plen + len(response) - 1)
                segments.append(_response_segment(r_start, len(ids), start, start + plen, device))
                score_rows += range(r_start, len(ids))
                targets += response[1:]
            done[response] = (first, len(targets))
            pieces.append((pair, *prompt_lps, first, len(targets)))
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
        reused_tokens=sum(t.reused_tokens for t in trees),
        filler_tokens=filler if ids else 0,
    )


def _response_segment(start: int, stop: int, ctx_start: int, ctx_stop: int, device: torch.device) -> Segment:
    n, ctx = stop - start, ctx_stop - ctx_start
    mask = torch.ones(n, ctx + n, dtype=torch.bool, device=device)
    mask[:, ctx:] = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    return Segment(start, stop, ctx_start, ctx_stop, mask)
