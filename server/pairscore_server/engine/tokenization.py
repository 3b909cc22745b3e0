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
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer

from pairscore.types import Side, TokenizationMode
from pairscore_server.engine.prepared import TokenSpan


@dataclass(frozen=True)
class TokenizedPair:
    """The scored ids of x ⊕ y (no prefix token) with one span per id."""

    ids: tuple[int, ...]
    prompt_tokens: int
    spans: tuple[TokenSpan, ...]
    boundary_straddled: bool

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
        self._first = _plain_text_tokenizer(backend)
        self._cont = _plain_text_tokenizer(continuation_tokenizer(backend))
        # Tokenizers with a document-start dummy prefix (SentencePiece's "▁")
        # skip it when the text already starts with a space, so " Paris"
        # would decode as "Paris". Adding the dummy space explicitly, as
        # SentencePiece itself does, keeps every text lossless.
        self.dummy_prefix = self._first.encode("a").ids != self._cont.encode("a").ids
        self.separate_supported, self.separate_problem = self._check_separate()

    # -- contract checks ---------------------------------------------------

    def decode(self, ids: list[int] | tuple[int, ...]) -> str:
        """Decode ids exactly: special tokens kept, no clean-up of spaces."""
        return self._hf.decode(
            list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False
        )

    def _encode_first(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and code-point offsets of ``text`` at the start of a document."""
        if not self.dummy_prefix:
            enc = self._first.encode(text, add_special_tokens=False)
            return enc.ids, enc.offsets
        enc = self._cont.encode(" " + text, add_special_tokens=False)
        return enc.ids, [(max(s - 1, 0), max(e - 1, 0)) for s, e in enc.offsets]

    def _check_separate(self) -> tuple[bool, str]:
        probes = [("Hello", " world"), ("a", "b"), ("The answer is", "42.\n"), (" x", "  y")]
        for x, y in probes:
            ids = self._encode_first(x)[0]
            ids += self._cont.encode(y, add_special_tokens=False).ids
            got = self.decode(ids)
            if got != x + y:
                return False, (
                    "this tokenizer cannot tokenize the response separately and still "
                    f"decode to prompt+response ({x + y!r} came back as {got!r}); "
                    "use TOKENIZATION_MODE_JOINT"
                )
        return True, ""

    # -- encoding ------------------------------------------------------------

    def encode(self, prompt: str, response: str, mode: TokenizationMode) -> TokenizedPair:
        """Tokenize one pair; raises ValueError when ``mode`` is unsupported here."""
        if mode is TokenizationMode.JOINT:
            return self._encode_joint(prompt, response)
        if not self.separate_supported:
            raise ValueError(self.separate_problem)
        return self._encode_separate(prompt, response)

    def _encode_separate(self, prompt: str, response: str) -> TokenizedPair:
        x_ids, x_offsets = self._encode_first(prompt) if prompt else ([], [])
        y = self._cont.encode(response, add_special_tokens=False)
        spans = [TokenSpan(Side.PROMPT, s, e) for s, e in x_offsets]
        spans += [TokenSpan(Side.RESPONSE, s, e) for s, e in y.offsets]
        return TokenizedPair(tuple(x_ids + y.ids), len(x_ids), tuple(spans), False)

    def _encode_joint(self, prompt: str, response: str) -> TokenizedPair:
        text = prompt + response
        if not text:
            return TokenizedPair((), 0, (), False)
        ids, offsets = self._encode_first(text)
        cut = len(prompt)
        spans: list[TokenSpan] = []
        prompt_tokens = 0
        straddled = False
        for start, end in offsets:
            if start < cut and end <= cut:
                # Only prompt tokens may precede this one: the tokens are in order.
                prompt_tokens += 1
                spans.append(TokenSpan(Side.PROMPT, start, end))
            else:
                straddles = start < cut
                straddled = straddled or straddles
                spans.append(
                    TokenSpan(Side.RESPONSE, max(start - cut, 0), end - cut, straddles)
                )
        return TokenizedPair(tuple(ids), prompt_tokens, tuple(spans), straddled)

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
            texts.append(both[len(head):] if both.startswith(head) else self.decode([tid]))
        return texts
