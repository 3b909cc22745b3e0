"""Fair queueing between requests: which queued pair a batch takes next.

A pure data structure (no asyncio, no model, no clock): the
:class:`~pairscore_server.batcher.Batcher` puts each request's pairs in as one
*lane* and, while it fills a batch, asks :meth:`FairQueue.peek` for the next
pair and :meth:`FairQueue.take` to take it.

**The rule** (fair share of model work, in tokens: each pair's
``work_tokens``; "least served first", a deficit round-robin without rounds):

1. Each request with queued pairs is a lane: its pairs in request order, and
   ``served``, the tokens taken from it so far, counted from the level it
   joined at.
2. A request joins at the level of the least-served lane still queued (when
   none is, at the level the last pair was taken at): no credit for the time
   it was not queued, no debt for the work done before it came.
3. The next pair comes from the lane with the least ``served``. Among lanes
   tied at that level, the oldest that has a pair sharing a group key with the
   batch being formed wins, else the oldest lane (arrival order).
4. From that lane: its first pair, among its next :data:`GROUP_LOOKAHEAD`,
   that shares a group key with the batch; else its oldest pair.

**What it guarantees.** Say request B joins with W tokens, and N other
requests have pairs queued at some time before B's last pair is taken (those
queued when it joins, and those that come later: they join at a level no
lower), the largest pair of any of them having M tokens. Another lane is
taken from only while its ``served`` is at most B's, and B's stays below its
join level plus W until its last pair is taken; so before that, each other
request gets at most W + M tokens taken: B's pairs are all taken within
(N + 1) x W + N x M tokens of work, however much the others have queued. With one giant request ahead, that is about twice B's own work plus
one pair: B's pairs go into the next batch formed after it arrives if that
batch has room for so much (``max_batch_pairs``, the engine's call budget),
else into the one after; B waits for the batch already in the model and about
one more, not for the giant request.

Grouping (issue 15): pairs whose first token ids are the same (a shared
system prompt, few-shot exemplars; the group key, see
:func:`~pairscore_server.batcher.group_key`) are computed once per batch by
the engine's trie, so rules 3 and 4 keep them together where the fair share
leaves the choice: within a request always (one request alone is batched
exactly as without fairness), between requests when they are tied (requests of
one pair each, all queued at the same level, are grouped as before).
"""

from __future__ import annotations

import collections
import heapq
import itertools
from collections.abc import Hashable, Iterable, Set
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

__all__ = ["GROUP_LOOKAHEAD", "FairQueue", "Key", "Pick", "Queueable"]

#: How many of a lane's queued pairs are searched for a pair sharing the batch's keys.
GROUP_LOOKAHEAD = 4096

Key = tuple[int, ...]


class Queueable(Protocol):
    """What a queued pair must tell the queue: its group key and its tokens."""

    @property
    def key(self) -> Key | None: ...

    @property
    def tokens(self) -> int: ...


T = TypeVar("T", bound=Queueable)
R = TypeVar("R", bound=Hashable)


class _Lane(Generic[R, T]):
    """One request's queued pairs and how much was taken from it."""

    __slots__ = (
        "items",
        "keys",
        "largest",
        "owner",
        "searched",
        "searched_in",
        "seq",
        "served",
        "tokens",
    )

    def __init__(self, owner: R, items: list[T], level: int, seq: int) -> None:
        self.owner = owner
        self.items: collections.deque[T] = collections.deque(items)
        self.keys: collections.Counter[Key] = collections.Counter(
            item.key for item in items if item.key is not None
        )
        self.tokens = sum(item.tokens for item in items)
        self.largest = max(item.tokens for item in items)  # at least the largest still queued
        self.served = level
        self.seq = seq  # arrival order, for ties
        self.searched: set[Key] = set()  # keys with no pair in the lookahead, this batch
        self.searched_in = -1  # the batch `searched` belongs to

    def mate(self, keys: Set[Key], batch: int) -> int | None:
        """Position of the lane's first pair (within the lookahead) with one of ``keys``."""
        if self.searched_in != batch:
            self.searched_in, self.searched = batch, set()
        wanted = {key for key in keys if key in self.keys} - self.searched
        if not wanted:
            return None
        for position, item in enumerate(itertools.islice(self.items, GROUP_LOOKAHEAD)):
            if item.key in wanted:
                return position
        self.searched |= wanted
        return None


@dataclass(frozen=True)
class Pick(Generic[R, T]):
    """The pair :meth:`FairQueue.peek` chose; valid until the queue next changes."""

    item: T
    lane: _Lane[R, T]
    position: int

    @property
    def owner(self) -> R:
        """The request the pair belongs to."""
        return self.lane.owner


