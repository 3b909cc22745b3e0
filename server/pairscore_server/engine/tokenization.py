"""Turning a (prompt, response) pair into scored token ids: the tokenization contract.

Two modes (see :class:`pairscore.types.TokenizationMode`):

``SEPARATE``
    x is tokenized as the start of a document, y as a *continuation*: the
    same tokenizer with its document-start dummy prefix switched off
    (SentencePiece's ``▁`` prepended to the first word, byte-level BPE's
    ``add_prefix_space``). The ids are concatenated, so y's tokens never
    depend on x and no spurious space token appears at the start of y.
``JOINT``
    x + y is tokenized once and the tokens are split at the character
    boundary ``len(x)`` with the tokenizer's offsets; a token that begins in
    x and ends in y counts toward y and is flagged.

In both modes special-token strings in user text (``"<|endoftext|>"``,
``"<s>"``) are tokenized as plain text, never turned into special tokens,
and no special token is added: the only special token in a scored sequence
is the prefix token that the engine puts in front.

Normalizing tokenizers (a Unicode normalizer such as the NFC that
transformers 5 gives Qwen2 tokenizers) tokenize the *normalized* text, so
the ids decode to it: N(x) + N(y) in SEPARATE mode, N(x + y) in JOINT mode.
Spans still index the original x and y: the tokenizer's offsets map
normalized characters back to the original text, and where a normalizer
merged several code points into one (e + U+0301 -> é) the code points the
offsets leave out are given to the token(s) of the character they were
merged into (:func:`cover_text`), so every code point of a side lies in
exactly one token span, or in the one span shared by the tokens of one
character.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer

from pairscore.types import TokenizationMode


@dataclass(frozen=True)
class TokenizedPair:
    """The scored ids of x ⊕ y (no prefix token), each with its code-point span in
    its own side's text; ``straddle_index`` as in PreparedPair."""

    ids: tuple[int, ...]
    prompt_tokens: int
    offsets: tuple[tuple[int, int], ...]
    boundary_straddled: bool
    straddle_index: int = -1
    #: Chat prompts: x and y as the chat template rendered them (the texts the spans index).
    rendered_prompt: str = ""
    rendered_response: str = ""
    #: Chat prompts whose rendering opens with a control token: that token's id, the
    #: context c in place of the prefix token p (PreparedPair.input_ids[0]); -1: p.
    context_id: int = -1

    @property
    def response_tokens(self) -> int:
        return len(self.ids) - self.prompt_tokens


def _without_document_start(node: Any) -> Any:
    """Copy a tokenizer.json subtree with every document-start prefix switched off."""
    if isinstance(node, list):
        return [_without_document_start(n) for n in node if not _is_prepend(n)]
    if not isinstance(node, dict):
        return node
    node = {k: _without_document_start(v) for k, v in node.items()}
    kind = node.get("type")
    if kind == "Metaspace":
        node["prepend_scheme"] = "never"
        if "add_prefix_space" in node:  # tokenizers < 0.14 serialisation
            node["add_prefix_space"] = False
    elif kind == "ByteLevel":
        node["add_prefix_space"] = False
    return node


def _is_prepend(node: Any) -> bool:
    return isinstance(node, dict) and node.get("type") == "Prepend"


#: Normalizer types that only handle SentencePiece's spaces: they change no
#: character of the text as the ids decode it.
_SPACE_ONLY_NORMALIZERS = {"Sequence", "Prepend"}


def _normalizer_kinds(node: Any) -> list[str]:
    """The types of the normalizers in a tokenizer.json ``normalizer`` subtree
    that change text, in order (SentencePiece's space handling left out)."""
    if isinstance(node, list):
        return [k for n in node for k in _normalizer_kinds(n)]
    if not isinstance(node, dict):
        return []
    kinds = _normalizer_kinds(node.get("normalizers", []))
    kind = node.get("type")
    if kind == "Replace" and node.get("pattern") == {"String": " "} and node.get("content") == "▁":
        return kinds
    if isinstance(kind, str) and kind not in _SPACE_ONLY_NORMALIZERS:
        kinds.insert(0, kind)
    return kinds


