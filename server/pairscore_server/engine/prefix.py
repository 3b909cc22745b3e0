"""Choosing the prefix token p that the first prompt token is conditioned on.

The first token of a text has no left context, so scoring it needs a token
to condition on; pairscore never scores a token against nothing. The rule,
in order:

1. ``--prefix-token TOKEN`` given: that token (``CUSTOM``).
2. The tokenizer adds a BOS token by itself (Llama, Mistral, Gemma):
   that BOS (``BOS``) -- the sequence then looks exactly as in training.
3. The family adds no BOS (GPT-2, SmolLM2, Qwen): its document separator
   (``DOCUMENT_SEPARATOR``), ``<|endoftext|>`` where the vocabulary has it,
   else the EOS token -- as lm-evaluation-harness does for GPT-2-style models.
4. Otherwise a BOS token the tokenizer knows but does not add.

The engine prepends p itself and tokenizes user text without special
tokens, so p appears exactly once, whatever the text holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pairscore.types import PrefixPolicy

DOCUMENT_SEPARATOR = "<|endoftext|>"


@dataclass(frozen=True)
class Prefix:
    """The resolved prefix token."""

    policy: PrefixPolicy
    token_id: int
    token: str


def _single_token_id(tokenizer: Any, token: str) -> int | None:
    vocab = tokenizer.get_vocab()
    return vocab.get(token)


def resolve_prefix(tokenizer: Any, override: str | None = None) -> Prefix:
    """Apply the rule above to a transformers tokenizer; raises ValueError if none fits."""
    if override:
        token_id = _single_token_id(tokenizer, override)
        if token_id is None:
            raise ValueError(
                f"--prefix-token {override!r} is not a single token of this tokenizer's "
                "vocabulary; give the token's exact text, e.g. '<s>' or '<|endoftext|>'"
            )
        return Prefix(PrefixPolicy.CUSTOM, token_id, override)

    bos_id = tokenizer.bos_token_id
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    if bos_id is not None and probe and probe[0] == bos_id:
        return Prefix(PrefixPolicy.BOS, bos_id, tokenizer.bos_token)

    sep_id = _single_token_id(tokenizer, DOCUMENT_SEPARATOR)
    if sep_id is not None:
        return Prefix(PrefixPolicy.DOCUMENT_SEPARATOR, sep_id, DOCUMENT_SEPARATOR)
    if tokenizer.eos_token_id is not None:
        return Prefix(PrefixPolicy.DOCUMENT_SEPARATOR, tokenizer.eos_token_id, tokenizer.eos_token)
    if bos_id is not None:
        return Prefix(PrefixPolicy.BOS, bos_id, tokenizer.bos_token)
    raise ValueError(
        "the tokenizer has no BOS, EOS or <|endoftext|> token to condition the first "
        "prompt token on; choose one with --prefix-token"
    )