class FairQueue(Generic[R, T]):
    """The queued pairs of all requests, handed out by the rule of the module docstring."""

    def __init__(self) -> None:
        self._lanes: dict[R, _Lane[R, T]] = {}
        self._heap: list[tuple[int, int, _Lane[R, T]]] = []  # (served, seq, lane); stale ones skipped
        # The lanes with a queued pair of each group key, oldest first.
        self._by_key: dict[Key, dict[_Lane[R, T], None]] = {}
        self._seq = itertools.count()
        self._level = 0  # the level the last pair was taken at
        self._batch = 0
        self.pairs = 0
        self.tokens = 0

    def __len__(self) -> int:
        return self.pairs

    def __bool__(self) -> bool:
        return self.pairs > 0

    def __contains__(self, owner: object) -> bool:
        return owner in self._lanes

    def owners(self) -> list[R]:
        """The requests with queued pairs, oldest first."""
        return [lane.owner for lane in sorted(self._lanes.values(), key=lambda lane: lane.seq)]

    def add(self, owner: R, items: Iterable[T]) -> None:
        """Queue ``owner``'s pairs as a new lane, at the level of the least-served lane."""
        if owner in self._lanes:
            raise ValueError("this request already has queued pairs")
        listed = list(items)
        if not listed:
            return
        top = self._top()
        level = self._level if top is None else top.served
        lane = _Lane(owner, listed, level, next(self._seq))
        self._lanes[owner] = lane
        heapq.heappush(self._heap, (lane.served, lane.seq, lane))
        for key in lane.keys:
            self._by_key.setdefault(key, {})[lane] = None
        self.pairs += len(listed)
        self.tokens += lane.tokens

    def discard(self, owner: R) -> tuple[int, int]:
        """Remove all of ``owner``'s queued pairs; returns how many pairs and tokens left."""
        lane = self._lanes.pop(owner, None)
        if lane is None:
            return 0, 0
        for key in lane.keys:
            self._unindex(key, lane)
        pairs, tokens = len(lane.items), lane.tokens
        self.pairs -= pairs
        self.tokens -= tokens
        lane.items.clear()
        return pairs, tokens

    def ahead_of(self, tokens: int) -> int:
        """At most how many queued tokens are taken before all of a request of ``tokens``
        tokens that joins now: from each queued request, its own W + M bound of the
        module docstring, or all it has queued if that is less."""
        return sum(min(lane.tokens, tokens + lane.largest) for lane in self._lanes.values())

    def start_batch(self) -> None:
        """A new batch is being formed: grouping searches start afresh."""
        self._batch += 1

    def peek(self, keys: Set[Key]) -> Pick[R, T] | None:
        """The pair the batch being formed (holding group ``keys``) takes next, or None
        when nothing is queued. Nothing changes until :meth:`take`."""
        top = self._top()
        if top is None:
            return None
        if keys:
            for lane in (top, self._tied_mate(top, keys)):
                position = None if lane is None else lane.mate(keys, self._batch)
                if lane is not None and position is not None:
                    return Pick(lane.items[position], lane, position)
        return Pick(top.items[0], top, 0)

    def take(self, pick: Pick[R, T]) -> T:
        """Take the pair :meth:`peek` returned out of the queue (and charge its lane)."""
        lane = pick.lane
        if self._lanes.get(lane.owner) is not lane or lane.items[pick.position] is not pick.item:
            raise ValueError("the queue changed since this pair was picked")
        item = pick.item
        if pick.position:
            del lane.items[pick.position]
        else:
            lane.items.popleft()
        self._level = lane.served
        lane.served += item.tokens
        lane.tokens -= item.tokens
        self.pairs -= 1
        self.tokens -= item.tokens
        if item.key is not None:
            lane.keys[item.key] -= 1
            if not lane.keys[item.key]:
                del lane.keys[item.key]
                self._unindex(item.key, lane)
        if lane.items:
            heapq.heappush(self._heap, (lane.served, lane.seq, lane))
        else:
            del self._lanes[lane.owner]
        return item

    # --- the heap of lanes ------------------------------------------------------------

    def _live(self, entry: tuple[int, int, _Lane[R, T]]) -> bool:
        served, _, lane = entry
        return lane.served == served and self._lanes.get(lane.owner) is lane

    def _top(self) -> _Lane[R, T] | None:
        """The least-served lane (the oldest among ties), dropping stale heap entries."""
        heap = self._heap
        while heap and not self._live(heap[0]):
            heapq.heappop(heap)
        return heap[0][2] if heap else None

    def _tied_mate(self, top: _Lane[R, T], keys: Set[Key]) -> _Lane[R, T] | None:
        """The oldest other lane at ``top``'s level with a queued pair of one of ``keys``."""
        best: _Lane[R, T] | None = None
        for key in keys:
            for lane in self._by_key.get(key, ()):  # oldest first
                if lane.served == top.served and lane is not top:
                    if best is None or lane.seq < best.seq:
                        best = lane
                    break
        return best

    def _unindex(self, key: Key, lane: _Lane[R, T]) -> None:
        lanes = self._by_key[key]
        del lanes[lane]
        if not lanes:
            del self._by_key[key]