def cover_text(offsets: Sequence[tuple[int, int]], length: int) -> list[tuple[int, int]]:
    """Spans that cover all ``length`` code points of a side, from tokenizer offsets.

    Offsets are clamped into ``[0, length]``. A normalizer that merges code
    points (NFC: e + U+0301 -> é) maps the merged character back to its
    first code point only; the code points left out are given to the
    token(s) that hold the character before them (all tokens with that
    same span), the text before the first token to the first token's span
    and the text after the last token to the last. Empty spans stay empty.
    """
    spans = [(min(max(s, 0), length), min(max(e, 0), length)) for s, e in offsets]
    groups: list[list[int]] = []  # runs of tokens with one identical non-empty span
    for i, (s, e) in enumerate(spans):
        if e <= s:
            continue
        if groups and spans[groups[-1][0]] == (s, e):
            groups[-1].append(i)
        else:
            groups.append([i])
    if not groups:
        return spans
    for k, group in enumerate(groups):
        s, e = spans[group[0]]
        if k == 0:
            s = 0
        nxt = spans[groups[k + 1][0]][0] if k + 1 < len(groups) else length
        e = max(e, nxt)
        for i in group:
            spans[i] = (s, e)
    return spans


def continuation_tokenizer(backend: Tokenizer) -> Tokenizer:
    """The same tokenizer, tokenizing text as the continuation of a document.

    Only the normalizer and the pre-tokenizer change: a ``Prepend`` normalizer
    (old Llama tokenizers) is dropped, ``Metaspace`` never prepends ``▁`` and
    ``ByteLevel`` adds no prefix space. Vocabulary and merges are untouched.
    """
    spec = json.loads(backend.to_str())
    for key in ("normalizer", "pre_tokenizer"):
        if spec.get(key) is not None:
            spec[key] = _without_document_start(spec[key])
            if _is_prepend(spec[key]):
                spec[key] = None
    return Tokenizer.from_str(json.dumps(spec))


def _plain_text_tokenizer(backend: Tokenizer) -> Tokenizer:
    """A private copy of ``backend`` that tokenizes special-token strings as text."""
    copy = Tokenizer.from_str(backend.to_str())
    copy.no_truncation()
    copy.no_padding()
    copy.encode_special_tokens = True
    return copy


class PairTokenizer:
    """Tokenizes pairs under the documented contract.

    ``hf_tokenizer`` must be a fast (``tokenizers``-backed) transformers
    tokenizer: its offsets give the character spans. ``decode`` is used only
    to check that the ids round-trip and to render per-token text.
    """

    def __init__(self, hf_tokenizer: Any) -> None:
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(
                f"{type(hf_tokenizer).__name__} is not a fast tokenizer; pairscore needs "
                "token offsets, which only tokenizers-backed tokenizers provide"
            )
        self._hf = hf_tokenizer
        #: The normalizers that change text before it is tokenized (e.g.
        #: ["NFC"]); empty when the ids decode back to the text itself.
        self.normalizers: tuple[str, ...] = tuple(
            _normalizer_kinds(json.loads(backend.to_str()).get("normalizer"))
        )
        self._first = _plain_text_tokenizer(backend)
        self._cont = _plain_text_tokenizer(continuation_tokenizer(backend))
        # Tokenizers with a document-start dummy prefix (SentencePiece's "▁")
        # skip it when the text already starts with a space, so " Paris"
        # would decode as "Paris". Adding the dummy space explicitly, as
        # SentencePiece itself does, keeps every text lossless.
        self.dummy_prefix = self._first.encode("a").ids != self._cont.encode("a").ids
        self.separate_supported, self.separate_problem = self._check_separate()

    @property
    def normalizes(self) -> bool:
        """Whether the tokenizer normalizes text, so that ids decode to the
        normalized text rather than the text given."""
        return bool(self.normalizers)

    # -- contract checks ---------------------------------------------------

    def decode(self, ids: list[int] | tuple[int, ...]) -> str:
        """Decode ids exactly: special tokens kept, no clean-up of spaces."""
        return self._hf.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _encode_first(self, texts: Sequence[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """Ids and code-point offsets of each text at the start of a document (empty: none)."""
        todo = [i for i, t in enumerate(texts) if t]
        out: list[tuple[list[int], list[tuple[int, int]]]] = [([], []) for _ in texts]
        if not todo:
            return out
        if not self.dummy_prefix:
            encs = self._first.encode_batch([texts[i] for i in todo], add_special_tokens=False)
            for i, enc in zip(todo, encs, strict=True):
                out[i] = (enc.ids, enc.offsets)
            return out
        encs = self._cont.encode_batch([" " + texts[i] for i in todo], add_special_tokens=False)
        for i, enc in zip(todo, encs, strict=True):
            out[i] = (enc.ids, [(max(s - 1, 0), max(e - 1, 0)) for s, e in enc.offsets])
        return out

    def _normalized(self, text: str) -> str:
        normalizer = self._first.normalizer
        return normalizer.normalize_str(text) if self.normalizes and normalizer else text

    def _check_separate(self) -> tuple[bool, str]:
        probes = [("Hello", " world"), ("a", "b"), ("The answer is", "42.\n"), (" x", "  y")]
        for x, y in probes:
            ids = self._encode_first([x])[0][0]
            ids += self._cont.encode(y, add_special_tokens=False).ids
            got = self.decode(ids)
            if got != self._normalized(x) + self._normalized(y):
                return False, (
                    "this tokenizer cannot tokenize the response separately and still "
                    f"decode to prompt+response ({x + y!r} came back as {got!r}); "
                    "use TOKENIZATION_MODE_JOINT"
                )
        return True, ""

    # -- encoding ------------------------------------------------------------

    def encode(self, prompt: str, response: str, mode: TokenizationMode) -> TokenizedPair:
        """Tokenize one pair; raises ValueError when ``mode`` is unsupported here."""
        return self.encode_many([(prompt, response)], mode)[0]

    def encode_many(self, pairs: Sequence[tuple[str, str]], mode: TokenizationMode) -> list[TokenizedPair]:
        """Tokenize many pairs at once (the tokenizers library batches them in
        parallel and outside the GIL); raises ValueError when ``mode`` is
        unsupported here."""
        if mode is TokenizationMode.JOINT:
            whole = self._encode_first([x + y for x, y in pairs])
            return [
                self._split_joint(len(x), ids, cover_text(offsets, len(x) + len(y)))
                for (x, y), (ids, offsets) in zip(pairs, whole, strict=True)
            ]
        if not self.separate_supported:
            raise ValueError(self.separate_problem)
        prompts = self._encode_first([x for x, _ in pairs])
        responses = self._cont.encode_batch([y for _, y in pairs], add_special_tokens=False)
        return [
            TokenizedPair(
                tuple(x_ids + y.ids),
                len(x_ids),
                tuple(cover_text(x_offsets, len(x)) + cover_text(y.offsets, len(y_text))),
                False,
            )
            for (x, y_text), (x_ids, x_offsets), y in zip(pairs, prompts, responses, strict=True)
        ]

    def encode_prompts(self, texts: Sequence[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """Each text as a prompt alone (the start of a document): ids and spans covering it.

        The same ids as the prompt side of a SEPARATE pair."""
        return [
            (ids, cover_text(offsets, len(text)))
            for text, (ids, offsets) in zip(texts, self._encode_first(texts), strict=True)
        ]

    def encode_responses(self, texts: Sequence[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """Each text as a response alone (a continuation): ids and spans covering it.

        The same ids as the response side of a SEPARATE pair."""
        if not texts:
            return []
        encs = self._cont.encode_batch(list(texts), add_special_tokens=False)
        return [(enc.ids, cover_text(enc.offsets, len(text))) for text, enc in zip(texts, encs, strict=True)]

    def tokenize(self, texts: Sequence[str], *, parse_special_tokens: bool = False) -> list[tuple[int, ...]]:
        """The ids of each text, tokenized on its own, with no special token added.

        ``parse_special_tokens=False``: special-token strings are plain text
        and the text is the start of a document, exactly the ids a prompt of
        that text is scored with. ``True``: special-token strings become
        their special tokens, as ``tokenizer(text, add_special_tokens=False)``.
        """
        if not texts:
            return []
        if not parse_special_tokens:
            return [tuple(ids) for ids, _ in self._encode_first(texts)]
        encoded = self._hf(list(texts), add_special_tokens=False)["input_ids"]
        return [tuple(ids) for ids in encoded]

    @staticmethod
    def _split_joint(cut: int, ids: list[int], offsets: list[tuple[int, int]]) -> TokenizedPair:
        """Split the tokens of x + y at character ``cut`` = len(x)."""
        spans: list[tuple[int, int]] = []
        prompt_tokens = 0
        straddle_index = -1
        for i, (start, end) in enumerate(offsets):
            if start < cut and end <= cut:
                # Only prompt tokens may precede this one: the tokens are in order.
                prompt_tokens += 1
                spans.append((start, end))
            else:
                if start < cut and straddle_index < 0:
                    # Begins in x, ends in y: counts toward y. Several tokens
                    # can share the straddling character's span (its bytes);
                    # the first is recorded, PreparedPair.spans flags them all.
                    straddle_index = i
                spans.append((max(start - cut, 0), end - cut))
        return TokenizedPair(tuple(ids), prompt_tokens, tuple(spans), straddle_index >= 0, straddle_index)

    def token_texts(self, prefix_id: int, ids: tuple[int, ...]) -> list[str]:
        """Each token decoded on its own, leading space kept.

        Decoders that strip the first space of a text (SentencePiece) would
        turn "▁Paris" into "Paris"; decoding after the prefix token and
        removing the prefix's text keeps it.
        """
        head = self.decode([prefix_id])
        texts = []
        for tid in ids:
            both = self.decode([prefix_id, tid])
            texts.append(both[len(head) :] if both.startswith(head) else self.decode([tid]))
        return texts
